"""``fedmq participant``: one device as a process."""

from __future__ import annotations

import asyncio
import logging

import torch

from fedmq._log import log_event
from fedmq.errors import ModelMismatch
from fedmq.participant._config import ParticipantConfig
from fedmq.participant._runtime import Participant, ParticipantStats
from fedmq.tasks import DeviceData, Task
from fedmq.transport import TransportConfig, connect_participant

__all__ = ["run_participant"]

_log = logging.getLogger("fedmq.participant")


async def run_participant(
    config: ParticipantConfig,
    transport_config: TransportConfig,
    task: Task,
    data: DeviceData,
) -> int:
    """Train ``task`` on ``data`` (the device's own) and publish until cancelled
    (SIGTERM / Ctrl-C)."""
    # Devices are small: one intra-op thread, so several processes share a host fairly.
    torch.set_num_threads(1)
    log_event(
        _log,
        "starting",
        participant=config.participant_id,
        task=task.name,
        examples=len(data.train),  # type: ignore[arg-type]
        held_out=len(data.held_out),  # type: ignore[arg-type]
        broker=transport_config.redacted_url,
    )
    mismatch: ModelMismatch | None = None
    try:
        async with (
            connect_participant(transport_config, config.participant_id) as transport,
            asyncio.TaskGroup() as tg,
        ):
            participant = Participant(config, transport, task, data)
            log_event(_log, "resuming", next_seq=participant.next_seq, pending=participant.pending)
            participant.start(tg)
            tg.create_task(_status(config.participant_id, participant.stats), name="status")
    except* ModelMismatch as group:  # cannot take part: say why in one line, and exit
        found = group.exceptions[0]
        assert isinstance(found, ModelMismatch)
        mismatch = found
    if mismatch is not None:
        # Raised here, not inside ``except*``: Python before 3.11.4 would wrap it in an
        # ExceptionGroup again, and the one-line error would become a traceback.
        raise mismatch
    return 0


async def _status(pid: str, stats: ParticipantStats, every_s: float = 10.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        log_event(
            _log,
            "status",
            participant=pid,
            model_version=stats.model_version,
            trained=stats.trained,
            published=stats.published,
            skipped=dict(stats.skipped),
            loss=stats.last_loss,
        )

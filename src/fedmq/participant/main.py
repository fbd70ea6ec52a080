"""``fedmq participant``: one device as a process."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import torch

from fedmq._log import log_event
from fedmq.data import (
    dirichlet_partition,
    iid_partition,
    load_fashion_mnist,
    resolve_data_dir,
    to_tensors,
)
from fedmq.errors import ModelMismatch
from fedmq.participant._config import ParticipantConfig
from fedmq.participant._runtime import Participant, ParticipantStats
from fedmq.transport import TransportConfig, connect_participant

__all__ = ["run_participant", "split"]

_log = logging.getLogger("fedmq.participant")


def split(labels: np.ndarray, kind: str, count: int, alpha: float, seed: int) -> list[np.ndarray]:
    """The fleet's split of the training set: ``count`` index arrays."""
    if kind == "iid":
        return iid_partition(len(labels), count, seed)
    return dirichlet_partition(labels, count, alpha, seed)


async def run_participant(
    config: ParticipantConfig,
    transport_config: TransportConfig,
    *,
    data_dir: str | None,
    shard: tuple[int, int],
    partition: str,
    dirichlet_alpha: float,
    max_examples: int = 0,
) -> int:
    """Train and publish until cancelled (SIGTERM / Ctrl-C)."""
    index, count = shard
    train, _ = load_fashion_mnist(resolve_data_dir(data_dir))
    indices = split(train.labels, partition, count, dirichlet_alpha, config.seed)[index]
    if 0 < max_examples < len(indices):
        rng = np.random.default_rng([config.seed, index])
        indices = np.sort(rng.choice(indices, max_examples, replace=False))
    x, y = to_tensors(train, indices)
    # Devices are small: one intra-op thread, so several processes share a host fairly.
    torch.set_num_threads(1)
    log_event(
        _log,
        "starting",
        participant=config.participant_id,
        shard=f"{index}/{count}",
        examples=len(y),
        broker=transport_config.redacted_url,
    )
    try:
        async with (
            connect_participant(transport_config, config.participant_id) as transport,
            asyncio.TaskGroup() as tg,
        ):
            participant = Participant(config, transport, x, y)
            log_event(_log, "resuming", next_seq=participant.next_seq, pending=participant.pending)
            participant.start(tg)
            tg.create_task(_status(config.participant_id, participant.stats), name="status")
    except* ModelMismatch as group:  # cannot take part: say why in one line, and exit
        raise group.exceptions[0] from None
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

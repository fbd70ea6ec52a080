"""The aggregator's audit trail and graceful stop, over the embedded broker.

"committed" must say exactly what the checkpoint on disk covers, whenever it is
written (by the count, by the timer, or on the way out), because the chaos test
reconciles every published update against it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedmq.aggregator import Aggregator, AggregatorConfig
from fedmq.aggregator._checkpoint import load_checkpoint
from fedmq.transport import AggregatorTransport, Delivery, TransportConfig, connect_aggregator
from tests.unit.test_aggregator import FEDASYNC, send
from tests.updates import INITIAL, delta, update


class SlowModels:
    """The embedded transport, but publishing a model takes ``delay_s`` (a slow link)."""

    def __init__(self, inner: AggregatorTransport, delay_s: float) -> None:
        self._inner = inner
        self.delay_s = delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)  # everything else: the embedded transport's

    def updates(self) -> AsyncIterator[Delivery]:
        return self._inner.updates()

    async def publish_model(self, body: bytes, *, version: int, keyframe: bool = True) -> None:
        await asyncio.sleep(self.delay_s)
        await self._inner.publish_model(body, version=version, keyframe=keyframe)


class Audit(logging.Handler):
    """Records each "committed"/"resumed"/"rejected" event, with the checkpoint on disk
    at the moment "committed" was logged."""

    def __init__(self, checkpoint_dir: Path) -> None:
        super().__init__(logging.DEBUG)
        self.checkpoint_dir = checkpoint_dir
        self.events: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = dict(getattr(record, "fedmq_fields", {}))
        fields["event"] = record.getMessage()
        if fields["event"] == "committed":
            checkpoint = load_checkpoint(self.checkpoint_dir)
            assert checkpoint is not None
            fields["on_disk"] = dict(checkpoint.last_seq)
        self.events.append(fields)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[Audit]:
    handler = Audit(tmp_path)
    logger = logging.getLogger("fedmq.aggregator")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _config(tmp_path: Path, **overrides: Any) -> AggregatorConfig:
    options: dict[str, Any] = {
        "strategy": FEDASYNC,
        "eval_every": 0,
        "checkpoint_dir": tmp_path,
        "checkpoint_every": 100,
        "checkpoint_interval_s": 0.05,
        "publish_interval_s": 0.0,  # these updates cite versions just made
    }
    options.update(overrides)
    return AggregatorConfig(**options)


async def _serve(
    config: AggregatorConfig, job: str, settled: int, *, publish_delay_s: float = 0.0
) -> Aggregator:
    """Run until ``settled`` updates were applied or refused, then stop (cancel) it."""
    transport_config = TransportConfig(url="memory://unit", job=job)
    async with connect_aggregator(transport_config) as inner, asyncio.TaskGroup() as tg:
        transport = SlowModels(inner, 0.0)
        aggregator = Aggregator(config, transport, INITIAL)
        transport.delay_s = publish_delay_s  # the first (initial) model goes out at once
        task = tg.create_task(aggregator.run(tg), name="aggregator")
        async with asyncio.timeout(20):
            while aggregator.stats.applied + sum(aggregator.stats.rejected.values()) < settled:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        task.cancel()
    return aggregator


def _applied_so_far(committed: list[dict[str, Any]]) -> list[dict[str, int]]:
    """After each "committed": the highest applied seq per participant, from the events."""
    highest: dict[str, int] = {}
    out = []
    for event in committed:
        for pid, seqs in event["applied"].items():
            highest[pid] = max(highest.get(pid, -1), *seqs)
        out.append(dict(highest))
    return out


async def test_timer_checkpoints_describe_exactly_what_is_on_disk(
    tmp_path: Path, job: str, audit: Audit
) -> None:
    # Each apply publishes a model slowly, so the 50 ms checkpoint timer fires while an
    # apply is half done (model and version changed, delivery not yet handed over).
    await send(job, "dev-1", *(update("dev-1", s, s, delta(0.1)) for s in range(6)))
    await _serve(_config(tmp_path), job, 6, publish_delay_s=0.2)
    committed = audit.named("committed")
    assert len(committed) >= 2
    assert [e["on_disk"] for e in committed] == _applied_so_far(committed)
    assert [e["commit"] for e in committed] == list(range(1, len(committed) + 1))
    assert sorted(s for e in committed for s in e["applied"].get("dev-1", [])) == list(range(6))


async def test_stop_finishes_the_update_in_hand_and_commits_it(
    tmp_path: Path, job: str, audit: Audit
) -> None:
    config = _config(tmp_path, checkpoint_interval_s=60.0, shutdown_timeout_s=5.0)
    await send(job, "dev-1", update("dev-1", 0, 0, delta(0.1)))
    transport_config = TransportConfig(url="memory://unit", job=job)
    async with connect_aggregator(transport_config) as inner, asyncio.TaskGroup() as tg:
        transport = SlowModels(inner, 0.0)
        aggregator = Aggregator(config, transport, INITIAL)
        transport.delay_s = 1.0
        task = tg.create_task(aggregator.run(tg), name="aggregator")
        async with asyncio.timeout(5):
            while not aggregator.stats.applied:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        # Applied, its model still being published: stop now.
        task.cancel()
    assert audit.named("stopped")
    assert [e["applied"] for e in audit.named("committed")] == [{"dev-1": [0]}]
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.version == 1
    assert checkpoint.last_seq == {"dev-1": 0}


async def test_resume_repeats_the_last_commit_and_rejections_name_the_seq(
    tmp_path: Path, job: str, audit: Audit
) -> None:
    config = _config(tmp_path, checkpoint_interval_s=60.0)
    await send(job, "dev-1", *(update("dev-1", s, 0, delta(0.1)) for s in range(2)))
    await _serve(config, job, 2)
    last = audit.named("committed")[-1]
    # A redelivery of seq 1 (refused as a duplicate) and a new update.
    await send(job, "dev-1", update("dev-1", 1, 0, delta(0.1)), update("dev-1", 2, 1, delta(0.1)))
    await _serve(config, job, 4)
    (resumed,) = audit.named("resumed")
    assert resumed["commit"] == last["commit"]
    assert resumed["last_applied"] == last["applied"]
    (rejected,) = audit.named("rejected")
    assert (rejected["participant"], rejected["seq"], rejected["reason"]) == (
        "dev-1",
        1,
        "duplicate",
    )
    assert audit.named("committed")[-1]["commit"] == last["commit"] + 1

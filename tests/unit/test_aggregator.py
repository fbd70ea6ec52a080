"""The aggregator service over the embedded broker: apply, publish, and every policy rejection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest

from fedmq.aggregator import Aggregator, AggregatorConfig
from fedmq.strategies import FedAsyncConfig, FedBuffConfig, StalenessConfig, StrategyConfig
from fedmq.transport import TransportConfig, connect_aggregator, connect_participant
from fedmq.transport.embedded import embedded_broker
from fedmq.wire import decode_model, materialize
from tests.updates import INITIAL, delta, update


@asynccontextmanager
async def running(
    strategy: StrategyConfig, job: str, publish_interval_s: float = 0.0
) -> AsyncIterator[Aggregator]:
    config = TransportConfig(url="memory://unit", job=job)
    async with connect_aggregator(config) as transport, asyncio.TaskGroup() as tg:
        aggregator = Aggregator(
            AggregatorConfig(
                strategy=strategy, eval_every=0, publish_interval_s=publish_interval_s
            ),
            transport,
            INITIAL,
        )
        task = tg.create_task(aggregator.run(tg), name="aggregator")
        yield aggregator
        task.cancel()


async def send(job: str, pid: str, *bodies: bytes) -> None:
    async with connect_participant(TransportConfig(url="memory://unit", job=job), pid) as p:
        for body in bodies:
            await p.publish_update(body)


async def settled(aggregator: Aggregator, count: int) -> None:
    async with asyncio.timeout(10):
        while aggregator.stats.applied + aggregator.stats.dropped < count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


FEDASYNC = StrategyConfig(
    name="fedasync",
    max_staleness=2,
    fedasync=FedAsyncConfig(alpha=0.5, staleness=StalenessConfig(function="constant")),
)


async def test_fedasync_apply_publishes_the_mixed_model(job: str) -> None:
    async with running(FEDASYNC, job) as aggregator:
        await send(job, "dev-1", update("dev-1", 0, 0, delta(2.0)))
        await settled(aggregator, 1)
        # x <- (1 - 0.5) x + 0.5 (base + delta)
        # w = 0.5*0 + 0.5*(0+2) = 1;  b = 0.5*1 + 0.5*(1+2) = 2
        np.testing.assert_allclose(aggregator.params["w"], np.ones((2, 2)))
        np.testing.assert_allclose(aggregator.params["b"], np.full(2, 2.0))
        async with asyncio.timeout(5):  # published off the apply path: soon, not at once
            while aggregator.stats.models_published < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        latest = embedded_broker("unit").latest_model(job)
        assert latest is not None and latest[0] == 1
        model = decode_model(latest[1])
        assert model.version == 1
        np.testing.assert_allclose(materialize(model.tensors)["b"], np.full(2, 2.0))


async def test_publishes_are_spaced_and_the_newest_version_wins(job: str) -> None:
    async with running(FEDASYNC, job, publish_interval_s=0.5) as aggregator:
        started = time.monotonic()
        # Three versions made at once (v1..v3): one publish, of v3, 0.5 s after v0's.
        await send(job, "dev-1", *(update("dev-1", s, 0, delta(1.0)) for s in range(3)))
        await settled(aggregator, 3)
        assert aggregator.version == 3
        async with asyncio.timeout(5):
            while aggregator.stats.models_published < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert time.monotonic() - started >= 0.45
        latest = embedded_broker("unit").latest_model(job)
        assert latest is not None and latest[0] == 3
        await asyncio.sleep(0.6)
        assert aggregator.stats.models_published == 2  # v1 and v2 never went out


async def test_stale_update_mixes_with_its_own_base(job: str) -> None:
    async with running(FEDASYNC, job) as aggregator:
        await send(job, "dev-1", update("dev-1", 0, 0, delta(2.0)))  # -> v1: w=1, b=2
        await send(job, "dev-2", update("dev-2", 0, 0, delta(4.0)))  # trained from v0
        await settled(aggregator, 2)
        # local = v0 + 4 = (w 4, b 5); x = 0.5*(w 1, b 2) + 0.5*(w 4, b 5) = (2.5, 3.5)
        np.testing.assert_allclose(aggregator.params["w"], np.full((2, 2), 2.5))
        np.testing.assert_allclose(aggregator.params["b"], np.full(2, 3.5))
        assert aggregator.stats.staleness == {0: 1, 1: 1}


@pytest.mark.parametrize(
    ("bodies", "reason"),
    [
        ([update("dev-1", 0, 0, delta(1.0)), update("dev-1", 0, 0, delta(1.0))], "duplicate"),
        ([update("dev-1", 3, 0, delta(1.0)), update("dev-1", 2, 1, delta(1.0))], "duplicate"),
        ([update("dev-1", 0, 7, delta(1.0))], "future_base"),
        ([update("dev-9", 0, 0, delta(1.0))], "participant_mismatch"),
        ([b"\xc1not msgpack"], "undecodable"),
        ([update("dev-1", 0, 0, {"w": np.zeros((2, 2), np.float32)})], "tensor_mismatch"),
    ],
)
async def test_rejections_are_counted_and_visible(
    job: str, bodies: list[bytes], reason: str
) -> None:
    async with running(FEDASYNC, job) as aggregator:
        await send(job, "dev-1", *bodies)
        await settled(aggregator, len(bodies))
        assert aggregator.stats.rejected == {reason: 1}
        records = embedded_broker("unit").rejected(job)
        assert [r.reason for r in records] == [reason]
        # The service keeps going: a good update after the bad one is applied.
        await send(job, "dev-5", update("dev-5", 0, aggregator.version, delta(1.0)))
        await settled(aggregator, len(bodies) + 1)
        assert aggregator.stats.rejected == {reason: 1}


async def test_too_stale_updates_are_dropped(job: str) -> None:
    async with running(FEDASYNC, job) as aggregator:
        await send(job, "dev-1", *(update("dev-1", s, s, delta(0.1)) for s in range(3)))
        await settled(aggregator, 3)
        await send(job, "dev-2", update("dev-2", 0, 0, delta(1.0)))  # staleness 3 > 2
        await settled(aggregator, 4)
        assert aggregator.stats.rejected == {"too_stale": 1}
        assert aggregator.version == 3


async def test_fedbuff_advances_once_per_buffer(job: str) -> None:
    strategy = StrategyConfig(
        name="fedbuff",
        max_staleness=5,
        fedbuff=FedBuffConfig(buffer_size=2, staleness=StalenessConfig(function="constant")),
    )
    async with running(strategy, job) as aggregator:
        await send(job, "dev-1", update("dev-1", 0, 0, delta(1.0)))
        await settled(aggregator, 1)
        assert aggregator.version == 0 and aggregator.stats.buffered == 1
        await send(job, "dev-2", update("dev-2", 0, 0, delta(3.0)))
        await settled(aggregator, 2)
        # g = (1*1 + 1*3) / 2 = 2; x = 0 + 1.0 * 2
        assert aggregator.version == 1
        np.testing.assert_allclose(aggregator.params["w"], np.full((2, 2), 2.0))


async def test_run_returns_when_the_transport_closes(job: str) -> None:
    # No more updates can come: the service stops as it does when cancelled, settled.
    config = TransportConfig(url="memory://unit", job=job)
    async with asyncio.TaskGroup() as tg:
        transport = connect_aggregator(config)
        await transport.__aenter__()
        aggregator = Aggregator(
            AggregatorConfig(strategy=FEDASYNC, eval_every=0, publish_interval_s=0.0),
            transport,
            INITIAL,
        )
        task = tg.create_task(aggregator.run(tg), name="aggregator")
        await send(job, "dev-1", update("dev-1", 0, 0, delta(1.0)))
        await settled(aggregator, 1)
        await transport.__aexit__(None, None, None)
        async with asyncio.timeout(5):
            await task
    assert aggregator.stats.applied == 1

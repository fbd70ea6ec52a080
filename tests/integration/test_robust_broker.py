"""Robust aggregation in a real run over the real RabbitMQ and Mosquitto (issue #11).

The aggregator service (the one ``fedmq aggregator`` runs) consumes from the real
broker; a device publishes honest updates and one malicious, boosted update (50x an
honest delta: the bench's scale attack) through it. FedAsync's outlier check refuses it
(``outlier``), FedBuff's norm-bounded rule scales it down; both are counted in the
aggregator's stats and in its Prometheus metrics. The relative norm bound of
aggregator/_bounds.py is turned off, so only the robust defence is measured.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import numpy as np

from fedmq.aggregator import Aggregator, AggregatorConfig, BoundsConfig
from fedmq.aggregator._metrics import registry_for, render_metrics
from fedmq.strategies import (
    FedAsyncConfig,
    FedBuffConfig,
    RobustConfig,
    StalenessConfig,
    StrategyConfig,
)
from fedmq.transport import TransportConfig, connect_aggregator, connect_participant
from tests import updates
from tests.prometheus import samples
from tests.updates import INITIAL, delta

CONSTANT = StalenessConfig(function="constant")


@asynccontextmanager
async def running(url: str, job: str, strategy: StrategyConfig) -> AsyncIterator[Aggregator]:
    config = AggregatorConfig(
        strategy=strategy,
        eval_every=0,
        publish_interval_s=0.0,
        bounds=BoundsConfig(norm_factor=0),
    )
    transport_config = TransportConfig(url=url, job=job, connect_timeout_s=30.0)
    async with connect_aggregator(transport_config) as transport, asyncio.TaskGroup() as tg:
        aggregator = Aggregator(config, transport, INITIAL)
        task = tg.create_task(aggregator.run(tg), name="aggregator")
        yield aggregator
        task.cancel()


async def until(what: str, condition: Callable[[], bool], within: float = 30.0) -> None:
    try:
        async with asyncio.timeout(within):
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def metrics(aggregator: Aggregator) -> dict[str, float]:
    body, _ = render_metrics(registry_for(aggregator, active_window_s=60.0))
    return samples(body.decode())


async def publish(url: str, job: str, *bodies: bytes) -> None:
    config = TransportConfig(url=url, job=job, connect_timeout_s=30.0)
    async with connect_participant(config, "dev-01") as device:
        for body in bodies:
            await device.publish_update(body)


async def test_fedasync_refuses_a_boosted_update_as_an_outlier(broker: str, job: str) -> None:
    strategy = StrategyConfig(
        name="fedasync",
        max_staleness=10,
        fedasync=FedAsyncConfig(alpha=0.5, staleness=CONSTANT),
        robust=RobustConfig(outlier_factor=3.0, outlier_min_samples=3),
    )
    async with running(broker, job, strategy) as aggregator:
        honest = [updates.update("dev-01", s, 0, delta(v)) for s, v in enumerate((1.0, 1.2, 0.8))]
        await publish(broker, job, *honest)
        await until("three honest updates", lambda: aggregator.version == 3)
        before = {k: v.copy() for k, v in aggregator.params.items()}
        # norms sqrt(6) x (1, 1.2, 0.8): median 1.0 x sqrt(6), MAD 0.2 x sqrt(6)
        await publish(broker, job, updates.update("dev-01", 3, 0, delta(50.0)))
        await until("the refusal", lambda: aggregator.stats.rejected["outlier"] == 1)
        assert aggregator.version == 3
        for name, value in before.items():
            np.testing.assert_array_equal(aggregator.params[name], value)
        await publish(broker, job, updates.update("dev-01", 4, 0, delta(1.1)))
        await until("the next honest update", lambda: aggregator.version == 4)
        assert dict(aggregator.stats.rejected) == {"outlier": 1}
        assert metrics(aggregator)['fedmq_updates_rejected_total{reason="outlier"}'] == 1


async def test_fedbuff_norm_bounds_a_boosted_update_and_counts_it(broker: str, job: str) -> None:
    strategy = StrategyConfig(
        name="fedbuff",
        fedbuff=FedBuffConfig(buffer_size=4, staleness=CONSTANT),
        robust=RobustConfig(rule="norm_bounded", norm_bound_factor=2.0),
    )
    async with running(broker, job, strategy) as aggregator:
        values = (1.0, 1.0, 1.0, 50.0)
        await publish(
            broker, job, *(updates.update("dev-01", s, 0, delta(v)) for s, v in enumerate(values))
        )
        await until("one server step", lambda: aggregator.version == 1)
        assert aggregator.stats.robust_clipped == 1 and not aggregator.stats.rejected
        # median norm sqrt(6): the 50 is cut to 2 x that, i.e. every entry 2;
        # g = (1 + 1 + 1 + 2) / 4 = 1.25 (the plain mean would have been 13.25)
        np.testing.assert_allclose(aggregator.params["w"], np.full((2, 2), 1.25), rtol=1e-6)
        np.testing.assert_allclose(aggregator.params["b"], np.full(2, 2.25), rtol=1e-6)
        values_seen = metrics(aggregator)
        assert values_seen["fedmq_robust_clipped_total"] == 1
        assert values_seen['fedmq_updates_rejected_total{reason="outlier"}'] == 0

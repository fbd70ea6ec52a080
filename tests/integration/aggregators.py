"""The aggregator service in this process, on the tiny test model, over any transport.

For the tests (and benchmarks) that play a hostile device against the real service over
a real broker: the service is exactly the one ``fedmq aggregator`` runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fedmq.aggregator import Aggregator, AggregatorConfig
from fedmq.strategies import FedAsyncConfig, StalenessConfig, StrategyConfig
from fedmq.transport import TransportConfig, connect_aggregator
from tests.updates import INITIAL

__all__ = ["FEDASYNC", "running"]

FEDASYNC = StrategyConfig(
    name="fedasync",
    max_staleness=5,
    fedasync=FedAsyncConfig(alpha=0.5, staleness=StalenessConfig(function="constant")),
)


@asynccontextmanager
async def running(config: TransportConfig) -> AsyncIterator[Aggregator]:
    """An aggregator of ``tests.updates.INITIAL`` (FedAsync, publishing every version)."""
    async with connect_aggregator(config) as transport, asyncio.TaskGroup() as tg:
        aggregator = Aggregator(
            AggregatorConfig(strategy=FEDASYNC, eval_every=0, publish_interval_s=0.0),
            transport,
            INITIAL,
        )
        task = tg.create_task(aggregator.run(tg), name="aggregator")
        yield aggregator
        task.cancel()

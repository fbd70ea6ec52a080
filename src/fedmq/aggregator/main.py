"""``fedmq aggregator``: the aggregator service as a process."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fedmq._log import log_event
from fedmq.aggregator._config import AggregatorConfig
from fedmq.aggregator._evaluator import Evaluator
from fedmq.aggregator._metrics import MetricsConfig, MetricsServer, registry_for
from fedmq.aggregator._service import Aggregator
from fedmq.aggregator._stats import AggregatorStats
from fedmq.data import load_fashion_mnist, resolve_data_dir, to_tensors
from fedmq.models import build_model, get_params
from fedmq.transport import TransportConfig, connect_aggregator

__all__ = ["run_aggregator"]

_log = logging.getLogger("fedmq.aggregator")


def make_evaluator(config: AggregatorConfig, data_dir: str | None) -> Evaluator | None:
    """The held-out evaluator (first ``eval_examples`` test images), or None if disabled."""
    if not config.eval_every:
        return None
    _, test = load_fashion_mnist(resolve_data_dir(data_dir))
    x, y = to_tensors(test)
    return Evaluator(config.model, x[: config.eval_examples], y[: config.eval_examples])


def _metrics_server(
    aggregator: Aggregator, metrics: MetricsConfig | None
) -> contextlib.AbstractAsyncContextManager[object]:
    if metrics is None or not metrics.port:
        return contextlib.nullcontext()
    registry = registry_for(aggregator, active_window_s=metrics.active_window_s)
    return MetricsServer(registry, host=metrics.host, port=metrics.port)


async def run_aggregator(
    config: AggregatorConfig,
    transport_config: TransportConfig,
    data_dir: str | None,
    *,
    metrics: MetricsConfig | None = None,
) -> int:
    """Serve until cancelled (SIGTERM / Ctrl-C); Prometheus metrics on ``metrics.port``."""
    evaluator = make_evaluator(config, data_dir)
    initial = get_params(build_model(config.model, seed=config.seed))  # type: ignore[arg-type]
    log_event(
        _log,
        "starting",
        broker=transport_config.redacted_url,
        job=transport_config.job,
        strategy=config.strategy.name,
    )
    async with connect_aggregator(transport_config) as transport:
        aggregator = Aggregator(config, transport, initial, evaluate=evaluator)
        async with _metrics_server(aggregator, metrics), asyncio.TaskGroup() as tg:
            if metrics is not None and metrics.port:
                log_event(_log, "metrics", url=f"http://{metrics.host}:{metrics.port}/metrics")
            tg.create_task(aggregator.run(tg), name="aggregator")
            tg.create_task(_status(aggregator.stats), name="status")
    return 0


async def _status(stats: AggregatorStats, every_s: float = 10.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        log_event(
            _log,
            "status",
            version=stats.version,
            applied=stats.applied,
            rejected=dict(stats.rejected),
            accuracy=stats.latest_accuracy,
            mean_staleness=round(stats.mean_staleness, 2),
        )

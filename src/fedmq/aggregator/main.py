"""``fedmq aggregator``: the aggregator service as a process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from torch.utils.data import Dataset

from fedmq._log import log_event
from fedmq.aggregator._checkpoint import load_checkpoint, load_privacy_ledger
from fedmq.aggregator._config import AggregatorConfig
from fedmq.aggregator._evaluator import Evaluator
from fedmq.aggregator._metrics import MetricsConfig, MetricsServer, registry_for
from fedmq.aggregator._service import Aggregator
from fedmq.aggregator._stats import AggregatorStats
from fedmq.models import get_params
from fedmq.privacy import ClientPrivacy, newest_state
from fedmq.tasks import Task
from fedmq.transport import TransportConfig, connect_aggregator

__all__ = ["run_aggregator"]

_log = logging.getLogger("fedmq.aggregator")


def make_evaluator(
    config: AggregatorConfig, task: Task, central: Dataset[Any] | None
) -> Evaluator | None:
    """The central evaluator on ``central`` (the aggregator's own held-out set), or None
    without one or when central evaluation is off (``eval_every`` 0)."""
    if central is None or not config.eval_every:
        return None
    return Evaluator(task, central)


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
    task: Task,
    central: Dataset[Any] | None = None,
    *,
    metrics: MetricsConfig | None = None,
) -> int:
    """Serve ``task`` until cancelled (SIGTERM / Ctrl-C), or until the client-level DP
    budget is spent (then 0: a clean stop); evaluate on ``central`` when given, else only
    by the devices' reports; Prometheus metrics on ``metrics.port``."""
    _check_budget(config)
    evaluator = make_evaluator(config, task, central)
    initial = get_params(task.build_model(config.seed))
    log_event(
        _log,
        "starting",
        broker=transport_config.redacted_url,
        job=transport_config.job,
        task=task.name,
        target=task.target.name,
        central_examples=len(central) if central is not None else 0,  # type: ignore[arg-type]
        strategy=config.strategy.name,
    )
    async with connect_aggregator(transport_config) as transport:
        aggregator = Aggregator(config, transport, initial, evaluate=evaluator, target=task.target)
        async with _metrics_server(aggregator, metrics), asyncio.TaskGroup() as tg:
            if metrics is not None and metrics.port:
                log_event(_log, "metrics", url=f"http://{metrics.host}:{metrics.port}/metrics")
            service = tg.create_task(aggregator.run(tg), name="aggregator")
            status = tg.create_task(_status(aggregator.stats), name="status")
            # run() returns by itself only when the privacy budget is spent: a clean stop.
            service.add_done_callback(lambda _: status.cancel())
    return 0


def _check_budget(config: AggregatorConfig) -> None:
    """A checkpoint whose privacy budget is spent is a one-line ConfigError, before the
    process connects or logs anything (the service would refuse it the same way)."""
    if config.privacy is None or config.checkpoint_dir is None:
        return
    checkpoint = load_checkpoint(config.checkpoint_dir)
    state = newest_state(
        checkpoint.counters.get("privacy") if checkpoint is not None else None,
        load_privacy_ledger(config.checkpoint_dir),
    )
    ClientPrivacy(config.privacy, config.strategy.fedbuff.buffer_size, state=state)


async def _status(stats: AggregatorStats, every_s: float = 10.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        log_event(
            _log,
            "status",
            version=stats.version,
            applied=stats.applied,
            rejected=dict(stats.rejected),
            target=stats.target.name,
            value=stats.latest_target,
            mean_staleness=round(stats.mean_staleness, 2),
            **(
                {
                    "dp_epsilon": round(stats.privacy["epsilon"], 4),
                    "dp_steps": stats.privacy["steps"],
                }
                if stats.privacy is not None
                else {}
            ),
            **_device_privacy(stats),
        )


def _device_privacy(stats: AggregatorStats) -> dict[str, Any]:
    """The devices' own privacy spend for the status line: the fleet's max and median
    epsilon, and (mechanism, epsilon, delta) of the devices with the largest epsilon (at
    most 10), when any device reports one."""
    summary = stats.device_epsilon()
    if not summary:
        return {}
    # Every device's for a small fleet (a few sites: DP-SGD's case); the 10 largest for
    # a large one, so the line stays a line.
    largest = sorted(stats.device_privacy.items(), key=lambda item: -item[1].epsilon)[
        :_PRIVACY_LISTED
    ]
    return {
        "device_epsilon_max": round(summary["max"], 4),
        "device_epsilon_median": round(summary["median"], 4),
        "device_privacy": {
            pid: [s.mechanism, round(s.epsilon, 4), s.delta] for pid, s in sorted(largest)
        },
    }


_PRIVACY_LISTED = 10

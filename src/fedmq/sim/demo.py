"""``fedmq demo``: an aggregator and a fleet of devices in one process.

The default broker is the embedded in-process one, so nothing needs to be
installed; ``--broker amqp://...`` or ``mqtt://...`` runs the same fleet
through a real broker. The fleet is the task's (``Task.fleet``: Fashion-MNIST shards
by default, the 12 air-quality stations with ``--task air-quality``). The run stops
when the task's target metric reaches ``target`` (or at the time limit), as the
aggregator measures it on its own held-out set, or, when the task gives the aggregator
none, as the devices' evaluation reports say; then it prints a summary and writes
``report.json`` and ``<metric>.png``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.live import Live

from fedmq.aggregator import Aggregator, AggregatorConfig, AggregatorStats, FederatedEval
from fedmq.aggregator.main import make_evaluator
from fedmq.errors import ConfigError
from fedmq.models import get_params
from fedmq.participant import Participant, ParticipantConfig
from fedmq.sim._display import progress_line, progress_table, summary_table
from fedmq.sim._plots import plot_metric
from fedmq.sim._report import dp_line, target_fields
from fedmq.tasks import Task
from fedmq.transport import TransportConfig, connect_aggregator, connect_participant

__all__ = ["DemoConfig", "run_demo"]

_log = logging.getLogger("fedmq.demo")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """A fleet of ``participants`` devices of ``task`` sharing ``train_slots`` CPU slots.

    ``data_dir``: where the task's fleet data lives (``Task.fleet``). ``target``: stop
    when the task's target metric reaches it (None: the metric's ``goal``).
    """

    task: Task
    data_dir: Path
    aggregator: AggregatorConfig
    transport: TransportConfig
    participant: ParticipantConfig  # template; id and state_dir are set per device
    participants: int = 0  # 0: the task's own fleet size
    target: float | None = None
    max_seconds: float = 600.0
    train_slots: int = 2
    out_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.participants < 0:
            raise ConfigError(f"participants: {self.participants} must be >= 0 (0: the task's)")
        if self.task.fleet is None:
            raise ConfigError(f"task: {self.task.name!r} has no fleet to simulate (Task.fleet)")
        if self.goal is None:
            raise ConfigError(
                f"target: task {self.task.name!r} sets no goal for {self.task.target.name!r};"
                " give --target"
            )
        if self.max_seconds <= 0:
            raise ConfigError(f"max_seconds: {self.max_seconds} must be > 0")
        if self.train_slots < 1:
            raise ConfigError(f"train_slots: {self.train_slots} must be >= 1")
        if self.aggregator.eval_every < 1:
            raise ConfigError("eval_every: the demo needs evaluations (>= 1)")

    @property
    def goal(self) -> float | None:
        """The value of the target metric the run stops at."""
        return self.target if self.target is not None else self.task.target.goal


class _Finished(Exception):
    """Raised inside the TaskGroup to end the run when a stop condition holds."""


async def run_demo(config: DemoConfig) -> int:
    """Run the fleet to the target; return 0 if reached, 1 if the time ran out."""
    console = Console()
    out = config.out_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    task = config.task
    assert task.fleet is not None and config.goal is not None
    torch.set_num_threads(1)  # train_slots devices train in parallel, one core each
    fleet = task.fleet(config.data_dir, config.participants, config.participant.seed)
    central = task.central_data(config.data_dir) if task.central_data else None
    evaluator = make_evaluator(config.aggregator, task, central)
    initial = get_params(task.build_model(config.aggregator.seed))
    scoring = sum(1 for d in fleet if len(d.held_out) > 0)  # type: ignore[arg-type,misc]
    aggregator_config = config.aggregator
    if evaluator is None:  # the fleet's word: wait until every device that can has spoken
        aggregator_config = dataclasses.replace(
            aggregator_config,
            fed_eval=dataclasses.replace(aggregator_config.fed_eval, min_devices=max(1, scoring)),
        )
    slots = asyncio.Semaphore(config.train_slots)
    stats = AggregatorStats()
    devices: list[Participant] = []
    fed_eval = FederatedEval(aggregator_config.fed_eval)  # the aggregator's, once it exists
    final_params = initial
    console.print(
        f"fedmq demo: task {task.name}, {len(fleet)} devices,"
        f" strategy {config.aggregator.strategy.name},"
        f" codec {config.participant.codec.name}, broker {config.transport.redacted_url},"
        f" target {task.target.name} {config.goal}"
        f" ({'central' if evaluator else 'fleet'} evaluation), output {out}"
    )
    reached = False
    with contextlib.ExitStack() as live_stack:
        live = None
        if console.is_terminal:
            live = live_stack.enter_context(Live(console=console, auto_refresh=False))
        try:
            async with contextlib.AsyncExitStack() as stack:
                agg_transport = await stack.enter_async_context(
                    connect_aggregator(config.transport)
                )
                for i, data in enumerate(fleet):
                    pid = f"dev-{i:02d}"
                    transport = await stack.enter_async_context(
                        connect_participant(config.transport, pid)
                    )
                    device_config = dataclasses.replace(
                        config.participant,
                        participant_id=pid,
                        state_dir=out / "devices" / pid,
                        # Synchronous rounds: each device trains once on each round's model.
                        once_per_version=config.participant.once_per_version
                        or config.aggregator.strategy.name == "fedavg",
                    )
                    devices.append(
                        Participant(device_config, transport, task, data, train_slots=slots)
                    )
                tg = await stack.enter_async_context(asyncio.TaskGroup())
                aggregator = Aggregator(
                    aggregator_config,
                    agg_transport,
                    initial,
                    evaluate=evaluator,
                    target=task.target,
                    stats=stats,
                )
                fed_eval = aggregator.fed_eval
                tg.create_task(aggregator.run(tg), name="aggregator")
                for device in devices:
                    device.start(tg)
                tg.create_task(_watch(config, stats, devices, console, live), name="watch")
        except* _Finished:
            reached = _reached(stats, config.goal)
        final_params = aggregator.params
    # The trained global model, for whoever wants to use or score it (numpy .npz, no pickle).
    np.savez(out / "model.npz", **final_params)  # type: ignore[arg-type]
    console.print(summary_table(_report(config, stats, fed_eval, devices, out)))
    console.print(
        f"report: {out / 'report.json'}  plot: {out / _plot_name(stats)}"
        f"  model: {out / 'model.npz'}"
    )
    return 0 if reached else 1


async def _watch(
    config: DemoConfig,
    stats: AggregatorStats,
    devices: list[Participant],
    console: Console,
    live: Live | None,
) -> None:
    """Refresh the display; end the run at the target or the time limit."""
    goal = config.goal
    assert goal is not None
    last_line = 0.0
    while True:
        await asyncio.sleep(0.5)
        if live is not None:
            live.update(
                progress_table(stats, [d.stats for d in devices], goal),
                refresh=True,
            )
        elif stats.elapsed_s - last_line >= 5.0:
            last_line = stats.elapsed_s
            console.print(progress_line(stats))
        if _reached(stats, goal) or stats.elapsed_s >= config.max_seconds:
            raise _Finished


def _reached(stats: AggregatorStats, goal: float) -> bool:
    value = stats.latest_target
    return value is not None and stats.target.reached(value, goal)


def _plot_name(stats: AggregatorStats) -> str:
    return f"{stats.target.name}.png"


def _report(
    config: DemoConfig,
    stats: AggregatorStats,
    fed_eval: FederatedEval,
    devices: list[Participant],
    out: Path,
) -> list[tuple[str, str]]:
    """Write report.json and the target's plot; return the summary rows."""
    goal = config.goal
    assert goal is not None
    metric = stats.target
    name = metric.name
    points = stats.scored
    source = points[-1].source if points else "central"
    where = "test" if source == "central" else "fleet"
    # The same outcome fields as bench and the virtual clock write (sim/_report.py).
    hit, at_target = target_fields([dataclasses.asdict(p) for p in points], metric, goal)
    final, best = at_target["final"], at_target["best"]
    summary = [
        ("task", config.task.name),
        ("devices", str(len(devices))),
        ("strategy", config.aggregator.strategy.name),
        ("codec", config.participant.codec.name),
        ("broker", config.transport.redacted_url),
        (f"final {where} {name}", f"{final:.4f}" if final is not None else "-"),
        (f"best {where} {name}", f"{best:.4f}" if best is not None else "-"),
        (f"time to {name} {goal}", f"{hit['elapsed_s']:.1f} s" if hit else "not reached"),
        (f"updates to {name} {goal}", str(hit["applied"]) if hit else "-"),
        ("wall time", f"{stats.elapsed_s:.1f} s"),
        ("model version", str(stats.version)),
        ("updates applied", str(stats.applied)),
        (
            "updates dropped",
            ", ".join(f"{k}={v}" for k, v in sorted(stats.rejected.items())) or "0",
        ),
        ("staleness mean / max", f"{stats.mean_staleness:.2f} / {stats.max_staleness}"),
        ("model collapses", str(stats.health.collapses)),
        (
            "updates skipped by devices",
            ", ".join(
                f"{k}={v}"
                for k, v in sorted(
                    sum((Counter(d.stats.skipped) for d in devices), Counter()).items()
                )
            )
            or "0",
        ),
        ("evaluation reports (devices)", str(stats.eval_reports)),
        ("updates clipped", str(stats.clipped)),
        ("privacy", dp_line(stats.privacy)),
        ("uplink bytes", f"{stats.bytes_in:,}"),
        ("downlink bytes (all devices)", f"{sum(d.stats.bytes_down for d in devices):,}"),
    ]
    spent = stats.device_epsilon()
    if spent:  # devices running DP-SGD or local DP report their own epsilon
        summary.append(
            (
                "device epsilon max / median",
                f"{spent['max']:.3f} / {spent['median']:.3f} ({int(spent['devices'])} devices)",
            )
        )
    federated = stats.latest("federated")
    if federated is not None and source == "central":
        fleet_value = federated.metrics.get(name)
        if fleet_value is not None:
            summary.insert(6, (f"fleet {name} (devices' reports)", f"{fleet_value:.4f}"))
    plot_metric(
        {config.aggregator.strategy.name: points}, out / _plot_name(stats), metric, target=goal
    )
    document = {
        "task": config.task.name,
        **at_target,
        "wall_time_s": stats.elapsed_s,
        "version": stats.version,
        "applied": stats.applied,
        "rejected": dict(stats.rejected),
        "staleness_histogram": {str(k): v for k, v in sorted(stats.staleness.items())},
        "bytes_in": stats.bytes_in,
        "bytes_out": stats.bytes_out,
        "evaluations": [dataclasses.asdict(p) for p in stats.evaluations],
        "per_device": {
            metric_name: {pid: dataclasses.asdict(reading) for pid, reading in readings.items()}
            for metric_name, readings in (
                (n, fed.per_device(n)) for fed in [fed_eval] for n in fed.names()
            )
        },
        "eval_rejected": dict(stats.eval_rejected),
        "clipped": stats.clipped,
        "dp": stats.privacy,
        "model_collapses": stats.health.collapses,
        "device_epsilon": stats.device_epsilon() or None,
        "device_privacy": {
            pid: dataclasses.asdict(s) for pid, s in sorted(stats.device_privacy.items())
        },
        "devices": {d.config.participant_id: dataclasses.asdict(d.stats) for d in devices},
        "config": {
            "task": config.task.name,
            "participants": len(devices),
            "strategy": dataclasses.asdict(config.aggregator.strategy),
            "codec": dataclasses.asdict(config.participant.codec),
            "broker": config.transport.redacted_url,
            "train_slots": config.train_slots,
        },
    }
    (out / "report.json").write_text(json.dumps(document, indent=2))
    return summary

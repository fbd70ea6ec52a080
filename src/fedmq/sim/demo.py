"""``fedmq demo``: an aggregator and a fleet of devices in one process.

The default broker is the embedded in-process one, so nothing needs to be
installed; ``--broker amqp://...`` or ``mqtt://...`` runs the same fleet
through a real broker. The run stops at the target test accuracy (or the time
limit), then prints a summary and writes ``report.json`` and ``accuracy.png``.
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

import torch
from rich.console import Console
from rich.live import Live

from fedmq.aggregator import Aggregator, AggregatorConfig, AggregatorStats, Evaluator
from fedmq.data import load_fashion_mnist, resolve_data_dir, to_tensors
from fedmq.errors import ConfigError
from fedmq.models import build_model, get_params
from fedmq.participant import Participant, ParticipantConfig
from fedmq.participant.main import split
from fedmq.sim._display import progress_line, progress_table, summary_table
from fedmq.sim._plots import plot_accuracy
from fedmq.transport import TransportConfig, connect_aggregator, connect_participant

__all__ = ["DemoConfig", "run_demo"]

_log = logging.getLogger("fedmq.demo")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """A fleet of ``participants`` devices sharing ``train_slots`` CPU slots."""

    aggregator: AggregatorConfig
    transport: TransportConfig
    participant: ParticipantConfig  # template; id and state_dir are set per device
    participants: int = 20
    target_accuracy: float = 0.80
    max_seconds: float = 600.0
    train_slots: int = 2
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    out_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.participants < 1:
            raise ConfigError(f"participants: {self.participants} must be >= 1")
        if not 0.0 < self.target_accuracy <= 1.0:
            raise ConfigError(f"target_accuracy: {self.target_accuracy} must be in (0, 1]")
        if self.max_seconds <= 0:
            raise ConfigError(f"max_seconds: {self.max_seconds} must be > 0")
        if self.train_slots < 1:
            raise ConfigError(f"train_slots: {self.train_slots} must be >= 1")
        if self.aggregator.eval_every < 1:
            raise ConfigError("eval_every: the demo needs evaluations (>= 1)")


class _Finished(Exception):
    """Raised inside the TaskGroup to end the run when a stop condition holds."""


async def run_demo(config: DemoConfig, data_dir: str | None) -> int:
    """Run the fleet to the target; return 0 if reached, 1 if the time ran out."""
    console = Console()
    out = config.out_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_fashion_mnist(resolve_data_dir(data_dir))
    shards = split(
        train.labels,
        config.partition,
        config.participants,
        config.dirichlet_alpha,
        config.participant.seed,
    )
    x_test, y_test = to_tensors(test)
    n_eval = config.aggregator.eval_examples
    evaluator = Evaluator(config.aggregator.model, x_test[:n_eval], y_test[:n_eval])
    initial = get_params(build_model(config.aggregator.model, seed=config.aggregator.seed))  # type: ignore[arg-type]
    torch.set_num_threads(1)  # train_slots devices train in parallel, one core each
    slots = asyncio.Semaphore(config.train_slots)
    stats = AggregatorStats()
    devices: list[Participant] = []
    console.print(
        f"fedmq demo: {config.participants} devices, strategy {config.aggregator.strategy.name},"
        f" codec {config.participant.codec.name}, broker {config.transport.redacted_url},"
        f" target {config.target_accuracy}, output {out}"
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
                for i, indices in enumerate(shards):
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
                    x, y = to_tensors(train, indices)
                    devices.append(Participant(device_config, transport, x, y, train_slots=slots))
                tg = await stack.enter_async_context(asyncio.TaskGroup())
                aggregator = Aggregator(
                    config.aggregator, agg_transport, initial, evaluate=evaluator, stats=stats
                )
                tg.create_task(aggregator.run(tg), name="aggregator")
                for device in devices:
                    device.start(tg)
                tg.create_task(_watch(config, stats, devices, console, live), name="watch")
        except* _Finished:
            reached = (stats.latest_accuracy or 0.0) >= config.target_accuracy
    console.print(summary_table(_report(config, stats, devices, reached, out)))
    console.print(f"report: {out / 'report.json'}  plot: {out / 'accuracy.png'}")
    return 0 if reached else 1


async def _watch(
    config: DemoConfig,
    stats: AggregatorStats,
    devices: list[Participant],
    console: Console,
    live: Live | None,
) -> None:
    """Refresh the display; end the run at the target accuracy or the time limit."""
    last_line = 0.0
    while True:
        await asyncio.sleep(0.5)
        if live is not None:
            live.update(
                progress_table(stats, [d.stats for d in devices], config.target_accuracy),
                refresh=True,
            )
        elif stats.elapsed_s - last_line >= 5.0:
            last_line = stats.elapsed_s
            console.print(progress_line(stats))
        accuracy = stats.latest_accuracy or 0.0
        if accuracy >= config.target_accuracy or stats.elapsed_s >= config.max_seconds:
            raise _Finished


def _report(
    config: DemoConfig,
    stats: AggregatorStats,
    devices: list[Participant],
    reached: bool,
    out: Path,
) -> list[tuple[str, str]]:
    """Write report.json and accuracy.png; return the summary rows."""
    target = config.target_accuracy
    hit = next((p for p in stats.accuracy if p.accuracy >= target), None)
    final = stats.accuracy[-1] if stats.accuracy else None
    summary = [
        ("devices", str(config.participants)),
        ("strategy", config.aggregator.strategy.name),
        ("codec", config.participant.codec.name),
        ("broker", config.transport.redacted_url),
        ("final test accuracy", f"{final.accuracy:.4f}" if final else "-"),
        (
            "best test accuracy",
            f"{max(p.accuracy for p in stats.accuracy):.4f}" if stats.accuracy else "-",
        ),
        (f"time to {target}", f"{hit.elapsed_s:.1f} s" if hit else "not reached"),
        (f"updates to {target}", str(hit.applied) if hit else "-"),
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
        ("uplink bytes", f"{stats.bytes_in:,}"),
        ("downlink bytes (all devices)", f"{sum(d.stats.bytes_down for d in devices):,}"),
    ]
    plot_accuracy(
        {config.aggregator.strategy.name: stats.accuracy}, out / "accuracy.png", target=target
    )
    document = {
        "reached_target": reached,
        "target_accuracy": target,
        "time_to_target_s": hit.elapsed_s if hit else None,
        "updates_to_target": hit.applied if hit else None,
        "final_accuracy": final.accuracy if final else None,
        "wall_time_s": stats.elapsed_s,
        "version": stats.version,
        "applied": stats.applied,
        "rejected": dict(stats.rejected),
        "staleness_histogram": {str(k): v for k, v in sorted(stats.staleness.items())},
        "bytes_in": stats.bytes_in,
        "bytes_out": stats.bytes_out,
        "accuracy": [dataclasses.asdict(p) for p in stats.accuracy],
        "model_collapses": stats.health.collapses,
        "devices": {d.config.participant_id: dataclasses.asdict(d.stats) for d in devices},
        "config": {
            "participants": config.participants,
            "strategy": dataclasses.asdict(config.aggregator.strategy),
            "codec": dataclasses.asdict(config.participant.codec),
            "broker": config.transport.redacted_url,
            "train_slots": config.train_slots,
        },
    }
    (out / "report.json").write_text(json.dumps(document, indent=2))
    return summary

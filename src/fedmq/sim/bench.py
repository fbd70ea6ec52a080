"""``fedmq bench``: fleet time-to-target through a real broker (BENCHMARK.md).

One run drives the real participant runtime (``fedmq.participant``) for every
device of the task's fleet (``Task.fleet``: Fashion-MNIST shards by default), in this
process, through the broker of ``--broker``
(RabbitMQ by default); the aggregator runs in a process of its own so that its
CPU time and peak memory are measured alone (with the embedded ``memory://``
broker it shares this process). The fleet follows ``FleetProtocol``: per-device
publish delays, online/offline periods during which the device's connection is
really closed (its outbox keeps what it finishes), at most ``concurrency``
devices training at once. Synchronous FedAvg is driven from here: each round
picks its participants (``RoundPicker``), tells the aggregator the round's size
(``Aggregator.set_round``, which closes a short round with ``Strategy.flush``)
and asks those devices to train once on the round's model.

The run stops when the task's target metric reaches the goal, as the aggregator
measures it on the task's central held-out set, or, for a task without one, as the
devices' evaluation reports say (the aggregator's federated evaluations).
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import dataclasses
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.live import Live

from fedmq.aggregator import AggregatorConfig, AggregatorStats, EvalPoint
from fedmq.codecs import CodecConfig, encode_params
from fedmq.errors import ConfigError, FedmqError
from fedmq.models import get_params
from fedmq.participant import Participant, ParticipantConfig
from fedmq.sim._attacks import Attack, AttackConfig, check_attack
from fedmq.sim._display import progress_line, progress_table
from fedmq.sim._fleet import FleetProtocol, RoundPicker, online_periods, speed_factors
from fedmq.sim._host import AggregatorHost, HostSpec
from fedmq.sim._report import dp_line, target_fields
from fedmq.tasks import DeviceData, Metric, Task
from fedmq.transport import ParticipantTransport, TransportConfig, connect_participant
from fedmq.wire import ModelEnvelope, encode_model

__all__ = ["BenchConfig", "TaskFactory", "fleet_of", "run_bench", "settings_of"]

TaskFactory = Callable[[], Task]
"""Builds the benchmark's task. Picklable (a module-level function, or a
``functools.partial`` of one): the aggregator's own process builds its task with it."""


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """One benchmark configuration: the task, the fleet, the aggregator, the devices,
    the broker. ``partition``: the fmnist split's kind, for the report (the task has it).
    ``attack``: which devices are malicious and what they do (none by default)."""

    label: str
    task: TaskFactory
    protocol: FleetProtocol
    aggregator: AggregatorConfig
    transport: TransportConfig
    participant: ParticipantConfig  # template; id, state_dir and publish delay set per device
    partition: str = "dirichlet"
    attack: AttackConfig = field(default_factory=AttackConfig)


def fleet_of(
    task: Task, data_dir: Path, protocol: FleetProtocol
) -> tuple[list[DeviceData], FleetProtocol]:
    """The devices' data of ``task`` for ``protocol``'s fleet (one device per entry), and
    the protocol with its fleet size (``participants`` 0: the task's own)."""
    if task.fleet is None:
        raise ConfigError(f"task: {task.name!r} has no fleet to simulate (Task.fleet)")
    fleet = list(task.fleet(data_dir, protocol.participants, protocol.seed))
    if not fleet or (protocol.participants and len(fleet) != protocol.participants):
        raise ConfigError(
            f"devices: task {task.name!r} gave a fleet of {len(fleet)} devices,"
            f" not {protocol.participants or 'one or more'}"
        )
    return fleet, dataclasses.replace(protocol, participants=len(fleet))


def _fleet_eval(config: AggregatorConfig, task: Task, fleet: list[DeviceData]) -> AggregatorConfig:
    """``config`` as the benchmark runs it: without a central held-out set, a fleet value
    is recorded only once every device that can score has reported (as ``fedmq demo``)."""
    if task.central_data is not None and config.eval_every:
        return config
    scoring = sum(1 for d in fleet if len(d.held_out) > 0)  # type: ignore[arg-type,misc]
    fed_eval = dataclasses.replace(config.fed_eval, min_devices=max(1, scoring))
    return dataclasses.replace(config, fed_eval=fed_eval)


@dataclass
class _Device:
    index: int
    participant: Participant
    periods: list[tuple[float, float]]
    transport: ParticipantTransport | None = None
    online: bool = False


@dataclass
class _Tick:
    elapsed_s: float
    bytes_up: int
    bytes_down: int
    messages_down: int
    load_1m: float = 0.0  # the host's 1-minute load average: other work on the machine


async def run_bench(
    config: BenchConfig, data_dir: Path, out: Path, console: Console | None = None
) -> dict[str, Any]:
    """Run one configuration to the target (or the time limit); return its report dict."""
    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    task = config.task()
    check_attack(config.attack, task)
    fleet, proto = fleet_of(task, data_dir, config.protocol)
    malicious = set(config.attack.malicious(proto.participants))
    config = dataclasses.replace(
        config, protocol=proto, aggregator=_fleet_eval(config.aggregator, task, fleet)
    )
    loop = asyncio.get_running_loop()
    # Every device trains and decodes in worker threads: more than the default 6 workers,
    # or decoding a model would queue behind up to `concurrency` trainings.
    loop.set_default_executor(
        concurrent.futures.ThreadPoolExecutor(max_workers=proto.concurrency + 32)
    )
    torch.set_num_threads(1)
    goal = proto.goal(task.target)
    speeds = speed_factors(proto.participants, proto.speed_sigma)
    sync = config.aggregator.strategy.name == "fedavg"
    separate = config.transport.scheme != "memory"
    spec = HostSpec(
        aggregator=config.aggregator,
        transport=config.transport,
        task=config.task,
        data_dir=data_dir,
    )
    full_model_bytes = _full_model_bytes(task)
    slots = asyncio.Semaphore(proto.concurrency)
    devices: list[_Device] = []
    ticks: list[_Tick] = []
    rounds: list[dict[str, Any]] = []
    console.print(
        f"fedmq bench {config.label}: {proto.participants} devices,"
        f" strategy {config.aggregator.strategy.name},"
        f" codec {_codec_label(config.participant.codec)},"
        f" broker {config.transport.redacted_url}, job {config.transport.job},"
        f" task {task.name}, target {task.target.name} {goal} or {proto.max_seconds:.0f} s"
    )
    async with AggregatorHost(spec, separate=separate) as host:
        async with contextlib.AsyncExitStack() as stack:
            width = max(2, len(str(proto.participants - 1)))
            for i, data in enumerate(fleet):
                pid = f"dev-{i:0{width}d}"
                device_config = dataclasses.replace(
                    config.participant,
                    participant_id=pid,
                    state_dir=out / "devices" / pid,
                    publish_delay_s=proto.publish_delay_s(speeds, i),
                )
                transport = connect_participant(config.transport, pid)
                await transport.__aenter__()
                participant = Participant(
                    device_config,
                    transport,
                    task,
                    data,
                    train_slots=slots,
                    rounds=sync,
                    attack=Attack(config.attack, i) if i in malicious else None,
                )
                device = _Device(
                    index=i,
                    participant=participant,
                    periods=online_periods(
                        i, proto.max_seconds + 1.0, proto.mean_online_s, proto.mean_offline_s
                    ),
                    transport=transport,
                    online=True,
                )
                devices.append(device)
            stack.push_async_callback(_close_all, devices)
            tg = await stack.enter_async_context(asyncio.TaskGroup())
            t0 = time.monotonic()
            host.start_clock(t0)
            drivers: list[asyncio.Task[None]] = []
            for device in devices:
                device.participant.start(tg)
                drivers.append(
                    tg.create_task(
                        _availability(device, config.transport, t0),
                        name=f"bench:avail:{device.index}",
                    )
                )
            if sync:
                drivers.append(
                    tg.create_task(
                        _drive_rounds(devices, host, proto.concurrency, t0, rounds),
                        name="bench:rounds",
                    )
                )
            await _watch(proto, task.target, goal, host, devices, ticks, t0, console)
            # A shutdown that takes too long says what it waits for (a diagnostic only).
            watchdog = loop.call_later(_SHUTDOWN_WARN_S, _dump_tasks, console)
            for driver in drivers:
                driver.cancel()
            for device in devices:
                device.participant.stop()
        final = await host.stop()
        watchdog.cancel()
    report = _report(config, task, goal, final, devices, ticks, rounds, full_model_bytes, separate)
    if report["dp"] is not None or report["clipped"]:
        console.print(dp_line(report["dp"]) + f"; updates clipped: {report['clipped']}")
    if report["stopped_by"] == "privacy_budget_spent":
        console.print("stopped: the next server step would exceed the privacy budget")
    return report


_SHUTDOWN_WARN_S = 30.0


def _dump_tasks(console: Console) -> None:
    """Print every pending task and where it waits."""
    tasks = [t for t in asyncio.all_tasks() if not t.done()]
    console.print(f"shutdown still waiting after {_SHUTDOWN_WARN_S:.0f} s: {len(tasks)} tasks")
    for task in tasks:
        console.print(f"  {task.get_name()}: {_awaiting(task.get_coro())}", highlight=False)


def _awaiting(coro: object) -> str:
    """The chain of coroutines (and async generators) ``coro`` waits in, outermost first."""
    where: list[str] = []
    while coro is not None and len(where) < 12:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            where.append(
                f"{frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"
            )
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return " -> ".join(where) or repr(coro)


async def _close(transport: ParticipantTransport) -> None:
    """Close a device's connection; a close that hangs (seen once with aio-pika while the
    broker was busy) is abandoned after ``_CLOSE_S`` rather than stalling the run."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(_CLOSE_S):
            await transport.__aexit__(None, None, None)


_CLOSE_S = 10.0


async def _close_all(devices: list[_Device]) -> None:
    async def close(device: _Device) -> None:
        device.participant.stop()
        if device.transport is not None:
            transport, device.transport = device.transport, None
            await _close(transport)

    await asyncio.gather(*(close(d) for d in devices))


async def _sleep_until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


async def _availability(device: _Device, transport_config: TransportConfig, t0: float) -> None:
    """Take the device offline and online as its periods say, closing its connection."""
    pid = device.participant.config.participant_id
    for start, end in device.periods:
        if start > 0:
            await _sleep_until(t0 + start)
            transport = await _connect(transport_config, pid, until=t0 + end)
            if transport is None:
                continue  # the broker stayed out of reach for the whole online period
            device.transport = transport
            device.participant.attach(transport)
            device.online = True
        await _sleep_until(t0 + end)
        device.online = False
        await device.participant.detach()
        transport_to_close, device.transport = device.transport, None
        if transport_to_close is not None:
            await _close(transport_to_close)


async def _connect(
    config: TransportConfig, pid: str, *, until: float
) -> ParticipantTransport | None:
    """A connected transport, retrying (a broker restarted by someone else) until ``until``."""
    while time.monotonic() < until:
        transport = connect_participant(config, pid)
        try:
            await transport.__aenter__()
        except FedmqError:
            await asyncio.sleep(1.0)
            continue
        return transport
    return None


async def _drive_rounds(
    devices: list[_Device],
    host: AggregatorHost,
    size: int,
    t0: float,
    log: list[dict[str, Any]],
) -> None:
    """Synchronous FedAvg: one round per model version, participants picked here."""
    picker = RoundPicker(size)
    version = 0
    while True:
        online = [d.index for d in devices if d.online]
        if not online:
            await asyncio.sleep(0.1)
            continue
        picked = picker.pick(online)
        host.set_round(version, len(picked))
        for i in picked:
            devices[i].participant.train_round(version)
        log.append({"version": version, "started_s": time.monotonic() - t0, "participants": picked})
        version = await host.wait_version_above(version)
        log[-1]["ended_s"] = time.monotonic() - t0


def _fleet_tick(devices: list[_Device], elapsed: float) -> _Tick:
    return _Tick(
        elapsed_s=elapsed,
        bytes_up=sum(d.participant.stats.bytes_up for d in devices),
        bytes_down=sum(d.participant.stats.bytes_down for d in devices),
        messages_down=sum(d.participant.model_view.received for d in devices),
        load_1m=os.getloadavg()[0],
    )


async def _watch(
    proto: FleetProtocol,
    target: Metric,
    goal: float,
    host: AggregatorHost,
    devices: list[_Device],
    ticks: list[_Tick],
    t0: float,
    console: Console,
) -> None:
    """Record the fleet's counters, refresh the display, return at a stop condition."""
    live = Live(console=console, auto_refresh=False) if console.is_terminal else None
    last_line = -10.0
    with live or contextlib.nullcontext():
        while True:
            await asyncio.sleep(0.25)
            elapsed = time.monotonic() - t0
            ticks.append(_fleet_tick(devices, elapsed))
            stats = stats_from_snapshot(host.latest, t0, target)
            if live is not None:
                table = progress_table(stats, [d.participant.stats for d in devices], goal)
                table.caption = f"online {sum(d.online for d in devices)}/{len(devices)}"
                live.update(table, refresh=True)
            elif elapsed - last_line >= 10.0:
                last_line = elapsed
                console.print(
                    progress_line(stats) + f" online={sum(d.online for d in devices)}",
                    highlight=False,
                )
            value = stats.latest_target
            reached = value is not None and target.reached(value, goal)
            if (
                reached
                or elapsed >= proto.max_seconds
                or host.latest.get("budget_spent")
                or proto.versions_done(stats.version)
            ):
                return


def stats_from_snapshot(doc: dict[str, Any], t0: float, target: Metric) -> AggregatorStats:
    """An ``AggregatorStats`` rebuilt from a host snapshot (for the shared display code)."""
    stats = AggregatorStats(started=t0, target=target)
    if not doc:
        return stats
    stats.version = doc["version"]
    stats.received = doc["received"]
    stats.applied = doc["applied"]
    stats.rejected.update(doc["rejected"])
    stats.staleness.update({int(k): v for k, v in doc["staleness"].items()})
    stats.bytes_in = doc["bytes_in"]
    stats.bytes_out = doc["bytes_out"]
    stats.models_published = doc["models_published"]
    stats.buffered = doc["buffered"]
    stats.clipped = doc.get("clipped", 0)
    stats.robust_clipped = doc.get("robust_clipped", 0)
    stats.privacy = doc.get("privacy")
    stats.evaluations = [EvalPoint(**p) for p in doc["eval_points"]]
    return stats


def _full_model_bytes(task: Task) -> int:
    """The size of one full float32 model message (what "float32 every time" sends)."""
    params = get_params(task.build_model())
    tensors = tuple(encode_params(params, CodecConfig(name="float32")))
    return len(encode_model(ModelEnvelope(version=1_000_000, created=time.time(), tensors=tensors)))


def _codec_label(codec: CodecConfig) -> str:
    if codec.name == "topk":
        return f"topk{codec.topk_fraction:g}-{codec.topk_values}"
    return codec.name


def _at(ticks: list[_Tick], elapsed: float, field: str) -> float:
    """A fleet counter at ``elapsed`` (linear between the 0.25 s samples)."""
    if not ticks:
        return 0.0
    times = [t.elapsed_s for t in ticks]
    j = bisect.bisect_left(times, elapsed)
    if j <= 0:
        return float(getattr(ticks[0], field))
    if j >= len(ticks):
        return float(getattr(ticks[-1], field))
    a, b = ticks[j - 1], ticks[j]
    w = (elapsed - a.elapsed_s) / max(b.elapsed_s - a.elapsed_s, 1e-9)
    return float(getattr(a, field)) * (1 - w) + float(getattr(b, field)) * w


def _report(
    config: BenchConfig,
    task: Task,
    goal: float,
    final: dict[str, Any],
    devices: list[_Device],
    ticks: list[_Tick],
    rounds: list[dict[str, Any]],
    full_model_bytes: int,
    separate: bool,
) -> dict[str, Any]:
    proto = config.protocol
    stats = stats_from_snapshot(final, 0.0, task.target) if final else None
    points = [dataclasses.asdict(p) for p in stats.scored] if stats else []
    hit, at_target = target_fields(points, task.target, goal)
    end = ticks[-1] if ticks else _Tick(0.0, 0, 0, 0)
    rejected: dict[str, int] = dict(final.get("rejected", {}))
    invalid = sum(n for k, n in rejected.items() if k not in ("too_stale", "duplicate"))
    views = [d.participant.model_view for d in devices]
    doc: dict[str, Any] = {
        "label": config.label,
        "strategy": config.aggregator.strategy.name,
        "codec": _codec_label(config.participant.codec),
        "broker": config.transport.redacted_url,
        "job": config.transport.job,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **at_target,
        "downlink_bytes_to_target": round(_at(ticks, hit["elapsed_s"], "bytes_down"))
        if hit
        else None,
        "downlink_float32_bytes_to_target": round(
            _at(ticks, hit["elapsed_s"], "messages_down") * full_model_bytes
        )
        if hit
        else None,
        "wall_time_s": end.elapsed_s,
        "version": final.get("version"),
        "received": final.get("received"),
        "applied": final.get("applied"),
        "dropped": {
            "too_stale": rejected.get("too_stale", 0),
            "duplicate": rejected.get("duplicate", 0),
            "invalid": invalid,
            "by_reason": rejected,
        },
        "staleness_histogram": {str(k): v for k, v in sorted(final.get("staleness", {}).items())},
        "uplink_bytes": final.get("bytes_in"),
        "fleet_bytes_published": end.bytes_up,
        "downlink_bytes": end.bytes_down,
        "downlink_messages": end.messages_down,
        "downlink_float32_bytes": end.messages_down * full_model_bytes,
        "full_model_bytes": full_model_bytes,
        "models_published": final.get("models_published"),
        "aggregator_bytes_published": final.get("bytes_out"),
        "keyframes": final.get("keyframes"),
        "deltas": final.get("deltas"),
        "device_epsilon": final.get("device_epsilon") or None,
        "device_view": {
            "keyframes_applied": sum(v.keyframes for v in views),
            "deltas_applied": sum(v.deltas for v in views),
            "deltas_skipped": sum(v.skipped for v in views),
        },
        "eval_reports": final.get("eval_reports", 0),
        "eval_rejected": final.get("eval_rejected", {}),
        "model_collapses": final.get("model_collapses", 0),
        "robust": {
            "clipped": final.get("robust_clipped", 0),
            "outlier": rejected.get("outlier", 0),
            "norm_bound": rejected.get("norm_bound", 0),
        },
        "model_collapsing_at_end": final.get("model_collapsing", False),
        "fleet": {
            "trained": sum(d.participant.stats.trained for d in devices),
            "skipped": dict(
                sum((Counter(d.participant.stats.skipped) for d in devices), Counter())
            ),
            "published": sum(d.participant.stats.published for d in devices),
            "pending_in_outboxes": sum(d.participant.pending for d in devices),
        },
        "host": {
            "cpus": os.cpu_count(),
            "load_1m_mean": sum(t.load_1m for t in ticks) / len(ticks) if ticks else None,
            "load_1m_max": max((t.load_1m for t in ticks), default=None),
        },
        "aggregator_cost": {
            "measured": "separate process (time.process_time, ru_maxrss)"
            if separate
            else "not separable: the embedded broker runs the aggregator in the fleet's process",
            "cpu_s": final.get("cpu_s"),
            "eval_cpu_s": final.get("eval_cpu_s"),
            "evaluations": final.get("evaluations"),
            "rss_start_bytes": final.get("rss_start_bytes"),
            "peak_rss_bytes": final.get("peak_rss_bytes"),
            "max_rss_with_setup_bytes": final.get("max_rss_with_setup_bytes"),
        },
        "evaluations": points,
        "rounds": rounds,
        "clipped": final.get("clipped", 0),
        "dp": final.get("privacy"),
        "stopped_by": "privacy_budget_spent" if final.get("budget_spent") else None,
        "protocol": dataclasses.asdict(proto),
        "settings": {
            **settings_of(config, task),
            "evaluation": _evaluation_text(
                config.aggregator,
                task,
                at_target,
                final.get("central_examples"),
            ),
            "publish_every": config.aggregator.publish_every,
            "downlink": dataclasses.asdict(config.aggregator.downlink),
            "prefetch": config.transport.prefetch,
            "speeds": [
                round(float(s), 4) for s in speed_factors(proto.participants, proto.speed_sigma)
            ],
        },
    }
    return doc


def settings_of(config: BenchConfig, task: Task) -> dict[str, Any]:
    """The task's and the devices' settings, as the report records them."""
    training = task.training
    attack = config.attack
    return {
        "attack": {
            **dataclasses.asdict(attack),
            "malicious": attack.malicious(config.protocol.participants),
        },
        "bounds": dataclasses.asdict(config.aggregator.bounds),
        "task": task.name,
        "model": type(task.build_model()).__name__,
        "strategy": dataclasses.asdict(config.aggregator.strategy),
        "codec": dataclasses.asdict(config.participant.codec),
        "error_feedback": config.participant.error_feedback,
        "epochs": training.epochs,
        "batch_size": training.batch_size,
        "lr": training.lr,
        "optimizer": training.optimizer,
        "partition": config.partition,
        "device_eval_every": config.participant.eval_every,
        "dp_sgd": _asdict(config.participant.dp_sgd),
        "local_dp": _asdict(config.participant.local_dp),
    }


def _asdict(config: Any) -> dict[str, Any] | None:
    return None if config is None else dataclasses.asdict(config)


def _evaluation_text(
    config: AggregatorConfig, task: Task, at_target: dict[str, Any], central_examples: int | None
) -> str:
    if at_target["evaluation_source"] == "federated" or task.central_data is None:
        return (
            "the devices' reports on their own held-out data (federated, example-weighted,"
            f" versions within {config.fed_eval.window} of the newest, at least"
            f" {config.fed_eval.min_devices} device(s))"
        )
    return (
        f"every {config.eval_every} version(s) (latest wins, one at a time) on the task's"
        f" central held-out set ({central_examples} examples)"
    )

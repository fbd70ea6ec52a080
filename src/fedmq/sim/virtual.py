"""``fedmq bench --virtual``: the same fleet, strategies and codecs against simulated time.

A discrete-event simulation: no broker, no sleeps, no threads. Time is a number
that jumps from one event to the next (a device comes online or goes offline,
finishes training, publishes). The work that decides the model is the real code:
each device's ``Trainer.step`` (the participant's train-and-encode core: the task's
training on the device's own data, the codec with error feedback, the msgpack
envelope), the aggregator's admit-and-apply core (``decode``, ``admit``,
``checked_step``: the service's own checks and bounds), the strategy, the downlink
deltas.

Modelled, not measured (stated in the report):

- training takes ``train_s_per_example`` x examples of simulated time for any task
  (default: what one core of this machine takes for fmnist's cnn-s, 0.13 ms per
  example: 0.156 s for 1,200 examples, batch 32, measured with ``train_local`` on one
  thread), at
  most ``concurrency`` devices at once, then the device waits speed_i x
  delay_unit before it publishes, as in the real fleet;
- delivery is instant: an online device holds the newest model; a device coming
  back online downloads one full model (the last keyframe, in the real system);
- an update that arrives too stale, or that client-level DP's participation rules
  refuse, is dropped without being computed (it would not change the model; the
  device's error-feedback residual is not advanced);
- the model is evaluated every ``eval_every_s`` simulated seconds: on the task's
  central held-out set when it has one; else every device that has held-out data
  scores it (``Task.score``) and the scores are combined as the aggregator combines
  the devices' reports (``FederatedEval``: example-weighted), all on that one
  version (the real devices report now and then, on the version they hold).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from rich.console import Console
from rich.live import Live

from fedmq.aggregator import AggregatorStats, Downlink, EvalPoint, FederatedEval
from fedmq.aggregator._admit import admit, checked_step, decode
from fedmq.aggregator._bounds import UpdateBounds
from fedmq.aggregator.main import make_evaluator
from fedmq.codecs import CodecConfig, encode_params
from fedmq.errors import ConfigError, Rejection
from fedmq.models import get_params, set_params
from fedmq.participant._trainer import Trainer
from fedmq.privacy import ClientPrivacy
from fedmq.sim._attacks import Attack, check_attack
from fedmq.sim._display import progress_line, progress_table
from fedmq.sim._fleet import RoundPicker, online_periods, speed_factors
from fedmq.sim._report import dp_line, target_fields, write_results
from fedmq.sim.bench import BenchConfig, fleet_of, settings_of
from fedmq.strategies import make_strategy
from fedmq.tasks import DeviceData, Task
from fedmq.wire import (
    EvalEnvelope,
    ModelEnvelope,
    UpdateEnvelope,
    encode_model,
    encode_update,
    tensor_spec_of,
)

__all__ = ["VirtualConfig", "run_virtual", "run_virtual_command"]

Params = dict[str, np.ndarray]

_ONLINE, _OFFLINE, _TRAINED, _STORED, _EVAL = range(5)


@dataclass(frozen=True, kw_only=True)
class VirtualConfig:
    """A virtual-clock run: ``bench``'s fleet and settings plus the time model."""

    bench: BenchConfig
    train_s_per_example: float = 0.00013
    eval_every_s: float = 20.0


@dataclass
class _Device:
    index: int
    pid: str
    data: DeviceData
    num_examples: int  # of data.train
    delay_s: float
    online: bool = True
    busy: bool = False  # training or waiting out its publish delay
    waiting: bool = False  # queued for a training slot
    held: int = 0  # the model version it holds
    seq: int = 0
    outbox: list[tuple[int, int]] = field(default_factory=list)  # (seq, base_version)
    trainer: Trainer | None = None  # made at its first training; keeps its residual
    unaccounted: int = 0  # trainings scheduled whose privacy cost is not yet recorded
    budget_spent: bool = False


class _Sim:
    """The event loop of one virtual run."""

    def __init__(self, config: VirtualConfig, task: Task, data_dir: Path) -> None:
        self.config = config
        bench = config.bench
        self.task = task
        check_attack(bench.attack, task)
        fleet, proto = fleet_of(task, data_dir, bench.protocol)
        self.malicious = set(bench.attack.malicious(proto.participants))
        self.proto = proto
        self.goal = proto.goal(task.target)
        speeds = speed_factors(proto.participants, proto.speed_sigma)
        width = len(str(proto.participants - 1))
        self.devices = [
            _Device(
                index=i,
                pid=f"dev-{i:0{width}d}",
                data=data,
                num_examples=len(data.train),  # type: ignore[arg-type]
                delay_s=proto.publish_delay_s(speeds, i),
            )
            for i, data in enumerate(fleet)
        ]
        central = task.central_data(data_dir) if task.central_data else None
        self.central_examples = len(central) if central is not None else 0  # type: ignore[arg-type]
        self.evaluator = make_evaluator(bench.aggregator, task, central)
        self.scorer = task.build_model() if self.evaluator is None else None
        initial = task.build_model(bench.aggregator.seed)
        self.params: Params = get_params(initial)
        self.spec = tensor_spec_of(self.params)
        # Client-level DP: the service's own mechanism and participation rules. The noise
        # is seeded here (a simulation is reproducible); the service seeds from secrets.
        dp = bench.aggregator.privacy
        if dp is not None:
            _check_fleet_fits(dp.min_gap, bench.aggregator.strategy.fedbuff.buffer_size, fleet)
        self.privacy = (
            ClientPrivacy(
                dp,
                bench.aggregator.strategy.fedbuff.buffer_size,
                rng=np.random.default_rng([bench.aggregator.seed, 0xD9]),
            )
            if dp is not None
            else None
        )
        self.budget_spent = False  # the next server step would exceed the target epsilon
        self.strategy = make_strategy(
            bench.aggregator.strategy,
            combine=self.privacy.combine if self.privacy is not None else None,
        )
        self.state = self.strategy.init_state()
        self.downlink = Downlink(bench.aggregator.downlink, _encode_full)
        self.full_bytes = len(_encode_full(0, self.params))
        self.history: OrderedDict[int, Params] = OrderedDict()
        self.last_seq: dict[str, int] = {}
        self.bounds = UpdateBounds(bench.aggregator.bounds)
        self.version = 0
        self.stats = AggregatorStats(target=task.target)
        self.stats.privacy = self.privacy.report() if self.privacy is not None else None
        self.now = 0.0
        self.events: list[tuple[float, int, int, int, int]] = []
        self._counter = 0
        self.slots_free = proto.concurrency
        self.queue: list[int] = []  # devices waiting for a slot, FIFO
        self.sync = bench.aggregator.strategy.name == "fedavg"
        self.picker = RoundPicker(proto.concurrency)
        self.round_size = 0
        self.round_open = False
        self.online_count = proto.participants
        self.bytes_down = 0
        self.messages_down = 0
        self.published = 0
        self.trained = 0
        self.skipped_non_finite = 0  # trainings whose loss or delta was NaN/Inf: not sent
        self.rounds = 0
        self.down_at_eval: list[int] = []  # fleet downlink bytes at each evaluation
        self._update_size_cache: dict[tuple[int, int, int, int], int] = {}
        participant = bench.participant
        self.private = participant.dp_sgd is not None or participant.local_dp is not None
        self.norms: list[float] = []  # L2 norm of every decoded update, as received

    # -- scheduling -------------------------------------------------------------------
    def at(self, t: float, kind: int, device: int = -1, arg: int = 0) -> None:
        self._counter += 1
        heapq.heappush(self.events, (t, self._counter, kind, device, arg))

    def start(self) -> None:
        proto = self.proto
        for d in self.devices:
            for k, (start, end) in enumerate(
                online_periods(
                    d.index, proto.max_seconds + 1.0, proto.mean_online_s, proto.mean_offline_s
                )
            ):
                if k > 0:
                    self.at(start, _ONLINE, d.index)
                self.at(end, _OFFLINE, d.index)
        self._publish()
        self.at(0.0, _EVAL)
        if self.sync:
            self._open_round()
        else:
            for d in self.devices:
                self._want_slot(d)

    # -- devices ----------------------------------------------------------------------
    def _want_slot(self, d: _Device) -> None:
        if d.busy or d.waiting or d.num_examples == 0:  # a device with no data never trains
            return
        # A device with DP trains only while the next update fits its budget; trainings
        # here are computed at delivery, so the ones scheduled and not yet computed count.
        if self.private and (d.budget_spent or not self._trainer(d).can_train(d.unaccounted)):
            d.budget_spent = True
            return
        d.waiting = True
        self.queue.append(d.index)
        self._fill_slots()

    def _fill_slots(self) -> None:
        while self.slots_free > 0 and self.queue:
            d = self.devices[self.queue.pop(0)]
            d.waiting = False
            d.busy = True
            self.slots_free -= 1
            base = self.version if d.online else d.held
            d.held = base
            d.unaccounted += 1
            duration = d.num_examples * self.config.train_s_per_example
            self.at(self.now + duration, _TRAINED, d.index, base)

    def _trained(self, d: _Device, base: int) -> None:
        self.slots_free += 1
        self.trained += 1
        seq = d.seq
        d.seq += 1
        self.at(self.now + d.delay_s, _STORED, d.index, seq * 1_000_000_000 + base)
        self._fill_slots()

    def _stored(self, d: _Device, seq: int, base: int) -> None:
        d.busy = False
        d.outbox.append((seq, base))
        if d.online:
            self._flush_outbox(d)
        if not self.sync:
            self._want_slot(d)

    def _flush_outbox(self, d: _Device) -> None:
        pending, d.outbox = d.outbox, []
        for seq, base in pending:
            self._deliver(d, seq, base)

    def _online(self, d: _Device) -> None:
        d.online = True
        self.online_count += 1
        if d.held != self.version:
            self.bytes_down += self.full_bytes  # the last keyframe, then deltas from there
            self.messages_down += 1
            d.held = self.version
        self._flush_outbox(d)
        if self.sync and not self.round_open:
            self._open_round()

    def _offline(self, d: _Device) -> None:
        d.online = False
        self.online_count -= 1

    # -- aggregator -------------------------------------------------------------------
    def _deliver(self, d: _Device, seq: int, base: int) -> None:
        self.published += 1
        self.stats.received += 1
        staleness = self.version - base
        limit = self.strategy.max_staleness
        if staleness > limit or base not in self.history:
            self.stats.bytes_in += self._update_size(d, seq, base)
            self.stats.rejected["too_stale"] += 1
            if self.private:  # the device trained and sent it all the same
                self._trainer(d).charge_unsent()
            d.unaccounted -= 1
            return
        if self.privacy is not None:
            # Client-level DP's participation rule depends only on who sent it and the
            # server step, never on the update: one it refuses is not computed either (on a
            # large fleet most of the wall time would go to training updates refused
            # unseen). The model is the same; only a refusal that admit would have counted
            # under an earlier reason (norm_bound) is counted as participation here.
            try:
                self.privacy.check(d.pid)
            except Rejection as rejection:
                self.stats.bytes_in += self._update_size(d, seq, base)
                self.stats.rejected[rejection.reason.value] += 1
                if self.private:  # the device trained and sent it all the same
                    self._trainer(d).charge_unsent()
                d.unaccounted -= 1
                return
        body = self._compute_update(d, seq, base)
        d.unaccounted -= 1
        if body is None:
            # A real device skips it when training ends (update_skipped): nothing was sent.
            # Trained here at delivery, so what was counted as sent is taken back.
            self.skipped_non_finite += 1
            self.published -= 1
            self.stats.received -= 1
            return
        self.stats.bytes_in += len(body)
        # The aggregator's own admit-and-apply core (aggregator/_admit.py): the same
        # checks, bounds and refusals as the service, counted the same way.
        aggregator = self.config.bench.aggregator
        try:
            update, delta, norm = decode(
                body, spec=self.spec, limits=aggregator.limits, verifier=None
            )
            self.norms.append(norm)
            contribution = admit(
                update,
                delta,
                norm,
                d.pid,  # the broker's word: the device itself
                allowed=aggregator.allowed_participants,
                last_seq=self.last_seq,
                version=self.version,
                strategy=self.strategy,
                bounds=self.bounds,
                history=self.history,
                privacy=self.privacy,
            )
            new_params, state = checked_step(
                self.strategy.step, self.params, self.state, contribution
            )
            if new_params is None and self.sync and self.strategy.pending(state) >= self.round_size:
                new_params, state = checked_step(
                    lambda p, s, _: self.strategy.flush(p, s), self.params, state, None
                )
        except Rejection as rejection:
            self.stats.rejected[rejection.reason.value] += 1
            return
        self.state = state
        self.last_seq[d.pid] = update.seq
        self.stats.record_privacy(d.pid, update.privacy)
        self.bounds.accepted(norm)
        self.stats.clipped = self.bounds.clipped
        if self.privacy is not None:
            self.privacy.applied(d.pid, stepped=new_params is not None)
            if new_params is not None:
                self.stats.privacy = self.privacy.report()
                self.budget_spent = self.privacy.exhausted()
        staleness = contribution.staleness
        self.stats.applied += 1
        self.stats.staleness[staleness] += 1
        self.stats.buffered = self.strategy.pending(self.state)
        self.stats.robust_clipped = self.strategy.clipped(self.state)
        if new_params is not None:
            self.params = new_params
            self.version += 1
            self.stats.version = self.version
            self._publish()
            if self.sync:
                self.round_open = False
                self._open_round()

    def _compute_update(self, d: _Device, seq: int, base: int) -> bytes | None:
        """The device's update ``seq`` from model ``base``, by the participant's own
        train-and-encode core; None if its training diverged."""
        return self._trainer(d).step(base, self.history[base], seq, self.now)

    def _trainer(self, d: _Device) -> Trainer:
        if d.trainer is None:
            participant = self.config.bench.participant
            d.trainer = Trainer(
                participant_id=d.pid,
                task=self.task,
                data=d.data.train,
                seed=participant.seed,
                codec=participant.codec,
                error_feedback=participant.error_feedback,
                clip_norm=participant.clip_norm,
                attack=Attack(self.config.bench.attack, d.index)
                if d.index in self.malicious
                else None,
                dp_sgd=participant.dp_sgd,
                local_dp=participant.local_dp,
            )
        return d.trainer

    def _update_size(self, d: _Device, seq: int, base: int) -> int:
        """The exact size the update would have had (every codec has a fixed size)."""
        key = (_uint_len(seq), _uint_len(base), _uint_len(d.num_examples), len(d.pid))
        size = self._update_size_cache.get(key)
        if size is None:
            zeros = {k: np.zeros_like(v) for k, v in self.params.items()}
            tensors = encode_params(zeros, self.config.bench.participant.codec)
            envelope = UpdateEnvelope(
                participant=d.pid,
                seq=seq,
                base_version=base,
                num_examples=d.num_examples,
                loss=0.0,
                created=0.0,
                tensors=tuple(tensors),
            )
            size = self._update_size_cache[key] = len(encode_update(envelope))
        return size

    def _publish(self) -> None:
        body, view, _ = self.downlink.encode(self.version, self.params)
        self.history[self.version] = view
        while (
            self.history and next(iter(self.history)) < self.version - self.strategy.max_staleness
        ):
            self.history.popitem(last=False)
        self.stats.models_published += 1
        self.stats.bytes_out += len(body)
        self.bytes_down += self.online_count * len(body)
        self.messages_down += self.online_count
        for d in self.devices:
            if d.online:
                d.held = self.version

    def _open_round(self) -> None:
        online = [d.index for d in self.devices if d.online and d.num_examples]
        if not online:
            return
        picked = self.picker.pick(online)
        self.round_open = True
        self.round_size = len(picked)
        self.rounds += 1
        for i in picked:
            self._want_slot(self.devices[i])

    def _evaluate(self) -> None:
        if self.evaluator is not None:
            metrics, devices, examples = self.evaluator(self.params), 0, self.central_examples
            source: Literal["central", "federated"] = "central"
        else:
            metrics, devices, examples = self._fleet_scores()
            source = "federated"
        self.stats.evaluations.append(
            EvalPoint(
                elapsed_s=self.now,
                version=self.version,
                applied=self.stats.applied,
                metrics=metrics,
                source=source,
                devices=devices,
                examples=examples,
                bytes_in=self.stats.bytes_in,
                bytes_out=self.stats.bytes_out,
            )
        )
        self.down_at_eval.append(self.bytes_down)
        self.at(self.now + self.config.eval_every_s, _EVAL)

    def _fleet_scores(self) -> tuple[dict[str, float], int, int]:
        """The global model scored by every device on its own held-out data, combined as
        the aggregator combines the devices' reports; (metrics, devices, examples)."""
        assert self.scorer is not None
        set_params(self.scorer, self.params)
        fed_eval = FederatedEval(self.config.bench.aggregator.fed_eval)
        for d in self.devices:
            held_out = len(d.data.held_out)  # type: ignore[arg-type]
            if held_out:
                report = EvalEnvelope(
                    participant=d.pid,
                    version=self.version,
                    num_examples=held_out,
                    metrics=self.task.score(self.scorer, d.data.held_out),
                    created=self.now,
                )
                fed_eval.add(report, model_version=self.version)
        summaries = fed_eval.summaries()
        target = summaries.get(self.task.target.name)
        if target is None:
            return {}, 0, 0
        return {name: s.value for name, s in summaries.items()}, target.devices, target.num_examples

    # -- the loop ---------------------------------------------------------------------
    def step(self) -> bool:
        """Process one event; False when the run is over."""
        if not self.events or self.budget_spent:
            return False
        t, _, kind, i, arg = heapq.heappop(self.events)
        if t > self.proto.max_seconds:
            return False
        self.now = t
        if self.proto.versions_done(self.version):
            return False
        if kind == _EVAL:
            self._evaluate()
            value = self.stats.latest_target
            return value is None or not self.task.target.reached(value, self.goal)
        d = self.devices[i]
        if kind == _ONLINE:
            self._online(d)
        elif kind == _OFFLINE:
            self._offline(d)
        elif kind == _TRAINED:
            self._trained(d, arg)
        elif kind == _STORED:
            self._stored(d, arg // 1_000_000_000, arg % 1_000_000_000)
        return True


def _encode_full(version: int, params: Any) -> bytes:
    tensors = tuple(encode_params(params, CodecConfig(name="float32")))
    return encode_model(ModelEnvelope(version=version, created=time.time(), tensors=tensors))


def _check_fleet_fits(min_gap: int, buffer_size: int, fleet: list[DeviceData]) -> None:
    """Refuse a DP participation rule the fleet can never satisfy (``ConfigError``).

    ``min_gap`` consecutive server steps hold each device at most once and each takes
    ``buffer_size`` devices, so they need ``min_gap * buffer_size`` distinct devices: with
    fewer, step ``min_gap`` never fills and every later update is refused (the run would
    train until ``max_seconds`` and learn nothing). Devices offline or in flight need more
    headroom still: steps slow down well before the bound.
    """
    devices = sum(1 for d in fleet if len(d.train))  # type: ignore[arg-type,misc]
    if min_gap * buffer_size > devices:
        raise ConfigError(
            f"dp min_gap: {min_gap} x buffer_size {buffer_size} = {min_gap * buffer_size}"
            f" distinct devices needed by every {min_gap} consecutive server steps, the fleet"
            f" has {devices} with data: the run would stall at step {min_gap}"
        )


def _quantiles(values: list[float]) -> dict[str, float | int]:
    """Count and quantiles of the updates' L2 norms (what a clip bound is chosen from)."""
    if not values:
        return {"count": 0}
    q = np.quantile(np.asarray(values), [0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    names = ("p10", "p25", "median", "p75", "p90", "max")
    return {"count": len(values), **{n: float(v) for n, v in zip(names, q, strict=True)}}


def _uint_len(value: int) -> int:
    return 1 if value < 128 else 2 if value < 256 else 3 if value < 65536 else 5


def run_virtual(
    config: VirtualConfig,
    data_dir: Path,
    console: Console | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Run one virtual-clock configuration; its report dict. ``stop`` ends it early."""
    console = console or Console()
    torch.set_num_threads(1)
    setup = time.perf_counter()
    sim = _Sim(config, config.bench.task(), data_dir)
    setup_s = time.perf_counter() - setup
    started = time.perf_counter()
    sim.start()
    events = 0
    live = Live(console=console, auto_refresh=False) if console.is_terminal else None
    last_refresh = 0.0
    with live or contextlib.nullcontext():
        while sim.step():
            events += 1
            if stop is not None and stop.is_set():
                break
            wall = time.perf_counter()
            if wall - last_refresh >= 1.0:
                last_refresh = wall
                sim.stats.started = time.monotonic() - sim.now  # elapsed shows simulated time
                if live is not None:
                    live.update(progress_table(sim.stats, [], sim.goal), refresh=True)
                else:
                    console.print(progress_line(sim.stats) + " (simulated time)", highlight=False)
        # the final evaluation, unless the last event was one
        if not sim.stats.evaluations or sim.stats.evaluations[-1].elapsed_s != sim.now:
            sim._evaluate()
    wall_s = time.perf_counter() - started
    return _report(config, sim, wall_s, setup_s, events)


def _report(
    config: VirtualConfig, sim: _Sim, wall_s: float, setup_s: float, events: int
) -> dict[str, Any]:
    bench = config.bench
    proto = sim.proto
    # An evaluation without metrics: no device had held-out data to score with.
    scored = [i for i, p in enumerate(sim.stats.evaluations) if p.metrics]
    points = [dataclasses.asdict(sim.stats.evaluations[i]) for i in scored]
    hit, at_target = target_fields(points, sim.task.target, sim.goal)
    down_at_hit = sim.down_at_eval[scored[points.index(hit)]] if hit else None
    rejected = Counter(sim.stats.rejected)
    virtual_s = sim.now
    return {
        "label": f"virtual-{bench.aggregator.strategy.name}-{bench.participant.codec.name}",
        "mode": "virtual",
        "strategy": bench.aggregator.strategy.name,
        "codec": bench.participant.codec.name,
        "broker": "none (virtual clock)",
        "job": "-",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **at_target,
        "downlink_bytes_to_target": down_at_hit,
        "downlink_float32_bytes_to_target": None,
        "wall_time_s": virtual_s,
        "version": sim.version,
        "received": sim.stats.received,
        "applied": sim.stats.applied,
        "dropped": {
            "too_stale": rejected.get("too_stale", 0),
            "duplicate": 0,
            "invalid": 0,
            "by_reason": dict(rejected),
        },
        "staleness_histogram": {str(k): v for k, v in sorted(sim.stats.staleness.items())},
        "update_norms": _quantiles(sim.norms),
        "uplink_bytes": sim.stats.bytes_in,
        "downlink_bytes": sim.bytes_down,
        "downlink_messages": sim.messages_down,
        "downlink_float32_bytes": sim.messages_down * sim.full_bytes,
        "full_model_bytes": sim.full_bytes,
        "models_published": sim.stats.models_published,
        "keyframes": sim.downlink.keyframes,
        "deltas": sim.downlink.deltas,
        "device_view": {"deltas_skipped": 0},
        "fleet": {
            "trained": sim.trained,
            "published": sim.published,
            "skipped": {"non_finite": sim.skipped_non_finite} if sim.skipped_non_finite else {},
        },
        "rounds": sim.rounds,
        "clipped": sim.stats.clipped,
        "dp": sim.privacy.report() if sim.privacy is not None else None,
        "stopped_by": "privacy_budget_spent" if sim.budget_spent else None,
        "robust": {
            "clipped": sim.stats.robust_clipped,
            "outlier": rejected.get("outlier", 0),
            "norm_bound": rejected.get("norm_bound", 0),
        },
        "device_privacy": _device_privacy(sim),
        "aggregator_cost": {
            "measured": "not measured (virtual clock: one process does everything)",
            "cpu_s": None,
            "eval_cpu_s": None,
            "evaluations": len(points),
            "rss_start_bytes": None,
            "peak_rss_bytes": None,
        },
        "scale": {
            "devices": proto.participants,
            "simulated_s": virtual_s,
            "wall_s": wall_s,
            "setup_s": setup_s,
            "events": events,
            "speedup": virtual_s / wall_s if wall_s else None,
            "device_seconds_per_wall_s": proto.participants * virtual_s / wall_s
            if wall_s
            else None,
            "updates_published_per_wall_s": sim.published / wall_s if wall_s else None,
            "updates_applied_per_wall_s": sim.stats.applied / wall_s if wall_s else None,
            "events_per_wall_s": events / wall_s if wall_s else None,
        },
        "time_model": {
            "train_s_per_example": config.train_s_per_example,
            "eval_every_s": config.eval_every_s,
        },
        "evaluations": points,
        "protocol": dataclasses.asdict(proto),
        "settings": {
            **settings_of(bench, sim.task),
            "evaluation": f"every {config.eval_every_s:g} simulated s, "
            + (
                f"on the task's central held-out set ({sim.central_examples} examples)"
                if sim.evaluator is not None
                else "by every device on its own held-out data, combined as the"
                " aggregator combines the devices' reports (example-weighted)"
            ),
            "publish_every": 1,
            "downlink": dataclasses.asdict(bench.aggregator.downlink),
            "prefetch": "-",
        },
    }


def _device_privacy(sim: _Sim) -> dict[str, Any] | None:
    """The fleet's privacy spend as the aggregator saw it (each device's latest report),
    and what the devices' own accountants hold (None without DP on the devices)."""
    if not sim.private:
        return None
    reported = sim.stats.device_epsilon()
    trainers = [d.trainer for d in sim.devices if d.trainer is not None]
    held = sorted(t.privacy.epsilon for t in trainers if t.privacy is not None)
    return {
        "mechanism": next((t.privacy.mechanism for t in trainers if t.privacy), None),
        "noise_multipliers": sorted(
            {round(t.privacy.noise_multiplier, 4) for t in trainers if t.privacy}
        ),
        "reported_epsilon_max": reported.get("max"),
        "reported_epsilon_median": reported.get("median"),
        "reporting_devices": int(reported.get("devices", 0)),
        "device_epsilon_max": held[-1] if held else None,
        "device_epsilon_median": float(np.median(held)) if held else None,
        "budget_spent_devices": sum(d.budget_spent for d in sim.devices),
    }


async def run_virtual_command(base: BenchConfig, data_dir: Path, out: Path) -> int:
    """``fedmq bench --virtual``: one configuration on the virtual clock."""
    console = Console()
    config = VirtualConfig(bench=base)
    proto = base.protocol
    fleet = proto.participants or "the task's"
    console.print(
        f"fedmq bench --virtual: {fleet} devices, strategy"
        f" {base.aggregator.strategy.name}, codec {base.participant.codec.name},"
        f" up to {proto.max_seconds:.0f} simulated s"
    )
    stop = threading.Event()
    try:
        # In a thread, so that Ctrl-C / SIGTERM (a cancellation here) can stop it.
        run = await asyncio.to_thread(run_virtual, config, data_dir, console, stop)
    finally:
        stop.set()
    scale = run["scale"]
    extra = [
        "## Scale (virtual clock)",
        "",
        "| devices | simulated s | wall s | speed-up | device-seconds / wall s"
        " | updates published / wall s | updates applied / wall s | events / wall s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {scale['devices']:,} | {scale['simulated_s']:.1f} | {scale['wall_s']:.1f}"
        f" | {scale['speedup']:.2f}x | {scale['device_seconds_per_wall_s']:,.0f}"
        f" | {scale['updates_published_per_wall_s']:,.1f}"
        f" | {scale['updates_applied_per_wall_s']:,.1f} | {scale['events_per_wall_s']:,.0f} |",
        "",
        f"Time model: training {config.train_s_per_example * 1000:.2f} ms of simulated time"
        f" per example; evaluation every {config.eval_every_s:g} simulated s. Times in the"
        " tables below are simulated seconds.",
        "",
    ]
    write_results(out, [run], title="fedmq bench --virtual", extra=extra)
    console.print(
        f"{scale['devices']:,} devices, {scale['simulated_s']:.0f} simulated s in"
        f" {scale['wall_s']:.1f} s wall ({scale['speedup']:.2f}x): "
        f"{scale['device_seconds_per_wall_s']:,.0f} device-s/s,"
        f" {scale['updates_published_per_wall_s']:,.1f} updates published/s,"
        f" {scale['updates_applied_per_wall_s']:,.1f} applied/s"
    )
    norms = run["update_norms"]
    if norms["count"]:
        console.print(
            f"update L2 norms of {norms['count']:,} received: p10 {norms['p10']:.4g},"
            f" median {norms['median']:.4g}, p90 {norms['p90']:.4g}, max {norms['max']:.4g}"
        )
    if run["dp"] is not None or run["clipped"]:
        console.print(dp_line(run["dp"]) + f"; updates clipped: {run['clipped']}", highlight=False)
    if run["stopped_by"] == "privacy_budget_spent":
        console.print("stopped: the next server step would exceed the privacy budget")
    console.print(f"results: {out / 'report.md'}")
    return 0

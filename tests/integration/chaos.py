"""Chaos for a real fleet, then a reconciliation of what every device sent with what was applied.

A run (``ChaosRun``) starts a broker of its own (``OwnRabbit`` or ``OwnMosquitto``, on
spare ports, data in the run's folder: the shared brokers are never touched), an
aggregator with ``--checkpoint-dir`` and a few participants, all as real ``fedmq``
processes logging JSON. It injects faults in a seeded random order, each a random time
after the fleet recovered from the previous one (``make_plan``):

- ``kill -9`` of the aggregator while it holds applies no checkpoint covers yet,
  restarted with the same checkpoint folder;
- a restart of the broker (stopped, down for a moment, started on the same data);
- ``kill -9`` of a participant ("device reboot"), restarted with the same state folder.

Then publishing stops (participants get SIGTERM), whatever is left in the outboxes is
published by a drain run of each device, the aggregator applies everything and is
stopped with SIGTERM (graceful: final checkpoint). ``reconcile`` then checks, from the
log events alone, that every update a device published (``published``: confirmed by the
broker) was applied exactly once (``committed``: covered by a durable checkpoint) or
refused with a reason (``rejected``). A ``duplicate`` refusal of an update that was
never applied is not a reason: it is counted as lost. Nor is a refusal that the
aggregator's own restart can cause (``RESTART_CAUSED``: a base it should know was not
known to it): an honest device's update refused that way is lost too.

Used by tests/integration/test_chaos.py (short) and benchmarks/chaos.py (any length).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from tests.integration.brokers import REPO, MosquittoProcess, RabbitNode, free_port
from tests.integration.fleet import Event, FedmqProcess

__all__ = [
    "ChaosConfig",
    "ChaosReport",
    "ChaosRun",
    "Fault",
    "OwnBroker",
    "OwnMosquitto",
    "OwnRabbit",
    "Reconciliation",
    "VersionCheck",
    "check_versions",
    "main",
    "make_plan",
    "own_broker",
    "reconcile",
]

Transport = Literal["amqp", "mqtt"]
FaultKind = Literal["kill_aggregator", "restart_broker", "kill_device"]
RABBIT_BOOT_S = 90.0
JOB = "chaos"


# -- brokers of our own --------------------------------------------------------------------


class OwnBroker(Protocol):
    """A broker this run owns: it may stop and start it at will."""

    @property
    def url(self) -> str: ...

    def start(self) -> None:
        """Start and return once it accepts connections."""
        ...

    def stop(self) -> None:
        """Stop it (its data stays for the next ``start``)."""
        ...


class OwnRabbit:
    """A RabbitMQ node (tests/integration/brokers.py) with a minimal configuration.

    Not broker_config/: its definitions remove ``guest`` and add per-device users, which
    a fleet of arbitrary ids cannot use. Here ``guest`` logs in from 127.0.0.1 (RabbitMQ's
    default loopback rule), no plugins; durable queues, persistent messages, publisher
    confirms and the model stream behave as in production. ``stop`` is brokers.py's:
    SIGTERM, then SIGKILL after a second, so a restart may also be a crash of the node.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._folder = folder
        self._port = free_port()
        plugins = folder / "plugins.erl"
        plugins.write_text("[].\n")
        conf = f"listeners.tcp.default = 127.0.0.1:{self._port}\nloopback_users.guest = true\n"
        self._node = RabbitNode(
            folder, conf_text=conf, enabled_plugins=plugins, ports={"amqp": self._port}
        )

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self._port}/"

    def start(self) -> None:
        # RabbitNode.start writes a fresh Erlang cookie, read-only: let a restart replace it.
        with contextlib.suppress(FileNotFoundError):
            (self._folder / "home" / ".erlang.cookie").chmod(0o600)
        self._node.start()
        self._node.wait_listening(RABBIT_BOOT_S)

    def stop(self) -> None:
        self._node.stop()


class OwnMosquitto:
    """A Mosquitto (tests/integration/brokers.py) with persistence and anonymous access.

    The queue settings are broker_config/mosquitto.conf's; its password file and ACL are
    left out so that any device id may connect. ``stop`` sends SIGTERM, on which Mosquitto
    writes its persistence file: sessions and queued QoS 1 updates survive the restart.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._port = free_port()
        lines = [
            f"listener {self._port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {folder}/",
            "autosave_interval 60",
            "max_queued_messages 10000",
            "max_queued_bytes 1073741824",
            "max_inflight_messages 32",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to "mosquitto", who cannot write here
        self._broker = MosquittoProcess(
            folder, conf_text="\n".join(lines) + "\n", ports={"mqtt": self._port}
        )

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self._port}"

    def start(self) -> None:
        self._broker.start()
        self._broker.wait_listening(15)

    def stop(self) -> None:
        self._broker.stop()


def own_broker(transport: Transport, folder: Path) -> OwnBroker:
    return OwnRabbit(folder) if transport == "amqp" else OwnMosquitto(folder)


# -- the plan -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ChaosConfig:
    """One chaos run. The defaults are the short form CI runs."""

    transport: Transport
    devices: int = 3
    chaos_s: float = 30.0  # normal running between the faults, in total (plus recoveries)
    aggregator_kills: int = 3
    broker_restarts: int = 1
    device_kills: int = 2
    seed: int = 0
    strategy: str = "fedasync"
    max_examples: int = 400  # training images per device
    # Each device rests this long after each update (--publish-delay), leaving CPU for the
    # restarts: on a small machine a fleet training flat out makes a restart take 20 s.
    pace_s: float = 0.0
    eval_examples: int = 1000  # test images the aggregator scores the model on
    target_accuracy: float = 0.55
    shutdown_timeout_s: float = 30.0
    settle_timeout_s: float = 90.0  # for each wait on the fleet (progress, drain)

    def __post_init__(self) -> None:
        if self.transport not in ("amqp", "mqtt"):
            raise ValueError(f"transport: {self.transport!r} is not amqp or mqtt")
        if self.devices < 1 or self.chaos_s <= 0:
            raise ValueError("devices must be >= 1 and chaos_s > 0")


@dataclass(frozen=True, kw_only=True)
class Fault:
    """One fault, ``after_s`` seconds of normal running after the fleet recovered from the
    previous one (an update applied since), down for ``down_s`` before the restart."""

    after_s: float
    kind: FaultKind
    down_s: float
    device: int | None = None


def make_plan(config: ChaosConfig) -> list[Fault]:
    """The faults of ``config`` in a random order; the same seed gives the same plan.

    Each fault waits for the fleet to recover from the previous one, then for a random
    time (on average ``chaos_s`` divided by the number of faults), so every kill hits a
    process in the middle of its normal work rather than one still starting up.
    """
    rnd = random.Random(config.seed)
    counts: dict[FaultKind, int] = {
        "kill_aggregator": config.aggregator_kills,
        "restart_broker": config.broker_restarts,
        "kill_device": config.device_kills,
    }
    kinds = [kind for kind, n in counts.items() for _ in range(n)]
    rnd.shuffle(kinds)
    mean_gap = config.chaos_s / max(1, len(kinds))
    faults = []
    for kind in kinds:
        after = rnd.uniform(0.25, 1.75) * mean_gap
        if kind == "kill_aggregator":
            faults.append(Fault(after_s=after, kind=kind, down_s=rnd.uniform(0.0, 2.0)))
        elif kind == "restart_broker":
            faults.append(Fault(after_s=after, kind=kind, down_s=rnd.uniform(1.0, 3.0)))
        else:
            device = rnd.randrange(config.devices)
            faults.append(
                Fault(after_s=after, kind=kind, down_s=rnd.uniform(0.0, 3.0), device=device)
            )
    return faults


# -- reconciliation -----------------------------------------------------------------------

# Refusals that only an aggregator which forgot what it published can give an honest
# device: a base "in the future", or a base it no longer holds though it is within
# max_staleness. Through chaos they count as losses, not as reasons.
RESTART_CAUSED = ("future_base", "no longer held")


def restart_caused(reason: str, detail: str) -> bool:
    """Whether a refusal is one the aggregator's own restart could have caused."""
    return reason == RESTART_CAUSED[0] or RESTART_CAUSED[1] in detail


@dataclass(kw_only=True)
class Row:
    """One participant's account: sequence numbers by outcome."""

    participant: str
    published: set[int] = field(default_factory=set)
    applied: collections.Counter[int] = field(default_factory=collections.Counter)
    rejected: dict[int, str] = field(default_factory=dict)  # not applied: seq -> reason
    lost: set[int] = field(default_factory=set)
    duplicates_refused: int = 0  # redeliveries of applied updates, refused as duplicates
    unlogged: set[int] = field(default_factory=set)  # seen by the aggregator, no "published"

    @property
    def doubly_applied(self) -> set[int]:
        return {seq for seq, n in self.applied.items() if n > 1}

    def rejected_by_reason(self) -> collections.Counter[str]:
        return collections.Counter(self.rejected.values())


@dataclass(kw_only=True)
class Reconciliation:
    """Every participant's row, and problems of the audit trail itself."""

    rows: list[Row]
    problems: list[str]

    @property
    def lost(self) -> int:
        return sum(len(r.lost) for r in self.rows)

    @property
    def doubly_applied(self) -> int:
        return sum(len(r.doubly_applied) for r in self.rows)

    @property
    def published(self) -> int:
        return sum(len(r.published) for r in self.rows)

    @property
    def applied(self) -> int:
        return sum(len(r.applied) for r in self.rows)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.doubly_applied == 0 and not self.problems

    def table(self) -> str:
        """participant | published | applied | rejected by reason | lost, and totals."""
        header = (
            "participant",
            "published",
            "applied",
            "rejected (by reason)",
            "lost",
            "applied twice",
            "duplicates refused",
        )
        lines = [header]
        total_reasons: collections.Counter[str] = collections.Counter()
        for row in self.rows:
            reasons = row.rejected_by_reason()
            total_reasons.update(reasons)
            lines.append(
                (
                    row.participant,
                    str(len(row.published)) + (f" (+{len(row.unlogged)})" if row.unlogged else ""),
                    str(len(row.applied)),
                    _reasons(reasons),
                    str(len(row.lost)),
                    str(len(row.doubly_applied)),
                    str(row.duplicates_refused),
                )
            )
        lines.append(
            (
                "TOTAL",
                str(self.published),
                str(self.applied),
                _reasons(total_reasons),
                str(self.lost),
                str(self.doubly_applied),
                str(sum(r.duplicates_refused for r in self.rows)),
            )
        )
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out = []
        for n, line in enumerate(lines):
            out.append(" | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
            if n == 0 or n == len(lines) - 2:
                out.append("-+-".join("-" * w for w in widths))
        return "\n".join(line.rstrip() for line in out)


def _reasons(reasons: Mapping[str, int]) -> str:
    total = sum(reasons.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{k} {n}" for k, n in sorted(reasons.items())) + ")"


def _committed_applies(
    aggregator_runs: Sequence[Sequence[Event]], problems: list[str]
) -> list[tuple[float, dict[str, list[int]]]]:
    """(time, applied lists) of every durable checkpoint, each exactly once, in order.

    A "committed" line is written after its checkpoint is durable, so a kill in between
    can lose the line: the next run's "resumed" event repeats the applies of the
    checkpoint it resumed from, which fills that gap. A run resuming from an older
    commit than one already logged would mean a logged commit was not durable.
    """
    logged: dict[int, tuple[float, dict[str, list[int]]]] = {}
    for index, run in enumerate(aggregator_runs):
        resumed = [e for e in run if e["event"] == "resumed"]
        if index and not resumed:
            problems.append(f"aggregator run {index} did not resume from the checkpoint")
        if resumed:
            number = resumed[0]["commit"]
            if number and number not in logged:
                logged[number] = (resumed[0]["ts"], resumed[0]["last_applied"])
            newer = sorted(n for n in logged if n > number)
            if newer:
                problems.append(f"run {index} resumed from commit {number} after {newer}")
        for event in run:
            if event["event"] == "committed":
                if event["commit"] in logged:
                    problems.append(f"commit {event['commit']} logged twice")
                logged[event["commit"]] = (event["ts"], event["applied"])
    return [logged[n] for n in sorted(logged)]


def reconcile(
    aggregator_runs: Sequence[Sequence[Event]], participants: Mapping[str, Iterable[Event]]
) -> Reconciliation:
    """Account for every update each participant published, from the log events alone.

    ``aggregator_runs``: the events of each aggregator process, in the order they ran.
    ``participants``: each participant id's events over all its processes.

    A refusal may be redone: one logged by a run killed before its next checkpoint is not
    final, the redelivery is judged again. So an update refused and later applied counts
    as applied; one refused for another reason than ``duplicate`` *after* it was applied
    durably means the aggregator forgot what it had applied, and is a problem.
    """
    problems: list[str] = []
    rows = {pid: Row(participant=pid) for pid in participants}
    for pid, events in participants.items():
        rows[pid].published = {e["seq"] for e in events if e["event"] == "published"}
    final_at: dict[tuple[str, int], float] = {}  # when each apply became durable (first time)
    for ts, applied in _committed_applies(aggregator_runs, problems):
        for pid, seqs in applied.items():
            rows.setdefault(pid, Row(participant=pid)).applied.update(seqs)
            for seq in seqs:
                final_at.setdefault((pid, seq), ts)
    reasons: dict[tuple[str, int], list[tuple[float, str]]] = collections.defaultdict(list)
    forgotten: set[tuple[str, int]] = set()  # refused for a reason the restart caused
    for run in aggregator_runs:
        for event in run:
            if event["event"] != "rejected":
                continue
            sender, number = event.get("participant"), event.get("seq")
            if sender is None or number is None:
                problems.append(f"rejection without participant and seq: {event}")
                continue
            reasons[(sender, number)].append((event["ts"], event["reason"]))
            if restart_caused(event["reason"], str(event.get("detail", ""))):
                forgotten.add((sender, number))
    for (pid, seq), why in reasons.items():
        row = rows.setdefault(pid, Row(participant=pid))
        if seq in row.applied:
            row.duplicates_refused += sum(1 for _, r in why if r == "duplicate")
            late = [r for ts, r in why if r != "duplicate" and ts > final_at[(pid, seq)]]
            if late:
                problems.append(f"{pid} seq {seq} was applied, then refused as {late}")
            continue
        # A duplicate of something never applied is no reason: that update is lost. So is a
        # refusal the aggregator's own restart caused.
        real = [r for _, r in why if r != "duplicate"]
        if real and (pid, seq) not in forgotten:
            row.rejected[seq] = real[-1]
    for row in rows.values():
        seen = set(row.applied) | set(row.rejected)
        row.unlogged = seen - row.published
        row.published |= row.unlogged
        row.lost = row.published - seen
    return Reconciliation(rows=[rows[p] for p in sorted(rows)], problems=problems)


@dataclass(kw_only=True)
class VersionCheck:
    """Model versions across aggregator restarts."""

    resumed: list[int]  # the version each restarted run resumed from
    final: int  # the last committed version
    # per restart: versions published before the kill that no checkpoint covered (the
    # restarted run numbers its models above them: they must never be published again)
    uncovered: list[int]
    problems: list[str]


def check_versions(aggregator_runs: Sequence[Sequence[Event]]) -> VersionCheck:
    """Committed versions never decrease, each restart resumes at or past the last one, and
    no version number is ever published twice (by any run)."""
    problems: list[str] = []
    resumed: list[int] = []
    uncovered: list[int] = []
    last_committed = 0
    highest_published = -1
    for index, run in enumerate(aggregator_runs):
        if index:
            starts = [e["version"] for e in run if e["event"] == "resumed"]
            start = starts[0] if starts else 0
            resumed.append(start)
            if start < last_committed:
                problems.append(
                    f"run {index} resumed at version {start} < committed {last_committed}"
                )
            before = [e["version"] for e in aggregator_runs[index - 1] if e["event"] == "published"]
            uncovered.append(max(0, max(before, default=0) - start))
            last_committed = max(last_committed, start)
        published = [e["version"] for e in run if e["event"] == "published"]
        if published != sorted(set(published)):
            problems.append(f"run {index} published versions out of order")
        if index and published and published[0] < resumed[-1]:
            problems.append(f"run {index} published {published[0]} below its resumed version")
        if published and published[0] <= highest_published:
            problems.append(
                f"run {index} published version {published[0]} again "
                f"(an earlier run published up to {highest_published})"
            )
        highest_published = max([highest_published, *published])
        for event in run:
            if event["event"] == "committed":
                if event["version"] < last_committed:
                    problems.append(
                        f"run {index} committed version {event['version']} after {last_committed}"
                    )
                last_committed = max(last_committed, event["version"])
    return VersionCheck(
        resumed=resumed, final=last_committed, uncovered=uncovered, problems=problems
    )


# -- the run ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ChaosReport:
    """What a run did and what the reconciliation found."""

    config: ChaosConfig
    faults: list[str]
    reconciliation: Reconciliation
    versions: VersionCheck
    accuracy: float  # the final checkpoint's model on the aggregator's test images
    last_evaluated: float | None  # the aggregator's own last "evaluated" accuracy
    checkpoint_matches: bool  # final checkpoint's last_seq == highest applied seq, per device
    stop_s: float  # SIGTERM to exit of the last aggregator run
    stopped_gracefully: bool
    wall_s: float
    problems: list[str]

    @property
    def ok(self) -> bool:
        return (
            self.reconciliation.ok
            and not self.versions.problems
            and not self.problems
            and self.checkpoint_matches
            and self.stopped_gracefully
            and self.accuracy >= self.config.target_accuracy
        )

    def render(self) -> str:
        c = self.config
        rec = self.reconciliation
        lines = [
            f"chaos run: {c.transport}, {c.devices} devices, seed {c.seed}, "
            f"window {c.chaos_s:.0f} s, wall {self.wall_s:.0f} s",
            "faults:",
            *(f"  {f}" for f in self.faults),
            "",
            rec.table(),
            "",
            f"lost {rec.lost}, applied twice {rec.doubly_applied} (both must be 0)",
            f"versions: resumed at {self.versions.resumed}, final {self.versions.final}; "
            f"published but not checkpointed before each kill (numbered above on restart): "
            f"{self.versions.uncovered}",
            f"final checkpoint: accuracy {self.accuracy:.4f} on {c.eval_examples} test images "
            f"(target {c.target_accuracy}); last evaluated by the aggregator "
            f"{self.last_evaluated}; last_seq matches the audit: {self.checkpoint_matches}",
            f"graceful stop: {self.stopped_gracefully} in {self.stop_s:.1f} s "
            f"(bound {c.shutdown_timeout_s:.0f} s)",
        ]
        for problem in [*rec.problems, *self.versions.problems, *self.problems]:
            lines.append(f"PROBLEM: {problem}")
        lines.append("RESULT: " + ("ok" if self.ok else "FAILED"))
        return "\n".join(lines)


class ChaosRun:
    """Runs one chaos scenario in ``folder`` (logs, state, checkpoint, broker data)."""

    def __init__(
        self,
        config: ChaosConfig,
        folder: Path,
        data_dir: Path,
        *,
        say: Callable[[str], None] = print,
    ) -> None:
        self.config = config
        self.folder = folder
        self.data_dir = data_dir
        self._say = say
        self._t0 = time.monotonic()
        self.logs = folder / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir = folder / "checkpoint"
        self.broker = own_broker(config.transport, folder / "broker")
        self.aggregators: list[FedmqProcess] = []
        self.devices: dict[str, list[FedmqProcess]] = {}
        self._expected_exit: set[int] = set()  # pids we killed or stopped on purpose
        self._faults_done: list[str] = []
        self._last_fault = 0.0  # wall clock (time.time) of the last fault

    # processes

    def _pid(self, index: int) -> str:
        return f"dev-{index}"

    def _state_dir(self, pid: str) -> Path:
        return self.folder / "state" / pid

    def _spawn(self, name: str, args: list[str]) -> FedmqProcess:
        return FedmqProcess(
            name, [*args, "--broker", self.broker.url, "--job", JOB], self.logs, self.data_dir
        )

    def _start_aggregator(self) -> FedmqProcess:
        c = self.config
        proc = self._spawn(
            f"aggregator.run{len(self.aggregators)}",
            [
                "aggregator",
                "--checkpoint-dir",
                str(self.checkpoint_dir),
                "--strategy",
                c.strategy,
                "--eval-every",
                "5",
                "--eval-examples",
                str(c.eval_examples),
                "--shutdown-timeout",
                str(c.shutdown_timeout_s),
            ],
        )
        self.aggregators.append(proc)
        return proc

    def _start_device(self, index: int, *, drain: bool = False) -> FedmqProcess:
        pid = self._pid(index)
        runs = self.devices.setdefault(pid, [])
        args = [
            "participant",
            "--id",
            pid,
            "--shard",
            f"{index}/{self.config.devices}",
            "--max-examples",
            str(self.config.max_examples),
            "--state-dir",
            str(self._state_dir(pid)),
        ]
        if drain:
            # Trains once but keeps that update to itself for an hour: meanwhile the outbox
            # task publishes what the previous runs left, and nothing new is made.
            args += ["--publish-delay", "3600"]
        elif self.config.pace_s:
            args += ["--publish-delay", str(self.config.pace_s)]
        proc = self._spawn(f"{pid}.{'drain' if drain else 'run'}{len(runs)}", args)
        runs.append(proc)
        return proc

    def _live(self) -> list[FedmqProcess]:
        procs = [*self.aggregators, *(p for runs in self.devices.values() for p in runs)]
        return [p for p in procs if p.popen.pid not in self._expected_exit]

    def _kill(self, proc: FedmqProcess) -> None:
        self._expected_exit.add(proc.popen.pid)
        proc.kill()

    def _stop(self, proc: FedmqProcess, timeout: float = 15.0) -> int:
        self._expected_exit.add(proc.popen.pid)
        return proc.stop(timeout)

    def _stop_all(self, procs: list[FedmqProcess]) -> None:
        """SIGTERM every one of ``procs`` first, then wait for each (they stop in parallel)."""
        for proc in procs:
            self._expected_exit.add(proc.popen.pid)
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(15)
            proc.stop(5)  # closes its log (SIGKILL if it is still running)

    def _check_alive(self) -> None:
        for proc in self._live():
            if proc.popen.poll() is not None:
                raise AssertionError(
                    f"{proc.name} exited on its own ({proc.popen.returncode}):\n{proc.tail()}"
                )

    def _wait(
        self, condition: Callable[[], object], what: str, timeout: float | None = None
    ) -> None:
        deadline = time.monotonic() + (timeout or self.config.settle_timeout_s)
        while not condition():
            self._check_alive()
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.tail(15)}" for p in self._live()[-4:])
                raise AssertionError(f"timed out waiting for {what}\n{logs}")
            time.sleep(0.5)

    def _note(self, text: str) -> None:
        self._say(f"[{time.monotonic() - self._t0:6.1f} s] {text}")

    # the scenario

    def _recovered(self, since: float) -> bool:
        """The aggregator applied an update after ``since``, and every device is connected.

        A process that starts while the broker is down gives up after its connect timeout
        (10 s) and exits, for its process manager to start it again; the faults here are
        spaced so that this never happens (nothing restarts the processes).
        """
        return any(e["ts"] > since for e in self.aggregators[-1].events("accepted")) and all(
            runs[-1].events("resuming") for runs in self.devices.values()
        )

    def _fault(self, fault: Fault) -> None:
        since = self._last_fault
        self._wait(lambda: self._recovered(since), "the fleet to recover from the last fault")
        time.sleep(fault.after_s)
        self._check_alive()
        if fault.kind == "kill_aggregator":
            victim = self.aggregators[-1]
            # Kill it with applies in memory that no checkpoint covers yet (as soon as there
            # are some, within a few seconds): the case exactly-once has to get right.
            _until_uncheckpointed(victim.log_path, timeout_s=15.0)
            self._kill(victim)
            accepted = len(victim.events("accepted"))
            committed = sum(
                len(seqs) for e in victim.events("committed") for seqs in e["applied"].values()
            )
            time.sleep(fault.down_s)
            self._start_aggregator()
            text = (
                f"kill -9 {victim.name} ({accepted} applied, {accepted - committed} of them "
                "not yet checkpointed)"
            )
        elif fault.kind == "restart_broker":
            self.broker.stop()
            time.sleep(fault.down_s)
            self.broker.start()
            text = "broker restarted"
        else:
            assert fault.device is not None
            victim = self.devices[self._pid(fault.device)][-1]
            self._kill(victim)
            time.sleep(fault.down_s)
            self._start_device(fault.device)
            text = f"kill -9 {victim.name}"
        self._last_fault = time.time()
        done = f"after {fault.after_s:4.1f} s: {text}, down {fault.down_s:.1f} s"
        self._faults_done.append(done)
        self._note(done)

    def _outbox_files(self, pid: str) -> list[Path]:
        return sorted((self._state_dir(pid) / "outbox").glob("*.update"))

    def _handled(self) -> bool:
        """Every published update has been applied or refused by some aggregator run."""
        seen = set()
        for run in self.aggregators:
            for event in run.events():
                if event["event"] in ("accepted", "rejected") and event.get("seq") is not None:
                    seen.add((event["participant"], event["seq"]))
        published = {
            (pid, e["seq"])
            for pid, runs in self.devices.items()
            for run in runs
            for e in run.events("published")
        }
        return published <= seen

    def run(self) -> ChaosReport:
        c = self.config
        started = time.monotonic()
        self.broker.start()
        self._note(f"broker up at {self.broker.url}")
        try:
            return self._scenario(started)
        finally:
            for proc in self._live():
                self._stop(proc, timeout=5)
            for runs in self.devices.values():
                for proc in runs:
                    proc.stop(5)
            for proc in self.aggregators:
                proc.stop(5)
            self.broker.stop()
            self._note(f"done ({c.transport})")

    def _scenario(self, started: float) -> ChaosReport:
        c = self.config
        self._start_aggregator()
        for index in range(c.devices):
            self._start_device(index)
        self._wait(
            lambda: any(e["applied"] for e in self.aggregators[-1].events("committed")),
            "the first checkpoint",
            timeout=max(120.0, c.settle_timeout_s),
        )
        self._note("fleet running; chaos begins")
        self._last_fault = time.time()
        for fault in make_plan(c):
            self._fault(fault)
        # The fleet must still make progress after the last fault.
        since = self._last_fault
        self._wait(lambda: self._recovered(since), "progress after the last fault")

        self._note("stopping the devices (SIGTERM)")
        self._stop_all([runs[-1] for runs in self.devices.values()])
        pending = [pid for pid in self.devices if self._outbox_files(pid)]
        self._note(f"draining outboxes of {pending or 'nobody'}")
        drains = [self._start_device(int(pid.split("-")[1]), drain=True) for pid in pending]
        self._wait(
            lambda: not any(self._outbox_files(pid) for pid in pending), "the outboxes to drain"
        )
        self._stop_all(drains)

        self._wait(self._handled, "the aggregator to handle every published update")
        aggregator = self.aggregators[-1]
        self._note("stopping the aggregator (SIGTERM)")
        t = time.monotonic()
        code = self._stop(aggregator, timeout=c.shutdown_timeout_s + 15)
        stop_s = time.monotonic() - t
        stopped = bool(aggregator.events("stopped")) and code in (0, 130)

        aggregator_runs = [p.events() for p in self.aggregators]
        devices = {
            pid: [e for p in procs for e in p.events()] for pid, procs in self.devices.items()
        }
        reconciliation = reconcile(aggregator_runs, devices)
        versions = check_versions(aggregator_runs)
        problems = []
        leftovers = {pid: len(self._outbox_files(pid)) for pid in self.devices}
        if any(leftovers.values()):
            problems.append(f"updates left in outboxes: {leftovers}")
        accuracy, matches = self._judge_checkpoint(reconciliation, versions, problems)
        evaluated = [
            e["metrics"]["accuracy"]
            for run in aggregator_runs
            for e in run
            if e["event"] == "evaluated" and e["source"] == "central"
        ]
        return ChaosReport(
            config=c,
            faults=self._faults_done,
            reconciliation=reconciliation,
            versions=versions,
            accuracy=accuracy,
            last_evaluated=evaluated[-1] if evaluated else None,
            checkpoint_matches=matches,
            stop_s=stop_s,
            stopped_gracefully=stopped,
            wall_s=time.monotonic() - started,
            problems=problems,
        )

    def _judge_checkpoint(
        self, reconciliation: Reconciliation, versions: VersionCheck, problems: list[str]
    ) -> tuple[float, bool]:
        """Score the final checkpoint's model; compare its state with the audit trail."""
        # Imported here: the scenario itself needs neither torch nor the dataset.
        from fedmq.aggregator import Evaluator
        from fedmq.aggregator._checkpoint import load_checkpoint
        from fedmq.tasks.fashion_mnist import FmnistSettings, make_task

        checkpoint = load_checkpoint(self.checkpoint_dir)
        if checkpoint is None:
            problems.append("no checkpoint at the end")
            return 0.0, False
        if checkpoint.version != versions.final:
            problems.append(
                f"final checkpoint at version {checkpoint.version}, last committed {versions.final}"
            )
        expected = {r.participant: max(r.applied) for r in reconciliation.rows if r.applied}
        matches = dict(checkpoint.last_seq) == expected
        if not matches:
            problems.append(f"checkpoint last_seq {dict(checkpoint.last_seq)} != {expected}")
        # The aggregator's own task and held-out set: `fedmq aggregator`'s defaults.
        task = make_task(FmnistSettings(eval_examples=self.config.eval_examples))
        assert task.central_data is not None
        scores = Evaluator(task, task.central_data(self.data_dir))(checkpoint.params)
        return scores["accuracy"], matches


def _until_uncheckpointed(log: Path, timeout_s: float) -> None:
    """Return once the aggregator logging to ``log`` has applied an update that no
    checkpoint covers yet ("accepted" without its "committed"), or after ``timeout_s``.

    Reads the log incrementally every 20 ms: an uncheckpointed apply lasts until the next
    checkpoint, up to ``--checkpoint-interval`` (2 s).
    """
    offset, pending = 0, 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with log.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        offset += len(complete)
        for line in complete.splitlines():
            if b'"event": "accepted"' in line:
                pending += 1
            elif b'"event": "committed"' in line:
                event = json.loads(line)
                pending -= sum(len(seqs) for seqs in event["applied"].values())
        if pending > 0:
            return
        time.sleep(0.02)


# -- command line -------------------------------------------------------------------------


def default_data_dir() -> Path:
    return Path(os.environ.get("FEDMQ_DATA_DIR", REPO.parent / "shared" / "data"))


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/chaos.py --transport amqp --minutes 5``: run, print the table."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/chaos.py",
        description="Chaos run against a broker of its own; prints the reconciliation.",
    )
    parser.add_argument("--transport", choices=("amqp", "mqtt"), required=True)
    parser.add_argument("--minutes", type=float, default=5.0, help="length of the chaos window")
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--aggregator-kills", type=int, default=3)
    parser.add_argument("--broker-restarts", type=int, default=1)
    parser.add_argument(
        "--device-kills", type=int, default=None, help="default: one per 30 s of chaos"
    )
    parser.add_argument("--seed", type=int, default=None, help="default: random")
    parser.add_argument("--max-examples", type=int, default=1500)
    parser.add_argument("--eval-examples", type=int, default=2000)
    parser.add_argument("--target-accuracy", type=float, default=0.70)
    parser.add_argument("--strategy", choices=("fedasync", "fedbuff"), default="fedasync")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--keep", action="store_true", help="keep the run folder (logs)")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60
    config = ChaosConfig(
        transport=args.transport,
        devices=args.devices,
        chaos_s=seconds,
        aggregator_kills=args.aggregator_kills,
        broker_restarts=args.broker_restarts,
        device_kills=args.device_kills if args.device_kills is not None else int(seconds // 30),
        seed=args.seed if args.seed is not None else random.randrange(2**31),
        strategy=args.strategy,
        max_examples=args.max_examples,
        eval_examples=args.eval_examples,
        target_accuracy=args.target_accuracy,
        settle_timeout_s=180.0,
    )
    folder = Path(tempfile.mkdtemp(prefix=f"fedmq-chaos-{args.transport}-"))
    print(f"run folder: {folder}", flush=True)
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still clean up the processes
    try:
        report = ChaosRun(config, folder, args.data_dir, say=lambda s: print(s, flush=True)).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not args.keep:
            with contextlib.suppress(OSError):
                shutil.rmtree(folder)
    print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

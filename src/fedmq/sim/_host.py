"""The aggregator of a benchmark run, in a process of its own.

So that its CPU time and peak memory are its own, not the fleet's: the parent
(the fleet) talks to it over a pipe. It reports a snapshot of its counters every
``snapshot_every_s``; the parent sends the start of the clock, synchronous-round
sizes, and the stop. With the embedded broker (``memory://``, in-process by
nature) the same code runs as a task of the parent and its cost is not separable.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import multiprocessing.connection
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["AggregatorHost", "HostSpec"]

Message = tuple[Any, ...]


@dataclass(frozen=True, kw_only=True)
class HostSpec:
    """What the aggregator process needs (picklable)."""

    aggregator: Any  # AggregatorConfig (kept Any: this module imports nothing heavy)
    transport: Any  # TransportConfig
    task: Callable[[], Any]  # builds the Task in the aggregator's process (picklable)
    data_dir: Path  # the task's central held-out data, if it has any, is read from here
    snapshot_every_s: float = 0.25


class _Link:
    """Messages in both directions: a pipe between processes, or queues in one loop."""

    def __init__(self, conn: multiprocessing.connection.Connection | None = None) -> None:
        self._conn = conn
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.peer: _Link | None = None
        if conn is not None:
            asyncio.get_running_loop().add_reader(conn.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._conn is not None
        try:
            while self._conn.poll():
                self._inbox.put_nowait(self._conn.recv())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self._conn.fileno())
            self._inbox.put_nowait(("eof",))

    def send(self, message: Message) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError, BrokenPipeError):
                self._conn.send(message)
        elif self.peer is not None:
            self.peer._inbox.put_nowait(message)

    async def recv(self) -> Message:
        return await self._inbox.get()

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._conn.fileno())
            self._conn.close()


def _child_main(spec: HostSpec, conn: multiprocessing.connection.Connection) -> None:
    import logging

    import torch

    from fedmq._log import configure_logging

    configure_logging(level="warning")
    logging.getLogger("fedmq.aggregator").setLevel(logging.ERROR)
    torch.set_num_threads(1)

    async def main() -> None:
        await _serve(spec, _Link(conn), separate=True)

    asyncio.run(main())


async def _serve(spec: HostSpec, link: _Link, *, separate: bool) -> None:
    from fedmq.aggregator import Aggregator, AggregatorStats
    from fedmq.aggregator.main import make_evaluator
    from fedmq.models import get_params
    from fedmq.transport import connect_aggregator

    config = spec.aggregator
    task = spec.task()
    central = task.central_data(spec.data_dir) if task.central_data else None
    evaluator = make_evaluator(config, task, central)
    eval_cpu = [0.0, 0]

    def timed_eval(params: Mapping[str, np.ndarray]) -> dict[str, float]:
        assert evaluator is not None
        start = time.thread_time()
        result = evaluator(params)
        eval_cpu[0] += time.thread_time() - start
        eval_cpu[1] += 1
        return result

    initial = get_params(task.build_model(config.seed))
    stats = AggregatorStats(target=task.target)
    cpu0 = time.process_time()
    rss0 = _rss()
    rss_peak = [rss0]
    async with connect_aggregator(spec.transport) as transport, asyncio.TaskGroup() as tg:
        aggregator = Aggregator(
            config,
            transport,
            initial,
            evaluate=timed_eval if evaluator else None,
            target=task.target,
            stats=stats,
        )
        run = tg.create_task(aggregator.run(tg), name="aggregator")
        # The first model is out once the counter moves; the service offers no event for it.
        while stats.models_published == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        link.send(("ready",))

        def snapshot(final: bool) -> Message:
            doc = _snapshot(stats, aggregator.downlink.keyframes, aggregator.downlink.deltas)
            doc["central_examples"] = len(central) if central is not None else 0
            doc["budget_spent"] = aggregator.budget_spent  # it stopped: the bench stops too
            if separate:
                rss_peak[0] = max(rss_peak[0], _rss())
                doc["cpu_s"] = time.process_time() - cpu0
                doc["eval_cpu_s"] = eval_cpu[0]
                doc["evaluations"] = eval_cpu[1]
                doc["rss_start_bytes"] = rss0
                doc["peak_rss_bytes"] = rss_peak[0]
                doc["max_rss_with_setup_bytes"] = _max_rss()
            return ("final" if final else "snapshot", doc)

        async def report() -> None:
            while True:
                await asyncio.sleep(spec.snapshot_every_s)
                link.send(snapshot(False))

        reporter = tg.create_task(report(), name="host:report")
        while True:
            message = await link.recv()
            if message[0] == "start":
                stats.started = message[1]
            elif message[0] == "round":
                aggregator.set_round(message[1], message[2])
            elif message[0] in ("stop", "eof"):
                break
        reporter.cancel()
        run.cancel()
    link.send(snapshot(True))


def _max_rss() -> int:
    """The process's peak resident memory since it started, setup included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rss() -> int:
    """Resident memory now (Linux /proc); sampled with every snapshot for the run's peak."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _snapshot(stats: Any, keyframes: int, deltas: int) -> dict[str, Any]:
    return {
        "elapsed_s": stats.elapsed_s,
        "version": stats.version,
        "received": stats.received,
        "applied": stats.applied,
        "rejected": dict(stats.rejected),
        "staleness": {int(k): int(v) for k, v in stats.staleness.items()},
        "bytes_in": stats.bytes_in,
        "bytes_out": stats.bytes_out,
        "models_published": stats.models_published,
        "keyframes": keyframes,
        "deltas": deltas,
        "buffered": stats.buffered,
        "clipped": stats.clipped,
        "robust_clipped": stats.robust_clipped,
        "privacy": stats.privacy,
        "participants": len(stats.participants),
        "eval_points": [dataclasses.asdict(p) for p in stats.evaluations],
        "eval_reports": stats.eval_reports,
        "eval_rejected": dict(stats.eval_rejected),
        "model_collapses": stats.health.collapses,
        "model_collapsing": stats.health.collapsing,
        # The devices' own reported privacy spend (DP-SGD / local DP): max, median, devices.
        "device_epsilon": stats.device_epsilon(),
    }


class AggregatorHost:
    """The parent's handle on the aggregator: ``async with``, then read ``latest``."""

    def __init__(self, spec: HostSpec, *, separate: bool) -> None:
        self._spec = spec
        self._separate = separate
        self.latest: dict[str, Any] = {}
        self.final: dict[str, Any] | None = None
        self._process: Any = None
        self._link: _Link | None = None
        self._task: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._snapshot_arrived = asyncio.Event()
        self._done = asyncio.Event()
        self.on_snapshot: Callable[[dict[str, Any]], None] | None = None

    async def __aenter__(self) -> AggregatorHost:
        if self._separate:
            context = multiprocessing.get_context("spawn")
            parent, child = context.Pipe()
            self._process = context.Process(
                target=_child_main, args=(self._spec, child), name="fedmq-bench-aggregator"
            )
            self._process.start()
            child.close()
            self._link = _Link(parent)
        else:
            self._link = _Link()
            inner = _Link()
            self._link.peer, inner.peer = inner, self._link
            self._task = asyncio.create_task(
                _serve(self._spec, inner, separate=False), name="bench:aggregator"
            )
        self._reader = asyncio.create_task(self._read(), name="bench:aggregator-link")
        ready = asyncio.create_task(self._ready.wait())
        waiters: set[asyncio.Future[Any]] = {ready, self._reader}
        if self._task is not None:
            waiters.add(self._task)
        await asyncio.wait(waiters, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        if not self._ready.is_set():
            ready.cancel()
            await self.__aexit__(None, None, None)
            raise RuntimeError("the benchmark's aggregator did not start (see its log)")
        return self

    async def _read(self) -> None:
        assert self._link is not None
        while True:
            message = await self._link.recv()
            kind = message[0]
            if kind == "ready":
                self._ready.set()
            elif kind in ("snapshot", "final"):
                self.latest = message[1]
                self._snapshot_arrived.set()
                if self.on_snapshot is not None:
                    self.on_snapshot(self.latest)
                if kind == "final":
                    self.final = message[1]
                    self._done.set()
                    return
            elif kind == "eof":
                self._done.set()
                return

    async def wait_version_above(self, version: int) -> int:
        """Wait until the aggregator reports a model version above ``version``; return it."""
        while int(self.latest.get("version", 0)) <= version:
            self._snapshot_arrived.clear()
            await self._snapshot_arrived.wait()
        return int(self.latest["version"])

    def start_clock(self, t0: float) -> None:
        assert self._link is not None
        self._link.send(("start", t0))

    def set_round(self, version: int, size: int) -> None:
        assert self._link is not None
        self._link.send(("round", version, size))

    async def stop(self) -> dict[str, Any]:
        """Stop the aggregator; its final counters (with CPU and memory if separate)."""
        if self._link is not None and not self._done.is_set():
            self._link.send(("stop",))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(60):
                    await self._done.wait()
        return self.final or self.latest

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        if self._reader is not None:
            self._reader.cancel()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                async with asyncio.timeout(30):
                    await self._task
        if self._process is not None:
            await asyncio.to_thread(self._process.join, 30)
            if self._process.is_alive():
                self._process.terminate()
                await asyncio.to_thread(self._process.join, 10)
        if self._link is not None:
            self._link.close()

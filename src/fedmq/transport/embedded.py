"""The embedded broker behind ``memory://<name>``: same semantics, no broker to install.

Used by ``fedmq demo`` and the unit tests.  Brokers live in a registry keyed by
the running event loop, then by name: every transport in one loop that names
``memory://demo`` shares one broker, and a new loop (a new ``asyncio.run``, a
new test) starts empty.  ``reset_embedded_brokers()`` empties the registry.

Semantics, per job (the same as the real brokers, minus durability):

- updates: a FIFO bounded at ``max_queued_updates`` (publishers wait while it is
  full); the aggregator gets at most ``prefetch`` unacked deliveries; deliveries
  not settled when the aggregator closes go back to the front of the queue, in
  order, marked redelivered;
- models: the latest one is retained and given at once to every new
  participant, then broadcast (each participant keeps only the newest unread);
- rejections: the newest ``max_rejected`` records, readable with
  ``EmbeddedBroker.rejected(job)`` (what an operator would inspect), each with at
  most ``REJECTED_BODY_MAX`` bytes of the body (so at most 64 MiB at the defaults);
- control commands (``publish_control``): a FIFO per job, kept until an aggregator
  takes them;
- evaluation reports (``publish_eval``): a FIFO per job of the newest 10,000, kept
  until an aggregator takes them (publishers never wait; the oldest go first).
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, Self, TypeVar

from fedmq.errors import ClosedResourceError, ConfigError, Rejection
from fedmq.transport._base import EvalReport, TransportConfig
from fedmq.transport._common import (
    Lifecycle,
    check_eval_size,
    check_participant_id,
    check_size,
    rejected_excerpt,
)
from fedmq.transport._inbox import Inbox, InboxIterator

__all__ = [
    "EmbeddedAggregator",
    "EmbeddedBroker",
    "EmbeddedParticipant",
    "RejectedRecord",
    "embedded_broker",
    "publish_control",
    "reset_embedded_brokers",
]

_MAX_CONTROLS = 1000  # commands kept for an absent aggregator (the oldest go first)
_MAX_EVALS = 10_000  # reports kept for an absent aggregator (the oldest go first), as AMQP
T = TypeVar("T")
_REGISTRY: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, EmbeddedBroker]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True, kw_only=True)
class RejectedRecord:
    """A refused update as an operator sees it."""

    reason: str
    detail: str
    participant: str | None
    body: bytes  # at most REJECTED_BODY_MAX bytes of it
    original_size: int = 0


@dataclass
class _Entry:
    seq: int
    body: bytes
    participant: str
    redelivered: bool = False


@dataclass
class _Job:
    max_queued: int
    ready: deque[_Entry] = field(default_factory=deque)
    model: bytes | None = None
    model_version: int | None = None
    subscribers: set[Inbox[bytes]] = field(default_factory=set)
    rejected: deque[RejectedRecord] = field(default_factory=deque)
    controls: deque[bytes] = field(default_factory=lambda: deque(maxlen=_MAX_CONTROLS))
    evals: deque[EvalReport] = field(default_factory=lambda: deque(maxlen=_MAX_EVALS))
    next_seq: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        await self._changed.wait()

    def requeue(self, entries: list[_Entry]) -> None:
        for entry in sorted(entries, key=lambda e: e.seq, reverse=True):
            entry.redelivered = True
            self.ready.appendleft(entry)
        self.notify()


class EmbeddedBroker:
    """One named in-process broker; get it with ``embedded_broker(name)``."""

    def __init__(self, name: str, *, max_queued_updates: int = 10_000, max_rejected: int = 1000):
        if max_queued_updates < 1 or max_rejected < 1:
            raise ConfigError("embedded broker: max_queued_updates and max_rejected must be >= 1")
        self.name = name
        self._max_queued = max_queued_updates
        self._max_rejected = max_rejected
        self._jobs: dict[str, _Job] = {}

    def _job(self, job: str) -> _Job:
        state = self._jobs.get(job)
        if state is None:
            state = self._jobs[job] = _Job(
                max_queued=self._max_queued,
                rejected=deque(maxlen=self._max_rejected),
            )
        return state

    def queued_updates(self, job: str) -> int:
        """Updates waiting for the aggregator (not counting unacked deliveries)."""
        return len(self._job(job).ready)

    def latest_model(self, job: str) -> tuple[int, bytes] | None:
        """The retained model as ``(version, body)``, if any."""
        state = self._job(job)
        if state.model is None or state.model_version is None:
            return None
        return state.model_version, state.model

    def rejected(self, job: str) -> list[RejectedRecord]:
        """The newest rejections of ``job``, oldest first."""
        return list(self._job(job).rejected)


def embedded_broker(
    name: str, *, max_queued_updates: int = 10_000, max_rejected: int = 1000
) -> EmbeddedBroker:
    """The broker called ``name`` in the running event loop, created on first use.

    The limits apply when this call creates it; later calls return it unchanged.
    """
    brokers = _REGISTRY.setdefault(asyncio.get_running_loop(), {})
    broker = brokers.get(name)
    if broker is None:
        broker = brokers[name] = EmbeddedBroker(
            name, max_queued_updates=max_queued_updates, max_rejected=max_rejected
        )
    return broker


def reset_embedded_brokers() -> None:
    """Forget every embedded broker (tests); open transports keep their old one."""
    _REGISTRY.clear()


def _broker_name(config: TransportConfig) -> str:
    if config.scheme != "memory":
        raise ConfigError(
            f"broker: the embedded transport needs memory://, got {config.redacted_url!r}"
        )
    return config.url.split("://", 1)[1].strip("/") or "default"


class _EmbeddedDelivery:
    __slots__ = ("_entry", "_owner", "_settled")

    def __init__(self, entry: _Entry, owner: EmbeddedAggregator) -> None:
        self._entry = entry
        self._owner = owner
        self._settled = False

    @property
    def body(self) -> bytes:
        return self._entry.body

    @property
    def participant_hint(self) -> str | None:
        return self._entry.participant

    @property
    def refused(self) -> Rejection | None:
        return None

    @property
    def redelivered(self) -> bool:
        return self._entry.redelivered

    def _settle(self) -> None:
        if self._settled:
            raise ClosedResourceError("delivery already acked or rejected")
        self._settled = True

    async def ack(self) -> None:
        self._settle()
        self._owner._settle(self._entry)

    async def reject(self, rejection: Rejection) -> None:
        self._settle()
        if self._owner._settle(self._entry):
            self._owner._job_state.rejected.append(
                RejectedRecord(
                    reason=rejection.reason.value,
                    detail=rejection.detail,
                    participant=self._entry.participant,
                    body=rejected_excerpt(self._entry.body),
                    original_size=len(self._entry.body),
                )
            )


class _Updates:
    """``async for`` over the job's queue, at most ``prefetch`` unacked at a time."""

    def __init__(self, owner: EmbeddedAggregator) -> None:
        self._owner = owner

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> _EmbeddedDelivery:
        owner = self._owner
        job = owner._job_state
        while True:
            if not owner._life.is_open:
                raise StopAsyncIteration
            if job.ready and len(owner._unacked) < owner._config.prefetch:
                entry = job.ready.popleft()
                owner._unacked[entry.seq] = entry
                job.notify()  # room for a waiting publisher
                return _EmbeddedDelivery(entry, owner)
            await job.changed()


class _Drain(Generic[T]):
    """``async for`` over one of the job's FIFOs (control commands, evaluation reports)
    while the aggregator is open: each item is taken as it is handed over."""

    def __init__(self, owner: EmbeddedAggregator, fifo: Callable[[_Job], deque[T]]) -> None:
        self._owner = owner
        self._fifo = fifo

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        job = self._owner._job_state
        items = self._fifo(job)
        while True:
            if not self._owner._life.is_open:
                raise StopAsyncIteration
            if items:
                return items.popleft()
            await job.changed()


class EmbeddedAggregator:
    """The aggregator's side on the embedded broker."""

    def __init__(self, config: TransportConfig) -> None:
        self._config = config
        self._name = _broker_name(config)
        self._life = Lifecycle(f"embedded aggregator job={config.job}")
        self._job: _Job | None = None
        self._unacked: dict[int, _Entry] = {}

    @property
    def _job_state(self) -> _Job:
        if self._job is None:
            raise ClosedResourceError("embedded aggregator is not open")
        return self._job

    async def __aenter__(self) -> Self:
        self._life.enter()
        self._job = embedded_broker(self._name)._job(self._config.job)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._life.close()
        if self._job is not None:
            # Like a broker seeing its consumer's channel close: unacked go back, in order.
            unacked, self._unacked = list(self._unacked.values()), {}
            self._job.requeue(unacked)

    def _settle(self, entry: _Entry) -> bool:
        """Forget an unacked entry; False if it was already returned to the queue."""
        if self._unacked.pop(entry.seq, None) is None:
            return False
        self._job_state.notify()
        return True

    def updates(self) -> _Updates:
        self._life.check_open()
        return _Updates(self)

    async def publish_model(self, body: bytes, *, version: int, keyframe: bool = True) -> None:
        self._life.check_open()
        check_size(body, self._config.max_message_bytes, "model")
        job = self._job_state
        if keyframe:  # the retained model, given to late joiners, is the last keyframe
            job.model, job.model_version = body, version
        for inbox in job.subscribers:
            inbox.put(body)

    def controls(self) -> _Drain[bytes]:
        self._life.check_open()
        return _Drain(self, lambda job: job.controls)

    def evals(self) -> _Drain[EvalReport]:
        self._life.check_open()
        return _Drain(self, lambda job: job.evals)


async def publish_control(config: TransportConfig, body: bytes) -> None:
    """An operator's command to the aggregator of ``config.job`` (kept until it takes it)."""
    check_size(body, config.max_message_bytes, "control command")
    job = embedded_broker(_broker_name(config))._job(config.job)
    job.controls.append(body)
    job.notify()


class EmbeddedParticipant:
    """A device's side on the embedded broker."""

    def __init__(self, config: TransportConfig, participant_id: str) -> None:
        self._config = config
        self._participant_id = check_participant_id(participant_id)
        self._name = _broker_name(config)
        self._life = Lifecycle(f"embedded participant {participant_id} job={config.job}")
        self._job: _Job | None = None
        self._models: Inbox[bytes] = Inbox(maxlen=1)  # latest wins

    async def __aenter__(self) -> Self:
        self._life.enter()
        job = self._job = embedded_broker(self._name)._job(self._config.job)
        job.subscribers.add(self._models)
        if job.model is not None:
            self._models.put(job.model)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._life.close()
        self._models.close()
        if self._job is not None:
            self._job.subscribers.discard(self._models)
            self._job.notify()  # wake our own publishers waiting for room

    @property
    def connected(self) -> bool:
        return self._life.is_open

    def models(self) -> InboxIterator[bytes]:
        self._life.check_open()
        return InboxIterator(self._models)

    async def publish_update(self, body: bytes) -> None:
        self._life.check_open()
        check_size(body, self._config.max_message_bytes, "update")
        assert self._job is not None
        job = self._job
        while len(job.ready) >= job.max_queued:  # bounded: wait for the aggregator
            await job.changed()
            self._life.check_open()
        job.ready.append(_Entry(seq=job.next_seq, body=body, participant=self._participant_id))
        job.next_seq += 1
        job.notify()

    async def publish_eval(self, body: bytes) -> None:
        self._life.check_open()
        check_eval_size(body)
        assert self._job is not None
        # Bounded by dropping the oldest report, never by making the device wait.
        self._job.evals.append(EvalReport(body=body, participant_hint=self._participant_id))
        self._job.notify()

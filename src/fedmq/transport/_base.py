"""The transport interface: what the aggregator and the participants need from a broker.

Two roles, one protocol each. Both are async context managers that own their
connection and its reconnection (capped exponential backoff with jitter, then
re-declare the topology and resubscribe explicitly).  Nothing above this package
imports aio-pika or aiomqtt: their exceptions are mapped to ``TransportError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from fedmq.errors import ConfigError, Reason, Rejection, WireError
from fedmq.transport._common import EVAL_MAX_BYTES, redact_url

__all__ = [
    "AggregatorTransport",
    "Delivery",
    "EvalReport",
    "ParticipantTransport",
    "TransportConfig",
]

_SCHEMES = ("amqp", "amqps", "mqtt", "mqtts", "memory")
SENDER_IDENTITIES = ("claimed", "login")


@dataclass(frozen=True, kw_only=True)
class TransportConfig:
    """Where the broker is and how to talk to it.

    ``url`` picks the implementation by scheme: ``amqp://user:pass@host:5672/vhost``,
    ``mqtt://host:1883`` or ``memory://name`` (the embedded in-process default).
    ``job`` namespaces every queue, exchange and topic, so jobs never see each
    other's traffic.
    """

    url: str
    job: str = "default"
    # Larger messages are refused with PayloadTooLarge before sending (never chunked),
    # and an aggregator refuses (too_large) larger updates as they arrive, keeping none
    # of their bytes. The CLI sets it to what the model needs (fedmq.wire.message_limit_for).
    # RabbitMQ's default max_message_size is 128 MiB; Mosquitto's packet limit is 256 MiB.
    max_message_bytes: int = 64 * 1024 * 1024
    # Unacked updates the aggregator holds at once: the AMQP consumer prefetch. MQTT 3.1.1
    # cannot ask for a window; there the broker's max_inflight_messages bounds it instead.
    prefetch: int = 32
    # Bytes of updates the aggregator may hold at once. RabbitMQ ignores basic.qos
    # prefetch_size, so the AMQP aggregator asks for fewer messages instead: at most
    # max_inflight_bytes // max_message_bytes (at least 1) of the `prefetch` window.
    max_inflight_bytes: int = 256 * 1024 * 1024
    reconnect_initial_s: float = 0.2
    reconnect_max_s: float = 10.0
    connect_timeout_s: float = 10.0
    # Long-running services (the CLI's aggregator and participant) wait for a broker
    # that is down at start, retrying with backoff; tests and the demo fail fast.
    wait_for_broker: bool = False
    # AMQP only: the broker user whose model messages participants accept. RabbitMQ
    # verifies a message's user_id against the publisher's login, but lets any user
    # with write on the default exchange (on a bare broker: everyone) append to the
    # model stream; with this set, a participant drops models whose user_id differs.
    # None accepts every model.
    model_publisher: str | None = None
    # AMQP only, the same for control commands: any user may write the control queue
    # through the default exchange; with this set (e.g. "operator"), the aggregator
    # drops commands whose user_id differs. MQTT brokers enforce it with their ACL.
    control_publisher: str | None = None
    # AMQP aggregator only: who an update is from, checked against its envelope.
    # "login": the message's user_id, which RabbitMQ verifies against the publisher's
    #   login (one broker user per device, as broker_config/ and the compose file do).
    # "claimed": the `participant` header the publisher chose; with a shared login
    #   (guest) this authenticates nothing unless updates are signed (--keys-dir).
    # Either way an update without that identity is refused (participant_mismatch).
    sender_identity: str = "claimed"

    def __post_init__(self) -> None:
        scheme = self.url.split("://", 1)[0] if "://" in self.url else ""
        if scheme not in _SCHEMES:
            raise ConfigError(
                f"broker: unsupported URL {self.redacted_url!r}; "
                f"allowed schemes: {', '.join(_SCHEMES)}"
            )
        if not self.job or not all(c.isalnum() or c in "-_" for c in self.job):
            raise ConfigError(f"job: {self.job!r} must be non-empty [A-Za-z0-9_-]")
        if self.max_message_bytes <= 0:
            raise ConfigError("max_message_bytes: must be > 0")
        if self.prefetch < 1:
            raise ConfigError("prefetch: must be >= 1")
        if self.max_inflight_bytes <= 0:
            raise ConfigError("max_inflight_bytes: must be > 0")
        if self.sender_identity not in SENDER_IDENTITIES:
            raise ConfigError(
                f"sender_identity: {self.sender_identity!r} must be one of "
                f"{', '.join(SENDER_IDENTITIES)}"
            )
        if not 0 < self.reconnect_initial_s <= self.reconnect_max_s:
            raise ConfigError("reconnect_initial_s: must be > 0 and <= reconnect_max_s")
        if self.model_publisher is not None and not self.model_publisher:
            raise ConfigError("model_publisher: must be a broker user name, or None")
        if self.control_publisher is not None and not self.control_publisher:
            raise ConfigError("control_publisher: must be a broker user name, or None")

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def redacted_url(self) -> str:
        """``url`` without its password: the only form of it a log line or report holds."""
        return redact_url(self.url)


class Delivery(Protocol):
    """One update message handed to the aggregator. Settle it exactly once."""

    @property
    def body(self) -> bytes: ...

    @property
    def participant_hint(self) -> str | None:
        """Who the broker says sent it (MQTT topic level; AMQP ``user_id`` or header, see
        ``TransportConfig.sender_identity``). None or empty: unknown, and refused."""
        ...

    @property
    def refused(self) -> Rejection | None:
        """Set when the transport already refused to hold the body (over
        ``max_message_bytes``: ``body`` is then empty); the aggregator rejects it so."""
        ...

    async def ack(self) -> None:
        """The update was applied (or is durably covered): the broker may forget it."""
        ...

    async def reject(self, rejection: Rejection) -> None:
        """The update was refused: make it visible to operators, then forget it."""
        ...


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalReport:
    """One evaluation report (a ``fedmq.eval/1`` body, signed or not) handed to the aggregator.

    Already acknowledged to the broker (at most once): there is nothing to settle.
    """

    body: bytes
    # Who the broker says sent it, exactly as ``Delivery.participant_hint`` for updates
    # (MQTT topic level; AMQP ``user_id`` or ``participant`` header as
    # ``TransportConfig.sender_identity`` says); "" when unknown. The aggregator compares
    # it with the report's ``participant`` (``participant_mismatch``).
    participant_hint: str
    # Set when the transport refused to hold the body (over
    # ``fedmq.wire.EVAL_LIMITS.max_message_bytes``: ``too_large``, and ``body`` is empty),
    # so that the aggregator counts it like any rejection.
    refused: Rejection | None = None

    @classmethod
    def received(cls, body: bytes, participant_hint: str) -> EvalReport:
        """A report as it arrives from the network: one over ``EVAL_MAX_BYTES`` is not kept."""
        if len(body) > EVAL_MAX_BYTES:
            refused = WireError(
                Reason.TOO_LARGE, f"report of {len(body)} bytes, limit {EVAL_MAX_BYTES}"
            )
            return cls(body=b"", participant_hint=participant_hint, refused=refused)
        return cls(body=body, participant_hint=participant_hint)


class AggregatorTransport(Protocol):
    """The aggregator's side: consume updates, publish models."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def updates(self) -> AsyncIterator[Delivery]:
        """Every update published to the job, across reconnects, until closed.

        A delivery not acked before a reconnect is redelivered by the broker;
        the aggregator deduplicates by (participant, sequence).
        """
        ...

    async def publish_model(self, body: bytes, *, version: int, keyframe: bool = True) -> None:
        """Publish a model so that current and late-joining participants get it.

        ``keyframe=False`` (a model delta): current subscribers get it, but where the
        broker keeps one model for late joiners (MQTT retained, embedded) the last
        keyframe stays that model. Returns once the broker has it (confirm / PUBACK);
        waits through reconnects. Raises PayloadTooLarge if body exceeds
        ``max_message_bytes``.
        """
        ...

    def controls(self) -> AsyncIterator[bytes]:
        """Operator commands sent to the job (``send_control``), across reconnects, until closed.

        Queued by the broker while the aggregator is away (durable AMQP queue, MQTT
        persistent session); acknowledged as they are handed over (at most once).
        """
        ...

    def evals(self) -> AsyncIterator[EvalReport]:
        """Every evaluation report sent to the job (``publish_eval``), across reconnects,
        until closed.

        Queued by the broker while the aggregator is away, in a bounded backlog whose
        oldest reports go first (AMQP ``x-max-length``, MQTT the persistent session's
        queue); acknowledged as they arrive (at most once: a lost report is replaced by
        the device's next one).
        """
        ...


class ParticipantTransport(Protocol):
    """A device's side: receive models, publish its own updates."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def models(self) -> AsyncIterator[bytes]:
        """Model messages: the latest one at once on (re)subscribe, then each new one.

        May repeat or reorder versions across reconnects; the caller keeps the newest.
        """
        ...

    async def publish_update(self, body: bytes) -> None:
        """Publish one update; returns once the broker confirmed it (persisted).

        Waits through reconnects. Raises PayloadTooLarge (never retried).
        """
        ...

    async def publish_eval(self, body: bytes) -> None:
        """Publish one evaluation report (a ``fedmq.eval/1`` body, signed or not).

        Returns once the broker has it (confirm / PUBACK); waits through reconnects, but
        never for room: the broker drops the oldest queued reports instead. Raises
        PayloadTooLarge (never retried) for a body over
        ``fedmq.wire.EVAL_LIMITS.max_message_bytes`` (4096).
        """
        ...

    @property
    def connected(self) -> bool:
        """Whether the connection is up right now (for progress displays)."""
        ...

"""RabbitMQ transport: aio-pika over plain ``aio_pika.connect`` with our own reconnection.

Topology of job ``<job>`` (every declare is idempotent; both roles declare what
they use, so start order does not matter):

- ``fedmq.<job>.uplink``   durable direct exchange, bound only to the updates queue
  (routing key ``fedmq.<job>.updates``) and the evals queue (``fedmq.<job>.evals``).
  Participants publish updates and evaluation reports through it, never through the
  default exchange, so a deployment can give devices write permission on this
  exchange alone (broker_config/definitions.json): write on ``amq.default`` would let
  them write into any queue, the model stream included.
- ``fedmq.<job>.updates``  classic durable queue.  Participants publish through
  the uplink, persistent, with publisher confirms and ``mandatory``, ``user_id``
  = their login; header ``participant`` carries the participant id.  The
  aggregator consumes with ``prefetch`` (fewer if ``max_inflight_bytes`` says so)
  and manual acks; the sender is ``user_id`` or the header (``sender_identity``).
- ``fedmq.<job>.rejected`` classic durable queue (declared by the aggregator with
  ``x-max-length-bytes``, oldest dropped first): refused updates, the first
  ``REJECTED_BODY_MAX`` bytes of the body, headers ``reason``, ``detail``,
  ``participant``, ``original-size`` (and ``truncated`` when cut).
- ``fedmq.<job>.models``   stream queue.  The aggregator appends each model
  (confirmed, header ``version``); each participant consumes it from
  ``x-stream-offset: last`` on every (re)connect, so a late joiner gets the
  current model at once.
- ``fedmq.<job>.control``  classic durable queue: operator commands
  (``publish_control``, persistent, confirmed), consumed by the aggregator with
  automatic acks; with ``control_publisher`` set, those of another user are dropped.
- ``fedmq.<job>.evals``    classic durable queue, ``x-max-length`` 10,000 and
  ``x-max-length-bytes`` 32 MiB with ``x-overflow: drop-head`` (a full queue drops its
  oldest report, never nacks a device).  Participants publish evaluation reports
  through the uplink, exactly as updates (persistent, confirmed, ``mandatory``,
  ``user_id``, header ``participant``); a report no queue takes (an aggregator that
  never declared the queue) is dropped with a warning.  The aggregator consumes with
  automatic acks; the sender is found as for updates (``sender_identity``).  Both
  roles declare it if they may; neither needs it to run.

Besides ``x-queue-type``, only the rejected and evals queues' bounds are queue
arguments (so that a bare broker bounds them too; broker_config/definitions.json
declares the same): other lengths, retention and dead-lettering are operator policies,
because arguments are immutable and every client's redeclare must match them.

aio-pika's ``connect_robust`` is deliberately not used (house style): see
``_session.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import (
    AMQPError,
    AuthenticationError,
    ChannelInvalidStateError,
    ChannelPreconditionFailed,
    DeliveryError,
    ProbableAuthenticationError,
    PublishError,
)
from aiormq.exceptions import ChannelAccessRefused, ChannelNotFoundEntity
from pamqp.exceptions import PAMQPException

from fedmq.errors import (
    BrokerUnavailable,
    ClosedResourceError,
    ConfigError,
    PayloadTooLarge,
    Reason,
    RejectedUpdate,
    Rejection,
    TransportError,
)
from fedmq.transport._backoff import Backoff
from fedmq.transport._base import EvalReport, TransportConfig
from fedmq.transport._common import (
    LOG,
    check_eval_size,
    check_participant_id,
    check_size,
    redact_url,
    rejected_excerpt,
)
from fedmq.transport._inbox import Inbox, InboxIterator
from fedmq.transport._session import Session, SessionLost, SupervisedTransport

__all__ = [
    "DEAD_LETTER_EXCHANGE",
    "EVALS_ARGUMENTS",
    "AmqpAggregator",
    "AmqpNames",
    "AmqpParticipant",
    "amqp_names",
    "publish_control",
]

# Every error that means "this connection or channel is broken": retry on the next session.
_BROKER_ERRORS: tuple[type[BaseException], ...] = (
    AMQPError,
    ChannelInvalidStateError,
    PAMQPException,
    OSError,
    TimeoutError,
)
_REJECT_ERRORS: tuple[type[BaseException], ...] = (SessionLost, PayloadTooLarge, *_BROKER_ERRORS)
DEAD_LETTER_EXCHANGE = "fedmq.dlx"  # broker_config/definitions.json's, if the broker has it
_DROPPED_LOG_EVERY_S = 60.0
_MODELS_PREFETCH = 2  # stream consumers need a prefetch (it is their credit)
_DETAIL_MAX = 1000  # characters of a rejection's detail kept in its header
_CLOSE_TIMEOUT_S = 5.0
_MAX_CONTROLS = 1000  # commands buffered for the aggregator (the oldest go first)
_MAX_EVALS = 10_000  # reports buffered for the aggregator (the oldest go first)


@dataclass(frozen=True)
class AmqpNames:
    """Queue names of one job."""

    updates: str
    rejected: str
    models: str
    control: str
    evals: str
    uplink: str  # the exchange updates and reports are published to (bound to those two)


def amqp_names(job: str) -> AmqpNames:
    """The queues of ``job`` (for operators and tests that inspect or delete them)."""
    return AmqpNames(
        updates=f"fedmq.{job}.updates",
        rejected=f"fedmq.{job}.rejected",
        models=f"fedmq.{job}.models",
        control=f"fedmq.{job}.control",
        evals=f"fedmq.{job}.evals",
        uplink=f"fedmq.{job}.uplink",
    )


# Queue arguments are immutable and must match on every redeclare, so only what cannot
# be a policy is set here: the stream type. Limits (length, retention, dead-lettering)
# belong to operator policies (broker_config/definitions.json, docs/transports.md).
_STREAM: dict[str, Any] = {"x-queue-type": "stream"}
# The exception: the rejected queue's bytes, so that a flood of refused messages cannot
# fill a bare broker's disk (drop-head: the newest records are kept). The deployment's
# definitions.json declares fedmq.default.rejected with exactly this argument.
REJECTED_MAX_BYTES = 256 * 1024 * 1024
_REJECTED: dict[str, Any] = {"x-max-length-bytes": REJECTED_MAX_BYTES}
# And the evals queue's: reports are small and lossy-tolerant, so a flood (or an aggregator
# long away) drops the oldest instead of growing the queue or nacking devices. 10,000 is
# the aggregator's default max_devices (one latest report each); 32 MiB holds 10,000
# legal reports (under 1.5 KiB signed) with room, and bounds a flood of junk up to the
# broker's max_message_size. definitions.json declares fedmq.default.evals with these.
EVALS_ARGUMENTS: dict[str, Any] = {
    "x-max-length": 10_000,
    "x-max-length-bytes": 32 * 1024 * 1024,
    "x-overflow": "drop-head",
}


def _is_fatal(exc: BaseException) -> bool:
    """Errors not worth retrying on the very first connect (bad credentials)."""
    return isinstance(exc, AuthenticationError | ProbableAuthenticationError)


def _too_large(exc: BaseException) -> bool:
    # RabbitMQ closes the channel with 406 "message size N is larger than configured max size M".
    return isinstance(exc, ChannelPreconditionFailed) and "max size" in str(exc)


class _AmqpSession(Session):
    def __init__(
        self,
        label: str,
        connection: AbstractConnection,
        publish: AbstractChannel,
        config: TransportConfig,
    ) -> None:
        super().__init__(label)
        self.connection = connection
        self.publish_channel = publish
        self._config = config
        # RabbitMQ checks user_id against the login, so consumers can trust it (model
        # publisher, update sender). Only set with an explicit user: EXTERNAL (certificate)
        # logins have none in the URL, and a wrong user_id would be refused.
        username = urlsplit(config.url).username
        self._user_id = unquote(username) if username else None

    async def publish(
        self,
        body: bytes,
        *,
        routing_key: str,
        headers: dict[str, Any],
        what: str,
        exchange: str = "",
        drop_unroutable: bool = False,
    ) -> None:
        """Persistent, mandatory, confirmed publish (through the default exchange unless
        ``exchange`` names another). A message no queue takes is returned: that raises
        (the reconnect redeclares the queue), or with ``drop_unroutable`` is logged and
        dropped."""
        target = (
            self.publish_channel.default_exchange
            if not exchange
            else await self.publish_channel.get_exchange(exchange, ensure=False)
        )
        message = aio_pika.Message(
            body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=headers,
            user_id=self._user_id,
        )
        nacks = Backoff(
            initial_s=self._config.reconnect_initial_s, max_s=self._config.reconnect_max_s
        )
        while True:
            try:
                await target.publish(message, routing_key=routing_key, mandatory=True)
                return
            except ChannelPreconditionFailed as exc:
                if _too_large(exc):
                    raise PayloadTooLarge(
                        f"RabbitMQ refused the {what} of {len(body)} bytes: {exc}; "
                        "lower max_message_bytes or raise RabbitMQ's max_message_size"
                    ) from exc
                raise
            except DeliveryError as exc:
                if isinstance(exc, PublishError):
                    if drop_unroutable:
                        LOG.warning(
                            "%s: no queue is bound for the %s (routing key %s); dropped",
                            self.label,
                            what,
                            routing_key,
                        )
                        return
                    raise  # returned unroutable: the queue is gone; reconnect redeclares it
                # Nacked, e.g. a full queue with overflow=reject-publish: the connection is
                # fine, so wait and try again on it rather than reconnecting.
                delay = nacks.next_delay()
                LOG.info(
                    "%s: broker nacked the %s (%s); retrying in %.2f s",
                    self.label,
                    what,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)


def _track(session: Session, *closables: AbstractConnection | AbstractChannel) -> None:
    """Lose the session when its connection or any of its channels closes."""

    def on_close(_sender: object, exc: BaseException | None = None) -> None:
        session.lose(exc if exc is not None else aiormq.exceptions.ConnectionClosed())

    for closable in closables:
        closable.close_callbacks.add(on_close)


async def _connect(config: TransportConfig, name: str) -> AbstractConnection:
    return await aio_pika.connect(
        config.url,
        timeout=config.connect_timeout_s,
        client_properties={"connection_name": name},
    )


async def _close_quietly(connection: AbstractConnection) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(_CLOSE_TIMEOUT_S):
            await connection.close()


async def _declare(
    connection: AbstractConnection,
    name: str,
    arguments: dict[str, Any] | None = None,
) -> None:
    """Declare a durable queue, idempotently, on a scratch channel.

    Falls back to a passive declare (the queue must exist) when the queue exists
    with other arguments, or when this user may not configure queues (devices in
    broker_config/definitions.json); a missing queue then fails this connection
    attempt and the supervisor retries until the aggregator has declared it.
    """
    channel = await connection.channel(publisher_confirms=False)
    try:
        try:
            await channel.declare_queue(name, durable=True, arguments=arguments)
            return
        except ChannelPreconditionFailed as exc:
            LOG.warning(
                "amqp: queue %s exists with other arguments; using it as is (%s)", name, exc
            )
        except ChannelAccessRefused:
            LOG.debug("amqp: no configure permission on %s; checking that it exists", name)
        # The broker closed that channel; look on a fresh one.
        channel = await connection.channel(publisher_confirms=False)
        await channel.declare_queue(name, passive=True)
    finally:
        if not channel.is_closed:
            await channel.close()


async def _declare_optional(
    connection: AbstractConnection, name: str, arguments: dict[str, Any] | None, lost: str
) -> bool:
    """Declare a queue this role can do without; False (``lost`` is unavailable, logged)
    if this user may not declare it and it does not exist."""
    try:
        await _declare(connection, name, arguments)
    except (ChannelAccessRefused, ChannelNotFoundEntity) as exc:
        LOG.warning("amqp: no queue %s (%s): %s is unavailable", name, exc, lost)
        return False
    return True


async def _declare_uplink(connection: AbstractConnection, names: AmqpNames, *, evals: bool) -> None:
    """Declare the uplink exchange and bind it to the updates queue (and, with ``evals``,
    the evals queue), each with its own name as routing key, idempotently.

    Falls back to checking that the exchange exists when this user may not (devices of
    broker_config/definitions.json); a missing exchange then fails this connection
    attempt and the supervisor retries until the aggregator has declared it.
    """
    channel = await connection.channel(publisher_confirms=False)
    try:
        try:
            exchange = await channel.declare_exchange(
                names.uplink, aio_pika.ExchangeType.DIRECT, durable=True
            )
            for name in (names.updates, names.evals) if evals else (names.updates,):
                queue = await channel.get_queue(name, ensure=False)
                await queue.bind(exchange, routing_key=name)
            return
        except ChannelAccessRefused:
            LOG.debug("amqp: may not declare or bind %s; checking that it exists", names.uplink)
        channel = await connection.channel(publisher_confirms=False)
        await channel.declare_exchange(names.uplink, passive=True)
    finally:
        if not channel.is_closed:
            await channel.close()


async def _bind_dead_letters(connection: AbstractConnection, names: AmqpNames) -> None:
    """If the deployment has the ``fedmq.dlx`` exchange, route this job's dead letters
    (what the broker itself dead-letters from the updates queue) to the rejected queue."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        exchange = await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=True)
        queue = await channel.get_queue(names.rejected, ensure=False)
        await queue.bind(exchange, routing_key=names.updates)
    except ChannelNotFoundEntity:
        pass  # a bare broker: no dead-lettering configured
    except ChannelAccessRefused as exc:
        LOG.warning("amqp: cannot bind %s to %s (%s)", names.rejected, DEAD_LETTER_EXCHANGE, exc)
    finally:
        if not channel.is_closed:
            await channel.close()


def _header_str(headers: dict[str, Any], key: str) -> str | None:
    value = headers.get(key)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _sender(message: AbstractIncomingMessage, config: TransportConfig) -> str:
    """Who sent an update or a report: the broker-verified ``user_id`` or the claimed
    ``participant`` header, as ``config.sender_identity`` says; "" when it has none."""
    if config.sender_identity == "login":
        return message.user_id or ""
    return _header_str(dict(message.headers), "participant") or ""


class _AmqpDelivery:
    """One update from the updates queue; settled on the channel it arrived on.

    Its sender is the broker-verified ``user_id`` or the claimed ``participant`` header,
    as ``TransportConfig.sender_identity`` says; "" when the message has none (refused).
    A body over ``max_message_bytes`` is dropped at once: only its size is kept.
    """

    __slots__ = (
        "_message",
        "_refused",
        "_rejected_queue",
        "_sender",
        "_session",
        "_settled",
        "_size",
    )

    def __init__(
        self,
        message: AbstractIncomingMessage,
        session: _AmqpSession,
        rejected_queue: str,
        config: TransportConfig,
    ) -> None:
        self._message = message
        self._session = session
        self._rejected_queue = rejected_queue
        self._settled = False
        self._sender = _sender(message, config)
        self._size = len(message.body)
        self._refused: Rejection | None = None
        if self._size > config.max_message_bytes:
            self._refused = RejectedUpdate(
                Reason.TOO_LARGE,
                f"message of {self._size} bytes, limit {config.max_message_bytes}",
            )
            # Hold none of it until the aggregator gets to it: refused messages must not
            # add up in memory (settling needs only the delivery tag).
            cast(aio_pika.IncomingMessage, message).body = b""

    @property
    def body(self) -> bytes:
        return self._message.body

    @property
    def participant_hint(self) -> str:
        return self._sender

    @property
    def refused(self) -> Rejection | None:
        return self._refused

    @property
    def stale(self) -> bool:
        """Its channel died: the broker has requeued it and will redeliver it."""
        return self._session.is_lost

    def _settle(self) -> None:
        if self._settled:
            raise ClosedResourceError("delivery already acked or rejected")
        self._settled = True

    async def ack(self) -> None:
        self._settle()
        if self.stale:
            LOG.debug("amqp: ack of a delivery from a lost connection ignored (redelivered)")
            return
        try:
            await self._message.ack()
        except _BROKER_ERRORS as exc:
            # The channel died under us: the broker requeues the message and the
            # aggregator will deduplicate the redelivery. Not an error for the caller.
            LOG.info("amqp: ack failed (%r); the broker will redeliver", exc)
            self._session.lose(exc)

    async def reject(self, rejection: Rejection) -> None:
        self._settle()
        if self.stale:
            LOG.debug("amqp: reject of a delivery from a lost connection ignored (redelivered)")
            return
        headers: dict[str, Any] = {
            "reason": rejection.reason.value,
            "detail": rejection.detail[:_DETAIL_MAX],
            "participant": self._sender,
            "original-size": self._size,
        }
        if self._message.user_id:  # the sender's broker-verified login
            headers["original-user-id"] = self._message.user_id
        excerpt = rejected_excerpt(self.body)
        if len(excerpt) < self._size:
            headers["truncated"] = True
        try:
            # Copy first, then settle: a crash in between duplicates the record, never loses it.
            await self._session.guard(
                self._session.publish(
                    excerpt, routing_key=self._rejected_queue, headers=headers, what="rejection"
                )
            )
            await self._message.ack()
        except _REJECT_ERRORS as exc:
            LOG.info("amqp: reject failed (%r); the broker will redeliver", exc)
            self._session.lose(exc)


class _AmqpBase(SupervisedTransport[_AmqpSession]):
    _expected_errors = _BROKER_ERRORS

    def __init__(self, config: TransportConfig, role: str, client_name: str) -> None:
        if config.scheme not in ("amqp", "amqps"):
            raise ConfigError(f"AMQP transport needs an amqp:// URL, got {redact_url(config.url)}")
        self._init_lifecycle(config, f"amqp {role} job={config.job}")
        self._names = amqp_names(config.job)
        self._client_name = client_name

    def _is_fatal(self, exc: BaseException) -> bool:
        return _is_fatal(exc)

    async def _serve(self, up: Callable[[_AmqpSession], None]) -> None:
        connection = await _connect(self._config, self._client_name)
        try:
            session = await self._open(connection)
            up(session)
            await session.wait_lost()
        finally:
            await _close_quietly(connection)

    async def _open(self, connection: AbstractConnection) -> _AmqpSession:
        raise NotImplementedError

    async def _publish(
        self,
        body: bytes,
        *,
        routing_key: str,
        headers: dict[str, Any],
        what: str,
        exchange: str = "",
        drop_unroutable: bool = False,
    ) -> None:
        self._life.check_open()
        check_size(body, self._config.max_message_bytes, what)
        assert self._supervisor is not None

        async def op(session: _AmqpSession) -> None:
            await session.publish(
                body,
                routing_key=routing_key,
                headers=headers,
                what=what,
                exchange=exchange,
                drop_unroutable=drop_unroutable,
            )

        await self._supervisor.call(op, what=f"publish {what}", retryable=_BROKER_ERRORS)


class AmqpAggregator(_AmqpBase):
    """The aggregator's side on RabbitMQ: consume updates, append models to the stream."""

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config, "aggregator", f"fedmq-{config.job}-aggregator")
        # RabbitMQ does not implement basic.qos prefetch_size, so the byte bound is a
        # message count: this many at the largest accepted size fit max_inflight_bytes.
        # Larger messages arrive whole (up to the broker's max_message_size) but are
        # dropped as they arrive (_AmqpDelivery), so they never accumulate.
        self._prefetch = max(
            1, min(config.prefetch, config.max_inflight_bytes // config.max_message_bytes)
        )
        if self._prefetch < config.prefetch:
            LOG.info(
                "%s: prefetch %d instead of %d: max_inflight_bytes=%d / max_message_bytes=%d",
                self._label,
                self._prefetch,
                config.prefetch,
                config.max_inflight_bytes,
                config.max_message_bytes,
            )
        # Unbounded on purpose: the broker never has more than that many unacked
        # deliveries out per channel, so this holds at most that many live ones.
        self._inbox: Inbox[_AmqpDelivery] = Inbox()
        self._controls: Inbox[bytes] = Inbox(maxlen=_MAX_CONTROLS)
        self._evals: Inbox[EvalReport] = Inbox(maxlen=_MAX_EVALS)
        self.controls_dropped = 0  # commands of another user than control_publisher
        self._dropped_logged_at = -float("inf")

    def _close_inbox(self) -> None:
        self._inbox.close()
        self._controls.close()
        self._evals.close()

    async def _open(self, connection: AbstractConnection) -> _AmqpSession:
        names, config = self._names, self._config
        await _declare(connection, names.updates)
        await _declare(connection, names.rejected, _REJECTED)
        await _declare(connection, names.models, _STREAM)
        evals = await _declare_optional(
            connection, names.evals, EVALS_ARGUMENTS, "federated evaluation"
        )
        await _declare_uplink(connection, names, evals=evals)
        await _bind_dead_letters(connection, names)
        publish = await connection.channel(publisher_confirms=True, on_return_raises=True)
        consume = await connection.channel(publisher_confirms=False)
        session = _AmqpSession(self._label, connection, publish, self._config)
        _track(session, connection, publish, consume)
        await consume.set_qos(prefetch_count=self._prefetch)
        queue = await consume.get_queue(names.updates, ensure=False)

        async def on_update(message: AbstractIncomingMessage) -> None:
            self._inbox.put(_AmqpDelivery(message, session, names.rejected, config))

        # Deliveries of the previous connection were requeued by the broker; drop our copies.
        self._inbox.drop_where(lambda d: d.stale)
        await queue.consume(on_update, no_ack=False)
        if await _declare_optional(connection, names.control, None, "live tuning"):
            control = await consume.get_queue(names.control, ensure=False)
            await control.consume(self._on_control, no_ack=True)
        if evals:

            async def on_eval(message: AbstractIncomingMessage) -> None:
                self._evals.put(EvalReport.received(message.body, _sender(message, config)))

            # Automatic acks: at most once, and the broker's backlog moves into the
            # bounded inbox (oldest dropped) instead of waiting for credit.
            reports = await consume.get_queue(names.evals, ensure=False)
            await reports.consume(on_eval, no_ack=True)
        return session

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        publisher = self._config.control_publisher
        if publisher is not None and message.user_id != publisher:
            self.controls_dropped += 1
            now = time.monotonic()
            if now - self._dropped_logged_at >= _DROPPED_LOG_EVERY_S:  # a flood: one line a minute
                self._dropped_logged_at = now
                LOG.warning(
                    "%s: dropped a control command published by user %r, not %r (%d so far)",
                    self._label,
                    message.user_id,
                    publisher,
                    self.controls_dropped,
                )
            return
        self._controls.put(message.body)

    def controls(self) -> InboxIterator[bytes]:
        """Operator commands from ``fedmq.<job>.control``, across reconnects, until closed."""
        self._life.check_open()
        return InboxIterator(self._controls)

    def evals(self) -> InboxIterator[EvalReport]:
        """Evaluation reports from ``fedmq.<job>.evals``, across reconnects, until closed."""
        self._life.check_open()
        return InboxIterator(self._evals)

    def updates(self) -> InboxIterator[_AmqpDelivery]:
        """Every update, across reconnects, until closed; stale deliveries are skipped."""
        self._life.check_open()
        return InboxIterator(self._inbox, skip=lambda d: d.stale)

    async def publish_model(self, body: bytes, *, version: int, keyframe: bool = True) -> None:
        # The stream keeps keyframes and deltas alike; a late joiner skips deltas it
        # cannot apply until the next keyframe.
        await self._publish(
            body, routing_key=self._names.models, headers={"version": version}, what="model"
        )


async def publish_control(config: TransportConfig, body: bytes) -> None:
    """Send one operator command to the aggregator of ``config.job`` (persistent, confirmed).

    One short connection, no retries: BrokerUnavailable or TransportError tell the
    operator at once. The queue is declared if this user may (the operator of
    broker_config/definitions.json may), else it must exist.
    """
    check_size(body, config.max_message_bytes, "control command")
    label = f"amqp operator job={config.job}"
    try:
        connection = await _connect(config, f"fedmq-{config.job}-operator")
    except _BROKER_ERRORS as exc:
        if _is_fatal(exc):
            raise TransportError(f"{label}: {redact_url(config.url)} refused us: {exc!r}") from exc
        raise BrokerUnavailable(f"{label}: cannot reach {redact_url(config.url)}: {exc!r}") from exc
    try:
        name = amqp_names(config.job).control
        await _declare(connection, name)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        session = _AmqpSession(label, connection, channel, config)
        await session.publish(body, routing_key=name, headers={}, what="control command")
    except _BROKER_ERRORS as exc:
        raise TransportError(f"{label}: sending the command failed: {exc!r}") from exc
    finally:
        await _close_quietly(connection)


class AmqpParticipant(_AmqpBase):
    """A device's side on RabbitMQ: read models from the stream, publish confirmed updates."""

    def __init__(self, config: TransportConfig, participant_id: str) -> None:
        self._participant_id = check_participant_id(participant_id)
        super().__init__(
            config, f"participant {participant_id}", f"fedmq-{config.job}-p-{participant_id}"
        )
        # Latest wins: a participant only needs the newest model; older ones are dropped.
        self._models: Inbox[bytes] = Inbox(maxlen=1)

    def _close_inbox(self) -> None:
        self._models.close()

    async def _open(self, connection: AbstractConnection) -> _AmqpSession:
        names = self._names
        await _declare(connection, names.updates)
        await _declare(connection, names.models, _STREAM)
        # Without it (an aggregator that never declared it, and no right to) reports are
        # returned unroutable and dropped; updates and models work all the same.
        evals = await _declare_optional(
            connection, names.evals, EVALS_ARGUMENTS, "sending evaluation reports"
        )
        await _declare_uplink(connection, names, evals=evals)
        publish = await connection.channel(publisher_confirms=True, on_return_raises=True)
        consume = await connection.channel(publisher_confirms=False)
        session = _AmqpSession(self._label, connection, publish, self._config)
        _track(session, connection, publish, consume)
        await consume.set_qos(prefetch_count=_MODELS_PREFETCH)
        stream = await consume.get_queue(names.models, ensure=False)

        publisher = self._config.model_publisher

        async def on_model(message: AbstractIncomingMessage) -> None:
            # Stream acks only return credit; the model is safe in the stream regardless.
            with contextlib.suppress(*_BROKER_ERRORS):
                await message.ack()
            if publisher is not None and message.user_id != publisher:
                LOG.warning(
                    "%s: dropped a model published by user %r, not %r",
                    self._label,
                    message.user_id,
                    publisher,
                )
                return
            self._models.put(message.body)

        # "last": start at the last chunk, so the current model arrives at once
        # (possibly after a few older ones of the same chunk).
        await stream.consume(on_model, no_ack=False, arguments={"x-stream-offset": "last"})
        return session

    def models(self) -> InboxIterator[bytes]:
        """The current model at once, then each new one (latest wins if the reader lags)."""
        self._life.check_open()
        return InboxIterator(self._models)

    async def publish_update(self, body: bytes) -> None:
        await self._publish(
            body,
            routing_key=self._names.updates,
            headers={"participant": self._participant_id},
            what="update",
            exchange=self._names.uplink,
        )

    async def publish_eval(self, body: bytes) -> None:
        self._life.check_open()
        check_eval_size(body)
        await self._publish(
            body,
            routing_key=self._names.evals,
            headers={"participant": self._participant_id},
            what="eval report",
            exchange=self._names.uplink,
            drop_unroutable=True,  # lossy-tolerant: never hold a device up for a missing queue
        )

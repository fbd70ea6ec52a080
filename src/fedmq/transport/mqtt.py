"""MQTT transport: aiomqtt 2.x (MQTT 3.1.1) with our own reconnection and manual acks.

Topics of job ``<job>``:

- ``fedmq/<job>/updates/<participant>``  QoS 1.  The aggregator subscribes
  ``fedmq/<job>/updates/+`` at QoS 1 with a persistent session (client id
  ``fedmq-<job>-aggregator``, clean_session=False), so updates wait at the
  broker while it is away, and PUBACKs only after ``Delivery.ack()``.
- ``fedmq/<job>/model``  retained, QoS 1, published by the aggregator.
  Participants subscribe at QoS 1 with clean sessions (client id
  ``fedmq-<job>-p-<participant>``): nothing is queued for a device while it is
  away, and on each (re)subscribe it gets the retained model (the last keyframe)
  at once, then the models published after it.
- ``fedmq/<job>/rejected``  QoS 1, JSON ``{reason, detail, participant, size}``.
- ``fedmq/<job>/control``  QoS 1, operator commands (``publish_control``; only the
  operator may write it, by the broker's ACL); the aggregator subscribes on the
  same persistent session and acknowledges each one as it takes it.
- ``fedmq/<job>/evals/<participant>``  QoS 1, evaluation reports (``publish_eval``).
  The aggregator subscribes ``fedmq/<job>/evals/+`` on the same persistent session,
  PUBACKs each report as it arrives (at most once), and takes the topic level as
  the sender, as for updates.

One connection per transport object carries both its subscription and its
publishes; every connection has ``TCP_NODELAY`` set (Nagle's algorithm would hold
each small PUBACK back behind the peer's delayed ACK, about 40 ms).  Each
connection attempt builds a fresh ``aiomqtt.Client`` inside the backoff loop
(aiomqtt's documented reconnection pattern) and resubscribes explicitly; the
iterators handed to callers read from an inbox that outlives connections.

An update over ``max_message_bytes`` is dropped as it arrives and handed on as a
refusal (``Delivery.refused``, ``too_large``), so the aggregator holds at most the
broker's in-flight window (``max_inflight_messages``) of bodies within the limit.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import socket
import ssl
from collections.abc import Callable
from urllib.parse import SplitResult, unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from fedmq.errors import (
    BrokerUnavailable,
    ClosedResourceError,
    ConfigError,
    Reason,
    Rejection,
    TransportError,
    WireError,
)
from fedmq.transport._base import EvalReport, TransportConfig
from fedmq.transport._common import (
    LOG,
    check_eval_size,
    check_participant_id,
    check_size,
    redact_url,
)
from fedmq.transport._inbox import Inbox, InboxIterator
from fedmq.transport._session import Session, SupervisedTransport

__all__ = [
    "MqttAggregator",
    "MqttParticipant",
    "MqttTopics",
    "SubscriptionRefused",
    "mqtt_topics",
    "publish_control",
]

_BROKER_ERRORS: tuple[type[BaseException], ...] = (aiomqtt.MqttError, OSError, TimeoutError)
_KEEPALIVE_S = 30
_MQTT_MAX_REMAINING = 268_435_455  # the protocol's largest packet body
_DETAIL_MAX = 1000
_MAX_CONTROLS = 1000  # commands buffered for the aggregator (the oldest go first)
_MAX_EVALS = 10_000  # reports buffered for the aggregator (the oldest go first)
_REFUSED_CODES = {4, 5, 134, 135}  # CONNACK: bad username/password, not authorised (3.1.1 / 5)
# Every broker connection: a PUBACK or a small publish goes out at once instead of
# waiting (Nagle) for the ACK of the previous one, which the peer delays ~40 ms.
_SOCKET_OPTIONS = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


class MqttTopics:
    """Topic names of one job."""

    def __init__(self, job: str) -> None:
        self.updates_filter = f"fedmq/{job}/updates/+"
        self.evals_filter = f"fedmq/{job}/evals/+"
        self.model = f"fedmq/{job}/model"
        self.rejected = f"fedmq/{job}/rejected"
        self.control = f"fedmq/{job}/control"
        self._updates_prefix = f"fedmq/{job}/updates/"
        self._evals_prefix = f"fedmq/{job}/evals/"

    def updates(self, participant_id: str) -> str:
        return self._updates_prefix + participant_id

    def evals(self, participant_id: str) -> str:
        return self._evals_prefix + participant_id

    def participant_of(self, topic: str) -> str:
        """The part of an update topic after ``fedmq/<job>/updates/`` ("" if empty)."""
        return topic.removeprefix(self._updates_prefix)

    def eval_participant_of(self, topic: str) -> str | None:
        """The part of a report topic after ``fedmq/<job>/evals/`` ("" if empty); None
        for a topic that is not a report's."""
        if not topic.startswith(self._evals_prefix):
            return None
        return topic.removeprefix(self._evals_prefix)


def mqtt_topics(job: str) -> MqttTopics:
    """The topics of ``job`` (for operators and tests)."""
    return MqttTopics(job)


def _is_fatal(exc: BaseException) -> bool:
    if isinstance(exc, SubscriptionRefused):
        return True
    if not isinstance(exc, MqttConnectError):
        return False
    return getattr(exc.rc, "value", exc.rc) in _REFUSED_CODES


class SubscriptionRefused(aiomqtt.MqttError):
    """The broker refused our subscription (ACL): no point in pretending to consume."""


def _check_granted(topic: str, granted: tuple[int, ...] | list[ReasonCode]) -> None:
    codes = [code.value if isinstance(code, ReasonCode) else code for code in granted]
    if not codes or any(code >= 0x80 for code in codes):
        raise SubscriptionRefused(f"broker refused the subscription to {topic!r}: {codes}")
    if min(codes) < 1:
        # At QoS 0 nothing is queued or redelivered: fedmq's guarantees do not hold.
        LOG.warning("mqtt: broker downgraded %r to QoS %d (its max_qos?)", topic, min(codes))


def _limit(config: TransportConfig, topic: str) -> int:
    # PUBLISH body = 2-byte topic length + topic + 2-byte packet id + payload.
    return min(config.max_message_bytes, _MQTT_MAX_REMAINING - 4 - len(topic.encode()))


def _broker(url: str) -> SplitResult:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"broker: MQTT transport needs an mqtt:// URL, got {parts.scheme}")
    return parts


def _client(
    broker: SplitResult,
    *,
    identifier: str,
    clean_session: bool,
    timeout: float,
    queue_type: type[asyncio.Queue[aiomqtt.Message]] | None = None,
    max_queued: int | None = None,
) -> aiomqtt.Client:
    """One connection's client; every role's goes through here (TLS, TCP_NODELAY)."""
    tls = broker.scheme == "mqtts"
    return aiomqtt.Client(
        broker.hostname or "127.0.0.1",
        broker.port or (8883 if tls else 1883),
        username=unquote(broker.username) if broker.username else None,
        password=unquote(broker.password) if broker.password else None,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=clean_session,
        timeout=timeout,
        keepalive=_KEEPALIVE_S,
        queue_type=queue_type,
        max_queued_incoming_messages=max_queued,
        tls_context=ssl.create_default_context() if tls else None,
        # Set by aiomqtt on the connected socket (TLS or not).
        socket_options=_SOCKET_OPTIONS,
    )


class _LatestQueue(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's incoming queue for participants: when full, drop the OLDEST message.

    aiomqtt's own ``max_queued_incoming_messages`` discards the newest message
    when full, which for models would keep a stale one.
    """

    def put_nowait(self, item: aiomqtt.Message) -> None:
        if self.full():
            self.get_nowait()
        super().put_nowait(item)


class _MqttSession(Session):
    def __init__(self, label: str, client: aiomqtt.Client) -> None:
        super().__init__(label)
        self.client = client

    def publish_now(self, topic: str, body: bytes) -> bool:
        """Queue a QoS 1 publish on this connection, ahead of anything sent after it.

        Needs paho's in-flight limit off (``max_inflight_messages=0``), or paho would
        hold the message back while later packets (a PUBACK) go out.
        """
        rc = self.client._client.publish(topic, body, qos=1).rc
        if rc != paho.MQTT_ERR_SUCCESS:
            LOG.info("%s: publish to %s not sent (rc=%s)", self.label, topic, rc)
            self.lose(aiomqtt.MqttCodeError(rc, "could not publish"))
            return False
        return True

    def puback(self, mid: int, qos: int) -> None:
        # aiomqtt has no manual-ack API; its paho client has (paho 2.x ack()).
        rc = self.client._client.ack(mid, qos)
        if rc != paho.MQTT_ERR_SUCCESS:
            # The socket is gone; the broker redelivers on reconnect (same client id).
            LOG.info("%s: PUBACK mid=%d not sent (rc=%s)", self.label, mid, rc)
            self.lose(aiomqtt.MqttCodeError(rc, "could not send PUBACK"))


class _MqttDelivery:
    """One update, acknowledged (PUBACK) on the connection it arrived on, only when settled.

    A body over ``limit`` bytes is dropped on arrival (``refused`` says why), so a flood
    of huge messages never sits in memory waiting for the aggregator.
    """

    __slots__ = (
        "_body",
        "_mid",
        "_qos",
        "_rejected_topic",
        "_session",
        "_settled",
        "_size",
        "participant_hint",
        "refused",
    )

    def __init__(
        self, message: aiomqtt.Message, session: _MqttSession, topics: MqttTopics, limit: int
    ) -> None:
        self._mid, self._qos = message.mid, message.qos
        self._session = session
        self._rejected_topic = topics.rejected
        self._settled = False
        # The topic level after ``updates/``, "" when empty, never "unknown": under the
        # broker's ACL (``fedmq/+/updates/%u``) it is the sender's authenticated id, and
        # the aggregator refuses an update whose envelope names anyone else. The filter
        # ``updates/+`` matches exactly one level; should a deeper topic arrive anyway,
        # its whole rest ("a/b") is the hint, which matches no participant id.
        self.participant_hint: str = topics.participant_of(message.topic.value)
        body = message.payload
        self._size = len(body)
        self.refused: Rejection | None = None
        if self._size > limit:
            self.refused = WireError(
                Reason.TOO_LARGE, f"message of {self._size} bytes, limit {limit}"
            )
            body = b""
        self._body = body

    @property
    def body(self) -> bytes:
        return self._body

    @property
    def stale(self) -> bool:
        """Its connection died: the persistent session redelivers it on reconnect."""
        return self._session.is_lost

    def _settle(self) -> None:
        if self._settled:
            raise ClosedResourceError("delivery already acked or rejected")
        self._settled = True

    async def ack(self) -> None:
        self._settle()
        if self.stale:
            LOG.debug("mqtt: ack of a delivery from a lost connection ignored (redelivered)")
            return
        self._session.puback(self._mid, self._qos)

    async def reject(self, rejection: Rejection) -> None:
        self._settle()
        if self.stale:
            LOG.debug("mqtt: reject of a delivery from a lost connection ignored (redelivered)")
            return
        record = {
            "reason": rejection.reason.value,
            "detail": rejection.detail[:_DETAIL_MAX],
            "participant": self.participant_hint,
            "size": self._size,
        }
        # The record, then the PUBACK, back to back on this connection, without waiting
        # for the broker's PUBACK of the record: a broker handles a connection's packets
        # in order, so once it has our PUBACK it has the record. Waiting would cost a
        # round trip per refusal, often stretched to ~40 ms by Nagle on the broker's
        # side (Mosquitto's set_tcp_nodelay is off by default) meeting our delayed ACK.
        if self._session.publish_now(self._rejected_topic, json.dumps(record).encode()):
            self._session.puback(self._mid, self._qos)


class _MqttBase(SupervisedTransport[_MqttSession]):
    _expected_errors = _BROKER_ERRORS

    def __init__(
        self,
        config: TransportConfig,
        *,
        role: str,
        client_id: str,
        subscription: str,
        manual_ack: bool,
        clean_session: bool,
    ) -> None:
        self._broker = _broker(config.url)
        self._init_lifecycle(config, f"mqtt {role} job={config.job}")
        self._topics = MqttTopics(config.job)
        self._client_id = client_id
        self._clean_session = clean_session
        self._subscription = subscription
        # Subscriptions that may be refused (by ACL) without stopping the transport:
        # topic filter -> what is unavailable without it.
        self._optional_subscriptions: dict[str, str] = {}
        self._manual_ack = manual_ack

    # -- lifecycle -----------------------------------------------------------

    def _is_fatal(self, exc: BaseException) -> bool:
        return _is_fatal(exc)

    # -- role hooks ----------------------------------------------------------

    def _new_client(self) -> aiomqtt.Client:
        raise NotImplementedError

    def _on_message(self, session: _MqttSession, message: aiomqtt.Message) -> None:
        raise NotImplementedError

    def _on_up(self, session: _MqttSession) -> None:
        """Called before a new session is handed out."""

    # -- the connection ------------------------------------------------------

    def _make_client(
        self, *, queue_type: type[asyncio.Queue[aiomqtt.Message]] | None, max_queued: int | None
    ) -> aiomqtt.Client:
        client = _client(
            self._broker,
            identifier=self._client_id,
            clean_session=self._clean_session,
            timeout=self._config.connect_timeout_s,
            queue_type=queue_type,
            max_queued=max_queued,
        )
        if self._manual_ack:
            # PUBACK only when the aggregator settles the update (Delivery.ack/reject),
            # not when it reaches our buffer: with paho's default auto-ack the broker
            # forgets an update the moment it arrives, and a crash before it is applied
            # loses it. With manual acks the persistent session redelivers every update
            # not yet settled when the connection drops. aiomqtt has no API for this;
            # its paho client (``_client``, paho 2.x) has. Set before connecting.
            client._client.manual_ack_set(True)
            # No client-side in-flight limit, so a rejection record is never held back
            # behind the PUBACK that follows it (_MqttSession.publish_now).
            client._client.max_inflight_messages_set(0)
        return client

    async def _serve(self, up: Callable[[_MqttSession], None]) -> None:
        client = self._new_client()
        session = _MqttSession(self._label, client)
        async with client:
            # Resubscribe explicitly on every connection, even when the broker
            # kept the session: a new broker (or a wiped one) has no subscription.
            granted = await client.subscribe(self._subscription, qos=1)
            _check_granted(self._subscription, granted)
            for topic, lost in self._optional_subscriptions.items():
                try:
                    _check_granted(topic, await client.subscribe(topic, qos=1))
                except SubscriptionRefused as exc:
                    LOG.warning("%s: %s; %s is unavailable", self._label, exc, lost)
            self._on_up(session)
            up(session)
            reader = asyncio.create_task(
                self._read(session), name=f"fedmq.transport.{self._label}.reader"
            )
            try:
                await session.wait_lost()
            finally:
                reader.cancel()
                await asyncio.wait((reader,))

    async def _read(self, session: _MqttSession) -> None:
        try:
            async for message in session.client.messages:
                self._on_message(session, message)
        except aiomqtt.MqttError as exc:
            session.lose(exc)
        else:  # pragma: no cover - the iterator only ends by raising
            session.lose()

    async def _publish(self, topic: str, body: bytes, *, retain: bool, what: str) -> None:
        self._life.check_open()
        check_size(body, _limit(self._config, topic), what)
        assert self._supervisor is not None

        async def op(session: _MqttSession) -> None:
            # No timeout: a PUBACK can take long for a big model on a slow link, and
            # a dead connection is noticed by Session.guard (keepalive, socket errors).
            await session.client.publish(topic, body, qos=1, retain=retain, timeout=math.inf)

        await self._supervisor.call(op, what=f"publish {what}", retryable=_BROKER_ERRORS)


class MqttAggregator(_MqttBase):
    """The aggregator's side on MQTT: updates with manual PUBACK, the retained model."""

    def __init__(self, config: TransportConfig) -> None:
        topics = MqttTopics(config.job)
        super().__init__(
            config,
            role="aggregator",
            client_id=f"fedmq-{config.job}-aggregator",
            subscription=topics.updates_filter,
            manual_ack=True,
            clean_session=False,  # updates wait at the broker while it is away
        )
        # Unbounded on purpose, here and in aiomqtt: with manual acks the broker sends
        # at most its in-flight window (Mosquitto max_inflight_messages, default 20)
        # of unacked updates, so memory is bounded by the broker. A bounded aiomqtt
        # queue (max_queued_incoming_messages) would silently drop an update that was
        # never PUBACKed, stranding it in the broker's in-flight window until reconnect.
        self._inbox: Inbox[_MqttDelivery] = Inbox()
        self._controls: Inbox[bytes] = Inbox(maxlen=_MAX_CONTROLS)
        self._evals: Inbox[EvalReport] = Inbox(maxlen=_MAX_EVALS)
        self._optional_subscriptions = {
            topics.control: "live tuning",
            topics.evals_filter: "federated evaluation",
        }

    def _close_inbox(self) -> None:
        self._inbox.close()
        self._controls.close()
        self._evals.close()

    def _new_client(self) -> aiomqtt.Client:
        return self._make_client(queue_type=None, max_queued=None)

    def _on_up(self, session: _MqttSession) -> None:
        # Updates of the previous connection are redelivered by the broker; drop our copies.
        self._inbox.drop_where(lambda d: d.stale)

    def _on_message(self, session: _MqttSession, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        if topic == self._topics.control:
            self._controls.put(message.payload)
            session.puback(message.mid, message.qos)  # at most once: few and idempotent
            return
        sender = self._topics.eval_participant_of(topic)
        if sender is not None:
            # The sender is the topic level, as for updates (``evals/%u`` in the ACL).
            self._evals.put(EvalReport.received(message.payload, sender))
            session.puback(message.mid, message.qos)  # at most once: the next report replaces it
            return
        limit = self._config.max_message_bytes
        self._inbox.put(_MqttDelivery(message, session, self._topics, limit))

    def updates(self) -> InboxIterator[_MqttDelivery]:
        """Every update, across reconnects, until closed; stale deliveries are skipped."""
        self._life.check_open()
        return InboxIterator(self._inbox, skip=lambda d: d.stale)

    async def publish_model(self, body: bytes, *, version: int, keyframe: bool = True) -> None:
        # MQTT 3.1.1 has no message properties: the version travels inside the envelope.
        # The retained model is the last keyframe: a late joiner cannot apply a delta.
        await self._publish(self._topics.model, body, retain=keyframe, what=f"model v{version}")

    def controls(self) -> InboxIterator[bytes]:
        """Operator commands from ``fedmq/<job>/control``, across reconnects, until closed."""
        self._life.check_open()
        return InboxIterator(self._controls)

    def evals(self) -> InboxIterator[EvalReport]:
        """Evaluation reports from ``fedmq/<job>/evals/+``, across reconnects, until closed."""
        self._life.check_open()
        return InboxIterator(self._evals)


async def publish_control(config: TransportConfig, body: bytes) -> None:
    """Send one operator command to the aggregator of ``config.job`` (QoS 1, not retained).

    One short connection (client id ``fedmq-<job>-operator-<random>``, clean session),
    no retries. MQTT 3.1.1 cannot say "not authorised": a broker whose ACL refuses the
    publish acknowledges it and drops it, so check the aggregator's metrics or log.
    """
    broker = _broker(config.url)
    topic = MqttTopics(config.job).control
    check_size(body, _limit(config, topic), "control command")
    label = f"mqtt operator job={config.job}"
    client = _client(
        broker,
        identifier=f"fedmq-{config.job}-operator-{secrets.token_hex(4)}",
        clean_session=True,
        timeout=config.connect_timeout_s,
    )
    connected = False
    try:
        async with client:
            connected = True
            await client.publish(topic, body, qos=1, timeout=config.connect_timeout_s)
    except _BROKER_ERRORS as exc:
        target = redact_url(config.url)
        if _is_fatal(exc):
            raise TransportError(f"{label}: {target} refused us: {exc!r}") from exc
        if not connected:
            raise BrokerUnavailable(f"{label}: cannot reach {target}: {exc!r}") from exc
        raise TransportError(f"{label}: sending the command failed: {exc!r}") from exc


class MqttParticipant(_MqttBase):
    """A device's side on MQTT: the retained model and its successors, QoS 1 updates."""

    def __init__(self, config: TransportConfig, participant_id: str) -> None:
        self._participant_id = check_participant_id(participant_id)
        topics = MqttTopics(config.job)
        super().__init__(
            config,
            role=f"participant {participant_id}",
            client_id=f"fedmq-{config.job}-p-{participant_id}",
            subscription=topics.model,
            manual_ack=False,  # a model needs no ack after use: the retained copy stays
            # A device needs only the newest model: the retained keyframe, which every
            # (re)subscribe brings, then the deltas after it. A persistent session would
            # queue every model published while it is away (up to the broker's
            # max_queued_messages), all to cross its link on return. Its updates need
            # no session: an unconfirmed publish is sent again on the next connection.
            clean_session=True,
        )
        self._update_topic = topics.updates(participant_id)
        self._eval_topic = topics.evals(participant_id)
        # Latest wins, in aiomqtt's queue and ours: only the newest model matters.
        self._models: Inbox[bytes] = Inbox(maxlen=1)

    def _close_inbox(self) -> None:
        self._models.close()

    def _new_client(self) -> aiomqtt.Client:
        return self._make_client(queue_type=_LatestQueue, max_queued=2)

    def _on_message(self, session: _MqttSession, message: aiomqtt.Message) -> None:
        if message.payload:  # b"" only clears the retained model
            self._models.put(message.payload)

    def models(self) -> InboxIterator[bytes]:
        """The retained model at once, then each new one (latest wins if the reader lags)."""
        self._life.check_open()
        return InboxIterator(self._models)

    async def publish_update(self, body: bytes) -> None:
        await self._publish(self._update_topic, body, retain=False, what="update")

    async def publish_eval(self, body: bytes) -> None:
        self._life.check_open()
        check_eval_size(body)
        await self._publish(self._eval_topic, body, retain=False, what="eval report")

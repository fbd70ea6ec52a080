"""MQTT transport: aiomqtt 2.x (MQTT 3.1.1) with our own reconnection and manual acks.

Topics of job ``<job>``:

- ``fedmq/<job>/updates/<participant>``  QoS 1.  The aggregator subscribes
  ``fedmq/<job>/updates/+`` at QoS 1 with a persistent session (client id
  ``fedmq-<job>-aggregator``, clean_session=False), so updates wait at the
  broker while it is away, and PUBACKs only after ``Delivery.ack()``.
- ``fedmq/<job>/model``  retained, QoS 1, published by the aggregator.
  Participants subscribe at QoS 1 with persistent sessions (client id
  ``fedmq-<job>-p-<participant>``) and get the retained model at once.
- ``fedmq/<job>/rejected``  QoS 1, JSON ``{reason, detail, participant, size}``.
- ``fedmq/<job>/control``  QoS 1, operator commands (``publish_control``; only the
  operator may write it, by the broker's ACL); the aggregator subscribes on the
  same persistent session and acknowledges each one as it takes it.

One connection per transport object carries both its subscription and its
publishes.  Each connection attempt builds a fresh ``aiomqtt.Client`` inside the
backoff loop (aiomqtt's documented reconnection pattern) and resubscribes
explicitly; the iterators handed to callers read from an inbox that outlives
connections.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import ssl
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from fedmq.errors import (
    BrokerUnavailable,
    ClosedResourceError,
    ConfigError,
    Rejection,
    TransportError,
)
from fedmq.transport._base import TransportConfig
from fedmq.transport._common import (
    LOG,
    check_participant_id,
    check_size,
    redact_url,
)
from fedmq.transport._inbox import Inbox, InboxIterator
from fedmq.transport._session import Session, SessionLost, SupervisedTransport

__all__ = [
    "MqttAggregator",
    "MqttParticipant",
    "MqttTopics",
    "SubscriptionRefused",
    "mqtt_topics",
    "publish_control",
]

_BROKER_ERRORS: tuple[type[BaseException], ...] = (aiomqtt.MqttError, OSError, TimeoutError)
_SETTLE_ERRORS: tuple[type[BaseException], ...] = (SessionLost, *_BROKER_ERRORS)
_KEEPALIVE_S = 30
_MQTT_MAX_REMAINING = 268_435_455  # the protocol's largest packet body
_DETAIL_MAX = 1000
_MAX_CONTROLS = 1000  # commands buffered for the aggregator (the oldest go first)
_REFUSED_CODES = {4, 5, 134, 135}  # CONNACK: bad username/password, not authorised (3.1.1 / 5)


class MqttTopics:
    """Topic names of one job."""

    def __init__(self, job: str) -> None:
        self.updates_filter = f"fedmq/{job}/updates/+"
        self.model = f"fedmq/{job}/model"
        self.rejected = f"fedmq/{job}/rejected"
        self.control = f"fedmq/{job}/control"
        self._updates_prefix = f"fedmq/{job}/updates/"

    def updates(self, participant_id: str) -> str:
        return self._updates_prefix + participant_id


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

    def puback(self, message: aiomqtt.Message) -> None:
        # aiomqtt has no manual-ack API; its paho client has (paho 2.x ack()).
        rc = self.client._client.ack(message.mid, message.qos)
        if rc != paho.MQTT_ERR_SUCCESS:
            # The socket is gone; the broker redelivers on reconnect (same client id).
            LOG.info("%s: PUBACK mid=%d not sent (rc=%s)", self.label, message.mid, rc)
            self.lose(aiomqtt.MqttCodeError(rc, "could not send PUBACK"))


class _MqttDelivery:
    """One update, acknowledged (PUBACK) on the connection it arrived on, only when settled."""

    __slots__ = ("_message", "_rejected_topic", "_session", "_settled")

    def __init__(self, message: aiomqtt.Message, session: _MqttSession, rejected_topic: str):
        self._message = message
        self._session = session
        self._rejected_topic = rejected_topic
        self._settled = False

    @property
    def body(self) -> bytes:
        return self._message.payload

    @property
    def participant_hint(self) -> str | None:
        return self._message.topic.value.rsplit("/", 1)[-1] or None

    @property
    def refused(self) -> Rejection | None:
        return None

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
        self._session.puback(self._message)

    async def reject(self, rejection: Rejection) -> None:
        self._settle()
        if self.stale:
            LOG.debug("mqtt: reject of a delivery from a lost connection ignored (redelivered)")
            return
        record = {
            "reason": rejection.reason.value,
            "detail": rejection.detail[:_DETAIL_MAX],
            "participant": self.participant_hint,
            "size": len(self.body),
        }
        try:
            await self._session.guard(
                self._session.client.publish(
                    self._rejected_topic, json.dumps(record).encode(), qos=1, timeout=math.inf
                )
            )
        except _SETTLE_ERRORS as exc:
            LOG.info("mqtt: reject failed (%r); the broker will redeliver", exc)
            self._session.lose(exc)
            return
        self._session.puback(self._message)


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
    ) -> None:
        parts = urlsplit(config.url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ConfigError(f"broker: MQTT transport needs an mqtt:// URL, got {parts.scheme}")
        self._init_lifecycle(config, f"mqtt {role} job={config.job}")
        self._topics = MqttTopics(config.job)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._tls = parts.scheme == "mqtts"
        self._client_id = client_id
        self._subscription = subscription
        # A second subscription that may be refused (by ACL) without stopping the transport.
        self._optional_subscription: str | None = None
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
        client = aiomqtt.Client(
            self._host,
            self._port,
            username=self._username,
            password=self._password,
            identifier=self._client_id,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=False,
            timeout=self._config.connect_timeout_s,
            keepalive=_KEEPALIVE_S,
            queue_type=queue_type,
            max_queued_incoming_messages=max_queued,
            tls_context=ssl.create_default_context() if self._tls else None,
        )
        if self._manual_ack:
            # PUBACK only when the aggregator settles the update (Delivery.ack/reject),
            # not when it reaches our buffer: with paho's default auto-ack the broker
            # forgets an update the moment it arrives, and a crash before it is applied
            # loses it. With manual acks the persistent session redelivers every update
            # not yet settled when the connection drops. aiomqtt has no API for this;
            # its paho client (``_client``, paho 2.x) has. Set before connecting.
            client._client.manual_ack_set(True)
        return client

    async def _serve(self, up: Callable[[_MqttSession], None]) -> None:
        client = self._new_client()
        session = _MqttSession(self._label, client)
        async with client:
            # Resubscribe explicitly on every connection, even when the broker
            # kept the session: a new broker (or a wiped one) has no subscription.
            granted = await client.subscribe(self._subscription, qos=1)
            _check_granted(self._subscription, granted)
            if self._optional_subscription is not None:
                topic = self._optional_subscription
                try:
                    _check_granted(topic, await client.subscribe(topic, qos=1))
                except SubscriptionRefused as exc:
                    LOG.warning("%s: %s; live tuning is unavailable", self._label, exc)
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
        )
        # Unbounded on purpose, here and in aiomqtt: with manual acks the broker sends
        # at most its in-flight window (Mosquitto max_inflight_messages, default 20)
        # of unacked updates, so memory is bounded by the broker. A bounded aiomqtt
        # queue (max_queued_incoming_messages) would silently drop an update that was
        # never PUBACKed, stranding it in the broker's in-flight window until reconnect.
        self._inbox: Inbox[_MqttDelivery] = Inbox()
        self._controls: Inbox[bytes] = Inbox(maxlen=_MAX_CONTROLS)
        self._optional_subscription = topics.control

    def _close_inbox(self) -> None:
        self._inbox.close()
        self._controls.close()

    def _new_client(self) -> aiomqtt.Client:
        return self._make_client(queue_type=None, max_queued=None)

    def _on_up(self, session: _MqttSession) -> None:
        # Updates of the previous connection are redelivered by the broker; drop our copies.
        self._inbox.drop_where(lambda d: d.stale)

    def _on_message(self, session: _MqttSession, message: aiomqtt.Message) -> None:
        if message.topic.value == self._topics.control:
            self._controls.put(message.payload)
            session.puback(message)  # at most once: commands are few and idempotent
            return
        self._inbox.put(_MqttDelivery(message, session, self._topics.rejected))

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


async def publish_control(config: TransportConfig, body: bytes) -> None:
    """Send one operator command to the aggregator of ``config.job`` (QoS 1, not retained).

    One short connection (client id ``fedmq-<job>-operator-<random>``, clean session),
    no retries. MQTT 3.1.1 cannot say "not authorised": a broker whose ACL refuses the
    publish acknowledges it and drops it, so check the aggregator's metrics or log.
    """
    parts = urlsplit(config.url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"broker: MQTT transport needs an mqtt:// URL, got {parts.scheme}")
    topic = MqttTopics(config.job).control
    check_size(body, _limit(config, topic), "control command")
    label = f"mqtt operator job={config.job}"
    client = aiomqtt.Client(
        parts.hostname or "127.0.0.1",
        parts.port or (8883 if parts.scheme == "mqtts" else 1883),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        identifier=f"fedmq-{config.job}-operator-{secrets.token_hex(4)}",
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=True,
        timeout=config.connect_timeout_s,
        tls_context=ssl.create_default_context() if parts.scheme == "mqtts" else None,
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
        )
        self._update_topic = topics.updates(participant_id)
        # Latest wins, in aiomqtt's queue and ours: only the newest model matters,
        # and a persistent session can hold many queued models after an absence.
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

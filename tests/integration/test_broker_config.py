"""broker_config/ is what it claims: a second RabbitMQ and a second Mosquitto run these files.

The module starts its own RabbitMQ node and Mosquitto on spare loopback ports (see
tests/integration/brokers.py for the exact substitutions: container paths and ports only),
with certificates made by scripts/make-certs.sh, and shows with real clients that:

- TLS works (AMQPS, MQTTS) and a client that does not trust the fedmq CA is refused;
- wrong passwords, unknown users and RabbitMQ's default "guest" are refused;
- a device publishes its own updates and evaluation reports (through its job's uplink
  exchange, the only thing it may write over AMQP) and reads the model, and nothing else:
  RabbitMQ closes the channel with ACCESS_REFUSED (AMQP) or the connection (its MQTT
  plugin); Mosquitto answers "Not authorized" to MQTT 5 clients and silently drops the
  message for MQTT 3.1.1 clients, which an observer proves by never receiving it;
- the definitions match the declarations the transport makes, and the dead-letter policy
  moves rejected updates to fedmq.<job>.rejected.

The brokers run as separate processes killed by a finalizer; the system brokers on 5672
and 1883 are never used. Outside CI a missing broker binary skips; with CI=true it fails.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import socket
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import aio_pika
import aiomqtt
import aiormq
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from ruamel.yaml import YAML

from fedmq.errors import TransportError
from fedmq.transport import TransportConfig
from fedmq.transport.amqp import EVALS_ARGUMENTS, REJECTED_MAX_BYTES
from fedmq.transport.mqtt import MqttAggregator, MqttParticipant
from tests.integration.brokers import (
    REPO,
    BrokerStartError,
    Certs,
    MosquittoProcess,
    RabbitNode,
    make_certs,
    read_demo_passwords,
    world_readable_tmpdir,
)
from tests.integration.test_transport_mqtt import live_socket

PASSWORDS = read_demo_passwords()
UPLINK = "fedmq.default.uplink"  # where devices publish updates (the transport's uplink)
REJECTED_ARGUMENTS: dict[str, Any] = {"x-max-length-bytes": REJECTED_MAX_BYTES}
RABBIT_BOOT_TIMEOUT_S = 45.0
NOT_AUTHORIZED = 0x87  # MQTT 5 reason code
QUIET_S = 0.3  # after the sentinel, how long a message that should never come may still take


def _cannot_run(message: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: broker tests must run)")
    pytest.skip(message)


# -- fixtures: one RabbitMQ node and one Mosquitto for the whole module ---------------------


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """Everything the brokers write; removed at the end (the brokers are gone by then)."""
    folder = world_readable_tmpdir("fedmq-broker-config-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def certs(workdir: Path) -> Certs:
    if shutil.which("openssl") is None:
        _cannot_run("openssl is not installed")
    # 0644: Mosquitto reads the key as the mosquitto user, as in its container.
    return make_certs(workdir / "certs", key_mode="0644")


@pytest.fixture(scope="module")
def rabbit(workdir: Path, certs: Certs, request: pytest.FixtureRequest) -> RabbitNode:
    folder = workdir / "rabbitmq"
    folder.mkdir()
    node = RabbitNode.from_repo_config(folder, certs=certs)
    request.addfinalizer(node.stop)
    try:
        node.start()
    except FileNotFoundError as exc:
        _cannot_run(f"RabbitMQ is not installed ({exc})")
    try:
        node.wait_listening(RABBIT_BOOT_TIMEOUT_S)
    except BrokerStartError as exc:
        pytest.fail(f"RabbitMQ did not start with broker_config/: {exc}")
    return node


@pytest.fixture(scope="module")
def mosquitto(workdir: Path, certs: Certs, request: pytest.FixtureRequest) -> MosquittoProcess:
    folder = workdir / "mosquitto"
    folder.mkdir()
    broker = MosquittoProcess.from_repo_config(folder, certs=certs)
    request.addfinalizer(broker.stop)
    try:
        broker.start()
    except FileNotFoundError as exc:
        _cannot_run(f"Mosquitto is not installed ({exc})")
    try:
        broker.wait_listening(10)
    except BrokerStartError as exc:
        pytest.fail(f"Mosquitto did not start with broker_config/: {exc}")
    return broker


@pytest.fixture
def tls(certs: Certs) -> ssl.SSLContext:
    """Trusts the fedmq CA only, and checks the host name (127.0.0.1 is in the certificate)."""
    return ssl.create_default_context(cafile=str(certs.ca))


# -- helpers ------------------------------------------------------------------------------


def amqp_url(node: RabbitNode, user: str, password: str | None = None, *, tls: bool = False) -> str:
    scheme, port = ("amqps", node.ports["amqps"]) if tls else ("amqp", node.ports["amqp"])
    password = PASSWORDS[user] if password is None else password
    return f"{scheme}://{user}:{password}@127.0.0.1:{port}/fedmq"


def unique(label: str) -> bytes:
    return f"{label}-{uuid.uuid4().hex}".encode()


async def get_until(
    channel: aio_pika.abc.AbstractChannel, queue: str, body: bytes, timeout_s: float = 10.0
) -> aio_pika.abc.AbstractIncomingMessage:
    """Poll ``queue`` until the message with ``body`` arrives; ack the others on the way."""
    q = await channel.get_queue(queue, ensure=False)
    async with asyncio.timeout(timeout_s):
        while True:
            message = await q.get(no_ack=False, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
            elif message.body == body:
                return message
            else:
                await message.ack()


async def read_stream_until(
    channel: aio_pika.abc.AbstractChannel, queue: str, body: bytes, timeout_s: float = 10.0
) -> aio_pika.abc.AbstractIncomingMessage:
    """Consume a stream queue from its last chunk until ``body`` shows up."""
    await channel.set_qos(prefetch_count=10)  # streams refuse consumers without a prefetch
    q = await channel.get_queue(queue, ensure=False)
    async with asyncio.timeout(timeout_s):
        async with q.iterator(arguments={"x-stream-offset": "last"}) as messages:
            async for message in messages:
                await message.ack()
                if message.body == body:
                    return message
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True, kw_only=True)
class MqttOutcome:
    """What the broker answered one MQTT client that tried one thing."""

    connack: str
    puback: int | None = None  # reason code; always 0 under MQTT 3.1.1
    suback: tuple[int, ...] | None = None  # granted QoS or failure codes
    dropped_by_broker: bool = False  # the broker closed the connection before we did


def mqtt_attempt(
    port: int,
    tls: ssl.SSLContext,
    user: str,
    *,
    client_id: str,
    password: str | None = None,
    publish: tuple[str, bytes, bool] | None = None,
    subscribe: str | None = None,
    mqtt5: bool = False,
    timeout_s: float = 5.0,
) -> MqttOutcome:
    """Connect, publish (topic, payload, retain) or subscribe once at QoS 1, report the answer.

    paho rather than aiomqtt: aiomqtt hides PUBACK reason codes and lets an operation time
    out when the broker hangs up, and both are what these tests look at.
    """
    done = threading.Event()
    seen: dict[str, Any] = {}
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if mqtt5 else paho.MQTTv311,
        reconnect_on_failure=False,
    )
    client.username_pw_set(user, PASSWORDS.get(user, "") if password is None else password)
    client.tls_set_context(tls)

    def on_connect(c: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        seen["connack"] = str(rc)
        if rc.is_failure:
            done.set()
        elif publish is not None:
            c.publish(publish[0], publish[1], qos=1, retain=publish[2])
        elif subscribe is not None:
            c.subscribe(subscribe, qos=1)
        else:
            done.set()

    def on_publish(_c: paho.Client, _u: Any, _mid: int, rc: Any, _p: Any) -> None:
        seen["puback"] = rc.value
        done.set()

    def on_subscribe(_c: paho.Client, _u: Any, _mid: int, rcs: list[Any], _p: Any) -> None:
        seen["suback"] = tuple(rc.value for rc in rcs)
        done.set()

    def on_disconnect(_c: paho.Client, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        seen.setdefault("dropped", not seen.get("closing", False))
        done.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.on_subscribe = on_subscribe
    client.on_disconnect = on_disconnect
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()
    try:
        if not done.wait(timeout_s):
            raise AssertionError(f"no answer from the broker within {timeout_s}s: {seen}")
    finally:
        seen["closing"] = True
        client.disconnect()
        client.loop_stop()
    return MqttOutcome(
        connack=seen.get("connack", "none"),
        puback=seen.get("puback"),
        suback=seen.get("suback"),
        dropped_by_broker=bool(seen.get("dropped", False)),
    )


def mqtt_client(
    port: int, tls: ssl.SSLContext, user: str, client_id: str, *, password: str | None = None
) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        username=user,
        password=PASSWORDS[user] if password is None else password,
        identifier=client_id,
        tls_context=tls,
        timeout=5,
    )


async def collect_until(
    client: aiomqtt.Client, sentinel: bytes, timeout_s: float = 10.0
) -> list[bytes]:
    """Payloads ``client`` receives, up to and including ``sentinel``, then QUIET_S more."""
    received: list[bytes] = []
    arrived = asyncio.Event()

    async def drain() -> None:
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            received.append(message.payload)
            if message.payload == sentinel:
                arrived.set()

    task = asyncio.create_task(drain(), name="mqtt-collect")
    try:
        async with asyncio.timeout(timeout_s):
            await arrived.wait()
        await asyncio.sleep(QUIET_S)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return received


# -- RabbitMQ: AMQP -----------------------------------------------------------------------


@pytest.mark.amqp
async def test_amqps_uses_the_fedmq_ca(
    rabbit: RabbitNode, certs: Certs, tls: ssl.SSLContext
) -> None:
    connection = await aio_pika.connect(amqp_url(rabbit, "aggregator", tls=True), ssl_context=tls)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue("fedmq.default.updates", passive=True)

    # A client certificate signed by the same CA is verified and accepted (not required).
    with_cert = ssl.create_default_context(cafile=str(certs.ca))
    cert, key = certs.client("dev-01")
    with_cert.load_cert_chain(cert, key)
    async with await aio_pika.connect(amqp_url(rabbit, "dev-01", tls=True), ssl_context=with_cert):
        pass

    # A client that only trusts the system CAs refuses the broker's certificate.
    with pytest.raises(aiormq.exceptions.AMQPConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        await aio_pika.connect(
            amqp_url(rabbit, "aggregator", tls=True), ssl_context=ssl.create_default_context()
        )


@pytest.mark.amqp
@pytest.mark.parametrize(
    ("user", "password", "vhost"),
    [
        ("dev-01", "not-the-password", "fedmq"),
        ("nobody", "whatever", "fedmq"),
        ("guest", "guest", ""),  # no default user: definitions replace it
    ],
)
async def test_amqp_refuses_bad_credentials(
    rabbit: RabbitNode, user: str, password: str, vhost: str
) -> None:
    url = f"amqp://{user}:{password}@127.0.0.1:{rabbit.ports['amqp']}/{vhost}"
    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError, match="ACCESS_REFUSED"):
        await aio_pika.connect(url)


@pytest.mark.amqp
async def test_device_publishes_its_update_and_the_aggregator_sees_who_sent_it(
    rabbit: RabbitNode,
) -> None:
    body = unique("update")
    async with await aio_pika.connect(amqp_url(rabbit, "dev-01")) as device:
        channel = await device.channel(publisher_confirms=True)
        uplink = await channel.get_exchange(UPLINK, ensure=False)
        confirm = await uplink.publish(
            aio_pika.Message(
                body,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                user_id="dev-01",
                headers={"participant": "dev-01"},
            ),
            routing_key="fedmq.default.updates",
        )
        assert isinstance(confirm, aiormq.spec.Basic.Ack)
    async with await aio_pika.connect(amqp_url(rabbit, "aggregator")) as aggregator:
        message = await get_until(await aggregator.channel(), "fedmq.default.updates", body)
        # RabbitMQ checked user_id against the login: the aggregator may trust it.
        assert message.user_id == "dev-01"
        assert message.headers["participant"] == "dev-01"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        await message.ack()


@pytest.mark.amqp
async def test_device_cannot_claim_another_user_id(rabbit: RabbitNode) -> None:
    async with await aio_pika.connect(amqp_url(rabbit, "dev-01")) as device:
        channel = await device.channel(publisher_confirms=True)
        uplink = await channel.get_exchange(UPLINK, ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="user_id"):
            await uplink.publish(
                aio_pika.Message(unique("forged"), user_id="dev-02"),
                routing_key="fedmq.default.updates",
            )


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    await message.nack()


async def _consume_updates(ch: aio_pika.abc.AbstractChannel) -> object:
    queue = await ch.get_queue("fedmq.default.updates", ensure=False)
    return await queue.consume(_ignore)


async def _consume_evals(ch: aio_pika.abc.AbstractChannel) -> object:
    queue = await ch.get_queue("fedmq.default.evals", ensure=False)
    return await queue.consume(_ignore)


async def _consume_rejected(ch: aio_pika.abc.AbstractChannel) -> object:
    queue = await ch.get_queue("fedmq.default.rejected", ensure=False)
    return await queue.get(fail=False)


async def _redeclare_updates(ch: aio_pika.abc.AbstractChannel) -> object:
    return await ch.declare_queue("fedmq.default.updates", durable=True)


async def _delete_updates(ch: aio_pika.abc.AbstractChannel) -> object:
    return await ch.queue_delete("fedmq.default.updates")


async def _declare_own_queue(ch: aio_pika.abc.AbstractChannel) -> object:
    return await ch.declare_queue("fedmq.default.spy", durable=False)


async def _publish_topic(ch: aio_pika.abc.AbstractChannel, routing_key: str) -> object:
    exchange = await ch.get_exchange("amq.topic", ensure=False)
    return await exchange.publish(aio_pika.Message(unique("x")), routing_key=routing_key)


async def _publish_model_topic(ch: aio_pika.abc.AbstractChannel) -> object:
    return await _publish_topic(ch, "fedmq.default.model")


async def _publish_other_devices_update_topic(ch: aio_pika.abc.AbstractChannel) -> object:
    return await _publish_topic(ch, "fedmq.default.updates.dev-02")


async def _publish_other_devices_eval_topic(ch: aio_pika.abc.AbstractChannel) -> object:
    return await _publish_topic(ch, "fedmq.default.evals.dev-02")


async def _publish_default_exchange(ch: aio_pika.abc.AbstractChannel, queue: str) -> object:
    message = aio_pika.Message(unique("forged"), user_id="dev-01")
    return await ch.default_exchange.publish(message, routing_key=queue)


async def _write_model_stream(ch: aio_pika.abc.AbstractChannel) -> object:
    return await _publish_default_exchange(ch, "fedmq.default.models")


async def _write_control_queue(ch: aio_pika.abc.AbstractChannel) -> object:
    return await _publish_default_exchange(ch, "fedmq.default.control")


async def _write_updates_queue_directly(ch: aio_pika.abc.AbstractChannel) -> object:
    return await _publish_default_exchange(ch, "fedmq.default.updates")


async def _write_evals_queue_directly(ch: aio_pika.abc.AbstractChannel) -> object:
    return await _publish_default_exchange(ch, "fedmq.default.evals")


async def _write_another_jobs_uplink(ch: aio_pika.abc.AbstractChannel) -> object:
    exchange = await ch.get_exchange("fedmq.other-job.uplink", ensure=False)
    message = aio_pika.Message(unique("forged"), user_id="dev-01")
    return await exchange.publish(message, routing_key="fedmq.other-job.updates")


async def _write_dead_letter_exchange(ch: aio_pika.abc.AbstractChannel) -> object:
    exchange = await ch.get_exchange("fedmq.dlx", ensure=False)
    message = aio_pika.Message(unique("forged"), user_id="dev-01")
    return await exchange.publish(message, routing_key="fedmq.default.updates")


async def _bind_updates_elsewhere(ch: aio_pika.abc.AbstractChannel) -> object:
    queue = await ch.get_queue("fedmq.default.updates", ensure=False)
    return await queue.bind("amq.topic", routing_key="fedmq.default.model")


@pytest.mark.amqp
@pytest.mark.parametrize(
    "operation",
    [
        _consume_updates,  # read: only the aggregator reads updates
        _consume_evals,  # read: and evaluation reports
        _consume_rejected,  # read
        _redeclare_updates,  # configure: the topology belongs to the aggregator
        _delete_updates,  # configure
        _declare_own_queue,  # configure
        _publish_model_topic,  # topic permission (write) on amq.topic
        _publish_other_devices_update_topic,  # topic permission, {username} expansion
        _publish_other_devices_eval_topic,  # the same
        # write: only fedmq.default.uplink. Before, write on amq.default let a device
        # append to the model stream, or write any queue of the vhost.
        _write_model_stream,
        _write_control_queue,
        _write_updates_queue_directly,
        _write_evals_queue_directly,
        _write_another_jobs_uplink,
        _write_dead_letter_exchange,
        _bind_updates_elsewhere,  # write on the queue
    ],
)
async def test_device_is_refused_what_it_has_no_permission_for(
    rabbit: RabbitNode, operation: Callable[[aio_pika.abc.AbstractChannel], Awaitable[object]]
) -> None:
    async with await aio_pika.connect(amqp_url(rabbit, "dev-01")) as device:
        channel = await device.channel(publisher_confirms=True)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused, match="ACCESS_REFUSED"):
            await operation(channel)


@pytest.mark.amqp
async def test_device_may_publish_its_own_update_topic_on_amq_topic(rabbit: RabbitNode) -> None:
    async with await aio_pika.connect(amqp_url(rabbit, "dev-01")) as device:
        channel = await device.channel(publisher_confirms=True)
        await _publish_topic(channel, "fedmq.default.updates.dev-01")  # no binding: returned
        await _publish_topic(channel, "fedmq.default.evals.dev-01")


@pytest.mark.amqp
async def test_device_reads_the_model_stream_published_by_the_aggregator(
    rabbit: RabbitNode,
) -> None:
    body = unique("model")
    async with await aio_pika.connect(amqp_url(rabbit, "aggregator")) as aggregator:
        channel = await aggregator.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(body, user_id="aggregator", delivery_mode=2),
            routing_key="fedmq.default.models",
        )
    async with await aio_pika.connect(amqp_url(rabbit, "dev-02")) as device:
        message = await read_stream_until(await device.channel(), "fedmq.default.models", body)
        assert message.user_id == "aggregator"


@pytest.mark.amqp
async def test_fedmq_transports_work_with_the_deployed_permissions(rabbit: RabbitNode) -> None:
    """dev-01 publishes an update and a report through the uplink, the aggregator
    (sender_identity="login") sees the broker-verified login as the sender of both, and
    the model goes the other way."""
    from fedmq.transport import TransportConfig, connect_aggregator, connect_participant

    def config(user: str, **extra: Any) -> TransportConfig:
        return TransportConfig(url=amqp_url(rabbit, user), job="default", **extra)

    body = unique("update")
    async with (
        connect_aggregator(config("aggregator", sender_identity="login")) as agg,
        connect_participant(config("dev-01"), "dev-01") as device,
    ):
        await device.publish_update(body)
        async with asyncio.timeout(10):
            async for delivery in agg.updates():
                if delivery.body == body:
                    break
                await delivery.ack()  # an earlier test's
        assert delivery.participant_hint == "dev-01"
        await delivery.ack()
        report = unique("report")
        await device.publish_eval(report)
        async with asyncio.timeout(10):
            async for received in agg.evals():
                if received.body == report:
                    break
        assert received.participant_hint == "dev-01"


@pytest.mark.amqp
async def test_rejected_updates_are_dead_lettered_to_the_rejected_queue(
    rabbit: RabbitNode,
) -> None:
    body = unique("bad-update")
    async with await aio_pika.connect(amqp_url(rabbit, "dev-01")) as device:
        channel = await device.channel(publisher_confirms=True)
        uplink = await channel.get_exchange(UPLINK, ensure=False)
        await uplink.publish(
            aio_pika.Message(body, user_id="dev-01", delivery_mode=2),
            routing_key="fedmq.default.updates",
        )
    async with await aio_pika.connect(amqp_url(rabbit, "aggregator")) as aggregator:
        channel = await aggregator.channel()
        message = await get_until(channel, "fedmq.default.updates", body)
        await message.reject(requeue=False)
        dead = await get_until(channel, "fedmq.default.rejected", body)
        deaths = dead.headers["x-death"]
        assert isinstance(deaths, list)
        death = deaths[0]
        assert isinstance(death, dict)
        assert death["queue"] == "fedmq.default.updates"
        assert death["reason"] == "rejected"
        assert dead.user_id == "dev-01"
        await dead.ack()


@pytest.mark.amqp
async def test_definitions_match_the_transport_declarations(rabbit: RabbitNode) -> None:
    """The contract with src/fedmq/transport/amqp.py: re-declaring the queues as below is a
    no-op. Dead-lettering, length limits and retention come from policies, never from
    x-arguments, which would be inequivalent (PRECONDITION_FAILED)."""
    async with await aio_pika.connect(amqp_url(rabbit, "aggregator")) as aggregator:
        channel = await aggregator.channel()
        await channel.declare_queue("fedmq.default.updates", durable=True)
        await channel.declare_queue(
            "fedmq.default.updates", durable=True, arguments={"x-queue-type": "classic"}
        )
        await channel.declare_queue(
            "fedmq.default.rejected", durable=True, arguments=REJECTED_ARGUMENTS
        )
        await channel.declare_queue(
            "fedmq.default.models", durable=True, arguments={"x-queue-type": "stream"}
        )
        await channel.declare_queue("fedmq.default.evals", durable=True, arguments=EVALS_ARGUMENTS)
        await channel.declare_exchange(UPLINK, aio_pika.ExchangeType.DIRECT, durable=True)
        # Another job: the aggregator declares its own queues and uplink, binds them, and
        # binds its dead letters.
        job = f"t{uuid.uuid4().hex[:8]}"
        updates = await channel.declare_queue(f"fedmq.{job}.updates", durable=True)
        rejected = await channel.declare_queue(
            f"fedmq.{job}.rejected", durable=True, arguments=REJECTED_ARGUMENTS
        )
        await rejected.bind("fedmq.dlx", routing_key=f"fedmq.{job}.updates")
        uplink = await channel.declare_exchange(
            f"fedmq.{job}.uplink", aio_pika.ExchangeType.DIRECT, durable=True
        )
        await updates.bind(uplink, routing_key=f"fedmq.{job}.updates")
        evals = await channel.declare_queue(
            f"fedmq.{job}.evals", durable=True, arguments=EVALS_ARGUMENTS
        )
        await evals.bind(uplink, routing_key=f"fedmq.{job}.evals")
        await channel.queue_delete(f"fedmq.{job}.updates")
        await channel.queue_delete(f"fedmq.{job}.evals")
        await channel.queue_delete(f"fedmq.{job}.rejected")
        await channel.exchange_delete(f"fedmq.{job}.uplink")
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="inequivalent"):
            await channel.declare_queue(
                "fedmq.default.updates",
                durable=True,
                arguments={"x-dead-letter-exchange": ""},
            )
    async with await aio_pika.connect(amqp_url(rabbit, "dev-01")) as device:
        channel = await device.channel()
        await channel.declare_queue("fedmq.default.updates", passive=True)
        await channel.declare_queue("fedmq.default.models", passive=True)
        await channel.declare_queue("fedmq.default.evals", passive=True)
        await channel.declare_exchange(UPLINK, passive=True)


@pytest.mark.amqp
async def test_amqp_control_commands_are_taken_from_the_operator_only(
    rabbit: RabbitNode, job: str
) -> None:
    """``fedmq.<job>.control``: the aggregator and the operator may declare it, only the
    aggregator may read it, devices may not write it (no write on the default exchange);
    the aggregator keeps only commands whose broker-verified user_id is
    ``control_publisher``."""
    from fedmq.transport import TransportConfig, connect_aggregator, send_control

    def config(user: str, **extra: Any) -> TransportConfig:
        return TransportConfig(url=amqp_url(rabbit, user), job=job, **extra)

    async with connect_aggregator(config("aggregator", control_publisher="operator")) as agg:
        with pytest.raises(TransportError, match="ACCESS_REFUSED"):
            await send_control(config("dev-01"), b"forged")  # no write on amq.default
        await send_control(config("operator"), b"from-operator")
        async with asyncio.timeout(10):
            received = await anext(aiter(agg.controls()))
        assert received == b"from-operator"  # the device's came first, and was dropped
    async with await aio_pika.connect(amqp_url(rabbit, "dev-01")) as device:
        channel = await device.channel()
        queue = await channel.declare_queue(f"fedmq.{job}.control", passive=True)

        async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            pass

        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await queue.consume(ignore)
    async with await aio_pika.connect(amqp_url(rabbit, "aggregator")) as aggregator:
        channel = await aggregator.channel()
        for suffix in ("updates", "rejected", "models", "control", "evals"):
            await channel.queue_delete(f"fedmq.{job}.{suffix}")
        await channel.exchange_delete(f"fedmq.{job}.uplink")


@pytest.mark.amqp
async def test_messages_over_max_message_size_are_refused(rabbit: RabbitNode) -> None:
    limit = 64 * 1024 * 1024  # TransportConfig.max_message_bytes
    async with await aio_pika.connect(amqp_url(rabbit, "aggregator")) as aggregator:
        channel = await aggregator.channel(publisher_confirms=True)
        nowhere = f"fedmq.{uuid.uuid4().hex}.none"  # unroutable: confirmed, then dropped
        await channel.default_exchange.publish(aio_pika.Message(bytes(limit)), routing_key=nowhere)
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="max size"):
            await channel.default_exchange.publish(
                aio_pika.Message(bytes(limit + 1)), routing_key=nowhere
            )


def _management_get(node: RabbitNode, path: str, user: str) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{node.ports['management']}{path}")
    token = base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code, None


@pytest.mark.amqp
def test_management_api_is_for_the_operator_only(rabbit: RabbitNode) -> None:
    status, queues = _management_get(rabbit, "/api/queues/fedmq", "operator")
    assert status == 200
    names = {queue["name"] for queue in queues}
    assert {"fedmq.default.updates", "fedmq.default.rejected", "fedmq.default.models"} <= names
    assert _management_get(rabbit, "/api/queues/fedmq", "dev-01")[0] == 401
    assert _management_get(rabbit, "/api/users", "operator")[0] == 401  # not an administrator


@pytest.mark.amqp
def test_prometheus_plugin_serves_the_queue_depths_the_dashboard_plots(
    rabbit: RabbitNode,
) -> None:
    """docker/prometheus.yml scrapes /metrics/detailed with these parameters; the
    "Broker: updates waiting" panel plots rabbitmq_detailed_queue_messages_ready."""
    scrape = next(
        job
        for job in YAML(typ="safe").load(REPO / "docker" / "prometheus.yml")["scrape_configs"]
        if job["job_name"] == "rabbitmq-queues"
    )
    query = urllib.parse.urlencode([(k, v) for k, vs in scrape["params"].items() for v in vs])
    url = f"http://127.0.0.1:{rabbit.ports['prometheus']}{scrape['metrics_path']}?{query}"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    assert re.search(
        r'^rabbitmq_detailed_queue_messages_ready\{[^}]*queue="fedmq\.default\.updates"',
        text,
        re.MULTILINE,
    ), text[:2000]


# -- RabbitMQ: its MQTT plugin (topic permissions on amq.topic) ----------------------------


@pytest.mark.amqp
@pytest.mark.mqtt
@pytest.mark.parametrize("kind", ["updates", "evals"])
async def test_rabbitmq_mqtt_device_publishes_only_its_own_update(
    rabbit: RabbitNode, tls: ssl.SSLContext, job: str, kind: str
) -> None:
    port = rabbit.ports["mqtts"]
    async with mqtt_client(port, tls, "aggregator", f"fedmq-{job}-aggregator") as aggregator:
        await aggregator.subscribe(f"fedmq/{job}/{kind}/+", qos=1)
        for topic in (f"fedmq/{job}/{kind}/dev-02", f"fedmq/{job}/model"):
            forged = await asyncio.to_thread(
                mqtt_attempt,
                port,
                tls,
                "dev-01",
                client_id=f"fedmq-{job}-p-dev-01",
                publish=(topic, b"forged", False),
            )
            # RabbitMQ 3.10's MQTT plugin answers an unauthorised publish by hanging up.
            assert forged.connack == "Success"
            assert forged.puback is None
            assert forged.dropped_by_broker
        own = await asyncio.to_thread(
            mqtt_attempt,
            port,
            tls,
            "dev-01",
            client_id=f"fedmq-{job}-p-dev-01",
            publish=(f"fedmq/{job}/{kind}/dev-01", b"sentinel", False),
        )
        assert own.puback == 0
        assert not own.dropped_by_broker
        assert await collect_until(aggregator, b"sentinel") == [b"sentinel"]


@pytest.mark.amqp
@pytest.mark.mqtt
async def test_rabbitmq_mqtt_devices_read_the_retained_model_and_no_updates(
    rabbit: RabbitNode, tls: ssl.SSLContext, job: str
) -> None:
    port = rabbit.ports["mqtts"]
    async with mqtt_client(port, tls, "aggregator", f"fedmq-{job}-aggregator") as aggregator:
        await aggregator.publish(f"fedmq/{job}/model", b"model-v1", qos=1, retain=True)
    async with mqtt_client(port, tls, "dev-02", f"fedmq-{job}-p-dev-02") as device:
        await device.subscribe(f"fedmq/{job}/model", qos=1)
        assert await collect_until(device, b"model-v1") == [b"model-v1"]
    spy = await asyncio.to_thread(
        mqtt_attempt,
        port,
        tls,
        "dev-02",
        client_id=f"fedmq-{job}-p-dev-02",
        subscribe=f"fedmq/{job}/updates/+",
    )
    assert spy.suback is None
    assert spy.dropped_by_broker


@pytest.mark.amqp
@pytest.mark.mqtt
def test_rabbitmq_mqtt_refuses_a_wrong_password(
    rabbit: RabbitNode, tls: ssl.SSLContext, job: str
) -> None:
    outcome = mqtt_attempt(
        rabbit.ports["mqtts"], tls, "dev-01", client_id=f"fedmq-{job}-p-dev-01", password="nope"
    )
    assert outcome.connack != "Success"


# -- Mosquitto ----------------------------------------------------------------------------


@pytest.mark.mqtt
async def test_mqtts_uses_the_fedmq_ca(
    mosquitto: MosquittoProcess, tls: ssl.SSLContext, job: str
) -> None:
    port = mosquitto.ports["mqtts"]
    async with mqtt_client(port, tls, "dev-01", f"fedmq-{job}-p-dev-01") as device:
        await device.subscribe(f"fedmq/{job}/model", qos=1)
    # A client that only trusts the system CAs refuses the broker's certificate.
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.to_thread(tls_handshake, port, ssl.create_default_context())


@pytest.mark.parametrize(
    "broker",
    [
        pytest.param("mosquitto", marks=pytest.mark.mqtt),
        pytest.param("rabbit", marks=[pytest.mark.amqp, pytest.mark.mqtt]),
    ],
)
async def test_fedmq_mqtts_connections_set_tcp_nodelay(
    broker: str,
    request: pytest.FixtureRequest,
    certs: Certs,
    job: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # fedmq's clients trust the system CAs; SSL_CERT_FILE makes them trust the fedmq CA.
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca))
    port = request.getfixturevalue(broker).ports["mqtts"]

    def config(user: str) -> TransportConfig:
        password = urllib.parse.quote(PASSWORDS[user], safe="")
        return TransportConfig(url=f"mqtts://{user}:{password}@127.0.0.1:{port}", job=job)

    async with (
        MqttAggregator(config("aggregator")) as aggregator,
        MqttParticipant(config("dev-01"), "dev-01") as device,
    ):
        for transport in (aggregator, device):
            sock = live_socket(transport)
            assert isinstance(sock, ssl.SSLSocket)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.parametrize(
    "broker",
    [
        pytest.param("mosquitto", marks=pytest.mark.mqtt),
        pytest.param("rabbit", marks=[pytest.mark.amqp, pytest.mark.mqtt]),
    ],
)
async def test_fedmq_mqtt_transports_carry_reports_under_the_deployed_acl(
    broker: str,
    request: pytest.FixtureRequest,
    certs: Certs,
    job: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The aggregator's subscription to ``evals/+`` is granted, dev-01 may publish on its
    own report topic, and the topic level names it."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca))
    port = request.getfixturevalue(broker).ports["mqtts"]

    def config(user: str) -> TransportConfig:
        password = urllib.parse.quote(PASSWORDS[user], safe="")
        return TransportConfig(url=f"mqtts://{user}:{password}@127.0.0.1:{port}", job=job)

    async with (
        MqttAggregator(config("aggregator")) as aggregator,
        MqttParticipant(config("dev-01"), "dev-01") as device,
    ):
        await device.publish_eval(b"report")
        async with asyncio.timeout(10):
            report = await anext(aiter(aggregator.evals()))
        assert (report.body, report.participant_hint) == (b"report", "dev-01")


def tls_handshake(port: int, context: ssl.SSLContext) -> None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1"),
    ):
        pass


@pytest.mark.mqtt
@pytest.mark.parametrize(
    ("user", "password"),
    [("dev-01", "not-the-password"), ("nobody", "whatever"), ("dev-01", "")],
)
def test_mosquitto_refuses_bad_credentials(
    mosquitto: MosquittoProcess, tls: ssl.SSLContext, user: str, password: str
) -> None:
    outcome = mqtt_attempt(
        mosquitto.ports["mqtts"], tls, user, client_id="fedmq-x-p-intruder", password=password
    )
    assert outcome.connack == "Not authorized"


@pytest.mark.mqtt
@pytest.mark.parametrize("kind", ["updates", "evals"])
@pytest.mark.parametrize("mqtt5", [False, True], ids=["mqtt311", "mqtt5"])
async def test_mosquitto_device_publishes_only_its_own_update(
    mosquitto: MosquittoProcess, tls: ssl.SSLContext, job: str, mqtt5: bool, kind: str
) -> None:
    port = mosquitto.ports["mqtts"]
    async with mqtt_client(port, tls, "aggregator", f"fedmq-{job}-aggregator") as aggregator:
        await aggregator.subscribe(f"fedmq/{job}/{kind}/+", qos=1)
        forged = await asyncio.to_thread(
            mqtt_attempt,
            port,
            tls,
            "dev-01",
            client_id=f"fedmq-{job}-p-dev-01",
            publish=(f"fedmq/{job}/{kind}/dev-02", b"forged", False),
            mqtt5=mqtt5,
        )
        # MQTT 3.1.1 cannot say no: PUBACK "success", message dropped. MQTT 5 says so.
        assert forged.puback == (NOT_AUTHORIZED if mqtt5 else 0)
        own = await asyncio.to_thread(
            mqtt_attempt,
            port,
            tls,
            "dev-01",
            client_id=f"fedmq-{job}-p-dev-01",
            publish=(f"fedmq/{job}/{kind}/dev-01", b"sentinel", False),
            mqtt5=mqtt5,
        )
        assert own.puback == 0
        assert await collect_until(aggregator, b"sentinel") == [b"sentinel"]


@pytest.mark.mqtt
@pytest.mark.parametrize("mqtt5", [False, True], ids=["mqtt311", "mqtt5"])
async def test_mosquitto_only_the_aggregator_writes_the_model(
    mosquitto: MosquittoProcess, tls: ssl.SSLContext, job: str, mqtt5: bool
) -> None:
    port = mosquitto.ports["mqtts"]
    model = f"fedmq/{job}/model"
    async with mqtt_client(port, tls, "operator", f"fedmq-{job}-operator") as operator:
        await operator.subscribe(model, qos=1)
        forged = await asyncio.to_thread(
            mqtt_attempt,
            port,
            tls,
            "dev-01",
            client_id=f"fedmq-{job}-p-dev-01",
            publish=(model, b"forged-model", True),
            mqtt5=mqtt5,
        )
        assert forged.puback == (NOT_AUTHORIZED if mqtt5 else 0)
        async with mqtt_client(port, tls, "aggregator", f"fedmq-{job}-aggregator") as aggregator:
            await aggregator.publish(model, b"model-v1", qos=1, retain=True)
        assert await collect_until(operator, b"model-v1") == [b"model-v1"]
    # A device arriving later gets the aggregator's retained model, never the forged one.
    async with mqtt_client(port, tls, "dev-02", f"fedmq-{job}-p-dev-02") as device:
        await device.subscribe(model, qos=1)
        assert await collect_until(device, b"model-v1") == [b"model-v1"]


@pytest.mark.mqtt
@pytest.mark.parametrize("kind", ["updates", "evals"])
async def test_mosquitto_devices_cannot_read_updates(
    mosquitto: MosquittoProcess, tls: ssl.SSLContext, job: str, kind: str
) -> None:
    port = mosquitto.ports["mqtts"]
    updates = f"fedmq/{job}/{kind}/+"
    async with (
        mqtt_client(port, tls, "dev-02", f"fedmq-{job}-p-dev-02") as spy,
        mqtt_client(port, tls, "aggregator", f"fedmq-{job}-aggregator") as aggregator,
    ):
        await spy.subscribe(updates, qos=1)  # granted: Mosquitto checks reads per message
        await spy.subscribe(f"fedmq/{job}/model", qos=1)
        await aggregator.subscribe(updates, qos=1)
        async with mqtt_client(port, tls, "dev-01", f"fedmq-{job}-p-dev-01") as device:
            await device.publish(f"fedmq/{job}/{kind}/dev-01", b"update", qos=1)
        assert await collect_until(aggregator, b"update") == [b"update"]
        await aggregator.publish(f"fedmq/{job}/model", b"model-v1", qos=1)
        # The model reaches the spy after the update would have: the update never came.
        assert await collect_until(spy, b"model-v1") == [b"model-v1"]


@pytest.mark.mqtt
async def test_mosquitto_only_the_operator_writes_control(
    mosquitto: MosquittoProcess, tls: ssl.SSLContext, job: str
) -> None:
    port = mosquitto.ports["mqtts"]
    control = f"fedmq/{job}/control"
    async with mqtt_client(port, tls, "aggregator", f"fedmq-{job}-aggregator") as aggregator:
        await aggregator.subscribe(control, qos=1)
        forged = await asyncio.to_thread(
            mqtt_attempt,
            port,
            tls,
            "dev-01",
            client_id=f"fedmq-{job}-p-dev-01",
            publish=(control, b"stop", False),
            mqtt5=True,
        )
        assert forged.puback == NOT_AUTHORIZED
        async with mqtt_client(port, tls, "operator", f"fedmq-{job}-operator") as operator:
            await operator.publish(control, b"pause", qos=1)
        assert await collect_until(aggregator, b"pause") == [b"pause"]


@pytest.mark.parametrize(
    "broker",
    [
        pytest.param("mosquitto", marks=pytest.mark.mqtt),
        pytest.param("rabbit", marks=[pytest.mark.amqp, pytest.mark.mqtt]),
    ],
)
def test_known_limit_any_user_can_take_over_a_client_id(
    broker: str, request: pytest.FixtureRequest, tls: ssl.SSLContext, job: str
) -> None:
    """Neither broker ties an MQTT client id to a username as configured here: dev-02
    connecting as fedmq-<job>-p-dev-01 disconnects dev-01 (MQTT's session takeover).
    It cannot publish as dev-01 (the ACL follows the username), but it can keep dev-01
    offline. docs/deployment.md lists the hardening (Mosquitto's dynamic security plugin
    binds client ids to users)."""
    port = request.getfixturevalue(broker).ports["mqtts"]
    client_id = f"fedmq-{job}-p-dev-01"
    connected, dropped = threading.Event(), threading.Event()
    victim = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, reconnect_on_failure=False
    )
    victim.username_pw_set("dev-01", PASSWORDS["dev-01"])
    victim.tls_set_context(tls)
    victim.on_connect = lambda *_args: connected.set()
    victim.on_disconnect = lambda *_args: dropped.set()
    victim.connect("127.0.0.1", port, keepalive=10)
    victim.loop_start()
    try:
        assert connected.wait(5)
        thief = mqtt_attempt(port, tls, "dev-02", client_id=client_id)
        assert thief.connack == "Success"
        assert dropped.wait(5), "the first connection with this client id survived"
    finally:
        victim.disconnect()
        victim.loop_stop()

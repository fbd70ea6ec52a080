"""The MQTT transport against the real Mosquitto: manual PUBACK, retained model, outages.

The restart test runs a Mosquitto of its own (free port, persistence in a temp
folder) and SIGTERMs it mid-test, so the shared broker is never disturbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import pytest

from fedmq.errors import (
    BrokerUnavailable,
    ClosedResourceError,
    PayloadTooLarge,
    Reason,
    RejectedUpdate,
)
from fedmq.transport import Delivery, TransportConfig, connect_aggregator, connect_participant
from fedmq.transport.mqtt import MqttAggregator, MqttParticipant, mqtt_topics
from tests.integration.aggregators import running
from tests.integration.brokers import forget_mqtt_job, next_within, nothing_within
from tests.updates import delta, update

pytestmark = pytest.mark.mqtt

LIMIT = 256 * 1024
PARTICIPANTS = ("p1", "p2", "p9", "late", "victim-01")  # every participant id these tests use


def _config(url: str, job: str, **overrides: Any) -> TransportConfig:
    options: dict[str, Any] = {
        "max_message_bytes": LIMIT,
        "reconnect_initial_s": 0.05,
        "reconnect_max_s": 0.5,
        "connect_timeout_s": 5.0,
    }
    options.update(overrides)
    return TransportConfig(url=url, job=job, **options)


@pytest.fixture
async def config(mqtt_url: str, job: str) -> AsyncIterator[TransportConfig]:
    yield _config(mqtt_url, job)
    await forget_mqtt_job(mqtt_url, job, PARTICIPANTS)


# -- round trips -----------------------------------------------------------------


async def test_update_round_trip_with_ack(config: TransportConfig) -> None:
    agg_t, part_t = connect_aggregator(config), connect_participant(config, "p1")
    assert isinstance(agg_t, MqttAggregator) and isinstance(part_t, MqttParticipant)
    async with agg_t as agg, part_t as part:
        assert part.connected
        await part.publish_update(b"update-1")
        delivery: Delivery = await next_within(agg.updates())
        assert delivery.body == b"update-1"
        assert delivery.participant_hint == "p1"
        await delivery.ack()
    # Acked means PUBACKed: the persistent session has nothing to redeliver.
    async with MqttAggregator(config) as agg:
        assert await nothing_within(agg.updates(), 0.3)


async def test_unacked_update_is_redelivered_after_reopen(config: TransportConfig) -> None:
    async with MqttParticipant(config, "p1") as part:
        # The aggregator's session must exist for QoS 1 messages to be queued for it.
        async with MqttAggregator(config) as agg:
            for i in range(3):
                await part.publish_update(b"u%d" % i)
            updates = agg.updates()
            received = [await next_within(updates) for _ in range(3)]
            assert [d.body for d in received] == [b"u0", b"u1", b"u2"]
            await received[0].ack()
        # Settling after the connection closed does not raise: the broker redelivers.
        await received[1].ack()
        async with MqttAggregator(config) as agg:
            updates = agg.updates()
            again = [await next_within(updates) for _ in range(2)]
            assert sorted(d.body for d in again) == [b"u1", b"u2"]
            for d in again:
                await d.ack()
            assert await nothing_within(updates, 0.3)


async def test_updates_wait_at_the_broker_while_the_aggregator_is_away(
    config: TransportConfig,
) -> None:
    async with MqttAggregator(config):
        pass  # creates the persistent session and its subscription
    async with MqttParticipant(config, "p2") as part:
        await part.publish_update(b"queued")
    async with MqttAggregator(config) as agg:
        delivery = await next_within(agg.updates())
        assert (delivery.body, delivery.participant_hint) == (b"queued", "p2")
        await delivery.ack()


# -- models ----------------------------------------------------------------------


async def test_late_joiner_gets_current_model_at_once(config: TransportConfig) -> None:
    async with MqttAggregator(config) as agg:
        for version in (1, 2, 3):
            await agg.publish_model(b"model-%d" % version, version=version)
    async with MqttParticipant(config, "late") as part:
        models = part.models()
        assert await next_within(models, 2.0) == b"model-3"  # the retained one, at once
        assert await nothing_within(models, 0.2)


async def test_models_stream_through(config: TransportConfig) -> None:
    async with MqttAggregator(config) as agg, MqttParticipant(config, "p1") as part:
        models = part.models()
        for version in range(1, 6):
            body = b"model-%d" % version
            await agg.publish_model(body, version=version)
            assert await next_within(models) == body


# -- limits and rejections -------------------------------------------------------


async def test_payload_too_large_is_refused_before_sending(config: TransportConfig) -> None:
    async with MqttAggregator(config) as agg, MqttParticipant(config, "p1") as part:
        with pytest.raises(PayloadTooLarge):
            await part.publish_update(b"x" * (LIMIT + 1))
        with pytest.raises(PayloadTooLarge):
            await agg.publish_model(b"x" * (LIMIT + 1), version=1)
        await part.publish_update(b"x" * LIMIT)
        delivery = await next_within(agg.updates())
        assert delivery.body == b"x" * LIMIT
        await delivery.ack()
        assert agg.sessions == 1 and part.sessions == 1


async def test_reject_makes_the_reason_visible(config: TransportConfig, mqtt_url: str) -> None:
    parts = urlsplit(mqtt_url)
    async with (
        aiomqtt.Client(parts.hostname or "127.0.0.1", parts.port or 1883) as operator,
        MqttAggregator(config) as agg,
        MqttParticipant(config, "p9") as part,
    ):
        await operator.subscribe(mqtt_topics(config.job).rejected, qos=1)
        await part.publish_update(b"bad-update")
        delivery = await next_within(agg.updates())
        await delivery.reject(RejectedUpdate(Reason.BAD_SIGNATURE, "key p9 unknown"))
        message = await asyncio.wait_for(anext(operator.messages), 5)
        record = json.loads(message.payload)
        assert record == {
            "reason": "bad_signature",
            "detail": "key p9 unknown",
            "participant": "p9",
            "size": len(b"bad-update"),
        }
    # Rejected means settled: nothing comes back.
    async with MqttAggregator(config) as agg:
        assert await nothing_within(agg.updates(), 0.3)


# -- a broker of our own, killed and restarted ----------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Mosquitto:
    """A throwaway Mosquitto with persistence in ``folder``, on its own port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.conf = folder / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {folder}/",
            f"log_dest file {folder}/mosquitto.log",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to 'mosquitto', who cannot write here
        self.conf.write_text("\n".join(lines) + "\n")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            assert self._proc.poll() is None, "mosquitto exited at start"
            assert time.monotonic() < deadline, "mosquitto did not listen"
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM: Mosquitto saves its persistence file on the way out."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.slow
async def test_broker_restart_is_survived_by_both_sides(own_mosquitto: Mosquitto, job: str) -> None:
    config = _config(own_mosquitto.url, job)
    async with MqttAggregator(config) as agg, MqttParticipant(config, "p1") as part:
        updates, models = agg.updates(), part.models()
        await agg.publish_model(b"model-1", version=1)
        assert await next_within(models) == b"model-1"

        await part.publish_update(b"acked")
        await (await next_within(updates)).ack()
        await part.publish_update(b"in-flight")
        in_flight = await next_within(updates)  # received, not yet applied when the broker dies

        own_mosquitto.stop()
        async with asyncio.timeout(5):
            while part.connected or agg.connected:  # noqa: ASYNC110 - a property, no event to await
                await asyncio.sleep(0.02)
        during = asyncio.create_task(part.publish_update(b"during"), name="publish-during")
        await asyncio.sleep(0.3)
        assert not during.done()  # waits for the broker rather than failing
        await in_flight.ack()  # its connection is gone: a no-op, the session redelivers it
        own_mosquitto.start()

        await asyncio.wait_for(during, 15)
        got: set[bytes] = set()
        async with asyncio.timeout(15):
            while got != {b"in-flight", b"during"}:
                delivery = await anext(updates)
                got.add(delivery.body)
                await delivery.ack()
        assert agg.sessions == 2 and part.sessions == 2

        # The model iterator kept going: the retained model comes again, then the new one.
        await agg.publish_model(b"model-2", version=2)
        async with asyncio.timeout(10):
            while (latest := await anext(models)) != b"model-2":
                assert latest == b"model-1"

    # Queued for an absent aggregator, across a broker restart (persistent session on disk).
    async with MqttParticipant(config, "p1") as part:
        await part.publish_update(b"queued-across-restart")
    own_mosquitto.stop()
    own_mosquitto.start()
    async with MqttAggregator(config) as agg, MqttParticipant(config, "p2") as late:
        delivery = await next_within(agg.updates())
        assert delivery.body == b"queued-across-restart"
        await delivery.ack()
        assert await next_within(late.models()) == b"model-2"  # retained model survived too


async def test_unreachable_broker_is_broker_unavailable(job: str) -> None:
    config = _config(f"mqtt://127.0.0.1:{_free_port()}", job, connect_timeout_s=0.5)
    aggregator = MqttAggregator(config)
    with pytest.raises(BrokerUnavailable):
        await aggregator.__aenter__()
    with pytest.raises(ClosedResourceError):  # a failed open counts as closed
        await aggregator.__aenter__()


async def test_close_ends_a_publish_waiting_for_the_broker(
    own_mosquitto: Mosquitto, job: str
) -> None:
    async with MqttParticipant(_config(own_mosquitto.url, job), "p1") as part:
        own_mosquitto.stop()
        async with asyncio.timeout(5):
            while part.connected:  # noqa: ASYNC110 - a property, no event to await
                await asyncio.sleep(0.02)
        pending = asyncio.create_task(part.publish_update(b"never"), name="publish-pending")
        await asyncio.sleep(0.2)
        assert not pending.done()
    with pytest.raises(ClosedResourceError):
        await pending


# -- hostile devices and returning devices (issue 9) ------------------------------


@contextlib.asynccontextmanager
async def _raw_client(url: str) -> AsyncIterator[aiomqtt.Client]:
    """A client of its own, as a hostile device would use (anonymous on the test broker)."""
    parts = urlsplit(url)
    async with aiomqtt.Client(parts.hostname or "127.0.0.1", parts.port or 1883) as client:
        yield client


async def _until(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_update_on_an_empty_topic_level_is_refused(
    config: TransportConfig, mqtt_url: str
) -> None:
    # Under the ACL ``fedmq/+/updates/%u`` the topic level is the authenticated sender:
    # an update on ``updates/`` (empty level) names nobody and must not pass as anyone.
    topics = mqtt_topics(config.job)
    spoof = update("victim-01", 2**64 - 1, 0, delta(1.0))
    async with (
        running(config) as aggregator,
        _raw_client(mqtt_url) as attacker,
        MqttParticipant(config, "victim-01") as victim,
    ):
        await attacker.publish(topics.updates(""), spoof, qos=1)
        # One level deeper: the subscription (``updates/+``) never lets it in.
        await attacker.publish(topics.updates("victim-01/x"), spoof, qos=1)
        await _until(lambda: aggregator.stats.received >= 1, 10, "the spoofed update")
        for seq in (1, 2):
            await victim.publish_update(update("victim-01", seq, 0, delta(0.5)))
        await _until(lambda: aggregator.stats.received >= 3, 10, "the victim's updates")
        await asyncio.sleep(0.3)
        assert aggregator.stats.received == 3
        assert aggregator.stats.rejected == {"participant_mismatch": 1}
        assert aggregator.stats.applied == 2  # the victim is not locked out


def live_socket(transport: MqttAggregator | MqttParticipant) -> socket.socket:
    """The socket of the transport's current connection (paho's, under aiomqtt)."""
    assert transport._supervisor is not None
    session = transport._supervisor.current
    assert session is not None
    sock = session.client._client.socket()
    assert isinstance(sock, socket.socket)  # ssl.SSLSocket on mqtts://
    return sock


async def test_every_connection_has_tcp_nodelay(config: TransportConfig) -> None:
    # Nagle's algorithm held each small PUBACK behind the broker's delayed ACK (~40 ms).
    async with MqttAggregator(config) as agg, MqttParticipant(config, "p1") as part:
        for transport in (agg, part):
            sock = live_socket(transport)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.slow
async def test_honest_updates_survive_a_flood(config: TransportConfig, mqtt_url: str) -> None:
    # A hostile device publishes junk at a sustained 1000 messages/s, while an honest
    # device publishes 10 updates. Refusals now cost no broker round trip (over 2000/s
    # here); before, each waited for the rejection record's PUBACK, often ~44 ms behind
    # Nagle and a delayed ACK: about 120 refusals/s at this rate, the backlog outgrew
    # Mosquitto's queue (max_queued_messages, 1000 by default), which then dropped
    # messages it had already acknowledged, honest ones included.
    junk, rate, honest = 5000, 1000, 10
    topics = mqtt_topics(config.job)
    async with (
        running(config) as aggregator,
        _raw_client(mqtt_url) as attacker,
        MqttParticipant(config, "p1") as device,
    ):

        async def flood() -> None:
            started = time.monotonic()
            for i in range(junk):
                await attacker.publish(topics.updates("p9"), b"\xc1junk %d" % i, qos=1)
                ahead = i / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)

        async def updates() -> None:
            for seq in range(honest):
                await asyncio.sleep(junk / rate / (honest + 1))
                base = aggregator.version  # as a device holding the latest model
                await device.publish_update(update("p1", seq, base, delta(0.01)))

        async with asyncio.TaskGroup() as tg:
            tg.create_task(flood(), name="flood")
            tg.create_task(updates(), name="honest")
        stats = aggregator.stats
        with contextlib.suppress(AssertionError):  # the counts below say what is missing
            await _until(
                lambda: stats.applied + stats.dropped >= junk + honest, 30, "the last refusal"
            )
        assert (stats.applied, dict(stats.rejected)) == (honest, {"undecodable": junk})


async def test_returning_device_gets_the_retained_keyframe_not_every_model(
    config: TransportConfig, mqtt_url: str
) -> None:
    # A device that was away needs only the newest model: the retained keyframe, then
    # the deltas published after it; not the backlog of everything it missed, which a
    # persistent session would queue for it (up to max_queued_messages) while it is away.
    async with MqttParticipant(config, "p1") as part:
        assert part.connected  # subscribed, then gone
    async with MqttAggregator(config) as agg:
        for version in range(1, 51):  # a keyframe every 10 versions, deltas between
            keyframe = version % 10 == 1
            await agg.publish_model(b"model-%d" % version, version=version, keyframe=keyframe)
        # What the broker kept for the device: resume its session without subscribing.
        parts = urlsplit(mqtt_url)
        async with aiomqtt.Client(
            parts.hostname or "127.0.0.1",
            parts.port or 1883,
            identifier=f"fedmq-{config.job}-p-p1",
            clean_session=False,
        ) as probe:
            queued = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    async for message in probe.messages:
                        queued.append(message.payload)
        assert queued == []  # before: all 50 models
        async with MqttParticipant(config, "p1") as device:
            models = device.models()
            assert await next_within(models, 5.0) == b"model-41"  # the retained keyframe
            assert await nothing_within(models, 0.3)
            await agg.publish_model(b"model-51", version=51, keyframe=False)
            assert await next_within(models, 5.0) == b"model-51"  # then the deltas after it


def _start_aggregator(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``fedmq aggregator`` as its own process, its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fedmq.cli", "aggregator", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _peak_rss_mib(pid: int) -> float:
    """The process's peak resident set size so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.mark.slow
async def test_oversize_updates_are_refused_without_being_held(
    config: TransportConfig, mqtt_url: str, tmp_path: Path
) -> None:
    # 32 junk messages of 16 MiB against a limit of 1 MiB: each must be dropped as it
    # arrives (and refused as too_large), not held until the aggregator gets to it.
    count, size, limit = 32, 16 * 1024 * 1024, 1024 * 1024
    topics = mqtt_topics(config.job)
    process = _start_aggregator(
        [
            f"--broker={mqtt_url}",
            f"--job={config.job}",
            "--model=mlp",
            "--eval-every=0",
            f"--max-message-bytes={limit}",
        ],
        tmp_path / "aggregator.log",
    )
    try:
        async with _raw_client(mqtt_url) as client:
            await client.subscribe(topics.model, qos=1)
            await client.subscribe(topics.rejected, qos=1)
            messages = client.messages
            async with asyncio.timeout(120):  # importing torch on a loaded machine
                while (await anext(messages)).topic.value != topics.model:
                    pass  # the first model is out: the aggregator is subscribed
            await asyncio.sleep(1.0)
            before = _peak_rss_mib(process.pid)
            junk = b"\xc1" * size
            for _ in range(count):
                await client.publish(topics.updates("p9"), junk, qos=1)
            del junk
            records: list[dict[str, Any]] = []
            async with asyncio.timeout(60):
                while len(records) < count:
                    message = await anext(messages)
                    if message.topic.value == topics.rejected:
                        records.append(json.loads(message.payload))
            peak = _peak_rss_mib(process.pid)
    finally:
        process.terminate()
        process.wait(30)
    assert [(r["reason"], r["size"]) for r in records] == [("too_large", size)] * count
    # Reading one message costs a few times its size (paho copies the packet twice);
    # before, the broker's whole in-flight window of them (20 x 16 MiB) was held: the
    # peak grew by 280-390 MiB, now by 90-125.
    assert peak - before < 192, f"peak RSS grew from {before:.0f} to {peak:.0f} MiB"

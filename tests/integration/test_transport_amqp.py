"""The AMQP transport against the real RabbitMQ: acks, late joiners, rejections, outages.

Faults are real: a TCP proxy whose connections we cut, ``rabbitmqctl stop_app`` /
``start_app`` on the broker itself, a policy that fills the updates queue, a user
without configure permission, and ``max_message_size`` lowered at runtime (each
restored in a ``finally``). The restart test stops the shared broker for a few
seconds: do not run it alongside other users of the same RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest

from fedmq.errors import (
    BrokerUnavailable,
    ClosedResourceError,
    PayloadTooLarge,
    Reason,
    RejectedUpdate,
    TransportError,
)
from fedmq.transport import Delivery, TransportConfig, connect_aggregator, connect_participant
from fedmq.transport.amqp import (
    DEAD_LETTER_EXCHANGE,
    AmqpAggregator,
    AmqpParticipant,
    amqp_names,
)
from tests.integration.brokers import (
    TcpProxy,
    delete_job_queues,
    next_within,
    nothing_within,
    via_proxy,
)

pytestmark = pytest.mark.amqp

LIMIT = 256 * 1024


def _config(url: str, job: str, **overrides: Any) -> TransportConfig:
    options: dict[str, Any] = {
        "max_message_bytes": LIMIT,
        "prefetch": 8,
        "reconnect_initial_s": 0.05,
        "reconnect_max_s": 1.0,
        "connect_timeout_s": 5.0,
    }
    options.update(overrides)
    return TransportConfig(url=url, job=job, **options)


@pytest.fixture
async def config(amqp_url: str, job: str) -> AsyncIterator[TransportConfig]:
    yield _config(amqp_url, job)
    await delete_job_queues(amqp_url, job)


async def _ready_count(url: str, queue: str) -> int:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count


# -- round trips -----------------------------------------------------------------


async def test_update_round_trip_with_ack(config: TransportConfig, amqp_url: str) -> None:
    agg_t, part_t = connect_aggregator(config), connect_participant(config, "p1")
    assert isinstance(agg_t, AmqpAggregator) and isinstance(part_t, AmqpParticipant)
    async with agg_t as agg, part_t as part:
        assert part.connected
        await part.publish_update(b"update-1")
        delivery: Delivery = await next_within(agg.updates())
        assert delivery.body == b"update-1"
        assert delivery.participant_hint == "p1"
        await delivery.ack()
    assert await _ready_count(amqp_url, amqp_names(config.job).updates) == 0


async def test_unacked_update_is_redelivered_after_reopen(
    config: TransportConfig, amqp_url: str
) -> None:
    async with AmqpParticipant(config, "p1") as part:
        for i in range(3):
            await part.publish_update(b"u%d" % i)
    async with AmqpAggregator(config) as agg:
        updates = agg.updates()
        received = [await next_within(updates) for _ in range(3)]
        assert [d.body for d in received] == [b"u0", b"u1", b"u2"]
        await received[0].ack()
    # Settling on a closed transport's dead channel does not raise: the broker redelivers.
    await received[1].ack()
    async with AmqpAggregator(config) as agg:
        updates = agg.updates()
        again = [await next_within(updates) for _ in range(2)]
        assert sorted(d.body for d in again) == [b"u1", b"u2"]
        for d in again:
            await d.ack()
        assert await nothing_within(updates, 0.3)


async def test_prefetch_bounds_unacked_deliveries(amqp_url: str, job: str) -> None:
    config = _config(amqp_url, job, prefetch=2)
    try:
        async with AmqpAggregator(config) as agg, AmqpParticipant(config, "p1") as part:
            for i in range(3):
                await part.publish_update(b"u%d" % i)
            updates = agg.updates()
            first, _second = await next_within(updates), await next_within(updates)
            assert await nothing_within(updates, 0.3)
            await first.ack()
            assert (await next_within(updates)).body == b"u2"
    finally:
        await delete_job_queues(amqp_url, job)


# -- models ----------------------------------------------------------------------


async def test_late_joiner_gets_current_model_at_once(config: TransportConfig) -> None:
    async with AmqpAggregator(config) as agg:
        for version in (1, 2, 3):
            await agg.publish_model(b"model-%d" % version, version=version)
    async with AmqpParticipant(config, "late") as part:
        models = part.models()
        seen = [await next_within(models, 2.0)]  # at once, no new publish needed
        # The last stream chunk may hold a few older ones first; the newest comes last.
        with contextlib.suppress(TimeoutError):
            while True:
                seen.append(await asyncio.wait_for(anext(models), 0.3))
        assert seen[-1] == b"model-3"


async def test_models_stream_through(config: TransportConfig) -> None:
    async with AmqpAggregator(config) as agg, AmqpParticipant(config, "p1") as part:
        models = part.models()
        for version in range(1, 6):
            body = b"model-%d" % version
            await agg.publish_model(body, version=version)
            # Reading right after each publish sees every version, in order.
            assert await next_within(models) == body


# -- limits and rejections -------------------------------------------------------


async def test_payload_too_large_is_refused_before_sending(
    config: TransportConfig, amqp_url: str
) -> None:
    async with AmqpAggregator(config) as agg, AmqpParticipant(config, "p1") as part:
        with pytest.raises(PayloadTooLarge):
            await part.publish_update(b"x" * (LIMIT + 1))
        with pytest.raises(PayloadTooLarge):
            await agg.publish_model(b"x" * (LIMIT + 1), version=1)
        await part.publish_update(b"x" * LIMIT)  # exactly the limit goes through
        assert (await next_within(agg.updates())).body == b"x" * LIMIT
        assert part.sessions == 1  # no reconnect was needed
    assert await _ready_count(amqp_url, amqp_names(config.job).updates) == 1


async def test_reject_makes_the_reason_visible(config: TransportConfig, amqp_url: str) -> None:
    async with AmqpAggregator(config) as agg, AmqpParticipant(config, "p9") as part:
        await part.publish_update(b"bad-update")
        delivery = await next_within(agg.updates())
        await delivery.reject(RejectedUpdate(Reason.NORM_BOUND, "norm 12.5 > 10"))
    names = amqp_names(config.job)
    assert await _ready_count(amqp_url, names.updates) == 0
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(names.rejected, passive=True)
        message = await queue.get(timeout=5)
        assert message is not None
        await message.ack()
    assert message.body == b"bad-update"
    assert message.headers["reason"] == "norm_bound"
    assert message.headers["detail"] == "norm 12.5 > 10"
    assert message.headers["participant"] == "p9"
    assert message.headers["original-size"] == len(b"bad-update")
    assert message.headers["original-user-id"] == "guest"  # the broker-verified sender


async def test_dead_letters_reach_the_rejected_queue_when_the_broker_has_fedmq_dlx(
    config: TransportConfig, amqp_url: str
) -> None:
    """Deployments (broker_config/definitions.json) dead-letter the updates queue to
    fedmq.dlx; the aggregator binds its rejected queue there when the exchange exists."""
    names = amqp_names(config.job)
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        # auto_delete: it goes away with the last binding, i.e. when the fixture's cleanup
        # deletes this job's rejected queue.
        dlx = await channel.declare_exchange(
            DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.DIRECT, auto_delete=True
        )
        async with AmqpAggregator(config):
            await dlx.publish(aio_pika.Message(b"dead"), routing_key=names.updates)
        queue = await channel.declare_queue(names.rejected, passive=True)
        message = await queue.get(timeout=5)
        assert message is not None and message.body == b"dead"
        await message.ack()


async def test_participant_accepts_only_models_of_the_configured_publisher(
    config: TransportConfig, amqp_url: str
) -> None:
    """RabbitMQ verifies user_id, so participants can drop models not from the aggregator."""
    async with AmqpAggregator(config) as agg:  # logs in as guest
        await agg.publish_model(b"model-1", version=1)
    trusting = _config(amqp_url, config.job, model_publisher="guest")
    async with AmqpParticipant(trusting, "p1") as part:
        assert await next_within(part.models()) == b"model-1"
    picky = _config(amqp_url, config.job, model_publisher="aggregator")
    async with AmqpParticipant(picky, "p2") as part:
        assert await nothing_within(part.models(), 0.5)


def _rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return done.stdout


async def test_broker_side_size_limit_is_payload_too_large(
    config: TransportConfig, amqp_url: str
) -> None:
    """A broker limit below ours (misconfiguration) still surfaces as PayloadTooLarge."""
    original = await asyncio.to_thread(
        _rabbitmqctl, "eval", "application:get_env(rabbit, max_message_size)."
    )
    assert original.startswith("{ok,"), original
    limit = int(original.strip()[4:-1])
    await asyncio.to_thread(
        _rabbitmqctl, "eval", "application:set_env(rabbit, max_message_size, 100000)."
    )
    try:
        async with AmqpParticipant(config, "p1") as part:
            with pytest.raises(PayloadTooLarge, match="max_message_size"):
                await part.publish_update(b"x" * 150_000)
            await part.publish_update(b"small")  # the transport recovered by itself
    finally:
        await asyncio.to_thread(
            _rabbitmqctl, "eval", f"application:set_env(rabbit, max_message_size, {limit})."
        )
    assert await _ready_count(amqp_url, amqp_names(config.job).updates) == 1


async def test_full_updates_queue_makes_publish_wait(
    config: TransportConfig, amqp_url: str
) -> None:
    """With the deployment's overflow=reject-publish the broker nacks; publish waits."""
    policy = f"fedmq-test-{config.job}"
    pattern = f"^fedmq\\.{config.job}\\.updates$"
    definition = '{"max-length": 1, "overflow": "reject-publish"}'
    await asyncio.to_thread(
        _rabbitmqctl, "set_policy", policy, pattern, definition, "--apply-to", "queues"
    )
    try:
        async with AmqpParticipant(config, "p1") as part:
            await part.publish_update(b"u0")
            blocked = asyncio.create_task(part.publish_update(b"u1"), name="publish-blocked")
            await asyncio.sleep(0.5)
            assert not blocked.done()  # nacked and retried, not lost, not an error
            async with AmqpAggregator(config) as agg:
                updates = agg.updates()
                first = await next_within(updates)
                await first.ack()
                await asyncio.wait_for(blocked, 10)
                assert (await next_within(updates)).body == b"u1"
            assert part.sessions == 1  # a nack is not a reason to reconnect
    finally:
        await asyncio.to_thread(_rabbitmqctl, "clear_policy", policy)


async def test_device_without_configure_permission_waits_for_the_queues(
    config: TransportConfig, amqp_url: str
) -> None:
    """Like the devices of broker_config/definitions.json: may publish and read, not declare."""
    user, password = f"fedmq-{config.job}", "device-secret"
    await asyncio.to_thread(_rabbitmqctl, "add_user", user, password)
    try:
        await asyncio.to_thread(_rabbitmqctl, "set_permissions", "-p", "/", user, "^$", ".*", ".*")
        parts = urlsplit(amqp_url)
        device_url = urlunsplit(
            parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port or 5672}")
        )
        device = AmqpParticipant(_config(device_url, config.job, connect_timeout_s=15), "p1")
        # Started first: its passive declares fail until the aggregator creates the queues.
        entering = asyncio.create_task(device.__aenter__(), name="device-enter")
        await asyncio.sleep(0.3)
        assert not entering.done()
        async with AmqpAggregator(config) as agg:
            await asyncio.wait_for(entering, 10)
            try:
                await agg.publish_model(b"model-1", version=1)
                assert await next_within(device.models()) == b"model-1"
                await device.publish_update(b"from-device")
                delivery = await next_within(agg.updates())
                assert (delivery.body, delivery.participant_hint) == (b"from-device", "p1")
                await delivery.ack()
            finally:
                await device.__aexit__(None, None, None)
    finally:
        await asyncio.to_thread(_rabbitmqctl, "delete_user", user)


# -- faults ----------------------------------------------------------------------


async def test_tcp_cut_ack_of_dead_delivery_is_harmless(
    config: TransportConfig, amqp_url: str
) -> None:
    host = urlsplit(amqp_url)
    async with TcpProxy(host.hostname or "127.0.0.1", host.port or 5672) as proxy:
        proxied = _config(via_proxy(amqp_url, proxy.port), config.job)
        async with AmqpAggregator(proxied) as agg, AmqpParticipant(config, "p1") as part:
            await part.publish_update(b"in-flight")
            updates = agg.updates()
            before = await next_within(updates)
            proxy.cut()
            # The aggregator applied it and acks, but the channel is gone: no exception.
            await before.ack()
            after = await next_within(updates, 10)
            assert after.body == b"in-flight"  # redelivered on the new connection
            await after.ack()
            # The consumer is back before the new session finishes its setup and is counted.
            async with asyncio.timeout(5):
                while agg.sessions < 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            await agg.publish_model(b"model-after-cut", version=1)
            assert await next_within(part.models()) == b"model-after-cut"
    assert await _ready_count(amqp_url, amqp_names(config.job).updates) == 0


async def _wait_port(url: str, *, up: bool, within: float) -> None:
    parts = urlsplit(url)
    deadline = time.monotonic() + within
    while True:
        try:
            _reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 5672)
        except OSError:
            is_up = False
        else:
            writer.close()
            await writer.wait_closed()
            is_up = True
        if is_up == up:
            return
        assert time.monotonic() < deadline, f"broker port still {'down' if up else 'up'}"
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_broker_restart_is_survived_by_both_sides(
    config: TransportConfig, amqp_url: str
) -> None:
    async with AmqpAggregator(config) as agg, AmqpParticipant(config, "p1") as part:
        updates, models = agg.updates(), part.models()
        await agg.publish_model(b"model-1", version=1)
        assert await next_within(models) == b"model-1"
        await part.publish_update(b"acked")
        await (await next_within(updates)).ack()
        await part.publish_update(b"in-flight")
        in_flight = await next_within(updates)  # received, not yet applied when the broker stops
        try:
            await asyncio.to_thread(_rabbitmqctl, "stop_app")
            await _wait_port(amqp_url, up=False, within=20)
            assert not part.connected
            # Published during the outage: waits, then goes through after the restart.
            during = asyncio.create_task(part.publish_update(b"during"), name="publish-during")
            await asyncio.sleep(0.5)
            assert not during.done()
            await in_flight.ack()  # its channel is gone: a no-op, the broker redelivers it
        finally:
            await asyncio.to_thread(_rabbitmqctl, "start_app")
        await asyncio.wait_for(during, 30)
        await part.publish_update(b"after")
        got: set[bytes] = set()
        async with asyncio.timeout(20):
            while got != {b"in-flight", b"during", b"after"}:
                delivery = await anext(updates)
                got.add(delivery.body)
                await delivery.ack()
        async with asyncio.timeout(10):
            # The consumer is back (and may deliver) before the new session is counted.
            while agg.sessions < 2 or part.sessions < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

        # The models iterator kept going across the reconnect; the newest comes last.
        await agg.publish_model(b"model-2", version=2)
        async with asyncio.timeout(10):
            while (latest := await anext(models)) != b"model-2":
                assert latest == b"model-1"
    assert await _ready_count(amqp_url, amqp_names(config.job).updates) == 0


# -- first connection ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_unreachable_broker_is_broker_unavailable(job: str) -> None:
    config = _config(f"amqp://guest:guest@127.0.0.1:{_free_port()}/", job, connect_timeout_s=0.5)
    participant = AmqpParticipant(config, "p1")
    with pytest.raises(BrokerUnavailable):
        await participant.__aenter__()
    with pytest.raises(ClosedResourceError):  # a failed open counts as closed
        await participant.__aenter__()


async def test_bad_credentials_fail_fast(amqp_url: str, job: str) -> None:
    parts = urlsplit(amqp_url)
    bad = urlunsplit(parts._replace(netloc=f"guest:wrong@{parts.hostname}:{parts.port or 5672}"))
    started = time.monotonic()
    with pytest.raises(TransportError) as raised:
        async with AmqpAggregator(_config(bad, job)):
            pass
    assert not isinstance(raised.value, BrokerUnavailable)
    assert time.monotonic() - started < 3.0  # not retried until connect_timeout_s
    assert "wrong" not in str(raised.value)  # the password never reaches a message

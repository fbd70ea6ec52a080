"""Evaluation reports (``publish_eval`` -> ``evals()``) over the real RabbitMQ and Mosquitto.

Every test runs on both brokers (the ``broker`` fixture), then a few check what only one
of them does: how AMQP finds the sender, what it does with a report no queue takes, the
evals queue's bound; the MQTT topic level as the sender. Connections are cut for real by
a TCP proxy.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiomqtt
import aiormq
import pytest

from fedmq.errors import PayloadTooLarge, Reason
from fedmq.transport import (
    EvalReport,
    TransportConfig,
    connect_aggregator,
    connect_participant,
)
from fedmq.transport.amqp import EVALS_ARGUMENTS, amqp_names
from fedmq.transport.mqtt import mqtt_topics
from fedmq.wire import EVAL_LIMITS, EvalEnvelope, encode_eval
from tests.integration.brokers import (
    TcpProxy,
    delete_job_queues,
    forget_mqtt_job,
    next_within,
    nothing_within,
    via_proxy,
)

EVAL_LIMIT = EVAL_LIMITS.max_message_bytes


def _config(url: str, job: str, **overrides: Any) -> TransportConfig:
    options: dict[str, Any] = {
        "max_message_bytes": 256 * 1024,
        "reconnect_initial_s": 0.05,
        "reconnect_max_s": 0.5,
        "connect_timeout_s": 5.0,
    }
    options.update(overrides)
    return TransportConfig(url=url, job=job, **options)


def _report(participant: str, version: int) -> bytes:
    return encode_eval(
        EvalEnvelope(
            participant=participant,
            version=version,
            num_examples=100,
            metrics={"accuracy": 0.5, "loss": 1.25},
            created=1_700_000_000.0,
        )
    )


async def _publish_raw(url: str, job: str, participant: str, body: bytes) -> None:
    """What a device of another language does, from docs/transports.md alone."""
    if url.startswith("amqp"):
        names = amqp_names(job)
        async with await aio_pika.connect(url) as connection:
            channel = await connection.channel(publisher_confirms=True)
            uplink = await channel.get_exchange(names.uplink, ensure=False)
            await uplink.publish(
                aio_pika.Message(
                    body,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    headers={"participant": participant},
                ),
                routing_key=names.evals,
                mandatory=True,
            )
    else:
        parts = urlsplit(url)
        async with aiomqtt.Client(parts.hostname or "127.0.0.1", parts.port or 1883) as client:
            topic = f"fedmq/{job}/evals/{participant}" if participant else f"fedmq/{job}/evals/"
            await client.publish(topic, body, qos=1)


# -- both brokers -------------------------------------------------------------------------


async def test_a_report_reaches_the_aggregator_with_its_sender(broker: str, job: str) -> None:
    config = _config(broker, job)
    body = _report("dev-01", 3)
    async with connect_aggregator(config) as agg, connect_participant(config, "dev-01") as dev:
        await dev.publish_eval(body)
        report = await next_within(agg.evals())
    assert report == EvalReport(body=body, participant_hint="dev-01")


async def test_updates_and_reports_do_not_mix(broker: str, job: str) -> None:
    config = _config(broker, job)
    async with connect_aggregator(config) as agg, connect_participant(config, "dev-01") as dev:
        await dev.publish_update(b"update-1")
        await dev.publish_eval(b"report-1")
        await dev.publish_update(b"update-2")
        await dev.publish_eval(b"report-2")
        updates, reports = agg.updates(), agg.evals()
        for expected in (b"update-1", b"update-2"):
            delivery = await next_within(updates)
            assert delivery.body == expected
            await delivery.ack()
        assert [(await next_within(reports)).body for _ in range(2)] == [b"report-1", b"report-2"]
        assert await nothing_within(updates, 0.3)
        assert await nothing_within(reports, 0.1)


async def test_a_report_over_the_eval_limit_is_refused_before_sending(
    broker: str, job: str
) -> None:
    config = _config(broker, job)
    async with connect_aggregator(config) as agg, connect_participant(config, "dev-01") as dev:
        with pytest.raises(PayloadTooLarge, match="EVAL_LIMITS"):
            await dev.publish_eval(bytes(EVAL_LIMIT + 1))
        await dev.publish_eval(bytes(EVAL_LIMIT))  # the limit itself is fine
        report = await next_within(agg.evals())
    assert len(report.body) == EVAL_LIMIT
    assert report.refused is None


async def test_an_oversize_report_is_refused_as_it_arrives(broker: str, job: str) -> None:
    config = _config(broker, job)
    async with connect_aggregator(config) as agg:
        await _publish_raw(broker, job, "dev-01", bytes(EVAL_LIMIT + 1))
        await _publish_raw(broker, job, "dev-01", b"small")
        refused, small = await next_within(agg.evals()), await next_within(agg.evals())
    assert refused.refused is not None and refused.refused.reason is Reason.TOO_LARGE
    assert refused.body == b""  # not held
    assert refused.participant_hint == "dev-01"  # so it can be counted against someone
    assert (small.body, small.refused) == (b"small", None)


async def test_reports_wait_at_the_broker_while_the_aggregator_is_away(
    broker: str, job: str
) -> None:
    config = _config(broker, job)
    async with connect_aggregator(config):
        pass  # its queue, or its persistent session, now exists
    async with connect_participant(config, "dev-01") as dev:
        await dev.publish_eval(b"sent-while-away")
    async with connect_aggregator(config) as agg:
        assert (await next_within(agg.evals())).body == b"sent-while-away"
    async with connect_aggregator(config) as agg:
        assert await nothing_within(agg.evals(), 0.3)  # taken once: acked as handed over


async def test_reports_flow_on_across_cut_connections(broker: str, job: str) -> None:
    parts = urlsplit(broker)
    default_port = 5672 if parts.scheme == "amqp" else 1883
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or default_port) as proxy:
        config = _config(via_proxy(broker, proxy.port), job)
        async with (
            connect_aggregator(config) as agg,
            connect_participant(config, "dev-01") as dev,
        ):
            reports = agg.evals()
            await dev.publish_eval(b"before")
            assert (await next_within(reports)).body == b"before"
            proxy.cut()
            # Both sides are (or will soon be) without a connection: the publish waits for
            # the next one, and the same iterator yields what arrives on it.
            await asyncio.wait_for(dev.publish_eval(b"after"), 10)
            earlier = []
            while (body := (await next_within(reports, 10)).body) != b"after":
                earlier.append(body)
            # MQTT: a PUBACK still in our socket buffer at the cut is lost, so the broker
            # sends that report again (harmless: docs/wire-format.md 12.3). Nothing else.
            assert set(earlier) <= {b"before"}


# -- AMQP ---------------------------------------------------------------------------------


@pytest.mark.amqp
@pytest.mark.parametrize(("identity", "sender"), [("claimed", "dev-01"), ("login", "guest")])
async def test_amqp_report_sender_follows_sender_identity(
    amqp_url: str, job: str, identity: str, sender: str
) -> None:
    """As for updates: the ``participant`` header, or the broker-verified login."""
    try:
        config = _config(amqp_url, job)
        aggregator = _config(amqp_url, job, sender_identity=identity)
        async with connect_aggregator(aggregator) as agg:
            async with connect_participant(config, "dev-01") as dev:
                await dev.publish_eval(b"report")
            report = await next_within(agg.evals())
        assert report.participant_hint == sender
    finally:
        await delete_job_queues(amqp_url, job)


@pytest.mark.amqp
async def test_amqp_report_that_no_queue_takes_is_dropped_without_waiting(
    amqp_url: str, job: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A device never waits on a missing evals queue (an older aggregator, a deleted
    queue): the broker returns the report, the device logs and drops it."""
    config = _config(amqp_url, job)
    try:
        async with connect_participant(config, "dev-01") as dev:
            async with await aio_pika.connect(amqp_url) as connection:
                channel = await connection.channel()
                await channel.queue_delete(amqp_names(job).evals)
            with caplog.at_level(logging.WARNING, "fedmq.transport"):
                await asyncio.wait_for(dev.publish_eval(b"nowhere"), 5)
            assert "no queue is bound for the eval report" in caplog.text
            await dev.publish_update(b"updates-still-flow")  # the connection is fine
    finally:
        await delete_job_queues(amqp_url, job)


@pytest.mark.amqp
async def test_amqp_evals_queue_is_bounded_dropping_the_oldest(amqp_url: str, job: str) -> None:
    """The queue carries its bounds as arguments, so a bare broker bounds it too: declaring
    it with them is a no-op, with anything else is refused as inequivalent."""
    name = amqp_names(job).evals
    try:
        async with connect_aggregator(_config(amqp_url, job)):
            pass
        async with await aio_pika.connect(amqp_url) as connection:
            channel = await connection.channel()
            await channel.declare_queue(name, durable=True, arguments=EVALS_ARGUMENTS)
            with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="inequivalent"):
                await channel.declare_queue(
                    name, durable=True, arguments={**EVALS_ARGUMENTS, "x-max-length": 10**9}
                )
    finally:
        await delete_job_queues(amqp_url, job)
    assert EVALS_ARGUMENTS["x-overflow"] == "drop-head"  # a full queue never nacks a device


# -- MQTT ---------------------------------------------------------------------------------


@pytest.mark.mqtt
async def test_mqtt_report_sender_is_the_topic_level(mqtt_url: str, job: str) -> None:
    """As for updates: under the ACL (``evals/%u``) the level is the login; an empty level
    names nobody, and the aggregator refuses the report (participant_mismatch)."""
    config = _config(mqtt_url, job)
    try:
        async with connect_aggregator(config) as agg:
            await _publish_raw(mqtt_url, job, "", b"nobody")
            await _publish_raw(mqtt_url, job, "dev-02", b"dev-02's")
            hints = [(await next_within(agg.evals())).participant_hint for _ in range(2)]
        assert hints == ["", "dev-02"]
        assert mqtt_topics(job).evals("dev-02") == f"fedmq/{job}/evals/dev-02"
    finally:
        await forget_mqtt_job(mqtt_url, job, [])

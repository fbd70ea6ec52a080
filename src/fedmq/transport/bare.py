"""Bare consumers: receive each update and acknowledge it, nothing else.

The reference the aggregator's ingest rate is measured against (``fedmq bench
--throughput``): the same queue or topic as the aggregator of ``config.job``, the
same window (AMQP prefetch; MQTT the broker's in-flight limit), the same manual
acknowledgements, no decoding. Benchmarks only.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import aio_pika
import aiomqtt

from fedmq.transport._base import TransportConfig
from fedmq.transport.amqp import amqp_names
from fedmq.transport.mqtt import MqttTopics

__all__ = ["bare_consume", "prepare_mqtt_session"]


async def bare_consume(config: TransportConfig, count: int) -> float:
    """Consume and ack ``count`` updates; seconds from the first delivery to the last ack."""
    if config.scheme in ("amqp", "amqps"):
        return await _amqp(config, count)
    return await _mqtt(config, count)


async def _amqp(config: TransportConfig, count: int) -> float:
    names = amqp_names(config.job)
    connection = await aio_pika.connect(config.url)
    done = asyncio.Event()
    seen = 0
    first = 0.0
    last = 0.0
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=config.prefetch)
        queue = await channel.declare_queue(names.updates, durable=True)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen, first, last
            if seen == 0:
                first = time.perf_counter()
            await message.ack()
            seen += 1
            if seen == count:
                last = time.perf_counter()
                done.set()

        tag = await queue.consume(on_message, no_ack=False)
        await done.wait()
        await queue.cancel(tag)
    return last - first


def _client(config: TransportConfig) -> aiomqtt.Client:
    parts = urlsplit(config.url)
    client = aiomqtt.Client(
        parts.hostname or "localhost",
        parts.port or 1883,
        username=parts.username,
        password=parts.password,
        identifier=f"fedmq-{config.job}-aggregator",
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=False,
    )
    client._client.manual_ack_set(True)  # as the aggregator: PUBACK when settled
    return client


async def prepare_mqtt_session(config: TransportConfig) -> None:
    """Create the aggregator's persistent session of ``config.job``, so the broker
    queues updates published before anyone consumes them."""
    async with _client(config) as client:
        await client.subscribe(MqttTopics(config.job).updates_filter, qos=1)


async def _mqtt(config: TransportConfig, count: int) -> float:
    seen = 0
    first = 0.0
    async with _client(config) as client:
        await client.subscribe(MqttTopics(config.job).updates_filter, qos=1)
        async for message in client.messages:
            if seen == 0:
                first = time.perf_counter()
            client._client.ack(message.mid, message.qos)
            seen += 1
            if seen == count:
                return time.perf_counter() - first
    raise RuntimeError("the MQTT connection ended before every update arrived")

"""An update whose participant id breaks the rule is refused, over the real brokers.

The aggregator runs in this process on the real RabbitMQ or Mosquitto. The update is
published raw, as a hostile or foreign client would (fedmq's own participant refuses
the id before it sends anything), under the same id on the topic or header.
"""

from __future__ import annotations

import asyncio

import aio_pika
import aiomqtt
import msgpack
import pytest

from fedmq.aggregator import Aggregator, AggregatorConfig, AggregatorStats
from fedmq.strategies import FedAsyncConfig, StalenessConfig, StrategyConfig
from fedmq.transport import TransportConfig, connect_aggregator, connect_participant
from fedmq.transport.amqp import amqp_names
from fedmq.transport.mqtt import mqtt_topics
from tests.integration.brokers import delete_job_queues, forget_mqtt_job
from tests.updates import INITIAL, delta, update

BAD_ID = "dev.01"  # legal in an MQTT topic level and an AMQP header; breaks routing keys


def _as(pid: str, body: bytes) -> bytes:
    """``body`` with its participant field replaced, encoded as any msgpack client would."""
    envelope = msgpack.unpackb(body, raw=False)
    envelope["participant"] = pid
    packed = msgpack.packb(envelope, use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed


async def _publish_raw(url: str, job: str, pid: str, body: bytes) -> None:
    if url.startswith("amqp"):
        async with await aio_pika.connect(url) as connection:
            channel = await connection.channel()
            message = aio_pika.Message(body, headers={"participant": pid}, delivery_mode=2)
            await channel.default_exchange.publish(message, routing_key=amqp_names(job).updates)
    else:
        host, port = url.removeprefix("mqtt://").split(":")
        async with aiomqtt.Client(host, int(port)) as client:
            await client.publish(mqtt_topics(job).updates(pid), body, qos=1)


@pytest.mark.parametrize(
    "scheme",
    [pytest.param("amqp", marks=pytest.mark.amqp), pytest.param("mqtt", marks=pytest.mark.mqtt)],
)
async def test_an_update_with_a_bad_id_is_refused_with_its_reason(
    request: pytest.FixtureRequest, scheme: str, job: str
) -> None:
    broker = str(request.getfixturevalue(f"{scheme}_url"))
    try:
        stats = await _run(broker, job)
    finally:
        if scheme == "amqp":
            await delete_job_queues(broker, job)
        else:
            await forget_mqtt_job(broker, job, ["dev-01"])
    # before: both applied (version 2), "dev.01" a device like any other
    assert dict(stats.rejected) == {"bad_participant": 1}
    assert stats.applied == 1
    assert stats.participants == {"dev-01"}


async def _run(broker: str, job: str) -> AggregatorStats:
    """A bad-id update, then a good one, through an aggregator on ``broker``."""
    config = TransportConfig(url=broker, job=job)
    strategy = StrategyConfig(
        name="fedasync",
        fedasync=FedAsyncConfig(alpha=0.5, staleness=StalenessConfig(function="constant")),
    )
    async with connect_aggregator(config) as transport, asyncio.TaskGroup() as tg:
        aggregator = Aggregator(
            AggregatorConfig(strategy=strategy, eval_every=0), transport, INITIAL
        )
        task = tg.create_task(aggregator.run(tg), name="aggregator")
        await _publish_raw(broker, job, BAD_ID, _as(BAD_ID, update("dev-01", 1, 0, delta(1.0))))
        async with connect_participant(config, "dev-01") as device:  # and a good one after it
            await device.publish_update(update("dev-01", 1, 0, delta(1.0)))
        async with asyncio.timeout(30):
            while aggregator.stats.applied + sum(aggregator.stats.rejected.values()) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        task.cancel()
    return aggregator.stats

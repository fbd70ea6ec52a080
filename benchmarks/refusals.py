"""How fast an aggregator refuses junk over MQTT, and whether the broker dropped any.

    python benchmarks/refusals.py                        # 5000 junk as fast as possible
    python benchmarks/refusals.py --junk 900 --backlog   # queued first, then drained
    python benchmarks/refusals.py --rate 250             # a sustained flood of 250/s

An in-process aggregator (the tiny two-tensor test model, FedAsync) consumes a job of its
own on the broker; another client publishes undecodable messages (QoS 1) on a device's
update topic. Prints the refusals per second and how many messages never reached the
aggregator: Mosquitto drops what no longer fits in the aggregator's queue
(``max_queued_messages``, 1000 by default), although it acknowledged them. With
``--backlog`` the junk is published while the aggregator is away (keep it under that
limit), and the drain is timed alone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import aiomqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/

from fedmq.transport import TransportConfig
from fedmq.transport.mqtt import MqttAggregator, mqtt_topics
from tests.integration.aggregators import running


async def run(broker: str, junk: int, rate: float, backlog: bool, wait_s: float) -> None:
    job = f"refusals-{uuid.uuid4().hex[:8]}"
    config = TransportConfig(url=broker, job=job)
    topic = mqtt_topics(job).updates("flooder")
    parts = urlsplit(broker)
    host, port = parts.hostname or "127.0.0.1", parts.port or 1883

    async def flood(client: aiomqtt.Client) -> None:
        started = time.monotonic()
        for i in range(junk):
            await client.publish(topic, b"\xc1junk", qos=1)
            ahead = i / rate - (time.monotonic() - started) if rate > 0 else 0
            if ahead > 0:
                await asyncio.sleep(ahead)

    async with MqttAggregator(config):
        pass  # its persistent session and subscription exist from now on
    async with aiomqtt.Client(host, port) as flooder:
        if backlog:
            await flood(flooder)
        async with running(config) as aggregator:
            started = time.monotonic()
            if not backlog:
                await flood(flooder)
            deadline = time.monotonic() + wait_s
            stats = aggregator.stats
            while stats.dropped < junk and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            elapsed = time.monotonic() - started
    refused = stats.dropped
    print(
        f"{refused} of {junk} junk messages refused in {elapsed:.1f} s: "
        f"{refused / elapsed:.0f} refusals/s; {junk - refused} never handled "
        f"(dropped by the broker, or still queued after {wait_s:.0f} s)"
    )
    async with (
        aiomqtt.Client(host, port) as client,
        aiomqtt.Client(host, port, identifier=f"fedmq-{job}-aggregator", clean_session=True),
    ):
        await client.publish(mqtt_topics(job).model, b"", qos=1, retain=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--junk", type=int, default=5000, help="junk messages to publish")
    parser.add_argument("--rate", type=float, default=0, help="messages/s (0: as fast as it can)")
    parser.add_argument("--backlog", action="store_true", help="publish before it consumes")
    parser.add_argument("--wait", type=float, default=40, help="seconds to wait for the rest")
    args = parser.parse_args()
    logging.getLogger("fedmq").setLevel(logging.ERROR)  # not one warning per refusal
    asyncio.run(run(args.broker, args.junk, args.rate, args.backlog, args.wait))


if __name__ == "__main__":
    main()

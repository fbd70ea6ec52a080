"""Aggregator ingest rate against a bare consumer, on RabbitMQ and Mosquitto.

    python benchmarks/throughput.py [--out DIR] [--profile] [--amqp URL] [--mqtt URL]

The same as ``fedmq bench --throughput`` (see ``fedmq.sim.throughput`` for the
method); ``--profile`` also writes a cProfile of the event loop during each
aggregator measurement (``profile-<broker>-<size>.txt``). For the worker threads
too, run it under py-spy: ``py-spy record -r 200 --format raw -o prof.txt --
python benchmarks/throughput.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from fedmq.aggregator import AggregatorConfig, DownlinkConfig
from fedmq.codecs import CodecConfig
from fedmq.sim.throughput import run_throughput
from fedmq.transport import TransportConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs") / time.strftime("tp-%H%M%S"))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--mqtt", default="mqtt://127.0.0.1:1883")
    parser.add_argument(
        "--downlink-codec", default="int4", choices=("none", "float16", "int8", "int4")
    )
    args = parser.parse_args()
    codec = None if args.downlink_codec == "none" else CodecConfig(name=args.downlink_codec)
    return asyncio.run(
        run_throughput(
            TransportConfig(url=args.amqp, job="bench"),
            args.out,
            strategy=AggregatorConfig(downlink=DownlinkConfig(codec=codec)),
            profile=args.profile,
            mqtt_url=args.mqtt,
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())

"""``fedmq bench --throughput``: the aggregator's sustained apply rate against a bare consumer.

For each broker (RabbitMQ, Mosquitto) and each payload size, the same ``count``
update messages are published twice, to two jobs, before anyone consumes them;
then a bare consumer (``fedmq.transport.bare``: receive + ack) drains one job and
the real aggregator (decode -> admit -> FedBuff -> publish the model -> ack) the
other, on the same broker in the same run. Both rates are measured from the first
delivery to the last settled update; the ratio is aggregator / bare.

The model is synthetic: about one million float32 parameters (one 1000x1000 weight
and its bias). The update payloads are about 100 kB (top-k 1.25 % with float32
values) and about 1 MB (int8, blocks of 64).
"""

from __future__ import annotations

import asyncio
import cProfile
import dataclasses
import io
import json
import pstats
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from fedmq.aggregator import Aggregator, AggregatorConfig, AggregatorStats, DownlinkConfig
from fedmq.codecs import CodecConfig, encode_params
from fedmq.strategies import FedBuffConfig, StrategyConfig
from fedmq.transport import TransportConfig, connect_aggregator, connect_participant
from fedmq.transport.bare import bare_consume, prepare_mqtt_session
from fedmq.wire import UpdateEnvelope, encode_update

__all__ = ["PAYLOADS", "SETUP", "markdown_table", "measure", "run_throughput", "synthetic_params"]

_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
_MQTT = "mqtt://127.0.0.1:1883"


@dataclass(frozen=True)
class Payload:
    label: str
    codec: CodecConfig
    count: int  # messages per measurement


PAYLOADS = (
    Payload("100kB", CodecConfig(name="topk", topk_fraction=0.0125, topk_values="float32"), 1500),
    Payload("1MB", CodecConfig(name="int8", block_size=64), 400),
)


def synthetic_params(seed: int = 0) -> dict[str, np.ndarray]:
    """About 1M float32 parameters: a 1000 x 1000 weight and a bias of 1000."""
    rng = np.random.default_rng(seed)
    return {
        "fc.weight": (rng.standard_normal((1000, 1000)) * 0.03).astype(np.float32),
        "fc.bias": np.zeros(1000, dtype=np.float32),
    }


def _bodies(payload: Payload, count: int, buffer_size: int, participants: int) -> list[bytes]:
    """``count`` distinct updates (participant, seq, base) sharing a few encoded deltas."""
    rng = np.random.default_rng(1)
    shapes = synthetic_params()
    tensors = [
        tuple(
            encode_params(
                {
                    k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32)
                    for k, v in shapes.items()
                },
                payload.codec,
            )
        )
        for _ in range(4)
    ]
    bodies = []
    for i in range(count):
        envelope = UpdateEnvelope(
            participant=f"p{i % participants}",
            seq=i // participants,
            # what the aggregator's version will about be when it arrives: staleness ~2
            base_version=max(0, i // buffer_size - 2),
            num_examples=100,
            loss=0.5,
            created=time.time(),
            tensors=tensors[i % len(tensors)],
        )
        bodies.append(encode_update(envelope))
    return bodies


async def _publish(config: TransportConfig, bodies: list[bytes], participants: int) -> None:
    """Publish ``bodies`` in order (participant ``p<i % participants>`` sends body i)."""
    async with _participants(config, participants) as transports:
        for start in range(0, len(bodies), participants):
            chunk = bodies[start : start + participants]
            await asyncio.gather(
                *(transports[k].publish_update(body) for k, body in enumerate(chunk))
            )


class _participants:
    def __init__(self, config: TransportConfig, count: int) -> None:
        self._transports = [connect_participant(config, f"p{k}") for k in range(count)]

    async def __aenter__(self) -> list[Any]:
        for t in self._transports:
            await t.__aenter__()
        return self._transports

    async def __aexit__(self, *exc: object) -> None:
        for t in self._transports:
            await t.__aexit__(None, None, None)


async def _aggregate(
    config: TransportConfig, agg: AggregatorConfig, count: int, profile: cProfile.Profile | None
) -> tuple[float, float, AggregatorStats]:
    """Run the aggregator until ``count`` updates are settled: seconds from the first one,
    and this process's CPU seconds (all threads) over the same span."""
    stats = AggregatorStats()
    first = cpu = 0.0
    async with connect_aggregator(config) as transport, asyncio.TaskGroup() as tg:
        aggregator = Aggregator(agg, transport, synthetic_params(), stats=stats)
        if profile is not None:
            profile.enable()
        task = tg.create_task(aggregator.run(tg), name="aggregator")
        # Polled every 2 ms: the service has no hook for "first delivery" (error < 0.5 %).
        while stats.received == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.002)
        first, cpu = time.perf_counter(), time.process_time()
        while stats.applied + stats.dropped < count:  # noqa: ASYNC110
            await asyncio.sleep(0.002)
        elapsed, cpu = time.perf_counter() - first, time.process_time() - cpu
        if profile is not None:
            profile.disable()
        task.cancel()
    return elapsed, cpu, stats


async def measure(
    url: str,
    payload: Payload,
    *,
    count: int | None = None,
    job: str,
    downlink: DownlinkConfig,
    profile_dir: Path | None = None,
    participants: int = 8,
) -> dict[str, Any]:
    """Bare and aggregator rates for one broker and payload size."""
    count = count or payload.count
    if url.startswith("mqtt"):
        # Mosquitto keeps at most max_queued_messages (default 1000) for a client away.
        count = min(count, 900)
    fedbuff = FedBuffConfig()
    agg = AggregatorConfig(
        strategy=StrategyConfig(name="fedbuff", fedbuff=fedbuff),
        eval_every=0,
        downlink=downlink,
    )
    bodies = _bodies(payload, count, fedbuff.buffer_size, participants)
    bare_cfg = TransportConfig(url=url, job=f"{job}-bare")
    agg_cfg = TransportConfig(url=url, job=f"{job}-agg")
    scheme = bare_cfg.scheme
    if scheme == "mqtt":
        await prepare_mqtt_session(bare_cfg)
        await prepare_mqtt_session(agg_cfg)
    else:  # the aggregator declares its queues; let it, then stop before consuming anything
        await _declare_only(agg_cfg)
    await _publish(bare_cfg, bodies, participants)
    await _publish(agg_cfg, bodies, participants)
    bare_cpu = time.process_time()
    bare_s = await bare_consume(bare_cfg, count)
    bare_cpu = time.process_time() - bare_cpu  # connecting included: a slight overestimate
    profile = cProfile.Profile() if profile_dir is not None else None
    agg_s, agg_cpu, stats = await _aggregate(agg_cfg, agg, count, profile)
    if profile is not None and profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - after the timing
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(40)
        (profile_dir / f"profile-{scheme}-{payload.label}.txt").write_text(text.getvalue())
    size = len(bodies[0])
    return {
        "broker": scheme,
        "payload": payload.label,
        "codec": dataclasses.asdict(payload.codec),
        "message_bytes": size,
        "count": count,
        "bare_s": bare_s,
        "bare_per_s": count / bare_s,
        "aggregator_s": agg_s,
        "aggregator_per_s": count / agg_s,
        "bare_cpu_ms_per_message": bare_cpu / count * 1000,
        "aggregator_cpu_ms_per_update": agg_cpu / count * 1000,
        "ratio": bare_s / agg_s,
        "applied": stats.applied,
        "dropped": dict(stats.rejected),
        "versions": stats.version,
        "models_published": stats.models_published,
        "model_bytes_published": stats.bytes_out,
    }


async def _declare_only(config: TransportConfig) -> None:
    """Let an aggregator transport declare the job's queues, consuming nothing."""
    async with connect_aggregator(dataclasses.replace(config, prefetch=1)):
        pass


async def run_throughput(
    transport: TransportConfig,
    out: Path,
    *,
    strategy: AggregatorConfig,
    profile: bool = False,
    mqtt_url: str = _MQTT,
    repeats: int = 3,
) -> int:
    """Every broker x payload, ``repeats`` times (the median by ratio is reported);
    writes throughput.json and throughput.md in ``out``."""
    console = Console()
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    stamp = time.strftime("%H%M%S")
    amqp_url = transport.url if transport.scheme in ("amqp", "amqps") else _AMQP
    urls = [amqp_url, transport.url if transport.scheme.startswith("mqtt") else mqtt_url]
    results = []
    for url in urls:
        for payload in PAYLOADS:
            scheme = url.split("://")[0]
            console.print(f"throughput: {scheme} {payload.label} x {payload.count} ...")
            # A measurement lasts well under a second at these rates: take the median
            # of a few, and keep every ratio in the report.
            runs = []
            for attempt in range(repeats):
                run = await measure(
                    url,
                    payload,
                    job=f"{transport.job}-tp-{scheme}-{payload.label}-{stamp}-{attempt}",
                    downlink=strategy.downlink,
                    profile_dir=out if profile and attempt == 0 else None,
                )
                runs.append(run)
                console.print(
                    f"  bare {run['bare_per_s']:.0f}/s, aggregator"
                    f" {run['aggregator_per_s']:.0f}/s, ratio {run['ratio']:.2f}"
                )
            result = sorted(runs, key=lambda r: r["ratio"])[len(runs) // 2]
            result["ratios"] = [round(r["ratio"], 3) for r in runs]
            results.append(result)
    _write(out, results)
    table = Table(title="aggregator ingest vs a bare consumer", header_style="bold")
    for column in ("broker", "payload", "message bytes", "bare /s", "aggregator /s", "ratio"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r["broker"],
            r["payload"],
            f"{r['message_bytes']:,}",
            f"{r['bare_per_s']:.0f}",
            f"{r['aggregator_per_s']:.0f}",
            f"{r['ratio']:.2f}",
        )
    console.print(table)
    console.print(f"results: {out / 'throughput.md'}")
    return 0


def _write(out: Path, results: list[dict[str, Any]]) -> None:
    (out / "throughput.json").write_text(
        json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "results": results}, indent=2)
    )
    lines = [
        "# Aggregator ingest vs a bare consumer",
        "",
        f"Run on {time.strftime('%Y-%m-%d %H:%M:%S %Z')}. {SETUP}",
        "",
        *markdown_table(results),
    ]
    (out / "throughput.md").write_text("\n".join(lines) + "\n")


SETUP = (
    "Model: 1,001,000 float32 parameters; FedBuff K = 10; the model published at most"
    " every 0.2 s (newest wins, int4 deltas); no evaluation, no checkpoint directory."
    " Each row is the median of three measurements, by ratio. CPU: this process's"
    " time.process_time() (all threads) per message while each one ran; the broker's"
    " own CPU is not in it."
)


def markdown_table(results: list[dict[str, Any]]) -> list[str]:
    """The results as a Markdown table (throughput.md and docs/benchmarks.md)."""
    lines = [
        "| broker | payload | message bytes | messages | bare consumer (msg/s)"
        " | aggregator (msg/s) | ratio (median) | every ratio | CPU ms per message, bare"
        " / aggregator | models published |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        every = ", ".join(f"{x:.2f}" for x in r.get("ratios", [r["ratio"]]))
        lines.append(
            f"| {r['broker']} | {r['payload']} | {r['message_bytes']:,} | {r['count']}"
            f" | {r['bare_per_s']:.0f} | {r['aggregator_per_s']:.0f} | {r['ratio']:.2f}"
            f" | {every} | {r['bare_cpu_ms_per_message']:.2f}"
            f" / {r['aggregator_cpu_ms_per_update']:.2f} | {r['models_published']} |"
        )
    return lines

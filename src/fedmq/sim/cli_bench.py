"""``fedmq bench``: pick the benchmark the flags ask for and run it."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from fedmq.sim.bench import BenchConfig

__all__ = ["run_bench_command"]


async def run_bench_command(values: dict[str, Any], parts: dict[str, Any]) -> int:
    """``values``: the resolved options; ``parts``: the config objects the CLI built."""
    out = (
        Path(values["out_dir"])
        if values["out_dir"]
        else Path("runs") / time.strftime("bench-%Y%m%d-%H%M%S")
    )
    # The progress display says what matters; per-device and per-version lines would drown it.
    for name in ("fedmq.participant", "fedmq.aggregator", "fedmq.transport"):
        logging.getLogger(name).setLevel(logging.WARNING)
    transport = parts["transport"]
    if transport.job == "default":
        transport = dataclasses.replace(transport, job="bench")
    if values["throughput"]:
        from fedmq.sim.throughput import run_throughput

        return await run_throughput(transport, out, strategy=parts["aggregator"])
    base = BenchConfig(
        label="",
        task=parts["task"],
        protocol=parts["protocol"],
        aggregator=parts["aggregator"],
        transport=transport,
        participant=parts["participant"],
        partition=values["partition"],
        attack=parts["attack"],
    )
    if values["virtual"]:
        from fedmq.sim.virtual import run_virtual_command

        return await run_virtual_command(base, parts["data_dir"], out)
    from fedmq.sim.suite import run_single, run_suite

    if values["suite"]:
        return await run_suite(base, parts["data_dir"], out)
    return await run_single(base, parts["data_dir"], out)

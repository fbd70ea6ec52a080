"""``fedmq bench`` entry points: one configuration, or the protocol's matrix (``--suite``).

The suite runs the three strategies with float32 updates, picks the best
asynchronous strategy (the one that reached the target sooner; if neither did,
the better best value of the target metric), then runs every other codec with it: seven
configurations in all, each through the same broker and fleet.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedmq.aggregator import DownlinkConfig
from fedmq.codecs import CodecConfig
from fedmq.sim._report import write_results
from fedmq.sim.bench import BenchConfig, run_bench

__all__ = ["SUITE_CODECS", "run_single", "run_suite", "with_strategy"]

Run = dict[str, Any]

SUITE_CODECS: tuple[CodecConfig, ...] = (
    CodecConfig(name="float16"),
    CodecConfig(name="int8"),
    CodecConfig(name="int4"),
    CodecConfig(name="topk", topk_fraction=0.01, topk_values="int8"),
)


def with_strategy(base: BenchConfig, strategy: str, codec: CodecConfig, stamp: str) -> BenchConfig:
    """``base`` with another strategy and codec, under a job name of its own.

    Synchronous FedAvg sends full models: a round waits for every picked device, and a
    device that missed a delta would wait for a keyframe that no round would produce.
    """
    label = f"{strategy}-{_codec_name(codec)}"
    downlink = base.aggregator.downlink
    if strategy == "fedavg":
        downlink = DownlinkConfig(codec=None, keyframe_every=1)
    return dataclasses.replace(
        base,
        label=label,
        aggregator=dataclasses.replace(
            base.aggregator,
            strategy=dataclasses.replace(base.aggregator.strategy, name=strategy),  # type: ignore[arg-type]
            downlink=downlink,
        ),
        participant=dataclasses.replace(base.participant, codec=codec),
        transport=dataclasses.replace(
            base.transport, job=f"{base.transport.job}-{label}-{stamp}".replace(".", "")
        ),
    )


def _codec_name(codec: CodecConfig) -> str:
    if codec.name == "topk":
        return f"topk{codec.topk_fraction:g}-{codec.topk_values}"
    return codec.name


async def run_single(base: BenchConfig, data_dir: Path, out: Path) -> int:
    """One configuration; 0 if it reached the target."""
    console = Console()
    stamp = time.strftime("%H%M%S")
    config = with_strategy(base, base.aggregator.strategy.name, base.participant.codec, stamp)
    run = await run_bench(config, data_dir, out / config.label, console)
    write_results(out, [run], title=f"fedmq bench: {config.label}")
    _print_summary(console, [run], out)
    return 0 if run["reached_target"] else 1


async def run_suite(base: BenchConfig, data_dir: Path, out: Path) -> int:
    """The matrix of BENCHMARK.md; 0 if every configuration reached the target."""
    console = Console()
    stamp = time.strftime("%H%M%S")
    float32 = CodecConfig(name="float32")
    runs: list[Run] = []

    async def one(strategy: str, codec: CodecConfig) -> Run:
        config = with_strategy(base, strategy, codec, stamp)
        run = await run_bench(config, data_dir, out / config.label, console)
        runs.append(run)
        write_results(out / config.label, [run], title=f"fedmq bench: {config.label}")
        write_results(out, runs, title="fedmq bench --suite (partial)")
        _print_summary(console, [run], out / config.label)
        return run

    by_strategy = {name: await one(name, float32) for name in ("fedasync", "fedbuff", "fedavg")}
    best = min(("fedasync", "fedbuff"), key=lambda name: _rank(by_strategy[name]))
    console.print(f"best asynchronous strategy: {best}")
    for codec in SUITE_CODECS:
        await one(best, codec)
    summary = goals(runs, best)
    extra = [
        f"Best asynchronous strategy (sooner to the target): **{best}**; the codec runs use it.",
        "",
        "## Goals",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
        *[f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'no'} |" for g in summary],
        "",
    ]
    write_results(out, runs, title="fedmq bench --suite", extra=extra, summary=summary)
    _print_summary(console, runs, out)
    return 0 if all(r["reached_target"] for r in runs) else 1


def _rank(run: Run) -> tuple[float, float]:
    time_s = run["time_to_target_s"]
    best = run["best"]
    if best is None:
        worse_than_any = float("inf")
    else:
        worse_than_any = -best if run["target"]["higher_is_better"] else best
    return (time_s if time_s is not None else float("inf"), worse_than_any)


def goals(runs: list[Run], best: str) -> list[dict[str, Any]]:
    """The issue's goals, measured on this suite's runs."""
    by_label = {r["label"]: r for r in runs}
    out: list[dict[str, Any]] = []
    fedbuff, fedavg = by_label.get("fedbuff-float32"), by_label.get("fedavg-float32")
    if fedbuff and fedavg:
        a, b = fedbuff["time_to_target_s"], fedavg["time_to_target_s"]
        if a and b:
            text, met = f"FedBuff {a:.1f} s vs FedAvg {b:.1f} s: {b / a:.2f}x", b / a >= 3.5
        elif a:
            limit = fedavg["wall_time_s"]
            text = (
                f"FedBuff {a:.1f} s; FedAvg did not reach it in {limit:.0f} s (> {limit / a:.2f}x)"
            )
            met = limit / a >= 3.5
        else:
            text, met = "FedBuff did not reach the target", False
        goal = "FedBuff >= 3.5x faster than sync FedAvg (wall time to target)"
        out.append({"goal": goal, "measured": text, "met": met})
    base = by_label.get(f"{best}-float32")
    if base and base["uplink_bytes_to_target"]:
        best_codec = None
        for r in runs:
            if r["strategy"] != best or r is base or not r["uplink_bytes_to_target"]:
                continue
            factor = base["uplink_bytes_to_target"] / r["uplink_bytes_to_target"]
            gap = (base["final"] or 0) - (r["final"] or 0)  # > 0: r is worse (higher is better)
            if not base["target"]["higher_is_better"]:
                gap = -gap
            if best_codec is None or factor > best_codec[1]:
                best_codec = (r["label"], factor, gap)
        if best_codec:
            label, factor, gap = best_codec
            name = base["target"]["metric"]
            out.append(
                {
                    "goal": f">= 20x fewer uplink bytes to target than float32, final {name}"
                    " within 0.005 (0.5 points of accuracy)",
                    "measured": f"{label}: {factor:.1f}x fewer, final {name}"
                    f" {abs(gap):.4f} {'worse' if gap > 0 else 'better'} than float32's",
                    "met": factor >= 20 and gap <= 0.005,
                }
            )
    ratios = [
        (r["label"], r["downlink_float32_bytes_to_target"] / r["downlink_bytes_to_target"])
        for r in runs
        if r["downlink_bytes_to_target"] and r["strategy"] != "fedavg"
    ]
    if ratios:
        worst = min(ratios, key=lambda x: x[1])
        out.append(
            {
                "goal": "downlink bytes to target >= 4x fewer than float32 every time",
                "measured": ", ".join(f"{label} {x:.1f}x" for label, x in ratios),
                "met": worst[1] >= 4.0,
            }
        )
    return out


def _print_summary(console: Console, runs: list[Run], out: Path) -> None:
    table = Table(title="fedmq bench", header_style="bold")
    for column in (
        "configuration",
        "time to target",
        "updates",
        "uplink to target",
        "downlink to target",
        f"final {runs[0]['target']['metric']}" if runs else "final",
        "aggregator CPU",
    ):
        table.add_column(column, justify="right")
    for r in runs:
        t = r["time_to_target_s"]
        table.add_row(
            r["label"],
            f"{t:.1f} s" if t is not None else "not reached",
            str(r["updates_to_target"] or "-"),
            f"{r['uplink_bytes_to_target']:,}" if r["uplink_bytes_to_target"] else "-",
            f"{r['downlink_bytes_to_target']:,}" if r["downlink_bytes_to_target"] else "-",
            f"{r['final']:.4f}" if r["final"] is not None else "-",
            f"{r['aggregator_cost']['cpu_s']:.1f} s"
            if r["aggregator_cost"]["cpu_s"] is not None
            else "-",
        )
    console.print(table)
    for r in runs:
        skipped = r["fleet"].get("skipped") or {}
        if r.get("model_collapses") or skipped:
            console.print(
                f"[bold red]{r['label']}: the model collapsed {r.get('model_collapses', 0)}"
                f" time(s); updates skipped by devices: {skipped or 0}[/] (docs/tuning.md)"
            )
    console.print(f"results: {out / 'report.md'}")

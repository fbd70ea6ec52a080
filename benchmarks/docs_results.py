"""Put the results of real benchmark runs into docs/benchmarks.md (and its PNGs).

    python benchmarks/docs_results.py --suite DIR [--throughput DIR] [--virtual DIR]

DIR are the results folders ``fedmq bench --suite``, ``--throughput`` and
``--virtual`` wrote. The tables replace the block between the ``results`` markers
of docs/benchmarks.md; the plots are copied to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from fedmq.sim._report import cost_table, protocol_lines, results_table
from fedmq.sim.suite import goals
from fedmq.sim.throughput import SETUP, markdown_table

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
PLOTS = REPO / "docs" / "benchmarks"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _suite(folder: Path, prefix: str) -> list[str]:
    doc = json.loads((folder / "report.json").read_text())
    runs: list[dict[str, Any]] = doc["runs"]
    metric = runs[0]["target"]["metric"]
    PLOTS.mkdir(parents=True, exist_ok=True)
    for name in (f"{metric}_time.png", f"{metric}_uplink.png", "staleness.png"):
        shutil.copy(folder / name, PLOTS / f"{prefix}{name}")
    lines = [
        f"### Fleet: `fedmq bench --suite` ({runs[0]['date']} to {runs[-1]['date']},"
        f" {len(runs)} configurations)",
        "",
    ]
    best = runs[-1]["strategy"]  # the codec runs use the best asynchronous strategy
    lines += [
        f"Best asynchronous strategy (sooner to the target): **{best}**.",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
    ]
    lines += [
        f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'no'} |"
        for g in goals(runs, best)
    ]
    lines.append("")
    lines += [*results_table(runs), "", *cost_table(runs), "", *protocol_lines(runs), ""]
    lines += [
        f"![{metric} over wall time](benchmarks/{prefix}{metric}_time.png)",
        "",
        f"![{metric} over uplink bytes](benchmarks/{prefix}{metric}_uplink.png)",
        "",
        f"![staleness of applied updates](benchmarks/{prefix}staleness.png)",
        "",
    ]
    return lines


def _throughput(folder: Path) -> list[str]:
    doc = json.loads((folder / "throughput.json").read_text())
    lines = [
        f"### Aggregator ingest: `fedmq bench --throughput` ({doc['date']})",
        "",
        SETUP,
        "",
        *markdown_table(doc["results"]),
    ]
    return [*lines, ""]


def _virtual(folder: Path) -> list[str]:
    doc = json.loads((folder / "report.json").read_text())
    run = doc["runs"][0]
    s = run["scale"]
    return [
        f"### Virtual clock: `fedmq bench --virtual` ({run['date']})",
        "",
        "| devices | strategy | codec | simulated s | wall s | device-seconds / wall s"
        " | updates published / wall s | updates applied / wall s | too stale"
        f" | best {run['target']['metric']} | time to target (simulated) |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['devices']:,} | {run['strategy']} | {run['codec']} | {s['simulated_s']:.1f}"
        f" | {s['wall_s']:.1f} | {s['device_seconds_per_wall_s']:,.0f}"
        f" | {s['updates_published_per_wall_s']:,.1f} | {s['updates_applied_per_wall_s']:,.1f}"
        f" | {run['dropped']['too_stale']:,} of {run['received']:,}"
        f" | {run['best']:.4f}"
        f" | {run['time_to_target_s'] if run['time_to_target_s'] is not None else 'not reached'} |",
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", type=Path, required=True, action="append")
    parser.add_argument("--throughput", type=Path)
    parser.add_argument("--virtual", type=Path)
    args = parser.parse_args()
    lines: list[str] = []
    for k, folder in enumerate(args.suite):
        lines += _suite(folder, "" if k == 0 else f"suite{k + 1}-")
    if args.throughput:
        lines += _throughput(args.throughput)
    if args.virtual:
        lines += _virtual(args.virtual)
    text = DOC.read_text()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + "\n".join(lines) + "\n" + text[stop:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The robustness table of docs/benchmarks.md (issue #11) from ``fedmq bench --virtual`` runs.

Each run is one folder holding the ``report.json`` that ``fedmq bench --virtual
--out-dir FOLDER`` writes, named ``<attack>-<rule>`` (``clean-mean``,
``scale-norm_bounded``...). Prints the Markdown table: final accuracy, best accuracy,
updates applied, deltas clipped and updates refused, by attack and defence, and each
run's loss against the clean run without defence::

    python benchmarks/robustness.py runs/robust
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def load(folder: Path) -> dict[str, dict[str, Any]]:
    runs = {}
    for report in sorted(folder.glob("*/report.json")):
        runs[report.parent.name] = json.loads(report.read_text())["runs"][0]
    return runs


def table(runs: dict[str, dict[str, Any]]) -> list[str]:
    base = runs.get("clean-mean")
    base_acc = base["final"] if base else None
    lines = [
        "| attack (10 % of 50 devices) | defence | final accuracy | vs clean, no defence"
        " | best accuracy | applied | clipped | refused (by reason) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    order = ["clean", "scale", "sign-flip", "noise", "label-flip"]
    rules = ["mean", "norm_bounded", "median", "trimmed_mean"]
    for attack in order:
        for rule in rules:
            run = runs.get(f"{attack}-{rule}")
            if run is None:
                continue
            delta = (
                f"{(run['final'] - base_acc) * 100:+.2f} pts"
                if base_acc is not None and run["final"] is not None
                else "-"
            )
            refused = run["dropped"]["by_reason"]
            lines.append(
                f"| {attack} | {'none (mean)' if rule == 'mean' else rule}"
                f" | {run['final']:.4f} | {delta} | {run['best']:.4f} | {run['applied']}"
                f" | {run.get('robust', {}).get('clipped', 0)}"
                f" | {', '.join(f'{k} {v}' for k, v in sorted(refused.items())) or '0'} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    print("\n".join(table(load(args.folder))))


if __name__ == "__main__":
    main()

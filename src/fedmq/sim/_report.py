"""The results folder of ``fedmq bench``: report.json, report.md and the PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["target_fields", "write_results"]

Run = dict[str, Any]


def target_fields(points: Sequence[Run], target: float) -> tuple[Run | None, Run]:
    """The first evaluation at ``target`` (None if none), and the report fields it decides.

    A run stops at the target, so its final model is the one that reached it: an
    evaluation that finished between that one and the stop is not "final".
    """
    hit = next((p for p in points if p["accuracy"] >= target), None)
    last = hit or (points[-1] if points else None)
    return hit, {
        "reached_target": hit is not None,
        "target_accuracy": target,
        "time_to_target_s": hit["elapsed_s"] if hit else None,
        "updates_to_target": hit["applied"] if hit else None,
        "uplink_bytes_to_target": hit["bytes_in"] if hit else None,
        "final_accuracy": last["accuracy"] if last else None,
        "best_accuracy": max((p["accuracy"] for p in points), default=None),
    }


def _num(value: float | int | None, fmt: str = ",.0f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{unit}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.1f}x"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f} MiB"


def results_table(runs: Sequence[Run]) -> list[str]:
    """The main table, one row per configuration (markdown lines)."""
    # "vs float32": against the float32 run of the same strategy
    base_up = {
        r["strategy"]: r["uplink_bytes_to_target"]
        for r in runs
        if r["codec"] == "float32" and r.get("uplink_bytes_to_target")
    }
    lines = [
        "| configuration | reached | time to target | updates to target | uplink to target"
        " | vs float32 | downlink to target | float32 downlink | saved | final acc | best acc"
        " | wall time |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['label']} | {'yes' if r['reached_target'] else 'no'}"
            f" | {_num(r['time_to_target_s'], '.1f', ' s')}"
            f" | {_num(r['updates_to_target'])}"
            f" | {_num(r['uplink_bytes_to_target'])}"
            f" | {_ratio(base_up.get(r['strategy']), r['uplink_bytes_to_target'])}"
            f" | {_num(r['downlink_bytes_to_target'])}"
            f" | {_num(r['downlink_float32_bytes_to_target'])}"
            f" | {_ratio(r['downlink_float32_bytes_to_target'], r['downlink_bytes_to_target'])}"
            f" | {_num(r['final_accuracy'], '.4f')} | {_num(r['best_accuracy'], '.4f')}"
            f" | {_num(r['wall_time_s'], '.1f', ' s')} |"
        )
    return lines


def cost_table(runs: Sequence[Run]) -> list[str]:
    lines = [
        "| configuration | applied | received | too stale | duplicate | invalid"
        " | staleness mean / max | aggregator CPU | of which evaluation | RSS peak (after setup)"
        " | keyframes / deltas | deltas skipped on devices |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        hist = {int(k): v for k, v in r["staleness_histogram"].items()}
        total = sum(hist.values())
        mean = sum(k * v for k, v in hist.items()) / total if total else 0.0
        cost = r["aggregator_cost"]
        lines.append(
            f"| {r['label']} | {r['applied']} | {r['received']}"
            f" | {r['dropped']['too_stale']} | {r['dropped']['duplicate']}"
            f" | {r['dropped']['invalid']} | {mean:.2f} / {max(hist, default=0)}"
            f" | {_num(cost['cpu_s'], '.1f', ' s')} | {_num(cost['eval_cpu_s'], '.1f', ' s')}"
            f" | {_mib(cost['peak_rss_bytes'])} ({_mib(cost['rss_start_bytes'])})"
            f" | {r['keyframes']} / {r['deltas']} | {r['device_view']['deltas_skipped']} |"
        )
    return lines


def protocol_lines(runs: Sequence[Run]) -> list[str]:
    first = runs[0]
    proto = first["protocol"]
    settings = first["settings"]
    strategy = settings["strategy"]
    fedasync_s = strategy["fedasync"]["staleness"]
    lines = [
        'Protocol values used (BENCHMARK.md "fmnist-fleet" unless overridden):',
        "",
        f"- fleet: N = {proto['participants']}, Dirichlet alpha {proto['dirichlet_alpha']},"
        f" seed {proto['seed']}, speeds lognormal(0, {proto['speed_sigma']}) from default_rng(0),"
        f" publish delay s_i x {proto['delay_unit_s']} s, online Exp({proto['mean_online_s']} s)"
        f" / offline Exp({proto['mean_offline_s']} s) from default_rng([1, i]),"
        f" concurrency C = {proto['concurrency']}",
        f"- stop: test accuracy {proto['target_accuracy']} or {proto['max_seconds']:.0f} s",
        f"- local work: model {settings['model']}, {settings['epochs']} epoch, batch"
        f" {settings['batch_size']}, SGD lr {settings['lr']}; partition {settings['partition']}",
        f"- FedAsync alpha {strategy['fedasync']['alpha']}, staleness"
        f" {fedasync_s['function']} a = {fedasync_s['a']};"
        f" FedBuff K = {strategy['fedbuff']['buffer_size']}, server lr"
        f" {strategy['fedbuff']['server_lr']}, {strategy['fedbuff']['server_optimizer']};"
        f" FedAvg C = {strategy['fedavg']['clients_per_round']}; max staleness"
        f" {strategy['max_staleness']}",
        f"- evaluation: every {settings['eval_every']} version(s) (latest wins, one at a time)"
        f" on {settings['eval_examples']} test images; prefetch {settings['prefetch']}",
        f"- downlink: {_downlink_text(settings['downlink'])}",
        f"- broker: {first['broker']}; aggregator cost: {first['aggregator_cost']['measured']}",
    ]
    loads = [
        f"{r['label']} {r['host']['load_1m_mean']:.1f} (max {r['host']['load_1m_max']:.1f})"
        for r in runs
        if r.get("host", {}).get("load_1m_mean") is not None
    ]
    if loads:
        lines.append(
            f"- host: {first['host']['cpus']} CPUs; 1-minute load average during each run"
            f" (mean, max): {', '.join(loads)}"
        )
    codecs = sorted({json.dumps(r["settings"]["codec"], sort_keys=True) for r in runs})
    for codec in codecs:
        lines.append(f"- codec settings: `{codec}`")
    return lines


def _downlink_text(downlink: dict[str, Any]) -> str:
    codec = downlink.get("codec")
    if not codec:
        return "every model in full float32"
    return (
        f"deltas coded {codec['name']} (block {codec['block_size']}), a float32 keyframe"
        f" at least every {downlink['keyframe_every']} versions"
    )


def write_markdown(path: Path, runs: Sequence[Run], title: str, extra: Sequence[str] = ()) -> None:
    dates = f"{runs[0]['date']}" if len(runs) == 1 else f"{runs[0]['date']} to {runs[-1]['date']}"
    lines = [f"# {title}", "", f"Runs finished {dates}.", ""]
    lines += [*extra]
    lines += ["## Time, updates and bytes to the target", "", *results_table(runs), ""]
    lines += [
        "Uplink: update bytes received by the aggregator up to the evaluated model that"
        " reached the target. Downlink: model bytes delivered to all devices up to the"
        ' moment the target was measured; "float32 downlink" is what the same deliveries'
        " would have cost as full float32 models.",
        "",
        "## Drops, staleness and the aggregator's cost",
        "",
        *cost_table(runs),
        "",
        *protocol_lines(runs),
        "",
        "Plots: `accuracy_time.png` (test accuracy over wall time), `accuracy_uplink.png`"
        " (test accuracy over uplink bytes), `staleness.png` (staleness of applied updates).",
        "",
    ]
    path.write_text("\n".join(lines))


def plot_accuracy_time(path: Path, runs: Sequence[Run], target: float) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for r in runs:
        pts = r["accuracy"]
        ax.plot([p["elapsed_s"] for p in pts], [p["accuracy"] for p in pts], label=r["label"])
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target}")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_accuracy_uplink(path: Path, runs: Sequence[Run], target: float) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for r in runs:
        pts = [p for p in r["accuracy"] if p["bytes_in"] > 0]
        ax.plot([p["bytes_in"] for p in pts], [p["accuracy"] for p in pts], label=r["label"])
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target}")
    if any(p["bytes_in"] > 0 for r in runs for p in r["accuracy"]):
        ax.set_xscale("log")
    ax.set_xlabel("uplink bytes received by the aggregator (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_staleness(path: Path, runs: Sequence[Run]) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for r in runs:
        hist = {int(k): v for k, v in r["staleness_histogram"].items()}
        total = sum(hist.values())
        if not total:
            continue
        xs = sorted(hist)
        ax.step(xs, [hist[x] / total for x in xs], where="mid", label=r["label"])
    ax.set_xlabel("staleness of applied updates (versions)")
    ax.set_ylabel("fraction of applied updates")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_results(
    out: Path, runs: Sequence[Run], *, title: str, extra: Sequence[str] = (), summary: Any = None
) -> None:
    """Write report.json, report.md and the three plots for ``runs`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    target = runs[0]["target_accuracy"]
    document = {"title": title, "summary": summary, "runs": list(runs)}
    (out / "report.json").write_text(json.dumps(document, indent=2))
    write_markdown(out / "report.md", runs, title, extra)
    plot_accuracy_time(out / "accuracy_time.png", runs, target)
    plot_accuracy_uplink(out / "accuracy_uplink.png", runs, target)
    plot_staleness(out / "staleness.png", runs)

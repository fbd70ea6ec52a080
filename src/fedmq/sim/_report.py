"""The results folder of ``fedmq bench``: report.json, report.md and the PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedmq.aggregator import EvalPoint
from fedmq.sim._plots import plot_metric
from fedmq.tasks import Metric

__all__ = ["dp_line", "metric_of", "privacy_table", "target_fields", "write_results"]

Run = dict[str, Any]


def target_fields(points: Sequence[Run], metric: Metric, goal: float) -> tuple[Run | None, Run]:
    """The first evaluation (an ``EvalPoint`` as a dict) whose ``metric`` reaches ``goal``
    (None if none), and the report fields it decides.

    A run stops at the target, so its final model is the one that reached it: an
    evaluation that finished between that one and the stop is not "final".
    """
    name = metric.name
    scored = [p for p in points if name in p["metrics"]]
    hit = next((p for p in scored if metric.reached(p["metrics"][name], goal)), None)
    last = hit or (scored[-1] if scored else None)
    values = [p["metrics"][name] for p in scored]
    return hit, {
        "reached_target": hit is not None,
        "target": {"metric": name, "higher_is_better": metric.higher_is_better, "goal": goal},
        "evaluation_source": points[-1]["source"] if points else None,
        "time_to_target_s": hit["elapsed_s"] if hit else None,
        "updates_to_target": hit["applied"] if hit else None,
        "uplink_bytes_to_target": hit["bytes_in"] if hit else None,
        "final": last["metrics"][name] if last else None,
        "best": (max if metric.higher_is_better else min)(values) if values else None,
    }


def metric_of(run: Run) -> Metric:
    """The target metric a report was measured against."""
    target = run["target"]
    return Metric(target["metric"], higher_is_better=target["higher_is_better"])


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
    name = runs[0]["target"]["metric"] if runs else "value"
    lines = [
        "| configuration | reached | time to target | updates to target | uplink to target"
        f" | vs float32 | downlink to target | float32 downlink | saved | final {name}"
        f" | best {name} | wall time |",
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
            f" | {_num(r['final'], '.4f')} | {_num(r['best'], '.4f')}"
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


def dp_line(dp: dict[str, Any] | None) -> str:
    """One line for a console: the privacy a run spent (client-level DP), or that it had none."""
    if not dp:
        return "dp: off"
    target = dp.get("target_epsilon")
    return (
        f"dp: epsilon {dp['epsilon']:.3f}"
        + (f" of {target:g}" if target is not None else "")
        + f" at delta {dp['delta']:g} after {dp['steps']} server steps"
        f" (noise multiplier {dp['noise_multiplier']:.4g}, clip norm {dp['clip_norm']:g},"
        f" min_gap {dp['min_gap']}, K {dp.get('buffer_size', '-')})"
    )


def privacy_table(runs: Sequence[Run]) -> list[str]:
    """Client-level DP and clipping per run (markdown lines); empty when no run had either."""
    if not any(r.get("dp") or r.get("clipped") for r in runs):
        return []
    lines = [
        "## Privacy",
        "",
        "| configuration | epsilon | target epsilon | delta | noise multiplier z"
        " | clip norm C | min_gap | K | server steps | updates clipped | stopped by budget |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        dp = r.get("dp") or {}
        lines.append(
            f"| {r['label']} | {_num(dp.get('epsilon'), '.3f')}"
            f" | {_num(dp.get('target_epsilon'), 'g')} | {_num(dp.get('delta'), 'g')}"
            f" | {_num(dp.get('noise_multiplier'), '.4g')} | {_num(dp.get('clip_norm'), 'g')}"
            f" | {dp.get('min_gap', '-')} | {dp.get('buffer_size', '-')}"
            f" | {_num(dp.get('steps'))} | {_num(r.get('clipped'))}"
            f" | {'yes' if r.get('stopped_by') == 'privacy_budget_spent' else 'no'} |"
        )
    lines += [
        "",
        "Client-level DP, central model (docs/privacy.md): each server step adds"
        " N(0, (z C)^2) per coordinate to the sum of K clipped deltas, divided by K;"
        " epsilon is dp-accounting's RDP accountant of ceil(steps / min_gap) Gaussian"
        " mechanisms (zero-out adjacency, no amplification by sampling).",
        "",
    ]
    return lines


def protocol_lines(runs: Sequence[Run]) -> list[str]:
    first = runs[0]
    proto = first["protocol"]
    settings = first["settings"]
    strategy = settings["strategy"]
    fedasync_s = strategy["fedasync"]["staleness"]
    target = first["target"]
    where = "test" if first.get("evaluation_source") == "central" else "fleet"
    split = (
        f"{settings['partition']} split, Dirichlet alpha {proto['dirichlet_alpha']}"
        if settings["task"] == "fmnist"
        else "the task's own split"
    )
    lines = [
        'Protocol values used (BENCHMARK.md "fmnist-fleet" unless overridden):',
        "",
        f"- fleet: task {settings['task']}, N = {proto['participants']}, {split},"
        f" seed {proto['seed']}, speeds lognormal(0, {proto['speed_sigma']}) from default_rng(0),"
        f" publish delay s_i x {proto['delay_unit_s']} s, online Exp({proto['mean_online_s']} s)"
        f" / offline Exp({proto['mean_offline_s']} s) from default_rng([1, i]),"
        f" concurrency C = {proto['concurrency']}",
        f"- stop: {where} {target['metric']} {target['goal']}"
        f" ({'higher' if target['higher_is_better'] else 'lower'} is better)"
        f" or {proto['max_seconds']:.0f} s"
        + (f" or version {proto['max_versions']}" if proto.get("max_versions") else ""),
        f"- local work: model {settings['model']}, {settings['epochs']} epoch(s), batch"
        f" {settings['batch_size']}, {settings['optimizer']} lr {settings['lr']}",
        f"- FedAsync alpha {strategy['fedasync']['alpha']}, staleness"
        f" {fedasync_s['function']} a = {fedasync_s['a']};"
        f" FedBuff K = {strategy['fedbuff']['buffer_size']}, server lr"
        f" {strategy['fedbuff']['server_lr']}, {strategy['fedbuff']['server_optimizer']};"
        f" FedAvg C = {strategy['fedavg']['clients_per_round']}; max staleness"
        f" {strategy['max_staleness']}",
        f"- robust rule {strategy.get('robust', {}).get('rule', 'mean')}"
        f" ({json.dumps(strategy.get('robust', {}), sort_keys=True)}); update norm bounds"
        f" {json.dumps(settings.get('bounds', {}), sort_keys=True)}",
        f"- attack: {_attack_text(settings.get('attack', {}))}",
        f"- evaluation: {settings['evaluation']}; prefetch {settings['prefetch']}",
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


def _attack_text(attack: dict[str, Any]) -> str:
    if not attack.get("fraction"):
        return "none"
    return (
        f"{attack['kind']} (strength {attack['strength']:g}) by {attack['fraction']:g} of the"
        f" devices: {', '.join(str(i) for i in attack['malicious'])}"
        " (sorted(default_rng([2, seed]).choice(N, round(fraction x N), replace=False)))"
    )


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
    name = runs[0]["target"]["metric"]
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
        *privacy_table(runs),
        *protocol_lines(runs),
        "",
        f"Plots: `{name}_time.png` ({name} over wall time), `{name}_uplink.png`"
        f" ({name} over uplink bytes), `staleness.png` (staleness of applied updates).",
        "",
    ]
    path.write_text("\n".join(lines))


def plot_metric_uplink(path: Path, runs: Sequence[Run], metric: Metric, goal: float) -> None:
    """``metric`` over the uplink bytes the aggregator had received, one line per run."""
    name = metric.name
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for r in runs:
        pts = [p for p in r["evaluations"] if p["bytes_in"] > 0 and name in p["metrics"]]
        ax.plot([p["bytes_in"] for p in pts], [p["metrics"][name] for p in pts], label=r["label"])
    ax.axhline(goal, color="grey", linestyle="--", linewidth=1, label=f"target {goal}")
    if any(p["bytes_in"] > 0 for r in runs for p in r["evaluations"]):
        ax.set_xscale("log")
    ax.set_xlabel("uplink bytes received by the aggregator (log scale)")
    ax.set_ylabel(name)
    if name == "accuracy":
        ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right" if metric.higher_is_better else "upper right", fontsize=8)
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
    """Write report.json, report.md and the three plots for ``runs`` into ``out``:
    ``<metric>_time.png``, ``<metric>_uplink.png`` (the target metric's name) and
    ``staleness.png``."""
    out.mkdir(parents=True, exist_ok=True)
    metric = metric_of(runs[0])
    goal = runs[0]["target"]["goal"]
    document = {"title": title, "summary": summary, "runs": list(runs)}
    (out / "report.json").write_text(json.dumps(document, indent=2))
    write_markdown(out / "report.md", runs, title, extra)
    curves = {r["label"]: [EvalPoint(**p) for p in r["evaluations"]] for r in runs}
    plot_metric(curves, out / f"{metric.name}_time.png", metric, target=goal)
    plot_metric_uplink(out / f"{metric.name}_uplink.png", runs, metric, goal)
    plot_staleness(out / "staleness.png", runs)

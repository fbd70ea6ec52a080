"""PNG plots of a run (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen here or on devices
import matplotlib.pyplot as plt

from fedmq.aggregator import EvalPoint
from fedmq.tasks import Metric

__all__ = ["plot_metric"]


def plot_metric(
    curves: Mapping[str, Sequence[EvalPoint]],
    path: Path,
    metric: Metric,
    *,
    target: float | None = None,
) -> Path:
    """``metric`` of the global model over wall time, one line per named run (points
    without it are left out: a federated point before every device reported has all)."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, points in curves.items():
        scored = [p for p in points if metric.name in p.metrics]
        ax.plot(
            [p.elapsed_s for p in scored],
            [p.metrics[metric.name] for p in scored],
            marker=".",
            label=label,
        )
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target}")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel(metric.name)
    if metric.name == "accuracy":
        ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right" if metric.higher_is_better else "upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

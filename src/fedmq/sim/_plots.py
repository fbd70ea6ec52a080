"""PNG plots of a run (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen here or on devices
import matplotlib.pyplot as plt

from fedmq.aggregator import AccuracyPoint

__all__ = ["plot_accuracy"]


def plot_accuracy(
    curves: Mapping[str, Sequence[AccuracyPoint]], path: Path, *, target: float | None = None
) -> Path:
    """Test accuracy over wall time, one line per named run."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, points in curves.items():
        ax.plot(
            [p.elapsed_s for p in points], [p.accuracy for p in points], marker=".", label=label
        )
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target}")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

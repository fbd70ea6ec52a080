"""The live progress display and the end-of-run summary table (rich)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from fedmq.aggregator import AggregatorStats
from fedmq.participant import ParticipantStats

__all__ = ["progress_line", "progress_table", "summary_table"]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _label(stats: AggregatorStats) -> str:
    """The target's name and where it comes from: ``accuracy`` or ``rmse (fleet)``."""
    point = stats.scored[-1] if stats.scored else None
    fleet = point is not None and point.source == "federated"
    return f"{stats.target.name} (fleet)" if fleet else stats.target.name


def progress_table(
    stats: AggregatorStats, devices: Sequence[ParticipantStats], target: float
) -> Table:
    """One refreshable table: the global model and the fleet, right now."""
    table = Table(title="fedmq fleet", show_header=True, header_style="bold")
    for column in (
        "elapsed",
        "version",
        _label(stats),
        "applied",
        "dropped",
        "staleness",
        "buffered",
        "trained",
        "bytes up",
    ):
        table.add_column(column, justify="right")
    dropped = ", ".join(f"{k}={n}" for k, n in sorted(stats.rejected.items())) or "0"
    value = stats.latest_target
    acc_text = _fmt(value)
    if value is not None and stats.target.reached(value, target):
        acc_text = f"[bold green]{acc_text}[/]"
    table.add_row(
        f"{stats.elapsed_s:6.1f} s",
        str(stats.version),
        acc_text,
        str(stats.applied),
        dropped,
        f"mean {stats.mean_staleness:.1f} max {stats.max_staleness}",
        str(stats.buffered),
        str(sum(d.trained for d in devices)),
        f"{stats.bytes_in / 1e6:.1f} MB",
    )
    return table


def progress_line(stats: AggregatorStats) -> str:
    """The same facts as one log line, for output that is not a terminal."""
    return (
        f"t={stats.elapsed_s:6.1f}s version={stats.version}"
        f" {_label(stats).replace(' ', '')}={_fmt(stats.latest_target)}"
        f" applied={stats.applied} dropped={stats.dropped}"
        f" staleness_mean={stats.mean_staleness:.2f} staleness_max={stats.max_staleness}"
    )


def summary_table(rows: Sequence[tuple[str, str]]) -> Table:
    """Two columns: what was measured, and its value."""
    table = Table(title="fedmq run summary", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    return table

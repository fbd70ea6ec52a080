"""What the aggregator has done so far: counters a display, a report or metrics read."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from fedmq.aggregator._health import CollapseWatch
from fedmq.aggregator._histogram import Histogram

__all__ = ["AccuracyPoint", "AggregatorStats"]


@dataclass(frozen=True, kw_only=True)
class AccuracyPoint:
    """One evaluation of the global model on the held-out set.

    ``bytes_in`` / ``bytes_out``: update bytes received and model bytes published
    when the evaluated version was taken.
    """

    elapsed_s: float
    version: int
    applied: int
    accuracy: float
    loss: float
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(kw_only=True)
class AggregatorStats:
    """Live counters, owned and mutated by the aggregator's event loop only."""

    started: float = field(default_factory=time.monotonic)
    version: int = 0
    received: int = 0
    applied: int = 0  # updates accepted by the strategy (buffered ones included)
    rejected: Counter[str] = field(default_factory=Counter)  # by Reason value
    staleness: Counter[int] = field(default_factory=Counter)  # of accepted updates
    bytes_in: int = 0
    bytes_out: int = 0
    models_published: int = 0
    buffered: int = 0
    participants: set[str] = field(default_factory=set)
    accuracy: list[AccuracyPoint] = field(default_factory=list)
    # For the metrics endpoint (aggregator/_metrics.py), read at scrape time:
    apply_seconds: Histogram = field(default_factory=Histogram)  # of applied updates
    last_seen: dict[str, float] = field(default_factory=dict)  # participant -> monotonic
    controls: Counter[str] = field(default_factory=Counter)  # "applied" / "rejected"
    control_rejected: Counter[str] = field(default_factory=Counter)  # by reason
    health: CollapseWatch = field(default_factory=CollapseWatch)  # fed every evaluation

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def dropped(self) -> int:
        """Updates refused for any reason."""
        return sum(self.rejected.values())

    @property
    def latest_accuracy(self) -> float | None:
        return self.accuracy[-1].accuracy if self.accuracy else None

    @property
    def mean_staleness(self) -> float:
        total = sum(self.staleness.values())
        return sum(d * n for d, n in self.staleness.items()) / total if total else 0.0

    @property
    def max_staleness(self) -> int:
        return max(self.staleness, default=0)

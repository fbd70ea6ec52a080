"""What the aggregator has done so far: counters a display, a report or metrics read."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fedmq.aggregator._health import CollapseWatch
from fedmq.aggregator._histogram import Histogram
from fedmq.tasks import Metric

__all__ = ["AggregatorStats", "EvalPoint", "EvalSource"]

EvalSource = Literal["central", "federated"]


@dataclass(frozen=True, kw_only=True)
class EvalPoint:
    """One evaluation of the global model: the task's named ``metrics``.

    ``source``: ``"central"``, the aggregator's own held-out set, of ``version``; or
    ``"federated"``, the example-weighted mean of the devices' reports on versions
    ``version - window`` to ``version`` (``devices`` of them, ``examples`` in all).
    ``bytes_in`` / ``bytes_out``: update bytes received and model bytes published
    when the evaluation was taken.
    """

    elapsed_s: float
    version: int
    applied: int
    metrics: Mapping[str, float]
    source: EvalSource = "central"
    devices: int = 0
    examples: int = 0
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
    target: Metric = field(default_factory=lambda: Metric("accuracy", higher_is_better=True))
    evaluations: list[EvalPoint] = field(default_factory=list)  # central and federated
    eval_reports: int = 0  # devices' evaluation reports taken
    eval_rejected: Counter[str] = field(default_factory=Counter)  # by Reason value
    # For the metrics endpoint (aggregator/_metrics.py), read at scrape time:
    apply_seconds: Histogram = field(default_factory=Histogram)  # of applied updates
    last_seen: dict[str, float] = field(default_factory=dict)  # participant -> monotonic
    controls: Counter[str] = field(default_factory=Counter)  # "applied" / "rejected"
    control_rejected: Counter[str] = field(default_factory=Counter)  # by reason
    health: CollapseWatch = field(default_factory=CollapseWatch)  # fed every evaluation
    clipped: int = 0  # updates scaled down to the clip norm on admission
    # Client-level DP (ClientPrivacy.report()): epsilon spent, delta, z, C, min_gap,
    # steps; refreshed after every server step. None when DP is off.
    privacy: dict[str, Any] | None = None

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def dropped(self) -> int:
        """Updates refused for any reason."""
        return sum(self.rejected.values())

    def latest(self, source: EvalSource | None = None) -> EvalPoint | None:
        """The newest evaluation (of ``source``, when given)."""
        for point in reversed(self.evaluations):
            if source is None or point.source == source:
                return point
        return None

    @property
    def scored(self) -> list[EvalPoint]:
        """The evaluations that stop rules and reports read: the central ones when the
        aggregator has a held-out set, else the devices' (federated)."""
        central = [p for p in self.evaluations if p.source == "central"]
        return central or [p for p in self.evaluations if p.source == "federated"]

    @property
    def latest_target(self) -> float | None:
        """The target metric of the newest scored evaluation (None before the first)."""
        scored = self.scored
        return scored[-1].metrics.get(self.target.name) if scored else None

    @property
    def mean_staleness(self) -> float:
        total = sum(self.staleness.values())
        return sum(d * n for d, n in self.staleness.items()) / total if total else 0.0

    @property
    def max_staleness(self) -> int:
        return max(self.staleness, default=0)

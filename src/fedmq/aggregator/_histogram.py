"""A fixed-bucket histogram the event loop fills and a metrics scrape reads (no locks, no deps)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

__all__ = ["APPLY_SECONDS_BUCKETS", "Histogram"]

# Seconds from taking an update off the broker to having applied it (and published the
# model when it made a new version): milliseconds for a small model, seconds for a big one.
APPLY_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Counts of observations per bucket (upper bounds, ascending) plus their sum."""

    def __init__(self, bounds: Sequence[float] = APPLY_SECONDS_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"bounds must be ascending and distinct, got {bounds}")
        self.bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` per bucket, ending with ``(inf, count)``."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self._counts, strict=True):
            running += n
            out.append((bound, running))
        return out

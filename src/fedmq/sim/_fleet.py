"""The fleet of BENCHMARK.md as pure, seeded functions: speeds, on/off periods, rounds.

Everything here depends only on its arguments, so the real-broker benchmark and the
virtual-clock simulator see the very same fleet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedmq.errors import ConfigError

if TYPE_CHECKING:
    from fedmq.tasks import Metric

__all__ = ["FleetProtocol", "RoundPicker", "is_online", "online_periods", "speed_factors"]


@dataclass(frozen=True, kw_only=True)
class FleetProtocol:
    """The fleet of the fixed workload "fmnist-fleet" (BENCHMARK.md), for any task with a
    fleet; every value can be overridden.

    Device ``i`` waits ``speed[i] * delay_unit_s`` after training before it publishes,
    is online for ``Exp(mean_online_s)`` then offline for ``Exp(mean_offline_s)``, in
    turn, from t = 0; at most ``concurrency`` devices train at once. ``participants`` 0:
    as many devices as the task's own fleet has (``Task.fleet(..., 0, ...)``). A run stops when the
    task's target metric reaches ``target`` (None: the metric's goal, fmnist accuracy
    0.80), after ``max_seconds``, or once the global model reaches version ``max_versions``
    (0: no such limit; a fixed number of server steps, so that runs with and without a
    privacy budget compare at the same step). ``seed`` is given to ``Task.fleet``;
    ``dirichlet_alpha`` is the label skew of the fmnist split (the CLI gives the task the
    same value), recorded in the report.
    """

    participants: int = 50
    dirichlet_alpha: float = 0.5
    seed: int = 0
    speed_sigma: float = 1.0
    delay_unit_s: float = 2.0
    mean_online_s: float = 60.0
    mean_offline_s: float = 20.0
    concurrency: int = 10
    target: float | None = None
    max_seconds: float = 600.0
    max_versions: int = 0

    def __post_init__(self) -> None:
        if self.participants < 0:
            raise ConfigError(f"participants: {self.participants} must be >= 0 (0: the task's)")
        if not self.dirichlet_alpha > 0:
            raise ConfigError(f"dirichlet_alpha: {self.dirichlet_alpha} must be > 0")
        if self.speed_sigma < 0 or self.delay_unit_s < 0:
            raise ConfigError("speed_sigma and delay_unit: must be >= 0")
        if not (self.mean_online_s > 0 and self.mean_offline_s >= 0):
            raise ConfigError("mean_online must be > 0 and mean_offline >= 0")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency: {self.concurrency} must be >= 1")
        if self.target is not None and not math.isfinite(self.target):
            raise ConfigError(f"target: {self.target} must be a finite number or None")
        if not self.max_seconds > 0:
            raise ConfigError(f"max_seconds: {self.max_seconds} must be > 0")
        if self.max_versions < 0:
            raise ConfigError(f"max_versions: {self.max_versions} must be >= 0 (0: no limit)")

    def versions_done(self, version: int) -> bool:
        """Whether a run whose global model is at ``version`` has taken its last step."""
        return 0 < self.max_versions <= version

    def goal(self, metric: Metric) -> float:
        """The value of ``metric`` the run stops at: ``target``, else the metric's goal."""
        goal = self.target if self.target is not None else metric.goal
        if goal is None:
            raise ConfigError(f"target: the task sets no goal for {metric.name!r}; give --target")
        return goal

    def publish_delay_s(self, speeds: np.ndarray, i: int) -> float:
        return float(speeds[i]) * self.delay_unit_s


def speed_factors(count: int, sigma: float = 1.0) -> np.ndarray:
    """``s = default_rng(0).lognormal(0.0, sigma, size=count)``: device i's slowness."""
    return np.random.default_rng(0).lognormal(0.0, sigma, size=count)


def online_periods(
    i: int, horizon_s: float, mean_online_s: float, mean_offline_s: float
) -> list[tuple[float, float]]:
    """Device ``i``'s online periods ``[(start, end), ...]`` from t = 0 up to ``horizon_s``.

    ``rng = default_rng([1, i])`` draws, in turn, ``exponential(mean_online_s)`` online
    and ``exponential(mean_offline_s)`` offline; the first period starts at 0.
    """
    rng = np.random.default_rng([1, i])
    periods: list[tuple[float, float]] = []
    t = 0.0
    while t < horizon_s:
        on = float(rng.exponential(mean_online_s))
        off = float(rng.exponential(mean_offline_s))
        periods.append((t, t + on))
        t += on + off
    return periods


def is_online(periods: Sequence[tuple[float, float]], t: float) -> bool:
    return any(start <= t < end for start, end in periods)


class RoundPicker:
    """Synchronous FedAvg's participants: the online ones, sorted; if more than ``size``,
    ``sorted(rng.choice(online, size, replace=False))`` with one ``default_rng(0)`` per run.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._rng = np.random.default_rng(0)

    def pick(self, online: Sequence[int]) -> list[int]:
        ordered = sorted(online)
        if len(ordered) <= self._size:
            return ordered
        chosen = self._rng.choice(np.asarray(ordered), self._size, replace=False)
        return sorted(int(i) for i in chosen)

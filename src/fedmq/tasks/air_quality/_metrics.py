"""RMSE and MAE in µg/m³, on the kept windows (whose target was observed).

A ``Metrics`` keeps its sums (squared and absolute errors, count), so metrics of
several stations pool exactly (``Metrics.pool``), as if computed on all their
windows at once, and the mean over stations is a plain average of their values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from torch import nn

from fedmq.errors import DataError
from fedmq.tasks.air_quality._normalize import NormStats
from fedmq.tasks.air_quality._train import predict
from fedmq.tasks.air_quality._window import Windows

__all__ = ["Metrics", "evaluate", "persistence"]


@dataclass(frozen=True, kw_only=True)
class Metrics:
    """Sums of squared and absolute errors (µg/m³) over ``n`` windows."""

    n: int
    sum_sq: float
    sum_abs: float

    @classmethod
    def of(cls, prediction: npt.NDArray[Any], target: npt.NDArray[Any]) -> Metrics:
        """Errors of ``prediction`` against ``target``, both [n] in µg/m³."""
        p, t = np.asarray(prediction, np.float64), np.asarray(target, np.float64)
        if p.shape != t.shape or p.ndim != 1:
            raise DataError(f"prediction {p.shape} and target {t.shape} must be equal, 1-D")
        if not np.isfinite(t).all():
            raise DataError("a target is missing (NaN): such windows are dropped, not scored")
        err = p - t
        return cls(n=len(t), sum_sq=float(err @ err), sum_abs=float(np.abs(err).sum()))

    @classmethod
    def pool(cls, parts: Iterable[Metrics]) -> Metrics:
        """The metrics of all the windows of ``parts`` together."""
        parts = list(parts)
        return cls(
            n=sum(p.n for p in parts),
            sum_sq=sum(p.sum_sq for p in parts),
            sum_abs=sum(p.sum_abs for p in parts),
        )

    @property
    def rmse(self) -> float:
        return math.sqrt(self.sum_sq / self.n) if self.n else math.nan

    @property
    def mse(self) -> float:
        return self.sum_sq / self.n if self.n else math.nan

    @property
    def mae(self) -> float:
        return self.sum_abs / self.n if self.n else math.nan


def evaluate(model: nn.Module, windows: Windows, stats: NormStats) -> Metrics:
    """The model's errors in µg/m³ on ``windows`` normalised with ``stats``."""
    prediction = stats.denormalize_target(predict(model, windows.data).numpy())
    return Metrics.of(prediction, windows.target)


def persistence(windows: Windows) -> Metrics:
    """The errors of "PM2.5 in h hours = PM2.5 now" on ``windows``."""
    return Metrics.of(windows.persistence, windows.target)

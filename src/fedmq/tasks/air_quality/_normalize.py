"""Normalisation statistics that never need the raw readings off a device.

Each device computes ``SufficientStats`` on its own TRAIN part: per input column,
the count of observed values, their sum and their sum of squares (float64).
These three aggregates are all that would ever leave a device; ``combine``
adds several devices' statistics and returns the global mean and standard
deviation, exactly those of the pooled training readings (sums add). A device
can instead keep purely local statistics: ``SufficientStats.norm()`` of its own.

The statistics cover the columns of ``NUMERIC_COLUMNS`` (PM2.5 first, which is
also the target: predictions are made in its normalised units and mapped back
to µg/m³ with ``NormStats.denormalize_target``). Wind direction, hour of day and
missing-value indicators are already bounded and are not normalised.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmq.errors import DataError

__all__ = ["MIN_STD", "NormStats", "SufficientStats", "combine"]

# A column that is (almost) constant on the train part is divided by this instead of ~0.
MIN_STD = 1e-6


@dataclass(frozen=True, kw_only=True)
class NormStats:
    """Per-column ``mean`` and ``std`` (float64 [F]); column 0 is PM2.5, the target."""

    mean: npt.NDArray[np.float64]
    std: npt.NDArray[np.float64]

    def normalize(self, values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """``(values - mean) / std`` over the last axis (NaN stays NaN)."""
        out: npt.NDArray[np.float64] = (values - self.mean) / self.std
        return out

    def normalize_target(self, pm25: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """PM2.5 in µg/m³ -> normalised units."""
        out: npt.NDArray[np.float64] = (pm25 - self.mean[0]) / self.std[0]
        return out

    def denormalize_target(self, y: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """Normalised PM2.5 -> µg/m³."""
        out: npt.NDArray[np.float64] = np.asarray(y, dtype=np.float64) * float(self.std[0])
        return out + float(self.mean[0])


@dataclass(frozen=True, kw_only=True)
class SufficientStats:
    """Per-column ``count``, ``sum`` and ``sum_sq`` of the observed train values (float64 [F])."""

    count: npt.NDArray[np.float64]
    sum: npt.NDArray[np.float64]
    sum_sq: npt.NDArray[np.float64]

    @classmethod
    def of(cls, values: npt.NDArray[np.float64]) -> SufficientStats:
        """The statistics of ``values`` [n, F], ignoring NaN (not observed)."""
        observed = ~np.isnan(values)
        zeroed = np.where(observed, values, 0.0)
        return cls(
            count=observed.sum(axis=0).astype(np.float64),
            sum=zeroed.sum(axis=0),
            sum_sq=(zeroed * zeroed).sum(axis=0),
        )

    def __add__(self, other: SufficientStats) -> SufficientStats:
        if self.count.shape != other.count.shape:
            raise DataError(
                f"statistics of {self.count.shape[0]} and {other.count.shape[0]} columns"
            )
        return SufficientStats(
            count=self.count + other.count,
            sum=self.sum + other.sum,
            sum_sq=self.sum_sq + other.sum_sq,
        )

    def norm(self) -> NormStats:
        """Mean and population standard deviation (at least ``MIN_STD``) per column.

        Raises ``DataError`` when a column has no observed value.
        """
        if np.any(self.count <= 0):
            empty = np.flatnonzero(self.count <= 0).tolist()
            raise DataError(f"no observed training value in column(s) {empty}")
        mean = self.sum / self.count
        var = np.maximum(self.sum_sq / self.count - mean * mean, 0.0)
        return NormStats(mean=mean, std=np.maximum(np.sqrt(var), MIN_STD))

    def to_dict(self) -> dict[str, list[float]]:
        """Plain lists, for a message (msgpack, JSON)."""
        return {
            "count": self.count.tolist(),
            "sum": self.sum.tolist(),
            "sum_sq": self.sum_sq.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SufficientStats:
        """The inverse of ``to_dict``; raises ``DataError`` on a malformed or non-finite value."""
        try:
            parts = [np.asarray(data[k], dtype=np.float64) for k in ("count", "sum", "sum_sq")]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"malformed statistics ({exc!r})") from exc
        shapes = {p.shape for p in parts}
        if len(shapes) != 1 or parts[0].ndim != 1:
            raise DataError(f"statistics: count, sum and sum_sq differ in shape {shapes}")
        if not all(np.isfinite(p).all() for p in parts) or np.any(parts[0] < 0):
            raise DataError("statistics: non-finite value or negative count")
        return cls(count=parts[0], sum=parts[1], sum_sq=parts[2])


def combine(parts: Iterable[SufficientStats]) -> NormStats:
    """The global mean and std of several devices' training readings, from their statistics."""
    total: SufficientStats | None = None
    for part in parts:
        total = part if total is None else total + part
    if total is None:
        raise DataError("combine: no statistics given")
    return total.norm()

"""Robust aggregation: FedBuff's robust ``Combine`` rules and FedAsync's outlier check.

FedBuff's step direction is the mean of the buffered, staleness-weighted deltas
``w_i * delta_i`` (``weighted_mean``). One device that sends a huge or a reversed delta
moves that mean as far as it likes. The rules here replace the mean:

``median``
    coordinate-wise median of ``w_i * delta_i`` over the buffer (Yin et al., 2018).
    Each delta is one vote per coordinate; the staleness weight only scales the vote
    (a stale delta's value is pulled towards zero, as it is in the mean). Stops any
    minority (< K/2) of deltas, whatever their size, per coordinate. Costs accuracy on
    non-IID data: a coordinate only a few devices' data moves is set by the middle
    device, which did not move it.
``trimmed_mean``
    coordinate-wise: drop the ``floor(beta * K)`` largest and smallest values of
    ``w_i * delta_i``, average the rest (unweighted, over what is left). Stops up to
    ``floor(beta * K)`` bad deltas per buffer; more than that get through.
``norm_bounded``
    each delta scaled down to at most ``norm_bound_factor`` times the median L2 norm
    of the deltas in this buffer (the raw deltas, before the staleness weight), then
    FedBuff's own weighted mean ``(1 / k) * sum_i w_i * delta_i`` with the staleness
    weights unchanged (Sun et al., 2019, "Can you really backdoor FL?"). Stops a
    minority of *large* deltas (a scaled or boosted update counts as at most
    ``norm_bound_factor`` honest ones); a delta of honest size that points the wrong
    way (sign flip, small coordinated changes) goes through at full weight.

Median and trimmed mean are not sums, so ``k`` (a mean's denominator) is not used:
they make every top-k ``SparseTensor`` dense (O(K x model) memory for one flush).
Norm-bounded averaging is a weighted mean with each weight multiplied by the delta's
clip factor, so it keeps sparse tensors sparse, like the mean.

FedAsync has no buffer to take a median over: each update moves the model at once.
Its defence is a per-update check (``outlier_limit``): an update whose L2 norm is above
``median + outlier_factor * MAD`` of the last accepted norms is refused (``outlier``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from fedmq.codecs import SparseTensor, dense
from fedmq.strategies._common import Delta, f32, is_int, is_number, require
from fedmq.strategies._fedbuff import Combine, Entry, weighted_mean

__all__ = [
    "ROBUST_RULES",
    "RobustConfig",
    "RobustRule",
    "coordinate_median",
    "delta_norm",
    "norm_bounded_mean",
    "outlier_limit",
    "robust_combine",
    "trimmed_mean",
]

RobustRule = Literal["mean", "median", "trimmed_mean", "norm_bounded"]
ROBUST_RULES: tuple[RobustRule, ...] = get_args(RobustRule)

_Arrays = dict[str, npt.NDArray[np.float32]]

# An outlier check needs a spread: with MAD 0 (every recent norm equal) any norm above
# the median would be refused. The spread is never taken below this share of the median.
MAD_FLOOR = 0.05


@dataclass(frozen=True, kw_only=True)
class RobustConfig:
    """Which robust rule FedBuff combines its buffer with, and FedAsync's outlier check.

    ``rule``: ``mean`` (FedBuff's own weighted mean: no defence, no extra work),
    ``median``, ``trimmed_mean`` (drop ``trim_fraction`` of the buffer at each end, per
    coordinate, ``trim_fraction`` in [0, 0.5)), ``norm_bounded`` (clip each delta to
    ``norm_bound_factor`` x the buffer's median norm, ``norm_bound_factor`` >= 1).
    Only FedBuff has a buffer: any other rule with another strategy is refused.

    ``outlier_factor``: FedAsync refuses an update whose L2 norm is above
    ``median + outlier_factor * max(MAD, 0.05 * median)`` of the last ``outlier_window``
    accepted norms, once ``outlier_min_samples`` were accepted (0: off).
    """

    rule: RobustRule = "mean"
    trim_fraction: float = 0.1
    norm_bound_factor: float = 2.0
    outlier_factor: float = 0.0
    outlier_window: int = 100
    outlier_min_samples: int = 10

    def __post_init__(self) -> None:
        require(self.rule in ROBUST_RULES, self, "rule", " | ".join(ROBUST_RULES), self.rule)
        require(
            is_number(self.trim_fraction) and 0 <= self.trim_fraction < 0.5,
            self,
            "trim_fraction",
            "in [0, 0.5)",
            self.trim_fraction,
        )
        require(
            is_number(self.norm_bound_factor) and self.norm_bound_factor >= 1,
            self,
            "norm_bound_factor",
            "a finite number >= 1",
            self.norm_bound_factor,
        )
        require(
            is_number(self.outlier_factor) and self.outlier_factor >= 0,
            self,
            "outlier_factor",
            "a finite number >= 0 (0: off)",
            self.outlier_factor,
        )
        require(
            is_int(self.outlier_window) and self.outlier_window >= 1,
            self,
            "outlier_window",
            "an integer >= 1",
            self.outlier_window,
        )
        require(
            is_int(self.outlier_min_samples)
            and 1 <= self.outlier_min_samples <= self.outlier_window,
            self,
            "outlier_min_samples",
            f"an integer in 1..outlier_window ({self.outlier_window})",
            self.outlier_min_samples,
        )


def robust_combine(config: RobustConfig) -> Combine:
    """The ``Combine`` ``config.rule`` names (``weighted_mean`` itself for ``mean``)."""
    match config.rule:
        case "mean":
            return weighted_mean
        case "median":
            return coordinate_median
        case "trimmed_mean":
            beta = config.trim_fraction
            return lambda entries, k: trimmed_mean(entries, k, beta)
        case "norm_bounded":
            factor = config.norm_bound_factor
            return lambda entries, k: norm_bounded_mean(entries, k, factor)[0]


def coordinate_median(entries: Sequence[Entry], k: int) -> _Arrays:
    """``g[j] = median_i(w_i * delta_i[j])`` per coordinate (``k`` unused: not a sum).

    With an even number of deltas, the mean of the two middle values (numpy's median).
    """
    del k
    return {name: f32(np.median(_stack(entries, name), axis=0)) for name in entries[0][0]}


def trimmed_mean(entries: Sequence[Entry], k: int, beta: float) -> _Arrays:
    """Per coordinate, the mean of ``w_i * delta_i[j]`` without the ``floor(beta * K)``
    largest and the as many smallest values (``K`` = entries; ``k`` unused)."""
    del k
    count = len(entries)
    cut = math.floor(beta * count)
    out: _Arrays = {}
    for name in entries[0][0]:
        stacked = np.sort(_stack(entries, name), axis=0)  # (K, *shape), ascending per coordinate
        out[name] = f32(stacked[cut : count - cut].mean(axis=0, dtype=np.float32))
    return out


def norm_bounded_mean(entries: Sequence[Entry], k: int, factor: float) -> tuple[_Arrays, int]:
    """FedBuff's weighted mean of the deltas, each first scaled down to at most
    ``factor`` x the median L2 norm of the buffer's deltas; ``(g, how many were scaled)``.

    A delta of norm ``n_i`` above the bound ``B`` is multiplied by ``B / n_i``: it keeps
    its direction. The scale folds into the weight, so sparse tensors stay sparse.
    """
    norms = [delta_norm(delta) for delta, _ in entries]
    bound = factor * statistics.median(norms)
    clipped = 0
    scaled: list[Entry] = []
    for (delta, weight), norm in zip(entries, norms, strict=True):
        if norm > bound:
            clipped += 1
            weight = weight * (bound / norm)
        scaled.append((delta, weight))
    return weighted_mean(scaled, k), clipped


def delta_norm(delta: Delta) -> float:
    """The L2 norm of a delta, all tensors together (sparse tensors: their entries)."""
    total = 0.0
    for tensor in delta.values():
        if isinstance(tensor, SparseTensor):
            total += tensor.squared_norm()
        else:
            array = f32(tensor).reshape(-1)
            total += float(np.vdot(array, array))
    return math.sqrt(total)


def outlier_limit(norms: Sequence[float], config: RobustConfig) -> float:
    """The largest L2 norm FedAsync's check admits after these accepted ``norms``:
    ``median + outlier_factor * max(MAD, 0.05 * median)`` of the last
    ``outlier_window``; inf while the check is off or fewer than
    ``outlier_min_samples`` were seen."""
    if not config.outlier_factor:
        return math.inf  # off: no work at all on the default path
    recent = list(norms)[-config.outlier_window :]
    if len(recent) < config.outlier_min_samples:
        return math.inf
    median = statistics.median(recent)
    mad = statistics.median(abs(n - median) for n in recent)
    return median + config.outlier_factor * max(mad, MAD_FLOOR * median)


def _stack(entries: Sequence[Entry], name: str) -> npt.NDArray[np.float32]:
    """``w_i * delta_i[name]`` for every entry, stacked: shape (K, *tensor shape)."""
    first = entries[0][0][name]
    out = np.empty((len(entries), *np.shape(first)), dtype=np.float32)
    for row, (delta, weight) in zip(out, entries, strict=True):
        np.multiply(f32(dense(delta[name])), weight, out=row, dtype=np.float32)
    return out

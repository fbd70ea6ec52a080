"""Synchronous FedAvg (McMahan et al., 2017): average one round's deltas by example count."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedmq.strategies._common import Params, check_compatible, f32, is_int, require

__all__ = ["FedAvgConfig", "fedavg_aggregate"]


@dataclass(frozen=True, kw_only=True)
class FedAvgConfig:
    """How many participants a round waits for (the benchmark's C = 10)."""

    clients_per_round: int = 10

    def __post_init__(self) -> None:
        require(
            is_int(self.clients_per_round) and self.clients_per_round >= 1,
            self,
            "clients_per_round",
            "an integer >= 1",
            self.clients_per_round,
        )


def fedavg_aggregate(
    global_: Params, contributions: Sequence[tuple[Params, int]]
) -> dict[str, npt.NDArray[np.float32]]:
    """The round's new model from ``(delta, num_examples)`` pairs::

        x <- x + sum_i n_i * delta_i / sum_i n_i

    (the example-weighted mean of the deltas, i.e. of the local models, since
    all of them trained from ``x``). Returns fresh float32 arrays in ``global_``'s
    order; inputs are never modified. ``ValueError`` if there are no
    contributions, an ``n_i`` is negative, all are zero, or shapes differ.
    """
    if not contributions:
        raise ValueError("fedavg_aggregate: no contributions")
    counts = [n for _, n in contributions]
    if any(n < 0 for n in counts) or sum(counts) == 0:
        raise ValueError(f"fedavg_aggregate: example counts must be >= 0, not all 0: {counts}")
    for delta, _ in contributions:
        check_compatible(global_, delta, "delta")
    total = float(sum(counts))
    return {
        name: f32(f32(x) + sum((n / total) * f32(delta[name]) for delta, n in contributions))
        for name, x in global_.items()
    }

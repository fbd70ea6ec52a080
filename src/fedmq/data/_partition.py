"""Splitting a training set across participants: label-skewed (Dirichlet) or IID.

Both are pure functions of their arguments: each builds its own generator from
``seed`` and never touches numpy's global random state.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedmq.errors import ConfigError, DataError

__all__ = ["dirichlet_partition", "iid_partition"]


def dirichlet_partition(
    labels: npt.NDArray[np.integer], num_participants: int, alpha: float, seed: int
) -> list[npt.NDArray[np.int64]]:
    """Label-skewed split: each class is spread over participants by a Dirichlet(alpha) draw.

    Exactly the benchmark's algorithm (BENCHMARK.md, "fmnist-fleet")::

        rng = numpy.random.default_rng(seed)
        for c in 0 .. labels.max():                  # every class, in order
            idx = ascending indices i with labels[i] == c
            p = rng.dirichlet(alpha * ones(num_participants))
            cut idx at floor(cumsum(p)[:-1] * len(idx)); piece k goes to participant k

    Returns one sorted int64 index array per participant; together they are a
    disjoint cover of ``range(len(labels))``. Smaller ``alpha`` means more skew;
    a participant may receive no examples at all.
    """
    if num_participants < 1:
        raise ConfigError(f"num_participants: must be >= 1, got {num_participants}")
    if not alpha > 0 or not np.isfinite(alpha):
        raise ConfigError(f"alpha: must be a finite number > 0, got {alpha}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels: expected a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) and labels.min() < 0:
        raise DataError(f"labels: must be >= 0, found {labels.min()}")

    rng = np.random.default_rng(seed)
    pieces: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(num_participants)]
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)  # ascending
        p = rng.dirichlet(alpha * np.ones(num_participants))
        cuts = np.floor(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
        for k, piece in enumerate(np.split(idx, cuts)):
            pieces[k].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else _empty() for p in pieces]


def iid_partition(
    num_examples: int, num_participants: int, seed: int
) -> list[npt.NDArray[np.int64]]:
    """Uniform split: a seeded permutation of ``range(num_examples)`` cut into near-equal parts.

    ``perm = numpy.random.default_rng(seed).permutation(num_examples)``, then
    ``numpy.array_split(perm, num_participants)`` (sizes differ by at most one);
    each participant's indices are returned sorted, as int64.
    """
    if num_examples < 0:
        raise ConfigError(f"num_examples: must be >= 0, got {num_examples}")
    if num_participants < 1:
        raise ConfigError(f"num_participants: must be >= 1, got {num_participants}")
    perm = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_participants)]


def _empty() -> npt.NDArray[np.int64]:
    return np.zeros(0, dtype=np.int64)

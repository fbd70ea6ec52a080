"""L2 clipping of a whole update (all tensors together), dense or top-k sparse."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from fedmq.codecs import SparseTensor
from fedmq.errors import ConfigError

__all__ = ["clip"]

Tensor = npt.NDArray[np.float32] | SparseTensor


def clip(delta: Mapping[str, Tensor], bound: float) -> tuple[dict[str, Tensor], float]:
    """``(delta scaled to L2 norm <= bound, the norm before)``; new arrays, inputs untouched.

    The norm is over every tensor of the update together (the sensitivity DP needs is
    the whole update's). An update already within the bound is returned as copies.
    """
    if not (math.isfinite(bound) and bound > 0):
        raise ConfigError(f"clip bound: must be a finite number > 0, got {bound}")
    squared = 0.0
    for tensor in delta.values():
        if isinstance(tensor, SparseTensor):
            squared += tensor.squared_norm()
        else:
            flat = np.asarray(tensor, dtype=np.float32).reshape(-1)
            squared += float(np.dot(flat.astype(np.float64), flat.astype(np.float64)))
    norm = math.sqrt(squared)
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {name: _scaled(t, scale) for name, t in delta.items()}, norm


def _scaled(tensor: Tensor, scale: float) -> Tensor:
    if isinstance(tensor, SparseTensor):
        values = np.multiply(tensor.values, scale, dtype=np.float32)
        return SparseTensor(tensor.shape, tensor.indices.copy(), values)
    return np.multiply(tensor, scale, dtype=np.float32)

"""L2 clipping of a whole update: every tensor scaled by one factor ``min(1, C / norm)``.

The bound is on the update as a whole (all tensors together), as DP-FedAvg (McMahan
et al., 2018) and the aggregator's norm bounds measure it: clipping each tensor on its
own would let an update of ``n`` tensors reach ``sqrt(n) * C``. Top-k tensors
(``SparseTensor``) stay sparse: only their values are scaled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from fedmq.codecs import SparseTensor

__all__ = ["clip", "l2_norm"]

_Tensor = npt.NDArray[np.float32] | SparseTensor


def l2_norm(delta: Mapping[str, np.ndarray | SparseTensor]) -> float:
    """The L2 norm of all of ``delta``'s tensors together (accumulated in float64)."""
    total = 0.0
    for tensor in delta.values():
        values = tensor.values if isinstance(tensor, SparseTensor) else tensor
        flat = np.asarray(values, dtype=np.float64).reshape(-1)
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip(
    delta: Mapping[str, np.ndarray | SparseTensor], bound: float, *, norm: float | None = None
) -> tuple[dict[str, _Tensor], float]:
    """``(delta scaled by min(1, bound / norm), norm)``, ``norm`` taken before clipping.

    ``norm``: the delta's L2 norm when the caller has it already (the aggregator's
    decoder measures every update), so it is not measured twice.
    New arrays when scaled; when the norm is within ``bound`` the tensors are returned
    as they are (no copy). A norm that is not finite clips to zeros: nothing of it can
    be trusted, and a zero update is the one that says nothing.
    """
    if not bound > 0:
        raise ValueError(f"clip: bound must be > 0, got {bound!r}")
    if norm is None:
        norm = l2_norm(delta)
    if norm <= bound:
        return dict(delta), norm
    scale = bound / norm if math.isfinite(norm) else 0.0
    return {name: _scaled(tensor, scale) for name, tensor in delta.items()}, norm


def _scaled(tensor: np.ndarray | SparseTensor, scale: float) -> _Tensor:
    if isinstance(tensor, SparseTensor):
        values = np.multiply(tensor.values, scale, dtype=np.float32)
        if scale == 0.0:
            values = np.zeros_like(values)
        return SparseTensor(shape=tensor.shape, indices=tensor.indices, values=values)
    if scale == 0.0:
        return np.zeros(np.shape(tensor), dtype=np.float32)
    scaled: npt.NDArray[np.float32] = np.multiply(tensor, scale, dtype=np.float32)
    return scaled

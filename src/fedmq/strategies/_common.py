"""Helpers shared by the strategies: the parameter type, checks, float32 arithmetic."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from fedmq.codecs import SparseTensor, dense
from fedmq.errors import ConfigError

__all__ = [
    "Delta",
    "Params",
    "check_compatible",
    "dense",
    "f32",
    "frozen_copy",
    "frozen_delta",
    "is_int",
    "is_number",
    "require",
]

Params = Mapping[str, npt.NDArray[np.float32]]
"""Model parameters or a delta: tensor name -> float32 array (the model's state_dict order)."""

Delta = Mapping[str, npt.NDArray[np.float32] | SparseTensor]
"""A delta as decoded from an update: top-k tensors may stay sparse (``SparseTensor``)."""


def require(ok: bool, owner: object, field: str, allowed: str, value: object) -> None:
    """Raise ``ConfigError("Owner.field: must be <allowed>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{type(owner).__name__}.{field}: must be {allowed}, got {value!r}")


def is_number(value: object) -> bool:
    """A finite int or float (bools excluded)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_compatible(reference: Params | Delta, other: Params | Delta, what: str) -> None:
    """``other`` has exactly ``reference``'s tensor names and shapes, else ``ValueError``."""
    if reference.keys() != other.keys():
        missing = sorted(reference.keys() - other.keys())
        extra = sorted(other.keys() - reference.keys())
        raise ValueError(f"{what}: tensor names differ (missing {missing}, unexpected {extra})")
    for name, array in reference.items():
        if np.shape(other[name]) != np.shape(array):
            raise ValueError(
                f"{what}: {name} has shape {list(np.shape(other[name]))}, "
                f"expected {list(np.shape(array))}"
            )


def frozen_delta(delta: Delta) -> dict[str, npt.NDArray[np.float32] | SparseTensor]:
    """``frozen_copy`` for a delta whose sparse tensors are kept as they are (immutable)."""
    return {name: t if isinstance(t, SparseTensor) else _frozen(t) for name, t in delta.items()}


def frozen_copy(params: Params | Delta) -> dict[str, npt.NDArray[np.float32]]:
    """float32 copies marked read-only (sparse tensors made dense), for state that must
    not change once built.

    A float32 array that is already read-only is kept as it is, not copied: whoever
    made it read-only hands over an array nobody writes (the aggregator does so with
    each delta it decodes, which saves a copy of the model per update).
    """
    return {name: _frozen(dense(t)) for name, t in params.items()}


def _frozen(array: npt.ArrayLike) -> npt.NDArray[np.float32]:
    if isinstance(array, np.ndarray) and not array.flags.writeable and array.dtype == np.float32:
        return array
    copy = np.array(array, dtype=np.float32, copy=True)
    copy.flags.writeable = False
    return copy


def f32(array: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """``array`` as float32, without a copy when it already is."""
    return np.asarray(array, dtype=np.float32)

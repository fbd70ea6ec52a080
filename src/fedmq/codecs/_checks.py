"""Validation of codec parameters and shapes received from the network.

Everything here raises ``WireError`` and nothing else: these values come from other
machines, and a bad one is a counted rejection, never a crash.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import NoReturn, TypeGuard

from fedmq.codecs._config import MAX_NDIM, MAX_SHAPE_PRODUCT
from fedmq.errors import Reason, WireError

__all__ = ["exact_keys", "fail", "int_param", "is_int", "numel_of", "str_param"]


def fail(reason: Reason, detail: str) -> NoReturn:
    """Raise ``WireError(reason, detail)``; keeps the validators one line each."""
    raise WireError(reason, detail)


def is_int(value: object) -> TypeGuard[int]:
    """True for a real int; ``bool`` is an int subclass in Python but never one on the wire."""
    return isinstance(value, int) and not isinstance(value, bool)


def numel_of(shape: object) -> int:
    """Number of elements of ``shape``: at most MAX_NDIM ints >= 0, spanning <= 2**40."""
    if not isinstance(shape, tuple | list):
        fail(Reason.WRONG_TYPE, f"shape: expected an array of uints, got {type(shape).__name__}")
    if len(shape) > MAX_NDIM:
        fail(Reason.WRONG_TYPE, f"shape: {len(shape)} dimensions, at most {MAX_NDIM} allowed")
    for dim in shape:
        if not is_int(dim) or dim < 0:
            fail(Reason.WRONG_TYPE, f"shape: {dim!r} is not a uint")
    # Zeros count as ones: numpy refuses even an empty array of shape (0, 2**62).
    if math.prod(max(dim, 1) for dim in shape) > MAX_SHAPE_PRODUCT:
        fail(Reason.TOO_LARGE, f"shape: {list(shape)} spans over 2**40 elements")
    return math.prod(shape)


def exact_keys(params: object, required: Collection[str]) -> Mapping[str, object]:
    """Check that ``params`` is a map whose keys are exactly ``required``."""
    if not isinstance(params, Mapping):
        fail(Reason.WRONG_TYPE, f"params: expected a map, got {type(params).__name__}")
    missing = sorted(set(required) - set(params))
    if missing:
        fail(Reason.MISSING_FIELD, f"params: missing {', '.join(missing)}")
    extra = sorted(repr(k) for k in params if k not in required)
    if extra:
        fail(Reason.EXTRA_FIELD, f"params: unexpected {', '.join(extra)}")
    return params


def int_param(params: Mapping[str, object], key: str, low: int, high: int) -> int:
    """The int ``params[key]``, which must lie in [low, high]."""
    value = params[key]
    if not is_int(value):
        fail(Reason.WRONG_TYPE, f"params.{key}: expected an int, got {type(value).__name__}")
    if not low <= value <= high:
        fail(Reason.WRONG_TYPE, f"params.{key}: {value} is outside [{low}, {high}]")
    return value


def str_param(params: Mapping[str, object], key: str, allowed: Collection[str]) -> str:
    """The string ``params[key]``, which must be one of ``allowed``."""
    value = params[key]
    if not isinstance(value, str) or value not in allowed:
        fail(Reason.WRONG_TYPE, f"params.{key}: {value!r} is not one of {', '.join(allowed)}")
    return value

"""What a codec is asked to do (``CodecConfig``) and what it produces (``EncodedTensor``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from fedmq.errors import ConfigError

__all__ = [
    "MAX_BLOCK_SIZE",
    "MAX_NDIM",
    "MAX_SHAPE_PRODUCT",
    "CodecConfig",
    "CodecName",
    "EncodedTensor",
]

CodecName = Literal["float32", "float16", "int8", "int4", "topk"]
TopkValues = Literal["float32", "float16", "int8"]

# One float32 scale per block: a block of 1 is legal (and useless); beyond 65536 values per
# scale the accuracy is poor and a bound keeps the decoder's arithmetic small.
MAX_BLOCK_SIZE = 65536
# numpy refuses more than 64 dimensions; no model tensor comes close to 32.
MAX_NDIM = 32
# The product of the dimensions (a 0 counted as 1) is at most 2**40: far beyond any
# model, far below what would overflow numpy's size arithmetic.
MAX_SHAPE_PRODUCT = 2**40


def _names(literal: object) -> tuple[str, ...]:
    return tuple(str(a) for a in get_args(literal))


@dataclass(frozen=True, kw_only=True)
class CodecConfig:
    """How a participant compresses its model update.

    ``name`` picks the codec. ``block_size`` is the number of values sharing one float32
    scale (int8, int4, and top-k with int8 values). ``stochastic_rounding`` makes the
    integer codecs round up or down at random, unbiased in expectation (the float codecs
    ignore it). Top-k keeps ``max(1, ceil(topk_fraction * numel))`` entries per tensor and
    codes their values as ``topk_values``.
    """

    name: CodecName = "float32"
    block_size: int = 64
    stochastic_rounding: bool = False
    topk_fraction: float = 0.01
    topk_values: TopkValues = "float32"

    def __post_init__(self) -> None:
        if self.name not in _names(CodecName):
            raise ConfigError(f"name: {self.name!r} is not one of {', '.join(_names(CodecName))}")
        if (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, int)
            or not 1 <= self.block_size <= MAX_BLOCK_SIZE
        ):
            raise ConfigError(
                f"block_size: {self.block_size!r} must be an int in [1, {MAX_BLOCK_SIZE}]"
            )
        if not isinstance(self.stochastic_rounding, bool):
            raise ConfigError(f"stochastic_rounding: {self.stochastic_rounding!r} must be a bool")
        fraction = self.topk_fraction
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not math.isfinite(fraction)
            or not 0.0 < fraction <= 1.0
        ):
            raise ConfigError(f"topk_fraction: {fraction!r} must be a number in (0, 1]")
        if self.topk_values not in _names(TopkValues):
            raise ConfigError(
                f"topk_values: {self.topk_values!r} is not one of {', '.join(_names(TopkValues))}"
            )


@dataclass(frozen=True, kw_only=True)
class EncodedTensor:
    """One compressed tensor, as it travels inside an envelope.

    ``dtype`` and ``shape`` describe the tensor after decoding (``"float32"`` in v1).
    ``params`` holds every codec parameter the decoder needs (msgpack scalars only) and
    ``data`` the payload, laid out as docs/wire-format.md specifies.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    codec: str
    params: Mapping[str, int | float | str]
    data: bytes

"""The codec table: encode a tensor, size its payload, decode it back."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmq.codecs._blockquant import block_payload_bytes, decode_blocks, encode_blocks
from fedmq.codecs._checks import exact_keys, fail, int_param, numel_of
from fedmq.codecs._config import MAX_BLOCK_SIZE, CodecConfig, EncodedTensor
from fedmq.codecs._float import FLOAT_ITEMSIZE, decode_floats, encode_floats
from fedmq.codecs._sparse import SparseTensor
from fedmq.codecs._topk import decode_topk, decode_topk_sparse, encode_topk, topk_layout
from fedmq.errors import Reason

__all__ = [
    "decode_tensor",
    "decode_tensor_sparse",
    "encode_params",
    "encode_tensor",
    "expected_payload_bytes",
]

CODECS = ("float32", "float16", "int8", "int4", "topk")
_BITS = {"int8": 8, "int4": 4}

FloatArray = npt.NDArray[np.float32]
_Decoder = Callable[[bytes], FloatArray]


def _finite_float32(name: str, array: npt.ArrayLike) -> FloatArray:
    """``array`` as a flat float32 vector; a local bug (not network input) raises ValueError."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name}: cannot encode dtype {arr.dtype}, expected a real number type")
    with np.errstate(over="ignore"):
        flat = arr.astype(np.float32).reshape(-1)
    if not np.isfinite(flat).all():
        raise ValueError(f"{name}: holds NaN or Inf (or values beyond float32)")
    return flat


def encode_tensor(
    name: str,
    array: npt.NDArray[Any],
    config: CodecConfig,
    rng: np.random.Generator | None = None,
) -> EncodedTensor:
    """Compress one tensor as ``config`` says. ``rng`` drives stochastic rounding only.

    Raises ``ValueError`` for NaN/Inf or non-numeric input: that is a bug on this
    machine, not a message from the network.
    """
    flat = _finite_float32(name, array)
    params: dict[str, int | float | str] = {}
    if config.name in FLOAT_ITEMSIZE:
        data = encode_floats(flat, config.name)
    elif config.name in _BITS:
        params["block_size"] = config.block_size
        data = encode_blocks(
            flat,
            bits=_BITS[config.name],
            block=config.block_size,
            stochastic=config.stochastic_rounding,
            rng=rng,
        )
    else:
        params, data = encode_topk(flat, config, rng)
    shape = tuple(int(d) for d in np.shape(array))
    return EncodedTensor(
        name=name, dtype="float32", shape=shape, codec=config.name, params=params, data=data
    )


def encode_params(
    tensors: Mapping[str, npt.NDArray[Any]],
    config: CodecConfig,
    rng: np.random.Generator | None = None,
) -> list[EncodedTensor]:
    """Encode every tensor of a model (or of a model delta), in the mapping's order."""
    return [encode_tensor(name, array, config, rng) for name, array in tensors.items()]


def _plan(codec: object, params: object, numel: int) -> tuple[int, _Decoder]:
    """Validate ``params`` for ``codec``; return the payload size and a payload decoder."""
    if not isinstance(codec, str) or codec not in CODECS:
        fail(Reason.UNKNOWN_CODEC, f"codec {codec!r} is not one of {', '.join(CODECS)}")
    if codec in FLOAT_ITEMSIZE:
        exact_keys(params, ())
        return FLOAT_ITEMSIZE[codec] * numel, lambda data: decode_floats(data, codec, numel)
    if codec in _BITS:
        bits = _BITS[codec]
        block = int_param(exact_keys(params, ("block_size",)), "block_size", 1, MAX_BLOCK_SIZE)
        return (
            block_payload_bytes(numel, block, bits),
            lambda data: decode_blocks(data, numel=numel, bits=bits, block=block),
        )
    layout = topk_layout(params, numel)
    return layout.payload_bytes(), lambda data: decode_topk(data, layout, numel)


def expected_payload_bytes(
    codec: str, params: Mapping[str, int | float | str], shape: tuple[int, ...]
) -> int:
    """The exact payload size ``codec`` with ``params`` needs for ``shape``.

    Validates ``codec``, ``params`` and ``shape`` without touching any payload, so a
    receiver can reject a wrong size before allocating anything. Raises ``WireError``
    (UNKNOWN_CODEC, MISSING_FIELD, EXTRA_FIELD, WRONG_TYPE).
    """
    return _plan(codec, params, numel_of(shape))[0]


def _checked(t: EncodedTensor) -> tuple[int, _Decoder]:
    """``t``'s element count and payload decoder, once its header and size are valid."""
    if t.dtype != "float32":
        fail(Reason.WRONG_TYPE, f"{t.name}: dtype {t.dtype!r}, v1 decodes float32 only")
    numel = numel_of(t.shape)
    size, decode = _plan(t.codec, t.params, numel)
    if not isinstance(t.data, bytes):
        fail(Reason.WRONG_TYPE, f"{t.name}: data is {type(t.data).__name__}, expected bytes")
    if len(t.data) != size:
        fail(Reason.SIZE_MISMATCH, f"{t.name}: payload of {len(t.data)} bytes, expected {size}")
    return numel, decode


def decode_tensor_sparse(t: EncodedTensor) -> FloatArray | SparseTensor:
    """As ``decode_tensor``, but a top-k tensor stays a ``SparseTensor`` of ``t.shape``.

    The same validation and the same ``WireError`` reasons; the values are the same.
    """
    numel, decode = _checked(t)
    if t.codec != "topk":
        return decode(t.data).reshape(t.shape)
    sparse = decode_topk_sparse(t.data, topk_layout(t.params, numel), numel)
    return SparseTensor(t.shape, sparse.indices, sparse.values)


def decode_tensor(t: EncodedTensor) -> FloatArray:
    """Decode ``t`` into a new float32 array of ``t.shape``.

    Raises ``WireError`` and nothing else: UNKNOWN_CODEC, MISSING_FIELD or EXTRA_FIELD
    (params keys), WRONG_TYPE (a field, parameter or index out of its type or range),
    SIZE_MISMATCH, NON_FINITE, or TOO_LARGE (a top-k shape too large to allocate; the
    wire decoder bounds shapes before this can happen).
    """
    _, decode = _checked(t)
    return decode(t.data).reshape(t.shape)

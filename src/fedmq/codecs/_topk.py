"""Top-k sparsification: keep the k largest-magnitude entries of a tensor.

Payload: k indices into the flattened (row-major) tensor, uint32 LE, strictly
ascending; then the k kept values in index order, coded as ``values`` says: float32 or
float16 LE, or int8 with one float32 scale per ``block_size`` values (scales first,
exactly the int8 codec's layout over a vector of length k). Every other entry decodes to 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedmq.codecs._blockquant import block_payload_bytes, decode_blocks, encode_blocks
from fedmq.codecs._checks import exact_keys, fail, int_param, str_param
from fedmq.codecs._config import MAX_BLOCK_SIZE, CodecConfig
from fedmq.codecs._float import FLOAT_ITEMSIZE, decode_floats, encode_floats
from fedmq.codecs._sparse import SparseTensor
from fedmq.errors import Reason

__all__ = [
    "TopkLayout",
    "decode_topk",
    "decode_topk_sparse",
    "encode_topk",
    "topk_count",
    "topk_layout",
]

# Indices are uint32, so a top-k tensor holds at most 2**32 elements.
MAX_TOPK_NUMEL = 2**32
_VALUE_CODECS = ("float16", "float32", "int8")


def topk_count(fraction: float, numel: int) -> int:
    """k = max(1, ceil(fraction * numel)), capped at numel (0 for an empty tensor)."""
    if numel == 0:
        return 0
    # round() first: 0.07 * 100 == 7.000000000000001 in binary floating point, and must give 7.
    return min(numel, max(1, math.ceil(round(fraction * numel, 6))))


@dataclass(frozen=True, slots=True)
class TopkLayout:
    """The validated parameters of one top-k payload."""

    k: int
    values: str
    block: int  # 0 unless values == "int8"

    def payload_bytes(self) -> int:
        """4 bytes per index, then the values."""
        if self.values == "int8":
            return 4 * self.k + block_payload_bytes(self.k, self.block, 8)
        return (4 + FLOAT_ITEMSIZE[self.values]) * self.k


def topk_layout(params: object, numel: int) -> TopkLayout:
    """Validate top-k ``params`` for a tensor of ``numel`` elements."""
    if numel > MAX_TOPK_NUMEL:
        fail(Reason.WRONG_TYPE, f"topk: {numel} elements, uint32 indices address {MAX_TOPK_NUMEL}")
    keys: tuple[str, ...] = ("k", "values", "block_size")
    if isinstance(params, Mapping) and params.get("values") != "int8":
        keys = ("k", "values")  # block_size only accompanies int8 values
    checked = exact_keys(params, keys)
    k = int_param(checked, "k", 0, numel)
    values = str_param(checked, "values", _VALUE_CODECS)
    block = int_param(checked, "block_size", 1, MAX_BLOCK_SIZE) if values == "int8" else 0
    return TopkLayout(k, values, block)


def encode_topk(
    flat: npt.NDArray[np.float32], config: CodecConfig, rng: np.random.Generator | None
) -> tuple[dict[str, int | float | str], bytes]:
    """Encode the finite 1-D ``flat``; returns (params, payload)."""
    if flat.size > MAX_TOPK_NUMEL:
        raise ValueError(f"topk: a tensor of {flat.size} elements exceeds uint32 indices")
    k = topk_count(config.topk_fraction, flat.size)
    if k == flat.size:
        chosen = np.arange(k)
    else:
        # argpartition is O(n); only the k winners get sorted, into ascending index order.
        chosen = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
    kept = flat[chosen]
    params: dict[str, int | float | str] = {"k": k, "values": config.topk_values}
    if config.topk_values == "int8":
        params["block_size"] = config.block_size
        coded = encode_blocks(
            kept, bits=8, block=config.block_size, stochastic=config.stochastic_rounding, rng=rng
        )
    else:
        coded = encode_floats(kept, config.topk_values)
    return params, chosen.astype("<u4").tobytes() + coded


def decode_topk_sparse(data: bytes, layout: TopkLayout, numel: int) -> SparseTensor:
    """Inverse of ``encode_topk``, kept sparse (a flat shape; the caller reshapes).

    ``len(data)`` was already checked by the caller.
    """
    k = layout.k
    indices = np.frombuffer(data, dtype="<u4", count=k)  # read-only view of the payload
    if k and (int(indices[-1]) >= numel or bool((indices[1:] <= indices[:-1]).any())):
        fail(Reason.WRONG_TYPE, "topk: indices must be strictly ascending and < numel")
    rest = data[4 * k :]
    if layout.values == "int8":
        kept = decode_blocks(rest, numel=k, bits=8, block=layout.block)
    else:
        kept = decode_floats(rest, layout.values, k)
    return SparseTensor((numel,), indices, kept)


def decode_topk(data: bytes, layout: TopkLayout, numel: int) -> npt.NDArray[np.float32]:
    """Inverse of ``encode_topk``, as a dense array; ``len(data)`` was already checked."""
    sparse = decode_topk_sparse(data, layout, numel)
    try:
        dense = np.zeros(numel, dtype=np.float32)
    except (MemoryError, ValueError):
        fail(Reason.TOO_LARGE, f"topk: cannot allocate {numel} elements")
    dense[sparse.indices] = sparse.values
    return dense

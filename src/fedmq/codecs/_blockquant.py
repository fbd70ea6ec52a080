"""Block-wise symmetric integer quantisation (int8, int4).

The values are cut into blocks of ``block_size`` consecutive elements (row-major; the
last block may be short). Each block has one float32 scale ``max|x| / qmax`` (qmax = 127
for int8, 7 for int4) and every value is stored as the integer ``q`` in [-qmax, qmax]
nearest to ``x / scale`` (or rounded at random, unbiased, for stochastic rounding).
Decoding is ``q * scale``. Payload: all scales first (float32 LE), then the integers:
int8 one byte each (two's complement), int4 two per byte, element ``2i`` in the low
nibble and ``2i+1`` in the high nibble (a final odd element leaves the high nibble 0).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedmq.codecs._checks import fail
from fedmq.errors import Reason

__all__ = ["QMAX", "block_payload_bytes", "decode_blocks", "encode_blocks"]

QMAX = {8: 127, 4: 7}


def _num_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def block_payload_bytes(numel: int, block: int, bits: int) -> int:
    """Payload size of ``numel`` values quantised to ``bits`` with ``block`` values per scale."""
    values = numel if bits == 8 else (numel + 1) // 2
    return 4 * _num_blocks(numel, block) + values


def encode_blocks(
    flat: npt.NDArray[np.float32],
    *,
    bits: int,
    block: int,
    stochastic: bool,
    rng: np.random.Generator | None,
) -> bytes:
    """Quantise the finite 1-D ``flat`` and return scales + integers, as the module says."""
    qmax = QMAX[bits]
    numel = flat.size
    nblocks = _num_blocks(numel, block)
    if numel == nblocks * block:
        blocks32 = flat.reshape(nblocks, block)  # (nblocks, block), no copy
    else:  # zero-pad the short last block
        blocks32 = np.zeros((nblocks, block), dtype=np.float32)
        blocks32.reshape(-1)[:numel] = flat
    # max|x| is exact in float32; the division by qmax is done in float64, then rounded.
    amax = np.abs(blocks32).max(axis=1, initial=np.float32(0.0))
    scales: npt.NDArray[np.float32] = (amax.astype(np.float64) / qmax).astype("<f4")
    # Quantise against the float32 scale actually sent, so the error bound holds on decode.
    divisor = np.where(scales > 0, scales, 1.0).astype(np.float64)
    scaled = blocks32.astype(np.float64)  # float64 division: the rounding is the same everywhere
    scaled /= divisor[:, None]
    if stochastic:
        generator = rng if rng is not None else np.random.default_rng()
        # floor(y + u), u ~ U[0, 1): rounds up with probability frac(y), so E[q] = y.
        scaled += generator.random(scaled.shape)
        rounded = np.floor(scaled, out=scaled)
    else:
        rounded = np.rint(scaled, out=scaled)
    # x / scale can exceed qmax by an ulp after the float32 rounding of the scale.
    np.maximum(rounded, -qmax, out=rounded)
    np.minimum(rounded, qmax, out=rounded)
    q = rounded.astype(np.int8).reshape(-1)[:numel]
    if bits == 8:
        packed = q.tobytes()
    else:
        nibbles = q.view(np.uint8) & 0x0F  # low 4 bits = 4-bit two's complement
        if numel % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        packed = bytes(nibbles[0::2] | (nibbles[1::2] << 4))
    return scales.tobytes() + packed


def decode_blocks(data: bytes, *, numel: int, bits: int, block: int) -> npt.NDArray[np.float32]:
    """Inverse of ``encode_blocks``; ``len(data)`` was already checked by the caller."""
    nblocks = _num_blocks(numel, block)
    scales = np.frombuffer(data, dtype="<f4", count=nblocks)
    if not np.isfinite(scales).all():
        fail(Reason.NON_FINITE, f"int{bits}: a block scale is NaN or Inf")
    if (scales < 0).any():
        fail(Reason.WRONG_TYPE, f"int{bits}: a block scale is negative")
    body = np.frombuffer(data, dtype=np.uint8, offset=4 * nblocks)
    if bits == 8:
        q = body.view(np.int8)
    else:
        nibbles = np.empty(2 * body.size, dtype=np.int8)
        nibbles[0::2] = body & 0x0F
        nibbles[1::2] = body >> 4
        # Sign-extend the 4-bit two's complement values: 0..7 stay, 8..15 -> -8..-1.
        q = (nibbles[:numel] ^ 8) - 8
    # q * scale of its block, broadcast over (block, value) without repeating the scales.
    values = np.empty(numel, dtype=np.float32)
    full = numel // block
    with np.errstate(over="ignore", invalid="ignore"):
        np.multiply(
            q[: full * block].reshape(full, block),  # (full, block)
            scales[:full, None],
            out=values[: full * block].reshape(full, block),
            dtype=np.float32,
        )
        if full < nblocks:  # the short last block
            tail = slice(full * block, numel)
            np.multiply(q[tail], scales[full], out=values[tail], dtype=np.float32)
    # |q| <= 128 and the scales are finite: no product can overflow unless a scale is
    # within a factor 128 of float32's largest value (only then look at every value).
    risky = scales.size and float(scales.max()) * 128.0 > _FLOAT32_MAX
    if risky and not np.isfinite(values).all():
        fail(Reason.NON_FINITE, f"int{bits}: a decoded value overflows float32")
    return values


_FLOAT32_MAX = float(np.finfo(np.float32).max)

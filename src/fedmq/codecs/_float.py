"""float32 and float16 payloads: the values themselves, little-endian, row-major."""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

from fedmq.codecs._checks import fail
from fedmq.errors import Reason

__all__ = ["FLOAT_ITEMSIZE", "FloatName", "decode_floats", "encode_floats"]

FloatName = Literal["float32", "float16"]
_WIRE_DTYPE: dict[str, np.dtype[np.floating]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
}
FLOAT_ITEMSIZE: dict[str, int] = {name: dt.itemsize for name, dt in _WIRE_DTYPE.items()}


def encode_floats(flat: npt.NDArray[np.float32], kind: str) -> bytes:
    """Pack ``flat`` as little-endian ``kind``; refuses values float16 cannot hold."""
    with np.errstate(over="ignore"):
        wire = flat.astype(_WIRE_DTYPE[kind])
    # A delta beyond +-65504 would arrive as Inf and be rejected by every receiver:
    # better to fail here, where the bug is.
    if not np.isfinite(wire).all():
        raise ValueError(f"{kind}: values beyond the range of {kind} (max |x| = 65504 for float16)")
    return wire.tobytes()


def decode_floats(data: bytes, kind: str, count: int) -> npt.NDArray[np.float32]:
    """Unpack ``count`` little-endian ``kind`` values (the length was checked by the caller)."""
    values = np.frombuffer(data, dtype=_WIRE_DTYPE[kind], count=count).astype(np.float32)
    if not np.isfinite(values).all():
        fail(Reason.NON_FINITE, f"{kind} payload holds NaN or Inf")
    return values

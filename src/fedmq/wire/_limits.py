"""The largest message a model can legitimately need: the default size limit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy.typing as npt

__all__ = ["message_limit_for"]

# The most bytes per model element any codec sends: top-k at fraction 1.0 with int8
# values and block_size 1 sends a uint32 index, an int8 and a float32 scale per element
# (9 bytes; float32 top-k 8; int8/int4 with block_size 1 at most 5; float32 4). Models
# go out in float32 (4), deltas smaller. So 9/4 of the float32 model is the ceiling.
_MAX_BYTES_PER_ELEMENT = 9
# Everything else in an envelope: tensor names (<= 256 bytes each), shapes, codec
# parameters, the participant id, a signature. Generous on purpose.
_ENVELOPE_OVERHEAD = 64 * 1024


def message_limit_for(params: Mapping[str, npt.NDArray[Any]]) -> int:
    """``max_message_bytes`` for a model given as name -> array: no legitimate update or
    model of it is larger, so anything larger is refused before it is held or parsed."""
    elements = sum(int(array.size) for array in params.values())
    names = sum(len(name.encode()) + 64 for name in params)  # name, shape, codec per tensor
    return _MAX_BYTES_PER_ELEMENT * elements + names + _ENVELOPE_OVERHEAD

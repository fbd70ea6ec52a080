"""A decoded top-k tensor kept sparse: the aggregator's cheap path for top-k updates.

Decoding a top-k payload into a dense array costs a fresh array of the tensor's full
size per update (for a 1M-parameter model, 4 MB of new pages and a scatter), and a
buffered sum over K such arrays costs K passes over the model. Kept as (indices,
values), an update costs O(k) and a weighted sum touches only the k entries of each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["SparseTensor", "dense"]


@dataclass(frozen=True, eq=False)
class SparseTensor:
    """A float32 tensor of ``shape``, zero except at ``indices`` where it holds ``values``.

    ``indices`` are flat (row-major) positions, strictly ascending; both arrays are
    read-only. The decoder validated them; code that builds one by hand must too.
    """

    shape: tuple[int, ...]
    indices: npt.NDArray[np.int64]
    values: npt.NDArray[np.float32]

    def __post_init__(self) -> None:
        self.indices.flags.writeable = False
        self.values.flags.writeable = False

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def dense(self) -> npt.NDArray[np.float32]:
        """A new dense float32 array of ``shape``."""
        out = np.zeros(self.size, dtype=np.float32)
        out[self.indices] = self.values
        return out.reshape(self.shape)

    def add_scaled_to(self, out: npt.NDArray[np.float32], weight: float) -> None:
        """``out += weight * self``, in float32, touching only the kept entries.

        Bit for bit what the dense sum gives: elsewhere the dense term is ``weight * 0``,
        and adding a zero leaves a float32 value unchanged.
        """
        flat = out.reshape(-1)  # a view: out is C-contiguous
        flat[self.indices] += np.multiply(self.values, weight, dtype=np.float32)

    def squared_norm(self) -> float:
        return float(np.vdot(self.values, self.values))


def dense(tensor: npt.NDArray[np.float32] | SparseTensor) -> npt.NDArray[np.float32]:
    """``tensor`` as a dense float32 array (itself when it already is one)."""
    return tensor.dense() if isinstance(tensor, SparseTensor) else tensor

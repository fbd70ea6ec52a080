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

__all__ = ["SparseTensor", "add_scaled", "dense"]


@dataclass(frozen=True, eq=False)
class SparseTensor:
    """A float32 tensor of ``shape``, zero except at ``indices`` where it holds ``values``.

    ``indices`` are flat (row-major) positions, strictly ascending; both arrays are
    read-only. The decoder validated them; code that builds one by hand must too.
    """

    shape: tuple[int, ...]
    indices: npt.NDArray[np.uint32]
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

    def squared_norm(self) -> float:
        return float(np.vdot(self.values, self.values))


def add_scaled(out: npt.NDArray[np.float32], terms: list[tuple[SparseTensor, float]]) -> None:
    """``out += w_1 * s_1 + w_2 * s_2 + ...``, term after term, in float32.

    One ``np.add.at`` over all the terms' entries, in order: the same additions, in the
    same order, as adding each term in turn (so the same float32 sums), in one call
    instead of one fancy-indexed ``+=`` per term.
    """
    if not terms:
        return
    indices = np.concatenate([s.indices for s, _ in terms])
    values = np.concatenate([np.multiply(s.values, w, dtype=np.float32) for s, w in terms])
    np.add.at(out.reshape(-1), indices, values)


def dense(tensor: npt.NDArray[np.float32] | SparseTensor) -> npt.NDArray[np.float32]:
    """``tensor`` as a dense float32 array (itself when it already is one)."""
    return tensor.dense() if isinstance(tensor, SparseTensor) else tensor

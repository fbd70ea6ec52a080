"""Error feedback (EF-SGD): what a lossy codec drops is sent later, not lost.

Each round the participant adds its residual to the fresh delta, encodes the sum, and
keeps ``sum - decode(encoded)`` as the new residual. Over many rounds the decoded
updates then add up to the true deltas, up to one bounded residual, which is what lets
top-k and int4 train as well as float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmq.codecs._config import CodecConfig, EncodedTensor
from fedmq.codecs._registry import decode_tensor, encode_tensor

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Error feedback (EF-SGD): the residual (what the lossy codec dropped) stays on the
    participant and is added to the next delta, across rounds.

    Persist ``state_dict()`` on the device so the residual survives a restart.
    """

    def __init__(self, config: CodecConfig) -> None:
        self.config = config
        self._residual: dict[str, npt.NDArray[np.float32]] = {}

    def encode(
        self, deltas: Mapping[str, npt.NDArray[Any]], rng: np.random.Generator | None = None
    ) -> list[EncodedTensor]:
        """Encode ``deltas`` plus the carried residual; keep what the codec dropped."""
        encoded: list[EncodedTensor] = []
        updated: dict[str, npt.NDArray[np.float32]] = {}
        for name, delta in deltas.items():
            corrected = np.asarray(delta, dtype=np.float32)
            residual = self._residual.get(name)
            if residual is not None:
                if residual.shape != corrected.shape:
                    raise ValueError(
                        f"{name}: delta shape {corrected.shape} != residual shape {residual.shape}"
                    )
                corrected = corrected + residual
            tensor = encode_tensor(name, corrected, self.config, rng)
            encoded.append(tensor)
            updated[name] = corrected - decode_tensor(tensor)
        # Commit only once every tensor encoded, so a ValueError leaves the state untouched.
        self._residual.update(updated)
        return encoded

    def state_dict(self) -> dict[str, npt.NDArray[np.float32]]:
        """A copy of the residuals, name -> float32 array."""
        return {name: r.copy() for name, r in self._residual.items()}

    def load_state_dict(self, state: Mapping[str, npt.NDArray[Any]]) -> None:
        """Replace the residuals with (copies of) ``state``; they must be finite."""
        loaded = {name: np.array(r, dtype=np.float32) for name, r in state.items()}
        for name, r in loaded.items():
            if not np.isfinite(r).all():
                raise ValueError(f"{name}: residual holds NaN or Inf")
        self._residual = loaded

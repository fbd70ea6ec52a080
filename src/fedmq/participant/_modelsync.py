"""The model a device holds, kept in step with full models and model deltas.

A full model (``fedmq.model/1``, a keyframe) replaces what is held when it is newer,
and is kept as a base. A delta (``fedmq.model-delta/1``) applies only on top of exactly
its ``base_version`` (the last keyframe taken, or the version held), in float32 as the
aggregator computed its own view; any other delta is skipped and the device waits for
the next keyframe, so what it holds is always what the aggregator thinks it holds.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedmq.wire import (
    ModelEnvelope,
    TensorSpec,
    WireLimits,
    decode_any_model,
    materialize,
)

__all__ = ["ModelView"]

Params = dict[str, npt.NDArray[np.float32]]


class ModelView:
    """The newest model version held and its parameters. Not thread-safe."""

    def __init__(self, spec: TensorSpec, limits: WireLimits) -> None:
        self._spec = spec
        self._limits = limits
        self.version: int | None = None
        self.params: Params | None = None
        self._key: tuple[int, Params] | None = None  # the last keyframe taken
        self.received = 0  # model messages taken, whatever became of them
        self.keyframes = 0
        self.deltas = 0
        self.skipped = 0  # deltas whose base was not held: waiting for a keyframe

    def accept(self, body: bytes) -> tuple[int, Params] | None:
        """Take one model message; the new ``(version, params)``, or None if it changes nothing.

        Raises ``WireError`` for bytes that are not a valid model or delta.
        """
        self.received += 1
        envelope = decode_any_model(body, spec=self._spec, limits=self._limits)
        if self.version is not None and envelope.version <= self.version:
            return None  # a repeat or an older message (stream replay, reconnect)
        if isinstance(envelope, ModelEnvelope):
            params = materialize(envelope.tensors)
            self._key = (envelope.version, params)
            self.keyframes += 1
        else:
            if self._key is not None and envelope.base_version == self._key[0]:
                base = self._key[1]
            elif self.params is not None and envelope.base_version == self.version:
                base = self.params
            else:
                self.skipped += 1
                return None
            decoded = materialize(envelope.tensors)
            params = {name: np.add(base[name], decoded[name], dtype=np.float32) for name in base}
            self.deltas += 1
        self.version, self.params = envelope.version, params
        return envelope.version, params

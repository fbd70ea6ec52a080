"""The model a device holds, kept in step with full models and model deltas.

A full model (``fedmq.model/1``, a keyframe) replaces what is held when it is newer,
and is kept as a base. A delta (``fedmq.model-delta/1``) applies only on top of exactly
its ``base_version`` (the last keyframe taken, or the version held), in float32 as the
aggregator computed its own view; any other delta is skipped and the device waits for
the next keyframe, so what it holds is always what the aggregator thinks it holds.

"Newer" is judged by publication time as well as by number (docs/wire-format.md 3.2):

- a message of a higher version is taken only if it was not published before what is
  held (``SAME_LINE_SLACK_S`` of clock wobble allowed): an old message replayed by a
  stream or a reconnect never takes a device back;
- a keyframe published later than what is held is taken whatever its number: an
  aggregator restarted without its state (or from an older backup) starts a lower
  line, and its devices follow it instead of waiting for numbers it may never reach;
- what is held counts as published no later than when it arrived here, so a model
  stamped far in the future (a forged one) cannot keep a device from the next real one.
"""

from __future__ import annotations

import time

import numpy as np
import numpy.typing as npt

from fedmq.errors import ModelMismatch, Reason, WireError
from fedmq.wire import (
    ModelEnvelope,
    TensorSpec,
    WireLimits,
    decode_any_model,
    materialize,
)

__all__ = ["ModelView"]

Params = dict[str, npt.NDArray[np.float32]]

# How far back a newer version's publication time may be from the held one's (the
# aggregator's clock stepping back a little) and still count as the same line.
SAME_LINE_SLACK_S = 5.0


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
        self.rebased = 0  # keyframes of a lower version taken: the aggregator started anew
        # When what is held was published, as far as this device can vouch for it.
        self._published: float | None = None

    def accept(self, body: bytes, *, now: float | None = None) -> tuple[int, Params] | None:
        """Take one model message; the new ``(version, params)``, or None if it changes nothing.

        ``now``: this device's clock (unix seconds) when the message arrived.
        Raises ``WireError`` for bytes that are not a valid model or delta, and
        ``ModelMismatch`` if the first full model received is not this device's model.
        """
        self.received += 1
        try:
            envelope = decode_any_model(body, spec=self._spec, limits=self._limits)
        except WireError as error:
            if error.reason is Reason.TENSOR_MISMATCH and self.version is None:
                self._check_first(body)
            raise
        keyframe = isinstance(envelope, ModelEnvelope)
        if self.version is not None and self._published is not None:
            newer = (
                envelope.version > self.version
                and envelope.created >= self._published - SAME_LINE_SLACK_S
            )
            later_line = keyframe and envelope.created > self._published
            if not (newer or later_line):
                return None  # a repeat or an older message (stream replay, reconnect)
            if not newer:
                self.rebased += 1
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
        arrived = time.time() if now is None else now
        self._published = min(envelope.created, arrived)
        return envelope.version, params

    def _check_first(self, body: bytes) -> None:
        """Raise ModelMismatch if ``body`` is a full model of another architecture."""
        try:
            theirs = decode_any_model(body, limits=self._limits)  # any float32 tensors
        except WireError:
            return  # a delta, or not a model at all: nothing to compare with
        shapes = {t.name: (tuple(t.shape), t.dtype) for t in theirs.tensors}
        raise ModelMismatch(
            f"the aggregator's model is not this device's: {_differences(self._spec, shapes)}"
        )


def _differences(ours: TensorSpec, theirs: TensorSpec, most: int = 8) -> str:
    """One line naming the tensors that differ (at most ``most`` of them, then a count)."""
    found = []
    for name in sorted(set(ours) | set(theirs)):
        if name not in theirs:
            found.append(f"{name} only here")
        elif name not in ours:
            found.append(f"{name} only there")
        elif tuple(ours[name][0]) != tuple(theirs[name][0]) or ours[name][1] != theirs[name][1]:
            (a, ad), (b, bd) = ours[name], theirs[name]
            found.append(f"{name} {list(a)} {ad} here, {list(b)} {bd} there")
    more = f" and {len(found) - most} more" if len(found) > most else ""
    return "; ".join(found[:most]) + more

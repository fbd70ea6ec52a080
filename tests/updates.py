"""Update messages for tests, encoded as a device sends them (float32 deltas)."""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from fedmq.codecs import CodecConfig, encode_params
from fedmq.wire import UpdateEnvelope, encode_update

INITIAL = {"w": np.zeros((2, 2), np.float32), "b": np.ones(2, np.float32)}
"""The tiny two-tensor model the unit tests aggregate."""


def delta(value: float) -> dict[str, np.ndarray]:
    """A delta for ``INITIAL`` with every entry ``value``."""
    return {"w": np.full((2, 2), value, np.float32), "b": np.full(2, value, np.float32)}


def update(pid: str, seq: int, base: int, changes: Mapping[str, np.ndarray]) -> bytes:
    """A ``fedmq.update/1`` body from ``pid`` (seq, base version) carrying ``changes``."""
    return encode_update(
        UpdateEnvelope(
            participant=pid,
            seq=seq,
            base_version=base,
            num_examples=10,
            loss=0.5,
            created=time.time(),
            tensors=tuple(encode_params(changes, CodecConfig(name="float32"))),
        )
    )

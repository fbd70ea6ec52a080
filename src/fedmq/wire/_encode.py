"""Envelope -> bytes. Deterministic: fixed key order, smallest msgpack int formats,
float64 for floats, bin for payloads, so equal envelopes give equal bytes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgpack

from fedmq.codecs import EncodedTensor, expected_payload_bytes
from fedmq.errors import WireError
from fedmq.wire._envelope import (
    SCHEMA_MODEL,
    SCHEMA_UPDATE,
    ModelEnvelope,
    PrivacySpend,
    UpdateEnvelope,
)
from fedmq.wire._ids import check_participant_id

__all__ = ["encode_model", "encode_update"]

_UINT64_MAX = 2**64 - 1


def _uint(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT64_MAX:
        raise ValueError(f"{name}: {value!r} must be an int in [0, 2**64 - 1]")
    return value


def _float(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}: {value!r} must be a finite number")
    return float(value)  # always float64 on the wire, even for an int


def _tensor(t: EncodedTensor) -> dict[str, object]:
    """One tensor map; a malformed tensor is a local bug, so ValueError, not WireError."""
    if not isinstance(t, EncodedTensor) or not isinstance(t.name, str) or not t.name:
        raise ValueError(f"tensors: {t!r} is not an EncodedTensor with a non-empty name")
    for key, value in t.params.items():
        if not isinstance(key, str) or isinstance(value, bool):
            raise ValueError(f"{t.name}: params {key!r}={value!r} is not str -> int|float|str")
    try:
        size = expected_payload_bytes(t.codec, t.params, t.shape)
    except WireError as exc:
        raise ValueError(f"{t.name}: {exc}") from exc
    if not isinstance(t.data, bytes) or len(t.data) != size:
        raise ValueError(f"{t.name}: payload must be {size} bytes")
    return {
        "name": t.name,
        "dtype": t.dtype,
        "shape": [_uint(f"{t.name}.shape", d) for d in t.shape],
        "codec": t.codec,
        # Sorted, so the bytes do not depend on the order an encoder filled the params in.
        "params": {key: t.params[key] for key in sorted(t.params)},
        "data": t.data,
    }


def _tensors(tensors: Sequence[EncodedTensor]) -> list[dict[str, object]]:
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError(f"tensors: duplicated names in {names}")
    return [_tensor(t) for t in tensors]


def _pack(envelope: dict[str, object]) -> bytes:
    packed = msgpack.packb(envelope, use_bin_type=True, use_single_float=False, strict_types=True)
    assert isinstance(packed, bytes)
    return packed


def encode_update(env: UpdateEnvelope) -> bytes:
    """Serialize a participant's update (schema ``fedmq.update/1``).

    Raises ``ValueError`` for an envelope no receiver would accept (negative ints,
    NaN loss, payload sizes that disagree with the codec params...).
    """
    envelope: dict[str, object] = {
        "schema": SCHEMA_UPDATE,
        "participant": check_participant_id(env.participant, "participant"),
        "seq": _uint("seq", env.seq),
        "base_version": _uint("base_version", env.base_version),
        "num_examples": _uint("num_examples", env.num_examples),
        "loss": _float("loss", env.loss),
        "created": _float("created", env.created),
        "tensors": _tensors(env.tensors),
    }
    if env.privacy is not None:  # optional: absent (not nil) when the device runs no DP
        envelope["privacy"] = _privacy(env.privacy)
    return _pack(envelope)


def _privacy(spend: PrivacySpend) -> dict[str, object]:
    if not isinstance(spend, PrivacySpend):
        raise ValueError(f"privacy: {spend!r} is not a PrivacySpend")
    return {
        "mechanism": spend.mechanism,
        "epsilon": _float("privacy.epsilon", spend.epsilon),
        "delta": _float("privacy.delta", spend.delta),
    }


def encode_model(env: ModelEnvelope) -> bytes:
    """Serialize a global model (schema ``fedmq.model/1``); ``ValueError`` as for updates."""
    return _pack(
        {
            "schema": SCHEMA_MODEL,
            "version": _uint("version", env.version),
            "created": _float("created", env.created),
            "tensors": _tensors(env.tensors),
        }
    )

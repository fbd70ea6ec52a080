"""The model-delta envelope (``fedmq.model-delta/1``) and a decoder for either model kind.

The aggregator may send what changed since the model devices hold instead of the whole
model: ``version`` = ``base_version`` + the decoded tensors, element by element in
float32. A receiver applies a delta only on top of exactly ``base_version``; otherwise
it waits for the next full model (a keyframe, ``fedmq.model/1``). See
docs/wire-format.md section 3.3.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fedmq.codecs import EncodedTensor
from fedmq.errors import Reason
from fedmq.wire._decode import _MODEL_FIELDS, _fail, _fields, _float, _map, _tensors, _uint, _unpack
from fedmq.wire._encode import _float as _enc_float
from fedmq.wire._encode import _pack
from fedmq.wire._encode import _tensors as _enc_tensors
from fedmq.wire._encode import _uint as _enc_uint
from fedmq.wire._envelope import SCHEMA_MODEL, ModelEnvelope, TensorSpec, WireLimits

__all__ = [
    "SCHEMA_MODEL_DELTA",
    "ModelDeltaEnvelope",
    "decode_any_model",
    "encode_model_delta",
]

SCHEMA_MODEL_DELTA = "fedmq.model-delta/1"
_DELTA_FIELDS = ("schema", "version", "base_version", "created", "tensors")
_DEFAULT_LIMITS = WireLimits()


@dataclass(frozen=True, kw_only=True)
class ModelDeltaEnvelope:
    """Model ``version`` expressed as ``base_version`` plus these (decoded) tensors."""

    version: int
    base_version: int
    created: float
    tensors: tuple[EncodedTensor, ...]


def encode_model_delta(env: ModelDeltaEnvelope) -> bytes:
    """Serialize a model delta; ``ValueError`` for an envelope no receiver would accept."""
    if not env.base_version < env.version:
        raise ValueError(f"base_version {env.base_version} must be < version {env.version}")
    return _pack(
        {
            "schema": SCHEMA_MODEL_DELTA,
            "version": _enc_uint("version", env.version),
            "base_version": _enc_uint("base_version", env.base_version),
            "created": _enc_float("created", env.created if env.created else time.time()),
            "tensors": _enc_tensors(env.tensors),
        }
    )


def decode_any_model(
    data: bytes, *, spec: TensorSpec | None = None, limits: WireLimits = _DEFAULT_LIMITS
) -> ModelEnvelope | ModelDeltaEnvelope:
    """Parse a ``fedmq.model/1`` or a ``fedmq.model-delta/1`` envelope (one unpack).

    A delta needs ``spec`` (only a device that holds a model can apply one). Raises
    ``WireError`` and nothing else, for any bytes.
    """
    obj = _map(_unpack(data, limits), "envelope")
    if "schema" not in obj:
        _fail(Reason.MISSING_FIELD, "envelope: missing schema")
    schema = obj["schema"]
    if schema == SCHEMA_MODEL:
        fields = _fields(obj, _MODEL_FIELDS, "envelope")
        return ModelEnvelope(
            version=_uint(fields["version"], "version"),
            created=_float(fields["created"], "created"),
            tensors=_tensors(fields["tensors"], spec, limits),
        )
    if schema == SCHEMA_MODEL_DELTA:
        if spec is None:
            _fail(Reason.TENSOR_MISMATCH, "a model delta needs the model it applies to")
        fields = _fields(obj, _DELTA_FIELDS, "envelope")
        version = _uint(fields["version"], "version")
        base = _uint(fields["base_version"], "base_version")
        if base >= version:
            _fail(Reason.WRONG_TYPE, f"base_version {base} is not below version {version}")
        return ModelDeltaEnvelope(
            version=version,
            base_version=base,
            created=_float(fields["created"], "created"),
            tensors=_tensors(fields["tensors"], spec, limits),
        )
    if not isinstance(schema, str):
        _fail(Reason.WRONG_TYPE, f"schema: expected a str, got {type(schema).__name__}")
    _fail(Reason.UNKNOWN_SCHEMA, f"schema {schema[:40]!r}, expected a model or a model delta")

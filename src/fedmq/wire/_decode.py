"""Bytes -> envelope, strictly and within bounds.

Every check raises ``WireError`` with a ``Reason``; nothing else escapes, whatever
the bytes. Checks run cheapest first and nothing proportional to a declared size is
allocated before that size has been compared with the bytes actually received.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import msgpack
import numpy as np
import numpy.typing as npt

from fedmq.codecs import (
    EncodedTensor,
    SparseTensor,
    decode_tensor,
    decode_tensor_sparse,
    expected_payload_bytes,
)
from fedmq.errors import Reason, WireError
from fedmq.wire._envelope import (
    PRIVACY_MECHANISMS,
    SCHEMA_MODEL,
    SCHEMA_UPDATE,
    ModelEnvelope,
    PrivacySpend,
    TensorSpec,
    UpdateEnvelope,
    WireLimits,
)
from fedmq.wire._ids import PARTICIPANT_ID_RULE, is_participant_id

__all__ = ["decode_model", "decode_update", "materialize", "materialize_sparse"]

_UPDATE_FIELDS = (
    "schema",
    "participant",
    "seq",
    "base_version",
    "num_examples",
    "loss",
    "created",
    "tensors",
)
_UPDATE_OPTIONAL = ("privacy",)
_PRIVACY_FIELDS = ("mechanism", "epsilon", "delta")
_MODEL_FIELDS = ("schema", "version", "created", "tensors")
_TENSOR_FIELDS = ("name", "dtype", "shape", "codec", "params", "data")
_MAX_NDIM = 32  # as fedmq.codecs, which checks it again
_MAX_MAP_LEN = 16  # the largest legal map has 8 entries; some room to report EXTRA_FIELD
_MIN_STR_LEN = 64  # schema strings, keys, dtype and codec names are far shorter
_DEFAULT_LIMITS = WireLimits()


def _fail(reason: Reason, detail: str) -> NoReturn:
    raise WireError(reason, detail)


def _no_ext(code: int, data: bytes) -> NoReturn:
    raise ValueError(f"ext type {code} is not allowed")


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    # A repeated key would silently keep only the last value: refuse the message.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a map repeats a key")
    return result


def _unpack(data: bytes, limits: WireLimits) -> object:
    size = memoryview(data).nbytes
    if size > limits.max_message_bytes:
        _fail(Reason.TOO_LARGE, f"message of {size} bytes, limit {limits.max_message_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=max(limits.max_name_bytes, limits.max_participant_bytes, _MIN_STR_LEN),
            max_bin_len=limits.max_message_bytes,
            max_array_len=max(limits.max_tensors, _MAX_NDIM),
            max_map_len=_MAX_MAP_LEN,
            max_ext_len=0,
            ext_hook=_no_ext,
            object_pairs_hook=_unique_map,
        )
    except Exception as exc:  # msgpack reports bad input with many exception types
        _fail(Reason.UNDECODABLE, f"not exactly one msgpack value: {type(exc).__name__}: {exc}")


def _short(value: object) -> str:
    """A repr fit for a log line: the value came from the network and may be huge."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _map(obj: object, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        _fail(Reason.WRONG_TYPE, f"{where}: expected a map, got {type(obj).__name__}")
    for key in obj:
        if not isinstance(key, str):
            _fail(Reason.WRONG_TYPE, f"{where}: key {_short(key)} is not a str")
    return obj


def _fields(
    obj: object, expected: Sequence[str], where: str, optional: Sequence[str] = ()
) -> dict[str, Any]:
    """``obj`` as a map whose keys are exactly ``expected`` (in any order), plus any of
    ``optional``."""
    obj = _map(obj, where)
    missing = [key for key in expected if key not in obj]
    if missing:
        _fail(Reason.MISSING_FIELD, f"{where}: missing {', '.join(missing)}")
    extra = [key for key in obj if key not in expected and key not in optional]
    if extra:
        _fail(Reason.EXTRA_FIELD, f"{where}: unexpected {_short(extra)}")
    return obj


def _uint(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(Reason.WRONG_TYPE, f"{where}: expected a uint, got {type(value).__name__}")
    if value < 0:
        _fail(Reason.WRONG_TYPE, f"{where}: {value} is negative")
    return value


def _float(value: object, where: str) -> float:
    # An int is a fine float (a C encoder may write 0 for 0.0); a bool is not a number.
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(Reason.WRONG_TYPE, f"{where}: expected a float, got {type(value).__name__}")
    result = float(value)
    if not math.isfinite(result):
        _fail(Reason.NON_FINITE, f"{where}: {result}")
    return result


def _str(value: object, where: str, max_bytes: int) -> str:
    if not isinstance(value, str):
        _fail(Reason.WRONG_TYPE, f"{where}: expected a str, got {type(value).__name__}")
    if not value:
        _fail(Reason.WRONG_TYPE, f"{where}: empty")
    if len(value.encode()) > max_bytes:
        _fail(Reason.TOO_LARGE, f"{where}: longer than {max_bytes} bytes (UTF-8)")
    return value


def _participant(value: object, limits: WireLimits) -> str:
    participant = _str(value, "participant", limits.max_participant_bytes)
    if not is_participant_id(participant):
        _fail(
            Reason.BAD_PARTICIPANT, f"participant {_short(participant)}: not {PARTICIPANT_ID_RULE}"
        )
    return participant


def _tensor(obj: object, where: str, limits: WireLimits) -> EncodedTensor:
    fields = _fields(obj, _TENSOR_FIELDS, where)
    name = _str(fields["name"], f"{where}.name", limits.max_name_bytes)
    shape = fields["shape"]
    if not isinstance(shape, list):
        _fail(Reason.WRONG_TYPE, f"{where}.shape: expected an array, got {type(shape).__name__}")
    params = _map(fields["params"], f"{where}.params")
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            _fail(Reason.WRONG_TYPE, f"{where}.params.{key}: {_short(value)} is not a scalar")
    data = fields["data"]
    if not isinstance(data, bytes):
        _fail(Reason.WRONG_TYPE, f"{where}.data: expected bin, got {type(data).__name__}")
    return EncodedTensor(
        name=name,
        dtype=_str(fields["dtype"], f"{where}.dtype", _MIN_STR_LEN),
        shape=tuple(_uint(d, f"{where}.shape") for d in shape),
        codec=_str(fields["codec"], f"{where}.codec", _MIN_STR_LEN),
        params=params,
        data=data,
    )


def _tensors(obj: object, spec: TensorSpec | None, limits: WireLimits) -> tuple[EncodedTensor, ...]:
    if not isinstance(obj, list):
        _fail(Reason.WRONG_TYPE, f"tensors: expected an array, got {type(obj).__name__}")
    if len(obj) > limits.max_tensors:
        _fail(Reason.TOO_LARGE, f"tensors: {len(obj)}, limit {limits.max_tensors}")
    tensors: list[EncodedTensor] = []
    seen: set[str] = set()
    elements = 0
    for i, item in enumerate(obj):
        t = _tensor(item, f"tensors[{i}]", limits)
        if t.name in seen:
            _fail(Reason.TENSOR_MISMATCH, f"tensors[{i}]: {t.name!r} appears twice")
        seen.add(t.name)
        if spec is not None:
            if t.name not in spec:
                _fail(Reason.TENSOR_MISMATCH, f"tensors[{i}]: the model has no {t.name!r}")
            shape, dtype = spec[t.name]
            if t.shape != tuple(shape) or t.dtype != dtype:
                _fail(
                    Reason.TENSOR_MISMATCH,
                    f"{t.name}: {list(t.shape)} {t.dtype}, the model has {list(shape)} {dtype}",
                )
        elif t.dtype != "float32":
            _fail(Reason.WRONG_TYPE, f"{t.name}: dtype {t.dtype!r}, v1 carries float32 only")
        size = expected_payload_bytes(t.codec, t.params, t.shape)  # validates codec and params
        if len(t.data) != size:
            _fail(
                Reason.SIZE_MISMATCH, f"{t.name}: payload of {len(t.data)} bytes, expected {size}"
            )
        elements += math.prod(t.shape)
        if elements > limits.max_decoded_elements:
            _fail(Reason.TOO_LARGE, f"over {limits.max_decoded_elements} elements once decoded")
        tensors.append(t)
    if spec is not None and len(seen) != len(spec):
        missing = sorted(set(spec) - seen)
        _fail(Reason.TENSOR_MISMATCH, f"tensors: missing {', '.join(missing)}")
    return tuple(tensors)


def _privacy(obj: object) -> PrivacySpend:
    fields = _fields(obj, _PRIVACY_FIELDS, "privacy")
    mechanism = _str(fields["mechanism"], "privacy.mechanism", _MIN_STR_LEN)
    if mechanism not in PRIVACY_MECHANISMS:
        _fail(Reason.WRONG_TYPE, f"privacy.mechanism: {_short(mechanism)} is not dp-sgd or local")
    epsilon = _float(fields["epsilon"], "privacy.epsilon")
    if epsilon < 0:
        _fail(Reason.WRONG_TYPE, f"privacy.epsilon: {epsilon} is negative")
    delta = _float(fields["delta"], "privacy.delta")
    if not 0 < delta < 1:
        _fail(Reason.WRONG_TYPE, f"privacy.delta: {delta} is not in (0, 1)")
    return PrivacySpend(mechanism=mechanism, epsilon=epsilon, delta=delta)


def _envelope(
    data: bytes,
    schema: str,
    expected: Sequence[str],
    limits: WireLimits,
    optional: Sequence[str] = (),
) -> dict[str, Any]:
    obj = _map(_unpack(data, limits), "envelope")
    if "schema" not in obj:
        _fail(Reason.MISSING_FIELD, "envelope: missing schema")
    got = obj["schema"]
    if not isinstance(got, str):
        _fail(Reason.WRONG_TYPE, f"schema: expected a str, got {type(got).__name__}")
    if got != schema:
        _fail(Reason.UNKNOWN_SCHEMA, f"schema {_short(got)}, expected {schema!r}")
    return _fields(obj, expected, "envelope", optional)


def decode_update(
    data: bytes, *, spec: TensorSpec, limits: WireLimits = _DEFAULT_LIMITS
) -> UpdateEnvelope:
    """Parse and validate a ``fedmq.update/1`` envelope against the model's ``spec``.

    Raises ``WireError`` and nothing else, for any bytes. Payload contents (NaN,
    index order, scales) are checked when ``materialize`` decodes them.
    """
    fields = _envelope(data, SCHEMA_UPDATE, _UPDATE_FIELDS, limits, _UPDATE_OPTIONAL)
    return UpdateEnvelope(
        participant=_participant(fields["participant"], limits),
        seq=_uint(fields["seq"], "seq"),
        base_version=_uint(fields["base_version"], "base_version"),
        num_examples=_uint(fields["num_examples"], "num_examples"),
        loss=_float(fields["loss"], "loss"),
        created=_float(fields["created"], "created"),
        tensors=_tensors(fields["tensors"], spec, limits),
        privacy=_privacy(fields["privacy"]) if "privacy" in fields else None,
    )


def decode_model(
    data: bytes, *, spec: TensorSpec | None = None, limits: WireLimits = _DEFAULT_LIMITS
) -> ModelEnvelope:
    """Parse and validate a ``fedmq.model/1`` envelope, against ``spec`` when given.

    Without a spec (a participant's first model) any float32 tensors are accepted,
    within ``limits``. Raises ``WireError`` and nothing else, for any bytes.
    """
    fields = _envelope(data, SCHEMA_MODEL, _MODEL_FIELDS, limits)
    return ModelEnvelope(
        version=_uint(fields["version"], "version"),
        created=_float(fields["created"], "created"),
        tensors=_tensors(fields["tensors"], spec, limits),
    )


def materialize(tensors: Sequence[EncodedTensor]) -> dict[str, npt.NDArray[np.float32]]:
    """Decode every tensor: name -> float32 array. Raises ``WireError`` only (NON_FINITE...)."""
    return _decode_all(tensors, decode_tensor)


def materialize_sparse(
    tensors: Sequence[EncodedTensor],
) -> dict[str, npt.NDArray[np.float32] | SparseTensor]:
    """As ``materialize``, but top-k tensors stay ``SparseTensor`` (the aggregator's cheap
    path for strategies that sum deltas). The same validation and ``WireError`` reasons."""
    return _decode_all(tensors, decode_tensor_sparse)


_T = TypeVar("_T")


def _decode_all(
    tensors: Sequence[EncodedTensor], decode: Callable[[EncodedTensor], _T]
) -> dict[str, _T]:
    arrays: dict[str, _T] = {}
    for t in tensors:
        if t.name in arrays:
            _fail(Reason.TENSOR_MISMATCH, f"{t.name!r} appears twice")
        arrays[t.name] = decode(t)
    return arrays

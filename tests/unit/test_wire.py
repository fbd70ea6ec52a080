"""fedmq.wire: round trips, determinism, and every rejection reason on crafted messages."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from fedmq.codecs import CodecConfig, EncodedTensor, encode_params, encode_tensor
from fedmq.errors import Reason, WireError
from fedmq.wire import (
    SCHEMA_MODEL,
    SCHEMA_UPDATE,
    ModelEnvelope,
    TensorSpec,
    UpdateEnvelope,
    WireLimits,
    decode_model,
    decode_update,
    encode_model,
    encode_update,
    materialize,
    tensor_spec_of,
)

REPO = Path(__file__).resolve().parents[2]
PARAMS = {
    "w": np.array([[0.5, -1.0], [2.0, 0.25]], dtype=np.float32),
    "b": np.array([0.1, -0.2], dtype=np.float32),
}
SPEC = tensor_spec_of(PARAMS)
CONFIGS = [
    CodecConfig(name="float32"),
    CodecConfig(name="float16"),
    CodecConfig(name="int8", block_size=2),
    CodecConfig(name="int4", block_size=3),
    CodecConfig(name="topk", topk_fraction=0.5),
    CodecConfig(name="topk", topk_fraction=0.5, topk_values="int8", block_size=2),
]


def _update(config: CodecConfig = CONFIGS[0], **fields: Any) -> UpdateEnvelope:
    values: dict[str, Any] = {
        "participant": "dev-0001",
        "seq": 7,
        "base_version": 3,
        "num_examples": 600,
        "loss": 0.4375,
        "created": 1_700_000_000.5,
        "tensors": tuple(encode_params(PARAMS, config)),
    }
    values.update(fields)
    return UpdateEnvelope(**values)


def _model(**fields: Any) -> ModelEnvelope:
    values: dict[str, Any] = {
        "version": 4,
        "created": 1_700_000_000.0,
        "tensors": tuple(encode_params(PARAMS, CodecConfig())),
    }
    values.update(fields)
    return ModelEnvelope(**values)


def _raw(data: bytes) -> dict[str, Any]:
    obj = msgpack.unpackb(data, raw=False)
    assert isinstance(obj, dict)
    return obj


def _pack(obj: object) -> bytes:
    packed = msgpack.packb(obj, use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed


def _rejected(
    data: bytes,
    reason: Reason,
    *,
    spec: TensorSpec = SPEC,
    limits: WireLimits = WireLimits(),  # noqa: B008 - frozen, so sharing it is safe
) -> None:
    with pytest.raises(WireError) as info:
        materialize(decode_update(data, spec=spec, limits=limits).tensors)
    assert info.value.reason is reason, info.value


VALID = encode_update(_update())


# --- round trips -------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.name}-{c.topk_values}")
def test_update_round_trip(config: CodecConfig) -> None:
    env = _update(config)
    decoded = decode_update(encode_update(env), spec=SPEC)
    assert decoded == env
    arrays = materialize(decoded.tensors)
    assert {name: a.shape for name, a in arrays.items()} == {"w": (2, 2), "b": (2,)}
    if config.name == "float32":
        np.testing.assert_array_equal(arrays["w"], PARAMS["w"])


def test_model_round_trip_with_and_without_spec() -> None:
    env = _model()
    data = encode_model(env)
    assert decode_model(data, spec=SPEC) == env
    assert decode_model(data) == env
    np.testing.assert_array_equal(materialize(env.tensors)["b"], PARAMS["b"])


def test_tensors_may_come_in_any_order_and_keys_too() -> None:
    raw = _raw(VALID)
    raw["tensors"].reverse()
    reordered = {key: raw[key] for key in reversed(list(raw))}
    reordered["tensors"] = [{k: t[k] for k in reversed(list(t))} for t in raw["tensors"]]
    decoded = decode_update(_pack(reordered), spec=SPEC)
    assert [t.name for t in decoded.tensors] == ["b", "w"]


def test_an_int_is_accepted_where_a_float_is_expected() -> None:
    raw = _raw(VALID)
    raw["loss"], raw["created"] = 1, 1_700_000_000
    decoded = decode_update(_pack(raw), spec=SPEC)
    assert decoded.loss == 1.0 and isinstance(decoded.loss, float)


def test_tensor_spec_of() -> None:
    assert tensor_spec_of(PARAMS) == {"w": ((2, 2), "float32"), "b": ((2,), "float32")}


# --- determinism and exact bytes ---------------------------------------------------


def test_encoding_is_deterministic() -> None:
    assert encode_update(_update()) == encode_update(_update()) == VALID
    # params insertion order does not matter: keys are written sorted
    t = encode_tensor("b", PARAMS["b"], CodecConfig(name="topk", topk_values="int8"))
    shuffled = dataclasses.replace(t, params=dict(reversed(list(t.params.items()))))
    a = encode_update(_update(tensors=(encode_tensor("w", PARAMS["w"], CodecConfig()), t)))
    b = encode_update(_update(tensors=(encode_tensor("w", PARAMS["w"], CodecConfig()), shuffled)))
    assert a == b


def test_envelope_starts_with_the_schema_and_uses_fixed_formats() -> None:
    assert VALID.startswith(b"\x88\xa6schema\xae" + SCHEMA_UPDATE.encode())
    assert encode_model(_model()).startswith(b"\x84\xa6schema\xad" + SCHEMA_MODEL.encode())
    # loss and created are always float64, even when given as ints
    data = encode_update(_update(loss=1, created=2))
    assert b"\xa4loss\xcb" + struct.pack(">d", 1.0) in data
    assert list(_raw(VALID)) == [
        "schema",
        "participant",
        "seq",
        "base_version",
        "num_examples",
        "loss",
        "created",
        "tensors",
    ]
    assert list(_raw(VALID)["tensors"][0]) == ["name", "dtype", "shape", "codec", "params", "data"]


def _example_script() -> Any:
    path = REPO / "scripts" / "wire_example.py"
    spec = importlib.util.spec_from_file_location("wire_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_doc_generated_blocks_are_current() -> None:
    doc = (REPO / "docs" / "wire-format.md").read_text()
    for name, body in _example_script().render_blocks().items():
        block = f"<!-- generated:{name} -->\n{body}\n<!-- end generated:{name} -->"
        assert block in doc, f"{name} is stale: run python scripts/wire_example.py --write"


def test_doc_minimal_sender_reproduces_the_example_byte_for_byte() -> None:
    doc = (REPO / "docs" / "wire-format.md").read_text()
    section = doc.split("### 8.3", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    assert namespace["message"] == encode_update(_example_script().example_update())


@pytest.mark.parametrize(
    "env",
    [
        _update(seq=-1),
        _update(base_version=True),
        _update(num_examples=1.5),
        _update(loss=float("nan")),
        _update(created=float("inf")),
        _update(participant=""),
        _update(participant="dev.01"),
        _update(tensors=(encode_tensor("w", PARAMS["w"], CodecConfig()),) * 2),
        _update(
            tensors=(dataclasses.replace(encode_tensor("w", PARAMS["w"], CodecConfig()), data=b""),)
        ),
        _update(
            tensors=(
                dataclasses.replace(encode_tensor("w", PARAMS["w"], CodecConfig()), codec="zstd"),
            )
        ),
    ],
)
def test_encode_refuses_envelopes_no_receiver_accepts(env: UpdateEnvelope) -> None:
    with pytest.raises(ValueError):  # the message varies with the cause
        encode_update(env)


# --- every rejection reason --------------------------------------------------------


def test_too_large_message_is_refused_before_parsing() -> None:
    _rejected(VALID, Reason.TOO_LARGE, limits=WireLimits(max_message_bytes=len(VALID) - 1))
    decode_update(VALID, spec=SPEC, limits=WireLimits(max_message_bytes=len(VALID)))
    _rejected(b"\xc1" * 100, Reason.TOO_LARGE, limits=WireLimits(max_message_bytes=99))


def test_too_large_fields() -> None:
    _rejected(VALID, Reason.TOO_LARGE, limits=WireLimits(max_tensors=1))
    _rejected(VALID, Reason.TOO_LARGE, limits=WireLimits(max_participant_bytes=7))
    _rejected(
        _set(("tensors", 0, "name"), "ww"), Reason.TOO_LARGE, limits=WireLimits(max_name_bytes=1)
    )
    _rejected(_set(("participant",), "ü" * 65), Reason.TOO_LARGE)  # 130 UTF-8 bytes
    _rejected(VALID, Reason.TOO_LARGE, limits=WireLimits(max_decoded_elements=5))


@pytest.mark.parametrize(
    "participant",
    [
        "dev.01",  # a dot splits an AMQP routing key and a key id
        "a/b",
        "+",
        "#",  # MQTT topic separators and wildcards
        "dev 01",
        "dev-01\n",
        "dév-01",  # non-ASCII
        "d" * 65,  # over 64 characters, within max_participant_bytes
    ],
)
def test_bad_participant_ids_are_refused(participant: str) -> None:
    _rejected(_set(("participant",), participant), Reason.BAD_PARTICIPANT)


def test_every_id_the_rule_allows_decodes() -> None:
    for participant in ("d", "D" * 64, "dev-01", "__state__", "A-Za-z0-9_"):
        data = _set(("participant",), participant)
        assert decode_update(data, spec=SPEC).participant == participant


def test_too_large_decoded_size_of_a_model_without_spec() -> None:
    # 2**30 elements declared for a 12-byte top-k payload: tiny on the wire, 4 GiB decoded.
    t = encode_tensor(
        "w", np.ones(4, dtype=np.float32), CodecConfig(name="topk", topk_fraction=0.25)
    )
    bomb = encode_model(_model(tensors=(dataclasses.replace(t, shape=(2**15, 2**15)),)))
    with pytest.raises(WireError) as info:
        decode_model(bomb)
    assert info.value.reason is Reason.TOO_LARGE


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # the one byte msgpack never uses
        VALID + b"\x00",  # trailing bytes
        VALID[:-1],  # truncated
        VALID[:40],
        _pack(msgpack.ExtType(5, b"x")),
        b"\xd6\xff\x00\x00\x00\x01",  # the msgpack timestamp extension
        b"\xc7\x00\x05",  # an empty ext 8
        b"\x82\xa6schema\xa1x\xa6schema\xa1y",  # a repeated key
        b"\x81\xa6schema\xa2\xff\xfe",  # invalid UTF-8 in a str
        b"\x81\x01\x02",  # an int map key
        b"\x91" * 100_000,  # nesting deeper than msgpack's stack
        _pack({"schema": "x" * 300}),  # a str over max_str_len
        _pack({"schema": [0] * 5000}),  # an array over max_array_len
        _pack({str(i): i for i in range(17)}),  # a map over max_map_len
    ],
    ids=lambda d: d[:12].hex(),
)
def test_undecodable(data: bytes) -> None:
    _rejected(data, Reason.UNDECODABLE)


@pytest.mark.parametrize("schema", ["fedmq.update/2", SCHEMA_MODEL, "fedmq.signed/1", ""])
def test_unknown_schema(schema: str) -> None:
    raw = _raw(VALID)
    raw["schema"] = schema
    _rejected(_pack(raw), Reason.UNKNOWN_SCHEMA)


def test_a_model_is_not_an_update_and_vice_versa() -> None:
    _rejected(encode_model(_model()), Reason.UNKNOWN_SCHEMA)
    with pytest.raises(WireError) as info:
        decode_model(VALID)
    assert info.value.reason is Reason.UNKNOWN_SCHEMA


@pytest.mark.parametrize("field", list(_raw(VALID)))
def test_missing_envelope_field(field: str) -> None:
    raw = _raw(VALID)
    del raw[field]
    _rejected(_pack(raw), Reason.MISSING_FIELD)


@pytest.mark.parametrize("field", list(_raw(VALID)["tensors"][0]))
def test_missing_tensor_field(field: str) -> None:
    raw = _raw(VALID)
    del raw["tensors"][1][field]
    _rejected(_pack(raw), Reason.MISSING_FIELD)


def test_missing_codec_param() -> None:
    raw = _raw(encode_update(_update(CodecConfig(name="int8"))))
    del raw["tensors"][0]["params"]["block_size"]
    _rejected(_pack(raw), Reason.MISSING_FIELD)


@pytest.mark.parametrize("where", ["envelope", "tensor", "params"])
def test_extra_field(where: str) -> None:
    raw = _raw(VALID)
    target = {"envelope": raw, "tensor": raw["tensors"][0], "params": raw["tensors"][0]["params"]}
    target[where]["signature"] = 1
    _rejected(_pack(raw), Reason.EXTRA_FIELD)


def _set(path: tuple[str | int, ...], value: object) -> bytes:
    raw = _raw(VALID)
    target: Any = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return _pack(raw)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("schema",), 1),
        (("participant",), 42),
        (("participant",), b"dev-0001"),  # bin is not str
        (("participant",), ""),
        (("seq",), True),  # a bool is not an int
        (("seq",), 7.0),  # a float is not an int
        (("seq",), -1),  # negative
        (("base_version",), "3"),
        (("num_examples",), None),
        (("loss",), "0.5"),
        (("loss",), False),
        (("created",), [1.0]),
        (("tensors",), {}),
        (("tensors", 0), [1, 2]),
        (("tensors", 0, "name"), 5),
        (("tensors", 0, "name"), ""),
        (("tensors", 0, "dtype"), None),
        (("tensors", 0, "shape"), 4),
        (("tensors", 0, "shape"), [2, -2]),
        (("tensors", 0, "shape"), [2.0, 2]),
        (("tensors", 0, "codec"), 0),
        (("tensors", 0, "params"), [1]),
        (("tensors", 0, "data"), "text"),
    ],
    ids=lambda v: str(v)[:20],
)
def test_wrong_type(path: tuple[str | int, ...], value: object) -> None:
    _rejected(_set(path, value), Reason.WRONG_TYPE)


def test_wrong_type_of_the_whole_message_and_of_keys_and_params() -> None:
    _rejected(_pack([1, 2, 3]), Reason.WRONG_TYPE)
    _rejected(b"\x81\xc4\x06schema\xa1x", Reason.WRONG_TYPE)  # a bin key
    raw = _raw(encode_update(_update(CodecConfig(name="int8"))))
    for bad in (True, [64], 64.0, "64", 0):
        raw["tensors"][0]["params"]["block_size"] = bad
        _rejected(_pack(raw), Reason.WRONG_TYPE)
    # a model without spec still only carries float32
    model = _raw(encode_model(_model()))
    model["tensors"][0]["dtype"] = "float64"
    with pytest.raises(WireError) as info:
        decode_model(_pack(model))
    assert info.value.reason is Reason.WRONG_TYPE


def test_wrong_type_found_in_the_payload_by_materialize() -> None:
    raw = _raw(encode_update(_update(CodecConfig(name="topk", topk_fraction=1.0))))
    t = raw["tensors"][1]  # "b", k = 2: indices 0, 1 -> swap them
    t["data"] = t["data"][4:8] + t["data"][0:4] + t["data"][8:]
    decoded = decode_update(_pack(raw), spec=SPEC)  # the structure is fine...
    with pytest.raises(WireError) as info:
        materialize(decoded.tensors)  # ...the payload is not
    assert info.value.reason is Reason.WRONG_TYPE


@pytest.mark.parametrize(
    "spec",
    [
        {"w": ((2, 2), "float32")},  # the update has a tensor the model lacks
        {**SPEC, "c": ((1,), "float32")},  # the update lacks one
        {**SPEC, "b": ((3,), "float32")},
        {**SPEC, "b": ((2, 1), "float32")},
        {**SPEC, "b": ((2,), "float16")},
    ],
)
def test_tensor_mismatch_with_the_spec(spec: TensorSpec) -> None:
    _rejected(VALID, Reason.TENSOR_MISMATCH, spec=spec)


def test_tensor_mismatch_duplicate_name() -> None:
    raw = _raw(VALID)
    raw["tensors"][1] = copy.deepcopy(raw["tensors"][0])
    _rejected(_pack(raw), Reason.TENSOR_MISMATCH)
    model = _raw(encode_model(_model()))
    model["tensors"][1] = copy.deepcopy(model["tensors"][0])
    with pytest.raises(WireError) as info:
        decode_model(_pack(model))  # no spec, but names must still be unique
    assert info.value.reason is Reason.TENSOR_MISMATCH


def test_tensor_mismatch_duplicate_name_in_materialize() -> None:
    t = encode_tensor("w", PARAMS["w"], CodecConfig())
    with pytest.raises(WireError) as info:
        materialize([t, t])
    assert info.value.reason is Reason.TENSOR_MISMATCH


def test_unknown_codec() -> None:
    _rejected(_set(("tensors", 0, "codec"), "zstd"), Reason.UNKNOWN_CODEC)


def test_size_mismatch() -> None:
    raw = _raw(VALID)
    raw["tensors"][0]["data"] = raw["tensors"][0]["data"][:-1]
    _rejected(_pack(raw), Reason.SIZE_MISMATCH)


def test_decompression_bomb_is_refused_without_allocating() -> None:
    big = {"w": ((4096, 4096), "float32")}  # 64 MiB decoded
    t = EncodedTensor(
        name="w", dtype="float32", shape=(4096, 4096), codec="float32", params={}, data=b"\0" * 4
    )
    data = _pack(
        {
            **_raw(VALID),
            "tensors": [
                {
                    "name": t.name,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "codec": t.codec,
                    "params": {},
                    "data": t.data,
                }
            ],
        }
    )
    tracemalloc.start()
    try:
        _rejected(data, Reason.SIZE_MISMATCH, spec=big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize(
    ("path", "value"),
    [(("loss",), float("nan")), (("loss",), float("-inf")), (("created",), float("inf"))],
)
def test_non_finite_scalars(path: tuple[str, ...], value: float) -> None:
    _rejected(_set(path, value), Reason.NON_FINITE)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.name}-{c.topk_values}")
def test_non_finite_payload_found_by_materialize(config: CodecConfig) -> None:
    raw = _raw(encode_update(_update(config)))
    t = raw["tensors"][0]
    offset = 4 * t["params"].get("k", 0)  # top-k: skip the indices; NaN the first value/scale
    nan = struct.pack(
        "<e" if "float16" in (t["codec"], t["params"].get("values")) else "<f", np.nan
    )
    t["data"] = t["data"][:offset] + nan + t["data"][offset + len(nan) :]
    decoded = decode_update(_pack(raw), spec=SPEC)
    with pytest.raises(WireError) as info:
        materialize(decoded.tensors)
    assert info.value.reason is Reason.NON_FINITE


# --- limits config -------------------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["max_message_bytes", "max_tensors", "max_name_bytes", "max_participant_bytes"]
)
@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_limits_validate_their_fields(field: str, value: object) -> None:
    from fedmq.errors import ConfigError

    with pytest.raises(ConfigError, match=field):
        WireLimits(**{field: value})  # type: ignore[arg-type]

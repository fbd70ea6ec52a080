"""fedmq.codecs: layouts, error bounds, sizes, error feedback, and every decode rejection."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmq.codecs import (
    CodecConfig,
    EncodedTensor,
    ErrorFeedback,
    SparseTensor,
    decode_tensor,
    decode_tensor_sparse,
    encode_params,
    encode_tensor,
    expected_payload_bytes,
    topk_count,
)
from fedmq.errors import ConfigError, Reason, WireError

ALL_CONFIGS = [
    CodecConfig(name="float32"),
    CodecConfig(name="float16"),
    CodecConfig(name="int8", block_size=5),
    CodecConfig(name="int4", block_size=5),
    CodecConfig(name="int8", block_size=4, stochastic_rounding=True),
    CodecConfig(name="int4", block_size=4, stochastic_rounding=True),
    CodecConfig(name="topk", topk_fraction=0.2),
    CodecConfig(name="topk", topk_fraction=0.2, topk_values="float16"),
    CodecConfig(name="topk", topk_fraction=0.2, topk_values="int8", block_size=3),
]
QMAX = {"int8": 127, "int4": 7}
N = 29_034  # the parameter count of the report's reference model


def _ids(config: CodecConfig) -> str:
    extra = f"-{config.topk_values}" if config.name == "topk" else ""
    return f"{config.name}{extra}{'-sr' if config.stochastic_rounding else ''}"


def _vector(n: int, seed: int = 0) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).normal(size=n).astype(np.float32)


def _scales(t: EncodedTensor, numel: int) -> npt.NDArray[np.float32]:
    nblocks = -(-numel // int(t.params["block_size"]))
    return np.frombuffer(t.data, dtype="<f4", count=nblocks)


def _rejected(t: EncodedTensor, reason: Reason) -> None:
    with pytest.raises(WireError) as info:
        decode_tensor(t)
    assert info.value.reason is reason, info.value


# --- config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "bf16"),
        ("block_size", 0),
        ("block_size", 65537),
        ("block_size", True),
        ("block_size", 64.0),
        ("stochastic_rounding", 1),
        ("topk_fraction", 0.0),
        ("topk_fraction", 1.5),
        ("topk_fraction", float("nan")),
        ("topk_fraction", True),
        ("topk_values", "int4"),
    ],
)
def test_config_rejects_invalid_fields_naming_them(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        CodecConfig(**{field: value})


# --- round trips and byte layouts -------------------------------------------------------


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=_ids)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 5), (2, 0, 3), (4, 3, 2)])
def test_round_trip_keeps_shape_and_declared_size(
    config: CodecConfig, shape: tuple[int, ...]
) -> None:
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    t = encode_tensor("t", x, config, np.random.default_rng(2))
    assert (t.name, t.dtype, t.shape, t.codec) == ("t", "float32", shape, config.name)
    assert expected_payload_bytes(t.codec, t.params, t.shape) == len(t.data)
    y = decode_tensor(t)
    assert y.dtype == np.float32 and y.shape == shape
    assert y.flags.writeable
    if config.name == "float32":
        np.testing.assert_array_equal(y, x)


def test_float32_and_float16_are_raw_little_endian() -> None:
    x = np.array([1.0, -2.5], dtype=np.float32)
    assert encode_tensor("x", x, CodecConfig()).data == struct.pack("<2f", 1.0, -2.5)
    assert encode_tensor("x", x, CodecConfig(name="float16")).data == struct.pack("<2e", 1.0, -2.5)


def test_float16_error_is_within_half_an_ulp() -> None:
    x = np.random.default_rng(0).normal(scale=10.0, size=10_000).astype(np.float32)
    x = x[np.abs(x) > 1e-4]  # normal float16 range: the bound below is relative
    y = decode_tensor(encode_tensor("x", x, CodecConfig(name="float16")))
    assert np.all(np.abs(y - x) <= 2.0**-11 * np.abs(x))


def test_int8_layout_is_scales_then_values() -> None:
    x = np.array([127.0, -63.0, 0.0], dtype=np.float32)
    t = encode_tensor("x", x, CodecConfig(name="int8", block_size=2))
    # block 0 scale 127/127 = 1.0, block 1 scale 0.0; then q = 127, -63, 0
    assert t.params == {"block_size": 2}
    assert t.data == struct.pack("<2f", 1.0, 0.0) + bytes([0x7F, 0xC1, 0x00])
    np.testing.assert_array_equal(decode_tensor(t), x)


def test_int4_packs_the_even_element_in_the_low_nibble() -> None:
    x = np.array([1.0, -1.0, 7.0], dtype=np.float32)
    t = encode_tensor("x", x, CodecConfig(name="int4", block_size=3))
    # scale 7/7 = 1; nibbles 0x1, 0xF (-1), 0x7 and a zero pad nibble
    assert t.data == struct.pack("<f", 1.0) + bytes([0xF1, 0x07])
    np.testing.assert_array_equal(decode_tensor(t), x)


def test_int4_decodes_minus_eight_although_encoders_never_write_it() -> None:
    t = EncodedTensor(
        name="x",
        dtype="float32",
        shape=(2,),
        codec="int4",
        params={"block_size": 2},
        data=struct.pack("<f", 0.5) + bytes([0x78]),
    )
    np.testing.assert_array_equal(decode_tensor(t), [-4.0, 3.5])


def test_topk_layout_is_indices_then_values() -> None:
    x = np.array([0.1, -5.0, 3.0, 0.2], dtype=np.float32)
    t = encode_tensor("x", x, CodecConfig(name="topk", topk_fraction=0.5))
    assert t.params == {"k": 2, "values": "float32"}
    assert t.data == struct.pack("<2I2f", 1, 2, -5.0, 3.0)
    np.testing.assert_array_equal(decode_tensor(t), [0.0, -5.0, 3.0, 0.0])


def test_topk_int8_values_use_the_int8_layout_over_the_k_values() -> None:
    x = np.array([0.0, 127.0, 0.5, -2.0], dtype=np.float32)
    config = CodecConfig(name="topk", topk_fraction=0.75, topk_values="int8", block_size=2)
    t = encode_tensor("x", x, config)
    assert t.params == {"k": 3, "values": "int8", "block_size": 2}
    kept = encode_tensor("v", x[[1, 2, 3]], CodecConfig(name="int8", block_size=2))
    assert t.data == struct.pack("<3I", 1, 2, 3) + kept.data


# --- error bounds ------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("block_size", [1, 7, 64, 1000])
def test_nearest_rounding_error_is_at_most_half_a_scale(codec: str, block_size: int) -> None:
    # Three magnitudes in three stretches, so the blocks see very different scales.
    magnitude = np.repeat(np.array([1e-3, 1.0, 50.0], dtype=np.float32), -(-N // 3))[:N]
    x = _vector(N) * magnitude
    t = encode_tensor("x", x, CodecConfig(name=codec, block_size=block_size))  # type: ignore[arg-type]
    padded = np.zeros(-(-N // block_size) * block_size, dtype=np.float32)
    padded[:N] = x
    expected = np.abs(padded.reshape(-1, block_size)).max(axis=1) / QMAX[codec]
    np.testing.assert_allclose(_scales(t, N), expected, rtol=1e-6)
    per_value = np.repeat(_scales(t, N), block_size)[:N]
    err = np.abs(decode_tensor(t) - x)
    assert np.all(err <= per_value / 2 * (1 + 1e-5) + 1e-30)


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_stochastic_rounding_is_unbiased(codec: str) -> None:
    qmax = QMAX[codec]
    # One block; the first value fixes the scale at 1.0, the others sit between levels.
    x = np.array([qmax, 0.3, -2.7, 0.5, 0.05, -0.9], dtype=np.float32)
    config = CodecConfig(name=codec, block_size=8, stochastic_rounding=True)  # type: ignore[arg-type]
    rng = np.random.default_rng(1234)
    rounds = 4000
    decoded = np.stack([decode_tensor(encode_tensor("x", x, config, rng)) for _ in range(rounds)])
    # Each draw is floor or ceil of x; E[q] = x with std <= 0.5 / sqrt(rounds) = 0.0079.
    assert np.all(np.abs(decoded - x) < 1.0)
    np.testing.assert_allclose(decoded.mean(axis=0), x, atol=0.04)
    nearest = decode_tensor(encode_tensor("x", x, CodecConfig(name=codec, block_size=8)))  # type: ignore[arg-type]
    assert np.abs(nearest - x).max() >= 0.3  # deterministic rounding is biased here


def test_seeded_stochastic_rounding_is_reproducible() -> None:
    config = CodecConfig(name="int4", stochastic_rounding=True)
    x = _vector(1000)
    a = encode_tensor("x", x, config, np.random.default_rng(7))
    b = encode_tensor("x", x, config, np.random.default_rng(7))
    assert a == b


@settings(max_examples=100, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9),
        elements=st.floats(-6e4, 6e4, width=32),  # within float16 range
    ),
    config=st.sampled_from(ALL_CONFIGS),
)
def test_any_finite_array_round_trips_within_its_bound(
    x: npt.NDArray[np.float32], config: CodecConfig
) -> None:
    y = decode_tensor(encode_tensor("x", x, config, np.random.default_rng(0)))
    assert y.shape == x.shape and np.isfinite(y).all()
    bound = np.abs(x).max(initial=0.0)
    assert np.all(np.abs(y - x) <= bound * (1 + 1e-6) + 1e-30)


# --- sizes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "size"),
    [
        (CodecConfig(name="float32"), 4 * N),  # 116,136
        (CodecConfig(name="float16"), 2 * N),  # 58,068
        (CodecConfig(name="int8", block_size=64), N + 4 * 454),  # 30,850: 454 scales
        (CodecConfig(name="int4", block_size=64), N // 2 + 4 * 454),  # 16,333
        (CodecConfig(name="topk", topk_fraction=0.01), 291 * 8),  # 2,328: k = 291
        (CodecConfig(name="topk", topk_fraction=0.01, topk_values="float16"), 291 * 6),
        (CodecConfig(name="topk", topk_fraction=0.01, topk_values="int8"), 291 * 5 + 4 * 5),
    ],
    ids=["float32", "float16", "int8", "int4", "topk-f32", "topk-f16", "topk-int8"],
)
def test_measured_payload_size_of_29034_parameters(config: CodecConfig, size: int) -> None:
    t = encode_tensor("w", _vector(N), config)
    assert len(t.data) == size == expected_payload_bytes(t.codec, t.params, t.shape)


# --- top-k ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "numel", "k"),
    [(0.01, 29_034, 291), (0.01, 10, 1), (1e-9, 5, 1), (1.0, 5, 5), (0.07, 100, 7), (0.5, 0, 0)],
)
def test_topk_count(fraction: float, numel: int, k: int) -> None:
    assert topk_count(fraction, numel) == k


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1, 0.5, 1.0])
def test_topk_keeps_exactly_k_largest_magnitudes(fraction: float) -> None:
    x = _vector(N, seed=3)
    t = encode_tensor("x", x, CodecConfig(name="topk", topk_fraction=fraction))
    y = decode_tensor(t)
    k = topk_count(fraction, N)
    assert t.params["k"] == k and np.count_nonzero(y) == k
    kept = y != 0
    np.testing.assert_array_equal(y[kept], x[kept])
    assert np.abs(x[~kept]).max(initial=0.0) <= np.abs(x[kept]).min()


# --- error feedback --------------------------------------------------------------


def test_error_feedback_keeps_the_dropped_part_as_residual() -> None:
    ef = ErrorFeedback(CodecConfig(name="topk", topk_fraction=0.25))
    delta = {"w": np.array([4.0, 1.0, -2.0, 0.5], dtype=np.float32)}
    sent = decode_tensor(ef.encode(delta)[0])
    np.testing.assert_array_equal(sent, [4.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(ef.state_dict()["w"], [0.0, 1.0, -2.0, 0.5])
    # Next round, nothing new: the largest residual entry goes out.
    sent = decode_tensor(ef.encode({"w": np.zeros(4, dtype=np.float32)})[0])
    np.testing.assert_array_equal(sent, [0.0, 0.0, -2.0, 0.0])


@pytest.mark.parametrize(
    "config",
    [
        CodecConfig(name="topk", topk_fraction=0.01),
        CodecConfig(name="int4", block_size=64),
        CodecConfig(name="topk", topk_fraction=0.05, topk_values="int8"),
    ],
    ids=_ids,
)
def test_error_feedback_sum_of_updates_converges_to_sum_of_deltas(config: CodecConfig) -> None:
    rng = np.random.default_rng(0)
    ef = ErrorFeedback(config)
    true_sum = np.zeros(2000, dtype=np.float64)
    sent_ef = np.zeros_like(true_sum)
    sent_plain = np.zeros_like(true_sum)
    drift = rng.normal(size=2000)  # a consistent direction, as in SGD, plus noise
    for _ in range(300):
        delta = {"w": (drift + rng.normal(size=2000)).astype(np.float32) * 1e-2}
        true_sum += delta["w"]
        sent_ef += decode_tensor(ef.encode(delta)[0])
        sent_plain += decode_tensor(encode_tensor("w", delta["w"], config))
    # With EF the gap is exactly the current residual, which stays bounded.
    np.testing.assert_allclose(true_sum - sent_ef, ef.state_dict()["w"], atol=1e-3)
    ef_gap = np.linalg.norm(true_sum - sent_ef) / np.linalg.norm(true_sum)
    plain_gap = np.linalg.norm(true_sum - sent_plain) / np.linalg.norm(true_sum)
    assert ef_gap < 0.15 and ef_gap < plain_gap / 3


def test_error_feedback_state_survives_a_restart() -> None:
    config = CodecConfig(name="topk", topk_fraction=0.1)
    deltas = [{"w": _vector(50, seed=i), "b": _vector(5, seed=100 + i)} for i in range(4)]
    ef = ErrorFeedback(config)
    for d in deltas[:2]:
        ef.encode(d)
    restored = ErrorFeedback(config)
    restored.load_state_dict(ef.state_dict())
    assert restored.encode(deltas[2]) == ef.encode(deltas[2])
    state = ef.state_dict()
    state["w"][:] = 99.0  # a copy: mutating it does not touch the live residual
    assert not np.any(ef.state_dict()["w"] == 99.0)


def test_error_feedback_with_float32_has_no_residual() -> None:
    ef = ErrorFeedback(CodecConfig())
    ef.encode({"w": _vector(100)})
    assert not np.any(ef.state_dict()["w"])


def test_error_feedback_refuses_bad_state_and_changed_shapes() -> None:
    ef = ErrorFeedback(CodecConfig(name="int8"))
    with pytest.raises(ValueError, match="NaN"):
        ef.load_state_dict({"w": np.array([np.nan], dtype=np.float32)})
    ef.encode({"w": _vector(4)})
    with pytest.raises(ValueError, match="shape"):
        ef.encode({"w": _vector(5)})


# --- encode-side programming errors ----------------------------------------------


@pytest.mark.parametrize(
    ("array", "config"),
    [
        (np.array([1.0, np.nan], dtype=np.float32), CodecConfig()),
        (np.array([np.inf], dtype=np.float32), CodecConfig(name="int8")),
        (np.array([1e300]), CodecConfig()),  # finite float64, Inf as float32
        (np.array([70000.0], dtype=np.float32), CodecConfig(name="float16")),
        (np.array(["a"]), CodecConfig()),
        (np.array([1 + 2j]), CodecConfig()),
    ],
)
def test_encode_refuses_what_no_receiver_would_accept(
    array: npt.NDArray[Any], config: CodecConfig
) -> None:
    with pytest.raises(ValueError):  # the message varies with the cause
        encode_tensor("x", array, config)


def test_encode_params_keeps_the_mapping_order() -> None:
    tensors = {"z": _vector(3), "a": _vector(2)}
    encoded = encode_params(tensors, CodecConfig(name="float16"))
    assert [t.name for t in encoded] == ["z", "a"]


# --- every decode rejection ----------------------------------------------------------

F32 = encode_tensor("x", np.array([1.0, -2.0, 3.0, 0.5], dtype=np.float32), CodecConfig())
I8 = encode_tensor("x", _vector(4), CodecConfig(name="int8", block_size=2))
TOPK = encode_tensor("x", _vector(4), CodecConfig(name="topk", topk_fraction=0.5))
TOPK8 = encode_tensor(
    "x", _vector(4), CodecConfig(name="topk", topk_fraction=0.5, topk_values="int8")
)
NAN32 = struct.pack("<f", float("nan"))


@pytest.mark.parametrize(
    ("t", "reason"),
    [
        (dataclasses.replace(F32, codec="zstd"), Reason.UNKNOWN_CODEC),
        (dataclasses.replace(F32, codec=3), Reason.UNKNOWN_CODEC),  # type: ignore[arg-type]
        (dataclasses.replace(F32, dtype="float64"), Reason.WRONG_TYPE),
        (dataclasses.replace(F32, shape=(-4,)), Reason.WRONG_TYPE),
        (dataclasses.replace(F32, shape=(4.0,)), Reason.WRONG_TYPE),  # type: ignore[arg-type]
        (dataclasses.replace(F32, shape=(1,) * 33 + (4,)), Reason.WRONG_TYPE),
        (dataclasses.replace(F32, data=bytearray(F32.data)), Reason.WRONG_TYPE),  # type: ignore[arg-type]
        (dataclasses.replace(F32, params=[]), Reason.WRONG_TYPE),  # type: ignore[arg-type]
        (dataclasses.replace(I8, params={"block_size": 0}), Reason.WRONG_TYPE),
        (dataclasses.replace(I8, params={"block_size": 65537}), Reason.WRONG_TYPE),
        (dataclasses.replace(I8, params={"block_size": "2"}), Reason.WRONG_TYPE),
        (dataclasses.replace(I8, params={"block_size": 2.0}), Reason.WRONG_TYPE),
        (dataclasses.replace(I8, params={"block_size": True}), Reason.WRONG_TYPE),
        (dataclasses.replace(TOPK, params={"k": 5, "values": "float32"}), Reason.WRONG_TYPE),
        (dataclasses.replace(TOPK, params={"k": -1, "values": "float32"}), Reason.WRONG_TYPE),
        (dataclasses.replace(TOPK, params={"k": 2, "values": "int4"}), Reason.WRONG_TYPE),
        (dataclasses.replace(F32, params={"block_size": 64}), Reason.EXTRA_FIELD),
        (dataclasses.replace(TOPK, params={**TOPK.params, "block_size": 2}), Reason.EXTRA_FIELD),
        (dataclasses.replace(I8, params={}), Reason.MISSING_FIELD),
        (dataclasses.replace(TOPK, params={"values": "float32"}), Reason.MISSING_FIELD),
        (dataclasses.replace(TOPK8, params={"k": 2, "values": "int8"}), Reason.MISSING_FIELD),
        (dataclasses.replace(F32, data=F32.data[:-1]), Reason.SIZE_MISMATCH),
        (dataclasses.replace(I8, data=I8.data + b"\0"), Reason.SIZE_MISMATCH),
        (dataclasses.replace(TOPK, data=TOPK.data[:8]), Reason.SIZE_MISMATCH),
        (dataclasses.replace(F32, shape=(10**9,)), Reason.SIZE_MISMATCH),  # a "bomb"
        (dataclasses.replace(F32, shape=(0, 2**62)), Reason.TOO_LARGE),
        (dataclasses.replace(TOPK, shape=(2**33,)), Reason.WRONG_TYPE),  # beyond uint32 indices
    ],
)
def test_decode_rejects_bad_metadata(t: EncodedTensor, reason: Reason) -> None:
    _rejected(t, reason)
    if reason is not Reason.SIZE_MISMATCH and t.dtype == "float32" and isinstance(t.data, bytes):
        # A metadata error: the receiver finds it before looking at the payload.
        with pytest.raises(WireError) as info:
            expected_payload_bytes(t.codec, t.params, t.shape)
        assert info.value.reason is reason


def _topk_payload(indices: list[int], values: list[float]) -> bytes:
    return struct.pack(f"<{len(indices)}I{len(values)}f", *indices, *values)


@pytest.mark.parametrize(
    ("t", "reason"),
    [
        (dataclasses.replace(F32, data=NAN32 + F32.data[4:]), Reason.NON_FINITE),
        (
            dataclasses.replace(
                F32, codec="float16", data=struct.pack("<4e", 1, 2, float("inf"), 0)
            ),
            Reason.NON_FINITE,
        ),
        (dataclasses.replace(I8, data=NAN32 + I8.data[4:]), Reason.NON_FINITE),
        (dataclasses.replace(I8, data=struct.pack("<f", 3e38) + I8.data[4:]), Reason.NON_FINITE),
        (dataclasses.replace(I8, data=struct.pack("<f", -1.0) + I8.data[4:]), Reason.WRONG_TYPE),
        (dataclasses.replace(TOPK, data=_topk_payload([2, 1], [1.0, 2.0])), Reason.WRONG_TYPE),
        (dataclasses.replace(TOPK, data=_topk_payload([1, 1], [1.0, 2.0])), Reason.WRONG_TYPE),
        (dataclasses.replace(TOPK, data=_topk_payload([1, 4], [1.0, 2.0])), Reason.WRONG_TYPE),
        (dataclasses.replace(TOPK, data=_topk_payload([0, 3], [1.0, np.inf])), Reason.NON_FINITE),
        (
            dataclasses.replace(TOPK8, data=TOPK8.data[:8] + NAN32 + TOPK8.data[12:]),
            Reason.NON_FINITE,
        ),
    ],
)
def test_decode_rejects_bad_payload_content(t: EncodedTensor, reason: Reason) -> None:
    assert expected_payload_bytes(t.codec, t.params, t.shape) == len(t.data)
    _rejected(t, reason)


def test_decode_bomb_is_rejected_without_allocating() -> None:
    import tracemalloc

    bomb = dataclasses.replace(F32, shape=(2**20, 2**10))  # 4 GiB declared, 16 bytes sent
    tracemalloc.start()
    try:
        _rejected(bomb, Reason.SIZE_MISMATCH)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("values", ["float32", "float16", "int8"])
def test_sparse_decoding_of_topk_matches_the_dense_one(values: str) -> None:
    rng = np.random.default_rng(5)
    array = rng.standard_normal((30, 40)).astype(np.float32)
    config = CodecConfig(name="topk", topk_fraction=0.05, topk_values=values)  # type: ignore[arg-type]
    t = encode_tensor("w", array, config)
    sparse = decode_tensor_sparse(t)
    assert isinstance(sparse, SparseTensor) and sparse.shape == (30, 40)
    np.testing.assert_array_equal(sparse.dense(), decode_tensor(t))
    assert not sparse.values.flags.writeable
    # Other codecs decode dense, as decode_tensor does.
    dense_t = encode_tensor("w", array, CodecConfig(name="int8"))
    np.testing.assert_array_equal(decode_tensor_sparse(dense_t), decode_tensor(dense_t))
    # A bad payload is the same rejection either way.
    k = t.params["k"]
    indices = np.frombuffer(t.data, "<u4", count=int(k)).copy()
    indices[[0, 1]] = indices[[1, 0]]  # no longer ascending
    bad = dataclasses.replace(t, data=indices.tobytes() + t.data[4 * int(k) :])
    for decode in (decode_tensor, decode_tensor_sparse):
        with pytest.raises(WireError) as caught:
            decode(bad)
        assert caught.value.reason is Reason.WRONG_TYPE

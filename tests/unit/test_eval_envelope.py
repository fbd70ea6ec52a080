"""fedmq.eval/1: round trips, every rejection reason, signed / unsigned / forged, and garbage."""

from __future__ import annotations

import importlib.util
import random
import struct
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq.errors import Reason, WireError
from fedmq.wire import (
    EVAL_LIMITS,
    MAX_METRICS,
    SCHEMA_EVAL,
    EvalEnvelope,
    PrivateKey,
    Signer,
    Verifier,
    WireLimits,
    check_metric_name,
    decode_eval,
    encode_eval,
    is_metric_name,
    open_eval,
    open_update,
)
from fedmq.wire.fuzz import mutate
from tests.unit.test_signing import DEV1, DEV1_NEW, DEV2, ROGUE, SPEC, ring, update
from tests.unit.test_wire import _pack, _raw
from tests.unit.test_wire_fuzz import msgpack_values

REPO = Path(__file__).resolve().parents[2]
REPORT = EvalEnvelope(
    participant="dev-01",
    version=42,
    num_examples=480,
    metrics={"rmse": 21.5, "mae": 13.25},
    created=1_700_000_000.5,
)
VALID = encode_eval(REPORT)


def fields(data: bytes = VALID) -> dict[str, Any]:
    return _raw(data)


def reason_of(data: bytes, **kwargs: Any) -> Reason:
    with pytest.raises(WireError) as caught:
        decode_eval(data, **kwargs)
    return caught.value.reason


# -- round trip and determinism -----------------------------------------------------------


def test_round_trip_and_deterministic_bytes() -> None:
    assert decode_eval(VALID) == EvalEnvelope(
        participant="dev-01",
        version=42,
        num_examples=480,
        metrics={"mae": 13.25, "rmse": 21.5},
        created=1_700_000_000.5,
    )
    assert list(fields()) == [
        "schema",
        "participant",
        "version",
        "num_examples",
        "metrics",
        "created",
    ]
    assert list(fields()["metrics"]) == ["mae", "rmse"]  # sorted, whatever the order given
    assert fields()["schema"] == SCHEMA_EVAL
    # an int metric travels as float64, as every float of the wire format
    data = encode_eval(EvalEnvelope(participant="d", version=0, num_examples=1, metrics={"n": 3}))
    assert b"\xa1n\xcb" + struct.pack(">d", 3.0) in data
    assert decode_eval(data).metrics == {"n": 3.0}


def test_receivers_accept_any_key_order_ints_and_float32() -> None:
    obj = fields()
    shuffled = {key: obj[key] for key in reversed(list(obj))}
    assert decode_eval(_pack(shuffled)) == decode_eval(VALID)
    obj["metrics"] = {"rmse": 21, "mae": 13.25}
    obj["created"] = 1_700_000_000
    assert decode_eval(_pack(obj)).metrics == {"rmse": 21.0, "mae": 13.25}
    f32 = msgpack.packb({**obj, "metrics": {"mae": 0.5}}, use_bin_type=True, use_single_float=True)
    assert decode_eval(f32).metrics == {"mae": 0.5}


def test_the_largest_report_fits_the_limits_signed() -> None:
    biggest = EvalEnvelope(
        participant="d" * 64,
        version=2**64 - 1,
        num_examples=2**64 - 1,
        metrics={f"m{i:02d}" + "x" * 29: -1.5e308 for i in range(MAX_METRICS)},
        created=1e308,
    )
    data = encode_eval(biggest)
    assert decode_eval(data) == biggest
    assert len(data) < 1024
    label = "x" * (128 - len("dev-01.") - 1)  # the longest key id
    signer = Signer(PrivateKey(f"dev-01.{label}", DEV1.key), "j")
    sealed = signer.seal(data)
    assert len(sealed) < 1536 < EVAL_LIMITS.max_message_bytes
    assert open_eval(sealed).metrics == biggest.metrics


def _doc_code(section: str) -> str:
    doc = (REPO / "docs" / "wire-format.md").read_text()
    return doc.split(section, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_doc_example_and_minimal_sender_reproduce_the_encoder_byte_for_byte() -> None:
    spec = importlib.util.spec_from_file_location("wire_example", REPO / "scripts/wire_example.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    namespace: dict[str, Any] = {}
    exec(_doc_code("### 8.3"), namespace)  # the helpers _str, _uint, _f64
    exec(_doc_code("### 12.4"), namespace)
    assert namespace["report"] == encode_eval(example.example_eval())
    assert decode_eval(namespace["report"]) == example.example_eval()


def test_metric_name_rule() -> None:
    for good in ("rmse", "mae_6h", "r2", "a", "a" * 32):
        assert is_metric_name(good)
        assert check_metric_name(good) == good
    for bad in ("", "RMSE", "1h", "_x", "pm2.5", "a b", "a-b", "é", "a" * 33, 3, None):
        assert not is_metric_name(bad)
    with pytest.raises(ValueError, match="target"):
        check_metric_name("Accuracy", "target")


@pytest.mark.parametrize(
    "env",
    [
        EvalEnvelope(participant="dev.01", version=1, num_examples=1, metrics={"m": 1.0}),
        EvalEnvelope(participant="", version=1, num_examples=1, metrics={"m": 1.0}),
        EvalEnvelope(participant="d", version=-1, num_examples=1, metrics={"m": 1.0}),
        EvalEnvelope(participant="d", version=2**64, num_examples=1, metrics={"m": 1.0}),
        EvalEnvelope(participant="d", version=True, num_examples=1, metrics={"m": 1.0}),
        EvalEnvelope(participant="d", version=1, num_examples=0, metrics={"m": 1.0}),
        EvalEnvelope(participant="d", version=1, num_examples=1, metrics={}),
        EvalEnvelope(participant="d", version=1, num_examples=1, metrics={"M": 1.0}),
        EvalEnvelope(participant="d", version=1, num_examples=1, metrics={"m": float("nan")}),
        EvalEnvelope(participant="d", version=1, num_examples=1, metrics={"m": True}),
        EvalEnvelope(
            participant="d", version=1, num_examples=1, metrics={"m": 1.0}, created=float("inf")
        ),
        EvalEnvelope(
            participant="d",
            version=1,
            num_examples=1,
            metrics={f"m{i}": 1.0 for i in range(MAX_METRICS + 1)},
        ),
    ],
)
def test_encode_refuses_reports_no_receiver_accepts(env: EvalEnvelope) -> None:
    with pytest.raises(ValueError):
        encode_eval(env)


# -- every rejection reason ---------------------------------------------------------------


def _with(**changes: Any) -> bytes:
    obj = fields()
    for key, value in changes.items():
        if value is _DROP:
            del obj[key]
        else:
            obj[key] = value
    return _pack(obj)


_DROP = object()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Reason.UNDECODABLE),
        (b"\xc1", Reason.UNDECODABLE),
        (VALID + b"\x00", Reason.UNDECODABLE),
        (VALID[:-1], Reason.UNDECODABLE),
        (_with(metrics={f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}), Reason.UNDECODABLE),
        (_pack(fields() | {"metrics": msgpack.ExtType(1, b"x")}), Reason.UNDECODABLE),
        (_pack([1, 2]), Reason.WRONG_TYPE),
        (_with(schema=_DROP), Reason.MISSING_FIELD),
        (_with(schema=b"fedmq.eval/1"), Reason.WRONG_TYPE),
        (_with(schema="fedmq.eval/2"), Reason.UNKNOWN_SCHEMA),
        (_with(schema="fedmq.update/1"), Reason.UNKNOWN_SCHEMA),
        (_with(created=_DROP), Reason.MISSING_FIELD),
        (_with(metrics=_DROP), Reason.MISSING_FIELD),
        (_with(extra=1), Reason.EXTRA_FIELD),
        (_with(participant=7), Reason.WRONG_TYPE),
        (_with(participant=""), Reason.WRONG_TYPE),
        (_with(participant="d" * 129), Reason.TOO_LARGE),
        (_with(participant="dev.01"), Reason.BAD_PARTICIPANT),
        (_with(participant="d" * 65), Reason.BAD_PARTICIPANT),
        (_with(version=-1), Reason.WRONG_TYPE),
        (_with(version=1.0), Reason.WRONG_TYPE),
        (_with(version=True), Reason.WRONG_TYPE),
        (_with(version=None), Reason.WRONG_TYPE),
        (_with(num_examples=0), Reason.WRONG_TYPE),
        (_with(num_examples=-5), Reason.WRONG_TYPE),
        (_with(num_examples="480"), Reason.WRONG_TYPE),
        (_with(metrics=[1.0]), Reason.WRONG_TYPE),
        (_with(metrics={}), Reason.MISSING_FIELD),
        (_pack({**fields(), "metrics": {1: 1.0}}), Reason.UNDECODABLE),  # strict_map_key
        (_with(metrics={"rmse": "1.0"}), Reason.WRONG_TYPE),
        (_with(metrics={"rmse": False}), Reason.WRONG_TYPE),
        (_with(metrics={"rmse": None}), Reason.WRONG_TYPE),
        (_with(metrics={"rmse": [1.0]}), Reason.WRONG_TYPE),
        (_with(metrics={"RMSE": 1.0}), Reason.WRONG_TYPE),
        (_with(metrics={"": 1.0}), Reason.WRONG_TYPE),
        (_with(metrics={"pm2.5": 1.0}), Reason.WRONG_TYPE),
        (_with(metrics={"m" * 33: 1.0}), Reason.TOO_LARGE),
        (_with(metrics={"rmse": float("nan")}), Reason.NON_FINITE),
        (_with(metrics={"rmse": float("-inf")}), Reason.NON_FINITE),
        (_with(created=float("inf")), Reason.NON_FINITE),
        (_with(created="now"), Reason.WRONG_TYPE),
    ],
)
def test_every_rejection_reason(data: bytes, reason: Reason) -> None:
    assert reason_of(data) == reason


def test_too_large_is_refused_before_parsing() -> None:
    assert reason_of(VALID, limits=WireLimits(max_message_bytes=len(VALID) - 1)) == (
        Reason.TOO_LARGE
    )
    assert reason_of(b"\x00" * (EVAL_LIMITS.max_message_bytes + 1)) == Reason.TOO_LARGE
    short = WireLimits(max_participant_bytes=3)
    assert reason_of(VALID, limits=short) == Reason.TOO_LARGE


# -- signed, unsigned, forged -------------------------------------------------------------


def _report(participant: str, num_examples: int = 10) -> bytes:
    return encode_eval(
        EvalEnvelope(
            participant=participant,
            version=3,
            num_examples=num_examples,
            metrics={"accuracy": 0.75},
            created=1.0,
        )
    )


def _refusal(data: bytes, verifier: Verifier | None) -> Reason:
    with pytest.raises(WireError) as caught:
        open_eval(data, verifier=verifier)
    return caught.value.reason


def test_a_device_key_opens_its_report(tmp_path: Path) -> None:
    verifier = Verifier(ring(tmp_path, DEV1, DEV1_NEW), "j")
    for k in (DEV1, DEV1_NEW):  # its key, and its rotated key dev-01.2025
        opened = open_eval(Signer(k, "j").seal(_report("dev-01")), verifier=verifier)
        assert (opened.participant, opened.metrics) == ("dev-01", {"accuracy": 0.75})


def test_signed_refusals_are_those_of_updates(tmp_path: Path) -> None:
    verifier = Verifier(ring(tmp_path, DEV1, DEV2), "j")
    body = _report("dev-01")
    good = Signer(DEV1, "j").seal(body)
    sealed = fields(good)
    sealed["body"] = _report("dev-01", num_examples=11)  # the old signature cannot cover it
    relabelled = _pack(sealed)
    tampered = bytearray(good)
    tampered[good.index(struct.pack(">d", 0.75))] ^= 0x01  # one bit of the accuracy
    cases = [
        (Reason.UNSIGNED, body),
        (Reason.UNKNOWN_KEY, Signer(DEV1_NEW, "j").seal(body)),  # not registered
        (Reason.BAD_SIGNATURE, Signer(ROGUE, "j").seal(body)),  # says dev-01, another key
        (Reason.BAD_SIGNATURE, relabelled),
        (Reason.BAD_SIGNATURE, bytes(tampered)),
        (Reason.BAD_SIGNATURE, Signer(DEV1, "other-job").seal(body)),
        # dev-02's own valid signature on a report that claims to be dev-01's
        (Reason.PARTICIPANT_MISMATCH, Signer(DEV2, "j").seal(body)),
    ]
    for reason, data in cases:
        assert _refusal(data, verifier) == reason
    assert open_eval(good, verifier=verifier).participant == "dev-01"


def test_without_keys_signed_and_unsigned_reports_both_open() -> None:
    body = _report("dev-01")
    assert open_eval(body) == open_eval(Signer(DEV1, "j").seal(body)) == decode_eval(body)
    # without keys a signature is not checked, so its owner is not either (as updates)
    assert open_eval(Signer(DEV2, "j").seal(body)).participant == "dev-01"


def test_reports_and_updates_cannot_pass_for_each_other(tmp_path: Path) -> None:
    verifier = Verifier(ring(tmp_path, DEV1), "j")
    sealed_update = Signer(DEV1, "j").seal(update("dev-01", 1))
    assert _refusal(sealed_update, verifier) == Reason.UNKNOWN_SCHEMA
    sealed_report = Signer(DEV1, "j").seal(_report("dev-01"))
    with pytest.raises(WireError) as caught:
        open_update(sealed_report, spec=SPEC, verifier=verifier)
    assert caught.value.reason == Reason.UNKNOWN_SCHEMA


# -- garbage: WireError and nothing else ---------------------------------------------------

SEEDS = [
    VALID,
    encode_eval(EvalEnvelope(participant="d", version=0, num_examples=1, metrics={"a": 0.0})),
    Signer(DEV1, "j").seal(_report("dev-01")),
]
FAST = settings(
    max_examples=300,
    deadline=timedelta(milliseconds=500),
    suppress_health_check=[HealthCheck.too_slow],
)


def _outcome(data: bytes, verifier: Verifier | None) -> str:
    try:
        open_eval(data, verifier=verifier)
    except WireError as error:
        return error.reason.value
    return "accepted"


@pytest.fixture(scope="module")
def verifier(tmp_path_factory: pytest.TempPathFactory) -> Verifier:
    return Verifier(ring(tmp_path_factory.mktemp("keys"), DEV1), "j")


def test_seeds_open(verifier: Verifier) -> None:
    assert [_outcome(seed, None) for seed in SEEDS] == ["accepted"] * 3
    assert _outcome(SEEDS[2], verifier) == "accepted"


@FAST
@given(st.binary(max_size=200))
def test_arbitrary_bytes(data: bytes) -> None:
    _outcome(data, None)


@FAST
@given(st.randoms(use_true_random=False))
def test_mutated_reports(verifier: Verifier, rnd: random.Random) -> None:
    data = mutate(rnd, SEEDS)
    _outcome(data, None)
    _outcome(data, verifier)


@FAST
@given(st.data())
def test_fields_replaced_by_random_msgpack_values(data: st.DataObject) -> None:
    obj = fields(data.draw(st.sampled_from(SEEDS[:2])))
    target = obj["metrics"] if data.draw(st.booleans()) else obj
    key = data.draw(st.sampled_from([*target, "extra", "m" * 33]) | st.text(max_size=40))
    if data.draw(st.booleans()):
        target.pop(key, None)
    else:
        target[key] = data.draw(msgpack_values)
    _outcome(_pack(obj), None)


def test_every_truncation_is_undecodable() -> None:
    for end in range(len(VALID)):
        assert reason_of(VALID[:end]) == Reason.UNDECODABLE

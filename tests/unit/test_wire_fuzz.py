"""Property tests: whatever the bytes, the decoders raise WireError and nothing else, fast.

The long-running version of the same idea is ``python -m fedmq.wire.fuzz --seconds 60``.
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq.wire import fuzz

SEEDS = fuzz.seed_messages()
# Deadline per input: generous for a loaded CI runner, far below any real slowness.
FAST = settings(
    max_examples=300,
    deadline=timedelta(milliseconds=500),
    suppress_health_check=[HealthCheck.too_slow],
)

msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40)
    | st.sampled_from(["float32", "float16", "int8", "int4", "topk", "k", "values", "w", "b"])
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=8,
)


def test_seed_messages_are_valid() -> None:
    outcomes = {fuzz.check(seed) for seed in SEEDS}
    assert outcomes == {("accepted", "unknown_schema"), ("unknown_schema", "accepted")}


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    fuzz.check(data)


@FAST
@given(st.randoms(use_true_random=False))
def test_mutated_envelopes(rnd: random.Random) -> None:
    fuzz.check(fuzz.mutate(rnd, SEEDS))


@FAST
@given(st.data())
def test_fields_replaced_by_random_msgpack_values(data: st.DataObject) -> None:
    obj = msgpack.unpackb(data.draw(st.sampled_from(SEEDS)), raw=False)
    containers: list[Any] = []
    stack = [obj]
    while stack:  # every map and array of the envelope, the tensors' params included
        item = stack.pop()
        if isinstance(item, dict | list):
            containers.append(item)
            stack.extend(item.values() if isinstance(item, dict) else item)
    target = data.draw(st.sampled_from(containers))
    action = data.draw(st.sampled_from(["replace", "delete", "insert"]))
    if isinstance(target, dict):
        key = data.draw(st.sampled_from([*target, "extra"]))
        if action == "delete":
            target.pop(key, None)
        else:
            target[key] = data.draw(msgpack_values)
    else:
        index = data.draw(st.integers(min_value=0, max_value=len(target)))
        if action == "insert" or index == len(target):
            target.insert(index, data.draw(msgpack_values))
        elif action == "delete":
            del target[index]
        else:
            target[index] = data.draw(msgpack_values)
    fuzz.check(msgpack.packb(obj, use_bin_type=True))


@FAST
@given(st.sampled_from(SEEDS), st.sampled_from(SEEDS), st.integers(0, 10**6), st.integers(0, 10**6))
def test_spliced_envelopes(a: bytes, b: bytes, i: int, j: int) -> None:
    fuzz.check(a[: i % (len(a) + 1)] + b[j % (len(b) + 1) :])


@FAST
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=4),
)
def test_flipped_bytes(seed: bytes, flips: list[tuple[int, int]]) -> None:
    buf = bytearray(seed)
    for position, mask in flips:
        buf[position % len(buf)] ^= mask
    fuzz.check(bytes(buf))


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_every_truncation_is_undecodable(seed: bytes) -> None:
    for end in range(len(seed)):
        assert fuzz.check(seed[:end]) == ("undecodable", "undecodable")


def test_long_fuzz_entry_point_runs_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    assert fuzz.main(["--seconds", "0.3", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tried ") and "undecodable" in out

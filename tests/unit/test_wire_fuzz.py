"""Property tests: whatever the bytes, the decoders raise WireError and nothing else, fast,
and within bounded memory.

The long-running version of the same idea is ``python -m fedmq.wire.fuzz --seconds 60``.
"""

from __future__ import annotations

import random
import tracemalloc
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


# -- never allocate without bound ---------------------------------------------------------
#
# Whatever sizes a message claims (shapes, top-k counts, msgpack lengths), decoding it must
# allocate in proportion to its real size and to the limits, never to the claim. fuzz.LIMITS
# allow 4 KiB messages and 4096 decoded elements (16 KiB); decoding takes a few KiB. A
# decoder that trusted a claimed 2**32 would need gigabytes (or raise MemoryError, which
# fuzz.check lets through as a failure too).

MEMORY_BOUND = 256 * 1024
CLAIMS = (2**16, 2**20, 2**31 - 1, 2**32, 2**63 - 1)
HUGE_HEADERS = (
    b"\xdd\xff\xff\xff\xff",  # array 32 of 4 Gi items
    b"\xdf\xff\xff\xff\xff",  # map 32 of 4 Gi pairs
    b"\xc6\xff\xff\xff\xff",  # bin 32 of 4 GiB
    b"\xdb\xff\xff\xff\xff",  # str 32 of 4 GiB
    b"\xc9\xff\xff\xff\xff\x01",  # ext 32 of 4 GiB
)


def _peak_bytes(data: bytes) -> int:
    """The most memory allocated at once while ``data`` is decoded both ways.

    tracemalloc sees Python objects, msgpack's buffers and numpy's arrays. Build the input
    before calling: only the decoding is measured.
    """
    tracemalloc.start()
    try:
        fuzz.check(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@FAST
@given(st.randoms(use_true_random=False))
def test_mutated_envelopes_allocate_within_bound(rnd: random.Random) -> None:
    data = fuzz.mutate(rnd, SEEDS)
    assert _peak_bytes(data) < MEMORY_BOUND


@FAST
@given(
    st.sampled_from(SEEDS),
    st.sampled_from(CLAIMS),
    st.sampled_from(["shape", "square", "k", "empty data"]),
)
def test_claimed_sizes_allocate_within_bound(seed: bytes, claim: int, where: str) -> None:
    envelope = msgpack.unpackb(seed, raw=False)
    for tensor in envelope["tensors"]:
        if where == "shape":
            tensor["shape"] = [claim]
        elif where == "square":
            tensor["shape"] = [claim, claim]
        elif where == "k" and "k" in tensor["params"]:
            tensor["params"]["k"] = claim
        else:  # a huge tensor that claims its values need no bytes (k=0 top-k, empty data)
            tensor["shape"] = [claim]
            tensor["data"] = b""
            if "k" in tensor["params"]:
                tensor["params"]["k"] = 0
    assert _peak_bytes(msgpack.packb(envelope, use_bin_type=True)) < MEMORY_BOUND


@pytest.mark.parametrize("header", HUGE_HEADERS, ids=lambda h: h[:1].hex())
def test_huge_msgpack_lengths_allocate_within_bound(header: bytes) -> None:
    for data in (header, header + b"\x00" * 64, SEEDS[0][:40] + header):
        assert _peak_bytes(data) < MEMORY_BOUND

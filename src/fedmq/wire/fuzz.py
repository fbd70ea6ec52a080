"""Fuzz the wire decoder for as long as you like: ``python -m fedmq.wire.fuzz --seconds 60``.

Valid envelopes (every codec, both schemas) are mutated at random, byte-wise (flips,
truncation, splices, insertions) and structurally (a field replaced by a random msgpack
value, a key dropped or added), then decoded as an update and as a model and
materialized. Anything but ``WireError`` is a bug: it is printed with its input and the
exit status is 1. CI runs the short hypothesis version (tests/unit/test_wire_fuzz.py).
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time
import traceback
from collections.abc import Callable

import msgpack
import numpy as np

from fedmq.codecs import CodecConfig, EncodedTensor, encode_params
from fedmq.errors import WireError
from fedmq.wire._decode import decode_model, decode_update, materialize
from fedmq.wire._encode import encode_model, encode_update
from fedmq.wire._envelope import (
    ModelEnvelope,
    PrivacySpend,
    TensorSpec,
    UpdateEnvelope,
    WireLimits,
)

__all__ = ["LIMITS", "SPEC", "check", "main", "mutate", "random_value", "seed_messages"]

# A tiny model with the awkward cases: a matrix, an odd-length vector, a scalar, an empty tensor.
SPEC: TensorSpec = {"w": ((3, 4), "float32"), "b": ((5,), "float32"), "s": ((), "float32")}
SPEC = {**SPEC, "e": ((0,), "float32")}
# Small limits, so that the mutations reach them too.
LIMITS = WireLimits(
    max_message_bytes=4096, max_tensors=8, max_name_bytes=16, max_decoded_elements=4096
)

_CONFIGS = (
    CodecConfig(name="float32"),
    CodecConfig(name="float16"),
    CodecConfig(name="int8", block_size=2),
    CodecConfig(name="int4", block_size=3),
    CodecConfig(name="topk", topk_fraction=0.3, topk_values="float32"),
    CodecConfig(name="topk", topk_fraction=0.3, topk_values="float16"),
    CodecConfig(name="topk", topk_fraction=0.5, topk_values="int8", block_size=2),
)
_INTERESTING_INTS = (
    0,
    1,
    2,
    3,
    7,
    8,
    127,
    128,
    255,
    256,
    2**31,
    2**32 - 1,
    2**32,
    2**63,
    2**64 - 1,
)


def seed_messages() -> list[bytes]:
    """Valid update and model envelopes for ``SPEC``, one per codec configuration."""
    rng = np.random.default_rng(0)
    messages = []
    for i, config in enumerate(_CONFIGS):
        arrays = {
            name: rng.normal(size=shape).astype(np.float32) for name, (shape, _) in SPEC.items()
        }
        tensors = tuple(encode_params(arrays, config, rng))
        update = UpdateEnvelope(
            participant=f"dev-{i}",
            seq=i,
            base_version=3,
            num_examples=60,
            loss=0.25,
            created=1.7e9,
            tensors=tensors,
            # Every other one reports a privacy spend (the optional key, wire-format 3.1).
            privacy=PrivacySpend(mechanism="dp-sgd", epsilon=1.5, delta=1e-5) if i % 2 else None,
        )
        messages.append(encode_update(update))
        messages.append(encode_model(ModelEnvelope(version=i, created=1.7e9, tensors=tensors)))
    return messages


def random_value(rnd: random.Random, depth: int = 0) -> object:
    """A random msgpack-able value, biased towards the ones that trip decoders."""
    choice = rnd.randrange(12 if depth < 2 else 9)
    if choice == 0:
        return None
    if choice == 1:
        return rnd.random() < 0.5
    if choice == 2:
        return rnd.choice(_INTERESTING_INTS) * rnd.choice((1, -1))  # -2**64+1 is rejected below
    if choice == 3:
        return rnd.choice((0.0, -0.0, 1.5, float("nan"), float("inf"), -float("inf"), 1e308))
    if choice == 4:
        return rnd.choice(("", "w", "b", "float32", "int4", "topk", "k", "values", "x" * 300))
    if choice == 5:
        return rnd.randbytes(rnd.choice((0, 1, 4, 7, 12, 100)))
    if choice == 6:
        return msgpack.ExtType(rnd.randrange(-128, 128), rnd.randbytes(rnd.randrange(4)))
    if choice == 7:
        return rnd.randrange(-(2**63), 2**64)
    if choice == 8:
        return "ü" * rnd.randrange(200)
    if choice == 9:
        return [random_value(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    if choice == 10:
        return {str(random_value(rnd, 2)): random_value(rnd, depth + 1) for _ in range(3)}
    return [rnd.choice(_INTERESTING_INTS) for _ in range(rnd.randrange(5))]


def _containers(obj: object) -> list[dict[object, object] | list[object]]:
    found: list[dict[object, object] | list[object]] = []
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            found.append(item)
            stack.extend(item)
    return found


def _mutate_structure(rnd: random.Random, data: bytes) -> bytes:
    obj = msgpack.unpackb(data, raw=False)
    container = rnd.choice(_containers(obj))
    if isinstance(container, dict):
        key = rnd.choice(list(container)) if container else "x"
        action = rnd.randrange(4)
        if action == 0:
            container.pop(key, None)
        elif action == 1:
            container[str(random_value(rnd, 2))] = random_value(rnd)
        else:
            container[key] = random_value(rnd)
    else:
        index = rnd.randrange(len(container) + 1)
        action = rnd.randrange(3) if index < len(container) else 2
        if action == 0:
            del container[index]
        elif action == 1:
            container[index] = random_value(rnd)
        else:
            container.insert(index, random_value(rnd))
    try:
        packed = msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return data  # e.g. an int below -2**63, which msgpack cannot carry
    assert isinstance(packed, bytes)
    return packed


def _mutate_bytes(rnd: random.Random, data: bytes, other: bytes) -> bytes:
    buf = bytearray(data)
    action = rnd.randrange(6)
    i = rnd.randrange(len(buf) + 1)
    if action == 0:  # flip a few bytes
        for _ in range(rnd.randint(1, 4)):
            if buf:
                buf[rnd.randrange(len(buf))] ^= rnd.randrange(1, 256)
    elif action == 1:  # set a byte to a msgpack type marker or boundary value
        if buf:
            buf[rnd.randrange(len(buf))] = rnd.choice((0x00, 0x7F, 0x80, 0xC1, 0xD4, 0xDF, 0xFF))
    elif action == 2:
        del buf[i:]
    elif action == 3:
        buf[i:i] = rnd.randbytes(rnd.randint(1, 8))
    elif action == 4:
        del buf[i : i + rnd.randint(1, 8)]
    else:  # splice two messages
        buf = buf[:i] + other[rnd.randrange(len(other) + 1) :]
    return bytes(buf)


def mutate(rnd: random.Random, seeds: list[bytes]) -> bytes:
    """One fuzz input: a seed message mutated once or twice, or random bytes."""
    if rnd.random() < 0.05:
        return rnd.randbytes(rnd.randrange(64))
    data = rnd.choice(seeds)
    for _ in range(rnd.randint(1, 2)):
        if rnd.random() < 0.6:
            try:
                data = _mutate_structure(rnd, data)
            except Exception:  # an earlier byte mutation made it unparseable: mutate bytes
                data = _mutate_bytes(rnd, data, rnd.choice(seeds))
        else:
            data = _mutate_bytes(rnd, data, rnd.choice(seeds))
    return data


def _outcome(decode: Callable[[], tuple[EncodedTensor, ...]]) -> str:
    try:
        materialize(decode())
    except WireError as exc:
        return exc.reason.value
    return "accepted"


def check(data: bytes, limits: WireLimits = LIMITS) -> tuple[str, str]:
    """Decode ``data`` as an update (against SPEC) and as a model (without a spec).

    Returns the outcome of each: "accepted" or the rejection reason. Any exception
    other than ``WireError`` propagates: that is what the fuzzer looks for.
    """
    as_update = _outcome(lambda: decode_update(data, spec=SPEC, limits=limits).tensors)
    as_model = _outcome(lambda: decode_model(data, limits=limits).tensors)
    return as_update, as_model


def main(argv: list[str] | None = None) -> int:
    """Fuzz for ``--seconds``; print the tally; exit 1 on the first non-WireError."""
    parser = argparse.ArgumentParser(prog="python -m fedmq.wire.fuzz", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rnd = random.Random(seed)
    seeds = seed_messages()
    tally: collections.Counter[str] = collections.Counter()
    tried, slowest = 0, 0.0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        data = mutate(rnd, seeds)
        start = time.perf_counter()
        try:
            as_update, as_model = check(data)
        except Exception:
            traceback.print_exc()
            print(f"CRASH after {tried} inputs (seed {seed}) on input {data.hex()}")
            return 1
        slowest = max(slowest, time.perf_counter() - start)
        tried += 1
        tally[f"update {as_update}"] += 1
        tally[f"model  {as_model}"] += 1
    print(
        f"tried {tried} inputs in {args.seconds:g} s (seed {seed}); slowest {slowest * 1e3:.1f} ms"
    )
    print("outcome per decoder (accepted, or the rejection reason):")
    for outcome, count in sorted(tally.items()):
        print(f"  {outcome:<28} {count:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

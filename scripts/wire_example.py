"""Regenerate the generated parts of docs/wire-format.md from the real encoder.

    python scripts/wire_example.py           # print the generated markdown blocks
    python scripts/wire_example.py --write   # replace them in docs/wire-format.md
    python scripts/wire_example.py --check   # exit 1 if the doc is stale (CI)

Each block sits between ``<!-- generated:NAME -->`` and ``<!-- end generated:NAME -->``.
The hex dumps are annotated by a small msgpack walker below, independent of msgpack-python,
so the annotations also check that the bytes are what the document says they are.
"""

from __future__ import annotations

import argparse
import re
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmq.codecs import CodecConfig, encode_tensor
from fedmq.wire import (
    ControlEnvelope,
    EvalEnvelope,
    ModelEnvelope,
    PrivateKey,
    Signer,
    UpdateEnvelope,
    decode_control,
    decode_eval,
    decode_model,
    decode_signed,
    decode_update,
    encode_control,
    encode_eval,
    encode_model,
    encode_update,
    materialize,
    tensor_spec_of,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "wire-format.md"
W = np.array([[0.5, -1.0], [2.0, 0.25]], dtype=np.float32)
B = np.array([1.0, -0.25], dtype=np.float32)
N = 29_034  # the reference model of the size table
# The secret key of RFC 8032's first Ed25519 test vector: anyone can redo the signature.
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")


def example_update() -> UpdateEnvelope:
    """The worked example: "w" [2,2] as float32 and "b" [2] as int8 with blocks of 2."""
    return UpdateEnvelope(
        participant="dev-0001",
        seq=7,
        base_version=3,
        num_examples=600,
        loss=0.4375,
        created=1_700_000_000.5,
        tensors=(
            encode_tensor("w", W, CodecConfig(name="float32")),
            encode_tensor("b", B, CodecConfig(name="int8", block_size=2)),
        ),
    )


def example_model() -> ModelEnvelope:
    """The model example: the same two tensors, both float32."""
    return ModelEnvelope(
        version=4,
        created=1_700_000_000.0,
        tensors=(
            encode_tensor("w", W, CodecConfig(name="float32")),
            encode_tensor("b", B, CodecConfig(name="float32")),
        ),
    )


def example_signer() -> Signer:
    """Device ``dev-0001`` of job ``default``, with the RFC 8032 test key."""
    key = PrivateKey("dev-0001", Ed25519PrivateKey.from_private_bytes(RFC8032_SEED))
    return Signer(key, "default")


def example_operator() -> Signer:
    """The operator's key ``operator`` of job ``default``: the same RFC 8032 test key."""
    key = PrivateKey("operator", Ed25519PrivateKey.from_private_bytes(RFC8032_SEED))
    return Signer(key, "default")


def example_control() -> ControlEnvelope:
    """``fedmq ctl set alpha=0.4 max_staleness=10``, as sent."""
    return ControlEnvelope(
        id="3f2a9c01",
        command="set",
        values={"alpha": 0.4, "max_staleness": 10},
        issued=1_700_000_000.0,
    )


def example_eval() -> EvalEnvelope:
    """Device ``dev-0001``'s report on version 42: RMSE and MAE over 480 held-out examples."""
    return EvalEnvelope(
        participant="dev-0001",
        version=42,
        num_examples=480,
        metrics={"rmse": 21.5, "mae": 13.25},
        created=1_700_000_000.5,
    )


# --- an annotating msgpack walker (only the formats fedmq writes) --------------------


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


class _Dump:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.lines: list[tuple[int, bytes, str]] = []

    def take(self, n: int, meaning: str) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.lines.append((self.pos, chunk, meaning))
        self.pos += n
        return chunk

    def header(self) -> tuple[str, int]:
        """Read one msgpack header; return (kind, length or uint value) and log it."""
        b = self.data[self.pos]
        if b <= 0x7F:
            self.take(1, f"uint {b} (positive fixint)")
            return "uint", b
        if 0x80 <= b <= 0x8F:
            self.take(1, f"map, {_count(b & 0x0F, 'entry', 'entries')} (fixmap)")
            return "map", b & 0x0F
        if 0x90 <= b <= 0x9F:
            self.take(1, f"array, {_count(b & 0x0F, 'item', 'items')} (fixarray)")
            return "array", b & 0x0F
        if 0xA0 <= b <= 0xBF:
            return "str", b & 0x1F
        sizes = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
        if b in sizes:
            raw = self.data[self.pos + 1 : self.pos + 1 + sizes[b]]
            value = int.from_bytes(raw, "big")
            self.take(1 + sizes[b], f"uint {value} (uint {8 * sizes[b]}, big-endian)")
            return "uint", value
        if b == 0xCB:
            (value,) = struct.unpack(">d", self.data[self.pos + 1 : self.pos + 9])
            self.take(9, f"float64 {value!r} (float 64, big-endian)")
            return "float", 0  # the walker never needs the value back
        if b in (0xC4, 0xC5, 0xC6):
            width = {0xC4: 1, 0xC5: 2, 0xC6: 4}[b]
            n = int.from_bytes(self.data[self.pos + 1 : self.pos + 1 + width], "big")
            self.take(1 + width, f"bin {8 * width}, {n} bytes follow: the payload")
            return "bin", n
        if b == 0xD9:
            return "str", -1
        raise ValueError(f"byte 0x{b:02x} at {self.pos}: not a format fedmq writes")

    def string(self, role: str) -> str:
        b = self.data[self.pos]
        if b == 0xD9:
            n = self.data[self.pos + 1]
            text = self.data[self.pos + 2 : self.pos + 2 + n].decode()
            self.take(2 + n, f'{role} "{text}" (str 8, {_count(n, "byte", "bytes")})')
        else:
            n = b & 0x1F
            text = self.data[self.pos + 1 : self.pos + 1 + n].decode()
            self.take(1 + n, f'{role} "{text}" (fixstr, {_count(n, "byte", "bytes")})')
        return text

    def value(self, payload: Callable[[bytes], list[tuple[int, str]]] | None = None) -> object:
        b = self.data[self.pos]
        if 0xA0 <= b <= 0xBF or b == 0xD9:
            return self.string("str")
        kind, n = self.header()
        if kind == "map":
            return {self.string("key"): self.value() for _ in range(n)}
        if kind == "array":
            return [self.value() for _ in range(n)]
        if kind == "bin":
            assert payload is not None
            start = self.pos
            for size, meaning in payload(self.data[start : start + n]):
                self.take(size, "  " + meaning)
            assert self.pos == start + n
        return n if kind == "uint" else None

    def tensor(self) -> None:
        kind, n = self.header()
        assert kind == "map" and n == 6
        fields: dict[str, object] = {}
        for _ in range(5):
            key = self.string("key")
            fields[key] = self.value()
        self.string("key")  # "data"
        self.value(lambda data: _payload_lines(fields, data))

    def envelope(self) -> None:
        kind, n = self.header()
        assert kind == "map"
        for _ in range(n):
            key = self.string("key")
            if key == "tensors":
                kind, count = self.header()
                for _ in range(count):
                    self.tensor()
            else:
                self.value()
        assert self.pos == len(self.data)

    def render(self) -> str:
        out = [f"{'offset':<6}  {'bytes':<47}  meaning"]
        for offset, chunk, meaning in self.lines:
            for i in range(0, len(chunk), 16):
                part = " ".join(f"{x:02x}" for x in chunk[i : i + 16])
                label = meaning if i == 0 else ""
                out.append(f"{offset + i:06x}  {part:<47}  {label}".rstrip())
        return "\n".join(out)


def _payload_lines(fields: dict[str, object], data: bytes) -> list[tuple[int, str]]:
    codec, params, shape = fields["codec"], fields["params"], fields["shape"]
    assert isinstance(params, dict) and isinstance(shape, list)
    numel = int(np.prod(shape))
    if codec == "float32":
        values = struct.unpack(f"<{len(data) // 4}f", data)
        return [(4, f"float32 LE {v!r} (element {i})") for i, v in enumerate(values)]
    if codec == "int8":
        block = params["block_size"]
        nblocks = -(-numel // block)
        scales = struct.unpack(f"<{nblocks}f", data[: 4 * nblocks])
        lines = [(4, f"scale of block {i}: float32 LE {s!r}") for i, s in enumerate(scales)]
        q = struct.unpack(f"<{numel}b", data[4 * nblocks :])
        decoded = [float(np.float32(v) * np.float32(scales[i // block])) for i, v in enumerate(q)]
        for i, (v, d) in enumerate(zip(q, decoded, strict=True)):
            lines.append((1, f"int8 {v} (element {i}) -> {v} * scale = {d:.7g}"))
        return lines
    raise ValueError(f"no annotation for codec {codec}")


# --- the generated blocks ----------------------------------------------------------


def _hex_block(title: str, data: bytes) -> str:
    rows = [data[i : i + 32].hex() for i in range(0, len(data), 32)]
    return (
        f"{title} ({len(data)} bytes), as one hex string:\n\n```text\n" + "\n".join(rows) + "\n```"
    )


def _example(name: str, data: bytes) -> str:
    dump = _Dump(data)
    dump.envelope()
    return "\n\n".join(
        [f"Annotated, byte by byte:\n\n```text\n{dump.render()}\n```", _hex_block(name, data)]
    )


def _size_table() -> str:
    x = {"w": np.random.default_rng(0).normal(size=N).astype(np.float32)}
    rows = [
        "| codec | params | payload bytes | whole update envelope | bytes / parameter |",
        "|---|---|---:|---:|---:|",
    ]
    configs = [
        CodecConfig(name="float32"),
        CodecConfig(name="float16"),
        CodecConfig(name="int8", block_size=64),
        CodecConfig(name="int4", block_size=64),
        CodecConfig(name="topk", topk_fraction=0.01, topk_values="float32"),
        CodecConfig(name="topk", topk_fraction=0.01, topk_values="float16"),
        CodecConfig(name="topk", topk_fraction=0.01, topk_values="int8", block_size=64),
    ]
    for config in configs:
        t = encode_tensor("w", x["w"], config)
        env = UpdateEnvelope(
            participant="dev-0001",
            seq=1,
            base_version=0,
            num_examples=600,
            loss=0.5,
            created=1_700_000_000.0,
            tensors=(t,),
        )
        total = len(encode_update(env))
        params = ", ".join(f"{k}={v}" for k, v in sorted(t.params.items())) or "-"
        rows.append(f"| {config.name} | {params} | {len(t.data):,} | {total:,} | {total / N:.3f} |")
    return "\n".join(rows)


def _signed_example(signer: Signer, body: bytes, what: str, whole: str) -> str:
    """``body`` sealed by ``signer``, annotated; ``what`` names the body, ``whole`` the result."""
    sealed = signer.seal(body)
    dump = _Dump(sealed)
    kind, n = dump.header()
    assert kind == "map" and n == 4
    for _ in range(n):
        key = dump.string("key")
        if key == "body":
            dump.value(lambda d: [(len(d), f"{what}, byte for byte")])
        elif key == "sig":
            dump.value(lambda d: [(32, "Ed25519 signature, R"), (32, "Ed25519 signature, S")])
        else:
            dump.value()
    assert dump.pos == len(sealed)
    public = signer.key.public.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    key_id = signer.key_id
    prefix = b"\0".join((b"fedmq.signed/1", signer.job.encode(), key_id.encode(), b""))
    return "\n\n".join(
        [
            f"Public key of `{key_id}` (32 raw bytes): `{public.hex()}`.",
            "The signed message: these "
            f"{len(prefix)} bytes, then the {len(body)} bytes of {what}:\n\n"
            f"```text\n{prefix.hex(' ')}\n```",
            f"Annotated, byte by byte:\n\n```text\n{dump.render()}\n```",
            _hex_block(whole, sealed),
        ]
    )


def render_blocks() -> dict[str, str]:
    """name -> generated markdown, after checking that every example decodes back."""
    update, model = example_update(), example_model()
    spec = tensor_spec_of({"w": W, "b": B})
    update_bytes, model_bytes = encode_update(update), encode_model(model)
    assert decode_update(update_bytes, spec=spec) == update
    assert decode_model(model_bytes, spec=spec) == model
    materialize(update.tensors)
    sealed = example_signer().seal(update_bytes)
    assert decode_signed(sealed).body == update_bytes
    control_bytes = encode_control(example_control())
    assert decode_control(control_bytes) == example_control()
    eval_bytes = encode_eval(example_eval())
    assert decode_eval(eval_bytes) == example_eval()
    return {
        "update-example": _example("The whole update", update_bytes),
        "model-example": _example("The whole model", model_bytes),
        "signed-example": _signed_example(
            example_signer(), update_bytes, "the update of section 8.1", "The whole signed update"
        ),
        "control-example": _example("The whole command", control_bytes),
        "signed-control-example": _signed_example(
            example_operator(), control_bytes, "the command above", "The whole signed command"
        ),
        "eval-example": _example("The whole report", eval_bytes),
        "signed-eval-example": _signed_example(
            example_signer(), eval_bytes, "the report above", "The whole signed report"
        ),
        "sizes": _size_table(),
    }


def _replace(doc: str, blocks: dict[str, str]) -> str:
    for name, body in blocks.items():
        pattern = re.compile(
            rf"(<!-- generated:{name} -->\n).*?(<!-- end generated:{name} -->)", re.DOTALL
        )
        match = pattern.search(doc)
        if match is None:
            raise SystemExit(f"{DOC}: no <!-- generated:{name} --> block")
        doc = doc[: match.end(1)] + body + "\n" + doc[match.start(2) :]
    return doc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="update docs/wire-format.md")
    group.add_argument("--check", action="store_true", help="exit 1 if the doc is stale")
    args = parser.parse_args()
    blocks = render_blocks()
    if not (args.write or args.check):
        for name, body in blocks.items():
            print(f"<!-- generated:{name} -->\n{body}\n<!-- end generated:{name} -->\n")
        return 0
    doc = DOC.read_text()
    updated = _replace(doc, blocks)
    if args.check:
        if updated != doc:
            print(f"{DOC} is stale: run python scripts/wire_example.py --write")
            return 1
        return 0
    DOC.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())

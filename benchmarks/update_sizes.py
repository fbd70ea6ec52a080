"""Bytes on the wire of one cnn-s update, for every codec.

    python benchmarks/update_sizes.py [--data-dir DIR]

Trains one real local epoch (BENCHMARK.md's settings, participant 0 of the
Dirichlet split) so the delta has real values, then encodes it with each codec
as a complete update envelope, exactly as a participant publishes it.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedmq.codecs import CodecConfig, ErrorFeedback, encode_params
from fedmq.data import dirichlet_partition, load_fashion_mnist, resolve_data_dir, to_tensors
from fedmq.models import build_model, get_params, set_params, train_local
from fedmq.wire import UpdateEnvelope, encode_update

CODECS = {
    "float32": CodecConfig(name="float32"),
    "float16": CodecConfig(name="float16"),
    "int8 (block 64)": CodecConfig(name="int8", block_size=64),
    "int4 (block 64)": CodecConfig(name="int4", block_size=64),
    "top-k 1%, float32 values": CodecConfig(name="topk", topk_fraction=0.01),
    "top-k 1%, int8 values": CodecConfig(name="topk", topk_fraction=0.01, topk_values="int8"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, _ = load_fashion_mnist(resolve_data_dir(args.data_dir))
    indices = dirichlet_partition(train.labels, 50, 0.5, 0)[0]
    x, y = to_tensors(train, indices)
    model = build_model("cnn-s", seed=0)
    base = get_params(model)
    set_params(model, base)
    loss = train_local(model, x, y, epochs=1, batch_size=32, lr=0.05, seed=0)
    local = get_params(model)
    delta = {name: local[name] - base[name] for name in base}
    numel = sum(d.size for d in delta.values())
    print(f"cnn-s: {numel:,} parameters in {len(delta)} tensors; one epoch on {len(y)} images")
    print(f"{'codec':<28}{'update bytes':>14}{'vs float32':>12}")
    reference = None
    for label, codec in CODECS.items():
        coder = ErrorFeedback(codec) if codec.name == "topk" else None
        tensors = coder.encode(delta) if coder else encode_params(delta, codec)
        body = encode_update(
            UpdateEnvelope(
                participant="dev-00",
                seq=0,
                base_version=0,
                num_examples=len(y),
                loss=loss,
                created=time.time(),
                tensors=tuple(tensors),
            )
        )
        reference = reference or len(body)
        print(f"{label:<28}{len(body):>14,}{reference / len(body):>11.1f}x")


if __name__ == "__main__":
    main()

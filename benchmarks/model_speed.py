"""cnn-s training and evaluation speed on one CPU thread, against plain NCHW layers.

    python benchmarks/model_speed.py [--batches 200]

``fedmq.models.CnnS`` computes in the channels-last memory format with each max-pool
before its ReLU. This prints the milliseconds per training batch of 32 (forward,
backward, SGD step) and the seconds to evaluate 10,000 images, for that model and
for the textbook NCHW form with the same weights, and the largest difference between
their outputs and gradients (float rounding only).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedmq.models import build_model

Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def textbook(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BENCHMARK.md's layer order in NCHW: Conv ReLU MaxPool, twice, then Linear."""
    m = model
    x = F.max_pool2d(F.relu(m.conv1(x)), 2)  # type: ignore[operator]
    x = F.max_pool2d(F.relu(m.conv2(x)), 2)  # type: ignore[operator]
    return m.fc(x.flatten(1))  # type: ignore[operator, no-any-return]


def zoo(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)  # type: ignore[no-any-return]


def nchw_copy(model: nn.Module) -> nn.Module:
    plain: nn.Module = copy.deepcopy(model)
    plain.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return plain


def train_ms(model: nn.Module, forward: Forward, batches: int) -> float:
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    params = list(model.parameters())

    def step() -> None:
        loss = F.cross_entropy(forward(model, x), y)
        model.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-0.05)  # type: ignore[arg-type]

    for _ in range(10):
        step()
    start = time.perf_counter()
    for _ in range(batches):
        step()
    return (time.perf_counter() - start) / batches * 1000


@torch.no_grad()
def eval_s(model: nn.Module, forward: Forward) -> float:
    model.eval()
    x = torch.randn(500, 1, 28, 28)
    forward(model, x)
    start = time.perf_counter()
    for _ in range(20):  # 20 x 500 = 10,000 images
        forward(model, x)
    return time.perf_counter() - start


def max_difference() -> tuple[float, float]:
    """Largest |output| and |gradient| difference, zoo vs textbook, on one batch."""
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    fast = build_model("cnn-s")
    plain = nchw_copy(fast)
    out_fast, out_plain = zoo(fast, x), textbook(plain, x)
    F.cross_entropy(out_fast, y).backward()  # type: ignore[no-untyped-call]
    F.cross_entropy(out_plain, y).backward()  # type: ignore[no-untyped-call]
    grads = [
        float((a.grad - b.grad).abs().max())  # type: ignore[operator]
        for a, b in zip(fast.parameters(), plain.parameters(), strict=True)
    ]
    return float((out_fast - out_plain).detach().abs().max()), max(grads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model("cnn-s")
    rows = [
        ("textbook NCHW", nchw_copy(model), textbook),
        ("fedmq cnn-s", copy.deepcopy(model), zoo),
    ]
    print(f"{'layout':<16}{'train ms/batch of 32':>22}{'eval s/10k images':>20}")
    results = []
    for name, m, forward in rows:
        t, e = train_ms(m, forward, args.batches), eval_s(m, forward)
        results.append((t, e))
        print(f"{name:<16}{t:>22.2f}{e:>20.3f}")
    (t0, e0), (t1, e1) = results
    print(f"speed-up: training {t0 / t1:.2f}x, evaluation {e0 / e1:.2f}x")
    out_diff, grad_diff = max_difference()
    print(f"largest difference: outputs {out_diff:.2e}, gradients {grad_diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

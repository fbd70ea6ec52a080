"""Seconds per local training, the task's plain loop against DP-SGD (fedmq.privacy.DPSGD).

One thread; each is the device's second training (Opacus's one-time set-up excluded).
Used for the slowdown in docs/benchmarks.md, "Example-level DP (DP-SGD on the devices)":

    python benchmarks/dpsgd_cost.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from fedmq.models import train_local
from fedmq.privacy import DPSGD, DPSGDConfig
from fedmq.tasks import Task
from fedmq.tasks.air_quality import stations
from fedmq.tasks.air_quality import task as air_quality
from fedmq.tasks.fashion_mnist import task as fmnist


def measure(task: Task, data: Any, label: str) -> None:
    model = task.build_model(0)
    train_local(model, data, task.training, 0)
    started = time.perf_counter()
    train_local(model, data, task.training, 1)
    plain = time.perf_counter() - started
    dp = DPSGD(
        DPSGDConfig(noise_multiplier=1.0),
        num_examples=len(data),
        batch_size=task.training.batch_size,
    )
    dp.train(model, data, task.training, 0)
    started = time.perf_counter()
    dp.train(model, data, task.training, 1)
    private = time.perf_counter() - started
    print(
        f"{label}: {len(data)} examples, plain {plain:.3f} s, DP-SGD {private:.3f} s,"
        f" x{private / plain:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # Opacus's secure_mode and backward-hook notices
    torch.set_num_threads(1)
    fleet = fmnist.fleet(args.data_dir, 50, 0) if fmnist.fleet else []
    measure(fmnist, fleet[1].train, "fmnist cnn-s, device 1 of fmnist-fleet")
    station, path = stations(args.data_dir)[0]
    measure(air_quality, air_quality.load_data(path).train, f"air-quality GRU, {station}")


if __name__ == "__main__":
    main()

"""The built-in ``fmnist`` task: Fashion-MNIST classification, BENCHMARK.md's workload.

A simulated device holds shard ``I`` of ``N`` of the official training set (label-skewed
by Dirichlet(``alpha``) or IID, the same split in every process for the same ``seed``)
and evaluates on shard ``I`` of an IID split of the test set. The aggregator's central
held-out set is the first ``eval_examples`` test images. ``data_dir`` everywhere is the
folder that holds ``fashion-mnist/`` (the four IDX files).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedmq.data import dirichlet_partition, iid_partition, load_fashion_mnist, to_tensors
from fedmq.errors import ConfigError, DataError
from fedmq.models import CnnS, Mlp, ModelName, Training, evaluate
from fedmq.tasks._task import DeviceData, Metric, Task

__all__ = ["TARGET", "FmnistSettings", "make_task", "split"]

DEMO_DEVICES = 20  # the fleet of `fedmq demo` when no size is given

TARGET = Metric("accuracy", higher_is_better=True, goal=0.80)  # BENCHMARK.md's


@dataclass(frozen=True, kw_only=True)
class FmnistSettings:
    """The fleet's split, and which part of it this process's device holds.

    ``shard``: ``(I, N)``, the part a ``fedmq participant`` holds. ``max_examples``: at
    most this many of a shard's training examples (0: all; small test fleets).
    """

    model: ModelName = "cnn-s"
    partition: Literal["dirichlet", "iid"] = "dirichlet"
    alpha: float = 0.5
    seed: int = 0
    shard: tuple[int, int] = (0, 1)
    max_examples: int = 0
    eval_examples: int = 10_000

    def __post_init__(self) -> None:
        if self.partition not in ("dirichlet", "iid"):
            raise ConfigError(f"partition: {self.partition!r} is not one of dirichlet, iid")
        index, count = self.shard
        if not 0 <= index < count:
            raise ConfigError(f"shard: index {index} must be in 0..{count - 1}")
        if self.max_examples < 0:
            raise ConfigError(f"max_examples: {self.max_examples} must be >= 0 (0: all)")
        if self.eval_examples < 1:
            raise ConfigError(f"eval_examples: {self.eval_examples} must be >= 1")


def split(labels: np.ndarray, kind: str, count: int, alpha: float, seed: int) -> list[np.ndarray]:
    """The fleet's split of the training set: ``count`` index arrays."""
    if kind == "iid":
        return iid_partition(len(labels), count, seed)
    return dirichlet_partition(labels, count, alpha, seed)


def make_task(settings: FmnistSettings | None = None) -> Task:
    """The ``fmnist`` task with ``settings`` (the defaults are BENCHMARK.md's)."""
    s = settings or FmnistSettings()

    def devices(data_dir: Path, count: int, which: Sequence[int]) -> list[DeviceData]:
        train, test = load_fashion_mnist(data_dir)
        shards = split(train.labels, s.partition, count, s.alpha, s.seed)
        tests = iid_partition(len(test.labels), count, s.seed)
        return [_device(train, test, shards[i], tests[i], s) for i in which]

    def fleet(data_dir: Path, count: int, seed: int) -> Sequence[DeviceData]:
        del seed  # the split's seed is the task's, so that every process agrees on it
        count = count or DEMO_DEVICES
        return devices(data_dir, count, range(count))

    def load_data(data_dir: Path) -> DeviceData:
        index, count = s.shard
        return devices(data_dir, count, [index])[0]

    def central_data(data_dir: Path) -> Dataset[Any]:
        _, test = load_fashion_mnist(data_dir)
        x, y = to_tensors(test)
        return TensorDataset(x[: s.eval_examples], y[: s.eval_examples])

    return Task(
        name="fmnist",
        model=CnnS if s.model == "cnn-s" else Mlp,
        load_data=load_data,
        evaluate=score,
        target=TARGET,
        training=Training(epochs=1, batch_size=32, lr=0.05),
        central_data=central_data,
        fleet=fleet,
    )


def score(model: nn.Module, data: Dataset[Any]) -> Mapping[str, float]:
    """Accuracy (0..1) and mean cross-entropy on a ``TensorDataset`` of (images, labels)."""
    if not isinstance(data, TensorDataset):
        raise DataError("fmnist: expected a TensorDataset of (images, labels)")
    accuracy, loss = evaluate(model, *data.tensors)
    return {"accuracy": accuracy, "loss": loss}


def _device(
    train: Any, test: Any, indices: np.ndarray, test_indices: np.ndarray, s: FmnistSettings
) -> DeviceData:
    if s.max_examples:
        indices = indices[: s.max_examples]
    return DeviceData(
        train=TensorDataset(*to_tensors(train, indices)),
        held_out=TensorDataset(*to_tensors(test, test_indices)),
    )


task = make_task()
"""The task with BENCHMARK.md's settings (``--task fmnist``)."""

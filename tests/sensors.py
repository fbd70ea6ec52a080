"""A tiny task of our own with a fleet and no central data, for the bench tests:
y = 2x + 1 on every device, scored by RMSE (lower is better)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedmq.models import Training
from fedmq.tasks import DeviceData, Metric, Task

__all__ = ["DEVICES", "held_out_sizes", "sensor_fleet", "sensors_task"]


def _line(count: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(count, 1, generator=generator)  # (count, 1)
    return TensorDataset(x, 2 * x + 1)


DEVICES = 6
"""The fleet's own size (``Task.fleet`` with ``devices`` 0)."""


def held_out_sizes(devices: int) -> list[int]:
    """Device i holds 3 + i held-out examples; the last one none (it never scores)."""
    return [0 if i == devices - 1 else 3 + i for i in range(devices)]


def sensor_fleet(data_dir: Path, devices: int, seed: int) -> Sequence[DeviceData]:
    """``Task.fleet``: device i trains on 8 + 4i examples; ``devices`` 0: ``DEVICES``."""
    del data_dir  # the data is made up
    devices = devices or DEVICES
    return [
        DeviceData(
            train=_line(8 + 4 * i, seed * 1000 + i), held_out=_line(n, seed * 1000 + 500 + i)
        )
        for i, n in enumerate(held_out_sizes(devices))
    ]


def _rmse(model: nn.Module, data: Dataset[Any]) -> Mapping[str, float]:
    assert isinstance(data, TensorDataset)
    x, y = data.tensors
    return {"rmse": float(torch.sqrt(torch.mean((model(x) - y) ** 2)))}


def sensors_task() -> Task:
    """The task (a module-level function: the bench's aggregator process calls it)."""
    return Task(
        name="sensors",
        model=lambda: nn.Linear(1, 1),
        load_data=lambda path: sensor_fleet(path, 1, 0)[0],
        evaluate=_rmse,
        target=Metric("rmse", higher_is_better=False, goal=0.05),
        training=Training(epochs=2, batch_size=4, lr=0.1, loss=nn.functional.mse_loss),
        fleet=sensor_fleet,
    )


task = sensors_task()
"""The task object, for ``fedmq bench --task tests/sensors.py:task``."""

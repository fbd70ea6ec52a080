"""The task and device data for tests that run the participant on a few in-memory images."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.data import TensorDataset

from fedmq.tasks import DeviceData, Task
from fedmq.tasks.fashion_mnist import FmnistSettings, make_task


def fmnist(*, batch_size: int = 8) -> Task:
    """The built-in ``fmnist`` task with the MLP, training in batches of ``batch_size``."""
    task = make_task(FmnistSettings(model="mlp"))
    return replace(task, training=replace(task.training, batch_size=batch_size))


def device_data(x: torch.Tensor, y: torch.Tensor) -> DeviceData:
    """A device training on ``(x, y)``, with no held-out examples (it sends no eval reports)."""
    return DeviceData(train=TensorDataset(x, y), held_out=TensorDataset(x[:0], y[:0]))

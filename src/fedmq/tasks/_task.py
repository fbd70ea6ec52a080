"""What a task gives fedmq: a model, a device's own data, local training, named metrics.

A task is one Python object, written by a user in their own file, in terms a torch user
already knows; fedmq never needs editing to run it::

    task = Task(
        name="my-sensors",
        model=MyNet,                                # () -> any torch.nn.Module
        load_data=read_my_csv,                      # path -> DeviceData (train, held-out)
        evaluate=my_metrics,                        # (model, dataset) -> {"rmse": ..., ...}
        target=Metric("rmse", higher_is_better=False),
        training=Training(epochs=2, lr=1e-3, optimizer="adam", loss=F.mse_loss),
    )

``load_task`` (_load.py) finds it from ``--task``: ``file.py:obj``, ``package.module:obj``
or the name of an installed plugin (entry point group ``fedmq.tasks``). docs/tasks.md
teaches it from zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fedmq.errors import ConfigError, DataError
from fedmq.models import Training, train_local
from fedmq.wire import METRIC_NAME_RULE, is_metric_name

__all__ = ["DeviceData", "Metric", "Task", "TrainFn"]

TrainFn = Callable[[nn.Module, Dataset[Any], Training, int], float]
"""``train(model, data, training, seed) -> mean loss``: train ``model`` in place on the
device's ``data``; the default is ``fedmq.models.train_local``. The loss is reported
with the update; a NaN or infinite loss skips the update."""


@dataclass(frozen=True)
class Metric:
    """A named metric and its direction: accuracy up, RMSE down. ``goal``: the value a
    demo or benchmark run stops at by default (``--target`` overrides it)."""

    name: str
    higher_is_better: bool
    goal: float | None = None

    def __post_init__(self) -> None:
        if not is_metric_name(self.name):  # it travels in eval reports (wire-format 12)
            raise ConfigError(f"Metric.name: {self.name!r} must be {METRIC_NAME_RULE}")
        if self.goal is not None and not math.isfinite(self.goal):
            raise ConfigError(f"Metric.goal: {self.goal!r} must be a finite number or None")

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def reached(self, value: float, goal: float) -> bool:
        """Whether ``value`` is at least as good as ``goal``."""
        return value >= goal if self.higher_is_better else value <= goal


@dataclass(frozen=True, kw_only=True)
class DeviceData:
    """A device's own examples: what it trains on, and what it evaluates on (never sent).

    ``held_out`` may be empty: the device then sends no evaluation reports.
    """

    train: Dataset[Any]
    held_out: Dataset[Any]


@dataclass(frozen=True, kw_only=True)
class Task:
    """One workload.

    ``model`` builds a fresh ``nn.Module``; every process builds the same one (fedmq seeds
    torch first). ``load_data`` reads a device's own files (``--data``). ``evaluate``
    returns named metrics, one of them ``target``; fedmq calls it in eval mode under
    ``torch.no_grad()``. ``training``: the default loop's settings; ``train``: a function
    that replaces the default loop. ``central_data`` (optional): the aggregator's held-out
    set, read from ``--data`` of the aggregator. ``fleet`` (optional): every device's data
    for a simulated fleet on one machine (``fedmq demo`` / ``bench``), as
    ``fleet(data_dir, devices, seed)``; ``devices`` 0 asks for the task's own fleet size.
    """

    name: str
    model: Callable[[], nn.Module]
    load_data: Callable[[Path], DeviceData]
    evaluate: Callable[[nn.Module, Dataset[Any]], Mapping[str, float]]
    target: Metric
    training: Training = field(default_factory=Training)
    train: TrainFn | None = None
    central_data: Callable[[Path], Dataset[Any]] | None = None
    fleet: Callable[[Path, int, int], Sequence[DeviceData]] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("Task.name: must not be empty")
        for piece in ("model", "load_data", "evaluate"):
            if not callable(getattr(self, piece)):
                raise ConfigError(f"Task.{piece}: must be callable")
        for piece in ("train", "central_data", "fleet"):
            if getattr(self, piece) is not None and not callable(getattr(self, piece)):
                raise ConfigError(f"Task.{piece}: must be callable or None")
        if not isinstance(self.target, Metric):
            raise ConfigError("Task.target: must be a fedmq.tasks.Metric")
        if not isinstance(self.training, Training):
            raise ConfigError("Task.training: must be a fedmq.tasks.Training")

    def build_model(self, seed: int = 0) -> nn.Module:
        """A fresh model: ``torch.manual_seed(seed)``, then ``model()``.

        The same seed gives the same weights in every process (this reseeds torch's
        global generator).
        """
        torch.manual_seed(seed)
        model = self.model()
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"task {self.name!r}: model() returned a {type(model).__name__},"
                " not a torch.nn.Module"
            )
        return model

    def train_model(self, model: nn.Module, data: Dataset[Any], *, seed: int) -> float:
        """One local training of ``model`` on ``data``: the task's function or the default."""
        train = self.train or train_local
        return float(train(model, data, self.training, seed))

    @torch.no_grad()
    def score(self, model: nn.Module, data: Dataset[Any]) -> dict[str, float]:
        """``evaluate`` in eval mode (the mode is restored), checked: the target is there,
        every name is a valid metric name and every value a finite number."""
        was_training = model.training
        model.eval()
        try:
            metrics = dict(self.evaluate(model, data))
        finally:
            model.train(was_training)
        if self.target.name not in metrics:
            raise DataError(
                f"task {self.name!r}: evaluate() gave no {self.target.name!r}"
                f" (the target); it gave {', '.join(sorted(metrics)) or 'nothing'}"
            )
        for name, value in metrics.items():
            if not is_metric_name(name):
                raise DataError(f"task {self.name!r}: metric {name!r} must be {METRIC_NAME_RULE}")
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise DataError(f"task {self.name!r}: metric {name!r} = {value!r} is not finite")
        return {name: float(value) for name, value in metrics.items()}

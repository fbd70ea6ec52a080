"""What a task gives fedmq: a model, a device's own data, local training, named metrics.

A task is one Python object, written by a user in their own file, in terms a torch user
already knows; fedmq never needs editing to run it::

    task = Task(
        name="my-sensors",
        model=lambda: MyNet(),                      # any torch.nn.Module
        load_data=read_my_csv,                      # path -> DeviceData (train, held-out)
        evaluate=my_metrics,                        # (model, dataset) -> {"rmse": ..., ...}
        target=Metric("rmse", higher_is_better=False),
    )

``load_task`` (_load.py) finds it from ``--task``: ``file.py:obj``, ``package.module:obj``
or the name of an installed plugin (entry point group ``fedmq.tasks``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from fedmq.errors import ConfigError
from fedmq.wire import METRIC_NAME_RULE, is_metric_name

__all__ = ["DeviceData", "Metric", "Task"]


@dataclass(frozen=True)
class Metric:
    """A named metric and its direction: accuracy up, RMSE down."""

    name: str
    higher_is_better: bool

    def __post_init__(self) -> None:
        if not is_metric_name(self.name):  # it travels in eval reports (wire-format 12)
            raise ConfigError(f"Metric.name: {self.name!r} must be {METRIC_NAME_RULE}")

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b


@dataclass(frozen=True, kw_only=True)
class DeviceData:
    """A device's own examples: what it trains on, and what it evaluates on (never sent)."""

    train: Dataset[object]
    held_out: Dataset[object]


@dataclass(frozen=True, kw_only=True)
class Task:
    """One workload. ``model`` builds a fresh ``nn.Module`` (the same one on every process);
    ``load_data`` reads a device's own files; ``evaluate`` returns named metrics, one of
    them ``target``; ``central_data`` (optional) is a held-out set for the aggregator."""

    name: str
    model: Callable[[], nn.Module]
    load_data: Callable[[Path], DeviceData]
    evaluate: Callable[[nn.Module, Dataset[object]], Mapping[str, float]]
    target: Metric
    central_data: Callable[[], Dataset[object]] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("Task.name: must not be empty")
        for piece in ("model", "load_data", "evaluate"):
            if not callable(getattr(self, piece)):
                raise ConfigError(f"Task.{piece}: must be callable")
        if not isinstance(self.target, Metric):
            raise ConfigError("Task.target: must be a fedmq.tasks.Metric")

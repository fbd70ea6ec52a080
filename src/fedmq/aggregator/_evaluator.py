"""Central evaluation of the global model on the aggregator's own held-out set
(synchronous; the service runs it in a worker thread)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from fedmq.models import set_params
from fedmq.tasks import Task

__all__ = ["Evaluator"]


class Evaluator:
    """Scores parameter sets on ``data`` with ``task``'s metrics, with one reusable model.

    Not thread-safe: the service runs at most one evaluation at a time.
    """

    def __init__(self, task: Task, data: Dataset[Any]) -> None:
        self._task = task
        self._model = task.build_model()
        self._data = data

    def __call__(self, params: Mapping[str, np.ndarray]) -> dict[str, float]:
        """The task's metrics of ``params`` on the held-out set."""
        set_params(self._model, params)
        return self._task.score(self._model, self._data)

"""Held-out evaluation of the global model (synchronous; the service runs it in a thread)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedmq.models import build_model, evaluate, set_params

__all__ = ["Evaluator"]


class Evaluator:
    """Scores parameter sets on a fixed test set with one reusable model instance.

    Not thread-safe: the service runs at most one evaluation at a time.
    """

    def __init__(self, model_name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        self._model = build_model(model_name)  # type: ignore[arg-type]
        self._x = x  # [n, 1, 28, 28] normalised
        self._y = y  # [n]

    def __call__(self, params: Mapping[str, np.ndarray]) -> tuple[float, float]:
        """(accuracy, mean loss) of ``params`` on the test set."""
        set_params(self._model, params)
        return evaluate(self._model, self._x, self._y)

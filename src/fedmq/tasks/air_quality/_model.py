"""A small GRU forecaster: 24 hours of features in, PM2.5 ``horizon`` hours later out."""

from __future__ import annotations

import torch
from torch import nn

from fedmq.tasks.air_quality._window import FEATURE_NAMES

__all__ = ["DEFAULT_HIDDEN", "GruForecaster", "build_model"]

DEFAULT_HIDDEN = 32


class GruForecaster(nn.Module):
    """GRU(n_features -> hidden) over the window, then Linear(hidden -> 1) on its last state.

    The output is added to the last hour's normalised PM2.5 (input column 0, the
    same units as the target): the network learns the change from now, so an
    untrained model starts near the persistence forecast instead of near the mean.
    With the default 22 features and 32 hidden units: 5,409 float32 parameters,
    no buffers.
    """

    def __init__(self, n_features: int = len(FEATURE_NAMES), hidden: int = DEFAULT_HIDDEN) -> None:
        super().__init__()
        self.gru = nn.GRU(n_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)  # [B, L, F] -> [B, L, H]
        change = self.head(out[:, -1]).squeeze(1)  # [B, H] -> [B]
        forecast: torch.Tensor = x[:, -1, 0] + change  # [B], normalised PM2.5
        return forecast


def build_model(*, seed: int = 0, hidden: int = DEFAULT_HIDDEN) -> GruForecaster:
    """A fresh model with PyTorch's default initialisation drawn from ``seed``.

    Uses a local generator state (``torch.random.fork_rng``), so the global one is untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GruForecaster(hidden=hidden)

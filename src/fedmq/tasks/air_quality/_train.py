"""One training loop (Adam on the mean squared error), shared by every way of training.

``train_epochs`` is what a device runs on its own windows, locally or in a
federated round; ``fit`` repeats it one epoch at a time with early stopping on
a validation set (local-only and centralised references).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fedmq.errors import ConfigError, DataError
from fedmq.models import check_training

__all__ = ["FitResult", "fit", "predict", "train_epochs", "validation_loss"]


def train_epochs(
    model: nn.Module,
    dataset: TensorDataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> float:
    """Train ``model`` in place: ``epochs`` passes of Adam (fresh state) on the MSE.

    The order of the examples comes from a ``torch.Generator`` seeded with
    ``seed``, so the result depends only on the arguments. Returns the
    example-weighted mean loss of the last epoch, measured on each batch before
    its step.
    """
    check_training(epochs=epochs, batch_size=batch_size, lr=lr)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loss = float("nan")
    for _ in range(epochs):
        loss = _epoch(model, dataset, optimizer, generator, batch_size)
    return loss


@dataclass(frozen=True, kw_only=True)
class FitResult:
    """What ``fit`` did: epochs run, the best one (1-based), its validation MSE, seconds."""

    epochs: int
    best_epoch: int
    best_val_loss: float
    seconds: float


def fit(
    model: nn.Module,
    train: TensorDataset,
    val: TensorDataset,
    *,
    max_epochs: int,
    patience: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> FitResult:
    """Train with early stopping: stop after ``patience`` epochs without a better
    validation MSE, and leave ``model`` with the weights of its best epoch.

    The same loop as ``train_epochs`` (one Adam state across all epochs).
    """
    check_training(epochs=max_epochs, batch_size=batch_size, lr=lr)
    if patience < 1:
        raise ConfigError(f"patience: must be >= 1, got {patience}")
    started = time.perf_counter()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    best_loss, best_epoch = validation_loss(model, val), 0
    best_state = copy.deepcopy(model.state_dict())
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        _epoch(model, train, optimizer, generator, batch_size)
        loss = validation_loss(model, val)
        if loss < best_loss:
            best_loss, best_epoch = loss, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    return FitResult(
        epochs=epoch,
        best_epoch=best_epoch,
        best_val_loss=best_loss,
        seconds=time.perf_counter() - started,
    )


@torch.no_grad()
def predict(model: nn.Module, dataset: TensorDataset, *, batch_size: int = 4096) -> torch.Tensor:
    """The model's outputs [n] on the inputs of ``dataset``, in eval mode (mode restored)."""
    x = dataset.tensors[0]
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def validation_loss(model: nn.Module, dataset: TensorDataset) -> float:
    """Mean squared error of ``model`` on ``dataset`` (normalised units)."""
    _size(dataset)
    return float(F.mse_loss(predict(model, dataset), dataset.tensors[1]).item())


def _epoch(
    model: nn.Module,
    dataset: TensorDataset,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    batch_size: int,
) -> float:
    x, y = dataset.tensors  # [n, L, F], [n]
    n = _size(dataset)
    model.train()
    order = torch.randperm(n, generator=generator)
    loss_sum = 0.0
    for start in range(0, n, batch_size):
        batch = order[start : start + batch_size]
        loss = F.mse_loss(model(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        optimizer.step()
        loss_sum += loss.item() * len(batch)
    return loss_sum / n


def _size(dataset: TensorDataset) -> int:
    if len(dataset.tensors) != 2:
        raise DataError(f"expected a dataset of (x, y), got {len(dataset.tensors)} tensors")
    n = len(dataset.tensors[0])
    if n == 0:
        raise DataError("no examples: cannot train or evaluate on an empty set")
    return n

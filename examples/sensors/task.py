"""My weather stations, federated: forecast next hour's temperature at each station.

Each device is one station with its own CSV of hourly readings (the Beijing multi-site
air-quality files: ``PRSA_Data_<Station>_20130301-20170228.csv``, or ``.csv.gz``). It
keeps the last few months, turns them into windows of the last ``HOURS`` hours of four
columns, normalises them with its own training statistics, and holds out the most recent
part (chronologically) to score the fleet's model. The model is a small 1-D convolution
with BatchNorm; training is my own loop (Huber loss, cosine learning rate, gradient
clipping).

Run it (docs/tasks.md)::

    fedmq aggregator --task examples/sensors/task.py:task --broker mqtt://localhost:1883
    fedmq participant --task examples/sensors/task.py:task --broker mqtt://localhost:1883 \
        --id dongsi --data .../PRSA_Data_Dongsi_20130301-20170228.csv.gz
"""

from __future__ import annotations

import csv
import gzip
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedmq.tasks import DeviceData, Metric, Task, Training

COLUMNS = ("TEMP", "DEWP", "PRES", "WSPM")  # the readings used, TEMP (the target) first
HOURS = 12  # each example: the last 12 hours of readings ...
MONTHS = 6  # ... from the last 6 months of the file (~4,300 hours)
HELD_OUT = 0.2  # the most recent 20% of windows: never trained on, used to score


class Windows(TensorDataset):
    """(readings [HOURS, len(COLUMNS)], next hour's temperature), both normalised.

    ``degrees``: one normalised unit of temperature in °C, to report errors in °C.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, degrees: float) -> None:
        super().__init__(x, y)
        self.degrees = degrees


def read_readings(path: Path) -> np.ndarray:
    """The file's rows as [hours, len(COLUMNS)] float64, NaN where a reading is missing."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="") as file:
        rows = [
            [math.nan if row[c] in ("NA", "") else float(row[c]) for c in COLUMNS]
            for row in csv.DictReader(file)
        ]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return np.asarray(rows, dtype=np.float64)


def load_data(path: Path) -> DeviceData:
    """One station's windows: train on the older 80%, hold out the newest 20%."""
    readings = read_readings(path)[-MONTHS * 30 * 24 :]  # [T, C]
    split = int(len(readings) * (1 - HELD_OUT))
    train, held_out = readings[:split], readings[split:]
    # My own normalisation, from my training part only (nothing from the held-out hours).
    mean, std = np.nanmean(train, axis=0), np.nanstd(train, axis=0) + 1e-6
    return DeviceData(
        train=windows((train - mean) / std, degrees=float(std[0])),
        held_out=windows((held_out - mean) / std, degrees=float(std[0])),
    )


def windows(readings: np.ndarray, *, degrees: float) -> Windows:
    """Every complete window: HOURS hours of readings -> the temperature one hour later."""
    steps = len(readings) - HOURS
    x = np.stack([readings[i : i + HOURS] for i in range(steps)])  # [N, HOURS, C]
    y = readings[HOURS:, 0]  # [N]: TEMP of the next hour
    complete = ~np.isnan(x).any(axis=(1, 2)) & ~np.isnan(y)  # skip windows with a gap
    return Windows(
        torch.tensor(x[complete], dtype=torch.float32),
        torch.tensor(y[complete], dtype=torch.float32),
        degrees,
    )


class ConvForecaster(nn.Module):
    """Conv1d -> BatchNorm -> ReLU, twice, over the hours; then a linear head."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(len(COLUMNS), channels, kernel_size=3, padding=1),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, padding=1),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
        )
        self.head = nn.Linear(channels * HOURS, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x.transpose(1, 2))  # [B, HOURS, C] -> [B, C, HOURS] -> [B, ch, HOURS]
        out: torch.Tensor = self.head(h.flatten(1)).squeeze(1)  # [B, ch * HOURS] -> [B]
        return out


def train(model: nn.Module, data: Dataset[Any], training: Training, seed: int) -> float:
    """My local training: Adam, a cosine learning rate, Huber loss, clipped gradients.

    Returns the mean loss of the last epoch (fedmq sends it with the update).
    """
    assert isinstance(data, Windows)
    x, y = data.tensors
    generator = torch.Generator().manual_seed(seed)
    batches = math.ceil(len(y) / training.batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=training.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, training.epochs * batches)
    model.train()
    for _ in range(training.epochs):
        total = 0.0
        for batch in torch.randperm(len(y), generator=generator).split(training.batch_size):
            loss = F.huber_loss(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
    return total / len(y)


def evaluate(model: nn.Module, data: Dataset[Any]) -> dict[str, float]:
    """RMSE and MAE of the forecast, in °C (fedmq calls this in eval mode, no grad)."""
    assert isinstance(data, Windows)
    x, y = data.tensors
    error = (model(x) - y) * data.degrees
    return {"rmse": error.pow(2).mean().sqrt().item(), "mae": error.abs().mean().item()}


def fleet(data_dir: Path, devices: int, seed: int) -> list[DeviceData]:
    """For `fedmq demo` / `fedmq bench` on one machine: one device per station file
    found under ``data_dir`` (``devices`` of them; 0: all)."""
    files = sorted(data_dir.glob("**/PRSA_Data_*.csv*"))
    if not files or devices > len(files):
        raise ValueError(f"{data_dir}: {len(files)} station files, {devices} devices asked")
    return [load_data(path) for path in files[: devices or len(files)]]


task = Task(
    name="sensors",
    model=ConvForecaster,
    load_data=load_data,
    evaluate=evaluate,
    target=Metric("rmse", higher_is_better=False, goal=1.2),  # °C: `fedmq demo` stops there
    training=Training(epochs=1, batch_size=64, lr=3e-3),
    train=train,
    fleet=fleet,
)

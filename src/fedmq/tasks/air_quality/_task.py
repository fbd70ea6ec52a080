"""The built-in ``air-quality`` task: PM2.5 ``horizon`` hours ahead at a Beijing station.

One device per monitoring station, holding only its own file: a participant's
``--data`` is one ``PRSA_Data_<Station>_<dates>.csv`` (or ``.csv.gz``); a simulated
fleet's ``data_dir`` is the folder that holds ``beijing-air-quality/``. A simulated
fleet of more than 12 devices splits each station over many "sensors" (contiguous
blocks of its train windows; the station's normalisation; its validation year with its
first sensor): _sensors.py says how and why.

What a device holds (the chronological split of ``ChronoSplit``):

* ``train``: its train windows (the first two years);
* ``held_out``: its validation windows (the third year). This is what devices score the
  global model on, so it is what stop rules and "best model" read;
* the test windows (the fourth year) are in neither: nothing that steers a run ever
  sees them. A benchmark scores the final global model on them with ``load_test_data``.

Both parts are ``StationWindows``: a ``TensorDataset`` of ``x`` [n, 24, 22] and ``y`` [n]
(normalised), carrying what ``score`` needs to answer in µg/m³: the station's
normalisation and the observed targets. ``score`` gives ``rmse``, ``mae`` and ``mse``
(µg/m³; ``mse`` so that the example-weighted mean over devices pools exactly:
the square root of the weighted mean MSE is the RMSE of all their windows together).

Normalisation: per station. Each device normalises with the mean and std of its own
train part (``SufficientStats`` of its file); nothing leaves the device. Fleet
statistics (``combine`` of every station's) would need a protocol to exchange them
before training, which a live fleet does not have, and they hardly help. Measured on
the 12 stations (mean over stations of the test RMSE, µg/m³; persistence 54.57,
local-only 49.23, centralised with fleet statistics 49.15): centralised with
per-station statistics 49.47; FedAvg (every station trains one local round from the
global model, example-weighted mean) 49.36 after 2 rounds and 49.27 after 4 with
per-station statistics, 49.35 and 49.18 with fleet statistics.

Training: fedmq's default loop (``fedmq.models.train_local``): one epoch of Adam
(lr 1e-3, fresh state each time) on batches of 64, mean squared error; 1.4 to 1.9 s
per local training (~17,000 windows) on one CPU thread. With it, FedAvg's validation
RMSE (the example-weighted mean over stations that federated evaluation reports) is
50.30 after one round, 49.28 after two, 48.79 after four, then rises: the later years
differ from the training years, and more epochs fit the training years more closely
(lr 3e-4 gets there too, in about twice as many rounds). ``TARGET.goal`` is 50.0.

The model: ``GruForecaster`` (5,409 parameters with the default 32 hidden units).
The aggregator holds no data (``central_data`` is None): federated evaluation on the
devices' own validation windows is the point of this task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedmq.errors import ConfigError, DataError
from fedmq.models import Training
from fedmq.tasks._task import DeviceData, Metric, Task
from fedmq.tasks.air_quality._data import DEFAULT_SPLIT, ChronoSplit
from fedmq.tasks.air_quality._metrics import evaluate
from fedmq.tasks.air_quality._model import DEFAULT_HIDDEN, GruForecaster
from fedmq.tasks.air_quality._normalize import NormStats
from fedmq.tasks.air_quality._sensors import sensor_counts, sensor_windows
from fedmq.tasks.air_quality._window import DEFAULT_HORIZON, StationData, Windows, load_station
from fedmq.wire import PARTICIPANT_ID_RULE, is_participant_id

__all__ = [
    "DATA_FOLDER",
    "TARGET",
    "TRAINING",
    "AirQualitySettings",
    "StationWindows",
    "load_data",
    "load_test_data",
    "make_task",
    "score",
    "stations",
    "task",
]

TARGET = Metric("rmse", higher_is_better=False, goal=50.0)
"""Validation RMSE in µg/m³; the goal is 4 below persistence's 54.3, which synchronous
FedAvg passes in its second round (module docstring)."""
TRAINING = Training(epochs=1, batch_size=64, lr=1e-3, optimizer="adam", loss=F.mse_loss)
"""One local training: ~265 Adam steps, 1.4 to 1.9 s on one CPU thread."""
DATA_FOLDER = "beijing-air-quality"
_PREFIX = "PRSA_Data_"


@dataclass(frozen=True, kw_only=True)
class AirQualitySettings:
    """The forecast, the model's size, the split and the local training.

    ``horizon``: hours ahead (the target is PM2.5 ``horizon`` hours after the last input
    hour); ``hidden``: the GRU's hidden units.
    """

    horizon: int = DEFAULT_HORIZON
    hidden: int = DEFAULT_HIDDEN
    split: ChronoSplit = DEFAULT_SPLIT
    training: Training = TRAINING

    def __post_init__(self) -> None:
        if self.horizon < 1:
            raise ConfigError(f"horizon: must be >= 1 hour, got {self.horizon}")
        if self.hidden < 1:
            raise ConfigError(f"hidden: must be >= 1, got {self.hidden}")
        if not isinstance(self.split, ChronoSplit):
            raise ConfigError("split: must be a ChronoSplit")
        if not isinstance(self.training, Training):
            raise ConfigError("training: must be a fedmq.tasks.Training")


class StationWindows(TensorDataset):
    """One part of one station's windows: ``(x, y)`` examples, normalised, plus what
    scoring them in µg/m³ needs (``windows.target``, ``windows.persistence``, ``stats``).
    """

    def __init__(self, station: str, windows: Windows, stats: NormStats) -> None:
        super().__init__(*windows.data.tensors)
        self.station = station
        self.windows = windows
        self.stats = stats


def stations(data_dir: Path) -> list[tuple[str, Path]]:
    """``(station, file)`` of every station file under ``data_dir/beijing-air-quality``,
    sorted by station name. The name (``Aotizhongxin``...) is also a valid participant id.
    """
    folder = Path(data_dir) / DATA_FOLDER
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (the air-quality station files)")
    found: dict[str, Path] = {}
    for path in sorted(folder.glob(f"**/{_PREFIX}*.csv*")):
        if not path.name.endswith((".csv", ".csv.gz")):
            continue
        name = path.name.removeprefix(_PREFIX).split("_")[0].split(".")[0]
        if not is_participant_id(name):
            raise DataError(f"{path}: station name {name!r} must be {PARTICIPANT_ID_RULE}")
        if name in found:
            raise DataError(f"{path}: a second file for station {name} (first {found[name]})")
        found[name] = path
    if not found:
        raise DataError(f"{folder}: no {_PREFIX}<station>_*.csv(.gz) file")
    return sorted(found.items())


def load_data(path: Path, settings: AirQualitySettings | None = None) -> DeviceData:
    """A device's data from its own station file: train windows, validation held out."""
    data = _station(path, settings or AirQualitySettings())
    return DeviceData(
        train=StationWindows(data.station, data.train, data.stats),
        held_out=StationWindows(data.station, data.val, data.stats),
    )


def load_test_data(path: Path, settings: AirQualitySettings | None = None) -> StationWindows:
    """The test windows (the fourth year) of a station file, for a final report only."""
    data = _station(path, settings or AirQualitySettings())
    return StationWindows(data.station, data.test, data.stats)


def score(model: nn.Module, data: Dataset[Any]) -> Mapping[str, float]:
    """RMSE, MAE and MSE (µg/m³) of ``model`` on a ``StationWindows``."""
    if not isinstance(data, StationWindows):
        raise DataError(
            "air-quality: expected StationWindows (from load_data or load_test_data),"
            f" got {type(data).__name__}"
        )
    if len(data) == 0:
        raise DataError(f"air-quality: station {data.station} has no windows to score")
    metrics = evaluate(model, data.windows, data.stats)
    return {"rmse": metrics.rmse, "mae": metrics.mae, "mse": metrics.mse}


def make_task(settings: AirQualitySettings | None = None) -> Task:
    """The ``air-quality`` task with ``settings`` (see the module docstring)."""
    s = settings or AirQualitySettings()

    def fleet(data_dir: Path, devices: int, seed: int) -> Sequence[DeviceData]:
        del seed  # the data and its split are fixed: nothing is drawn at random
        found = stations(data_dir)
        if devices < 0:
            raise ConfigError(
                f"devices: one device per station (1..{len(found)}, 0: all) or more,"
                f" split into sensors; got {devices}"
            )
        if devices <= len(found):
            return [load_data(path, s) for _, path in found[: devices or len(found)]]
        fleet: list[DeviceData] = []
        for (_, path), count in zip(found, sensor_counts(len(found), devices), strict=True):
            data = _station(path, s)
            fleet.extend(
                DeviceData(
                    train=StationWindows(data.station, train, data.stats),
                    held_out=StationWindows(data.station, held_out, data.stats),
                )
                for train, held_out in sensor_windows(data, count)
            )
        return fleet

    return Task(
        name="air-quality",
        model=partial(GruForecaster, hidden=s.hidden),
        load_data=partial(load_data, settings=s),
        evaluate=score,
        target=TARGET,
        training=s.training,
        fleet=fleet,
    )


def _station(path: Path, s: AirQualitySettings) -> StationData:
    if Path(path).is_dir():
        raise DataError(f"{path}: is a folder; give one station's PRSA_Data_*.csv(.gz) file")
    return load_station(path, horizon=s.horizon, split=s.split)


task = make_task()
"""The task with the default settings (``--task air-quality``)."""

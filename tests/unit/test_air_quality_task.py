"""The built-in ``air-quality`` task on the real station files: a device's data, scoring
in µg/m³, one local training, the simulated fleet and the one-line errors."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedmq.errors import ConfigError, DataError
from fedmq.tasks import DeviceData, load_task
from fedmq.tasks.air_quality import (
    FEATURE_NAMES,
    LOOKBACK,
    AirQualitySettings,
    GruForecaster,
    StationWindows,
    evaluate,
    load_data,
    load_test_data,
    persistence,
    stations,
    task,
)
from fedmq.tasks.air_quality._train import validation_loss
from fedmq.wire import is_participant_id


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GRU steps: more threads only wait on each other
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def station_file(data_dir: Path) -> Path:
    return stations(data_dir)[0][1]


@pytest.fixture(scope="module")
def device(station_file: Path) -> DeviceData:
    return task.load_data(station_file)


class Persistence(nn.Module):
    """Forecasts the last input hour's (normalised) PM2.5: the persistence forecast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1, 0]


def test_the_task_loads_by_name_and_builds_the_gru() -> None:
    loaded = load_task("fedmq.tasks.air_quality:task")
    assert loaded is task and task.name == "air-quality"
    assert task.target.name == "rmse" and task.target.better(48.0, 49.0)
    assert task.central_data is None and task.train is None  # the default loop
    model = task.build_model(seed=3)
    assert isinstance(model, GruForecaster)
    assert sum(p.numel() for p in model.parameters()) == 5409
    again = task.build_model(seed=3).parameters()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again, strict=True))


def test_a_device_trains_on_its_train_windows_and_holds_out_validation(
    device: DeviceData, station_file: Path
) -> None:
    train, held_out = device.train, device.held_out
    assert isinstance(train, StationWindows) and isinstance(held_out, StationWindows)
    assert train.station == held_out.station == "Aotizhongxin"
    x, y = train.tensors
    assert x.shape == (len(train), LOOKBACK, len(FEATURE_NAMES)) and y.shape == (len(train),)
    assert x.dtype == y.dtype == torch.float32 and len(train) > 16_000
    assert abs(float(y.mean())) < 0.1  # normalised with the station's own train statistics
    val_start, test_start = np.datetime64("2015-03-01T00"), np.datetime64("2016-03-01T00")
    assert train.windows.end_time.max() < val_start
    assert held_out.windows.end_time.min() >= val_start
    assert held_out.windows.end_time.max() < test_start
    test = load_test_data(station_file)
    assert test.windows.end_time.min() >= test_start  # never held out: for a final report
    np.testing.assert_array_equal(test.stats.mean, train.stats.mean)


def test_scoring_is_in_micrograms_and_matches_the_air_quality_metrics(
    device: DeviceData,
) -> None:
    held_out = device.held_out
    assert isinstance(held_out, StationWindows)
    metrics = task.score(Persistence(), held_out)
    expected = persistence(held_out.windows)
    assert metrics["rmse"] == pytest.approx(expected.rmse, rel=1e-5)
    assert metrics["mae"] == pytest.approx(expected.mae, rel=1e-5)
    assert metrics["mse"] == pytest.approx(metrics["rmse"] ** 2)
    assert 40 < metrics["rmse"] < 70  # µg/m³, not normalised units
    gru = task.build_model(seed=0)
    assert task.score(gru, held_out)["rmse"] == evaluate(gru, held_out.windows, held_out.stats).rmse


def test_a_local_training_lowers_the_loss(device: DeviceData) -> None:
    train = device.train
    assert isinstance(train, StationWindows)
    x, y = train.tensors
    some = TensorDataset(x[:3000], y[:3000])  # a small slice keeps the test fast
    model = task.build_model(seed=0)
    before = validation_loss(model, some)
    loss = task.train_model(model, some, seed=0)
    assert math.isfinite(loss) and validation_loss(model, some) < before


def test_the_fleet_is_one_device_per_station_in_name_order(data_dir: Path) -> None:
    found = stations(data_dir)
    names = [name for name, _ in found]
    assert len(found) == 12 and names == sorted(names) and names[0] == "Aotizhongxin"
    assert all(is_participant_id(name) for name in names)
    assert task.fleet is not None
    fleet = task.fleet(data_dir, 2, 0)  # the first two; all 12 take ~8 s to read
    assert [d.train.station for d in fleet] == names[:2]  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"^devices: .* \(1\.\.12, 0: all\) .* got -1$"):
        task.fleet(data_dir, -1, 0)  # 13 and more: sensors (test_air_quality_sensors.py)


def test_missing_data_is_one_line_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "PRSA_Data_Nowhere_20130301-20170228.csv"
    for path in (missing, tmp_path):
        with pytest.raises(DataError) as caught:
            task.load_data(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    missing.write_bytes(b"\x1f\x8b not gzip")
    broken = missing.with_suffix(".csv.gz")
    missing.rename(broken)
    with pytest.raises(DataError, match="cannot read"):
        load_data(broken)
    with pytest.raises(DataError, match="beijing-air-quality: no such folder"):
        stations(tmp_path)


def test_scoring_needs_station_windows_and_settings_are_checked() -> None:
    with pytest.raises(DataError, match="expected StationWindows"):
        task.score(Persistence(), TensorDataset(torch.zeros(2, 24, 22), torch.zeros(2)))
    with pytest.raises(ConfigError, match=r"^horizon: "):
        AirQualitySettings(horizon=0)
    with pytest.raises(ConfigError, match=r"^hidden: "):
        AirQualitySettings(hidden=0)

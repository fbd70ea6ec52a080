"""The air-quality task's large fleet: more devices than stations split each station's
train windows over sensors (contiguous time blocks), with the station's normalisation
and its validation year kept whole with its first sensor.

Fast: three stations' first 2,000 hours (real readings, written to a temporary folder),
with a split whose validation part is a fortnight."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmq.errors import ConfigError
from fedmq.tasks.air_quality import (
    AirQualitySettings,
    ChronoSplit,
    StationWindows,
    make_task,
    stations,
)
from fedmq.tasks.air_quality._sensors import sensor_counts

_HOURS = 2000  # 2013-03-01 to 2013-05-23
_SPLIT = ChronoSplit(val_start="2013-05-01", test_start="2013-05-15")


@pytest.fixture(scope="module")
def small_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first ``_HOURS`` rows of the first three real station files."""
    out = tmp_path_factory.mktemp("aq") / "beijing-air-quality"
    out.mkdir()
    for _, path in stations(data_dir)[:3]:
        with gzip.open(path, "rt", newline="") as source:
            head = "".join(itertools.islice(source, _HOURS + 1))  # the header, then rows
        (out / path.name.removesuffix(".gz")).write_text(head, newline="")
    return out.parent


def test_sensor_counts_spread_devices_over_stations() -> None:
    assert sensor_counts(12, 1000) == [84] * 4 + [83] * 8
    assert sum(sensor_counts(12, 10_000)) == 10_000
    with pytest.raises(ConfigError, match=r"^devices: 2 sensors over 3 stations"):
        sensor_counts(3, 2)


def test_more_devices_than_stations_split_each_station_into_time_blocks(
    small_dir: Path,
) -> None:
    task = make_task(AirQualitySettings(split=_SPLIT))
    assert task.fleet is not None
    whole = task.fleet(small_dir, 0, 0)  # one device per station, as before
    assert len(whole) == 3
    fleet = task.fleet(small_dir, 8, 0)  # 3 + 3 + 2 sensors
    assert len(fleet) == 8
    at = 0
    for station, count in zip(whole, (3, 3, 2), strict=True):
        sensors = fleet[at : at + count]
        at += count
        train, val = station.train, station.held_out
        assert isinstance(train, StationWindows) and isinstance(val, StationWindows)
        parts = [s.train for s in sensors]
        assert all(isinstance(p, StationWindows) for p in parts)
        # contiguous blocks, in time order, of sizes differing by at most one, covering all
        sizes = [len(p) for p in parts]  # type: ignore[arg-type]
        assert sum(sizes) == len(train) and max(sizes) - min(sizes) <= 1
        x = torch.cat([p.tensors[0] for p in parts])  # type: ignore[attr-defined]
        assert torch.equal(x, train.tensors[0])
        ends = np.concatenate([p.windows.end_time for p in parts])  # type: ignore[attr-defined]
        assert (np.diff(ends.astype(np.int64)) > 0).all()
        for p in parts:
            assert isinstance(p, StationWindows)
            assert p.station == train.station  # and the station's normalisation:
            assert np.array_equal(p.stats.mean, train.stats.mean)
            assert np.array_equal(p.stats.std, train.stats.std)
        # the validation windows stay whole with the first sensor
        first, *rest = (s.held_out for s in sensors)
        assert isinstance(first, StationWindows) and len(first) == len(val) > 0
        assert torch.equal(first.tensors[1], val.tensors[1])
        assert all(len(h) == 0 for h in rest)  # type: ignore[arg-type]


def test_a_fleet_scores_the_same_as_the_stations(small_dir: Path) -> None:
    task = make_task(AirQualitySettings(split=_SPLIT))
    assert task.fleet is not None
    model = task.build_model(seed=0)
    whole = [task.score(model, d.held_out) for d in task.fleet(small_dir, 0, 0)]
    split = [
        task.score(model, d.held_out)
        for d in task.fleet(small_dir, 30, 0)
        if len(d.held_out)  # type: ignore[arg-type]
    ]
    assert split == whole


def test_too_many_sensors_or_a_negative_fleet_is_one_line(small_dir: Path) -> None:
    task = make_task(AirQualitySettings(split=_SPLIT))
    assert task.fleet is not None
    with pytest.raises(ConfigError, match=r"^devices: station \w+ has \d+ train windows"):
        task.fleet(small_dir, 3 * 5000, 0)
    with pytest.raises(ConfigError, match=r"^devices: .* got -1$"):
        task.fleet(small_dir, -1, 0)

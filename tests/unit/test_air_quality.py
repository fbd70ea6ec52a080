"""The air-quality task: reading, windows, chronological split, missing values,
normalisation without raw data leaving a device, the model and its training loop.

Uses the real Aotizhongxin station file (hand-checked rows quoted below) and
small synthetic files written to ``tmp_path``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedmq.errors import DataError
from fedmq.tasks.air_quality import (
    DEFAULT_SPLIT,
    FEATURE_NAMES,
    LOOKBACK,
    ChronoSplit,
    Metrics,
    NormStats,
    StationData,
    StationSeries,
    SufficientStats,
    build_model,
    combine,
    evaluate,
    fit,
    load_station,
    persistence,
    read_station,
    station_stats,
    train_epochs,
)
from fedmq.tasks.air_quality._train import validation_loss
from fedmq.tasks.air_quality._window import forward_fill

H = np.timedelta64(1, "h")
HEADER = (
    '"No","year","month","day","hour","PM2.5","PM10","SO2","NO2","CO","O3",'
    '"TEMP","PRES","DEWP","RAIN","wd","WSPM","station"'
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # GRU steps are tiny: on a shared machine, two torch threads wait on each other
    # (measured ~8x slower than one under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def station_file(data_dir: Path) -> Path:
    path = (
        data_dir
        / "beijing-air-quality"
        / "PRSA_Data_20130301-20170228"
        / "PRSA_Data_Aotizhongxin_20130301-20170228.csv.gz"
    )
    if not path.is_file():
        pytest.fail(f"{path} not found; set FEDMQ_DATA_DIR")
    return path


@pytest.fixture(scope="module")
def series(station_file: Path) -> StationSeries:
    return read_station(station_file)


@pytest.fixture(scope="module")
def station(series: StationSeries) -> StationData:
    return load_station(series, horizon=6)


def _row(no: int, stamp: str, pm: str, wd: str) -> str:
    y, mo, d, h = stamp[:4], stamp[5:7], stamp[8:10], stamp[11:13]
    readings = "10,5,20,500,50,1.5,1010,-5,0"
    return f'{no},{int(y)},{int(mo)},{int(d)},{int(h)},{pm},{readings},"{wd}",2,"Tiny"'


def _tiny_csv(path: Path, pm: list[str], wd: list[str]) -> Path:
    start = np.datetime64("2013-03-01T00", "h")
    lines = [HEADER]
    for i, (p, w) in enumerate(zip(pm, wd, strict=True)):
        lines.append(_row(i + 1, str(start + i * H), p, w).replace('"NA"', "NA"))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_station_puts_the_real_file_on_an_hourly_grid(series: StationSeries) -> None:
    assert series.station == "Aotizhongxin"
    assert series.values.shape == (35064, 11)
    assert series.times[0] == np.datetime64("2013-03-01T00")
    assert series.times[-1] == np.datetime64("2017-02-28T23")
    assert (np.diff(series.times) == H).all()
    # row 1: 2013,3,1,0,4,4,4,7,300,77,-0.7,1023,-18.8,0,"NNW",4.4
    np.testing.assert_array_equal(
        series.values[0], [4, 4, 4, 7, 300, 77, -0.7, 1023, -18.8, 0, 4.4]
    )
    assert series.wind_deg[0] == 337.5  # NNW
    # row 75: 2013,3,4,2,34,62,NA,... -> SO2 missing
    assert math.isnan(series.values[74, 2]) and series.values[74, 0] == 34


def test_windows_are_24_hours_and_the_target_is_h_hours_after_the_last(
    station: StationData, series: StationSeries
) -> None:
    x, y = station.train.data.tensors
    assert x.shape == (len(station.train), LOOKBACK, len(FEATURE_NAMES)) == (16935, 24, 22)
    assert y.shape == (len(station.train),) and x.dtype == y.dtype == torch.float32
    # First train window: inputs 2013-03-01T00..T23; row 24 (T23) has PM2.5 24, and
    # the target is row 30, 2013-03-02T05, PM2.5 9.
    assert station.train.end_time[0] == np.datetime64("2013-03-01T23")
    assert station.train.persistence[0] == 24 and station.train.target[0] == 9
    pm_in = station.stats.denormalize_target(x[0, :, 0].numpy())
    np.testing.assert_allclose(pm_in[[0, -1]], [4, 24], atol=1e-3)
    np.testing.assert_allclose(station.stats.denormalize_target(y[:1].numpy()), [9], atol=1e-3)
    # Last train window: ends 2015-02-28T17 (PM2.5 198), target 2015-02-28T23 (115).
    assert station.train.end_time[-1] == np.datetime64("2015-02-28T17")
    assert (station.train.persistence[-1], station.train.target[-1]) == (198, 115)
    # Everywhere: the target is the series' PM2.5 six hours after the last input hour.
    for part in (station.train, station.val, station.test):
        rows = ((part.end_time - series.times[0]) // H).astype(np.int64)
        np.testing.assert_array_equal(part.target, series.values[rows + 6, 0])
        last = station.stats.denormalize_target(part.data.tensors[0][:, -1, 0].numpy())
        np.testing.assert_allclose(last, part.persistence, rtol=1e-5, atol=1e-3)


def test_split_is_chronological_with_no_look_ahead(station: StationData) -> None:
    h = np.timedelta64(station.horizon, "h")
    span = np.timedelta64(LOOKBACK - 1, "h")
    val_start, test_start = DEFAULT_SPLIT.bounds()
    train, val, test = station.train, station.val, station.test
    assert (np.diff(train.end_time) > np.timedelta64(0, "h")).all()
    # every hour a window touches lies inside its part
    assert (train.end_time + h).max() < val_start <= (val.end_time - span).min()
    assert (val.end_time + h).max() < test_start <= (test.end_time - span).min()
    # so the last training target is before the first validation input, etc.
    assert (train.end_time + h).max() < (val.end_time - span).min()
    assert (val.end_time + h).max() < (test.end_time - span).min()
    # windows are dropped only at the boundaries (and for missing values), not further
    assert val.end_time[0] == np.datetime64("2015-03-01T23")
    assert test.end_time[-1] == np.datetime64("2017-02-28T17")
    assert len(train) > 15000 and len(val) > 8000 and len(test) > 8000


def test_forward_fill_stops_after_the_limit() -> None:
    nan = math.nan
    values = np.array([nan, 1, nan, nan, nan, nan, 2, nan])
    np.testing.assert_array_equal(forward_fill(values, 3), [nan, 1, 1, 1, 1, nan, 2, 2])
    two = np.array([[1.0, nan], [nan, 5.0], [nan, nan]])
    np.testing.assert_array_equal(forward_fill(two, 1), [[1, nan], [1, 5], [nan, 5]])


def test_missing_values_in_a_small_file(tmp_path: Path) -> None:
    # 40 hours; PM2.5 missing for 2 hours at 24-25 (filled), for 6 hours at 30-35
    # (3 filled, 3 left to the mean); the target hour 39 is missing too.
    pm = [str(10 + i) for i in range(40)]
    for i in (24, 25, *range(30, 36), 39):
        pm[i] = "NA"
    wd = ["N"] * 40
    for i in range(10, 15):  # five hours without a wind direction
        wd[i] = "NA"
    wd[9] = "E"
    path = _tiny_csv(tmp_path / "tiny.csv", pm, wd)
    split = ChronoSplit(val_start="2014-01-01", test_start="2014-06-01")  # all of it is train
    data = load_station(path, horizon=2, split=split)
    s = read_station(path)
    assert math.isnan(s.values[24, 0]) and math.isnan(s.wind_deg[10])

    # Normalisation: from the observed PM2.5 values only.
    observed = [10.0 + i for i in range(40) if pm[i] != "NA"]
    assert data.stats.mean[0] == pytest.approx(np.mean(observed))
    assert data.stats.std[0] == pytest.approx(np.std(observed))

    # Kept windows: end t in 23..37; the target t+2 must be observed (drops t=23 -> 25,
    # t=28..33 -> 30..35, t=37 -> 39) and PM2.5 at t known (drops t=34, 35: past the
    # 3-hour fill limit; keeps t=24, filled from hour 23).
    ends = ((data.train.end_time - s.times[0]) // H).astype(int).tolist()
    assert ends == [24, 25, 26, 27, 36]
    assert data.val.data.tensors[0].shape == (0, LOOKBACK, len(FEATURE_NAMES))

    x = data.train.data.tensors[0][2].numpy()  # the window of hours 3..26
    col = {name: i for i, name in enumerate(FEATURE_NAMES)}
    pm_in = data.stats.denormalize_target(x[:, col["PM2.5"]])
    np.testing.assert_allclose(pm_in[20:24], [33, 33, 33, 36], atol=1e-4)  # 24, 25 <- 23
    np.testing.assert_array_equal(x[:, col["PM2.5_missing"]][20:24], [0, 1, 1, 0])
    # Wind: E at hour 9 carried to 10..12, unknown at 13, 14 (0, 0), N again at 15.
    wind = x[6:13][:, [col["wd_sin"], col["wd_cos"]]]  # hours 9..15
    np.testing.assert_allclose(
        wind, [[1, 0], [1, 0], [1, 0], [1, 0], [0, 0], [0, 0], [0, 1]], atol=1e-6
    )
    np.testing.assert_array_equal(x[6:13, col["weather_missing"]], [0, 1, 1, 1, 1, 1, 0])

    x3 = data.train.data.tensors[0][4].numpy()  # hours 13..36
    pm_in = data.stats.denormalize_target(x3[:, col["PM2.5"]])
    # hours 30..32 hold hour 29's value; 33..35 the training mean
    np.testing.assert_allclose(pm_in[17:23], [39, 39, 39, *[data.stats.mean[0]] * 3], atol=1e-4)
    assert x3[20:23, col["PM2.5"]].tolist() == [0, 0, 0]


def test_a_bad_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_station(tmp_path / "absent.csv")
    (tmp_path / "cols.csv").write_text('"No","year"\n1,2013\n')
    with pytest.raises(DataError, match=r"missing column\(s\) month"):
        read_station(tmp_path / "cols.csv")
    bad = _tiny_csv(tmp_path / "wd.csv", ["1"], ["NORTH"])
    with pytest.raises(DataError, match="not a compass point"):
        read_station(bad)


def test_statistics_come_from_the_train_part_only(
    series: StationSeries, station_file: Path, station: StationData
) -> None:
    stats = station_stats(station_file)
    train_rows = series.times < np.datetime64("2015-03-01T00")
    train = series.values[train_rows]
    np.testing.assert_array_equal(stats.count, (~np.isnan(train)).sum(axis=0))
    norm = stats.norm()
    np.testing.assert_allclose(norm.mean, np.nanmean(train, axis=0), rtol=1e-12)
    np.testing.assert_allclose(norm.std, np.nanstd(train, axis=0), rtol=1e-9)
    # load_station without statistics uses exactly these (purely local)
    np.testing.assert_array_equal(station.stats.mean, norm.mean)
    # and the later years do not matter: a different test part gives the same statistics
    shifted = StationSeries(
        station=series.station,
        times=series.times,
        values=np.where(train_rows[:, None], series.values, 1e6),
        wind_deg=series.wind_deg,
    )
    np.testing.assert_array_equal(station_stats(shifted).sum, stats.sum)


def test_combine_equals_the_statistics_of_the_pooled_data() -> None:
    nan = math.nan
    a = SufficientStats.of(np.array([[1.0, 10.0], [2.0, nan], [nan, 30.0]]))
    b = SufficientStats.of(np.array([[3.0, 20.0], [6.0, 40.0]]))
    # by hand: column 0 is 1, 2, 3, 6 -> mean 3, variance (4 + 1 + 0 + 9) / 4 = 3.5;
    # column 1 is 10, 30, 20, 40 -> mean 25, variance (225 + 25 + 25 + 225) / 4 = 125
    np.testing.assert_array_equal(a.count, [2, 2])
    np.testing.assert_array_equal(a.sum_sq, [5, 1000])
    g = combine([a, b])
    np.testing.assert_allclose(g.mean, [3, 25])
    np.testing.assert_allclose(g.std, [math.sqrt(3.5), math.sqrt(125)])
    pooled = np.array([[1.0, 10.0], [2.0, nan], [nan, 30.0], [3.0, 20.0], [6.0, 40.0]])
    np.testing.assert_allclose(g.std, np.nanstd(pooled, axis=0))
    # what leaves a device: three lists of floats, and back
    wire = a.to_dict()
    assert wire == {"count": [2.0, 2.0], "sum": [3.0, 40.0], "sum_sq": [5.0, 1000.0]}
    np.testing.assert_array_equal(SufficientStats.from_dict(wire).sum, a.sum)
    with pytest.raises(DataError):
        SufficientStats.from_dict({"count": [1.0], "sum": [1.0, 2.0], "sum_sq": [1.0, 2.0]})
    with pytest.raises(DataError):
        SufficientStats.from_dict({"count": [1.0], "sum": [nan], "sum_sq": [1.0]})
    with pytest.raises(DataError, match="no observed"):
        SufficientStats.of(np.array([[nan]])).norm()
    with pytest.raises(DataError):
        combine([])


def test_windows_do_not_depend_on_the_statistics(
    series: StationSeries, station: StationData
) -> None:
    other = NormStats(mean=station.stats.mean + 5, std=station.stats.std * 2)
    data = load_station(series, stats=other)
    np.testing.assert_array_equal(data.test.end_time, station.test.end_time)
    np.testing.assert_array_equal(data.test.target, station.test.target)


def test_metrics_by_hand() -> None:
    m = Metrics.of(np.array([1.0, 2.0]), np.array([2.0, 4.0]))
    assert m.rmse == pytest.approx(math.sqrt(2.5))
    assert m.mae == 1.5
    pooled = Metrics.pool([m, Metrics.of(np.array([0.0]), np.array([3.0]))])
    assert pooled.n == 3
    assert pooled.rmse == pytest.approx(math.sqrt(14 / 3))
    assert pooled.mae == 2.0
    with pytest.raises(DataError, match="missing"):
        Metrics.of(np.array([1.0]), np.array([math.nan]))


def test_model_shape_and_a_few_steps_reduce_the_loss(station: StationData) -> None:
    model = build_model(seed=0)
    params = list(model.parameters())
    assert all(p.dtype == torch.float32 for p in params)
    assert 3_000 <= sum(p.numel() for p in params) <= 30_000
    assert list(model.buffers()) == []
    x, y = station.train.data.tensors
    assert model(x[:5]).shape == (5,)
    # an untrained model is near persistence (residual on the last PM2.5)
    small = TensorDataset(x[:1024], y[:1024])
    before = validation_loss(model, small)
    train_epochs(model, small, epochs=2, lr=3e-3, batch_size=64, seed=0)
    after = validation_loss(model, small)
    assert after < before
    # same arguments, same weights
    again = build_model(seed=0)
    train_epochs(again, small, epochs=2, lr=3e-3, batch_size=64, seed=0)
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # metrics in µg/m³ on the same windows as persistence
    m = evaluate(model, station.test, station.stats)
    assert m.n == persistence(station.test).n == len(station.test)
    assert 10 < m.rmse < 200


def test_fit_stops_early_and_keeps_the_best_weights(station: StationData) -> None:
    x, y = station.train.data.tensors
    train, val = TensorDataset(x[:512], y[:512]), TensorDataset(x[512:768], y[512:768])
    model = build_model(seed=1)
    result = fit(model, train, val, max_epochs=4, patience=1, lr=3e-2, batch_size=64, seed=0)
    assert 1 <= result.epochs <= 4 and 0 <= result.best_epoch <= result.epochs
    assert result.epochs == 4 or result.epochs == result.best_epoch + 1
    assert validation_loss(model, val) == pytest.approx(result.best_val_loss, rel=1e-6)

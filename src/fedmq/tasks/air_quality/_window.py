"""Input features, 24-hour windows, and what a device calls: ``load_station``.

Features per hour (``FEATURE_NAMES``, 22 columns):

* the 11 readings of ``NUMERIC_COLUMNS``, normalised with the given statistics;
* wind direction as ``sin`` and ``cos`` of its compass angle. The 16 categories
  are points on a circle: sin/cos keeps neighbours close (NNW is next to N, which
  a one-hot code or an index 0..15 would not say), takes 2 inputs instead of 16,
  and an unknown direction maps naturally to ``(0, 0)``, the centre of the circle;
* the hour of day as ``sin`` and ``cos`` (PM2.5 has a daily cycle);
* 7 missing-value indicators: one per pollutant, one for the weather readings
  (TEMP, PRES, DEWP, RAIN, WSPM and wd come from one weather station and go
  missing together). An indicator is 1 when the hour's value was not observed.

Missing inputs: a gap is forward-filled from the last observed value for at most
``FFILL_HOURS`` (3) hours: most gaps in this data are 1 to 3 hours, while longer
ones are outages of up to two weeks that a stale value would misrepresent.
What is still missing becomes the training mean (0 after normalisation; wind
``(0, 0)``). Filling only looks backwards, so an input never holds a later value.

Windows: the input is the ``LOOKBACK`` (24) hours ``t-23 .. t``; the target is
PM2.5 at ``t + horizon``. The default horizon is 6 hours: long enough to act on
(a warning at 06:00 for the noon peak of outdoor activity), and hard enough that
persistence is beatable (lag-6 autocorrelation of PM2.5 is ~0.77 against ~0.97
at lag 1, and persistence RMSE ~50 µg/m³), which it hardly is at 1 hour. A
window is kept only when its target was observed (never imputed: metrics are
against real readings) and PM2.5 at ``t`` is known, observed or forward-filled
(so the persistence forecast exists for every kept window and all methods are
compared on the same windows); each part keeps only the windows that lie
wholly inside it (see ``ChronoSplit``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import TensorDataset

from fedmq.errors import ConfigError
from fedmq.tasks.air_quality._data import (
    DEFAULT_SPLIT,
    NUMERIC_COLUMNS,
    ChronoSplit,
    Part,
    StationSeries,
    read_station,
)
from fedmq.tasks.air_quality._normalize import NormStats, SufficientStats

__all__ = [
    "DEFAULT_HORIZON",
    "FEATURE_NAMES",
    "FFILL_HOURS",
    "LOOKBACK",
    "StationData",
    "Windows",
    "features",
    "forward_fill",
    "load_station",
    "make_windows",
    "series_stats",
    "station_stats",
]

LOOKBACK = 24
DEFAULT_HORIZON = 6
FFILL_HOURS = 3
_POLLUTANTS = 6  # the first six of NUMERIC_COLUMNS
FEATURE_NAMES: tuple[str, ...] = (
    *NUMERIC_COLUMNS,
    "wd_sin",
    "wd_cos",
    "hour_sin",
    "hour_cos",
    *(f"{c}_missing" for c in NUMERIC_COLUMNS[:_POLLUTANTS]),
    "weather_missing",
)


@dataclass(frozen=True, kw_only=True)
class Windows:
    """The windows of one part of one station.

    ``data``: a ``TensorDataset`` of ``x`` [n, LOOKBACK, len(FEATURE_NAMES)] and
    ``y`` [n] (normalised PM2.5 at the target hour), both float32. Alongside, for
    metrics and checks: ``target`` [n] the observed PM2.5 in µg/m³; ``persistence``
    [n] PM2.5 at the last input hour (forward-filled), in µg/m³; ``end_time`` [n]
    the last input hour (datetime64[h]; the target hour is ``end_time + horizon``).
    """

    data: TensorDataset
    target: npt.NDArray[np.float64]
    persistence: npt.NDArray[np.float64]
    end_time: npt.NDArray[np.datetime64]

    def __len__(self) -> int:
        return len(self.target)


@dataclass(frozen=True, kw_only=True)
class StationData:
    """One device's data: its train, validation and test windows and the statistics used."""

    station: str
    horizon: int
    stats: NormStats
    train: Windows
    val: Windows
    test: Windows


def forward_fill(values: npt.NDArray[np.float64], limit: int) -> npt.NDArray[np.float64]:
    """Fill NaN along axis 0 with the last observed value at most ``limit`` rows back."""
    n = values.shape[0]
    rows = np.arange(n).reshape((n,) + (1,) * (values.ndim - 1))
    last = np.where(~np.isnan(values), rows, -1)
    last = np.maximum.accumulate(last, axis=0)  # index of the last observed row, or -1
    filled = np.take_along_axis(values, np.maximum(last, 0), axis=0)
    return np.where((last >= 0) & (rows - last <= limit), filled, np.nan)


def features(series: StationSeries, stats: NormStats) -> npt.NDArray[np.float32]:
    """Per-hour features [T, len(FEATURE_NAMES)] (see the module docstring)."""
    observed = ~np.isnan(series.values)
    readings = stats.normalize(forward_fill(series.values, FFILL_HOURS))
    readings = np.nan_to_num(readings, nan=0.0)  # still missing: the training mean
    angle = np.deg2rad(forward_fill(series.wind_deg, FFILL_HOURS))
    wind = np.nan_to_num(np.stack([np.sin(angle), np.cos(angle)], axis=1), nan=0.0)
    hour = series.times.astype(np.int64) % 24 * (2 * np.pi / 24)
    clock = np.stack([np.sin(hour), np.cos(hour)], axis=1)
    weather_ok = observed[:, _POLLUTANTS:].all(axis=1) & ~np.isnan(series.wind_deg)
    missing = np.concatenate([~observed[:, :_POLLUTANTS], ~weather_ok[:, None]], axis=1).astype(
        np.float64
    )
    out = np.concatenate([readings, wind, clock, missing], axis=1)  # [T, 22]
    return out.astype(np.float32)


def make_windows(
    series: StationSeries,
    feats: npt.NDArray[np.float32],
    stats: NormStats,
    *,
    part: Part,
    horizon: int,
    split: ChronoSplit = DEFAULT_SPLIT,
) -> Windows:
    """The kept windows of ``part`` (see the module docstring), in time order."""
    if horizon < 1:
        raise ConfigError(f"horizon: must be >= 1 hour, got {horizon}")
    pm = series.values[:, 0]
    pm_now = forward_fill(pm, FFILL_HOURS)
    start, end = split.part_range(part, series.times)
    t = np.arange(LOOKBACK - 1, len(pm) - horizon)  # candidate last input hours
    keep = (
        ~np.isnan(pm[t + horizon])
        & ~np.isnan(pm_now[t])
        & (series.times[t - (LOOKBACK - 1)] >= start)
        & (series.times[t + horizon] < end)
    )
    t = t[keep]
    # [n, LOOKBACK]: row i holds the hours t_i-23 .. t_i
    hours = t[:, None] + np.arange(-(LOOKBACK - 1), 1)[None, :]
    x = torch.from_numpy(feats[hours])  # [n, LOOKBACK, F]
    target = pm[t + horizon]
    y = torch.from_numpy(stats.normalize_target(target).astype(np.float32))  # [n]
    return Windows(
        data=TensorDataset(x, y),
        target=target,
        persistence=pm_now[t],
        end_time=series.times[t],
    )


def series_stats(series: StationSeries, split: ChronoSplit = DEFAULT_SPLIT) -> SufficientStats:
    """Sufficient statistics of the observed readings of the TRAIN part only."""
    start, end = split.part_range("train", series.times)
    rows = (series.times >= start) & (series.times < end)
    return SufficientStats.of(series.values[rows])


def station_stats(
    source: str | os.PathLike[str] | StationSeries, *, split: ChronoSplit = DEFAULT_SPLIT
) -> SufficientStats:
    """What a device shares for global normalisation: its train part's statistics.

    ``source`` is the station's file, or its series already read with ``read_station``.
    """
    return series_stats(_series(source), split)


def load_station(
    source: str | os.PathLike[str] | StationSeries,
    *,
    horizon: int = DEFAULT_HORIZON,
    stats: NormStats | None = None,
    split: ChronoSplit = DEFAULT_SPLIT,
) -> StationData:
    """A device's data from its own file (or series): train, validation and test windows.

    ``stats`` are the normalisation statistics to use, e.g. ``combine`` of all
    devices' ``station_stats``; ``None`` uses this station's own train part
    (purely local). The kept windows do not depend on ``stats``.
    """
    series = _series(source)
    if stats is None:
        stats = series_stats(series, split).norm()
    feats = features(series, stats)
    parts = {
        part: make_windows(series, feats, stats, part=part, horizon=horizon, split=split)
        for part in ("train", "val", "test")
    }
    return StationData(
        station=series.station,
        horizon=horizon,
        stats=stats,
        train=parts["train"],
        val=parts["val"],
        test=parts["test"],
    )


def _series(source: str | os.PathLike[str] | StationSeries) -> StationSeries:
    return source if isinstance(source, StationSeries) else read_station(source)

"""One station's file read into an hourly grid, and its chronological split.

A device holds the file of its own monitoring station (the PRSA data of the
Beijing multi-site air-quality set: hourly, 2013-03-01 to 2017-02-28). The file
is read with the standard ``csv`` and ``gzip`` modules; a missing value is the
string ``NA`` and becomes NaN. Rows are placed on a gap-free hourly grid (an
absent hour is an hour of NaNs), so that "h hours later" is always "h rows later".

The split is by time (``ChronoSplit``): by default, train is the first two years
(2013-03-01 to 2015-02-28), validation the third year, test the fourth. Each
held-out part is a whole year, so it holds every season once (Beijing's PM2.5
is strongly seasonal: heating-season smog episodes in winter, clean windy
springs), and train holds every season twice. A window belongs to a part only
when all of its hours, from the first input hour to the target hour, lie inside
that part; windows that straddle a boundary are dropped, so no training target
is ever later than a validation input (no look-ahead).
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from fedmq.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_SPLIT",
    "NUMERIC_COLUMNS",
    "WIND_DIRECTIONS",
    "ChronoSplit",
    "Part",
    "StationSeries",
    "read_station",
]

# The readings used as inputs, in this order; PM2.5 (index 0) is also the target.
NUMERIC_COLUMNS: tuple[str, ...] = (
    "PM2.5",
    "PM10",
    "SO2",
    "NO2",
    "CO",
    "O3",
    "TEMP",
    "PRES",
    "DEWP",
    "RAIN",
    "WSPM",
)
# The 16 compass points of the ``wd`` column, clockwise from north: index * 22.5 degrees.
WIND_DIRECTIONS: tuple[str, ...] = (
    "N", "NNE", "NE", "ENE", "E", "ESE", "SE", "SSE",
    "S", "SSW", "SW", "WSW", "W", "WNW", "NW", "NNW",
)  # fmt: skip
_TIME_COLUMNS = ("year", "month", "day", "hour")
_WIND_INDEX = {name: i for i, name in enumerate(WIND_DIRECTIONS)}

Part = Literal["train", "val", "test"]


@dataclass(frozen=True, kw_only=True)
class StationSeries:
    """One station's readings on a gap-free hourly grid (``T`` hours).

    ``times`` [T] datetime64[h]; ``values`` [T, len(NUMERIC_COLUMNS)] float64 with
    NaN where not observed; ``wind_deg`` [T] float64, the compass direction in
    degrees (0 = north, 90 = east), NaN where not observed.
    """

    station: str
    times: npt.NDArray[np.datetime64]
    values: npt.NDArray[np.float64]
    wind_deg: npt.NDArray[np.float64]


@dataclass(frozen=True, kw_only=True)
class ChronoSplit:
    """Train is before ``val_start``, validation from it to ``test_start``, test after.

    Dates are ISO strings (``"2015-03-01"`` or ``"2015-03-01T06"``), at the
    start of that hour.
    """

    val_start: str = "2015-03-01"
    test_start: str = "2016-03-01"

    def __post_init__(self) -> None:
        try:
            val, test = self.bounds()
        except ValueError as exc:
            raise ConfigError(f"val_start/test_start: not ISO dates ({exc})") from exc
        if not val < test:
            raise ConfigError(
                f"val_start: must be before test_start, got {self.val_start} >= {self.test_start}"
            )

    def bounds(self) -> tuple[np.datetime64, np.datetime64]:
        """``(val_start, test_start)`` as datetime64[h]."""
        return np.datetime64(self.val_start, "h"), np.datetime64(self.test_start, "h")

    def part_range(
        self, part: Part, times: npt.NDArray[np.datetime64]
    ) -> tuple[np.datetime64, np.datetime64]:
        """``[start, end)`` of ``part``, the open ends taken from ``times``."""
        val, test = self.bounds()
        one = np.timedelta64(1, "h")
        if part == "train":
            return min(times[0], val), val
        if part == "val":
            return val, test
        if part == "test":
            return test, max(times[-1] + one, test)
        raise ConfigError(f"part: {part!r} is not one of train, val, test")


DEFAULT_SPLIT = ChronoSplit()


def read_station(path: str | os.PathLike[str]) -> StationSeries:
    """Read one PRSA station file (``.csv`` or ``.csv.gz``) onto an hourly grid.

    Raises ``DataError`` when the file is missing, lacks a column, holds a value
    that is neither a number nor ``NA``, an unknown wind direction, a repeated
    hour, or more than one station.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            return _parse(path, csv.reader(text))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


def _parse(path: Path, reader: Iterator[list[str]]) -> StationSeries:
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: empty file")
    needed = (*_TIME_COLUMNS, *NUMERIC_COLUMNS, "wd", "station")
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    at = {name: header.index(name) for name in needed}
    stamps: list[str] = []
    values: list[list[float]] = []
    wind: list[float] = []
    stations: set[str] = set()
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        try:
            y, mo, d, h = (int(row[at[c]]) for c in _TIME_COLUMNS)
            stamps.append(f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}")
            values.append([_number(row[at[c]]) for c in NUMERIC_COLUMNS])
        except (ValueError, IndexError) as exc:
            raise DataError(f"{path}:{line}: bad row ({exc})") from exc
        wd = row[at["wd"]]
        if wd in ("NA", ""):
            wind.append(float("nan"))
        elif wd in _WIND_INDEX:
            wind.append(_WIND_INDEX[wd] * 22.5)
        else:
            raise DataError(f"{path}:{line}: wind direction {wd!r} is not a compass point")
        stations.add(row[at["station"]])
    if not stamps:
        raise DataError(f"{path}: no rows")
    if len(stations) != 1:
        raise DataError(f"{path}: one station per file, found {sorted(stations)}")
    try:
        times = np.array(stamps, dtype="datetime64[h]")
    except ValueError as exc:
        raise DataError(f"{path}: bad date ({exc})") from exc
    start = times.min()
    slot = (times - start).astype(np.int64)
    if len(np.unique(slot)) != len(slot):
        raise DataError(f"{path}: an hour appears twice")
    n = int(slot.max()) + 1
    grid = np.full((n, len(NUMERIC_COLUMNS)), np.nan)
    grid[slot] = np.asarray(values, dtype=np.float64)
    wind_grid = np.full(n, np.nan)
    wind_grid[slot] = np.asarray(wind, dtype=np.float64)
    return StationSeries(
        station=stations.pop(),
        times=start + np.arange(n).astype("timedelta64[h]"),
        values=grid,
        wind_deg=wind_grid,
    )


def _number(text: str) -> float:
    return float("nan") if text in ("NA", "") else float(text)

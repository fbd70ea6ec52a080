"""A large simulated fleet from 12 stations: each station's windows split over "sensors".

Client-level differential privacy needs thousands of devices (the noise is calibrated
to one device's whole contribution and divided by the number of devices in a server
step), and the Beijing set has 12 stations. The ``air-quality`` task's ``fleet`` makes
``devices`` simulated devices out of them when asked for more than 12 (``sensor_counts``,
``sensor_windows``): station ``s`` (in name order) gets ``devices // 12`` sensors, plus
one for the first ``devices % 12`` stations, and sensor ``j`` of a station holds the
``j``-th contiguous block of its train windows in time order (``numpy.array_split``:
blocks differ by at most one window). With 1,000 devices a sensor holds about 210
windows (nine days), with 10,000 about 21 (one day).

What stays per station, and why:

* Normalisation: every sensor of a station uses the station's statistics (its whole
  train part), exactly as the station's single device does. A sensor's own day of
  readings would give a mean and std too noisy to normalise with, and the model's
  predictions are mapped back to µg/m³ with the same statistics the validation
  windows use. These statistics are computed from all of a station's sensors' data,
  so they are outside any client-level privacy guarantee: treat them as the station's
  public calibration.
* Held-out data: the station's whole validation year stays with its first sensor; the
  other sensors hold none (``DeviceData.held_out`` may be empty). The fleet's
  validation RMSE (the example-weighted mean over the devices that score) is then the
  very number, on the very windows, that the 12-station fleet reports, so runs of any
  size compare directly; split over sensors it would be a mean of many one-day RMSEs,
  a different and smaller number (the mean of square roots is below the square root
  of the mean), and 12 scorings become ``devices``.

What a "device" is here, for the privacy accountant: one sensor's set of train
windows. The blocks split windows, not hours: a window spans 30 hours (24 input hours
to the target 6 hours later), so the hours near a block boundary are in the windows of
two sensors (of up to three when blocks are shorter than 30 windows, as at 10,000
devices). A guarantee per device is therefore one per block of windows; for one
station-hour's readings it holds as for a group of up to that many devices.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import TensorDataset

from fedmq.errors import ConfigError
from fedmq.tasks.air_quality._window import StationData, Windows

__all__ = ["sensor_counts", "sensor_windows", "take"]


def sensor_counts(stations: int, devices: int) -> list[int]:
    """How many sensors each of ``stations`` stations gets for ``devices`` devices:
    ``devices // stations``, one more for the first ``devices % stations``."""
    if stations < 1 or devices < stations:
        raise ConfigError(
            f"devices: {devices} sensors over {stations} stations needs at least one per station"
        )
    base, extra = divmod(devices, stations)
    return [base + (s < extra) for s in range(stations)]


def take(windows: Windows, start: int, stop: int) -> Windows:
    """Windows ``start:stop`` (in time order) of ``windows``: views, no copy."""
    x, y = windows.data.tensors
    return Windows(
        data=TensorDataset(x[start:stop], y[start:stop]),
        target=windows.target[start:stop],
        persistence=windows.persistence[start:stop],
        end_time=windows.end_time[start:stop],
    )


def sensor_windows(station: StationData, count: int) -> list[tuple[Windows, Windows]]:
    """``(train, held_out)`` of each of ``count`` sensors of ``station`` (see the module
    docstring): contiguous blocks of its train windows, the validation year with the
    first sensor only."""
    n = len(station.train)
    if not 1 <= count <= n:
        raise ConfigError(
            f"devices: station {station.station} has {n} train windows, cannot make"
            f" {count} sensors of it (1..{n})"
        )
    base, extra = divmod(n, count)  # numpy.array_split's sizes
    bounds = np.cumsum([0] + [base + (j < extra) for j in range(count)])
    none = take(station.val, 0, 0)
    return [
        (take(station.train, int(bounds[j]), int(bounds[j + 1])), station.val if j == 0 else none)
        for j in range(count)
    ]

"""The air-quality task: PM2.5 ``horizon`` hours ahead at one Beijing station.

Data: the Beijing multi-site air-quality set (12 stations, hourly, 2013-03-01 to
2017-02-28), one station file per device. A device calls ``station_stats`` on its
own file (only count, sum and sum of squares leave it), the statistics of all
devices are merged with ``combine``, and ``load_station(path, stats=...)`` gives
the device's train / validation / test windows. ``train_epochs`` is the local
training step; ``evaluate`` gives RMSE and MAE in µg/m³.

``task`` (``make_task(AirQualitySettings(...))``) is the built-in ``air-quality``
``Task`` made of these pieces: one device per station file, per-station normalisation,
validation windows held out, ``load_test_data`` for a final report (see _task.py).
"""

from fedmq.tasks.air_quality._data import (
    DEFAULT_SPLIT,
    NUMERIC_COLUMNS,
    WIND_DIRECTIONS,
    ChronoSplit,
    StationSeries,
    read_station,
)
from fedmq.tasks.air_quality._metrics import Metrics, evaluate, persistence
from fedmq.tasks.air_quality._model import GruForecaster, build_model
from fedmq.tasks.air_quality._normalize import NormStats, SufficientStats, combine
from fedmq.tasks.air_quality._task import (
    DATA_FOLDER,
    TARGET,
    TRAINING,
    AirQualitySettings,
    StationWindows,
    load_data,
    load_test_data,
    make_task,
    score,
    stations,
    task,
)
from fedmq.tasks.air_quality._train import FitResult, fit, predict, train_epochs
from fedmq.tasks.air_quality._window import (
    DEFAULT_HORIZON,
    FEATURE_NAMES,
    FFILL_HOURS,
    LOOKBACK,
    StationData,
    Windows,
    load_station,
    station_stats,
)

__all__ = [
    "DATA_FOLDER",
    "DEFAULT_HORIZON",
    "DEFAULT_SPLIT",
    "FEATURE_NAMES",
    "FFILL_HOURS",
    "LOOKBACK",
    "NUMERIC_COLUMNS",
    "TARGET",
    "TRAINING",
    "WIND_DIRECTIONS",
    "AirQualitySettings",
    "ChronoSplit",
    "FitResult",
    "GruForecaster",
    "Metrics",
    "NormStats",
    "StationData",
    "StationSeries",
    "StationWindows",
    "SufficientStats",
    "Windows",
    "build_model",
    "combine",
    "evaluate",
    "fit",
    "load_data",
    "load_station",
    "load_test_data",
    "make_task",
    "persistence",
    "predict",
    "read_station",
    "score",
    "station_stats",
    "stations",
    "task",
    "train_epochs",
]

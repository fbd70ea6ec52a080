"""Tasks: a model, a device's own data, training and metrics for one workload.

``Task`` is what a user writes (one object in their own file) and ``load_task`` finds
it from ``--task``. Built in: ``air_quality``: forecast PM2.5 at a Beijing monitoring
station from the previous 24 hours of its readings; one device per station, holding
only its own file.
"""

from fedmq.models import Training
from fedmq.tasks import air_quality
from fedmq.tasks._load import ENTRY_POINT_GROUP, TaskError, load_task
from fedmq.tasks._task import DeviceData, Metric, Task, TrainFn

__all__ = [
    "ENTRY_POINT_GROUP",
    "DeviceData",
    "Metric",
    "Task",
    "TaskError",
    "TrainFn",
    "Training",
    "air_quality",
    "load_task",
]

"""Built-in tasks: a model, a device's own data, training and metrics for one workload.

``air_quality``: forecast PM2.5 at a Beijing monitoring station from the previous
24 hours of its readings; one device per station, holding only its own file.
"""

from fedmq.tasks import air_quality

__all__ = ["air_quality"]

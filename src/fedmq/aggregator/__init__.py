"""The aggregator service: consume updates, apply a strategy, republish the model."""

from fedmq.aggregator._bounds import BoundsConfig
from fedmq.aggregator._config import AggregatorConfig
from fedmq.aggregator._control import ControlConfig
from fedmq.aggregator._downlink import Downlink, DownlinkConfig
from fedmq.aggregator._evaluator import Evaluator
from fedmq.aggregator._fedeval import DeviceMetric, FederatedEval, FedEvalConfig, MetricSummary
from fedmq.aggregator._metrics import AggregatorCollector, MetricsConfig, MetricsServer
from fedmq.aggregator._service import Aggregator
from fedmq.aggregator._stats import AggregatorStats, EvalPoint

__all__ = [
    "Aggregator",
    "AggregatorCollector",
    "AggregatorConfig",
    "AggregatorStats",
    "BoundsConfig",
    "ControlConfig",
    "DeviceMetric",
    "Downlink",
    "DownlinkConfig",
    "EvalPoint",
    "Evaluator",
    "FedEvalConfig",
    "FederatedEval",
    "MetricSummary",
    "MetricsConfig",
    "MetricsServer",
]

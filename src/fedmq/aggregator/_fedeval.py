"""Federated evaluation: the fleet's score of the global model, from the devices' own reports.

Each device evaluates the global model on its own held-out examples and reports named
metrics (``fedmq.eval/1``, docs/wire-format.md section 12). ``FederatedEval`` keeps the
latest report of each device and gives, per metric name, the example-weighted mean over
the devices whose latest report is on a recent version of the model:

    V      = the newest version a held report of the metric is on
    D      = the devices whose latest report has the metric, on a version >= V - window
    value  = sum(n_d * m_d for d in D) / sum(n_d for d in D)

with ``n_d`` the report's ``num_examples`` and ``m_d`` its value. With ``window`` 0 (the
default) only reports on V count: the score of one model, as central evaluation gives
it. Devices that evaluate every N versions rarely hit the same version in an
asynchronous run; a ``window`` of N - 1 then mixes reports on the last N versions. The
summary says how many devices and examples the mean covers and the versions it spans,
so a stop rule can ask for enough of the fleet.

A device's report replaces its previous one whole, unless it is older: on a lower
version, or on the same version and created earlier (a replayed or reordered message).
Memory is bounded: at most ``max_devices`` devices (each report has at most 16 metrics,
the wire says so); a new device beyond that makes the one whose report arrived longest
ago be forgotten (counted in ``evicted``). A report on a version newer than the
aggregator's model (``future_base``) or claiming more than ``max_num_examples``
(``examples_bound``) is refused with a ``Rejection``: it would take the mean over.

Pure and synchronous: no I/O, no clock. Not thread-safe.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from fedmq.errors import ConfigError, Reason, Rejection
from fedmq.wire import EvalEnvelope

__all__ = ["DeviceMetric", "FedEvalConfig", "FederatedEval", "MetricSummary"]

_MAX_FLOAT = sys.float_info.max


@dataclass(frozen=True, kw_only=True)
class FedEvalConfig:
    """``max_devices``: devices whose latest report is kept (the oldest goes first).
    ``window``: reports on versions down to the newest minus this many count (0: the
    newest only; devices score every ``eval_every``-th version they hold, 10 by
    default, and do not all hold the same ones, so the default spans two such steps).
    ``max_num_examples``: the largest weight a report may claim (as updates,
    ``BoundsConfig.max_num_examples``). ``min_devices``: a fleet value is recorded as an
    evaluation (stop rules, reports) only once this many devices are in its window.
    """

    max_devices: int = 10_000
    window: int = 20
    max_num_examples: int = 1_000_000
    min_devices: int = 1

    def __post_init__(self) -> None:
        if self.max_devices < 1:
            raise ConfigError(f"max_devices: {self.max_devices} must be >= 1")
        if self.window < 0:
            raise ConfigError(f"window: {self.window} must be >= 0 (versions)")
        if self.max_num_examples < 1:
            raise ConfigError(f"max_num_examples: {self.max_num_examples} must be >= 1")
        if self.min_devices < 1:
            raise ConfigError(f"min_devices: {self.min_devices} must be >= 1")


@dataclass(frozen=True, kw_only=True)
class DeviceMetric:
    """One device's value of one metric, from its latest report."""

    version: int
    num_examples: int
    value: float


@dataclass(frozen=True, kw_only=True)
class MetricSummary:
    """The fleet's value of a metric: ``value`` is the mean over ``devices`` devices and
    ``num_examples`` examples, of reports on versions ``oldest_version`` to ``version``."""

    name: str
    value: float
    num_examples: int
    devices: int
    version: int
    oldest_version: int


def weighted_mean(readings: Iterable[DeviceMetric]) -> float:
    """``sum(n * v) / sum(n)``, finite for any finite values (no overflow in the products)."""
    items = [(r.num_examples, r.value) for r in readings]
    total = sum(n for n, _ in items)
    scale = max((abs(v) for _, v in items), default=0.0)
    if total == 0 or scale == 0.0:
        return 0.0
    # Dividing by the largest magnitude first keeps every term within [-n, n].
    mean = scale * (math.fsum(n * (v / scale) for n, v in items) / total)
    return max(-_MAX_FLOAT, min(_MAX_FLOAT, mean))


class FederatedEval:
    """The devices' latest evaluation reports and their example-weighted means."""

    def __init__(self, config: FedEvalConfig | None = None) -> None:
        self.config = config if config is not None else FedEvalConfig()
        self._reports: OrderedDict[str, EvalEnvelope] = OrderedDict()  # oldest arrival first
        self.evicted = 0

    @property
    def devices(self) -> int:
        """How many devices have a report held."""
        return len(self._reports)

    def add(self, report: EvalEnvelope, *, model_version: int) -> bool:
        """Take ``report`` as its device's latest; False if it is older than the one held.

        ``model_version`` is the aggregator's current version: a report on a newer one is
        refused (``Rejection``, ``future_base``), as one claiming over ``max_num_examples``
        (``examples_bound``). Nothing is changed by a refused or ignored report.
        """
        if report.version > model_version:
            raise Rejection(
                Reason.FUTURE_BASE,
                f"report on version {report.version}, the model is at {model_version}",
            )
        if report.num_examples > self.config.max_num_examples:
            raise Rejection(
                Reason.EXAMPLES_BOUND,
                f"{report.num_examples} examples, limit {self.config.max_num_examples}",
            )
        held = self._reports.get(report.participant)
        if held is not None and (report.version, report.created) < (held.version, held.created):
            return False
        if held is None and len(self._reports) >= self.config.max_devices:
            self._reports.popitem(last=False)
            self.evicted += 1
        # A copy: the caller's mapping may change; the held one must not.
        self._reports[report.participant] = dataclasses.replace(
            report, metrics=dict(report.metrics)
        )
        self._reports.move_to_end(report.participant)
        return True

    def names(self) -> list[str]:
        """The metric names of the held reports, sorted."""
        return sorted({name for report in self._reports.values() for name in report.metrics})

    def per_device(self, name: str) -> dict[str, DeviceMetric]:
        """participant -> its latest value of ``name`` (every device holding one, in or out
        of the window), sorted by participant."""
        return {
            participant: DeviceMetric(
                version=report.version,
                num_examples=report.num_examples,
                value=report.metrics[name],
            )
            for participant, report in sorted(self._reports.items())
            if name in report.metrics
        }

    def summary(self, name: str) -> MetricSummary | None:
        """The example-weighted mean of ``name`` (the rule of the module docstring), or
        None when no held report has it."""
        readings = self.per_device(name).values()
        if not readings:
            return None
        newest = max(r.version for r in readings)
        counted = [r for r in readings if r.version >= newest - self.config.window]
        return MetricSummary(
            name=name,
            value=weighted_mean(counted),
            num_examples=sum(r.num_examples for r in counted),
            devices=len(counted),
            version=newest,
            oldest_version=min(r.version for r in counted),
        )

    def summaries(self) -> dict[str, MetricSummary]:
        """name -> summary, for every metric name of the held reports."""
        found = {name: self.summary(name) for name in self.names()}
        return {name: s for name, s in found.items() if s is not None}

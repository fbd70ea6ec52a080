"""Prometheus metrics of a running aggregator, served on ``--metrics-port``.

Nothing is recorded in the hot path for this: a custom collector reads the live
``AggregatorStats`` (and the strategy configuration in force) when Prometheus
scrapes. The HTTP endpoint is a small asyncio server on the aggregator's own event
loop, so a scrape sees the counters between two statements, never half-updated ones,
and no thread is involved. ``GET /metrics`` only; content negotiation (text or
OpenMetrics) as prometheus-client's own server does.

The metric names are a contract with the provisioned Grafana dashboard
(``docker/grafana``) and docs/deployment.md; ``docs/tuning.md`` says how to read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from fedmq.errors import ConfigError, Reason
from fedmq.strategies import knob_values
from fedmq.wire import PRIVACY_MECHANISMS

if TYPE_CHECKING:
    from fedmq.aggregator._service import Aggregator
    from fedmq.aggregator._stats import AggregatorStats

__all__ = [
    "STALENESS_BUCKETS",
    "AggregatorCollector",
    "MetricsConfig",
    "MetricsServer",
    "registry_for",
    "render_metrics",
]

# Staleness of accepted updates, in model versions.
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100)
_REQUEST_TIMEOUT_S = 10.0
_MAX_REQUEST_BYTES = 16 * 1024


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    """Where to serve metrics, and what counts as an active device.

    ``port`` 0 disables the endpoint; ``host`` is the address it listens on, loopback
    unless the operator opens it (a container: 0.0.0.0). ``active_window_s``: a device
    is active while its last applied update is at most this old.
    """

    port: int = 0
    host: str = "127.0.0.1"
    active_window_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"metrics_port: {self.port} must be in 0..65535 (0: off)")
        if not self.active_window_s > 0:
            raise ConfigError(f"active_window: {self.active_window_s} must be > 0")


def _buckets(cumulative: list[tuple[float, int]]) -> list[tuple[str, float]]:
    # Bounds spelled as prometheus-client's own histograms spell them: "0.0", "2.5", "+Inf".
    return [("+Inf" if math.isinf(b) else repr(float(b)), float(n)) for b, n in cumulative]


class AggregatorCollector(Collector):
    """Reads one aggregator's stats at scrape time."""

    def __init__(self, aggregator: Aggregator, *, active_window_s: float = 60.0) -> None:
        self._aggregator = aggregator
        self._window = active_window_s

    def collect(self) -> Iterator[Metric]:
        aggregator = self._aggregator
        stats = aggregator.stats
        yield GaugeMetricFamily(
            "fedmq_model_version", "Version of the global model", value=stats.version
        )
        # The task's metrics, by name and source (central: the aggregator's held-out set;
        # federated: the example-weighted mean of the devices' reports).
        evaluated = GaugeMetricFamily(
            "fedmq_eval_metric",
            "The task's metrics of the latest evaluated model, by source",
            labels=["name", "source"],
        )
        for source in ("central", "federated"):
            point = stats.latest(source)
            for name, value in sorted((point.metrics if point else {}).items()):
                evaluated.add_metric([name, source], value)
        yield evaluated
        # Fashion-MNIST's dashboard (docker/grafana) reads these two: kept for any task
        # whose evaluation gives "accuracy" and "loss".
        central = stats.latest("central") or stats.latest("federated")
        accuracy = GaugeMetricFamily(
            "fedmq_test_accuracy", "Accuracy of the latest evaluated model on the test set (0..1)"
        )
        loss = GaugeMetricFamily("fedmq_test_loss", "Loss of the latest evaluated model")
        if central is not None and "accuracy" in central.metrics:
            accuracy.add_metric([], central.metrics["accuracy"])
        if central is not None and "loss" in central.metrics:
            loss.add_metric([], central.metrics["loss"])
        yield accuracy
        yield loss
        fed = aggregator.fed_eval
        yield GaugeMetricFamily(
            "fedmq_eval_devices", "Devices whose evaluation report is held", value=fed.devices
        )
        yield CounterMetricFamily(
            "fedmq_eval_reports", "Device evaluation reports taken", value=stats.eval_reports
        )
        eval_rejected = CounterMetricFamily(
            "fedmq_eval_rejected", "Device evaluation reports refused, by reason", labels=["reason"]
        )
        for reason, count in sorted(stats.eval_rejected.items()):
            eval_rejected.add_metric([reason], count)
        yield eval_rejected
        yield CounterMetricFamily(
            "fedmq_model_collapses",
            "Times the global model was declared collapsing (model_collapsing log event)",
            value=stats.health.collapses,
        )
        yield GaugeMetricFamily(
            "fedmq_model_collapsing",
            "1 while the evaluations say the global model is collapsing, else 0",
            value=int(stats.health.collapsing),
        )
        yield CounterMetricFamily(
            "fedmq_updates_received", "Update messages taken from the broker", value=stats.received
        )
        yield CounterMetricFamily(
            "fedmq_updates_applied",
            "Updates accepted by the strategy (buffered ones included)",
            value=stats.applied,
        )
        rejected = CounterMetricFamily(
            "fedmq_updates_rejected", "Updates refused, by reason", labels=["reason"]
        )
        for reason in sorted({r.value for r in Reason} | set(stats.rejected)):
            rejected.add_metric([reason], stats.rejected.get(reason, 0))
        yield rejected
        yield CounterMetricFamily(
            "fedmq_updates_clipped",
            "Updates scaled down to --clip-norm on admission (--clip-mode clip)",
            value=stats.clipped,
        )
        if stats.privacy is not None:  # client-level DP is on
            dp = stats.privacy
            yield GaugeMetricFamily(
                "fedmq_dp_epsilon",
                "Client-level DP: epsilon spent so far (at fedmq_dp_delta)",
                value=dp["epsilon"],
            )
            yield GaugeMetricFamily("fedmq_dp_delta", "Client-level DP: delta", value=dp["delta"])
            yield GaugeMetricFamily(
                "fedmq_dp_steps", "Client-level DP: server steps accounted for", value=dp["steps"]
            )
            if dp["target_epsilon"] is not None:
                yield GaugeMetricFamily(
                    "fedmq_dp_target_epsilon",
                    "Client-level DP: the epsilon budget (the aggregator stops before it)",
                    value=dp["target_epsilon"],
                )
        cumulative = []
        for bound in STALENESS_BUCKETS:
            running = sum(n for d, n in stats.staleness.items() if d <= bound)
            cumulative.append((float(bound), running))
        total = sum(stats.staleness.values())
        cumulative.append((math.inf, total))
        yield HistogramMetricFamily(
            "fedmq_update_staleness",
            "Staleness of accepted updates, in model versions",
            buckets=_buckets(cumulative),
            sum_value=float(sum(d * n for d, n in stats.staleness.items())),
        )
        yield CounterMetricFamily(
            "fedmq_robust_clipped",
            "Buffered deltas the robust norm-bounded rule scaled down (FedBuff --robust"
            " norm_bounded); FedAsync's outlier check counts in fedmq_updates_rejected"
            ' {reason="outlier"}',
            value=stats.robust_clipped,
        )
        yield GaugeMetricFamily(
            "fedmq_buffer_fill",
            "Contributions buffered, not yet in the model",
            value=stats.buffered,
        )
        latency = stats.apply_seconds
        yield HistogramMetricFamily(
            "fedmq_apply_seconds",
            "Seconds to verify, decode, admit and apply an update (and publish the new model)",
            buckets=_buckets(latency.cumulative()),
            sum_value=latency.sum,
        )
        yield CounterMetricFamily(
            "fedmq_received_bytes", "Bytes of update messages received", value=stats.bytes_in
        )
        yield CounterMetricFamily(
            "fedmq_published_bytes", "Bytes of model messages published", value=stats.bytes_out
        )
        yield CounterMetricFamily(
            "fedmq_models_published", "Model messages published", value=stats.models_published
        )
        now = time.monotonic()
        yield GaugeMetricFamily(
            "fedmq_devices_seen",
            "Devices with an applied update since the aggregator started",
            value=len(stats.last_seen),
        )
        yield GaugeMetricFamily(
            "fedmq_devices_active",
            f"Devices with an applied update in the last {self._window:g} s",
            value=sum(1 for t in stats.last_seen.values() if now - t <= self._window),
        )
        yield from self._device_privacy(stats)
        yield from self._tuning(aggregator)

    def _device_privacy(self, stats: AggregatorStats) -> Iterator[Metric]:
        # The devices' own reported spend (DP-SGD / local DP). No per-device label: a
        # fleet of thousands would be thousands of series; ctl/status logs name them.
        largest = GaugeMetricFamily(
            "fedmq_device_epsilon_max",
            "Largest privacy epsilon a device reported (its own accountant), any mechanism",
        )
        by_mechanism = GaugeMetricFamily(
            "fedmq_device_epsilon_max_by_mechanism",
            "Largest privacy epsilon a device reported, by mechanism (dp-sgd, local)",
            labels=["mechanism"],
        )
        overall = stats.device_epsilon()
        if overall:
            largest.add_metric([], overall["max"])
        for mechanism in PRIVACY_MECHANISMS:
            summary = stats.device_epsilon(mechanism)
            if summary:
                by_mechanism.add_metric([mechanism], summary["max"])
        yield largest
        yield by_mechanism

    def _tuning(self, aggregator: Aggregator) -> Iterator[Metric]:
        config = aggregator.config.strategy
        values = knob_values(config)
        numbers = GaugeMetricFamily(
            "fedmq_tuning", "Strategy setting in force (changed live by fedmq ctl)", labels=["knob"]
        )
        for name, value in values.items():
            if not isinstance(value, str):
                numbers.add_metric([name], float(value))
        yield numbers
        info = GaugeMetricFamily(
            "fedmq_strategy_info",
            "The strategy and staleness function in force (value 1)",
            labels=["strategy", "staleness"],
        )
        info.add_metric([config.name, str(values.get("staleness", ""))], 1.0)
        yield info
        commands = CounterMetricFamily(
            "fedmq_control_commands", "Control commands received, by result", labels=["result"]
        )
        for result in ("applied", "rejected"):
            commands.add_metric([result], aggregator.stats.controls.get(result, 0))
        yield commands
        refused = CounterMetricFamily(
            "fedmq_control_rejected",
            "Control commands refused, by reason (docs/wire-format.md, section 11)",
            labels=["reason"],
        )
        for reason, count in sorted(aggregator.stats.control_rejected.items()):
            refused.add_metric([reason], count)
        yield refused


def render_metrics(registry: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """(body, content type) of a scrape, negotiated from its Accept header."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


class MetricsServer:
    """``GET /metrics`` on ``host:port``, served by the running event loop.

    An async context manager: listening on enter (ConfigError if the port is taken),
    closed on exit.
    """

    def __init__(self, registry: CollectorRegistry, *, host: str, port: int) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port listened on (the real one when constructed with 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> MetricsServer:
        try:
            self._server = await asyncio.start_server(
                self._serve, self._host, self._port, limit=_MAX_REQUEST_BYTES
            )
        except OSError as error:
            raise ConfigError(
                f"metrics_port: cannot listen on {self._host}:{self._port} ({error.strerror})"
            ) from None
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                request = await reader.readline()
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
            method, path, *_ = [*request.decode("latin-1").split(), "", ""]
            if method not in ("GET", "HEAD"):
                status, body, content_type = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path.split("?", 1)[0] not in ("/metrics", "/"):
                status, body, content_type = "404 Not Found", b"see /metrics\n", "text/plain"
            else:
                body, content_type = render_metrics(self._registry, headers.get("accept", ""))
                status = "200 OK"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass  # a slow or broken client: just close
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def registry_for(aggregator: Aggregator, *, active_window_s: float) -> CollectorRegistry:
    """A registry holding only this aggregator's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AggregatorCollector(aggregator, active_window_s=active_window_s))
    return registry

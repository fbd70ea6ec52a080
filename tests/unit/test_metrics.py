"""The aggregator's Prometheus metrics: names (the dashboard's contract), values, the endpoint."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from fedmq.aggregator import (
    Aggregator,
    AggregatorConfig,
    ControlConfig,
    EvalPoint,
    MetricsServer,
)
from fedmq.aggregator._histogram import Histogram
from fedmq.aggregator._metrics import registry_for, render_metrics
from fedmq.errors import ConfigError
from fedmq.strategies import FedBuffConfig, StalenessConfig, StrategyConfig
from fedmq.transport import TransportConfig, connect_aggregator, connect_participant, send_control
from fedmq.wire import ControlEnvelope, encode_control
from tests import updates
from tests.prometheus import samples
from tests.unit.test_aggregator import settled
from tests.updates import INITIAL, delta

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "docker" / "grafana" / "provisioning" / "dashboards" / "fedmq.json"
URL = "memory://metrics"
FEDBUFF = StrategyConfig(
    name="fedbuff",
    max_staleness=3,
    fedbuff=FedBuffConfig(buffer_size=2, staleness=StalenessConfig(function="constant")),
)


def update(pid: str, seq: int, base: int) -> bytes:
    return updates.update(pid, seq, base, delta(1.0))


@asynccontextmanager
async def running(job: str) -> AsyncIterator[Aggregator]:
    async with (
        connect_aggregator(TransportConfig(url=URL, job=job)) as transport,
        asyncio.TaskGroup() as tg,
    ):
        aggregator = Aggregator(
            AggregatorConfig(
                strategy=FEDBUFF,
                eval_every=0,
                publish_interval_s=0.0,
                control=ControlConfig(accept_unsigned=True),  # in-process broker
            ),
            transport,
            INITIAL,
        )
        task = tg.create_task(aggregator.run(tg), name="aggregator")
        yield aggregator
        task.cancel()


async def exercised(job: str) -> tuple[Aggregator, dict[str, float], str]:
    """An aggregator after 3 applied updates, 1 rejection, 1 control command, 1 evaluation."""
    async with running(job) as aggregator:
        async with connect_participant(TransportConfig(url=URL, job=job), "dev-1") as p:
            for body in (update("dev-1", 0, 0), update("dev-1", 1, 0), update("dev-1", 1, 0)):
                await p.publish_update(body)
        async with connect_participant(TransportConfig(url=URL, job=job), "dev-2") as p:
            await p.publish_update(update("dev-2", 0, 1))
        await settled(aggregator, 4)
        body = encode_control(ControlEnvelope(id="c", command="set", values={"server_lr": 0.5}))
        await send_control(TransportConfig(url=URL, job=job), body)
        async with asyncio.timeout(10):
            while not aggregator.stats.controls:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        central = EvalPoint(
            elapsed_s=1.0, version=1, applied=3, metrics={"accuracy": 0.75, "loss": 0.6}
        )
        federated = EvalPoint(
            elapsed_s=1.0,
            version=1,
            applied=3,
            metrics={"accuracy": 0.7, "loss": 0.65},
            source="federated",
            devices=2,
            examples=200,
        )
        aggregator.stats.evaluations += [central, federated]  # as evaluations would
        text, _ = render_metrics(registry_for(aggregator, active_window_s=60.0))
    return aggregator, samples(text.decode()), text.decode()


async def test_every_metric_of_the_dashboard_is_exported(job: str) -> None:
    _, values, _ = await exercised(job)
    dashboard = json.loads(DASHBOARD.read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(fedmq_[a-z_]+)", target["expr"])
    }
    exported = {name.split("{", 1)[0] for name in values}
    assert used, "the dashboard queries no fedmq metric?"
    assert used <= exported, f"not exported: {sorted(used - exported)}"


async def test_values_follow_the_aggregator(job: str) -> None:
    aggregator, values, text = await exercised(job)
    assert values["fedmq_model_version"] == 1 == aggregator.version
    assert values["fedmq_updates_received_total"] == 4
    assert values["fedmq_updates_applied_total"] == 3
    assert values['fedmq_updates_rejected_total{reason="duplicate"}'] == 1
    assert values['fedmq_updates_rejected_total{reason="bad_signature"}'] == 0  # every reason
    assert values["fedmq_buffer_fill"] == 1
    # staleness: 0, 0 (v0 buffer) then 0 again (dev-2 on v1): three in bucket le=0
    assert values['fedmq_update_staleness_bucket{le="0.0"}'] == 3
    assert values['fedmq_update_staleness_bucket{le="+Inf"}'] == 3
    assert values["fedmq_update_staleness_count"] == 3
    assert values["fedmq_apply_seconds_count"] == 3
    assert values["fedmq_apply_seconds_sum"] > 0
    assert values["fedmq_received_bytes_total"] == aggregator.stats.bytes_in > 0
    assert values["fedmq_published_bytes_total"] == aggregator.stats.bytes_out > 0
    assert values["fedmq_models_published_total"] == 2
    assert values["fedmq_devices_seen"] == 2 and values["fedmq_devices_active"] == 2
    assert values['fedmq_tuning{knob="server_lr"}'] == 0.5
    assert values['fedmq_tuning{knob="buffer_size"}'] == 2
    assert 'fedmq_tuning{knob="alpha"}' not in values  # not a FedBuff setting
    assert values['fedmq_strategy_info{staleness="constant",strategy="fedbuff"}'] == 1
    assert values['fedmq_control_commands_total{result="applied"}'] == 1
    assert values['fedmq_eval_metric{name="accuracy",source="central"}'] == 0.75
    assert values['fedmq_eval_metric{name="loss",source="central"}'] == 0.6
    assert values['fedmq_eval_metric{name="accuracy",source="federated"}'] == 0.7
    # the dashboard's pair: from the central evaluation, even when a federated one is newer
    assert values["fedmq_test_accuracy"] == 0.75 and values["fedmq_test_loss"] == 0.6
    assert "# HELP fedmq_buffer_fill" in text


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        h.observe(value)
    assert h.cumulative() == [(0.1, 2), (1.0, 3), (float("inf"), 4)]
    assert h.count == 4 and h.sum == pytest.approx(3.65)
    with pytest.raises(ValueError, match="ascending"):
        Histogram((1.0, 0.5))


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, "", ""


async def test_the_endpoint_serves_metrics_over_http(job: str) -> None:
    async with running(job) as aggregator:
        registry = registry_for(aggregator, active_window_s=60.0)
        async with MetricsServer(registry, host="127.0.0.1", port=0) as server:
            base = f"http://127.0.0.1:{server.port}"
            status, content_type, body = await asyncio.to_thread(_get, base + "/metrics")
            assert status == 200 and content_type.startswith("text/plain")
            assert "fedmq_model_version 0.0" in body
            assert "\nfedmq_test_accuracy " not in body  # not evaluated yet: no sample, no fake 0
            assert (await asyncio.to_thread(_get, base + "/nothing"))[0] == 404
            with pytest.raises(ConfigError, match="cannot listen"):
                async with MetricsServer(registry, host="127.0.0.1", port=server.port):
                    pass


async def test_ctl_status_prints_the_privacy_spent_and_the_counters(
    job: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedmq.admin import status

    async with running(job) as aggregator:
        spent = {"epsilon": 2.5, "delta": 1e-5, "steps": 7, "target_epsilon": 8.0}
        aggregator.stats.privacy = spent
        aggregator.stats.rejected["participation"] = 3
        registry = registry_for(aggregator, active_window_s=60.0)
        async with MetricsServer(registry, host="127.0.0.1", port=0) as server:
            url = f"http://127.0.0.1:{server.port}/metrics"
            assert await asyncio.to_thread(status, url) == 0
            out = capsys.readouterr().out.splitlines()
            assert out[0] == "client-level DP: epsilon 2.5 of 8 at delta 1e-05 after 7 server steps"
            assert "fedmq_model_version 0" in out
            assert "fedmq_dp_steps 7" in out
            assert "fedmq_updates_rejected_total{reason=participation} 3" in out
            with pytest.raises(ConfigError, match="ctl status: cannot read"):
                await asyncio.to_thread(status, f"http://127.0.0.1:{server.port}/nothing")
            with pytest.raises(ConfigError) as caught:  # credentials never in the message
                await asyncio.to_thread(status, "http://op:s3cret@127.0.0.1:1/metrics")
            assert "s3cret" not in str(caught.value) and "op:***@" in str(caught.value)

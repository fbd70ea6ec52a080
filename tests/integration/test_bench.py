"""``fedmq bench`` on the real RabbitMQ: a 5-device fleet, short, its report consistent.

No timed assertions: only that the report is produced and its numbers agree.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest

from fedmq.aggregator import AggregatorConfig, DownlinkConfig
from fedmq.codecs import CodecConfig
from fedmq.participant import ParticipantConfig
from fedmq.sim._fleet import FleetProtocol
from fedmq.sim._report import write_results
from fedmq.sim.bench import BenchConfig, run_bench
from fedmq.strategies import FedAvgConfig, FedBuffConfig, StrategyConfig
from fedmq.tasks.fashion_mnist import FmnistSettings, make_task
from fedmq.transport import TransportConfig
from tests.sensors import sensors_task

pytestmark = [pytest.mark.amqp, pytest.mark.slow]


def _config(amqp_url: str, job: str, strategy: str, codec: CodecConfig) -> BenchConfig:
    return BenchConfig(
        label=f"{strategy}-{codec.name}",
        # a picklable factory: the aggregator's own process builds its task with it
        task=functools.partial(make_task, FmnistSettings(max_examples=150, eval_examples=500)),
        protocol=FleetProtocol(
            participants=5,
            concurrency=2,
            delay_unit_s=0.2,
            mean_online_s=6.0,
            mean_offline_s=1.5,
            target=0.5,
            max_seconds=8.0,
        ),
        aggregator=AggregatorConfig(
            strategy=StrategyConfig(
                name=strategy,  # type: ignore[arg-type]
                fedbuff=FedBuffConfig(buffer_size=2),
                fedavg=FedAvgConfig(clients_per_round=2),
            ),
            eval_every=1,
            downlink=DownlinkConfig(codec=CodecConfig(name="int4"), keyframe_every=4)
            if strategy != "fedavg"
            else DownlinkConfig(),
        ),
        transport=TransportConfig(url=amqp_url, job=f"{job}-{strategy}"),
        participant=ParticipantConfig(participant_id="template", state_dir=Path("."), codec=codec),
    )


def _check(run: dict[str, Any], config: BenchConfig) -> None:
    proto = config.protocol
    assert run["wall_time_s"] >= min(proto.max_seconds, run["time_to_target_s"] or 1e9)
    # counts match: what the aggregator got was applied or dropped, by reason
    assert run["received"] == run["applied"] + sum(run["dropped"]["by_reason"].values())
    assert sum(run["staleness_histogram"].values()) == run["applied"]
    assert run["dropped"]["invalid"] == 0
    assert run["fleet"]["trained"] >= run["fleet"]["published"] > 0
    # A publish in flight when the run stopped may have reached the aggregator without
    # its confirm reaching the device: it is still in that device's outbox.
    fleet = run["fleet"]
    assert (
        run["received"]
        <= fleet["published"] + fleet["pending_in_outboxes"] + run["dropped"]["duplicate"]
    )
    # bytes add up: the aggregator received (at most) what the devices published
    assert 0 < run["uplink_bytes"] <= run["fleet_bytes_published"] * 1.5
    assert run["keyframes"] + run["deltas"] == run["models_published"]
    assert run["downlink_messages"] > 0
    assert run["downlink_bytes"] <= run["downlink_float32_bytes"]
    assert run["target"] == {"metric": "accuracy", "higher_is_better": True, "goal": 0.5}
    points = run["evaluations"]
    assert points and all(p["source"] == "central" for p in points)
    assert all(0.0 <= p["metrics"]["accuracy"] <= 1.0 for p in points)
    assert [p["bytes_in"] for p in points] == sorted(p["bytes_in"] for p in points)
    if run["reached_target"]:
        assert run["uplink_bytes_to_target"] <= run["uplink_bytes"]
        assert run["updates_to_target"] <= run["applied"]
        assert run["downlink_bytes_to_target"] <= run["downlink_bytes"]
    cost = run["aggregator_cost"]
    assert cost["cpu_s"] is not None and cost["cpu_s"] >= cost["eval_cpu_s"] >= 0
    assert cost["peak_rss_bytes"] >= cost["rss_start_bytes"] > 0
    assert run["protocol"] == dataclasses.asdict(proto)


async def test_bench_fleet_on_rabbitmq(
    amqp_url: str, job: str, data_dir: Path, tmp_path: Path
) -> None:
    runs = []
    for strategy, codec in (
        ("fedbuff", CodecConfig(name="topk", topk_values="int8")),
        ("fedavg", CodecConfig(name="float32")),
    ):
        config = _config(amqp_url, job, strategy, codec)
        run = await run_bench(config, data_dir, tmp_path / strategy)
        _check(run, config)
        runs.append(run)
    fedbuff, fedavg = runs
    assert fedbuff["deltas"] > 0  # the downlink sent deltas, and devices applied them
    assert fedavg["deltas"] == 0 and set(fedavg["staleness_histogram"]) <= {"0"}
    rounds = fedavg["rounds"]
    assert rounds and all(1 <= len(r["participants"]) <= 2 for r in rounds)
    assert all(r["participants"] == sorted(r["participants"]) for r in rounds)
    write_results(tmp_path, runs, title="test")
    assert (tmp_path / "report.md").read_text().count("| fed") >= 4
    for name in ("accuracy_time.png", "accuracy_uplink.png", "staleness.png", "report.json"):
        assert (tmp_path / name).stat().st_size > 0


async def test_bench_task_without_central_data_stops_on_the_devices_reports(
    amqp_url: str, job: str, tmp_path: Path
) -> None:
    # The aggregator's process builds the task from the picklable factory; with no
    # central held-out set it records the devices' reports (federated evaluations).
    config = dataclasses.replace(
        _config(amqp_url, job, "fedasync", CodecConfig(name="float32")),
        label="sensors",
        task=sensors_task,
        participant=ParticipantConfig(participant_id="template", state_dir=Path("."), eval_every=1),
    )
    config = dataclasses.replace(
        config,
        protocol=dataclasses.replace(config.protocol, participants=6, target=None),
        aggregator=dataclasses.replace(config.aggregator, downlink=DownlinkConfig()),
    )
    run = await run_bench(config, tmp_path, tmp_path / "sensors")
    assert run["target"] == {"metric": "rmse", "higher_is_better": False, "goal": 0.05}
    assert run["evaluation_source"] == "federated"
    points = run["evaluations"]
    assert points and all(p["source"] == "federated" and p["devices"] == 5 for p in points)
    assert run["eval_reports"] >= len(points)
    assert run["received"] == run["applied"] + sum(run["dropped"]["by_reason"].values())
    write_results(tmp_path, [run], title="sensors")
    assert (tmp_path / "rmse_time.png").stat().st_size > 0

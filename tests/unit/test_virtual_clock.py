"""``fedmq bench --virtual``: a 200-device fleet on the virtual clock, its report consistent;
a task without central data is scored by its devices, combined as the aggregator does."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import pytest

from fedmq.aggregator import AggregatorConfig, DownlinkConfig
from fedmq.codecs import CodecConfig
from fedmq.errors import ConfigError
from fedmq.models import Training
from fedmq.participant import ParticipantConfig
from fedmq.privacy import ClientDPConfig
from fedmq.sim._fleet import FleetProtocol
from fedmq.sim._report import write_results
from fedmq.sim.bench import BenchConfig, TaskFactory
from fedmq.sim.virtual import VirtualConfig, run_virtual
from fedmq.strategies import FedBuffConfig, StrategyConfig
from fedmq.tasks import Task
from fedmq.tasks.fashion_mnist import FmnistSettings, make_task
from fedmq.transport import TransportConfig
from tests.sensors import held_out_sizes, sensor_fleet, sensors_task

_SMALL_FMNIST = functools.partial(make_task, FmnistSettings(max_examples=16, eval_examples=500))


def _config(
    strategy: str,
    codec: CodecConfig,
    task: TaskFactory = _SMALL_FMNIST,
    participants: int = 200,
    target: float | None = 0.6,
) -> VirtualConfig:
    bench = BenchConfig(
        label="virtual",
        task=task,
        protocol=FleetProtocol(participants=participants, target=target, max_seconds=5.0),
        aggregator=AggregatorConfig(
            strategy=StrategyConfig(name=strategy),  # type: ignore[arg-type]
            downlink=DownlinkConfig(codec=CodecConfig(name="int4"), keyframe_every=10),
        ),
        transport=TransportConfig(url="memory://virtual"),
        participant=ParticipantConfig(participant_id="template", state_dir=Path("."), codec=codec),
    )
    return VirtualConfig(bench=bench, eval_every_s=2.0)


@pytest.mark.parametrize(
    ("strategy", "codec"),
    [
        ("fedbuff", CodecConfig(name="topk", topk_values="int8")),
        ("fedavg", CodecConfig(name="float32")),
    ],
)
def test_virtual_fleet_report_is_consistent(
    strategy: str, codec: CodecConfig, data_dir: Path, tmp_path: Path
) -> None:
    config = _config(strategy, codec)
    run = run_virtual(config, data_dir)
    proto = config.bench.protocol
    scale = run["scale"]
    assert scale["devices"] == 200
    assert 0 < run["wall_time_s"] <= proto.max_seconds
    assert scale["simulated_s"] == run["wall_time_s"]
    # counts match: every delivered update is applied or dropped, as the histogram says
    assert run["received"] == run["fleet"]["published"] > 0
    assert run["received"] == run["applied"] + sum(run["dropped"]["by_reason"].values())
    assert sum(run["staleness_histogram"].values()) == run["applied"]
    assert run["fleet"]["trained"] >= run["fleet"]["published"]
    # bytes add up: every update of this codec has the same size up to a few header bytes
    per_update = run["uplink_bytes"] / run["received"]
    assert 0 < per_update < 3_000 if codec.name == "topk" else 116_000 < per_update < 117_000
    assert run["target"] == {"metric": "accuracy", "higher_is_better": True, "goal": 0.6}
    assert run["evaluation_source"] == "central"
    points = run["evaluations"]
    assert all(p["source"] == "central" and p["examples"] == 500 for p in points)
    assert all(0.0 <= p["metrics"]["accuracy"] <= 1.0 for p in points)
    assert [p["bytes_in"] for p in points] == sorted(p["bytes_in"] for p in points)
    assert points[-1]["bytes_in"] <= run["uplink_bytes"]
    assert run["keyframes"] + run["deltas"] == run["models_published"] == run["version"] + 1
    assert run["downlink_bytes"] <= run["downlink_float32_bytes"]
    if run["reached_target"]:
        assert run["uplink_bytes_to_target"] <= run["uplink_bytes"]
        assert run["time_to_target_s"] <= run["wall_time_s"]
        assert run["updates_to_target"] <= run["applied"]
    if strategy == "fedavg":
        assert set(run["staleness_histogram"]) <= {"0"}
        assert run["rounds"] >= run["version"]
    write_results(tmp_path, [run], title="virtual")
    assert {p.name for p in tmp_path.iterdir()} >= {
        "report.json",
        "report.md",
        "accuracy_time.png",
        "accuracy_uplink.png",
        "staleness.png",
    }
    assert "final accuracy" in (tmp_path / "report.md").read_text()


def test_virtual_runs_are_deterministic(data_dir: Path) -> None:
    config = _config("fedasync", CodecConfig(name="int8"))
    config = dataclasses.replace(
        config,
        bench=dataclasses.replace(
            config.bench, protocol=dataclasses.replace(config.bench.protocol, max_seconds=2.0)
        ),
    )
    first, second = run_virtual(config, data_dir), run_virtual(config, data_dir)
    assert first["evaluations"] == second["evaluations"]
    assert first["staleness_histogram"] == second["staleness_histogram"]


def test_virtual_run_stops_at_max_versions_and_reports_update_norms(data_dir: Path) -> None:
    config = _config("fedasync", CodecConfig(name="float32"), target=None)
    protocol = dataclasses.replace(config.bench.protocol, max_versions=7, max_seconds=60.0)
    config = dataclasses.replace(config, bench=dataclasses.replace(config.bench, protocol=protocol))
    run = run_virtual(config, data_dir)
    assert run["version"] == 7 and run["wall_time_s"] < 60.0  # stopped by the version, not time
    assert run["evaluations"][-1]["version"] == 7  # the final model is scored
    norms = run["update_norms"]
    assert norms["count"] == run["received"] - run["dropped"]["too_stale"]  # every decoded one
    assert 0 < norms["p10"] <= norms["median"] <= norms["p90"] <= norms["max"]
    with pytest.raises(ConfigError, match=r"^max_versions: -1 must be >= 0"):
        FleetProtocol(max_versions=-1)


def _dp_config(min_gap: int, buffer_size: int = 20, participants: int = 200) -> VirtualConfig:
    config = _config("fedbuff", CodecConfig(name="float32"), participants=participants, target=None)
    bench = config.bench
    aggregator = dataclasses.replace(
        bench.aggregator,
        strategy=StrategyConfig(name="fedbuff", fedbuff=FedBuffConfig(buffer_size=buffer_size)),
        privacy=ClientDPConfig(clip_norm=0.3, noise_multiplier=1.0, min_gap=min_gap),
    )
    protocol = dataclasses.replace(bench.protocol, max_versions=12, max_seconds=60.0)
    return dataclasses.replace(
        config, bench=dataclasses.replace(bench, aggregator=aggregator, protocol=protocol)
    )


def test_virtual_dp_refuses_by_participation_without_training_the_refused(
    data_dir: Path,
) -> None:
    run = run_virtual(_dp_config(min_gap=4), data_dir)
    assert run["version"] == 12 and run["dp"]["steps"] == 12
    refused = run["dropped"]["by_reason"]["participation"]
    assert refused > 0
    # a refused update is never computed: only the applied ones were decoded
    assert run["update_norms"]["count"] == run["applied"]
    assert run["received"] == run["applied"] + sum(run["dropped"]["by_reason"].values())


def test_virtual_dp_refuses_a_min_gap_the_fleet_cannot_fill(data_dir: Path) -> None:
    # 11 consecutive steps of 20 distinct devices need 220 devices; there are 200.
    with pytest.raises(ConfigError, match=r"^dp min_gap: 11 x buffer_size 20 = 220 .* has 200"):
        run_virtual(_dp_config(min_gap=11), data_dir)


def _diverging_task() -> Task:
    # A local learning rate that blows the weights up: every training gives NaN/Inf.
    task = _SMALL_FMNIST()
    return dataclasses.replace(task, training=Training(epochs=1, batch_size=4, lr=1e38))


def test_virtual_devices_whose_training_diverges_skip_their_updates(data_dir: Path) -> None:
    # Before: the encoder's ValueError ended the run; now each is skipped and counted.
    config = _config("fedasync", CodecConfig(name="float32"), task=_diverging_task)
    bench = config.bench
    protocol = dataclasses.replace(bench.protocol, max_seconds=2.0)
    config = dataclasses.replace(config, bench=dataclasses.replace(bench, protocol=protocol))
    run = run_virtual(config, data_dir)
    assert run["fleet"]["skipped"]["non_finite"] > 0
    assert run["received"] == run["applied"] + sum(run["dropped"]["by_reason"].values())
    assert (
        run["fleet"]["trained"] >= run["fleet"]["published"] + run["fleet"]["skipped"]["non_finite"]
    )


def test_virtual_task_without_central_data_is_scored_by_its_devices(
    tmp_path: Path,
) -> None:
    config = _config(
        "fedasync", CodecConfig(name="int8"), sensors_task, participants=6, target=None
    )
    run = run_virtual(config, tmp_path)
    assert run["target"] == {"metric": "rmse", "higher_is_better": False, "goal": 0.05}
    assert run["evaluation_source"] == "federated"
    points = run["evaluations"]
    held_out = held_out_sizes(6)[:-1]
    assert points and all(
        p["source"] == "federated" and p["devices"] == 5 and p["examples"] == sum(held_out)
        for p in points
    )
    # the first point is the initial model, scored by each device and example-weighted
    task, fleet = sensors_task(), sensor_fleet(tmp_path, 6, 0)
    model = task.build_model(0)
    scores = [task.score(model, d.held_out)["rmse"] for d in fleet[:-1]]
    expected = sum(n * s for n, s in zip(held_out, scores, strict=True)) / sum(held_out)
    assert math.isclose(points[0]["metrics"]["rmse"], expected, rel_tol=1e-9)
    # it learns the line, and lower is better: the best value is the smallest
    assert run["best"] == min(p["metrics"]["rmse"] for p in points) < points[0]["metrics"]["rmse"]
    if run["reached_target"]:
        assert run["final"] <= 0.05
    write_results(tmp_path / "out", [run], title="sensors")
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"rmse_time.png", "rmse_uplink.png"}

"""``fedmq bench --virtual``: a 200-device fleet on the virtual clock, its report consistent."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedmq.aggregator import AggregatorConfig, DownlinkConfig
from fedmq.codecs import CodecConfig
from fedmq.participant import ParticipantConfig
from fedmq.sim._fleet import FleetProtocol
from fedmq.sim._report import write_results
from fedmq.sim.bench import BenchConfig
from fedmq.sim.virtual import VirtualConfig, run_virtual
from fedmq.strategies import StrategyConfig
from fedmq.transport import TransportConfig


def _config(strategy: str, codec: CodecConfig) -> VirtualConfig:
    bench = BenchConfig(
        label="virtual",
        protocol=FleetProtocol(participants=200, target_accuracy=0.6, max_seconds=5.0),
        aggregator=AggregatorConfig(
            strategy=StrategyConfig(name=strategy),  # type: ignore[arg-type]
            eval_examples=500,
            downlink=DownlinkConfig(codec=CodecConfig(name="int4"), keyframe_every=10),
        ),
        transport=TransportConfig(url="memory://virtual"),
        participant=ParticipantConfig(participant_id="template", state_dir=Path("."), codec=codec),
        max_examples=16,
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
    run = run_virtual(config, str(data_dir))
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
    points = run["accuracy"]
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in points)
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


def test_virtual_runs_are_deterministic(data_dir: Path) -> None:
    config = _config("fedasync", CodecConfig(name="int8"))
    config = dataclasses.replace(
        config,
        bench=dataclasses.replace(
            config.bench, protocol=dataclasses.replace(config.bench.protocol, max_seconds=2.0)
        ),
    )
    first, second = run_virtual(config, str(data_dir)), run_virtual(config, str(data_dir))
    assert first["accuracy"] == second["accuracy"]
    assert first["staleness_histogram"] == second["staleness_histogram"]


def test_virtual_devices_whose_training_diverges_skip_their_updates(data_dir: Path) -> None:
    # A local learning rate that blows the weights up: every training gives NaN/Inf.
    # Before: the encoder's ValueError ended the run; now each is skipped and counted.
    config = _config("fedasync", CodecConfig(name="float32"))
    bench = config.bench
    blowing_up = dataclasses.replace(bench.participant, lr=1e38, batch_size=4)
    protocol = dataclasses.replace(bench.protocol, max_seconds=2.0)
    config = dataclasses.replace(
        config, bench=dataclasses.replace(bench, participant=blowing_up, protocol=protocol)
    )
    run = run_virtual(config, str(data_dir))
    assert run["fleet"]["skipped"]["non_finite"] > 0
    assert run["received"] == run["applied"] + sum(run["dropped"]["by_reason"].values())
    assert (
        run["fleet"]["trained"] >= run["fleet"]["published"] + run["fleet"]["skipped"]["non_finite"]
    )

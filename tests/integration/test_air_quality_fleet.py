"""The air-quality fleet, as a user runs it: 12 stations over a real broker beat
persistence on their own held-out year.

``fedmq demo --task air-quality --broker mqtt://...``: one device per station file,
each normalising and evaluating on its own data; the aggregator holds no data and stops
when the devices' combined RMSE (example-weighted, their validation year) is below the
persistence forecast's on the same windows ("PM2.5 in 6 hours = PM2.5 now").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmq.tasks.air_quality import Metrics, load_data, stations

BUDGET_S = 240


def persistence_rmse(data_dir: Path) -> float:
    """The fleet's persistence RMSE, combined as the aggregator combines the devices'."""
    readings = []
    for _, path in stations(data_dir):
        held_out = load_data(path).held_out
        windows = held_out.windows  # type: ignore[attr-defined]
        readings.append((len(held_out), Metrics.of(windows.persistence, windows.target).rmse))  # type: ignore[arg-type]
    total = sum(n for n, _ in readings)
    return sum(n * rmse for n, rmse in readings) / total


@pytest.mark.slow
@pytest.mark.mqtt
def test_twelve_stations_over_a_real_broker_beat_persistence(
    mqtt_url: str, job: str, tmp_path: Path, data_dir: Path
) -> None:
    goal = persistence_rmse(data_dir)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "fedmq.cli", "demo",
        "--task", "air-quality",
        "--data-dir", str(data_dir),
        "--broker", mqtt_url,
        "--job", job,
        "--target", f"{goal:.4f}",
        "--max-seconds", str(BUDGET_S),
        "--out-dir", str(out),
        "--log-level", "warning",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=BUDGET_S + 120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation_source"] == "federated"  # the aggregator held no data
    assert report["reached_target"] and report["final"] < goal
    assert len(report["devices"]) == 12
    assert (out / "model.npz").is_file()

"""A user's own task, run by path as docs/tasks.md says, over the real brokers.

``examples/sensors/task.py`` (a 1-D conv with BatchNorm, its own training loop, RMSE in
°C) is given to real ``fedmq aggregator`` and ``fedmq participant`` processes with
``--task FILE.py:OBJECT``; each participant reads only its own station file (``--data``).
Nothing scores centrally: the fleet's RMSE is what the devices report, combined by the
aggregator (its ``evaluated source=federated`` log lines and the Prometheus gauge
``fedmq_eval_metric{name="rmse",source="federated"}``).
"""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.brokers import REPO, forget_mqtt_job, free_port
from tests.integration.fleet import Event, FedmqProcess, wait_for

TASK = f"{REPO / 'examples' / 'sensors' / 'task.py'}:task"
STATIONS = ("Aotizhongxin", "Dongsi", "Huairou")
MARGIN = 0.6  # the fleet's RMSE must fall below 60% of its first value (~6.5 °C at start)
BUDGET_S = 60.0


def station_file(data_dir: Path, station: str) -> Path:
    found = sorted((data_dir / "beijing-air-quality").glob(f"**/PRSA_Data_{station}_*.csv*"))
    if not found:
        pytest.fail(f"no PRSA_Data_{station}_*.csv under {data_dir / 'beijing-air-quality'}")
    return found[0]


def fleet_rmse(aggregator: FedmqProcess) -> list[float]:
    """The fleet's RMSE, in the order the aggregator recorded it."""
    points: list[Event] = aggregator.events("evaluated")
    return [e["metrics"]["rmse"] for e in points if e.get("source") == "federated"]


def scraped_rmse(port: int) -> float | None:
    """``fedmq_eval_metric{name="rmse",source="federated"}`` from the metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fedmq_eval_metric" and sample.labels == {
                "name": "rmse",
                "source": "federated",
            }:
                return float(sample.value)
    return None


@pytest.mark.slow
async def test_a_users_own_task_file_trains_over_a_real_broker(
    broker: str, job: str, tmp_path: Path, data_dir: Path
) -> None:
    port = free_port()
    ids = [station.lower() for station in STATIONS]
    common = ["--task", TASK, "--broker", broker, "--job", job]
    procs = [
        FedmqProcess(
            "aggregator",
            ["aggregator", *common, "--metrics-port", str(port), "--fed-eval-min-devices", "3"],
            tmp_path,
            data_dir,
        )
    ]
    procs += [
        FedmqProcess(
            pid,
            [
                "participant",
                *common,
                "--id",
                pid,
                "--data",
                str(station_file(data_dir, station)),
                "--state-dir",
                str(tmp_path / "state" / pid),
                "--device-eval-every",
                "2",
            ],
            tmp_path,
            data_dir,
        )
        for pid, station in zip(ids, STATIONS, strict=True)
    ]
    aggregator = procs[0]
    started = time.monotonic()
    try:
        first = await asyncio.to_thread(
            wait_for, lambda: fleet_rmse(aggregator), BUDGET_S, "a fleet evaluation", procs
        )
        assert first[0] > 3.0, f"an untrained model forecasts {first[0]:.2f} °C off: too good"
        learned = await asyncio.to_thread(
            wait_for,
            lambda: fleet_rmse(aggregator)[-1] < MARGIN * first[0],
            BUDGET_S - (time.monotonic() - started),
            f"a fleet RMSE below {MARGIN} x {first[0]:.2f} °C",
            procs,
        )
        assert learned
        scraped = scraped_rmse(port)
        assert scraped is not None and scraped < MARGIN * first[0], scraped
        # Every device trained and reported, each on its own file.
        applied = {e.get("participant") for e in aggregator.events("accepted")}
        assert applied >= set(ids), applied
    finally:
        for proc in procs:  # all at once: each takes a few seconds to exit
            proc.popen.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.stop()
        if broker.startswith("mqtt"):  # the fixture forgets dev-01's session, not these
            await forget_mqtt_job(broker, job, ids)

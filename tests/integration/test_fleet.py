"""A real fleet through a real broker: processes, Fashion-MNIST, kills and restarts.

One aggregator and five participants run as separate ``fedmq`` processes
against the real RabbitMQ and the real Mosquitto. The tests read the
processes' JSON log events to check what happened.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.fleet import (
    FedmqProcess,
    accepted_seqs,
    best_accuracy,
    latest_version,
    wait_for,
)

FLEET = 5
TARGET = 0.70  # on 2,000 test images, from 1,500 training images per device


class Fleet:
    """Starts and tracks the processes of one job; stops them all at the end."""

    def __init__(self, url: str, job: str, tmp: Path, data_dir: Path) -> None:
        self.url, self.job, self.tmp, self.data_dir = url, job, tmp, data_dir
        self.procs: list[FedmqProcess] = []

    def _start(self, name: str, args: list[str]) -> FedmqProcess:
        proc = FedmqProcess(
            name, [*args, "--broker", self.url, "--job", self.job], self.tmp, self.data_dir
        )
        self.procs.append(proc)
        return proc

    def aggregator(self) -> FedmqProcess:
        return self._start(
            "aggregator",
            [
                "aggregator",
                "--strategy",
                "fedasync",
                "--eval-every",
                "3",
                "--eval-examples",
                "2000",
            ],
        )

    def participant(self, index: int, pid: str | None = None, run: int = 0) -> FedmqProcess:
        """Device ``pid`` on shard ``index``; ``run`` > 0 restarts it with the same state."""
        pid = pid or f"dev-{index}"
        return self._start(
            f"{pid}.run{run}",
            [
                "participant",
                "--id",
                pid,
                "--shard",
                f"{index}/{FLEET}",
                "--max-examples",
                "1500",
                "--state-dir",
                str(self.tmp / "state" / pid),
            ],
        )

    def alive(self) -> list[FedmqProcess]:
        return [p for p in self.procs if p.popen.poll() is None]

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


@pytest.fixture(
    params=[
        pytest.param("amqp", marks=pytest.mark.amqp),
        pytest.param("mqtt", marks=pytest.mark.mqtt),
    ]
)
def fleet(
    request: pytest.FixtureRequest, job: str, tmp_path: Path, data_dir: Path
) -> Iterator[Fleet]:
    url = request.getfixturevalue(f"{request.param}_url")
    fleet = Fleet(url, job, tmp_path, data_dir)
    yield fleet
    fleet.stop()


@pytest.mark.slow
def test_fleet_learns_late_joiner_and_restarted_participant(fleet: Fleet) -> None:
    aggregator = fleet.aggregator()
    devices = [fleet.participant(i) for i in range(FLEET)]

    wait_for(
        lambda: best_accuracy(aggregator) >= TARGET, 240, f"test accuracy {TARGET}", fleet.alive()
    )

    # A participant started late gets the current model at once, not version 0.
    version_now = latest_version(aggregator)
    late = fleet.participant(0, "dev-late")
    first = wait_for(
        lambda: late.events("first_model"), 30, "the late joiner's model", fleet.alive()
    )
    assert first[0]["version"] >= version_now

    # A participant killed (SIGKILL) and restarted carries on with its sequence.
    wait_for(
        lambda: len(accepted_seqs(aggregator, "dev-1")) >= 2, 60, "dev-1 updates", fleet.alive()
    )
    devices[1].kill()
    before = accepted_seqs(aggregator, "dev-1")
    restarted = fleet.participant(1, run=1)  # same id, same state dir
    resumed = wait_for(lambda: restarted.events("resuming"), 30, "dev-1 restart", fleet.alive())
    assert resumed[0]["next_seq"] > max(before)
    wait_for(
        lambda: len(accepted_seqs(aggregator, "dev-1")) >= len(before) + 2,
        90,
        "dev-1 updates after the restart",
        fleet.alive(),
    )
    seqs = accepted_seqs(aggregator, "dev-1")
    assert seqs == sorted(set(seqs)), "a sequence number was applied twice or out of order"
    # Anything refused was a harmless resend of an update the broker had already taken.
    reasons = {e["reason"] for e in aggregator.events("rejected")}
    assert reasons <= {"duplicate", "too_stale"}, reasons

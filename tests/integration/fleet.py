"""Run real ``fedmq`` processes for fleet tests and read their JSON log events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Event = dict[str, Any]


class FedmqProcess:
    """One ``python -m fedmq.cli ...`` process logging JSON lines to a file."""

    def __init__(self, name: str, args: list[str], log_dir: Path, data_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {
            **os.environ,
            "FEDMQ_DATA_DIR": str(data_dir),
            "FEDMQ_LOG_FORMAT": "json",
            "FEDMQ_LOG_LEVEL": "debug",
            "PYTHONUNBUFFERED": "1",
        }
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "fedmq.cli", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def events(self, name: str | None = None) -> list[Event]:
        """Every JSON event logged so far (optionally only those called ``name``)."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written right now
            if name is None or event.get("event") == name:
                found.append(event)
        return found

    def kill(self) -> None:
        """SIGKILL: no cleanup, like a device losing power."""
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit within ``timeout``."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()
        return self.popen.returncode

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_for(
    condition: Callable[[], Any], timeout: float, what: str, procs: list[FedmqProcess]
) -> Any:
    """Poll ``condition`` until it returns something truthy, or fail with the logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        for proc in procs:
            if proc.popen.poll() is not None:
                raise AssertionError(
                    f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}"
                )
        time.sleep(0.5)
    logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def accepted_seqs(aggregator: FedmqProcess, participant: str) -> list[int]:
    """Sequence numbers of ``participant``'s updates the aggregator accepted, in order."""
    return [e["seq"] for e in aggregator.events("accepted") if e.get("participant") == participant]


def central_accuracies(aggregator: FedmqProcess) -> list[float]:
    """The test-set accuracy of each of the aggregator's own ("central") evaluations."""
    events = aggregator.events("evaluated")
    return [e["metrics"]["accuracy"] for e in events if e["source"] == "central"]


def best_accuracy(aggregator: FedmqProcess) -> float:
    return max(central_accuracies(aggregator), default=0.0)


def latest_version(aggregator: FedmqProcess) -> int:
    return max((e["version"] for e in aggregator.events("published")), default=-1)

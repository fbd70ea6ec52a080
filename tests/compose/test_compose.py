"""docker compose up, for real: the deployment in docker/ trains on a real Docker engine.

One test walks an operator's day over the real containers of one compose project
(docker/docker-compose.yml, plus docker/compose.debian.yml when FEDMQ_BASE_IMAGE names a
base image made by docker/debian/base-image.sh, plus tests/compose/compose.test.yml):

1. build the images and `up --wait` with 2 participants, until every health check passes;
2. the aggregator's model version grows and its test accuracy reaches TARGET_ACCURACY,
   read through Prometheus, which scrapes the aggregator: the applied-updates counter is
   queried there too, and every query of the Grafana dashboard has data;
3. TLS and per-device credentials are in force inside the compose network: every fedmq
   connection is TLS, a device container with a wrong password is refused, and one that
   does not trust the fedmq CA cannot connect;
4. `docker compose kill aggregator`, then `up`: it resumes from the checkpoint volume;
5. a third device's account is added as docs/deployment.md says, and `--scale
   participant=3` starts a device that finds its own shard (2/3) and is applied;
6. the devices stop, the aggregator drains the queue and stops, and every update a device
   published is reconciled with what was applied (tests/integration/chaos.py's
   reconciliation): none lost, none applied twice, no model version published twice;
7. `down -v`: containers, network and volumes are removed (the images stay, as a cache).

It prints what it measured (build time, time to the first applied update, accuracy, the
Prometheus query, the reconciliation). Marked ``compose``: the default pytest run
deselects it; .ci/run runs it (`pytest -m compose`) after installing and starting a
Docker engine. Without an engine or Compose it skips, and with CI=true it fails.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from tests.compose.project import ComposeProject, compose_command, engine_problem
from tests.integration.brokers import REPO, make_certs, world_readable_tmpdir
from tests.integration.chaos import check_versions, reconcile
from tests.integration.fleet import Event

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

PROJECT = "fedmq-compose-test"
TARGET_ACCURACY = 0.75  # on EVAL_EXAMPLES test images, devices training on MAX_EXAMPLES each
MAX_EXAMPLES = 1000
EVAL_EXAMPLES = 2000
ENTRYPOINT_SAYS = re.compile(r"fedmq-entrypoint: participant (?P<device>\S+) shard (?P<shard>\S+)")
APPLIED_QUERY = 'fedmq_updates_applied_total{job="fedmq-aggregator"}'
# What `docs/deployment.md`, "Add a device", grants a device (the demo's dev-02 has these).
DEVICE_PERMISSIONS = (
    r"^mqtt-subscription-fedmq-.+-p-[A-Za-z0-9_-]+qos[01]$",
    r"^(fedmq\.default\.uplink|amq\.topic|mqtt-subscription-fedmq-.+-p-[A-Za-z0-9_-]+qos[01])$",
    r"^(amq\.topic|fedmq\.[^.]+\.models|mqtt-subscription-fedmq-.+-p-[A-Za-z0-9_-]+qos[01])$",
)
DEVICE_TOPIC_PERMISSIONS = (r"^fedmq\.[^.]+\.updates\.{username}$", r"^fedmq\.[^.]+\.model$")


def _cannot_run(message: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: the compose test must run)")
    pytest.skip(message)


def report(line: str) -> None:
    print(f"compose: {line}", flush=True)


@pytest.fixture
def project(data_dir: Path) -> Iterator[ComposeProject]:
    """The compose project, torn down with its volumes whatever happens."""
    problem = engine_problem()
    if problem:
        _cannot_run(problem)
    command = compose_command()
    if command is None:
        _cannot_run(
            "no Compose v2: neither `docker compose` nor a `docker-compose` reporting errors"
        )
    work = world_readable_tmpdir("fedmq-compose-")
    # Keys readable by the broker's own user (uid 999), as for the compose demo.
    make_certs(work / "certs", key_mode="0644")
    (work / "certs").chmod(0o755)
    devices = (REPO / "docker" / "demo-secrets" / "devices").read_text().rstrip("\n")
    dev03_password = secrets.token_urlsafe(18)
    (work / "devices").write_text(f"{devices}\ndev-03:{dev03_password}\n")
    files = [REPO / "docker" / "docker-compose.yml"]
    if os.environ.get("FEDMQ_BASE_IMAGE"):
        files.append(REPO / "docker" / "compose.debian.yml")
    files.append(Path(__file__).with_name("compose.test.yml"))
    compose = ComposeProject(
        command=command,
        name=PROJECT,
        files=files,
        env={
            "FEDMQ_PARTICIPANTS": "2",
            "FEDMQ_HOST_DATA_DIR": str(data_dir.resolve()),
            "FEDMQ_TEST_CERTS": str(work / "certs"),
            "FEDMQ_TEST_DEVICES": str(work / "devices"),
            "FEDMQ_TEST_MAX_EXAMPLES": str(MAX_EXAMPLES),
            "FEDMQ_TEST_EVAL_EXAMPLES": str(EVAL_EXAMPLES),
            "FEDMQ_TEST_DEV03_PASSWORD": dev03_password,
        },
    )
    compose.run("down", "-v", "--remove-orphans", "-t", "5")  # a crashed earlier run's
    try:
        yield compose
    finally:
        started = time.monotonic()
        compose.run("down", "-v", "--remove-orphans", "-t", "20", check=False)
        report(f"down -v: {time.monotonic() - started:.0f} s")
        shutil.rmtree(work, ignore_errors=True)


def test_compose_deployment_trains_resumes_scales_and_loses_nothing(
    project: ComposeProject,
) -> None:
    started = time.monotonic()
    report(f"files: {' + '.join(str(f.relative_to(REPO)) for f in project.files)}")

    # 1. Build, then up with 2 participants until the health checks pass.
    t = time.monotonic()
    project.run("build", timeout=1800)
    report(f"build: {time.monotonic() - t:.0f} s")
    up_at = time.time()
    project.run("up", "-d", "--wait", "--wait-timeout", "300", timeout=420)
    report(f"up --wait (rabbitmq, aggregator, prometheus healthy): {time.time() - up_at:.0f} s")

    # 2. Training, seen through Prometheus.
    applied = first_apply(project)
    report(
        f"first applied update: {applied['ts'] - up_at:.1f} s after `up` "
        f"({applied['participant']} seq {applied['seq']})"
    )
    version_then = _wait_value(project, 'fedmq_model_version{job="fedmq-aggregator"}')
    best = project.wait_for(
        f"test accuracy >= {TARGET_ACCURACY} through Prometheus",
        lambda: _at_least(
            project.prometheus_value(
                'max_over_time(fedmq_test_accuracy{job="fedmq-aggregator"}[30m])'
            ),
            TARGET_ACCURACY,
        ),
        timeout=600,
    )
    version_now = _wait_value(project, 'fedmq_model_version{job="fedmq-aggregator"}')
    assert version_now > version_then, (version_then, version_now)
    report(
        f"accuracy {best:.3f} >= {TARGET_ACCURACY} {time.time() - up_at:.0f} s after `up`; "
        f"model version {version_then:.0f} -> {version_now:.0f}"
    )
    result = project.prometheus(APPLIED_QUERY)
    assert len(result) == 1 and float(result[0]["value"][1]) > 0, result
    report(f"prometheus query {APPLIED_QUERY} -> {result[0]['metric']} = {result[0]['value'][1]}")
    assert project.prometheus_value('up{job="fedmq-aggregator"}') == 1.0
    check_dashboard_queries(project)

    # 3. TLS and per-device credentials inside the compose network.
    check_tls_and_credentials(project)

    # 4. Kill the aggregator; `up` resumes it from the checkpoint volume.
    # Killed while it holds applies that no checkpoint covers yet: the restart must redo them.
    uncovered = project.wait_for(
        "applies newer than the last checkpoint", lambda: _uncovered(project), 60
    )
    project.run("kill", "aggregator")
    time.sleep(5)  # the devices go on publishing into the broker's queue meanwhile
    t = time.monotonic()
    project.run("up", "-d", "--wait", "--wait-timeout", "180", "aggregator", timeout=240)
    resumed = project.wait_for(
        "the restarted aggregator's 'resumed' event", lambda: _resumed(project), timeout=60
    )
    report(
        f"kill aggregator after {uncovered} applies beyond its last checkpoint; up again in "
        f"{time.monotonic() - t:.0f} s, resumed from the checkpoint at version "
        f"{resumed['version']} (commit {resumed['commit']})"
    )
    applied_before = sum(1 for e in aggregator_runs(project)[0] if e["event"] == "accepted")
    project.wait_for(
        "the applied-updates counter past the killed run's count",
        lambda: _at_least(project.prometheus_value(APPLIED_QUERY), applied_before + 1),
        timeout=120,
    )

    # 5. A third device: its broker account (docs/deployment.md, "Add a device"), then scale.
    add_device(project, "dev-03", project.env["FEDMQ_TEST_DEV03_PASSWORD"])
    project.snapshot_logs()  # dev-01 and dev-02 are re-created with 3 shards: keep their logs
    scale_at = time.time()
    project.run(
        "up",
        "-d",
        "--scale",
        "participant=3",
        "--wait",
        "--wait-timeout",
        "180",
        env={"FEDMQ_PARTICIPANTS": "3"},
        timeout=240,
    )
    first_dev03 = first_apply(project, participant="dev-03")
    project.wait_for("3 updates of dev-03 applied", lambda: _applied(project, "dev-03") >= 3, 120)
    # The entrypoint says which device and shard each replica found for itself.
    found = [ENTRYPOINT_SAYS.fullmatch(line) for line in project.lines("participant")]
    shards = {m["device"]: m["shard"] for m in found if m and m["shard"].endswith("/3")}
    assert shards == {"dev-01": "0/3", "dev-02": "1/3", "dev-03": "2/3"}, shards
    report(
        f"--scale participant=3: shards {shards}; dev-03's first update applied "
        f"{first_dev03['ts'] - scale_at:.0f} s after `up --scale`"
    )

    # 6. Stop the devices, drain, stop the aggregator (final checkpoint), reconcile.
    project.run("stop", "participant", timeout=120)
    project.wait_for("the updates queue to drain", lambda: _queue_empty(project), timeout=180)
    project.run("stop", "aggregator", timeout=120)
    runs = aggregator_runs(project)
    by_device: dict[str, list[Event]] = {}
    for event in project.events("participant"):
        if "participant" in event:
            by_device.setdefault(event["participant"], []).append(event)
    assert len(runs) == 2, [run[0] for run in runs]
    audit = reconcile(runs, by_device)
    versions = check_versions(runs)
    for line in audit.table().splitlines():
        report(f"  {line}")
    report(
        f"reconciliation over {len(runs)} aggregator runs: published {audit.published}, "
        f"applied {audit.applied}, lost {audit.lost}, applied twice {audit.doubly_applied}; "
        f"the restart resumed at version {versions.resumed[0]} ({versions.uncovered[0]} "
        f"published versions after the last checkpoint redone), final version {versions.final}"
    )
    assert audit.ok, (audit.problems, audit.table())
    assert not versions.problems, versions.problems
    assert {"dev-01", "dev-02", "dev-03"} <= {row.participant for row in audit.rows if row.applied}
    report(f"total: {time.monotonic() - started:.0f} s")


# -- the steps ------------------------------------------------------------------------------


def first_apply(project: ComposeProject, participant: str | None = None) -> Event:
    """The aggregator's first "accepted" (applied) event, of ``participant`` if given."""

    def found() -> Event | None:
        return next(
            (
                e
                for e in project.events("aggregator")
                if e["event"] == "accepted" and participant in (None, e["participant"])
            ),
            None,
        )

    return project.wait_for(f"a first applied update of {participant or 'any device'}", found, 300)


def check_dashboard_queries(project: ComposeProject) -> None:
    """Every query of Grafana's provisioned dashboard has data in this Prometheus (Grafana
    itself cannot run without its public image; its files are checked by unit tests)."""
    dashboard = json.loads((REPO / "docker/grafana/provisioning/dashboards/fedmq.json").read_text())
    queries = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    empty = [(title, expr) for title, expr in queries if not project.prometheus(expr)]
    assert not empty, empty
    report(
        f"Grafana dashboard: all {len(queries)} queries of its {len(dashboard['panels'])} "
        "panels have data in Prometheus"
    )


def check_tls_and_credentials(project: ComposeProject) -> None:
    """Every fedmq connection is TLS; a wrong password or an untrusted CA is refused."""
    rows = project.rabbitmqctl("--no-table-headers", "list_connections", "user", "ssl")
    assert sorted(rows) == [["aggregator", "true"], ["dev-01", "true"], ["dev-02", "true"]], rows
    report(f"broker connections (user, tls): {sorted(rows)}")
    device = ["-e", "FEDMQ_ID=dev-01", "-e", "FEDMQ_SHARD=0/2", "-e", "FEDMQ_STATE_DIR=/tmp/dev"]
    wrong = project.run(
        "run",
        "--rm",
        "--no-deps",
        "-T",
        *device,
        "-e",
        "FEDMQ_BROKER=amqps://dev-01:not-the-password@rabbitmq:5671/fedmq",
        "participant",
        check=False,
        timeout=180,
    )
    output = wrong.stdout + wrong.stderr
    assert wrong.returncode != 0 and "ACCESS_REFUSED" in output, output[-2000:]
    report(f"device with a wrong password: exit {wrong.returncode}, {_line(output, 'refused')}")
    # A TLS failure is retried (it may be a passing network fault): watch, then remove it.
    untrusted = project.run(
        "run",
        "-d",
        "--no-deps",
        *device,
        "-e",
        "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",  # the system's CAs, not fedmq's
        "participant",
        timeout=180,
    ).stdout.split()[-1]
    try:
        output = project.wait_for(
            "the device that does not trust the fedmq CA to fail its TLS handshake",
            lambda: _verify_failed(untrusted),
            timeout=180,
        )
    finally:
        subprocess.run(["docker", "rm", "-f", untrusted], capture_output=True, timeout=60)
    assert "connected to" not in output, output[-2000:]
    report(f"device not trusting the fedmq CA: {_line(output, 'verify failed')}")


def add_device(project: ComposeProject, device: str, password: str) -> None:
    """The device's RabbitMQ user and permissions, as docs/deployment.md says."""
    project.exec("rabbitmq", "rabbitmqctl", "-q", "add_user", device, password)
    project.exec(
        "rabbitmq",
        "rabbitmqctl",
        "-q",
        "set_permissions",
        "-p",
        "fedmq",
        device,
        *DEVICE_PERMISSIONS,
    )
    project.exec(
        "rabbitmq",
        "rabbitmqctl",
        "-q",
        "set_topic_permissions",
        "-p",
        "fedmq",
        device,
        "amq.topic",
        *DEVICE_TOPIC_PERMISSIONS,
    )


def aggregator_runs(project: ComposeProject) -> list[list[Event]]:
    """The aggregator's events, one list per process it ran, each from its "starting"."""
    runs: list[list[Event]] = []
    for event in project.events("aggregator"):
        if event["event"] == "starting":
            runs.append([])
        if runs:
            runs[-1].append(event)
    return runs


def _resumed(project: ComposeProject) -> Event | None:
    runs = aggregator_runs(project)
    if len(runs) < 2:
        return None
    return next((e for e in runs[-1] if e["event"] == "resumed"), None)


def _uncovered(project: ComposeProject) -> int | None:
    """How many applies the running aggregator logged since its last checkpoint, if any."""
    run = aggregator_runs(project)[-1]
    since = 0
    for event in run:
        if event["event"] == "accepted":
            since += 1
        elif event["event"] == "committed":
            since = 0
    return since or None


def _applied(project: ComposeProject, participant: str) -> int:
    return sum(
        1
        for e in project.events("aggregator")
        if e["event"] == "accepted" and e["participant"] == participant
    )


def _queue_empty(project: ComposeProject) -> bool:
    rows = project.rabbitmqctl(
        "--no-table-headers", "list_queues", "-p", "fedmq", "name", "messages"
    )
    return dict((name, int(n)) for name, n in rows)["fedmq.default.updates"] == 0


def _wait_value(project: ComposeProject, query: str) -> float:
    return project.wait_for(
        f"a value of {query} in Prometheus", lambda: project.prometheus_value(query), 120
    )


def _at_least(value: float | None, floor: float) -> float | None:
    return value if value is not None and value >= floor else None


def _verify_failed(container: str) -> str | None:
    """The container's log once it shows a failed certificate check."""
    logs = subprocess.run(["docker", "logs", container], capture_output=True, text=True, timeout=60)
    output = logs.stdout + logs.stderr
    return output if "CERTIFICATE_VERIFY_FAILED" in output else None


def _line(text: str, word: str) -> str:
    return next((line.strip()[:200] for line in text.splitlines() if word in line), "")

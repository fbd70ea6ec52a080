"""What real ``fedmq`` processes expose, over the real brokers.

The aggregator and a participant run as their own processes with a password in the
broker URL, logging text or JSON; ``fedmq demo`` writes its report. The password must
appear nowhere. A value from the network (an AMQP header) must not start a log line.
The metrics endpoint listens on loopback unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import pytest

from fedmq.transport.amqp import amqp_names
from tests.integration.brokers import delete_job_queues, forget_mqtt_job, free_port
from tests.integration.fleet import FedmqProcess, wait_for

STARTUP_S = 120.0  # importing torch on a loaded machine, then one round of training
FORGED = "\n12:00:00 info    fedmq.aggregator accepted participant=victim seq=1"


def _with_login(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}").geturl()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def _rabbitmq_user(user: str, password: str) -> Iterator[None]:
    """A RabbitMQ user of the default vhost with every permission, deleted afterwards."""
    _rabbitmqctl("add_user", user, password)
    try:
        _rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield
    finally:
        _rabbitmqctl("delete_user", user)


@pytest.mark.parametrize(
    ("broker", "aggregator_format", "participant_format"),
    [
        pytest.param("amqp", "text", "json", marks=pytest.mark.amqp),
        pytest.param("mqtt", "json", "text", marks=pytest.mark.mqtt),
    ],
)
def test_no_password_in_the_logs_of_either_service(
    request: pytest.FixtureRequest,
    broker: str,
    aggregator_format: str,
    participant_format: str,
    job: str,
    tmp_path: Path,
    data_dir: Path,
) -> None:
    base_url = str(request.getfixturevalue(f"{broker}_url"))
    # The device's id is its broker user, as in the deployment.
    pid, password = f"dev-{job}", f"pw-{secrets.token_hex(12)}"
    url = _with_login(base_url, pid, password)
    user = _rabbitmq_user(pid, password) if broker == "amqp" else contextlib.nullcontext()
    common = [f"--broker={url}", f"--job={job}", "--model=mlp", "--log-level=debug"]
    with user:
        aggregator = FedmqProcess(
            "aggregator",
            ["aggregator", *common, "--eval-every=0", f"--log-format={aggregator_format}"],
            tmp_path,
            data_dir,
        )
        participant = FedmqProcess(
            "participant",
            [
                "participant",
                *common,
                f"--id={pid}",
                "--shard=0/1",
                "--max-examples=64",
                f"--state-dir={tmp_path / 'state'}",
                f"--log-format={participant_format}",
            ],
            tmp_path,
            data_dir,
        )
        procs = [aggregator, participant]
        try:
            # The aggregator names the device once it took one of its updates.
            wait_for(lambda: pid in aggregator.log_path.read_text(), STARTUP_S, "an update", procs)
        finally:
            for proc in procs:
                proc.stop()
            if broker == "amqp":
                asyncio.run(delete_job_queues(base_url, job))
            else:
                asyncio.run(forget_mqtt_job(base_url, job, [pid]))
    for proc in procs:
        text = proc.log_path.read_text()
        assert f"{pid}:***@" in text  # the URL was logged, redacted ...
        assert password not in text  # ... and the password nowhere (before: 1 line each)


@pytest.mark.mqtt
def test_no_password_in_the_demo_output_or_report(
    mqtt_url: str, job: str, tmp_path: Path, data_dir: Path
) -> None:
    password = f"pw-{secrets.token_hex(12)}"
    out = tmp_path / "demo"
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedmq.cli",
                "demo",
                f"--broker={_with_login(mqtt_url, 'operator', password)}",
                f"--job={job}",
                "--participants=2",
                "--max-seconds=2",
                "--model=mlp",
                f"--data-dir={data_dir}",
                f"--out-dir={out}",
            ],
            capture_output=True,
            text=True,
            timeout=STARTUP_S * 2,
        )
    finally:
        asyncio.run(forget_mqtt_job(mqtt_url, job, ["dev-00", "dev-01"]))
    assert done.returncode in (0, 1), done.stdout + done.stderr  # 1: target not reached
    report = (out / "report.json").read_text()
    assert json.loads(report)["config"]["broker"].startswith("mqtt://operator:***@")
    # The console may wrap the URL across lines: look at the output without them too.
    for text in (done.stdout, done.stderr, report):
        assert password not in text.replace("\n", "")  # before: in the report and the console


@pytest.mark.amqp
def test_a_header_cannot_forge_a_log_line(
    amqp_url: str, job: str, tmp_path: Path, data_dir: Path
) -> None:
    aggregator = FedmqProcess(
        "aggregator",
        [
            *("aggregator", f"--broker={amqp_url}", f"--job={job}", "--model=mlp"),
            *("--eval-every=0", "--log-format=text", "--log-level=info"),
        ],
        tmp_path,
        data_dir,
    )
    procs = [aggregator]

    def lines() -> list[str]:
        return aggregator.log_path.read_text().splitlines()

    async def send() -> None:
        async with await aio_pika.connect(amqp_url) as connection:
            channel = await connection.channel()
            message = aio_pika.Message(b"not msgpack", headers={"participant": "x" + FORGED})
            await channel.default_exchange.publish(message, routing_key=amqp_names(job).updates)

    try:
        wait_for(lambda: any("connected to" in line for line in lines()), STARTUP_S, "start", procs)
        asyncio.run(send())
        wait_for(lambda: any(" rejected " in line for line in lines()), 30, "the rejection", procs)
    finally:
        aggregator.stop()
        asyncio.run(delete_job_queues(amqp_url, job))
    rejections = [line for line in lines() if " rejected " in line]
    assert len(rejections) == 1
    assert "participant=x\\n12:00:00 info" in rejections[0]  # escaped, on its own line
    # before: the header's second half was a line of its own, an "accepted" event
    assert not [line for line in lines() if line.startswith("12:00:00 info")]


def _listening(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port`` (Linux: /proc/net)."""
    found = set()
    for path, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for row in Path(path).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(family, raw))
    return found


@pytest.mark.amqp
def test_metrics_listen_on_loopback_by_default(
    amqp_url: str, job: str, tmp_path: Path, data_dir: Path
) -> None:
    port = free_port()
    aggregator = FedmqProcess(
        "aggregator",
        [
            *("aggregator", f"--broker={amqp_url}", f"--job={job}", "--model=mlp"),
            *("--eval-every=0", f"--metrics-port={port}"),
        ],
        tmp_path,
        data_dir,
    )
    try:
        wait_for(lambda: aggregator.events("metrics"), STARTUP_S, "the endpoint", [aggregator])
        assert _listening(port) == {"127.0.0.1"}  # before: {"0.0.0.0"}, every interface
        assert aggregator.events("metrics")[0]["url"] == f"http://127.0.0.1:{port}/metrics"
    finally:
        aggregator.stop()
        asyncio.run(delete_job_queues(amqp_url, job))

"""Signed updates and live tuning on a real ``fedmq aggregator`` process, over RabbitMQ and MQTT.

The aggregator runs as its own process (``python -m fedmq.cli aggregator``) with a key
registry, its own signing key and the metrics endpoint. The test publishes updates as a
device would, through the real broker, and changes the running aggregator's settings
with the real ``fedmq ctl``; what happened is read from the metrics endpoint, the
aggregator's JSON log and the models it publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import numpy as np
import pytest

from fedmq.models import build_model, get_params
from fedmq.transport import TransportConfig, connect_participant
from fedmq.transport.mqtt import mqtt_topics
from fedmq.wire import (
    KeyRing,
    Signer,
    Verifier,
    create_key_pair,
    load_private_key,
    open_model,
    register_public_key,
    tensor_spec_of,
)
from tests import updates
from tests.integration.brokers import delete_job_queues
from tests.prometheus import samples

SPEC = tensor_spec_of(get_params(build_model("mlp", seed=0)))
STARTUP_S = 90.0  # importing torch on a loaded CI machine


@pytest.fixture(
    params=[
        pytest.param("amqp", marks=pytest.mark.amqp),
        pytest.param("mqtt", marks=pytest.mark.mqtt),
    ]
)
async def broker(request: pytest.FixtureRequest, job: str) -> AsyncIterator[str]:
    """The URL of the real broker of this parameter; what the test left there is removed."""
    url = str(request.getfixturevalue(f"{request.param}_url"))
    yield url
    await (delete_job_queues(url, job) if request.param == "amqp" else _forget_job(url, job))


async def _forget_job(url: str, job: str) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 1883
    async with aiomqtt.Client(host, port) as client:
        await client.publish(mqtt_topics(job).model, b"", qos=1, retain=True)
    for client_id in (f"fedmq-{job}-aggregator", f"fedmq-{job}-p-dev-01"):
        async with aiomqtt.Client(host, port, identifier=client_id, clean_session=True):
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """``python -m fedmq.cli ...`` logging JSON lines to a file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "FEDMQ_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "fedmq.cli", *args],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == name:
                    found.append(event)
        return found

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._out.close()
        return self.popen.returncode


class Aggregator(Process):
    def __init__(self, url: str, job: str, tmp_path: Path, *extra: str) -> None:
        self.port = _free_port()
        args = [
            "aggregator",
            f"--broker={url}",
            f"--job={job}",
            "--model=mlp",
            "--eval-every=0",
            "--strategy=fedasync",
            "--alpha=0.5",
            "--staleness=constant",
            "--max-staleness=5",
            f"--metrics-port={self.port}",
            "--metrics-host=127.0.0.1",
            *extra,
        ]
        super().__init__(args, tmp_path / "aggregator.log")

    def metrics(self) -> dict[str, float]:
        """``name{label="v"}`` -> value, or {} while the endpoint is not up."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return {}
        return samples(text)

    async def until(self, what: str, condition: Callable[[dict[str, float]], bool]) -> None:
        """Poll the metrics until ``condition`` holds; fail with the log if it never does."""
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"aggregator exited ({self.popen.returncode}):\n{self.text()}")
            values = await asyncio.to_thread(self.metrics)
            if values and condition(values):
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; metrics {values}\n{self.text()}")


@contextlib.contextmanager
def aggregator(url: str, job: str, tmp_path: Path, *extra: str) -> Iterator[Aggregator]:
    process = Aggregator(url, job, tmp_path, *extra)
    try:
        yield process
    finally:
        process.stop()


def update(pid: str, seq: int, base: int) -> bytes:
    changes = {name: np.full(shape, 0.001, np.float32) for name, (shape, _) in SPEC.items()}
    return updates.update(pid, seq, base, changes)


def rejected(reason: str) -> str:
    return f'fedmq_updates_rejected_total{{reason="{reason}"}}'


def ctl(url: str, job: str, *assignments: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fedmq.cli", "ctl", "set", f"--broker={url}", f"--job={job}"]
    return subprocess.run(
        [*command, *assignments], capture_output=True, text=True, timeout=120, check=False
    )


async def test_signed_updates_only_through_a_real_broker(
    broker: str, job: str, tmp_path: Path
) -> None:
    keys, registry = tmp_path / "keys", tmp_path / "registry"
    for key_id in ("dev-01", "dev-01.new", "dev-02", "rogue", "aggregator"):
        create_key_pair(key_id, keys)
    for key_id in ("dev-01", "dev-02"):
        register_public_key(key_id, keys / f"{key_id}.pub", registry)
    sign = {k: Signer(load_private_key(keys / f"{k}.key"), job) for k in ("dev-01", "dev-01.new")}
    rogue_key = load_private_key(keys / "rogue.key")
    # A key that says it is dev-01's but is not the one registered.
    forger = Signer(type(rogue_key)("dev-01", rogue_key.key), job)
    stolen = Signer(load_private_key(keys / "dev-02.key"), job)
    good = sign["dev-01"].seal(update("dev-01", 1, 0))
    with aggregator(
        broker,
        job,
        tmp_path,
        f"--keys-dir={registry}",
        f"--signing-key={keys / 'aggregator.key'}",
    ) as agg:
        await agg.until("the metrics endpoint", lambda m: m.get("fedmq_model_version") == 0)
        config = TransportConfig(url=broker, job=job, connect_timeout_s=30.0)
        async with connect_participant(config, "dev-01") as device:
            for body in (
                update("dev-01", 0, 0),  # unsigned
                forger.seal(update("dev-01", 0, 0)),
                sign["dev-01.new"].seal(update("dev-01", 0, 0)),  # not registered
                good,
                good,  # a replay
                stolen.seal(update("dev-01", 2, 0)),  # dev-02 signing for dev-01
            ):
                await device.publish_update(body)
            await agg.until(
                "every update settled",
                lambda m: m["fedmq_updates_received_total"] == 6,
            )
            values = agg.metrics()
            assert values["fedmq_updates_applied_total"] == 1
            assert values["fedmq_model_version"] == 1
            for reason in (
                "unsigned",
                "bad_signature",
                "unknown_key",
                "duplicate",
                "participant_mismatch",
            ):
                assert values[rejected(reason)] == 1, (reason, values)
            # The model this device receives is signed by the aggregator's key.
            models = Verifier(KeyRing(keys / "aggregator.pub"), job)
            async with asyncio.timeout(30):
                async for body in device.models():
                    if open_model(body, spec=SPEC, verifier=models).version == 1:
                        break
    logged = {e["reason"] for e in agg.events("rejected")}
    assert logged == {
        "unsigned",
        "bad_signature",
        "unknown_key",
        "duplicate",
        "participant_mismatch",
    }


async def test_ctl_set_retunes_a_running_aggregator(broker: str, job: str, tmp_path: Path) -> None:
    with aggregator(broker, job, tmp_path) as agg:
        await agg.until("the metrics endpoint", lambda m: m.get("fedmq_model_version") == 0)
        tuning = 'fedmq_tuning{knob="max_staleness"}'
        assert agg.metrics()[tuning] == 5
        config = TransportConfig(url=broker, job=job, connect_timeout_s=30.0)
        async with connect_participant(config, "dev-01") as device:
            await device.publish_update(update("dev-01", 0, 0))
            await agg.until("version 1", lambda m: m["fedmq_model_version"] == 1)
            sent = await asyncio.to_thread(ctl, broker, job, "alpha=0.25", "max_staleness=0")
            assert sent.returncode == 0, sent.stderr
            await agg.until("the change", lambda m: m[tuning] == 0)
            values = agg.metrics()
            assert values['fedmq_tuning{knob="alpha"}'] == 0.25
            assert values['fedmq_control_commands_total{result="applied"}'] == 1
            # Behaviour: staleness 1 was admitted before; now it is too stale.
            await device.publish_update(update("dev-01", 1, 0))
            await agg.until("the stale update", lambda m: m[rejected("too_stale")] == 1)
            # An invalid value is refused whole, and the aggregator carries on.
            refused = await asyncio.to_thread(ctl, broker, job, "alpha=5", "max_staleness=3")
            assert refused.returncode == 0, refused.stderr  # the broker took it
            await agg.until(
                "the refusal", lambda m: m['fedmq_control_commands_total{result="rejected"}'] == 1
            )
            assert agg.metrics()[tuning] == 0
            await device.publish_update(update("dev-01", 2, 1))
            await agg.until("version 2", lambda m: m["fedmq_model_version"] == 2)
    (tuned,) = agg.events("tuned")
    assert tuned["changes"] == {"alpha": [0.5, 0.25], "max_staleness": [5, 0]}
    assert tuned["id"] in sent.stdout
    (refusal,) = agg.events("control_rejected")
    assert "alpha" in refusal["detail"]


@pytest.mark.amqp
async def test_amqp_control_commands_of_another_user_are_dropped(
    amqp_url: str, job: str, tmp_path: Path
) -> None:
    try:
        with aggregator(amqp_url, job, tmp_path, "--control-publisher=operator") as agg:
            await agg.until("the metrics endpoint", lambda m: m.get("fedmq_model_version") == 0)
            sent = await asyncio.to_thread(ctl, amqp_url, job, "alpha=0.25")  # as guest
            assert sent.returncode == 0, sent.stderr
            deadline = time.monotonic() + 30
            while "dropped a control command" not in agg.text():
                assert time.monotonic() < deadline, agg.text()
                await asyncio.sleep(0.2)
            values = agg.metrics()
            assert values['fedmq_tuning{knob="alpha"}'] == 0.5
            assert values['fedmq_control_commands_total{result="applied"}'] == 0
    finally:
        await delete_job_queues(amqp_url, job)

"""Signed updates and live tuning on a real ``fedmq aggregator`` process, over RabbitMQ and MQTT.

The aggregator runs as its own process (``python -m fedmq.cli aggregator``) with a key
registry, its own signing key and the metrics endpoint. The test publishes updates as a
device would, through the real broker, and changes the running aggregator's settings
with the real ``fedmq ctl`` (signed by an operator key: with no operator configured,
every command is refused); what happened is read from the metrics endpoint, the
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiomqtt
import numpy as np
import pytest

from fedmq.aggregator._checkpoint import load_checkpoint
from fedmq.models import build_model, get_params
from fedmq.transport import TransportConfig, connect_participant, send_control
from fedmq.transport.amqp import amqp_names
from fedmq.transport.mqtt import mqtt_topics
from fedmq.wire import (
    ControlEnvelope,
    ControlValue,
    KeyRing,
    Signer,
    Verifier,
    create_key_pair,
    encode_control,
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


def ctl(
    url: str, job: str, *assignments: str, key: Path | None = None, action: str = "set"
) -> subprocess.CompletedProcess[str]:
    """The real ``fedmq ctl ACTION``, signed with ``key`` (an operator's) if given."""
    command = [sys.executable, "-m", "fedmq.cli", "ctl", action, f"--broker={url}", f"--job={job}"]
    if key is not None:
        command.append(f"--signing-key={key}")
    return subprocess.run(
        [*command, *assignments], capture_output=True, text=True, timeout=120, check=False
    )


def operator_keys(tmp_path: Path) -> tuple[Path, Path]:
    """(the operator's private key, the aggregator's operator registry holding its .pub)."""
    keys, registry = tmp_path / "operator-keys", tmp_path / "operators"
    private, public = create_key_pair("operator", keys)
    register_public_key("operator", public, registry)
    return private, registry


def control(issued: float, **values: ControlValue) -> bytes:
    """A ``set`` command as ``fedmq ctl`` would encode it."""
    return encode_control(
        ControlEnvelope(id=f"t{issued:.6f}", command="set", values=values, issued=issued)
    )


def commands(result: str) -> str:
    return f'fedmq_control_commands_total{{result="{result}"}}'


def control_rejected(reason: str) -> str:
    return f'fedmq_control_rejected_total{{reason="{reason}"}}'


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
    key, registry = operator_keys(tmp_path)
    with aggregator(broker, job, tmp_path, f"--operator-keys={registry}") as agg:
        await agg.until("the metrics endpoint", lambda m: m.get("fedmq_model_version") == 0)
        tuning = 'fedmq_tuning{knob="max_staleness"}'
        assert agg.metrics()[tuning] == 5
        config = TransportConfig(url=broker, job=job, connect_timeout_s=30.0)
        async with connect_participant(config, "dev-01") as device:
            await device.publish_update(update("dev-01", 0, 0))
            await agg.until("version 1", lambda m: m["fedmq_model_version"] == 1)
            sent = await asyncio.to_thread(
                ctl, broker, job, "alpha=0.25", "max_staleness=0", key=key
            )
            assert sent.returncode == 0, sent.stderr
            await agg.until("the change", lambda m: m[tuning] == 0)
            values = agg.metrics()
            assert values['fedmq_tuning{knob="alpha"}'] == 0.25
            assert values['fedmq_control_commands_total{result="applied"}'] == 1
            # Behaviour: staleness 1 was admitted before; now it is too stale.
            await device.publish_update(update("dev-01", 1, 0))
            await agg.until("the stale update", lambda m: m[rejected("too_stale")] == 1)
            # An invalid value is refused whole, and the aggregator carries on.
            refused = await asyncio.to_thread(
                ctl, broker, job, "alpha=5", "max_staleness=3", key=key
            )
            assert refused.returncode == 0, refused.stderr  # the broker took it
            await agg.until(
                "the refusal", lambda m: m['fedmq_control_commands_total{result="rejected"}'] == 1
            )
            assert agg.metrics()[tuning] == 0
            await device.publish_update(update("dev-01", 2, 1))
            await agg.until("version 2", lambda m: m["fedmq_model_version"] == 2)
    (tuned,) = agg.events("tuned")
    assert tuned["changes"] == {"alpha": [0.5, 0.25], "max_staleness": [5, 0]}
    assert tuned["id"] in sent.stdout and tuned["key_id"] == "operator"
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


async def flood(url: str, job: str, bodies: list[bytes]) -> None:
    """Publish ``bodies`` on the job's control queue or topic as fast as one client can."""
    if url.startswith("amqp"):
        async with await aio_pika.connect(url) as connection:
            channel = await connection.channel(publisher_confirms=True)
            for start in range(0, len(bodies), 100):
                await asyncio.gather(
                    *(
                        channel.default_exchange.publish(
                            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                            routing_key=amqp_names(job).control,
                        )
                        for body in bodies[start : start + 100]
                    )
                )
        return
    parts = urlsplit(url)
    async with aiomqtt.Client(parts.hostname or "127.0.0.1", parts.port or 1883) as client:
        for body in bodies:
            await client.publish(mqtt_topics(job).control, body, qos=1)


async def test_a_device_cannot_retune_an_aggregator_with_no_operator(
    broker: str, job: str, tmp_path: Path
) -> None:
    """Issue #9: in the default configuration any device's command was applied and saved."""
    checkpoints = tmp_path / "checkpoints"
    with aggregator(broker, job, tmp_path, f"--checkpoint-dir={checkpoints}") as agg:
        await agg.until("the metrics endpoint", lambda m: m.get("fedmq_model_version") == 0)
        # What a device can send: an unsigned command, and one signed by its own key.
        sent = await asyncio.to_thread(ctl, broker, job, "max_staleness=0", "alpha=1.0")
        assert sent.returncode == 0, sent.stderr
        handled = commands("applied"), commands("rejected")
        await agg.until("the command handled", lambda m: sum(m[k] for k in handled) == 1)
        values = agg.metrics()
        assert values[commands("applied")] == 0
        assert values['fedmq_tuning{knob="max_staleness"}'] == 5
        assert values['fedmq_tuning{knob="alpha"}'] == 0.5
        device_key, _ = create_key_pair("dev-01", tmp_path / "device")
        signed = await asyncio.to_thread(ctl, broker, job, "alpha=1.0", key=device_key)
        assert signed.returncode == 0, signed.stderr
        await agg.until("both handled", lambda m: sum(m[k] for k in handled) == 2)
        values = agg.metrics()
        assert values[commands("applied")] == 0
        assert values[control_rejected("unauthenticated")] == 2
        assert values['fedmq_tuning{knob="alpha"}'] == 0.5
    # Logged with how to enable fedmq ctl; nothing of it in the checkpoint.
    refusal = agg.events("control_rejected")[0]
    assert refusal["reason"] == "unauthenticated" and "--operator-keys" in refusal["detail"]
    assert not agg.events("tuned")
    checkpoint = load_checkpoint(checkpoints)
    assert checkpoint is None or checkpoint.strategy == {}


async def test_only_fresh_commands_signed_by_an_operator_key_are_applied(
    broker: str, job: str, tmp_path: Path
) -> None:
    key, registry = operator_keys(tmp_path)
    operator = Signer(load_private_key(key), job)
    device = Signer(load_private_key(create_key_pair("dev-01", tmp_path / "device")[0]), job)
    with aggregator(broker, job, tmp_path, f"--operator-keys={registry}") as agg:
        await agg.until("the metrics endpoint", lambda m: m.get("fedmq_model_version") == 0)
        now = time.time()
        good = operator.seal(control(now, alpha=0.25))
        config = TransportConfig(url=broker, job=job, connect_timeout_s=30.0)
        for body in (
            control(now, alpha=1.0),  # unsigned
            device.seal(control(now + 1, alpha=1.0)),  # a device's key
            Signer(operator.key, "another-job").seal(control(now + 2, alpha=1.0)),
            good,
            good,  # replayed
            operator.seal(control(now - 1, alpha=1.0)),  # older than the last applied
            operator.seal(control(now - 3600, alpha=1.0)),  # an old one, captured
        ):
            await send_control(config, body)
        await agg.until(
            "every command handled",
            lambda m: m[commands("applied")] + m[commands("rejected")] == 7,
        )
        values = agg.metrics()
        assert values[commands("applied")] == 1
        assert values['fedmq_tuning{knob="alpha"}'] == 0.25
        for reason, count in (
            ("unsigned", 1),
            ("unknown_key", 1),
            ("bad_signature", 1),
            ("replayed", 3),
        ):
            assert values[control_rejected(reason)] == count, (reason, values)


async def test_a_command_flood_is_rate_limited_and_writes_no_checkpoints(
    broker: str, job: str, tmp_path: Path
) -> None:
    """Issue #9: 2,000 commands applied about 650, each writing a checkpoint."""
    key, registry = operator_keys(tmp_path)
    operator = Signer(load_private_key(key), job)
    with aggregator(
        broker,
        job,
        tmp_path,
        f"--operator-keys={registry}",
        f"--checkpoint-dir={tmp_path / 'checkpoints'}",
        "--log-level=debug",  # the "committed" line of every checkpoint write
    ) as agg:
        await agg.until("the metrics endpoint", lambda m: m.get("fedmq_model_version") == 0)
        now = time.time()
        bodies = []
        for i in range(1000):  # an operator's valid commands, and as many unsigned ones
            alpha = 0.1 + (i % 9) / 10
            bodies.append(operator.seal(control(now + i / 1000, alpha=alpha)))
            bodies.append(control(now + i / 1000, alpha=alpha))
        started = time.monotonic()
        await flood(broker, job, bodies)
        handled = -1.0
        while True:  # until the aggregator has handled what reached it
            await asyncio.sleep(3)
            values = await asyncio.to_thread(agg.metrics)
            now_handled = values[commands("applied")] + values[commands("rejected")]
            if now_handled == handled:
                break
            handled = now_handled
        elapsed = time.monotonic() - started
    applied = int(values[commands("applied")])
    commits = len(agg.events("committed"))
    print(
        f"handled {handled:.0f} of 2000, applied {applied}, checkpoints {commits}, {elapsed:.1f} s"
    )
    assert handled >= 500  # the broker and the transport keep at least this many
    # The default bucket: a burst of 10, then 2 a second; the unsigned half is refused
    # before it takes a token, so it cannot starve the operator.
    assert 10 <= applied <= 10 + 2 * elapsed + 2, (applied, elapsed)
    refused = values[control_rejected("rate_limited")] + values[control_rejected("unsigned")]
    assert applied + refused == handled
    # One checkpoint per applied command at most (plus the final one at shutdown).
    assert commits <= applied + 1, (commits, applied)


async def test_an_operator_forgets_a_device_sequence_number(
    broker: str, job: str, tmp_path: Path
) -> None:
    """Issue #9: a forged update with seq 2^64-1 locked its device out for good."""
    key, registry = operator_keys(tmp_path)
    with aggregator(
        broker,
        job,
        tmp_path,
        f"--operator-keys={registry}",
        f"--checkpoint-dir={tmp_path / 'checkpoints'}",
    ) as agg:
        await agg.until("the metrics endpoint", lambda m: m.get("fedmq_model_version") == 0)
        config = TransportConfig(url=broker, job=job, connect_timeout_s=30.0)
        async with connect_participant(config, "dev-01") as device:
            await device.publish_update(update("dev-01", 2**64 - 1, 0))
            await agg.until("version 1", lambda m: m["fedmq_model_version"] == 1)
            await device.publish_update(update("dev-01", 1, 1))
            await agg.until("the lock-out", lambda m: m[rejected("duplicate")] == 1)
            sent = await asyncio.to_thread(
                ctl, broker, job, "dev-01", key=key, action="forget-device"
            )
            assert sent.returncode == 0, sent.stderr
            await agg.until("the command", lambda m: m[commands("applied")] == 1)
            await device.publish_update(update("dev-01", 1, 1))
            await agg.until("version 2", lambda m: m["fedmq_model_version"] == 2)
    checkpoint = load_checkpoint(tmp_path / "checkpoints")  # the last, at shutdown
    assert checkpoint is not None and checkpoint.last_seq == {"dev-01": 1}
    (forgot,) = agg.events("forgot")
    assert forgot["participant"] == "dev-01" and forgot["last_seq"] == 2**64 - 1
    assert forgot["id"] in sent.stdout

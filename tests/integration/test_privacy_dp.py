"""Clipping and client-level DP in the real service over the real RabbitMQ.

A malicious update is clipped (or refused) and counted; an aggregator with a tiny budget
stops by itself and exits 0, and will not start again on its spent checkpoint; the
accountant (steps, per-device participation) survives a kill -9; bad DP settings are a
one-line error of ``fedmq aggregator``.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator import Aggregator, AggregatorConfig, BoundsConfig
from fedmq.aggregator._metrics import registry_for, render_metrics
from fedmq.privacy import client_epsilon
from fedmq.strategies import FedBuffConfig, StalenessConfig, StrategyConfig
from fedmq.transport import TransportConfig, connect_aggregator, connect_participant
from tests.integration.fleet import FedmqProcess, wait_for
from tests.integration.test_hardening import cnn_update
from tests.updates import INITIAL, update

pytestmark = [pytest.mark.amqp, pytest.mark.timeout(240)]

# One server step per update, the delta applied as it is (sgd, lr 1, weight 1).
_ONE_STEP = StrategyConfig(
    name="fedbuff",
    fedbuff=FedBuffConfig(buffer_size=1, staleness=StalenessConfig(function="constant")),
)


@asynccontextmanager
async def serving(url: str, job: str, config: AggregatorConfig) -> AsyncIterator[Aggregator]:
    async with (
        connect_aggregator(TransportConfig(url=url, job=job)) as transport,
        asyncio.TaskGroup() as tg,
    ):
        aggregator = Aggregator(config, transport, INITIAL)
        task = tg.create_task(aggregator.run(tg), name="aggregator")
        yield aggregator
        task.cancel()


async def send(url: str, job: str, pid: str, *bodies: bytes) -> None:
    async with connect_participant(TransportConfig(url=url, job=job), pid) as device:
        for body in bodies:
            await device.publish_update(body)


async def handled(aggregator: Aggregator, count: int, limit_s: float = 30.0) -> None:
    async with asyncio.timeout(limit_s):
        while aggregator.stats.applied + aggregator.stats.dropped < count:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def _huge() -> dict[str, np.ndarray]:
    # norm 20: far above the clip norm, far below the absolute cap (1e4)
    return {"w": np.full((2, 2), 10.0, np.float32), "b": np.zeros(2, np.float32)}


async def test_a_malicious_update_is_clipped_and_counted(amqp_url: str, job: str) -> None:
    config = AggregatorConfig(
        strategy=_ONE_STEP,
        eval_every=0,
        publish_interval_s=0.0,
        bounds=BoundsConfig(clip_norm=1.0, clip_mode="clip"),
    )
    async with serving(amqp_url, job, config) as aggregator:
        await send(amqp_url, job, "mallory", update("mallory", 1, 0, _huge()))
        await handled(aggregator, 1)
        assert aggregator.stats.applied == 1 and aggregator.stats.clipped == 1
        moved = math.sqrt(
            sum(float(np.sum((aggregator.params[k] - INITIAL[k]) ** 2)) for k in INITIAL)
        )
        assert moved == pytest.approx(1.0, rel=1e-5)  # by the clip norm, not by 20
        text, _ = render_metrics(registry_for(aggregator, active_window_s=60.0))
        assert b"fedmq_updates_clipped_total 1.0" in text


async def test_a_malicious_update_is_refused_in_reject_mode(amqp_url: str, job: str) -> None:
    config = AggregatorConfig(
        strategy=_ONE_STEP,
        eval_every=0,
        publish_interval_s=0.0,
        bounds=BoundsConfig(clip_norm=1.0, clip_mode="reject"),
    )
    async with serving(amqp_url, job, config) as aggregator:
        small = {"w": np.full((2, 2), 0.1, np.float32), "b": np.zeros(2, np.float32)}
        await send(amqp_url, job, "mallory", update("mallory", 1, 0, _huge()))
        await send(amqp_url, job, "dev-01", update("dev-01", 1, 0, small))
        await handled(aggregator, 2)
        assert aggregator.stats.rejected == {"clip_bound": 1}
        assert aggregator.stats.applied == 1 and aggregator.stats.clipped == 0
        text, _ = render_metrics(registry_for(aggregator, active_window_s=60.0))
        assert b'fedmq_updates_rejected_total{reason="clip_bound"} 1.0' in text


def _dp_args(broker: str, job: str, ckpt: Path, *extra: str) -> list[str]:
    return [
        "aggregator",
        *("--broker", broker, "--job", job, "--checkpoint-dir", str(ckpt)),
        *("--eval-every", "0", "--publish-interval", "0", "--checkpoint-interval", "0.2"),
        *("--strategy", "fedbuff", "--buffer-size", "2", "--clip-norm", "0.01"),
        *extra,
    ]


def _run_cli(args: list[str], data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDMQ_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "fedmq.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


async def test_the_budget_stop_exits_0_and_a_spent_checkpoint_will_not_start(
    amqp_url: str, job: str, tmp_path: Path, data_dir: Path
) -> None:
    # z = 1: epsilon 4.73 after one step, 7.08 after two, 9.01 after three: a budget of 8
    # allows exactly two server steps (four updates at K = 2).
    args = _dp_args(
        amqp_url, job, tmp_path / "ckpt", "--dp-noise-multiplier", "1", "--dp-epsilon", "8"
    )
    proc = FedmqProcess("aggregator", args, tmp_path, data_dir)
    try:
        wait_for(lambda: proc.events("published"), 90, "the first publish", [proc])
        for i in range(6):
            pid = f"dev-{i:02d}"
            await send(amqp_url, job, pid, cnn_update(pid, 1, 0))
        started = time.monotonic()
        while proc.popen.poll() is None and time.monotonic() - started < 60:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        assert proc.popen.returncode == 0, proc.tail()
    finally:
        proc.stop()
    [spent] = proc.events("privacy_budget_spent")
    assert spent["steps"] == 2
    assert spent["epsilon"] == pytest.approx(client_epsilon([(1.0, 1, 2)], 1e-5), rel=1e-5)
    assert [e["steps"] for e in proc.events("privacy_step")] == [1, 2]
    assert max(e["version"] for e in proc.events("published")) == 2  # the final model went out
    assert proc.events("stopped")  # and the final checkpoint
    assert len(proc.events("accepted")) == 4  # the other two stay in the queue
    # A restart on the spent checkpoint: a one-line error, exit code 2, nothing started.
    again = _run_cli(args, data_dir)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0
    assert again.stderr.startswith("fedmq: error: dp epsilon: the budget 8 is spent")


async def test_the_accountant_survives_a_kill_9(
    amqp_url: str, job: str, tmp_path: Path, data_dir: Path
) -> None:
    # min_gap 2, K 2: steps 1 (dev-01, dev-02) and 2 (dev-03, dev-04) before the kill.
    args = _dp_args(
        amqp_url, job, tmp_path / "ckpt", "--dp-noise-multiplier", "2", "--dp-min-gap", "2"
    )
    runs: list[FedmqProcess] = []
    try:
        first = FedmqProcess("aggregator.run0", args, tmp_path, data_dir)
        runs.append(first)
        wait_for(lambda: first.events("published"), 90, "the first publish", [first])
        for i in range(1, 5):
            pid = f"dev-{i:02d}"
            await send(amqp_url, job, pid, cnn_update(pid, 1, 0 if i < 3 else 1))
        wait_for(
            lambda: any(e["version"] >= 2 for e in first.events("committed")),
            60,
            "a checkpoint of step 2",
            [first],
        )
        first.kill()
        second = FedmqProcess("aggregator.run1", args, tmp_path, data_dir)
        runs.append(second)
        wait_for(lambda: second.events("published"), 90, "the restart's publish", [second])
        # dev-03 was in step 2: step 3 is too soon (min_gap 2); dev-01 and dev-02 were in 1.
        base = second.events("published")[0]["version"]
        await send(amqp_url, job, "dev-03", cnn_update("dev-03", 2, base))
        wait_for(lambda: second.events("rejected"), 60, "dev-03 refused", [second])
        for pid in ("dev-01", "dev-02"):
            await send(amqp_url, job, pid, cnn_update(pid, 2, base))
        wait_for(lambda: second.events("privacy_step"), 60, "step 3", [second])
    finally:
        for proc in runs:
            proc.stop()
    [refused] = second.events("rejected")
    assert refused["reason"] == "participation" and "min_gap 2" in refused["detail"]
    [step] = second.events("privacy_step")
    assert step["steps"] == 3  # not 1: the kill did not reset the accountant
    assert step["epsilon"] == pytest.approx(client_epsilon([(2.0, 2, 3)], 1e-5), rel=1e-5)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (("--dp-noise-multiplier", "-1"), "noise_multiplier"),
        (("--dp-noise-multiplier", "1", "--dp-delta", "1"), "delta"),
        (("--dp-noise-multiplier", "1", "--strategy", "fedasync"), "fedbuff"),
    ],
)
def test_bad_dp_config_is_a_one_line_error(
    tmp_path: Path, data_dir: Path, flags: tuple[str, ...], needle: str
) -> None:
    args = [*_dp_args("amqp://guest:guest@127.0.0.1:5672/", "t-bad", tmp_path), *flags]
    result = _run_cli(args, data_dir)
    assert result.returncode == 2
    err = result.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("fedmq: error: ") and needle in err, err


async def test_a_step_published_before_any_checkpoint_survives_a_kill_9(
    amqp_url: str, job: str, tmp_path: Path, data_dir: Path
) -> None:
    # No checkpoint is written before the kill (16 updates or 600 s): only the step
    # ledger, written before each noised model goes out, knows steps 1 and 2.
    args = [
        *_dp_args(amqp_url, job, tmp_path / "ckpt", "--dp-noise-multiplier", "2"),
        *("--checkpoint-interval", "600"),
    ]
    runs: list[FedmqProcess] = []
    try:
        first = FedmqProcess("aggregator.run0", args, tmp_path, data_dir)
        runs.append(first)
        wait_for(lambda: first.events("published"), 90, "the first publish", [first])
        for i in range(1, 5):
            pid = f"dev-{i:02d}"
            await send(amqp_url, job, pid, cnn_update(pid, 1, 0))
        wait_for(lambda: len(first.events("privacy_step")) == 2, 60, "two steps", [first])
        assert not first.events("committed")
        first.kill()
        second = FedmqProcess("aggregator.run1", args, tmp_path, data_dir)
        runs.append(second)
        # The four unacked updates come again: two more steps, counted from 2.
        wait_for(lambda: len(second.events("privacy_step")) == 2, 90, "the redelivered", [second])
    finally:
        for proc in runs:
            proc.stop()
    assert [e["steps"] for e in second.events("privacy_step")] == [3, 4]
    last = second.events("privacy_step")[-1]
    assert last["epsilon"] == pytest.approx(client_epsilon([(2.0, 1, 4)], 1e-5), rel=1e-5)

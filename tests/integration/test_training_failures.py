"""A device whose training goes wrong loses that update, never itself or its fleet.

Devices of one process (a simulated fleet: ``fedmq bench``, ``fedmq demo``) share one
TaskGroup: an exception escaping one device's training used to end them all. Over the
real RabbitMQ, through the real participant runtime: one healthy device and one whose
training diverges (NaN in its data, as a blown-up learning rate would give) or raises.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fedmq.codecs import CodecConfig, encode_params
from fedmq.models import build_model, get_params
from fedmq.participant import Participant, ParticipantConfig
from fedmq.tasks import DeviceData
from fedmq.transport import (
    AggregatorTransport,
    Delivery,
    TransportConfig,
    connect_aggregator,
    connect_participant,
)
from fedmq.wire import ModelEnvelope, encode_model, open_update, tensor_spec_of
from tests import tasks
from tests.integration.brokers import delete_job_queues
from tests.tasks import device_data

pytestmark = pytest.mark.amqp

MODEL = get_params(build_model("mlp", seed=0))
N = 16


def model_body(version: int) -> bytes:
    tensors = tuple(encode_params(MODEL, CodecConfig(name="float32")))
    return encode_model(ModelEnvelope(version=version, created=time.time(), tensors=tensors))


def device_config(pid: str, tmp_path: Path) -> ParticipantConfig:
    return ParticipantConfig(participant_id=pid, state_dir=tmp_path / pid)


async def until(condition: object, within: float = 60.0) -> None:
    assert callable(condition)
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def next_update(updates: AsyncIterator[Delivery]) -> tuple[str, int, int]:
    """(participant, seq, base version) of the next update, acknowledged."""
    async with asyncio.timeout(60):
        delivery = await anext(updates)
    await delivery.ack()
    update = open_update(delivery.body, spec=tensor_spec_of(MODEL))
    return update.participant, update.seq, update.base_version


@pytest.fixture
async def transport_config(amqp_url: str, job: str) -> AsyncIterator[TransportConfig]:
    yield TransportConfig(url=amqp_url, job=job)
    await delete_job_queues(amqp_url, job)


async def run_pair(
    config: TransportConfig, tmp_path: Path, bad_x: torch.Tensor
) -> tuple[Participant, Participant, list[tuple[str, int, int]]]:
    """A healthy device and one training on ``bad_x`` in one TaskGroup; two models go out.

    Returns both devices and the updates the broker delivered, after each model the
    healthy device trained on and the broken one failed on.
    """
    torch.manual_seed(0)
    x, y = torch.rand(N, 1, 28, 28), torch.randint(0, 10, (N,))
    received: list[tuple[str, int, int]] = []
    aggregator: AggregatorTransport
    async with (
        connect_aggregator(config) as aggregator,
        connect_participant(config, "good") as good_link,
        connect_participant(config, "bad") as bad_link,
        asyncio.TaskGroup() as tg,
    ):
        task = tasks.fmnist()
        good = Participant(device_config("good", tmp_path), good_link, task, device_data(x, y))
        bad = Participant(device_config("bad", tmp_path), bad_link, task, device_data(bad_x, y))
        updates = aiter(aggregator.updates())
        good.start(tg)
        bad.start(tg)
        for version in (1, 2):
            await aggregator.publish_model(model_body(version), version=version)
            # Each device trains on the newest model it holds; the good one publishes.
            while not received or received[-1][2] < version:
                received.append(await next_update(updates))
            await until(lambda v=version: sum(bad.stats.skipped.values()) >= v)
        good.stop()
        bad.stop()
    return good, bad, received


async def test_a_device_whose_training_gives_nan_skips_the_update_and_carries_on(
    transport_config: TransportConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "fedmq.participant")
    nan_x = torch.full((N, 1, 28, 28), float("nan"))
    good, bad, received = await run_pair(transport_config, tmp_path, nan_x)
    # Before: the encoder's ValueError ("holds NaN or Inf") ended the TaskGroup, the
    # healthy device with it. Now: one skip per model, nothing sent, no seq used.
    assert bad.stats.skipped == {"non_finite": 2}
    assert bad.stats.trained == 0 and bad.stats.published == 0
    assert bad.next_seq == 0 and bad.pending == 0
    assert {pid for pid, _, _ in received} == {"good"}
    assert good.stats.published >= 2 and good.stats.skipped == {}
    skips = [r for r in caplog.records if r.getMessage() == "update_skipped"]
    assert [r.__dict__["fedmq_fields"]["reason"] for r in skips] == ["non_finite"] * 2
    assert [r.__dict__["fedmq_fields"]["base_version"] for r in skips] == [1, 2]


async def test_an_exception_in_training_is_logged_with_its_traceback_and_counted(
    transport_config: TransportConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "fedmq.participant")
    # Three channels where the model takes one: the model itself raises (RuntimeError).
    wrong_x = torch.rand(N, 3, 28, 28)
    good, bad, received = await run_pair(transport_config, tmp_path, wrong_x)
    assert good.stats.published >= 2
    assert bad.stats.skipped == {"error": 2}
    assert bad.stats.published == 0 and bad.next_seq == 0
    assert {pid for pid, _, _ in received} == {"good"}
    failures = [r for r in caplog.records if r.getMessage() == "training_failed"]
    assert len(failures) == 2 and all(r.levelno == logging.ERROR for r in failures)
    assert failures[0].exc_info is not None  # the traceback, for whoever has to fix it
    assert "RuntimeError" in failures[0].__dict__["fedmq_fields"]["error"]


async def test_an_evaluation_that_fails_is_counted_and_training_goes_on(
    transport_config: TransportConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A task whose evaluate gives 17 metrics (no report may carry more than 16): the
    # report cannot be made. Before: the ValueError ended the device's TaskGroup.
    caplog.set_level(logging.WARNING, "fedmq.participant")
    torch.manual_seed(0)
    x, y = torch.rand(N, 1, 28, 28), torch.randint(0, 10, (N,))
    task = dataclasses.replace(
        tasks.fmnist(),
        evaluate=lambda _m, _d: {f"m{i:02d}": 1.0 for i in range(17)} | {"accuracy": 0.5},
    )
    data = DeviceData(train=TensorDataset(x, y), held_out=TensorDataset(x[:4], y[:4]))
    config = dataclasses.replace(device_config("dev-01", tmp_path), eval_every=1)
    async with (
        connect_aggregator(transport_config) as aggregator,
        connect_participant(transport_config, "dev-01") as link,
        asyncio.TaskGroup() as tg,
    ):
        device = Participant(config, link, task, data)
        updates = aiter(aggregator.updates())
        device.start(tg)
        for version in (1, 2):
            await aggregator.publish_model(model_body(version), version=version)
            while (await next_update(updates))[2] < version:
                pass
        await until(lambda: device.stats.eval_failed >= 2)
        device.stop()
    assert device.stats.published >= 2 and device.stats.evaluated == 0
    failures = [r for r in caplog.records if r.getMessage() == "evaluation_failed"]
    assert failures and "ValueError" in failures[0].__dict__["fedmq_fields"]["error"]

"""DP-SGD devices over the real RabbitMQ: their spend reaches the aggregator's stats, and a
device restarted on its state dir carries on from what it had spent.

The real aggregator service and the real participant runtime; each device's epsilon as
the aggregator shows it is the one its own Opacus accountant holds.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch

from fedmq.aggregator import Aggregator, AggregatorConfig
from fedmq.models import get_params
from fedmq.participant import Participant, ParticipantConfig
from fedmq.privacy import DPSGD, DPSGDConfig
from fedmq.transport import TransportConfig, connect_aggregator, connect_participant
from tests import tasks
from tests.integration.aggregators import FEDASYNC
from tests.integration.brokers import delete_job_queues
from tests.tasks import device_data

pytestmark = [pytest.mark.amqp, pytest.mark.filterwarnings("ignore::UserWarning")]

TASK = tasks.fmnist(batch_size=8)
DP = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.fixture
async def transport(amqp_url: str, job: str) -> AsyncIterator[TransportConfig]:
    yield TransportConfig(url=amqp_url, job=job)
    await delete_job_queues(amqp_url, job)


async def until(condition: object, what: str, within: float = 60.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def aggregator_of(config: TransportConfig) -> AsyncIterator[Aggregator]:
    initial = get_params(TASK.build_model(0))
    async with connect_aggregator(config) as link, asyncio.TaskGroup() as tg:
        aggregator = Aggregator(
            AggregatorConfig(strategy=FEDASYNC, eval_every=0, publish_interval_s=0.0),
            link,
            initial,
        )
        task = tg.create_task(aggregator.run(tg), name="aggregator")
        yield aggregator
        task.cancel()


def epsilon_after(updates: int) -> float:
    """What a device's accountant holds after ``updates`` local trainings (Opacus's RDP)."""
    reference = DPSGD(DP, num_examples=24, batch_size=8)
    reference.charge(updates * TASK.training.epochs)
    return reference.epsilon


def device(pid: str, tmp_path: Path, seed: int) -> tuple[ParticipantConfig, object]:
    torch.manual_seed(seed)
    x, y = torch.rand(24, 1, 28, 28), torch.randint(0, 10, (24,))
    config = ParticipantConfig(
        participant_id=pid, state_dir=tmp_path / pid, eval_every=0, dp_sgd=DP
    )
    return config, device_data(x, y)


async def test_dp_sgd_devices_epsilon_reaches_the_aggregator_and_survives_a_restart(
    transport: TransportConfig, tmp_path: Path
) -> None:
    warnings.simplefilter("ignore")
    async with aggregator_of(transport) as aggregator:
        stats = aggregator.stats
        stored: dict[str, int] = {}
        async with asyncio.TaskGroup() as tg:
            devices = []
            for i, pid in enumerate(("dev-01", "dev-02")):
                config, data = device(pid, tmp_path, i)
                link = await connect_participant(transport, pid).__aenter__()
                participant = Participant(config, link, TASK, data)  # type: ignore[arg-type]
                participant.start(tg)
                devices.append((participant, link))
            await until(lambda: all(p.stats.published >= 2 for p, _ in devices), "two updates each")
            for participant, _ in devices:
                participant.stop()
        for participant, link in devices:
            await link.__aexit__(None, None, None)
            stored[participant.config.participant_id] = participant.next_seq
        # Each device's report is what its accountant held after k updates (k = 1, 2...);
        # the aggregator keeps the latest it applied.
        await until(lambda: set(stats.device_privacy) == set(stored), "both devices' spend")
        for pid, spend in stats.device_privacy.items():
            assert spend.mechanism == "dp-sgd" and spend.delta == DP.delta
            assert spend.epsilon in [epsilon_after(k) for k in range(1, stored[pid] + 1)]
        assert stats.device_epsilon()["max"] == max(
            s.epsilon for s in stats.device_privacy.values()
        )
        spent = {pid: epsilon_after(n) for pid, n in stored.items()}

        # A reboot: a new process on the same state dir starts from what its stored
        # updates spent (a training cut short by the stop was never released: not counted).
        config, data = device("dev-01", tmp_path, 0)
        async with connect_participant(transport, "dev-01") as link:
            again = Participant(config, link, TASK, data)  # type: ignore[arg-type]
            assert again.privacy_spend is not None
            assert again.privacy_spend.epsilon == spent["dev-01"]
            async with asyncio.TaskGroup() as tg:
                again.start(tg)
                await until(lambda: again.stats.published >= 1, "an update after the reboot")
                again.stop()
        assert again.privacy_spend is not None
        assert again.privacy_spend.epsilon > spent["dev-01"]  # it went on from there
        await until(
            lambda: stats.device_privacy["dev-01"].epsilon > spent["dev-01"], "the new spend"
        )

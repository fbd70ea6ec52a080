"""One device cannot break the fleet, and a crash loses nothing: the aggregator's side.

Each test runs over the real RabbitMQ and the real Mosquitto and failed before its fix:

- a SIGKILLed aggregator restarted on its checkpoint folder knew only the versions its
  last checkpoint covered: it gave the numbers of versions already published to new,
  different models, and refused updates based on them (``future_base``, ``too_stale``);
- a participant id ``__state__`` made the next start fail (``unreadable checkpoint``);
- an update of values 1e38 was applied (weights 6e37), a second made the model infinite
  and the process died at its next publish, and at every restart after it;
- ``num_examples = 2^64-1`` was admitted (the whole weight of a FedAvg round);
- devices believed a model of version 2^62 from anyone and ignored every real one after
  it, and devices holding a newer version than a restarted aggregator waited forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator import Aggregator, AggregatorConfig, BoundsConfig
from fedmq.codecs import CodecConfig, encode_params
from fedmq.models import build_model, get_params
from fedmq.participant._modelsync import ModelView
from fedmq.strategies import StrategyConfig
from fedmq.transport import TransportConfig, connect_aggregator, connect_participant
from fedmq.wire import (
    ModelEnvelope,
    UpdateEnvelope,
    WireLimits,
    encode_model,
    encode_update,
    tensor_spec_of,
)
from tests.integration.fleet import FedmqProcess, wait_for

pytestmark = pytest.mark.timeout(240)

MODEL = get_params(build_model("cnn-s", seed=0))  # what `fedmq aggregator` starts from
SPEC = tensor_spec_of(MODEL)


def cnn_update(
    pid: str, seq: int, base: int, value: float = 1e-3, *, num_examples: int = 10
) -> bytes:
    """An update for the cnn-s model with every delta entry ``value``."""
    tensors = {k: np.full(v.shape, value, np.float32) for k, v in MODEL.items()}
    return encode_update(
        UpdateEnvelope(
            participant=pid,
            seq=seq,
            base_version=base,
            num_examples=num_examples,
            loss=0.5,
            created=time.time(),
            tensors=tuple(encode_params(tensors, CodecConfig(name="float32"))),
        )
    )


async def send(url: str, job: str, pid: str, *bodies: bytes) -> None:
    async with connect_participant(TransportConfig(url=url, job=job), pid) as device:
        for body in bodies:
            await device.publish_update(body)


@asynccontextmanager
async def serving(url: str, job: str, config: AggregatorConfig) -> AsyncIterator[Aggregator]:
    async with (
        connect_aggregator(TransportConfig(url=url, job=job)) as transport,
        asyncio.TaskGroup() as tg,
    ):
        aggregator = Aggregator(config, transport, MODEL)
        task = tg.create_task(aggregator.run(tg), name="aggregator")
        yield aggregator
        task.cancel()


async def handled(aggregator: Aggregator, count: int, limit_s: float = 30.0) -> None:
    async with asyncio.timeout(limit_s):
        while aggregator.stats.applied + aggregator.stats.dropped < count:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def finite(params: Mapping[str, np.ndarray]) -> bool:
    return all(bool(np.isfinite(v).all()) for v in params.values())


# -- a crash loses nothing -----------------------------------------------------------------


def _versions(proc: FedmqProcess) -> list[int]:
    return [e["version"] for e in proc.events("published")]


async def test_a_restart_knows_every_version_published_before_the_kill(
    broker: str,
    job: str,
    tmp_path: Path,
    data_dir: Path,
) -> None:
    # The first run's state is checkpointed on a graceful stop; the second run publishes
    # versions that no checkpoint covers and is killed; the third must know them.
    args = [
        "aggregator",
        *("--broker", broker, "--job", job, "--checkpoint-dir", str(tmp_path / "ckpt")),
        *("--checkpoint-interval", "600", "--publish-interval", "0", "--eval-every", "0"),
    ]
    runs: list[FedmqProcess] = []

    def start() -> FedmqProcess:
        proc = FedmqProcess(f"aggregator.run{len(runs)}", args, tmp_path, data_dir)
        runs.append(proc)
        wait_for(lambda: proc.events("published"), 90, "the first publish", [proc])
        return proc

    try:
        first = start()
        await send(broker, job, "dev-01", *(cnn_update("dev-01", s, 0) for s in range(3)))
        wait_for(lambda: max(_versions(first)) >= 3, 60, "versions 1 to 3", [first])
        first.stop()
        assert first.events("stopped")  # graceful: a final checkpoint
        second = start()
        await send(broker, job, "dev-01", *(cnn_update("dev-01", s, 3) for s in range(3, 6)))
        wait_for(lambda: len(second.events("accepted")) == 3, 60, "three applies", [second])
        resumed = _versions(second)[0]
        wait_for(lambda: max(_versions(second)) >= resumed + 3, 60, "their versions", [second])
        second.kill()
        before = _versions(first) + _versions(second)
        third = start()
        # Trained from the newest version the killed run published.
        await send(broker, job, "dev-01", cnn_update("dev-01", 6, max(before)))
        wait_for(lambda: 6 in [e["seq"] for e in third.events("accepted")], 60, "seq 6", [third])
        third.stop()
        after = _versions(third)
        assert min(after) > max(before), (before, after)  # never a number twice
        assert third.events("rejected") == []  # the killed run's versions were known
        # The unacked updates of the killed run were applied again, exactly once in all.
        applied = [e["seq"] for e in third.events("accepted")]
        assert sorted(applied) == [3, 4, 5, 6]
    finally:
        for proc in runs:
            proc.stop()


async def test_a_participant_id_cannot_collide_with_the_checkpoint(
    broker: str,
    job: str,
    tmp_path: Path,
) -> None:
    config = AggregatorConfig(eval_every=0, checkpoint_dir=tmp_path, publish_interval_s=0.0)
    async with serving(broker, job, config) as aggregator:
        await send(broker, job, "__state__", cnn_update("__state__", 1, 0))
        await handled(aggregator, 1)
        assert aggregator.stats.applied == 1
    # Before: CheckpointError "unreadable checkpoint" (the sequence table read as state).
    async with serving(broker, job, config) as restarted:
        assert restarted.resumed_from == 1
        await send(broker, job, "__state__", cnn_update("__state__", 1, 1))
        await handled(restarted, 2)  # the counters carry on: 1 applied before the restart
        assert restarted.stats.rejected == {"duplicate": 1}


# -- bounds on what one update may do ------------------------------------------------------


async def test_huge_updates_are_refused_and_the_model_stays_finite(
    broker: str,
    job: str,
    tmp_path: Path,
) -> None:
    config = AggregatorConfig(eval_every=0, checkpoint_dir=tmp_path, publish_interval_s=0.0)
    async with serving(broker, job, config) as aggregator:
        await send(
            broker,
            job,
            "mallory",
            cnn_update("mallory", 1, 0, 1e38),
            cnn_update("mallory", 2, 0, 3e38),
            cnn_update("mallory", 3, 0, num_examples=2**64 - 1),
        )
        await send(broker, job, "dev-01", cnn_update("dev-01", 1, 0))
        await handled(aggregator, 4)
        assert aggregator.stats.rejected == {"norm_bound": 2, "examples_bound": 1}
        assert aggregator.stats.applied == 1 and finite(aggregator.params)
    async with serving(broker, job, config) as restarted:  # and it starts again
        assert restarted.resumed_from == 1 and finite(restarted.params)


async def test_without_bounds_a_non_finite_model_is_never_applied(
    broker: str,
    job: str,
    tmp_path: Path,
) -> None:
    unbounded = BoundsConfig(max_update_norm=None, norm_factor=0)
    config = AggregatorConfig(
        eval_every=0,
        checkpoint_dir=tmp_path,
        publish_interval_s=0.0,
        bounds=unbounded,
        strategy=StrategyConfig(name="fedasync"),
    )
    async with serving(broker, job, config) as aggregator:
        # FedAsync (alpha 0.6): the first takes the weights to 6e37, the next two trained
        # from there would take them past float32's largest value, 3.4e38.
        big = [
            cnn_update("mallory", 1, 0, 1e38),
            *(cnn_update("mallory", s, 1, 3e38) for s in (2, 3)),
        ]
        await send(broker, job, "mallory", *big)
        await send(broker, job, "dev-01", cnn_update("dev-01", 1, 1))
        await handled(aggregator, 4)
        assert aggregator.stats.rejected == {"non_finite_model": 2}
        assert aggregator.stats.applied == 2 and finite(aggregator.params)
    async with serving(broker, job, config) as restarted:  # before: every restart died
        assert finite(restarted.params)


# -- devices follow the aggregator ---------------------------------------------------------


def _model(version: int, value: float, created: float | None = None) -> bytes:
    tensors = {k: np.full(v.shape, value, np.float32) for k, v in MODEL.items()}
    return encode_model(
        ModelEnvelope(
            version=version,
            created=time.time() if created is None else created,
            tensors=tuple(encode_params(tensors, CodecConfig(name="float32"))),
        )
    )


async def _follow(url: str, job: str, view: ModelView, until: int, limit_s: float = 30) -> None:
    """Feed ``view`` with the job's models, as a device does, until it holds ``until``."""
    async with (
        connect_participant(TransportConfig(url=url, job=job), "dev-01") as device,
        asyncio.timeout(limit_s),
    ):
        async for body in device.models():
            view.accept(body)
            if view.version == until:
                return


async def test_devices_leave_a_forged_version_and_a_lost_line(
    broker: str,
    job: str,
) -> None:
    view = ModelView(SPEC, WireLimits())
    config = AggregatorConfig(eval_every=0, publish_interval_s=0.0)
    async with serving(broker, job, config) as aggregator:
        await send(broker, job, "dev-01", *(cnn_update("dev-01", s, 0) for s in range(3)))
        await handled(aggregator, 3)
        await _follow(broker, job, view, 3)
    # Anyone who may write the model stream or topic (an unsigned default) publishes
    # version 2^62; the device believes it: nothing tells it otherwise.
    async with connect_aggregator(TransportConfig(url=broker, job=job)) as forger:
        await forger.publish_model(_model(2**62, 0.0), version=2**62)
    await _follow(broker, job, view, 2**62)
    # The aggregator restarts without its state (no checkpoint folder): version 0 again.
    # Its keyframe was published later than anything the device holds: it is taken.
    async with serving(broker, job, config) as restarted:
        await _follow(broker, job, view, 0)
        assert view.rebased == 1
        await send(broker, job, "dev-01", cnn_update("dev-01", 3, view.version or 0))
        await handled(restarted, 1)
        assert restarted.stats.applied == 1, restarted.stats.rejected

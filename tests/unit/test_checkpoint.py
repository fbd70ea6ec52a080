"""Aggregator checkpoints: round trip, resume, and exactly-once across a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator import Aggregator, AggregatorConfig
from fedmq.aggregator._checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from fedmq.codecs import SparseTensor
from fedmq.strategies import FedBuffConfig, StalenessConfig, StrategyConfig, make_strategy
from fedmq.strategies._strategy import Contribution
from fedmq.transport import TransportConfig, connect_aggregator
from tests.unit.test_aggregator import send
from tests.updates import INITIAL, delta, update

FEDBUFF = StrategyConfig(
    name="fedbuff",
    max_staleness=5,
    fedbuff=FedBuffConfig(
        buffer_size=3, server_optimizer="adam", staleness=StalenessConfig(function="constant")
    ),
)


def test_round_trip_keeps_strategy_state(tmp_path: Path) -> None:
    strategy = make_strategy(FEDBUFF)
    state = strategy.init_state()
    params = dict(INITIAL)
    for value in (1.0, 2.0, 3.0, 4.0):  # one flush (adam moments) and one buffered entry
        new, state = strategy.step(
            params, state, Contribution(delta=delta(value), staleness=0, num_examples=5)
        )
        params = new or params
    save_checkpoint(
        tmp_path,
        Checkpoint(
            version=1,
            params=params,
            strategy_state=state,
            last_seq={"dev-1": 3},
            counters={"applied": 4},
        ),
    )
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert loaded.version == 1 and loaded.last_seq == {"dev-1": 3}
    np.testing.assert_array_equal(loaded.params["w"], params["w"])
    assert strategy.pending(loaded.strategy_state) == 1
    # The restored state steps exactly like the original one.
    a, _ = strategy.step(params, state, Contribution(delta=delta(1.0), staleness=0, num_examples=1))
    assert a is None
    for value in (5.0, 6.0):
        a, state = strategy.step(
            params, state, Contribution(delta=delta(value), staleness=0, num_examples=1)
        )
    restored = loaded.strategy_state
    for value in (5.0, 6.0):
        b, restored = strategy.step(
            params, restored, Contribution(delta=delta(value), staleness=0, num_examples=1)
        )
    assert a is not None and b is not None
    np.testing.assert_array_equal(a["w"], b["w"])


def test_a_buffered_sparse_delta_survives_a_checkpoint(tmp_path: Path) -> None:
    strategy = make_strategy(FEDBUFF)
    sparse = SparseTensor((2, 2), np.array([1, 3], dtype=np.uint32), np.ones(2, np.float32))
    entry = Contribution(
        delta={"w": sparse, "b": np.ones(2, np.float32)}, staleness=0, num_examples=1
    )
    _, state = strategy.step(dict(INITIAL), strategy.init_state(), entry)
    save_checkpoint(
        tmp_path,
        Checkpoint(version=0, params=INITIAL, strategy_state=state, last_seq={}, counters={}),
    )
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    kept = loaded.strategy_state.entries[0][0]["w"]  # type: ignore[attr-defined]
    assert isinstance(kept, SparseTensor) and kept.shape == (2, 2)
    assert kept.indices.tolist() == [1, 3] and kept.values.tolist() == [1.0, 1.0]
    flushed = [strategy.flush(dict(INITIAL), s)[0] for s in (state, loaded.strategy_state)]
    assert flushed[0] is not None and flushed[1] is not None
    np.testing.assert_array_equal(flushed[0]["w"], flushed[1]["w"])


def test_no_checkpoint_yet(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None


def test_corrupt_checkpoint_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "aggregator.ckpt").write_bytes(b"\x93garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path)


async def _serve_until(config: AggregatorConfig, job: str, settled: int) -> Aggregator:
    transport_config = TransportConfig(url="memory://unit", job=job)
    async with connect_aggregator(transport_config) as transport, asyncio.TaskGroup() as tg:
        aggregator = Aggregator(config, transport, INITIAL)
        task = tg.create_task(aggregator.run(tg), name="aggregator")
        async with asyncio.timeout(10):
            while aggregator.stats.applied + aggregator.stats.dropped < settled:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        task.cancel()  # graceful stop: final checkpoint, then settle
    return aggregator


async def test_restart_resumes_and_deduplicates(tmp_path: Path, job: str) -> None:
    config = AggregatorConfig(
        strategy=FEDBUFF,
        eval_every=0,
        checkpoint_dir=tmp_path,
        checkpoint_every=100,
        checkpoint_interval_s=60,
    )
    await send(job, "dev-1", *(update("dev-1", s, 0, delta(1.0)) for s in range(4)))
    first = await _serve_until(config, job, 4)
    assert first.version == 1 and first.stats.buffered == 1
    # A resend of an applied update (a device that rebooted before its outbox
    # saw the confirm) and a new one.
    await send(job, "dev-1", update("dev-1", 3, 1, delta(1.0)), update("dev-1", 4, 1, delta(1.0)))
    second = await _serve_until(config, job, 6)
    assert second.resumed_from == 1
    assert second.stats.applied == 5
    assert second.stats.rejected == {"duplicate": 1}
    assert second.stats.buffered == 2

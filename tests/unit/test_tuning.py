"""Live tuning: parsing, validation, the control envelope, and a running aggregator retuned."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgpack
import numpy as np
import pytest

from fedmq.admin import ctl
from fedmq.aggregator import Aggregator, AggregatorConfig, ControlConfig
from fedmq.aggregator._checkpoint import load_checkpoint
from fedmq.aggregator._control import ControlGate
from fedmq.aggregator._tuning import handle_control
from fedmq.errors import ConfigError, Reason, WireError
from fedmq.strategies import (
    FedAsyncConfig,
    FedAvgConfig,
    FedBuffConfig,
    StalenessConfig,
    StrategyConfig,
    changes,
    knob_values,
    parse_assignments,
    strategy_from_dict,
    strategy_to_dict,
    tuned,
)
from fedmq.transport import TransportConfig, connect_aggregator, connect_participant, send_control
from fedmq.wire import (
    ControlEnvelope,
    KeyRing,
    Signer,
    Verifier,
    create_key_pair,
    decode_control,
    encode_control,
    load_private_key,
)
from tests import updates
from tests.updates import INITIAL, delta

URL = "memory://tuning"
FEDASYNC = StrategyConfig(
    name="fedasync",
    max_staleness=4,
    fedasync=FedAsyncConfig(alpha=0.5, staleness=StalenessConfig(function="constant")),
)
FEDBUFF = StrategyConfig(
    name="fedbuff",
    max_staleness=10,
    fedbuff=FedBuffConfig(buffer_size=4, staleness=StalenessConfig(function="constant")),
)
# The embedded broker is in-process: only this test can publish a command.
TRUSTED = ControlConfig(accept_unsigned=True)


def update(pid: str, seq: int, base: int, value: float = 1.0) -> bytes:
    return updates.update(pid, seq, base, delta(value))


# -- parsing and validation -----------------------------------------------------------------


def test_assignments_are_parsed_by_the_type_of_their_knob() -> None:
    assert parse_assignments(["alpha=0.4", "max-staleness=10", "staleness=hinge"]) == {
        "alpha": 0.4,
        "max_staleness": 10,
        "staleness": "hinge",
    }
    assert parse_assignments(["alpha=1"]) == {"alpha": 1.0}


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ([], "at least one"),
        (["alpha"], "NAME=VALUE"),
        (["beta=1"], "unknown setting 'beta'"),
        (["alpha=high"], "not a number"),
        (["max_staleness=2.5"], "not an integer"),
        (["staleness=cubic"], "not one of"),
        (["alpha=0.1", "alpha=0.2"], "twice"),
    ],
)
def test_bad_assignments_name_the_problem(texts: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_assignments(texts)


def test_tuned_builds_a_validated_config_and_shares_the_staleness_function() -> None:
    new = tuned(FEDASYNC, {"alpha": 0.25, "staleness": "hinge", "staleness_b": 2})
    assert new.fedasync.alpha == 0.25
    assert new.fedasync.staleness == StalenessConfig(function="hinge", a=0.5, b=2)
    assert new.fedbuff.staleness == new.fedasync.staleness  # as the command line sets it
    assert FEDASYNC.fedasync.alpha == 0.5  # never mutated
    assert changes(FEDASYNC, new) == {
        "alpha": (0.5, 0.25),
        "staleness": ("constant", "hinge"),
        "staleness_b": (4, 2),
    }


@pytest.mark.parametrize(
    ("config", "values", "message"),
    [
        (FEDASYNC, {"alpha": 1.5}, r"FedAsyncConfig.alpha: must be in \(0, 1\]"),
        (FEDASYNC, {"alpha": 0.3, "max_staleness": -1}, "max_staleness"),
        (FEDASYNC, {"buffer_size": 3}, "not used by strategy fedasync"),
        (FEDBUFF, {"alpha": 0.3}, "not used by strategy fedbuff"),
        (FEDBUFF, {"buffer_size": 0}, "buffer_size: must be an integer >= 1"),
        (FEDBUFF, {"server_lr": "fast"}, "server_lr"),
        (FEDBUFF, {"server_lr": 150.0}, r"FedBuffConfig.server_lr: must be <= 100 with sgd"),
        (FEDBUFF, {"staleness_a": float("nan")}, "finite"),
        (FEDBUFF, {"gamma": 1}, "not a tunable"),
    ],
)
def test_invalid_changes_are_refused_whole(
    config: StrategyConfig, values: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        tuned(config, values)


def test_knob_values_are_those_the_strategy_uses() -> None:
    assert set(knob_values(FEDASYNC)) == {
        "alpha",
        "staleness",
        "staleness_a",
        "staleness_b",
        "max_staleness",
        "outlier_factor",
    }
    assert set(knob_values(FEDBUFF)) == {
        "staleness",
        "staleness_a",
        "staleness_b",
        "max_staleness",
        "buffer_size",
        "server_lr",
        "robust",
        "trim_fraction",
        "norm_bound_factor",
    }
    fedavg = StrategyConfig(name="fedavg", fedavg=FedAvgConfig(clients_per_round=3))
    assert knob_values(fedavg) == {"clients_per_round": 3}


def test_checkpoint_form_round_trips_and_is_validated() -> None:
    tuned_config = tuned(FEDBUFF, {"buffer_size": 2, "server_lr": 0.5})
    assert strategy_from_dict(strategy_to_dict(tuned_config)) == tuned_config
    broken = strategy_to_dict(tuned_config)
    broken["fedbuff"]["buffer_size"] = 0
    with pytest.raises(ConfigError, match="buffer_size"):
        strategy_from_dict(broken)
    with pytest.raises(ConfigError, match="unknown keys"):
        strategy_from_dict({**strategy_to_dict(FEDBUFF), "surprise": 1})


# -- the control envelope -------------------------------------------------------------------


def test_control_round_trip() -> None:
    env = ControlEnvelope(id="abc", command="set", values={"alpha": 0.4, "b": 3}, issued=1.5)
    data = encode_control(env)
    assert decode_control(data) == env
    assert list(msgpack.unpackb(data)) == ["schema", "id", "command", "values", "issued"]
    reset = ControlEnvelope(id="r", command="reset", issued=2.0)
    assert decode_control(encode_control(reset)) == reset


def _control(**fields: object) -> bytes:
    base: dict[str, object] = {
        "schema": "fedmq.control/1",
        "id": "x",
        "command": "set",
        "values": {"alpha": 0.4},
        "issued": 1.0,
    }
    base.update(fields)
    packed = msgpack.packb({k: v for k, v in base.items() if v is not ...}, use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xc1", Reason.UNDECODABLE),
        (_control(schema="fedmq.update/1"), Reason.UNKNOWN_SCHEMA),
        (_control(issued=...), Reason.MISSING_FIELD),
        (_control(extra=1), Reason.EXTRA_FIELD),
        (_control(command="stop"), Reason.WRONG_TYPE),
        (_control(values={"alpha": True}), Reason.WRONG_TYPE),
        (_control(values={"alpha": -1}), Reason.WRONG_TYPE),
        (_control(values={"alpha": float("inf")}), Reason.NON_FINITE),
        (_control(values={}), Reason.MISSING_FIELD),
        (_control(command="reset"), Reason.EXTRA_FIELD),
        (_control(values={"alpha": [1]}), Reason.WRONG_TYPE),
        (b"\x00" * 70_000, Reason.TOO_LARGE),
    ],
)
def test_control_decoding_is_strict(data: bytes, reason: Reason) -> None:
    with pytest.raises(WireError) as caught:
        decode_control(data)
    assert caught.value.reason == reason


# -- a running aggregator -----------------------------------------------------------------


@asynccontextmanager
async def running(config: AggregatorConfig, job: str) -> AsyncIterator[Aggregator]:
    async with (
        connect_aggregator(TransportConfig(url=URL, job=job)) as transport,
        asyncio.TaskGroup() as tg,
    ):
        aggregator = Aggregator(config, transport, INITIAL)
        task = tg.create_task(aggregator.run(tg), name="aggregator")
        yield aggregator
        task.cancel()


async def send(job: str, pid: str, *bodies: bytes) -> None:
    async with connect_participant(TransportConfig(url=URL, job=job), pid) as p:
        for body in bodies:
            await p.publish_update(body)


async def until(condition: object, within: float = 10.0) -> None:
    assert callable(condition)
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def command(job: str, *assignments: str) -> None:
    await ctl(TransportConfig(url=URL, job=job), "set" if assignments else "reset", assignments)


async def test_ctl_set_changes_a_running_aggregator_between_updates(
    job: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "fedmq.aggregator")
    async with running(
        AggregatorConfig(strategy=FEDASYNC, eval_every=0, control=TRUSTED), job
    ) as aggregator:
        await send(job, "dev-1", update("dev-1", 0, 0))
        await until(lambda: aggregator.version == 1)
        await command(job, "alpha=0.25", "max_staleness=0")
        await until(lambda: aggregator.stats.controls["applied"] == 1)
        assert aggregator.config.strategy.max_staleness == 0
        assert aggregator.config.strategy.fedasync.alpha == 0.25
        # Behaviour: staleness 1 was fine before, is too stale now; fresh ones mix at 0.25.
        await send(job, "dev-2", update("dev-2", 0, 0), update("dev-2", 1, 1, value=4.0))
        await until(lambda: aggregator.stats.applied + aggregator.stats.dropped == 3)
        assert aggregator.stats.rejected == {"too_stale": 1}
        # v1: w = 0.5 * 0 + 0.5 * 1 = 0.5; v2: w = 0.75 * 0.5 + 0.25 * (0.5 + 4) = 1.5
        np.testing.assert_allclose(aggregator.params["w"], np.full((2, 2), 1.5))
    tuned_lines = [r for r in caplog.records if r.getMessage() == "tuned"]
    assert len(tuned_lines) == 1
    fields = tuned_lines[0].__dict__["fedmq_fields"]
    assert fields["changes"] == {"alpha": [0.5, 0.25], "max_staleness": [4, 0]}


async def test_a_bad_command_is_refused_counted_and_the_service_goes_on(job: str) -> None:
    async with running(
        AggregatorConfig(strategy=FEDASYNC, eval_every=0, control=TRUSTED), job
    ) as aggregator:
        await send_control(TransportConfig(url=URL, job=job), b"\xc1garbage")
        body = encode_control(ControlEnvelope(id="x", command="set", values={"alpha": 7.0}))
        await send_control(TransportConfig(url=URL, job=job), body)
        await command(job, "buffer_size=3")  # not a FedAsync knob
        await until(lambda: aggregator.stats.controls["rejected"] == 3)
        assert aggregator.config.strategy == FEDASYNC
        await send(job, "dev-1", update("dev-1", 0, 0))
        await until(lambda: aggregator.version == 1)


async def test_a_smaller_buffer_already_full_is_flushed_at_once(job: str) -> None:
    async with running(
        AggregatorConfig(strategy=FEDBUFF, eval_every=0, control=TRUSTED), job
    ) as aggregator:
        await send(job, "dev-1", *(update("dev-1", s, 0, value=float(s + 1)) for s in range(3)))
        await until(lambda: aggregator.stats.buffered == 3)
        await command(job, "buffer_size=5")  # larger: keeps waiting
        await until(lambda: aggregator.stats.controls["applied"] == 1)
        assert aggregator.version == 0 and aggregator.stats.buffered == 3
        await command(job, "buffer_size=2", "server_lr=0.5")  # 3 >= 2: one step now
        await until(lambda: aggregator.version == 1)
        assert aggregator.stats.buffered == 0
        # g = (1 + 2 + 3) / 3 = 2 (constant weights); x = 0 + 0.5 * 2
        np.testing.assert_allclose(aggregator.params["w"], np.full((2, 2), 1.0))
        await send(job, "dev-1", *(update("dev-1", s, 1) for s in (3, 4)))
        await until(lambda: aggregator.version == 2)  # K = 2 from now on


async def test_server_steps_are_checked_live_as_on_the_command_line(
    job: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "fedmq.aggregator")
    momentum = FedBuffConfig(buffer_size=4, server_optimizer="momentum")
    config = AggregatorConfig(
        strategy=StrategyConfig(name="fedbuff", fedbuff=momentum), eval_every=0, control=TRUSTED
    )
    async with running(config, job) as aggregator:
        assert aggregator.config.strategy.fedbuff.server_lr == 0.1  # momentum's default
        await command(job, "server_lr=20")  # an effective step of 200: cannot work
        await until(lambda: aggregator.stats.controls["rejected"] == 1)
        assert aggregator.config.strategy.fedbuff.server_lr == 0.1
        await command(job, "server_lr=1.0")  # an effective step of 10: valid, known to diverge
        await until(lambda: aggregator.stats.controls["applied"] == 1)
        assert aggregator.config.strategy.fedbuff.server_lr == 1.0
    (refused,) = [r for r in caplog.records if r.getMessage() == "control_rejected"]
    assert (
        "server_lr: must be <= 10 with momentum 0.9" in refused.__dict__["fedmq_fields"]["detail"]
    )
    (risky,) = [r for r in caplog.records if r.getMessage() == "risky_setting"]
    assert risky.levelno == logging.WARNING
    assert "effective step" in risky.__dict__["fedmq_fields"]["detail"]


async def test_retune_refuses_another_strategy(job: str) -> None:
    async with running(
        AggregatorConfig(strategy=FEDASYNC, eval_every=0, control=TRUSTED), job
    ) as aggregator:
        with pytest.raises(ConfigError, match="cannot become fedbuff"):
            await aggregator.retune(dataclasses.replace(FEDASYNC, name="fedbuff"))
        assert aggregator.config.strategy == FEDASYNC


async def test_the_tuned_config_is_checkpointed_and_wins_over_the_command_line(
    job: str, tmp_path: Path
) -> None:
    config = AggregatorConfig(
        strategy=FEDASYNC, eval_every=0, checkpoint_dir=tmp_path, control=TRUSTED
    )
    async with running(config, job) as aggregator:
        await command(job, "alpha=0.3")
        await until(lambda: aggregator.stats.controls["applied"] == 1)
        checkpoint = load_checkpoint(tmp_path)  # written before the command was done
        assert checkpoint is not None
        assert checkpoint.strategy["fedasync"]["alpha"] == 0.3
    # Restarted with another command line: the operator's change stays in force.
    other = dataclasses.replace(config, strategy=tuned(FEDASYNC, {"alpha": 0.9, "staleness_a": 2}))
    async with running(other, job) as aggregator:
        assert aggregator.config.strategy.fedasync.alpha == 0.3
        assert aggregator.config.strategy.fedasync.staleness.a == 0.5
        await command(job)  # reset: back to this command line's settings
        await until(lambda: aggregator.stats.controls["applied"] == 1)
        assert aggregator.config.strategy == other.strategy
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.strategy == {}


# -- forget-device, and signed commands across a restart --------------------------------


async def test_forget_and_the_replay_floor_survive_a_restart(job: str, tmp_path: Path) -> None:
    private, public = create_key_pair("operator", tmp_path / "keys")
    config = AggregatorConfig(
        eval_every=0,
        checkpoint_dir=tmp_path / "ckpt",
        control=ControlConfig(operator_keys=Verifier(KeyRing(public), job)),
    )
    transport = TransportConfig(url=URL, job=job)
    forget = Signer(load_private_key(private), job).seal(
        encode_control(
            ControlEnvelope(
                id="f", command="forget", values={"participant": "dev-01"}, issued=time.time()
            )
        )
    )
    async with running(config, job) as aggregator, connect_participant(transport, "dev-01") as dev:
        await dev.publish_update(updates.update("dev-01", 2**64 - 1, 0, delta(1.0)))
        await until(lambda: aggregator.stats.applied == 1)
        await dev.publish_update(updates.update("dev-01", 1, 0, delta(1.0)))
        await until(lambda: aggregator.stats.rejected["duplicate"] == 1)
        await send_control(transport, forget)
        await until(lambda: aggregator.stats.controls["applied"] == 1)
        await dev.publish_update(updates.update("dev-01", 1, 1, delta(1.0)))
        await until(lambda: aggregator.stats.applied == 2)
    async with running(dataclasses.replace(config), job) as aggregator:
        assert aggregator.control_issued > 0
        await send_control(transport, forget)  # a replay, after a restart
        await until(lambda: aggregator.stats.control_rejected["replayed"] == 1)
        assert aggregator.stats.controls["applied"] == 0


async def test_forgetting_an_unknown_participant_is_refused(job: str) -> None:
    config = AggregatorConfig(eval_every=0, control=ControlConfig(accept_unsigned=True))
    async with running(config, job) as aggregator:
        body = encode_control(
            ControlEnvelope(id="f", command="forget", values={"participant": "nobody"})
        )
        gate_ = ControlGate(config.control)
        assert not await handle_control(aggregator, body, gate_)
        assert aggregator.stats.control_rejected == {"invalid": 1}

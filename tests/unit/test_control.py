"""The control gate: who may steer the aggregator, how fast, and replays (no broker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmq.aggregator import ControlConfig
from fedmq.aggregator._control import ControlGate, TokenBucket
from fedmq.errors import ConfigError, Reason, Rejection, WireError
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

URL = "memory://control"
NOW = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def command(issued: float = NOW, **values: int | float | str) -> bytes:
    return encode_control(
        ControlEnvelope(id="c", command="set", values=values or {"alpha": 0.5}, issued=issued)
    )


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    for key_id in ("operator", "dev-01"):
        create_key_pair(key_id, tmp_path)
    (tmp_path / "ops").mkdir()
    (tmp_path / "operator.pub").rename(tmp_path / "ops" / "operator.pub")
    return tmp_path


def signer(keys: Path, key_id: str, job: str = "j") -> Signer:
    return Signer(load_private_key(keys / f"{key_id}.key"), job)


def gate(config: ControlConfig, wall: float = NOW) -> ControlGate:
    return ControlGate(config, wall=Clock(wall), clock=Clock())


def refused(g: ControlGate, body: bytes) -> Reason:
    with pytest.raises(Rejection) as caught:
        g.admit(body)
    return caught.value.reason


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(2.0, 3, clock=clock)
    assert [bucket.take() for _ in range(5)] == [True, True, True, False, False]
    clock.now = 0.5  # one token back
    assert [bucket.take() for _ in range(2)] == [True, False]
    clock.now = 100.0  # never more than the burst
    assert sum(bucket.take() for _ in range(10)) == 3


def test_with_nothing_configured_every_command_is_refused() -> None:
    g = gate(ControlConfig())
    with pytest.raises(Rejection) as caught:
        g.admit(command())
    assert caught.value.reason is Reason.UNAUTHENTICATED
    assert "--operator-keys" in caught.value.detail  # says how to turn it on


def test_operator_keys_admit_signed_commands_only(keys: Path) -> None:
    g = gate(ControlConfig(operator_keys=Verifier(KeyRing(keys / "ops"), "j")))
    assert refused(g, command()) is Reason.UNSIGNED
    assert refused(g, signer(keys, "dev-01").seal(command())) is Reason.UNKNOWN_KEY
    assert refused(g, signer(keys, "operator", job="other").seal(command())) is (
        Reason.BAD_SIGNATURE
    )
    admitted, key_id = g.admit(signer(keys, "operator").seal(command(alpha=0.25)))
    assert key_id == "operator" and admitted.values == {"alpha": 0.25}


def test_signed_commands_cannot_be_replayed(keys: Path) -> None:
    config = ControlConfig(operator_keys=Verifier(KeyRing(keys / "ops"), "j"), max_age_s=60)
    g = gate(config)
    op = signer(keys, "operator")
    first = op.seal(command(NOW - 5))
    g.admit(first)
    assert refused(g, first) is Reason.REPLAYED  # the same bytes again
    assert refused(g, op.seal(command(NOW - 10))) is Reason.REPLAYED  # older than the last
    assert refused(g, op.seal(command(NOW - 61))) is Reason.REPLAYED  # outside the window
    assert refused(g, op.seal(command(NOW + 61))) is Reason.REPLAYED
    g.admit(op.seal(command(NOW)))
    # A new gate (a restart) that remembers the last one (checkpoint) still refuses it.
    assert refused(ControlGate(config, last_issued=NOW, wall=Clock(NOW)), first) is (
        Reason.REPLAYED
    )


def test_an_oversized_message_is_refused_unread() -> None:
    g = gate(ControlConfig(accept_unsigned=True))
    assert refused(g, b"\x85" + b"\x00" * 70_000) is Reason.TOO_LARGE


def test_accept_unsigned_trusts_the_broker() -> None:
    command_, key_id = gate(ControlConfig(accept_unsigned=True)).admit(command(issued=0.0))
    assert key_id is None and command_.values == {"alpha": 0.5}


def test_over_the_rate_is_refused_before_anything_else() -> None:
    g = gate(ControlConfig(accept_unsigned=True, rate_per_s=1.0, burst=2))
    g.admit(command())
    g.admit(command())
    assert refused(g, command()) is Reason.RATE_LIMITED
    assert refused(g, b"\xc1garbage") is Reason.RATE_LIMITED  # not even parsed


def test_unsigned_commands_do_not_use_up_the_operators_rate(keys: Path) -> None:
    config = ControlConfig(operator_keys=Verifier(KeyRing(keys / "ops"), "j"), burst=2)
    g = gate(config)
    for _ in range(100):  # a device's flood
        assert refused(g, command()) is Reason.UNSIGNED
    op = signer(keys, "operator")
    g.admit(op.seal(command(NOW - 2)))
    g.admit(op.seal(command(NOW - 1)))
    assert refused(g, op.seal(command(NOW))) is Reason.RATE_LIMITED


def test_control_config_ranges() -> None:
    with pytest.raises(ConfigError, match="control_rate"):
        ControlConfig(rate_per_s=0.0)
    with pytest.raises(ConfigError, match="control_burst"):
        ControlConfig(burst=0)
    with pytest.raises(ConfigError, match="control_max_age"):
        ControlConfig(max_age_s=-1.0)


def test_forget_commands_are_strict() -> None:
    body = encode_control(ControlEnvelope(id="f", command="forget", values={"participant": "d"}))
    assert decode_control(body).values == {"participant": "d"}
    wrong: list[dict[str, int | float | str]] = [
        {},
        {"participant": "d", "alpha": 1.0},
        {"participant": 3},
    ]
    for values in wrong:
        with pytest.raises(ValueError, match="forget"):
            encode_control(ControlEnvelope(id="f", command="forget", values=values))
    with pytest.raises(WireError):
        decode_control(body.replace(b"participant", b"participanx"))

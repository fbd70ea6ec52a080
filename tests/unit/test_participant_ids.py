"""One participant id rule (fedmq.wire), used by the config, the CLI, the transports and keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmq.aggregator import AggregatorConfig
from fedmq.cli import main
from fedmq.errors import ConfigError
from fedmq.participant import ParticipantConfig
from fedmq.transport import TransportConfig, connect_participant
from fedmq.wire import (
    PARTICIPANT_ID_RULE,
    check_participant_id,
    create_key_pair,
    is_participant_id,
)

GOOD = ["d", "dev-01", "DEV_01", "0", "-", "_", "__state__", "x" * 64]
BAD = ["", "dev.01", "a/b", "+", "#", "dev 01", "dev-01\n", "dév", "٣", "x" * 65, "dev-01.2025"]


@pytest.mark.parametrize("pid", GOOD)
def test_the_rule_allows(pid: str) -> None:
    assert is_participant_id(pid)
    assert check_participant_id(pid) == pid


@pytest.mark.parametrize("pid", BAD)
def test_the_rule_refuses(pid: str) -> None:
    assert not is_participant_id(pid)
    with pytest.raises(ConfigError, match=r"^id: .* must be 1-64 characters of \[A-Za-z0-9_-\]"):
        check_participant_id(pid, "id")


def test_the_rule_refuses_what_is_not_a_str() -> None:
    assert not is_participant_id(b"dev-01")
    assert not is_participant_id(None)


@pytest.mark.parametrize("pid", ["dev.01", "dév", "x" * 65])
def test_every_user_of_an_id_applies_the_same_rule(pid: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^id: "):  # before: dev.01 and 65 chars accepted
        ParticipantConfig(participant_id=pid, state_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^allowed_participants: "):
        AggregatorConfig(allowed_participants=frozenset({"dev-01", pid}))
    with pytest.raises(ConfigError, match=r"^participant_id: "):  # before: dév accepted
        connect_participant(TransportConfig(url="memory://ids"), pid)
    with pytest.raises(ConfigError, match=r"^key id: "):  # its owner part is the id
        create_key_pair(f"{pid}.2025", tmp_path)


def test_a_key_id_is_an_owner_then_a_label(tmp_path: Path) -> None:
    private, _ = create_key_pair("dev-01.2025", tmp_path)
    assert private.name == "dev-01.2025.key"


@pytest.mark.parametrize("pid", ["dev.01", "a/b", "dév-01"])
def test_the_cli_refuses_a_bad_id_in_one_line(
    pid: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["participant", "--broker=mqtt://127.0.0.1:1", f"--id={pid}", "--shard=0/1"]
    assert main([*argv, f"--state-dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"fedmq: error: id: {pid!r} must be {PARTICIPANT_ID_RULE}, e.g. dev-01"
    ]
    assert not list(tmp_path.iterdir())  # refused before anything was written

"""The device outbox: durable, ordered, and its counter only grows."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmq.participant import Outbox


def test_sequence_survives_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    assert box.next_seq == 0
    box.put(0, b"a")
    box.put(1, b"b")
    box.remove(0)
    reopened = Outbox(tmp_path)
    assert reopened.next_seq == 2
    assert reopened.pending() == [1]
    assert reopened.read(1) == b"b"


def test_counter_never_goes_back_after_everything_was_sent(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    for seq in range(3):
        box.put(seq, b"x")
        box.remove(seq)
    assert Outbox(tmp_path).next_seq == 3


def test_update_newer_than_counter_is_kept(tmp_path: Path) -> None:
    # A device that died after writing update 5 but before advancing the counter.
    box = Outbox(tmp_path)
    box.put(0, b"x")
    (tmp_path / f"{5:020d}.update").write_bytes(b"late")
    reopened = Outbox(tmp_path)
    assert reopened.pending() == [0, 5]
    assert reopened.next_seq == 6


def test_pending_is_in_sequence_order(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    for seq in range(12):
        box.put(seq, str(seq).encode())
    assert box.pending() == list(range(12))


def test_out_of_order_put_is_a_bug(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    with pytest.raises(ValueError, match="expects seq 0"):
        box.put(3, b"x")

"""The device's on-disk outbox and sequence counter.

A finished update is written here (fsync'd) before anything is sent, and
removed only after the broker confirmed it, so a broker outage or a reboot
loses nothing: on restart the pending updates are published in sequence order
and the counter carries on where it was.
"""

from __future__ import annotations

from pathlib import Path

from fedmq._fs import atomic_write

__all__ = ["Outbox"]

_SUFFIX = ".update"


class Outbox:
    """Pending updates as ``<seq>.update`` files plus a ``next_seq`` file, in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._dir.mkdir(parents=True, exist_ok=True)
        self._counter = self._dir / "next_seq"
        stored = int(self._counter.read_text()) if self._counter.exists() else 0
        pending = self.pending()
        # An update file may be newer than the counter if the device died between the two writes.
        self._next = max(stored, pending[-1] + 1 if pending else 0)

    @property
    def next_seq(self) -> int:
        return self._next

    def put(self, seq: int, body: bytes) -> None:
        """Store the update ``seq`` durably, then advance the counter past it."""
        if seq != self._next:
            raise ValueError(f"outbox expects seq {self._next}, got {seq}")
        atomic_write(self._path(seq), body)
        self._next = seq + 1
        atomic_write(self._counter, str(self._next).encode())

    def pending(self) -> list[int]:
        """Sequence numbers still to publish, oldest first."""
        return sorted(int(p.stem) for p in self._dir.glob(f"*{_SUFFIX}"))

    def read(self, seq: int) -> bytes:
        return self._path(seq).read_bytes()

    def remove(self, seq: int) -> None:
        self._path(seq).unlink(missing_ok=True)

    def _path(self, seq: int) -> Path:
        return self._dir / f"{seq:020d}{_SUFFIX}"

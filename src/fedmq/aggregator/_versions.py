"""Published model versions, each made durable before it goes out.

A device trains from the version it was sent and cites it as ``base_version``; the
aggregator needs that version's view (what devices hold, _downlink.py) to apply the
update, and must never give its number to another model. Both hold across a crash
only if every version is on disk before any device can see it, so ``put`` writes it
(atomic, fsync'd) before the aggregator publishes. After a crash the store says what
devices may hold, whatever the last checkpoint covered:

- the highest stored version is the floor: the restarted aggregator's first version
  is above it, so a number is never reused for a different model;
- an update whose base an earlier process published is applied like any other.

One file per version (``versions/<version>.view``, the checkpoint's msgpack format),
written once and deleted once older than what any update may cite (``max_staleness``):
a publish costs one model-sized write, not a whole checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

import msgpack
import numpy as np

from fedmq._fs import atomic_write
from fedmq.aggregator._checkpoint import CheckpointError, pack, unpack

__all__ = ["VersionStore"]

Params = dict[str, np.ndarray]
_SUFFIX = ".view"


class VersionStore:
    """The published versions kept in ``directory/versions``. Not thread-safe."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory / "versions"

    def put(self, version: int, view: Mapping[str, np.ndarray]) -> None:
        """Make ``version`` durable (before it is published)."""
        self._dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self._path(version), pack({"version": version, "params": dict(view)}))

    def prune(self, below: int) -> None:
        """Forget the versions older than ``below`` (no update may cite them any more)."""
        for version in self.versions():
            if version < below:
                with contextlib.suppress(FileNotFoundError):
                    self._path(version).unlink()

    def versions(self) -> list[int]:
        """The stored version numbers, oldest first."""
        if not self._dir.is_dir():
            return []
        found = []
        for path in self._dir.glob(f"*{_SUFFIX}"):
            with contextlib.suppress(ValueError):
                found.append(int(path.stem))
        return sorted(found)

    def load(self) -> dict[int, Params]:
        """Every stored version's view; CheckpointError if one cannot be read."""
        loaded: dict[int, Params] = {}
        for version in self.versions():
            path = self._path(version)
            try:
                document = unpack(path.read_bytes())
                if document["version"] != version:
                    raise ValueError(f"holds version {document['version']}")
                loaded[version] = dict(document["params"])
            except (ValueError, KeyError, TypeError, msgpack.UnpackException) as error:
                raise CheckpointError(f"{path}: unreadable version ({error})") from error
        return loaded

    def _path(self, version: int) -> Path:
        return self._dir / f"{version:020d}{_SUFFIX}"

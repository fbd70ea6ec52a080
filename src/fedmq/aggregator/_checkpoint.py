"""The aggregator's durable state: one file, replaced atomically.

A checkpoint holds everything needed to carry on as if nothing happened: the
model and its version, the strategy state (FedBuff buffer, server optimizer
moments, a FedAvg round in progress), each participant's highest applied
sequence number, the counters, and the strategy configuration an operator put
in force live, if any (``fedmq ctl``; it wins over the command line on
restore, see _tuning.py). The published versions a participant may still train
from are not in it: each is made durable on its own before it goes out
(_versions.py), so none can be newer than what a restart knows.

Format: a msgpack map (``schema: "fedmq.checkpoint/2"``); arrays as an ext
type holding dtype, shape and the raw little-endian bytes; strategy state
dataclasses as another ext type holding their name (from a fixed registry) and
fields. Ext types, not marked maps: a map can hold keys that came from the
network (participant ids), and no such value may ever read back as structure.
Never pickle: a checkpoint is data.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fedmq._fs import atomic_write
from fedmq.codecs import SparseTensor
from fedmq.errors import FedmqError
from fedmq.strategies import FedAsyncState, FedAvgState, FedBuffState

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "load_privacy_ledger",
    "save_checkpoint",
    "save_privacy_ledger",
]

SCHEMA = "fedmq.checkpoint/2"
FILENAME = "aggregator.ckpt"
_ARRAY = 1  # msgpack ext code for an ndarray
_STATE = 2  # msgpack ext code for a strategy state dataclass: [name, {field: value}]
# The dataclasses a checkpoint may hold (strategy state; FedBuff may buffer sparse deltas;
# FedAsync keeps its outlier check's recent norms).
_STATES: dict[str, type] = {
    "FedAsyncState": FedAsyncState,
    "FedBuffState": FedBuffState,
    "FedAvgState": FedAvgState,
    "SparseTensor": SparseTensor,
}


class CheckpointError(FedmqError):
    """A checkpoint file exists but cannot be read: refuse to start rather than forget."""


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """Everything the aggregator needs to resume."""

    version: int
    params: Mapping[str, np.ndarray]
    strategy_state: object
    last_seq: Mapping[str, int]
    counters: Mapping[str, Any] = field(default_factory=dict)
    # dataclasses.asdict(StrategyConfig) once tuned live (fedmq ctl); {} otherwise
    strategy: Mapping[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` durably to ``directory/aggregator.ckpt`` (atomic replace)."""
    directory.mkdir(parents=True, exist_ok=True)
    document = {
        "schema": SCHEMA,
        "version": checkpoint.version,
        "params": dict(checkpoint.params),
        "strategy_state": checkpoint.strategy_state,
        "last_seq": dict(checkpoint.last_seq),
        "counters": dict(checkpoint.counters),
        "strategy": dict(checkpoint.strategy),
        "created": checkpoint.created,
    }
    path = directory / FILENAME
    atomic_write(path, pack(document))
    return path


def pack(document: object) -> bytes:
    """msgpack with the checkpoint's ext types (arrays, strategy state)."""
    data: bytes = msgpack.packb(document, default=_encode, use_bin_type=True)
    return data


def unpack(data: bytes) -> Any:
    """The inverse of ``pack``; raises ValueError (or msgpack's errors) on bad input."""
    return msgpack.unpackb(
        data, ext_hook=_decode_ext, strict_map_key=False, use_list=False, raw=False
    )


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None if there is none yet."""
    path = directory / FILENAME
    if not path.exists():
        return None
    try:
        document = unpack(path.read_bytes())
        if not isinstance(document, dict) or document.get("schema") != SCHEMA:
            schema = document.get("schema") if isinstance(document, dict) else None
            raise CheckpointError(f"{path}: unknown schema {schema!r} (this fedmq reads {SCHEMA})")
        return Checkpoint(
            version=document["version"],
            params=document["params"],
            strategy_state=document["strategy_state"],
            last_seq=document["last_seq"],
            counters=document["counters"],
            strategy=document["strategy"],
            created=document["created"],
        )
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as error:
        raise CheckpointError(f"{path}: unreadable checkpoint ({error})") from error


LEDGER = "privacy.ledger"


def save_privacy_ledger(directory: Path, state: Mapping[str, Any]) -> None:
    """Write the client-level DP accountant's state (``ClientPrivacy.state()``) durably.

    Written after every server step, before its noised model is published: a checkpoint
    comes later, and a crash in between must not forget a step whose model went out."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / LEDGER, pack({"schema": "fedmq.privacy-ledger/1", **state}))


def load_privacy_ledger(directory: Path) -> dict[str, Any] | None:
    """The ledger in ``directory``, or None; CheckpointError if it cannot be read."""
    path = directory / LEDGER
    if not path.exists():
        return None
    try:
        document = unpack(path.read_bytes())
        if not isinstance(document, dict) or document.get("schema") != "fedmq.privacy-ledger/1":
            raise ValueError("unknown schema")
        return document
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise CheckpointError(f"{path}: unreadable privacy ledger ({error})") from error


def _encode(value: object) -> object:
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        header = msgpack.packb([array.dtype.str, list(array.shape)])
        return msgpack.ExtType(_ARRAY, header + array.tobytes())
    if dataclasses.is_dataclass(value) and type(value).__name__ in _STATES:
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return msgpack.ExtType(_STATE, pack([type(value).__name__, fields]))
    if isinstance(value, Mapping):  # read-only mapping proxies in strategy state
        return dict(value)
    raise TypeError(f"cannot checkpoint {type(value).__name__}")


def _decode_ext(code: int, data: bytes) -> object:
    if code == _STATE:
        name, fields = unpack(data)
        return _STATES[name](**fields)
    if code != _ARRAY:
        raise ValueError(f"unknown ext type {code}")
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    dtype, shape = unpacker.unpack()
    array = np.frombuffer(data, dtype=np.dtype(dtype), offset=unpacker.tell())
    return array.reshape(shape)  # read-only, like the strategies' own copies

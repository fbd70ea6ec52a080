"""The aggregator's durable state: one file, replaced atomically.

A checkpoint holds everything needed to carry on as if nothing happened: the
model and its version, the published versions a participant may still train
from, the strategy state (FedBuff buffer, server optimizer moments, a FedAvg
round in progress), each participant's highest applied sequence number, the
counters, and the strategy configuration an operator put in force live, if any
(``fedmq ctl``; it wins over the command line on restore, see _tuning.py).

Format: a msgpack map (``schema: "fedmq.checkpoint/1"``); arrays as an ext
type holding dtype, shape and the raw little-endian bytes; strategy state
dataclasses by name from a fixed registry. Never pickle: a checkpoint is data.
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
from fedmq.strategies import FedAvgState, FedBuffState

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]

SCHEMA = "fedmq.checkpoint/1"
FILENAME = "aggregator.ckpt"
_ARRAY = 1  # msgpack ext code for an ndarray
# The dataclasses a checkpoint may hold (strategy state; FedBuff may buffer sparse deltas).
_STATES: dict[str, type] = {
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
    history: Mapping[int, Mapping[str, np.ndarray]]
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
        "history": {str(v): dict(p) for v, p in checkpoint.history.items()},
        "strategy_state": checkpoint.strategy_state,
        "last_seq": dict(checkpoint.last_seq),
        "counters": dict(checkpoint.counters),
        "strategy": dict(checkpoint.strategy),
        "created": checkpoint.created,
    }
    path = directory / FILENAME
    atomic_write(path, msgpack.packb(document, default=_encode, use_bin_type=True))
    return path


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None if there is none yet."""
    path = directory / FILENAME
    if not path.exists():
        return None
    try:
        document = msgpack.unpackb(
            path.read_bytes(),
            ext_hook=_decode_ext,
            object_hook=_decode_object,
            strict_map_key=False,
            use_list=False,
            raw=False,
        )
        if document.get("schema") != SCHEMA:
            raise CheckpointError(f"{path}: unknown schema {document.get('schema')!r}")
        return Checkpoint(
            version=document["version"],
            params=document["params"],
            history={int(v): p for v, p in document["history"].items()},
            strategy_state=document["strategy_state"],
            last_seq=document["last_seq"],
            counters=document["counters"],
            strategy=document["strategy"],
            created=document["created"],
        )
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as error:
        raise CheckpointError(f"{path}: unreadable checkpoint ({error})") from error


def _encode(value: object) -> object:
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        header = msgpack.packb([array.dtype.str, list(array.shape)])
        return msgpack.ExtType(_ARRAY, header + array.tobytes())
    if dataclasses.is_dataclass(value) and type(value).__name__ in _STATES:
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {"__state__": type(value).__name__, **fields}
    if isinstance(value, Mapping):  # read-only mapping proxies in strategy state
        return dict(value)
    raise TypeError(f"cannot checkpoint {type(value).__name__}")


def _decode_ext(code: int, data: bytes) -> object:
    if code != _ARRAY:
        raise ValueError(f"unknown ext type {code}")
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    dtype, shape = unpacker.unpack()
    array = np.frombuffer(data, dtype=np.dtype(dtype), offset=unpacker.tell())
    return array.reshape(shape)  # read-only, like the strategies' own copies


def _decode_object(document: dict[str, Any]) -> object:
    name = document.get("__state__")
    if name is None:
        return document
    fields = {k: v for k, v in document.items() if k != "__state__"}
    return _STATES[name](**fields)

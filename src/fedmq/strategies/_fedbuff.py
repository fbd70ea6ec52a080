"""FedBuff (Nguyen et al., 2022): buffer K weighted deltas, then take one server step.

With buffered deltas ``delta_i`` of staleness ``d_i`` and ``K`` entries::

    g = (1 / K) * sum_i s(d_i) * delta_i            # the paper's weighted mean

then one step of the server optimizer, with learning rate ``lr``:

    sgd       x <- x + lr * g
    momentum  m <- beta * m + g                     # FedAvgM (Hsu et al., 2019)
              x <- x + lr * m
    adam      m <- beta1 * m + (1 - beta1) * g      # FedAdam (Reddi et al., 2021),
              v <- beta2 * v + (1 - beta2) * g**2   # the FedOpt form: no bias correction
              x <- x + lr * m / (sqrt(v) + eps)

``m`` and ``v`` start at zero and persist across flushes in ``FedBuffState``.
Deltas point from a participant's base model to its trained model, so adding
them moves the global model the way local training did.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from fedmq.codecs import SparseTensor, add_scaled
from fedmq.strategies._common import (
    Delta,
    Params,
    check_compatible,
    f32,
    frozen_delta,
    is_int,
    is_number,
    require,
)
from fedmq.strategies._staleness import StalenessConfig, staleness_weight

__all__ = [
    "SERVER_OPTIMIZERS",
    "FedBuffConfig",
    "FedBuffState",
    "ServerOptimizer",
    "fedbuff_add",
    "fedbuff_flush",
    "fedbuff_init",
    "fedbuff_ready",
]

ServerOptimizer = Literal["sgd", "momentum", "adam"]
SERVER_OPTIMIZERS: tuple[ServerOptimizer, ...] = get_args(ServerOptimizer)

_Arrays = Mapping[str, npt.NDArray[np.float32]]
_Entry = tuple[Mapping[str, npt.NDArray[np.float32] | SparseTensor], float]


@dataclass(frozen=True, kw_only=True)
class FedBuffConfig:
    """FedBuff's buffer size ``K``, staleness weights and server optimizer.

    The defaults are the benchmark's: K = 10, server lr 1.0, plain SGD, weights
    ``1 / sqrt(1 + d)``. ``momentum`` is the momentum optimizer's beta; the
    ``adam_*`` values are FedAdam's (Reddi et al. suggest eps = 1e-3).
    """

    buffer_size: int = 10
    server_lr: float = 1.0
    # polynomial with a = 0.5: s(d) = 1 / sqrt(1 + d)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    server_optimizer: ServerOptimizer = "sgd"
    momentum: float = 0.9
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_eps: float = 1e-3

    def __post_init__(self) -> None:
        require(
            is_int(self.buffer_size) and self.buffer_size >= 1,
            self,
            "buffer_size",
            "an integer >= 1",
            self.buffer_size,
        )
        require(
            is_number(self.server_lr) and self.server_lr > 0,
            self,
            "server_lr",
            "a finite number > 0",
            self.server_lr,
        )
        require(
            isinstance(self.staleness, StalenessConfig),
            self,
            "staleness",
            "a StalenessConfig",
            self.staleness,
        )
        require(
            self.server_optimizer in SERVER_OPTIMIZERS,
            self,
            "server_optimizer",
            " | ".join(SERVER_OPTIMIZERS),
            self.server_optimizer,
        )
        for name in ("momentum", "adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            require(is_number(value) and 0 <= value < 1, self, name, "in [0, 1)", value)
        require(
            is_number(self.adam_eps) and self.adam_eps > 0,
            self,
            "adam_eps",
            "a finite number > 0",
            self.adam_eps,
        )


@dataclass(frozen=True, eq=False)
class FedBuffState:
    """The buffer and the server optimizer's memory; plain arrays, floats and ints.

    ``entries`` holds ``(delta, weight)`` pairs, ``weight = s(staleness)`` taken
    when the delta arrived; the arrays are read-only copies (top-k tensors decoded
    sparse stay ``SparseTensor``). ``m`` and ``v`` are
    the optimizer's moments (None until the first flush that uses them).
    ``flushes`` counts server steps taken.
    """

    entries: tuple[_Entry, ...] = ()
    m: _Arrays | None = None
    v: _Arrays | None = None
    flushes: int = 0


def fedbuff_init() -> FedBuffState:
    """An empty buffer with zeroed optimizer state."""
    return FedBuffState()


def fedbuff_add(
    state: FedBuffState, delta: Delta, staleness: int, config: FedBuffConfig
) -> FedBuffState:
    """``state`` with ``delta`` buffered at weight ``s(staleness)``; ``delta`` is copied.

    ``ValueError`` if its tensor names or shapes differ from those already buffered.
    """
    if state.entries:
        check_compatible(state.entries[0][0], delta, "delta")
    weight = staleness_weight(config.staleness)(staleness)
    return replace(state, entries=(*state.entries, (frozen_delta(delta), weight)))


def fedbuff_ready(state: FedBuffState, config: FedBuffConfig) -> bool:
    """Whether the buffer holds ``buffer_size`` deltas (time to flush)."""
    return len(state.entries) >= config.buffer_size


def fedbuff_flush(
    global_: Params, state: FedBuffState, config: FedBuffConfig
) -> tuple[dict[str, npt.NDArray[np.float32]], FedBuffState]:
    """Apply the buffered deltas in one server step; returns the new model and state.

    See the module docstring for the formulas. ``K`` is the number of entries
    buffered, which is ``buffer_size`` unless flushed early (at shutdown, say).
    The returned state has an empty buffer. Inputs are never modified.
    ``ValueError`` if the buffer is empty or does not fit ``global_``.
    """
    if not state.entries:
        raise ValueError("fedbuff_flush: the buffer is empty")
    check_compatible(global_, state.entries[0][0], "buffered delta")
    k = len(state.entries)
    g = {name: _weighted_mean(state.entries, name, k) for name in global_}
    lr = config.server_lr
    m, v = state.m, state.v
    match config.server_optimizer:
        case "sgd":
            # x + lr * g, written into g's own buffer (made here, used nowhere else): the
            # same float32 roundings as the expression below, without two model-sized
            # temporaries per flush.
            for name, x in global_.items():
                if lr != 1.0:
                    g[name] *= np.float32(lr)
                np.add(f32(x), g[name], out=g[name])
            return g, replace(state, entries=(), flushes=state.flushes + 1)
        case "momentum":
            beta = config.momentum
            m = {name: f32(beta * _prev(m, name, g) + g[name]) for name in g}
            step = m
        case "adam":
            b1, b2, eps = config.adam_beta1, config.adam_beta2, config.adam_eps
            m = {name: f32(b1 * _prev(m, name, g) + (1 - b1) * g[name]) for name in g}
            v = {name: f32(b2 * _prev(v, name, g) + (1 - b2) * g[name] ** 2) for name in g}
            step = {name: f32(m[name] / (np.sqrt(v[name]) + eps)) for name in g}
    new_global = {name: f32(f32(x) + lr * step[name]) for name, x in global_.items()}
    new_state = FedBuffState(
        entries=(),
        m=None if m is None else _freeze(m),
        v=None if v is None else _freeze(v),
        flushes=state.flushes + 1,
    )
    return new_global, new_state


def _weighted_mean(entries: tuple[_Entry, ...], name: str, k: int) -> npt.NDArray[np.float32]:
    """``sum_i w_i * delta_i[name] / k`` in float32, accumulated in place (no temporaries
    per term beyond one scratch array; the same roundings as the plain sum). Sparse terms
    add into their own entries only (consecutive ones in one call): the same float32
    result, in O(k) rather than O(model)."""
    first = entries[0][0][name]
    acc = np.zeros(first.shape, dtype=np.float32)
    term: npt.NDArray[np.float32] | None = None
    sparse: list[tuple[SparseTensor, float]] = []
    for delta, weight in entries:
        tensor = delta[name]
        if isinstance(tensor, SparseTensor):
            sparse.append((tensor, weight))
            continue
        add_scaled(acc, sparse)  # the sparse terms before this one, in order
        sparse = []
        if term is None:
            term = np.empty_like(acc)
        np.multiply(f32(tensor), weight, out=term, dtype=np.float32)
        acc += term
    add_scaled(acc, sparse)
    acc /= np.float32(k)
    return acc


def _prev(moment: _Arrays | None, name: str, like: _Arrays) -> npt.NDArray[np.float32]:
    """The stored moment for ``name``, or zeros before the first step."""
    return np.zeros_like(like[name]) if moment is None else moment[name]


def _freeze(arrays: _Arrays) -> _Arrays:
    """Mark arrays this module just created read-only, so a state never changes."""
    for array in arrays.values():
        array.flags.writeable = False
    return arrays

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

Each optimizer has its own default ``lr`` (``default_server_lr``), because the same
number means different steps:

- ``momentum`` adds ``g`` in full every step, so steady progress moves the model by
  ``lr / (1 - beta)`` times ``g`` (the *effective* step, Hsu et al. 2019): ``lr`` 1.0
  with beta 0.9 is ten times SGD's step, and in asynchronous FedBuff, where every delta
  is already a few versions stale, that overshoots and diverges. The default is
  ``lr = 1 - beta`` (0.1 with beta 0.9): the effective step of SGD at 1.0.
- ``adam`` divides by ``sqrt(v)``: ``m / (sqrt(v) + eps)`` is about +-1 for every weight
  whose delta is well above ``eps``, so ``lr`` is the distance *each weight* moves per
  step, whatever the size of the deltas. At 1.0 every weight of a model whose weights
  are about 0.1 jumps by about 1 on the first step, and the devices' training turns
  to NaN. Reddi et al. (2021) tune it around 1e-2 (with eps = 1e-3): the default.

``fedbuff_warnings`` names settings that are valid but known to diverge; the
configuration refuses (``ConfigError``) those that cannot work (``MAX_EFFECTIVE_STEP``,
``MAX_ADAM_LR``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
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
    "MAX_ADAM_LR",
    "MAX_EFFECTIVE_STEP",
    "SERVER_OPTIMIZERS",
    "Combine",
    "Entry",
    "FedBuffConfig",
    "FedBuffState",
    "ServerOptimizer",
    "default_server_lr",
    "fedbuff_add",
    "fedbuff_flush",
    "fedbuff_init",
    "fedbuff_ready",
    "fedbuff_warnings",
    "weighted_mean",
]

ServerOptimizer = Literal["sgd", "momentum", "adam"]
SERVER_OPTIMIZERS: tuple[ServerOptimizer, ...] = get_args(ServerOptimizer)

# The server learning rate of sgd and adam when none is given (see the module
# docstring); momentum's is 1 - beta (default_server_lr).
_DEFAULT_LR: Mapping[ServerOptimizer, float] = MappingProxyType({"sgd": 1.0, "adam": 0.01})
# Refused: an effective step lr / (1 - beta) above this (sgd: beta = 0): a hundred times
# the averaged delta per step, where 10 already diverged in `fedmq bench`.
MAX_EFFECTIVE_STEP = 100.0
# Refused: adam's lr above this moves every weight by more than 1 per step, ten times a
# typical weight of the models here (1 already made the devices' training NaN).
MAX_ADAM_LR = 1.0
# Warned about (measured with `fedmq bench`, docs/tuning.md): momentum at an effective step
# of 2 still trained (0.79 after 345 updates), at 10 it diverged; adam at lr 0.03 peaked at
# 0.70 after 4 versions, then fell to 0.35-0.5.
_RISKY_EFFECTIVE_STEP = 2.0
_RISKY_ADAM_LR = 0.02
_RISKY_ADAM_EPS = 1e-6

_Arrays = Mapping[str, npt.NDArray[np.float32]]
_Entry = tuple[Mapping[str, npt.NDArray[np.float32] | SparseTensor], float]
Entry = _Entry
"""One buffered contribution: (delta, staleness weight s(d))."""

Combine = Callable[[Sequence[_Entry], int], dict[str, npt.NDArray[np.float32]]]
"""How a full buffer becomes the server step's direction ``g``: ``combine(entries, k)``
returns a new float32 array per tensor (the caller may write into them). ``k`` is the
denominator of a mean (``buffer_size`` when the buffer filled). The default is
``weighted_mean`` (FedBuff's own rule); the robust rules and the client-level DP
mechanism are other ``Combine`` functions (strategies/_robust.py, privacy/)."""


@dataclass(frozen=True, kw_only=True)
class FedBuffConfig:
    """FedBuff's buffer size ``K``, staleness weights and server optimizer.

    The defaults are the benchmark's: K = 10, plain SGD at server lr 1.0, weights
    ``1 / sqrt(1 + d)``. ``momentum`` is the momentum optimizer's beta; the
    ``adam_*`` values are FedAdam's (Reddi et al. suggest eps = 1e-3).

    ``server_lr`` left at None becomes the optimizer's own default
    (``default_server_lr``: sgd 1.0, momentum 1 - beta = 0.1, adam 0.01) on construction, so it
    is always a number once built (``dataclasses.replace`` to another optimizer keeps
    that number: give ``server_lr=None`` to get the new optimizer's default).
    Refused (``ConfigError``): an effective step ``server_lr / (1 - momentum)`` above
    ``MAX_EFFECTIVE_STEP`` (sgd, momentum), an adam ``server_lr`` above ``MAX_ADAM_LR``.
    """

    buffer_size: int = 10
    server_lr: float | None = None
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
        lr = self.server_lr
        if lr is None:
            lr = default_server_lr(self.server_optimizer, self.momentum)
            object.__setattr__(self, "server_lr", lr)
        require(is_number(lr) and lr > 0, self, "server_lr", "a finite number > 0", lr)
        if self.server_optimizer == "adam":
            require(lr <= MAX_ADAM_LR, self, "server_lr", f"<= {MAX_ADAM_LR:g} with adam", lr)
        else:
            beta = self.momentum if self.server_optimizer == "momentum" else 0.0
            top = round(MAX_EFFECTIVE_STEP * (1 - beta), 12)
            require(
                self.effective_step <= MAX_EFFECTIVE_STEP,
                self,
                "server_lr",
                f"<= {top:.3g} with {self.server_optimizer}"
                + (
                    f" {beta:g} (an effective step lr / (1 - momentum) <= {MAX_EFFECTIVE_STEP:g})"
                    if self.server_optimizer == "momentum"
                    else ""
                ),
                lr,
            )

    @property
    def lr(self) -> float:
        """``server_lr``, always a number once constructed."""
        assert self.server_lr is not None
        return self.server_lr

    @property
    def effective_step(self) -> float:
        """sgd and momentum: how far steady progress moves the model per step, in units of
        the averaged delta: ``lr / (1 - momentum)`` (``lr`` for sgd)."""
        beta = self.momentum if self.server_optimizer == "momentum" else 0.0
        return round(self.lr / (1 - beta), 12)  # 0.2 / (1 - 0.9) is 2, not 2.0000000000000004


def default_server_lr(optimizer: ServerOptimizer, momentum: float = 0.9) -> float:
    """The server learning rate ``optimizer`` uses when none is given: sgd 1.0,
    momentum ``1 - momentum`` (an effective step of 1, as sgd's), adam 0.01."""
    return round(1.0 - momentum, 12) if optimizer == "momentum" else _DEFAULT_LR[optimizer]


def fedbuff_warnings(config: FedBuffConfig) -> tuple[str, ...]:
    """What in ``config`` is valid but known to diverge, one sentence each (empty if none)."""
    found: list[str] = []
    if config.server_optimizer == "adam":
        if config.lr > _RISKY_ADAM_LR:
            found.append(
                f"server_lr {config.lr:g} with adam moves every weight by about that much per "
                f"step; above {_RISKY_ADAM_LR:g} training is known to diverge "
                f"(default {default_server_lr('adam'):g})"
            )
        if config.adam_eps < _RISKY_ADAM_EPS:
            found.append(
                f"adam_eps {config.adam_eps:g} is below {_RISKY_ADAM_EPS:g}: weights whose "
                "deltas are only noise move by a full server_lr every step (Reddi et al. use 1e-3)"
            )
    elif config.effective_step > _RISKY_EFFECTIVE_STEP:
        found.append(
            f"server_lr {config.lr:g} with {config.server_optimizer}"
            + (f" {config.momentum:g}" if config.server_optimizer == "momentum" else "")
            + f" is an effective step lr / (1 - momentum) of {config.effective_step:.3g}, "
            f"above {_RISKY_EFFECTIVE_STEP:g}: stale deltas overshoot and training is known "
            "to diverge (default server_lr "
            f"{default_server_lr(config.server_optimizer, config.momentum):g})"
        )
    return tuple(found)


@dataclass(frozen=True, eq=False)
class FedBuffState:
    """The buffer and the server optimizer's memory; plain arrays, floats and ints.

    ``entries`` holds ``(delta, weight)`` pairs, ``weight = s(staleness)`` taken
    when the delta arrived; the arrays are read-only copies (top-k tensors decoded
    sparse stay ``SparseTensor``). ``m`` and ``v`` are
    the optimizer's moments (None until the first flush that uses them).
    ``flushes`` counts server steps taken; ``clipped``, the deltas the norm-bounded
    robust rule scaled down in them (strategies/_robust.py; 0 with any other rule).
    """

    entries: tuple[_Entry, ...] = ()
    m: _Arrays | None = None
    v: _Arrays | None = None
    flushes: int = 0
    clipped: int = 0


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


def weighted_mean(entries: Sequence[_Entry], k: int) -> dict[str, npt.NDArray[np.float32]]:
    """FedBuff's own ``Combine``: ``g = (1 / k) * sum_i s(d_i) * delta_i``, per tensor."""
    return {name: _weighted_mean(entries, name, k) for name in entries[0][0]}


def fedbuff_flush(
    global_: Params,
    state: FedBuffState,
    config: FedBuffConfig,
    combine: Combine = weighted_mean,
) -> tuple[dict[str, npt.NDArray[np.float32]], FedBuffState]:
    """Apply the buffered deltas in one server step; returns the new model and state.

    See the module docstring for the formulas; ``combine`` turns the buffer into ``g``
    (default: the weighted mean). ``K`` is the number of entries
    buffered, which is ``buffer_size`` unless flushed early (at shutdown, say).
    The returned state has an empty buffer. Inputs are never modified.
    ``ValueError`` if the buffer is empty or does not fit ``global_``.
    """
    if not state.entries:
        raise ValueError("fedbuff_flush: the buffer is empty")
    check_compatible(global_, state.entries[0][0], "buffered delta")
    k = len(state.entries)
    g = combine(state.entries, k)
    lr = config.lr
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
    new_state = replace(
        state,
        entries=(),
        m=None if m is None else _freeze(m),
        v=None if v is None else _freeze(v),
        flushes=state.flushes + 1,
    )
    return new_global, new_state


def _weighted_mean(entries: Sequence[_Entry], name: str, k: int) -> npt.NDArray[np.float32]:
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

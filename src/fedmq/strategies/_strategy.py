"""One interface for every strategy, so the aggregator never branches on a name.

The aggregator keeps an opaque state, feeds it one ``Contribution`` at a time
and publishes whenever ``step`` returns new parameters::

    strategy = make_strategy(config)
    state = strategy.init_state()
    new_params, state = strategy.step(params, state, contribution)
    if new_params is not None:
        params = new_params  # a new version
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, TypeVar, get_args

import numpy as np
import numpy.typing as npt

from fedmq.errors import Reason, RejectedUpdate
from fedmq.strategies._common import (
    Delta,
    Params,
    check_compatible,
    dense,
    f32,
    frozen_copy,
    is_int,
    require,
)
from fedmq.strategies._fedasync import FedAsyncConfig, fedasync_apply
from fedmq.strategies._fedavg import FedAvgConfig, fedavg_aggregate
from fedmq.strategies._fedbuff import (
    Combine,
    Entry,
    FedBuffConfig,
    FedBuffState,
    fedbuff_add,
    fedbuff_flush,
    fedbuff_init,
    fedbuff_ready,
    fedbuff_warnings,
)
from fedmq.strategies._robust import (
    RobustConfig,
    delta_norm,
    norm_bounded_mean,
    outlier_limit,
    robust_combine,
)

__all__ = [
    "STRATEGY_NAMES",
    "Contribution",
    "FedAsyncState",
    "FedAvgState",
    "Strategy",
    "StrategyConfig",
    "StrategyName",
    "make_strategy",
    "strategy_warnings",
]

StrategyName = Literal["fedasync", "fedbuff", "fedavg"]
STRATEGY_NAMES: tuple[StrategyName, ...] = get_args(StrategyName)

_NewParams = dict[str, npt.NDArray[np.float32]]
_S = TypeVar("_S")


@dataclass(frozen=True, kw_only=True, eq=False)
class Contribution:
    """One admitted update, as the strategy sees it.

    ``delta`` is trained minus base (top-k tensors may be ``SparseTensor``: FedBuff
    sums them sparsely, the others make them dense); ``staleness`` is how many versions the
    global model advanced since ``base``; ``num_examples`` is the participant's
    local data size (FedAvg's weight). ``base`` is the model the participant
    trained from, required when the strategy ``needs_base`` (FedAsync mixes in
    ``base + delta``). ``norm``: the delta's L2 norm when the caller has it already
    (the aggregator computes it on decode); FedAsync's outlier check reads it, and
    computes it only when it is missing and the check is on.
    """

    delta: Delta
    staleness: int
    num_examples: int
    base: Params | None = None
    norm: float | None = None

    def __post_init__(self) -> None:
        if not is_int(self.staleness) or self.staleness < 0:
            raise ValueError(
                f"Contribution.staleness: must be an integer >= 0, got {self.staleness!r}"
            )
        if not is_int(self.num_examples) or self.num_examples < 0:
            raise ValueError(
                f"Contribution.num_examples: must be an integer >= 0, got {self.num_examples!r}"
            )


@dataclass(frozen=True, kw_only=True)
class StrategyConfig:
    """Which strategy, each one's settings, and how stale an update may be.

    Updates staler than ``max_staleness`` are dropped (and counted) by the
    aggregator before they reach the strategy; FedAvg accepts only updates of
    the current round (staleness 0) whatever this says. ``robust``: FedBuff's robust
    rule and FedAsync's outlier check (strategies/_robust.py); a rule other than
    ``mean`` needs FedBuff, an outlier check FedAsync.
    """

    name: StrategyName = "fedasync"
    max_staleness: int = 50
    fedasync: FedAsyncConfig = field(default_factory=FedAsyncConfig)
    fedbuff: FedBuffConfig = field(default_factory=FedBuffConfig)
    fedavg: FedAvgConfig = field(default_factory=FedAvgConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)

    def __post_init__(self) -> None:
        require(self.name in STRATEGY_NAMES, self, "name", " | ".join(STRATEGY_NAMES), self.name)
        require(
            is_int(self.max_staleness) and self.max_staleness >= 0,
            self,
            "max_staleness",
            "an integer >= 0",
            self.max_staleness,
        )
        for name, kind in (
            ("fedasync", FedAsyncConfig),
            ("fedbuff", FedBuffConfig),
            ("fedavg", FedAvgConfig),
            ("robust", RobustConfig),
        ):
            value = getattr(self, name)
            require(isinstance(value, kind), self, name, f"a {kind.__name__}", value)
        rule = self.robust.rule
        require(
            rule == "mean" or self.name == "fedbuff",
            self,
            "robust",
            f"mean with strategy {self.name} (rule {rule} combines FedBuff's buffer)",
            rule,
        )
        require(
            not self.robust.outlier_factor or self.name == "fedasync",
            self,
            "outlier_factor",
            f"0 with strategy {self.name} (the outlier check is FedAsync's; FedBuff: "
            "rule norm_bounded)",
            self.robust.outlier_factor,
        )


class Strategy(Protocol):
    """What the aggregator drives. Pure and synchronous: no I/O, inputs never modified.

    The state is opaque to the caller: keep what ``init_state``, ``step`` and
    ``flush`` return and pass it back. It holds only arrays, numbers and tuples.
    """

    @property
    def needs_base(self) -> bool:
        """Whether ``Contribution.base`` must be set (FedAsync)."""
        ...

    @property
    def max_staleness(self) -> int:
        """Drop updates staler than this before ``step`` (0 for FedAvg: this round only)."""
        ...

    def init_state(self) -> object:
        """The state before any contribution."""
        ...

    def step(
        self, global_: Params, state: object, contribution: Contribution
    ) -> tuple[_NewParams | None, object]:
        """Take one contribution.

        Returns ``(new_params, state)`` when the model changed (a new version),
        ``(None, state)`` when the contribution was only buffered.
        """
        ...

    def pending(self, state: object) -> int:
        """How many contributions are buffered, not yet in the model."""
        ...

    def clipped(self, state: object) -> int:
        """Deltas a robust rule scaled down so far (FedBuff ``norm_bounded``; else 0)."""
        ...

    def changes_model(self, state: object) -> bool:
        """Whether the next ``step`` makes a new model (O(model) work, worth a thread);
        otherwise it only buffers the contribution, in O(number of tensors)."""
        ...

    def flush(self, global_: Params, state: object) -> tuple[_NewParams | None, object]:
        """Apply whatever is buffered now: ``(None, state)`` when nothing is.

        For a FedAvg round that closes with fewer than ``clients_per_round``
        participants, or to drain FedBuff's buffer at shutdown.
        """
        ...


def strategy_warnings(config: StrategyConfig) -> tuple[str, ...]:
    """Settings of the strategy in use that are valid but known to diverge (for a loud
    warning at start and on live tuning); empty if none."""
    return fedbuff_warnings(config.fedbuff) if config.name == "fedbuff" else ()


def make_strategy(config: StrategyConfig, *, combine: Combine | None = None) -> Strategy:
    """The strategy ``config.name`` selects, configured by its own section.

    ``combine``: how FedBuff turns a full buffer into its step; None: the rule
    ``config.robust`` names (the weighted mean by default). Only FedBuff takes one.
    FedAsync runs the outlier check of ``config.robust`` (off by default).
    """
    match config.name:
        case "fedasync":
            return _FedAsync(config.fedasync, config.max_staleness, config.robust)
        case "fedbuff":
            bounded = None
            if combine is None and config.robust.rule == "norm_bounded":
                bounded = config.robust.norm_bound_factor  # counted: see _FedBuff._flush
            return _FedBuff(
                config.fedbuff,
                config.max_staleness,
                combine or robust_combine(config.robust),
                bounded,
            )
        case "fedavg":
            return _FedAvg(config.fedavg)


@dataclass(frozen=True, eq=False)
class FedAsyncState:
    """The L2 norms of the last accepted updates (at most the outlier window), oldest
    first: the running statistics of FedAsync's outlier check, checkpointed with the
    rest of the strategy state so a restart keeps the bound. Recorded whenever the
    aggregator gives the norm (``Contribution.norm``), so the check has statistics as
    soon as an operator turns it on live."""

    norms: tuple[float, ...] = ()


class _FedAsync:
    """Every contribution changes the model at once; the state holds only the outlier
    check's recent norms (``FedAsyncState``; ``None``, from an older checkpoint, is an
    empty one)."""

    def __init__(self, config: FedAsyncConfig, max_staleness: int, robust: RobustConfig) -> None:
        self._config = config
        self._max_staleness = max_staleness
        self._robust = robust

    @property
    def needs_base(self) -> bool:
        return True

    @property
    def max_staleness(self) -> int:
        return self._max_staleness

    def init_state(self) -> object:
        return FedAsyncState()

    def step(
        self, global_: Params, state: object, contribution: Contribution
    ) -> tuple[_NewParams | None, object]:
        recent = FedAsyncState() if state is None else _expect(state, FedAsyncState)
        base = contribution.base
        if base is None:
            raise ValueError("FedAsync needs Contribution.base (the model the update started from)")
        check_compatible(base, contribution.delta, "delta")
        delta = contribution.delta
        norm = contribution.norm
        if norm is None and self._robust.outlier_factor:
            norm = delta_norm(delta)
        limit = outlier_limit(recent.norms, self._robust)
        if norm is not None and limit < math.inf and not norm <= limit:  # NaN refused too
            raise RejectedUpdate(
                Reason.OUTLIER,
                f"L2 norm {norm:.4g} > {limit:.4g} (median + {self._robust.outlier_factor:g}"
                f" x MAD of the last {min(len(recent.norms), self._robust.outlier_window)})",
            )
        if norm is not None:
            window = self._robust.outlier_window
            recent = FedAsyncState(norms=(*recent.norms, norm)[-window:])
        local = {name: f32(f32(x) + f32(dense(delta[name]))) for name, x in base.items()}
        return fedasync_apply(global_, local, contribution.staleness, self._config), recent

    def pending(self, state: object) -> int:
        return 0

    def clipped(self, state: object) -> int:
        return 0

    def changes_model(self, state: object) -> bool:
        return True

    def flush(self, global_: Params, state: object) -> tuple[_NewParams | None, object]:
        return None, state


class _FedBuff:
    """Buffers until ``buffer_size`` deltas, then one server-optimizer step.

    ``bounded``: the norm-bounded rule's factor when it is the combine in use, so that
    each flush also counts the deltas it scaled down (``FedBuffState.clipped``).
    """

    def __init__(
        self, config: FedBuffConfig, max_staleness: int, combine: Combine, bounded: float | None
    ) -> None:
        self._config = config
        self._max_staleness = max_staleness
        self._combine = combine
        self._bounded = bounded

    @property
    def needs_base(self) -> bool:
        return False

    @property
    def max_staleness(self) -> int:
        return self._max_staleness

    def init_state(self) -> object:
        return fedbuff_init()

    def step(
        self, global_: Params, state: object, contribution: Contribution
    ) -> tuple[_NewParams | None, object]:
        # Checked against the model now, so a bad delta never sits in the buffer.
        check_compatible(global_, contribution.delta, "delta")
        buffered = fedbuff_add(
            _expect(state, FedBuffState), contribution.delta, contribution.staleness, self._config
        )
        if not fedbuff_ready(buffered, self._config):
            return None, buffered
        return self._flush(global_, buffered)

    def _flush(self, global_: Params, buffered: FedBuffState) -> tuple[_NewParams, FedBuffState]:
        factor = self._bounded
        if factor is None:
            return fedbuff_flush(global_, buffered, self._config, self._combine)
        clipped = 0

        def combine(entries: Sequence[Entry], k: int) -> _NewParams:
            nonlocal clipped
            g, clipped = norm_bounded_mean(entries, k, factor)
            return g

        new_params, state = fedbuff_flush(global_, buffered, self._config, combine)
        return new_params, replace(state, clipped=buffered.clipped + clipped)

    def pending(self, state: object) -> int:
        return len(_expect(state, FedBuffState).entries)

    def clipped(self, state: object) -> int:
        return _expect(state, FedBuffState).clipped

    def changes_model(self, state: object) -> bool:
        return self.pending(state) + 1 >= self._config.buffer_size

    def flush(self, global_: Params, state: object) -> tuple[_NewParams | None, object]:
        buffered = _expect(state, FedBuffState)
        if not buffered.entries:
            return None, state
        return self._flush(global_, buffered)


@dataclass(frozen=True, eq=False)
class FedAvgState:
    """The current round's ``(delta, num_examples)`` pairs (read-only copies)."""

    entries: tuple[tuple[Mapping[str, npt.NDArray[np.float32]], int], ...] = ()


class _FedAvg:
    """Collects one round (staleness 0 only); averages when ``clients_per_round`` arrived."""

    def __init__(self, config: FedAvgConfig) -> None:
        self._config = config

    @property
    def needs_base(self) -> bool:
        return False

    @property
    def max_staleness(self) -> int:
        return 0

    def init_state(self) -> object:
        return FedAvgState()

    def step(
        self, global_: Params, state: object, contribution: Contribution
    ) -> tuple[_NewParams | None, object]:
        current = _expect(state, FedAvgState)
        if contribution.staleness != 0:
            raise ValueError(
                f"FedAvg takes only the current round (staleness 0), got {contribution.staleness}"
            )
        check_compatible(global_, contribution.delta, "delta")
        entry = (frozen_copy(contribution.delta), contribution.num_examples)
        collected = replace(current, entries=(*current.entries, entry))
        if len(collected.entries) < self._config.clients_per_round:
            return None, collected
        return self.flush(global_, collected)

    def pending(self, state: object) -> int:
        return len(_expect(state, FedAvgState).entries)

    def clipped(self, state: object) -> int:
        return 0

    def changes_model(self, state: object) -> bool:
        # A dense copy of a sparse delta is O(model) too: a thread for those as well.
        return True

    def flush(self, global_: Params, state: object) -> tuple[_NewParams | None, object]:
        entries = _expect(state, FedAvgState).entries
        if not entries:
            return None, state
        if sum(n for _, n in entries) == 0:
            # No examples behind any delta: nothing to average, the round changes nothing.
            return {name: f32(x).copy() for name, x in global_.items()}, FedAvgState()
        return fedavg_aggregate(global_, entries), FedAvgState()


def _expect(state: object, kind: type[_S]) -> _S:
    """``state`` if it is a ``kind`` (the strategy's own state type), else ``TypeError``."""
    if not isinstance(state, kind):
        raise TypeError(f"expected a {kind.__name__} state, got {type(state).__name__}")
    return state

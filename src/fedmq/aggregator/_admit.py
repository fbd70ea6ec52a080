"""The aggregator's admit-and-apply core: synchronous, no I/O, shared.

``decode`` (wire checks, signature, the delta and its norm), ``admit`` (the policy
checks of one well-formed update against the aggregator's state) and ``checked_step``
(the strategy's step, refused if it would make the model NaN or Inf) are what
``Aggregator`` runs on every update; the virtual clock (sim/virtual.py) runs the same
three on the updates its devices make, so a simulation refuses and applies exactly as
the service does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np

from fedmq.aggregator._bounds import UpdateBounds
from fedmq.codecs import SparseTensor
from fedmq.errors import Reason, RejectedUpdate
from fedmq.privacy import ClientPrivacy
from fedmq.strategies import Contribution, Delta, Strategy
from fedmq.wire import (
    TensorSpec,
    UpdateEnvelope,
    Verifier,
    WireLimits,
    materialize_sparse,
    open_update,
)

__all__ = ["Decoded", "admit", "checked_step", "decode", "finite"]

Params = dict[str, np.ndarray]
Decoded = tuple[UpdateEnvelope, Delta, float]
"""An update, its delta and the delta's L2 norm (all tensors together)."""

_Step = Callable[[Params, Any, Any], tuple[Params | None, Any]]


def decode(
    body: bytes, *, spec: TensorSpec, limits: WireLimits, verifier: Verifier | None
) -> Decoded:
    """Open and decode one update message; a ``Rejection`` (WireError) if it is not one."""
    update = open_update(body, spec=spec, limits=limits, verifier=verifier)
    # Top-k tensors stay sparse: O(k) per update instead of a dense model-sized array.
    delta = materialize_sparse(update.tensors)
    for tensor in delta.values():
        if isinstance(tensor, np.ndarray):
            # Ours alone and never written: strategies may keep it without a copy.
            tensor.flags.writeable = False
    # O(model) per update: the service calls this in a worker thread, off the event loop.
    norm = math.sqrt(sum(_squared_norm(t) for t in delta.values()))
    return update, delta, norm


def admit(
    update: UpdateEnvelope,
    delta: Delta,
    norm: float,
    hint: str | None,
    *,
    allowed: Collection[str] | None,
    last_seq: Mapping[str, int],
    version: int,
    strategy: Strategy,
    bounds: UpdateBounds,
    history: Mapping[int, Params],
    privacy: ClientPrivacy | None = None,
) -> Contribution:
    """Policy checks on a well-formed update of L2 norm ``norm`` sent by ``hint`` (as the
    broker says), against the aggregator at ``version``; raises RejectedUpdate.

    ``privacy``: client-level DP's participation rules (one update per device per server
    step, ``min_gap``); the caller tells it ``applied`` once the strategy took the update.
    The contribution's delta is clipped to ``bounds``' clip norm when one is set (last,
    so ``clipped`` counts only updates that passed every other check)."""
    pid = update.participant
    if allowed is not None and pid not in allowed:
        raise RejectedUpdate(Reason.UNKNOWN_PARTICIPANT, f"{pid!r} is not on the allow-list")
    if not hint or hint != pid:  # no sender identity at all is refused too
        raise RejectedUpdate(
            Reason.PARTICIPANT_MISMATCH, f"envelope says {pid!r}, routed as {hint!r}"
        )
    last = last_seq.get(pid)
    if last is not None and update.seq <= last:
        raise RejectedUpdate(Reason.DUPLICATE, f"{pid} seq {update.seq} <= applied {last}")
    staleness = version - update.base_version
    if staleness < 0:
        raise RejectedUpdate(Reason.FUTURE_BASE, f"base {update.base_version} > current {version}")
    if staleness > strategy.max_staleness:
        raise RejectedUpdate(Reason.TOO_STALE, f"staleness {staleness} > {strategy.max_staleness}")
    bounds.check(norm, update.num_examples)
    if privacy is not None:
        privacy.check(pid)
    base = None
    if strategy.needs_base:
        base = history.get(update.base_version)
        if base is None:
            raise RejectedUpdate(
                Reason.TOO_STALE, f"base version {update.base_version} is no longer held"
            )
    delta = bounds.clip(delta, norm)
    return Contribution(
        delta=delta, staleness=staleness, num_examples=update.num_examples, base=base
    )


def checked_step(step: _Step, params: Params, state: Any, contribution: Any) -> tuple[Any, Any]:
    """``step(params, state, contribution)``, refused if the new model is not finite.

    Bounded updates keep it finite; this is the last line: a NaN or Inf model must never
    be applied, checkpointed or published (restarting from it would fail the same way).
    Strategies never mutate their inputs, so refusing leaves model and state untouched.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is what is checked next
        new_params, new_state = step(params, state, contribution)
    if new_params is not None and not finite(new_params):
        raise RejectedUpdate(Reason.NON_FINITE_MODEL, "applying it makes the model NaN or Inf")
    return new_params, new_state


def _squared_norm(tensor: np.ndarray | SparseTensor) -> float:
    if isinstance(tensor, SparseTensor):
        return tensor.squared_norm()
    # float32 BLAS, no copy; a sum that overflows is inf, which every bound refuses.
    return float(np.vdot(tensor, tensor))


def finite(params: Mapping[str, np.ndarray]) -> bool:
    """Whether every value of ``params`` is a finite number."""
    return all(bool(np.isfinite(v).all()) for v in params.values())

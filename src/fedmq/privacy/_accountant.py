"""Client-level privacy accounting on dp-accounting: no composition maths of our own.

The mechanism (privacy/_central.py) is, per server step, a Gaussian mechanism on the
weighted sum of clipped deltas: sensitivity ``C`` under the zero-out adjacency (one
device's contributions replaced by zeros; staleness weights are <= 1), noise std
``z * C``: a ``GaussianDpEvent(z)``. A device takes part in at most
``ceil(T / min_gap)`` of ``T`` steps (enforced by ``ClientPrivacy``), and the steps it
is not in do not depend on its data, so its loss after ``T`` steps is the adaptive
composition of ``ceil(T / min_gap)`` Gaussian mechanisms, which the RDP accountant
converts to ``(epsilon, delta)``. No amplification by sampling is claimed: arrivals
are not a uniform sample of the fleet.

``Segment``: a run of steps at one ``(z, min_gap)`` (a restart may change them); the
segments are composed one after the other, each counted at ``ceil(steps / min_gap)``
(a window of ``steps`` consecutive steps holds at most that many of one device's).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import dp_accounting
from dp_accounting import rdp

__all__ = ["Segment", "calibrate_noise", "client_epsilon", "participations"]

Segment = tuple[float, int, int]
"""``(noise_multiplier z, min_gap, server steps)``."""

# Zero-out adjacency (Kairouz et al., 2021): dp-accounting's REPLACE_SPECIAL. For the
# Gaussian mechanism without sampling its RDP is that of add/remove: alpha / (2 z^2).
_RELATION = dp_accounting.NeighboringRelation.REPLACE_SPECIAL


def participations(steps: int, min_gap: int) -> int:
    """The most server steps one device can be in among ``steps`` consecutive ones."""
    return math.ceil(steps / min_gap)


def _accountant() -> rdp.RdpAccountant:
    return rdp.RdpAccountant(neighboring_relation=_RELATION)


def client_event(segments: Sequence[Segment]) -> dp_accounting.DpEvent:
    """The DpEvent one device's worst case amounts to over ``segments``."""
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.GaussianDpEvent(z), participations(steps, gap)
            )
            for z, gap, steps in segments
            if steps > 0
        ]
    )


@functools.lru_cache(maxsize=4096)
def _epsilon(segments: tuple[Segment, ...], delta: float) -> float:
    accountant = _accountant()
    accountant.compose(client_event(segments))
    return float(accountant.get_epsilon(delta))


def client_epsilon(segments: Sequence[Segment], delta: float) -> float:
    """Epsilon at ``delta`` of a device after ``segments`` (0 before any step)."""
    key = tuple((float(z), int(g), int(n)) for z, g, n in segments if n > 0)
    # Only the number of participations matters: steps with the same count share a value.
    key = tuple((z, g, participations(n, g)) for z, g, n in key)
    if not key:
        return 0.0
    return _epsilon(tuple((z, 1, n) for z, _, n in key), delta)


def calibrate_noise(target_epsilon: float, delta: float, steps: int, min_gap: int) -> float:
    """The smallest noise multiplier ``z`` whose ``steps`` server steps (at ``min_gap``)
    spend at most ``target_epsilon`` at ``delta`` (``dp_accounting.calibrate_dp_mechanism``,
    then nudged up until the accountant agrees, so the plan is never over budget)."""
    count = participations(steps, min_gap)

    def event(z: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), count)

    z = float(
        dp_accounting.calibrate_dp_mechanism(
            _accountant,
            event,
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
            tol=1e-6,
        )
    )
    while _epsilon(((z, 1, count),), delta) > target_epsilon:
        z *= 1.000001
    return z

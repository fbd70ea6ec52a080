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
With adaptive clipping (Andrew et al., 2021) each step also releases a noised count of
the updates under the clip norm (sensitivity 1, noise std ``count_noise``): a second
Gaussian mechanism per step, composed with the first (a segment's fourth value).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedmq.errors import ConfigError

if TYPE_CHECKING:
    import dp_accounting
    from dp_accounting import rdp

__all__ = ["Segment", "calibrate_noise", "client_epsilon", "participations"]

Segment = tuple[float, int, int] | tuple[float, int, int, float]
"""``(noise_multiplier z, min_gap, server steps[, count_noise])``; count_noise 0: none."""

# dp_accounting is imported where it is used: it takes about a second to import (scipy),
# which every process without DP would pay at start.


def participations(steps: int, min_gap: int) -> int:
    """The most server steps one device can be in among ``steps`` consecutive ones."""
    return math.ceil(steps / min_gap)


def _accountant() -> rdp.RdpAccountant:
    import dp_accounting
    from dp_accounting import rdp

    # Zero-out adjacency (Kairouz et al., 2021): dp-accounting's REPLACE_SPECIAL. For the
    # Gaussian mechanism without sampling its RDP is that of add/remove: alpha / (2 z^2).
    return rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)


def step_event(z: float, count_noise: float = 0.0) -> dp_accounting.DpEvent:
    """One server step as a device in it sees it: the noised sum, and with adaptive
    clipping the noised count too."""
    import dp_accounting

    event = dp_accounting.GaussianDpEvent(z)
    if not count_noise:
        return event
    return dp_accounting.ComposedDpEvent([event, dp_accounting.GaussianDpEvent(count_noise)])


def _count_noise(segment: Segment) -> float:
    return float(segment[3]) if len(segment) > 3 else 0.0


def client_event(segments: Sequence[Segment]) -> dp_accounting.DpEvent:
    """The DpEvent one device's worst case amounts to over ``segments``."""
    import dp_accounting

    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                step_event(s[0], _count_noise(s)), participations(s[2], s[1])
            )
            for s in segments
            if s[2] > 0
        ]
    )


@functools.lru_cache(maxsize=4096)
def _epsilon(segments: tuple[Segment, ...], delta: float) -> float:
    accountant = _accountant()
    accountant.compose(client_event(segments))
    return float(accountant.get_epsilon(delta))


def client_epsilon(segments: Sequence[Segment], delta: float) -> float:
    """Epsilon at ``delta`` of a device after ``segments`` (0 before any step)."""
    # Only the number of participations matters: steps with the same count share a value.
    key = tuple(
        (float(s[0]), 1, participations(int(s[2]), int(s[1])), _count_noise(s))
        for s in segments
        if s[2] > 0
    )
    if not key:
        return 0.0
    return _epsilon(key, delta)


def calibrate_noise(
    target_epsilon: float, delta: float, steps: int, min_gap: int, count_noise: float = 0.0
) -> float:
    """The smallest noise multiplier ``z`` whose ``steps`` server steps (at ``min_gap``)
    spend at most ``target_epsilon`` at ``delta`` (``dp_accounting.calibrate_dp_mechanism``,
    then nudged up until the accountant agrees, so the plan is never over budget)."""
    import dp_accounting

    count = participations(steps, min_gap)
    if count_noise:
        floor = _epsilon(((1e6, 1, count, count_noise),), delta)  # the count's share alone
        if floor >= target_epsilon:
            raise ConfigError(
                f"dp epsilon: {target_epsilon:g} cannot be met in {steps} steps: the noised"
                f" count alone (count_noise {count_noise:g}) spends {floor:.3g}"
            )

    def event(z: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(step_event(z, count_noise), count)

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
    while _epsilon(((z, 1, count, count_noise),), delta) > target_epsilon:
        z *= 1.000001
    return z

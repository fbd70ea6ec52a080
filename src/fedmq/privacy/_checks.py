"""The range checks every privacy configuration makes, as one-line ConfigErrors.

``ClientDPConfig`` (central), ``DPSGDConfig`` and ``LocalDPConfig`` (on the device)
refuse the same bad numbers with the same words: ``<what> <field>: must be <allowed>,
got <value>``.
"""

from __future__ import annotations

import math

from fedmq.errors import ConfigError

__all__ = ["check_mechanism", "finite_positive", "positive_int", "require"]


def require(ok: bool, what: str, field: str, allowed: str, value: object) -> None:
    """``ConfigError("<what> <field>: must be <allowed>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{what} {field}: must be {allowed}, got {value!r}")


def finite_positive(value: object) -> bool:
    """A finite int or float above 0 (bools excluded)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def positive_int(value: object, minimum: int = 1) -> bool:
    """An int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_mechanism(
    what: str, noise_multiplier: float | None, target_epsilon: float | None, delta: float
) -> None:
    """A Gaussian mechanism's settings: z and the epsilon budget finite and > 0 where
    given, delta in (0, 1)."""
    if noise_multiplier is not None:
        require(
            finite_positive(noise_multiplier),
            what,
            "noise_multiplier",
            "a finite number > 0",
            noise_multiplier,
        )
    if target_epsilon is not None:
        require(
            finite_positive(target_epsilon),
            what,
            "target_epsilon",
            "a finite number > 0",
            target_epsilon,
        )
    require(finite_positive(delta) and delta < 1, what, "delta", "in (0, 1)", delta)

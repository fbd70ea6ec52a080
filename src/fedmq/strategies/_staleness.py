"""Staleness weighting: how much an update counts when its base is ``d`` versions old.

The four functions of FedAsync (Xie et al., 2019), with ``d >= 0``::

    constant     s(d) = 1
    polynomial   s(d) = (d + 1) ** -a
    hinge        s(d) = 1                     if d <= b
                        1 / (a * (d - b) + 1)  otherwise
    exponential  s(d) = exp(-a * d)

Each is 1 at ``d = 0`` and never increases with ``d``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, assert_never, get_args

from fedmq.strategies._common import is_int, is_number, require

__all__ = ["STALENESS_FUNCTIONS", "StalenessConfig", "StalenessFunction", "staleness_weight"]

StalenessFunction = Literal["constant", "polynomial", "hinge", "exponential"]
STALENESS_FUNCTIONS: tuple[StalenessFunction, ...] = get_args(StalenessFunction)


@dataclass(frozen=True, kw_only=True)
class StalenessConfig:
    """Which staleness function, with its parameters (see the module docstring).

    ``a`` (>= 0) is the decay rate of polynomial, hinge and exponential; ``b``
    (>= 0) is hinge's grace period in versions. ``constant`` ignores both.
    """

    function: StalenessFunction = "polynomial"
    a: float = 0.5
    b: int = 4

    def __post_init__(self) -> None:
        allowed = " | ".join(STALENESS_FUNCTIONS)
        require(self.function in STALENESS_FUNCTIONS, self, "function", allowed, self.function)
        require(is_number(self.a) and self.a >= 0, self, "a", "a finite number >= 0", self.a)
        require(is_int(self.b) and self.b >= 0, self, "b", "an integer >= 0", self.b)


def staleness_weight(config: StalenessConfig) -> Callable[[int], float]:
    """The function ``s(d)`` that ``config`` describes; it raises ``ValueError`` for ``d < 0``."""
    function, a, b = config.function, float(config.a), config.b

    def weight(staleness: int) -> float:
        d = staleness
        if d < 0:
            raise ValueError(f"staleness must be >= 0, got {d}")
        match function:
            case "constant":
                return 1.0
            case "polynomial":
                return math.pow(d + 1.0, -a)
            case "hinge":
                return 1.0 if d <= b else 1.0 / (a * (d - b) + 1.0)
            case "exponential":
                return math.exp(-a * d)
            case _:
                assert_never(function)

    return weight

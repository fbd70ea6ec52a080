"""Capped exponential backoff with full jitter, shared by every broker transport.

The n-th retry (counting from 0) sleeps a uniformly random time in
``[0, min(max_s, initial_s * 2**n)]`` ("full jitter", AWS architecture blog,
*Exponential Backoff And Jitter*): a fleet of devices that lost the broker at
the same instant spreads its reconnects instead of stampeding it when it
returns.  ``reset()`` after a successful connection starts the next outage
from ``initial_s`` again.
"""

from __future__ import annotations

import random

from fedmq.errors import ConfigError

__all__ = ["Backoff"]


class Backoff:
    """Delays for successive reconnect attempts; not thread-safe, one per connection loop."""

    def __init__(self, *, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        if not 0 < initial_s <= max_s:
            raise ConfigError(
                f"backoff: need 0 < initial_s <= max_s, got initial_s={initial_s}, max_s={max_s}"
            )
        self._initial_s = initial_s
        self._max_s = max_s
        self._rng = rng if rng is not None else random.Random()
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """How many delays were handed out since the last ``reset()``."""
        return self._attempt

    def cap(self) -> float:
        """The upper bound of the next delay, before jitter."""
        # min() before the power would overflow only after ~1000 attempts; clamp the exponent.
        return min(self._max_s, self._initial_s * 2.0 ** min(self._attempt, 64))

    def next_delay(self) -> float:
        """The next delay in seconds (full jitter), and count the attempt."""
        delay = self._rng.uniform(0.0, self.cap())
        self._attempt += 1
        return delay

    def reset(self) -> None:
        """A connection succeeded: the next outage starts from ``initial_s`` again."""
        self._attempt = 0

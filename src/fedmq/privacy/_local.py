"""Local DP (untrusted aggregator): the device clips its delta and adds the noise itself.

Each update the device sends is the Gaussian mechanism on its own delta: clip it to
L2 norm C (``clip``, all tensors together), add N(0, (z * C)^2) to every coordinate,
then hand it to the codec. What the aggregator (or anyone on the broker) sees is
already private: nothing downstream has to be trusted. The error-feedback residual is
made after this (codecs/_feedback): it keeps only what the codec dropped of the noisy
update, which is post-processing of what was released; never the noise or what clipping
removed.

Accounting is per device and user-level: the protected unit is the device's whole data.
Neighbouring is add/remove as in DP-FedAvg: the clipped delta against a zero delta (the
device with no data), sensitivity C, so each release is dp_accounting's
``GaussianDpEvent(z)``. Under replace-one (any two data sets of this device) the
sensitivity is 2C: the same noise is ``GaussianDpEvent(z / 2)`` (docs/privacy.md gives
both). There is no sampling to amplify anything (the device sends every update it
trains), so k updates are ``SelfComposedDpEvent(GaussianDpEvent(z), k)`` in
dp_accounting's RDP accountant. Noise that protects one device alone is large: use it
where the aggregator cannot be trusted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmq.errors import ConfigError
from fedmq.privacy._accountant import calibrate_noise, client_epsilon
from fedmq.privacy._checks import check_mechanism, finite_positive, positive_int, require
from fedmq.privacy._clip import clip

__all__ = ["LocalDP", "LocalDPConfig"]


@dataclass(frozen=True, kw_only=True)
class LocalDPConfig:
    """Local DP's settings: the clip bound ``clip_norm`` (C), the noise (``noise_multiplier``
    z, or a ``target_epsilon`` that z is calibrated to for ``planned_updates`` updates)
    and ``delta``. With ``target_epsilon`` the device stops sending once the next update
    would exceed it; with ``noise_multiplier`` alone the spend is only reported.
    """

    clip_norm: float = 1.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    planned_updates: int = 100

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError(
                "local-dp: give exactly one of noise_multiplier (z) and target_epsilon"
            )
        check_mechanism("local-dp", self.noise_multiplier, self.target_epsilon, self.delta)
        require(
            finite_positive(self.clip_norm),
            "local-dp",
            "clip_norm",
            "a finite number > 0",
            self.clip_norm,
        )
        require(
            positive_int(self.planned_updates),
            "local-dp",
            "planned_updates",
            "an integer >= 1",
            self.planned_updates,
        )


class LocalDP:
    """One device's local Gaussian mechanism and its accountant (updates sent so far)."""

    mechanism = "local"

    def __init__(self, config: LocalDPConfig) -> None:
        self.config = config
        if config.noise_multiplier is not None:
            self.noise_multiplier = config.noise_multiplier
        else:
            assert config.target_epsilon is not None
            self.noise_multiplier = calibrate(
                config.target_epsilon, config.delta, config.planned_updates
            )
        # (z, updates) runs: a device restarted with another z keeps what it spent before.
        self.history: list[tuple[float, int]] = []

    @property
    def delta(self) -> float:
        return self.config.delta

    @property
    def budget(self) -> float | None:
        return self.config.target_epsilon

    @property
    def sent(self) -> int:
        return sum(n for _, n in self.history)

    @property
    def epsilon(self) -> float:
        """Epsilon spent at ``delta`` by the updates made so far (0 before the first)."""
        return local_epsilon(self.history, self.delta)

    def fits(self, updates: int = 1) -> bool:
        """Whether ``updates`` more stay within the budget (always, if none)."""
        if self.budget is None:
            return True
        return local_epsilon([*self.history, (self.noise_multiplier, updates)], self.delta) <= (
            self.budget
        )

    def charge(self, updates: int = 1) -> None:
        """Record ``updates`` released updates."""
        if self.history and self.history[-1][0] == self.noise_multiplier:
            self.history[-1] = (self.noise_multiplier, self.history[-1][1] + updates)
        else:
            self.history.append((self.noise_multiplier, updates))

    def privatize(
        self, delta: Mapping[str, npt.NDArray[np.float32]], rng: np.random.Generator
    ) -> dict[str, npt.NDArray[np.float32]]:
        """Clip ``delta`` to C, add N(0, (z C)^2) to each coordinate, and count one update.

        ``rng`` draws the noise (the device's own; a seeded one gives the same noise).
        """
        clipped, _ = clip(delta, self.config.clip_norm)
        std = self.noise_multiplier * self.config.clip_norm
        noisy: dict[str, npt.NDArray[np.float32]] = {}
        for name, t in clipped.items():
            assert isinstance(t, np.ndarray)  # a trained delta is dense
            noisy[name] = np.add(t, rng.normal(0.0, std, size=t.shape), dtype=np.float32)
        self.charge(1)
        return noisy

    def state_dict(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mechanism") != self.mechanism:
            raise ConfigError(
                f"local-dp: the device's privacy state is for {state.get('mechanism')!r};"
                " a device keeps one mechanism (a new state dir starts a new device)"
            )
        self.history = [(float(z), int(n)) for z, n in state["history"]]


def local_epsilon(history: list[tuple[float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of the Gaussian mechanism run ``n`` times at each ``(z, n)``
    (no sampling: every update is released). The same accounting as client-level DP's,
    with every update its own step (privacy/_accountant.py, dp-accounting's RDP)."""
    return client_epsilon([(float(z), 1, int(n)) for z, n in history], delta)


def calibrate(target_epsilon: float, delta: float, updates: int) -> float:
    """The smallest z whose ``updates`` releases spend at most ``target_epsilon`` at
    ``delta`` (``calibrate_noise``: dp-accounting's calibration, rounded up)."""
    return calibrate_noise(target_epsilon, delta, updates, 1)

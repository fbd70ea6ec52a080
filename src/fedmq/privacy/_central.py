"""Client-level differential privacy in the central model (a trusted aggregator).

The mechanism wraps FedBuff's mean (a ``Combine``, strategies/_fedbuff.py)::

    g = (sum_i s(d_i) * clip(delta_i, C) + N(0, (z C)^2 I)) / K

with ``K = buffer_size`` fixed (never the number actually buffered: dividing by a
count that depends on who arrived would leak it). Under the zero-out adjacency (one
device's contributions replaced by zeros) the sum moves by at most ``C`` (the
staleness weights are <= 1), so each server step is a Gaussian mechanism of noise
multiplier ``z``; what the server optimizer does with ``g`` afterwards is
post-processing.

``ClientPrivacy`` is the one object that enforces the participation model the
accountant relies on (docs/privacy.md), and the accountant itself:

- a device has at most one update in a server step (a second one, while its first
  is still buffered, is refused: ``Reason.PARTICIPATION``);
- a device's steps are at least ``min_gap`` server steps apart (refused otherwise).

So after ``T`` steps a device took part in at most ``ceil(T / min_gap)``, and its
epsilon is that many Gaussian mechanisms composed (privacy/_accountant.py). Both the
aggregator service and the virtual clock hand the same object to ``admit``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmq.errors import ConfigError, Reason, RejectedUpdate
from fedmq.privacy._accountant import calibrate_noise, client_epsilon
from fedmq.privacy._checks import check_mechanism, finite_positive, positive_int, require
from fedmq.privacy._clip import clip
from fedmq.strategies import Entry, weighted_mean

__all__ = ["ClientDPConfig", "ClientPrivacy", "newest_state"]


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class ClientDPConfig:
    """Client-level DP of FedBuff's server steps (central model).

    ``clip_norm`` C: every delta is clipped to this L2 norm before the sum.
    ``noise_multiplier`` z: the noise std on the sum is ``z * C`` per coordinate. Left
    at None it is calibrated (``dp_accounting.calibrate_dp_mechanism``) so that
    ``planned_steps`` server steps spend exactly ``target_epsilon`` at ``delta``.
    ``target_epsilon``: the budget; the aggregator stops by itself before the step that
    would exceed it (None: no budget, epsilon is only reported).
    ``min_gap``: server steps at least between two of one device's contributions.
    ``adaptive_quantile`` (None: a fixed C): adaptive clipping (Andrew et al., 2021):
    after each step ``C <- C * exp(-adaptive_lr * (b - adaptive_quantile))``, ``b`` the
    fraction of the step's updates within C, counted with Gaussian noise of std
    ``count_noise`` (> 0 required; Andrew et al. use K / 20) and divided by K. The
    noised count is a second Gaussian mechanism per step, which the accountant composes
    (and the calibration of z includes). ``clip_norm`` is then the starting C.
    """

    clip_norm: float
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    min_gap: int = 1
    planned_steps: int | None = None
    adaptive_quantile: float | None = None
    adaptive_lr: float = 0.2
    count_noise: float = 0.0

    def __post_init__(self) -> None:
        def refuse(field: str, allowed: str, value: object) -> None:
            require(False, "dp", field, allowed, value)

        require(
            finite_positive(self.clip_norm),
            "dp",
            "clip_norm",
            "a finite number > 0 (--clip-norm)",
            self.clip_norm,
        )
        z, eps, steps = self.noise_multiplier, self.target_epsilon, self.planned_steps
        check_mechanism("dp", z, eps, self.delta)
        require(positive_int(self.min_gap), "dp", "min_gap", "an integer >= 1", self.min_gap)
        if steps is not None:
            require(positive_int(steps), "dp", "planned_steps", "an integer >= 1", steps)
        q = self.adaptive_quantile
        if q is not None:
            if not (_number(q) and 0 < q < 1):
                refuse("adaptive_quantile", "in (0, 1)", q)
            if not (_number(self.adaptive_lr) and self.adaptive_lr > 0):
                refuse("adaptive_lr", "a finite number > 0", self.adaptive_lr)
            if not (_number(self.count_noise) and self.count_noise > 0):
                refuse("count_noise", "> 0 with adaptive clipping (Andrew et al.: K / 20)", 0)
        elif self.count_noise:
            refuse("count_noise", "0 without adaptive clipping", self.count_noise)
        if z is None:
            if eps is None or steps is None:
                raise ConfigError(
                    "dp: give --dp-noise-multiplier, or --dp-epsilon with --dp-planned-steps"
                    " to calibrate it"
                )
            object.__setattr__(
                self,
                "noise_multiplier",
                calibrate_noise(eps, self.delta, steps, self.min_gap, self.count_noise),
            )

    @property
    def z(self) -> float:
        """``noise_multiplier``, always a number once constructed."""
        assert self.noise_multiplier is not None
        return self.noise_multiplier


class ClientPrivacy:
    """Participation enforcement, the DP ``Combine`` and the accountant, in one object.

    ``buffer_size``: FedBuff's ``K``, the fixed denominator. ``state``: what
    ``state()`` returned (a checkpoint), so a restart keeps the budget spent.
    ``rng``: the noise source; by default a numpy ``Generator`` seeded from ``secrets``.
    Not thread-safe: the aggregator applies one update at a time.
    """

    def __init__(
        self,
        config: ClientDPConfig,
        buffer_size: int,
        *,
        state: Mapping[str, Any] | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.config = config
        self.buffer_size = buffer_size
        # PCG64 is not a cryptographically secure generator (as Opacus's default,
        # non-secure mode): seeded from the OS's CSPRNG, its stream is unpredictable to
        # anyone who sees only noised models, which is the threat model here.
        self._rng = rng or np.random.default_rng(secrets.randbits(128))
        self._segments: list[list[float | int]] = []
        self._last_step: dict[str, int] = {}  # device -> the server step it was last in
        self._pending: set[str] = set()  # devices whose update is in the buffer now
        # The clip norm in force (adaptive clipping moves it after every step), and the
        # one the step being taken computed, put in force once the step is applied.
        self.clip_norm = config.clip_norm
        self._next_clip: float | None = None
        if state:
            self._segments = [_segment(s) for s in state.get("segments", ())]
            if config.adaptive_quantile is not None and state.get("clip_norm"):
                self.clip_norm = float(state["clip_norm"])
            self._last_step = {str(k): int(v) for k, v in state.get("last_step", {}).items()}
            self._pending = {str(p) for p in state.get("pending", ())}
        current = (config.z, config.min_gap, 0, config.count_noise)
        last = self._segments[-1] if self._segments else None
        if last is None or (last[0], last[1], last[3]) != (current[0], current[1], current[3]):
            self._segments.append(list(current))
        if self.exhausted():
            spent = self.epsilon()
            raise ConfigError(
                f"dp epsilon: the budget {config.target_epsilon:g} is spent"
                + (f" ({spent:.4g} after {self.steps} steps)" if self.steps else "")
                + ": the next server step would exceed it"
            )

    # -- participation ------------------------------------------------------------------
    def check(self, participant: str) -> None:
        """Refuse (``Reason.PARTICIPATION``) an update that would break the participation
        model: a second one in this server step, or one within ``min_gap`` steps."""
        if participant in self._pending:
            raise RejectedUpdate(
                Reason.PARTICIPATION,
                f"{participant} already has an update in this server step (one per step)",
            )
        last = self._last_step.get(participant)
        step = self.steps + 1
        if last is not None and step - last < self.config.min_gap:
            raise RejectedUpdate(
                Reason.PARTICIPATION,
                f"{participant} was in step {last}; min_gap {self.config.min_gap} allows"
                f" step {last + self.config.min_gap} at the earliest, this is {step}",
            )

    def applied(self, participant: str, *, stepped: bool) -> None:
        """``participant``'s update is in the buffer; ``stepped``: and the buffer made a
        server step (then ``stepped()`` is called here)."""
        self._pending.add(participant)
        if stepped:
            self.stepped()

    def stepped(self) -> None:
        """A server step was taken with the devices buffered: account for it."""
        step = self.steps + 1
        for participant in self._pending:
            self._last_step[participant] = step
        self._pending.clear()
        self._segments[-1][2] = int(self._segments[-1][2]) + 1
        if self._next_clip is not None:
            self.clip_norm, self._next_clip = self._next_clip, None
        gap = self.config.min_gap
        # Devices whose last step is min_gap or more behind the next cannot be refused.
        self._last_step = {p: s for p, s in self._last_step.items() if step + 1 - s < gap}

    # -- the mechanism ------------------------------------------------------------------
    def combine(self, entries: Sequence[Entry], k: int) -> dict[str, npt.NDArray[np.float32]]:
        """FedBuff's ``Combine`` with DP: ``(sum_i w_i clip(delta_i, C) + noise) / K``.

        ``k`` (the number buffered) is ignored: the denominator is ``buffer_size``.
        The noise is drawn tensor by tensor in the order of the first delta's names,
        ``standard_normal(shape, float32) * z * C`` each.
        """
        del k
        bound = self.clip_norm
        clipped: list[Entry] = []
        within = 0
        for delta, weight in entries:
            clipped_delta, norm = clip(delta, bound)
            within += norm <= bound
            clipped.append((clipped_delta, min(1.0, weight)))
        total = weighted_mean(clipped, 1)
        std = np.float32(self.config.z * bound)
        inverse = np.float32(1.0 / self.buffer_size)
        for name in entries[0][0]:
            acc = total[name]
            acc += self._rng.standard_normal(acc.shape, dtype=np.float32) * std
            acc *= inverse
        config = self.config
        if config.adaptive_quantile is not None:
            # Andrew et al. (2021): the geometric update, from a noised count.
            noisy = (within + self._rng.normal(0.0, config.count_noise)) / self.buffer_size
            step = -config.adaptive_lr * (noisy - config.adaptive_quantile)
            self._next_clip = bound * math.exp(step)
        return total

    # -- the accountant -----------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Server steps accounted for (all segments)."""
        return sum(int(s[2]) for s in self._segments)

    @property
    def segments(self) -> list[tuple[float, int, int, float]]:
        """``(z, min_gap, steps, count_noise)`` per run of steps at the same settings."""
        return [(float(z), int(g), int(n), float(b)) for z, g, n, b in self._segments]

    def epsilon(self, extra_steps: int = 0) -> float:
        """Epsilon spent at ``config.delta`` (after ``extra_steps`` more steps)."""
        segments = self.segments
        z, gap, steps, count_noise = segments[-1]
        segments[-1] = (z, gap, steps + extra_steps, count_noise)
        return client_epsilon(segments, self.config.delta)

    def exhausted(self) -> bool:
        """Whether the next server step would take epsilon above the target."""
        target = self.config.target_epsilon
        return target is not None and self.epsilon(1) > target

    def report(self) -> dict[str, Any]:
        """What every report shows: epsilon, delta, z, C, min_gap, steps."""
        return {
            "epsilon": self.epsilon(),
            "delta": self.config.delta,
            "target_epsilon": self.config.target_epsilon,
            "noise_multiplier": self.config.z,
            "clip_norm": self.clip_norm,
            "adaptive_quantile": self.config.adaptive_quantile,
            "min_gap": self.config.min_gap,
            "steps": self.steps,
            "buffer_size": self.buffer_size,
        }

    def state(self) -> dict[str, Any]:
        """The accountant's durable state (plain lists and numbers; the checkpoint's)."""
        return {
            "segments": [list(s) for s in self.segments],
            "last_step": dict(self._last_step),
            "pending": sorted(self._pending),
            "delta": self.config.delta,
            "clip_norm": self.clip_norm,
        }


def _segment(stored: Sequence[Any]) -> list[float | int]:
    """A stored segment; those of before adaptive clipping have no count noise."""
    z, gap, steps, *rest = stored
    return [float(z), int(gap), int(steps), float(rest[0]) if rest else 0.0]


def newest_state(
    checkpoint: Mapping[str, Any] | None, ledger: Mapping[str, Any] | None
) -> Mapping[str, Any] | None:
    """The accountant state to resume from: the checkpoint's, unless the step ledger
    (written before each noised model goes out) has more steps. Then a crash came between
    a publish and the next checkpoint: that step's model was released, so its step counts
    (its segments are taken), and each device's last step is the later of the two; the
    devices in the buffer are the checkpoint's, since its buffer is the one restored."""
    if ledger is None:
        return checkpoint
    if checkpoint is None:
        return {**ledger, "pending": []}

    def steps(state: Mapping[str, Any]) -> int:
        return sum(int(s[2]) for s in state.get("segments", ()))

    if steps(ledger) <= steps(checkpoint):
        return checkpoint
    last = {str(k): int(v) for k, v in checkpoint.get("last_step", {}).items()}
    for device, step in ledger.get("last_step", {}).items():
        last[str(device)] = max(int(step), last.get(str(device), 0))
    return {
        "segments": ledger["segments"],
        "last_step": last,
        "pending": list(checkpoint.get("pending", ())),
    }

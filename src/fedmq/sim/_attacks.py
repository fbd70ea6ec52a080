"""Malicious devices for the bench fleets (``fedmq bench --byzantine F --attack A``).

Simulation only: nothing outside ``fedmq.sim`` builds an ``Attack``, so ``fedmq
participant`` can never run one. An attack is an object given to the device's
``Trainer`` (participant/_trainer.py), which calls it at one point of its pipeline:
after training, on the delta (``local - base``), before the codec; label-flip changes
the device's training data instead. Everything else about a malicious device is the
honest protocol: its id, sequence numbers, signature, codec and error feedback.

The attacks, with ``lambda`` the ``strength``:

- ``sign-flip``: sends ``-lambda * delta`` (default lambda 4: four times the honest
  norm, under the aggregator's default relative norm bound of 10x the recent median);
- ``scale``: sends ``lambda * delta`` (default 10: a boosted update, the shape of a
  model-replacement attack);
- ``noise``: sends Gaussian noise ``N(0, I)`` rescaled to ``lambda`` times the honest
  delta's own L2 norm (default 1: as large as an honest update, pointing nowhere);
- ``label-flip``: trains on flipped labels, ``y -> 9 - y`` (fmnist's 10 classes; any
  other task is refused: a regression target has no label to flip), and sends that
  delta as it is.

Which devices: ``round(fraction * N)`` of the ``N``, ``sorted(default_rng([2,
seed]).choice(N, that many, replace=False))`` (``malicious``): a fixed, seeded rule,
so every run with the same fleet and seed has the same malicious devices, and the
fleet, its data and every other seed are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset, TensorDataset

from fedmq.errors import ConfigError
from fedmq.tasks import Task

__all__ = ["ATTACKS", "Attack", "AttackConfig", "AttackName", "check_attack"]

AttackName = Literal["sign-flip", "scale", "noise", "label-flip"]
ATTACKS: tuple[AttackName, ...] = get_args(AttackName)
DEFAULT_STRENGTH: dict[AttackName, float] = {
    "sign-flip": 4.0,
    "scale": 10.0,
    "noise": 1.0,
    "label-flip": 1.0,
}
_FMNIST_CLASSES = 10

_Params = dict[str, npt.NDArray[np.float32]]


@dataclass(frozen=True, kw_only=True)
class AttackConfig:
    """``fraction`` of the fleet attacks with ``kind`` at ``strength`` (None: the kind's
    default, ``DEFAULT_STRENGTH``); ``fraction`` 0: no attack. ``seed`` picks the devices."""

    fraction: float = 0.0
    kind: AttackName = "scale"
    strength: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fraction) and 0 <= self.fraction <= 1):
            raise ConfigError(f"byzantine: {self.fraction} must be in [0, 1]")
        if self.kind not in ATTACKS:
            raise ConfigError(f"attack: {self.kind!r} is not one of {', '.join(ATTACKS)}")
        if self.strength is None:
            object.__setattr__(self, "strength", DEFAULT_STRENGTH[self.kind])
        elif not (math.isfinite(self.strength) and self.strength > 0):
            raise ConfigError(f"attack_strength: {self.strength} must be a finite number > 0")

    @property
    def lam(self) -> float:
        """``strength``, always a number once constructed."""
        assert self.strength is not None
        return self.strength

    def malicious(self, count: int) -> list[int]:
        """The indices of the malicious devices in a fleet of ``count`` (sorted)."""
        n = round(self.fraction * count)
        if n == 0:
            return []
        rng = np.random.default_rng([2, self.seed])
        return sorted(int(i) for i in rng.choice(count, n, replace=False))


def check_attack(config: AttackConfig, task: Task) -> None:
    """ConfigError if ``task`` cannot be attacked so (label-flip needs fmnist's labels)."""
    if config.fraction and config.kind == "label-flip" and task.name != "fmnist":
        raise ConfigError(
            f"attack: label-flip is defined for fmnist's 10 classes (y -> 9 - y); task"
            f" {task.name!r} has no class labels to flip"
        )


class Attack:
    """One malicious device's behaviour; the device's ``Trainer`` calls it.

    ``seed``: this device's (its noise differs from the other malicious devices').
    """

    def __init__(self, config: AttackConfig, seed: int) -> None:
        self.config = config
        self._seed = seed

    def poison_data(self, data: Dataset[Any]) -> Dataset[Any]:
        """The training data this device uses: label-flip's flipped labels, else ``data``."""
        if self.config.kind != "label-flip":
            return data
        if not isinstance(data, TensorDataset) or len(data.tensors) != 2:
            raise ConfigError("attack: label-flip needs a TensorDataset of (inputs, labels)")
        x, y = data.tensors
        if y.dtype not in (torch.int64, torch.int32, torch.uint8):
            raise ConfigError(f"attack: label-flip needs integer class labels, got {y.dtype}")
        return TensorDataset(x, (_FMNIST_CLASSES - 1) - y)

    def poison_delta(self, delta: _Params, seq: int) -> _Params:
        """What the device sends instead of its honest ``delta`` (update ``seq``)."""
        lam = self.config.lam
        match self.config.kind:
            case "sign-flip":
                return {k: np.multiply(v, -lam, dtype=np.float32) for k, v in delta.items()}
            case "scale":
                return {k: np.multiply(v, lam, dtype=np.float32) for k, v in delta.items()}
            case "noise":
                rng = np.random.default_rng([3, self._seed, seq])
                noise = {
                    k: rng.standard_normal(v.shape).astype(np.float32) for k, v in delta.items()
                }
                honest = math.sqrt(sum(float(np.vdot(v, v)) for v in delta.values()))
                drawn = math.sqrt(sum(float(np.vdot(v, v)) for v in noise.values()))
                factor = np.float32(lam * honest / drawn) if drawn > 0 else np.float32(0)
                return {k: v * factor for k, v in noise.items()}
            case "label-flip":
                return delta

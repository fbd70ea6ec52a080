"""How large an update may be: bounds on its L2 norm and on its example count.

One device must not be able to wreck the model a whole fleet feeds. A well-formed
update whose values are all 1e38 is finite, so the decoder lets it through; applied,
it takes the weights to 1e37 and the next one to infinity. So every update's L2 norm
is bounded, by default, twice over:

- an absolute cap (``max_update_norm``), always in force;
- a relative bound: ``norm_factor`` times the median norm of the last ``norm_window``
  accepted updates, once ``norm_min_samples`` were accepted. Legitimate deltas of one
  model and fleet are within a small factor of each other (same training recipe); a
  median of accepted norms cannot be moved by a minority of devices.

``num_examples`` weighs an update in FedAvg and FedBuff's weighting: it is capped too
(``max_num_examples``), or one device claiming 2^64-1 examples would take a round.
Both refusals are counted rejections (``norm_bound``, ``examples_bound``).

On top of these, an optional clip norm ``C`` (``clip_norm``, docs/privacy.md): above it
an update is scaled down to ``C`` (``clip_mode`` "clip", counted in ``clipped``) or
refused (``clip_mode`` "reject": ``clip_bound``). The cap and the relative bound still
refuse first: an update a thousand times the median is not a device to learn from,
clipped or not.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

from fedmq.errors import ConfigError, Reason, RejectedUpdate
from fedmq.privacy import clip
from fedmq.strategies import Delta

__all__ = ["CLIP_MODES", "BoundsConfig", "ClipMode", "UpdateBounds"]

ClipMode = Literal["clip", "reject"]
_ROUNDING = 1e-5  # relative: float32 norms of an update clipped in float64 on the device
CLIP_MODES: tuple[ClipMode, ...] = get_args(ClipMode)


@dataclass(frozen=True, kw_only=True)
class BoundsConfig:
    """``max_update_norm``: absolute L2 cap (None: no cap; not recommended).
    ``norm_factor``: refuse norms above this times the recent median (0: off).
    ``norm_window`` / ``norm_min_samples``: how many accepted norms make the median,
    and how many are needed before the relative bound applies.
    ``max_num_examples``: the largest example count an update may claim.
    ``clip_norm``: updates above this L2 norm are scaled to it (``clip_mode`` "clip")
    or refused (``clip_mode`` "reject"); None: off.
    """

    max_update_norm: float | None = 1e4
    norm_factor: float = 10.0
    norm_window: int = 100
    norm_min_samples: int = 10
    max_num_examples: int = 1_000_000
    clip_norm: float | None = None
    clip_mode: ClipMode = "clip"

    def __post_init__(self) -> None:
        if self.max_update_norm is not None and not (
            self.max_update_norm > 0 and math.isfinite(self.max_update_norm)
        ):
            raise ConfigError(f"max_update_norm: {self.max_update_norm} must be > 0 and finite")
        if not (self.norm_factor == 0 or self.norm_factor >= 1) or math.isnan(self.norm_factor):
            raise ConfigError(f"norm_factor: {self.norm_factor} must be 0 (off) or >= 1")
        if self.norm_window < 1:
            raise ConfigError(f"norm_window: {self.norm_window} must be >= 1")
        if not 1 <= self.norm_min_samples <= self.norm_window:
            raise ConfigError(
                f"norm_min_samples: {self.norm_min_samples} must be in 1..norm_window"
            )
        if self.max_num_examples < 1:
            raise ConfigError(f"max_num_examples: {self.max_num_examples} must be >= 1")
        if self.clip_norm is not None and not (
            self.clip_norm > 0 and math.isfinite(self.clip_norm)
        ):
            raise ConfigError(f"clip_norm: {self.clip_norm} must be > 0 and finite")
        if self.clip_mode not in CLIP_MODES:
            raise ConfigError(f"clip_mode: {self.clip_mode!r} must be {' or '.join(CLIP_MODES)}")


class UpdateBounds:
    """The bounds in force, and the recent accepted norms the relative one needs."""

    def __init__(
        self, config: BoundsConfig, recent: Iterable[float] = (), *, clipped: int = 0
    ) -> None:
        self.config = config
        self._recent: deque[float] = deque(recent, maxlen=config.norm_window)
        self.clipped = clipped  # updates scaled down to clip_norm so far

    @property
    def recent(self) -> list[float]:
        """The accepted norms remembered (checkpointed, so a restart keeps the bound)."""
        return list(self._recent)

    def limit(self) -> float:
        """The largest L2 norm admitted now (inf when no bound applies)."""
        config = self.config
        bound = config.max_update_norm if config.max_update_norm is not None else math.inf
        if config.norm_factor and len(self._recent) >= config.norm_min_samples:
            median = statistics.median(self._recent)
            if median > 0:  # devices sending nothing must not make every update too large
                bound = min(bound, config.norm_factor * median)
        return bound

    def check(self, norm: float, num_examples: int) -> None:
        """Raise RejectedUpdate if an update of this norm and weight is out of bounds."""
        if num_examples > self.config.max_num_examples:
            raise RejectedUpdate(
                Reason.EXAMPLES_BOUND,
                f"num_examples {num_examples} > max_num_examples {self.config.max_num_examples}",
            )
        limit = self.limit()
        if not norm <= limit:  # also refuses a NaN norm
            raise RejectedUpdate(Reason.NORM_BOUND, f"L2 norm {norm:.4g} > {limit:.4g}")

    def clip(self, delta: Delta, norm: float) -> Delta:
        """``delta`` within ``clip_norm`` (itself when it is, or clipping is off); scaled
        down and counted in ``clipped`` ("clip"), or refused ("reject": ``clip_bound``)."""
        bound = self.config.clip_norm
        # A device that clipped to the same bound sends a norm within float32 rounding of
        # it: not counted as clipped (the DP mechanism clips again, exactly, in float64).
        if bound is None or norm <= bound * (1 + _ROUNDING):
            return delta
        if self.config.clip_mode == "reject":
            raise RejectedUpdate(Reason.CLIP_BOUND, f"L2 norm {norm:.4g} > clip_norm {bound:.4g}")
        clipped, _ = clip(delta, bound, norm=norm)
        for tensor in clipped.values():
            if hasattr(tensor, "flags"):
                tensor.flags.writeable = False  # as decode leaves them: strategies keep them
        self.clipped += 1
        return clipped

    def accepted(self, norm: float) -> None:
        """Remember the norm of an update that was applied."""
        self._recent.append(norm)

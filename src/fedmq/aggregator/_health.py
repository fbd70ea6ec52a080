"""Is the global model collapsing? A watch over the evaluations, and the loud report.

Training that diverges (a server step far too large, a poisoned update that got through)
does not stop anything: updates keep being applied and versions keep being published
while the model's quality sits at chance. ``CollapseWatch`` compares each evaluation of
the task's target metric with the best one so far and declares the model collapsing when

- the target (or a ``loss`` metric) is not finite (NaN or infinite): at once;
- or, for ``patience`` evaluations in a row, the target is worse than the best so far by
  the configured margin: below ``(1 - drop)`` times the best for a metric that should
  rise (accuracy), above ``rise_factor`` times the best for one that should fall (RMSE,
  loss); or a ``loss`` metric, when the task reports one besides its target, is above
  ``rise_factor`` times the lowest loss so far.

One evaluation that is fine again ends the streak (``recovered`` if it had been
declared). The watch is pure (numbers in, verdicts out); ``watch_evaluation`` logs the
verdicts: ``model_collapsing`` at ERROR with the numbers, ``model_recovered`` at
WARNING. The metrics endpoint exports ``fedmq_model_collapses_total`` and
``fedmq_model_collapsing``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from fedmq._log import log_event
from fedmq.errors import ConfigError
from fedmq.tasks import Metric

__all__ = ["CollapseWatch", "HealthConfig", "Verdict", "watch_evaluation"]

_log = logging.getLogger("fedmq.aggregator")

Verdict = Literal["collapsing", "recovered"]


@dataclass(frozen=True, kw_only=True)
class HealthConfig:
    """When an evaluation counts as bad, and how many in a row make a collapse.

    With the aggregator's default ``eval_every`` 5, ``patience`` 5 is 25 versions.
    """

    patience: int = 5
    drop: float = 0.3  # a rising target is bad below 70 % of its best
    rise_factor: float = 3.0  # a falling target (or the loss) is bad above 3 times its best

    def __post_init__(self) -> None:
        if not self.patience >= 1:
            raise ConfigError(f"patience: {self.patience} must be >= 1")
        if not 0 < self.drop < 1:
            raise ConfigError(f"drop: {self.drop} must be in (0, 1)")
        if not self.rise_factor > 1:
            raise ConfigError(f"rise_factor: {self.rise_factor} must be > 1")


class CollapseWatch:
    """Feed it every evaluation, in order; it says when the model collapses or recovers."""

    def __init__(self, target: Metric | None = None, config: HealthConfig | None = None) -> None:
        self.target = target or Metric("accuracy", higher_is_better=True)
        self.config = config or HealthConfig()
        self.best: float | None = None  # of the target
        self.best_version: int | None = None
        self.best_loss: float | None = None
        self.bad_streak = 0  # consecutive bad evaluations, the last one included
        self.reason: str | None = None  # why the last evaluation was bad
        self.collapsing = False
        self.collapses = 0  # times the model was declared collapsing

    def observe(self, version: int, metrics: Mapping[str, float]) -> Verdict | None:
        """Take one evaluation; "collapsing" when the model is declared collapsing (once
        per collapse), "recovered" when a collapse ends, None otherwise. An evaluation
        without the target metric is ignored."""
        value = metrics.get(self.target.name)
        if value is None:
            return None
        loss = metrics.get("loss") if self.target.name != "loss" else None
        self.reason = self._why_bad(value, loss)
        if self.reason is None:
            self._remember_best(version, value, loss)
            self.bad_streak = 0
            if self.collapsing:
                self.collapsing = False
                return "recovered"
            return None
        self.bad_streak += 1
        due = self.reason == "non_finite" or self.bad_streak >= self.config.patience
        if due and not self.collapsing:
            self.collapsing = True
            self.collapses += 1
            return "collapsing"
        return None

    def _why_bad(self, value: float, loss: float | None) -> str | None:
        if not math.isfinite(value) or (loss is not None and not math.isfinite(loss)):
            return "non_finite"
        best, factor = self.best, self.config.rise_factor
        if best is not None:
            if self.target.higher_is_better and value < (1 - self.config.drop) * best:
                return f"{self.target.name}_drop"
            if not self.target.higher_is_better and value > factor * best:
                return f"{self.target.name}_rise"
        if loss is not None and self.best_loss is not None and loss > factor * self.best_loss:
            return "loss_rise"
        return None

    def _remember_best(self, version: int, value: float, loss: float | None) -> None:
        if self.best is None or self.target.better(value, self.best):
            self.best, self.best_version = value, version
        if loss is not None and (self.best_loss is None or loss < self.best_loss):
            self.best_loss = loss


def watch_evaluation(watch: CollapseWatch, version: int, metrics: Mapping[str, float]) -> None:
    """``watch.observe`` one evaluation and log what it says."""
    verdict = watch.observe(version, metrics)
    rounded = {name: round(value, 6) for name, value in metrics.items()}
    if verdict == "collapsing":
        log_event(
            _log,
            "model_collapsing",
            logging.ERROR,
            reason=watch.reason,
            version=version,
            metrics=rounded,
            best=watch.best,
            best_version=watch.best_version,
            best_loss=watch.best_loss,
            bad_evaluations=watch.bad_streak,
            hint="the server step is too large or an update poisoned the model: "
            "see docs/tuning.md (server optimizers)",
        )
    elif verdict == "recovered":
        log_event(
            _log,
            "model_recovered",
            logging.WARNING,
            version=version,
            metrics=rounded,
            best=watch.best,
        )

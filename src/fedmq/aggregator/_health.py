"""Is the global model collapsing? A watch over the evaluations, and the loud report.

Training that diverges (a server step far too large, a poisoned update that got through)
does not stop anything: updates keep being applied and versions keep being published
while the test accuracy sits at chance. ``CollapseWatch`` compares each evaluation with
the best one so far and declares the model collapsing when

- the loss is not finite (NaN or infinite): at once;
- or, for ``patience`` evaluations in a row, the accuracy is below
  ``(1 - accuracy_drop)`` times the best accuracy so far, or the loss is above
  ``loss_factor`` times the lowest loss so far.

One evaluation that is fine again ends the streak (``recovered`` if it had been
declared). The watch is pure (numbers in, verdicts out); ``watch_evaluation`` logs the
verdicts: ``model_collapsing`` at ERROR with the numbers, ``model_recovered`` at
WARNING. The metrics endpoint exports ``fedmq_model_collapses_total`` and
``fedmq_model_collapsing``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

from fedmq._log import log_event
from fedmq.errors import ConfigError

__all__ = ["CollapseWatch", "HealthConfig", "Verdict", "watch_evaluation"]

_log = logging.getLogger("fedmq.aggregator")

Verdict = Literal["collapsing", "recovered"]


@dataclass(frozen=True, kw_only=True)
class HealthConfig:
    """When an evaluation counts as bad, and how many in a row make a collapse.

    With the aggregator's default ``eval_every`` 5, ``patience`` 5 is 25 versions.
    """

    patience: int = 5
    accuracy_drop: float = 0.3  # bad below 70 % of the best accuracy
    loss_factor: float = 3.0  # bad above 3 times the lowest loss

    def __post_init__(self) -> None:
        if not self.patience >= 1:
            raise ConfigError(f"patience: {self.patience} must be >= 1")
        if not 0 < self.accuracy_drop < 1:
            raise ConfigError(f"accuracy_drop: {self.accuracy_drop} must be in (0, 1)")
        if not self.loss_factor > 1:
            raise ConfigError(f"loss_factor: {self.loss_factor} must be > 1")


class CollapseWatch:
    """Feed it every evaluation, in order; it says when the model collapses or recovers."""

    def __init__(self, config: HealthConfig | None = None) -> None:
        self.config = config or HealthConfig()
        self.best_accuracy: float | None = None
        self.best_accuracy_version: int | None = None
        self.best_loss: float | None = None
        self.bad_streak = 0  # consecutive bad evaluations, the last one included
        self.reason: str | None = None  # why the last evaluation was bad
        self.collapsing = False
        self.collapses = 0  # times the model was declared collapsing

    def observe(self, version: int, accuracy: float, loss: float) -> Verdict | None:
        """Take one evaluation; "collapsing" when the model is declared collapsing (once
        per collapse), "recovered" when a collapse ends, None otherwise."""
        self.reason = self._why_bad(accuracy, loss)
        if self.reason is None:
            self._remember_best(version, accuracy, loss)
            self.bad_streak = 0
            if self.collapsing:
                self.collapsing = False
                return "recovered"
            return None
        self.bad_streak += 1
        due = self.reason == "non_finite_loss" or self.bad_streak >= self.config.patience
        if due and not self.collapsing:
            self.collapsing = True
            self.collapses += 1
            return "collapsing"
        return None

    def _why_bad(self, accuracy: float, loss: float) -> str | None:
        if not (math.isfinite(loss) and math.isfinite(accuracy)):
            return "non_finite_loss"
        best_accuracy, best_loss = self.best_accuracy, self.best_loss
        if best_accuracy is not None and accuracy < (1 - self.config.accuracy_drop) * best_accuracy:
            return "accuracy_drop"
        if best_loss is not None and loss > self.config.loss_factor * best_loss:
            return "loss_rise"
        return None

    def _remember_best(self, version: int, accuracy: float, loss: float) -> None:
        if self.best_accuracy is None or accuracy > self.best_accuracy:
            self.best_accuracy, self.best_accuracy_version = accuracy, version
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss = loss


def watch_evaluation(watch: CollapseWatch, version: int, accuracy: float, loss: float) -> None:
    """``watch.observe`` one evaluation and log what it says."""
    verdict = watch.observe(version, accuracy, loss)
    if verdict == "collapsing":
        log_event(
            _log,
            "model_collapsing",
            logging.ERROR,
            reason=watch.reason,
            version=version,
            accuracy=round(accuracy, 4),
            loss=loss,
            best_accuracy=watch.best_accuracy,
            best_version=watch.best_accuracy_version,
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
            accuracy=round(accuracy, 4),
            loss=loss,
            best_accuracy=watch.best_accuracy,
        )

"""The collapse watch on hand-made evaluation sequences, and how it is reported."""

from __future__ import annotations

import asyncio
import logging
import math

import pytest

from fedmq.aggregator import Aggregator, AggregatorConfig
from fedmq.aggregator._health import CollapseWatch, HealthConfig, Verdict, watch_evaluation
from fedmq.aggregator._metrics import registry_for, render_metrics
from fedmq.errors import ConfigError
from fedmq.tasks import Metric
from fedmq.transport import TransportConfig, connect_aggregator, connect_participant
from tests import updates
from tests.prometheus import samples
from tests.updates import INITIAL, delta

ACCURACY = Metric("accuracy", higher_is_better=True)
RMSE = Metric("rmse", higher_is_better=False)


def scores(accuracy: float, loss: float) -> dict[str, float]:
    return {"accuracy": accuracy, "loss": loss}


def verdicts(watch: CollapseWatch, evaluations: list[tuple[float, float]]) -> list[Verdict | None]:
    return [watch.observe(v, scores(acc, loss)) for v, (acc, loss) in enumerate(evaluations)]


def test_a_model_that_learns_is_never_collapsing() -> None:
    watch = CollapseWatch(ACCURACY)
    # Noisy but healthy: dips of a few points, loss wobbling around its best.
    learning = [(0.15, 2.3), (0.55, 1.2), (0.62, 1.0), (0.58, 1.1), (0.70, 0.8), (0.66, 0.9)]
    learning += [(0.74, 0.7), (0.71, 0.75), (0.79, 0.6), (0.76, 0.65), (0.81, 0.55)]
    assert verdicts(watch, learning) == [None] * len(learning)
    assert not watch.collapsing and watch.collapses == 0
    assert watch.best == 0.81 and watch.best_version == 10


def test_accuracy_far_below_the_best_for_patience_evaluations_is_a_collapse() -> None:
    # What momentum at lr 1.0 did in `fedmq bench`: 0.68 at version 6, then chance.
    watch = CollapseWatch(ACCURACY, HealthConfig(patience=3))
    seen = verdicts(watch, [(0.15, 2.3), (0.57, 5.5), (0.68, 4.6), (0.02, 2.9), (0.10, 2.4)])
    assert seen == [None] * 5 and watch.bad_streak == 2 and not watch.collapsing
    assert watch.observe(5, scores(0.16, 12.1)) == "collapsing"  # the third bad one in a row
    assert watch.reason == "accuracy_drop" and watch.collapses == 1
    assert watch.observe(6, scores(0.25, 8.1)) is None  # still bad: said once, not again
    assert watch.bad_streak == 4 and watch.best == 0.68  # bad ones set no record


def test_one_good_evaluation_ends_the_streak_and_a_collapse() -> None:
    watch = CollapseWatch(ACCURACY, HealthConfig(patience=2))
    assert verdicts(watch, [(0.8, 0.5), (0.3, 0.6), (0.79, 0.5), (0.3, 0.6)]) == [None] * 4
    assert watch.observe(4, scores(0.2, 0.6)) == "collapsing"
    assert watch.observe(5, scores(0.75, 0.5)) == "recovered"
    assert not watch.collapsing and watch.bad_streak == 0
    assert verdicts(watch, [(0.1, 3.0), (0.1, 3.0)]) == [None, "collapsing"]
    assert watch.collapses == 2


def test_a_loss_far_above_its_best_counts_even_at_chance_accuracy() -> None:
    # A model that never learned and blew up: accuracy stays near its first value.
    watch = CollapseWatch(ACCURACY, HealthConfig(patience=2))
    assert watch.observe(0, scores(0.10, 2.3)) is None
    assert watch.observe(1, scores(0.10, 7.5)) is None  # above 3 x 2.3
    assert watch.observe(2, scores(0.10, 40.0)) == "collapsing"
    assert watch.reason == "loss_rise"


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_a_non_finite_loss_is_a_collapse_at_once(loss: float) -> None:
    watch = CollapseWatch(ACCURACY, HealthConfig(patience=10))
    assert watch.observe(0, scores(0.5, 1.0)) is None
    assert watch.observe(1, scores(0.1, loss)) == "collapsing"
    assert watch.reason == "non_finite"
    assert watch.observe(2, scores(0.5, 1.0)) == "recovered"


def test_a_falling_target_far_above_its_best_for_patience_evaluations_is_a_collapse() -> None:
    # RMSE should fall: above rise_factor x the lowest so far is bad, a drop is progress.
    watch = CollapseWatch(RMSE, HealthConfig(patience=3, rise_factor=2.0))
    healthy = [40.0, 30.0, 25.0, 45.0, 22.0, 20.0]  # 45 < 2 x 25: a wobble, not a collapse
    assert [watch.observe(v, {"rmse": r}) for v, r in enumerate(healthy)] == [None] * 6
    assert watch.best == 20.0 and watch.best_version == 5 and watch.bad_streak == 0
    assert watch.observe(6, {"rmse": 41.0}) is None  # above 2 x 20
    assert watch.observe(7, {"rmse": 90.0}) is None
    assert watch.observe(8, {"rmse": 55.0}) == "collapsing"  # the third bad one in a row
    assert watch.reason == "rmse_rise" and watch.collapses == 1
    assert watch.best == 20.0  # bad ones set no record
    assert watch.observe(9, {"rmse": 21.0}) == "recovered"
    assert watch.observe(10, {"rmse": math.inf}) == "collapsing"  # non-finite: at once
    assert watch.reason == "non_finite"


def test_an_evaluation_without_the_target_is_ignored() -> None:
    watch = CollapseWatch(RMSE, HealthConfig(patience=1))
    assert watch.observe(0, {"rmse": 10.0}) is None
    assert watch.observe(1, {"accuracy": 0.0, "mae": 1e9}) is None
    assert watch.bad_streak == 0 and watch.best == 10.0 and not watch.collapsing


def test_health_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="patience"):
        HealthConfig(patience=0)
    with pytest.raises(ConfigError, match="drop"):
        HealthConfig(drop=1.0)
    with pytest.raises(ConfigError, match="rise_factor"):
        HealthConfig(rise_factor=0.5)


def test_a_collapse_is_logged_with_its_numbers(caplog: pytest.LogCaptureFixture) -> None:
    watch = CollapseWatch(ACCURACY, HealthConfig(patience=1))
    watch_evaluation(watch, 3, scores(0.81, 0.5))
    watch_evaluation(watch, 8, scores(0.1, math.nan))
    watch_evaluation(watch, 9, scores(0.8, 0.5))
    (collapsing,) = [r for r in caplog.records if r.getMessage() == "model_collapsing"]
    assert collapsing.levelno == logging.ERROR
    fields = collapsing.__dict__["fedmq_fields"]
    assert fields["reason"] == "non_finite" and fields["version"] == 8
    assert fields["best"] == 0.81 and fields["best_version"] == 3
    (recovered,) = [r for r in caplog.records if r.getMessage() == "model_recovered"]
    assert recovered.levelno == logging.WARNING


async def test_the_aggregator_watches_its_evaluations_and_exports_the_count(
    job: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The evaluator says: version 0 is fine, version 1 has a NaN loss.
    results = {0: scores(0.8, 0.5), 1: scores(0.1, math.nan)}
    config = AggregatorConfig(eval_every=1, publish_interval_s=0.0)
    transport_config = TransportConfig(url="memory://health", job=job)
    async with connect_aggregator(transport_config) as transport, asyncio.TaskGroup() as tg:
        aggregator = Aggregator(
            config, transport, INITIAL, evaluate=lambda p: results[int(p["b"][0] != 1.0)]
        )
        task = tg.create_task(aggregator.run(tg), name="aggregator")
        async with connect_participant(transport_config, "dev-1") as device:
            await device.publish_update(updates.update("dev-1", 0, 0, delta(1.0)))
        async with asyncio.timeout(10):
            while aggregator.stats.health.collapses == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        text, _ = render_metrics(registry_for(aggregator, active_window_s=60.0))
        task.cancel()
    values = samples(text.decode())
    assert values["fedmq_model_collapses_total"] == 1
    assert values["fedmq_model_collapsing"] == 1
    (event,) = [r for r in caplog.records if r.getMessage() == "model_collapsing"]
    assert event.__dict__["fedmq_fields"]["version"] == 1

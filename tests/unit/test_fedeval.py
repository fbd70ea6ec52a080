"""FederatedEval: the fleet's metrics from the devices' reports, on hand-computed numbers."""

from __future__ import annotations

import pytest

from fedmq.aggregator import DeviceMetric, FederatedEval, FedEvalConfig, MetricSummary
from fedmq.aggregator._fedeval import weighted_mean
from fedmq.errors import ConfigError, Reason, Rejection
from fedmq.wire import EvalEnvelope, encode_eval, open_eval

MODEL = 100  # the aggregator's current version in these tests


def report(
    participant: str, version: int, n: int, created: float = 1.0, **metrics: float
) -> EvalEnvelope:
    return EvalEnvelope(
        participant=participant,
        version=version,
        num_examples=n,
        metrics=metrics,
        created=created,
    )


def fleet(window: int = 0) -> FederatedEval:
    ev = FederatedEval(FedEvalConfig(window=window))
    ev.add(report("a", 5, 100, rmse=10.0, mae=4.0), model_version=MODEL)
    ev.add(report("b", 5, 300, rmse=20.0, mae=8.0), model_version=MODEL)
    ev.add(report("c", 4, 600, rmse=100.0), model_version=MODEL)
    return ev


def test_the_mean_is_weighted_by_examples_over_the_newest_version() -> None:
    # (100 * 10 + 300 * 20) / (100 + 300) = 7000 / 400; c is on version 4, not counted
    assert fleet().summary("rmse") == MetricSummary(
        name="rmse", value=17.5, num_examples=400, devices=2, version=5, oldest_version=5
    )
    # (100 * 4 + 300 * 8) / 400 = 2800 / 400
    assert fleet().summary("mae") == MetricSummary(
        name="mae", value=7.0, num_examples=400, devices=2, version=5, oldest_version=5
    )


def test_a_window_counts_reports_on_recent_versions_too() -> None:
    # (100 * 10 + 300 * 20 + 600 * 100) / 1000 = 67000 / 1000
    summary = fleet(window=1).summary("rmse")
    assert summary is not None
    assert (summary.value, summary.num_examples, summary.devices) == (67.0, 1000, 3)
    assert (summary.version, summary.oldest_version) == (5, 4)
    ev = fleet(window=1)
    ev.add(report("a", 6, 100, rmse=2.0), model_version=MODEL)  # 4 is now out of the window
    # (100 * 2 + 300 * 20) / 400 = 6200 / 400
    assert ev.summary("rmse") == MetricSummary(
        name="rmse", value=15.5, num_examples=400, devices=2, version=6, oldest_version=5
    )


def test_per_device_values_are_kept_in_and_out_of_the_window() -> None:
    assert fleet().per_device("rmse") == {
        "a": DeviceMetric(version=5, num_examples=100, value=10.0),
        "b": DeviceMetric(version=5, num_examples=300, value=20.0),
        "c": DeviceMetric(version=4, num_examples=600, value=100.0),
    }
    assert list(fleet().per_device("mae")) == ["a", "b"]
    assert fleet().names() == ["mae", "rmse"]
    assert set(fleet().summaries()) == {"mae", "rmse"}
    assert fleet().summary("accuracy") is None
    assert fleet().per_device("accuracy") == {}
    assert FederatedEval().summaries() == {}


def test_older_reports_than_the_one_held_are_ignored() -> None:
    ev = FederatedEval()
    assert ev.add(report("a", 5, 100, created=50.0, rmse=10.0), model_version=MODEL)
    assert not ev.add(report("a", 4, 900, created=99.0, rmse=1.0), model_version=MODEL)
    assert not ev.add(report("a", 5, 900, created=49.0, rmse=1.0), model_version=MODEL)
    assert ev.per_device("rmse")["a"] == DeviceMetric(version=5, num_examples=100, value=10.0)
    # the same version evaluated again later (on request) replaces it; a replay is harmless
    assert ev.add(report("a", 5, 200, created=60.0, rmse=12.0), model_version=MODEL)
    assert ev.add(report("a", 5, 200, created=60.0, rmse=12.0), model_version=MODEL)
    assert ev.per_device("rmse")["a"] == DeviceMetric(version=5, num_examples=200, value=12.0)


def test_each_metric_has_its_own_newest_version_and_a_report_replaces_the_last_whole() -> None:
    ev = fleet()
    ev.add(report("b", 7, 300, mae=2.0), model_version=MODEL)  # b's rmse is gone with it
    # mae: b alone on 7. rmse: a on 5 is the newest now, c on 4 still out.
    assert ev.summary("mae") == MetricSummary(
        name="mae", value=2.0, num_examples=300, devices=1, version=7, oldest_version=7
    )
    assert ev.summary("rmse") == MetricSummary(
        name="rmse", value=10.0, num_examples=100, devices=1, version=5, oldest_version=5
    )


def test_future_versions_and_oversized_weights_are_refused_and_change_nothing() -> None:
    ev = FederatedEval(FedEvalConfig(max_num_examples=1000))
    with pytest.raises(Rejection) as caught:
        ev.add(report("a", 11, 100, rmse=1.0), model_version=10)
    assert caught.value.reason == Reason.FUTURE_BASE
    with pytest.raises(Rejection) as caught:
        ev.add(report("a", 10, 1001, rmse=1.0), model_version=10)
    assert caught.value.reason == Reason.EXAMPLES_BOUND
    assert ev.devices == 0
    assert ev.add(report("a", 10, 1000, rmse=1.0), model_version=10)


def test_memory_is_bounded_by_forgetting_the_device_heard_from_longest_ago() -> None:
    ev = FederatedEval(FedEvalConfig(max_devices=2))
    ev.add(report("a", 1, 10, rmse=1.0), model_version=MODEL)
    ev.add(report("b", 1, 10, rmse=2.0), model_version=MODEL)
    ev.add(report("a", 2, 10, rmse=3.0), model_version=MODEL)  # a is now the freshest
    ev.add(report("c", 1, 10, rmse=4.0), model_version=MODEL)
    assert (ev.devices, ev.evicted) == (2, 1)
    assert list(ev.per_device("rmse")) == ["a", "c"]
    ev.add(report("a", 3, 10, rmse=5.0), model_version=MODEL)  # known device: nobody goes
    assert (ev.devices, ev.evicted) == (2, 1)


def test_the_held_report_is_a_copy() -> None:
    metrics = {"rmse": 1.0}
    ev = FederatedEval()
    ev.add(
        EvalEnvelope(participant="a", version=1, num_examples=1, metrics=metrics),
        model_version=MODEL,
    )
    metrics["rmse"] = 99.0
    assert ev.per_device("rmse")["a"].value == 1.0


def test_the_mean_never_overflows_and_weights_are_exact() -> None:
    huge = [
        DeviceMetric(version=1, num_examples=10**6, value=1.5e308),
        DeviceMetric(version=1, num_examples=10**6, value=1.7e308),
    ]
    assert weighted_mean(huge) == pytest.approx(1.6e308)
    mixed = [
        DeviceMetric(version=1, num_examples=3, value=-1e308),
        DeviceMetric(version=1, num_examples=1, value=1e308),
    ]
    assert weighted_mean(mixed) == pytest.approx(-0.5e308)  # (-3e308 + 1e308) / 4
    zeros = [DeviceMetric(version=1, num_examples=5, value=0.0)]
    assert weighted_mean(zeros) == 0.0
    # 0.1 weighted 1 and 0.2 weighted 2: (0.1 + 0.4) / 3
    tenths = [
        DeviceMetric(version=1, num_examples=1, value=0.1),
        DeviceMetric(version=1, num_examples=2, value=0.2),
    ]
    assert weighted_mean(tenths) == pytest.approx(0.5 / 3, rel=1e-15)


def test_reports_from_the_wire_combine() -> None:
    ev = FederatedEval()
    for participant, n, acc in (("dev-01", 250, 0.8), ("dev-02", 750, 0.9)):
        data = encode_eval(report(participant, 12, n, accuracy=acc))
        ev.add(open_eval(data), model_version=12)
    summary = ev.summary("accuracy")
    assert summary is not None
    assert summary.value == pytest.approx(0.875)  # (250 * 0.8 + 750 * 0.9) / 1000
    assert (summary.num_examples, summary.devices) == (1000, 2)


@pytest.mark.parametrize(
    ("field", "value"), [("max_devices", 0), ("window", -1), ("max_num_examples", 0)]
)
def test_config_ranges(field: str, value: int) -> None:
    with pytest.raises(ConfigError, match=field):
        FedEvalConfig(**{field: value})

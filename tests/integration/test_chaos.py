"""Nothing lost: a real fleet through aggregator crashes, a broker restart and device reboots.

For each transport, a broker of the test's own (tests/integration/chaos.py), an aggregator
with a checkpoint folder and a few participants run as ``fedmq`` processes. The aggregator
is killed with SIGKILL three times and restarted on the same checkpoint, the broker is
restarted once, devices are killed and restarted on their state folders; then the devices
stop, their outboxes are drained, the aggregator is stopped gracefully, and every update a
device published is reconciled with what the aggregator applied or refused.

The short form runs by default (CI). ``FEDMQ_CHAOS_FULL=1`` runs the long form (five
devices, five minutes of chaos); ``FEDMQ_CHAOS_SEED`` picks another seed. The same runs
are available as ``python benchmarks/chaos.py --transport amqp --minutes 5``.
The reconciliation table is printed (``-s`` shows it; a failure always does).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.integration.chaos import (
    ChaosConfig,
    ChaosRun,
    Transport,
    check_versions,
    make_plan,
    reconcile,
)

FULL = os.environ.get("FEDMQ_CHAOS_FULL") == "1"
SEED = int(os.environ.get("FEDMQ_CHAOS_SEED", "0"))


def chaos_config(transport: Transport) -> ChaosConfig:
    seed = SEED * 2 + (transport == "mqtt")  # the two transports get different plans
    if FULL:
        return ChaosConfig(
            transport=transport,
            devices=5,
            chaos_s=300.0,
            device_kills=10,
            seed=seed,
            max_examples=1500,
            eval_examples=2000,
            target_accuracy=0.70,
            settle_timeout_s=180.0,
        )
    # Three kills and a broker restart still, in a window of ~a minute on two cores.
    return ChaosConfig(transport=transport, devices=3, chaos_s=12.0, seed=seed, pace_s=0.5)


def _cannot_run(message: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: broker tests must run)")
    pytest.skip(message)


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(2400 if FULL else 300)
@pytest.mark.parametrize(
    "transport",
    [
        pytest.param("amqp", marks=pytest.mark.amqp),
        pytest.param("mqtt", marks=pytest.mark.mqtt),
    ],
)
def test_nothing_lost_through_chaos(transport: Transport, tmp_path: Path, data_dir: Path) -> None:
    config = chaos_config(transport)
    run = ChaosRun(config, tmp_path, data_dir)
    try:
        report = run.run()
    except FileNotFoundError as exc:  # the broker's binaries
        _cannot_run(f"{transport} broker is not installed ({exc})")
    rendered = report.render()
    print(rendered)
    rec = report.reconciliation
    assert rec.lost == 0, rendered
    assert rec.doubly_applied == 0, rendered
    assert not rec.problems and not report.versions.problems and not report.problems, rendered
    assert report.checkpoint_matches, rendered
    assert report.stopped_gracefully and report.stop_s < config.shutdown_timeout_s, rendered
    assert report.accuracy >= config.target_accuracy, rendered
    assert len([f for f in report.faults if "aggregator" in f]) == config.aggregator_kills
    assert len(report.versions.resumed) == config.aggregator_kills
    assert rec.published > 0 and rec.applied > 0


# -- the reconciliation itself, on hand-made events (no broker) ----------------------------


def _ev(event: str, **fields: Any) -> dict[str, Any]:
    return {"event": event, "ts": 0.0, **fields}


def _published(pid: str, *seqs: int) -> list[dict[str, Any]]:
    return [_ev("published", participant=pid, seq=s) for s in seqs]


def test_reconcile_counts_each_outcome_once() -> None:
    runs = [
        [
            _ev("committed", commit=1, version=2, applied={"a": [0, 1]}),
            _ev("accepted", participant="a", seq=2),  # in memory only: lost with the kill
        ],
        [
            _ev("resumed", version=2, commit=1, last_applied={"a": [0, 1]}),
            _ev("rejected", participant="a", seq=1, reason="duplicate"),  # a redelivery
            _ev("rejected", participant="a", seq=3, reason="too_stale"),
            _ev("committed", commit=2, version=3, applied={"a": [2]}),
        ],
    ]
    rec = reconcile(runs, {"a": _published("a", 0, 1, 2, 3)})
    (row,) = rec.rows
    assert (rec.lost, rec.doubly_applied, rec.problems) == (0, 0, [])
    assert sorted(row.applied) == [0, 1, 2] and row.rejected == {3: "too_stale"}
    assert row.duplicates_refused == 1
    assert "TOTAL" in rec.table()


def test_reconcile_finds_lost_and_double_applies() -> None:
    runs = [
        [_ev("committed", commit=1, version=2, applied={"a": [0, 1]})],
        [
            _ev("resumed", version=2, commit=1, last_applied={"a": [0, 1]}),
            # Refused as a duplicate but never applied: that is a loss, not a reason.
            _ev("rejected", participant="a", seq=2, reason="duplicate"),
            _ev("committed", commit=2, version=3, applied={"a": [1]}),
        ],
    ]
    rec = reconcile(runs, {"a": _published("a", 0, 1, 2, 3)})
    assert rec.rows[0].lost == {2, 3}
    assert rec.rows[0].doubly_applied == {1}
    assert not rec.ok


def test_reconcile_recovers_a_commit_whose_line_was_lost() -> None:
    # Killed between the durable checkpoint and its "committed" line: the next run says it.
    runs = [
        [_ev("committed", commit=1, version=1, applied={"a": [0]})],
        [
            _ev("resumed", version=2, commit=2, last_applied={"a": [1]}),
            _ev("rejected", participant="a", seq=1, reason="duplicate"),
        ],
    ]
    rec = reconcile(runs, {"a": _published("a", 0, 1)})
    assert rec.ok and sorted(rec.rows[0].applied) == [0, 1]


def test_reconcile_flags_a_resume_behind_a_logged_commit() -> None:
    runs = [
        [_ev("committed", commit=3, version=9, applied={"a": [0]})],
        [_ev("resumed", version=5, commit=2, last_applied={})],
    ]
    assert reconcile(runs, {"a": _published("a", 0)}).problems
    assert check_versions(runs).problems


def test_reconcile_judges_a_refusal_by_when_it_happened() -> None:
    runs = [
        [
            # Refused, then killed before a checkpoint: the redelivery is judged again.
            {**_ev("rejected", participant="a", seq=0, reason="too_stale"), "ts": 1.0},
            {**_ev("committed", commit=1, version=1, applied={"a": [1]}), "ts": 2.0},
            # Refused for a reason after it was applied for good: the aggregator forgot it.
            {**_ev("rejected", participant="a", seq=1, reason="future_base"), "ts": 3.0},
        ],
        [
            {**_ev("resumed", version=1, commit=1, last_applied={"a": [1]}), "ts": 4.0},
            {**_ev("committed", commit=2, version=2, applied={"a": [0]}), "ts": 5.0},
        ],
    ]
    rec = reconcile(runs, {"a": _published("a", 0, 1)})
    assert rec.lost == 0 and sorted(rec.rows[0].applied) == [0, 1]
    assert rec.problems == ["a seq 1 was applied, then refused as ['future_base']"]


def test_reconcile_counts_a_refusal_the_restart_caused_as_lost() -> None:
    runs = [
        [_ev("committed", commit=1, version=3, applied={"a": [0]})],
        [
            _ev("resumed", version=3, commit=1, last_applied={"a": [0]}),
            # The previous run published versions 4 and 5 that this one does not know.
            _ev("rejected", participant="a", seq=1, reason="future_base", detail="base 5 > 3"),
            _ev(
                "rejected",
                participant="a",
                seq=2,
                reason="too_stale",
                detail="base version 2 is no longer held",
            ),
            _ev("rejected", participant="a", seq=3, reason="too_stale", detail="staleness 60 > 50"),
        ],
    ]
    rec = reconcile(runs, {"a": _published("a", 0, 1, 2, 3)})
    assert rec.rows[0].lost == {1, 2}
    assert rec.rows[0].rejected == {3: "too_stale"}
    assert not rec.ok


def test_plan_is_seeded() -> None:
    config = ChaosConfig(transport="mqtt", seed=7)
    plan = make_plan(config)
    assert plan == make_plan(config)
    assert [f.kind for f in plan].count("kill_aggregator") == 3
    assert [f.kind for f in plan].count("restart_broker") == 1

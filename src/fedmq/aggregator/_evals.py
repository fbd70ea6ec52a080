"""The devices' evaluation reports (``fedmq.eval/1``): admitted, combined, recorded.

Every report goes through the same doors as an update from the same device: it must
fit the transport's bound, come from the participant the broker says sent it (MQTT
topic, AMQP sender identity), decode strictly (``open_eval``), carry a valid
participant id, be signed by a key its participant owns when ``update_verifier`` is
configured, come from an allowed
participant when there is an allow-list, and not claim a version newer than the
model or more examples than ``FedEvalConfig.max_num_examples``. A refused report is
counted by reason (``AggregatorStats.eval_rejected``, ``fedmq_eval_rejected_total``)
and logged (the first of each reason at WARNING, the rest at DEBUG); nothing else
happens. An admitted one becomes its device's latest in ``FederatedEval``.

A federated evaluation point (``EvalPoint(source="federated")``) is recorded at most
once every ``_POINT_EVERY_S`` seconds, once the devices counted in the target's summary
reach ``FedEvalConfig.min_devices``: what stop rules, reports and plots read when the
aggregator has no held-out set of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol

from fedmq._log import log_event
from fedmq.aggregator._config import AggregatorConfig
from fedmq.aggregator._fedeval import FederatedEval
from fedmq.aggregator._health import watch_evaluation
from fedmq.aggregator._stats import AggregatorStats, EvalPoint
from fedmq.errors import Reason, Rejection, WireError
from fedmq.transport import EvalReport
from fedmq.wire import EVAL_LIMITS, EvalEnvelope, open_eval

__all__ = ["serve_evals"]

_log = logging.getLogger("fedmq.aggregator")

_POINT_EVERY_S = 1.0


class _Host(Protocol):
    """What reports need of the aggregator (aggregator/_service.py)."""

    config: AggregatorConfig
    stats: AggregatorStats
    fed_eval: FederatedEval

    @property
    def evaluates_centrally(self) -> bool: ...


async def serve_evals(aggregator: _Host, reports: AsyncIterator[EvalReport]) -> None:
    """Admit every report ``reports`` yields until it ends.

    A report taken within ``_POINT_EVERY_S`` of the last point is recorded by a timer
    when the interval is up, so the last reports of a burst are never left unrecorded
    until the next burst (versions later).
    """
    loop = asyncio.get_running_loop()
    last_point = -float("inf")
    timer: asyncio.TimerHandle | None = None

    def record() -> None:
        nonlocal last_point, timer
        timer = None
        if _record(aggregator):
            last_point = time.monotonic()

    try:
        async for received in reports:
            if _admit(aggregator, received) is None or timer is not None:
                continue  # nothing new, or a point is already due
            wait = last_point + _POINT_EVERY_S - time.monotonic()
            if wait <= 0:
                record()
            else:
                timer = loop.call_later(wait, record)
    finally:
        if timer is not None:
            timer.cancel()


def _admit(aggregator: _Host, received: EvalReport) -> EvalEnvelope | None:
    config, stats = aggregator.config, aggregator.stats
    try:
        if received.refused is not None:
            raise received.refused
        report = open_eval(received.body, limits=EVAL_LIMITS, verifier=config.update_verifier)
        hint = received.participant_hint
        if not hint or hint != report.participant:  # the broker's word, as for updates
            raise Rejection(
                Reason.PARTICIPANT_MISMATCH, f"sent by {hint!r}, claims {report.participant!r}"
            )
        allowed = config.allowed_participants
        if allowed is not None and report.participant not in allowed:
            raise Rejection(Reason.UNKNOWN_PARTICIPANT, f"{report.participant!r} is not allowed")
        taken = aggregator.fed_eval.add(report, model_version=stats.version)
    except (WireError, Rejection) as error:
        reason = error.reason.value
        first = reason not in stats.eval_rejected
        stats.eval_rejected[reason] += 1
        log_event(
            _log,
            "eval_rejected",
            logging.WARNING if first else logging.DEBUG,
            reason=reason,
            detail=str(error),
        )
        return None
    stats.eval_reports += 1
    return report if taken else None


def _record(aggregator: _Host) -> bool:
    """Append a federated point if the target's summary covers enough devices."""
    stats, fed = aggregator.stats, aggregator.fed_eval
    summaries = fed.summaries()
    target = summaries.get(stats.target.name)
    if target is None or target.devices < fed.config.min_devices:
        return False
    point = EvalPoint(
        elapsed_s=stats.elapsed_s,
        version=target.version,
        applied=stats.applied,
        metrics={name: s.value for name, s in summaries.items()},
        source="federated",
        devices=target.devices,
        examples=target.num_examples,
        bytes_in=stats.bytes_in,
        bytes_out=stats.bytes_out,
    )
    stats.evaluations.append(point)
    log_event(
        _log,
        "evaluated",
        source="federated",
        version=point.version,
        devices=point.devices,
        metrics={name: round(value, 4) for name, value in point.metrics.items()},
    )
    if not aggregator.evaluates_centrally:  # the devices' word is the only one
        watch_evaluation(stats.health, point.version, point.metrics)
    return True

"""A device's evaluation report ``fedmq.eval/1`` (participant -> aggregator).

    {"schema": "fedmq.eval/1", "participant": str, "version": uint, "num_examples": uint,
     "metrics": {name: float64, ...}, "created": float64}

A device evaluates the global model of ``version`` on ``num_examples`` of its own
held-out examples (at least 1: the report's weight) and sends the named metrics (1 to
16, names ``[a-z][a-z0-9_]{0,31}``, finite values). ``created`` is unix seconds.
Decoding is as strict as for updates; a signed report is this envelope wrapped in
``fedmq.signed/1`` by a key its participant owns (``open_eval``), exactly as updates.
The aggregator combines reports with ``fedmq.aggregator.FederatedEval``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedmq.errors import Reason, WireError
from fedmq.wire._decode import (
    _envelope,
    _fail,
    _float,
    _map,
    _participant,
    _short,
    _str,
    _uint,
)
from fedmq.wire._encode import _float as _encode_float
from fedmq.wire._encode import _pack
from fedmq.wire._encode import _uint as _encode_uint
from fedmq.wire._envelope import WireLimits
from fedmq.wire._signed import Verifier, check_signer, open_signed

__all__ = [
    "EVAL_LIMITS",
    "MAX_METRICS",
    "METRIC_NAME_PATTERN",
    "METRIC_NAME_RULE",
    "SCHEMA_EVAL",
    "EvalEnvelope",
    "check_metric_name",
    "decode_eval",
    "encode_eval",
    "is_metric_name",
    "open_eval",
]

SCHEMA_EVAL = "fedmq.eval/1"
_FIELDS = ("schema", "participant", "version", "num_examples", "metrics", "created")
# The decoder's map bound (section 6 of docs/wire-format.md): a larger map is undecodable.
MAX_METRICS = 16
MAX_METRIC_NAME = 32
# A letter first, so that a name is also a valid suffix of a Prometheus metric name.
METRIC_NAME_PATTERN = rf"[a-z][a-z0-9_]{{0,{MAX_METRIC_NAME - 1}}}"
METRIC_NAME_RULE = f"1-{MAX_METRIC_NAME} characters of [a-z0-9_], starting with a letter"
_NAME = re.compile(METRIC_NAME_PATTERN)
# The largest legal report is under 1 KiB, signed under 1.5 KiB: anything larger is not one.
EVAL_LIMITS = WireLimits(max_message_bytes=4096)


@dataclass(frozen=True, kw_only=True)
class EvalEnvelope:
    """A device's metrics of the global model ``version`` on its own held-out examples."""

    participant: str
    version: int
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    created: float = 0.0


def is_metric_name(value: object) -> bool:
    """Whether ``value`` is a str following the metric name rule (e.g. ``rmse``, ``mae_6h``)."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def check_metric_name(value: str, field: str = "metric") -> str:
    """``value`` if it is a metric name, else ``ValueError`` naming ``field``."""
    if not is_metric_name(value):
        raise ValueError(f"{field}: {value!r} must be {METRIC_NAME_RULE}, e.g. rmse")
    return value


def _metrics(obj: object) -> dict[str, float]:
    """The ``metrics`` map checked: 1 to MAX_METRICS names of the rule, finite float64s."""
    metrics = _map(obj, "metrics")
    if not metrics:
        _fail(Reason.MISSING_FIELD, "metrics: at least one is needed")
    if len(metrics) > MAX_METRICS:
        _fail(Reason.TOO_LARGE, f"metrics: {len(metrics)}, limit {MAX_METRICS}")
    checked: dict[str, float] = {}
    for name, value in metrics.items():
        _str(name, "metrics", MAX_METRIC_NAME)
        if not is_metric_name(name):
            _fail(Reason.WRONG_TYPE, f"metrics: {_short(name)} is not {METRIC_NAME_RULE}")
        checked[name] = _float(value, f"metrics.{name}")
    return checked


def _examples(value: object) -> int:
    examples = _uint(value, "num_examples")
    if examples < 1:
        _fail(Reason.WRONG_TYPE, "num_examples: 0, a report weighs at least 1 example")
    return examples


def encode_eval(env: EvalEnvelope) -> bytes:
    """Serialize a report (deterministic: documented key order, metrics sorted by name);
    ``ValueError`` for one no aggregator would accept."""
    try:
        participant = _participant(env.participant, EVAL_LIMITS)
        metrics = _metrics(dict(env.metrics))
        _examples(env.num_examples)
    except WireError as error:
        raise ValueError(str(error)) from None
    return _pack(
        {
            "schema": SCHEMA_EVAL,
            "participant": participant,
            "version": _encode_uint("version", env.version),
            "num_examples": _encode_uint("num_examples", env.num_examples),
            "metrics": dict(sorted(metrics.items())),  # ASCII names: bytewise order
            "created": _encode_float("created", env.created),
        }
    )


def decode_eval(data: bytes, *, limits: WireLimits = EVAL_LIMITS) -> EvalEnvelope:
    """Parse a ``fedmq.eval/1`` report strictly; ``WireError`` and nothing else, for any bytes."""
    fields = _envelope(data, SCHEMA_EVAL, _FIELDS, limits)
    return EvalEnvelope(
        participant=_participant(fields["participant"], limits),
        version=_uint(fields["version"], "version"),
        num_examples=_examples(fields["num_examples"]),
        metrics=_metrics(fields["metrics"]),
        created=_float(fields["created"], "created"),
    )


def open_eval(
    data: bytes, *, limits: WireLimits = EVAL_LIMITS, verifier: Verifier | None = None
) -> EvalEnvelope:
    """Verify (if ``verifier``) and decode a report, signed or not; ``WireError`` only.

    As ``open_update``: with ``verifier``, only a report signed by a registered key its
    participant owns opens (``unsigned``, ``unknown_key``, ``bad_signature``,
    ``participant_mismatch``); without, a signed report is unwrapped unverified.
    """
    body, key_id = open_signed(data, verifier=verifier, limits=limits)
    report = decode_eval(body, limits=limits)
    check_signer(key_id, report.participant, "report")
    return report

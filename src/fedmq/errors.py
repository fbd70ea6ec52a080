"""The one exception tree of fedmq.

    FedmqError
    ├── ConfigError            invalid configuration (names the field and the allowed values)
    ├── DataError              dataset files missing, truncated or failing their checksum
    ├── ClosedResourceError    a long-lived resource used after it was closed, or reopened
    ├── ModelMismatch          this device's model is not the aggregator's (names, shapes, dtypes)
    ├── TransportError         broker trouble, mapped from aio-pika / aiomqtt at the boundary
    │   ├── BrokerUnavailable  cannot reach the broker (yet); callers retry
    │   └── PayloadTooLarge    a message larger than the broker accepts; refused before sending
    └── Rejection              bad input from the network; always counted, never fatal
        ├── WireError          the bytes are not a valid envelope (decode time)
        └── RejectedUpdate     a valid envelope that the aggregator refuses (policy)

Every ``Rejection`` carries a machine-readable ``reason`` (a ``Reason`` member) and a
human-readable ``detail``.  Third-party exceptions never travel above ``transport/``.
"""

from __future__ import annotations

import enum

__all__ = [
    "BrokerUnavailable",
    "ClosedResourceError",
    "ConfigError",
    "DataError",
    "FedmqError",
    "ModelMismatch",
    "PayloadTooLarge",
    "Reason",
    "RejectedUpdate",
    "Rejection",
    "TransportError",
    "WireError",
]


class Reason(enum.StrEnum):
    """Why a message from the network was refused. The values are stable API."""

    # decode time: the bytes are not a valid envelope
    UNDECODABLE = "undecodable"  # not msgpack, or trailing bytes
    UNKNOWN_SCHEMA = "unknown_schema"
    MISSING_FIELD = "missing_field"
    EXTRA_FIELD = "extra_field"
    WRONG_TYPE = "wrong_type"
    TENSOR_MISMATCH = "tensor_mismatch"  # name, shape or dtype differs from the model
    UNKNOWN_CODEC = "unknown_codec"
    NON_FINITE = "non_finite"  # NaN or Inf
    TOO_LARGE = "too_large"  # message or tensor over the configured size limit
    SIZE_MISMATCH = "size_mismatch"  # declared size disagrees with the actual payload
    BAD_PARTICIPANT = "bad_participant"  # the id breaks the rule (fedmq.wire, docs/wire-format.md)
    # policy: a well-formed update refused by the aggregator
    DUPLICATE = "duplicate"  # (participant, seq) already applied
    TOO_STALE = "too_stale"
    FUTURE_BASE = "future_base"  # base version newer than the aggregator's model
    UNKNOWN_PARTICIPANT = "unknown_participant"
    PARTICIPANT_MISMATCH = "participant_mismatch"  # envelope id is not the sender / key owner
    NORM_BOUND = "norm_bound"  # L2 norm above the absolute cap or the recent-median bound
    CLIP_BOUND = "clip_bound"  # L2 norm above the clip norm, with clip_mode "reject"
    PARTICIPATION = "participation"  # client-level DP: twice in one server step, or within min_gap
    EXAMPLES_BOUND = "examples_bound"  # num_examples above max_num_examples
    NON_FINITE_MODEL = "non_finite_model"  # applying it would make the model NaN or Inf
    BAD_SIGNATURE = "bad_signature"  # does not verify (tampered, wrong key, malformed sig)
    UNSIGNED = "unsigned"  # keys are configured, and the message is not signed
    UNKNOWN_KEY = "unknown_key"  # signed by a key id the registry does not hold
    # control commands (fedmq ctl): refused before anything is applied
    UNAUTHENTICATED = "unauthenticated"  # no operator key nor trusted publisher configured
    REPLAYED = "replayed"  # a signed command outside the time window, or not newer
    RATE_LIMITED = "rate_limited"  # over the aggregator's command rate


class FedmqError(Exception):
    """Base class of every error fedmq raises on purpose."""


class ConfigError(FedmqError, ValueError):
    """Invalid configuration. The message names the field and the allowed values."""


class DataError(FedmqError):
    """Dataset files are missing, truncated, or fail their checksum."""


class ClosedResourceError(FedmqError, RuntimeError):
    """A long-lived resource was used after it was closed, or entered twice."""


class ModelMismatch(FedmqError):
    """The first model a device received is not its own model: it cannot take part.

    The message is one line naming the tensors that differ."""


class TransportError(FedmqError):
    """A broker operation failed; the message says which broker and what."""


class BrokerUnavailable(TransportError):
    """The broker cannot be reached right now. Callers retry with backoff."""


class PayloadTooLarge(TransportError):
    """A message is larger than the broker accepts; it was not sent (fedmq never chunks)."""


class Rejection(FedmqError):
    """Bad input from the network, refused with a machine-readable reason."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class WireError(Rejection):
    """The bytes are not a valid fedmq envelope."""


class RejectedUpdate(Rejection):
    """A well-formed update that the aggregator refuses (duplicate, too stale, ...)."""

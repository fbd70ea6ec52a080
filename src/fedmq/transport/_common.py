"""Small pieces every transport shares: lifecycle, size limit, names, the logger."""

from __future__ import annotations

import enum
import logging

from fedmq.errors import ClosedResourceError, PayloadTooLarge

# Ids become MQTT topic levels, client ids, queue names and AMQP headers: the wire's rule.
from fedmq.wire import EVAL_LIMITS, check_participant_id

__all__ = [
    "EVAL_MAX_BYTES",
    "LOG",
    "REJECTED_BODY_MAX",
    "Lifecycle",
    "check_eval_size",
    "check_participant_id",
    "check_size",
    "redact_url",
    "rejected_excerpt",
]

LOG = logging.getLogger("fedmq.transport")

# Bytes of a refused message kept in its rejection record: enough for the envelope's
# fields (who, which seq, which codec) and the first tensors; a flood of large refused
# messages must not become a flood of large records (the original size is a header).
REJECTED_BODY_MAX = 64 * 1024
# The largest evaluation report a participant sends or an aggregator takes: the wire's
# bound on a ``fedmq.eval/1`` message (a legal one, signed, is under 1.5 KiB).
EVAL_MAX_BYTES = EVAL_LIMITS.max_message_bytes


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class Lifecycle:
    """new -> open -> closed, once (httpx's client state): a closed transport stays closed."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._state = _State.NEW

    @property
    def is_open(self) -> bool:
        return self._state is _State.OPEN

    @property
    def is_closed(self) -> bool:
        return self._state is _State.CLOSED

    def enter(self) -> None:
        if self._state is _State.OPEN:
            raise ClosedResourceError(f"{self._what} is already open; it cannot be entered twice")
        if self._state is _State.CLOSED:
            raise ClosedResourceError(f"{self._what} was closed; create a new one to reconnect")
        self._state = _State.OPEN

    def close(self) -> None:
        self._state = _State.CLOSED

    def check_open(self) -> None:
        if self._state is _State.NEW:
            raise ClosedResourceError(f"{self._what} is not open; use it as `async with`")
        if self._state is _State.CLOSED:
            raise ClosedResourceError(f"{self._what} is closed")


def check_size(body: bytes, limit: int, what: str, setting: str = "max_message_bytes") -> None:
    """Refuse (never chunk) a message over ``limit`` bytes, before anything is sent;
    ``setting`` names where the limit comes from, for the error message."""
    if len(body) > limit:
        raise PayloadTooLarge(
            f"{what} of {len(body)} bytes exceeds {setting}={limit}; "
            "fedmq refuses rather than chunks (see docs/transports.md)"
        )


def check_eval_size(body: bytes) -> None:
    """Refuse an evaluation report over ``EVAL_MAX_BYTES`` before anything is sent."""
    check_size(body, EVAL_MAX_BYTES, "eval report", "fedmq.wire.EVAL_LIMITS.max_message_bytes")


def rejected_excerpt(body: bytes) -> bytes:
    """What a rejection record keeps of a refused body: at most ``REJECTED_BODY_MAX`` bytes."""
    return body[:REJECTED_BODY_MAX]


def redact_url(url: str) -> str:
    """The URL without its password, fit for logs, reports and error messages.

    Done on the text, not by a URL parser: a password holding an unescaped ``#``, ``/``
    or ``?`` would otherwise land partly in the path or the fragment, and a bad port
    would raise. Everything between the user name and the last ``@`` goes, so an odd
    URL loses more than its password, never less.
    """
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    user, colon, _ = rest[: max(at, 0)].partition(":")
    if not sep or not colon:
        return url
    return f"{scheme}://{user}:***@{rest[at + 1 :]}"

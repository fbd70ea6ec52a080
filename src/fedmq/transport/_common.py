"""Small pieces every transport shares: lifecycle, size limit, names, the logger."""

from __future__ import annotations

import enum
import logging
from urllib.parse import urlsplit, urlunsplit

from fedmq.errors import ClosedResourceError, ConfigError, PayloadTooLarge

__all__ = [
    "LOG",
    "REJECTED_BODY_MAX",
    "Lifecycle",
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


def check_size(body: bytes, limit: int, what: str) -> None:
    """Refuse (never chunk) a message over ``limit`` bytes, before anything is sent."""
    if len(body) > limit:
        raise PayloadTooLarge(
            f"{what} of {len(body)} bytes exceeds max_message_bytes={limit}; "
            "fedmq refuses rather than chunks (see docs/transports.md)"
        )


def rejected_excerpt(body: bytes) -> bytes:
    """What a rejection record keeps of a refused body: at most ``REJECTED_BODY_MAX`` bytes."""
    return body[:REJECTED_BODY_MAX]


def check_participant_id(participant_id: str) -> str:
    """Participant ids become MQTT topic levels, client ids and AMQP headers: keep them plain."""
    if not participant_id or not all(c.isalnum() or c in "-_" for c in participant_id):
        raise ConfigError(f"participant_id: {participant_id!r} must be non-empty [A-Za-z0-9_-]")
    return participant_id


def redact_url(url: str) -> str:
    """The URL without its password, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))

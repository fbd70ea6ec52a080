"""The participant id rule: one rule for the wire, the configuration and the brokers.

An id is the ``participant`` field of an update, the broker user of the device, the last
level of its MQTT topic, the suffix of its MQTT client id and of RabbitMQ queue names,
the owner part of its signing key id and a folder name on disk. So it is plain ASCII:
``.`` would split an AMQP routing key or a key id, ``/`` ``+`` ``#`` an MQTT topic, and
a non-ASCII letter would look like another id in a log.
"""

from __future__ import annotations

import re

from fedmq.errors import ConfigError

__all__ = [
    "MAX_PARTICIPANT_ID",
    "PARTICIPANT_ID_PATTERN",
    "PARTICIPANT_ID_RULE",
    "check_participant_id",
    "is_participant_id",
]

MAX_PARTICIPANT_ID = 64
PARTICIPANT_ID_PATTERN = rf"[A-Za-z0-9_-]{{1,{MAX_PARTICIPANT_ID}}}"
PARTICIPANT_ID_RULE = f"1-{MAX_PARTICIPANT_ID} characters of [A-Za-z0-9_-]"
_ID = re.compile(PARTICIPANT_ID_PATTERN)


def is_participant_id(value: object) -> bool:
    """Whether ``value`` is a str following the rule (ASCII letters, digits, ``_``, ``-``)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def check_participant_id(value: str, field: str = "participant_id") -> str:
    """``value`` if it is a participant id, else ``ConfigError`` naming ``field``."""
    if not is_participant_id(value):
        raise ConfigError(f"{field}: {value!r} must be {PARTICIPANT_ID_RULE}, e.g. dev-01")
    return value

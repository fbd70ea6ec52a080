"""The operator's control command ``fedmq.control/1`` (``fedmq ctl`` -> aggregator).

    {"schema": "fedmq.control/1", "id": str, "command": "set" | "reset" | "forget",
     "values": {name: uint | float64 | str, ...}, "issued": float64}

``set`` changes the named strategy settings of a running aggregator (the aggregator
decides which names and values it accepts); ``reset`` returns to the settings it was
started with (``values`` is then empty); ``forget`` drops one participant's sequence
number (``values`` is exactly ``{"participant": id}``), so its next update is taken
whatever its ``seq``. ``id`` is the operator's, echoed in the aggregator's log;
``issued`` is unix seconds. Decoding is as strict as for updates.

Only an authenticated operator's commands are applied: the aggregator decides
(aggregator/_control.py); a signed command is this envelope wrapped in
``fedmq.signed/1`` by an operator key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

import msgpack

from fedmq.errors import Reason, WireError
from fedmq.wire._decode import _envelope, _fail, _float, _map, _short, _str
from fedmq.wire._envelope import WireLimits

__all__ = [
    "CONTROL_COMMANDS",
    "CONTROL_LIMITS",
    "SCHEMA_CONTROL",
    "ControlCommand",
    "ControlEnvelope",
    "ControlValue",
    "decode_control",
    "encode_control",
]

SCHEMA_CONTROL = "fedmq.control/1"
ControlCommand = Literal["set", "reset", "forget"]
CONTROL_COMMANDS: tuple[ControlCommand, ...] = get_args(ControlCommand)
ControlValue = int | float | str
_FIELDS = ("schema", "id", "command", "values", "issued")
_MAX_ID_BYTES = 64
_MAX_VALUE_BYTES = 64
_MAX_PARTICIPANT_BYTES = 128  # as an update's participant id (WireLimits)
# A command is a few dozen bytes; anything near this is not one.
CONTROL_LIMITS = WireLimits(max_message_bytes=64 * 1024)


@dataclass(frozen=True, kw_only=True)
class ControlEnvelope:
    """One operator command."""

    id: str
    command: ControlCommand
    values: Mapping[str, ControlValue] = field(default_factory=dict)
    issued: float = 0.0


def _check_value(name: str, value: object) -> ControlValue:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        _fail(Reason.WRONG_TYPE, f"values.{name}: {_short(value)} is not a uint, float or str")
    if isinstance(value, int) and value < 0:
        _fail(Reason.WRONG_TYPE, f"values.{name}: {value} is negative")
    if isinstance(value, float) and not math.isfinite(value):
        _fail(Reason.NON_FINITE, f"values.{name}: {value}")
    if isinstance(value, str):
        limit = _MAX_PARTICIPANT_BYTES if name == "participant" else _MAX_VALUE_BYTES
        return _str(value, f"values.{name}", limit)
    return value


def _check_command(command: str, values: Mapping[str, ControlValue]) -> ControlCommand:
    """``command`` if it is one and ``values`` fit it; WireError otherwise."""
    if command == "set":
        if not values:
            _fail(Reason.MISSING_FIELD, "values: set needs at least one")
        return "set"
    if command == "reset":
        if values:
            _fail(Reason.EXTRA_FIELD, "values: reset takes none")
        return "reset"
    if command == "forget":
        extra = sorted(set(values) - {"participant"})
        if extra:
            _fail(Reason.EXTRA_FIELD, f"values: forget takes only participant, not {extra}")
        participant = values.get("participant")
        if not isinstance(participant, str) or not participant:
            _fail(Reason.MISSING_FIELD, "values: forget needs participant, a non-empty str")
        return "forget"
    _fail(Reason.WRONG_TYPE, f"command: {_short(command)} is not one of set, reset, forget")


def encode_control(env: ControlEnvelope) -> bytes:
    """Serialize a control command; ``ValueError`` for one no aggregator would accept."""
    try:
        checked = {name: _check_value(name, v) for name, v in sorted(env.values.items())}
        _check_command(env.command, checked)
        _str(env.id, "id", _MAX_ID_BYTES)
        issued = _float(env.issued, "issued")
    except WireError as error:
        raise ValueError(str(error)) from None
    packed = msgpack.packb(
        {
            "schema": SCHEMA_CONTROL,
            "id": env.id,
            "command": env.command,
            "values": checked,
            "issued": float(issued),
        },
        use_bin_type=True,
        use_single_float=False,
    )
    assert isinstance(packed, bytes)
    return packed


def decode_control(data: bytes, *, limits: WireLimits = CONTROL_LIMITS) -> ControlEnvelope:
    """Parse a control command strictly; ``WireError`` and nothing else, for any bytes."""
    fields = _envelope(data, SCHEMA_CONTROL, _FIELDS, limits)
    command_id = _str(fields["id"], "id", _MAX_ID_BYTES)
    command = _str(fields["command"], "command", _MAX_VALUE_BYTES)
    values = _map(fields["values"], "values")
    checked = {
        _str(name, "values", _MAX_VALUE_BYTES): _check_value(name, v) for name, v in values.items()
    }
    return ControlEnvelope(
        id=command_id,
        command=_check_command(command, checked),
        values=checked,
        issued=_float(fields["issued"], "issued"),
    )

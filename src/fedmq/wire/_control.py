"""The operator's control command ``fedmq.control/1`` (``fedmq ctl`` -> aggregator).

    {"schema": "fedmq.control/1", "id": str, "command": "set" | "reset",
     "values": {name: uint | float64 | str, ...}, "issued": float64}

``set`` changes the named strategy settings of a running aggregator (the aggregator
decides which names and values it accepts); ``reset`` returns to the settings it was
started with (``values`` is then empty). ``id`` is the operator's, echoed in the
aggregator's log; ``issued`` is unix seconds. Decoding is as strict as for updates.
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
ControlCommand = Literal["set", "reset"]
CONTROL_COMMANDS: tuple[ControlCommand, ...] = get_args(ControlCommand)
ControlValue = int | float | str
_FIELDS = ("schema", "id", "command", "values", "issued")
_MAX_ID_BYTES = 64
_MAX_VALUE_BYTES = 64
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
        return _str(value, f"values.{name}", _MAX_VALUE_BYTES)
    return value


def encode_control(env: ControlEnvelope) -> bytes:
    """Serialize a control command; ``ValueError`` for one no aggregator would accept."""
    try:
        checked = {name: _check_value(name, v) for name, v in sorted(env.values.items())}
        if env.command not in CONTROL_COMMANDS:
            _fail(Reason.WRONG_TYPE, f"command: {env.command!r}")
        if env.command == "reset" and checked:
            _fail(Reason.EXTRA_FIELD, "values: reset takes none")
        if env.command == "set" and not checked:
            _fail(Reason.MISSING_FIELD, "values: set needs at least one")
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
    if command not in CONTROL_COMMANDS:
        _fail(Reason.WRONG_TYPE, f"command: {_short(command)} is not one of set, reset")
    values = _map(fields["values"], "values")
    checked = {
        _str(name, "values", _MAX_VALUE_BYTES): _check_value(name, v) for name, v in values.items()
    }
    if command == "reset" and checked:
        _fail(Reason.EXTRA_FIELD, "values: reset takes none")
    if command == "set" and not checked:
        _fail(Reason.MISSING_FIELD, "values: set needs at least one")
    return ControlEnvelope(
        id=command_id,
        command="set" if command == "set" else "reset",
        values=checked,
        issued=_float(fields["issued"], "issued"),
    )

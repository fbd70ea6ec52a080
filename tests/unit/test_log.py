"""Log lines: one event, one line, whatever the network put in its fields."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from fedmq._log import _JsonFormatter, _TextFormatter

FORGED = "x\n12:00:00 info    fedmq.aggregator accepted participant=victim"


def _record(event: str, fields: dict[str, object], *, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad\n12:00:00 info    fedmq.aggregator forged")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord(
        "fedmq.aggregator", logging.WARNING, __file__, 1, event, (), exc_info
    )
    record.fedmq_fields = fields
    return record


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (FORGED, "x\\n12:00:00 info    fedmq.aggregator accepted participant=victim"),
        ("a\r\nb", "a\\r\\nb"),
        ("\x1b[2Jred", "\\x1b[2Jred"),  # a terminal escape sequence
        ("tab\there", "tab\\there"),
        ("line\u2028sep\u0085nel", "line\\u2028sep\\x85nel"),  # what str.splitlines() splits
        ("\u202eevil", "\\u202eevil"),  # right-to-left override
        ("dev-01 é ü", "dev-01 é ü"),  # printable text is left alone
    ],
)
def test_text_escapes_each_non_printable_character(value: str, shown: str) -> None:
    line = _TextFormatter().format(
        _record("rejected", {"participant": value, "reason": "undecodable"})
    )
    assert line.splitlines() == [line]
    assert line.endswith(f" fedmq.aggregator rejected participant={shown} reason=undecodable")


def test_text_escapes_the_message_and_the_keys_too() -> None:
    line = _TextFormatter().format(_record("connected\nto", {"a\nb": 1}))
    assert line.splitlines() == [line]
    assert line.endswith("connected\\nto a\\nb=1")


def test_text_traceback_lines_are_indented_under_their_event() -> None:
    lines = _TextFormatter().format(_record("crashed", {"participant": "p"}, exc=True)).splitlines()
    assert lines[0].endswith("crashed participant=p")
    assert len(lines) > 2
    assert all(line.startswith("  ") for line in lines[1:])
    # The exception's message is multi-line; its second line is indented all the same.
    assert lines[-2:] == ["  ValueError: bad", "  12:00:00 info    fedmq.aggregator forged"]


def test_json_is_one_line_holding_the_value_unchanged() -> None:
    record = _record("rejected" + FORGED, {"participant": FORGED + "\x1b\u2028"}, exc=True)
    line = _JsonFormatter().format(record)
    assert line.splitlines() == [line]
    doc = json.loads(line)
    assert doc["participant"] == FORGED + "\x1b\u2028"
    assert doc["event"] == "rejected" + FORGED

"""Structured log events: one line per event, ``event key=value ...`` or JSON.

Both formats carry the same fields, so an operator can grep the text form or
ship the JSON form to a log store. The format is chosen once, in the CLI.

Field values often come from the network (a header, a topic level, an id), so no value
can forge a line: the text form escapes each non-printable character of the message, keys
and values as ``repr`` does (a newline as ``\\n``, ESC as ``\\x1b``), and indents the lines
of a traceback under their event; the JSON form is escaped by ``json.dumps``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["configure_logging", "log_event"]


def log_event(
    logger: logging.Logger,
    event: str,
    /,
    level: int = logging.INFO,
    *,
    exc_info: bool = False,
    **fields: Any,
) -> None:
    """Log ``event`` with its fields; the formatter renders them as text or JSON.

    ``exc_info``: add the traceback of the exception being handled."""
    logger.log(level, event, exc_info=exc_info, extra={"fedmq_fields": fields})


def _one_line(value: object) -> str:
    """``str(value)`` with each non-printable character (newline, ESC, U+2028...) escaped."""
    text = str(value)
    if text.isprintable():  # the common case, at C speed
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fedmq_fields", {})
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        text = " ".join(f"{_one_line(k)}={_one_line(v)}" for k, v in fields.items())
        event = _one_line(record.getMessage())
        line = f"{stamp} {record.levelname.lower():<7} {record.name} {event} {text}"
        if record.exc_info:
            # Indented, so no line of it (the exception's message included) reads as an event.
            trace = self.formatException(record.exc_info).splitlines()
            line += "".join(f"\n  {_one_line(part)}" for part in trace)
        return line.rstrip()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            **getattr(record, "fedmq_fields", {}),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(*, level: str = "info", json_format: bool = False) -> None:
    """Send fedmq's log lines to stderr in the chosen format (called once, by the CLI)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if json_format else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aio-pika / aiormq are chatty at INFO about every reconnect attempt; ours say it once.
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.WARNING)

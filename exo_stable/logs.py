"""Log setup: plain text lines or JSON lines, each tagged with the request it belongs to.

The API sets :data:`REQUEST_ID` (a context variable) when it admits a request; every log call made while
that request runs, in its handler's task and in what it awaits (the service, the pipeline owner), carries
the id. A JSON line holds ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, ``request_id`` when
one applies, and ``exc`` with the traceback when there is one.

Peers and clients choose some of what is logged (node ids, reasons, request fields): a text line escapes
every control character of its message (a newline becomes ``\\n``), so nobody can forge a log line, and
:func:`safe` bounds such a string's length where it is interpolated.
"""

from __future__ import annotations

import enum
import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import orjson

from exo_stable import settings

ENV_LOG_FORMAT: Final = settings.LOG_FORMAT.name

REQUEST_ID: ContextVar[str | None] = ContextVar("exo_stable_request_id", default=None)
"""The id of the API request the current task works for (the response's ``id``), or None."""

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or (
        f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    )


def escape(text: str) -> str:
    """``text`` with every control character (newlines included) written as an escape: one log line."""
    return _CONTROL.sub(_escape_char, text)


def safe(value: object, limit: int = 200) -> str:
    """A peer- or client-supplied value for a log line: escaped, and cut to ``limit`` characters."""
    text = escape(str(value))
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


class EscapingFormatter(logging.Formatter):
    """The text format: the message's control characters are escaped; a traceback keeps its lines, each
    marked with ``| `` (an exception's text may hold a peer's string: it cannot pass for a log line)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return _continuation(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _continuation(super().formatStack(stack_info))


def _continuation(text: str) -> str:
    return "\n".join(f"| {escape(line)}" for line in text.splitlines())


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


def default_format() -> LogFormat:
    """From ``EXO_STABLE_LOG_FORMAT`` (text when unset); a bad value is refused, not ignored."""
    raw = settings.LOG_FORMAT.get().strip().lower()
    try:
        return LogFormat(raw) if raw else LogFormat.TEXT
    except ValueError:
        raise ValueError(f"{ENV_LOG_FORMAT}={raw!r}: expected one of {', '.join(f.value for f in LogFormat)}") from None


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring for the keys)."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            body["request_id"] = request_id
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            body["exc"] = record.exc_text
        if record.stack_info:
            body["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(body, default=str).decode()


def configure(level: str, fmt: LogFormat | str, stream: TextIO | None = None) -> logging.Handler:
    """Replace the root logger's handlers with one writing ``fmt`` lines to ``stream`` (stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if LogFormat(fmt) is LogFormat.JSON else EscapingFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler

"""Log setup: plain text lines or JSON lines, each tagged with the request it belongs to.

The API sets :data:`REQUEST_ID` (a context variable) when it admits a request; every log call made while
that request runs, in its handler's task and in what it awaits (the service, the pipeline owner), carries
the id. A JSON line holds ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, ``request_id`` when
one applies, and ``exc`` with the traceback when there is one.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Final, TextIO

import orjson

ENV_LOG_FORMAT: Final = "EXO_STABLE_LOG_FORMAT"

REQUEST_ID: ContextVar[str | None] = ContextVar("exo_stable_request_id", default=None)
"""The id of the API request the current task works for (the response's ``id``), or None."""

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


def default_format() -> LogFormat:
    """From ``EXO_STABLE_LOG_FORMAT`` (text when unset); a bad value is refused, not ignored."""
    raw = os.environ.get(ENV_LOG_FORMAT, "").strip().lower()
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
    handler.setFormatter(JsonFormatter() if LogFormat(fmt) is LogFormat.JSON else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler

"""Log output: plain text (default) or one JSON object a line, and the ids that tie log lines
to what they are about: the HTTP request or the DIMSE association in progress (contextvars,
so each request's and association's task carries its own)."""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import uuid

import orjson

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
association_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "association_id", default=None
)


def new_id() -> str:
    """A fresh id for a request or an association: random, so it carries nothing sent."""
    return uuid.uuid4().hex[:16]


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, process, and the
    request id or association id in force; a traceback as `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for key, var in (("request_id", request_id), ("association_id", association_id)):
            value = var.get()
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def use_format(log_format: str) -> None:
    """Switch the root logger's handlers to `log_format` ("text" or "json")."""
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)

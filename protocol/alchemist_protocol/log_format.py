"""Log lines as JSON objects, one per line, for the worker and the operator alike.

Log collectors (Loki, Elasticsearch, Cloud Logging) parse a JSON line into fields, so a person can look up every
line one request wrote by its `request_id`, or the line that served a response by the `response_id` a piece of
feedback names. Those ids travel in context variables: whatever runs while a request is handled logs them
without passing them around. Plain text stays the default; `ALCHEMIST_LOG_FORMAT=json` (or a `--log-format json`
flag) switches. It lives here, in the package both processes install, because it needs nothing but the stdlib.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
from collections.abc import Iterator, Mapping
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
response_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("response_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and goes into the JSON object.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", "request_id"?, "response_id"?, ...extra, "exception"?}`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, var in (("request_id", request_id_var), ("response_id", response_id_var)):
            value = getattr(record, name, None) or var.get()
            if value:
                entry[name] = value
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in entry and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def log_format_from_env(environ: Mapping[str, str], default: str = "text") -> str:
    """ALCHEMIST_LOG_FORMAT, checked; raises ValueError naming the variable for anything but text or json."""
    value = environ.get("ALCHEMIST_LOG_FORMAT", "").strip().lower() or default
    if value not in LOG_FORMATS:
        raise ValueError(f"ALCHEMIST_LOG_FORMAT={value!r} must be one of {LOG_FORMATS}")
    return value


def formatter_for(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format {log_format!r} must be one of {LOG_FORMATS}")


def configure_logging(log_format: str, level: int | str = logging.INFO) -> None:
    """Every record of the process through one stderr handler in `log_format` (replacing earlier handlers)."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter_for(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


@contextlib.contextmanager
def log_context(*, request_id: str | None = None, response_id: str | None = None) -> Iterator[None]:
    """Tags every line logged inside the block (in this task or thread) with the given ids."""
    tokens = []
    if request_id is not None:
        tokens.append((request_id_var, request_id_var.set(request_id)))
    if response_id is not None:
        tokens.append((response_id_var, response_id_var.set(response_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)

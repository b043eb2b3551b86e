"""Logging for `jwtauth serve`: text or JSON lines, each with the request id; query strings kept out.

Audit events are INFO records of the `jwtauth.audit` logger whose `event` and fields come as `extra`
(service.audit), so that in JSON each field is a key of its own.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]
REQUEST_ID: ContextVar[str] = ContextVar("jwtauth_request_id", default="-")  # set by web.Envelope
# Record attributes that are not an event's fields (color_message: uvicorn's copy of the message; event:
# written as a key of its own).
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "color_message",
    "event",
}


class RequestIdFilter(logging.Filter):
    """Stamp every record with the id of the request it was logged in (`-` outside of one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class AccessLogFilter(logging.Filter):
    """Drop the query string from uvicorn's access lines: a client may put a token there (RFC 6750 §2.3)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, version, status = record.args
            record.args = (client, method, str(path).partition("?")[0], version, status)
        return True


class TextFormatter(logging.Formatter):
    """The standard formatter, with the date and time of the last second formatted kept: time.strftime costs
    more than the rest of a line, and a busy server writes many lines a second."""

    _second: tuple[int, str] = (-1, "")  # a second and its text, replaced as one: threads share a formatter

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        second = self._second
        if second[0] != (now := math.floor(record.created)):  # the second that time.localtime reads
            second = self._second = (now, time.strftime(self.default_time_format, self.converter(record.created)))
        return f"{second[1]},{int(record.msecs):03d}"  # as default_msec_format writes it


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, event, request_id, message, and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", record.name),
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        entry.update({key: value for key, value in vars(record).items() if key not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def skip_unused_record_fields() -> None:
    """Spare every record of this process the fields that neither format writes: the thread, the process and
    the caller's source location, which the logging module otherwise works out for each (the logging HOWTO,
    "Optimization"). For the processes of `jwtauth serve`: a tenth of a refresh's time went to its two lines."""
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # documented there as the way to skip the caller's frame


def logging_config(log_format: LogFormat, level: str = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` for uvicorn and jwtauth, all to stderr."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter}
        if log_format == "json"
        else {"()": TextFormatter, "format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"}
    )
    handler = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "main",
               "filters": ["request_id"]}  # fmt: skip
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "filters": {"request_id": {"()": RequestIdFilter}, "access": {"()": AccessLogFilter}},
        "handlers": {"main": handler, "access": {**handler, "filters": ["request_id", "access"]}},
        "loggers": {
            "uvicorn": {"handlers": ["main"], "level": level, "propagate": False},
            "uvicorn.access": {"handlers": ["access"], "level": level, "propagate": False},
            "jwtauth": {"handlers": ["main"], "level": level, "propagate": False},
        },
    }

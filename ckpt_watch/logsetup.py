"""Logging for the daemon: one line per record on stderr, as text or JSON."""

from __future__ import annotations

import json
import logging
import sys
import time

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")


def utc_time(record: logging.LogRecord) -> str:
    """The record's time as RFC 3339 in UTC, with milliseconds."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-12-04T16:40:00.123Z INFO ckpt_watch.engine: message key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return utc_time(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": utc_time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            # exc_text is what the record was made with, secrets already scrubbed from it.
            line["exc"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(line)


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send every ckpt_watch record (and warnings from libraries) to stderr, unbuffered."""
    handler = logging.StreamHandler(sys.stderr)  # flushes after every record
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("ckpt_watch").setLevel(level.upper())

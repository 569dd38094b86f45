"""The JSON Lines history: one durable line per event, replayed at start-up."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, overload

log = logging.getLogger(__name__)

VERSION = 1
Event = dict[str, Any]


class HistoryError(Exception):
    """Raised when the history file cannot be opened at all."""


def strict(value: Any) -> Any:
    """``value`` with non-finite floats written as the strings NaN, Infinity, -Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value):
            return "NaN"
        return "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, Mapping):
        return {key: strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict(item) for item in value]
    return value


def number(value: Any) -> float | None:
    """Read back a value written by :func:`strict`."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if value in ("NaN", "Infinity", "-Infinity"):
        return float(value.replace("Infinity", "inf"))
    return None


def text(value: Any) -> str | None:
    """Read back a string field; anything else (a hand-edited line) is None."""
    return value if isinstance(value, str) else None


@overload
def integer(value: Any) -> int | None: ...
@overload
def integer(value: Any, default: int) -> int: ...
def integer(value: Any, default: int | None = None) -> int | None:
    """Read back an integer field (never a bool); anything else is ``default``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return default


def timestamp() -> str:
    """Now, as RFC 3339 in UTC with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class History:
    """An append-only JSON Lines file.

    Each event is written as one complete line with a single ``write`` and then fsynced.
    A failed write is cut off again before it is retried, and a line torn by a crash is
    sealed with a newline at start-up, so no event is ever glued to another. When the
    disk is full the append is retried with backoff until ``stop`` is set, logged once.
    """

    def __init__(self, path: Path, *, stop: threading.Event | None = None) -> None:
        self.path = path
        self._stop = stop or threading.Event()
        self._lock = threading.Lock()
        self._unsynced = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise HistoryError(f"cannot open history {path}: {exc.strerror or exc}") from exc
        self._seal_torn_tail()

    def append(self, event: str, *, sync: bool = True, **fields: Any) -> Event:
        """Write one event as one line and return it as written.

        With ``sync=False`` the line is written but its fsync waits for the next synced
        append or :meth:`sync`: a scan of thousands of checkpoints syncs once, not per line.
        """
        record: Event = {"v": VERSION, "ts": timestamp(), "event": event, **strict(fields)}
        line = (json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self._reopen_if_unlinked()
            self._write_durably(line, sync=sync)
        return record

    def sync(self) -> None:
        """Make every line written so far durable."""
        with self._lock:
            if self._unsynced:
                self._write_durably(b"", sync=True)

    def _reopen_if_unlinked(self) -> None:
        """Follow the path when the file there is no longer ours (its root was replaced)."""
        try:
            mine = os.fstat(self._fd)
            try:
                there = os.stat(self.path)
            except FileNotFoundError:
                there = None
            if there is not None and (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                return
            # Only our own directory is made again: a deleted root stays deleted.
            self.path.parent.mkdir(exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            log.warning("cannot reopen history path=%s error=%s", self.path, exc)
            return
        os.close(self._fd)
        self._fd = fd
        log.warning("history file was moved or deleted; writing at path=%s", self.path)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _write_durably(self, line: bytes, *, sync: bool) -> None:
        delay = 0.5
        warned = False
        while True:
            start = os.lseek(self._fd, 0, os.SEEK_END)
            try:
                if line and os.write(self._fd, line) != len(line):
                    raise OSError(errno.ENOSPC, "short write")
                if sync:
                    os.fsync(self._fd)
                self._unsynced = not sync and (self._unsynced or bool(line))
                if warned:
                    log.info("history writable again path=%s", self.path)
                return
            except OSError as exc:
                self._drop_partial(start)
                if not warned:
                    log.error("cannot write history path=%s error=%s; retrying", self.path, exc)
                    warned = True
                if self._stop.wait(delay):
                    raise HistoryError(f"history not written: {exc}") from exc
                delay = min(delay * 2, 30.0)

    def _drop_partial(self, size: int) -> None:
        """Cut a partly written line off again, so the retry cannot be glued to it."""
        try:
            os.ftruncate(self._fd, size)
        except OSError as exc:
            log.warning("cannot cut a partial history line path=%s error=%s", self.path, exc)

    def _seal_torn_tail(self) -> None:
        try:
            size = os.fstat(self._fd).st_size
            if size == 0:
                return
            with open(self.path, "rb") as handle:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    log.warning("history ends in a torn line path=%s; sealing it", self.path)
                    os.write(self._fd, b"\n")
                    os.fsync(self._fd)
        except OSError as exc:
            log.warning("cannot check history tail path=%s error=%s", self.path, exc)


def replay(path: Path, *, on_bad_line: Callable[[int, str], None] | None = None) -> Iterator[Event]:
    """Yield every complete, valid event in ``path``; torn or foreign lines are skipped."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed by the generator's with)
    except FileNotFoundError:
        return
    with handle:
        for number_, raw in enumerate(handle, start=1):
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("event"), str):
                yield record
            elif raw.strip() and on_bad_line is not None:
                on_bad_line(number_, "not a complete JSON event")

"""One daemon per root: an advisory lock in the root's own state directory."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

STATE_DIR = ".ckpt-watch"


class LockedError(Exception):
    """Raised when another daemon already watches the root, or the lock cannot be made."""


class RootLock:
    """``flock`` on ``ROOT/.ckpt-watch/lock``; released when the process ends, even by a crash."""

    def __init__(self, root: Path) -> None:
        self.path = root / STATE_DIR / "lock"
        self._fd = -1

    def __enter__(self) -> RootLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LockedError(f"cannot create lock {self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = -1
            raise LockedError(
                f"another ckpt-watch (pid {holder}) is already watching {self.path.parent.parent}"
            ) from exc
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def watching_daemon(path: Path) -> str | None:
    """A sentence naming the daemon that watches ``path`` or a directory above it, if any.

    One-off commands that delete (``prune``) leave a watched tree to its daemon.
    """
    for directory in (path.absolute(), *path.absolute().parents):
        lock = directory / STATE_DIR / "lock"
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            return f"ckpt-watch (pid {holder}) is watching {directory}"
        finally:
            os.close(fd)
    return None

"""One daemon per root: an advisory lock on the root directory itself."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from ckpt_watch.scan import is_ignored_dir
from ckpt_watch.trainer_state import checkpoint_step

STATE_DIR = ".ckpt-watch"
PID_FILE = "lock"


class LockedError(Exception):
    """Raised when another daemon already watches the root, or the root cannot be locked."""


class RootLock:
    """``flock`` on the root directory, so two daemons are refused whatever their history files.

    Locking the directory needs no file in it, so a read-only root can be watched too; the
    holder's pid goes to ``ROOT/.ckpt-watch/lock`` where that can be written, for messages.
    The kernel drops the lock when the process ends, even by a crash.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fd = -1

    def __enter__(self) -> RootLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.release()

    def acquire(self) -> None:
        """Lock the directory now at the root's path (again, after it was replaced)."""
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise LockedError(f"cannot lock {self.root}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockedError(f"cannot lock {self.root}: {exc.strerror or exc}") from exc
            raise LockedError(
                f"another ckpt-watch (pid {holder(self.root)}) is already watching {self.root}"
            ) from exc
        self.release()
        self._fd = fd
        _write_pid(self.root)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def holder(root: Path) -> str:
    """The pid the lock holder wrote, or "unknown"."""
    try:
        return (root / STATE_DIR / PID_FILE).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def watching_daemon(path: Path) -> str | None:
    """A sentence naming the daemon that watches ``path`` or a directory above it, if any."""
    for directory in (path.absolute(), *path.absolute().parents):
        if _locked(directory):
            return f"ckpt-watch (pid {holder(directory)}) is watching {directory}"
    return None


def daemons_below(root: Path) -> str | None:
    """A sentence naming a daemon that watches a directory inside ``root``, if any.

    Found through the pid files daemons leave in their roots; checkpoints, hidden and
    staging directories are not entered. A read-only root below holds no pid file and is
    not found.
    """
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if entry.name == STATE_DIR and directory != root and _locked(Path(directory)):
                return f"ckpt-watch (pid {holder(Path(directory))}) is watching {directory}"
            if _walkable(entry):
                pending.append(Path(entry.path))
    return None


def _walkable(entry: os.DirEntry[str]) -> bool:
    try:
        plain = entry.is_dir(follow_symlinks=False)
    except OSError:
        return False
    return plain and checkpoint_step(entry.name) is None and not is_ignored_dir(entry.name)


def _locked(directory: Path) -> bool:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _write_pid(root: Path) -> None:
    try:
        (root / STATE_DIR).mkdir(exist_ok=True)
        (root / STATE_DIR / PID_FILE).write_text(f"{os.getpid()}\n")
    except OSError:
        pass  # a read-only root: the lock holds all the same, only messages lack the pid

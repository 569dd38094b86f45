"""Run the daemon for one root: lock, history, engine, watcher, signals, clean stop."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from ckpt_watch.engine import Engine
from ckpt_watch.history import History, HistoryError, replay
from ckpt_watch.lock import STATE_DIR, LockedError, RootLock
from ckpt_watch.ranking import Metric
from ckpt_watch.watch import Daemon, DaemonHooks, WatchSettings

log = logging.getLogger(__name__)


class StartError(Exception):
    """Raised when the daemon cannot start: the root, the lock or the history is unusable."""


@dataclass
class DaemonSettings:
    """Everything ``ckpt-watch start`` needs for one root."""

    root: Path
    metric: Metric
    history: Path | None = None
    watch: WatchSettings | None = None

    @property
    def history_path(self) -> Path:
        return self.history or default_history(self.root)


def default_history(root: Path) -> Path:
    return root / STATE_DIR / "history.jsonl"


def serve(
    settings: DaemonSettings,
    stop: threading.Event | None = None,
    *,
    hooks: DaemonHooks | None = None,
) -> None:
    """Watch until SIGINT/SIGTERM (or ``stop``); raises StartError if it cannot start."""
    root = settings.root
    if not root.is_dir():
        raise StartError(f"{root}: no such directory")
    stop = stop or threading.Event()
    try:
        with RootLock(root):
            history = History(settings.history_path, stop=stop)
            try:
                _run(settings, history, stop, hooks or {})
            finally:
                history.close()
    except (LockedError, HistoryError) as exc:
        raise StartError(str(exc)) from exc


def _run(
    settings: DaemonSettings, history: History, stop: threading.Event, hooks: DaemonHooks
) -> None:
    engine = Engine(settings.root, settings.metric, history)
    engine.load(replay(history.path, on_bad_line=_skipped_line(history.path)))
    daemon = Daemon(engine, settings.watch or WatchSettings(), stop, **hooks)
    restore = _install_signal_handlers(stop, daemon)
    log.info("starting pid=%d root=%s history=%s", os.getpid(), settings.root, history.path)
    try:
        daemon.run()
    finally:
        restore()
        summary = engine.summary()
        try:
            history.append("stopped", pid=os.getpid(), runs=summary.runs)
        except HistoryError as exc:
            log.error("could not record the stop: %s", exc)
        log.info("stopped pid=%d root=%s", os.getpid(), settings.root)


def _skipped_line(path: Path) -> Callable[[int, str], None]:
    def warn(line: int, why: str) -> None:
        log.warning("history line skipped path=%s line=%d reason=%s", path, line, why)

    return warn


def _install_signal_handlers(stop: threading.Event, daemon: Daemon) -> Callable[[], None]:
    """SIGINT and SIGTERM only record the request; the main loop notices and stops."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()
        daemon.queue.wake()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore

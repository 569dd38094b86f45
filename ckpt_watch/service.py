"""Run the daemon for one root: lock, history, engine, watcher, signals, clean stop."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from ckpt_watch.engine import Engine
from ckpt_watch.history import Event, History, HistoryError, replay
from ckpt_watch.keeper import Keeper
from ckpt_watch.lock import STATE_DIR, LockedError, RootLock, daemons_below, watching_daemon
from ckpt_watch.news import AnnouncePolicy
from ckpt_watch.notify import Notifier, undelivered
from ckpt_watch.prune import Pruner, recover_trash
from ckpt_watch.ranking import Metric
from ckpt_watch.retention import RetentionRules
from ckpt_watch.trainer_state import checkpoint_step
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
    notify: list[str] = field(default_factory=list)  # checked apprise URLs
    policy: AnnouncePolicy = field(default_factory=AnnouncePolicy)
    notify_timeout: float = 10.0  # per attempt
    notify_give_up: float = 60.0  # all attempts of one message
    coalesce: float = 10.0  # new bests of one run this close together make one message
    retention: RetentionRules | None = None  # None: never delete anything

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
    if checkpoint_step(root.name) is not None:
        raise StartError(f"{root} is a checkpoint; watch the run that holds it: {root.parent}")
    above = watching_daemon(root.absolute().parent)
    if above:
        raise StartError(f"{above}, which holds {root}")
    below = daemons_below(root)
    if below:
        raise StartError(f"{below}, inside {root}; one daemon per tree")
    stop = stop or threading.Event()
    try:
        with RootLock(root) as lock:
            history = History(settings.history_path, stop=stop)
            try:
                _run(settings, history, stop, lock, hooks or {})
            finally:
                history.close()
    except (LockedError, HistoryError) as exc:
        raise StartError(str(exc)) from exc


def _run(
    settings: DaemonSettings,
    history: History,
    stop: threading.Event,
    lock: RootLock,
    hooks: DaemonHooks,
) -> None:
    engine = Engine(settings.root, settings.metric, history, policy=settings.policy, stop=stop)
    pruner = None
    recover_trash(settings.root, history.append, stop=stop)  # only our own trash names
    if settings.retention is not None:
        pruner = Pruner(history.append, stop=stop)
        engine.keeper = Keeper(settings.root, settings.metric, settings.retention, pruner)
        log.info("retention on: %s", settings.retention.describe())
    events = list(replay(history.path, on_bad_line=_skipped_line(history.path)))
    _check_history_belongs(settings, history.path, events)
    engine.load(events)
    notifier = _start_notifier(settings, history, events)
    del events
    if notifier is not None:
        engine.deliver = notifier.announce
    daemon = Daemon(
        engine, settings.watch or WatchSettings(), stop, on_root_replaced=lock.acquire, **hooks
    )
    restore = _install_signal_handlers(stop, daemon)
    log.info("starting pid=%d root=%s history=%s", os.getpid(), settings.root, history.path)
    try:
        daemon.run()
    finally:
        restore()
        if notifier is not None:
            notifier.close(timeout=5.0)
        if pruner is not None:
            log.info("finishing removals (waiting up to 5s)")
            pruner.close(timeout=5.0)
        summary = engine.summary()
        try:
            if daemon.started:  # a stop during the first scan started nothing to record
                history.append("stopped", pid=os.getpid(), runs=summary.runs)
        except HistoryError as exc:
            log.error("could not record the stop: %s", exc)
        log.info("stopped pid=%d root=%s", os.getpid(), settings.root)


def _check_history_belongs(settings: DaemonSettings, path: Path, events: list[Event]) -> None:
    """Refuse a history kept outside the root that another root's daemon wrote."""
    root = settings.root.resolve()
    if path.resolve().is_relative_to(root):
        return  # it moves with the root, whatever the root was called before
    roots = {e.get("root") for e in events if e.get("event") == "started" and e.get("root")}
    others = sorted(str(r) for r in roots if Path(str(r)).resolve() != root)
    if others:
        raise StartError(
            f"{path} is the history of {others[-1]}; give each root a history of its own"
        )


def _start_notifier(
    settings: DaemonSettings, history: History, events: list[Event]
) -> Notifier | None:
    """The delivery worker, handed at once whatever an earlier run left undelivered."""
    if not settings.notify:
        told = [e for e in events if e.get("event") == "notify_targets"]
        if told and told[-1].get("targets"):
            # Nobody is told what happens from now on: it must not be owed to anyone later.
            history.append("notify_targets", targets=[])
        return None
    notifier = Notifier(
        settings.notify,
        history.append,
        attempt_timeout=settings.notify_timeout,
        give_up_after=settings.notify_give_up,
        coalesce_window=settings.coalesce,
    )
    for announcement, targets in undelivered(events, settings.notify):
        log.info("delivering what the last run left announce=%s", announcement.id)
        notifier.announce(announcement, targets)
    return notifier


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

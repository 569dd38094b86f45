"""Decide when the engine runs: filesystem events or polling, retries, reconcile, stop."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypedDict

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from ckpt_watch.engine import Engine
from ckpt_watch.mounts import filesystem_type, is_network_filesystem
from ckpt_watch.scan import is_ignored_dir
from ckpt_watch.trainer_state import STATE_FILE, checkpoint_step

log = logging.getLogger(__name__)

# Events that say a state file may now be complete. "modified" fires during the write
# and "opened"/"closed_no_write" come from readers (our own reads among them).
_STATE_EVENTS = frozenset({"closed", "created", "moved", "deleted"})
# A directory "modified" event only says that something inside it changed.
_TREE_EVENTS = frozenset({"created", "moved", "deleted"})
_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass
class WatchSettings:
    """When to look: ``poll`` seconds between scans instead of inotify, and a reconcile."""

    poll: float | None = None
    reconcile: float = 300.0
    health_every: float = 5.0


@dataclass
class Work:
    runs: set[Path] = field(default_factory=set)
    trees: set[Path] = field(default_factory=set)


class WorkQueue:
    """Run and subtree paths to look at, coalesced; filled by the observer thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._work = Work()
        self._woken = False

    def add(self, kind: str, path: Path) -> None:
        with self._cond:
            (self._work.runs if kind == "run" else self._work.trees).add(path)
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify()

    def take(self, timeout: float) -> Work:
        """Wait up to ``timeout`` for work (or a wake-up) and return all of it."""
        with self._cond:
            if not (self._work.runs or self._work.trees or self._woken):
                self._cond.wait(max(timeout, 0.0))
            work, self._work, self._woken = self._work, Work(), False
            return work


def route(root: Path, path: str, *, is_directory: bool, kind: str) -> tuple[str, Path] | None:
    """What an event at ``path`` asks for: a run to refresh, a subtree to scan, or nothing."""
    try:
        parts = Path(path).relative_to(root).parts
    except ValueError:
        return None
    if any(is_ignored_dir(part) for part in parts):
        # Hidden and staging names: our own files, trash, tmp-checkpoint-N before its rename.
        # A rename away from a checkpoint name is seen through its source path.
        return None
    for index, part in enumerate(parts):
        if checkpoint_step(part) is None:
            continue
        run = root.joinpath(*parts[:index])
        depth = len(parts) - index
        if depth == 1 and is_directory and kind in _TREE_EVENTS:
            return ("run", run)
        if depth == 2 and parts[-1] == STATE_FILE and kind in _STATE_EVENTS:
            return ("run", run)
        return None  # inside a checkpoint: weights, optimizer, DeepSpeed shards
    if is_directory and kind in _TREE_EVENTS:
        return ("tree", root.joinpath(*parts))
    return None


class EventRouter(FileSystemEventHandler):
    """Runs on the observer thread: only filters events and queues work. Never raises."""

    def __init__(self, root: Path, queue: WorkQueue, *, watched: Path | None = None) -> None:
        self.root = root
        self.watched = watched or root
        self.queue = queue
        self.events_lost = threading.Event()

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._route(event)
        except Exception:  # an exception here would silently kill watchdog's thread
            log.exception("cannot route filesystem event path=%s", event.src_path)

    def _route(self, event: FileSystemEvent) -> None:
        if event.event_type == "events_lost":
            log.warning("filesystem events were lost; rescanning root=%s", self.root)
            self.queue.add("tree", self.root)
            return
        paths = [event.src_path]
        if event.event_type == "moved":
            paths.append(event.dest_path)
        for raw in paths:
            text = os.fsdecode(raw)
            target = route(
                self.watched, text, is_directory=event.is_directory, kind=event.event_type
            )
            if target is not None:
                kind, path = target
                self.queue.add(kind, self.root / path.relative_to(self.watched))


class DaemonHooks(TypedDict, total=False):
    """Callbacks for whoever runs the Daemon: ``next_tick`` is when ``on_tick`` wants to run."""

    on_ready: Callable[[Daemon], None]
    on_tick: Callable[[Daemon], None]
    next_tick: Callable[[], float]


class Daemon:
    """The main loop: owns the observer, hands work to the engine, stops cleanly."""

    def __init__(
        self,
        engine: Engine,
        settings: WatchSettings,
        stop: threading.Event,
        *,
        on_tick: Callable[[Daemon], None] | None = None,
        on_ready: Callable[[Daemon], None] | None = None,
        on_root_replaced: Callable[[], None] | None = None,
        next_tick: Callable[[], float] | None = None,
    ) -> None:
        self.engine = engine
        self.root = engine.root
        self.settings = settings
        self.stop = stop
        self.queue = WorkQueue()
        self.on_tick = on_tick
        self.on_ready = on_ready
        self.on_root_replaced = on_root_replaced
        self.next_tick = next_tick
        self.mode = "poll" if settings.poll else "inotify"
        self._observer: Any = None
        self._root_id: tuple[int, int] | None = None
        self._retries: dict[Path, tuple[float, int]] = {}
        self.started = False  # whether the started record was written

    # ----- lifecycle --------------------------------------------------------------------

    def run(self) -> None:
        """Scan, watch, react until ``stop`` is set, then stop the observer."""
        self._choose_mode()
        self._start_watching()
        pending = self.engine.first_scan()
        if self.stop.is_set():  # asked to stop mid-scan: not ready, not started
            self._stop_watching()
            return
        if pending:
            self._schedule_retry(self.root, 0)
        summary = self.engine.summary()
        self.started = True
        self.engine.history.append(
            "started",
            root=str(self.root.absolute()),
            pid=os.getpid(),
            metric=self.engine.metric.name,
            mode=self.engine.metric.mode,
            watch=self.mode,
            runs=summary.runs,
            checkpoints=summary.checkpoints,
        )
        log.info(
            "watching root=%s pid=%d watch=%s runs=%d checkpoints=%d",
            self.root,
            os.getpid(),
            self.mode,
            summary.runs,
            summary.checkpoints,
        )
        if self.on_ready:
            self.on_ready(self)
        try:
            self._loop()
        finally:
            self._stop_watching()

    def _loop(self) -> None:
        now = time.monotonic()
        interval = self.settings.poll or self.settings.reconcile
        next_scan = now + interval
        next_health = now + self.settings.health_every
        while not self.stop.is_set():
            deadlines = [next_scan, next_health, *(due for due, _ in self._retries.values())]
            if self.next_tick:
                deadlines.append(self.next_tick())
            work = self.queue.take(min(deadlines) - time.monotonic())
            if self.stop.is_set():
                break
            self._do(work)
            self._retry_due()
            now = time.monotonic()
            if now >= next_scan:
                self._guard(self.root, self.engine.reconcile)
                next_scan = now + interval
            if now >= next_health:
                self._check_health()
                self._guard(self.root, self._check_stalls)
                next_health = now + self.settings.health_every
            if self.on_tick:
                self.on_tick(self)

    def _do(self, work: Work) -> None:
        for tree in sorted(work.trees):
            self._guard(tree, partial(self.engine.refresh_tree, tree))
        for run in sorted(work.runs):
            self._guard(run, partial(self.engine.refresh, run))

    def _guard(self, path: Path, action: Callable[[], bool]) -> None:
        """Run one reaction; a failure is logged and retried later, never fatal."""
        try:
            pending = action()
        except Exception:
            if self.stop.is_set():
                return
            log.exception("reaction failed path=%s; will retry", path)
            pending = True
        if pending:
            self._schedule_retry(path, self._retries.get(path, (0.0, -1))[1] + 1)
        else:
            self._retries.pop(path, None)

    def _schedule_retry(self, path: Path, attempt: int) -> None:
        delay = _RETRY_DELAYS[min(attempt, len(_RETRY_DELAYS) - 1)]
        self._retries[path] = (time.monotonic() + delay, attempt)

    def _retry_due(self) -> None:
        now = time.monotonic()
        for path, (due, _) in list(self._retries.items()):
            if due <= now:
                self._guard(path, partial(self.engine.refresh_tree, path))

    # ----- the observer -----------------------------------------------------------------

    def _choose_mode(self) -> None:
        if self.settings.poll:
            log.info("polling every %ss root=%s", self.settings.poll, self.root)
            return
        fstype = filesystem_type(self.root)
        if is_network_filesystem(fstype):
            self.settings.poll = min(self.settings.reconcile, 10.0)
            self.mode = "poll"
            log.warning(
                "root is on %s, where inotify misses other machines' writes; polling every %ss",
                fstype,
                self.settings.poll,
            )

    def _start_watching(self) -> None:
        self._root_id = _identity(self.root)
        if self.mode == "poll":
            return
        observer = Observer()
        watched = self.root.resolve()  # a symlinked root: inotify reports the real paths
        try:
            router = EventRouter(self.root, self.queue, watched=watched)
            observer.schedule(router, str(watched), recursive=True)
            observer.start()
        except OSError as exc:
            self._fall_back_to_polling(exc)
            return
        self._observer = observer

    def _fall_back_to_polling(self, exc: OSError) -> None:
        self.mode = "poll"
        self.settings.poll = min(self.settings.reconcile, 10.0)
        if exc.errno == errno.ENOSPC:
            hint = "raise the sysctl fs.inotify.max_user_watches"
        elif exc.errno == errno.EMFILE:
            hint = "raise the sysctl fs.inotify.max_user_instances"
        else:
            hint = "see the error"
        log.warning(
            "cannot watch with inotify root=%s error=%s (%s); polling every %ss",
            self.root,
            exc.strerror or exc,
            hint,
            self.settings.poll,
        )

    def _stop_watching(self) -> None:
        observer, self._observer = self._observer, None
        if observer is None:
            return
        log.info("stopping observer (waiting up to 5s)")
        observer.stop()
        observer.join(timeout=5.0)

    def _check_health(self) -> None:
        """Re-create a dead watch, and rescan when the root was replaced or remounted."""
        identity = _identity(self.root)
        if identity is None:
            if self._root_id is not None:
                log.warning("root is gone root=%s; waiting for it to return", self.root)
                self._root_id = None
                self._stop_watching()
                self._guard(self.root, self.engine.reconcile)
            return
        replaced = identity != self._root_id
        if not (replaced or not self.observer_alive):
            return
        if replaced and self.on_root_replaced is not None:
            try:
                self.on_root_replaced()
            except Exception as exc:  # another daemon took the new root: it is theirs now
                log.error("stopping: %s", exc)
                self.stop.set()
                return
        reason = "appeared, replaced or remounted" if replaced else "watch stopped"
        log.warning("root %s; watching again and rescanning root=%s", reason, self.root)
        self._stop_watching()
        self._start_watching()
        self._guard(self.root, self.engine.reconcile)

    def _check_stalls(self) -> bool:
        self.engine.check_stalls()
        return False

    @property
    def observer_alive(self) -> bool:
        """Whether watching works: for polling, always; for inotify, the threads live."""
        return self.mode == "poll" or (
            self._observer is not None and _observer_alive(self._observer)
        )


def _observer_alive(observer: Any) -> bool:
    return bool(observer.is_alive()) and all(e.is_alive() for e in observer.emitters)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)

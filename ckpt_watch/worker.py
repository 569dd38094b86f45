"""One root's daemon on a thread of its own, and what the main loop needs to know of it."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ckpt_watch.config import RootConfig
from ckpt_watch.news import AnnouncePolicy
from ckpt_watch.notify import NotifyConfigError, load_targets
from ckpt_watch.retention import RetentionError, RetentionRules
from ckpt_watch.service import DaemonSettings, StartError, serve
from ckpt_watch.tracking import Summary
from ckpt_watch.watch import Daemon, DaemonHooks, WatchSettings

log = logging.getLogger(__name__)

SUMMARY_EVERY = 1.0  # seconds between engine summaries for STATUS=


def daemon_settings(root: RootConfig) -> DaemonSettings:
    """What ``serve`` needs for one root.

    Raises NotifyConfigError for an unusable notification target and RetentionError for
    unusable rules; :func:`check_root` turns these into one line before anything starts.
    """
    rules = None
    if (root.keep, root.keep_top, root.keep_every) != (None, None, None):
        rules = RetentionRules(root.keep, root.keep_top, root.keep_every, strip=root.strip)
    min_delta = "" if root.min_delta is None else str(root.min_delta)
    return DaemonSettings(
        root=root.path,
        metric=root.metric,
        history=root.history,
        watch=WatchSettings(poll=root.poll, reconcile=root.reconcile),
        notify=load_targets(root.notify, root.notify_config, environ={}),
        policy=AnnouncePolicy(
            frozenset(root.announce), min_delta, root.stall_factor, socket.gethostname()
        ),
        coalesce=root.coalesce,
        retention=rules,
    )


def check_root(root: RootConfig) -> str | None:
    """Why this root's settings cannot start a daemon, in one line, or None."""
    try:
        daemon_settings(root)
    except (NotifyConfigError, RetentionError) as exc:
        return str(exc)
    return None


def root_key(root: RootConfig) -> Path:
    """Roots are told apart by their real path: one daemon (and one lock) per directory."""
    return Path(os.path.realpath(root.path))


class Worker:
    """One root's daemon on its own thread, and what the main loop needs to know of it."""

    def __init__(
        self,
        config: RootConfig,
        wake: Callable[[], None],
        *,
        tick_every: float | None = None,
        summaries: bool = False,
    ) -> None:
        self.config = config
        self.stop = threading.Event()
        self.ready = False
        self.error: str | None = None
        self.crashed = False
        self.finished = False
        self.daemon: Daemon | None = None
        self.beat = time.monotonic()
        self.summary: Summary | None = None
        self._summary_at = -math.inf
        self._summary_due = math.inf
        self._counted_at_mark: tuple[int, int] | None = None
        self._wake = wake
        self._tick_every = tick_every
        self._summaries = summaries
        self.thread = threading.Thread(
            target=self._run, name=f"ckpt-watch {config.path}", daemon=True
        )

    def _run(self) -> None:
        hooks: DaemonHooks = {"on_ready": self._on_ready, "on_tick": self._on_tick}
        if self._tick_every or self._summaries:
            hooks["next_tick"] = self._next_tick
        try:
            serve(daemon_settings(self.config), self.stop, hooks=hooks)
        except StartError as exc:
            self.error = str(exc)
        except Exception as exc:
            log.exception("daemon failed root=%s", self.config.path)
            self.error = f"{self.config.path}: daemon failed: {type(exc).__name__}"
            self.crashed = True
        finally:
            self.finished = True
            self._wake()

    def _on_ready(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._on_tick(daemon)
        self.ready = True
        self._wake()

    def _on_tick(self, daemon: Daemon) -> None:
        now = time.monotonic()
        self.beat = now
        if not self._summaries:
            return
        # Every change to the counts is also a history record, so an unchanged history
        # (one stat call) spares counting the whole tree on an idle tick.
        mark = _file_mark(daemon.engine.history.path)
        if mark is not None and mark == self._counted_at_mark:
            return
        if now - self._summary_at < SUMMARY_EVERY:
            self._summary_due = self._summary_at + SUMMARY_EVERY  # count again when allowed
            return
        self._summary_at, self._summary_due = now, math.inf
        self._counted_at_mark = mark
        summary = daemon.engine.summary()
        if summary != self.summary:
            self.summary = summary
            self._wake()

    def _next_tick(self) -> float:
        """When the daemon's loop must come round: for the next ping, or a deferred count."""
        beat_due = self.beat + self._tick_every if self._tick_every else math.inf
        return min(beat_due, self._summary_due)

    def request_stop(self) -> None:
        """Ask the daemon to stop; it records ``stopped`` and its thread ends."""
        self.stop.set()
        if self.daemon is not None:
            self.daemon.queue.wake()

    def problem(self, now: float, silent_limit: float) -> str | None:
        """Why this root is unhealthy, or None; a first scan or a stop is not a problem."""
        if self.stop.is_set():
            return None
        if self.finished:
            return "its daemon ended"
        if self.daemon is None:
            return None
        if not self.daemon.observer_alive:
            return "its watch is down"
        if now - self.beat > silent_limit:
            return f"its loop has been busy for {now - self.beat:.1f}s"
        return None


def _file_mark(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_size)

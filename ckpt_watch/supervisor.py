"""Run one daemon per configured root, each on its own thread, under one main loop.

The main loop owns the signals (SIGTERM/SIGINT stop, SIGHUP reloads the configuration) and
the service manager: READY=1 once every root has done its first scan, STATUS= lines,
WATCHDOG=1 pings only while every root is healthy, EXTEND_TIMEOUT_USEC during a long first
scan, and STOPPING=1 on the way out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from ckpt_watch.config import Config, ConfigError, RootConfig
from ckpt_watch.sdnotify import Notifier, watchdog_interval
from ckpt_watch.service import StartError
from ckpt_watch.worker import Worker, root_key

log = logging.getLogger(__name__)

STOP_WAIT = 30.0  # seconds for every root to record its stop
EXTEND_EVERY = 2.0  # during the first scan, ask for more start-up time this often...
EXTEND_BY = 20.0  # ...this much each time

ConfigLoader = Callable[[], Config]


class Supervisor:
    """The main loop: workers, signals, reloads and the service manager."""

    def __init__(
        self,
        config: Config,
        *,
        reload: ConfigLoader | None = None,
        notifier: Notifier | None = None,
        watchdog: float | None = None,
        on_logging: Callable[[str, str], None] | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier or Notifier(None)
        self.watchdog = watchdog
        self.workers: dict[Path, Worker] = {}
        self.not_running: dict[Path, str] = {}
        self.ready = False
        self._load = reload
        self._on_logging = on_logging
        self._restarts: dict[Path, RootConfig] = {}
        self._stop_requested = False
        self._reload_requested = False
        self._status: str | None = None
        self._withheld: str | None = None
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ----- requests: safe from signal handlers and other threads ------------------------

    def wake(self) -> None:
        """Make the main loop look again (a byte down a pipe: no lock, so signal-safe)."""
        with contextlib.suppress(BlockingIOError):  # a full pipe will wake it anyway
            os.write(self._write_fd, b"\0")

    def request_stop(self) -> None:
        """Stop every root and return from run (what SIGTERM and SIGINT do)."""
        self._stop_requested = True
        self.wake()

    def request_reload(self) -> None:
        """Read the configuration again (what SIGHUP does)."""
        self._reload_requested = True
        self.wake()

    # ----- the loop -----------------------------------------------------------------------

    def run(self, *, signals: bool = True) -> None:
        """Serve until stopped; raises StartError when a root cannot start or its daemon dies."""
        restore = self._install_signals() if signals else (lambda: None)
        try:
            self._serve()
        finally:
            restore()
            os.close(self._read_fd)
            os.close(self._write_fd)

    def _serve(self) -> None:
        started = time.monotonic()
        next_extend = started + EXTEND_EVERY
        next_ping = started
        self.notifier.status(f"scanning {_roots(len(self.config.roots))}")
        for root in self.config.roots:
            self._start(root)
        try:
            while not self._stop_requested:
                if self._reload_requested:
                    self._reload_requested = False
                    self._reload()
                self._reap()
                now = time.monotonic()
                if not self.ready:
                    self._become_ready_if_scanned()
                if not self.ready and now >= next_extend:
                    self.notifier.extend_timeout(EXTEND_BY)
                    next_extend = now + EXTEND_EVERY
                if self.ready and self.watchdog and now >= next_ping:
                    self._ping(now)
                    next_ping = now + self.watchdog
                if self.ready:
                    self._send_status()
                if not self.ready:
                    deadline = next_extend
                else:
                    deadline = next_ping if self.watchdog else math.inf
                self._wait(deadline - time.monotonic())
        finally:
            self._stop_all()

    def _become_ready_if_scanned(self) -> None:
        if not all(worker.ready for worker in self.workers.values()):
            return
        self.ready = True
        self._status = self._status_text()
        self.notifier.ready(self._status)
        log.info("ready pid=%d roots=%d", os.getpid(), len(self.workers))

    def _wait(self, timeout: float) -> None:
        limit = None if math.isinf(timeout) else max(timeout, 0.0)
        readable, _, _ = select.select([self._read_fd], [], [], limit)
        if readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._read_fd, 4096):
                    pass

    # ----- workers --------------------------------------------------------------------------

    def _start(self, root: RootConfig) -> None:
        worker = Worker(
            root,
            self.wake,
            tick_every=self.watchdog,
            summaries=self.notifier.enabled,
        )
        self.workers[root_key(root)] = worker
        self.not_running.pop(root_key(root), None)
        worker.thread.start()

    def _reap(self) -> None:
        """Deal with workers whose thread ended: a failure, a removal or a restart."""
        for key, worker in list(self.workers.items()):
            if not worker.finished:
                continue
            worker.thread.join()
            del self.workers[key]
            if worker.error and (worker.crashed or not self.ready):
                raise StartError(worker.error)
            if worker.error:
                log.error("root not watched until the next reload: %s", worker.error)
                self.not_running[key] = worker.error
                self._status = None
            elif not worker.stop.is_set():
                raise StartError(f"{worker.config.path}: daemon ended on its own")
            restart = self._restarts.pop(key, None)
            if restart is not None:
                self._start(restart)

    def _stop_all(self) -> None:
        workers = list(self.workers.values())
        self.notifier.stopping("stopping")
        for worker in workers:
            worker.request_stop()
        if self.ready:
            log.info("stopping roots=%d (waiting up to %.0fs)", len(workers), STOP_WAIT)
        deadline = time.monotonic() + STOP_WAIT
        for worker in workers:
            worker.thread.join(max(deadline - time.monotonic(), 0.0))
        stuck = [str(worker.config.path) for worker in workers if worker.thread.is_alive()]
        if stuck:
            raise StartError(f"roots did not stop within {STOP_WAIT:.0f}s: {', '.join(stuck)}")

    # ----- reload ---------------------------------------------------------------------------

    def _reload(self) -> None:
        if self._load is None:
            log.warning("reload asked, but there is no configuration to read again")
            return
        if self.ready:
            self.notifier.reloading()
        try:
            config = self._load()
        except ConfigError as exc:
            log.error("reload refused: %s; the running configuration stays", exc)
        else:
            self._apply(config)
        if self.ready:
            self._status = self._status_text()
            self.notifier.ready(self._status)

    def _apply(self, config: Config) -> None:
        """Start added roots, stop removed ones, restart changed ones; leave the rest alone."""
        old, self.config = self.config, config
        if (config.log_level, config.log_format) != (old.log_level, old.log_format):
            log.info("reload: logging level=%s format=%s", config.log_level, config.log_format)
            if self._on_logging:
                self._on_logging(config.log_level, config.log_format)
        wanted = {root_key(root): root for root in config.roots}
        changes = 0
        for key, worker in self.workers.items():
            target = wanted.get(key)
            # A worker already stopping comes back only as a restart still to be done.
            current = self._restarts.get(key) if worker.stop.is_set() else worker.config
            if target == current:
                continue
            if target is None:
                log.info("reload: root removed path=%s", worker.config.path)
                self._restarts.pop(key, None)
            else:
                changed = _changed(current or worker.config, target)
                log.info("reload: root restarts path=%s changed=%s", key, changed)
                self._restarts[key] = target
            worker.request_stop()
            changes += 1
        for key, root in wanted.items():
            if key not in self.workers:
                log.info("reload: root added path=%s", root.path)
                self._start(root)
                changes += 1
        for key in set(self.not_running) - set(wanted):
            del self.not_running[key]
        if not changes and config == old:
            log.info("reload: configuration unchanged")

    # ----- the service manager -------------------------------------------------------------

    def _ping(self, now: float) -> None:
        assert self.watchdog is not None
        problems = [
            f"root {worker.config.path}: {problem}"
            for worker in self.workers.values()
            if (problem := worker.problem(now, 2 * self.watchdog))
        ]
        if problems:
            if self._withheld is None:
                log.warning("watchdog ping withheld: %s", problems[0])
            self._withheld = problems[0]
            self._status = None
            return
        if self._withheld is not None:
            log.info("healthy again; watchdog pings resume")
            self._withheld = None
            self._status = None
        self.notifier.watchdog()

    def _send_status(self) -> None:
        if not self.notifier.enabled:
            return
        text = self._status_text()
        if text != self._status:
            self._status = text
            self.notifier.status(text)

    def _status_text(self) -> str:
        """``watching /srv/models: 3 runs, 12 checkpoints, 3 bests``, and any trouble."""
        workers = list(self.workers.values())
        summaries = [worker.summary for worker in workers if worker.summary is not None]
        runs = sum(summary.runs for summary in summaries)
        checkpoints = sum(summary.checkpoints for summary in summaries)
        bests = sum(summary.bests for summary in summaries)
        where = str(workers[0].config.path) if len(workers) == 1 else _roots(len(workers))
        text = (
            f"watching {where}: {_count(runs, 'run')}, {_count(checkpoints, 'checkpoint')}, "
            f"{_count(bests, 'best')}"
        )
        if self.not_running:
            text += f"; not watching {', '.join(map(str, self.not_running))}"
        if self._withheld:
            text += f"; unhealthy: {self._withheld}"
        return text

    # ----- signals --------------------------------------------------------------------------

    def _install_signals(self) -> Callable[[], None]:
        """Handlers only set a flag; the wake-up byte comes from the interpreter itself."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            if signum == signal.SIGHUP:
                self._reload_requested = True
            else:
                self._stop_requested = True

        sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.signal(sig, on_signal) for sig in sigs}
        old_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)

        def restore() -> None:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore


def serve_many(
    config: Config,
    *,
    reload: ConfigLoader | None = None,
    on_logging: Callable[[str, str], None] | None = None,
) -> None:
    """Watch every root of ``config`` until SIGINT/SIGTERM, talking to systemd when under it.

    SIGHUP calls ``reload`` for a new Config; raises StartError when a root cannot start.
    """
    notifier = Notifier.from_environment()
    try:
        Supervisor(
            config,
            reload=reload,
            notifier=notifier,
            watchdog=watchdog_interval() if notifier.enabled else None,
            on_logging=on_logging,
        ).run()
    finally:
        notifier.close()


def _changed(old: RootConfig, new: RootConfig) -> str:
    names = [f.name for f in dataclasses.fields(RootConfig)]
    changed = [name for name in names if getattr(old, name) != getattr(new, name)]
    return ",".join(changed) or "nothing (it was stopping)"


def _roots(count: int) -> str:
    return _count(count, "root")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"

"""Deliver announcements in the background: per target, retried, recorded, never twice."""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from ckpt_watch.announce import Announcement, body, make_id, title
from ckpt_watch.delivery import Outcome, Target
from ckpt_watch.redact import mask, protect
from ckpt_watch.targets import NotifyConfigError, load_targets

log = logging.getLogger(__name__)

__all__ = [
    "Notifier",
    "NotifyConfigError",
    "Outcome",
    "load_targets",
    "mask",
    "send_test",
    "undelivered",
]

Record = Callable[..., object]


@dataclass(slots=True)
class _Job:
    announcement: Announcement
    title: str
    body: str


@dataclass(slots=True)
class _Held:
    """A new best waiting out the coalesce window in case a newer one of its run follows."""

    announcement: Announcement
    targets: list[Target]
    due: float


_STOP = object()


class Notifier:
    """Delivers announcements on background threads, one worker per target.

    ``record(event, **fields)`` (``History.append``) is called once per attempt with
    ``notified`` or ``notify_failed``, once at start with ``notify_targets``, and with
    ``notify_superseded`` when the coalesce window merges new bests of one run.
    """

    def __init__(
        self,
        urls: list[str],
        record: Record,
        *,
        attempt_timeout: float = 10.0,
        max_attempts: int = 5,
        give_up_after: float = 60.0,
        coalesce_window: float = 10.0,
        backoff: float = 2.0,
    ) -> None:
        protect(urls)
        self._targets = {url: Target(url, timeout=attempt_timeout) for url in dict.fromkeys(urls)}
        self._record_to = record
        self._attempt_timeout = attempt_timeout
        self._max_attempts = max(1, max_attempts)
        self._give_up_after = give_up_after
        self._window = coalesce_window
        self._backoff = backoff
        self._lock = threading.Condition()
        self._held: dict[str, _Held] = {}
        self._notes: list[tuple[str, str]] = []
        self._closing = False
        self._abort = threading.Event()
        self._record_lock = threading.Lock()
        self._silent = False
        self._queues: dict[str, queue.SimpleQueue[Any]] = {
            url: queue.SimpleQueue() for url in self._targets
        }
        self._busy = dict.fromkeys(self._targets, 0)
        self._record("notify_targets", targets=[target.masked for target in self._targets.values()])
        self._threads = [
            threading.Thread(target=self._hold, name="ckpt-watch-coalesce", daemon=True),
            *(
                threading.Thread(
                    target=self._work, args=(target,), name=f"ckpt-watch-notify-{n}", daemon=True
                )
                for n, target in enumerate(self._targets.values(), start=1)
            ),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def targets(self) -> list[str]:
        """The targets, masked, in configured order."""
        return [target.masked for target in self._targets.values()]

    def announce(self, a: Announcement, targets: list[str] | None = None) -> None:
        """Queue ``a`` for ``targets`` (URLs; default all); returns at once."""
        chosen = self._choose(targets)
        if not chosen:
            return
        now = time.monotonic()
        with self._lock:
            if self._closing:
                log.warning("notifier closed; left for the next start announce=%s", a.id)
                return
            held = self._held.get(a.run)
            if a.kind == "new_best" and self._window > 0:
                if held is None:
                    self._held[a.run] = _Held(a, chosen, now + self._window)
                    self._lock.notify_all()
                else:
                    self._notes.append((held.announcement.id, a.id))
                    # The message compares with what people were told, not the superseded one.
                    previous = held.announcement
                    held.announcement = replace(
                        a, previous=previous.previous, previous_value=previous.previous_value
                    )
                    held.targets += [target for target in chosen if target not in held.targets]
                return
            if held is not None:
                self._release(self._held.pop(a.run))
            self._enqueue(a, chosen)

    def close(self, timeout: float) -> None:
        """Deliver what is queued within ``timeout`` seconds, then stop; the rest stays pending.

        What is not delivered by then is either unrecorded or recorded as failed with
        ``retrying`` true, so :func:`undelivered` hands it over again at the next start.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closing:
                return
            self._closing = True
            for run in list(self._held):
                self._release(self._held.pop(run))
            self._lock.notify_all()
            for waiting in self._queues.values():
                waiting.put(_STOP)
            pending = sum(self._busy.values())
        log.info("waiting for notifications pending=%d timeout=%.1fs", pending, timeout)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._abort.set()
        with self._record_lock:
            self._silent = True
        with self._lock:
            left = sum(self._busy.values())
        if left:
            log.warning("notifications left for the next start undelivered=%d", left)
        log.info("notifier stopped")

    def _choose(self, urls: list[str] | None) -> list[Target]:
        if urls is None:
            return list(self._targets.values())
        chosen = []
        for url in dict.fromkeys(urls):
            if url in self._targets:
                chosen.append(self._targets[url])
            else:
                log.warning("not a configured target; skipped target=%s", mask(url))
        return chosen

    def _release(self, held: _Held) -> None:
        self._enqueue(held.announcement, held.targets)

    def _enqueue(self, a: Announcement, targets: list[Target]) -> None:
        job = _Job(a, title(a), body(a))
        for target in targets:
            self._busy[target.url] += 1
            self._queues[target.url].put(job)

    def _hold(self) -> None:
        """Release held new bests when their window ends; record what they replaced."""
        while True:
            with self._lock:
                while (
                    not self._notes and not self._due() and not (self._closing and not self._held)
                ):
                    self._lock.wait(self._next_due())
                for run in self._due():
                    self._release(self._held.pop(run))
                notes, self._notes = self._notes, []
                done = self._closing and not self._held
            for old, new in notes:
                self._record("notify_superseded", announce=old, by=new)
            if done:
                return

    def _due(self) -> list[str]:
        now = time.monotonic()
        return [run for run, held in self._held.items() if held.due <= now]

    def _next_due(self) -> float | None:
        if not self._held:
            return None
        return max(0.0, min(held.due for held in self._held.values()) - time.monotonic())

    def _work(self, target: Target) -> None:
        waiting = self._queues[target.url]
        while not self._abort.is_set():
            job = waiting.get()
            if job is _STOP:
                return
            try:
                self._deliver(target, job)
            except Exception:  # never lose the worker; the history still shows it pending
                log.exception("notification worker error target=%s", target.masked)
            with self._lock:
                self._busy[target.url] -= 1

    def _deliver(self, target: Target, job: _Job) -> None:
        """Attempt until delivered, out of attempts or out of time; record every attempt."""
        ident = job.announcement.id
        give_up_at = time.monotonic() + self._give_up_after
        delay = self._backoff
        for attempt in range(1, self._max_attempts + 1):
            pause = target.spacing - (time.monotonic() - target.last_attempt)
            if pause > 0 and self._abort.wait(pause):
                return
            if self._abort.is_set():
                return
            outcome = target.send(job.title, job.body)
            if outcome.ok:
                log.info("notified target=%s announce=%s attempt=%d", target.masked, ident, attempt)
                self._record("notified", announce=ident, target=target.masked, attempt=attempt)
                return
            wait = outcome.retry_after if outcome.retry_after is not None else delay
            retrying = (
                attempt < self._max_attempts
                and time.monotonic() + wait + self._attempt_timeout <= give_up_at
            )
            self._record(
                "notify_failed",
                announce=ident,
                target=target.masked,
                attempt=attempt,
                retrying=retrying,
                error=outcome.error,
            )
            if not retrying:
                log.error(
                    "notification given up target=%s announce=%s attempts=%d error=%s",
                    target.masked,
                    ident,
                    attempt,
                    outcome.error,
                )
                return
            log.warning(
                "notification failed target=%s announce=%s attempt=%d error=%s retry_in=%.1fs",
                target.masked,
                ident,
                attempt,
                outcome.error,
                wait,
            )
            if self._abort.wait(wait):
                return
            delay *= 2

    def _record(self, event: str, **fields: Any) -> None:
        with self._record_lock:
            if self._silent:
                return
            try:
                self._record_to(event, **fields)
            except Exception as exc:  # the history logs its own trouble; delivery goes on
                log.error("cannot record event=%s error=%s", event, exc)


def undelivered(
    events: Iterable[dict[str, Any]], urls: list[str]
) -> list[tuple[Announcement, list[str]]]:
    """From a replayed history: each announcement still owed, and the ``urls`` that are owed it.

    A target is owed an announcement that was recorded while it was configured, that
    it has not received, and that was not given up for it. Of one run's new bests only
    the latest is still news.
    """
    shown = {url: mask(url) for url in dict.fromkeys(urls)}
    recorded: dict[str, tuple[Announcement, frozenset[str] | None]] = {}
    settled: set[tuple[str, str]] = set()
    latest: dict[str, str] = {}
    addressed: frozenset[str] | None = None
    for event in events:
        name = event.get("event")
        if name == "notify_targets" and isinstance(event.get("targets"), list):
            addressed = frozenset(item for item in event["targets"] if isinstance(item, str))
        elif name == "notified" or (name == "notify_failed" and event.get("retrying") is False):
            ident, target = event.get("announce"), event.get("target")
            if isinstance(ident, str) and isinstance(target, str):
                settled.add((ident, target))
        else:
            a = Announcement.from_event(event)
            if a is None or a.kind == "test" or a.id in recorded:
                continue
            recorded[a.id] = (a, addressed)
            if a.kind == "new_best":
                latest[a.run] = a.id
    owed = []
    for a, to in recorded.values():
        if a.kind == "new_best" and latest[a.run] != a.id:
            continue
        due = [
            url
            for url, masked in shown.items()
            if (to is None or masked in to) and (a.id, masked) not in settled
        ]
        if due:
            owed.append((a, due))
    return owed


def send_test(urls: list[str], *, timeout: float = 10.0) -> list[tuple[str, Outcome]]:
    """Send one test message to each target, once, and return each masked target's outcome."""
    protect(urls)
    host = socket.gethostname()
    a = Announcement(
        id=make_id("test", "-", None, int(time.time())),
        kind="test",
        run="",
        metric="",
        value=None,
        host=host,
    )
    results = []
    for url in urls:
        target = Target(url, timeout=timeout)
        results.append((target.masked, target.send(title(a), body(a))))
    return results

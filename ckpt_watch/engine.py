"""The reaction to a run changing: read, rank, record, and hand new bests on.

Plain code with no threads: the watcher decides when to call it, tests call it directly.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

from ckpt_watch.check import relative_name
from ckpt_watch.history import Event, History, number
from ckpt_watch.keeper import Keeper
from ckpt_watch.news import AnnouncePolicy, Deliver, Herald
from ckpt_watch.ranking import Metric, shares_history
from ckpt_watch.scan import CheckpointDir, find_runs, list_run
from ckpt_watch.tracking import Known, Pending, RunTrack, Summary
from ckpt_watch.trainer_state import (
    Checkpoint,
    StateVanishedError,
    read_checkpoint,
    state_stamp,
)

log = logging.getLogger(__name__)

# A state that still does not parse after this long is a crash mid-save, not a save in
# progress: say so once.
INCOMPLETE_GRACE = 30.0


class Engine:
    """Keeps every run under a root ranked and writes what happens to the history."""

    def __init__(
        self,
        root: Path,
        metric: Metric,
        history: History,
        *,
        policy: AnnouncePolicy | None = None,
        deliver: Deliver | None = None,
        keeper: Keeper | None = None,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.metric = metric
        self.history = history
        self.policy = policy or AnnouncePolicy()
        self.herald = Herald(metric, history, self.policy, deliver)
        self.keeper = keeper
        self.stop = stop
        self.clock = clock
        self.runs: dict[str, RunTrack] = {}
        self.baseline = True
        self.baseline_scan = False

    # ----- start-up -------------------------------------------------------------------

    def load(self, events: Iterable[Event]) -> None:
        """Learn what an earlier daemon recorded, so that nothing is recorded twice.

        A start with a metric that never ran on this root before (the very first start
        among them) takes what is on disk as the baseline instead of as news.
        """
        for event in events:
            kind = event.get("event")
            if kind == "started" and event.get("metric") == self.metric.name:
                self.baseline = False
            elif kind in (
                "checkpoint",
                "new_best",
                "removed",
                "pruned",
                "finished",
                "stalled",
                "nonfinite",
            ):
                try:
                    self._replay(kind, event)
                except (ValueError, TypeError) as exc:
                    log.warning("history event skipped event=%s reason=%s", kind, exc)

    def _replay(self, kind: str, event: Event) -> None:
        run = event.get("run")
        if event.get("metric", self.metric.name) != self.metric.name or not isinstance(run, str):
            return
        name = str(event.get("checkpoint"))
        if kind == "checkpoint":
            known = Known.from_event(event)
            track = self._track(run)
            if known.incarnation != track.incarnation:
                track.begin_incarnation(known.incarnation)
            track.adopt(known)
            if event.get("baseline"):
                # The baseline is what people know already: its best, its ended runs.
                self._raise_reached(track, known.name, known.value)
                track.announced, track.announced_by = track.reached, track.reached_by
                track.stalled_after = track.newest_saved()
                if known.max_steps is not None and known.step >= known.max_steps:
                    track.finished = True
            elif known.value is not None and math.isfinite(known.value):
                track.nonfinite_told = False
            return
        track = self._track(run)
        if kind == "new_best":
            self._raise_reached(track, name, number(event.get("value")))
            if "announce" in event:
                track.announced, track.announced_by = number(event.get("value")), name
        elif kind == "finished":
            track.finished = True
        elif kind == "stalled":
            track.stalled_after = name
        elif kind == "nonfinite":
            track.nonfinite_told = True
        else:
            track.known.pop(name, None)

    def _raise_reached(self, track: RunTrack, name: str, value: float | None) -> None:
        if value is None or not math.isfinite(value):
            return
        if track.reached is None or self.metric.is_better(value, track.reached):
            track.reached, track.reached_by = value, name

    def first_scan(self) -> bool:
        """Bring the records up to date with the tree; True if a state is still pending."""
        self.baseline_scan = True  # retention looks at every run once, changed or not
        try:
            pending = self.reconcile()
        finally:
            self.baseline_scan = False
        if self.baseline:
            # Runs that stopped long before the first start are history, not news.
            for track in self.runs.values():
                track.stalled_after = track.newest_saved()
        self.baseline = False
        return pending

    # ----- reacting -------------------------------------------------------------------

    def reconcile(self) -> bool:
        """Compare the whole tree with what is known; cheap when nothing changed."""
        return self.refresh_tree(self.root)

    def refresh_tree(self, directory: Path) -> bool:
        """Refresh every run at or under ``directory``: new ones, changed ones, gone ones."""
        pending = False
        found = {run.path: run for run in find_runs(directory)} if directory.is_dir() else {}
        if directory == self.root and not found and self._knows_checkpoints():
            # An unmounted or unreachable root looks empty: that is not every run deleted.
            log.warning("no checkpoint under root=%s; removals wait until it is back", self.root)
            return False
        prefix = relative_name(directory, self.root)
        for track in list(self.runs.values()):
            inside = prefix == "." or track.name == prefix or track.name.startswith(prefix + "/")
            if inside and track.path not in found and not self._stopping():
                pending |= self.refresh(track.path)
        for path, run in sorted(found.items()):
            if self._stopping():
                break
            pending |= self._refresh_listed(path, run.checkpoints)
        return pending

    def _knows_checkpoints(self) -> bool:
        return any(track.known for track in self.runs.values())

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def refresh(self, run_path: Path) -> bool:
        """React to a change in one run; True if a state is pending (retry later)."""
        return self._refresh_listed(run_path, list_run(run_path).checkpoints)

    def _refresh_listed(self, run_path: Path, listed: Iterable[CheckpointDir]) -> bool:
        name = relative_name(run_path, self.root)
        track = self.runs.get(name)
        entries = {entry.path.name: entry for entry in listed}
        if track is None:
            if not entries:
                return False
            track = self._track(name)

        gone = sorted(set(track.known) - set(entries), key=lambda n: track.known[n].step)
        for name in gone:
            self._record_removed(track, track.known.pop(name))
        for name in set(track.pending) - set(entries):
            del track.pending[name]

        fresh = [c for c in map(partial(self._read_if_changed, track), entries.values()) if c]
        for checkpoint in sorted(fresh, key=lambda c: c.step):
            self._take(track, checkpoint)
        self.herald.best(track, baseline=self.baseline)
        self.herald.finished(track, baseline=self.baseline)
        if self.keeper is not None and (fresh or gone or self.baseline_scan):
            live, earlier = track.as_checkpoints(self.metric), track.earlier()
            for name in self.keeper.tidy(track.path, live, earlier):
                track.known.pop(name, None)  # recorded as pruned, not as removed
        self.history.sync()
        # A run whose directory is gone stays tracked: if a training starts there again,
        # it is a new incarnation, and the history must say so.
        return self._waiting_on(track)

    def _waiting_on(self, track: RunTrack) -> bool:
        """Whether a state may still complete by itself: worth a timed retry.

        Past the grace period only an event or a reconcile looks at it again.
        """
        now = self.clock()
        return any(now - p.first_seen < INCOMPLETE_GRACE for p in track.pending.values())

    def _read_if_changed(self, track: RunTrack, entry: CheckpointDir) -> Checkpoint | None:
        """Read a state that is new or changed; None when there is nothing new to take."""
        name = entry.path.name
        stamp = state_stamp(entry.path)
        known = track.known.get(name)
        if stamp is not None and known is not None and stamp == (known.size, known.mtime_ns):
            return None
        waiting = track.pending.get(name)
        if waiting is not None and stamp == waiting.stamp and stamp is not None:
            return None  # the same unusable file as last time: reading it again tells nothing
        try:
            checkpoint = read_checkpoint(entry.path)
        except StateVanishedError:
            return None
        if checkpoint.state is None:
            self._note_pending(track, checkpoint, stamp)
            return None
        track.pending.pop(name, None)
        return checkpoint

    def _note_pending(
        self, track: RunTrack, checkpoint: Checkpoint, stamp: tuple[int, int] | None
    ) -> None:
        waiting = track.pending.get(checkpoint.name)
        if waiting is None:
            # Counted from the file's last change: a state broken for days is no save in progress.
            since = self.clock() - _age(checkpoint.path, stamp)
            waiting = track.pending[checkpoint.name] = Pending(since, stamp)
        waiting.stamp = stamp
        if waiting.warned:
            return
        if self.clock() - waiting.first_seen >= INCOMPLETE_GRACE:
            waiting.warned = True
            log.warning(
                "checkpoint incomplete path=%s reason=%s", checkpoint.path, checkpoint.error
            )
        else:
            log.debug("state not ready path=%s reason=%s", checkpoint.path, checkpoint.error)

    def _take(self, track: RunTrack, checkpoint: Checkpoint) -> None:
        assert checkpoint.state is not None
        known = Known.read(checkpoint, checkpoint.state, self.metric)
        previous = track.known.get(known.name)
        if previous is not None and previous.same_content(known):
            previous.size, previous.mtime_ns = known.size, known.mtime_ns
            return
        if not track.belongs(known, checkpoint.state.evals):
            log.info(
                "run started again run=%s checkpoint=%s incarnation=%d",
                track.name,
                known.name,
                track.incarnation + 1,
            )
            track.begin_incarnation(track.incarnation + 1)

        self._lend_values(track, checkpoint)
        track.adopt(known)
        self._record_checkpoint(track, known)
        if known.value is not None and not self.baseline:
            self.herald.nonfinite(track, known)

    def _lend_values(self, track: RunTrack, newer: Checkpoint) -> None:
        """Give older checkpoints of this training the evaluation logged after their save."""
        assert newer.state is not None
        for older in sorted(track.known.values(), key=lambda k: k.step):
            if older.value is not None or older.incarnation != track.incarnation:
                continue
            value = newer.state.evals.get(older.step, {}).get(self.metric.name)
            if value is None or older.max_steps != newer.state.max_steps:
                continue
            if not shares_history(track.path / older.name, newer.path):
                continue
            older.value, older.value_from = value, newer.name
            track.adopt(older)
            self._record_checkpoint(track, older)

    # ----- records --------------------------------------------------------------------

    def _record_checkpoint(self, track: RunTrack, known: Known) -> None:
        extra = {"baseline": True} if self.baseline else {}
        self.history.append(
            "checkpoint",
            sync=False,  # synced with the run's new_best or at the end of the reaction
            run=track.name,
            metric=self.metric.name,
            **known.fields(),
            **extra,
        )
        log.info(
            "checkpoint run=%s checkpoint=%s %s=%s",
            track.name,
            known.name,
            self.metric.name,
            known.value,
        )

    def _record_removed(self, track: RunTrack, known: Known) -> None:
        self.history.append(
            "removed",
            sync=False,
            run=track.name,
            checkpoint=known.name,
            step=known.step,
            metric=self.metric.name,
            value=known.value,
        )
        current = track.current_best(self.metric)
        log.info(
            "checkpoint removed run=%s checkpoint=%s best_now=%s",
            track.name,
            known.name,
            current.name if current else None,
        )

    def _track(self, name: str) -> RunTrack:
        track = self.runs.get(name)
        if track is None:
            path = self.root if name == "." else self.root / name
            track = self.runs[name] = RunTrack(name, path)
        return track

    @property
    def deliver(self) -> Deliver | None:
        """Where announcements go (the notifier's ``announce``), or None."""
        return self.herald.deliver

    @deliver.setter
    def deliver(self, deliver: Deliver | None) -> None:
        self.herald.deliver = deliver

    def check_stalls(self, now: float | None = None) -> None:
        """Record (and announce) runs that saved nothing for longer than usual."""
        self.herald.stalls(self.runs.values(), now)

    def summary(self) -> Summary:
        present = [track for track in self.runs.values() if track.known]
        checkpoints = sum(len(track.known) for track in present)
        bests = sum(1 for track in present if track.current_best(self.metric) is not None)
        return Summary(len(present), checkpoints, bests)


def _age(checkpoint: Path, stamp: tuple[int, int] | None) -> float:
    """Seconds since the state file (or, without one, the directory) last changed."""
    if stamp is not None:
        return time.time() - stamp[1] / 1e9
    try:
        return time.time() - checkpoint.stat().st_mtime
    except OSError:
        return 0.0

"""What of a run's changes is news for people: recorded, and handed to delivery."""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ckpt_watch.announce import Announcement, Kind, make_id, worth_announcing
from ckpt_watch.history import History
from ckpt_watch.ranking import Metric
from ckpt_watch.tracking import Known, RunTrack

log = logging.getLogger(__name__)

Deliver = Callable[[Announcement], None]
# No run is called stalled sooner than this, however fast it saved before.
MIN_STALL_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class AnnouncePolicy:
    """Which events are news for people, and how small an improvement is not."""

    kinds: frozenset[str] = frozenset({"new_best"})
    min_delta: str = ""
    stall_factor: float = 3.0
    host: str = ""


class Herald:
    """Records new bests, finished, stalled and non-finite runs, and announces the news.

    Each announcement is recorded before it is handed on, so a crash in between leaves it
    owed, and the next start delivers it.
    """

    def __init__(
        self,
        metric: Metric,
        history: History,
        policy: AnnouncePolicy,
        deliver: Deliver | None = None,
    ) -> None:
        self.metric = metric
        self.history = history
        self.policy = policy
        self.deliver = deliver

    def nonfinite(self, track: RunTrack, known: Known) -> None:
        """A NaN or infinite value: told once, until the metric is finite again."""
        assert known.value is not None
        if math.isfinite(known.value):
            track.nonfinite_told = False
        elif not track.nonfinite_told:
            track.nonfinite_told = True
            self.news("nonfinite", track, self.about(track, known, known.value))

    def best(self, track: RunTrack, *, baseline: bool) -> None:
        """Record a value better than any the run reached; announce it if worth it."""
        best = track.best_seen(self.metric)
        if best is None:
            return
        name, step, value = best
        if track.reached is not None and not self.metric.is_better(value, track.reached):
            return
        previous, previous_value = track.reached_by, track.reached
        track.reached, track.reached_by = value, name
        if baseline:
            track.announced, track.announced_by = value, name
            return
        known = track.known.get(name)
        fields = {
            **self.about(track, known, value, name=name, step=step),
            "previous": previous,
            "previous_value": previous_value,
        }
        worth = worth_announcing(value, track.announced, self.metric.mode, self.policy.min_delta)
        told = (track.announced_by, track.announced)
        if self.news("new_best", track, fields, wanted=worth, told=told):
            track.announced, track.announced_by = value, name
        log.info(
            "new best run=%s checkpoint=%s %s=%s previous=%s",
            track.name,
            name,
            self.metric.name,
            value,
            previous_value,
        )

    def finished(self, track: RunTrack, *, baseline: bool) -> None:
        """A run whose newest checkpoint reached ``max_steps`` is finished: say so once."""
        newest = max(
            (k for k in track.known.values() if k.incarnation == track.incarnation),
            key=lambda k: k.step,
            default=None,
        )
        if track.finished or newest is None or newest.max_steps is None:
            return
        if newest.step < newest.max_steps:
            return
        track.finished = True
        if baseline:
            return
        best = track.best_seen(self.metric)
        name, step, value = best if best else (newest.name, newest.step, None)
        fields = self.about(track, track.known.get(name), value, name=name, step=step)
        fields["note"] = f"Reached max_steps {newest.max_steps} at {newest.name}."
        self.news("finished", track, fields)

    def stalls(self, tracks: Iterable[RunTrack], now: float | None = None) -> None:
        """Record a run that saved nothing for ``stall_factor`` times its usual interval."""
        now_ns = int((time.time() if now is None else now) * 1e9)
        for track in tracks:
            newest = track.newest_saved()
            if track.finished or newest is None or track.stalled_after == newest:
                continue
            times = sorted(track.saved_at.values())[-11:]
            if len(times) < 3:
                continue
            usual = statistics.median(b - a for a, b in itertools.pairwise(times))
            quiet = now_ns - times[-1]
            if quiet < max(usual * self.policy.stall_factor, MIN_STALL_SECONDS * 1e9):
                continue
            track.stalled_after = newest
            known = track.known.get(newest)
            fields = self.about(track, known, known.value if known else None, name=newest)
            fields["note"] = (
                f"No checkpoint for {quiet / 60e9:.0f} min; it usually saves every "
                f"{usual / 60e9:.1f} min."
            )
            self.news("stalled", track, fields)
            self.history.sync()

    def about(
        self,
        track: RunTrack,
        known: Known | None,
        value: float | None,
        *,
        name: str | None = None,
        step: int | None = None,
    ) -> dict[str, Any]:
        """The fields every event about one checkpoint of a run carries."""
        name = name or (known.name if known else None)
        return {
            "run": track.name,
            "checkpoint": name,
            "step": step if step is not None else (known.step if known else None),
            "metric": self.metric.name,
            "value": value,
            "epoch": known.epoch if known else None,
            "incarnation": track.incarnation,
            "path": str((track.path / name).absolute()) if name else None,
        }

    def news(
        self,
        kind: Kind,
        track: RunTrack,
        fields: dict[str, Any],
        *,
        wanted: bool = True,
        told: tuple[str | None, float | None] | None = None,
    ) -> bool:
        """Record an event; when the policy wants it announced, hand it to delivery too.

        The announcement is recorded before it is handed on, so a crash in between leaves
        it owed, and the next start delivers it.
        """
        announcement = None
        if wanted and kind in self.policy.kinds:
            announcement = Announcement(
                id=make_id(kind, track.name, fields["checkpoint"], track.incarnation),
                kind=kind,
                run=track.name,
                metric=self.metric.name,
                value=fields["value"],
                # People compare with what they were last told, not with every best.
                previous=told[0] if told else fields.get("previous"),
                previous_value=told[1] if told else fields.get("previous_value"),
                checkpoint=fields["checkpoint"],
                step=fields["step"],
                epoch=fields["epoch"],
                path=fields["path"],
                host=self.policy.host,
                note=fields.get("note", ""),
            )
            fields = {**announcement.fields(), **fields}  # the history keeps its own previous
        self.history.append(kind, **fields)
        if announcement is not None and self.deliver is not None:
            self.deliver(announcement)
        return announcement is not None

"""What is known of each run: its checkpoints as recorded, and the bests it reached."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_watch.history import Event, integer, number, text
from ckpt_watch.ranking import Metric
from ckpt_watch.trainer_state import Checkpoint, Metrics, TrainerState, last_component


@dataclass(slots=True)
class Known:
    """A checkpoint as recorded: enough to rank it without reading its file again."""

    name: str
    step: int
    value: float | None
    epoch: float | None
    size: int
    mtime_ns: int
    max_steps: int | None
    first_row: str | None
    trainer_best: str | None
    incarnation: int = 0
    value_from: str | None = None
    lineage: str | None = None  # digest of the evaluations logged before this step

    @classmethod
    def read(cls, checkpoint: Checkpoint, state: TrainerState, metric: Metric) -> Known:
        best = state.best_model_checkpoint
        return cls(
            name=checkpoint.name,
            step=checkpoint.step,
            value=checkpoint.own_metrics.get(metric.name),
            epoch=state.epoch,
            size=checkpoint.size,
            mtime_ns=checkpoint.mtime_ns,
            max_steps=state.max_steps,
            first_row=state.first_row,
            trainer_best=last_component(best) if best else None,
            lineage=lineage(state.evals, before=checkpoint.step),
        )

    @classmethod
    def from_event(cls, event: Event) -> Known:
        """Rebuild a record; raises ValueError for an event that is not one of ours."""
        name, step = event.get("checkpoint"), event.get("step")
        if not isinstance(name, str) or not isinstance(step, int) or isinstance(step, bool):
            raise ValueError("checkpoint event without a checkpoint name and an integer step")
        return cls(
            name=name,
            step=step,
            value=number(event.get("value")),
            epoch=number(event.get("epoch")),
            size=integer(event.get("size"), -1),
            mtime_ns=integer(event.get("mtime_ns"), -1),
            max_steps=integer(event.get("max_steps")),
            first_row=text(event.get("first_row")),
            trainer_best=text(event.get("trainer_best")),
            incarnation=integer(event.get("incarnation"), 0),
            value_from=text(event.get("value_from")),
            lineage=text(event.get("lineage")),
        )

    def as_checkpoint(self, run_path: Path, metric: Metric) -> Checkpoint:
        """This record as a checkpoint that ranks the same, without reading its file."""
        evals = {self.step: {metric.name: self.value}} if self.value is not None else {}
        state = TrainerState(
            global_step=self.step,
            epoch=self.epoch,
            max_steps=self.max_steps,
            evals=evals,
            best_model_checkpoint=self.trainer_best,
            first_row=self.first_row,
        )
        return Checkpoint(
            run_path / self.name, self.step, state=state, size=self.size, mtime_ns=self.mtime_ns
        )

    def fields(self) -> dict[str, Any]:
        """What a ``checkpoint`` event records, beside the run and metric."""
        fields: dict[str, Any] = {
            "checkpoint": self.name,
            "step": self.step,
            "value": self.value,
            "epoch": self.epoch,
            "incarnation": self.incarnation,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "max_steps": self.max_steps,
            "first_row": self.first_row,
            "trainer_best": self.trainer_best,
            "lineage": self.lineage,
        }
        if self.value_from:
            fields["value_from"] = self.value_from
        return fields

    def same_content(self, other: Known) -> bool:
        """Whether a re-read file says what was recorded (a touch, a copy back in place)."""
        mine = (self.step, self.first_row, self.max_steps, self.trainer_best)
        theirs = (other.step, other.first_row, other.max_steps, other.trainer_best)
        return mine == theirs and _same_number(self.value, other.value)


@dataclass(slots=True)
class Pending:
    """A checkpoint whose state could not be used yet, and the file as it was when tried."""

    first_seen: float
    stamp: tuple[int, int] | None
    warned: bool = False


@dataclass(slots=True)
class RunTrack:
    """What the engine knows of one run directory."""

    name: str
    path: Path
    known: dict[str, Known] = field(default_factory=dict)
    incarnation: int = 0
    fingerprint: tuple[int | None, str | None] = (None, None)
    # Every value this incarnation has reached, removed checkpoints included.
    seen: dict[str, tuple[int, float]] = field(default_factory=dict)
    reached: float | None = None
    reached_by: str | None = None
    announced: float | None = None  # the last new best people were told of
    announced_by: str | None = None
    nonfinite_told: bool = False
    finished: bool = False
    stalled_after: str | None = None  # the newest checkpoint when a stall was recorded
    saved_at: dict[str, int] = field(default_factory=dict)  # mtime_ns of each save
    pending: dict[str, Pending] = field(default_factory=dict)

    def begin_incarnation(self, number: int) -> None:
        self.incarnation = number
        self.fingerprint = (None, None)
        self.seen.clear()
        self.reached = None
        self.reached_by = None
        self.announced = None
        self.announced_by = None
        self.nonfinite_told = False
        self.finished = False
        self.stalled_after = None
        self.saved_at.clear()

    def belongs(self, known: Known, evals: Mapping[int, Metrics]) -> bool:
        """Whether a newly read checkpoint comes from the training this run is in.

        It does when it names the same ``max_steps`` and first log row, and its log holds
        exactly the evaluations of the nearest earlier checkpoint of this training. Arrival
        order does not matter: copies and late discoveries come in any order.
        """
        max_steps, first_row = self.fingerprint
        if None not in (max_steps, known.max_steps) and max_steps != known.max_steps:
            return False
        if None not in (first_row, known.first_row) and first_row != known.first_row:
            return False
        older = [
            k
            for k in self.known.values()
            if k.incarnation == self.incarnation and k.step < known.step and k.name != known.name
        ]
        nearest = max(older, key=lambda k: k.step, default=None)
        if nearest is None or nearest.lineage is None:
            return True
        return lineage(evals, before=nearest.step) == nearest.lineage

    def adopt(self, known: Known) -> None:
        known.incarnation = self.incarnation
        self.known[known.name] = known
        max_steps, first_row = self.fingerprint
        self.fingerprint = (max_steps or known.max_steps, first_row or known.first_row)
        if known.value is not None and math.isfinite(known.value):
            self.seen[known.name] = (known.step, known.value)
        self.saved_at[known.name] = known.mtime_ns

    def as_checkpoints(self, metric: Metric) -> list[Checkpoint]:
        """The live training's checkpoints as ranking and retention take them; unread ones
        (not yet of any training) with an error."""
        found = [
            known.as_checkpoint(self.path, metric)
            for known in self.known.values()
            if known.incarnation == self.incarnation
        ]
        found += [
            Checkpoint(
                self.path / name, int(name.rsplit("-", 1)[1]), error="state not readable yet"
            )
            for name in self.pending
        ]
        return found

    def newest_saved(self) -> str | None:
        """The checkpoint of this training whose state was written last."""
        if not self.saved_at:
            return None
        return max(self.saved_at, key=lambda name: self.saved_at[name])

    def earlier(self) -> list[str]:
        """Checkpoints still on disk from an earlier training in this directory."""
        return [k.name for k in self.known.values() if k.incarnation != self.incarnation]

    def best_seen(self, metric: Metric) -> tuple[str, int, float] | None:
        """The best value this incarnation has reached; ties go to the earlier step."""
        seen = [(name, step, value) for name, (step, value) in self.seen.items()]
        return min(seen, key=lambda item: _order(metric, item[2], item[1]), default=None)

    def current_best(self, metric: Metric) -> Known | None:
        """The best checkpoint still on disk in this incarnation."""
        ranked = [
            (_order(metric, known.value, known.step), known)
            for known in self.known.values()
            if known.incarnation == self.incarnation
            and known.value is not None
            and math.isfinite(known.value)
        ]
        return min(ranked, key=lambda item: item[0], default=(None, None))[1]


@dataclass(frozen=True, slots=True)
class Summary:
    runs: int
    checkpoints: int
    bests: int


def lineage(evals: Mapping[int, Metrics], *, before: int) -> str:
    """A digest of the evaluations logged before step ``before``: one training's trail."""
    trail = [[step, sorted(evals[step].items())] for step in sorted(evals) if step < before]
    text = json.dumps(trail, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _order(metric: Metric, value: float, step: int) -> tuple[float, int]:
    """Sort key: the best value first, and the earlier step first among equals."""
    return (value if metric.mode == "min" else -value, step)


def _same_number(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))

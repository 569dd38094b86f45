"""Order one run's checkpoints by a validation metric and name the best."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ckpt_watch.trainer_state import STATE_FILE, Checkpoint, last_component

Mode = Literal["min", "max"]


class MetricError(ValueError):
    """Raised when a metric name or mode cannot be used."""


@dataclass(frozen=True, slots=True)
class Metric:
    """A metric as the Trainer names it (``eval_...``) and which way is better."""

    name: str
    mode: Mode

    @property
    def label(self) -> str:
        direction = "lower" if self.mode == "min" else "higher"
        return f"{self.name} ({direction} is better)"

    def is_better(self, value: float, than: float) -> bool:
        return value < than if self.mode == "min" else value > than


def resolve_metric(name: str = "eval_loss", mode: str | None = None) -> Metric:
    """Name a metric the way the Trainer does: ``eval_`` is prepended unless present.

    Without an explicit mode the Trainer's rule applies: names ending in ``loss`` are
    lower-is-better, every other name higher-is-better.
    """
    name = name.strip()
    if not re.fullmatch(r"\S+", name) or not name.isprintable():  # cosine_ndcg@10 is fine
        raise MetricError(f"metric name {name!r} is not a logged metric name")
    if not name.startswith("eval_"):
        name = f"eval_{name}"
    if mode is None:
        mode = "min" if name.endswith("loss") else "max"
    if mode not in ("min", "max"):
        raise MetricError(f"mode must be min or max, not {mode!r}")
    return Metric(name, mode)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Ranked:
    """One checkpoint with its value and place; ``rank`` 1 is the best, None if unranked."""

    checkpoint: Checkpoint
    value: float | None
    rank: int | None
    value_from: str | None = None  # a newer sibling that logged this checkpoint's evaluation

    @property
    def name(self) -> str:
        return self.checkpoint.name


@dataclass(frozen=True, slots=True)
class TrainerBest:
    """The checkpoint the Trainer itself called best, as its newest state file says."""

    name: str
    metric: float | None
    on_disk: bool
    as_of_step: int


@dataclass(frozen=True, slots=True)
class RunRanking:
    """A run's checkpoints in step order, ranked by one metric."""

    metric: Metric
    entries: tuple[Ranked, ...]
    best: Ranked | None
    trainer_best: TrainerBest | None

    def disagreement(self) -> str | None:
        """One sentence on why the Trainer's best differs from ours, or None if it does not."""
        trainer = self.trainer_best
        if trainer is None or (self.best is not None and self.best.name == trainer.name):
            return None
        ours = self.best.name if self.best else "no checkpoint"
        return f"the Trainer names {trainer.name}, we name {ours}: {self._why(trainer)}"

    def _why(self, trainer: TrainerBest) -> str:
        if not trainer.on_disk:
            return f"{trainer.name} is no longer on disk"
        theirs = next((e for e in self.entries if e.name == trainer.name), None)
        if theirs is not None and theirs.checkpoint.error:
            return f"{trainer.name} is listed with an error, so not ranked"
        newest = max((e.checkpoint for e in self.entries if e.checkpoint.state), key=_step)
        logged = newest.state.evals.get(_step_of(trainer.name), {}) if newest.state else {}
        if trainer.metric is not None:
            for key, value in sorted(logged.items()):
                if value == trainer.metric and key != self.metric.name:
                    return f"the Trainer ranked by {key}, not {self.metric.name}"
            ours = self.best.value if self.best else None
            worse = ours is not None and self.metric.is_better(ours, trainer.metric)
            if logged.get(self.metric.name) == trainer.metric and worse:
                opposite = "higher" if self.metric.mode == "min" else "lower"
                return f"the Trainer took {opposite} {self.metric.name} as better"
        if theirs is not None and theirs.value is None:
            return f"{trainer.name} has no {self.metric.name} at its own step"
        if theirs is not None and not math.isfinite(theirs.value or 0.0):
            return f"the {self.metric.name} of {trainer.name} is not a finite number"
        return "the Trainer ranked by a metric or rule that its state file does not name"


def rank_run(checkpoints: Sequence[Checkpoint], metric: Metric) -> RunRanking:
    """Rank checkpoints of one run directory by ``metric``.

    The value of checkpoint N is the evaluation at step N in its own state file, else in
    the nearest newer sibling that continues the same training (same history); checkpoints
    without one are listed but not ranked. NaN and infinities rank last and are never
    best; ties go to the earlier step.
    """
    ordered = sorted(checkpoints, key=_order)
    values = {c.path: _own_value(c, metric) for c in ordered}
    lenders: dict[Path, str | None] = {c.path: None for c in ordered}
    unvalued = [c for c in ordered if values[c.path] is None and c.state is not None]
    logged_by = _logged_by({c.step for c in unvalued}, ordered, metric)
    for older in unvalued:
        lent = _lent_value(older, logged_by.get(older.step, []), metric)
        if lent is not None:
            values[older.path], lenders[older.path] = lent

    valued = [c for c in ordered if values[c.path] is not None]
    valued.sort(key=lambda c: _sort_key(values[c.path], c.step, metric))  # type: ignore[arg-type]
    ranks = {c.path: place for place, c in enumerate(valued, start=1)}

    entries = tuple(Ranked(c, values[c.path], ranks.get(c.path), lenders[c.path]) for c in ordered)
    best = next((e for e in entries if e.rank == 1), None)
    if best is not None and not math.isfinite(best.value):  # type: ignore[arg-type]
        best = None
    return RunRanking(metric, entries, best, _trainer_best(ordered))


def _step(checkpoint: Checkpoint) -> int:
    return checkpoint.step


def _order(checkpoint: Checkpoint) -> tuple[int, int, str]:
    # By step; a hand-made checkpoint-0200 beside checkpoint-200 comes after it, so that
    # the name the Trainer wrote wins a tie, and every directory keeps a rank of its own.
    return checkpoint.step, len(checkpoint.name), checkpoint.name


def _step_of(name: str) -> int:
    return int(name.rsplit("-", 1)[1]) if re.fullmatch(r"checkpoint-[0-9]+", name) else -1


def _own_value(checkpoint: Checkpoint, metric: Metric) -> float | None:
    return checkpoint.own_metrics.get(metric.name)


def _sort_key(value: float, step: int, metric: Metric) -> tuple[int, float, int]:
    if not math.isfinite(value):
        return (1, 0.0, step)
    return (0, value if metric.mode == "min" else -value, step)


def _logged_by(
    steps: set[int], ordered: Sequence[Checkpoint], metric: Metric
) -> dict[int, list[Checkpoint]]:
    """For each of ``steps``, the checkpoints (in step order) whose file logged ``metric`` there.

    Each file is looked up only at the steps it and ``steps`` share, so that a run of
    thousands of checkpoints, none evaluated, is not compared pair by pair.
    """
    found: dict[int, list[Checkpoint]] = {}
    for checkpoint in ordered:
        evals = checkpoint.state.evals if checkpoint.state else {}
        for step in evals.keys() & steps:
            if metric.name in evals[step]:
                found.setdefault(step, []).append(checkpoint)
    return found


def _lent_value(
    older: Checkpoint, loggers: Sequence[Checkpoint], metric: Metric
) -> tuple[float, str] | None:
    """The value logged at ``older``'s step by a newer sibling of the same training."""
    for newer in loggers:
        if newer.step > older.step and newer.state and continues(older, newer):
            return newer.state.evals[older.step][metric.name], newer.name
    return None


def continues(older: Checkpoint, newer: Checkpoint) -> bool:
    """Whether ``newer`` comes from the same training as ``older``.

    It does when its log history begins with every row of ``older``'s. A run restarted
    into the same directory writes a history of its own, and lends nothing. Both files
    are read again here; this is needed only for checkpoints not evaluated at their step.
    """
    if older.state is None or newer.state is None:
        return False
    if older.state.max_steps != newer.state.max_steps:
        return False
    return shares_history(older.path, newer.path)


def shares_history(older_dir: Path, newer_dir: Path) -> bool:
    """Whether the newer checkpoint's log history begins with every row of the older one's."""
    old_rows = _log_rows(older_dir)
    new_rows = _log_rows(newer_dir)
    if old_rows is None or new_rows is None or len(new_rows) < len(old_rows):
        return False
    return new_rows[: len(old_rows)] == old_rows


def _log_rows(checkpoint_dir: Path) -> list[Any] | None:
    try:
        # NaN stays the token it was written as, so that equal rows compare equal.
        document = json.loads((checkpoint_dir / STATE_FILE).read_bytes(), parse_constant=str)
    except (OSError, ValueError, RecursionError):
        return None
    rows = document.get("log_history") if isinstance(document, dict) else None
    return rows if isinstance(rows, list) else None


def _trainer_best(ordered: Sequence[Checkpoint]) -> TrainerBest | None:
    """The Trainer's own best, from the newest readable state (it is the most complete)."""
    newest = next((c for c in reversed(ordered) if c.state is not None), None)
    if newest is None or newest.state is None or not newest.state.best_model_checkpoint:
        return None
    name = last_component(newest.state.best_model_checkpoint)
    if not name:  # "/" names no directory
        return None
    on_disk = (newest.path.parent / name).is_dir()
    return TrainerBest(name, newest.state.best_metric, on_disk, newest.step)

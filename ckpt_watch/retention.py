"""Decide which checkpoints to keep, delete or strip, and say why for each one."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from ckpt_watch.check import read_run, relative_name, runs_under
from ckpt_watch.ranking import Metric, Ranked, RunRanking, rank_run
from ckpt_watch.scan import CheckpointDir, RunDir
from ckpt_watch.trainer_state import STATE_FILE, Checkpoint, checkpoint_step

Action = Literal["keep", "delete", "strip"]

PIN_FILE = "KEEP"
DEFAULT_GRACE = 900.0  # seconds a checkpoint without a readable state counts as being written

# What a checkpoint needs only to resume training: optimizer, scheduler, AMP scaler, RNG
# state, DeepSpeed's per-rank shards. Weights, config and trainer_state.json stay.
RESUME_ONLY_FILE = re.compile(r"optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth")
RESUME_ONLY_DIR = re.compile(r"global_step\d+")
WEIGHTS_FILE = re.compile(r".+\.safetensors|pytorch_model.*\.bin|adapter_model\.bin")


class RetentionError(ValueError):
    """Raised when retention rules or the path to prune cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class RetentionRules:
    """What to keep beyond the protected checkpoints; the kept set is the union of the rules.

    ``keep`` is the Trainer's ``save_total_limit``: the best plus the newest, N in all.
    ``keep_top`` keeps the K best by the metric, ``keep_every`` every step multiple of S.
    With ``strip`` the checkpoints let go lose only their resume-only state.
    """

    keep: int | None = None
    keep_top: int | None = None
    keep_every: int | None = None
    strip: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        for flag, value in self._given():
            if isinstance(value, bool) or not isinstance(value, int):
                raise RetentionError(f"{flag} must be a whole number, not {value!r}")
        if self.keep is not None and self.keep < 1:
            raise RetentionError(
                f"--keep must be 1 or more, not {self.keep}: it counts the best plus the "
                "newest checkpoints, and never means delete them all"
            )
        if self.keep_top is not None and self.keep_top < 1:
            raise RetentionError(f"--keep-top must be 1 or more, not {self.keep_top}")
        if self.keep_every is not None and self.keep_every < 1:
            raise RetentionError(
                f"--keep-every must be a step count of 1 or more, not {self.keep_every}"
            )
        if not self._given():
            raise RetentionError("give at least one of --keep, --keep-top, --keep-every")

    def describe(self) -> str:
        """The rules as flags, e.g. ``--keep 3, --keep-every 500``."""
        return ", ".join(f"{flag} {value}" for flag, value in self._given())

    def _given(self) -> list[tuple[str, int]]:
        pairs = (
            ("--keep", self.keep),
            ("--keep-top", self.keep_top),
            ("--keep-every", self.keep_every),
        )
        return [(flag, value) for flag, value in pairs if value is not None]


@dataclass(frozen=True, slots=True)
class Decision:
    """What retention does with one checkpoint directory, and why.

    ``stamp`` is the (size, mtime_ns) of its trainer_state.json as planned, None when it had
    no readable state; the pruner compares it again right before acting.
    """

    run: str
    name: str
    action: Action
    reason: str
    path: Path
    step: int
    stamp: tuple[int, int] | None = None

    def as_json(self) -> dict[str, str]:
        """The documented ``prune --json`` entry."""
        return {"run": self.run, "name": self.name, "action": self.action, "reason": self.reason}


def plan_run(
    run: RunDir,
    ranking: RunRanking,
    rules: RetentionRules,
    *,
    root: Path,
    now: float,
    grace: float = DEFAULT_GRACE,
    hold: Mapping[str, str] | None = None,
) -> list[Decision]:
    """Decide for every checkpoint of one run, in step order.

    ``hold`` names checkpoints to keep whatever the rules say, with the reason (those of
    an earlier training in the same directory, which the ranking does not cover).

    Never lets go of the best, the newest complete checkpoint, the Trainer's own best, a
    pinned or unreadable checkpoint, or anything but a real ``checkpoint-<int>`` directory
    directly inside the run under ``root``. Only looks at (lstat, resolve, list) the
    checkpoint directories it is given; the order they are given in does not matter.
    """
    listed = {c.path.name: c for c in run.checkpoints}
    ranked = {e.name: e for e in ranking.entries}
    steps = {
        **{n: e.checkpoint.step for n, e in ranked.items()},
        **{n: c.step for n, c in listed.items()},
    }
    names = sorted(steps, key=lambda name: (steps[name], name))
    hold = hold or {}
    held = {
        n: hold.get(n) or _held(listed.get(n), ranked.get(n), run.path, root, now, grace)
        for n in names
    }
    if ranking.best is None:
        # Nothing ranks by this metric (a name the run never logged, or NaN only): the real
        # best cannot be told, so nothing is let go.
        unranked = f"no finite {ranking.metric.name} in this run: nothing is let go"
        held = {n: reason or unranked for n, reason in held.items()}
    usable = [ranked[n] for n in names if held[n] is None]
    kept = _kept(usable, ranking, rules)

    run_name = relative_name(run.path, root)
    decisions = []
    for name in names:
        path = listed[name].path if name in listed else ranked[name].checkpoint.path
        decision = Decision(run_name, name, "keep", "", path, steps[name])
        reason = held[name]
        if reason is not None:
            decisions.append(replace(decision, reason=reason))
            continue

        checkpoint = ranked[name].checkpoint
        decision = replace(decision, stamp=(checkpoint.size, checkpoint.mtime_ns))
        reasons = kept[name]
        if os.path.lexists(path / PIN_FILE):
            reasons = [*reasons, f"pinned by a {PIN_FILE} file"]
        if reasons:
            decisions.append(replace(decision, reason="; ".join(reasons)))
        else:
            decisions.append(_let_go(decision, rules))
    return decisions


def plan_tree(
    root: Path, metric: Metric, rules: RetentionRules, *, now: float, grace: float = DEFAULT_GRACE
) -> list[Decision]:
    """Read, rank and plan every run under ``root``, one run at a time.

    Raises NothingToCheckError when there is no run, RetentionError when ``root`` is itself
    a checkpoint.
    """
    if checkpoint_step(root.name) is not None and root.is_dir():
        raise RetentionError(f"{root}: this is a checkpoint; give the run directory holding it")
    decisions: list[Decision] = []
    for run in runs_under(root):
        checkpoints = read_run(run)
        hold = earlier_trainings(checkpoints)
        current = [c for c in checkpoints if c.name not in hold]
        ranking = rank_run(current, metric)
        decisions += plan_run(run, ranking, rules, root=root, now=now, grace=grace, hold=hold)
    return decisions


def earlier_trainings(checkpoints: Sequence[Checkpoint]) -> dict[str, str]:
    """Checkpoints left by another training than the one that saved last, with the reason.

    A training started again in the same directory writes its own first log row (or
    another ``max_steps``); ranking it together with the old one would let the old one's
    checkpoints crowd out the live training's best and newest. They are kept, untouched.
    """
    readable = [c for c in checkpoints if c.state is not None]
    if not readable:
        return {}
    live = max(readable, key=lambda c: (c.mtime_ns, c.step)).state
    assert live is not None
    held = {}
    for checkpoint in readable:
        state = checkpoint.state
        assert state is not None
        other_rows = None not in (state.first_row, live.first_row) and (
            state.first_row != live.first_row
        )
        other_steps = None not in (state.max_steps, live.max_steps) and (
            state.max_steps != live.max_steps
        )
        if other_rows or other_steps:
            held[checkpoint.name] = "from another training in this directory"
    return held


def agree(confirmed: Sequence[Decision], fresh: Sequence[Decision]) -> list[Decision]:
    """The fresh plan, deleting or stripping only where the confirmed plan said the same."""
    said = {(d.run, d.name, d.action) for d in confirmed}
    return [
        d
        if d.action == "keep" or (d.run, d.name, d.action) in said
        else replace(d, action="keep", reason=f"{d.reason}; not in the confirmed plan")
        for d in fresh
    ]


def path_problem(path: Path, run_path: Path, root: Path) -> str | None:
    """Why ``path`` is not a real checkpoint directory directly inside ``run_path`` under
    ``root``, or None when it is. Symbolic links anywhere below ``root`` count as a problem.
    """
    step = checkpoint_step(path.name)
    if step is None or path.name != f"checkpoint-{step}":
        return "not named exactly checkpoint-<int>"
    if path.parent != run_path:
        return "not directly inside its run"
    try:
        info = os.lstat(path)
        relative = path.absolute().relative_to(root.absolute())
        real, real_root = path.resolve(strict=True), root.resolve(strict=True)
    except FileNotFoundError:
        return "no longer on disk"
    except ValueError:
        return "outside ROOT"
    except (OSError, RuntimeError) as exc:
        return f"cannot be inspected: {getattr(exc, 'strerror', None) or exc}"
    if stat.S_ISLNK(info.st_mode):
        return "a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "not a directory"
    if not real.is_relative_to(real_root):
        return "outside ROOT"
    if real != real_root / relative:
        return "reached through a symbolic link"
    return None


def strippable(checkpoint: Path) -> tuple[list[str], bool]:
    """The resume-only entries in a checkpoint, and whether it holds weights outside them."""
    names: list[str] = []
    weights = False
    try:
        with os.scandir(checkpoint) as entries:
            for entry in entries:
                if _is_resume_only(entry):
                    names.append(entry.name)
                elif _is_weights(entry):
                    weights = True
    except OSError:
        return [], False
    return sorted(names), weights


def _is_resume_only(entry: os.DirEntry[str]) -> bool:
    """A real file or directory (never a link) that only resuming training reads."""
    try:
        if entry.is_symlink():
            return False
        if entry.is_dir():
            return bool(RESUME_ONLY_DIR.fullmatch(entry.name))
        return entry.is_file() and bool(RESUME_ONLY_FILE.fullmatch(entry.name))
    except OSError:
        return False


def _is_weights(entry: os.DirEntry[str]) -> bool:
    try:
        return (
            bool(WEIGHTS_FILE.fullmatch(entry.name))
            and entry.is_file()
            and entry.stat().st_size > 0
        )
    except OSError:
        return False


def _held(
    listed: CheckpointDir | None,
    entry: Ranked | None,
    run_path: Path,
    root: Path,
    now: float,
    grace: float,
) -> str | None:
    """Why a checkpoint is kept whatever the rules say, for reasons other than its rank."""
    if listed is None:
        return "not in the run's listing"
    if listed.is_symlink:
        return "a symbolic link"
    problem = path_problem(listed.path, run_path, root)
    if problem is not None:
        return problem
    if entry is None:
        return f"not read yet: no {STATE_FILE} parsed"
    checkpoint = entry.checkpoint
    if checkpoint.state is None:
        error = checkpoint.error or f"no readable {STATE_FILE}"
        age = _age(checkpoint.path, checkpoint.mtime_ns, now)
        if age is not None and age > grace:
            return f"incomplete for {_duration(age)}: {error}"
        return f"not readable yet: {error}"
    return None


def _kept(usable: list[Ranked], ranking: RunRanking, rules: RetentionRules) -> dict[str, list[str]]:
    """Reasons to keep each complete checkpoint: protections first, then the rules."""
    names = {e.name for e in usable}
    best = ranking.best.name if ranking.best and ranking.best.name in names else None
    reasons: dict[str, list[str]] = {name: [] for name in names}
    if best is not None:
        reasons[best].append(f"best by {ranking.metric.name}")
    if usable:
        reasons[usable[-1].name].append("newest complete checkpoint")
    trainer = ranking.trainer_best
    if trainer is not None and trainer.name in names:
        reasons[trainer.name].append("the Trainer's own best")

    if rules.keep is not None:
        newest = [e.name for e in reversed(usable)][: rules.keep]
        if best is not None and best not in newest:
            newest = [best, *newest[: rules.keep - 1]]
        for name in newest:
            reasons[name].append(f"--keep {rules.keep}")
    for entry in usable:
        if rules.keep_top is not None and entry.rank is not None and entry.rank <= rules.keep_top:
            reasons[entry.name].append(f"--keep-top {rules.keep_top} (rank {entry.rank})")
        if rules.keep_every is not None and entry.checkpoint.step % rules.keep_every == 0:
            reasons[entry.name].append(f"--keep-every {rules.keep_every}")
    return reasons


def _let_go(decision: Decision, rules: RetentionRules) -> Decision:
    reason = f"not kept by {rules.describe()}"
    if not rules.strip:
        return replace(decision, action="delete", reason=reason)
    names, weights = strippable(decision.path)
    if not weights:
        return replace(
            decision,
            action="keep",
            reason=f"{reason}; no weights outside the resume state, so not stripped",
        )
    if not names:
        return replace(decision, action="keep", reason=f"{reason}; already stripped")
    return replace(decision, action="strip", reason=f"{reason}; resume state only")


def _age(path: Path, state_mtime_ns: int, now: float) -> float | None:
    """Seconds since the checkpoint directory or its state file last changed."""
    try:
        changed = max(os.lstat(path).st_mtime, state_mtime_ns / 1e9)
    except OSError:
        return None
    return now - changed


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"

"""Lay out random runs for retention tests, and say independently what must be kept."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from factories import dumps, trainer_state
from hypothesis import strategies as st

# value: evaluated at its own step; nan: evaluated, NaN; plain: never evaluated; pinned:
# evaluated and holding KEEP; empty: truncated state; missing: no state; link: a symbolic
# link to a checkpoint outside the root; odd: named checkpoint-0<step>.
KINDS = ("value", "value", "value", "nan", "plain", "pinned", "empty", "missing", "link", "odd")
READABLE = {"value", "nan", "plain", "pinned", "link", "odd"}
EVALUATED = {"value", "nan", "pinned", "link", "odd"}
HELD = {"empty", "missing", "link", "odd"}


@dataclass(frozen=True)
class Spec:
    """One checkpoint to lay out."""

    step: int
    kind: str
    value: float

    @property
    def name(self) -> str:
        return f"checkpoint-0{self.step}" if self.kind == "odd" else f"checkpoint-{self.step}"


@dataclass(frozen=True)
class RunSpec:
    """A run: its checkpoints and the step the Trainer names as best (if any)."""

    checkpoints: tuple[Spec, ...]
    trainer_best: int | None


@st.composite
def run_specs(draw: st.DrawFn) -> RunSpec:
    """Between one and nine checkpoints at distinct steps, with ties and NaN."""
    steps = draw(st.lists(st.integers(1, 60), min_size=1, max_size=9, unique=True))
    specs = []
    for step in steps:
        kind = draw(st.sampled_from(KINDS))
        value = draw(st.sampled_from([0.1, 0.2, 0.2, 0.3, 0.5]))
        specs.append(Spec(step * 10, kind, math.nan if kind == "nan" else value))
    trainer_best = draw(st.none() | st.sampled_from([s.step for s in specs]))
    return RunSpec(tuple(specs), trainer_best)


@st.composite
def rule_sets(draw: st.DrawFn) -> dict[str, int | None]:
    """Keyword arguments for RetentionRules with at least one rule."""
    rules = {
        "keep": draw(st.none() | st.integers(1, 5)),
        "keep_top": draw(st.none() | st.integers(1, 4)),
        "keep_every": draw(st.none() | st.sampled_from([20, 30, 100])),
    }
    if all(value is None for value in rules.values()):
        rules["keep"] = draw(st.integers(1, 5))
    return rules


def lay_out_run(spec: RunSpec, run: Path, outside: Path) -> None:
    """Write the run under ``run``; linked checkpoints live under ``outside``."""
    run.mkdir(parents=True, exist_ok=True)
    evals = {s.step: {"eval_loss": s.value} for s in spec.checkpoints if s.kind in EVALUATED}
    best = f"/other/host/out/checkpoint-{spec.trainer_best}" if spec.trainer_best else None
    for checkpoint in spec.checkpoints:
        target = outside / checkpoint.name if checkpoint.kind == "link" else run / checkpoint.name
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"w" * 100)
        (target / "optimizer.pt").write_bytes(b"o" * 300)
        own = {at: row for at, row in evals.items() if at <= checkpoint.step}
        state = trainer_state(checkpoint.step, own, best_model_checkpoint=best)
        if checkpoint.kind == "empty":
            (target / "trainer_state.json").write_text("")
        elif checkpoint.kind != "missing":
            (target / "trainer_state.json").write_text(dumps(state))
        if checkpoint.kind == "pinned":
            (target / "KEEP").touch()
        if checkpoint.kind == "link":
            os.symlink(target, run / checkpoint.name)


def protected(spec: RunSpec) -> set[str]:
    """What no rule may let go: held, best, newest complete, the Trainer's best, pinned."""
    usable = [s for s in spec.checkpoints if s.kind not in HELD]
    names = {s.name for s in spec.checkpoints if s.kind in HELD}
    names |= {s.name for s in usable if s.kind == "pinned"}
    best = _best(spec)
    if best is not None:
        names.add(best)
    if usable:
        names.add(max(usable, key=lambda s: s.step).name)
    trainer = f"checkpoint-{spec.trainer_best}"
    if any(s.name == trainer for s in usable):
        names.add(trainer)
    return names


def expected_kept(
    spec: RunSpec, keep: int | None, keep_top: int | None, keep_every: int | None
) -> set[str]:
    """Everything protected plus the union of the rules."""
    usable = sorted((s for s in spec.checkpoints if s.kind not in HELD), key=lambda s: s.step)
    kept = protected(spec)
    best = _best(spec)
    if keep is not None:
        newest = [s.name for s in reversed(usable)][:keep]
        if best in {s.name for s in usable} and best not in newest:
            newest = [best, *newest[: keep - 1]]
        kept |= set(newest)
    if keep_top is not None:
        ranks = _ranks(spec)
        kept |= {s.name for s in usable if ranks.get(s.name, math.inf) <= keep_top}
    if keep_every is not None:
        kept |= {s.name for s in usable if s.step % keep_every == 0}
    return kept


def _valued(spec: RunSpec) -> list[Spec]:
    return [s for s in spec.checkpoints if s.kind in EVALUATED]


def _ranks(spec: RunSpec) -> dict[str, int]:
    order = sorted(
        _valued(spec),
        key=lambda s: (math.isnan(s.value), s.value if not math.isnan(s.value) else 0, s.step),
    )
    return {s.name: place for place, s in enumerate(order, start=1)}


def _best(spec: RunSpec) -> str | None:
    finite = [s for s in _valued(spec) if math.isfinite(s.value)]
    if not finite:
        return None
    return min(finite, key=lambda s: (s.value, s.step)).name

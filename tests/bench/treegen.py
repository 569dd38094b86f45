"""Generate a tree of training runs whose trainer_state.json files read like the Trainer's."""

from __future__ import annotations

import argparse
import bisect
import json
import math
import random
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from factories import dumps  # noqa: E402  (tests/ is not a package)

# A training row of five keys serialises to about 150 bytes; TRL rows carry three more keys.
TRAIN_ROW_BYTES = 170
TRL_ROW_BYTES = 260
MB = 1_000_000


class LayoutMismatchError(AssertionError):
    """Raised when a generated state differs from the Trainer's serialisation of itself."""


@dataclass(frozen=True, slots=True)
class TreeSize:
    """How large a tree to make: run count, checkpoints per run, final state sizes in bytes."""

    runs: int
    checkpoints: tuple[int, int]
    final_bytes: tuple[int, int]


FULL = TreeSize(runs=30, checkpoints=(6, 16), final_bytes=(MB // 2, 5 * MB))
QUICK = TreeSize(runs=8, checkpoints=(4, 8), final_bytes=(MB // 4, 2 * MB))


@dataclass(frozen=True, slots=True)
class RunSpec:
    """How one generated run trains, logs, evaluates and saves."""

    path: str
    max_steps: int
    logging_steps: int
    eval_steps: int
    save_steps: int
    steps_per_epoch: int
    save_total_limit: int | None
    tracks_best: bool
    trl_rows: bool
    nan_rate: float
    seed: int


@dataclass(slots=True)
class Tree:
    """What was written: the root, every state file's size, and the answer per run."""

    root: Path
    runs: list[str] = field(default_factory=list)
    checkpoints: int = 0
    total_bytes: int = 0
    largest_bytes: int = 0
    smallest_bytes: int = 0
    largest_state: Path | None = None
    expected_best: dict[str, str | None] = field(default_factory=dict)


def generate_tree(root: Path, size: TreeSize = FULL, *, seed: int = 0) -> Tree:
    """Write ``size.runs`` runs under ``root``; the same seed always gives the same bytes."""
    rng = random.Random(seed)
    tree = Tree(root)
    for index in range(size.runs):
        spec = run_spec(index, size, rng)
        write_run(root, spec, tree)
    return tree


def run_spec(index: int, size: TreeSize, rng: random.Random) -> RunSpec:
    """Choose one run's schedule so that its newest state is near a size drawn log-uniformly."""
    low, high = size.final_bytes
    final = high if index < 2 else math.exp(rng.uniform(math.log(low), math.log(high)))
    trl = rng.random() < 0.25
    logging_steps = rng.choice([1, 1, 1, 2, 5, 10])
    rows = final / (TRL_ROW_BYTES if trl else TRAIN_ROW_BYTES)
    count = rng.randint(*size.checkpoints)
    save_steps = max(10, round(rows * logging_steps / count / 10) * 10)
    aligned = rng.random() < 0.8  # load_best_model_at_end forces eval and save to coincide
    eval_steps = save_steps // rng.choice([1, 1, 2, 5]) if aligned else save_steps * 2 // 3
    max_steps = save_steps * count + (0 if rng.random() < 0.8 else save_steps // 2)
    project = rng.choice(["llama3-sft", "qwen-dpo", "mistral-lora", "whisper-ft", "bert-cls"])
    depth = rng.choice(["", "sweep/", "sweep/lr-2e-5/"])
    return RunSpec(
        path=f"{project}/{depth}run-{index:02d}",
        max_steps=max_steps,
        logging_steps=logging_steps,
        eval_steps=max(1, eval_steps),
        save_steps=save_steps,
        steps_per_epoch=rng.randint(max_steps // 6 + 1, max_steps // 2 + 1),
        save_total_limit=rng.choice([None, None, 3, 5]),
        tracks_best=aligned and rng.random() < 0.7,
        trl_rows=trl,
        nan_rate=rng.choice([0.0, 0.0, 0.001, 0.01]),
        seed=rng.randrange(2**32),
    )


def write_run(root: Path, spec: RunSpec, tree: Tree) -> None:
    """Write every kept checkpoint of one run; each log is a prefix of the next one's."""
    rng = random.Random(spec.seed)
    steps, texts, evals = log_rows(spec, rng)
    joined = ",\n".join(texts)
    ends = _accumulate_ends(texts)
    saves = list(range(spec.save_steps, spec.max_steps + 1, spec.save_steps))
    if saves[-1] != spec.max_steps:
        saves.append(spec.max_steps)  # the Trainer saves at the end with a steps strategy

    best: tuple[float, int] | None = None
    states: dict[int, tuple[int, tuple[float, int] | None]] = {}
    for step in saves:
        value = evals.get(step)
        if spec.tracks_best and value is not None and (best is None or value < best[0]):
            best = (value, step)
        states[step] = (bisect.bisect_right(steps, step), best)

    kept = _kept_after_rotation(saves, spec, best)
    run_dir = root / spec.path
    flos = rng.uniform(1e15, 1e17)
    for step in saves:
        if step not in kept:
            continue
        count, best_then = states[step]
        log = joined[: ends[count - 1]] if count else ""
        text = state_text(spec, step, log, best_then, flos * step)
        checkpoint = run_dir / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True, exist_ok=True)
        path = checkpoint / "trainer_state.json"
        path.write_text(text)
        _record(tree, path, len(text))
        if step == min(kept) and dumps(json.loads(text)) != text:
            raise LayoutMismatchError(f"{path}: not what json.dumps(indent=2) would write")

    own = {s: evals[s] for s in kept if s in evals}
    tree.runs.append(spec.path)
    tree.expected_best[spec.path] = (
        f"checkpoint-{min(own, key=lambda s: (own[s], s))}" if own else None
    )


def log_rows(spec: RunSpec, rng: random.Random) -> tuple[list[int], list[str], dict[int, float]]:
    """Every log row of the whole run as serialised text, their steps, and eval_loss by step."""
    logged = range(spec.logging_steps, spec.max_steps + 1, spec.logging_steps)
    evaluated = range(spec.eval_steps, spec.max_steps + 1, spec.eval_steps)
    start, floor = rng.uniform(1.5, 3.0), rng.uniform(0.2, 0.8)
    decay = spec.max_steps / rng.uniform(2.0, 6.0)
    peak_lr = rng.choice([1e-5, 2e-5, 5e-5, 2e-4])

    steps: list[int] = []
    texts: list[str] = []
    evals: dict[int, float] = {}
    for step in sorted(set(logged) | set(evaluated)):
        trend = floor + (start - floor) * math.exp(-step / decay)
        if step % spec.logging_steps == 0:  # the Trainer logs, then evaluates, at one step
            steps.append(step)
            texts.append(row_text(_train_row(step, spec, rng, trend, start, peak_lr)))
        if step % spec.eval_steps == 0:
            evals[step] = _eval_loss(step, spec, rng, trend)
            steps.append(step)
            texts.append(row_text(_eval_row(step, spec, rng, evals[step])))
    return steps, texts, evals


def _train_row(
    step: int, spec: RunSpec, rng: random.Random, trend: float, start: float, peak_lr: float
) -> dict[str, Any]:
    warmup = max(1, spec.max_steps // 20)
    grad_norm = (
        math.nan if rng.random() < spec.nan_rate else _float32(rng.lognormvariate(-0.5, 0.6))
    )
    row: dict[str, Any] = {
        "epoch": step / spec.steps_per_epoch,
        "grad_norm": grad_norm,
        "learning_rate": peak_lr * min(step / warmup, (spec.max_steps - step) / spec.max_steps),
        "loss": round(trend + rng.gauss(0, 0.04 * trend), 4),
        "step": step,
    }
    if spec.trl_rows:
        row["entropy"] = rng.uniform(0.5, 2.0)
        row["mean_token_accuracy"] = min(1.0, 0.5 + 0.4 * (1 - trend / start))
        row["num_tokens"] = float(step * rng.randint(3000, 5000))
    return row


def _float32(value: float) -> float:
    """A value as a float32 tensor's ``.item()`` gives it: many digits, float32 precision."""
    return array("f", [value]).tolist()[0]


def _eval_loss(step: int, spec: RunSpec, rng: random.Random, trend: float) -> float:
    overfit = 0.25 * max(0.0, step / spec.max_steps - 0.6)  # so the best is often not the last
    return _float32(trend * 1.08 + overfit + rng.gauss(0, 0.01))


def _eval_row(step: int, spec: RunSpec, rng: random.Random, loss: float) -> dict[str, Any]:
    runtime = round(rng.uniform(20.0, 400.0), 4)
    samples = rng.choice([500, 1000, 2000])
    return {
        "epoch": step / spec.steps_per_epoch,
        "eval_accuracy": min(1.0, max(0.0, 1.0 - loss / 3 + rng.gauss(0, 0.005))),
        "eval_loss": loss,
        "eval_runtime": runtime,
        "eval_samples_per_second": round(samples / runtime, 3),
        "eval_steps_per_second": round(samples / 8 / runtime, 3),
        "step": step,
    }


def row_text(row: dict[str, Any]) -> str:
    """One log row as ``json.dumps(state, indent=2, sort_keys=True)`` lays it out."""
    body = ",\n".join(f'      "{key}": {_scalar(row[key])}' for key in sorted(row))
    return "    {\n" + body + "\n    }"


def state_text(
    spec: RunSpec, step: int, log: str, best: tuple[float, int] | None, flos: float
) -> str:
    """The whole state file at ``step``, with ``log`` as its already serialised rows."""
    state: dict[str, Any] = {
        "best_global_step": best[1] if best else None,
        "best_metric": best[0] if best else None,
        "best_model_checkpoint": f"/data/{spec.path}/checkpoint-{best[1]}" if best else None,
        "epoch": step / spec.steps_per_epoch,
        "eval_steps": spec.eval_steps,
        "global_step": step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": [],
        "logging_steps": spec.logging_steps,
        "max_steps": spec.max_steps,
        "num_input_tokens_seen": 0,
        "num_train_epochs": math.ceil(spec.max_steps / spec.steps_per_epoch),
        "save_steps": spec.save_steps,
        "stateful_callbacks": {
            "TrainerControl": {
                "args": {
                    "should_epoch_stop": False,
                    "should_evaluate": False,
                    "should_log": False,
                    "should_save": True,
                    "should_training_stop": step == spec.max_steps,
                },
                "attributes": {},
            }
        },
        "total_flos": flos,
        "train_batch_size": 8,
        "trial_name": None,
        "trial_params": None,
    }
    text = dumps(state)
    if not log:
        return text
    return text.replace('"log_history": []', '"log_history": [\n' + log + "\n  ]", 1)


def _scalar(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return float.__repr__(value)
    return str(value)


def _accumulate_ends(texts: list[str]) -> list[int]:
    ends, total = [], 0
    for index, text in enumerate(texts):
        total += len(text) + (2 if index else 0)  # ",\n" before every row but the first
        ends.append(total)
    return ends


def _kept_after_rotation(
    saves: list[int], spec: RunSpec, best: tuple[float, int] | None
) -> set[int]:
    if spec.save_total_limit is None:
        return set(saves)
    kept = set(saves[-spec.save_total_limit :])
    if best is not None:
        kept.add(best[1])  # the Trainer keeps its best out of the rotation
    return kept


def _record(tree: Tree, path: Path, size: int) -> None:
    tree.checkpoints += 1
    tree.total_bytes += size
    if size > tree.largest_bytes:
        tree.largest_bytes, tree.largest_state = size, path
    tree.smallest_bytes = min(tree.smallest_bytes or size, size)


def main() -> None:
    """Write a tree where asked and describe it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--quick", action="store_true", help="a smaller tree")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tree = generate_tree(args.root, QUICK if args.quick else FULL, seed=args.seed)
    print(
        f"runs={len(tree.runs)} checkpoints={tree.checkpoints} total_mb={tree.total_bytes / MB:.1f}"
        f" smallest_mb={tree.smallest_bytes / MB:.2f} largest_mb={tree.largest_bytes / MB:.2f}"
    )


if __name__ == "__main__":
    main()

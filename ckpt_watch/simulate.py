"""Write a made-up training run to disk, checkpoint by checkpoint, as the Trainer would."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ckpt_watch.trainer_state import STATE_FILE, checkpoint_step

log = logging.getLogger(__name__)

METRIC = "eval_loss"
LEARNING_RATE = 5e-5
TRAIN_BATCH_SIZE = 8
EVAL_SAMPLES = 500
EPOCHS = 3


class SimulationError(ValueError):
    """Raised when the settings or the target directory cannot give a realistic run."""


@dataclass(frozen=True, slots=True)
class Plan:
    """How the simulated training goes; ``eval_steps`` None means ``save_steps``."""

    steps: int = 200
    save_steps: int = 20
    eval_steps: int | None = None
    logging_steps: int = 5
    every: float = 2.0
    seed: int = 0
    nan_at: int | None = None
    save_total_limit: int | None = None

    @property
    def evaluate_every(self) -> int:
        return self.eval_steps if self.eval_steps is not None else self.save_steps

    def check(self) -> None:
        """Raise SimulationError naming the first setting that cannot be used."""
        counts = {
            "--steps": self.steps,
            "--save-steps": self.save_steps,
            "--eval-steps": self.evaluate_every,
            "--logging-steps": self.logging_steps,
        }
        for option, value in counts.items():
            if value < 1:
                raise SimulationError(f"{option} must be at least 1, not {value}")
        if not (math.isfinite(self.every) and self.every >= 0):
            raise SimulationError(f"--every must be 0 or more seconds, not {self.every}")
        if self.nan_at is not None and not 1 <= self.nan_at <= self.steps:
            raise SimulationError(f"--nan-at must be a step from 1 to {self.steps}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            limit = self.save_total_limit
            raise SimulationError(f"--save-total-limit must be at least 1, not {limit}")


@dataclass(frozen=True, slots=True)
class Saved:
    """One checkpoint the simulated Trainer wrote, and what its rotation deleted after it."""

    step: int
    path: Path
    value: float | None  # eval_loss logged at this step; None when not evaluated here
    best_model_checkpoint: str | None
    best_metric: float | None
    removed: tuple[str, ...]


@dataclass(slots=True)
class _State:
    """The fields of the Trainer's TrainerState that change during training."""

    log_history: list[dict[str, Any]]
    best_metric: float | None = None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    total_flos: float = 0.0


def simulate(
    directory: Path, plan: Plan, *, wait: Callable[[float], object] = time.sleep
) -> Iterator[Saved]:
    """Train nothing, but write ``directory/checkpoint-N`` as a Trainer run would.

    Yields each checkpoint after its ``trainer_state.json`` (written last, in place) and
    the rotation that follows it; waits ``plan.every`` seconds before each save. The
    checkpoints are ranked by ``eval_loss``, and the best fields follow transformers 4.50+.
    Raises SimulationError before writing anything if the plan or directory is unusable.
    """
    plan.check()
    _refuse_existing_run(directory)
    directory.mkdir(parents=True, exist_ok=True)

    rng = random.Random(plan.seed)
    state = _State(log_history=[])
    log.info("simulating run path=%s steps=%d seed=%d", directory, plan.steps, plan.seed)

    for step in _busy_steps(plan):
        epoch = EPOCHS * step / plan.steps
        diverged = plan.nan_at is not None and step >= plan.nan_at
        if step % plan.logging_steps == 0:
            state.log_history.append(_train_row(rng, step, epoch, plan, diverged=diverged))
        value = None
        if step % plan.evaluate_every == 0 or step == plan.steps:
            value = _evaluate(rng, state, step, epoch, plan, diverged=diverged)
        if step % plan.save_steps == 0 or step == plan.steps:
            if plan.every > 0:
                wait(plan.every)
            state.total_flos = 1.37e12 * step
            path = _save(directory, rng, state, step, epoch, plan)
            removed = _rotate(directory, plan.save_total_limit, state.best_model_checkpoint)
            if step == plan.steps and plan.save_total_limit == 1:
                removed += _keep_only_best(directory, state.best_model_checkpoint)
            yield Saved(step, path, value, state.best_model_checkpoint, state.best_metric, removed)


def _refuse_existing_run(directory: Path) -> None:
    """Never write into (or rotate away) checkpoints that some other training left there."""
    if directory.exists() and not directory.is_dir():
        raise SimulationError(f"{directory}: not a directory")
    if not directory.is_dir():
        return
    if any(checkpoint_step(name) is not None for name in os.listdir(directory)):
        raise SimulationError(
            f"{directory}: already holds checkpoints; simulate into a new or empty directory"
        )


def _busy_steps(plan: Plan) -> list[int]:
    """The steps at which something is logged, evaluated or saved, in order."""
    every = (plan.logging_steps, plan.evaluate_every, plan.save_steps)
    steps = {s for n in every for s in range(n, plan.steps + 1, n)}
    return sorted(steps | {plan.steps})


def _float32(value: float) -> float:
    """The Trainer's numbers come from float32 tensors; keep their look."""
    return float(struct.unpack("f", struct.pack("f", value))[0])


def _trend(progress: float) -> float:
    """A loss that falls fast, flattens, and creeps up again as the model overfits."""
    return 0.45 + 1.8 * math.exp(-4.0 * progress) + 0.6 * max(0.0, progress - 0.65) ** 2


def _train_row(
    rng: random.Random, step: int, epoch: float, plan: Plan, *, diverged: bool
) -> dict[str, Any]:
    loss = _trend(step / plan.steps) * rng.uniform(0.8, 1.1) - 0.08
    grad_norm = rng.uniform(0.6, 3.5)
    return {
        "epoch": epoch,
        "grad_norm": math.nan if diverged else _float32(grad_norm),
        "learning_rate": LEARNING_RATE * (plan.steps - step) / plan.steps,
        "loss": math.nan if diverged else _float32(loss),
        "step": step,
    }


def _evaluate(
    rng: random.Random, state: _State, step: int, epoch: float, plan: Plan, *, diverged: bool
) -> float:
    """Log an evaluation row and update the best the way transformers 4.50+ does."""
    value = _trend(step / plan.steps) * rng.gauss(1.0, 0.012)
    if rng.random() < 0.25:  # now and then a checkpoint comes out worse than the last
        value *= rng.uniform(1.06, 1.2)
    value = math.nan if diverged else _float32(value)

    runtime = round(rng.uniform(1.6, 2.4), 4)
    state.log_history.append(
        {
            "epoch": epoch,
            METRIC: value,
            "eval_runtime": runtime,
            "eval_samples_per_second": round(EVAL_SAMPLES / runtime, 3),
            "eval_steps_per_second": round(EVAL_SAMPLES / TRAIN_BATCH_SIZE / runtime, 3),
            "step": step,
        }
    )
    # The Trainer starts from infinity and takes strictly better values, so NaN never wins.
    if state.best_metric is None:
        state.best_metric = math.inf
    if value < state.best_metric:
        state.best_metric = value
        state.best_global_step = step
    return value


def _save(
    directory: Path, rng: random.Random, state: _State, step: int, epoch: float, plan: Plan
) -> Path:
    """Weights and optimizer first, then the best fields, then trainer_state.json, last."""
    name = f"checkpoint-{step}"
    path = directory / name
    path.mkdir(exist_ok=True)
    config = {"architectures": ["SimulatedForSequenceClassification"], "model_type": "simulated"}
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for weights, size in (("model.safetensors", 4096), ("training_args.bin", 512)):
        (path / weights).write_bytes(rng.randbytes(size))

    if state.best_global_step:
        best = directory / f"checkpoint-{state.best_global_step}"
        if best.is_dir():  # 4.50+: name the best only once it exists on disk
            state.best_model_checkpoint = os.path.join(str(directory), best.name)

    for extra, size in (("optimizer.pt", 8192), ("scheduler.pt", 256), ("rng_state.pth", 512)):
        (path / extra).write_bytes(rng.randbytes(size))
    document = _document(state, step, epoch, plan)
    with open(path / STATE_FILE, "w", encoding="utf-8") as handle:  # in place, as the Trainer
        handle.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    log.debug("checkpoint written path=%s", path)
    return path


def _document(state: _State, step: int, epoch: float, plan: Plan) -> dict[str, Any]:
    control = {
        "should_epoch_stop": False,
        "should_evaluate": False,
        "should_log": False,
        "should_save": True,
        "should_training_stop": step == plan.steps,
    }
    return {
        **asdict(state),
        "epoch": epoch,
        "eval_steps": plan.evaluate_every,
        "global_step": step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "logging_steps": plan.logging_steps,
        "max_steps": plan.steps,
        "num_input_tokens_seen": 0,
        "num_train_epochs": EPOCHS,
        "save_steps": plan.save_steps,
        "stateful_callbacks": {"TrainerControl": {"args": control, "attributes": {}}},
        "train_batch_size": TRAIN_BATCH_SIZE,
        "trial_name": None,
        "trial_params": None,
    }


def _checkpoints(directory: Path) -> list[Path]:
    """The run's checkpoints, oldest step first (the Trainer's order since 4.41)."""
    found = {checkpoint_step(p.name): p for p in directory.iterdir() if p.is_dir()}
    return [found[step] for step in sorted(s for s in found if s is not None)]


def _rotate(directory: Path, limit: int | None, best: str | None) -> tuple[str, ...]:
    """Delete the oldest checkpoints beyond ``limit``, sparing the newest and the best."""
    if limit is None:
        return ()
    checkpoints = _checkpoints(directory)
    if len(checkpoints) <= limit:
        return ()
    protected = {checkpoints[-1].name}
    if best is not None:
        protected.add(Path(best).name)
    keep = max(limit, len(protected))
    removed: list[str] = []
    for path in checkpoints:
        if len(checkpoints) - len(removed) <= keep:
            break
        if path.name not in protected:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return tuple(removed)


def _keep_only_best(directory: Path, best: str | None) -> tuple[str, ...]:
    """At the end of training with a limit of 1, the Trainer deletes all but the best."""
    if best is None:
        return ()
    removed = [p.name for p in _checkpoints(directory) if p.name != Path(best).name]
    for name in removed:
        shutil.rmtree(directory / name, ignore_errors=True)
    return tuple(removed)

"""Build trainer_state.json files the way the Trainer writes them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def trainer_state(
    step: int,
    evals: Mapping[int, Mapping[str, float]] | None = None,
    *,
    max_steps: int = 1000,
    logging_steps: int = 10,
    train_loss: float = 1.0,
    best_model_checkpoint: str | None = None,
    best_metric: float | None = None,
    steps_per_epoch: int = 100,
) -> dict[str, Any]:
    """A state at ``step``: training rows every ``logging_steps``, and ``evals`` by step."""
    evals = evals or {}
    rows: list[dict[str, Any]] = []
    for at in range(logging_steps, step + 1, logging_steps):
        rows.append({"epoch": at / steps_per_epoch, "loss": train_loss, "step": at})
        if at in evals:
            rows.append({"epoch": at / steps_per_epoch, **evals[at], "step": at})
    for at in sorted(set(evals) - set(range(logging_steps, step + 1, logging_steps))):
        if at <= step:
            rows.append({"epoch": at / steps_per_epoch, **evals[at], "step": at})
    rows.sort(key=lambda row: row["step"])
    return {
        "best_metric": best_metric,
        "best_model_checkpoint": best_model_checkpoint,
        "epoch": step / steps_per_epoch,
        "eval_steps": 500,
        "global_step": step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": rows,
        "logging_steps": logging_steps,
        "max_steps": max_steps,
        "num_train_epochs": 3,
        "save_steps": 500,
        "total_flos": 0.0,
        "train_batch_size": 8,
        "trial_name": None,
        "trial_params": None,
    }


def dumps(state: Mapping[str, Any]) -> str:
    """Serialise exactly as the Trainer does (bare NaN tokens included)."""
    return json.dumps(state, indent=2, sort_keys=True) + "\n"


def write_checkpoint(run: Path, step: int, state: Mapping[str, Any] | None = None) -> Path:
    """Create ``run/checkpoint-<step>/trainer_state.json``; returns the checkpoint dir."""
    checkpoint = run / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True, exist_ok=True)
    content = dumps(state if state is not None else trainer_state(step))
    (checkpoint / "trainer_state.json").write_text(content)
    return checkpoint


def write_run(
    run: Path, values: Mapping[int, float], *, metric: str = "eval_loss", max_steps: int = 1000
) -> None:
    """A run whose checkpoint at each step in ``values`` was evaluated at that step.

    Each checkpoint's history holds every evaluation up to its own step, as in a real run.
    """
    for step in sorted(values):
        evals = {at: {metric: value} for at, value in values.items() if at <= step}
        write_checkpoint(run, step, trainer_state(step, evals, max_steps=max_steps))

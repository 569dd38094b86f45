"""Shared fixtures: the real corpus, laid-out runs, and bounded waits."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CORPUS = SHARED / "corpus"


def corpus_dir() -> Path:
    """The real-file corpus beside the project; tests that need it skip without it."""
    if not (CORPUS / "ANSWERS.json").is_file():
        pytest.skip(f"real trainer_state.json corpus not found at {CORPUS}")
    return CORPUS


def lay_out(source: Path, run: Path, step: int) -> Path:
    """Copy a state file into ``run/checkpoint-<step>/trainer_state.json``."""
    checkpoint = run / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, checkpoint / "trainer_state.json")
    return checkpoint


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll a condition until it holds or the bound passes; returns whether it held."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True

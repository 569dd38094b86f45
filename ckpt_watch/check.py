"""Read and rank every run under a path, once."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ckpt_watch.ranking import Metric, RunRanking, rank_run
from ckpt_watch.scan import RunDir, find_runs
from ckpt_watch.trainer_state import Checkpoint, StateVanishedError, read_checkpoint


class NothingToCheckError(Exception):
    """Raised when the path to check is missing or holds no checkpoint."""


@dataclass(frozen=True, slots=True)
class RunReport:
    """One run's ranking, with the run named relative to the path that was checked."""

    run: str
    path: Path
    ranking: RunRanking


def check_path(path: Path, metric: Metric) -> Iterator[RunReport]:
    """Rank each run under ``path`` in turn, holding one run in memory at a time.

    Raises NothingToCheckError before yielding anything when there is nothing to rank.
    """
    return _reports(runs_under(path), path, metric)


def runs_under(path: Path) -> list[RunDir]:
    """The runs under ``path``; raises NothingToCheckError when there is none."""
    if not path.exists():
        raise NothingToCheckError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise NothingToCheckError(f"{path}: not a directory")
    runs = find_runs(path)
    if not runs:
        raise NothingToCheckError(f"{path}: no checkpoint-<step> directories found")
    return runs


def read_run(run: RunDir) -> list[Checkpoint]:
    """Read every checkpoint of a run; one that vanishes while being read is left out."""
    checkpoints = []
    for entry in run.checkpoints:
        try:
            checkpoints.append(read_checkpoint(entry.path))
        except StateVanishedError:
            continue
    return checkpoints


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` in forward-slash form, ``"."`` for the root itself."""
    try:
        name = path.relative_to(root).as_posix()
    except ValueError:
        name = path.as_posix()
    return name or "."


def _reports(runs: list[RunDir], root: Path, metric: Metric) -> Iterator[RunReport]:
    for run in runs:
        checkpoints = read_run(run)
        if checkpoints:  # else the whole run was deleted after the scan
            ranking = rank_run(checkpoints, metric)
            yield RunReport(relative_name(run.path, root), run.path, ranking)

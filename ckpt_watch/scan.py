"""Find runs and their checkpoint directories under a root."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ckpt_watch.trainer_state import checkpoint_step

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CheckpointDir:
    """A directory named exactly ``checkpoint-<step>`` directly inside a run."""

    path: Path
    step: int
    is_symlink: bool = False


@dataclass(frozen=True, slots=True)
class RunDir:
    """A directory holding at least one checkpoint, with its checkpoints in step order."""

    path: Path
    checkpoints: tuple[CheckpointDir, ...]


def is_ignored_dir(name: str) -> bool:
    """Hidden (our own state, trash, VCS) and staging directories hold no checkpoints."""
    return name.startswith((".", "tmp-checkpoint-"))


def find_runs(root: Path) -> list[RunDir]:
    """Every run at any depth under ``root``, in path order.

    Symbolic links are never followed while searching, so link loops cannot trap the walk;
    a checkpoint that is itself a link is listed and marked. Checkpoint internals (weights,
    DeepSpeed shards) are never entered.
    """
    whole = Path(os.path.abspath(root))  # names "." inside a checkpoint too
    if checkpoint_step(whole.name) is not None and root.is_dir():
        # Pointed at one checkpoint: that checkpoint's run is what the user means.
        return [r for r in [list_run(whole.parent)] if r.checkpoints]
    return sorted(_walk(root), key=lambda run: run.path)


def list_run(run: Path) -> RunDir:
    """The checkpoints directly inside ``run``, in step order."""
    checkpoints, _ = _read_dir(run)
    return RunDir(run, tuple(sorted(checkpoints, key=lambda c: c.step)))


def _walk(top: Path) -> Iterator[RunDir]:
    pending = [top]
    while pending:
        current = pending.pop()
        checkpoints, subdirs = _read_dir(current)
        if checkpoints:
            yield RunDir(current, tuple(sorted(checkpoints, key=lambda c: c.step)))
        pending.extend(subdirs)


def _read_dir(directory: Path) -> tuple[list[CheckpointDir], list[Path]]:
    checkpoints: list[CheckpointDir] = []
    subdirs: list[Path] = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                _sort_entry(entry, directory, checkpoints, subdirs)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot list directory path=%s error=%s", directory, exc.strerror or exc)
    return checkpoints, subdirs


def _sort_entry(
    entry: os.DirEntry[str],
    directory: Path,
    checkpoints: list[CheckpointDir],
    subdirs: list[Path],
) -> None:
    try:
        if not entry.is_dir():
            return
        is_link = entry.is_symlink()
    except OSError:
        return
    step = checkpoint_step(entry.name)
    if step is not None:
        checkpoints.append(CheckpointDir(directory / entry.name, step, is_link))
    elif not is_link and not is_ignored_dir(entry.name):
        subdirs.append(directory / entry.name)

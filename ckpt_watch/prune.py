"""Carry out retention decisions: check again, rename to trash, record, remove off-thread."""

from __future__ import annotations

import errno
import logging
import os
import queue
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ckpt_watch.check import relative_name
from ckpt_watch.history import HistoryError
from ckpt_watch.mounts import mounts_below
from ckpt_watch.ranking import Metric
from ckpt_watch.retention import (
    PIN_FILE,
    RESUME_ONLY_DIR,
    RESUME_ONLY_FILE,
    Decision,
    RetentionRules,
    agree,
    path_problem,
    plan_tree,
    strippable,
)
from ckpt_watch.scan import is_ignored_dir, list_run
from ckpt_watch.trainer_state import (
    STATE_FILE,
    StateVanishedError,
    checkpoint_step,
    last_component,
    read_checkpoint,
    state_stamp,
)

log = logging.getLogger(__name__)

Recorder = Callable[..., object]
Result = Literal["pruned", "stripped", "gone", "skipped"]

# Busy errors that go away by themselves: open files on NFS leave .nfsXXXX entries behind.
RETRY_ERRNOS = frozenset({errno.EBUSY, errno.ENOTEMPTY, errno.EAGAIN, errno.ETXTBSY})
TRASH_PREFIX = ".ckpt-watch-trash-"
TRASH_NAME = re.compile(re.escape(TRASH_PREFIX) + r"(?P<name>.+)-[0-9a-f]{12}")
MAX_DELAY = 10.0


class PrunerClosedError(RuntimeError):
    """Raised when a closed Pruner is asked to prune again."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one delete or strip decision; ``bytes`` is what it freed."""

    decision: Decision
    result: Result
    detail: str = ""
    bytes: int = 0


def trash_name(name: str) -> str:
    """A hidden name, unique in its directory, that only ckpt-watch's trash uses."""
    return f"{TRASH_PREFIX}{name}-{secrets.token_hex(6)}"


class Pruner:
    """Delete and strip checkpoints safely, removing the trash on a worker thread.

    ``record(event, **fields)`` is called once per checkpoint pruned or stripped, after the
    rename and before removal (``History.append`` fits). ``stop`` ends removal retries.
    """

    def __init__(self, record: Recorder, *, stop: threading.Event | None = None) -> None:
        self._record = record
        self._stop = stop or threading.Event()
        self._halt = threading.Event()
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def apply(self, decisions: Iterable[Decision], *, root: Path) -> list[Outcome]:
        """Carry out the delete and strip decisions of a plan made under ``root``.

        Pass each run's whole plan, keep decisions included: each deletion is checked
        again right before it happens, against the tree as it is now and the rest of its
        run's plan, and anything doubtful is skipped and said so.
        """
        if self._closed:
            raise PrunerClosedError("pruner is closed")
        by_run: dict[Path, list[Decision]] = {}
        for decision in decisions:
            by_run.setdefault(decision.path.parent, []).append(decision)

        outcomes = []
        for plan in by_run.values():
            for decision in sorted(plan, key=lambda d: (d.step, d.name)):
                if decision.action != "keep":
                    outcomes.append(self._carry_out(decision, plan, root))
        return outcomes

    def close(self, timeout: float = 10.0) -> bool:
        """Finish queued removals within ``timeout`` seconds; False if some were left."""
        self._closed = True
        with self._lock:
            worker = self._worker
        if worker is None:
            return True
        self._queue.put(None)
        if self._stop.is_set():
            self._halt.set()
        log.info("waiting for trash removal timeout=%.1fs", timeout)
        worker.join(timeout)
        if worker.is_alive():
            self._halt.set()
            log.warning("trash removal still running; leftover trash is finished at next start")
            return False
        return True

    def _carry_out(self, decision: Decision, plan: Sequence[Decision], root: Path) -> Outcome:
        if not os.path.lexists(decision.path):
            return Outcome(decision, "gone", "already gone")
        problem = recheck(decision, plan, root)
        if problem is not None:
            log.info("not pruned path=%s why=%s", decision.path, problem)
            return Outcome(decision, "skipped", problem)
        if decision.action == "delete":
            return self._delete(decision)
        return self._strip(decision)

    def _delete(self, decision: Decision) -> Outcome:
        trash = decision.path.with_name(trash_name(decision.name))
        try:
            os.rename(decision.path, trash)
        except FileNotFoundError:
            return Outcome(decision, "gone", "already gone")
        except OSError as exc:
            log.warning("cannot rename path=%s error=%s", decision.path, exc.strerror or exc)
            return Outcome(decision, "skipped", f"cannot rename: {exc.strerror or exc}")

        freed = tree_size(trash)
        fields = _fields(decision, freed)
        if not self._recorded("pruned", fields, [(trash, decision.path)]):
            return Outcome(decision, "skipped", "history not writable; checkpoint left in place")
        log.info("pruned run=%s checkpoint=%s bytes=%d", decision.run, decision.name, freed)
        self._remove_later(trash)
        return Outcome(decision, "pruned", decision.reason, freed)

    def _strip(self, decision: Decision) -> Outcome:
        names, weights = strippable(decision.path)
        if not weights:
            return Outcome(decision, "skipped", "no weights outside the resume state")
        moved = []
        for name in names:
            trash = decision.path / trash_name(name)
            try:
                os.rename(decision.path / name, trash)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot strip path=%s error=%s", decision.path / name, exc.strerror)
                continue
            moved.append((trash, decision.path / name))
        if not moved:
            return Outcome(decision, "gone", "nothing left to strip")

        freed = sum(tree_size(trash) for trash, _ in moved)
        fields = {**_fields(decision, freed), "removed": sorted(o.name for _, o in moved)}
        if not self._recorded("stripped", fields, moved):
            return Outcome(decision, "skipped", "history not writable; checkpoint left in place")
        log.info("stripped run=%s checkpoint=%s bytes=%d", decision.run, decision.name, freed)
        for trash, _ in moved:
            self._remove_later(trash)
        return Outcome(decision, "stripped", decision.reason, freed)

    def _recorded(
        self, event: str, fields: dict[str, object], moved: list[tuple[Path, Path]]
    ) -> bool:
        """Record ``event``; when that fails, put the renamed entries back and say False."""
        try:
            self._record(event, **fields)
            return True
        except (HistoryError, OSError) as exc:
            log.error("cannot record event=%s error=%s; undoing the rename", event, exc)
        for trash, original in moved:
            try:
                os.rename(trash, original)
            except OSError as exc:
                log.error("cannot undo rename path=%s error=%s", trash, exc.strerror or exc)
        return False

    def _remove_later(self, trash: Path) -> None:
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(
                    target=self._work, name="ckpt-watch-trash", daemon=True
                )
                self._worker.start()
        self._queue.put(trash)

    def _work(self) -> None:
        while (trash := self._queue.get()) is not None:
            if self._halt.is_set():
                continue
            remove_tree(trash, self._wait)

    def _wait(self, delay: float) -> bool:
        return self._halt.wait(delay) or self._stop.is_set()


def recheck(decision: Decision, plan: Sequence[Decision], root: Path) -> str | None:
    """Why ``decision`` may no longer be carried out, or None when it still may.

    The tree may have changed since planning: the checkpoint may have been pinned,
    rewritten or swapped for a link, a checkpoint the plan kept may be gone, and a newer
    checkpoint may have arrived whose state names this one as the Trainer's best.
    """
    path = decision.path
    problem = path_problem(path, path.parent, root)
    if problem is not None:
        return problem
    if os.path.lexists(path / PIN_FILE):
        return f"pinned by a {PIN_FILE} file since the plan"
    mount = mount_inside(path)
    if mount is not None:
        return f"{mount} inside it is another filesystem"
    if decision.stamp is None or state_stamp(path) != decision.stamp:
        return f"{STATE_FILE} changed since the plan"
    for other in plan:
        if other.action == "keep" and other.stamp is not None and not os.path.lexists(other.path):
            return f"{other.name}, kept by the plan, is gone; the plan is out of date"
    newest_planned = max(d.step for d in plan)
    arrived = [c for c in list_run(path.parent).checkpoints if c.step > newest_planned]
    for checkpoint in reversed(arrived):
        try:
            state = read_checkpoint(checkpoint.path).state
        except StateVanishedError:
            continue
        if state is None:
            continue
        named = state.best_model_checkpoint
        if named is not None and last_component(named) == decision.name:
            return f"{checkpoint.path.name} names it the Trainer's best"
        break
    return None


def mount_inside(checkpoint: Path) -> Path | None:
    """A mount point below ``checkpoint``, if there is one.

    Deleting would reach into that filesystem, which is not the checkpoint's to give up.
    Bind mounts of the same filesystem share its device number, so the mount table is read.
    """
    points = mounts_below(checkpoint)
    if points:
        return Path(points[0])
    try:
        device = os.lstat(checkpoint).st_dev
    except OSError:
        return None
    for top, dirs, _files in os.walk(checkpoint, onerror=lambda _error: None):
        for name in dirs:
            inner = Path(top) / name
            try:
                if os.lstat(inner).st_dev != device:
                    return inner
            except OSError:
                continue
    return None


def recover_trash(
    root: Path, record: Recorder, *, stop: threading.Event | None = None, patience: float = 30.0
) -> int:
    """Remove the trash a crash left under ``root``; returns how many entries were removed.

    Each removal is recorded as ``trash_removed``. Busy entries are retried for up to
    ``patience`` seconds each, then left for the next start.
    """
    halt = stop or threading.Event()
    removed = 0
    for trash, checkpoint in find_trash(root):
        deadline = time.monotonic() + patience

        def give_up(delay: float, deadline: float = deadline) -> bool:
            return halt.wait(delay) or time.monotonic() > deadline

        freed = tree_size(trash)
        if not remove_tree(trash, give_up):
            continue
        removed += 1
        fields: dict[str, object] = {"run": relative_name(checkpoint.parent, root)}
        fields.update(checkpoint=checkpoint.name, bytes=freed, path=str(trash))
        log.info("removed leftover trash path=%s bytes=%d", trash, freed)
        try:
            record("trash_removed", **fields)
        except (HistoryError, OSError) as exc:
            log.error("cannot record event=trash_removed error=%s", exc)
    return removed


def find_trash(root: Path) -> Iterator[tuple[Path, Path]]:
    """Each trash entry under ``root`` with the checkpoint it came from (or belongs to).

    Only names this module makes count: a whole ``checkpoint-<int>`` beside its run's
    checkpoints, or resume-only state inside a checkpoint. Links are never followed.
    """
    pending = [root]
    while pending:
        current = pending.pop()
        inside = checkpoint_step(current.name) is not None and current != root
        try:
            with os.scandir(current) as entries:
                found = list(entries)
        except OSError:
            continue
        for entry in found:
            match = TRASH_NAME.fullmatch(entry.name)
            if match is not None:
                name = match.group("name")
                if inside and (RESUME_ONLY_FILE.fullmatch(name) or RESUME_ONLY_DIR.fullmatch(name)):
                    yield Path(entry.path), current
                elif not inside and name == f"checkpoint-{checkpoint_step(name)}":
                    yield Path(entry.path), current / name
            elif not inside and _is_real_dir(entry) and not is_ignored_dir(entry.name):
                pending.append(Path(entry.path))


def remove_tree(path: Path, wait: Callable[[float], bool]) -> bool:
    """Remove a file or tree without following links; True once it is gone.

    Vanishing entries (ENOENT) count as removed. Busy errors are retried with backoff for
    as long as ``wait(delay)`` returns False; any other error gives up at once.
    """
    delay = 0.05
    warned = False
    while True:
        try:
            if os.path.islink(path) or not os.path.isdir(path):
                os.unlink(path)
            else:
                shutil.rmtree(path)
            return True
        except FileNotFoundError:
            if not os.path.lexists(path):
                return True
        except OSError as exc:
            if exc.errno not in RETRY_ERRNOS:
                log.error("cannot remove trash path=%s error=%s", path, exc.strerror or exc)
                return False
            if not warned:
                log.warning("trash busy path=%s error=%s; retrying", path, exc.strerror)
                warned = True
        if wait(delay):
            log.warning("trash removal given up path=%s; left for next start", path)
            return False
        delay = min(delay * 2, MAX_DELAY)


def tree_size(path: Path) -> int:
    """Apparent size in bytes of the files under ``path``, each counted once, links not
    followed."""
    seen: set[tuple[int, int]] = set()
    total = 0
    pending = [path]
    while pending:
        current = pending.pop()
        try:
            info = os.lstat(current)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode):
            try:
                with os.scandir(current) as entries:
                    pending.extend(Path(entry.path) for entry in entries)
            except OSError:
                continue
        elif (info.st_dev, info.st_ino) not in seen:
            seen.add((info.st_dev, info.st_ino))
            total += info.st_size
    return total


def prune_once(
    root: Path,
    metric: Metric,
    rules: RetentionRules,
    confirmed: Sequence[Decision],
    record: Recorder,
    *,
    timeout: float = 600.0,
) -> list[Outcome]:
    """Apply a confirmed plan once: finish old trash, plan again, act where both agree."""
    recover_trash(root, record)
    fresh = agree(confirmed, plan_tree(root, metric, rules, now=time.time()))
    pruner = Pruner(record)
    try:
        return pruner.apply(fresh, root=root)
    finally:
        pruner.close(timeout)


def _fields(decision: Decision, freed: int) -> dict[str, object]:
    return {
        "run": decision.run,
        "checkpoint": decision.name,
        "step": decision.step,
        "reason": decision.reason,
        "bytes": freed,
        "path": str(decision.path),
    }


def _is_real_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False

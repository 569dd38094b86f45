"""Carrying out retention: trash renames, history, background removal, re-checks, recovery."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from factories import trainer_state, write_checkpoint, write_run
from hypothesis import HealthCheck, given, settings
from runs import RunSpec, lay_out_run, rule_sets, run_specs

from ckpt_watch import prune as prune_module
from ckpt_watch.history import History, HistoryError, replay
from ckpt_watch.prune import Pruner, find_trash, recover_trash, remove_tree, trash_name, tree_size
from ckpt_watch.ranking import resolve_metric
from ckpt_watch.retention import Decision, RetentionRules, plan_tree
from ckpt_watch.scan import find_runs

LOSS = resolve_metric("eval_loss")


class Recorder:
    """Collects events the way History.append receives them."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: str, **fields: Any) -> None:
        self.events.append({"event": event, **fields})


def planned(root: Path, **rules: Any) -> list[Decision]:
    return plan_tree(root, LOSS, RetentionRules(**rules), now=time.time())


def apply(root: Path, decisions: list[Decision], record: Recorder) -> list[prune_module.Outcome]:
    """Apply a plan and wait for the background removal to finish."""
    pruner = Pruner(record)
    try:
        return pruner.apply(decisions, root=root)
    finally:
        assert pruner.close(timeout=10)


def names(directory: Path) -> set[str]:
    return {entry.name for entry in directory.iterdir()}


def five_checkpoints(run: Path) -> None:
    """checkpoint-100..500 with weights and optimizer state; the best is checkpoint-200."""
    write_run(run, {100: 0.5, 200: 0.1, 300: 0.4, 400: 0.45, 500: 0.6})
    for step in (100, 200, 300, 400, 500):
        (run / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"w" * 1000)
        (run / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"o" * 3000)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=run_specs(), rules=rule_sets())
def test_applying_a_plan_twice_deletes_nothing_more(
    spec: RunSpec, rules: dict[str, int | None]
) -> None:
    """The second application of a plan, and a fresh plan afterwards, let nothing more go."""
    with tempfile.TemporaryDirectory() as tmp:
        root, outside = Path(tmp) / "root", Path(tmp) / "outside"
        lay_out_run(spec, root / "run", outside)
        outside_before = sorted(str(p) for p in outside.rglob("*"))
        plan = plan_tree(root, LOSS, RetentionRules(**rules), now=time.time())
        doomed = {d.name for d in plan if d.action == "delete"}

        first = Recorder()
        apply(root, plan, first)
        left = names(root / "run")
        second = Recorder()
        again = apply(root, plan, second)
        replanned = plan_tree(root, LOSS, RetentionRules(**rules), now=time.time())

        assert left == {d.name for d in plan} - doomed
        assert {e["checkpoint"] for e in first.events} == doomed
        assert names(root / "run") == left
        assert {o.result for o in again} <= {"gone"}
        assert second.events == []
        assert [d for d in replanned if d.action != "keep"] == []
        assert sorted(str(p) for p in outside.rglob("*")) == outside_before


def test_delete_renames_records_then_removes(tmp_path: Path) -> None:
    """A deleted checkpoint is recorded with its run, step, reason and bytes, then removed."""
    five_checkpoints(tmp_path / "a" / "run1")
    size = tree_size(tmp_path / "a" / "run1" / "checkpoint-300")
    record = Recorder()

    outcomes = apply(tmp_path, planned(tmp_path, keep=2), record)

    assert [(o.decision.name, o.result) for o in outcomes] == [
        ("checkpoint-100", "pruned"),
        ("checkpoint-300", "pruned"),
        ("checkpoint-400", "pruned"),
    ]
    assert names(tmp_path / "a" / "run1") == {"checkpoint-200", "checkpoint-500"}
    assert record.events[1] == {
        "event": "pruned",
        "run": "a/run1",
        "checkpoint": "checkpoint-300",
        "step": 300,
        "reason": "not kept by --keep 2",
        "bytes": size,
        "path": str(tmp_path / "a" / "run1" / "checkpoint-300"),
    }
    assert size > 4000


def test_events_reach_a_real_history_file(tmp_path: Path) -> None:
    """History.append is a recorder: the pruned events are durable JSON lines."""
    five_checkpoints(tmp_path / "run")
    history = History(tmp_path / ".ckpt-watch" / "history.jsonl")

    try:
        pruner = Pruner(history.append)
        pruner.apply(planned(tmp_path, keep=3), root=tmp_path)
        assert pruner.close(timeout=10)
    finally:
        history.close()

    events = list(replay(tmp_path / ".ckpt-watch" / "history.jsonl"))
    assert [(e["event"], e["checkpoint"]) for e in events] == [
        ("pruned", "checkpoint-100"),
        ("pruned", "checkpoint-300"),
    ]


def test_a_crash_between_rename_and_removal_is_finished_at_start_up(tmp_path: Path) -> None:
    """Trash left by a crash is never taken for a checkpoint, and is removed at start-up."""
    run = tmp_path / "run"
    five_checkpoints(run)
    size = tree_size(run / "checkpoint-100")
    trash = run / trash_name("checkpoint-100")
    os.rename(run / "checkpoint-100", trash)
    stripped = run / "checkpoint-300" / trash_name("optimizer.pt")
    os.rename(run / "checkpoint-300" / "optimizer.pt", stripped)
    record = Recorder()

    listed = [c.path.name for r in find_runs(tmp_path) for c in r.checkpoints]
    removed = recover_trash(tmp_path, record)

    assert "checkpoint-100" not in listed and len(listed) == 4
    assert removed == 2
    assert not trash.exists() and not stripped.exists()
    assert names(run) == {"checkpoint-200", "checkpoint-300", "checkpoint-400", "checkpoint-500"}
    assert {(e["event"], e["checkpoint"], e["bytes"]) for e in record.events} == {
        ("trash_removed", "checkpoint-100", size),
        ("trash_removed", "checkpoint-300", 3000),
    }


def test_recovery_leaves_everything_else_alone(tmp_path: Path) -> None:
    """Only trash names this tool makes are removed; links are never followed."""
    run = tmp_path / "run"
    write_run(run, {100: 0.5})
    keepers = [
        run / ".trash-checkpoint-5",
        run / ".git",
        run / ".ckpt-watch-trash-notes.txt-0123456789ab",
        run / ".ckpt-watch-trash-checkpoint-0100-0123456789ab",
        run / "checkpoint-100" / ".ckpt-watch-trash-model.safetensors-0123456789ab",
        tmp_path / "elsewhere" / ".ckpt-watch-trash-checkpoint-7-0123456789ab",
    ]
    for path in keepers:
        path.mkdir(parents=True)
        (path / "data").write_text("x")
    os.symlink(tmp_path / "elsewhere", run / "linked")

    removed = recover_trash(run, Recorder())

    assert removed == 0
    assert all((path / "data").exists() for path in keepers)
    assert list(find_trash(tmp_path / "elsewhere")) != []


def test_links_to_outside_data_are_untouched(tmp_path: Path) -> None:
    """A linked checkpoint stays, and links inside a deleted checkpoint lose only the link."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    five_checkpoints(root / "run")
    write_run(outside, {250: 0.9})
    (outside / "shared.safetensors").write_bytes(b"s" * 500)
    os.symlink(outside / "checkpoint-250", root / "run" / "checkpoint-250")
    os.symlink(
        outside / "shared.safetensors", root / "run" / "checkpoint-100" / "shared.safetensors"
    )
    os.symlink(outside, root / "run" / "checkpoint-300" / "outside-dir")

    plan = planned(root, keep=1)
    apply(root, plan, Recorder())

    assert {d.name for d in plan if d.action == "delete"} >= {"checkpoint-100", "checkpoint-300"}
    assert (root / "run" / "checkpoint-250").is_symlink()
    assert (outside / "shared.safetensors").read_bytes() == b"s" * 500
    assert (outside / "checkpoint-250" / "trainer_state.json").is_file()
    assert not (root / "run" / "checkpoint-100").exists()


def test_the_trainers_rotation_deleting_the_same_checkpoint_is_harmless(tmp_path: Path) -> None:
    """The Trainer removing a checkpoint while we prune it raises nothing and loses nothing else."""
    for attempt in range(30):
        run = tmp_path / f"run{attempt}"
        five_checkpoints(run)
        plan = planned(run, keep=2)
        start = threading.Barrier(2)

        victim = ("checkpoint-100", "checkpoint-300", "checkpoint-400")[attempt % 3]

        def rotate(victim: Path = run / victim, start: threading.Barrier = start) -> None:
            start.wait()
            shutil.rmtree(victim, ignore_errors=True)

        trainer = threading.Thread(target=rotate)
        trainer.start()
        start.wait()
        outcomes = apply(run, plan, Recorder())
        trainer.join()

        by_name = {o.decision.name: o.result for o in outcomes}
        assert by_name[victim] in {"pruned", "gone", "skipped"}
        assert names(run) == {"checkpoint-200", "checkpoint-500"}


def test_a_checkpoint_already_gone_is_not_an_error(tmp_path: Path) -> None:
    """A rename that finds nothing (ENOENT) counts as already gone, with no event."""
    five_checkpoints(tmp_path)
    plan = planned(tmp_path, keep=4)
    shutil.rmtree(tmp_path / "checkpoint-100")
    record = Recorder()

    outcomes = apply(tmp_path, plan, record)

    assert [(o.decision.name, o.result, o.detail) for o in outcomes] == [
        ("checkpoint-100", "gone", "already gone")
    ]
    assert record.events == []


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (
            lambda run: (run / "checkpoint-300" / "KEEP").touch(),
            "pinned by a KEEP file since the plan",
        ),
        (
            lambda run: write_checkpoint(run, 300, trainer_state(300, {300: {"eval_loss": 0.01}})),
            "trainer_state.json changed since the plan",
        ),
        (
            lambda run: (run / "checkpoint-300" / "trainer_state.json").unlink(),
            "trainer_state.json changed since the plan",
        ),
        (
            lambda run: shutil.rmtree(run / "checkpoint-200"),
            "checkpoint-200, kept by the plan, is gone; the plan is out of date",
        ),
        (
            lambda run: write_checkpoint(
                run, 600, trainer_state(600, best_model_checkpoint="/x/checkpoint-300")
            ),
            "checkpoint-600 names it the Trainer's best",
        ),
        (
            lambda run: (
                (run / "checkpoint-300").rename(run / "moved"),
                os.symlink(run / "moved", run / "checkpoint-300"),
            ),
            "a symbolic link",
        ),
    ],
)
def test_every_condition_is_checked_again_before_acting(
    tmp_path: Path, change: Any, why: str
) -> None:
    """A change since the plan that would protect the checkpoint stops its deletion."""
    five_checkpoints(tmp_path)
    plan = [d for d in planned(tmp_path, keep=2) if d.name != "checkpoint-100"]
    change(tmp_path)
    record = Recorder()

    outcomes = apply(tmp_path, plan, record)

    result = {o.decision.name: (o.result, o.detail) for o in outcomes}
    assert result["checkpoint-300"] == ("skipped", why)
    assert (tmp_path / "checkpoint-300").exists()
    assert "checkpoint-300" not in {e["checkpoint"] for e in record.events}


def test_busy_trash_is_retried_until_it_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EBUSY and ENOTEMPTY (open files on NFS) are retried with backoff, never raised."""
    five_checkpoints(tmp_path)
    failures = [errno.EBUSY, errno.ENOTEMPTY]
    real_rmtree = shutil.rmtree

    def flaky(path: Any, *args: Any, **kwargs: Any) -> None:
        if failures:
            raise OSError(failures.pop(0), os.strerror(errno.EBUSY), str(path))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(prune_module.shutil, "rmtree", flaky)

    outcomes = apply(tmp_path, planned(tmp_path, keep=4), Recorder())

    assert [o.result for o in outcomes] == ["pruned"]
    assert failures == []
    assert [n for n in names(tmp_path) if n.startswith(".")] == []


def test_entries_vanishing_during_removal_count_as_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOENT while removing (someone else removed it first) is success."""
    tree = tmp_path / "trash"
    tree.mkdir()
    (tree / "file").write_text("x")

    real_rmtree = shutil.rmtree

    def vanished(path: Any, *args: Any, **kwargs: Any) -> None:
        real_rmtree(path)
        raise FileNotFoundError(errno.ENOENT, "gone", str(path))

    monkeypatch.setattr(prune_module.shutil, "rmtree", vanished)

    assert remove_tree(tree, lambda _delay: True)
    assert not tree.exists()


def test_other_removal_errors_give_up_without_raising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A permission error leaves the trash for the next start instead of crashing."""
    tree = tmp_path / "trash"
    tree.mkdir()

    def denied(path: Any, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, "denied", str(path))

    monkeypatch.setattr(prune_module.shutil, "rmtree", denied)

    assert remove_tree(tree, lambda _delay: False) is False
    assert tree.exists()


def test_close_is_bounded_when_trash_stays_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close(timeout) returns within its bound while removal keeps failing, and the worker ends."""
    five_checkpoints(tmp_path)

    def busy(path: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EBUSY, "busy", str(path))

    monkeypatch.setattr(prune_module.shutil, "rmtree", busy)
    pruner = Pruner(Recorder())
    pruner.apply(planned(tmp_path, keep=4), root=tmp_path)

    started = time.monotonic()
    finished = pruner.close(timeout=0.3)

    assert finished is False
    assert time.monotonic() - started < 2
    assert wait_until(lambda: not any(t.name == "ckpt-watch-trash" for t in threading.enumerate()))
    assert len([n for n in names(tmp_path) if n.startswith(".ckpt-watch-trash-")]) == 1


def test_a_failed_record_puts_the_checkpoint_back(tmp_path: Path) -> None:
    """When the history cannot be written, the rename is undone and nothing is removed."""
    five_checkpoints(tmp_path)
    before = names(tmp_path)

    def broken(event: str, **fields: Any) -> None:
        raise HistoryError("history not written: disk full")

    pruner = Pruner(broken)
    outcomes = pruner.apply(planned(tmp_path, keep=4), root=tmp_path)
    assert pruner.close(timeout=5)

    assert [(o.result, o.detail) for o in outcomes] == [
        ("skipped", "history not writable; checkpoint left in place")
    ]
    assert names(tmp_path) == before


def test_strip_keeps_weights_and_state(tmp_path: Path) -> None:
    """--strip removes optimizer, scheduler, RNG and DeepSpeed state and records the bytes."""
    five_checkpoints(tmp_path)
    checkpoint = tmp_path / "checkpoint-100"
    (checkpoint / "scheduler.pt").write_bytes(b"s" * 10)
    (checkpoint / "rng_state_3.pth").write_bytes(b"r" * 20)
    (checkpoint / "global_step100").mkdir()
    (checkpoint / "global_step100" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(
        b"z" * 400
    )
    (checkpoint / "config.json").write_text("{}")
    record = Recorder()

    outcomes = apply(tmp_path, planned(tmp_path, keep=4, strip=True), record)
    again = planned(tmp_path, keep=4, strip=True)

    assert [(o.decision.name, o.result, o.bytes) for o in outcomes] == [
        ("checkpoint-100", "stripped", 3430)
    ]
    assert names(checkpoint) == {"model.safetensors", "trainer_state.json", "config.json"}
    assert record.events[0]["event"] == "stripped"
    assert record.events[0]["removed"] == [
        "global_step100",
        "optimizer.pt",
        "rng_state_3.pth",
        "scheduler.pt",
    ]
    assert {d.name: d.reason for d in again}["checkpoint-100"].endswith("already stripped")


def open_paths() -> list[str]:
    """What this process's file descriptors point at (deleted files end in "(deleted)")."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # closed since the listing, such as the listing's own descriptor
    return paths


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_no_file_inside_a_checkpoint_stays_open(tmp_path: Path) -> None:
    """Once pruning and its removals are done, nothing under the tree is held open."""
    five_checkpoints(tmp_path)
    pruner = Pruner(Recorder())
    pruner.apply(planned(tmp_path, keep=2, keep_every=400), root=tmp_path)

    assert pruner.close(timeout=10)

    assert [p for p in open_paths() if p.startswith(str(tmp_path.resolve()))] == []

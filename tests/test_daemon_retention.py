"""Retention inside the daemon: pruned as checkpoints arrive, never what must stay."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_until
from factories import trainer_state, write_checkpoint, write_run

from ckpt_watch.engine import Engine
from ckpt_watch.history import History, replay
from ckpt_watch.keeper import Keeper
from ckpt_watch.prune import Pruner
from ckpt_watch.ranking import resolve_metric
from ckpt_watch.retention import RetentionRules


def save(run: Path, values: dict[int, float], step: int) -> None:
    """Write one new checkpoint at ``step`` whose log holds every evaluation up to it."""
    evals = {at: {"eval_loss": value} for at, value in values.items() if at <= step}
    write_checkpoint(run, step, trainer_state(step, evals))


def on_disk(run: Path) -> list[str]:
    """Everything in the run but the history directory, in step order."""
    names = (p.name for p in run.iterdir() if p.name != ".ckpt-watch")
    return sorted(names, key=lambda n: (len(n), n))


def kinds(path: Path) -> list[object]:
    return [e["event"] for e in replay(path)]


def engine_with_keep(root: Path, keep: int) -> tuple[Engine, Pruner, Path]:
    path = root / ".ckpt-watch" / "history.jsonl"
    history = History(path)
    pruner = Pruner(history.append)
    metric = resolve_metric()
    keeper = Keeper(root, metric, RetentionRules(keep=keep), pruner)
    engine = Engine(root, metric, history, keeper=keeper)
    engine.load(replay(path))
    engine.first_scan()
    return engine, pruner, path


def test_keep_prunes_as_checkpoints_arrive_and_keeps_best_and_newest(tmp_path: Path) -> None:
    """With --keep 2 the best and the newest stay; the rest go, each recorded as pruned."""
    run = tmp_path / "run"
    engine, pruner, history = engine_with_keep(tmp_path, keep=2)
    values = {100: 0.5, 200: 0.2, 300: 0.4, 400: 0.6}

    for step in values:
        save(run, values, step)
        engine.refresh(run)
    assert pruner.close(10)

    assert on_disk(run) == ["checkpoint-200", "checkpoint-400"]
    pruned = [e["checkpoint"] for e in replay(history) if e["event"] == "pruned"]
    assert sorted(pruned) == ["checkpoint-100", "checkpoint-300"]
    assert "removed" not in kinds(history)


def test_trainer_best_is_kept_even_when_our_metric_disagrees(tmp_path: Path) -> None:
    """The checkpoint the Trainer names as best survives, so its final load still works."""
    run = tmp_path / "run"
    engine, pruner, _ = engine_with_keep(tmp_path, keep=1)
    values = {100: 0.9, 200: 0.5, 300: 0.7}
    for step in values:
        evals = {at: {"eval_loss": value} for at, value in values.items() if at <= step}
        state = trainer_state(step, evals, best_model_checkpoint="/elsewhere/out/checkpoint-100")
        write_checkpoint(run, step, state)
        engine.refresh(run)
    assert pruner.close(10)

    assert on_disk(run) == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]


def test_checkpoint_without_readable_state_is_never_pruned(tmp_path: Path) -> None:
    """A checkpoint still being written (no state yet) is left alone."""
    run = tmp_path / "run"
    engine, pruner, _ = engine_with_keep(tmp_path, keep=1)
    (run / "checkpoint-50").mkdir(parents=True)
    (run / "checkpoint-50" / "model.safetensors").write_bytes(b"weights")

    write_run(run, {100: 0.5, 200: 0.4, 300: 0.3})
    engine.refresh(run)
    assert pruner.close(10)

    assert "checkpoint-50" in on_disk(run)
    assert on_disk(run) == ["checkpoint-50", "checkpoint-300"]


def test_daemon_with_keep_recovers_trash_and_prunes(tmp_path: Path) -> None:
    """start --keep finishes trash a crash left, prunes, and stops cleanly."""
    root = tmp_path / "models"
    run = root / "run"
    write_run(run, {100: 0.5, 200: 0.4, 300: 0.3})
    leftover = run / ".ckpt-watch-trash-checkpoint-50-0123456789ab"
    leftover.mkdir()
    (leftover / "optimizer.pt").write_bytes(b"x" * 100)
    history = root / ".ckpt-watch" / "history.jsonl"
    command = [sys.executable, "-m", "ckpt_watch", "start", str(root), "--keep", "1"]
    daemon = subprocess.Popen(command, stderr=subprocess.PIPE)

    assert wait_until(lambda: history.exists() and "started" in kinds(history), timeout=30)
    assert wait_until(lambda: on_disk(run) == ["checkpoint-300"], timeout=30)
    save(run, {100: 0.5, 200: 0.4, 300: 0.3, 400: 0.2}, 400)
    assert wait_until(lambda: on_disk(run) == ["checkpoint-400"], timeout=30)
    daemon.send_signal(signal.SIGTERM)
    daemon.communicate(timeout=20)

    assert daemon.returncode == 0
    assert "trash_removed" in kinds(history)
    pruned = [e["checkpoint"] for e in replay(history) if e["event"] == "pruned"]
    assert sorted(pruned) == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]


def test_prune_refuses_a_tree_a_daemon_watches(tmp_path: Path) -> None:
    """A one-off prune under a watched root leaves the deleting to the daemon."""
    root = tmp_path / "models"
    write_run(root / "run", {100: 0.5, 200: 0.4})
    history = root / ".ckpt-watch" / "history.jsonl"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ckpt_watch", "start", str(root)], stderr=subprocess.DEVNULL
    )
    try:
        assert wait_until(lambda: history.exists() and "started" in kinds(history), timeout=30)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "ckpt_watch",
                "prune",
                str(root / "run"),
                "--keep",
                "1",
                "--yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)

    assert done.returncode == 1
    assert f"pid {daemon.pid}" in done.stderr and "is watching" in done.stderr
    assert on_disk(root / "run") == ["checkpoint-100", "checkpoint-200"]


def test_a_training_started_again_in_the_directory_keeps_its_checkpoints(tmp_path: Path) -> None:
    """The old training's checkpoints never crowd out the live training's best and newest."""
    run = tmp_path / "run"
    engine, pruner, _ = engine_with_keep(tmp_path, keep=2)
    old = {100: 0.5, 200: 0.4, 300: 0.3}
    for step in old:
        save(run, old, step)
        engine.refresh(run)

    restarted = {20: 0.9, 40: 0.8, 60: 0.85}
    for step in restarted:
        evals = {at: {"eval_loss": v} for at, v in restarted.items() if at <= step}
        write_checkpoint(run, step, trainer_state(step, evals, train_loss=3.0))
        engine.refresh(run)
    assert pruner.close(10)

    live = {"checkpoint-40", "checkpoint-60"}
    assert live <= set(on_disk(run))
    assert {"checkpoint-200", "checkpoint-300"} <= set(on_disk(run))


def test_prune_keeps_the_live_training_of_a_restarted_run(tmp_path: Path) -> None:
    """prune ranks only the training that saved last; an older one in the directory stays."""
    run = tmp_path / "models" / "run"
    write_run(run, {100: 0.5, 200: 0.4, 300: 0.3})
    restarted = {20: 0.9, 40: 0.8, 60: 0.85}
    for step in restarted:
        evals = {at: {"eval_loss": v} for at, v in restarted.items() if at <= step}
        write_checkpoint(run, step, trainer_state(step, evals, train_loss=3.0))

    done = subprocess.run(
        [sys.executable, "-m", "ckpt_watch", "prune", str(run), "--keep", "2", "--yes"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert on_disk(run) == [
        "checkpoint-40",
        "checkpoint-60",
        "checkpoint-100",
        "checkpoint-200",
        "checkpoint-300",
    ]


def test_prune_never_reaches_into_a_mount_inside_a_checkpoint(tmp_path: Path) -> None:
    """A filesystem mounted inside a checkpoint keeps that checkpoint, and its files, whole."""
    run = tmp_path / "models" / "run"
    write_run(run, {100: 0.5, 200: 0.4, 300: 0.3})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("data")
    inner = run / "checkpoint-100" / "data"
    inner.mkdir()
    mounted = subprocess.run(
        ["mount", "--bind", str(outside), str(inner)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ckpt_watch", "prune", str(run), "--keep", "1", "--yes"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        subprocess.run(["umount", "-l", str(inner)], check=False)

    assert done.returncode == 0, done.stderr
    assert (outside / "precious").read_text() == "data"
    assert "checkpoint-100" in on_disk(run)
    assert "another filesystem" in done.stdout + done.stderr


def test_a_metric_that_ranks_nothing_lets_nothing_go(tmp_path: Path) -> None:
    """With a metric the run never logged, the real best cannot be told: nothing is deleted."""
    run = tmp_path / "models" / "run"
    write_run(run, {100: 0.5, 200: 0.2, 300: 0.4, 400: 0.6})

    command = ["prune", str(run), "--metric", "accuracy", "--keep", "1", "--yes"]
    done = subprocess.run(
        [sys.executable, "-m", "ckpt_watch", *command],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert on_disk(run) == ["checkpoint-100", "checkpoint-200", "checkpoint-300", "checkpoint-400"]
    assert "no finite eval_accuracy in this run" in done.stdout

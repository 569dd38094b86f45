"""Retention inside the daemon: pruned as checkpoints arrive, never what must stay."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

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
    return sorted((p.name for p in run.iterdir()), key=lambda n: (len(n), n))


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

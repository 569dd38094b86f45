"""The reaction to a changed run, driven directly without any watcher thread."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from factories import dumps, trainer_state, write_checkpoint, write_run

from ckpt_watch.engine import Engine
from ckpt_watch.history import History, replay
from ckpt_watch.ranking import resolve_metric


class Setup:
    """A root, its history file, and engines that share them as restarts would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.history_path = root / ".ckpt-watch" / "history.jsonl"
        self.history: History | None = None

    def start(self, metric: str = "eval_loss", mode: str | None = None) -> Engine:
        """A fresh engine that replays the history, as a restarted daemon does."""
        if self.history is not None:
            self.history.close()
        self.history = History(self.history_path)
        engine = Engine(self.root, resolve_metric(metric, mode), self.history)
        engine.load(replay(self.history_path))
        engine.first_scan()
        self.history.append("started", metric=engine.metric.name)
        return engine

    def events(self, kind: str | None = None) -> list[dict[str, object]]:
        found = list(replay(self.history_path))
        return [e for e in found if kind is None or e["event"] == kind]


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def test_first_start_records_a_baseline_without_new_bests(setup: Setup) -> None:
    """Checkpoints already there at the very first start are a baseline, not news."""
    write_run(setup.root / "run", {100: 0.9, 200: 0.5})

    setup.start()

    checkpoints = setup.events("checkpoint")
    assert [e["checkpoint"] for e in checkpoints] == ["checkpoint-100", "checkpoint-200"]
    assert all(e["baseline"] is True for e in checkpoints)
    assert setup.events("new_best") == []


def test_restart_over_unchanged_tree_records_nothing_new(setup: Setup) -> None:
    """A restart learns what it knows from the history and appends no checkpoint events."""
    write_run(setup.root / "run", {100: 0.9, 200: 0.5})
    setup.start()
    before = len(setup.events())

    setup.start()

    after = setup.events()
    assert [e["event"] for e in after[before:]] == ["started"]


def test_better_checkpoint_is_a_new_best_with_previous(setup: Setup) -> None:
    """A value better than every earlier one is a new best naming the one it beat."""
    run = setup.root / "run"
    write_run(run, {100: 0.9})
    engine = setup.start()

    write_run(run, {100: 0.9, 200: 0.7})
    engine.refresh(run)

    (best,) = setup.events("new_best")
    assert (best["checkpoint"], best["value"]) == ("checkpoint-200", 0.7)
    assert (best["previous"], best["previous_value"]) == ("checkpoint-100", 0.9)


def test_worse_checkpoint_is_recorded_but_not_a_new_best(setup: Setup) -> None:
    """A worse checkpoint gets its record and nothing more."""
    run = setup.root / "run"
    write_run(run, {100: 0.5})
    engine = setup.start()

    write_run(run, {100: 0.5, 200: 0.7})
    engine.refresh(run)

    assert [e["checkpoint"] for e in setup.events("checkpoint")][-1] == "checkpoint-200"
    assert setup.events("new_best") == []


def test_one_record_per_checkpoint_however_many_refreshes(setup: Setup) -> None:
    """Refreshing a run again, or touching a state file, records nothing more."""
    run = setup.root / "run"
    engine = setup.start()
    write_run(run, {100: 0.5})

    engine.refresh(run)
    engine.refresh(run)
    os.utime(run / "checkpoint-100" / "trainer_state.json", ns=(1, 1))
    engine.refresh(run)

    assert len(setup.events("checkpoint")) == 1


def test_removed_best_still_counts_as_reached(setup: Setup) -> None:
    """After the best is deleted, a value worse than it is not a new best."""
    run = setup.root / "run"
    write_run(run, {100: 0.9, 200: 0.4})
    engine = setup.start()

    shutil.rmtree(run / "checkpoint-200")
    engine.refresh(run)
    write_run(run, {100: 0.9, 200: 0.4, 300: 0.6})
    shutil.rmtree(run / "checkpoint-200")
    engine.refresh(run)

    assert [e["checkpoint"] for e in setup.events("removed")] == ["checkpoint-200"]
    assert setup.events("new_best") == []
    assert engine.runs["run"].current_best(engine.metric).name == "checkpoint-300"  # type: ignore[union-attr]


def test_half_written_state_is_retried_and_recorded_once(setup: Setup) -> None:
    """A state file read mid-write is not ranked; once complete it is recorded once."""
    run = setup.root / "run"
    engine = setup.start()
    checkpoint = run / "checkpoint-100"
    checkpoint.mkdir(parents=True)
    content = dumps(trainer_state(100, {100: {"eval_loss": 0.3}}))
    (checkpoint / "trainer_state.json").write_text(content[: len(content) // 2])

    assert engine.refresh(run) is True
    assert setup.events("checkpoint") == []

    (checkpoint / "trainer_state.json").write_text(content)
    assert engine.refresh(run) is False
    (record,) = setup.events("checkpoint")
    assert record["value"] == 0.3
    assert len(setup.events("new_best")) == 1


def test_run_restarted_in_same_directory_is_a_new_incarnation(setup: Setup) -> None:
    """Steps going backwards start a new training: its first best is news of its own."""
    run = setup.root / "run"
    write_run(run, {100: 0.2, 200: 0.1})
    engine = setup.start()

    shutil.rmtree(run)
    engine.refresh(run)
    write_checkpoint(run, 100, trainer_state(100, {100: {"eval_loss": 0.8}}, train_loss=2.0))
    engine.refresh(run)

    (best,) = setup.events("new_best")
    assert (best["checkpoint"], best["value"], best["previous"]) == ("checkpoint-100", 0.8, None)
    assert best["incarnation"] == 1


def test_overwritten_checkpoint_with_other_training_is_a_new_incarnation(setup: Setup) -> None:
    """A checkpoint rewritten by a restarted training is not compared with stale values."""
    run = setup.root / "run"
    write_run(run, {100: 0.2, 200: 0.1})
    engine = setup.start()

    write_checkpoint(run, 100, trainer_state(100, {100: {"eval_loss": 0.9}}, train_loss=3.0))
    engine.refresh(run)

    (best,) = setup.events("new_best")
    assert (best["checkpoint"], best["value"]) == ("checkpoint-100", 0.9)


def test_new_run_found_at_restart_reports_its_best_once(setup: Setup) -> None:
    """A run that appeared while the daemon was down gives one new best, then none again."""
    setup.start()
    write_run(setup.root / "late", {100: 0.9, 200: 0.6, 300: 0.5})

    setup.start()
    setup.start()

    (best,) = setup.events("new_best")
    assert (best["run"], best["checkpoint"], best["previous"]) == ("late", "checkpoint-300", None)


def test_new_best_lost_in_a_crash_is_recorded_at_restart(setup: Setup) -> None:
    """A checkpoint recorded just before a crash, without its new_best, still gets one."""
    run = setup.root / "run"
    write_run(run, {100: 0.9})
    engine = setup.start()
    write_run(run, {100: 0.9, 200: 0.3})
    engine.refresh(run)
    lines = setup.history_path.read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["event"] != "new_best"]
    setup.history_path.write_text("\n".join(kept) + "\n")

    setup.start()

    (best,) = setup.events("new_best")
    assert best["checkpoint"] == "checkpoint-200"


def test_nan_is_recorded_but_never_a_new_best(setup: Setup) -> None:
    """A NaN evaluation is recorded as the string NaN and never announced as a best."""
    run = setup.root / "run"
    engine = setup.start()
    write_run(run, {100: float("nan")})

    engine.refresh(run)

    (record,) = setup.events("checkpoint")
    assert record["value"] == "NaN"
    assert setup.events("new_best") == []


def test_value_logged_by_newer_sibling_is_lent(setup: Setup) -> None:
    """An evaluation logged after its checkpoint was saved reaches it from the next one."""
    run = setup.root / "run"
    engine = setup.start()
    write_checkpoint(run, 100, trainer_state(100, {}))
    engine.refresh(run)
    write_checkpoint(run, 200, trainer_state(200, {100: {"eval_loss": 0.4}}))
    engine.refresh(run)

    lent = [e for e in setup.events("checkpoint") if e["checkpoint"] == "checkpoint-100"]
    assert lent[-1]["value"] == 0.4 and lent[-1]["value_from"] == "checkpoint-200"
    assert setup.events("new_best")[0]["checkpoint"] == "checkpoint-100"


def test_other_metric_at_restart_is_a_new_baseline(setup: Setup) -> None:
    """Changing the metric re-reads the tree as a baseline instead of flooding new bests."""
    write_run(setup.root / "run", {100: 0.9, 200: 0.95}, metric="eval_accuracy")
    setup.start()

    setup.start(metric="accuracy")

    accuracy = [e for e in setup.events("checkpoint") if e["metric"] == "eval_accuracy"]
    assert len(accuracy) == 2 and all(e["baseline"] for e in accuracy)
    assert setup.events("new_best") == []


def test_checkpoint_internals_are_never_read(setup: Setup) -> None:
    """Only trainer_state.json directly inside a checkpoint matters; shards are ignored."""
    run = setup.root / "run"
    write_run(run, {100: 0.5})
    shard = run / "checkpoint-100" / "global_step100"
    shard.mkdir()
    (shard / "checkpoint-7").mkdir()
    write_checkpoint(shard, 5)

    engine = setup.start()

    assert list(engine.runs) == ["run"]

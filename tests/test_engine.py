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


def test_checkpoints_arriving_out_of_order_are_one_training(setup: Setup) -> None:
    """A run copied in newest-first is one training: the older copy is no new best."""
    source = setup.root.parent / "source"
    write_run(source, {1000: 0.80, 1800: 0.75})
    run = setup.root / "run"
    engine = setup.start()

    shutil.copytree(source / "checkpoint-1800", run / "checkpoint-1800")
    engine.refresh(run)
    shutil.copytree(source / "checkpoint-1000", run / "checkpoint-1000")
    engine.refresh(run)

    assert [e["checkpoint"] for e in setup.events("new_best")] == ["checkpoint-1800"]
    assert {e["incarnation"] for e in setup.events("checkpoint")} == {0}


def test_resume_from_an_earlier_checkpoint_is_the_same_training(setup: Setup) -> None:
    """Resuming from checkpoint-200 and saving checkpoint-300 again compares with 200's best."""
    run = setup.root / "run"
    write_run(run, {100: 0.9, 200: 0.8, 300: 0.95})
    engine = setup.start()

    evals = {100: {"eval_loss": 0.9}, 200: {"eval_loss": 0.8}, 300: {"eval_loss": 0.85}}
    write_checkpoint(run, 300, trainer_state(300, evals))
    engine.refresh(run)

    assert setup.events("new_best") == []
    assert setup.events("checkpoint")[-1]["incarnation"] == 0


def test_root_that_looks_empty_records_no_removals(setup: Setup) -> None:
    """An unmounted root looks empty; that is not every checkpoint deleted."""
    write_run(setup.root / "run", {100: 0.5})
    engine = setup.start()
    aside = setup.root.parent / "aside"
    shutil.move(setup.root / "run", aside)

    engine.reconcile()
    shutil.move(aside, setup.root / "run")
    engine.reconcile()

    assert setup.events("removed") == []
    assert len(setup.events("checkpoint")) == 1


def test_new_best_made_under_another_metric_is_still_news(setup: Setup) -> None:
    """Switching metric and back: a new best saved meanwhile is announced once."""
    run = setup.root / "run"
    values = {100: {"eval_loss": 0.5, "eval_accuracy": 0.8}}
    write_checkpoint(run, 100, trainer_state(100, values))
    setup.start()
    setup.start(metric="accuracy")
    values[200] = {"eval_loss": 0.3, "eval_accuracy": 0.9}
    write_checkpoint(run, 200, trainer_state(200, values))

    setup.start()

    loss_records = [e for e in setup.events("checkpoint") if e["metric"] == "eval_loss"]
    assert [e["checkpoint"] for e in loss_records] == ["checkpoint-100", "checkpoint-200"]
    best = [e for e in setup.events("new_best") if e["metric"] == "eval_loss"]
    assert [e["checkpoint"] for e in best] == ["checkpoint-200"]


def test_unusable_state_is_not_read_again_until_it_changes(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken state is read once; later refreshes only look at its size and time."""
    from ckpt_watch import engine as engine_module

    reads: list[Path] = []
    real = engine_module.read_checkpoint

    def counting(path: Path) -> object:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(engine_module, "read_checkpoint", counting)
    run = setup.root / "run"
    (run / "checkpoint-100").mkdir(parents=True)
    (run / "checkpoint-100" / "trainer_state.json").write_text('{"global_step": 1')
    engine = setup.start()

    for _ in range(5):
        engine.refresh(run)
    (run / "checkpoint-100" / "trainer_state.json").write_text(dumps(trainer_state(100)))
    engine.refresh(run)

    assert len(reads) == 2
    assert [e["checkpoint"] for e in setup.events("checkpoint")] == ["checkpoint-100"]


def test_old_broken_state_is_not_retried_on_a_timer(setup: Setup) -> None:
    """A state broken for longer than the grace period waits for an event, not a timer."""
    run = setup.root / "run"
    (run / "checkpoint-100").mkdir(parents=True)
    state = run / "checkpoint-100" / "trainer_state.json"
    state.write_text("{")
    os.utime(state, (1, 1))
    engine = setup.start()

    assert engine.refresh(run) is False


def test_bad_history_lines_are_skipped_not_fatal(setup: Setup) -> None:
    """Hand-edited events with missing or wrong fields are skipped at replay."""
    write_run(setup.root / "run", {100: 0.5})
    setup.start()
    with open(setup.history_path, "a") as handle:
        handle.write('{"v":1,"event":"checkpoint","run":"r"}\n')
        handle.write('{"v":1,"event":"checkpoint","run":"r","checkpoint":"c","step":"nine"}\n')
        handle.write('{"v":1,"event":"new_best","run":["x"]}\n')

    engine = setup.start()

    assert "r" not in engine.runs and engine.runs["run"].known


def test_stop_request_ends_the_first_scan_early(tmp_path: Path) -> None:
    """A stop requested during the first scan is honoured between runs."""
    import threading

    for index in range(5):
        write_run(tmp_path / f"run{index}", {100: 0.5})
    history = History(tmp_path / "h.jsonl")
    stop = threading.Event()
    stop.set()
    engine = Engine(tmp_path, resolve_metric(), history, stop=stop)

    engine.first_scan()

    assert list(replay(tmp_path / "h.jsonl")) == []

"""Every real file and run in the shared corpus gives the answers written beside it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import CORPUS, corpus_dir, lay_out

from ckpt_watch.check import check_path
from ckpt_watch.ranking import resolve_metric
from ckpt_watch.trainer_state import read_checkpoint


def answers() -> dict[str, Any]:
    """ANSWERS.json, or empty (the tests then skip) when the corpus is not beside the project."""
    path = CORPUS / "ANSWERS.json"
    return json.loads(path.read_text()) if path.is_file() else {"single": {}, "runs": {}}


def number(value: float | str | None) -> float | None:
    """A number as ANSWERS.json writes it (non-finite values are strings)."""
    return float(value) if isinstance(value, str) else value


def same(actual: float | None, expected: float | str | None) -> bool:
    wanted = number(expected)
    if actual is None or wanted is None:
        return actual is wanted
    return actual == wanted or (math.isnan(actual) and math.isnan(wanted))


SINGLE = answers()["single"]
RUNS = answers()["runs"]


def test_corpus_is_complete() -> None:
    """Every file in the corpus has an answer, so none is silently left untested."""
    corpus = corpus_dir()

    files = {path.name for path in (corpus / "trainer_states").glob("*.json")}
    runs = {path.name for path in (corpus / "runs").iterdir() if path.is_dir()}

    assert files == set(SINGLE)
    assert runs == set(RUNS)
    assert len(files) >= 25


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_single_file(tmp_path: Path, name: str) -> None:
    """Laid out as checkpoint-<global_step>, each file reads with its documented answers."""
    expected = SINGLE[name]
    source = corpus_dir() / "trainer_states" / name
    lay_out(source, tmp_path / "run", expected["global_step"])

    checkpoint = read_checkpoint(tmp_path / "run" / f"checkpoint-{expected['global_step']}")
    (report,) = list(check_path(tmp_path / "run", resolve_metric("eval_loss")))

    assert checkpoint.error is None
    assert checkpoint.state is not None
    assert checkpoint.state.global_step == expected["global_step"]
    assert same(checkpoint.state.epoch, expected["epoch"])
    (entry,) = report.ranking.entries
    assert same(entry.value, expected["eval_loss_at_step"])
    trainer = report.ranking.trainer_best
    assert (trainer.name if trainer else None) == expected["trainer_best"]
    best = report.ranking.best
    finite = entry.value is not None and math.isfinite(entry.value)
    assert (best.name if best else None) == (entry.name if finite else None)
    if trainer is not None and trainer.name != entry.name:  # laid out alone, its best is gone
        assert not trainer.on_disk
        assert (report.ranking.disagreement() or "").endswith(
            f"{trainer.name} is no longer on disk"
        )


@pytest.mark.parametrize(
    ("run", "metric"),
    [(run, metric) for run in sorted(RUNS) for metric in sorted(RUNS[run]["by_metric"])],
)
def test_run(run: str, metric: str) -> None:
    """Each real run, read in place, gives its checkpoints, values and best per metric."""
    expected = RUNS[run]
    wanted = expected["by_metric"][metric]

    (report,) = list(check_path(corpus_dir() / "runs" / run, resolve_metric(metric)))

    ranking = report.ranking
    assert report.run == "."
    assert [entry.name for entry in ranking.entries] == expected["checkpoints"]
    assert ranking.metric.mode == wanted["mode"]
    for entry in ranking.entries:
        assert same(entry.value, wanted["values"][entry.name]), entry.name
    assert (ranking.best.name if ranking.best else None) == wanted["best"]
    assert (ranking.trainer_best.name if ranking.trainer_best else None) == expected["trainer_best"]
    assert all(entry.checkpoint.error is None for entry in ranking.entries)
    agree = expected["trainer_best"] in (None, wanted["best"])
    assert (ranking.disagreement() is None) == agree


def test_whole_corpus_tree_in_one_check() -> None:
    """All runs under the corpus at once: one report per run, each run named relative to it."""
    reports = list(check_path(corpus_dir() / "runs", resolve_metric("eval_loss")))

    assert [report.run for report in reports] == sorted(RUNS)
    for report in reports:
        best = report.ranking.best
        assert (best.name if best else None) == RUNS[report.run]["by_metric"]["eval_loss"]["best"]


def test_wer_trap_with_explicit_direction(tmp_path: Path) -> None:
    """File 14: the Trainer kept the worst WER; --metric wer --mode min ranks step 2000."""
    source = corpus_dir() / "trainer_states" / "14_whisper-bgs-without-best-ckpt.json"
    lay_out(source, tmp_path / "run", 2000)
    command = [sys.executable, "-m", "ckpt_watch", "check", str(tmp_path / "run")]

    result = subprocess.run(
        [*command, "--metric", "wer", "--mode", "min", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    (run,) = json.loads(result.stdout)["runs"]
    assert (run["metric"], run["mode"], run["best"]) == ("eval_wer", "min", "checkpoint-2000")
    (entry,) = run["checkpoints"]
    state = json.loads(source.read_bytes())
    wers = {row["step"]: row["eval_wer"] for row in state["log_history"] if "eval_wer" in row}
    assert entry["value"] == wers[2000]
    assert state["best_metric"] == max(wers.values())  # the trap: the Trainer kept the worst


def test_multi_eval_sets_do_not_crash(tmp_path: Path) -> None:
    """File 25 logs eval_g0_loss and friends but no eval_loss: unranked, and rankable by name."""
    source = corpus_dir() / "trainer_states" / "25_multi-eval-sets-no-eval_loss.json"
    lay_out(source, tmp_path / "run", 12030)
    state = json.loads(source.read_bytes())
    names = {k for row in state["log_history"] if row.get("step") == 12030 for k in row}
    eval_keys = sorted(k for k in names if k.startswith("eval_") and k.endswith("_loss"))

    (by_loss,) = check_path(tmp_path / "run", resolve_metric("eval_loss"))
    (by_set,) = check_path(tmp_path / "run", resolve_metric(eval_keys[0]))

    assert by_loss.ranking.best is None
    assert eval_keys
    assert by_set.ranking.best is not None
    assert by_set.ranking.best.name == "checkpoint-12030"


def test_trainer_best_on_disk_without_its_state(tmp_path: Path) -> None:
    """File 24's story: checkpoint-1800 is there but holds no state; the note says just that."""
    source = (
        corpus_dir() / "trainer_states" / "24_llama3-earlystopping-best-sibling-missing-state.json"
    )
    lay_out(source, tmp_path / "run", 2500)
    (tmp_path / "run" / "checkpoint-1800").mkdir()

    (report,) = check_path(tmp_path / "run", resolve_metric("eval_loss"))

    ranking = report.ranking
    assert [(e.name, e.rank) for e in ranking.entries] == [
        ("checkpoint-1800", None),
        ("checkpoint-2500", 1),
    ]
    assert ranking.trainer_best is not None and ranking.trainer_best.on_disk
    assert ranking.disagreement() == (
        "the Trainer names checkpoint-1800, we name checkpoint-2500: "
        "checkpoint-1800 is listed with an error, so not ranked"
    )

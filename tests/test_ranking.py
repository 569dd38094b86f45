"""Ranking one run: metric names, direction, NaN, ties, lent values, the Trainer's own best."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import pytest
from factories import trainer_state, write_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_watch.ranking import Metric, MetricError, RunRanking, rank_run, resolve_metric
from ckpt_watch.trainer_state import Checkpoint, TrainerState, read_checkpoint

LOSS = resolve_metric("eval_loss")
RUN = Path("/nowhere/run")


def checkpoint(
    step: int,
    value: float | None = None,
    *,
    metric: str = "eval_loss",
    best: str | None = None,
    best_metric: float | None = None,
    run: Path = RUN,
) -> Checkpoint:
    """A checkpoint read from a file that logged ``value`` at its own step (or nothing)."""
    evals = {step: {metric: value}} if value is not None else {}
    state = TrainerState(step, step / 100, 1000, evals, best_metric, best)
    return Checkpoint(run / f"checkpoint-{step}", step, state=state)


def broken(step: int, run: Path = RUN) -> Checkpoint:
    return Checkpoint(run / f"checkpoint-{step}", step, error="empty file")


def ranks(ranking: RunRanking) -> dict[str, int | None]:
    return {entry.name: entry.rank for entry in ranking.entries}


# --- the metric ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "mode", "expected"),
    [
        ("eval_loss", None, Metric("eval_loss", "min")),
        ("loss", None, Metric("eval_loss", "min")),
        ("accuracy", None, Metric("eval_accuracy", "max")),
        ("eval_accuracy", None, Metric("eval_accuracy", "max")),
        (" accuracy ", None, Metric("eval_accuracy", "max")),
        ("eval_g0_loss", None, Metric("eval_g0_loss", "min")),
        ("nll_loss", None, Metric("eval_nll_loss", "min")),
        ("wer", None, Metric("eval_wer", "max")),
        ("wer", "min", Metric("eval_wer", "min")),
        ("perplexity", None, Metric("eval_perplexity", "max")),
        ("eval_loss", "max", Metric("eval_loss", "max")),
        ("rewards/chosen", None, Metric("eval_rewards/chosen", "max")),
        ("lossy_f1", None, Metric("eval_lossy_f1", "max")),
        ("eval_dim_768_cosine_ndcg@10", None, Metric("eval_dim_768_cosine_ndcg@10", "max")),
    ],
)
def test_resolve_metric(name: str, mode: str | None, expected: Metric) -> None:
    """eval_ is prepended as the Trainer does; names ending in loss are lower-is-better."""
    assert resolve_metric(name, mode) == expected


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("eval_loss", "lowest"),
        ("eval_loss", "MIN"),
        ("", None),
        (" ", None),
        ("a\nb", None),
        ("a b", None),
        ("a\x00", None),
    ],
)
def test_resolve_metric_refuses(name: str, mode: str | None) -> None:
    """A mode other than min/max, or a name no Trainer logs, is refused with MetricError."""
    with pytest.raises(MetricError):
        resolve_metric(name, mode)


def test_metric_label_names_the_direction() -> None:
    """The label says which way is better."""
    assert resolve_metric("loss").label == "eval_loss (lower is better)"
    assert resolve_metric("f1").label == "eval_f1 (higher is better)"


# --- ordering, NaN, ties ------------------------------------------------------------------


def test_orders_by_step_number_not_by_name() -> None:
    """checkpoint-9 comes before checkpoint-10 and checkpoint-100, whatever order they came in."""
    ranking = rank_run([checkpoint(100, 0.3), checkpoint(9, 0.1), checkpoint(10, 0.2)], LOSS)

    assert [entry.name for entry in ranking.entries] == [
        "checkpoint-9",
        "checkpoint-10",
        "checkpoint-100",
    ]
    assert ranks(ranking) == {"checkpoint-9": 1, "checkpoint-10": 2, "checkpoint-100": 3}


@pytest.mark.parametrize("mode", ["min", "max"])
def test_non_finite_values_are_never_best_and_rank_last(mode: str) -> None:
    """NaN, +Infinity and -Infinity rank after every finite value, in either direction."""
    values = {100: math.nan, 200: 0.5, 300: math.inf, 400: -math.inf, 500: 0.7}
    metric = resolve_metric("eval_loss", mode)

    ranking = rank_run([checkpoint(step, value) for step, value in values.items()], metric)

    best = "checkpoint-200" if mode == "min" else "checkpoint-500"
    assert ranking.best is not None and ranking.best.name == best
    assert {ranks(ranking)[f"checkpoint-{s}"] for s in (100, 300, 400)} == {3, 4, 5}


def test_only_non_finite_values_means_no_best() -> None:
    """A run whose every value is NaN or infinite has no best."""
    ranking = rank_run([checkpoint(100, math.nan), checkpoint(200, math.inf)], LOSS)

    assert ranking.best is None


def test_ties_go_to_the_earlier_step() -> None:
    """Equal values: the earlier checkpoint wins and ranks first."""
    ranking = rank_run([checkpoint(300, 0.5), checkpoint(200, 0.5), checkpoint(100, 0.9)], LOSS)

    assert ranking.best is not None and ranking.best.name == "checkpoint-200"
    assert ranks(ranking) == {"checkpoint-100": 3, "checkpoint-200": 1, "checkpoint-300": 2}


def test_negative_zero_ties_with_zero() -> None:
    """-0.0 and 0.0 are the same value, so the earlier step wins."""
    ranking = rank_run([checkpoint(100, 0.0), checkpoint(200, -0.0)], LOSS)

    assert ranking.best is not None and ranking.best.name == "checkpoint-100"


def test_a_zero_padded_copy_does_not_take_the_place_of_its_original(tmp_path: Path) -> None:
    """checkpoint-0200 beside checkpoint-200 (same step): each has its own rank, 200 wins."""
    write_checkpoint(tmp_path, 100, trainer_state(100, {100: {"eval_loss": 0.5}}))
    write_checkpoint(tmp_path, 200, trainer_state(200, {200: {"eval_loss": 0.25}}))
    shutil.copytree(tmp_path / "checkpoint-200", tmp_path / "checkpoint-0200")

    ranking = rank_run(read_all(tmp_path), LOSS)

    assert [(e.name, e.rank) for e in ranking.entries] == [
        ("checkpoint-100", 3),
        ("checkpoint-200", 1),
        ("checkpoint-0200", 2),
    ]
    assert ranking.best is not None and ranking.best.name == "checkpoint-200"


def test_unevaluated_and_broken_checkpoints_are_listed_not_ranked() -> None:
    """No evaluation at its own step, or an unreadable file: listed with no value and no rank."""
    ranking = rank_run([checkpoint(100, 0.4), checkpoint(200), broken(300)], LOSS)

    assert [(e.name, e.value, e.rank) for e in ranking.entries] == [
        ("checkpoint-100", 0.4, 1),
        ("checkpoint-200", None, None),
        ("checkpoint-300", None, None),
    ]


def test_a_stale_value_from_an_earlier_step_is_never_used() -> None:
    """A checkpoint whose file holds only older evaluations is not ranked by them."""
    evals = {100: {"eval_loss": 0.1}}
    state = TrainerState(150, 1.5, 1000, evals)

    ranking = rank_run([Checkpoint(RUN / "checkpoint-150", 150, state=state)], LOSS)

    assert ranking.entries[0].value is None
    assert ranking.best is None


def test_empty_run() -> None:
    """A run with no checkpoint left has no entries and no best."""
    ranking = rank_run([], LOSS)

    assert ranking.entries == ()
    assert ranking.best is None
    assert ranking.disagreement() is None


def test_values_that_are_not_numbers_are_not_values(tmp_path: Path) -> None:
    """A metric logged as a string or a bool leaves the checkpoint unranked."""
    for step, value in [(100, "0.1"), (200, True), (300, 0.5)]:
        rows = [{"eval_loss": value, "step": step}]
        write_checkpoint(tmp_path, step, {"global_step": step, "log_history": rows})

    ranking = rank_run(
        [read_checkpoint(tmp_path / f"checkpoint-{s}") for s in (100, 200, 300)], LOSS
    )

    assert ranks(ranking) == {"checkpoint-100": None, "checkpoint-200": None, "checkpoint-300": 1}


# --- values lent by a newer sibling -------------------------------------------------------


def save_before_eval(
    run: Path, *, restart_loss: float | None = None, max_steps: int = 1000
) -> None:
    """checkpoint-500 was saved before its evaluation was logged; checkpoint-1000 logged both.

    With ``restart_loss``, checkpoint-1000 comes from another training started into the same
    directory (its log differs from the first row on).
    """
    write_checkpoint(run, 500, trainer_state(500, {}))
    evals = {500: {"eval_loss": 0.3}, 1000: {"eval_loss": 0.4}}
    loss = 1.0 if restart_loss is None else restart_loss
    write_checkpoint(run, 1000, trainer_state(1000, evals, train_loss=loss, max_steps=max_steps))


def read_all(run: Path) -> list[Checkpoint]:
    return [read_checkpoint(path) for path in sorted(run.iterdir())]


def test_value_lent_by_a_newer_sibling_of_the_same_training(tmp_path: Path) -> None:
    """An evaluation logged after the save is taken from a newer checkpoint of the same run."""
    save_before_eval(tmp_path)

    ranking = rank_run(read_all(tmp_path), LOSS)

    first = ranking.entries[0]
    assert (first.name, first.value, first.value_from) == ("checkpoint-500", 0.3, "checkpoint-1000")
    assert ranking.best is not None and ranking.best.name == "checkpoint-500"


def test_restarted_run_in_the_same_directory_lends_nothing(tmp_path: Path) -> None:
    """A newer checkpoint of another incarnation (its log differs) does not lend its numbers."""
    save_before_eval(tmp_path, restart_loss=2.0)

    ranking = rank_run(read_all(tmp_path), LOSS)

    assert (ranking.entries[0].value, ranking.entries[0].rank) == (None, None)
    assert ranking.best is not None and ranking.best.name == "checkpoint-1000"


def test_different_max_steps_is_another_training(tmp_path: Path) -> None:
    """A sibling planned for a different number of steps lends nothing."""
    save_before_eval(tmp_path, max_steps=2000)

    assert rank_run(read_all(tmp_path), LOSS).entries[0].value is None


def test_a_sibling_that_vanished_lends_nothing(tmp_path: Path) -> None:
    """If the newer sibling's file is gone by the time it is compared, nothing is lent."""
    save_before_eval(tmp_path)
    checkpoints = read_all(tmp_path)
    (tmp_path / "checkpoint-1000" / "trainer_state.json").unlink()

    assert rank_run(checkpoints, LOSS).entries[0].value is None


# --- the Trainer's own best ---------------------------------------------------------------


@pytest.mark.parametrize(
    "written",
    [
        "/home/someone/runs/out/checkpoint-200",
        "./results\\checkpoint-200",
        "C:\\Users\\me\\out\\checkpoint-200",
        "out/checkpoint-200/",
        "checkpoint-200",
        "/kaggle/working/outputs/checkpoint-200\\",
    ],
)
def test_trainer_best_is_matched_by_its_last_component(tmp_path: Path, written: str) -> None:
    """best_model_checkpoint from any machine, / or \\ separated, names the local checkpoint."""
    (tmp_path / "checkpoint-200").mkdir()
    checkpoints = [
        checkpoint(200, 0.2, run=tmp_path),
        checkpoint(300, 0.3, best=written, run=tmp_path),
    ]

    ranking = rank_run(checkpoints, LOSS)

    assert ranking.trainer_best is not None
    assert (ranking.trainer_best.name, ranking.trainer_best.on_disk) == ("checkpoint-200", True)
    assert ranking.disagreement() is None


@pytest.mark.parametrize("written", [None, "", "/", "\\"])
def test_no_trainer_best(written: str | None) -> None:
    """A null, empty or separator-only best_model_checkpoint names no checkpoint."""
    ranking = rank_run([checkpoint(100, 0.1, best=written)], LOSS)

    assert ranking.trainer_best is None


def test_trainer_best_comes_from_the_newest_readable_state(tmp_path: Path) -> None:
    """Each file holds the best as of its own step; the newest readable one is the most complete."""
    checkpoints = [
        checkpoint(100, 0.1, best="out/checkpoint-100", run=tmp_path),
        checkpoint(200, 0.2, best="out/checkpoint-100", run=tmp_path),
        checkpoint(300, 0.05, best="out/checkpoint-300", run=tmp_path),
        broken(400, run=tmp_path),
    ]
    for step in (100, 300):
        (tmp_path / f"checkpoint-{step}").mkdir()

    trainer = rank_run(checkpoints, LOSS).trainer_best

    assert trainer is not None
    assert (trainer.name, trainer.as_of_step) == ("checkpoint-300", 300)


def test_trainer_best_gone_from_disk(tmp_path: Path) -> None:
    """A Trainer best that was deleted is still named, and said to be gone."""
    (tmp_path / "checkpoint-500").mkdir()
    checkpoints = [checkpoint(500, 0.5, best="/x/checkpoint-300", best_metric=0.1, run=tmp_path)]

    ranking = rank_run(checkpoints, LOSS)

    assert ranking.trainer_best is not None
    assert (ranking.trainer_best.name, ranking.trainer_best.on_disk) == ("checkpoint-300", False)
    assert ranking.disagreement() == (
        "the Trainer names checkpoint-300, we name checkpoint-500: "
        "checkpoint-300 is no longer on disk"
    )


def test_disagreement_when_the_trainer_ranked_by_another_metric(tmp_path: Path) -> None:
    """When the Trainer's best_metric is another logged metric, the sentence names it."""
    for step in (100, 200):
        (tmp_path / f"checkpoint-{step}").mkdir()
    evals_200 = {100: {"eval_loss": 0.5, "eval_f1": 0.9}, 200: {"eval_loss": 0.4, "eval_f1": 0.8}}
    checkpoints = [
        checkpoint(100, 0.5, run=tmp_path),
        Checkpoint(
            tmp_path / "checkpoint-200",
            200,
            state=TrainerState(200, 2.0, 1000, evals_200, 0.9, "out/checkpoint-100"),
        ),
    ]

    ranking = rank_run(checkpoints, LOSS)

    assert ranking.disagreement() == (
        "the Trainer names checkpoint-100, we name checkpoint-200: "
        "the Trainer ranked by eval_f1, not eval_loss"
    )


def test_disagreement_when_the_trainer_took_the_other_direction(tmp_path: Path) -> None:
    """WER ranked higher-is-better by the Trainer's rule: the sentence says so."""
    for step in (100, 200):
        (tmp_path / f"checkpoint-{step}").mkdir()
    evals = {100: {"eval_wer": 30.0}, 200: {"eval_wer": 20.0}}
    checkpoints = [
        checkpoint(100, 30.0, metric="eval_wer", run=tmp_path),
        Checkpoint(
            tmp_path / "checkpoint-200",
            200,
            state=TrainerState(200, 2.0, 1000, evals, 30.0, "out/checkpoint-100"),
        ),
    ]

    ranking = rank_run(checkpoints, resolve_metric("wer", "min"))

    assert ranking.disagreement() == (
        "the Trainer names checkpoint-100, we name checkpoint-200: "
        "the Trainer took higher eval_wer as better"
    )


def test_disagreement_when_the_trainers_pick_cannot_be_read(tmp_path: Path) -> None:
    """Its best is on disk but broken (corpus file 24): the sentence says so, not a direction."""
    (tmp_path / "checkpoint-100").mkdir()
    evals = {100: {"eval_loss": 0.3}, 200: {"eval_loss": 0.4}}
    checkpoints = [
        broken(100, run=tmp_path),
        Checkpoint(
            tmp_path / "checkpoint-200",
            200,
            state=TrainerState(200, 2.0, 1000, evals, 0.3, "out/checkpoint-100"),
        ),
    ]

    note = rank_run(checkpoints, LOSS).disagreement()

    assert note == (
        "the Trainer names checkpoint-100, we name checkpoint-200: "
        "checkpoint-100 is listed with an error, so not ranked"
    )


def test_disagreement_when_the_trainers_pick_was_not_evaluated_at_its_step(
    tmp_path: Path,
) -> None:
    """The Trainer named a checkpoint that has no value at its own step: the sentence says so."""
    for step in (100, 200):
        (tmp_path / f"checkpoint-{step}").mkdir()
    checkpoints = [
        checkpoint(100, None, run=tmp_path),
        checkpoint(200, 0.4, best="out/checkpoint-100", best_metric=0.1, run=tmp_path),
    ]

    note = rank_run(checkpoints, LOSS).disagreement()

    assert (note or "").endswith("checkpoint-100 has no eval_loss at its own step")


def test_disagreement_when_the_trainers_pick_is_nan(tmp_path: Path) -> None:
    """Old Trainers kept a NaN first value as best; the sentence says the value is not finite."""
    for step in (100, 200):
        (tmp_path / f"checkpoint-{step}").mkdir()
    evals = {100: {"eval_loss": math.nan}, 200: {"eval_loss": 0.4}}
    checkpoints = [
        checkpoint(100, math.nan, run=tmp_path),
        Checkpoint(
            tmp_path / "checkpoint-200",
            200,
            state=TrainerState(200, 2.0, 1000, evals, math.nan, "out/checkpoint-100"),
        ),
    ]

    note = rank_run(checkpoints, LOSS).disagreement()

    assert (note or "").endswith("the eval_loss of checkpoint-100 is not a finite number")


def test_disagreement_without_a_reason_in_the_file(tmp_path: Path) -> None:
    """With nothing in the file to explain it, the sentence says the rule is not named."""
    for step in (100, 200):
        (tmp_path / f"checkpoint-{step}").mkdir()
    checkpoints = [
        checkpoint(100, 0.5, run=tmp_path),
        checkpoint(200, 0.4, best="out/checkpoint-100", run=tmp_path),
    ]

    note = rank_run(checkpoints, LOSS).disagreement()

    assert note is not None
    assert note.endswith("the Trainer ranked by a metric or rule that its state file does not name")


def test_disagreement_when_we_have_no_best(tmp_path: Path) -> None:
    """When nothing is ranked, the sentence says we name no checkpoint."""
    (tmp_path / "checkpoint-100").mkdir()

    note = rank_run([checkpoint(100, None, best="out/checkpoint-100", run=tmp_path)], LOSS)

    assert (note.disagreement() or "").startswith(
        "the Trainer names checkpoint-100, we name no checkpoint:"
    )


# --- properties ---------------------------------------------------------------------------

run_values = st.dictionaries(
    st.integers(1, 10_000),
    st.none() | st.sampled_from([0.5, 0.25, 1.0, math.nan, math.inf, -math.inf]) | st.floats(),
    min_size=1,
    max_size=12,
)


def reference_best(values: dict[int, float | None], mode: str) -> str | None:
    """The best by definition: finite, best value, earliest step among equals."""
    finite = [(v if mode == "min" else -v, s) for s, v in values.items() if v is not None]
    finite = [(v, s) for v, s in finite if math.isfinite(v)]
    return f"checkpoint-{min(finite)[1]}" if finite else None


@settings(max_examples=300, deadline=None)
@given(run_values, st.sampled_from(["min", "max"]), st.data())
def test_best_does_not_depend_on_discovery_order(
    values: dict[int, float | None], mode: str, data: st.DataObject
) -> None:
    """Whatever order checkpoints are found in, the best and the ranks are the same."""
    checkpoints = [checkpoint(step, value) for step, value in values.items()]
    shuffled = data.draw(st.permutations(checkpoints))
    metric = resolve_metric("eval_loss", mode)

    first, second = rank_run(checkpoints, metric), rank_run(shuffled, metric)

    assert ranks(first) == ranks(second)
    best = first.best.name if first.best else None
    assert best == (second.best.name if second.best else None)
    assert best == reference_best(values, mode)


@settings(max_examples=300, deadline=None)
@given(run_values, st.sampled_from(["min", "max"]))
def test_nan_never_wins_and_ranks_last(values: dict[int, float | None], mode: str) -> None:
    """A non-finite value is never best and every finite value ranks above it."""
    ranking = rank_run(
        [checkpoint(s, v) for s, v in values.items()], resolve_metric("eval_loss", mode)
    )

    if ranking.best is not None:
        assert ranking.best.value is not None and math.isfinite(ranking.best.value)
    finite = [e.rank for e in ranking.entries if e.value is not None and math.isfinite(e.value)]
    other = [e.rank for e in ranking.entries if e.value is not None and not math.isfinite(e.value)]
    assert all(f is not None and o is not None and f < o for f in finite for o in other)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 10_000), min_size=2, max_size=8, unique=True), st.floats(-1e6, 1e6))
def test_ties_go_to_the_earlier_step_always(steps: list[int], value: float) -> None:
    """All checkpoints with one value: the earliest step is best and ranks follow the steps."""
    ranking = rank_run([checkpoint(step, value) for step in steps], LOSS)

    assert ranking.best is not None and ranking.best.checkpoint.step == min(steps)
    assert [e.rank for e in ranking.entries] == list(range(1, len(steps) + 1))


def test_a_run_of_many_unevaluated_checkpoints_is_ranked_quickly() -> None:
    """10,000 checkpoints without evaluations are not compared pair by pair (that takes ~10 s)."""
    checkpoints = [checkpoint(step) for step in range(1, 10_001)]

    started = time.monotonic()
    ranking = rank_run(checkpoints, LOSS)
    elapsed = time.monotonic() - started

    assert ranking.best is None
    assert len(ranking.entries) == 10_000
    assert elapsed < 3.0


def test_the_nearest_newer_sibling_of_the_same_training_lends(tmp_path: Path) -> None:
    """Of several newer checkpoints, a restarted one is passed over for one that continues."""
    write_checkpoint(tmp_path, 500, trainer_state(500, {}))
    evals = {500: {"eval_loss": 0.3}, 1000: {"eval_loss": 0.4}}
    write_checkpoint(tmp_path, 1000, trainer_state(1000, evals, train_loss=2.0))
    evals_1500 = {500: {"eval_loss": 0.3}, 1500: {"eval_loss": 0.2}}
    write_checkpoint(tmp_path, 1500, trainer_state(1500, evals_1500))

    ranking = rank_run(read_all(tmp_path), LOSS)

    first = ranking.entries[0]
    assert (first.value, first.value_from) == (0.3, "checkpoint-1500")

"""Announcements: their history round trip, the --min-delta rule and the message text."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckpt_watch.announce import (
    TITLE_LIMIT,
    Announcement,
    MinDeltaError,
    body,
    format_change,
    make_id,
    parse_min_delta,
    resume_hint,
    title,
    worth_announcing,
)
from ckpt_watch.history import History, replay


def new_best(**changes: object) -> Announcement:
    values: dict[str, object] = {
        "id": make_id("new_best", "a/run1", "checkpoint-516", 1),
        "kind": "new_best",
        "run": "a/run1",
        "metric": "eval_loss",
        "value": 0.234567,
        "previous": "checkpoint-344",
        "previous_value": 0.251234,
        "checkpoint": "checkpoint-516",
        "step": 516,
        "epoch": 4.5,
        "path": "/models/a/run1/checkpoint-516",
        "host": "gpu-box",
        "resume": resume_hint("/models/a/run1/checkpoint-516"),
    }
    values.update(changes)
    return Announcement(**values)  # type: ignore[arg-type]


def through_history(tmp_path: Path, a: Announcement) -> Announcement | None:
    history = History(tmp_path / "history.jsonl")
    history.append("new_best", **a.fields())
    history.close()
    (event,) = replay(tmp_path / "history.jsonl")
    return Announcement.from_event(event)


def test_fields_survive_the_history(tmp_path: Path) -> None:
    """Every field comes back equal after a strict JSON line and a replay."""
    a = new_best()

    back = through_history(tmp_path, a)

    assert back == a


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_survive_the_history(tmp_path: Path, value: float) -> None:
    """NaN and infinities are written as strict JSON and read back as the same float."""
    a = new_best(kind="nonfinite", value=value, previous_value=value)

    back = through_history(tmp_path, a)

    assert back is not None and back.value is not None and back.previous_value is not None
    assert str(back.value) == str(value) and str(back.previous_value) == str(value)
    assert "NaN" not in (tmp_path / "history.jsonl").read_text().replace('"NaN"', "")


@given(
    value=st.floats() | st.none(),
    step=st.integers(min_value=0, max_value=10**12) | st.none(),
    run=st.text(min_size=1),
)
def test_any_value_survives_the_history(
    tmp_path_factory: pytest.TempPathFactory, value: float | None, step: int | None, run: str
) -> None:
    """Whatever the value, step or run name, the replayed announcement matches the original."""
    a = new_best(value=value, step=step, run=run)

    back = through_history(tmp_path_factory.mktemp("h"), a)

    assert back is not None
    assert back.step == step and back.run == run
    assert str(back.value) == str(value)


def test_fields_name_the_id_announce() -> None:
    """The id is written as ``announce``, the key delivery records use too."""
    a = new_best()

    fields = a.fields()

    assert fields["announce"] == a.id and "id" not in fields


@pytest.mark.parametrize(
    "event",
    [
        {"event": "notified", "announce": "x", "target": "json://h/***", "attempt": 1},
        {"event": "new_best", "run": "a", "metric": "eval_loss", "value": 1.0},
        {"event": "new_best", "announce": "x", "kind": "party", "run": "a", "metric": "m"},
        {"event": "new_best", "announce": 7, "kind": "new_best", "run": "a", "metric": "m"},
        {"event": "new_best", "announce": "x", "kind": "new_best", "run": None, "metric": "m"},
    ],
)
def test_events_without_an_announcement_give_none(event: dict[str, object]) -> None:
    """Delivery records, plain events and malformed ones are not announcements."""
    assert Announcement.from_event(event) is None


def test_wrong_field_types_are_dropped_not_trusted() -> None:
    """A step that is a bool or a string, or a value that is text, reads back as None."""
    event = {**new_best().fields(), "step": True, "value": "0.2", "epoch": "4.5", "path": 3}

    a = Announcement.from_event(event)

    assert a is not None
    assert (a.step, a.value, a.epoch, a.path) == (None, None, None, None)


def test_id_is_stable() -> None:
    """The same event always yields the same id, and another incarnation another."""
    first = make_id("new_best", "a/run1", "checkpoint-5", 1)

    assert first == make_id("new_best", "a/run1", "checkpoint-5", 1)
    assert first != make_id("new_best", "a/run1", "checkpoint-5", 2)
    assert first == "new_best:a/run1:checkpoint-5:1"


@pytest.mark.parametrize(
    ("value", "previous", "mode", "min_delta", "expected"),
    [
        (0.24, 0.25, "min", "0.01", True),
        (0.245, 0.25, "min", "0.01", False),
        (0.3, 0.29, "max", "0.01", True),
        (0.295, 0.29, "max", "0.01", False),
        (0.2475, 0.25, "min", "1%", True),
        (0.248, 0.25, "min", "1%", False),
        (101.0, 100.0, "max", "1%", True),
        (100.5, 100.0, "max", "1 %", False),
        (0.2499, 0.25, "min", "", True),
        (0.2499, 0.25, "min", "0", True),
        (0.26, 0.25, "min", "0", False),
        (0.25, 0.25, "min", "0", False),
        (0.1, None, "min", "0.5", True),
        (0.1, math.nan, "min", "0.5", True),
        (math.nan, 0.25, "min", "0", False),
        (-math.inf, 0.25, "min", "0", False),
        (0.0001, 0.0, "max", "5%", True),
    ],
)
def test_worth_announcing(
    value: float,
    previous: float | None,
    mode: str,
    min_delta: str,
    expected: bool,
) -> None:
    """An improvement is announced when it reaches --min-delta, absolute or relative."""
    assert worth_announcing(value, previous, mode, min_delta) is expected  # type: ignore[arg-type]


def test_min_delta_is_inclusive() -> None:
    """An improvement of exactly --min-delta is announced despite float rounding."""
    assert worth_announcing(0.29, 0.3, "min", "0.01")
    assert worth_announcing(0.7, 0.69, "max", "0.01")


@pytest.mark.parametrize("text", ["-0.1", "abc", "1%%", "nan", "inf", "%-2"])
def test_bad_min_delta_says_what_is_allowed(text: str) -> None:
    """A value that is not a non-negative number or percentage is refused in one line."""
    with pytest.raises(MinDeltaError, match=r"0\.01 or 1%") as caught:
        parse_min_delta(text)

    assert "\n" not in str(caught.value)


def test_min_delta_parses_both_forms() -> None:
    """ "0.01" is absolute, "2.5%" a fraction of the previous best."""
    assert parse_min_delta("0.01") == (0.01, False)
    assert parse_min_delta(" 2.5% ") == (0.025, True)


def test_body_says_everything_at_a_glance() -> None:
    """Run, metric, value, previous best, change, checkpoint, step, epoch, host, path, resume."""
    text = body(new_best())

    for expected in [
        "a/run1",
        "eval_loss",
        "0.234567",
        "0.251234 (checkpoint-344)",
        "-0.016667 (-6.63%)",
        "checkpoint-516, step 516, epoch 4.5",
        "gpu-box",
        "/models/a/run1/checkpoint-516",
        'trainer.train(resume_from_checkpoint="/models/a/run1/checkpoint-516")',
    ]:
        assert expected in text


def test_resume_hint_comes_from_the_path_when_not_given() -> None:
    """Without an explicit hint the message still says how to resume from the path."""
    text = body(new_best(resume=None))

    assert 'trainer.train(resume_from_checkpoint="/models/a/run1/checkpoint-516")' in text


def test_title_is_short_and_names_the_news() -> None:
    """The title fits a phone line: run, metric and value, cut at the limit."""
    short = title(new_best())
    long = title(new_best(run="x" * 200))

    assert short == "a/run1: new best eval_loss 0.234567"
    assert len(long) == TITLE_LIMIT and long.endswith("...")


@pytest.mark.parametrize(
    ("kind", "value", "expected_title", "expected_body"),
    [
        ("finished", 0.2, "a/run1: finished, best eval_loss 0.2", "a/run1 finished"),
        ("stalled", 0.2, "a/run1: stalled", "no new checkpoint"),
        ("nonfinite", math.nan, "a/run1: eval_loss is NaN", "eval_loss = NaN"),
        ("nonfinite", -math.inf, "a/run1: eval_loss is -Infinity", "= -Infinity"),
    ],
)
def test_each_kind_has_its_own_words(
    kind: str, value: float, expected_title: str, expected_body: str
) -> None:
    """Finished, stalled and non-finite announcements say what happened."""
    a = new_best(kind=kind, value=value)

    assert title(a) == expected_title
    assert expected_body in body(a)


def test_note_is_part_of_the_body() -> None:
    """A note from the daemon (why a run counts as stalled) appears in the message."""
    a = new_best(kind="stalled", note="No checkpoint for 47 min; usually every 9 min.")

    assert "No checkpoint for 47 min; usually every 9 min." in body(a)


def test_first_best_has_no_change_line() -> None:
    """Without a previous best the message claims no change."""
    text = body(new_best(previous=None, previous_value=None))

    assert "change" not in text and "previous best" not in text


@pytest.mark.parametrize(
    ("value", "previous", "expected"),
    [
        (0.9, 1.0, "-0.1 (-10%)"),
        (0.82, 0.8, "+0.02 (+2.5%)"),
        (0.1, 0.0, "+0.1"),
        (math.nan, 1.0, "-"),
        (1.0, None, "-"),
    ],
)
def test_change_is_absolute_and_relative(
    value: float, previous: float | None, expected: str
) -> None:
    """The change is signed, with a percentage whenever the previous value allows one."""
    assert format_change(value, previous) == expected

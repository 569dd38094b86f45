"""Reading one trainer_state.json: every bad input, and the fast path against the full parse."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import corpus_dir
from factories import dumps, trainer_state, write_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt_watch import trainer_state as ts
from ckpt_watch.check import read_run
from ckpt_watch.scan import list_run
from ckpt_watch.trainer_state import (
    StateError,
    StateVanishedError,
    TrainerState,
    checkpoint_step,
    parse_state,
    read_checkpoint,
)

GOOD = dumps(
    trainer_state(500, {500: {"eval_loss": 0.25}}, best_model_checkpoint="out/checkpoint-500")
)


def state_file(tmp_path: Path, content: bytes | str, step: int = 500) -> Path:
    """A checkpoint directory holding ``content`` as its trainer_state.json."""
    checkpoint = tmp_path / f"checkpoint-{step}"
    checkpoint.mkdir()
    raw = content.encode() if isinstance(content, str) else content
    (checkpoint / ts.STATE_FILE).write_bytes(raw)
    return checkpoint


def assert_one_line_error(checkpoint: ts.Checkpoint, *fragments: str) -> None:
    assert checkpoint.state is None
    assert checkpoint.error is not None
    assert "\n" not in checkpoint.error
    assert "Traceback" not in checkpoint.error
    for fragment in fragments:
        assert fragment in checkpoint.error


# --- good input -------------------------------------------------------------------------


def test_reads_a_trainer_layout_file(tmp_path: Path) -> None:
    """A Trainer-written file gives step, epoch, max_steps, evaluations and the Trainer's best."""
    checkpoint = read_checkpoint(state_file(tmp_path, GOOD))

    assert checkpoint.error is None
    assert checkpoint.state is not None
    assert checkpoint.name == "checkpoint-500"
    assert checkpoint.step == 500
    assert checkpoint.state.global_step == 500
    assert checkpoint.state.epoch == 5.0
    assert checkpoint.state.max_steps == 1000
    assert checkpoint.own_metrics == {"eval_loss": 0.25}
    assert checkpoint.state.best_model_checkpoint == "out/checkpoint-500"
    assert checkpoint.size == len(GOOD)


def test_files_written_the_trainer_way_take_the_fast_path() -> None:
    """The test factories write the Trainer's layout, so tests exercise the byte search."""
    fast = ts._parse_trainer_layout(GOOD.encode())

    assert GOOD.startswith('{\n  "best_metric": null,\n')
    assert fast is not None and fast == full_parse(GOOD.encode())


def test_nan_and_infinity_tokens_are_read(tmp_path: Path) -> None:
    """Bare NaN and Infinity tokens (the Trainer's json.dumps default) are read as floats."""
    evals = {100: {"eval_loss": math.nan}, 200: {"eval_loss": math.inf}, 300: {"eval_x": -math.inf}}
    text = dumps(trainer_state(300, evals))
    assert "NaN" in text and "-Infinity" in text

    state = read_checkpoint(state_file(tmp_path, text, 300)).state

    assert state is not None
    assert math.isnan(state.evals[100]["eval_loss"])
    assert state.evals[200]["eval_loss"] == math.inf
    assert state.evals[300]["eval_x"] == -math.inf


def test_several_rows_at_one_step_merge_later_winning() -> None:
    """Two evaluation rows at one step (several eval sets) merge; a repeated key keeps the later."""
    rows = [
        {"eval_a_loss": 1.0, "step": 10},
        {"eval_b_loss": 2.0, "step": 10},
        {"eval_a_loss": 3.0, "step": 10},
    ]
    data = dumps({"global_step": 10, "log_history": rows}).encode()

    assert parse_state(data).evals == {10: {"eval_a_loss": 3.0, "eval_b_loss": 2.0}}


def test_values_that_are_not_numbers_are_not_values() -> None:
    """Strings, booleans, null and nested values under eval_ keys are dropped, not coerced."""
    row = {"eval_s": "0.1", "eval_b": True, "eval_n": None, "eval_l": [1], "eval_ok": 2, "step": 5}
    data = dumps({"global_step": 5, "log_history": [row]}).encode()

    assert parse_state(data).evals == {5: {"eval_ok": 2.0}}


def test_wrong_types_in_known_fields_are_treated_as_absent() -> None:
    """A field of the wrong type reads as absent instead of failing the whole file."""
    document = {
        "best_metric": "high",
        "best_model_checkpoint": 7,
        "epoch": [1],
        "global_step": "500",
        "log_history": [{"eval_loss": 1.0, "step": "500"}, 3, "row", None],
        "max_steps": True,
    }

    state = parse_state(dumps(document).encode())

    assert replace(state, first_row=None) == TrainerState(None, None, None, {})


def test_a_huge_integer_metric_is_infinite_not_a_crash(tmp_path: Path) -> None:
    """An integer too large for a float reads as infinity rather than raising OverflowError."""
    row = {"eval_loss": 10**400, "step": 5}
    text = json.dumps({"epoch": 10**400, "global_step": 5, "log_history": [row]}, indent=2)

    checkpoint = read_checkpoint(state_file(tmp_path, text, 5))

    assert checkpoint.state is not None
    assert checkpoint.own_metrics == {"eval_loss": math.inf}
    assert checkpoint.state.epoch == math.inf


# --- bad input: each one a one-line error -----------------------------------------------

BAD_CONTENT: list[tuple[str, bytes, tuple[str, ...]]] = [
    ("truncated", GOOD.encode()[: len(GOOD) // 2], ("invalid JSON at line",)),
    ("truncated-in-tail", GOOD.encode()[:-40], ("invalid JSON",)),
    ("empty", b"", ("empty file",)),
    ("only-whitespace", b" \n\n", ("empty file",)),
    ("invalid", b"{not json}", ("invalid JSON at line 1 column 2",)),
    ("array-top-level", b"[1, 2]\n", ("top level is a JSON array, not an object",)),
    ("string-top-level", b'"x"', ("top level is a JSON string",)),
    ("log-history-null", b'{"global_step": 500, "log_history": null}', ("log_history is null",)),
    ("log-history-object", b'{"log_history": {"step": 1}}', ("log_history is object",)),
    ("log-history-missing", b'{"global_step": 500}', ("log_history is null",)),
    ("non-utf8", b'{"log_history": [], "x": "caf\xe9"}', ("not UTF-8 text (byte 29)",)),
    ("utf16-with-bom", "\ufeff{}".encode("utf-16"), ("not UTF-8 text",)),
    ("nested-too-deeply", b"[" * 100_000 + b"]" * 100_000, ("nested too deeply",)),
    ("huge-integer-literal", b'{"log_history": [], "epoch": 1' + b"0" * 5000 + b"}", ("number",)),
    (
        "global-step-mismatch",
        GOOD.replace('"global_step": 500', '"global_step": 400').encode(),
        ("global_step 400 does not match the directory name",),
    ),
]


@pytest.mark.parametrize(
    ("content", "fragments"), [c[1:] for c in BAD_CONTENT], ids=[c[0] for c in BAD_CONTENT]
)
def test_bad_content_gives_a_one_line_error(
    tmp_path: Path, content: bytes, fragments: tuple[str, ...]
) -> None:
    """Each kind of broken file gives the checkpoint a one-line reason, never an exception."""
    checkpoint = read_checkpoint(state_file(tmp_path, content))

    assert_one_line_error(checkpoint, *fragments)
    assert checkpoint.step == 500


def test_nul_bytes_inside_training_rows_are_an_error(tmp_path: Path) -> None:
    """A block of NUL bytes left by a crash is reported even where only training rows were."""
    data = bytearray(dumps(trainer_state(500, {500: {"eval_loss": 0.5}})).encode())
    middle = data.index(b'"loss": 1.0', len(data) // 3)
    data[middle : middle + 64] = b"\x00" * 64

    assert_one_line_error(read_checkpoint(state_file(tmp_path, bytes(data))), "invalid JSON")


def test_directory_without_state_file(tmp_path: Path) -> None:
    """A checkpoint whose save was interrupted (no trainer_state.json) is listed with a reason."""
    (tmp_path / "checkpoint-500").mkdir()

    checkpoint = read_checkpoint(tmp_path / "checkpoint-500")

    assert_one_line_error(checkpoint, "no trainer_state.json")


def test_state_file_that_is_a_directory(tmp_path: Path) -> None:
    """A directory named trainer_state.json is an error, not a crash."""
    (tmp_path / "checkpoint-500" / ts.STATE_FILE).mkdir(parents=True)

    assert_one_line_error(read_checkpoint(tmp_path / "checkpoint-500"), "is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    """A file without read permission gives an error naming the permission problem."""
    checkpoint = state_file(tmp_path, GOOD)
    (checkpoint / ts.STATE_FILE).chmod(0)
    try:
        result = read_checkpoint(checkpoint)
    finally:
        (checkpoint / ts.STATE_FILE).chmod(0o644)

    assert_one_line_error(result, "cannot read trainer_state.json", "Permission denied")


def test_permission_error_from_the_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """However it arises (root reads anything), a refused open is a one-line error row."""
    checkpoint = state_file(tmp_path, GOOD)

    def refuse(path: str, flags: int, *args: int) -> int:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "open", refuse)
    result = read_checkpoint(checkpoint)
    monkeypatch.undo()

    assert_one_line_error(result, "cannot read trainer_state.json: Permission denied")


def test_over_the_size_cap(tmp_path: Path) -> None:
    """A file over the cap is refused with its size and the cap, without being read."""
    checkpoint = state_file(tmp_path, GOOD)

    result = read_checkpoint(checkpoint, max_bytes=100)

    assert_one_line_error(result, f"{len(GOOD)} bytes, over the 100 byte cap")
    assert read_checkpoint(checkpoint, max_bytes=len(GOOD)).error is None


def test_symlink_loop_as_state_file(tmp_path: Path) -> None:
    """A trainer_state.json that is a link to itself is an error, not a hang or a crash."""
    (tmp_path / "checkpoint-500").mkdir()
    (tmp_path / "checkpoint-500" / ts.STATE_FILE).symlink_to(ts.STATE_FILE)

    checkpoint = read_checkpoint(tmp_path / "checkpoint-500")

    assert_one_line_error(checkpoint, "cannot read trainer_state.json", "symbolic links")


def test_dangling_symlink_as_state_file(tmp_path: Path) -> None:
    """A link to a file that is gone reads as a missing state file."""
    (tmp_path / "checkpoint-500").mkdir()
    (tmp_path / "checkpoint-500" / ts.STATE_FILE).symlink_to(tmp_path / "gone.json")

    assert_one_line_error(read_checkpoint(tmp_path / "checkpoint-500"), "no trainer_state.json")


@pytest.mark.timeout(10)
def test_fifo_as_state_file_does_not_block(tmp_path: Path) -> None:
    """A named pipe in place of the state file is refused at once instead of waiting forever."""
    (tmp_path / "checkpoint-500").mkdir()
    os.mkfifo(tmp_path / "checkpoint-500" / ts.STATE_FILE)

    checkpoint = read_checkpoint(tmp_path / "checkpoint-500")

    assert_one_line_error(checkpoint, "not a regular file")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero on this system")
def test_device_as_state_file_is_not_read(tmp_path: Path) -> None:
    """A link to an endless device is refused as not a regular file, not read up to the cap."""
    (tmp_path / "checkpoint-500").mkdir()
    (tmp_path / "checkpoint-500" / ts.STATE_FILE).symlink_to("/dev/zero")

    assert_one_line_error(read_checkpoint(tmp_path / "checkpoint-500"), "not a regular file")


def test_vanished_checkpoint_raises(tmp_path: Path) -> None:
    """A checkpoint directory that no longer exists raises StateVanishedError, not an error row."""
    with pytest.raises(StateVanishedError):
        read_checkpoint(tmp_path / "checkpoint-500")


def test_checkpoint_vanishing_between_listing_and_reading_is_left_out(tmp_path: Path) -> None:
    """A checkpoint deleted after the run was listed (rotation) is simply left out."""
    for step in (100, 200, 300):
        write_checkpoint(tmp_path, step)
    run = list_run(tmp_path)
    shutil.rmtree(tmp_path / "checkpoint-200")

    names = [checkpoint.name for checkpoint in read_run(run)]

    assert names == ["checkpoint-100", "checkpoint-300"]


def test_read_checkpoint_refuses_other_names(tmp_path: Path) -> None:
    """Only a directory named checkpoint-<int> can be read as a checkpoint."""
    with pytest.raises(ValueError, match="not a checkpoint directory name"):
        read_checkpoint(tmp_path / "checkpoint-best")


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("checkpoint-0", 0),
        ("checkpoint-500", 500),
        ("checkpoint-12345678901234567890", 12345678901234567890),
        ("checkpoint-best", None),
        ("checkpoint-100-merged", None),
        ("tmp-checkpoint-100", None),
        ("checkpoint-", None),
        ("checkpoint--5", None),
        ("checkpoint-+5", None),
        ("checkpoint-5 ", None),
        ("checkpoint-0500", 500),
        ("Checkpoint-500", None),
        ("checkpoint-\u0665", None),
        ("checkpoint_500", None),
    ],
)
def test_checkpoint_step(name: str, step: int | None) -> None:
    """Only the exact name the Trainer writes, checkpoint-<int>, has a step."""
    assert checkpoint_step(name) == step


# --- the fast path never disagrees with the full parse ----------------------------------

FRAGMENTS = [
    "a",
    "b",
    " ",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    '"',
    "\\",
    "\n",
    "\r\n",
    "\t",
    "eval_",
    '"eval_',
    '"eval_loss": 1',
    "\n  ]",
    "\n    }",
    "\n    {",
    '\n  "log_history": [',
    "NaN",
    "\u00e9",
    "\u2028",
    "\x00",
]
texts = st.lists(st.sampled_from(FRAGMENTS), max_size=6).map("".join)
numbers = (
    st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, 1, -0.0, 0.5, 1e-300, 1e300])
)
leaves = st.none() | st.booleans() | numbers | texts
row_keys = (
    st.sampled_from(
        [
            "loss",
            "learning_rate",
            "grad_norm",
            "epoch",
            "eval_loss",
            "eval_accuracy",
            "eval_wer",
            "eval_runtime",
            "eval_g0_loss",
            "eval_",
            "evaluation",
            "eval_loss ",
            "rewards/chosen",
            "eval_rewards/chosen",
            "step",
        ]
    )
    | texts
)
json_values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(row_keys, inner, max_size=3),
    max_leaves=6,
)
steps = st.sampled_from([0, 5, 10, 10, 10, 20, 500]) | st.sampled_from([10.0, 1e18, "10", None])


@st.composite
def rows(draw: st.DrawFn, *, keep_step: bool) -> dict[str, Any]:
    """A log row; the Trainer always writes its step, a hand edit may not."""
    row: dict[str, Any] = {"step": draw(steps)}
    if draw(st.booleans()):
        row["epoch"] = draw(numbers)
    row.update(draw(st.dictionaries(row_keys, numbers | json_values, max_size=5)))
    if not keep_step and draw(st.booleans()):
        row.pop("step", None)
    return row


top_keys = (
    st.sampled_from(
        [
            "a",
            "best_global_step",
            "best_metric",
            "best_model_checkpoint",
            "epoch",
            "eval_steps",
            "eval_loss",
            "global_step",
            "log",
            "log_history_",
            "logging_steps",
            "max_steps",
            "stateful_callbacks",
            "trial_params",
            "z",
            "zz_list",
        ]
    )
    | texts
)


@st.composite
def trainer_documents(draw: st.DrawFn, *, odd_rows: bool = False) -> dict[str, Any]:
    """A state document as any Trainer version could hold; with ``odd_rows``, hand-edited rows."""
    document = draw(st.dictionaries(top_keys, json_values, max_size=6))
    for key, values in [
        ("global_step", steps),
        ("epoch", numbers),
        ("max_steps", steps),
        ("best_metric", numbers | st.none()),
        ("best_model_checkpoint", st.none() | texts),
        ("best_global_step", steps),
    ]:
        if draw(st.booleans()):
            document[key] = draw(values)
    if odd_rows:  # no Trainer version writes a top-level list after log_history
        extra = st.lists(st.dictionaries(row_keys, json_values), max_size=3)
        document["zz_list"] = draw(extra)
        row = rows(keep_step=False) | json_values
    else:
        document = {k: v for k, v in document.items() if not (v and type(v) is list and k > "log")}
        row = rows(keep_step=True)
    document["log_history"] = draw(st.lists(row, max_size=10))
    return document


def layout(document: dict[str, Any], *, crlf: bool = False, newline: bool = True) -> bytes:
    """The bytes the Trainer writes for ``document``, optionally with CRLF line ends."""
    text = json.dumps(document, indent=2, sort_keys=True) + ("\n" if newline else "")
    return (text.replace("\n", "\r\n") if crlf else text).encode()


def full_parse(data: bytes) -> TrainerState:
    """The state as the full json.loads path reads it: the same JSON, not in Trainer layout."""
    return parse_state(json.dumps(json.loads(data)).encode())


def canonical(state: TrainerState) -> tuple[Any, ...]:
    """A comparable form of a state: NaN compares equal to NaN, -0.0 differs from 0.0."""
    evals = {step: {k: repr(v) for k, v in row.items()} for step, row in state.evals.items()}
    return (
        state.global_step,
        repr(state.epoch),
        state.max_steps,
        evals,
        repr(state.best_metric),
        state.best_model_checkpoint,
        state.best_global_step,
        state.first_row,
    )


def expected_evals(document: dict[str, Any]) -> dict[int, dict[str, str]]:
    """The evaluation rows of a document, computed from the Python objects themselves."""
    evals: dict[int, dict[str, str]] = {}
    for row in document["log_history"]:
        if not isinstance(row, dict):
            continue
        step = row.get("step")
        if isinstance(step, float) and step.is_integer():
            step = int(step)
        if isinstance(step, bool) or not isinstance(step, int):
            continue
        for key, value in row.items():
            if key.startswith("eval_") and type(value) in (int, float):
                evals.setdefault(step, {})[key] = repr(float(value))
    return evals


HYPOTHESIS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HYPOTHESIS
@given(trainer_documents(odd_rows=True), st.booleans(), st.booleans())
def test_fast_path_agrees_with_full_parse(
    document: dict[str, Any], crlf: bool, newline: bool
) -> None:
    """On any Trainer-layout state, the byte-search path reads exactly what json.loads reads."""
    data = layout(document, crlf=crlf, newline=newline)

    fast = canonical(parse_state(data))

    assert fast == canonical(full_parse(data))
    assert fast[3] == expected_evals(document)


@HYPOTHESIS
@given(trainer_documents())
def test_fast_path_is_taken_on_trainer_layout(document: dict[str, Any]) -> None:
    """The byte-search path does not give up on a genuine Trainer file (else it is no use)."""
    fast = ts._parse_trainer_layout(layout(document))

    assert fast is not None, layout(document)
    assert canonical(fast) == canonical(full_parse(layout(document)))


MUTATIONS = [
    b"]",
    b"[",
    b"}",
    b"{",
    b",",
    b"\n",
    b"\n  ]",
    b"\n    }",
    b"\n    {",
    b'"',
    b'"eval_loss": 7,',
    b'\n  "log_history": [',
    b'\n  "log_history": [],',
    b" ",
    b'\n  "log_history": null,',
    b"\0",
    b"\r",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(layout(draw(trainer_documents())))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        if draw(st.booleans()):
            data[at:at] = draw(st.sampled_from(MUTATIONS))
        else:
            data[at : at + draw(st.integers(1, 8))] = b""
    return bytes(data)


@HYPOTHESIS
@given(mutated())
def test_fast_path_never_misreads_damaged_layout(data: bytes) -> None:
    """On damaged or hand-edited layouts the fast path gives up or reads what json.loads reads.

    Damage confined to training rows is the one thing it does not see (it never decodes
    them), so the comparison is made wherever the full parse succeeds.
    """
    try:
        fast = ts._parse_trainer_layout(data)
    except Exception as exc:
        pytest.fail(f"fast path raised {exc!r}")
    try:
        reference = full_parse(data)
    except (ValueError, StateError):
        return
    assert fast is None or canonical(fast) == canonical(reference)


def test_duplicate_log_history_keys_read_as_json_does(tmp_path: Path) -> None:
    """With log_history given twice, the last one counts, as json.loads has it."""
    first = dumps({"global_step": 5, "log_history": [{"eval_loss": 1.0, "step": 5}]})
    data = first.replace('"global_step": 5,', '"global_step": 5,\n  "log_history": [],').encode()

    assert canonical(parse_state(data)) == canonical(full_parse(data))
    assert parse_state(data).evals == {5: {"eval_loss": 1.0}}


@pytest.mark.parametrize(
    "corpus_file",
    [
        "13_whisper-tiny-100k-steps-long.json",
        "23_baize-1mb-6687-logs.json",
        "08_f1macro-windows-path-bgs.json",
    ],
)
def test_fast_path_on_real_files(corpus_file: str) -> None:
    """Real files read the same by both paths; the fast one is used where the layout allows."""
    data = (corpus_dir() / "trainer_states" / corpus_file).read_bytes()

    assert canonical(parse_state(data)) == canonical(full_parse(data))
    if b"\r\n" not in data:
        assert ts._parse_trainer_layout(data) is not None

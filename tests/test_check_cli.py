"""``ckpt-watch check`` as people and scripts run it: a real process, and typer's runner."""

from __future__ import annotations

import json
import math
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from factories import trainer_state, write_checkpoint, write_run
from typer.testing import CliRunner

from ckpt_watch import __version__
from ckpt_watch.check import check_path
from ckpt_watch.cli import app
from ckpt_watch.ranking import resolve_metric

RULE = "=" * 70


def ckpt_watch(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ckpt_watch`` in a real process, as a shell would."""
    return subprocess.run(
        [sys.executable, "-m", "ckpt_watch", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


def invoke(*args: str | Path) -> Any:
    """Run the command in-process with typer's runner."""
    return CliRunner().invoke(app, [str(arg) for arg in args])


def strict_json(text: str) -> Any:
    """Parse as strict JSON: a bare NaN or Infinity token fails the test."""

    def refuse(token: str) -> None:
        raise AssertionError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=refuse)


# --- the text report ----------------------------------------------------------------------


def test_text_report_follows_the_seed_layout(tmp_path: Path) -> None:
    """Each checkpoint with epoch, step, value and path; then the best and how to resume."""
    write_run(tmp_path / "run", {100: 0.5, 200: 0.25, 300: 0.375})

    result = ckpt_watch("check", "run", cwd=tmp_path)

    blocks = [
        ["", f"Checkpoint: checkpoint-{step}", f"  Epoch: {step / 100:.2f}",
         f"  Global Step: {step}", f"  Validation Loss: {value}",
         f"  Path: run/checkpoint-{step}"]
        for step, value in [(100, 0.5), (200, 0.25), (300, 0.375)]
    ]  # fmt: skip
    expected = [
        RULE,
        "CHECKPOINT ANALYSIS: .",
        "Metric: eval_loss (lower is better)",
        RULE,
        *[line for block in blocks for line in block],
        "",
        RULE,
        "[BEST] CHECKPOINT: checkpoint-200",
        "  Validation Loss: 0.25",
        "  Path: run/checkpoint-200",
        "",
        "To resume training from this checkpoint:",
        f'  trainer.train(resume_from_checkpoint="{tmp_path / "run" / "checkpoint-200"}")',
        "",
    ]
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected
    assert result.stderr == ""


def test_text_report_lists_what_cannot_be_ranked(tmp_path: Path) -> None:
    """Unevaluated, broken and lent values are each said plainly, next to the ranked ones."""
    run = tmp_path / "run"
    write_checkpoint(run, 500, trainer_state(500, {}))
    evals = {500: {"eval_accuracy": 0.75}, 1000: {"eval_accuracy": 0.5}}
    best = "o/checkpoint-500"
    write_checkpoint(run, 1000, trainer_state(1000, evals, best_model_checkpoint=best))
    write_checkpoint(run, 1500, trainer_state(1500, evals, best_model_checkpoint=best))
    (run / "checkpoint-2000").mkdir()

    result = invoke("check", run, "--metric", "accuracy")

    lines = result.stdout.splitlines()
    assert result.exit_code == 0
    assert "Metric: eval_accuracy (higher is better)" in lines
    assert "  eval_accuracy: 0.75 (logged in checkpoint-1000)" in lines
    assert "  eval_accuracy: not evaluated at step 1500" in lines
    assert "  Error: no trainer_state.json (save interrupted or in progress)" in lines
    assert "[BEST] CHECKPOINT: checkpoint-500" in lines
    assert "  Trainer's own best: checkpoint-500" in lines
    assert not any(line.startswith("  Note:") for line in lines)


def test_text_report_says_when_the_trainer_disagrees(tmp_path: Path) -> None:
    """One line names the Trainer's own best and why it is not ours."""
    run = tmp_path / "run"
    evals = {100: {"eval_loss": 0.5, "eval_f1": 0.9}, 200: {"eval_loss": 0.4, "eval_f1": 0.8}}
    write_checkpoint(run, 100, trainer_state(100, {100: evals[100]}))
    state = trainer_state(200, evals, best_model_checkpoint="/x/checkpoint-100", best_metric=0.9)
    write_checkpoint(run, 200, state)

    lines = invoke("check", run).stdout.splitlines()

    notes = [line for line in lines if line.startswith("  Note:")]
    assert notes == [
        "  Note: the Trainer names checkpoint-100, we name checkpoint-200: "
        "the Trainer ranked by eval_f1, not eval_loss."
    ]
    assert "  Best Metric (Trainer): 0.9" in lines


def test_no_best_and_no_resume_line_when_nothing_is_ranked(tmp_path: Path) -> None:
    """A run without evaluations says so, and offers no resume command."""
    write_checkpoint(tmp_path / "run", 100)

    result = invoke("check", tmp_path / "run")

    assert result.exit_code == 0
    assert "No checkpoint has a finite eval_loss at its own step." in result.stdout
    assert "resume_from_checkpoint" not in result.stdout


def test_several_runs_end_with_a_summary_table(tmp_path: Path) -> None:
    """More than one run: a table with each run's best, value and the Trainer's best."""
    write_run(tmp_path / "a" / "run1", {100: 0.5, 200: 0.25})
    write_run(tmp_path / "b" / "run2", {100: 0.125})
    write_checkpoint(tmp_path / "c", 100)

    lines = ckpt_watch("check", tmp_path).stdout.splitlines()

    table = lines[lines.index(next(x for x in lines if x.startswith("RUN "))) :]
    assert [line.split() for line in table] == [
        ["RUN", "CHECKPOINTS", "BEST", "VALUE", "TRAINER", "BEST"],
        ["a/run1", "2", "checkpoint-200", "0.25", "-"],
        ["b/run2", "1", "checkpoint-100", "0.125", "-"],
        ["c", "1", "-", "-", "-"],
    ]
    assert lines.count(RULE) == 3 * 3


def test_one_run_has_no_summary_table(tmp_path: Path) -> None:
    """A single run needs no table."""
    write_run(tmp_path / "run", {100: 0.5})

    assert "CHECKPOINTS" not in invoke("check", tmp_path).stdout


def test_no_colour_when_not_a_terminal(tmp_path: Path) -> None:
    """Piped output holds no escape codes."""
    write_run(tmp_path / "run", {100: 0.5, 200: math.nan})
    write_run(tmp_path / "other", {100: 0.5})

    result = ckpt_watch("check", tmp_path)

    assert result.returncode == 0
    assert "\x1b" not in result.stdout + result.stderr


def on_terminal(args: list[str], env: dict[str, str]) -> bytes:
    """Run ckpt-watch with its output on a pseudo-terminal; returns what it printed."""
    leader, follower = pty.openpty()
    command = [sys.executable, "-m", "ckpt_watch", *args]
    process = subprocess.Popen(command, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    output = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process is done
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(leader)
        process.wait(timeout=60)
    return output


@pytest.mark.parametrize(("no_color", "coloured"), [(None, True), ("1", False)])
def test_colour_only_on_a_terminal(tmp_path: Path, no_color: str | None, coloured: bool) -> None:
    """On a terminal the best is coloured, unless NO_COLOR says otherwise."""
    write_run(tmp_path / "run", {100: 0.5})
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    if no_color:
        env["NO_COLOR"] = no_color

    output = on_terminal(["check", str(tmp_path / "run")], env)

    assert b"[BEST] CHECKPOINT: checkpoint-100" in output
    assert (b"\x1b[" in output) is coloured


# --- --json -------------------------------------------------------------------------------


def test_json_has_exactly_the_documented_shape(tmp_path: Path) -> None:
    """Scripts rely on these keys, types, ranks and orders, and nothing else."""
    run = tmp_path / "models" / "a" / "run1"
    write_run(run, {172: 0.25, 516: 0.125, 1000: math.nan}, max_steps=2000)
    write_checkpoint(run, 2000, trainer_state(2000, best_model_checkpoint="/y/checkpoint-516"))
    (run / "checkpoint-2500").mkdir()

    result = ckpt_watch("check", "models", "--json", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    document = strict_json(result.stdout)
    assert list(document) == ["runs"]
    (entry,) = document["runs"]
    assert entry == {
        "run": "a/run1",
        "path": str(run),
        "metric": "eval_loss",
        "mode": "min",
        "best": "checkpoint-516",
        "trainer_best": "checkpoint-516",
        "checkpoints": [
            {"name": f"checkpoint-{step}", "path": str(run / f"checkpoint-{step}"), "step": step,
             "epoch": epoch, "value": value, "rank": rank, "error": error}
            for step, epoch, value, rank, error in [
                (172, 1.72, 0.25, 2, None),
                (516, 5.16, 0.125, 1, None),
                (1000, 10.0, "NaN", 3, None),
                (2000, 20.0, None, None, None),
                (2500, None, None, None,
                 "no trainer_state.json (save interrupted or in progress)"),
            ]
        ],
    }  # fmt: skip


def test_json_run_is_dot_when_path_is_the_run(tmp_path: Path) -> None:
    """Checking one run names it "." and gives its absolute path."""
    write_run(tmp_path / "run", {100: 0.5})

    (entry,) = strict_json(invoke("check", tmp_path / "run", "--json").stdout)["runs"]

    assert (entry["run"], entry["path"]) == (".", str(tmp_path / "run"))


def test_json_non_finite_values_are_strings(tmp_path: Path) -> None:
    """NaN and infinities are the strings NaN, Infinity and -Infinity, never bare tokens."""
    run = tmp_path / "run"
    values = {100: math.nan, 200: math.inf, 300: -math.inf}
    write_run(run, values)
    state = trainer_state(400, {400: {"eval_loss": 1.0}})
    state["epoch"] = math.inf
    write_checkpoint(run, 400, state)
    assert "NaN" in (run / "checkpoint-300" / "trainer_state.json").read_text()

    (entry,) = strict_json(ckpt_watch("check", run, "--json").stdout)["runs"]

    assert [c["value"] for c in entry["checkpoints"]] == ["NaN", "Infinity", "-Infinity", 1.0]
    assert entry["checkpoints"][3]["epoch"] == "Infinity"
    assert entry["best"] == "checkpoint-400"


def test_json_lists_every_run_in_path_order(tmp_path: Path) -> None:
    """Several runs: one object each, named relative to PATH, at any depth."""
    for name in ["z", "a/b/c/d/e/deep", "a/b", "m/run-with space", "m/ü"]:
        write_run(tmp_path / name, {100: 0.5})

    runs = strict_json(invoke("check", tmp_path, "--json").stdout)["runs"]

    assert [run["run"] for run in runs] == ["a/b", "a/b/c/d/e/deep", "m/run-with space", "m/ü", "z"]


def test_json_for_a_path_that_is_not_utf8(tmp_path: Path) -> None:
    """A directory name that is not UTF-8 is escaped in JSON and printed as itself in text."""
    odd = os.fsdecode(b"run-\xff")
    write_run(tmp_path / odd, {100: 0.5})
    env = {"PYTHONIOENCODING": "utf-8"}  # strict, as on a desktop with a UTF-8 locale

    as_json = ckpt_watch("check", tmp_path, "--json", env=env)
    as_text = subprocess.run(
        [sys.executable, "-m", "ckpt_watch", "check", os.fsencode(tmp_path)],
        capture_output=True,
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )

    assert as_json.returncode == 0, as_json.stderr
    assert strict_json(as_json.stdout)["runs"][0]["run"] == odd
    assert as_text.returncode == 0, as_text.stderr
    assert b"Checkpoint: checkpoint-100" in as_text.stdout
    assert os.fsencode(tmp_path / odd / "checkpoint-100") in as_text.stdout


# --- exit codes ---------------------------------------------------------------------------


def test_exit_0_when_checkpoints_were_found_even_if_all_are_broken(tmp_path: Path) -> None:
    """Broken checkpoints are still checkpoints: they are listed and the exit status is 0."""
    (tmp_path / "run" / "checkpoint-100").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-100" / "trainer_state.json").write_text("{")

    result = ckpt_watch("check", tmp_path / "run", "--json")

    assert result.returncode == 0
    checkpoint = strict_json(result.stdout)["runs"][0]["checkpoints"][0]
    assert checkpoint["error"].startswith("invalid JSON at line 1 column 2")


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "no such file or directory"),
        ("file", "not a directory"),
        ("empty", "no checkpoint-<step> directories found"),
        ("only-staging", "no checkpoint-<step> directories found"),
    ],
)
def test_exit_1_with_one_line_when_nothing_to_check(
    tmp_path: Path, layout: str, message: str
) -> None:
    """A missing path, a file, or a tree without checkpoints: one line on stderr, exit 1."""
    target = tmp_path / "target"
    if layout == "file":
        target.write_text("x")
    elif layout == "empty":
        target.mkdir()
    elif layout == "only-staging":
        write_checkpoint(target, 100).rename(target / "tmp-checkpoint-100")

    result = ckpt_watch("check", target)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"ckpt-watch: {target}: {message}\n"


@pytest.mark.parametrize(
    "args",
    [
        ["check"],
        ["check", ".", "--mode", "sideways"],
        ["check", ".", "--metric", ""],
        ["check", ".", "--no-such-option"],
        ["no-such-command"],
    ],
)
def test_exit_2_for_usage_errors(tmp_path: Path, args: list[str]) -> None:
    """Usage errors exit 2 and say what is wrong on stderr, before anything is read."""
    write_run(tmp_path, {100: 0.5})

    result = ckpt_watch(*args, cwd=tmp_path)

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip()


def test_bad_mode_message_says_what_is_allowed() -> None:
    """The one line for a bad --mode names the allowed values."""
    result = invoke("check", ".", "--mode", "up")

    assert result.exit_code == 2
    assert result.stderr == "ckpt-watch: mode must be min or max, not 'up'\n"


# --- what counts as a checkpoint, and where runs are --------------------------------------


def test_directories_that_are_not_checkpoints_do_not_count(tmp_path: Path) -> None:
    """Staging, merged, best and hidden directories are never checkpoints."""
    run = tmp_path / "run"
    write_run(run, {100: 0.5, 200: 0.25})
    for name in ["tmp-checkpoint-300", "checkpoint-best", "checkpoint-100-merged"]:
        write_checkpoint(run, 300).rename(run / name)
    write_run(run / ".trash", {50: 0.01})
    write_run(tmp_path / ".hidden-run", {50: 0.01})
    write_run(run / "tmp-checkpoint-400" / "nested", {50: 0.01})
    (run / "checkpoint-600").write_text("a file, not a directory")

    runs = strict_json(invoke("check", tmp_path, "--json").stdout)["runs"]

    assert [r["run"] for r in runs] == ["run"]
    assert [c["name"] for c in runs[0]["checkpoints"]] == ["checkpoint-100", "checkpoint-200"]
    assert runs[0]["best"] == "checkpoint-200"


def test_runs_at_any_depth_and_runs_inside_runs(tmp_path: Path) -> None:
    """A run is any directory with checkpoints, however deep, even inside another run."""
    write_run(tmp_path / "outer", {100: 0.5})
    write_run(tmp_path / "outer" / "sweep" / "trial-1", {10: 0.5})
    write_run(tmp_path / "1" / "2" / "3" / "4" / "5" / "6" / "7" / "8", {10: 0.5})

    runs = strict_json(invoke("check", tmp_path, "--json").stdout)["runs"]

    assert [r["run"] for r in runs] == ["1/2/3/4/5/6/7/8", "outer", "outer/sweep/trial-1"]


def test_checkpoint_internals_are_not_searched(tmp_path: Path) -> None:
    """Nothing inside a checkpoint (DeepSpeed shards, copies) is taken for a run."""
    write_run(tmp_path / "run", {100: 0.5})
    write_run(tmp_path / "run" / "checkpoint-100" / "global_step100", {5: 0.1})

    runs = strict_json(invoke("check", tmp_path, "--json").stdout)["runs"]

    assert [r["run"] for r in runs] == ["run"]


def test_symlinked_directories_are_not_followed_but_symlinked_checkpoints_are_read(
    tmp_path: Path,
) -> None:
    """A link loop in the tree cannot trap the search; a checkpoint that is a link is read."""
    write_run(tmp_path / "store" / "run", {100: 0.5})
    write_run(tmp_path / "tree" / "run", {200: 0.25})
    (tmp_path / "tree" / "loop").symlink_to(tmp_path / "tree")
    (tmp_path / "tree" / "linked-store").symlink_to(tmp_path / "store")
    (tmp_path / "tree" / "run" / "checkpoint-100").symlink_to(
        tmp_path / "store" / "run" / "checkpoint-100"
    )

    runs = strict_json(invoke("check", tmp_path / "tree", "--json").stdout)["runs"]

    assert [r["run"] for r in runs] == ["run"]
    assert [c["name"] for c in runs[0]["checkpoints"]] == ["checkpoint-100", "checkpoint-200"]


def test_path_given_as_a_checkpoint_checks_its_run(tmp_path: Path) -> None:
    """Pointing at one checkpoint checks the run it belongs to."""
    write_run(tmp_path / "run", {100: 0.5, 200: 0.25})

    result = invoke("check", tmp_path / "run" / "checkpoint-100", "--json")

    (run,) = strict_json(result.stdout)["runs"]
    assert [c["name"] for c in run["checkpoints"]] == [
        "checkpoint-100",
        "checkpoint-200",
    ]


def test_a_checkpoint_that_vanishes_during_the_check_is_left_out(tmp_path: Path) -> None:
    """Rotation deleting a checkpoint between the scan and the read just leaves it out."""
    write_run(tmp_path / "run", {100: 0.5, 200: 0.25, 300: 0.125})
    reports = check_path(tmp_path / "run", resolve_metric("loss"))
    for entry in (tmp_path / "run" / "checkpoint-300").iterdir():
        entry.unlink()
    (tmp_path / "run" / "checkpoint-300").rmdir()

    (report,) = reports

    assert [e.name for e in report.ranking.entries] == ["checkpoint-100", "checkpoint-200"]


def test_a_large_state_file_is_read(tmp_path: Path) -> None:
    """A long log (100k training rows, several MB) is read and ranked."""
    evals = {step: {"eval_loss": 1.0 / step} for step in range(5000, 100_001, 5000)}
    write_checkpoint(tmp_path / "run", 100_000, trainer_state(100_000, evals, logging_steps=1))
    assert (tmp_path / "run" / "checkpoint-100000" / "trainer_state.json").stat().st_size > 5e6

    (entry,) = strict_json(invoke("check", tmp_path / "run", "--json").stdout)["runs"]

    assert entry["checkpoints"][0]["value"] == 1.0 / 100_000


# --- the program itself -------------------------------------------------------------------


def test_version(tmp_path: Path) -> None:
    """--version prints the installed version, the same as the package's."""
    result = ckpt_watch("--version", cwd=tmp_path)

    assert result.returncode == 0
    assert result.stdout == f"ckpt-watch {__version__}\n"
    assert version("ckpt-watch") == __version__


def test_console_script_and_module_agree(tmp_path: Path) -> None:
    """The ckpt-watch script and python -m ckpt_watch are the same program."""
    script = Path(sys.executable).with_name("ckpt-watch")
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable}")
    write_run(tmp_path / "run", {100: 0.5})

    by_script = subprocess.run(
        [script, "check", tmp_path / "run", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert by_script.returncode == 0
    assert by_script.stdout == ckpt_watch("check", tmp_path / "run", "--json").stdout


def test_no_arguments_prints_help(tmp_path: Path) -> None:
    """Bare python -m ckpt_watch shows the commands."""
    result = ckpt_watch(cwd=tmp_path)

    assert result.returncode == 2
    assert "check" in result.stdout + result.stderr
    assert "Usage" in result.stdout + result.stderr


def test_a_run_deleted_during_the_check_is_left_out(tmp_path: Path) -> None:
    """A whole run removed between the scan and its reading leaves no empty report behind."""
    write_run(tmp_path / "a", {100: 0.5})
    write_run(tmp_path / "b", {100: 0.5})
    reports = check_path(tmp_path, resolve_metric("loss"))
    shutil.rmtree(tmp_path / "a")

    assert [report.run for report in reports] == ["b"]


def test_metric_names_with_any_characters_the_trainer_logs(tmp_path: Path) -> None:
    """Retrieval metrics such as cosine_ndcg@10 are ranked like any other."""
    run = tmp_path / "run"
    for step, value in [(100, 0.5), (200, 0.75)]:
        rows = [{"eval_dim_768_cosine_ndcg@10": value, "step": step}]
        write_checkpoint(run, step, {"global_step": step, "log_history": rows})

    result = invoke("check", run, "--metric", "dim_768_cosine_ndcg@10", "--json")

    assert result.exit_code == 0, result.stderr
    assert strict_json(result.stdout)["runs"][0]["best"] == "checkpoint-200"


def test_check_dot_inside_a_checkpoint_reports_its_run(tmp_path: Path) -> None:
    """``check .`` from inside a checkpoint directory reports the run that holds it."""
    write_run(tmp_path / "run", {100: 0.5, 200: 0.4})

    done = subprocess.run(
        [sys.executable, "-m", "ckpt_watch", "check", ".", "--json"],
        cwd=tmp_path / "run" / "checkpoint-100",
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    (run,) = json.loads(done.stdout)["runs"]
    assert run["best"] == "checkpoint-200" and len(run["checkpoints"]) == 2

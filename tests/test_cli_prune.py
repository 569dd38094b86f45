"""The ``ckpt-watch prune`` command: the plan it prints, confirmation, dry runs, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import write_run
from typer.testing import CliRunner

from ckpt_watch import cli, cli_prune
from ckpt_watch.history import replay

runner = CliRunner()


def tree(root: Path) -> list[str]:
    """Every path under ``root``, hidden ones included, for before/after comparisons."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """Two runs; in a/run1 the best is checkpoint-200 and the newest checkpoint-400."""
    write_run(tmp_path / "a" / "run1", {100: 0.5, 200: 0.1, 300: 0.4, 400: 0.45})
    write_run(tmp_path / "b", {10: 0.3, 20: 0.2})
    return tmp_path


def test_dry_run_prints_the_plan_and_touches_nothing(models: Path) -> None:
    """Each checkpoint is listed with its action and reason; nothing changes on disk."""
    before = tree(models)

    result = runner.invoke(cli.app, ["prune", str(models), "--keep", "2", "--dry-run"])

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "a/run1",
        "  delete  checkpoint-100  not kept by --keep 2",
        "  keep    checkpoint-200  best by eval_loss; --keep 2",
        "  delete  checkpoint-300  not kept by --keep 2",
        "  keep    checkpoint-400  newest complete checkpoint; --keep 2",
        "",
        "b",
        "  keep    checkpoint-10   --keep 2",
        "  keep    checkpoint-20   best by eval_loss; newest complete checkpoint; --keep 2",
        "",
        "2 to delete, 4 to keep.",
    ]
    assert tree(models) == before


def test_json_prints_the_documented_shape(models: Path) -> None:
    """--json prints {"checkpoints": [...]} with run, name, action and reason only."""
    result = runner.invoke(cli.app, ["prune", str(models), "--keep", "1", "--json", "--dry-run"])

    document = json.loads(result.stdout)

    assert result.exit_code == 0
    assert list(document) == ["checkpoints"]
    assert {tuple(entry) for entry in document["checkpoints"]} == {
        ("run", "name", "action", "reason")
    }
    assert [(e["run"], e["name"], e["action"]) for e in document["checkpoints"]] == [
        ("a/run1", "checkpoint-100", "delete"),
        ("a/run1", "checkpoint-200", "keep"),
        ("a/run1", "checkpoint-300", "delete"),
        ("a/run1", "checkpoint-400", "keep"),
        ("b", "checkpoint-10", "delete"),
        ("b", "checkpoint-20", "keep"),
    ]


def test_without_a_terminal_or_yes_it_refuses(models: Path) -> None:
    """No tty and no --yes: one line on stderr, exit 1, nothing deleted."""
    before = tree(models)

    result = runner.invoke(cli.app, ["prune", str(models), "--keep", "1"])

    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "ckpt-watch: not a terminal, so cannot ask: add --yes to prune, or --dry-run to only look"
    ]
    assert tree(models) == before


@pytest.mark.parametrize("answer", ["n\n", "\n"])
def test_anything_but_yes_at_the_prompt_prunes_nothing(
    models: Path, monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    """At a terminal, the default answer is no."""
    monkeypatch.setattr(cli_prune, "stdin_is_tty", lambda: True)
    before = tree(models)

    result = runner.invoke(cli.app, ["prune", str(models), "--keep", "1"], input=answer)

    assert result.exit_code == 1
    assert "Delete 3 checkpoint(s) under" in result.stderr
    assert result.stderr.endswith("ckpt-watch: nothing pruned\n")
    assert tree(models) == before


def test_yes_at_the_prompt_prunes_and_records_in_the_roots_history(
    models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Confirmed, the plan is applied and recorded in ROOT/.ckpt-watch/history.jsonl."""
    monkeypatch.setattr(cli_prune, "stdin_is_tty", lambda: True)

    result = runner.invoke(cli.app, ["prune", str(models), "--keep", "1"], input="y\n")

    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (models / "a" / "run1").iterdir()) == [
        "checkpoint-200",
        "checkpoint-400",
    ]
    events = list(replay(models / ".ckpt-watch" / "history.jsonl"))
    assert [(e["event"], e["run"], e["checkpoint"]) for e in events] == [
        ("pruned", "a/run1", "checkpoint-100"),
        ("pruned", "a/run1", "checkpoint-300"),
        ("pruned", "b", "checkpoint-10"),
    ]
    assert "deleted a/run1/checkpoint-300 (" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("freed ")


def test_yes_with_a_history_file_writes_there(models: Path, tmp_path: Path) -> None:
    """--yes prunes without asking; --history names the file the events go to."""
    history = tmp_path / "elsewhere" / "events.jsonl"

    result = runner.invoke(
        cli.app, ["prune", str(models / "b"), "--keep", "1", "--yes", "--history", str(history)]
    )

    assert result.exit_code == 0, result.output
    assert [e["checkpoint"] for e in replay(history)] == ["checkpoint-10"]
    assert not (models / "b" / ".ckpt-watch").exists()


def test_strip_through_the_command_line(models: Path) -> None:
    """--strip --yes strips where weights remain and reports what it freed."""
    for step in (100, 300):
        (models / "a" / "run1" / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"w")
        (models / "a" / "run1" / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"o" * 2000)

    result = runner.invoke(
        cli.app, ["prune", str(models / "a"), "--keep", "2", "--strip", "--yes", "--json"]
    )

    assert result.exit_code == 0, result.output
    actions = {e["name"]: e["action"] for e in json.loads(result.stdout)["checkpoints"]}
    assert actions == {
        "checkpoint-100": "strip",
        "checkpoint-200": "keep",
        "checkpoint-300": "strip",
        "checkpoint-400": "keep",
    }
    assert "stripped run1/checkpoint-100 (2.0 kB)" in result.stderr
    assert not (models / "a" / "run1" / "checkpoint-100" / "optimizer.pt").exists()
    assert (models / "a" / "run1" / "checkpoint-100" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--keep", "0"], "ckpt-watch: --keep must be 1 or more, not 0"),
        (["--keep", "-2"], "ckpt-watch: --keep must be 1 or more, not -2"),
        (["--keep-top", "0"], "ckpt-watch: --keep-top must be 1 or more, not 0"),
        ([], "ckpt-watch: give at least one of --keep, --keep-top, --keep-every"),
    ],
)
def test_unusable_rules_are_refused_before_anything_is_read(
    models: Path, flags: list[str], message: str
) -> None:
    """--keep 0 (or no rule at all) is a usage error: exit 2, one line, nothing touched."""
    before = tree(models)

    result = runner.invoke(cli.app, ["prune", str(models), *flags, "--yes"])

    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(message)
    assert tree(models) == before


def test_a_missing_path_is_one_line(tmp_path: Path) -> None:
    """A path that does not exist ends with one line naming it and exit 1."""
    result = runner.invoke(cli.app, ["prune", str(tmp_path / "nope"), "--keep", "1"])

    assert result.exit_code == 1
    assert result.stderr == f"ckpt-watch: {tmp_path / 'nope'}: no such file or directory\n"

"""The README's opening commands are the ones CI runs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from typer.testing import CliRunner

from ckpt_watch.cli import app

ROOT = Path(__file__).resolve().parents[1]


def code_blocks(markdown: str) -> list[list[str]]:
    """The non-empty lines of each fenced code block, in order."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)
    return [[line for line in block.splitlines() if line.strip()] for block in blocks]


def test_readme_opens_with_install_and_run_then_install_and_test() -> None:
    """The first code block holds two commands: install + run, then install + test."""
    first = code_blocks((ROOT / "README.md").read_text())[0]
    script = next(iter(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]))

    assert len(first) == 2
    run, test = first
    assert "pip install ." in run and f".venv/bin/{script} " in run
    extras = re.search(r"pip install '\.\[([\w,-]+)\]'", test)
    assert extras is not None and "test" in extras.group(1).split(",")
    assert test.endswith(".venv/bin/pytest")


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    """.ci/run holds the README's second command as one line of its own."""
    test_command = code_blocks((ROOT / "README.md").read_text())[0][1]

    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()

    assert test_command in ci_lines


def test_check_options_in_the_readme_exist() -> None:
    """Every option the README shows for check is one that check accepts."""
    readme = (ROOT / "README.md").read_text()
    shown = {
        option
        for block in code_blocks(readme)
        for line in block
        if "ckpt-watch check" in line
        for option in re.findall(r"(?<=\s)--[a-z][a-z-]*", line.split("#")[0])
    }

    help_text = CliRunner().invoke(app, ["check", "--help"], terminal_width=200).stdout

    assert shown >= {"--metric", "--mode", "--json"}
    assert {option for option in shown if option not in help_text} == set()

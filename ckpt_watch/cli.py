"""The ``ckpt-watch`` command line: parse, set up output, call the library.

The commands live in ``cli_*`` modules by what they serve; this module names them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ckpt_watch import __version__
from ckpt_watch.check import NothingToCheckError, check_path
from ckpt_watch.cli_common import (
    MetricOption,
    ModeOption,
    any_path_through,
    fail,
    metric_from,
    terminal_style,
)
from ckpt_watch.cli_daemon import config_show, start, systemd_unit
from ckpt_watch.cli_prune import prune
from ckpt_watch.cli_tools import notify_test, simulate_run
from ckpt_watch.history import replay, strict
from ckpt_watch.history_table import select, table
from ckpt_watch.report import write_json, write_text
from ckpt_watch.service import default_history

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Rank Hugging Face Trainer checkpoints, record them, prune them, announce new bests.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ckpt-watch {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Rank Hugging Face Trainer checkpoints, record them, prune them, announce new bests."""


@app.command()
def check(
    path: Annotated[Path, typer.Argument(help="A run, or a tree of runs at any depth.")],
    metric: MetricOption = "eval_loss",
    mode: ModeOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print strict JSON.")] = False,
) -> None:
    """Print each checkpoint's value, the best checkpoint, and how to resume from it."""
    chosen = metric_from(metric, mode)
    try:
        reports = check_path(path, chosen)
    except NothingToCheckError as exc:
        fail(str(exc))
    if as_json:
        write_json(reports, sys.stdout)
    else:
        any_path_through(sys.stdout)
        write_text(reports, sys.stdout, terminal_style(sys.stdout))


@app.command("history")
def show_history(
    root: Annotated[Path, typer.Argument(help="The watched root.")],
    history: Annotated[
        Path | None,
        typer.Option(help="History file. Default: ROOT/.ckpt-watch/history.jsonl."),
    ] = None,
    run: Annotated[str | None, typer.Option(help="Only this run (relative to ROOT).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print strict JSON.")] = False,
) -> None:
    """Show what the daemon recorded, one line per event."""
    path = history or default_history(root)
    if not path.is_file():
        fail(f"{path}: no history (has ckpt-watch start run on {root}?)")
    events = select(replay(path), run)
    if as_json:
        typer.echo(json.dumps({"events": strict(events)}, allow_nan=False))
    else:
        typer.echo("\n".join(table(events)))


app.command()(start)
config_app = typer.Typer(no_args_is_help=True, help="Inspect the settings.")
config_app.command("show")(config_show)
app.add_typer(config_app, name="config")
app.command("systemd-unit")(systemd_unit)
app.command()(prune)
app.command("notify-test")(notify_test)
app.command("simulate")(simulate_run)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="ckpt-watch")

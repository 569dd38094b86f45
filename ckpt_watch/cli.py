"""The ``ckpt-watch`` command line: parse, set up output, call the library."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from ckpt_watch import __version__
from ckpt_watch.check import NothingToCheckError, check_path
from ckpt_watch.notify import NotifyConfigError, load_targets, send_test
from ckpt_watch.ranking import Metric, MetricError, resolve_metric
from ckpt_watch.report import Style, plain, write_json, write_text

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Rank Hugging Face Trainer checkpoints, record them, prune them, announce new bests.",
)

MetricOption = Annotated[
    str,
    typer.Option(
        "--metric",
        help="Metric as the Trainer logs it; 'eval_' is added when missing (accuracy -> "
        "eval_accuracy).",
    ),
]
ModeOption = Annotated[
    str | None,
    typer.Option(
        "--mode",
        help="min or max. Default: the Trainer's rule (names ending in 'loss' are lower-is-"
        "better, others higher-is-better).",
    ),
]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line to stderr and exit: the way every user error ends."""
    typer.echo(f"ckpt-watch: {message}", err=True)
    raise typer.Exit(code)


def metric_from(name: str, mode: str | None) -> Metric:
    try:
        return resolve_metric(name, mode)
    except MetricError as exc:
        fail(str(exc), 2)


def terminal_style(stream: object) -> Style:
    """Colour only for a person at a terminal who has not asked for none."""
    isatty = getattr(stream, "isatty", None)
    if os.environ.get("NO_COLOR") or not (isatty and isatty()):
        return plain
    colours = {"best": "green", "warn": "yellow", "error": "red", "name": "cyan"}

    def style(text: str, role: str) -> str:
        if role == "header":
            return typer.style(text, bold=True)
        return typer.style(text, fg=colours.get(role))

    return style


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
        write_text(reports, sys.stdout, terminal_style(sys.stdout))


@app.command("notify-test")
def notify_test(
    notify: Annotated[
        list[str] | None,
        typer.Option(
            "--notify",
            help="An apprise URL; repeat for several. Default: $CKPT_WATCH_NOTIFY (URLs "
            "separated by spaces or commas).",
        ),
    ] = None,
    notify_config: Annotated[
        Path | None, typer.Option("--notify-config", help="An apprise YAML or text config file.")
    ] = None,
) -> None:
    """Send one test message to each notification target and say how each went."""
    try:
        urls = load_targets(notify or [], notify_config)
    except NotifyConfigError as exc:
        fail(str(exc), 2)
    if not urls:
        fail("no notification target: give --notify URL, CKPT_WATCH_NOTIFY or --notify-config", 2)
    failed = 0
    for masked, outcome in send_test(urls):
        if outcome.ok:
            typer.echo(f"ok      {masked}")
        else:
            failed += 1
            typer.echo(f"failed  {masked}  {outcome.error}")
    if failed:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="ckpt-watch")

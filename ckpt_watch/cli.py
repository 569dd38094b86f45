"""The ``ckpt-watch`` command line: parse, set up output, call the library."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from ckpt_watch import __version__
from ckpt_watch.check import NothingToCheckError, check_path
from ckpt_watch.history import replay
from ckpt_watch.history_table import select, table
from ckpt_watch.logsetup import FORMATS, LEVELS
from ckpt_watch.logsetup import configure as configure_logging
from ckpt_watch.ranking import Metric, MetricError, resolve_metric
from ckpt_watch.report import Style, plain, write_json, write_text
from ckpt_watch.service import DaemonSettings, StartError, default_history, serve
from ckpt_watch.simulate import METRIC, Plan, Saved, SimulationError, simulate
from ckpt_watch.watch import WatchSettings

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


@app.command()
def start(
    root: Annotated[Path, typer.Argument(help="The training output tree to watch.")],
    metric: MetricOption = "eval_loss",
    mode: ModeOption = None,
    history: Annotated[
        Path | None,
        typer.Option(help="History file. Default: ROOT/.ckpt-watch/history.jsonl."),
    ] = None,
    poll: Annotated[
        float | None,
        typer.Option(min=0.1, help="Poll every SECONDS instead of using inotify."),
    ] = None,
    reconcile: Annotated[
        float,
        typer.Option(min=1.0, help="Rescan cheaply every SECONDS to catch missed events."),
    ] = 300.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_format: Annotated[str, typer.Option(help="text or json.")] = "text",
) -> None:
    """Watch ROOT: rank every new checkpoint, record it, announce new bests."""
    if log_level not in LEVELS:
        fail(f"--log-level must be one of {', '.join(LEVELS)}, not {log_level!r}", 2)
    if log_format not in FORMATS:
        fail(f"--log-format must be one of {', '.join(FORMATS)}, not {log_format!r}", 2)
    configure_logging(log_level, log_format)
    settings = DaemonSettings(
        root=root,
        metric=metric_from(metric, mode),
        history=history,
        watch=WatchSettings(poll=poll, reconcile=reconcile),
    )
    try:
        serve(settings)
    except StartError as exc:
        fail(str(exc))


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
        typer.echo(json.dumps({"events": events}, allow_nan=False))
    else:
        typer.echo("\n".join(table(events)))


@app.command("simulate")
def simulate_run(
    directory: Annotated[Path, typer.Argument(help="The run directory to write (new or empty).")],
    every: Annotated[float, typer.Option(min=0.0, help="Seconds between two saves.")] = 2.0,
    steps: Annotated[int, typer.Option(min=1, help="Training steps in all.")] = 200,
    save_steps: Annotated[int, typer.Option(min=1, help="Save every N steps.")] = 20,
    eval_steps: Annotated[
        int | None, typer.Option(min=1, help="Evaluate every N steps. Default: --save-steps.")
    ] = None,
    logging_steps: Annotated[int, typer.Option(min=1, help="Log training every N steps.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the made-up losses.")] = 0,
    nan_at: Annotated[
        int | None, typer.Option(min=1, help="The loss turns NaN from this step on.")
    ] = None,
    save_total_limit: Annotated[
        int | None,
        typer.Option(min=1, help="Delete old checkpoints as the Trainer does, keeping N."),
    ] = None,
) -> None:
    """Write a made-up training run, one checkpoint at a time, for start and check to watch."""
    plan = Plan(steps, save_steps, eval_steps, logging_steps, every, seed, nan_at, save_total_limit)
    last: Saved | None = None
    try:
        for last in simulate(directory, plan):
            typer.echo(_saved_line(last, steps))
    except SimulationError as exc:
        fail(str(exc), 2 if str(exc).startswith("--") else 1)
    except KeyboardInterrupt:
        fail(f"interrupted after {last.path.name if last else 'no checkpoint'}", 130)
    if last is not None:
        best = last.best_model_checkpoint
        named = f"{Path(best).name} ({METRIC} {last.best_metric:.4f})" if best else "none"
        typer.echo(f"done: the Trainer's best is {named}; try: ckpt-watch check {directory}")


def _saved_line(saved: Saved, steps: int) -> str:
    value = "not evaluated" if saved.value is None else f"{METRIC} {saved.value:.4f}"
    removed = f"  (rotation removed {', '.join(saved.removed)})" if saved.removed else ""
    return f"step {saved.step}/{steps}  wrote {saved.path.name}  {value}{removed}"


def main() -> None:
    """Console-script entry point."""
    app(prog_name="ckpt-watch")

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
from ckpt_watch.config import Config, ConfigError, load_config
from ckpt_watch.config_show import render as render_config
from ckpt_watch.history import replay
from ckpt_watch.history_table import select, table
from ckpt_watch.logsetup import configure as configure_logging
from ckpt_watch.ranking import Metric, MetricError, resolve_metric
from ckpt_watch.report import Style, plain, write_json, write_text
from ckpt_watch.service import StartError, default_history
from ckpt_watch.supervisor import serve_many
from ckpt_watch.unitfile import (
    DEFAULT_CONFIG,
    invoking_user,
    render_unit,
    spec_for,
    this_executable,
)

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


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="TOML settings file. Default: $CKPT_WATCH_CONFIG, if set."),
]
RootsArgument = Annotated[
    list[Path] | None,
    typer.Argument(
        metavar="ROOT", help="Training output trees to watch. Default: the config's roots."
    ),
]


def settings(
    config: Path | None,
    roots: list[Path] | None,
    flags: dict[str, object] | None = None,
    *,
    environ: dict[str, str] | None = None,
    credentials: bool = True,
) -> Config:
    """Load the settings, or end with one line and exit status 2."""
    try:
        return load_config(
            config, environ=environ, flags=flags, roots=roots or (), credentials=credentials
        )
    except ConfigError as exc:
        fail(str(exc), 2)


@app.command()
def start(
    roots: RootsArgument = None,
    config: ConfigOption = None,
    metric: Annotated[
        str | None,
        typer.Option(help="Metric as the Trainer logs it (as in check). Default: eval_loss."),
    ] = None,
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
        float | None,
        typer.Option(
            min=1.0, help="Rescan cheaply every SECONDS to catch missed events. Default: 300."
        ),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning or error. Default: info.")
    ] = None,
    log_format: Annotated[str | None, typer.Option(help="text or json. Default: text.")] = None,
) -> None:
    """Watch ROOT: rank every new checkpoint, record it, announce new bests.

    Settings come from flags, then CKPT_WATCH_* variables, then the --config file, then
    defaults. Under systemd it reports readiness and pings the watchdog; SIGHUP re-reads
    the configuration.
    """
    flags: dict[str, object] = {
        "metric": metric,
        "mode": mode,
        "history": history,
        "poll": poll,
        "reconcile": reconcile,
        "log_level": log_level,
        "log_format": log_format,
    }
    chosen = settings(config, roots, flags)
    configure_logging(chosen.log_level, chosen.log_format)
    try:
        serve_many(
            chosen,
            reload=lambda: load_config(config, flags=flags, roots=roots or ()),
            on_logging=configure_logging,
        )
    except StartError as exc:
        fail(str(exc))


config_app = typer.Typer(no_args_is_help=True, help="Inspect the settings.")
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(roots: RootsArgument = None, config: ConfigOption = None) -> None:
    """Print the effective settings and where each came from, secrets masked."""
    chosen = settings(config, roots, credentials=False)
    typer.echo(render_config(chosen), nl=False)


@app.command("systemd-unit")
def systemd_unit(
    config: Annotated[
        Path, typer.Option("--config", help="The settings file the service will read.")
    ] = DEFAULT_CONFIG,
    user: Annotated[
        str | None,
        typer.Option(help="User to run as. Default: the user behind sudo, or you."),
    ] = None,
) -> None:
    """Print a systemd unit for this installation, for /etc/systemd/system/ckpt-watch.service."""
    chosen = settings(config, None, environ={}, credentials=False)
    spec = spec_for(chosen, config, this_executable(), user or invoking_user())
    typer.echo(render_unit(spec), nl=False)


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


def main() -> None:
    """Console-script entry point."""
    app(prog_name="ckpt-watch")

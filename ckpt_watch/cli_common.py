"""What every ckpt-watch command shares: one-line failures, options, output style."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from ckpt_watch.notify import NotifyConfigError, load_targets
from ckpt_watch.ranking import Metric, MetricError, resolve_metric
from ckpt_watch.report import Style, plain
from ckpt_watch.retention import RetentionError, RetentionRules

MetricOption = Annotated[
    str,
    typer.Option(
        "--metric",
        help="Metric as the Trainer logs it; 'eval_' is added when missing (accuracy -> "
        "eval_accuracy).",
    ),
]
NotifyOption = Annotated[
    list[str] | None,
    typer.Option(
        "--notify",
        help="An apprise URL; repeat for several. Default: $CKPT_WATCH_NOTIFY (URLs "
        "separated by spaces or commas).",
    ),
]
NotifyConfigOption = Annotated[
    Path | None, typer.Option("--notify-config", help="An apprise YAML or text config file.")
]
KeepOption = Annotated[
    int | None,
    typer.Option(
        "--keep",
        metavar="N",
        help="Keep the best plus the newest checkpoints, N in all (save_total_limit).",
    ),
]
KeepTopOption = Annotated[
    int | None, typer.Option("--keep-top", metavar="K", help="Keep the K best by the metric.")
]
KeepEveryOption = Annotated[
    int | None,
    typer.Option(
        "--keep-every", metavar="STEPS", help="Keep every checkpoint whose step is a multiple."
    ),
]
StripOption = Annotated[
    bool,
    typer.Option(
        "--strip",
        help="Instead of deleting, remove only optimizer, scheduler, RNG and DeepSpeed "
        "state; weights and trainer_state.json stay.",
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


def targets_from(notify: list[str] | None, config: Path | None) -> list[str]:
    try:
        return load_targets(notify or [], config)
    except NotifyConfigError as exc:
        fail(str(exc), 2)


def rules_from(
    keep: int | None, keep_top: int | None, keep_every: int | None, strip: bool
) -> RetentionRules | None:
    """The retention rules asked for, or None when no rule was given (nothing is deleted)."""
    if keep is None and keep_top is None and keep_every is None:
        return None
    try:
        return RetentionRules(keep, keep_top, keep_every, strip=strip)
    except RetentionError as exc:
        fail(str(exc), 2)


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


def any_path_through(stream: object) -> None:
    """Print a path that is not valid UTF-8 as its own bytes, as ls does, not as a traceback."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")

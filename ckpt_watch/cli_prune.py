"""The ``prune`` command: show the plan, ask, then delete or strip safely."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from ckpt_watch.check import NothingToCheckError
from ckpt_watch.cli_common import (
    KeepEveryOption,
    KeepOption,
    KeepTopOption,
    MetricOption,
    ModeOption,
    StripOption,
    fail,
    metric_from,
    rules_from,
    terminal_style,
)
from ckpt_watch.history import History, HistoryError
from ckpt_watch.lock import daemons_below, watching_daemon
from ckpt_watch.prune import prune_once
from ckpt_watch.report import write_outcomes, write_plan_json, write_plan_text
from ckpt_watch.retention import RetentionError, plan_tree


def prune(
    path: Annotated[Path, typer.Argument(help="A run, or a tree of runs at any depth.")],
    keep: KeepOption = None,
    keep_top: KeepTopOption = None,
    keep_every: KeepEveryOption = None,
    metric: MetricOption = "eval_loss",
    mode: ModeOption = None,
    strip: StripOption = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan and touch nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Prune without asking.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    history: Annotated[
        Path | None,
        typer.Option(
            "--history",
            metavar="FILE",
            help="Where to record what was pruned. Default: PATH/.ckpt-watch/history.jsonl.",
        ),
    ] = None,
) -> None:
    """Delete (or strip) the checkpoints no rule keeps; protected ones are never touched."""
    chosen = metric_from(metric, mode)
    rules = rules_from(keep, keep_top, keep_every, strip)
    if rules is None:
        fail("give at least one of --keep, --keep-top, --keep-every", 2)
    try:
        plan = plan_tree(path, chosen, rules, now=time.time())
    except (NothingToCheckError, RetentionError) as exc:
        fail(str(exc))

    if as_json:
        write_plan_json(plan, sys.stdout)
    else:
        write_plan_text(plan, sys.stdout, terminal_style(sys.stdout))
    let_go = sum(decision.action != "keep" for decision in plan)
    if dry_run or not let_go:
        return
    daemon = watching_daemon(path) or daemons_below(path)
    if daemon:
        fail(f"{daemon}; stop it, or let it prune with start --keep")
    if not yes:
        confirm(f"{'Strip' if strip else 'Delete'} {let_go} checkpoint(s) under {path}?")

    try:
        log = History(history or path / ".ckpt-watch" / "history.jsonl")
    except HistoryError as exc:
        fail(str(exc))
    try:
        outcomes = prune_once(path, chosen, rules, plan, log.append)
    finally:
        log.close()
    write_outcomes(outcomes, sys.stderr if as_json else sys.stdout)


def stdin_is_tty() -> bool:
    """Whether a person can be asked (tests replace this)."""
    return sys.stdin.isatty()


def confirm(question: str) -> None:
    """Ask a person at a terminal; anything but yes, or no terminal, ends without pruning."""
    if not stdin_is_tty():
        fail("not a terminal, so cannot ask: add --yes to prune, or --dry-run to only look")
    if not typer.confirm(question, default=False, err=True):
        fail("nothing pruned")

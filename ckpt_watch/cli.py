"""The ``ckpt-watch`` command line: parse, set up output, call the library."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from ckpt_watch import __version__
from ckpt_watch.check import NothingToCheckError, check_path
from ckpt_watch.config import Config, ConfigError, load_config
from ckpt_watch.config_show import render as render_config
from ckpt_watch.history import History, HistoryError, replay, strict
from ckpt_watch.history_table import select, table
from ckpt_watch.lock import watching_daemon
from ckpt_watch.logsetup import configure as configure_logging
from ckpt_watch.notify import NotifyConfigError, load_targets, send_test
from ckpt_watch.prune import prune_once
from ckpt_watch.ranking import Metric, MetricError, resolve_metric
from ckpt_watch.report import (
    Style,
    plain,
    write_json,
    write_outcomes,
    write_plan_json,
    write_plan_text,
    write_text,
)
from ckpt_watch.retention import RetentionError, RetentionRules, plan_tree
from ckpt_watch.service import StartError, default_history
from ckpt_watch.simulate import METRIC, Plan, Saved, SimulationError, simulate
from ckpt_watch.supervisor import serve_many
from ckpt_watch.unitfile import (
    DEFAULT_CONFIG,
    invoking_user,
    render_unit,
    spec_for,
    this_executable,
)
from ckpt_watch.worker import check_root

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
    keep: KeepOption = None,
    keep_top: KeepTopOption = None,
    keep_every: KeepEveryOption = None,
    strip: Annotated[
        bool | None,
        typer.Option(
            "--strip/--no-strip",
            help="Instead of deleting, remove only optimizer, scheduler, RNG and DeepSpeed state.",
        ),
    ] = None,
    notify: NotifyOption = None,
    notify_config: NotifyConfigOption = None,
    announce: Annotated[
        str | None,
        typer.Option(
            help="What to announce, comma-separated: new_best, finished, stalled, nonfinite. "
            "Default: new_best."
        ),
    ] = None,
    min_delta: Annotated[
        str | None,
        typer.Option(help="Announce only improvements of at least this much: 0.01, or 1%."),
    ] = None,
    coalesce: Annotated[
        float | None,
        typer.Option(
            min=0.0, help="New bests of one run within SECONDS make one message. Default: 10."
        ),
    ] = None,
    stall_factor: Annotated[
        float | None,
        typer.Option(
            min=1.0, help="Stalled: no checkpoint for this many usual intervals. Default: 3."
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
        "keep": keep,
        "keep_top": keep_top,
        "keep_every": keep_every,
        "strip": strip,
        "notify": tuple(notify) if notify else None,
        "notify_config": notify_config,
        "announce": announce,
        "min_delta": min_delta,
        "coalesce": coalesce,
        "stall_factor": stall_factor,
        "log_level": log_level,
        "log_format": log_format,
    }
    chosen = settings(config, roots, flags)
    for root in chosen.roots:
        problem = check_root(root)
        if problem:
            fail(problem, 2)
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
        typer.echo(json.dumps({"events": strict(events)}, allow_nan=False))
    else:
        typer.echo("\n".join(table(events)))


@app.command("notify-test")
def notify_test(notify: NotifyOption = None, notify_config: NotifyConfigOption = None) -> None:
    """Send one test message to each notification target and say how each went."""
    urls = targets_from(notify, notify_config)
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


@app.command()
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
    daemon = watching_daemon(path)
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

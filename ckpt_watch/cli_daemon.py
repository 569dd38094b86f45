"""The daemon's commands: ``start``, ``config show`` and ``systemd-unit``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckpt_watch.cli_common import (
    KeepEveryOption,
    KeepOption,
    KeepTopOption,
    ModeOption,
    NotifyConfigOption,
    NotifyOption,
    fail,
)
from ckpt_watch.config import Config, ConfigError, load_config
from ckpt_watch.config_show import render as render_config
from ckpt_watch.logsetup import configure as configure_logging
from ckpt_watch.service import StartError
from ckpt_watch.supervisor import serve_many
from ckpt_watch.unitfile import (
    DEFAULT_CONFIG,
    invoking_user,
    render_unit,
    spec_for,
    this_executable,
)
from ckpt_watch.worker import check_root

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


def checked(chosen: Config) -> Config:
    """The settings, once every root's targets and rules are usable; else ConfigError.

    A reload refuses such settings and keeps the running ones, as for any bad value.
    """
    for root in chosen.roots:
        problem = check_root(root)
        if problem:
            raise ConfigError(problem)
    return chosen


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
    try:
        chosen = checked(settings(config, roots, flags))
    except ConfigError as exc:
        fail(str(exc), 2)
    configure_logging(chosen.log_level, chosen.log_format)
    try:
        serve_many(
            chosen,
            reload=lambda: checked(load_config(config, flags=flags, roots=roots or ())),
            on_logging=configure_logging,
        )
    except StartError as exc:
        fail(str(exc))


def config_show(roots: RootsArgument = None, config: ConfigOption = None) -> None:
    """Print the effective settings and where each came from, secrets masked."""
    chosen = settings(config, roots, credentials=False)
    typer.echo(render_config(chosen), nl=False)


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

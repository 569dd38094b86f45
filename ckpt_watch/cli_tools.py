"""Commands beside the daemon: ``notify-test`` and ``simulate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ckpt_watch.cli_common import NotifyConfigOption, NotifyOption, fail, targets_from
from ckpt_watch.notify import send_test
from ckpt_watch.simulate import METRIC, Plan, Saved, SimulationError, simulate


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

"""Benchmark ``ckpt-watch check`` against a naive scan that works the way the seed script does."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from common import Options, Row, median_seconds, megabytes
from treegen import FULL, QUICK, Tree, TreeSize, generate_tree

from ckpt_watch.check import RunReport, check_path
from ckpt_watch.ranking import resolve_metric
from ckpt_watch.report import write_text
from ckpt_watch.trainer_state import read_checkpoint

Answers = dict[str, str | None]
SCRIPT = Path(__file__).resolve()
SPEEDUP_TARGET = 5.0
TINY = TreeSize(runs=1, checkpoints=(1, 1), final_bytes=(3000, 3000))
MEMORY_TARGET = 1.5  # times the largest state: the state itself plus small change


class AnswerMismatchError(AssertionError):
    """Raised when the naive scan, ckpt-watch and the generator disagree on a best checkpoint."""


def naive_scan(root: Path, out: TextIO) -> Answers:
    """Glob the state files, ``json.load`` each whole, print the seed's report, name the best."""
    runs: dict[Path, list[Path]] = {}
    for state_file in sorted(root.glob("**/checkpoint-*/trainer_state.json")):
        runs.setdefault(state_file.parent.parent, []).append(state_file)

    answers: Answers = {}
    for run, files in sorted(runs.items()):
        found: list[tuple[int, Path, float, float | None, float | None]] = []
        for state_file in files:
            state = naive_load(state_file)
            step = state["global_step"]
            loss = next(
                (
                    row["eval_loss"]
                    for row in state["log_history"]
                    if row.get("step") == step and "eval_loss" in row
                ),
                None,
            )
            found.append((step, state_file.parent, state["epoch"], loss, state["best_metric"]))
        found.sort(key=lambda item: item[0])
        best = _naive_report(run, found, out)
        answers[run.relative_to(root).as_posix() or "."] = best
    return answers


def naive_load(state_file: Path) -> dict[str, Any]:
    """Load a whole state as the seed script does."""
    with open(state_file) as handle:
        state: dict[str, Any] = json.load(handle)
    return state


def _naive_report(
    run: Path, found: list[tuple[int, Path, float, float | None, float | None]], out: TextIO
) -> str | None:
    print("=" * 70, file=out)
    print(f"CHECKPOINT ANALYSIS: {run}", file=out)
    print("=" * 70, file=out)
    for step, path, epoch, loss, best_metric in found:
        print(f"\nCheckpoint: {path.name}\n  Epoch: {epoch:.2f}\n  Global Step: {step}", file=out)
        if loss is not None:
            print(f"  Validation Loss: {loss:.6f}", file=out)
        if best_metric is not None:
            print(f"  Best Metric: {best_metric:.6f}", file=out)
        print(f"  Path: {path}", file=out)
    valued = [(loss, path) for _, path, _, loss, _ in found if loss is not None]
    if not valued:
        return None
    loss, path = min(valued, key=lambda item: item[0])  # the first of equals: the earliest
    print("\n" + "=" * 70 + f"\n[BEST] CHECKPOINT: {path.name}", file=out)
    print(f"  Validation Loss: {loss:.6f}\n  Path: {path}\n", file=out)
    print(f'To resume training from this checkpoint:\n  resume_from_checkpoint="{path}"', file=out)
    return path.name


def ckpt_watch_check(root: Path, out: TextIO) -> Answers:
    """What ``ckpt-watch check`` does in process: rank every run and write the text report."""
    answers: Answers = {}

    def noting(reports: Iterable[RunReport]) -> Iterator[RunReport]:
        for report in reports:
            best = report.ranking.best
            answers[report.run] = best.name if best else None
            yield report

    write_text(noting(check_path(root, resolve_metric())), out)
    return answers


def run(options: Options) -> list[Row]:
    """Generate a tree, check that every method agrees on it, and time and weigh each."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-check-", dir=options.workdir))
    try:
        root = workdir / "models"
        started = time.perf_counter()
        tree = generate_tree(root, QUICK if options.quick else FULL, seed=options.seed)
        made = time.perf_counter() - started
        rows = [_tree_row(tree, made), *measure(tree, options)]
        tiny = generate_tree(workdir / "tiny", TINY, seed=options.seed)
        return [*rows, fixed_cost_row(tiny.root, options)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure(tree: Tree, options: Options) -> list[Row]:
    """Every row of the check benchmark, for a tree already on disk."""
    runs = len(tree.runs)
    _agree(tree)
    rows = [Row("check", f"best per run ({runs} runs)", "identical", "identical", met=True)]

    with open(os.devnull, "w") as sink:
        times = interleaved(
            {
                "naive": lambda: naive_scan(tree.root, sink),
                "ours": lambda: ckpt_watch_check(tree.root, sink),
            },
            options.repeat,
        )
    rows.append(_speed_row("tree, in process", times, tree.total_bytes))

    cli = [str(_console_script()), "check", str(tree.root)]
    naive_cli = [sys.executable, str(SCRIPT), "naive", str(tree.root)]
    times = interleaved(
        {"naive": lambda: _quiet(naive_cli), "ours": lambda: _quiet(cli)}, options.repeat
    )
    rows.append(_speed_row("tree, CLI end to end", times, tree.total_bytes, target=False))

    assert tree.largest_state is not None
    largest = tree.largest_state
    # Each in a loop of its own, as check reads one state after another.
    times = {
        "naive": median_seconds(lambda: naive_load(largest), options.repeat * 4),
        "ours": median_seconds(lambda: read_checkpoint(largest.parent), options.repeat * 4),
    }
    rows.append(_speed_row(f"largest state ({megabytes(tree.largest_bytes)})", times, None))
    return rows + memory_rows(tree)


def fixed_cost_row(tiny: Path, options: Options) -> Row:
    """Wall time of both commands on one tiny run: start-up and argument parsing."""
    times = interleaved(
        {
            "naive": lambda: _quiet([sys.executable, str(SCRIPT), "naive", str(tiny)]),
            "ours": lambda: _quiet([str(_console_script()), "check", str(tiny)]),
        },
        options.repeat,
    )
    return Row(
        "check",
        "CLI on one tiny run (start-up)",
        _seconds(times["ours"]),
        _seconds(times["naive"]),
        f"{times['ours'] / times['naive']:.1f}x slower",
    )


def memory_rows(tree: Tree) -> list[Row]:
    """Peak memory of each method in a fresh interpreter, beside the largest single state.

    The target is on traced memory (what Python holds); RSS also counts what the allocator
    keeps after a free, which glibc lets reach about twice the largest block.
    """
    rows = []
    for kind, label in (("traced", "peak traced memory"), ("rss", "peak RSS over idle")):
        idle = _peak(kind, "idle", tree.root)
        ours = _peak(kind, "ours", tree.root) - idle
        naive = _peak(kind, "naive", tree.root) - idle
        traced = kind == "traced"
        rows.append(
            Row(
                "check",
                label,
                f"{megabytes(ours)} ({ours / tree.largest_bytes:.2f}x largest state)",
                f"{megabytes(naive)} ({naive / tree.largest_bytes:.2f}x)",
                f"{naive / max(ours, 1):.1f}x less",
                f"<= {MEMORY_TARGET}x largest state" if traced else "",
                ours <= MEMORY_TARGET * tree.largest_bytes if traced else None,
            )
        )
    return rows


def interleaved(actions: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median seconds of each action, run once untimed, then in turns so drift hits all alike."""
    for action in actions.values():
        action()
    times: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeat):
        for name, action in actions.items():
            start = time.perf_counter()
            action()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(spent)[len(spent) // 2] for name, spent in times.items()}


def _agree(tree: Tree) -> None:
    with open(os.devnull, "w") as sink:
        naive = naive_scan(tree.root, sink)
        ours = ckpt_watch_check(tree.root, sink)
    output = subprocess.run(
        [str(_console_script()), "check", "--json", str(tree.root)],
        capture_output=True,
        check=True,
    ).stdout
    cli = {run["run"]: run["best"] for run in json.loads(output)["runs"]}
    for name, answers in (("ckpt-watch", ours), ("ckpt-watch --json", cli), ("naive", naive)):
        if answers != tree.expected_best:
            wrong = {run: best for run, best in answers.items() if tree.expected_best[run] != best}
            raise AnswerMismatchError(f"{name} differs from the generated answers: {wrong}")


def _speed_row(
    measure: str, times: dict[str, float], size: int | None, *, target: bool = True
) -> Row:
    speedup = times["naive"] / times["ours"]
    rate = f" ({size / times['ours'] / 1e6:.0f} MB/s)" if size else ""
    return Row(
        "check",
        measure,
        f"{_seconds(times['ours'])}{rate}",
        _seconds(times["naive"]),
        f"{speedup:.1f}x faster",
        f">= {SPEEDUP_TARGET:.0f}x" if target else "",
        speedup >= SPEEDUP_TARGET if target else None,
    )


def _tree_row(tree: Tree, seconds: float) -> Row:
    return Row(
        "check",
        "generated tree",
        f"{len(tree.runs)} runs, {tree.checkpoints} checkpoints, {megabytes(tree.total_bytes)}, "
        f"states {megabytes(tree.smallest_bytes)}-{megabytes(tree.largest_bytes)}, "
        f"made in {seconds:.1f} s",
    )


def _seconds(value: float) -> str:
    if value < 0.01:
        return f"{value * 1000:.2f} ms"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _console_script() -> Path:
    script = Path(sys.executable).parent / "ckpt-watch"
    if not script.exists():
        raise FileNotFoundError(f"{script}: install the project into this interpreter's venv")
    return script


def _quiet(command: list[str]) -> None:
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True)


def _peak(kind: str, method: str, root: Path) -> int:
    command = [sys.executable, str(SCRIPT), "peak", kind, method, str(root)]
    return int(subprocess.run(command, capture_output=True, check=True, text=True).stdout)


def _idle(_root: Path, _out: TextIO) -> Answers:
    return {}


def _measure_peak(kind: str, method: str, root: Path) -> int:
    """Bytes at the peak of one method, by tracemalloc or by the process's maximum RSS."""
    chosen = {"naive": naive_scan, "ours": ckpt_watch_check, "idle": _idle}
    with open(os.devnull, "w") as sink:
        if kind == "traced":
            tracemalloc.start()
            chosen[method](root, sink)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            return peak
        chosen[method](root, sink)
    return _high_water_rss()


def _high_water_rss() -> int:
    """Peak RSS of this process image. ``ru_maxrss`` is not used: it survives fork and exec,
    so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def main() -> None:
    """Subprocess entry points: the naive scan as a command, and one peak-memory probe."""
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    naive = commands.add_parser("naive", help="print the naive report for a tree")
    naive.add_argument("root", type=Path)
    peak = commands.add_parser("peak", help="print the peak bytes of one method")
    peak.add_argument("kind", choices=["traced", "rss"])
    peak.add_argument("method", choices=["naive", "ours", "idle"])
    peak.add_argument("root", type=Path)
    args = parser.parse_args()
    if args.command == "naive":
        naive_scan(args.root, sys.stdout)
    else:
        print(_measure_peak(args.kind, args.method, args.root))


if __name__ == "__main__":
    main()

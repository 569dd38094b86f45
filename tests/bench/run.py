"""Run every benchmark in tests/bench and print one table with the machine it ran on.

A benchmark is a module ``bench_<name>.py`` beside this file with a function
``run(options: Options) -> list[Row]``; adding one needs no change here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import Options, Row, load_average, machine, table  # noqa: E402  (run as a script)

Benchmark = Callable[[Options], list[Row]]


def benchmarks(only: list[str] | None = None) -> dict[str, Benchmark]:
    """Each ``bench_<name>.py`` module's ``run`` by name, in name order."""
    found = {}
    for module_file in sorted(HERE.glob("bench_*.py")):
        name = module_file.stem.removeprefix("bench_")
        if only and name not in only:
            continue
        found[name] = importlib.import_module(module_file.stem).run
    return found


def main() -> int:
    """Run the chosen benchmarks; exit 1 when a target is missed, 2 when none matched."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs, fewer repetitions")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    parser.add_argument("--repeat", type=int, help="timed repetitions (default 5, quick 3)")
    parser.add_argument("--workdir", type=Path, help="where to put generated inputs (a tmp dir)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    args = parser.parse_args()

    repeat = args.repeat or (3 if args.quick else 5)
    options = Options(quick=args.quick, seed=args.seed, repeat=repeat, workdir=args.workdir)
    chosen = benchmarks(args.only)
    if not chosen:
        print(f"run.py: no benchmark named {' '.join(args.only)}", file=sys.stderr)
        return 2

    load_before = load_average()
    started = time.perf_counter()
    rows: list[Row] = []
    for name, bench in chosen.items():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows += bench(options)
    spent = time.perf_counter() - started

    mode = "quick" if options.quick else "full"
    print("\n".join(machine()))
    print(f"load average: {load_before} before, {load_average()} after")
    print(f"run: {mode}, seed {options.seed}, median of {repeat} after a warm-up, {spent:.0f} s")
    print()
    print("\n".join(table(rows)))
    return 1 if any(row.met is False for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

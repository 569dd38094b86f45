"""What every benchmark shares: result rows, timing, and a description of the machine."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Options:
    """How a benchmark run was asked for: ``quick`` trades precision for time."""

    quick: bool = False
    seed: int = 0
    repeat: int = 5
    workdir: Path | None = None


@dataclass(frozen=True, slots=True)
class Row:
    """One measured figure: ours beside a baseline when there is one, and the target if any."""

    benchmark: str
    measure: str
    ours: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None


def median_seconds(action: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``repeat`` calls, after one untimed call that warms caches."""
    action()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> list[str]:
    """CPU model, cores, memory and Python, as lines for the head of a report."""
    return [
        f"cpu: {_cpu_model()} ({os.cpu_count()} cores)",
        f"memory: {_total_memory_gib():.1f} GiB",
        f"python: {platform.python_implementation()} {platform.python_version()}"
        f" on {platform.system()} {platform.release()}",
    ]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine skews timings."""
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def table(rows: list[Row]) -> list[str]:
    """Rows as a Markdown table, readable in a terminal and pasteable into a README."""
    headers = ("benchmark", "measure", "ckpt-watch", "baseline", "ratio", "target", "met")
    cells = [
        (r.benchmark, r.measure, r.ours, r.baseline, r.ratio, r.target, _met(r.met)) for r in rows
    ]
    widths = [max(len(line[i]) for line in [headers, *cells]) for i in range(len(headers))]
    lines = [_line(headers, widths), _line(tuple("-" * w for w in widths), widths)]
    return lines + [_line(line, widths) for line in cells]


def megabytes(size: float) -> str:
    return f"{size / 1_000_000:.1f} MB"


def _met(met: bool | None) -> str:
    return "" if met is None else ("yes" if met else "NO")


def _line(cells: tuple[str, ...], widths: list[int]) -> str:
    padded = (cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
    return "| " + " | ".join(padded) + " |"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def _total_memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")

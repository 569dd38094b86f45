"""Daemon benchmarks: event-to-record latency, idle CPU, start-up time and memory.

Run through ``tests/bench/run.py`` (``--only watch``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[1])]

from common import Options, Row  # noqa: E402
from factories import dumps, trainer_state  # noqa: E402

from ckpt_watch.engine import Engine  # noqa: E402
from ckpt_watch.history import History  # noqa: E402
from ckpt_watch.ranking import resolve_metric  # noqa: E402
from ckpt_watch.watch import Daemon, WatchSettings  # noqa: E402


def make_tree(root: Path, runs: int, per_run: int, *, logging_steps: int = 10) -> int:
    """``runs`` runs of ``per_run`` checkpoints each, as real training leaves them."""
    for run in range(runs):
        values = {}
        for index in range(1, per_run + 1):
            step = index * 100
            values[step] = {"eval_loss": 1.0 / (1 + index) + (run % 7) * 0.01}
            state = trainer_state(step, values, logging_steps=logging_steps, max_steps=10**6)
            checkpoint = root / f"run-{run:03d}" / f"checkpoint-{step}"
            checkpoint.mkdir(parents=True)
            (checkpoint / "trainer_state.json").write_text(dumps(state))
    return runs * per_run


class TimedHistory(History):
    """A history that notes when each checkpoint record was written."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.written: dict[str, float] = {}
        self.arrived = threading.Condition()

    def append(self, event: str, **fields: object) -> dict[str, object]:
        record = super().append(event, **fields)
        if event == "checkpoint":
            with self.arrived:
                self.written[f"{fields['run']}/{fields['checkpoint']}"] = time.perf_counter()
                self.arrived.notify_all()
        return record


def latency(poll: float | None, samples: int) -> list[float]:
    """Seconds from a state file's close to its record, for ``samples`` new checkpoints."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "models"
        root.mkdir()
        make_tree(root, 5, 4)
        history = TimedHistory(Path(scratch) / "history.jsonl")
        engine = Engine(root, resolve_metric(), history)
        stop, ready = threading.Event(), threading.Event()
        settings = WatchSettings(poll=poll, reconcile=3600)
        daemon = Daemon(engine, settings, stop, on_ready=lambda _d: ready.set())
        thread = threading.Thread(target=daemon.run)
        thread.start()
        ready.wait(30)

        delays = []
        evals: dict[int, dict[str, float]] = {}
        pause = random.Random(0)
        for index in range(samples):
            if poll:  # land at a random point of the polling cycle, as real saves do
                time.sleep(pause.uniform(0, poll))
            step = (index + 1) * 50
            evals[step] = {"eval_loss": 1.0 / (index + 2)}
            content = dumps(trainer_state(step, evals, logging_steps=5, max_steps=10**6))
            checkpoint = root / "live" / f"checkpoint-{step}"
            checkpoint.mkdir(parents=True)
            (checkpoint / "model.safetensors").write_bytes(b"\0" * 4096)
            with open(checkpoint / "trainer_state.json", "w") as handle:
                handle.write(content)
            closed = time.perf_counter()
            key = f"live/checkpoint-{step}"
            with history.arrived:
                history.arrived.wait_for(lambda key=key: key in history.written, timeout=30)
            delays.append(history.written[key] - closed)

        stop.set()
        daemon.queue.wake()
        thread.join(30)
        history.close()
    return delays


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def bench_latency(quick: bool = False) -> list[Row]:
    samples = 50 if quick else 300
    rows = []
    for name, poll in (("inotify", None), ("polling every 1 s", 1.0)):
        delays = latency(poll, samples if poll is None else samples // 10)
        p50, p99 = percentile(delays, 0.5) * 1000, percentile(delays, 0.99) * 1000
        target, met = "", None
        if poll is None:
            target, met = "p50 < 20 ms, p99 < 100 ms", p50 < 20 and p99 < 100
        figure = f"p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(delays)} saves)"
        rows.append(
            Row("watch", f"write-to-record latency, {name}", figure, target=target, met=met)
        )
    return rows


class DaemonProcess:
    """``ckpt-watch start`` as a subprocess, timed until its ``started`` record."""

    def __init__(self, root: Path, history: Path) -> None:
        self.history = history
        self.began = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ckpt_watch", "start", str(root), "--history", str(history)],
            stderr=subprocess.DEVNULL,
        )

    def wait_started(self, count: int, timeout: float = 600) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.history.exists():
                lines = self.history.read_text().splitlines()
                if sum(json.loads(line)["event"] == "started" for line in lines) >= count:
                    return time.perf_counter() - self.began
            time.sleep(0.02)
        raise TimeoutError("daemon did not start")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def bench_idle(quick: bool = False) -> list[Row]:
    """CPU used by a daemon watching 1,000 checkpoints while nothing happens."""
    window = 10.0 if quick else 60.0
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "models"
        make_tree(root, 20, 50)
        daemon = DaemonProcess(root, Path(scratch) / "history.jsonl")
        daemon.wait_started(1)
        before = daemon.cpu_seconds()
        time.sleep(window)
        used = daemon.cpu_seconds() - before
        daemon.stop()
    share = used / window * 100
    figure = f"{share:.3f}% of a core over {window:.0f} s"
    return [Row("watch", "idle CPU, 1,000 checkpoints", figure, target="< 0.1%", met=share < 0.1)]


def bench_startup(quick: bool = False) -> list[Row]:
    """Time to ``started`` and peak memory on 10,000 checkpoints, cold then warm."""
    runs, per_run = (20, 50) if quick else (100, 100)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "models"
        count = make_tree(root, runs, per_run)
        history = Path(scratch) / "history.jsonl"
        rows = []
        for attempt, label in enumerate(("cold", "warm"), start=1):
            subprocess.run(["sync"], check=False)
            daemon = DaemonProcess(root, history)
            seconds = daemon.wait_started(attempt)
            peak = daemon.peak_rss_mb()
            daemon.stop()
            warm = label == "warm"
            figure = f"{seconds:.2f} s to started, peak RSS {peak:.0f} MB"
            rows.append(
                Row(
                    "watch",
                    f"start-up {label}, {count:,} checkpoints",
                    figure,
                    target="< 2 s, < 150 MB" if warm else "",
                    met=(seconds < 2 and peak < 150) if warm else None,
                )
            )
    return rows


def run(options: Options) -> list[Row]:
    """Every daemon benchmark; ``quick`` uses fewer saves, a shorter idle window, 1,000 states."""
    quick = options.quick
    return [*bench_latency(quick), *bench_idle(quick), *bench_startup(quick)]

"""``ckpt-watch start`` and ``history`` as a user runs them: a real process, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until
from factories import write_run

from ckpt_watch.history import replay


class Process:
    """``python -m ckpt_watch ...`` with its stderr collected in a file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._stderr = open(log, "wb")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ckpt_watch", *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )

    def text(self) -> str:
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._stderr.close()
        return code


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(5)


def start(procs: list[Process], root: Path, *extra: str) -> Process:
    log = root.parent / f"daemon-{len(procs)}.log"
    process = Process(["start", str(root), "--reconcile", "60", *extra], log)
    procs.append(process)
    return process


def events(root: Path) -> list[dict[str, object]]:
    return list(replay(root / ".ckpt-watch" / "history.jsonl"))


def kinds(root: Path) -> list[object]:
    return [e["event"] for e in events(root)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_stopped_record(
    root: Path, procs: list[Process], sig: int
) -> None:
    """SIGTERM and SIGINT stop the daemon within seconds, exit 0, and record the stop."""
    write_run(root / "run", {100: 0.5})
    daemon = start(procs, root)
    assert wait_until(lambda: "started" in kinds(root))

    code = daemon.stop(sig)

    assert code == 0
    assert kinds(root)[-1] == "stopped"
    assert "stopped pid=" in daemon.text()


def test_new_checkpoint_is_recorded_by_a_running_daemon(root: Path, procs: list[Process]) -> None:
    """A checkpoint written while the daemon runs gets a record and a new best."""
    write_run(root / "run", {100: 0.5})
    daemon = start(procs, root)
    assert wait_until(lambda: "started" in kinds(root))

    write_run(root / "run", {100: 0.5, 200: 0.25})

    assert wait_until(lambda: "new_best" in kinds(root))
    assert daemon.stop() == 0
    best = next(e for e in events(root) if e["event"] == "new_best")
    assert (best["run"], best["checkpoint"], best["value"]) == ("run", "checkpoint-200", 0.25)


def test_restart_over_unchanged_tree_appends_only_started_and_stopped(
    root: Path, procs: list[Process]
) -> None:
    """A second run over the same tree learns everything from the history."""
    write_run(root / "run", {100: 0.5, 200: 0.4})
    first = start(procs, root)
    assert wait_until(lambda: "started" in kinds(root))
    assert first.stop() == 0
    before = len(events(root))

    second = start(procs, root)
    assert wait_until(lambda: kinds(root).count("started") == 2)
    assert second.stop() == 0

    assert kinds(root)[before:] == ["started", "stopped"]


def test_second_daemon_on_same_root_is_refused(root: Path, procs: list[Process]) -> None:
    """One daemon per root, even with another history file: the second exits 1, one line."""
    first = start(procs, root)
    assert wait_until(lambda: "started" in kinds(root))

    second = start(procs, root, "--history", str(root.parent / "other.jsonl"))
    code = second.proc.wait(10)

    assert code == 1
    message = second.text().strip()
    assert message.count("\n") == 0
    assert "already watching" in message and str(first.proc.pid) in message
    assert first.stop() == 0


def test_missing_root_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """A root that does not exist fails at once with one line naming it."""
    done = subprocess.run(
        [sys.executable, "-m", "ckpt_watch", "start", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert done.returncode == 1
    assert done.stderr.strip() == f"ckpt-watch: {tmp_path / 'nope'}: no such directory"


def test_bad_log_format_is_a_usage_error(root: Path) -> None:
    """An unknown --log-format is refused with exit 2."""
    done = subprocess.run(
        [sys.executable, "-m", "ckpt_watch", "start", str(root), "--log-format", "xml"],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert done.returncode == 2
    assert "--log-format" in done.stderr


def test_json_logs_are_one_object_per_line(root: Path, procs: list[Process]) -> None:
    """--log-format json writes one JSON object per log line."""
    daemon = start(procs, root, "--log-format", "json")
    assert wait_until(lambda: "started" in kinds(root))
    assert daemon.stop() == 0

    lines = [json.loads(line) for line in daemon.text().splitlines()]
    assert {"ts", "level", "logger", "msg"} <= set(lines[0])
    assert any("watching root=" in line["msg"] for line in lines)


def test_history_command_shows_table_and_json(root: Path, procs: list[Process]) -> None:
    """``ckpt-watch history`` prints the events as a table, by run, or as JSON."""
    daemon = start(procs, root)
    assert wait_until(lambda: "started" in kinds(root))
    write_run(root / "a", {100: 0.5})
    write_run(root / "b", {100: 0.7})
    assert wait_until(lambda: kinds(root).count("new_best") == 2)
    assert daemon.stop() == 0

    def run(*args: str) -> str:
        command = [sys.executable, "-m", "ckpt_watch", "history", str(root), *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout

    table = run()
    only_a = run("--run", "a")
    as_json = json.loads(run("--json"))

    assert table.splitlines()[0].split() == [
        "TIME",
        "EVENT",
        "RUN",
        "CHECKPOINT",
        "VALUE",
        "DETAIL",
    ]
    assert "new_best" in table and " b " in table
    assert " a " in only_a and " b " not in only_a
    assert [e["event"] for e in as_json["events"]] == kinds(root)


def run_start(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ckpt_watch", "start", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_checkpoint_as_root_is_refused(root: Path) -> None:
    """Pointing start at one checkpoint names the run to watch instead."""
    write_run(root / "run", {100: 0.5})

    done = run_start(str(root / "run" / "checkpoint-100"))

    assert done.returncode == 1
    assert "is a checkpoint; watch the run that holds it" in done.stderr
    assert not (root / "run" / "checkpoint-100" / ".ckpt-watch").exists()


def test_root_inside_a_watched_root_is_refused(root: Path, procs: list[Process]) -> None:
    """Two daemons would announce the same run twice: a root below a watched one is refused."""
    write_run(root / "team" / "run", {100: 0.5})
    first = start(procs, root)
    assert wait_until(lambda: "started" in kinds(root))

    done = run_start(str(root / "team"), "--history", str(root.parent / "team.jsonl"))

    assert done.returncode == 1
    assert f"pid {first.proc.pid}" in done.stderr and "is watching" in done.stderr
    assert first.stop() == 0


def test_history_of_another_root_is_refused(tmp_path: Path, procs: list[Process]) -> None:
    """A --history file kept outside the root belongs to the root that wrote it."""
    shared = tmp_path / "shared.jsonl"
    first_root, second_root = tmp_path / "a", tmp_path / "b"
    write_run(first_root / "run", {100: 0.5})
    write_run(second_root / "run", {100: 0.7})
    daemon = start(procs, first_root, "--history", str(shared))
    assert wait_until(lambda: shared.exists() and "started" in shared.read_text())
    assert daemon.stop() == 0

    done = run_start(str(second_root), "--history", str(shared))

    assert done.returncode == 1
    assert f"is the history of {first_root}" in done.stderr


def test_symlinked_root_sees_live_checkpoints(tmp_path: Path, procs: list[Process]) -> None:
    """A root given through a symbolic link is watched where it really is."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    start(procs, link)
    assert wait_until(lambda: "started" in kinds(real))

    write_run(real / "run", {100: 0.5})

    assert wait_until(lambda: "checkpoint" in kinds(real), timeout=10)


def test_read_only_root_can_be_watched_with_history_elsewhere(
    tmp_path: Path, procs: list[Process]
) -> None:
    """The lock needs no file in the root, so a read-only tree can be watched."""
    root = tmp_path / "ro"
    write_run(root / "run", {100: 0.5})
    mounted = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(root), str(root)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {mounted.stderr.decode().strip()}")
    try:
        with pytest.raises(OSError):
            (root / "probe").write_text("")
        history = tmp_path / "ro-history.jsonl"
        daemon = start(procs, root, "--history", str(history))
        assert wait_until(lambda: history.exists() and "started" in history.read_text())
        second = run_start(str(root), "--history", str(tmp_path / "other.jsonl"))
        assert daemon.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)

    assert second.returncode == 1 and "already watching" in second.stderr


def test_replaced_root_is_locked_again(tmp_path: Path, procs: list[Process]) -> None:
    """After the root is moved away and made anew, the running daemon holds the new one."""
    root = tmp_path / "models"
    write_run(root / "run", {100: 0.5})
    history = tmp_path / "history.jsonl"
    first = start(procs, root, "--history", str(history))
    assert wait_until(lambda: history.exists() and "started" in history.read_text())

    root.rename(tmp_path / "models.old")
    root.mkdir()
    assert wait_until(lambda: "root appeared, replaced" in first.text(), timeout=15)
    done = run_start(str(root), "--history", str(tmp_path / "other.jsonl"))

    assert done.returncode == 1 and "already watching" in done.stderr
    assert first.stop() == 0


def test_root_holding_a_watched_root_is_refused(root: Path, procs: list[Process]) -> None:
    """A daemon over a tree where another already watches a part would announce twice."""
    write_run(root / "team" / "run", {100: 0.5, 200: 0.4, 300: 0.6})
    inner = start(procs, root / "team")
    assert wait_until(lambda: "started" in kinds(root / "team"))

    done = run_start(str(root), "--history", str(root.parent / "outer.jsonl"))
    pruned = subprocess.run(
        [sys.executable, "-m", "ckpt_watch", "prune", str(root), "--keep", "1", "--yes"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 1
    assert f"pid {inner.proc.pid}" in done.stderr and "one daemon per tree" in done.stderr
    assert pruned.returncode == 1 and "is watching" in pruned.stderr
    assert inner.stop() == 0

"""Run ``ckpt-watch`` commands in-process or as real processes; read what the daemon recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import wait_until
from typer.testing import CliRunner, Result

from ckpt_watch.cli import app
from ckpt_watch.history import replay


def invoke(*args: str) -> Result:
    """``ckpt-watch ARGS`` run in this process (fast), stdout and stderr kept apart."""
    return CliRunner().invoke(app, list(args))


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m ckpt_watch ARGS`` to completion, output captured as text."""
    command = [sys.executable, "-m", "ckpt_watch", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def check_json(path: Path) -> dict[str, Any]:
    """What ``ckpt-watch check PATH --json`` prints, parsed; the command must succeed."""
    done = invoke("check", str(path), "--json")
    assert done.exit_code == 0, done.stderr
    return dict(json.loads(done.stdout))


class Daemon:
    """``ckpt-watch start ROOT`` in the background, its log in a file beside ROOT."""

    def __init__(self, root: Path, *options: str) -> None:
        self.root = root
        self.log = root.parent / f"{root.name}-daemon.log"
        self._stderr = open(self.log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ckpt_watch", "start", str(root), *options],
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def events(self) -> list[dict[str, Any]]:
        return list(replay(self.root / ".ckpt-watch" / "history.jsonl"))

    def wait_started(self, timeout: float = 30) -> None:
        started = wait_until(lambda: any(e["event"] == "started" for e in self.events()), timeout)
        assert started, f"daemon did not start:\n{self.log.read_text()}"

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, then wait for the exit; a daemon still running afterwards is killed."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            self._stderr.close()


def of_run(events: list[dict[str, Any]], run: str, kind: str) -> list[dict[str, Any]]:
    """The events of one kind recorded for one run, in order."""
    return [e for e in events if e["event"] == kind and e.get("run") == run]

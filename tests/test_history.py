"""The JSON Lines history: strict, durable, torn-line safe, patient with a full disk."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until

from ckpt_watch.history import History, HistoryError, replay


def strict_lines(path: Path) -> list[dict[str, object]]:
    """Parse every line with a parser that refuses NaN tokens, as strict readers do."""

    def refuse(token: str) -> None:
        raise ValueError(f"non-standard token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_every_line_is_strict_json_with_version_time_and_event(tmp_path: Path) -> None:
    """Each event is one line of strict JSON with v, an RFC 3339 UTC ts, and event."""
    history = History(tmp_path / "h.jsonl")

    history.append("checkpoint", run=".", value=float("nan"), previous_value=float("inf"))
    history.append("new_best", run=".", value=float("-inf"))

    lines = strict_lines(tmp_path / "h.jsonl")
    assert [line["event"] for line in lines] == ["checkpoint", "new_best"]
    assert all(line["v"] == 1 and str(line["ts"]).endswith("Z") for line in lines)
    assert lines[0]["value"] == "NaN" and lines[0]["previous_value"] == "Infinity"
    assert lines[1]["value"] == "-Infinity"


def test_torn_last_line_is_skipped_and_never_glued_to_the_next(tmp_path: Path) -> None:
    """A crash mid-write leaves a torn line; replay skips it and the next append stands alone."""
    path = tmp_path / "h.jsonl"
    History(path).append("started", run=".")
    with open(path, "a") as handle:
        handle.write('{"v": 1, "event": "checkp')

    History(path).append("stopped")

    assert [e["event"] for e in replay(path)] == ["started", "stopped"]
    assert path.read_text().splitlines()[-1].startswith('{"v":1')


def test_replay_reports_bad_lines_and_keeps_going(tmp_path: Path) -> None:
    """Foreign or broken lines are reported with their number and skipped."""
    path = tmp_path / "h.jsonl"
    path.write_text('{"v":1,"event":"started"}\nnot json\n[1,2]\n{"v":1,"event":"stopped"}\n')
    bad: list[int] = []

    events = list(replay(path, on_bad_line=lambda number, _why: bad.append(number)))

    assert [e["event"] for e in events] == ["started", "stopped"]
    assert bad == [2, 3]


def test_missing_history_replays_as_empty(tmp_path: Path) -> None:
    """No history yet is the very first start, not an error."""
    assert list(replay(tmp_path / "none.jsonl")) == []


def test_unopenable_history_is_a_clear_error(tmp_path: Path) -> None:
    """A history path that cannot be created fails with the path in the message."""
    blocker = tmp_path / "file"
    blocker.write_text("")

    with pytest.raises(HistoryError, match="cannot open history"):
        History(blocker / "h.jsonl")


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB filesystem that can be filled up (needs root to mount)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_full_disk_is_logged_once_and_retried_until_space_returns(
    tiny_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On a full disk the append waits and retries; it lands once space is freed."""
    history = History(tiny_disk / "h.jsonl")
    history.append("started")
    filler = fill(tiny_disk)
    done = threading.Event()

    def append() -> None:
        history.append("checkpoint", run="r", note="x" * 8000)
        done.set()

    with caplog.at_level(logging.ERROR, logger="ckpt_watch.history"):
        worker = threading.Thread(target=append)
        worker.start()
        assert wait_until(lambda: "cannot write history" in caplog.text)
        assert not done.is_set()
        os.unlink(filler)
        worker.join(timeout=10)

    assert done.is_set()
    assert [e["event"] for e in replay(tiny_disk / "h.jsonl")] == ["started", "checkpoint"]
    assert caplog.text.count("cannot write history") == 1


def test_full_disk_gives_up_only_when_asked_to_stop(tiny_disk: Path) -> None:
    """A stop request ends the retrying with HistoryError instead of hanging forever."""
    stop = threading.Event()
    history = History(tiny_disk / "h.jsonl", stop=stop)
    fill(tiny_disk)
    stop.set()

    with pytest.raises(HistoryError):
        history.append("checkpoint", note="x" * 8000)

"""What the daemon announces, and that it reaches real receivers once and only once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until
from factories import dumps, trainer_state, write_checkpoint, write_run
from receivers import Answer, Mailbox, Webhook

from ckpt_watch.announce import Announcement
from ckpt_watch.engine import Engine
from ckpt_watch.history import History, replay
from ckpt_watch.news import AnnouncePolicy
from ckpt_watch.ranking import resolve_metric


class Told:
    """An engine over ``root`` whose announcements are collected instead of sent."""

    def __init__(self, root: Path, policy: AnnouncePolicy | None = None) -> None:
        self.root = root
        self.path = root / ".ckpt-watch" / "history.jsonl"
        self.history = History(self.path)
        self.said: list[Announcement] = []
        self.engine = Engine(
            root, resolve_metric(), self.history, policy=policy, deliver=self.said.append
        )
        self.engine.load(replay(self.path))
        self.engine.first_scan()
        self.history.append("started", metric="eval_loss")

    def kinds(self) -> list[str]:
        return [a.kind for a in self.said]


def test_baseline_is_not_news(tmp_path: Path) -> None:
    """The very first start announces nothing about what is already there."""
    write_run(tmp_path / "run", {100: 0.5, 200: 0.4}, max_steps=200)

    told = Told(tmp_path, AnnouncePolicy(kinds=frozenset({"new_best", "finished"})))

    assert told.said == []


def test_new_best_is_announced_with_everything_a_person_needs(tmp_path: Path) -> None:
    """The announcement names run, metric, value, previous, checkpoint, step, path."""
    run = tmp_path / "run"
    write_run(run, {100: 0.5})
    told = Told(tmp_path, AnnouncePolicy(host="trainbox"))

    write_run(run, {100: 0.5, 200: 0.4})
    told.engine.refresh(run)

    (said,) = told.said
    assert (said.kind, said.run, said.metric, said.value) == ("new_best", "run", "eval_loss", 0.4)
    assert (said.previous, said.previous_value) == ("checkpoint-100", 0.5)
    assert (said.checkpoint, said.step, said.host) == ("checkpoint-200", 200, "trainbox")
    assert said.path == str((run / "checkpoint-200").absolute())
    recorded = [e for e in replay(told.path) if e["event"] == "new_best"]
    assert Announcement.from_event(recorded[-1]) == said


def test_small_improvement_is_recorded_but_not_announced(tmp_path: Path) -> None:
    """Below --min-delta a new best is recorded, and the next announcement compares with
    the last one announced, so creeping gains are still announced once they add up."""
    run = tmp_path / "run"
    write_run(run, {100: 0.5})
    told = Told(tmp_path, AnnouncePolicy(min_delta="0.01"))

    write_run(run, {100: 0.5, 200: 0.495})
    told.engine.refresh(run)
    write_run(run, {100: 0.5, 200: 0.495, 300: 0.489})
    told.engine.refresh(run)

    recorded = [e["checkpoint"] for e in replay(told.path) if e["event"] == "new_best"]
    assert recorded == ["checkpoint-200", "checkpoint-300"]
    assert [a.checkpoint for a in told.said] == ["checkpoint-300"]


def test_finished_and_nonfinite_are_announced_when_asked(tmp_path: Path) -> None:
    """A run reaching max_steps is announced with its best; a NaN evaluation is announced."""
    run = tmp_path / "run"
    kinds = frozenset({"new_best", "finished", "nonfinite"})
    told = Told(tmp_path, AnnouncePolicy(kinds=kinds))

    write_run(run, {100: 0.5}, max_steps=300)
    told.engine.refresh(run)
    write_run(run, {100: 0.5, 200: float("nan")}, max_steps=300)
    told.engine.refresh(run)
    write_run(run, {100: 0.5, 200: float("nan"), 300: 0.6}, max_steps=300)
    told.engine.refresh(run)

    assert told.kinds() == ["new_best", "nonfinite", "finished"]
    finished = told.said[-1]
    assert (finished.checkpoint, finished.value) == ("checkpoint-100", 0.5)


def test_stalled_run_is_announced_once(tmp_path: Path) -> None:
    """No save for several usual intervals is a stall, told once until the run moves again."""
    run = tmp_path / "run"
    told = Told(tmp_path, AnnouncePolicy(kinds=frozenset({"stalled"}), stall_factor=3))
    start = time.time() - 10_000
    for index, step in enumerate((100, 200, 300)):
        checkpoint = write_checkpoint(run, step, trainer_state(step, {step: {"eval_loss": 1.0}}))
        moment = start + index * 600
        os.utime(checkpoint / "trainer_state.json", (moment, moment))
    told.engine.refresh(run)

    told.engine.check_stalls(now=start + 1200 + 1000)
    assert told.said == []
    told.engine.check_stalls(now=start + 1200 + 2000)
    told.engine.check_stalls(now=start + 1200 + 3000)

    assert told.kinds() == ["stalled"]
    assert "usually saves every 10.0 min" in told.said[0].note


# ----- the daemon as a process, with real receivers ------------------------------------


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def start(root: Path, *args: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "ckpt_watch", "start", str(root), "--coalesce", "0", *args]
    return subprocess.Popen(command, stderr=subprocess.PIPE)


def events(root: Path, kind: str) -> list[dict[str, object]]:
    return [e for e in replay(root / ".ckpt-watch" / "history.jsonl") if e["event"] == kind]


def stop(daemon: subprocess.Popen[bytes]) -> bytes:
    daemon.send_signal(signal.SIGTERM)
    _, stderr = daemon.communicate(timeout=20)
    assert daemon.returncode == 0
    return stderr


def test_daemon_tells_a_real_webhook_once_and_not_again_after_restart(
    tmp_path: Path, webhook: Webhook
) -> None:
    """One message per new best; a restart sends nothing that was already delivered."""
    root = tmp_path / "models"
    write_run(root / "run", {100: 0.5})
    daemon = start(root, "--notify", webhook.url())
    assert wait_until(lambda: bool(events(root, "started")))

    write_run(root / "run", {100: 0.5, 200: 0.3})
    assert wait_until(lambda: len(webhook.requests) == 1, timeout=30)
    assert wait_until(lambda: bool(events(root, "notified")))
    stop(daemon)
    again = start(root, "--notify", webhook.url())
    assert wait_until(lambda: len(events(root, "started")) == 2)
    stop(again)

    (request,) = webhook.requests
    assert "0.3" in request.payload["message"] and "run" in request.payload["title"]


def test_announcement_left_by_a_crash_is_delivered_after_restart(tmp_path: Path) -> None:
    """A new best recorded but not delivered before kill -9 is delivered by the next start."""
    webhook = Webhook(Answer(hang=True))  # the first delivery never completes
    try:
        root = tmp_path / "models"
        write_run(root / "run", {100: 0.5})
        daemon = start(root, "--notify", webhook.url())
        assert wait_until(lambda: bool(events(root, "started")))
        write_run(root / "run", {100: 0.5, 200: 0.3})
        assert wait_until(lambda: len(webhook.requests) == 1, timeout=30)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        assert events(root, "notified") == []

        again = start(root, "--notify", webhook.url())
        assert wait_until(lambda: bool(events(root, "notified")), timeout=30)
        stop(again)
    finally:
        webhook.close()

    (best,) = events(root, "new_best")
    (notified,) = events(root, "notified")
    assert notified["announce"] == best["announce"]
    assert len(webhook.requests) == 2
    assert "0.3" in webhook.requests[1].payload["message"]


def test_secret_in_a_target_never_reaches_logs_or_history(tmp_path: Path) -> None:
    """An SMTP password given on the command line appears nowhere the daemon writes."""
    secret = "Sup3rSecretPassw0rd"
    mailbox = Mailbox("trainer", secret)
    try:
        root = tmp_path / "models"
        write_run(root / "run", {100: 0.5})
        daemon = start(root, "--notify", mailbox.url(), "--log-level", "debug")
        assert wait_until(lambda: bool(events(root, "started")))
        write_run(root / "run", {100: 0.5, 200: 0.3})
        assert wait_until(lambda: bool(events(root, "notified")), timeout=60)
        stderr = stop(daemon)
    finally:
        mailbox.close()

    assert secret not in stderr.decode()
    assert secret not in (root / ".ckpt-watch" / "history.jsonl").read_text()
    assert b"checkpoint-200" in b"".join(m.as_bytes() for m in mailbox.messages)


def test_bad_target_fails_start_up_with_one_masked_line(tmp_path: Path) -> None:
    """A URL apprise cannot use stops start-up with one line that hides the secret."""
    root = tmp_path / "models"
    root.mkdir()

    done = subprocess.run(
        [sys.executable, "-m", "ckpt_watch", "start", str(root), "--notify", "nope://u:hunter22@x"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "hunter22" not in done.stderr


def test_state_written_is_strict_in_messages(tmp_path: Path, webhook: Webhook) -> None:
    """A NaN evaluation announced as nonfinite reaches the receiver as text, not a token."""
    root = tmp_path / "models"
    root.mkdir()
    daemon = start(root, "--notify", webhook.url(), "--announce", "nonfinite")
    assert wait_until(lambda: bool(events(root, "started")))

    checkpoint = root / "run" / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    content = dumps(trainer_state(10, {10: {"eval_loss": float("nan")}}))
    (checkpoint / "trainer_state.json").write_text(content)
    assert wait_until(lambda: len(webhook.requests) == 1, timeout=30)
    stop(daemon)

    assert "NaN" in webhook.requests[0].payload["message"]


def test_runs_ended_before_the_first_start_are_never_news(tmp_path: Path) -> None:
    """A run finished, or stalled, before the very first start is not announced later."""
    kinds = frozenset({"new_best", "finished", "stalled"})
    done = tmp_path / "done"
    write_run(done, {100: 0.5, 200: 0.4}, max_steps=200)
    cut = tmp_path / "cut"
    for step in (100, 200, 300):
        checkpoint = write_checkpoint(cut, step, trainer_state(step, {step: {"eval_loss": 1.0}}))
        moment = time.time() - 200_000 + step * 60
        os.utime(checkpoint / "trainer_state.json", (moment, moment))
    Told(tmp_path, AnnouncePolicy(kinds=kinds)).history.close()

    again = Told(tmp_path, AnnouncePolicy(kinds=kinds))
    again.engine.check_stalls()

    assert again.said == []


def test_nonfinite_is_told_once_until_the_metric_is_finite_again(tmp_path: Path) -> None:
    """A run stuck at NaN gives one message, not one per checkpoint."""
    run = tmp_path / "run"
    told = Told(tmp_path, AnnouncePolicy(kinds=frozenset({"nonfinite"})))
    values: dict[int, float] = {}
    for step, value in ((100, float("nan")), (200, float("nan")), (300, 0.5), (400, float("nan"))):
        values[step] = value
        write_run(run, values)
        told.engine.refresh(run)

    assert [a.checkpoint for a in told.said] == ["checkpoint-100", "checkpoint-400"]


def test_message_compares_with_the_last_best_people_were_told(tmp_path: Path) -> None:
    """Below --min-delta nothing is sent; the next message names the last one sent."""
    run = tmp_path / "run"
    write_run(run, {100: 0.5})
    told = Told(tmp_path, AnnouncePolicy(min_delta="0.1"))

    write_run(run, {100: 0.5, 200: 0.45})
    told.engine.refresh(run)
    write_run(run, {100: 0.5, 200: 0.45, 300: 0.35})
    told.engine.refresh(run)

    (said,) = told.said
    assert (said.checkpoint, said.previous, said.previous_value) == (
        "checkpoint-300",
        "checkpoint-100",
        0.5,
    )
    recorded = [e for e in replay(told.path) if e["event"] == "new_best"][-1]
    assert (recorded["previous"], recorded["previous_value"]) == ("checkpoint-200", 0.45)


def test_news_from_a_run_without_targets_is_owed_to_nobody(
    tmp_path: Path, webhook: Webhook
) -> None:
    """What happened while no target was configured is not sent when one is configured again."""
    root = tmp_path / "models"
    write_run(root / "run", {100: 0.5})
    first = start(root, "--notify", webhook.url())
    assert wait_until(lambda: bool(events(root, "started")))
    stop(first)
    quiet = start(root)
    assert wait_until(lambda: len(events(root, "started")) == 2)
    write_run(root / "run", {100: 0.5, 200: 0.3})
    assert wait_until(lambda: bool(events(root, "new_best")))
    stop(quiet)

    again = start(root, "--notify", webhook.url())
    assert wait_until(lambda: len(events(root, "started")) == 3)
    stop(again)

    assert webhook.requests == []

"""Delivery to real receivers on 127.0.0.1: content, retries, timeouts, restarts, shutdown."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apprise
import pytest
import requests
from conftest import wait_until
from receivers import Answer, Mailbox, Refusing, Webhook
from typer.testing import CliRunner

from ckpt_watch.announce import Announcement, make_id, resume_hint, title
from ckpt_watch.cli import app
from ckpt_watch.delivery import Target
from ckpt_watch.history import History, replay
from ckpt_watch.notify import Notifier, NotifyConfigError, load_targets, mask, undelivered
from ckpt_watch.targets import ENV

FAST = {
    "attempt_timeout": 1.0,
    "max_attempts": 3,
    "give_up_after": 5.0,
    "coalesce_window": 0.0,
    "backoff": 0.05,
}


def best(
    run: str = "a/run1", step: int = 516, value: float = 0.2345, **changes: Any
) -> Announcement:
    checkpoint = f"checkpoint-{step}"
    path = f"/models/{run}/{checkpoint}"
    values: dict[str, Any] = {
        "id": make_id("new_best", run, checkpoint, 1),
        "kind": "new_best",
        "run": run,
        "metric": "eval_loss",
        "value": value,
        "previous": "checkpoint-344",
        "previous_value": 0.25,
        "checkpoint": checkpoint,
        "step": step,
        "epoch": step / 100,
        "path": path,
        "host": "gpu-box",
        "resume": resume_hint(path),
    }
    values.update(changes)
    return Announcement(**values)


class Recorder:
    """A real history file, and the events in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.history = History(path)

    def append(self, event: str, **fields: Any) -> object:
        return self.history.append(event, **fields)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in replay(self.path) if name is None or e["event"] == name]

    def attempts(self, target: str) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events()
            if e["event"] in ("notified", "notify_failed") and e["target"] == target
        ]


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[Recorder]:
    recorder = Recorder(tmp_path / "history.jsonl")
    yield recorder
    recorder.history.close()


@pytest.fixture
def start(recorder: Recorder) -> Iterator[Callable[..., Notifier]]:
    """Start notifiers that record into ``recorder``; each is closed afterwards."""
    started: list[Notifier] = []

    def make(urls: list[str], **options: Any) -> Notifier:
        notifier = Notifier(urls, recorder.append, **{**FAST, **options})
        started.append(notifier)
        return notifier

    yield make
    for notifier in started:
        notifier.close(5)


@pytest.fixture
def receivers() -> Iterator[list[Any]]:
    """Receivers the test opens; all are closed afterwards, and no worker may outlive them."""
    opened: list[Any] = []
    yield opened
    for receiver in opened:
        receiver.close()
    assert wait_until(lambda: not _workers(), 5), f"threads left behind: {_workers()}"


def _workers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("ckpt-watch")]


def hook(receivers: list[Any], *answers: Answer, port: int = 0) -> Webhook:
    webhook = Webhook(*answers, port=port)
    receivers.append(webhook)
    return webhook


def refusing(receivers: list[Any]) -> Refusing:
    target = Refusing()
    receivers.append(target)
    return target


def test_email_is_delivered_with_everything_in_it(
    receivers: list[Any], recorder: Recorder, start: Callable[..., Notifier]
) -> None:
    """A new best reaches a real SMTP server once, after a login, saying all a person needs."""
    mailbox = Mailbox("watcher", "Pw-9xQ2mL")
    receivers.append(mailbox)
    url = mailbox.url()
    notifier = start([url])

    notifier.announce(best())

    assert wait_until(lambda: recorder.events("notified"), 10)
    assert mailbox.logins == [True] and len(mailbox.messages) == 1
    message = mailbox.messages[0]
    assert message["Subject"] == "a/run1: new best eval_loss 0.2345"
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    for expected in ["a/run1", "0.2345", "checkpoint-344", "-0.0155 (-6.2%)", "step 516"]:
        assert expected in text and expected in html
    assert "gpu-box" in html and "/models/a/run1/checkpoint-516" in html
    assert "resume_from_checkpoint=" in html and "<code>" in html
    (record,) = recorder.events("notified")
    assert record["target"] == mask(url) and record["attempt"] == 1
    assert "Pw-9xQ2mL" not in record["target"]


def test_webhook_receives_apprise_json(
    receivers: list[Any], recorder: Recorder, start: Callable[..., Notifier]
) -> None:
    """A json:// target gets apprise's JSON shape: version, title, message, type."""
    webhook = hook(receivers)
    notifier = start([webhook.url("/ckpt")])
    a = best()

    notifier.announce(a)

    assert wait_until(lambda: recorder.events("notified"), 5)
    (request,) = webhook.requests
    assert request.path == "/ckpt"
    assert request.payload["title"] == title(a)
    assert request.payload["type"] == "info" and request.payload["version"] == "1.0"
    assert (
        'trainer.train(resume_from_checkpoint="/models/a/run1/checkpoint-516")'
        in (request.payload["message"])
    )
    assert request.headers["Content-Type"] == "application/json"


def test_one_message_per_announcement_and_target(
    receivers: list[Any], recorder: Recorder, start: Callable[..., Notifier]
) -> None:
    """Each announcement reaches each target exactly once, in the order announced."""
    first, second = hook(receivers), hook(receivers)
    notifier = start([first.url(), second.url()])
    sent = [best("a"), best("b"), best("a", kind="finished", id="finished:a")]

    for a in sent:
        notifier.announce(a)
    notifier.close(5)

    for webhook in (first, second):
        assert [r.payload["title"] for r in webhook.requests] == [title(a) for a in sent]
    assert len(recorder.events("notified")) == 6


def test_new_bests_of_one_run_coalesce_into_the_latest(
    receivers: list[Any], recorder: Recorder, start: Callable[..., Notifier]
) -> None:
    """Three quick new bests of one run make one message about the last; other runs are apart."""
    webhook = hook(receivers)
    notifier = start([webhook.url()], coalesce_window=0.4)
    bursts = [best("a", 100, 0.3), best("a", 200, 0.25), best("b", 50, 0.5), best("a", 300, 0.2)]

    for a in bursts:
        notifier.announce(a)

    assert wait_until(lambda: len(webhook.requests) == 2, 5)
    titles = sorted(r.payload["title"] for r in webhook.requests)
    assert titles == ["a: new best eval_loss 0.2", "b: new best eval_loss 0.5"]
    superseded = recorder.events("notify_superseded")
    assert [(e["announce"], e["by"]) for e in superseded] == [
        (bursts[0].id, bursts[1].id),
        (bursts[1].id, bursts[3].id),
    ]
    notifier.close(5)
    assert len(webhook.requests) == 2


def test_other_news_of_a_run_waits_for_its_held_new_best(
    receivers: list[Any], start: Callable[..., Notifier]
) -> None:
    """A run that finishes while its new best is held is told in order: new best, then finished."""
    webhook = hook(receivers)
    notifier = start([webhook.url()], coalesce_window=30.0)
    done = best("a", 900, 0.2, kind="finished", id="finished:a")

    notifier.announce(best("a", 900, 0.2))
    notifier.announce(done)

    assert wait_until(lambda: len(webhook.requests) == 2, 5)
    assert [r.payload["title"] for r in webhook.requests] == [
        "a: new best eval_loss 0.2",
        title(done),
    ]


def test_close_sends_what_is_held(receivers: list[Any], start: Callable[..., Notifier]) -> None:
    """Stopping cuts the coalesce window short instead of dropping the held new best."""
    webhook = hook(receivers)
    notifier = start([webhook.url()], coalesce_window=60.0)

    notifier.announce(best())
    notifier.close(5)

    assert len(webhook.requests) == 1


def test_refused_target_is_retried_then_given_up(
    receivers: list[Any], recorder: Recorder, start: Callable[..., Notifier]
) -> None:
    """Every attempt is recorded; the last says no retry follows; the other target is served."""
    down, up = refusing(receivers), hook(receivers)
    notifier = start([down.url(), up.url()])

    notifier.announce(best())

    assert wait_until(lambda: len(recorder.attempts(mask(down.url()))) == 3, 5)
    attempts = recorder.attempts(mask(down.url()))
    assert [(e["event"], e["attempt"], e["retrying"]) for e in attempts] == [
        ("notify_failed", 1, True),
        ("notify_failed", 2, True),
        ("notify_failed", 3, False),
    ]
    assert all("cannot connect" in e["error"] for e in attempts)
    assert len(up.requests) == 1


@pytest.mark.parametrize("scheme", ["json", "form"])
def test_hanging_target_times_out_without_holding_up_others(
    receivers: list[Any], recorder: Recorder, start: Callable[..., Notifier], scheme: str
) -> None:
    """An endpoint that never answers fails after the attempt timeout; the retry then succeeds."""
    stuck, quick = hook(receivers, Answer(hang=True)), hook(receivers)
    stuck_url = stuck.url(scheme=scheme)
    notifier = start([stuck_url, quick.url()], attempt_timeout=0.5)

    began = time.monotonic()
    notifier.announce(best())

    assert wait_until(lambda: recorder.events("notify_failed"), 5)
    failed_after = time.monotonic() - began
    assert wait_until(lambda: len(recorder.events("notified")) == 2, 5)
    assert quick.requests[0].at - began < 0.4
    assert 0.4 < failed_after < 2.0
    (failed,) = recorder.events("notify_failed")
    assert failed["target"] == mask(stuck_url) and failed["retrying"] is True
    assert len(stuck.requests) == 2


@pytest.mark.parametrize("scheme", ["json", "form"])
def test_server_error_then_success(
    receivers: list[Any], recorder: Recorder, start: Callable[..., Notifier], scheme: str
) -> None:
    """A 500 is recorded as a failed attempt with a retry; the 200 that follows as delivered."""
    webhook = hook(receivers, Answer(500))
    url = webhook.url(scheme=scheme)
    notifier = start([url])

    notifier.announce(best())

    assert wait_until(lambda: recorder.events("notified"), 5)
    attempts = recorder.attempts(mask(url))
    assert [(e["event"], e["attempt"]) for e in attempts] == [
        ("notify_failed", 1),
        ("notified", 2),
    ]
    assert "500" in attempts[0]["error"] and attempts[0]["retrying"] is True
    assert len(webhook.requests) == 2


def test_too_many_requests_waits_as_told(
    receivers: list[Any], recorder: Recorder, start: Callable[..., Notifier]
) -> None:
    """After a 429 with Retry-After: 1 the next attempt comes no sooner than a second later."""
    webhook = hook(receivers, Answer(429, {"Retry-After": "1"}))
    notifier = start([webhook.url()], backoff=0.05)

    notifier.announce(best())

    assert wait_until(lambda: recorder.events("notified"), 5)
    first, second = webhook.requests
    assert second.at - first.at >= 0.95
    (failed,) = recorder.events("notify_failed")
    assert "429" in failed["error"] and "retry after 1s" in failed["error"]


def test_retry_after_beyond_the_limit_gives_up(
    receivers: list[Any], recorder: Recorder, start: Callable[..., Notifier]
) -> None:
    """A Retry-After longer than the time left ends the attempts at once, recorded as given up."""
    webhook = hook(receivers, Answer(429, {"Retry-After": "3600"}))
    notifier = start([webhook.url()])

    notifier.announce(best())

    assert wait_until(lambda: recorder.events("notify_failed"), 5)
    notifier.close(5)
    (failed,) = recorder.events("notify_failed")
    assert failed["retrying"] is False and len(webhook.requests) == 1


def test_optional_service_failure_is_still_a_failure(receivers: list[Any]) -> None:
    """apprise calls a failed ``optional=yes`` service a success; ckpt-watch does not."""
    down = refusing(receivers)
    url = down.url(scheme="form") + "?optional=yes"
    said = apprise.Apprise()
    said.add(url)

    outcome = Target(url, timeout=1.0).send("title", "body")

    assert bool(said.notify("body", "title"))
    assert not outcome.ok and outcome.error


def test_announce_never_blocks(receivers: list[Any], start: Callable[..., Notifier]) -> None:
    """Announcing to a target that hangs returns at once, however much is queued."""
    stuck = hook(receivers, Answer(hang=True))
    notifier = start([stuck.url()], attempt_timeout=0.5, max_attempts=1)

    began = time.monotonic()
    for step in range(1, 21):
        notifier.announce(best(f"run{step}", step))
    took = time.monotonic() - began

    assert took < 0.2
    assert wait_until(lambda: len(stuck.requests) >= 1, 5)


def test_close_is_bounded_and_records_nothing_after(
    receivers: list[Any], recorder: Recorder, start: Callable[..., Notifier]
) -> None:
    """Close returns within its limit while an attempt hangs; the late outcome goes unrecorded."""
    stuck = hook(receivers, Answer(hang=True))
    notifier = start([stuck.url()], attempt_timeout=1.5)
    notifier.announce(best())
    assert wait_until(lambda: stuck.requests, 5)

    began = time.monotonic()
    notifier.close(0.3)
    took = time.monotonic() - began
    written = len(recorder.events())
    notifier.announce(best("late"))

    assert 0.25 < took < 1.0
    assert wait_until(lambda: not _workers(), 5)
    assert len(recorder.events()) == written
    assert len(stuck.requests) == 1


def test_crash_before_delivery_is_delivered_after_restart(
    receivers: list[Any], recorder: Recorder, start: Callable[..., Notifier]
) -> None:
    """Recorded but not delivered when the daemon stopped: delivered once after the restart."""
    webhook = hook(receivers, Answer(hang=True))
    url = webhook.url()
    first = start([url], attempt_timeout=1.5)
    a = best()
    recorder.append("new_best", **a.fields())
    first.announce(a)
    assert wait_until(lambda: webhook.requests, 5)
    first.close(0.2)
    assert not recorder.events("notified")

    owed = undelivered(recorder.events(), [url])
    second = start([url])
    for announcement, targets in owed:
        second.announce(announcement, targets)

    assert owed == [(a, [url])]
    assert wait_until(lambda: recorder.events("notified"), 5)
    assert webhook.requests[-1].payload["title"] == title(a)
    assert undelivered(recorder.events(), [url]) == []


def test_restart_owes_only_targets_that_missed_it(
    receivers: list[Any], recorder: Recorder, start: Callable[..., Notifier]
) -> None:
    """A target that got it is not sent it again; one that was down gets it when back."""
    up, down = hook(receivers), refusing(receivers)
    up_url, down_url = up.url(), down.url()
    first = start([up_url, down_url], backoff=30.0, give_up_after=120.0)
    a = best()
    recorder.append("new_best", **a.fields())
    first.announce(a)
    assert wait_until(lambda: recorder.attempts(mask(down_url)), 5)
    first.close(0.2)

    owed = undelivered(recorder.events(), [up_url, down_url])
    down.close()
    back = hook(receivers, port=down.port)
    second = start([up_url, down_url])
    for announcement, targets in owed:
        second.announce(announcement, targets)

    assert owed == [(a, [down_url])]
    assert wait_until(lambda: len(back.requests) == 1, 5)
    second.close(5)
    assert len(up.requests) == 1 and len(back.requests) == 1
    assert undelivered(recorder.events(), [up_url, down_url]) == []


def test_given_up_stays_given_up(
    receivers: list[Any], recorder: Recorder, start: Callable[..., Notifier]
) -> None:
    """After the last attempt failed, a restart does not try the same announcement again."""
    down = refusing(receivers)
    notifier = start([down.url()], max_attempts=2)
    a = best()
    recorder.append("new_best", **a.fields())

    notifier.announce(a)
    assert wait_until(lambda: len(recorder.events("notify_failed")) == 2, 5)

    assert undelivered(recorder.events(), [down.url()]) == []


def test_new_target_is_not_sent_old_news(recorder: Recorder) -> None:
    """A target added to the config later is owed nothing recorded before it was there."""
    old, new = "json://127.0.0.1:9/old", "json://127.0.0.1:9/new-target"
    recorder.append("notify_targets", targets=[mask(old)])
    a = best()
    recorder.append("new_best", **a.fields())

    owed = undelivered(recorder.events(), [old, new])

    assert owed == [(a, [old])]


def test_removed_target_is_not_owed_anything(recorder: Recorder) -> None:
    """A target no longer configured is skipped; nothing else is owed."""
    gone = "json://127.0.0.1:9/gone-target"
    recorder.append("notify_targets", targets=[mask(gone)])
    recorder.append("new_best", **best().fields())

    assert undelivered(recorder.events(), ["json://127.0.0.1:9/other-target"]) == []


def test_only_the_latest_new_best_of_a_run_is_owed(recorder: Recorder) -> None:
    """Older undelivered new bests of a run are stale once a newer one is recorded."""
    url = "json://127.0.0.1:9/hook"
    recorder.append("notify_targets", targets=[mask(url)])
    older, newer, other = best("a", 100), best("a", 200), best("b", 100)
    finished = best("a", 200, kind="finished", id="finished:a")
    for a in (older, other, newer, finished):
        recorder.append(a.kind, **a.fields())
    recorder.append("notified", announce=newer.id, target=mask(url), attempt=1)

    owed = undelivered(recorder.events(), [url])

    assert owed == [(other, [url]), (finished, [url])]


def test_history_without_targets_owes_every_configured_target(recorder: Recorder) -> None:
    """An announcement recorded before any target list is owed to all targets configured now."""
    urls = ["json://127.0.0.1:9/first-hook", "json://127.0.0.1:9/second-hook"]
    a = best()
    recorder.append("new_best", **a.fields())
    recorder.append("notify_failed", announce=a.id, target=mask(urls[0]), retrying=True)

    assert undelivered(recorder.events(), urls) == [(a, urls)]


def test_notify_test_reports_each_target(receivers: list[Any]) -> None:
    """notify-test sends one test message per target, prints each outcome masked, exits 1."""
    up, down = hook(receivers), refusing(receivers)

    result = CliRunner().invoke(
        app, ["notify-test", "--notify", up.url(), "--notify", down.url()], env={ENV: ""}
    )

    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"ok      {mask(up.url())}",
        f"failed  {mask(down.url())}  cannot connect to 127.0.0.1:{down.port}",
    ]
    (request,) = up.requests
    assert request.payload["title"].startswith("ckpt-watch test from ")


def test_notify_test_succeeds_with_targets_from_the_environment(receivers: list[Any]) -> None:
    """With every target reached, notify-test exits 0; the environment names the targets."""
    first, second = hook(receivers), hook(receivers)

    result = CliRunner().invoke(app, ["notify-test"], env={ENV: f"{first.url()},{second.url()}"})

    assert result.exit_code == 0, result.output
    assert len(first.requests) == 1 and len(second.requests) == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "no notification target"),
        (["--notify", "bogus://me:Pw-8jK2r@host/x"], "notification URL bogus://m...x"),
    ],
)
def test_notify_test_refuses_bad_or_missing_targets(arguments: list[str], message: str) -> None:
    """No target, or one apprise cannot use, is a usage error in one line without secrets."""
    result = CliRunner().invoke(app, ["notify-test", *arguments], env={ENV: ""})

    assert result.exit_code == 2
    assert len(result.output.splitlines()) == 1 and message in result.output
    assert "Pw-8jK2r" not in result.output


def test_secrets_are_never_written(
    tmp_path: Path,
    receivers: list[Any],
    recorder: Recorder,
    start: Callable[..., Notifier],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Passwords and tokens in URLs appear in no log (at any level), history, error or output."""
    password, token, header = "Pw-7f3kQ9zX", "Tok9hG4kLm2Qz", "Hdr8sK2pQ7vX"
    mailbox = Mailbox("watcher", password)
    receivers.append(mailbox)
    webhook, down = hook(receivers, Answer(500)), refusing(receivers)
    hook_url = f"json://bob:{password}@127.0.0.1:{webhook.port}/hook/{token}?+X-Api-Key={header}"
    dead_mail = (
        f"mailto://watcher:{password}@127.0.0.1:{down.port}"
        "?mode=insecure&from=ckpt@example.com&to=you@example.com"
    )
    config = tmp_path / "notify.yml"
    config.write_text(
        f"urls:\n  - mailto://127.0.0.1:{mailbox.port}:\n    - to: cfg@example.com\n"
        f"      user: watcher\n      pass: {password}\n      from: ckpt@example.com\n"
        "      mode: insecure\n"
    )
    written: list[str] = []
    log_file = tmp_path / "everything.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(1)
    try:
        for bad in [
            f"mailto://watcher:{password}@127.0.0.1?from=nobody&to=you@example.com",
            f"bogus://watcher:{password}@host/{token}",
        ]:
            with pytest.raises(NotifyConfigError) as caught:
                load_targets([bad], environ={})
            written.append(str(caught.value))
        urls = load_targets([mailbox.url(), hook_url, dead_mail], config, environ={})
        with monkeypatch.context() as patch:
            patch.setattr(requests, "request", _raise_with(hook_url))
            written.append(Target(hook_url, timeout=1.0).send("t", "b").error)
        notifier = start(urls, max_attempts=2)
        notifier.announce(best())
        assert wait_until(lambda: len(recorder.events("notified")) == 3, 10)
        assert wait_until(lambda: recorder.attempts(mask(dead_mail)), 10)
        notifier.close(0.5)
        result = CliRunner().invoke(app, ["notify-test", "--notify", hook_url], env={ENV: ""})
        written.append(result.output)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
    written += [log_file.read_text(), recorder.path.read_text()]

    everything = "\n".join(written)
    for secret in (password, token, header):
        assert secret not in everything
    assert "unpacked as" in everything and "Traceback" in everything and "***" in everything
    assert len(mailbox.messages) == 2 and mailbox.logins == [True, True]
    assert webhook.requests[-1].headers["X-Api-Key"] == header


def _raise_with(url: str) -> Callable[..., Any]:
    def request(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"cannot post to {url}")

    return request

"""The main loop in-process: start-up extensions, and pings withheld while a root is unhealthy."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import wait_until
from factories import write_run
from notify_listener import NotifyListener

from ckpt_watch import supervisor, worker
from ckpt_watch.config import Config, load_config
from ckpt_watch.engine import Engine
from ckpt_watch.sdnotify import Notifier
from ckpt_watch.service import DaemonSettings, StartError
from ckpt_watch.supervisor import Supervisor
from ckpt_watch.watch import Daemon


class Running:
    """A Supervisor on a thread of its own (so it installs no signal handlers)."""

    def __init__(
        self,
        config: Config,
        listener: NotifyListener,
        watchdog: float | None,
        reloads: list[Config] | None = None,
    ) -> None:
        """``reloads`` are handed out last first, one per reload."""
        self.supervisor = Supervisor(
            config,
            notifier=Notifier(listener.address),
            watchdog=watchdog,
            reload=reloads.pop if reloads is not None else None,
        )
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.supervisor.run(signals=False)
        except BaseException as exc:
            self.error = exc

    def daemon(self) -> Daemon:
        (only,) = self.supervisor.workers.values()
        assert only.daemon is not None
        return only.daemon

    def stop(self) -> None:
        self.supervisor.request_stop()
        self.thread.join(15)
        assert not self.thread.is_alive()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    receiver = NotifyListener(tmp_path)
    yield receiver
    receiver.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    write_run(path / "run", {100: 0.5})
    return path


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for item in started:
        if item.thread.is_alive():
            item.stop()


def gate(
    monkeypatch: pytest.MonkeyPatch, owner: type, name: str
) -> tuple[threading.Event, threading.Event]:
    """Make ``owner.name`` wait for ``open`` while ``closed`` is set; returns (closed, open)."""
    original: Callable[..., object] = getattr(owner, name)
    closed, opened = threading.Event(), threading.Event()

    def gated(self: object, *args: object) -> object:
        if closed.is_set():
            assert opened.wait(30)
        return original(self, *args)

    monkeypatch.setattr(owner, name, gated)
    return closed, opened


def test_long_first_scan_extends_the_start_timeout_until_ready(
    root: Path,
    listener: NotifyListener,
    running: list[Running],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the first scan runs, EXTEND_TIMEOUT_USEC keeps coming; READY=1 only after it."""
    monkeypatch.setattr(supervisor, "EXTEND_EVERY", 0.1)
    closed, opened = gate(monkeypatch, Engine, "first_scan")
    closed.set()
    config = load_config(environ={}, roots=[root])

    running.append(Running(config, listener, watchdog=None))
    during = listener.collect(0.6)
    opened.set()
    ready = listener.wait_for("READY")

    extensions = [m for m in during if "EXTEND_TIMEOUT_USEC" in m]
    assert len(extensions) >= 3
    assert {m["EXTEND_TIMEOUT_USEC"] for m in extensions} == {"20000000"}
    assert not any("READY" in m for m in during)
    assert ready is not None
    after = listener.collect(0.3)
    assert not any("EXTEND_TIMEOUT_USEC" in m for m in after)


def test_dead_watch_withholds_pings_until_it_is_watched_again(
    root: Path,
    listener: NotifyListener,
    running: list[Running],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dead observer stops WATCHDOG=1 (so systemd would restart us); pings resume once healed."""
    monkeypatch.setattr(worker, "daemon_settings", _fast_health(worker.daemon_settings))
    heal_blocked, heal_allowed = gate(monkeypatch, Daemon, "_check_health")
    config = load_config(environ={}, roots=[root])
    item = Running(config, listener, watchdog=0.1)
    running.append(item)
    assert listener.wait_for("READY") is not None
    assert listener.wait_for("WATCHDOG") is not None

    with caplog.at_level(logging.INFO, logger="ckpt_watch"):
        heal_blocked.set()
        item.daemon()._observer.stop()
        assert wait_until(lambda: not item.daemon().observer_alive)
        listener.collect(0.3)
        quiet = listener.collect(0.5)
        heal_allowed.set()
        resumed = listener.wait_for("WATCHDOG", timeout=5)

    assert not any("WATCHDOG" in m for m in quiet)
    assert any("unhealthy" in m.get("STATUS", "") for m in listener.messages)
    assert resumed is not None
    text = caplog.text
    assert f"watchdog ping withheld: root {root}: its watch is down" in text
    assert "healthy again; watchdog pings resume" in text


def test_stuck_main_loop_withholds_pings(
    root: Path,
    listener: NotifyListener,
    running: list[Running],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pings reflect the daemon's own loop: while it is stuck in a reaction, none go out."""
    stuck, released = gate(monkeypatch, Engine, "refresh")
    config = load_config(environ={}, roots=[root])
    item = Running(config, listener, watchdog=0.1)
    running.append(item)
    assert listener.wait_for("READY") is not None

    stuck.set()
    write_run(root / "run", {100: 0.5, 200: 0.4})
    listener.collect(0.5)
    quiet = listener.collect(0.5)
    released.set()
    resumed = listener.wait_for("WATCHDOG", timeout=5)

    assert not any("WATCHDOG" in m for m in quiet)
    assert resumed is not None


def test_daemon_that_dies_after_start_ends_the_service(
    root: Path,
    listener: NotifyListener,
    running: list[Running],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception escaping a root's daemon stops everything and fails, for a restart."""
    failing, _ = gate(monkeypatch, Daemon, "_check_health")

    def explode(self: Daemon) -> None:
        if failing.is_set():
            raise RuntimeError("boom")

    monkeypatch.setattr(Daemon, "_check_health", explode)
    monkeypatch.setattr(worker, "daemon_settings", _fast_health(worker.daemon_settings))
    config = load_config(environ={}, roots=[root])
    item = Running(config, listener, watchdog=None)
    running.append(item)
    assert listener.wait_for("READY") is not None

    failing.set()
    item.thread.join(10)

    assert isinstance(item.error, StartError)
    assert str(item.error) == f"{root}: daemon failed: RuntimeError"
    assert listener.wait_for("STOPPING") is not None


def test_root_put_back_while_still_stopping_is_restarted(
    tmp_path: Path,
    listener: NotifyListener,
    running: list[Running],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Removed by one reload and put back by the next before it stopped: it is watched again."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    both = load_config(environ={}, roots=[a, b])
    only_a = load_config(environ={}, roots=[a])
    slow_stop, stop_done = gate(monkeypatch, Daemon, "_stop_watching")
    item = Running(both, listener, watchdog=None, reloads=[both, only_a])
    running.append(item)
    assert listener.wait_for("READY") is not None

    slow_stop.set()
    item.supervisor.request_reload()
    assert wait_until(lambda: any(w.stop.is_set() for w in item.supervisor.workers.values()))
    item.supervisor.request_reload()
    assert listener.wait_for("RELOADING") is not None
    assert listener.wait_for("RELOADING") is not None
    stop_done.set()

    history = b / ".ckpt-watch" / "history.jsonl"
    assert wait_until(lambda: history.read_text().count('"started"') == 2)
    assert [w.config.path for w in item.supervisor.workers.values()] == [a, b]


def _fast_health(make: Callable[..., DaemonSettings]) -> Callable[..., DaemonSettings]:
    def settings(root_config: object) -> DaemonSettings:
        made = make(root_config)
        assert made.watch is not None
        made.watch.health_every = 0.1
        return made

    return settings

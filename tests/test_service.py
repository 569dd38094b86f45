"""The daemon as systemd runs it: a real process, a real notify socket, real signals."""

from __future__ import annotations

import itertools
import os
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until
from factories import write_run
from notify_listener import NotifyListener

from ckpt_watch.history import replay

SERVICE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY")


class Service:
    """``python -m ckpt_watch start ...`` with a notify socket, its stderr kept in a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        self._stderr = open(log, "wb")  # noqa: SIM115 (closed in stop)
        clean = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("CKPT_WATCH_") and key not in SERVICE_ENV
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ckpt_watch", "start", *args],
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env={**clean, "PYTHONUNBUFFERED": "1", **env},
        )

    def text(self) -> str:
        return self.log.read_text()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._stderr.close()
        return code


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    receiver = NotifyListener(tmp_path)
    yield receiver
    receiver.close()


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        if service.proc.poll() is None:
            service.proc.kill()
            service.proc.wait(5)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


def launch(
    services: list[Service],
    listener: NotifyListener,
    args: list[str],
    **env: str,
) -> Service:
    log = Path(listener.address).parent / f"service-{len(services)}.log"
    service = Service(args, log, {"NOTIFY_SOCKET": listener.address, **env})
    services.append(service)
    return service


def events(root: Path) -> list[dict[str, object]]:
    path = root / ".ckpt-watch" / "history.jsonl"
    return list(replay(path)) if path.exists() else []


def kinds(root: Path) -> list[object]:
    return [event["event"] for event in events(root)]


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----- start-up, watchdog, stop ----------------------------------------------------------------


def test_ready_comes_after_the_first_scan_and_the_started_record(
    root: Path, services: list[Service], listener: NotifyListener
) -> None:
    """READY=1 is sent only once the tree is scanned and `started` is in the history."""
    write_run(root / "run", {100: 0.5, 200: 0.4})
    service = launch(services, listener, [str(root)])

    ready = listener.wait_for("READY")
    history_at_ready = kinds(root)

    assert ready is not None, service.text()
    assert history_at_ready == ["checkpoint", "checkpoint", "started"]
    assert ready["STATUS"] == f"watching {root}: 1 run, 2 checkpoints, 1 best"
    before = listener.messages[: listener.messages.index(ready)]
    assert all(set(message) <= {"STATUS", "EXTEND_TIMEOUT_USEC"} for message in before)
    assert service.stop() == 0


def test_watchdog_pings_at_half_of_watchdog_usec(
    root: Path, services: list[Service], listener: NotifyListener
) -> None:
    """With WATCHDOG_USEC=0.6 s, WATCHDOG=1 comes about every 0.3 s while the daemon idles."""
    write_run(root / "run", {100: 0.5})
    service = launch(services, listener, [str(root)], WATCHDOG_USEC="600000")
    assert listener.wait_for("READY") is not None, service.text()

    listener.collect(2.5)
    pings = [message.at for message in listener.with_key("WATCHDOG")]

    gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
    assert len(pings) >= 6
    assert 0.25 <= statistics.median(gaps) <= 0.4
    assert max(gaps) < 0.6  # never as long as the timeout itself
    assert service.stop() == 0


def test_no_pings_when_watchdog_pid_names_another_process(
    root: Path, services: list[Service], listener: NotifyListener
) -> None:
    """WATCHDOG_PID of another process means the watchdog is not ours: no pings."""
    service = launch(services, listener, [str(root)], WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    assert listener.wait_for("READY") is not None, service.text()

    listener.collect(0.8)

    assert listener.with_key("WATCHDOG") == []
    assert service.stop() == 0


def test_sigterm_sends_stopping_and_exits_0(
    root: Path, services: list[Service], listener: NotifyListener
) -> None:
    """SIGTERM: STOPPING=1 first, then the stop record, then exit status 0."""
    write_run(root / "run", {100: 0.5})
    service = launch(services, listener, [str(root)], WATCHDOG_USEC="2000000")
    assert listener.wait_for("READY") is not None, service.text()

    service.signal(signal.SIGTERM)
    stopping = listener.wait_for("STOPPING")
    code = service.stop()

    assert stopping is not None and stopping["STOPPING"] == "1"
    assert code == 0
    assert kinds(root)[-1] == "stopped"


def test_status_follows_new_checkpoints(
    root: Path, services: list[Service], listener: NotifyListener
) -> None:
    """STATUS= is updated when the counts change."""
    write_run(root / "run", {100: 0.5})
    service = launch(services, listener, [str(root)])
    assert listener.wait_for("READY") is not None, service.text()

    write_run(root / "run", {100: 0.5, 200: 0.4})
    write_run(root / "other", {100: 0.9})

    wanted = f"watching {root}: 2 runs, 3 checkpoints, 2 bests"
    assert wait_until(lambda: (listener.receive(0.2) or {}).get("STATUS") == wanted)
    assert service.stop() == 0


def test_outside_systemd_it_runs_and_stops_as_before(root: Path, tmp_path: Path) -> None:
    """Without NOTIFY_SOCKET nothing is sent and the daemon behaves exactly as in a terminal."""
    log = tmp_path / "plain.log"
    service = Service([str(root)], log, {"WATCHDOG_USEC": "100000"})
    assert wait_until(lambda: "started" in kinds(root))

    assert service.stop() == 0
    assert "ckpt_watch.sdnotify" not in service.text()
    assert "WARNING" not in service.text()


def test_several_roots_in_one_process(
    tmp_path: Path, services: list[Service], listener: NotifyListener
) -> None:
    """READY=1 waits for every root; STATUS sums them."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_run(a / "run", {100: 0.5})
    write_run(b / "run", {100: 0.5, 200: 0.3})
    config = write_config(
        tmp_path / "c.toml", f'[[root]]\npath = "{a}"\n[[root]]\npath = "{b}"\nmetric = "loss"\n'
    )
    service = launch(services, listener, ["--config", str(config)])

    ready = listener.wait_for("READY")

    assert ready is not None, service.text()
    assert "started" in kinds(a) and "started" in kinds(b)
    assert ready["STATUS"] == "watching 2 roots: 2 runs, 3 checkpoints, 2 bests"
    assert service.stop() == 0
    assert kinds(a)[-1] == kinds(b)[-1] == "stopped"


def test_a_root_that_cannot_start_fails_the_start_with_one_line(
    tmp_path: Path, services: list[Service], listener: NotifyListener
) -> None:
    """One unusable root: exit 1 with one line naming it; the other root stops cleanly."""
    good = tmp_path / "good"
    good.mkdir()
    config = write_config(
        tmp_path / "c.toml", f'[[root]]\npath = "{good}"\n[[root]]\npath = "{tmp_path / "gone"}"\n'
    )
    service = launch(services, listener, ["--config", str(config)])

    code = service.proc.wait(15)

    assert code == 1
    assert f"ckpt-watch: {tmp_path / 'gone'}: no such directory" in service.text().splitlines()
    assert listener.with_key("READY") == []
    assert kinds(good) in ([], ["started", "stopped"])


def test_bad_config_exits_2_before_anything_starts(
    tmp_path: Path, services: list[Service], listener: NotifyListener
) -> None:
    """An invalid file is a usage error (exit 2, which the unit does not restart)."""
    config = write_config(tmp_path / "c.toml", "keep = 0\n")
    service = launch(services, listener, ["--config", str(config)])

    assert service.proc.wait(15) == 2
    assert service.text() == f"ckpt-watch: {config}: keep must be a whole number >= 1, not 0\n"


# ----- SIGHUP ---------------------------------------------------------------------------------


def reload(service: Service, listener: NotifyListener) -> None:
    """Send SIGHUP and wait for the RELOADING=1 ... READY=1 pair."""
    service.signal(signal.SIGHUP)
    assert listener.wait_for("RELOADING") is not None, service.text()
    assert listener.wait_for("READY") is not None, service.text()


def test_sighup_applies_a_new_metric_without_losing_state(
    tmp_path: Path, root: Path, services: list[Service], listener: NotifyListener
) -> None:
    """A changed root restarts in place: same process, history kept, nothing announced twice."""
    write_run(root / "run", {100: 0.5, 200: 0.4})
    config = write_config(tmp_path / "c.toml", f'[[root]]\npath = "{root}"\n')
    service = launch(services, listener, ["--config", str(config)])
    assert listener.wait_for("READY") is not None, service.text()
    before = len(events(root))

    write_config(tmp_path / "c.toml", f'metric = "accuracy"\n[[root]]\npath = "{root}"\n')
    reload(service, listener)

    assert wait_until(lambda: kinds(root).count("started") == 2)
    added = events(root)[before:]
    # Another metric is a new baseline (as at any start): recorded, not announced.
    assert [event["event"] for event in added] == ["stopped", "checkpoint", "checkpoint", "started"]
    assert all(event["baseline"] for event in added[1:3])
    assert added[3]["metric"] == "eval_accuracy" and added[3]["pid"] == service.proc.pid
    assert f"reload: root restarts path={root} changed=metric" in service.text()
    assert service.stop() == 0


def test_sighup_retention_change_restarts_only_that_root(
    tmp_path: Path, services: list[Service], listener: NotifyListener
) -> None:
    """Changing one root's settings leaves the other root's daemon alone."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_run(a / "run", {100: 0.5})
    write_run(b / "run", {100: 0.5})
    text = f'[[root]]\npath = "{a}"\n[[root]]\npath = "{b}"\n'
    config = write_config(tmp_path / "c.toml", text)
    service = launch(services, listener, ["--config", str(config)])
    assert listener.wait_for("READY") is not None, service.text()

    write_config(config, text + "keep_top = 2\n")
    reload(service, listener)

    assert wait_until(lambda: kinds(b).count("started") == 2)
    assert kinds(a).count("started") == 1
    assert f"reload: root restarts path={b} changed=keep_top" in service.text()
    assert service.stop() == 0


def test_sighup_with_an_invalid_file_keeps_the_running_settings(
    tmp_path: Path, root: Path, services: list[Service], listener: NotifyListener
) -> None:
    """A bad new file is refused in one log line; the daemon keeps working as before."""
    write_run(root / "run", {100: 0.5})
    config = write_config(tmp_path / "c.toml", f'[[root]]\npath = "{root}"\n')
    service = launch(services, listener, ["--config", str(config)])
    assert listener.wait_for("READY") is not None, service.text()

    write_config(config, f'metric = "accuracy"\nkepe = 3\n[[root]]\npath = "{root}"\n')
    reload(service, listener)
    write_run(root / "run", {100: 0.5, 200: 0.25})

    assert wait_until(lambda: "new_best" in kinds(root))
    best = next(event for event in events(root) if event["event"] == "new_best")
    assert best["metric"] == "eval_loss"
    assert kinds(root).count("started") == 1
    refusals = [line for line in service.text().splitlines() if "reload refused" in line]
    assert len(refusals) == 1
    assert f"{config}: unknown key 'kepe'" in refusals[0]
    assert "the running configuration stays" in refusals[0]
    assert service.proc.poll() is None
    assert service.stop() == 0


def test_sighup_with_an_unusable_target_keeps_the_running_settings(
    tmp_path: Path, root: Path, services: list[Service], listener: NotifyListener
) -> None:
    """A target apprise cannot use is refused at reload like any bad value; nothing restarts."""
    write_run(root / "run", {100: 0.5})
    config = write_config(tmp_path / "c.toml", f'[[root]]\npath = "{root}"\n')
    service = launch(services, listener, ["--config", str(config)])
    assert listener.wait_for("READY") is not None, service.text()

    write_config(config, f'notify = ["jsn://user:pw@127.0.0.1/p"]\n[[root]]\npath = "{root}"\n')
    reload(service, listener)

    refusals = [line for line in service.text().splitlines() if "reload refused" in line]
    assert len(refusals) == 1 and "pw@" not in refusals[0]
    assert kinds(root).count("started") == 1
    assert service.proc.poll() is None
    assert service.stop() == 0


def test_sighup_adds_and_removes_roots(
    tmp_path: Path, services: list[Service], listener: NotifyListener
) -> None:
    """A root added to the file is watched; a root taken out is stopped, the rest untouched."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    config = write_config(tmp_path / "c.toml", f'[[root]]\npath = "{a}"\n')
    service = launch(services, listener, ["--config", str(config)])
    assert listener.wait_for("READY") is not None, service.text()

    write_config(config, f'[[root]]\npath = "{a}"\n[[root]]\npath = "{b}"\n')
    reload(service, listener)
    assert wait_until(lambda: "started" in kinds(b))
    write_config(config, f'[[root]]\npath = "{b}"\n')
    reload(service, listener)
    assert wait_until(lambda: "stopped" in kinds(a))

    write_run(b / "run", {100: 0.5})
    assert wait_until(lambda: "new_best" in kinds(b))
    assert kinds(a) == ["started", "stopped"]
    assert service.stop() == 0


def test_sighup_with_an_unchanged_file_touches_nothing(
    tmp_path: Path, root: Path, services: list[Service], listener: NotifyListener
) -> None:
    """Reloading the same settings restarts nothing."""
    config = write_config(tmp_path / "c.toml", f'[[root]]\npath = "{root}"\n')
    service = launch(services, listener, ["--config", str(config)])
    assert listener.wait_for("READY") is not None, service.text()

    reload(service, listener)

    assert "reload: configuration unchanged" in service.text()
    assert kinds(root) == ["started"]
    assert service.stop() == 0


def test_notification_secrets_stay_out_of_logs_and_history(
    tmp_path: Path, root: Path, services: list[Service], listener: NotifyListener
) -> None:
    """URLs, as started with, reloaded, or refused, never reach the log, history or STATUS."""
    write_run(root / "run", {100: 0.5})
    config = write_config(
        tmp_path / "c.toml",
        f'notify = ["json://user:filesecret@127.0.0.1:9/hook"]\n[[root]]\npath = "{root}"\n',
    )
    service = launch(services, listener, ["--config", str(config), "--log-level", "debug"])
    assert listener.wait_for("READY") is not None, service.text()

    write_config(config, config.read_text().replace("filesecret", "newsecret"))
    reload(service, listener)
    assert wait_until(lambda: kinds(root).count("started") == 2)
    write_config(config, f'notify = "json://bad url secretword"\n[[root]]\npath = "{root}"\n')
    reload(service, listener)
    assert service.stop() == 0

    everything = service.text() + (root / ".ckpt-watch" / "history.jsonl").read_text()
    everything += "\n".join(str(message) for message in listener.messages)
    for secret in ("filesecret", "newsecret", "secretword"):
        assert secret not in everything
    assert f"reload: root restarts path={root} changed=notify" in service.text()
    assert f"reload refused: {config}: notify must be" in service.text()

"""The systemd units: the shipped one and ``ckpt-watch systemd-unit``, checked by systemd itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_watch.unitfile import UnitSpec, render_unit, shipped_spec

SYSTEMD_DIR = Path(__file__).resolve().parents[1] / "systemd"
SHIPPED = SYSTEMD_DIR / "ckpt-watch.service"
EXECUTABLE = Path(sys.executable).parent / "ckpt-watch"


def verify(unit: Path) -> list[str]:
    """What ``systemd-analyze verify`` says about ``unit``: its exit status and lines on it."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd; .ci/run adds it)")
    if not os.access("/bin/kill", os.X_OK):
        pytest.skip("/bin/kill (ExecReload) is missing (Debian package procps)")
    done = subprocess.run(
        [tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    about = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    return [f"exit {done.returncode}", *about]


def installed(text: str, directory: Path, name: str = "ckpt-watch.service") -> Path:
    """The unit as it would be installed here: ExecStart pointing at this installation."""
    unit = directory / name
    unit.write_text(text.replace(str(shipped_spec().executable), str(EXECUTABLE)))
    return unit


def systemd_unit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EXECUTABLE), "systemd-unit", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def settings(unit: str) -> list[str]:
    return [line for line in unit.splitlines() if line and not line.startswith("#")]


def test_shipped_unit_is_what_the_generator_writes() -> None:
    """systemd/ckpt-watch.service stays in step with ``ckpt-watch systemd-unit``."""
    assert SHIPPED.read_text() == render_unit(shipped_spec())


def test_shipped_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd accepts every line of the shipped unit, without a warning."""
    assert verify(installed(SHIPPED.read_text(), tmp_path)) == ["exit 0"]


def test_verify_notices_a_bad_unit(tmp_path: Path) -> None:
    """The check above can fail: an unknown key is reported."""
    text = SHIPPED.read_text().replace("[Service]\n", "[Service]\nWatchdogSecs=5\n")

    report = verify(installed(text, tmp_path))

    assert any("Unknown key" in line and "WatchdogSecs" in line for line in report)


def test_shipped_unit_has_the_service_essentials() -> None:
    """Type=notify, restarts, watchdog, reload by SIGHUP, unbuffered logs, no secrets inline."""
    lines = settings(SHIPPED.read_text())

    for expected in (
        "Type=notify",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "WatchdogSec=60s",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Environment=PYTHONUNBUFFERED=1",
        "EnvironmentFile=-/etc/ckpt-watch/env",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=-/srv/models",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "CapabilityBoundingSet=",
    ):
        assert expected in lines
    assert not any("NOTIFY" in line and "=" in line.split("NOTIFY", 1)[1] for line in lines)


def test_generated_unit_for_this_installation(tmp_path: Path) -> None:
    """ExecStart is this executable's absolute path, with the user and the config file."""
    models = tmp_path / "my models"
    (models / "a").mkdir(parents=True)
    history = tmp_path / "state" / "a.jsonl"
    config = tmp_path / "ckpt-watch.toml"
    config.write_text(
        f'[[root]]\npath = "{models / "a"}"\nhistory = "{history}"\n'
        f'notify_credential = "team-chat"\n'
        f'[[root]]\npath = "{tmp_path / "b"}"\n'
    )

    done = systemd_unit("--config", str(config), "--user", "trainer")

    assert done.returncode == 0, done.stderr
    lines = settings(done.stdout)
    assert f"ExecStart={EXECUTABLE} start --config {config}" in lines
    assert "User=trainer" in lines
    assert f'ReadWritePaths="-{models / "a"}"' in lines
    assert f"ReadWritePaths=-{history.parent}" in lines
    assert f"ReadWritePaths=-{tmp_path / 'b'}" in lines
    assert f"LoadCredential=team-chat:{tmp_path / 'credentials' / 'team-chat'}" in lines
    assert f"EnvironmentFile=-{tmp_path / 'env'}" in lines
    assert "PrivateTmp=yes" not in lines  # the roots live under /tmp here
    assert verify(installed(done.stdout, tmp_path)) == ["exit 0"]


def test_generated_unit_keeps_home_readable_when_roots_live_there() -> None:
    """Roots under /home get ProtectHome=read-only (with write access to them), not yes."""
    spec = UnitSpec(
        executable=Path("/opt/ckpt-watch/bin/ckpt-watch"),
        user="alice",
        config=Path("/etc/ckpt-watch/ckpt-watch.toml"),
        writable=(Path("/home/alice/models"),),
    )

    lines = settings(render_unit(spec))

    assert "ProtectHome=read-only" in lines
    assert "ReadWritePaths=-/home/alice/models" in lines
    assert "PrivateTmp=yes" in lines


def test_user_defaults_to_the_one_behind_sudo(tmp_path: Path) -> None:
    """``sudo ckpt-watch systemd-unit`` runs the service as the user who typed it."""
    config = tmp_path / "c.toml"
    config.write_text(f'[[root]]\npath = "{tmp_path}"\n')

    done = systemd_unit("--config", str(config), env={"SUDO_USER": "alice"})

    assert "User=alice" in settings(done.stdout)


def test_systemd_unit_needs_a_valid_config(tmp_path: Path) -> None:
    """Without a readable, valid config there is no unit: one line, exit 2."""
    done = systemd_unit("--config", str(tmp_path / "missing.toml"))

    assert done.returncode == 2
    assert done.stderr == (
        f"ckpt-watch: {tmp_path / 'missing.toml'}: cannot read: No such file or directory\n"
    )
    assert done.stdout == ""

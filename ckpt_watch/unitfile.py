"""Write a hardened systemd unit that runs ``ckpt-watch start --config FILE``."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ckpt_watch.config import Config

DEFAULT_CONFIG = Path("/etc/ckpt-watch/ckpt-watch.toml")
_HOMES = (Path("/home"), Path("/root"), Path("/run/user"))
_TMPS = (Path("/tmp"), Path("/var/tmp"))
_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./$-]+")


@dataclass(frozen=True, slots=True)
class UnitSpec:
    """What differs from one installation to another."""

    executable: Path
    user: str
    config: Path
    writable: tuple[Path, ...]
    credentials: tuple[str, ...] = ()
    readable: tuple[Path, ...] = ()  # other files it reads: apprise configurations
    credentials_dir: Path = Path("/etc/ckpt-watch/credentials")
    environment_file: Path = Path("/etc/ckpt-watch/env")

    @property
    def in_home(self) -> bool:
        """Whether anything the service needs lives where ProtectHome=yes would hide it."""
        paths = (self.executable, self.config, *self.writable, *self.readable)
        return any(_under(path, _HOMES) for path in paths)

    @property
    def in_tmp(self) -> bool:
        """Whether a path lives in /tmp, which PrivateTmp=yes would replace."""
        return any(_under(path, _TMPS) for path in (self.config, *self.writable, *self.readable))


def this_executable() -> Path:
    """The absolute path of the running ``ckpt-watch`` script (for ExecStart=)."""
    argv0 = sys.argv[0]
    found = shutil.which(argv0) if os.sep not in argv0 else argv0
    if found and Path(found).name == "ckpt-watch" and os.access(found, os.X_OK):
        return Path(os.path.abspath(found))
    beside = Path(sys.executable).parent / "ckpt-watch"  # run as python -m ckpt_watch
    if os.access(beside, os.X_OK):
        return Path(os.path.abspath(beside))
    return Path(shutil.which("ckpt-watch") or beside)


def invoking_user() -> str:
    """The user to run as: the one behind ``sudo`` if any, otherwise the current one."""
    return os.environ.get("SUDO_USER") or pwd.getpwuid(os.geteuid()).pw_name


def spec_for(config: Config, config_path: Path, executable: Path, user: str) -> UnitSpec:
    """The unit's variable parts for this configuration."""
    writable: list[Path] = []
    for root in config.roots:
        writable.append(root.path)
        if root.history is not None and root.path not in root.history.parents:
            writable.append(root.history.parent)
    credentials = sorted({root.notify_credential or "" for root in config.roots} - {""})
    return UnitSpec(
        executable=executable,
        user=user,
        config=Path(os.path.abspath(config_path)),
        writable=tuple(dict.fromkeys(writable)),
        credentials=tuple(credentials),
        readable=tuple(dict.fromkeys(r.notify_config for r in config.roots if r.notify_config)),
        credentials_dir=Path(os.path.abspath(config_path)).parent / "credentials",
        environment_file=Path(os.path.abspath(config_path)).parent / "env",
    )


def render_unit(spec: UnitSpec) -> str:
    """The unit file's text."""
    words = (str(spec.executable), "start", "--config", str(spec.config))
    start = " ".join(_word(word.replace("$", "$$")) for word in words)
    credentials = [
        f"LoadCredential={name}:{spec.credentials_dir / name}" for name in spec.credentials
    ]
    if not credentials:
        credentials = [f"#LoadCredential=notify:{spec.credentials_dir / 'notify'}"]
    lines = [
        "# ckpt-watch: watch Hugging Face Trainer checkpoints as a service.",
        "#   install: sudo cp ckpt-watch.service /etc/systemd/system/",
        "#            sudo systemctl daemon-reload && sudo systemctl enable --now ckpt-watch",
        "#   logs:    journalctl -u ckpt-watch -f",
        "#   reload:  sudo systemctl reload ckpt-watch   (re-reads the config file)",
        "",
        "[Unit]",
        "Description=ckpt-watch: rank, record and announce Hugging Face Trainer checkpoints",
        "Wants=network-online.target",
        "After=network-online.target",
        *(f"RequiresMountsFor={_word(str(path))}" for path in spec.writable),
        "",
        "[Service]",
        "# READY=1 comes once every root has been scanned and is watched.",
        "Type=notify",
        f"ExecStart={start}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        f"User={spec.user}",
        "# A crash or a missed watchdog ping restarts it; exit status 2 is a bad",
        "# configuration, which a restart cannot mend.",
        "Restart=on-failure",
        "RestartSec=5s",
        "RestartPreventExitStatus=2",
        "# Pings come every WatchdogSec/2 while every watch is healthy.",
        "WatchdogSec=60s",
        "# The start timeout is extended while a long first scan runs.",
        "TimeoutStartSec=90s",
        "TimeoutStopSec=45s",
        "# Log records go to stderr, one line each, straight into the journal.",
        "Environment=PYTHONUNBUFFERED=1",
        "# Secrets never go in this file. Either CKPT_WATCH_NOTIFY=... in a root-owned",
        "# file of mode 0600 (systemd reads it before dropping privileges) ...",
        f"EnvironmentFile=-{spec.environment_file}",
        "# ... or a credential file named by notify_credential in the config, which the",
        "# service reads from $CREDENTIALS_DIRECTORY:",
        *credentials,
        "",
        "# Hardening: the system is read-only except where checkpoints are recorded and pruned.",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        *(f"ReadWritePaths={_word(f'-{path}')}" for path in spec.writable),
        f"ProtectHome={'read-only' if spec.in_home else 'yes'}",
        *([] if spec.in_tmp else ["PrivateTmp=yes"]),
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallErrorNumber=EPERM",
        "CapabilityBoundingSet=",
        "UMask=0027",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def _under(path: Path, tops: Iterable[Path]) -> bool:
    """Whether ``path``, symbolic links followed, is at or below one of ``tops``."""
    real = Path(os.path.realpath(path))
    return any(real == top or top in real.parents for top in tops)


def _word(text: str) -> str:
    """One word of a unit setting: ``%`` specifiers escaped, quoted when it has blanks."""
    text = text.replace("%", "%%")
    if _PLAIN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def shipped_spec() -> UnitSpec:
    """The example in ``systemd/ckpt-watch.service``: a venv in /opt, models in /srv."""
    return UnitSpec(
        executable=Path("/opt/ckpt-watch/bin/ckpt-watch"),
        user="ckpt-watch",
        config=DEFAULT_CONFIG,
        writable=(Path("/srv/models"),),
    )

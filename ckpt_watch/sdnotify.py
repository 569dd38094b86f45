"""The systemd service protocol (sd_notify) over a plain datagram socket, without libsystemd."""

from __future__ import annotations

import logging
import os
import socket
import string
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

USEC_INFINITY = 2**64 - 1
_SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path) on Linux
_PID_MAX = 2**31 - 1  # pid_t is a signed 32-bit int
_SEND_TIMEOUT = 2.0


class NotifyAddressError(ValueError):
    """Raised when NOTIFY_SOCKET is neither an absolute path nor an abstract ``@name``."""


class WatchdogSettingError(ValueError):
    """Raised when WATCHDOG_USEC or WATCHDOG_PID is a value libsystemd would refuse."""


def socket_address(value: str) -> str | bytes:
    """The AF_UNIX address that NOTIFY_SOCKET names: a path, or ``@name`` in the abstract space."""
    raw = os.fsencode(value)
    if len(raw) < 2 or raw[:1] not in (b"/", b"@"):
        raise NotifyAddressError(f"NOTIFY_SOCKET={value!r} is not an absolute path or @name")
    if len(raw) > _SUN_PATH_MAX:
        raise NotifyAddressError(f"NOTIFY_SOCKET is longer than {_SUN_PATH_MAX} bytes")
    return b"\0" + raw[1:] if raw[:1] == b"@" else value


class Notifier:
    """Tells the service manager about state changes; does nothing outside systemd.

    Sending never raises: a failure is logged once (until a send succeeds again) and the
    daemon carries on, since a lost status message must never stop the watching.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._target: str | bytes | None = None
        self._failing = False
        if address is None:
            return
        try:
            self._target = socket_address(address)
        except NotifyAddressError as exc:
            log.warning("service notifications off: %s", exc)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET``, or a silent one when it is not set."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        """Whether there is a service manager to talk to."""
        return self._target is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; True if the manager got them."""
        if self._target is None or not assignments:
            return False
        message = "\n".join(assignments).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.settimeout(_SEND_TIMEOUT)
                self._sock.sendto(message, self._target)
            except OSError as exc:
                if not self._failing:
                    log.warning(
                        "cannot notify the service manager socket=%s error=%s", self.address, exc
                    )
                self._failing = True
                return False
            if self._failing:
                log.info("service manager reachable again socket=%s", self.address)
            self._failing = False
            return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete."""
        return self.send("READY=1", *_status(status))

    def reloading(self) -> bool:
        """A reload of the configuration begins; ``ready`` must follow.

        MONOTONIC_USEC goes with it, as systemd 253 and later expect of a reload.
        """
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={now}")

    def status(self, text: str) -> bool:
        """A one-line description of what the daemon is doing."""
        return self.send(*_status(text))

    def watchdog(self) -> bool:
        """Keep-alive ping: the main loop is running and healthy."""
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun."""
        return self.send("STOPPING=1", *_status(status))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the current start or stop timeout fires."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(int(seconds * 1_000_000), 1)}")

    def close(self) -> None:
        """Close the socket; a later send opens it again."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _status(text: str | None) -> list[str]:
    if text is None:
        return []
    return ["STATUS=" + " ".join(text.split())]


def watchdog_usec(environ: Mapping[str, str] | None = None, pid: int | None = None) -> int | None:
    """WATCHDOG_USEC read the way libsystemd's ``sd_watchdog_enabled`` reads it.

    None when the watchdog is off for this process: no WATCHDOG_USEC, or a WATCHDOG_PID
    naming another process. Raises WatchdogSettingError where libsystemd returns an error:
    an unparsable, zero or infinite WATCHDOG_USEC, or an unparsable or non-positive
    WATCHDOG_PID.
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC")
    if raw is None:
        return None
    usec = _unsigned("WATCHDOG_USEC", raw, USEC_INFINITY)
    if usec in (0, USEC_INFINITY):
        raise WatchdogSettingError(f"WATCHDOG_USEC={raw!r} is not a finite, non-zero time")
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid is not None:
        target = _unsigned("WATCHDOG_PID", raw_pid, USEC_INFINITY)
        if not 0 < target <= _PID_MAX:
            raise WatchdogSettingError(f"WATCHDOG_PID={raw_pid!r} is not a process id")
        if target != (os.getpid() if pid is None else pid):
            return None
    return usec


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC, or None when it is off."""
    try:
        usec = watchdog_usec(environ, pid)
    except WatchdogSettingError as exc:
        log.warning("service watchdog off: %s", exc)
        return None
    return None if usec is None else usec / 2_000_000


def _unsigned(name: str, raw: str, limit: int) -> int:
    """An unsigned number as systemd's ``safe_atou64`` parses it (C ``strtoull``, base 0).

    Leading blanks and a ``+`` are allowed; ``0x`` is hex, ``0o`` and a leading ``0`` octal,
    ``0b`` binary; a minus sign on anything but zero is refused.
    """
    text = raw.lstrip(" \t\n\r")
    base = 0
    if text[:2] in ("0b", "0B"):
        base, text = 2, text[2:]
    elif text[:2] in ("0o", "0O"):
        base, text = 8, text[2:]
    body = text.lstrip(" \t\n\v\f\r")
    negative = body[:1] == "-"
    if body[:1] in ("+", "-"):
        body = body[1:]
    if base == 0 and body[:2] in ("0x", "0X"):
        base, body = 16, body[2:]
    elif base == 0:
        base = 8 if body[:1] == "0" else 10
    allowed = string.hexdigits if base == 16 else string.digits[:base]
    if not body or any(char not in allowed for char in body):
        raise WatchdogSettingError(f"{name}={raw!r} is not an unsigned number")
    value = int(body, base)
    if value > limit or (negative and value != 0):
        raise WatchdogSettingError(f"{name}={raw!r} is out of range")
    return value

"""A service manager's end of the notify socket, for tests: a bound AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path


class Message(dict[str, str]):
    """One datagram: its ``KEY=value`` lines, and when it arrived (monotonic)."""

    at: float = 0.0


class NotifyListener:
    """Receives what a daemon sends to ``$NOTIFY_SOCKET``; keeps every message in order."""

    def __init__(self, directory: Path | None = None, *, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._cleanup: Path | None = None
        if abstract:
            name = f"ckpt-watch-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            path = (directory or Path(tempfile.gettempdir())) / "notify.sock"
            if len(os.fsencode(path)) > 100:  # sun_path holds 108 bytes
                self._cleanup = Path(tempfile.mkdtemp(prefix="ckw-"))
                path = self._cleanup / "notify.sock"
            self.sock.bind(str(path))
            self.address = str(path)
        self.messages: list[Message] = []

    def receive(self, timeout: float) -> Message | None:
        """The next datagram, or None when none comes within ``timeout`` seconds."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        message = Message(line.split("=", 1) for line in data.decode().splitlines() if line)
        message.at = time.monotonic()
        self.messages.append(message)
        return message

    def wait_for(self, key: str, timeout: float = 10.0) -> Message | None:
        """Receive until a message carrying ``key`` arrives, or the bound passes."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None and key in message:
                return message
        return None

    def collect(self, seconds: float) -> list[Message]:
        """Everything that arrives within the next ``seconds``."""
        start = len(self.messages)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.receive(left)
        return self.messages[start:]

    def with_key(self, key: str) -> list[Message]:
        return [message for message in self.messages if key in message]

    def close(self) -> None:
        self.sock.close()
        if self._cleanup is not None:
            for item in self._cleanup.iterdir():
                item.unlink()
            self._cleanup.rmdir()

"""Real notification receivers on 127.0.0.1: a webhook endpoint and an SMTP server."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session


@dataclass
class Request:
    """One request the webhook received."""

    path: str
    headers: dict[str, str]
    payload: Any
    at: float


@dataclass
class Answer:
    """How the webhook answers one request: a status and headers, or no answer at all."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False


class Webhook:
    """An HTTP endpoint that records every request and answers from a script, then 200."""

    def __init__(self, *answers: Answer, port: int = 0) -> None:
        self.requests: list[Request] = []
        self.script = list(answers)
        self.released = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def url(self, path: str = "/hook", scheme: str = "json") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _answer(self, request: Request) -> Answer:
        with self._lock:
            self.requests.append(request)
            return self.script.pop(0) if self.script else Answer()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    payload: Any = json.loads(raw)
                except ValueError:
                    payload = raw.decode()
                request = Request(self.path, dict(self.headers), payload, time.monotonic())
                answer = receiver._answer(request)
                if answer.hang:
                    receiver.released.wait(10)
                    return
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        return Handler


class Mailbox:
    """An SMTP server without TLS that accepts one login and keeps every message."""

    def __init__(self, user: str, password: str) -> None:
        self.messages: list[EmailMessage] = []
        self.logins: list[bool] = []
        self._user, self._password = user.encode(), password.encode()
        self.port = free_port()
        self._controller = Controller(
            self,
            hostname="127.0.0.1",
            port=self.port,
            authenticator=self._authenticate,
            auth_require_tls=False,
        )
        self._controller.start()

    def url(self, password: str | None = None, to: str = "you@example.com") -> str:
        secret = self._password.decode() if password is None else password
        return (
            f"mailto://{self._user.decode()}:{secret}@127.0.0.1:{self.port}"
            f"?mode=insecure&from=ckpt@example.com&to={to}"
        )

    def close(self) -> None:
        self._controller.stop()

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.messages.append(message_from_bytes(content, policy=policy.default))  # type: ignore[arg-type]
        return "250 OK"

    def _authenticate(
        self, server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            self._user,
            self._password,
        )
        self.logins.append(ok)
        return AuthResult(success=ok)


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Refusing:
    """A port that refuses connections: bound, never listening."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]

    def url(self, scheme: str = "json") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self._socket.close()

"""One attempt to deliver one message to one target, through apprise or a plain JSON POST."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import apprise
import requests
from apprise import AppriseResultStatus, NotifyFormat

from ckpt_watch.redact import ASSET, guarding, instantiate, mask, redact
from ckpt_watch.targets import NotifyConfigError

log = logging.getLogger(__name__)

# apprise's json:// plugin reports a 429 as a plain failure and drops Retry-After, so
# ckpt-watch posts the same payload itself for these schemes and reads the header.
DIRECT = frozenset({"json", "jsons"})


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended; ``error`` never holds a secret."""

    ok: bool
    error: str = ""
    retry_after: float | None = None


class Target:
    """A configured target: apprise's service for it, its masked name, and how to send to it."""

    def __init__(self, url: str, *, timeout: float) -> None:
        self.url = url
        self.masked = mask(url)
        with guarding(url):
            plugin = instantiate(url)
        if plugin is None:
            raise NotifyConfigError(f"notification URL {self.masked} is not usable")
        plugin.socket_connect_timeout = timeout
        plugin.socket_read_timeout = timeout
        self.timeout = timeout
        # apprise paces requests to one service; waiting here keeps that pause out of
        # the attempt's timeout.
        self.spacing = float(getattr(plugin, "request_rate_per_sec", 0) or 0)
        self.last_attempt = -math.inf
        self._plugin = plugin
        self._direct = url.split("://", 1)[0].lower() in DIRECT

    def send(self, title: str, body: str) -> Outcome:
        """Make one attempt, bounded by the timeout; never raises."""
        self.last_attempt = time.monotonic()
        try:
            if self._direct:
                return self._post_json(title, body)
            return self._notify(title, body)
        except Exception as exc:  # a plugin bug must not stop the worker
            log.debug("delivery raised target=%s", self.masked, exc_info=True)
            return Outcome(False, redact(f"{type(exc).__name__}: {exc}"))

    def _notify(self, title: str, body: str) -> Outcome:
        bundle = apprise.Apprise(asset=ASSET)
        bundle.add(self._plugin)
        with bundle.notify(
            body, title, body_format=NotifyFormat.MARKDOWN, timeout=self.timeout
        ) as result:
            services = list(result)
            # An optional service reports success even when it failed; look at the attempt.
            if (
                result.status == AppriseResultStatus.SUCCESS
                and services
                and all(service.attempts and service.attempts[-1] for service in services)
            ):
                return Outcome(True)
            if result.status == AppriseResultStatus.TIMEOUT:
                return Outcome(False, f"no answer within {self.timeout:g}s")
            if result.status == AppriseResultStatus.NOMATCH:
                return Outcome(False, "apprise sent nothing")
            notes = [entry.message for entry in result.logs() if _serious(entry.level)]
            return Outcome(False, redact(notes[-1] if notes else "apprise reported a failure"))

    def _post_json(self, title: str, body: str) -> Outcome:
        plugin = self._plugin
        payload: dict[str, Any] = {
            "version": plugin.json_version,
            "title": title,
            "message": body,
            "attachments": [],
            "type": "info",
        }
        for key, value in plugin.payload_extras.items():
            if key not in payload:
                payload[key] = value
            elif value:
                payload[value] = payload.pop(key)
            else:
                del payload[key]
        port = f":{plugin.port}" if isinstance(plugin.port, int) else ""
        scheme = "https" if plugin.secure else "http"
        try:
            response = requests.request(
                plugin.method,
                f"{scheme}://{plugin.host}{port}{plugin.fullpath}",
                data=json.dumps(payload),
                params=plugin.params,
                headers={
                    "User-Agent": plugin.app_id,
                    "Content-Type": "application/json",
                    **plugin.headers,
                },
                auth=(plugin.user, plugin.password) if plugin.user else None,
                verify=plugin.verify_certificate,
                timeout=(self.timeout, self.timeout),
                allow_redirects=plugin.redirects,
            )
        except requests.Timeout:
            return Outcome(False, f"no answer within {self.timeout:g}s")
        except requests.ConnectionError:
            return Outcome(False, f"cannot connect to {plugin.host}{port}")
        with response:
            if 200 <= response.status_code < 300:
                return Outcome(True)
            error = f"HTTP {response.status_code}"
            wait = retry_after(response.headers.get("Retry-After"))
            if response.status_code in (429, 503) and wait is not None:
                return Outcome(False, f"{error}, retry after {wait:g}s", wait)
            return Outcome(False, error)


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), or None."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - time.time())


def _serious(level: str) -> bool:
    return level in ("WARNING", "ERROR", "CRITICAL")

"""The configuration keys: what each allows, how a value is checked and read from text."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_watch.logsetup import FORMATS, LEVELS
from ckpt_watch.ranking import MetricError, resolve_metric
from ckpt_watch.targets import split_urls

ENV_PREFIX = "CKPT_WATCH_"
# What the daemon can announce, besides the test message.
ANNOUNCEABLE = frozenset({"new_best", "finished", "stalled", "nonfinite"})
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_CREDENTIAL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*")
_PERCENT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class BadValueError(Exception):
    """Raised by a check for a value the setting does not allow; ``quote`` is False for secrets."""

    def __init__(self, *, quote: bool = True) -> None:
        self.quote = quote


@dataclass(frozen=True, slots=True)
class Setting:
    """One key: what it allows, how to check a typed value and how to read env text."""

    name: str
    allowed: str
    check: Callable[[Any, Path], Any]
    from_text: Callable[[str], Any]
    process: bool = False  # one value for the whole process, not per root
    default: Any = None

    @property
    def flag(self) -> str:
        """The command-line spelling: ``--keep-top``."""
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        """The environment variable: ``CKPT_WATCH_KEEP_TOP``."""
        return ENV_PREFIX + self.name.upper()


# ----- checks: a typed value (TOML, flag) in, the setting's value out ---------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _choice(options: Sequence[str]) -> Callable[[Any, Path], str]:
    def check(value: Any, _base: Path) -> str:
        if value not in options:
            raise BadValueError
        return str(value)

    return check


def _metric(value: Any, _base: Path) -> str:
    if not isinstance(value, str):
        raise BadValueError
    try:
        resolve_metric(value)
    except MetricError as exc:
        raise BadValueError from exc
    return value.strip()


def _seconds(minimum: float, *, zero_is_off: bool = False) -> Callable[[Any, Path], float | None]:
    def check(value: Any, _base: Path) -> float | None:
        if not _is_number(value) or not math.isfinite(value):
            raise BadValueError
        if zero_is_off and value == 0:
            return None
        if value < minimum:
            raise BadValueError
        return float(value)

    return check


def _count(value: Any, _base: Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadValueError
    return value


def _switch(value: Any, _base: Path) -> bool:
    if not isinstance(value, bool):
        raise BadValueError
    return value


def check_path(value: Any, base: Path) -> Path:
    """A path, relative to ``base`` unless absolute, with ``~`` expanded."""
    if not isinstance(value, str | os.PathLike) or not str(value).strip():
        raise BadValueError
    return Path(os.path.normpath(base / Path(value).expanduser()))


def _existing_file(value: Any, base: Path) -> Path:
    path = check_path(value, base)
    if not path.is_file():
        raise BadValueError
    return path


def _urls(value: Any, _base: Path) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(url, str) for url in items):
        raise BadValueError(quote=False)
    if not all(URL.fullmatch(url.strip()) for url in items):
        raise BadValueError(quote=False)
    return tuple(url.strip() for url in items)


def _kinds(value: Any, _base: Path) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
        raise BadValueError
    kinds = tuple(dict.fromkeys(item.strip() for item in items if item.strip()))
    if not set(kinds) <= ANNOUNCEABLE:
        raise BadValueError
    return kinds


def _credential(value: Any, _base: Path) -> str:
    if not isinstance(value, str) or not _CREDENTIAL.fullmatch(value):
        raise BadValueError
    return value


def _delta(value: Any, _base: Path) -> float | str:
    if isinstance(value, str) and "%" not in value:
        try:
            value = float(value)
        except ValueError as exc:
            raise BadValueError from exc
    if _is_number(value) and math.isfinite(value) and value >= 0:
        return float(value)
    if isinstance(value, str) and (match := _PERCENT.fullmatch(value)):
        return f"{match.group(1)}%"
    raise BadValueError


# ----- environment text to a typed value --------------------------------------------------


def _as_text(text: str) -> str:
    return text


def _as_number(text: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise BadValueError from exc


def _as_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError as exc:
        raise BadValueError from exc


def _as_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise BadValueError


def _as_urls(text: str) -> list[str]:
    return split_urls(text)


def _as_delta(text: str) -> float | str:
    return text if "%" in text else _as_number(text)


# fmt: off
SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("log_level", f"one of {', '.join(LEVELS)}", _choice(LEVELS), _as_text,
            process=True, default="info"),
    Setting("log_format", f"one of {', '.join(FORMATS)}", _choice(FORMATS), _as_text,
            process=True, default="text"),
    Setting("history", "a file path", check_path, _as_text),
    Setting("metric", "a metric name such as eval_loss or accuracy", _metric, _as_text,
            default="eval_loss"),
    Setting("mode", "min or max", _choice(("min", "max")), _as_text),
    Setting("poll", "a number of seconds >= 0.1, or 0 for inotify",
            _seconds(0.1, zero_is_off=True), _as_number),
    Setting("reconcile", "a number of seconds >= 1", _seconds(1.0), _as_number, default=300.0),
    Setting("keep", "a whole number >= 1", _count, _as_int),
    Setting("keep_top", "a whole number >= 1", _count, _as_int),
    Setting("keep_every", "a whole number of steps >= 1", _count, _as_int),
    Setting("strip", "true or false", _switch, _as_bool, default=False),
    Setting("notify", "notification URLs like scheme://...", _urls, _as_urls, default=()),
    Setting("notify_config", "an existing apprise config file", _existing_file, _as_text),
    Setting("notify_credential", "a systemd credential name (letters, digits, _ . @ -)",
            _credential, _as_text),
    Setting("min_delta", "a number >= 0, or a percentage such as '1%'", _delta, _as_delta),
    Setting("announce", f"any of {', '.join(sorted(ANNOUNCEABLE))}", _kinds, _as_text,
            default=("new_best",)),
    Setting("coalesce", "a number of seconds >= 0", _seconds(0.0), _as_number, default=10.0),
    Setting("stall_factor", "a number >= 1", _seconds(1.0), _as_number, default=3.0),
)}
# fmt: on
ROOT_KEYS = ("path", *(name for name, s in SETTINGS.items() if not s.process))
TOP_KEYS = (*(name for name in SETTINGS if name != "history"), "root")


def shown(value: Any, bad: BadValueError) -> str:
    """How an error quotes the refused value: not at all for a secret."""
    return f", not {value!r}" if bad.quote else ""

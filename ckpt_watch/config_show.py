"""Print the effective settings as TOML, each value with where it came from, secrets masked."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckpt_watch.config import DEFAULT, Config, RootConfig
from ckpt_watch.config_keys import SETTINGS
from ckpt_watch.service import default_history

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def mask_url(url: str) -> str:
    """A notification URL with everything after the scheme hidden: ``tgram://***``."""
    match = _SCHEME.match(url)
    return f"{match.group(1)}://***" if match else "***"


def render(config: Config) -> str:
    """The settings as a TOML document that reads like the file that would produce them."""
    lines = [
        "# effective settings: flags > CKPT_WATCH_* environment > file > defaults",
        f"# file: {config.file or 'none'}",
        "",
    ]
    for name in ("log_level", "log_format"):
        lines.append(_line(name, getattr(config, name), config.origins.get(name, DEFAULT)))
    for root, origins in zip(config.roots, config.root_origins, strict=True):
        lines += ["", "[[root]]", *_root_lines(root, origins)]
    return "\n".join(lines) + "\n"


def _root_lines(root: RootConfig, origins: Mapping[str, str]) -> list[str]:
    lines = [_line("path", root.path, origins.get("path", DEFAULT))]
    history = root.history or default_history(root.path)
    lines.append(_line("history", history, origins.get("history", DEFAULT)))
    lines.append(_line("metric", root.metric.name, origins.get("metric", DEFAULT)))
    mode_origin = origins.get("mode", DEFAULT)
    lines.append(_line("mode", root.metric.mode, "the Trainer's rule" if mode_origin == DEFAULT
                       else mode_origin))  # fmt: skip
    for name in SETTINGS:
        if SETTINGS[name].process or name in ("history", "metric", "mode"):
            continue
        value = getattr(root, name)
        origin = origins.get(name, DEFAULT)
        if name == "notify":
            value = [mask_url(url) for url in value]
            if root.notify_credential:
                origin += f", plus credential {root.notify_credential}"
        lines.append(_line(name, value, origin))
    return lines


def _line(name: str, value: Any, origin: str) -> str:
    if value is None:
        return f"# {name} is not set"
    return f"{name} = {_toml(value)}  # {_where(name, origin)}"


def _where(name: str, origin: str) -> str:
    setting = SETTINGS.get(name)
    if setting is not None and origin == "flag":
        return f"flag {setting.flag}"
    if setting is not None and origin == "env":
        return f"env {setting.env}"
    return origin


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(str(value) if isinstance(value, Path) else value)

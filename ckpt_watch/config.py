"""One settings object from a TOML file, ``CKPT_WATCH_*`` environment and command-line flags.

Precedence, highest first: flags, environment, the file's ``[[root]]`` table, the file's
top level, built-in defaults. Every value is checked where it is read, so an error names
the flag, variable or file (and root table) it came from.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_watch.logsetup import FORMATS, LEVELS
from ckpt_watch.ranking import Metric, MetricError, resolve_metric

ENV_PREFIX = "CKPT_WATCH_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
DEFAULT = "default"

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_CREDENTIAL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*")
_PERCENT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ConfigError(ValueError):
    """Raised with one line naming the bad setting, where it came from, and what is allowed."""


@dataclass(frozen=True, slots=True)
class RootConfig:
    """Everything one watched root needs; None means not set (the feature is off)."""

    path: Path
    metric: Metric
    history: Path | None = None
    poll: float | None = None
    reconcile: float = 300.0
    keep: int | None = None
    keep_top: int | None = None
    keep_every: int | None = None
    strip: bool = False
    notify: tuple[str, ...] = ()
    notify_config: Path | None = None
    notify_credential: str | None = None
    min_delta: float | str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    """The process settings and one RootConfig per root, with where each value came from."""

    roots: tuple[RootConfig, ...]
    log_level: str = "info"
    log_format: str = "text"
    file: Path | None = None
    origins: Mapping[str, str] = field(default_factory=dict, compare=False)
    root_origins: tuple[Mapping[str, str], ...] = field(default=(), compare=False)


class _BadValue(Exception):
    """A value outside what a setting allows; ``quote`` is False for secrets."""

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
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


# ----- checks: a typed value (TOML, flag) in, the setting's value out ---------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _choice(options: Sequence[str]) -> Callable[[Any, Path], str]:
    def check(value: Any, _base: Path) -> str:
        if value not in options:
            raise _BadValue
        return str(value)

    return check


def _metric(value: Any, _base: Path) -> str:
    if not isinstance(value, str):
        raise _BadValue
    try:
        resolve_metric(value)
    except MetricError as exc:
        raise _BadValue from exc
    return value.strip()


def _seconds(minimum: float, *, zero_is_off: bool = False) -> Callable[[Any, Path], float | None]:
    def check(value: Any, _base: Path) -> float | None:
        if not _is_number(value) or not math.isfinite(value):
            raise _BadValue
        if zero_is_off and value == 0:
            return None
        if value < minimum:
            raise _BadValue
        return float(value)

    return check


def _count(value: Any, _base: Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _BadValue
    return value


def _switch(value: Any, _base: Path) -> bool:
    if not isinstance(value, bool):
        raise _BadValue
    return value


def _path(value: Any, base: Path) -> Path:
    if not isinstance(value, str | os.PathLike) or not str(value).strip():
        raise _BadValue
    return Path(os.path.normpath(base / Path(value).expanduser()))


def _existing_file(value: Any, base: Path) -> Path:
    path = _path(value, base)
    if not path.is_file():
        raise _BadValue
    return path


def _urls(value: Any, _base: Path) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(url, str) for url in items):
        raise _BadValue(quote=False)
    if not all(_URL.fullmatch(url.strip()) for url in items):
        raise _BadValue(quote=False)
    return tuple(url.strip() for url in items)


def _credential(value: Any, _base: Path) -> str:
    if not isinstance(value, str) or not _CREDENTIAL.fullmatch(value):
        raise _BadValue
    return value


def _delta(value: Any, _base: Path) -> float | str:
    if _is_number(value) and math.isfinite(value) and value >= 0:
        return float(value)
    if isinstance(value, str) and (match := _PERCENT.fullmatch(value)):
        return f"{match.group(1)}%"
    raise _BadValue


# ----- environment text to a typed value --------------------------------------------------


def _as_text(text: str) -> str:
    return text


def _as_number(text: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise _BadValue from exc


def _as_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError as exc:
        raise _BadValue from exc


def _as_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise _BadValue


def _as_list(text: str) -> list[str]:
    return text.split()


def _as_delta(text: str) -> float | str:
    return text if "%" in text else _as_number(text)


# fmt: off
SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("log_level", f"one of {', '.join(LEVELS)}", _choice(LEVELS), _as_text,
            process=True, default="info"),
    Setting("log_format", f"one of {', '.join(FORMATS)}", _choice(FORMATS), _as_text,
            process=True, default="text"),
    Setting("history", "a file path", _path, _as_text),
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
    Setting("notify", "notification URLs like scheme://...", _urls, _as_list, default=()),
    Setting("notify_config", "an existing apprise config file", _existing_file, _as_text),
    Setting("notify_credential", "a systemd credential name (letters, digits, _ . @ -)",
            _credential, _as_text),
    Setting("min_delta", "a number >= 0, or a percentage such as '1%'", _delta, _as_delta),
)}
# fmt: on
ROOT_KEYS = ("path", *(name for name, s in SETTINGS.items() if not s.process))
TOP_KEYS = (*(name for name in SETTINGS if name != "history"), "root")


def _shown(value: Any, bad: _BadValue) -> str:
    return f", not {value!r}" if bad.quote else ""


# ----- layers -----------------------------------------------------------------------------


@dataclass
class _Layer:
    """Values from one source, checked; ``label`` names the source in errors and in show."""

    label: str
    values: dict[str, Any] = field(default_factory=dict)


def _from_flags(flags: Mapping[str, Any]) -> _Layer:
    layer = _Layer("flag")
    cwd = Path.cwd()
    for name, value in flags.items():
        setting = SETTINGS.get(name)
        if setting is None:
            raise ConfigError(f"--{name.replace('_', '-')} is not a setting")
        if value is None or value == [] or value == ():
            continue
        try:
            layer.values[name] = setting.check(value, cwd)
        except _BadValue as bad:
            raise ConfigError(
                f"{setting.flag} must be {setting.allowed}{_shown(value, bad)}"
            ) from None
    return layer


def _from_environment(environ: Mapping[str, str]) -> _Layer:
    layer = _Layer("env")
    cwd = Path.cwd()
    by_env = {setting.env: setting for setting in SETTINGS.values()}
    for variable, text in sorted(environ.items()):
        if not variable.startswith(ENV_PREFIX) or variable == CONFIG_ENV:
            continue
        setting = by_env.get(variable)
        if setting is None:
            known = ", ".join([CONFIG_ENV, *by_env])
            raise ConfigError(f"{variable} is not a setting; known: {known}")
        if not text.strip():
            continue  # an empty assignment, as EnvironmentFile= allows, means unset
        try:
            layer.values[setting.name] = setting.check(setting.from_text(text), cwd)
        except _BadValue as bad:
            raise ConfigError(f"{variable} must be {setting.allowed}{_shown(text, bad)}") from None
    return layer


def _table_layer(
    table: Mapping[str, Any], allowed: Sequence[str], label: str, where: str, base: Path
) -> _Layer:
    layer = _Layer(label)
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(_misplaced(key, allowed, where))
        if key in ("root", "path"):
            continue
        setting = SETTINGS[key]
        try:
            layer.values[key] = setting.check(value, base)
        except _BadValue as bad:
            raise ConfigError(
                f"{where}: {key} must be {setting.allowed}{_shown(value, bad)}"
            ) from None
    return layer


def _misplaced(key: str, allowed: Sequence[str], where: str) -> str:
    if key == "history" or key == "path":
        return f"{where}: {key} belongs in a [[root]] table (each root has its own)"
    if key in SETTINGS and SETTINGS[key].process:
        return f"{where}: {key} can only be set at the top level of the file"
    return f"{where}: unknown key {key!r}; allowed: {', '.join(allowed)}"


@dataclass
class _File:
    path: Path
    top: _Layer
    roots: list[tuple[Path, _Layer]]


def _read_file(path: Path) -> _File:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None

    base = path.parent
    top = _table_layer(data, TOP_KEYS, "file", str(path), base)
    tables = data.get("root", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path}: root must be [[root]] tables, each with a path")
    roots: list[tuple[Path, _Layer]] = []
    for number, table in enumerate(tables, 1):
        where = f"{path}: [[root]] {number}"
        if "path" not in table:
            raise ConfigError(f"{where}: path is missing (the directory to watch)")
        try:
            root = _path(table["path"], base)
        except _BadValue:
            raise ConfigError(f"{where}: path must be a directory path") from None
        roots.append((root, _table_layer(table, ROOT_KEYS, f"file [[root]] {number}", where, base)))
    return _File(path, top, roots)


# ----- resolving --------------------------------------------------------------------------


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    roots: Sequence[Path] = (),
    credentials: bool = True,
) -> Config:
    """Build the settings; raises ConfigError naming the first bad or unknown setting.

    ``roots`` (the command line's ROOT arguments) replace the file's list of roots; a root
    that also has a ``[[root]]`` table in the file keeps that table's settings. With
    ``credentials``, URLs in the systemd credential named by ``notify_credential`` are
    read and added to ``notify``.
    """
    env = os.environ if environ is None else environ
    if path is None and env.get(CONFIG_ENV, "").strip():
        path = Path(env[CONFIG_ENV].strip())
    file = _read_file(Path(os.path.abspath(path))) if path is not None else None
    layers = [_from_flags(flags or {}), _from_environment(env)]
    top = file.top if file else _Layer("file")

    chosen = _choose_roots(file, roots)
    if not chosen:
        raise ConfigError("no root to watch: give ROOT, or [[root]] tables in a config file")
    if len(chosen) > 1:
        for layer, name in ((layers[0], "--history"), (layers[1], ENV_PREFIX + "HISTORY")):
            if "history" in layer.values:
                raise ConfigError(
                    f"{name} names one file but there are {len(chosen)} roots; "
                    "set history in each [[root]] table"
                )

    process_layers = [*layers, top]
    picked = {name: _pick(name, process_layers) for name, s in SETTINGS.items() if s.process}
    origins = {name: _label(process_layers, index) for name, (_, index) in picked.items()}
    built = [
        _root(root, [*layers, table, top], env, credentials=credentials) for root, table in chosen
    ]
    _check_roots([root for root, _ in built], file.path if file else None)
    return Config(
        roots=tuple(root for root, _ in built),
        log_level=picked["log_level"][0],
        log_format=picked["log_format"][0],
        file=file.path if file else None,
        origins=origins,
        root_origins=tuple(origin for _, origin in built),
    )


def _choose_roots(file: _File | None, given: Sequence[Path]) -> list[tuple[Path, _Layer]]:
    tables = file.roots if file else []
    if not given:
        return list(tables)
    by_path = {_same(path): layer for path, layer in tables}
    cwd = Path.cwd()
    chosen = []
    for root in given:
        path = _path(root, cwd)
        chosen.append((path, by_path.get(_same(path), _Layer("argument"))))
    return chosen


def _pick(name: str, layers: Sequence[_Layer]) -> tuple[Any, int]:
    """The value of ``name`` from the first layer that sets it, and that layer's index."""
    for index, layer in enumerate(layers):
        if name in layer.values:
            return layer.values[name], index
    return SETTINGS[name].default, len(layers)


def _label(layers: Sequence[_Layer], index: int) -> str:
    return layers[index].label if index < len(layers) else DEFAULT


def _root(
    path: Path, layers: Sequence[_Layer], env: Mapping[str, str], *, credentials: bool
) -> tuple[RootConfig, dict[str, str]]:
    picked = {name: _pick(name, layers) for name, s in SETTINGS.items() if not s.process}
    values = {name: value for name, (value, _) in picked.items()}
    origins = {name: _label(layers, index) for name, (_, index) in picked.items()}
    origins["path"] = layers[2].label
    # A mode goes with the metric it was given beside: a metric set at a higher level
    # than the mode falls back to the Trainer's rule instead of inheriting a stale mode.
    if picked["mode"][1] > picked["metric"][1]:
        values["mode"], origins["mode"] = None, DEFAULT
    values["metric"] = resolve_metric(values.pop("metric"), values.pop("mode"))
    if credentials and values["notify_credential"]:
        values["notify"] = (*values["notify"], *_read_credential(values["notify_credential"], env))
    return RootConfig(path=path, **values), origins


def _read_credential(name: str, env: Mapping[str, str]) -> tuple[str, ...]:
    """URLs in ``$CREDENTIALS_DIRECTORY/NAME``, one or more a line; ``#`` starts a comment."""
    directory = env.get(CREDENTIALS_ENV)
    where = f"notify_credential {name!r}"
    if not directory:
        raise ConfigError(
            f"{where}: ${CREDENTIALS_ENV} is not set (the unit needs LoadCredential={name}:FILE)"
        )
    file = Path(directory) / name
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{where}: cannot read {file}: {reason}") from None
    urls: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split() if not line.lstrip().startswith("#") else []
        if not all(_URL.fullmatch(word) for word in words):
            raise ConfigError(f"{where}: line {number} is not a URL like scheme://...")
        urls.extend(words)
    return tuple(urls)


def _same(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _check_roots(roots: Sequence[RootConfig], file: Path | None) -> None:
    where = f"{file}: " if file else ""
    real = [_same(root.path) for root in roots]
    for index, path in enumerate(real):
        for other_index, other in enumerate(real[:index]):
            if path == other:
                raise ConfigError(f"{where}root {roots[index].path} is listed twice")
            if other in path.parents or path in other.parents:
                inner, outer = sorted((index, other_index), key=lambda i: -len(real[i].parts))
                raise ConfigError(
                    f"{where}root {roots[inner].path} is inside root {roots[outer].path}; "
                    "watch one or the other"
                )
    histories: dict[Path, Path] = {}
    for root in roots:
        if root.history is None:
            continue
        owner = histories.setdefault(_same(root.history), root.path)
        if owner != root.path:
            raise ConfigError(
                f"{where}roots {owner} and {root.path} share the history {root.history}"
            )

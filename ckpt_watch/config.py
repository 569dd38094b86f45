"""One settings object from a TOML file, ``CKPT_WATCH_*`` environment and command-line flags.

Precedence, highest first: flags, environment, the file's ``[[root]]`` table, the file's
top level, built-in defaults. Every value is checked where it is read, so an error names
the flag, variable or file (and root table) it came from.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_watch.config_keys import (
    ENV_PREFIX,
    ROOT_KEYS,
    SETTINGS,
    TOP_KEYS,
    URL,
    BadValueError,
    check_path,
    shown,
)
from ckpt_watch.ranking import Metric, resolve_metric

CONFIG_ENV = ENV_PREFIX + "CONFIG"
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
DEFAULT = "default"


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
    notify: tuple[str, ...] = field(default=(), repr=False)  # secrets
    notify_config: Path | None = None
    notify_credential: str | None = None
    min_delta: float | str | None = None
    announce: tuple[str, ...] = ("new_best",)
    coalesce: float = 10.0
    stall_factor: float = 3.0


@dataclass(frozen=True, slots=True)
class Config:
    """The process settings and one RootConfig per root, with where each value came from."""

    roots: tuple[RootConfig, ...]
    log_level: str = "info"
    log_format: str = "text"
    file: Path | None = None
    origins: Mapping[str, str] = field(default_factory=dict, compare=False)
    root_origins: tuple[Mapping[str, str], ...] = field(default=(), compare=False)


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
        except BadValueError as bad:
            raise ConfigError(
                f"{setting.flag} must be {setting.allowed}{shown(value, bad)}"
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
        except BadValueError as bad:
            raise ConfigError(f"{variable} must be {setting.allowed}{shown(text, bad)}") from None
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
        except BadValueError as bad:
            raise ConfigError(
                f"{where}: {key} must be {setting.allowed}{shown(value, bad)}"
            ) from None
    return layer


def _misplaced(key: str, allowed: Sequence[str], where: str) -> str:
    if key in ("history", "path"):
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
            root = check_path(table["path"], base)
        except BadValueError:
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
        path = check_path(root, cwd)
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
    """URLs in ``$CREDENTIALS_DIRECTORY/NAME``, one or more a line; lines starting with ``#``
    are comments (a ``#`` inside a URL, as in ``slack://.../#channel``, is part of it).
    """
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
        words = [] if line.lstrip().startswith("#") else line.split()
        if not all(URL.fullmatch(word) for word in words):
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

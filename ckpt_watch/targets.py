"""Notification targets from flags, environment and an apprise config file, checked early."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from apprise.config.base import ConfigBase

from ckpt_watch.redact import ASSET, guarding, instantiate, mask, protect, scrub_urls

log = logging.getLogger(__name__)

ENV = "CKPT_WATCH_NOTIFY"
LARGEST_CONFIG = 1 << 20
_NEXT_URL = re.compile(r",+(?=[A-Za-z][A-Za-z0-9+.-]*://)")


class NotifyConfigError(ValueError):
    """Raised when a notification target or config file cannot be used; the text holds no secret."""


def split_urls(text: str) -> list[str]:
    """URLs separated by spaces or commas; a comma inside a URL (``to=a@x,b@x``) stays."""
    found: list[str] = []
    for chunk in text.split():
        found += [piece.strip(",") for piece in _NEXT_URL.split(chunk) if piece.strip(",")]
    return found


def load_targets(
    urls: Sequence[str],
    config_file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """Every target URL, checked: ``urls`` (else ``$CKPT_WATCH_NOTIFY``), then the config file's.

    Raises :class:`NotifyConfigError` naming the first bad URL in masked form.
    """
    given = list(urls) or split_urls((os.environ if environ is None else environ).get(ENV, ""))
    for url in given:
        check_url(url)
    if config_file is not None:
        given += read_config(config_file)
    protect(given)
    return _distinct(given)


def check_url(url: str) -> None:
    """Raise :class:`NotifyConfigError` unless apprise can send to ``url``."""
    with guarding(url), apprise_notes() as notes:
        plugin = instantiate(url)
    if plugin is None:
        reason = scrub_urls(notes[0]) if notes else "apprise does not know this kind of URL"
        raise NotifyConfigError(f"notification URL {mask(url)} is not usable: {reason}")


def read_config(path: Path) -> list[str]:
    """The target URLs of an apprise YAML or text config file."""
    content = _read(path)
    with guarding(content), apprise_notes() as notes:
        try:
            services, includes = ConfigBase.config_parse(content, asset=ASSET)
        except Exception:  # apprise's parsers raise assorted errors on odd input
            # Not chained: the cause may quote the file, secrets and all.
            raise NotifyConfigError(f"notify config {path}: cannot parse it") from None
    if notes:
        raise NotifyConfigError(f"notify config {path}: {scrub_urls(notes[0])}")
    if includes:
        raise NotifyConfigError(f"notify config {path}: include is not supported; list the URLs")
    urls = [str(service.url(privacy=False)) for service in cast(list[Any], services)]
    if not urls:
        raise NotifyConfigError(f"notify config {path}: it holds no notification URL")
    return urls


@contextmanager
def apprise_notes() -> Iterator[list[str]]:
    """Collect apprise's warnings and errors (already scrubbed) while the block runs."""
    notes: list[str] = []
    handler = _Notes(notes)
    logger = logging.getLogger("apprise")
    logger.addHandler(handler)
    try:
        yield notes
    finally:
        logger.removeHandler(handler)


class _Notes(logging.Handler):
    def __init__(self, notes: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.notes = notes

    def emit(self, record: logging.LogRecord) -> None:
        self.notes.append(record.getMessage())


def _read(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read(LARGEST_CONFIG + 1)
    except OSError as exc:
        raise NotifyConfigError(f"notify config {path}: {exc.strerror or exc}") from exc
    if len(data) > LARGEST_CONFIG:
        raise NotifyConfigError(f"notify config {path}: larger than {LARGEST_CONFIG} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotifyConfigError(f"notify config {path}: not UTF-8 text") from exc


def _distinct(urls: list[str]) -> list[str]:
    """One entry per target; two targets that mask alike cannot be told apart in the history."""
    kept: dict[str, tuple[str, str]] = {}
    for url in urls:
        plugin = instantiate(url)
        same = str(plugin.url(privacy=False)) if plugin is not None else url
        shown = mask(url)
        if shown not in kept:
            kept[shown] = (url, same)
        elif kept[shown][1] != same:
            raise NotifyConfigError(
                f"two notification targets show as {shown} once masked; make a visible part "
                "(host, path or recipient) differ"
            )
    return [url for url, _ in kept.values()]

"""Keep notification secrets out of everything written: masked URLs and scrubbed log records.

Notification URLs are credentials. Anything shown or recorded names a target by
:func:`mask`. Every log record made in the process, by any logger at any level
(apprise logs whole URLs at its trace level), is scrubbed of the secrets of the
URLs passed to :func:`protect` when it is created, so no handler ever sees them.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, unquote, unquote_plus

import apprise

log = logging.getLogger(__name__)

HIDDEN = "***"
# Shorter words are hidden in masked URLs but not scrubbed from log text: replacing
# every match of two or three characters would garble every line.
SHORTEST_SECRET = 4
SHORTEST_PASSWORD = 3
# Plain webhooks: apprise shows their path and headers in its masked form, yet both
# often carry the token.
WEBHOOKS = frozenset({"json", "jsons", "form", "forms", "xml", "xmls"})
ASSET = apprise.AppriseAsset(storage_mode="memory")

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_DELIMITERS = re.compile(r"[/?&=:@,;#+\s]+")

_lock = threading.Lock()
_secrets: Counter[str] = Counter()
_pattern: re.Pattern[str] | None = None
_protected: set[str] = set()
_installed = False


@functools.lru_cache(maxsize=256)
def mask(url: str) -> str:
    """The target as it may be shown: apprise's masked form, without options or path tokens."""
    with guarding(url):
        plugin = instantiate(url)
    if plugin is None:
        return masked_unknown(url)
    shown = str(plugin.url(privacy=True)).split("?", 1)[0].rstrip("/")
    if _scheme(url) not in WEBHOOKS:
        return shown
    scheme, _, rest = shown.partition("://")
    place, _, path = rest.partition("/")
    segments = [_outer(unquote(part)) for part in path.split("/") if part]
    return "/".join([f"{scheme}://{place}", *segments])


def masked_unknown(url: str) -> str:
    """A masked form for text apprise cannot read: the scheme and the outer characters."""
    match = _SCHEME.match(url)
    if match is None:
        return _outer(url)
    return f"{match[1]}://{_outer(url[match.end() :])}"


def scrub_urls(text: str) -> str:
    """``text`` with anything shaped like a URL replaced by :func:`masked_unknown`."""
    return _URL.sub(lambda match: masked_unknown(match[0]), text)


def protect(urls: Iterable[str]) -> None:
    """Scrub the secrets of ``urls`` from every log record made from now on."""
    found: set[str] = set()
    for url in urls:
        if url not in _protected:
            found |= secrets_of(url)
            _protected.add(url)
    _register(found, 1)
    install()


def redact(text: str) -> str:
    """``text`` with every protected secret replaced."""
    pattern = _pattern
    return pattern.sub(HIDDEN, text) if pattern is not None else text


@contextmanager
def guarding(text: str) -> Iterator[None]:
    """Scrub every word of the URLs in ``text`` while apprise reads them for the first time."""
    if text in _protected:
        yield
        return
    words = _words(text).union(*(_words(url) for url in _URL.findall(text)))
    words -= {match[1] for match in _SCHEME.finditer(text)}
    install()
    _register(words, 1)
    try:
        yield
    finally:
        _register(words, -1)


def secrets_of(url: str) -> set[str]:
    """The parts of ``url`` that its masked form hides, in the spellings logs may use."""
    with guarding(url):
        plugin = instantiate(url)
    if plugin is None:
        return _words(url)
    full = _words(str(plugin.url(privacy=False)))
    shown = str(plugin.url(privacy=True))
    public = _words(shown) if _scheme(url) not in WEBHOOKS else _webhook_public(shown)
    hidden = {word for word in full if word not in public}
    password = getattr(plugin, "password", None)
    if isinstance(password, str) and password:
        hidden |= _spellings(password, shortest=SHORTEST_PASSWORD)
    return hidden


def instantiate(url: str) -> Any:
    """apprise's service object for ``url``, or None when apprise cannot use it."""
    try:
        return apprise.Apprise.instantiate(url, asset=ASSET)
    except Exception:  # apprise raises assorted errors for odd input
        return None


def install() -> None:
    """Make every log record pass through the scrubber (once per process)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        logging.setLogRecordFactory(_scrubbing(logging.getLogRecordFactory()))


def _scrubbing(make: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        pattern = _pattern
        if pattern is not None:
            _scrub(record, pattern)
        return record

    return factory


def _scrub(record: logging.LogRecord, pattern: re.Pattern[str]) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a malformed record is logging's own error to report
        return
    clean = pattern.sub(HIDDEN, message)
    if clean != message:
        record.msg, record.args = clean, ()
    if record.exc_info and record.exc_info[1] is not None:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if pattern.search(text):
            record.exc_text = pattern.sub(HIDDEN, text)
    if record.stack_info:
        record.stack_info = pattern.sub(HIDDEN, record.stack_info)


def _register(words: set[str], change: int) -> None:
    global _pattern
    if not words:
        return
    with _lock:
        for word in words:
            _secrets[word] += change
            if _secrets[word] <= 0:
                del _secrets[word]
        ordered = sorted(_secrets, key=len, reverse=True)
        _pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None


def _webhook_public(shown: str) -> set[str]:
    """What a plain webhook shows safely: scheme options, never path, headers or parameters."""
    place = shown.split("://", 1)[-1].split("?", 1)[0].split("/", 1)[0]
    public = _words(place)
    query = shown.partition("?")[2]
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        public |= _words(key)
        if not unquote(key).startswith(("+", "-", ":")):
            public |= _words(value)
    return public


def _words(url: str) -> set[str]:
    rest = url.split("://", 1)[-1]
    found: set[str] = set()
    for piece in {*_DELIMITERS.split(rest), *_DELIMITERS.split(unquote(rest))}:
        found |= _spellings(piece)
    return found


def _spellings(text: str, shortest: int = SHORTEST_SECRET) -> set[str]:
    plain = {text, unquote(text), unquote_plus(text)}
    forms = plain | {quote(item, safe="") for item in plain} | {quote(item) for item in plain}
    return {form for form in forms if len(form) >= shortest}


def _scheme(url: str) -> str:
    match = _SCHEME.match(url.strip())
    return match[1].lower() if match else ""


def _outer(text: str) -> str:
    return f"{text[0]}...{text[-1]}" if len(text) >= 6 else HIDDEN

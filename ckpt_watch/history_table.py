"""Show the history as a table people read, or as JSON."""

from __future__ import annotations

import posixpath
from collections.abc import Iterable

from ckpt_watch.history import Event, number
from ckpt_watch.report import format_value

HEADERS = ("TIME", "EVENT", "RUN", "CHECKPOINT", "VALUE", "DETAIL")


def select(events: Iterable[Event], run: str | None) -> list[Event]:
    """The events of one run (and the daemon's own start and stop lines), or all of them."""
    if run is None:
        return list(events)
    wanted = posixpath.normpath(run.strip("/") or ".")
    return [e for e in events if e.get("run") in (wanted, None)]


def table(events: Iterable[Event]) -> list[str]:
    rows = [HEADERS, *(_row(event) for event in events)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _row(event: Event) -> tuple[str, ...]:
    kind = str(event.get("event", "?"))
    value = number(event.get("value"))
    return (
        str(event.get("ts", "")),
        kind,
        str(event.get("run", "")),
        str(event.get("checkpoint", "")),
        format_value(value) if "value" in event else "",
        _detail(kind, event),
    )


def _detail(kind: str, event: Event) -> str:
    if kind == "new_best":
        previous = event.get("previous")
        if previous is None:
            return "first best"
        return f"was {previous} ({format_value(number(event.get('previous_value')))})"
    if kind == "checkpoint":
        details = []
        if event.get("baseline"):
            details.append("baseline")
        if event.get("value_from"):
            details.append(f"value logged in {event['value_from']}")
        return ", ".join(details)
    if kind == "started":
        return f"pid {event.get('pid')}, {event.get('metric')}, {event.get('watch')}"
    if kind == "stopped":
        return f"pid {event.get('pid')}"
    known = ("run", "checkpoint", "value", "v", "ts", "event", "metric", "step")
    extras = {k: v for k, v in event.items() if k not in known}
    return ", ".join(f"{k}={v}" for k, v in extras.items())

"""What is worth announcing, as a value the history can hold, and the message people read."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from ckpt_watch.history import integer, number, text
from ckpt_watch.report import format_value

Kind = Literal["new_best", "finished", "stalled", "nonfinite", "test"]
KINDS: frozenset[str] = frozenset(get_args(Kind))
TITLE_LIMIT = 80


class MinDeltaError(ValueError):
    """Raised when a ``--min-delta`` value is neither a number nor a percentage."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Announcement:
    """One thing to tell people about; every field survives a round trip through the history."""

    id: str
    kind: Kind
    run: str
    metric: str
    value: float | None
    previous: str | None = None
    previous_value: float | None = None
    checkpoint: str | None = None
    step: int | None = None
    epoch: float | None = None
    path: str | None = None
    host: str = ""
    resume: str | None = None
    note: str = ""

    def fields(self) -> dict[str, Any]:
        """The fields to merge into the history event that records this announcement."""
        fields = asdict(self)
        return {"announce": fields.pop("id"), **fields}

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> Announcement | None:
        """Rebuild the announcement a replayed history event recorded, or None if it holds none."""
        ident, kind = event.get("announce"), event.get("kind")
        run, metric = event.get("run"), event.get("metric")
        if not (isinstance(ident, str) and isinstance(run, str) and isinstance(metric, str)):
            return None
        if kind not in KINDS:
            return None
        return cls(
            id=ident,
            kind=kind,
            run=run,
            metric=metric,
            value=number(event.get("value")),
            previous=text(event.get("previous")),
            previous_value=number(event.get("previous_value")),
            checkpoint=text(event.get("checkpoint")),
            step=integer(event.get("step")),
            epoch=number(event.get("epoch")),
            path=text(event.get("path")),
            host=text(event.get("host")) or "",
            resume=text(event.get("resume")),
            note=text(event.get("note")) or "",
        )


def make_id(kind: Kind, run: str, checkpoint: str | None, incarnation: str | int) -> str:
    """The stable id of an announcement: the same event always gets the same id."""
    return f"{kind}:{run}:{checkpoint or '-'}:{incarnation}"


def resume_hint(path: str) -> str:
    """The line that resumes training from a checkpoint directory."""
    return f'trainer.train(resume_from_checkpoint="{path}")'


def parse_min_delta(text: str) -> tuple[float, bool]:
    """``"0.01"`` -> (0.01, False), ``"1%"`` -> (0.01, True); an empty text means zero."""
    cleaned = text.strip()
    relative = cleaned.endswith("%")
    digits = cleaned[:-1].strip() if relative else cleaned
    if not digits:
        return 0.0, relative
    try:
        amount = float(digits)
    except ValueError:
        amount = math.nan
    if not math.isfinite(amount) or amount < 0:
        raise MinDeltaError(
            f"--min-delta {text!r} is not a non-negative number or percentage (0.01 or 1%)"
        )
    return (amount / 100.0 if relative else amount), relative


def worth_announcing(
    value: float, previous_value: float | None, mode: Literal["min", "max"], min_delta: str
) -> bool:
    """Whether a new best improves on the previous one by at least ``min_delta``.

    ``min_delta`` is absolute (``"0.01"``) or relative to the previous best (``"1%"``).
    A non-finite value is never worth it; a first best, or one after a non-finite
    previous value, always is.
    """
    threshold, relative = parse_min_delta(min_delta)
    if not math.isfinite(value):
        return False
    if previous_value is None or not math.isfinite(previous_value):
        return True
    gain = previous_value - value if mode == "min" else value - previous_value
    if gain <= 0:
        return False
    if relative:
        threshold *= abs(previous_value)
    return gain >= threshold or math.isclose(gain, threshold, rel_tol=1e-9)


def title(a: Announcement) -> str:
    """A short title that fits a phone's notification line."""
    value = format_value(a.value)
    if a.kind == "new_best":
        text = f"{a.run}: new best {a.metric} {value}"
    elif a.kind == "finished":
        text = f"{a.run}: finished, best {a.metric} {value}"
    elif a.kind == "stalled":
        text = f"{a.run}: stalled"
    elif a.kind == "nonfinite":
        text = f"{a.run}: {a.metric} is {value}"
    else:
        text = f"ckpt-watch test from {a.host or 'this host'}"
    if len(text) > TITLE_LIMIT:
        text = text[: TITLE_LIMIT - 3] + "..."
    return text


def body(a: Announcement) -> str:
    """The message: Markdown that still reads well where it is shown as plain text."""
    lines = [_headline(a), ""]
    if a.note:
        lines += [a.note, ""]
    if a.kind != "test":
        lines.append(f"- run: {_code(a.run)}")
        lines.append(f"- {a.metric}: {format_value(a.value)}")
    if a.kind in ("new_best", "finished") and a.previous_value is not None:
        lines.append(f"- previous best: {_previous(a)}")
        lines.append(f"- change: {format_change(a.value, a.previous_value)}")
    where = _where(a)
    if where:
        lines.append(f"- checkpoint: {where}")
    if a.host:
        lines.append(f"- host: {a.host}")
    if a.path:
        lines.append(f"- path: {_code(a.path)}")
    resume = a.resume or (resume_hint(a.path) if a.path and a.kind != "test" else None)
    if resume and a.kind in ("new_best", "finished"):
        lines += ["", "Resume from it:", "", f"    {resume}"]
    return "\n".join(lines).rstrip() + "\n"


def format_change(value: float | None, previous: float | None) -> str:
    """``-0.0123 (-4.8%)``: the signed change, and relative to the previous value when it can."""
    if value is None or previous is None or not math.isfinite(value - previous):
        return "-"
    change = value - previous
    text = f"{change:+.6g}"
    if previous != 0:
        text += f" ({change / abs(previous) * 100:+.3g}%)"
    return text


def _headline(a: Announcement) -> str:
    if a.kind == "new_best":
        return f"New best {a.metric} for {a.run}: {format_value(a.value)}"
    if a.kind == "finished":
        return f"{a.run} finished. Best {a.metric}: {format_value(a.value)}"
    if a.kind == "stalled":
        return f"{a.run} has written no new checkpoint for longer than usual."
    if a.kind == "nonfinite":
        return f"{a.run} logged {a.metric} = {format_value(a.value)}."
    return "This is a test message from ckpt-watch. Notifications reach this target."


def _previous(a: Announcement) -> str:
    text = format_value(a.previous_value)
    return f"{text} ({a.previous})" if a.previous else text


def _where(a: Announcement) -> str:
    parts = [a.checkpoint] if a.checkpoint else []
    if a.step is not None:
        parts.append(f"step {a.step}")
    if a.epoch is not None and math.isfinite(a.epoch):
        parts.append(f"epoch {a.epoch:.4g}")
    return ", ".join(parts)


def _code(text: str) -> str:
    """Inline code, unless the text holds a backtick that would end it early."""
    return text if "`" in text else f"`{text}`"

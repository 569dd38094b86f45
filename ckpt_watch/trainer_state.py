"""Read one ``checkpoint-N/trainer_state.json`` into a small checkpoint record."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"checkpoint-([0-9]+)")

# Real states reach a few MB (one log row per step for 100k steps is ~20 MB); anything far
# beyond that is not a state file, and reading it whole would cost the daemon its memory.
MAX_STATE_BYTES = 64 * 1024 * 1024

# The Trainer writes json.dumps(state, indent=2, sort_keys=True). In that layout the top-level
# keys sit at two spaces, log rows open and close at four, and JSON strings never hold a raw
# newline, so these markers cannot occur anywhere else.
_LOG_NAME = b'"log_history"'
_LOG_OPEN = b"\n  " + _LOG_NAME + b": ["
_LOG_CLOSE = b"\n  ]"
_ROW_OPEN = b"\n    {"
_ROW_CLOSE = b"\n    }"
_EVAL_KEY = b'"eval_'

Metrics = Mapping[str, float]


class StateError(Exception):
    """Raised when a state file exists but cannot be used; the message says why."""


class StateVanishedError(StateError):
    """Raised when the checkpoint or its state file disappeared while being read."""


@dataclass(frozen=True, slots=True)
class TrainerState:
    """What ckpt-watch needs from one ``trainer_state.json``.

    ``evals`` maps a step to the evaluation metrics logged at it (``eval_*`` keys only,
    several rows at one step merged, later rows winning).
    """

    global_step: int | None
    epoch: float | None
    max_steps: int | None
    evals: Mapping[int, Metrics]
    best_metric: float | None = None
    best_model_checkpoint: str | None = None
    best_global_step: int | None = None
    first_row: str | None = None  # digest of the first log row: which training wrote this


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One ``checkpoint-<step>`` directory, read or not.

    Exactly one of ``state`` and ``error`` is set. ``size`` and ``mtime_ns`` describe the
    state file as it was read, so a later caller can tell whether it changed.
    """

    path: Path
    step: int
    state: TrainerState | None = None
    error: str | None = None
    size: int = 0
    mtime_ns: int = 0

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def own_metrics(self) -> Metrics:
        """The evaluation metrics logged at this checkpoint's own step, in its own file."""
        return self.state.evals.get(self.step, {}) if self.state else {}


def checkpoint_step(name: str) -> int | None:
    """The step in a directory named exactly ``checkpoint-<int>``, else None."""
    match = CHECKPOINT_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def state_stamp(checkpoint: Path) -> tuple[int, int] | None:
    """Size and modification time of a checkpoint's state file, or None if it is not there.

    A changed stamp means the file must be read again; an equal one that it need not be.
    """
    try:
        info = os.stat(checkpoint / STATE_FILE)
    except OSError:
        return None
    return (info.st_size, info.st_mtime_ns)


def last_component(trainer_path: str) -> str:
    """The directory name in a path the Trainer wrote on any machine (``/`` or ``\\``)."""
    return re.split(r"[\\/]", trainer_path.rstrip("/\\"))[-1]


def read_checkpoint(path: Path, *, max_bytes: int = MAX_STATE_BYTES) -> Checkpoint:
    """Read ``path/trainer_state.json`` into a Checkpoint.

    A file that cannot be used gives a Checkpoint with ``error`` set. Raises
    StateVanishedError when the checkpoint directory itself is gone, since that checkpoint
    simply no longer exists.
    """
    step = checkpoint_step(path.name)
    if step is None:
        raise ValueError(f"not a checkpoint directory name: {path.name}")

    try:
        data, size, mtime_ns = _read_bytes(path / STATE_FILE, max_bytes)
    except StateVanishedError:
        if not path.is_dir():
            raise
        return Checkpoint(path, step, error=f"no {STATE_FILE} (save interrupted or in progress)")
    except StateError as exc:
        return Checkpoint(path, step, error=str(exc))

    try:
        state = parse_state(data)
    except StateError as exc:
        return Checkpoint(path, step, error=str(exc), size=size, mtime_ns=mtime_ns)

    if state.global_step is not None and state.global_step != step:
        reason = f"global_step {state.global_step} does not match the directory name"
        return Checkpoint(path, step, error=reason, size=size, mtime_ns=mtime_ns)

    return Checkpoint(path, step, state=state, size=size, mtime_ns=mtime_ns)


def _read_bytes(file: Path, max_bytes: int) -> tuple[bytes, int, int]:
    try:
        with open(file, "rb", opener=_open_nonblocking) as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):  # a pipe or a device (/dev/zero) never ends
                raise StateError(f"{STATE_FILE} is not a regular file")
            if info.st_size > max_bytes:
                raise StateError(
                    f"{STATE_FILE} is {info.st_size} bytes, over the {max_bytes} byte cap"
                )
            # Ask for the size fstat saw, not the cap: a read allocates all it is asked for.
            data = handle.read(info.st_size + 1)
            if len(data) > info.st_size:  # it grew since fstat; read on up to the cap
                data += handle.read(max_bytes + 1 - len(data))
    except FileNotFoundError as exc:
        raise StateVanishedError(f"no {STATE_FILE}") from exc
    except IsADirectoryError as exc:
        raise StateError(f"{STATE_FILE} is a directory") from exc
    except OSError as exc:
        raise StateError(f"cannot read {STATE_FILE}: {exc.strerror or exc}") from exc

    if len(data) > max_bytes:
        raise StateError(f"{STATE_FILE} grew past the {max_bytes} byte cap while being read")
    return data, len(data), info.st_mtime_ns


def _open_nonblocking(path: str, flags: int) -> int:
    # Opening a named pipe waits for a writer, maybe forever; this returns at once, so that
    # the check for a regular file comes first. Regular files ignore O_NONBLOCK.
    return os.open(path, flags | os.O_NONBLOCK)


def parse_state(data: bytes) -> TrainerState:
    """Parse the bytes of a state file. Raises StateError with a one-line reason."""
    if not data or data.isspace():  # not data.strip(), which copies the whole file
        raise StateError("empty file (save interrupted or in progress)")
    if not data.isascii():  # the Trainer writes ASCII only; anything else must still be UTF-8
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StateError(f"not UTF-8 text (byte {exc.start})") from exc

    fast = _parse_trainer_layout(data)
    if fast is not None:
        return fast

    try:
        document = json.loads(data)
    except json.JSONDecodeError as exc:
        raise StateError(
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except ValueError as exc:  # an integer longer than int() accepts
        raise StateError(f"unreadable number: {str(exc).split(':')[0]}") from exc
    except RecursionError as exc:
        raise StateError("JSON nested too deeply") from exc
    if not isinstance(document, dict):
        raise StateError(f"top level is a JSON {_json_type(document)}, not an object")

    rows = document.get("log_history")
    if not isinstance(rows, list):
        raise StateError(f"log_history is {_json_type(rows)}, not a list")
    return _build_state(document, rows)


def _parse_trainer_layout(data: bytes) -> TrainerState | None:
    """Parse a file in the Trainer's own layout without decoding its training log rows.

    Long runs log thousands of training rows and a few dozen evaluation rows; only the
    latter matter, and finding them is a byte search. Returns None whenever the layout is
    not exactly the Trainer's, so that the caller falls back to a full parse.

    Known limit: bytes inside a training-only row are never decoded, so damage confined to
    such a row is not reported; reporting it would cost the full parse this path avoids.
    """
    opening = data.find(_LOG_OPEN)
    if opening < 0:
        return None
    body = opening + len(_LOG_OPEN)
    # A repeated key (json.loads keeps the last) or a NUL block left by a crash (never valid
    # JSON) could sit in rows that are never decoded here: let the full parse judge those.
    if data.find(_LOG_NAME, body) >= 0 or data.find(b"\0", body) >= 0:
        return None
    if data.startswith(b"],", body) or data.startswith(b"]\n", body):
        return _outer_with_rows(data[:opening], data[body + 1 :], [])

    # The array closes near the end of the file. Any "]" before that belongs to a value
    # inside the rows, and then only a full search proves that the close found is the first.
    closing = data.rfind(_LOG_CLOSE)
    if closing < body or not data.endswith(_ROW_CLOSE, body, closing):
        return None
    if data.find(b"]", body, closing) >= 0 and data.find(_LOG_CLOSE, body, closing) >= 0:
        return None

    # Wanted: the first row (it identifies the training) and every evaluation row.
    first_end = data.find(_ROW_CLOSE, body, closing + 1) + len(_ROW_CLOSE)
    wanted: list[bytes] = [data[body:first_end]]
    cursor = first_end
    while (hit := _find_eval_key(data, cursor, closing)) >= 0:
        start = data.rfind(_ROW_OPEN, body, hit)
        end = data.find(_ROW_CLOSE, hit, closing + 1) + len(_ROW_CLOSE)
        if start < 0 or end < len(_ROW_CLOSE):
            return None
        wanted.append(data[start:end])
        cursor = end
    try:
        rows = json.loads(b"[" + b",".join(wanted) + b"]")
    except (ValueError, RecursionError):
        return None

    return _outer_with_rows(data[:opening], data[closing + len(_LOG_CLOSE) :], rows)


def _find_eval_key(data: bytes, start: int, end: int) -> int:
    """``data.find(_EVAL_KEY, start, end)``, faster on the Trainer's logs.

    Training rows hold no "v", so a one-byte search (memchr) skips straight to the next
    evaluation row; every hit has its "v" two bytes in. A "v" elsewhere costs one plain search.
    """
    letter = data.find(b"v", start + 2, end)
    if letter < 0:
        return -1
    if data.startswith(_EVAL_KEY, letter - 2, end):
        return letter - 2
    return data.find(_EVAL_KEY, letter - 1, end)


def _outer_with_rows(head: bytes, tail: bytes, rows: list[Any]) -> TrainerState | None:
    try:
        document = json.loads(head + b'\n  "log_history": []' + tail)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    return _build_state(document, rows)


def _build_state(document: dict[str, Any], rows: list[Any]) -> TrainerState:
    """Build the record from the top level and the rows that matter (the first row first)."""
    evals: dict[int, dict[str, float]] = {}
    for row in rows:
        if not isinstance(row, dict):
            continue
        step = _as_int(row.get("step"))
        metrics = {k: _float(v) for k, v in row.items() if k.startswith("eval_") and _is_number(v)}
        if step is not None and metrics:
            evals.setdefault(step, {}).update(metrics)

    best_checkpoint = document.get("best_model_checkpoint")
    return TrainerState(
        global_step=_as_int(document.get("global_step")),
        epoch=_as_float(document.get("epoch")),
        max_steps=_as_int(document.get("max_steps")),
        evals=evals,
        best_metric=_as_float(document.get("best_metric")),
        best_model_checkpoint=best_checkpoint if isinstance(best_checkpoint, str) else None,
        best_global_step=_as_int(document.get("best_global_step")),
        first_row=_digest(rows[0]) if rows else None,
    )


def _digest(row: object) -> str:
    canonical = json.dumps(row, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_float(value: object) -> float | None:
    return _float(value) if _is_number(value) else None  # type: ignore[arg-type]


def _float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer beyond any float is, for ranking, infinite
        return math.inf if value > 0 else -math.inf


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")

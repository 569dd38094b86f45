"""Render results (``check`` reports, ``prune`` plans): text people read, JSON scripts read."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

from ckpt_watch.check import RunReport
from ckpt_watch.prune import Outcome
from ckpt_watch.ranking import Ranked
from ckpt_watch.retention import Decision

RULE = "=" * 70
Style = Callable[[str, str], str]


def plain(text: str, _role: str) -> str:
    return text


def json_number(value: float | None) -> float | str | None:
    """A float as strict JSON allows it: non-finite values become their Python tokens."""
    if value is None or math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def format_value(value: float | None) -> str:
    """A metric value with six significant digits; NaN and infinities by name."""
    if value is None:
        return "-"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return format(value, ".6g")


def run_as_json(report: RunReport) -> dict[str, Any]:
    """One run in the documented ``check --json`` shape."""
    ranking = report.ranking
    return {
        "run": report.run,
        "path": str(report.path.absolute()),
        "metric": ranking.metric.name,
        "mode": ranking.metric.mode,
        "best": ranking.best.name if ranking.best else None,
        "trainer_best": ranking.trainer_best.name if ranking.trainer_best else None,
        "checkpoints": [_checkpoint_as_json(entry) for entry in ranking.entries],
    }


def _checkpoint_as_json(entry: Ranked) -> dict[str, Any]:
    checkpoint = entry.checkpoint
    state = checkpoint.state
    return {
        "name": checkpoint.name,
        "path": str(checkpoint.path.absolute()),
        "step": checkpoint.step,
        "epoch": json_number(state.epoch) if state else None,
        "value": json_number(entry.value),
        "rank": entry.rank,
        "error": checkpoint.error,
    }


def write_json(reports: Iterable[RunReport], out: TextIO) -> None:
    """Write ``{"runs": [...]}``, one run at a time, as strict JSON."""
    out.write('{"runs": [')
    for index, report in enumerate(reports):
        out.write(",\n  " if index else "\n  ")
        out.write(json.dumps(run_as_json(report), allow_nan=False))
    out.write("\n]}\n")


def write_text(reports: Iterable[RunReport], out: TextIO, style: Style = plain) -> None:
    """Write the per-run report, and a summary table when there are several runs."""
    summary: list[tuple[str, ...]] = []
    for report in reports:
        out.write("\n".join(run_as_text(report, style)) + "\n")
        summary.append(summary_row(report))  # a few strings, so a large tree is not held
    if len(summary) > 1:
        out.write("\n" + "\n".join(summary_table(summary, style)) + "\n")


def run_as_text(report: RunReport, style: Style = plain) -> list[str]:
    ranking = report.ranking
    metric = ranking.metric
    label = _value_label(metric.name)
    lines = [RULE, f"CHECKPOINT ANALYSIS: {report.run}", f"Metric: {metric.label}", RULE]

    for entry in ranking.entries:
        lines += ["", f"Checkpoint: {style(entry.name, 'name')}"]
        lines += _checkpoint_lines(entry, label, style)

    lines += ["", RULE]
    best = ranking.best
    if best is None:
        lines.append(style(f"No checkpoint has a finite {metric.name} at its own step.", "warn"))
    else:
        lines += [
            style(f"[BEST] CHECKPOINT: {best.name}", "best"),
            f"  {label}: {format_value(best.value)}",
            f"  Path: {best.checkpoint.path}",
        ]
    trainer = ranking.trainer_best
    if trainer is not None:
        gone = "" if trainer.on_disk else " (no longer on disk)"
        lines.append(f"  Trainer's own best: {trainer.name}{gone}")
    note = ranking.disagreement()
    if note:
        lines.append(style(f"  Note: {note}.", "warn"))
    if best is not None:
        resume = best.checkpoint.path.absolute()
        lines += [
            "",
            "To resume training from this checkpoint:",
            f'  trainer.train(resume_from_checkpoint="{resume}")',
        ]
    lines.append("")
    return lines


def _checkpoint_lines(entry: Ranked, label: str, style: Style) -> list[str]:
    checkpoint = entry.checkpoint
    state = checkpoint.state
    if state is None:
        return [
            style(f"  Error: {checkpoint.error}", "error"),
            f"  Path: {checkpoint.path}",
        ]
    epoch = f"{state.epoch:.2f}" if state.epoch is not None else "-"
    if entry.value is None:
        value = f"not evaluated at step {checkpoint.step}"
    elif entry.value_from:
        value = f"{format_value(entry.value)} (logged in {entry.value_from})"
    else:
        value = format_value(entry.value)
    lines = [f"  Epoch: {epoch}", f"  Global Step: {checkpoint.step}", f"  {label}: {value}"]
    if state.best_metric is not None:
        lines.append(f"  Best Metric (Trainer): {format_value(state.best_metric)}")
    lines.append(f"  Path: {checkpoint.path}")
    return lines


def summary_row(report: RunReport) -> tuple[str, ...]:
    ranking = report.ranking
    best = ranking.best
    return (
        report.run,
        str(len(ranking.entries)),
        best.name if best else "-",
        format_value(best.value) if best else "-",
        ranking.trainer_best.name if ranking.trainer_best else "-",
    )


def summary_table(rows: list[tuple[str, ...]], style: Style = plain) -> list[str]:
    headers = ("RUN", "CHECKPOINTS", "BEST", "VALUE", "TRAINER BEST")
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [style(_row(headers, widths), "header")]
    lines += [_row(row, widths) for row in rows]
    return lines


def _row(cells: tuple[str, ...], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()


def _value_label(metric_name: str) -> str:
    return "Validation Loss" if metric_name == "eval_loss" else metric_name


def write_plan_json(decisions: Iterable[Decision], out: TextIO) -> None:
    """Write ``{"checkpoints": [...]}`` with each checkpoint's action and reason."""
    rows = [json.dumps(decision.as_json()) for decision in decisions]
    out.write('{"checkpoints": [' + ",".join(f"\n  {row}" for row in rows) + "\n]}\n")


def write_plan_text(decisions: Sequence[Decision], out: TextIO, style: Style = plain) -> None:
    """Write each run's checkpoints with what happens to them and why, then a count."""
    width = max((len(decision.name) for decision in decisions), default=0)
    roles = {"keep": "best", "delete": "error", "strip": "warn"}
    counts = {"delete": 0, "strip": 0, "keep": 0}
    run = None
    for decision in decisions:
        if decision.run != run:
            out.write(("\n" if run is not None else "") + style(decision.run, "header") + "\n")
            run = decision.run
        counts[decision.action] += 1
        action = style(decision.action.ljust(6), roles[decision.action])
        out.write(f"  {action}  {decision.name.ljust(width)}  {decision.reason}\n")
    let_go = ", ".join(f"{counts[a]} to {a}" for a in ("delete", "strip") if counts[a])
    out.write(f"\n{let_go or 'nothing to delete'}, {counts['keep']} to keep.\n")


def write_outcomes(outcomes: Iterable[Outcome], out: TextIO) -> None:
    """One line per checkpoint deleted, stripped, gone or skipped, then the space freed."""
    freed = 0
    for outcome in outcomes:
        decision = outcome.decision
        where = decision.name if decision.run == "." else f"{decision.run}/{decision.name}"
        if outcome.result == "skipped":
            out.write(f"kept {where}: {outcome.detail}\n")
        elif outcome.result == "gone":
            out.write(f"already gone: {where}\n")
        else:
            verb = "deleted" if outcome.result == "pruned" else "stripped"
            out.write(f"{verb} {where} ({format_bytes(outcome.bytes)})\n")
        freed += outcome.bytes
    out.write(f"freed {format_bytes(freed)}\n")


def format_bytes(count: int) -> str:
    """A byte count for people: 512 B, 3.4 MB, 1.2 GB (powers of 1000)."""
    units = ("B", "kB", "MB", "GB", "TB")
    value, unit = float(count), 0
    while value >= 1000 and unit < len(units) - 1:
        value, unit = value / 1000, unit + 1
    return f"{count} B" if unit == 0 else f"{value:.1f} {units[unit]}"

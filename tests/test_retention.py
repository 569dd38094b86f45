"""Retention planning: the rules, the protections, and why each checkpoint stays or goes."""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
import time
from pathlib import Path

import pytest
from factories import trainer_state, write_checkpoint, write_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runs import RunSpec, expected_kept, lay_out_run, protected, rule_sets, run_specs

from ckpt_watch.check import NothingToCheckError, read_run
from ckpt_watch.ranking import rank_run, resolve_metric
from ckpt_watch.retention import (
    Decision,
    RetentionError,
    RetentionRules,
    agree,
    plan_run,
    plan_tree,
)
from ckpt_watch.scan import RunDir, list_run

LOSS = resolve_metric("eval_loss")
PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def plan(root: Path, rules: RetentionRules, **kwargs: float) -> dict[str, Decision]:
    """Plan the tree under ``root`` now and index the decisions by checkpoint name."""
    now = kwargs.pop("now", time.time())
    return {d.name: d for d in plan_tree(root, LOSS, rules, now=now, **kwargs)}


def deleted(decisions: dict[str, Decision]) -> set[str]:
    return {name for name, d in decisions.items() if d.action == "delete"}


def planned_spec(spec: RunSpec, rules: RetentionRules) -> dict[str, Decision]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        lay_out_run(spec, root / "run", Path(tmp) / "outside")
        return plan(root, rules)


@PROPERTY
@given(spec=run_specs(), rules=rule_sets())
def test_no_protected_checkpoint_is_ever_let_go(
    spec: RunSpec, rules: dict[str, int | None]
) -> None:
    """Best, newest complete, the Trainer's best, pinned, unreadable, linked and oddly named
    checkpoints are kept whatever the rules."""
    decisions = planned_spec(spec, RetentionRules(**rules))

    let_go = {name for name, d in decisions.items() if d.action != "keep"}

    assert not let_go & protected(spec)
    assert {d.name for d in decisions.values()} == {s.name for s in spec.checkpoints}


@PROPERTY
@given(spec=run_specs(), rules=rule_sets())
def test_exactly_what_no_rule_or_protection_keeps_is_deleted(
    spec: RunSpec, rules: dict[str, int | None]
) -> None:
    """The kept set is the union of the rules and the protections, nothing more or less."""
    decisions = planned_spec(spec, RetentionRules(**rules))

    everything = {s.name for s in spec.checkpoints}

    assert deleted(decisions) == everything - expected_kept(spec, **rules)


@PROPERTY
@given(spec=run_specs(), rules=rule_sets(), seed=st.integers(0, 2**32))
def test_the_plan_does_not_depend_on_discovery_order(
    spec: RunSpec, rules: dict[str, int | None], seed: int
) -> None:
    """Shuffling the listed checkpoints and the ranked entries gives the same plan."""
    shuffle = random.Random(seed).sample
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        lay_out_run(spec, root / "run", Path(tmp) / "outside")
        run = list_run(root / "run")
        checkpoints = read_run(run)
        ranking = rank_run(checkpoints, LOSS)
        now = time.time()
        first = plan_run(run, ranking, RetentionRules(**rules), root=root, now=now)

        listed = RunDir(run.path, tuple(shuffle(run.checkpoints, len(run.checkpoints))))
        reranked = rank_run(shuffle(checkpoints, len(checkpoints)), LOSS)
        entries = tuple(shuffle(reranked.entries, len(reranked.entries)))
        reordered = dataclasses.replace(reranked, entries=entries)
        second = plan_run(listed, reordered, RetentionRules(**rules), root=root, now=now)

    assert second == first


@pytest.mark.parametrize("keep", [0, -1, -100])
def test_keep_of_zero_or_less_is_refused(keep: int) -> None:
    """--keep 0 never means delete everything: it is refused with a message saying so."""
    with pytest.raises(RetentionError, match=r"--keep must be 1 or more, not -?\d+.*never"):
        RetentionRules(keep=keep)


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"keep_top": 0}, "--keep-top must be 1 or more"),
        ({"keep_every": 0}, "--keep-every must be a step count of 1 or more"),
        ({}, "give at least one of --keep, --keep-top, --keep-every"),
        ({"keep": True}, "--keep must be a whole number"),
        ({"keep": 2.5}, "--keep must be a whole number"),
    ],
)
def test_unusable_rules_are_refused(rules: dict[str, object], message: str) -> None:
    """Zero counts, no rule at all, and non-integers are refused with a clear message."""
    with pytest.raises(RetentionError, match=message):
        RetentionRules(**rules)  # type: ignore[arg-type]


def test_keep_one_keeps_the_best_and_the_newest(tmp_path: Path) -> None:
    """--keep 1 with the best not the newest keeps both, as the Trainer's limit of 1 does."""
    write_run(tmp_path, {100: 0.5, 200: 0.1, 300: 0.4, 400: 0.6})

    decisions = plan(tmp_path, RetentionRules(keep=1))

    assert deleted(decisions) == {"checkpoint-100", "checkpoint-300"}
    assert decisions["checkpoint-200"].reason == "best by eval_loss; --keep 1"
    assert decisions["checkpoint-400"].reason == "newest complete checkpoint"
    assert decisions["checkpoint-100"].reason == "not kept by --keep 1"


def test_keep_counts_the_best_among_the_n(tmp_path: Path) -> None:
    """--keep 3 keeps the best plus the two newest when the best is older than them."""
    write_run(tmp_path, {100: 0.5, 200: 0.1, 300: 0.4, 400: 0.6, 500: 0.7})

    decisions = plan(tmp_path, RetentionRules(keep=3))

    assert deleted(decisions) == {"checkpoint-100", "checkpoint-300"}


def test_keep_top_and_keep_every_add_to_keep(tmp_path: Path) -> None:
    """The rules are a union: each names itself in the reason of what it keeps."""
    write_run(tmp_path, {100: 0.3, 200: 0.1, 300: 0.2, 400: 0.6, 500: 0.7, 600: 0.8})

    decisions = plan(tmp_path, RetentionRules(keep=2, keep_top=2, keep_every=400))

    assert deleted(decisions) == {"checkpoint-100", "checkpoint-500"}
    assert decisions["checkpoint-300"].reason == "--keep-top 2 (rank 2)"
    assert decisions["checkpoint-400"].reason == "--keep-every 400"
    assert (
        decisions["checkpoint-500"].reason == "not kept by --keep 2, --keep-top 2, --keep-every 400"
    )


def test_keep_top_follows_the_metric_direction(tmp_path: Path) -> None:
    """With a higher-is-better metric the highest values are the top ones."""
    write_run(tmp_path, {100: 0.9, 200: 0.5, 300: 0.7, 400: 0.6}, metric="eval_accuracy")

    now = time.time()
    decisions = plan_tree(tmp_path, resolve_metric("accuracy"), RetentionRules(keep_top=1), now=now)

    assert {d.name for d in decisions if d.action == "delete"} == {
        "checkpoint-200",
        "checkpoint-300",
    }


def test_the_trainers_own_best_is_kept(tmp_path: Path) -> None:
    """The checkpoint named in best_model_checkpoint stays even when our metric disagrees."""
    for step in (100, 200, 300):
        evals = {at: {"eval_loss": 0.5 - at / 1000} for at in (100, 200, 300) if at <= step}
        best = "C:\\runs\\out\\checkpoint-100"
        write_checkpoint(tmp_path, step, trainer_state(step, evals, best_model_checkpoint=best))

    decisions = plan(tmp_path, RetentionRules(keep=1))

    assert decisions["checkpoint-100"].action == "keep"
    assert decisions["checkpoint-100"].reason == "the Trainer's own best"
    assert deleted(decisions) == {"checkpoint-200"}


def test_a_pinned_checkpoint_is_kept(tmp_path: Path) -> None:
    """A checkpoint holding a KEEP file is never let go."""
    write_run(tmp_path, {100: 0.5, 200: 0.1, 300: 0.4})
    (tmp_path / "checkpoint-100" / "KEEP").touch()

    decisions = plan(tmp_path, RetentionRules(keep=1))

    assert decisions["checkpoint-100"].reason == "pinned by a KEEP file"
    assert deleted(decisions) == set()


def test_unreadable_checkpoints_are_kept_and_reported_incomplete_after_grace(
    tmp_path: Path,
) -> None:
    """A checkpoint without a usable state stays; past the grace period it is called incomplete."""
    write_run(tmp_path, {100: 0.5, 200: 0.1, 300: 0.4})
    (tmp_path / "checkpoint-50").mkdir()
    (tmp_path / "checkpoint-400").mkdir()
    (tmp_path / "checkpoint-400" / "trainer_state.json").write_text('{"global_step": 4')

    fresh = plan(tmp_path, RetentionRules(keep=1), grace=60)
    later = plan(tmp_path, RetentionRules(keep=1), grace=60, now=time.time() + 3 * 3600)

    assert fresh["checkpoint-50"].action == later["checkpoint-50"].action == "keep"
    assert fresh["checkpoint-50"].reason.startswith("not readable yet: no trainer_state.json")
    assert later["checkpoint-50"].reason.startswith("incomplete for 3.0 h: no trainer_state.json")
    assert later["checkpoint-400"].reason.startswith("incomplete for 3.0 h: invalid JSON")
    assert fresh["checkpoint-300"].reason == "newest complete checkpoint"


def test_links_and_odd_names_are_kept(tmp_path: Path) -> None:
    """A linked checkpoint and a name that is not exactly checkpoint-<int> are never let go."""
    root = tmp_path / "root"
    write_run(root / "run", {100: 0.5, 200: 0.1, 300: 0.4, 400: 0.3})
    write_run(tmp_path / "outside", {250: 0.9})
    os.symlink(tmp_path / "outside" / "checkpoint-250", root / "run" / "checkpoint-250")
    (root / "run" / "checkpoint-400").rename(root / "run" / "checkpoint-0400")

    decisions = plan(root, RetentionRules(keep=1))

    assert decisions["checkpoint-250"].reason == "a symbolic link"
    assert decisions["checkpoint-0400"].reason == "not named exactly checkpoint-<int>"
    assert deleted(decisions) == {"checkpoint-100"}


def test_a_run_reached_through_a_link_or_outside_root_is_untouchable(tmp_path: Path) -> None:
    """Checkpoints behind a linked directory, or not under ROOT, are never let go."""
    root = tmp_path / "root"
    write_run(root / "real", {100: 0.5, 200: 0.1, 300: 0.4})
    os.symlink(root / "real", root / "linked")
    write_run(tmp_path / "elsewhere", {100: 0.5, 200: 0.1, 300: 0.4})

    linked = list_run(root / "linked")
    via_link = plan_run(
        linked, rank_run(read_run(linked), LOSS), RetentionRules(keep=1), root=root, now=time.time()
    )
    outside = list_run(tmp_path / "elsewhere")
    elsewhere = plan_run(
        outside,
        rank_run(read_run(outside), LOSS),
        RetentionRules(keep=1),
        root=root,
        now=time.time(),
    )

    assert {d.reason for d in via_link} == {"reached through a symbolic link"}
    assert {d.reason for d in elsewhere} == {"outside ROOT"}


def test_strip_lets_go_of_resume_state_only_where_weights_remain(tmp_path: Path) -> None:
    """--strip plans a strip where weights remain; with no weights or nothing left, it keeps."""
    write_run(tmp_path, {100: 0.5, 200: 0.6, 300: 0.7, 400: 0.1, 500: 0.4})
    for step in (100, 200, 300):
        (tmp_path / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"o")
    (tmp_path / "checkpoint-100" / "model.safetensors").write_bytes(b"w")
    (tmp_path / "checkpoint-300" / "model.safetensors").write_bytes(b"w")
    (tmp_path / "checkpoint-300" / "optimizer.pt").unlink()

    decisions = plan(tmp_path, RetentionRules(keep=2, strip=True))

    assert decisions["checkpoint-100"].action == "strip"
    assert decisions["checkpoint-100"].reason == "not kept by --keep 2; resume state only"
    assert decisions["checkpoint-200"].action == "keep"
    assert decisions["checkpoint-200"].reason.endswith(
        "no weights outside the resume state, so not stripped"
    )
    assert decisions["checkpoint-300"].reason == "not kept by --keep 2; already stripped"


def test_agree_lets_go_only_of_what_the_confirmed_plan_let_go(tmp_path: Path) -> None:
    """A checkpoint the fresh plan would delete but the confirmed one kept is kept."""
    write_run(tmp_path, {100: 0.5, 200: 0.6, 300: 0.1})
    confirmed = plan_tree(tmp_path, LOSS, RetentionRules(keep=2), now=time.time())
    write_checkpoint(
        tmp_path, 400, trainer_state(400, {at: {"eval_loss": 0.5} for at in (100, 200, 300, 400)})
    )

    fresh = plan_tree(tmp_path, LOSS, RetentionRules(keep=2), now=time.time())
    acted = {d.name: d for d in agree(confirmed, fresh)}

    assert {d.name for d in fresh if d.action == "delete"} == {"checkpoint-100", "checkpoint-200"}
    assert {n for n, d in acted.items() if d.action == "delete"} == {"checkpoint-100"}
    assert acted["checkpoint-200"].reason.endswith("not in the confirmed plan")


def test_plan_tree_refuses_a_checkpoint_and_an_empty_tree(tmp_path: Path) -> None:
    """Pointing at one checkpoint, or at a tree without runs, is an error, not a plan."""
    write_run(tmp_path / "run", {100: 0.5})
    (tmp_path / "empty").mkdir()

    with pytest.raises(RetentionError, match="checkpoint-100: this is a checkpoint"):
        plan_tree(tmp_path / "run" / "checkpoint-100", LOSS, RetentionRules(keep=1), now=0)
    with pytest.raises(NothingToCheckError, match="no checkpoint-<step> directories found"):
        plan_tree(tmp_path / "empty", LOSS, RetentionRules(keep=1), now=0)


def test_decisions_name_the_run_relative_to_root(tmp_path: Path) -> None:
    """Runs are named relative to ROOT, and the JSON entry has exactly the documented keys."""
    write_run(tmp_path / "a" / "run1", {100: 0.5, 200: 0.1})

    decisions = plan_tree(tmp_path, LOSS, RetentionRules(keep=1), now=time.time())

    assert [d.as_json() for d in decisions] == [
        {
            "run": "a/run1",
            "name": "checkpoint-100",
            "action": "delete",
            "reason": "not kept by --keep 1",
        },
        {
            "run": "a/run1",
            "name": "checkpoint-200",
            "action": "keep",
            "reason": "best by eval_loss; newest complete checkpoint; --keep 1",
        },
    ]

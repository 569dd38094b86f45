"""``ckpt-watch simulate``: realistic state files, the Trainer's best and rotation, pacing."""

from __future__ import annotations

import itertools
import json
import math
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from commands import Daemon, check_json, cli, invoke, of_run
from conftest import wait_until

from ckpt_watch.simulate import Plan, Saved, SimulationError, simulate
from ckpt_watch.trainer_state import read_checkpoint


def run(directory: Path, **settings: Any) -> list[Saved]:
    """Simulate to the end without pauses."""
    return list(simulate(directory, Plan(every=0, **settings)))


def state(checkpoint: Path) -> dict[str, Any]:
    return dict(json.loads((checkpoint / "trainer_state.json").read_text()))


def on_disk(directory: Path) -> list[str]:
    names = [p.name for p in directory.iterdir() if p.name.startswith("checkpoint-")]
    return sorted(names, key=lambda name: int(name.split("-")[1]))


def intended_best(saved: list[Saved]) -> str:
    """The first checkpoint with the lowest finite eval_loss among those saved."""
    valued = [s for s in saved if s.value is not None and math.isfinite(s.value)]
    return min(valued, key=lambda s: (s.value, s.step)).path.name


def test_states_are_written_in_the_trainers_layout(tmp_path: Path) -> None:
    """Each state is json.dumps(indent=2, sort_keys=True) and a newline; our reader takes it."""
    saved = run(tmp_path / "demo", steps=60, save_steps=20)

    for item in saved:
        raw = (item.path / "trainer_state.json").read_text()
        assert raw == json.dumps(json.loads(raw), indent=2, sort_keys=True) + "\n"
        checkpoint = read_checkpoint(item.path)
        assert checkpoint.error is None
        assert checkpoint.own_metrics["eval_loss"] == item.value
        assert {"model.safetensors", "optimizer.pt", "rng_state.pth"} <= {
            p.name for p in item.path.iterdir()
        }
    assert [s.path.name for s in saved] == ["checkpoint-20", "checkpoint-40", "checkpoint-60"]


def test_trainer_state_is_written_after_the_weights(tmp_path: Path) -> None:
    """trainer_state.json is the last file of a checkpoint to be written."""
    saved = run(tmp_path / "demo", steps=40, save_steps=20)

    for item in saved:
        files = sorted(item.path.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        assert files[-1].name == "trainer_state.json"


def test_check_names_the_best_the_simulator_intended(tmp_path: Path) -> None:
    """``check --json`` ranks the simulated run exactly as its own best fields say."""
    saved = run(tmp_path / "demo", seed=3)

    report = check_json(tmp_path / "demo")["runs"][0]

    trainer = Path(saved[-1].best_model_checkpoint or "").name
    assert report["best"] == trainer == intended_best(saved)
    assert report["trainer_best"] == trainer
    assert report["best"] != saved[-1].path.name  # the loss turns up again at the end


def test_logs_grow_by_prefix_with_a_training_row_every_logging_step(tmp_path: Path) -> None:
    """Each checkpoint's log_history is the start of the next one's; training rows every N."""
    saved = run(tmp_path / "demo", steps=100, save_steps=25, eval_steps=25, logging_steps=4)

    logs = [state(item.path)["log_history"] for item in saved]

    for older, newer in itertools.pairwise(logs):
        assert newer[: len(older)] == older and len(newer) > len(older)
    training = [row["step"] for row in logs[-1] if "loss" in row]
    evaluations = [row["step"] for row in logs[-1] if "eval_loss" in row]
    assert training == list(range(4, 101, 4))
    assert evaluations == [25, 50, 75, 100]


def test_best_fields_follow_transformers_4_50(tmp_path: Path) -> None:
    """best_metric/best_global_step track every evaluation; the checkpoint only once saved."""
    saved = run(tmp_path / "demo", steps=120, save_steps=20, eval_steps=10, seed=5)
    saved_steps = {item.step for item in saved}

    for item in saved:
        document = state(item.path)
        rows = document["log_history"]
        best_value, best_step = min((r["eval_loss"], r["step"]) for r in rows if "eval_loss" in r)
        assert (document["best_metric"], document["best_global_step"]) == (best_value, best_step)
        named = Path(document["best_model_checkpoint"]).name
        named_step = int(named.split("-")[1])
        assert named_step in saved_steps and named_step <= item.step
        if best_step in saved_steps:
            assert named_step == best_step
        assert document["best_model_checkpoint"] == str(tmp_path / "demo" / named)


def test_nan_is_logged_as_a_bare_token_and_never_best(tmp_path: Path) -> None:
    """From --nan-at on, losses are bare NaN; check and the Trainer keep the last real best."""
    saved = run(tmp_path / "demo", steps=200, save_steps=20, nan_at=130)

    raw = (saved[-1].path / "trainer_state.json").read_text()
    report = check_json(tmp_path / "demo")["runs"][0]

    assert '"eval_loss": NaN' in raw and '"loss": NaN' in raw
    assert [s.step for s in saved if s.value is not None and math.isnan(s.value)] == [
        140,
        160,
        180,
        200,
    ]
    assert report["best"] == intended_best(saved) == report["trainer_best"]
    assert int(report["best"].split("-")[1]) < 130


def test_nan_from_the_start_leaves_no_best(tmp_path: Path) -> None:
    """A run that is NaN from its first evaluation has best_metric Infinity and no best."""
    saved = run(tmp_path / "demo", steps=60, save_steps=20, nan_at=1)

    document = state(saved[-1].path)
    report = check_json(tmp_path / "demo")["runs"][0]

    assert document["best_metric"] == math.inf
    assert document["best_model_checkpoint"] is None
    assert report["best"] is None


def test_rotation_keeps_the_newest_and_the_best(tmp_path: Path) -> None:
    """With --save-total-limit 2 the oldest go first, and the best and the newest always stay."""
    directory = tmp_path / "demo"
    written: list[str] = []
    spared = 0

    for item in simulate(directory, Plan(every=0, seed=6, save_total_limit=2)):
        written.append(item.path.name)
        present = on_disk(directory)
        best = Path(item.best_model_checkpoint or "").name
        spared += best not in written[-2:]
        protected = {item.path.name, best}
        assert protected <= set(present)
        assert len(present) == min(len(written), max(2, len(protected)))
        gone = [name for name in written if name not in present]
        unprotected = [name for name in present if name not in protected]
        assert all(written.index(g) < written.index(u) for g in gone for u in unprotected)
        assert set(item.removed) <= set(gone)

    report = check_json(directory)["runs"][0]
    assert spared > 0  # the best was older than the two newest at least once
    assert report["best"] == best == report["trainer_best"]


def test_limit_one_ends_with_only_the_best(tmp_path: Path) -> None:
    """With a limit of 1, two stay while the best is older; at the end only the best is left."""
    saved = run(tmp_path / "demo", seed=0, save_total_limit=1)

    best = Path(saved[-1].best_model_checkpoint or "").name
    assert best != saved[-1].path.name
    assert saved[-1].path.name in saved[-1].removed
    assert on_disk(tmp_path / "demo") == [best]


def test_same_seed_writes_the_same_run(tmp_path: Path) -> None:
    """The made-up losses depend on the seed alone."""
    first = run(tmp_path / "a", seed=7)
    second = run(tmp_path / "b", seed=7)
    other = run(tmp_path / "c", seed=8)

    assert [s.value for s in first] == [s.value for s in second]
    assert state(first[-1].path)["log_history"] == state(second[-1].path)["log_history"]
    assert [s.value for s in first] != [s.value for s in other]


def test_every_pauses_before_each_save(tmp_path: Path) -> None:
    """--every waits that long before each save, and not at all when it is 0."""
    pauses: list[float] = []

    saved = list(simulate(tmp_path / "a", Plan(steps=60, every=1.5), wait=pauses.append))
    list(simulate(tmp_path / "b", Plan(steps=60, every=0), wait=pauses.append))

    assert pauses == [1.5] * len(saved) == [1.5] * 3


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (Plan(steps=50, nan_at=51), "--nan-at must be a step from 1 to 50"),
        (Plan(save_steps=0), "--save-steps must be at least 1, not 0"),
        (Plan(every=-1), "--every must be 0 or more seconds, not -1"),
        (Plan(save_total_limit=0), "--save-total-limit must be at least 1, not 0"),
    ],
)
def test_unusable_settings_are_refused_before_writing(
    tmp_path: Path, plan: Plan, message: str
) -> None:
    """A plan that cannot be simulated raises with the option named, and writes nothing."""
    with pytest.raises(SimulationError, match=message):
        list(simulate(tmp_path / "demo", plan))

    assert not (tmp_path / "demo").exists()


def test_cli_writes_a_run_and_names_the_best(tmp_path: Path) -> None:
    """``ckpt-watch simulate DIR --every 0`` prints one line per save and the best at the end."""
    done = cli("simulate", str(tmp_path / "demo"), "--every", "0", "--steps", "60")

    lines = done.stdout.splitlines()
    report = check_json(tmp_path / "demo")["runs"][0]

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert [line.split()[3] for line in lines[:-1]] == [
        "checkpoint-20",
        "checkpoint-40",
        "checkpoint-60",
    ]
    assert lines[-1].startswith(f"done: the Trainer's best is {report['best']} (eval_loss ")


def test_cli_refuses_a_directory_that_holds_checkpoints(tmp_path: Path) -> None:
    """Simulating into an existing run exits 1 with one line, and touches nothing there."""
    run(tmp_path / "demo", steps=40)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "demo").rglob("*"))

    done = invoke("simulate", str(tmp_path / "demo"), "--every", "0", "--save-total-limit", "1")

    assert done.exit_code == 1
    assert done.stderr.strip() == (
        f"ckpt-watch: {tmp_path / 'demo'}: already holds checkpoints; "
        "simulate into a new or empty directory"
    )
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "demo").rglob("*")) == before


def test_cli_bad_option_is_a_usage_error(tmp_path: Path) -> None:
    """An option out of range exits 2 and names the option."""
    done = invoke("simulate", str(tmp_path / "demo"), "--steps", "50", "--nan-at", "60")

    assert done.exit_code == 2
    assert done.stderr.strip() == "ckpt-watch: --nan-at must be a step from 1 to 50"


def test_a_running_daemon_follows_a_simulated_run(tmp_path: Path) -> None:
    """The quick start: start in one terminal, simulate in another; the daemon names the best."""
    root = tmp_path / "models"
    root.mkdir()
    daemon = Daemon(root, "--reconcile", "60")
    try:
        daemon.wait_started()

        done = cli("simulate", str(root / "demo"), "--every", "0.05", "--seed", "4")
        assert done.returncode == 0, done.stderr
        final = state(root / "demo" / "checkpoint-200")
        assert wait_until(lambda: len(of_run(daemon.events(), "demo", "checkpoint")) >= 10)
    finally:
        assert daemon.stop() == 0

    events = daemon.events()
    recorded = [e["checkpoint"] for e in of_run(events, "demo", "checkpoint")]
    bests = of_run(events, "demo", "new_best")
    values = [e["value"] for e in bests]
    assert recorded == [f"checkpoint-{step}" for step in range(20, 201, 20)]
    assert bests[-1]["checkpoint"] == Path(final["best_model_checkpoint"]).name
    assert bests[-1]["value"] == final["best_metric"]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)


def _as_at_a_terminal() -> None:
    """Let Ctrl-C through: a background shell may have started this run with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_with_one_line(tmp_path: Path) -> None:
    """Ctrl-C while waiting for the next save ends with one line and exit status 130."""
    command = [sys.executable, "-m", "ckpt_watch", "simulate", str(tmp_path / "demo")]
    proc = subprocess.Popen(
        [*command, "--every", "30"],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_as_at_a_terminal,
    )
    assert wait_until(lambda: (tmp_path / "demo").is_dir())

    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=10)

    assert proc.returncode == 130
    assert stderr == "ckpt-watch: interrupted after no checkpoint\n"

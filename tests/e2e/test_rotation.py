"""``simulate --save-total-limit`` deletes what the Trainer's own rotation would delete."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
NEEDS = "needs the e2e extra: pip install '.[test,e2e]'"
trainer_utils = pytest.importorskip("transformers.trainer_utils", reason=NEEDS)

from ckpt_watch.simulate import Plan, simulate  # noqa: E402

pytestmark = pytest.mark.e2e


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.mark.parametrize("limit", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 2, 6])
def test_simulated_rotation_matches_the_trainers(tmp_path: Path, limit: int, seed: int) -> None:
    """After every save the simulator keeps the very checkpoints transformers' rotation keeps."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    theirs.mkdir()
    plan = Plan(every=0, seed=seed, save_total_limit=limit)

    for saved in simulate(ours, plan):
        (theirs / saved.path.name).mkdir()
        best = saved.best_model_checkpoint
        trainer_best = str(theirs / Path(best).name) if best else None
        trainer_utils.rotate_checkpoints(
            str(theirs), limit, best_model_checkpoint=trainer_best, use_mtime=True
        )
        if saved.step == plan.steps and limit == 1:
            break  # then the end of train() deletes all but the best: see test_simulate
        assert names(ours) == names(theirs), f"after {saved.path.name}"

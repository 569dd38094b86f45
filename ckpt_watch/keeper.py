"""Retention inside the daemon: after a run changes, let go of what no rule keeps."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from ckpt_watch.prune import Pruner
from ckpt_watch.ranking import Metric, rank_run
from ckpt_watch.retention import DEFAULT_GRACE, RetentionRules, plan_run
from ckpt_watch.scan import list_run
from ckpt_watch.trainer_state import Checkpoint

log = logging.getLogger(__name__)


class Keeper:
    """Plans retention for one run at a time and hands the deletions to the pruner."""

    def __init__(
        self,
        root: Path,
        metric: Metric,
        rules: RetentionRules,
        pruner: Pruner,
        *,
        grace: float = DEFAULT_GRACE,
    ) -> None:
        self.root = root
        self.metric = metric
        self.rules = rules
        self.pruner = pruner
        self.grace = grace

    def tidy(
        self, run_path: Path, checkpoints: Sequence[Checkpoint], earlier: Iterable[str] = ()
    ) -> list[str]:
        """Apply the rules to one run; returns the names of the checkpoints let go.

        ``checkpoints`` is what the engine knows of the live training, unreadable ones
        included (they carry an error and are always kept); ``earlier`` names checkpoints
        of an earlier training in the same directory, which are kept and not ranked.
        """
        ranking = rank_run(checkpoints, self.metric)
        hold = dict.fromkeys(earlier, "from an earlier training in this directory")
        plan = plan_run(
            list_run(run_path),
            ranking,
            self.rules,
            root=self.root,
            now=time.time(),
            grace=self.grace,
            hold=hold,
        )
        if all(decision.action == "keep" for decision in plan):
            return []
        outcomes = self.pruner.apply(plan, root=self.root)
        for outcome in outcomes:
            if outcome.result in ("pruned", "stripped"):
                log.info(
                    "%s run=%s checkpoint=%s bytes=%d reason=%s",
                    outcome.result,
                    outcome.decision.run,
                    outcome.decision.name,
                    outcome.bytes,
                    outcome.decision.reason,
                )
        return [o.decision.name for o in outcomes if o.result == "pruned"]

"""End to end: a real transformers Trainer saves checkpoints while ``ckpt-watch start`` watches."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded; read before the import below
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

NEEDS = "needs the e2e extra: pip install '.[test,e2e]'"
torch = pytest.importorskip("torch", reason=NEEDS)
transformers = pytest.importorskip("transformers", reason=NEEDS)
pytest.importorskip("accelerate", reason=NEEDS)

from commands import Daemon, check_json, of_run  # noqa: E402
from conftest import wait_until  # noqa: E402
from receivers import Mailbox  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ckpt_watch.trainer_state import last_component  # noqa: E402

pytestmark = pytest.mark.e2e

STEPS = 50  # the tiny model overfits its noisy training set well before the end
EVERY = 5
LIMIT = 2
SEQUENCE = 12
VOCAB = 50


# ----- a tiny model on made-up data ---------------------------------------------------------


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; the label is whether the first token is in the upper half."""

    def __init__(self, size: int, seed: int, noise: float) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (size, SEQUENCE), generator=generator)
        labels = (self.ids[:, 0] > VOCAB // 2).long()
        flipped = torch.rand(size, generator=generator) < noise
        self.labels = torch.where(flipped, 1 - labels, labels)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ones = torch.ones(SEQUENCE, dtype=torch.long)
        return {"input_ids": self.ids[index], "attention_mask": ones, "labels": self.labels[index]}


def tiny_bert(seed: int) -> Any:
    """A two-layer BERT classifier built from a config: no download, a few thousand weights."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQUENCE + 4,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


@dataclass
class Training:
    """One finished Trainer run and the checkpoints it saved, in order."""

    run: str
    path: Path
    trainer: Any
    saved: list[str] = field(default_factory=list)

    @property
    def evals(self) -> dict[str, float]:
        """eval_loss by checkpoint name, from the Trainer's own log."""
        rows = self.trainer.state.log_history
        return {f"checkpoint-{r['step']}": r["eval_loss"] for r in rows if "eval_loss" in r}

    @property
    def best(self) -> str:
        return str(last_component(self.trainer.state.best_model_checkpoint))

    def on_disk(self) -> set[str]:
        return {p.name for p in self.path.iterdir() if p.name.startswith("checkpoint-")}

    def improvements(self) -> list[str]:
        """Saved checkpoints better than every one saved before them, in order."""
        found: list[str] = []
        for name in self.saved:
            if not found or self.evals[name] < self.evals[found[-1]]:
                found.append(name)
        return found


class Saves(transformers.TrainerCallback):
    """Notes each save; in lockstep, waits until the daemon has recorded it."""

    def __init__(self, training: Training, daemon: Daemon, *, lockstep: bool) -> None:
        self.training = training
        self.daemon = daemon
        self.lockstep = lockstep

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        name = f"checkpoint-{state.global_step}"
        self.training.saved.append(name)
        if self.lockstep:
            # Real saves are minutes apart; here each one waits to be seen on its own.
            recorded = wait_until(lambda: name in self._recorded(), timeout=30)
            assert recorded, f"daemon did not record {name}:\n{self.daemon.log.read_text()}"

    def _recorded(self) -> set[str]:
        events = of_run(self.daemon.events(), self.training.run, "checkpoint")
        return {e["checkpoint"] for e in events}


def train(root: Path, run: str, seed: int, daemon: Daemon, *, lockstep: bool) -> Training:
    """Train the tiny model on the CPU, evaluating and saving every few steps."""
    training = Training(run, root / run, trainer=None)
    args = transformers.TrainingArguments(
        output_dir=str(training.path),
        max_steps=STEPS,
        eval_strategy="steps",
        eval_steps=EVERY,
        save_steps=EVERY,
        logging_steps=1,
        save_total_limit=LIMIT,
        load_best_model_at_end=True,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        seed=seed,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    training.trainer = transformers.Trainer(
        model=tiny_bert(seed),
        args=args,
        train_dataset=Tokens(64, seed=seed + 100, noise=0.3),
        eval_dataset=Tokens(128, seed=seed + 200, noise=0.0),
        callbacks=[Saves(training, daemon, lockstep=lockstep)],
    )
    training.trainer.train()
    return training


# ----- notifications (--notify, to a real SMTP server) and retention (--keep) -----------------


def watch_options(mailbox: Mailbox) -> list[str]:
    """Options for ``ckpt-watch start`` beyond the root: mail every new best, keep 1."""
    return ["--reconcile", "60", "--notify", mailbox.url(), "--coalesce", "0", "--keep", "1"]


def check_notifications(mailbox: Mailbox, events: list[dict[str, Any]]) -> None:
    """Exactly one message per new best, each naming its run and checkpoint."""
    new_bests = [e for e in events if e["event"] == "new_best"]
    notified = [e for e in events if e["event"] == "notified"]

    assert sorted(e["announce"] for e in notified) == sorted(e["announce"] for e in new_bests)
    assert len(mailbox.messages) == len(new_bests)
    bodies = [message.get_body(("plain",)).get_content() for message in mailbox.messages]
    for best in new_bests:
        wanted = f"{best['checkpoint']}, step {best['step']}"
        assert sum(wanted in body and best["run"] in body for body in bodies) == 1


def check_retention(events: list[dict[str, Any]], trainings: list[Training]) -> None:
    """Pruning never took the Trainer's best or the newest; every deletion is accounted for."""
    for training in trainings:
        pruned = {e["checkpoint"] for e in of_run(events, training.run, "pruned")}
        removed = {e["checkpoint"] for e in of_run(events, training.run, "removed")}
        assert training.best not in pruned and training.saved[-1] not in pruned
        assert pruned | removed <= set(training.saved) - training.on_disk()


def check_best_model_loaded(training: Training) -> None:
    """The Trainer's final load of its best checkpoint worked (it must, with pruning on too)."""
    best = training.path / training.best / "model.safetensors"
    weights = load_file(best)
    model = training.trainer.model.state_dict()
    assert weights and all(torch.equal(model[key], value) for key, value in weights.items())


# ----- one watched session, shared by the tests below ---------------------------------------


@dataclass
class Session:
    """Two sibling runs trained under one watched root, and what ckpt-watch made of them."""

    root: Path
    lockstep: Training
    free: Training
    events: list[dict[str, Any]]
    report: dict[str, Any]
    mailbox: Mailbox

    @property
    def trainings(self) -> list[Training]:
        return [self.lockstep, self.free]

    def of(self, training: Training, kind: str) -> list[dict[str, Any]]:
        return of_run(self.events, training.run, kind)


def _settled(daemon: Daemon, training: Training) -> bool:
    """Whether the history has caught up with the run's checkpoints on disk."""
    events = daemon.events()
    recorded = {e["checkpoint"] for e in of_run(events, training.run, "checkpoint")}
    gone = {
        e["checkpoint"]
        for kind in ("removed", "pruned")
        for e in of_run(events, training.run, kind)
    }
    return recorded - gone == training.on_disk() and training.saved[-1] in recorded


def _state(daemon: Daemon, training: Training) -> str:
    """What the history and the disk say of a run, for a failure message."""
    events = daemon.events()
    recorded = sorted(e["checkpoint"] for e in of_run(events, training.run, "checkpoint"))
    gone = sorted(
        e["checkpoint"] for k in ("removed", "pruned") for e in of_run(events, training.run, k)
    )
    return f"recorded {recorded}, gone {gone}, on disk {sorted(training.on_disk())}"


def _all_delivered(events: list[dict[str, Any]]) -> bool:
    wanted = {e["announce"] for e in events if e["event"] == "new_best"}
    return wanted <= {e["announce"] for e in events if e["event"] == "notified"}


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    root = tmp_path_factory.mktemp("e2e") / "models"
    root.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # leave the other core to the daemon
    transformers.logging.set_verbosity_error()
    mailbox = Mailbox("trainer", "e2e-password")
    daemon = Daemon(root, *watch_options(mailbox))
    try:
        daemon.wait_started()
        # With seed 3 the loss gets worse and then better again more than once: count on it.
        first = train(root, "run-a", seed=3, daemon=daemon, lockstep=True)
        second = train(root, "run-b", seed=1, daemon=daemon, lockstep=False)
        for training in (first, second):
            settled = wait_until(lambda t=training: _settled(daemon, t), timeout=30)
            assert settled, f"history never caught up with {training.run}: " + _state(
                daemon, training
            )
        # apprise spaces mails to one server a few seconds apart: wait for every one.
        delivered = wait_until(lambda: _all_delivered(daemon.events()), timeout=180)
        assert delivered, f"mail not delivered:\n{daemon.log.read_text()}"
        assert daemon.stop() == 0
        report = check_json(root)
        yield Session(root, first, second, daemon.events(), report, mailbox)
    finally:
        daemon.stop()
        mailbox.close()
        torch.set_num_threads(threads)


def test_the_runs_exercise_worse_checkpoints_and_rotation(session: Session) -> None:
    """Each run saved worse checkpoints after its best, and its rotation deleted some."""
    for training in session.trainings:
        assert training.best != training.saved[-1]
        assert len(training.improvements()) < len(training.saved)
        assert training.on_disk() == {training.best, training.saved[-1]}


def test_our_best_is_the_trainers_best(session: Session) -> None:
    """``check --json`` and the history's last new_best both name best_model_checkpoint."""
    by_run = {run["run"]: run for run in session.report["runs"]}

    for training in session.trainings:
        assert by_run[training.run]["best"] == training.best
        assert by_run[training.run]["trainer_best"] == training.best
        assert session.of(training, "new_best")[-1]["checkpoint"] == training.best


def test_history_matches_the_checkpoints_that_existed(session: Session) -> None:
    """Every checkpoint saved is recorded once with the Trainer's value; deleted ones as removed
    (by the Trainer's rotation) or pruned (by ours)."""
    training = session.lockstep
    records = session.of(training, "checkpoint")
    removed = [e["checkpoint"] for e in session.of(training, "removed")]
    removed += [e["checkpoint"] for e in session.of(training, "pruned")]

    assert [e["checkpoint"] for e in records] == training.saved
    assert [e["value"] for e in records] == [training.evals[name] for name in training.saved]
    assert sorted(removed) == sorted(set(training.saved) - training.on_disk())


def test_free_running_history_holds_only_what_existed(session: Session) -> None:
    """At the Trainer's own pace, each record is a real save with its value; none is doubled."""
    training = session.free
    records = session.of(training, "checkpoint")
    recorded = [e["checkpoint"] for e in records]
    removed = [e["checkpoint"] for e in session.of(training, "removed")]
    removed += [e["checkpoint"] for e in session.of(training, "pruned")]

    # A checkpoint the rotation deleted before the daemon could read it is never recorded.
    assert recorded == [name for name in training.saved if name in recorded]
    assert [e["value"] for e in records] == [training.evals[name] for name in recorded]
    assert sorted(removed) == sorted(set(recorded) - training.on_disk())
    assert training.on_disk() <= set(recorded)


def test_exactly_one_new_best_per_improvement(session: Session) -> None:
    """With each save seen on its own, every improvement is one new_best, in order."""
    training = session.lockstep
    bests = session.of(training, "new_best")

    assert [e["checkpoint"] for e in bests] == training.improvements()
    assert [e["previous"] for e in bests] == [None, *training.improvements()[:-1]]
    assert [e["value"] for e in bests] == [training.evals[n] for n in training.improvements()]


def test_free_running_new_bests_are_real_improvements(session: Session) -> None:
    """At the Trainer's own pace, each new_best beats everything saved before it, once."""
    training = session.free
    bests = [e["checkpoint"] for e in session.of(training, "new_best")]

    assert bests and set(bests) <= set(training.improvements())
    assert bests == sorted(set(bests), key=training.saved.index)
    assert bests[-1] == training.best


def test_sibling_runs_are_tracked_separately(session: Session) -> None:
    """A second run beside the first gets its own records and its own first best."""
    runs = {e["run"] for e in session.events if "run" in e}
    first_best = session.of(session.free, "new_best")[0]

    assert runs == {"run-a", "run-b"}
    assert first_best["previous"] is None and first_best["previous_value"] is None
    assert sorted(run["run"] for run in session.report["runs"]) == ["run-a", "run-b"]
    for training in session.trainings:
        paths = [Path(e["path"]) for e in session.of(training, "new_best")]
        assert all(path.parent == training.path for path in paths)


def test_one_mail_per_new_best(session: Session) -> None:
    """Every new best reached the real SMTP server exactly once."""
    check_notifications(session.mailbox, session.events)


def test_pruning_kept_what_the_trainer_needs(session: Session) -> None:
    """With --keep 1 beside the Trainer's own rotation, nothing needed was deleted."""
    check_retention(session.events, session.trainings)


def test_the_trainers_final_best_model_load_works(session: Session) -> None:
    """load_best_model_at_end loaded the best checkpoint's weights into the model."""
    for training in session.trainings:
        check_best_model_loaded(training)

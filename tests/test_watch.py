"""The watcher on real directories with a real watchdog observer (and polling)."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until
from factories import dumps, trainer_state, write_run

from ckpt_watch import watch
from ckpt_watch.engine import Engine
from ckpt_watch.history import History, replay
from ckpt_watch.mounts import filesystem_type, is_network_filesystem
from ckpt_watch.ranking import resolve_metric
from ckpt_watch.watch import Daemon, WatchSettings, route


class CountingEngine(Engine):
    """An engine that counts how often each run is looked at."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.refreshed: Counter[str] = Counter()

    def refresh(self, run_path: Path) -> bool:
        self.refreshed[run_path.name] += 1
        return super().refresh(run_path)

    def refresh_tree(self, directory: Path) -> bool:
        self.refreshed[f"tree:{directory.name}"] += 1
        return super().refresh_tree(directory)


class Running:
    """A daemon running in a thread over ``root``, stopped and joined at the end."""

    def __init__(self, root: Path, settings: WatchSettings, history: Path | None = None) -> None:
        self.root = root
        self.history_path = history or root / ".ckpt-watch" / "history.jsonl"
        self.history = History(self.history_path)
        self.engine = CountingEngine(root, resolve_metric(), self.history)
        self.engine.load(replay(self.history_path))
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.daemon = Daemon(
            self.engine, settings, self.stop, on_ready=lambda _daemon: self.ready.set()
        )
        self.thread = threading.Thread(target=self.daemon.run, name="daemon")

    def __enter__(self) -> Running:
        self.thread.start()
        assert self.ready.wait(10), "daemon did not become ready"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.daemon.queue.wake()
        self.thread.join(10)
        assert not self.thread.is_alive(), "daemon thread did not stop"
        self.history.close()

    def records(self, kind: str = "checkpoint") -> list[dict[str, object]]:
        return [e for e in replay(self.history_path) if e["event"] == kind]

    def names(self, kind: str = "checkpoint") -> list[str]:
        return [str(e["checkpoint"]) for e in self.records(kind)]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    root = tmp_path / "models"
    root.mkdir()
    with Running(root, WatchSettings(reconcile=3600, health_every=0.2)) as daemon:
        yield daemon
    assert not [t for t in threading.enumerate() if t.name == "daemon"]


def write_like_the_trainer(checkpoint: Path, content: str, pieces: int = 8) -> None:
    """Create the directory, then write the state in place in several flushed pieces."""
    checkpoint.mkdir(parents=True, exist_ok=True)
    size = len(content) // pieces + 1
    with open(checkpoint / "trainer_state.json", "w") as handle:
        for start in range(0, len(content), size):
            handle.write(content[start : start + size])
            handle.flush()


def state(step: int, value: float) -> str:
    return dumps(trainer_state(step, {step: {"eval_loss": value}}, logging_steps=1))


def test_state_written_in_place_is_recorded_once(running: Running) -> None:
    """A state written in pieces, as the Trainer does, gives exactly one record."""
    write_like_the_trainer(running.root / "run" / "checkpoint-10", state(10, 0.5))

    assert wait_until(lambda: running.names() == ["checkpoint-10"])
    write_like_the_trainer(running.root / "run" / "checkpoint-20", state(20, 0.4))
    assert wait_until(lambda: running.names() == ["checkpoint-10", "checkpoint-20"])
    assert [e["checkpoint"] for e in running.records("new_best")] == [
        "checkpoint-10",
        "checkpoint-20",
    ]


def test_tmp_checkpoint_renamed_into_place_is_recorded(running: Running) -> None:
    """Versions that build tmp-checkpoint-N and rename it are seen through the move."""
    staging = running.root / "run" / "tmp-checkpoint-30"
    write_like_the_trainer(staging, state(30, 0.3))
    os.rename(staging, running.root / "run" / "checkpoint-30")

    assert wait_until(lambda: running.names() == ["checkpoint-30"])


def test_run_moved_in_whole_is_scanned(running: Running, tmp_path: Path) -> None:
    """A directory created and filled elsewhere, then moved in, is scanned as a subtree."""
    outside = tmp_path / "elsewhere" / "run"
    write_run(outside, {100: 0.9, 200: 0.8})
    os.rename(outside.parent, running.root / "team")

    assert wait_until(lambda: running.names() == ["checkpoint-100", "checkpoint-200"])
    assert running.records()[0]["run"] == "team/run"


def test_reading_files_causes_no_work(running: Running) -> None:
    """Opening and reading states, as our own reads and people do, triggers nothing."""
    write_run(running.root / "quiet", {100: 0.5})
    assert wait_until(lambda: len(running.names()) == 1)
    # Events are handled in order: once this record is there, "quiet" has settled.
    write_like_the_trainer(running.root / "busy" / "checkpoint-1", state(1, 0.5))
    assert wait_until(lambda: len(running.names()) == 2)
    running.engine.refreshed.clear()

    for _ in range(5):
        (running.root / "quiet" / "checkpoint-100" / "trainer_state.json").read_bytes()
        running.history_path.read_bytes()
    write_like_the_trainer(running.root / "busy" / "checkpoint-2", state(2, 0.4))

    assert wait_until(lambda: running.names()[-1] == "checkpoint-2")
    assert running.engine.refreshed["quiet"] == 0
    assert set(running.engine.refreshed) == {"busy"}


def test_writes_inside_checkpoints_cause_no_work(running: Running) -> None:
    """Weight shards and DeepSpeed state written inside a checkpoint are ignored."""
    write_run(running.root / "run", {100: 0.5})
    assert wait_until(lambda: running.names() == ["checkpoint-100"])
    write_like_the_trainer(running.root / "settle" / "checkpoint-1", state(1, 0.5))
    assert wait_until(lambda: running.names()[-1] == "checkpoint-1")
    running.engine.refreshed.clear()

    shards = running.root / "run" / "checkpoint-100" / "global_step100"
    shards.mkdir()
    for index in range(20):
        (shards / f"rank{index}.pt").write_bytes(b"x" * 1000)
        (running.root / "run" / "checkpoint-100" / f"shard-{index}.bin").write_bytes(b"y")
    write_like_the_trainer(running.root / "other" / "checkpoint-2", state(2, 0.5))

    assert wait_until(lambda: running.names()[-1] == "checkpoint-2")
    assert running.engine.refreshed["run"] == 0


def test_deleted_checkpoint_is_recorded_as_removed(running: Running) -> None:
    """A checkpoint deleted by rotation or by hand gets a removed record."""
    write_run(running.root / "run", {100: 0.5, 200: 0.4})
    assert wait_until(lambda: len(running.names()) == 2)

    shutil.rmtree(running.root / "run" / "checkpoint-100")

    assert wait_until(lambda: running.names("removed") == ["checkpoint-100"])


def test_root_deleted_and_recreated_is_watched_again(tmp_path: Path) -> None:
    """When the watched root is replaced, the watch is re-created and the tree rescanned."""
    root = tmp_path / "models"
    root.mkdir()
    settings = WatchSettings(reconcile=3600, health_every=0.2)
    with Running(root, settings, history=tmp_path / "history.jsonl") as daemon:
        write_run(root / "run", {100: 0.5})
        assert wait_until(lambda: daemon.names() == ["checkpoint-100"])

        shutil.rmtree(root)
        assert wait_until(lambda: daemon.names("removed") == ["checkpoint-100"])
        root.mkdir()
        write_run(root / "run2", {10: 0.1})
        assert wait_until(lambda: "checkpoint-10" in daemon.names())
        write_like_the_trainer(root / "run2" / "checkpoint-20", state(20, 0.05))
        assert wait_until(lambda: "checkpoint-20" in daemon.names())


def test_history_inside_a_replaced_root_is_written_anew(tmp_path: Path) -> None:
    """With the default history inside the root, a replaced root gets a new history file."""
    root = tmp_path / "models"
    root.mkdir()
    with Running(root, WatchSettings(reconcile=3600, health_every=0.2)) as daemon:
        write_run(root / "run", {100: 0.5})
        assert wait_until(lambda: daemon.names() == ["checkpoint-100"])

        # The daemon may write into the root while it is being deleted, as with any rm -rf.
        assert wait_until(lambda: not shutil.rmtree(root, ignore_errors=True) and not root.exists())
        root.mkdir()
        write_run(root / "run", {100: 0.5, 200: 0.4})

        assert wait_until(lambda: "checkpoint-200" in daemon.names())


def test_polling_finds_new_and_removed_checkpoints(tmp_path: Path) -> None:
    """With --poll the same records appear without inotify."""
    root = tmp_path / "models"
    root.mkdir()
    with Running(root, WatchSettings(poll=0.1, reconcile=3600)) as daemon:
        assert daemon.daemon.mode == "poll"
        write_run(root / "run", {100: 0.5, 200: 0.4})
        assert wait_until(lambda: daemon.names() == ["checkpoint-100", "checkpoint-200"])
        shutil.rmtree(root / "run" / "checkpoint-100")
        assert wait_until(lambda: daemon.names("removed") == ["checkpoint-100"])


def test_inotify_limit_falls_back_to_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When inotify watches run out, the log names the sysctl and polling takes over."""

    def exhausted(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(watch.Observer, "schedule", exhausted)
    root = tmp_path / "models"
    root.mkdir()

    with caplog.at_level("WARNING"), Running(root, WatchSettings(reconcile=0.2)) as daemon:
        write_run(root / "run", {100: 0.5})
        assert wait_until(lambda: daemon.names() == ["checkpoint-100"])

    assert daemon.daemon.mode == "poll"
    assert "fs.inotify.max_user_watches" in caplog.text


def test_network_filesystem_chooses_polling(tmp_path: Path) -> None:
    """Mount types where inotify misses remote writes are recognised from mountinfo."""
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "40 22 0:50 / /mnt/shared\\040data rw - nfs4 server:/export rw\n"
        "41 22 0:51 / /lustre rw - lustre 10.0.0.1@tcp:/fs rw\n"
    )

    nfs = filesystem_type(Path("/mnt/shared data/models"), mountinfo)
    local = filesystem_type(Path("/home/user/models"), mountinfo)

    assert (nfs, local) == ("nfs4", "ext4")
    assert is_network_filesystem(nfs) and is_network_filesystem("lustre")
    assert is_network_filesystem("fuse.sshfs") and not is_network_filesystem(local)


@pytest.mark.parametrize(
    ("path", "is_directory", "kind", "expected"),
    [
        ("run/checkpoint-5", True, "created", ("run", "run")),
        ("run/checkpoint-5/trainer_state.json", False, "closed", ("run", "run")),
        ("run/checkpoint-5/trainer_state.json", False, "modified", None),
        ("run/checkpoint-5/trainer_state.json", False, "opened", None),
        ("run/checkpoint-5/trainer_state.json", False, "closed_no_write", None),
        ("run/checkpoint-5/model.safetensors", False, "closed", None),
        ("run/checkpoint-5/global_step5", True, "created", None),
        ("run/tmp-checkpoint-5", True, "created", None),
        (".ckpt-watch/history.jsonl", False, "closed", None),
        ("run/.trash-checkpoint-5-1", True, "created", None),
        ("team", True, "created", ("tree", "team")),
        ("team/run", True, "deleted", ("tree", "team/run")),
        ("run/trainer_state.json", False, "closed", None),
    ],
)
def test_route(
    tmp_path: Path, path: str, is_directory: bool, kind: str, expected: tuple[str, str] | None
) -> None:
    """Events map to a run to refresh, a subtree to scan, or nothing at all."""
    target = route(tmp_path, str(tmp_path / path), is_directory=is_directory, kind=kind)

    if expected is None:
        assert target is None
    else:
        assert target == (expected[0], tmp_path / expected[1])


def test_dead_watch_is_recreated_and_rescanned(running: Running) -> None:
    """If the observer's watch dies, the health check watches again and catches up."""
    observer = running.daemon._observer
    for emitter in list(observer.emitters):
        emitter.stop()
        emitter.join(5)
    write_run(running.root / "run", {100: 0.5})

    assert wait_until(lambda: running.names() == ["checkpoint-100"])
    assert running.daemon.observer_alive
    write_like_the_trainer(running.root / "run" / "checkpoint-200", state(200, 0.4))
    assert wait_until(lambda: running.names() == ["checkpoint-100", "checkpoint-200"])


def test_error_while_routing_does_not_kill_the_observer(
    running: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception on the observer thread is logged; later events still arrive."""
    calls = Counter[str]()
    real_route = watch.route

    def failing_once(*args: object, **kwargs: object) -> object:
        calls["route"] += 1
        if calls["route"] == 1:
            raise RuntimeError("boom")
        return real_route(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(watch, "route", failing_once)
    with caplog.at_level("ERROR"):
        (running.root / "noise").mkdir()
        assert wait_until(lambda: "cannot route filesystem event" in caplog.text)

    write_run(running.root / "run", {100: 0.5})
    assert wait_until(lambda: running.names() == ["checkpoint-100"])
    assert running.daemon.observer_alive

"""Reading state files: bounded reads, files that grow, and the fast search for eval rows."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from factories import dumps, trainer_state, write_checkpoint
from hypothesis import given
from hypothesis import strategies as st

from ckpt_watch.trainer_state import _find_eval_key, parse_state, read_checkpoint


def _fstat_reporting(size: int) -> Callable[[int], os.stat_result]:
    """os.fstat as a file system that reports ``size`` whatever the file holds (procfs, FUSE)."""
    real = os.fstat

    def fstat(fd: int) -> os.stat_result:
        info = real(fd)
        return os.stat_result((*info[:6], size, *info[7:10]), {"st_mtime_ns": info.st_mtime_ns})

    return fstat


def test_reading_a_small_state_allocates_about_its_size(tmp_path: Path) -> None:
    """A 100 kB state is read without allocating anything near the 64 MiB cap."""
    evals = {step: {"eval_loss": 1.0 / step} for step in range(100, 5001, 100)}
    checkpoint = write_checkpoint(tmp_path, 5000, trainer_state(5000, evals, logging_steps=2))
    size = (checkpoint / "trainer_state.json").stat().st_size

    tracemalloc.start()
    try:
        read = read_checkpoint(checkpoint)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert read.state is not None and read.own_metrics == {"eval_loss": 1.0 / 5000}
    assert size > 100_000
    assert peak < 3 * size


def test_a_state_whose_size_fstat_cannot_tell_is_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that reports size 0 but holds a state is read to its end."""
    state = trainer_state(300, {300: {"eval_loss": 0.25}})
    checkpoint = write_checkpoint(tmp_path, 300, state)
    monkeypatch.setattr(os, "fstat", _fstat_reporting(0))

    read = read_checkpoint(checkpoint)

    assert read.error is None
    assert read.size == len(dumps(state))
    assert read.own_metrics == {"eval_loss": 0.25}


def test_a_state_that_grows_past_the_cap_while_read_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes beyond the cap that appear after fstat give the cap error, not a partial parse."""
    checkpoint = tmp_path / "checkpoint-10"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_bytes(b" " * 5000)
    monkeypatch.setattr(os, "fstat", _fstat_reporting(10))

    read = read_checkpoint(checkpoint, max_bytes=1000)

    assert read.state is None
    assert read.error == "trainer_state.json grew past the 1000 byte cap while being read"


def test_whitespace_only_state_is_an_empty_file(tmp_path: Path) -> None:
    """A state of nothing but blanks and newlines is reported as empty, not as invalid JSON."""
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_bytes(b" \n\t\r\n")

    read = read_checkpoint(checkpoint)

    assert read.error == "empty file (save interrupted or in progress)"


def test_blanks_around_a_state_do_not_matter() -> None:
    """Leading and trailing whitespace around a valid state still parse to the same values."""
    content = dumps(trainer_state(200, {200: {"eval_loss": 0.5}})).encode()

    state = parse_state(b"\n \t" + content + b"\r\n  ")

    assert state.evals == {200: {"eval_loss": 0.5}}


@given(
    data=st.binary(max_size=60).map(lambda raw: bytes(b'"eval_vx'[b % 8] for b in raw)),
    start=st.integers(min_value=0, max_value=64),
    end=st.integers(min_value=0, max_value=64),
)
def test_eval_key_search_finds_what_a_plain_search_finds(data: bytes, start: int, end: int) -> None:
    """The memchr-first search for '"eval_' returns exactly the position bytes.find returns."""
    assert _find_eval_key(data, start, end) == data.find(b'"eval_', start, end)

"""Atomic writes and the resumable work folder shared by ``prepare`` and ``embed``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protloc._fs import atomic_dir, atomic_path, resumable_dir
from protloc.errors import InputError


def test_atomic_path_leaves_the_old_file_on_error(tmp_path: Path) -> None:
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("new")
        raise RuntimeError("boom")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_dir_replaces_only_when_complete(tmp_path: Path) -> None:
    dest = tmp_path / "run"
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("boom")
    assert (dest / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_resumable_dir_keeps_work_of_the_same_job_after_an_interruption(tmp_path: Path) -> None:
    partial = tmp_path / "out.partial"
    with pytest.raises(KeyboardInterrupt), resumable_dir(partial, {"job": 1}, kind="test") as d:
        (d / "shard-0.npz").write_bytes(b"x")
        (d / ".shard-1.npz.abc.tmp").write_bytes(b"half")  # a write cut off
        raise KeyboardInterrupt
    assert (partial / "shard-0.npz").is_file()
    with resumable_dir(partial, {"job": 1}, kind="test") as d:
        assert (d / "shard-0.npz").is_file()  # kept
        assert not (d / ".shard-1.npz.abc.tmp").exists()  # the temporary is gone
    assert not partial.exists()  # success removes it


def test_resumable_dir_discards_the_work_of_another_job(tmp_path: Path, caplog) -> None:
    partial = tmp_path / "out.partial"
    with pytest.raises(KeyboardInterrupt), resumable_dir(partial, {"job": 1}, kind="test") as d:
        (d / "shard-0.npz").write_bytes(b"x")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt), resumable_dir(partial, {"job": 2}, kind="test") as d:
        assert not (d / "shard-0.npz").exists()
        assert json.loads((d / "job.json").read_text()) == {"job": 2}
        raise KeyboardInterrupt
    assert "another test job" in caplog.text


def test_resumable_dir_user_error_removes_only_a_folder_it_created(tmp_path: Path) -> None:
    partial = tmp_path / "out.partial"
    with pytest.raises(InputError), resumable_dir(partial, {"job": 1}, kind="test") as d:
        (d / "shard-0.npz").write_bytes(b"x")
        raise InputError("corrupt image", path="fov.tif")
    assert not partial.exists()  # nothing left behind by a run that failed on bad input
    with pytest.raises(KeyboardInterrupt), resumable_dir(partial, {"job": 1}, kind="test") as d:
        (d / "shard-0.npz").write_bytes(b"x")
        raise KeyboardInterrupt
    with pytest.raises(InputError), resumable_dir(partial, {"job": 1}, kind="test"):
        raise InputError("corrupt image", path="fov.tif")
    assert (partial / "shard-0.npz").is_file()  # the resumed work of an earlier attempt is not lost

"""``protloc prepare`` resumes where it stopped: finished fields of view are kept, the stores come out
identical to an uninterrupted run's (no crop lost, none written twice)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import protloc.data.prepare as prepare_mod
from protloc.data.io import CropStore, write_table, write_tiff
from protloc.data.prepare import prepare
from protloc.data.sequences import write_fasta

SEQS = {f"P{i}": "MKTAYIAKQRQISFVKSHFSRQ"[i:] + "PKKKRKV" for i in range(4)}


def _fov(rng: np.random.Generator, size: int = 300) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    nuc = np.zeros((size, size), np.float32)
    for cy in range(25, size - 15, 40):
        for cx in range(25, size - 15, 40):
            nuc[(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(9, 13) ** 2] = 1.0
    prot = np.where(nuc > 0, rng.uniform(0.1, 1.0), rng.uniform(0.1, 1.0))
    img = np.stack([nuc * 3000 + 200, prot * 2000 + 100]) + rng.normal(0, 20, (2, size, size))
    return np.clip(img, 0, 65535).astype(np.uint16)


def _world(root: Path, n_fovs: int) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n_fovs):
        p = f"P{k % 4}"
        write_tiff(root / "fovs" / f"F{k}.tif", _fov(rng), axes="CYX")
        rows.append({"fov_id": f"F{k}", "protein_id": p, "path": f"fovs/F{k}.tif", "downsample": 1})
    write_table(pd.DataFrame(rows), root / "fovs.csv")
    write_fasta(root / "seqs.fasta", SEQS)
    return root / "fovs.csv"


def _same(a: Path, b: Path) -> None:
    for name in ("cytoself", "celle"):
        x, y = CropStore.open(a / f"{name}.zarr"), CropStore.open(b / f"{name}.zarr")
        pd.testing.assert_frame_equal(x.obs, y.obs)
        for c in x.channels:
            np.testing.assert_array_equal(x[c][:], y[c][:], err_msg=f"{name}.{c}")
    for f in ("summary.json", "fovs.csv", "proteins.csv", "sequences.fasta"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


ARGS = {"progress": False}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prepare_resume")
    table = _world(root, 6)
    prepare(table, root / "ref", sequences=root / "seqs.fasta", **ARGS)
    return table, root / "ref"


def test_an_interrupted_prepare_keeps_its_finished_fields(world, tmp_path, monkeypatch, caplog) -> None:
    table, ref = world
    real, calls = prepare_mod._process_one, {"n": 0}

    def flaky(item):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(item)

    monkeypatch.setattr(prepare_mod, "_process_one", flaky)
    out = tmp_path / "prep"
    with pytest.raises(KeyboardInterrupt):
        prepare(table, out, sequences=table.parent / "seqs.fasta", **ARGS)
    partial = tmp_path / "prep.partial"
    assert not out.exists() and len(list(partial.glob("fov-*.npz"))) == 3
    monkeypatch.setattr(prepare_mod, "_process_one", real)
    with caplog.at_level("INFO", logger="protloc.data.prepare"):
        prepare(table, out, sequences=table.parent / "seqs.fasta", **ARGS)
    assert "3 of 6 fields of view were processed before" in caplog.text
    assert not partial.exists()
    _same(out, ref)


def test_changed_inputs_discard_the_kept_results(world, tmp_path, caplog) -> None:
    table, ref = world
    out = tmp_path / "prep"
    partial = tmp_path / "prep.partial"
    partial.mkdir()
    (partial / "job.json").write_text('{"fingerprint": "other inputs"}')
    (partial / "fov-0000000.npz").write_bytes(b"stale")
    with caplog.at_level("WARNING", logger="protloc.data.prepare"):
        prepare(table, out, sequences=table.parent / "seqs.fasta", **ARGS)
    assert "other inputs or settings" in caplog.text
    _same(out, ref)


def test_sigkill_with_two_workers_then_the_same_command_resumes(tmp_path: Path) -> None:
    table = _world(tmp_path, 16)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "protloc",
        "-q",
        "prepare",
        "--fovs",
        str(table),
        "--sequences",
        str(tmp_path / "seqs.fasta"),
        "--workers",
        "2",
    ]
    ref = subprocess.run([*cmd, "--out", str(tmp_path / "ref")], env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out, partial = tmp_path / "prep", tmp_path / "prep.partial"
    for kept in (2, 7):
        proc = subprocess.Popen(
            [*cmd, "--out", str(out)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        while len(list(partial.glob("fov-*.npz"))) < kept and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "prepare finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the main process and its workers, as a lost machine
        proc.wait()
        assert not out.exists()
    done = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not partial.exists()
    _same(out, tmp_path / "ref")


def test_no_resume_keeps_nothing(world, tmp_path, monkeypatch) -> None:
    table, ref = world
    real, calls = prepare_mod._process_one, {"n": 0}

    def flaky(item):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(item)

    monkeypatch.setattr(prepare_mod, "_process_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare(table, tmp_path / "prep", sequences=table.parent / "seqs.fasta", resume=False, **ARGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == []

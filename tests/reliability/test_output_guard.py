"""The output guard (``protloc._fs.check_out`` / ``check_overwrite``): no command destroys its own inputs.

An output that is, holds or lies inside one of the command's inputs (checkpoints, stores, tables, images,
embeddings) is refused in one line naming it, even with ``--overwrite``; a place whose parent is a file is
refused before any work; a second run on an output that another live process is writing is refused, and a
lock left by a killed run is cleared. Every row runs ``protloc.cli.main`` and checks that every file of
the work folder is byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from protloc import _fs
from protloc.cli import main
from protloc.data.io import CropStore, write_table, write_tiff
from protloc.pretrained import pretrained_path

SEQ = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"


@pytest.fixture(autouse=True)
def lock_dir(tmp_path, monkeypatch) -> Path:
    """Locks of this test only (the real lock folder is shared by every protloc process of the user)."""
    d = tmp_path / "locks"
    monkeypatch.setattr(_fs, "_LOCK_DIR", d)
    return d


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A work folder with a checkpoint, a crop store, embeddings, a field-of-view table and its images."""
    w = tmp_path_factory.mktemp("guard")
    for name in ("celle-tiny", "vqgan-nucleus-tiny", "vqgan-threshold-tiny", "cytoself-tiny"):
        shutil.copytree(pretrained_path(name), w / "ckpt" / name)
    rng = np.random.default_rng(0)
    (w / "fields").mkdir()
    for i in range(2):
        write_tiff(w / "fields" / f"f{i}.tif", rng.integers(0, 4000, (2, 128, 128)).astype(np.uint16))
    write_table(
        pd.DataFrame({"fov_id": ["a", "b"], "protein_id": ["P", "Q"], "path": ["f0.tif", "f1.tif"]}),
        w / "fields" / "fovs.csv",
    )
    obs = pd.DataFrame({"protein_id": ["P", "Q"], "fov_id": ["a", "b"], "split": ["test"] * 2, "label": ["x", "y"]})
    chans = {"protein": "float32", "nucleus_distance": "float32"}
    with CropStore.create(w / "cyto.zarr", channels=chans, size=100) as s:
        s.append({c: rng.random((2, 100, 100)).astype(np.float32) for c in chans}, obs)
    (w / "results").mkdir()
    (w / "results" / "emb.h5ad").write_bytes(b"embeddings the user keeps here")
    (w / "a_file").write_text("not a folder")
    (w / "earlier.yaml").write_text("my notes\n")
    (w / "mine").mkdir()
    (w / "mine" / "thesis.tex").write_text("a folder of the user's")
    return w


CK = "{w}/ckpt/celle-tiny"
CASES = [
    # (id, argv, regex the one error line must match)
    (
        "predict into its checkpoint",
        ["predict", "--checkpoint", CK, "--sequence", SEQ, "--out", CK, "--overwrite"],
        r"celle-tiny.*holds the input given as --checkpoint",
    ),
    (
        "predict inside its checkpoint",
        ["predict", "--checkpoint", CK, "--sequence", SEQ, "--out", CK + "/pred", "--overwrite"],
        r"pred.*lies inside the input given as --checkpoint",
    ),
    (
        "predict over the folder holding the checkpoint",
        ["predict", "--checkpoint", CK, "--sequence", SEQ, "--out", "{w}/ckpt", "--overwrite"],
        r"ckpt.*holds the input given as --checkpoint",
    ),
    (
        "checkpoint spelled another way",
        ["predict", "--checkpoint", CK, "--sequence", SEQ, "--out", "{w}/ckpt/../ckpt/celle-tiny/.", "--overwrite"],
        r"holds the input given as --checkpoint",
    ),
    (
        "screen into its checkpoint",
        ["screen", "--checkpoint", CK, "--sequence", SEQ, "--truncate", "5", "--out", CK, "--overwrite"],
        r"holds the input given as --checkpoint",
    ),
    (
        "prepare over its own images",
        ["prepare", "--fovs", "{w}/fields/fovs.csv", "--out", "{w}/fields", "--overwrite"],
        r"fields.*holds the input given as --fovs",
    ),
    (
        "embed onto its store",
        ["embed", "--store", "{w}/cyto.zarr", "--out", "{w}/cyto.zarr", "--overwrite"],
        r"cyto.zarr.*holds the input given as --store",
    ),
    (
        "embed into its store",
        ["embed", "--store", "{w}/cyto.zarr", "--out", "{w}/cyto.zarr/emb.h5ad", "--overwrite"],
        r"emb.h5ad.*lies inside the input given as --store",
    ),
    (
        "atlas over the folder of its embeddings",
        ["atlas", "--embeddings", "{w}/results/emb.h5ad", "--out", "{w}/results", "--overwrite"],
        r"results.*holds the input given as --embeddings",
    ),
    (
        "spectrum over the folder of its embeddings",
        ["spectrum", "--embeddings", "{w}/results/emb.h5ad", "--out", "{w}/results", "--overwrite"],
        r"results.*holds the input given as --embeddings",
    ),
    (
        "interpret into its store",
        [
            "interpret",
            "--store",
            "{w}/cyto.zarr",
            "--protein",
            "P",
            "--out",
            "{w}/cyto.zarr",
            "--overwrite",
        ],
        r"holds the input given as --store",
    ),
    (
        "output under a regular file",
        ["predict", "--checkpoint", CK, "--sequence", SEQ, "--out", "{w}/a_file/pred"],
        r"a_file is a file, not a folder",
    ),
    (
        "embed output under a regular file",
        ["embed", "--store", "{w}/cyto.zarr", "--out", "{w}/a_file/emb.h5ad"],
        r"a_file is a file, not a folder",
    ),
    (
        "--overwrite on a folder protloc did not write",
        ["predict", "--checkpoint", CK, "--sequence", SEQ, "--out", "{w}/mine", "--overwrite"],
        r"mine.*--overwrite replaces only folders protloc wrote",
    ),
    (
        "write-config over an existing file",
        ["weights", "celle-tiny", "--write-config", "{w}/earlier.yaml"],
        r"earlier.yaml.*already exists.*--overwrite",
    ),
]


@pytest.mark.parametrize("argv, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_guard_refuses(digest, ws: Path, argv, pattern, capsys, lock_dir) -> None:
    before = digest(ws)
    code = main([a.format(w=ws) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("protloc: error: "), err
    assert re.search(pattern, err[0]), err[0]
    assert digest(ws) == before  # nothing replaced, nothing added
    assert not (ws / "a_file" / "pred").exists()
    assert not list(lock_dir.glob("*.lock"))  # a refused command holds no lock


def test_write_config_overwrite_replaces_only_a_config(ws: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "recipe.yaml"
    assert main(["weights", "vqgan-nucleus-tiny", "--write-config", str(target)]) == 0
    argv = ["weights", "celle-tiny", "--write-config", str(target), "--overwrite"]
    assert main(argv) == 0  # a training config protloc wrote: replaced
    assert "num_threshold_codes" in target.read_text()
    notes = tmp_path / "notes.yaml"
    notes.write_text("my notes: keep\n")
    capsys.readouterr()
    assert main(["weights", "celle-tiny", "--write-config", str(notes), "--overwrite"]) == 2
    assert "notes.yaml: --overwrite replaces only files protloc wrote" in capsys.readouterr().err
    assert notes.read_text() == "my notes: keep\n"


def test_embed_overwrite_replaces_only_its_own_h5ad(ws: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "emb.h5ad"
    argv = ["-q", "embed", "--store", str(ws / "cyto.zarr"), "--out", str(out)]
    assert main(argv) == 0
    assert main([*argv, "--overwrite"]) == 0  # protloc's own embeddings: replaced
    mine = tmp_path / "mine.h5ad"
    mine.write_bytes(b"not embeddings")
    capsys.readouterr()
    assert main(["-q", "embed", "--store", str(ws / "cyto.zarr"), "--out", str(mine), "--overwrite"]) == 2
    assert "mine.h5ad: --overwrite replaces only files protloc wrote" in capsys.readouterr().err
    assert mine.read_bytes() == b"not embeddings"


def _lock_of(lock_dir: Path, out: Path) -> Path:
    return lock_dir / (hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:24] + ".lock")


def _write_lock(lock_dir: Path, out: Path, pid: int) -> Path:
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_of(lock_dir, out)
    lock.write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "output": str(out), "started": 0}))
    return lock


def test_a_second_run_refuses_while_the_first_writes(tmp_path, capsys, lock_dir) -> None:
    out = tmp_path / "pred"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = _write_lock(lock_dir, out, other.pid)
        code = main(["predict", "--sequence", SEQ, "--out", str(out), "--samples", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and len(err) == 1
        assert re.search(rf"pred.*another protloc run \(process {other.pid}", err[0]), err[0]
        assert lock.is_file() and not out.exists()  # the live run's lock is left alone
    finally:
        other.kill()
        other.wait()


def test_a_lock_left_by_a_killed_run_is_cleared(tmp_path, lock_dir) -> None:
    out = tmp_path / "pred"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(lock_dir, out, dead.pid)
    assert main(["predict", "--sequence", SEQ, "--out", str(out), "--samples", "1", "--steps", "1"]) == 0
    assert (out / "summary.json").is_file()
    assert not list(lock_dir.glob("*.lock"))  # released once the output is in place


def test_lock_is_released_after_a_failure_and_the_run_can_be_repeated(tmp_path, lock_dir) -> None:
    out = tmp_path / "pred"
    bad = tmp_path / "bad.fasta"
    bad.write_text(">x\nMK1\n")
    assert main(["predict", "--fasta", str(bad), "--out", str(out)]) != 0  # fails after the guard
    assert not list(lock_dir.glob("*.lock")) and not out.exists()
    argv = ["predict", "--sequence", SEQ, "--out", str(out), "--samples", "1"]
    assert main(argv) == 0
    assert (out / _fs.OUTPUT_MARKER).is_file()  # protloc's own output: --overwrite may replace it
    (out / "stale.txt").write_text("from the first run")
    assert main([*argv, "--overwrite"]) == 0  # the same output again, in the same process
    assert not (out / "stale.txt").exists() and (out / _fs.OUTPUT_MARKER).is_file()


def test_check_inputs_reads_paths_not_data(tmp_path) -> None:
    # arrays (an in-memory nucleus) and mappings (sequences as text) are not inputs on disk
    _fs.check_inputs(tmp_path / "o", {"--nucleus": np.zeros((4, 4)), "--sequences": {"a": "MK"}, "--x": None})
    with pytest.raises(_fs.InputError, match="holds the input given as --y"):
        _fs.check_inputs(tmp_path, {"--y": [np.zeros(2), str(tmp_path / "deep" / "file.txt")]})

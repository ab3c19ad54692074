"""Inputs that belong together are checked together: a wrong pair is one line naming it, nothing written.

- ``atlas --store`` of another run (the thumbnails would show other proteins' crops) is refused before the
  UMAP, naming the crop and both values;
- a cytoself crop store given where a CELL-E one is needed (``evaluate``, ``train vqgan`` / ``celle``) is
  refused (its 100 px crops also have ``protein`` and ``nucleus`` channels, so it used to give numbers).
"""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from protloc.cli import main
from protloc.data.io import CropStore

CHANNELS = {"protein": "float32", "nucleus": "float32", "nucleus_distance": "float32"}


def _store(path, proteins, fovs):
    rng = np.random.default_rng(len(proteins))
    n = len(proteins)
    obs = pd.DataFrame(
        {
            "protein_id": proteins,
            "fov_id": fovs,
            "split": (["train", "val", "test", "test"] * n)[:n],
            "label": ["x", "y"] * (n // 2),
        }
    )
    with CropStore.create(path, channels=CHANNELS, size=100) as w:
        w.append({c: rng.random((n, 100, 100)).astype(np.float32) for c in CHANNELS}, obs)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("mismatch")
    _store(w / "a.zarr", ["P1", "P2"] * 4, [f"F{i}" for i in range(8)])
    _store(w / "b.zarr", ["Q1", "Q2"] * 4, [f"F{i}" for i in range(8)])
    _store(w / "small.zarr", ["P1", "P2"], ["F0", "F1"])
    (w / "sequences.fasta").write_text("".join(f">{p}\nMKTAYIAKQRQ\n" for p in ("P1", "P2", "Q1", "Q2")))
    assert main(["-q", "embed", "--store", str(w / "a.zarr"), "--out", str(w / "a.h5ad")]) == 0
    old = ad.read_h5ad(w / "a.h5ad")
    del old.uns["cytoself"]["store_fingerprint"]  # as protloc wrote them before fingerprints
    old.write_h5ad(w / "old.h5ad")
    return w


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("protloc: error: "), err
    return err[0]


@pytest.mark.parametrize(
    "embeddings, store, pattern",
    [
        # the fingerprint protloc embed records names the store the embeddings came from
        ("a.h5ad", "b.zarr", r"b.zarr: this store is not the one the embeddings .*a.h5ad.* came from \(.*a.zarr\)"),
        ("a.h5ad", "small.zarr", r"small.zarr: this store is not the one the embeddings .*a.h5ad.* came from"),
        # embeddings without a fingerprint (older protloc): the rows themselves are compared
        ("old.h5ad", "b.zarr", r"b.zarr: this store is not the one .*old.h5ad.* crop 0 is protein_id 'Q1'"),
        ("old.h5ad", "small.zarr", r"small.zarr: this store has 2 crops but the embeddings .*old.h5ad.* refer to crop"),
    ],
)
def test_atlas_refuses_a_store_of_another_run(world, tmp_path, capsys, embeddings, store, pattern):
    capsys.readouterr()
    argv = ["atlas", "--embeddings", str(world / embeddings), "--store", str(world / store), "--split", "all"]
    assert main([*argv, "--out", str(tmp_path / "atlas")]) == 2
    assert re.search(pattern, _one_line(capsys))
    assert not (tmp_path / "atlas").exists()


def test_atlas_accepts_its_own_store(world, tmp_path):
    argv = ["-q", "atlas", "--embeddings", str(world / "a.h5ad"), "--store", str(world / "a.zarr"), "--split", "all"]
    assert main([*argv, "--out", str(tmp_path / "atlas")]) == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "--store", "{w}/a.zarr", "--max-crops", "2", "--no-baseline"],
        ["train", "vqgan", "--kind", "nucleus", "--store", "{w}/a.zarr"],
        ["train", "celle", "--store", "{w}/a.zarr"],
    ],
    ids=["evaluate", "train vqgan", "train celle"],
)
def test_a_cytoself_store_is_not_a_celle_store(world, tmp_path, capsys, argv):
    capsys.readouterr()
    assert main([*(a.format(w=world) for a in argv), "--out", str(tmp_path / "o")]) == 2
    line = _one_line(capsys)
    # training already refused it by its channels (no threshold); evaluate and the nucleus tokenizer did not
    assert re.search(r"a.zarr: (this is a cytoself crop store .*not a CELL-E one|the store lacks .*threshold)", line)
    assert not (tmp_path / "o").exists()

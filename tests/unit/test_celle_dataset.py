"""CelleDataset: paired images + sequence windows, identical augmentation of both images, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from protloc.data.datasets import CelleDataset, CropBatchSampler, hash_uniform
from protloc.data.io import CropStore
from protloc.errors import InputError

S = 32
SEQS = {"P0": "MKT" * 5, "P1": "ACDEFGHIKLMNPQRSTVWY" * 3, "P2": "M" + "PKKKRKV" * 2}


def _make_store(path: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:S, :S]
    # An asymmetric nucleus blob (so flips are visible) and a protein image correlated with it.
    nucleus = np.stack([np.exp(-((yy - 8 - i % 5) ** 2 + (xx - 20) ** 2) / 20.0) for i in range(n)])
    protein = np.clip(nucleus * 0.8 + rng.random((n, S, S)) * 0.2, 0, 1)
    threshold = (protein >= protein.mean(axis=(1, 2), keepdims=True)).astype(np.uint8)
    obs = pd.DataFrame({"protein_id": [f"P{i % 3}" for i in range(n)], "split": ["train"] * 8 + ["val"] * 4})
    with CropStore.create(
        path, channels={"nucleus": "float32", "protein": "float32", "threshold": "uint8"}, size=S, chunk=4
    ) as w:
        w.append(
            {"nucleus": nucleus.astype(np.float32), "protein": protein.astype(np.float32), "threshold": threshold}, obs
        )
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return _make_store(tmp_path_factory.mktemp("celle") / "celle.zarr")


def test_items_shapes_and_stored_threshold(store):
    ds = CelleDataset(store, split="train", sequences=SEQS, image_size=S, max_residues=64)
    assert len(ds) == 8
    item = ds[0]
    assert item["nucleus"].shape == (1, S, S) and item["threshold"].shape == (1, S, S)
    assert set(torch.unique(item["threshold"]).tolist()) <= {0.0, 1.0}
    assert item["sequence"] == SEQS["P0"] and bool(item["add_end"]) and int(item["seq_start"]) == 0
    raw = CropStore.open(store)
    np.testing.assert_array_equal(item["threshold"][0].numpy(), np.asarray(raw["threshold"][0], dtype=np.float32))


def test_resize_recomputes_mean_threshold(store):
    ds = CelleDataset(store, split="val", sequences=SEQS, image_size=16, with_protein=True)
    b = ds.read_batch([0, 1])
    prot = b["protein"]
    expected = (prot >= prot.mean(dim=(-2, -1), keepdim=True)).float()
    assert torch.equal(b["threshold"], expected) and b["nucleus"].shape == (2, 1, 16, 16)


def test_augmentation_same_flip_and_crop_for_both_images(store):
    plain = CelleDataset(store, split="train", sequences=SEQS, image_size=24, crop_size=24, with_protein=True)
    aug = CelleDataset(
        store, split="train", sequences=SEQS, image_size=24, crop_size=24, augment=True, with_protein=True, seed=3
    )
    b = aug.read_batch(np.arange(8))
    # The threshold is recomputed from the same (cropped, flipped) protein image, and both images
    # moved together: the protein image stays correlated with the nucleus pixel by pixel.
    assert torch.equal(b["threshold"], (b["protein"] >= b["protein"].mean(dim=(-2, -1), keepdim=True)).float())
    for j in range(8):
        corr = np.corrcoef(b["nucleus"][j].flatten().numpy(), b["protein"][j].flatten().numpy())[0, 1]
        assert corr > 0.9
    # Augmentation changed something, and evaluation (centre crop, no flip) is deterministic.
    assert not torch.equal(b["nucleus"], plain.read_batch(np.arange(8))["nucleus"])
    assert torch.equal(plain.read_batch([2])["nucleus"], plain.read_batch([2])["nucleus"])
    # Same (seed, epoch) -> same draw; another epoch -> another draw.
    assert torch.equal(aug.read_batch([5])["nucleus"], aug.read_batch([5])["nucleus"])
    draws = set()
    for e in range(6):
        aug.set_epoch(e)
        draws.add(aug.read_batch([5])["nucleus"].numpy().tobytes())
    assert len(draws) > 1


def test_sequence_windows_random_in_training_fixed_in_eval(store):
    seqs = {**SEQS, "P1": "".join(np.random.default_rng(1).choice(list("ACDEFGHIKLMNPQRSTVWY"), 100))}
    ev = CelleDataset(store, split="train", sequences=seqs, image_size=S, max_residues=40)
    b = ev.read_batch(np.arange(8))
    p1 = [j for j, p in enumerate(b["protein_id"]) if p == "P1"]
    for j in p1:
        assert b["sequence"][j] == seqs["P1"][:40] and not bool(b["add_end"][j]) and int(b["seq_start"][j]) == 0
    tr = CelleDataset(store, split="train", sequences=seqs, image_size=S, max_residues=40, augment=True)
    starts = set()
    for e in range(8):
        tr.set_epoch(e)
        bb = tr.read_batch(p1)
        for j, s in enumerate(bb["seq_start"].tolist()):
            assert bb["sequence"][j] == seqs["P1"][s : s + 40]
            assert not bool(bb["add_end"][j])  # a full-length window leaves no room for the end token
            starts.add(s)
    assert len(starts) > 2


def test_end_token_only_when_it_fits(store):
    seqs = {"P0": "A" * 10, "P1": "C" * 9, "P2": "D" * 3}
    ds = CelleDataset(store, split="train", sequences=seqs, image_size=S, max_residues=10)
    b = ds.read_batch(np.arange(8))
    ends = {p: bool(e) for p, e in zip(b["protein_id"], b["add_end"], strict=True)}
    assert ends == {"P0": False, "P1": True, "P2": True}


def test_missing_sequence_names_protein(store):
    with pytest.raises(InputError, match="P2"):
        CelleDataset(store, split="train", sequences={"P0": "MK", "P1": "MK"}, image_size=S)


def test_loader_with_sampler_and_workers_agree(store):
    ds = CelleDataset(store, split="train", sequences=SEQS, image_size=16, augment=True, seed=1)
    sampler = CropBatchSampler(ds, 4, shuffle="chunks", window=2, seed=0)
    a = [b["nucleus"] for b in DataLoader(ds, batch_sampler=sampler, num_workers=0)]
    b = [b["nucleus"] for b in DataLoader(ds, batch_sampler=sampler, num_workers=2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_hash_uniform_streams():
    u = hash_uniform(0, 0, np.arange(1000), salt=1)
    v = hash_uniform(0, 0, np.arange(1000), salt=2)
    assert ((u >= 0) & (u < 1)).all() and abs(u.mean() - 0.5) < 0.05 and not np.allclose(u, v)

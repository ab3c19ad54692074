"""Tests for protloc.data.datasets: lazy crop datasets, D4 augmentation, chunk-aware batching."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from protloc.data.datasets import (
    CropBatchSampler,
    CropDataset,
    apply_d4,
    d4_codes,
    make_label_map,
)
from protloc.data.io import CropStore
from protloc.errors import InputError

S = 12
N = 100
CHUNK = 16


def _obs(n: int) -> pd.DataFrame:
    split = np.array(["train", "train", "train", "val", "test"])[np.arange(n) % 5]
    return pd.DataFrame(
        {
            "protein_id": [f"P{(i * 7) % 6}" for i in range(n)],
            "fov_id": [f"f{i // 10}" for i in range(n)],
            "split": split,
        }
    )


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds") / "crops.zarr"
    rng = np.random.default_rng(0)
    protein = rng.random((N, S, S)).astype(np.float32)
    with CropStore.create(
        path, channels={"protein": "float16", "nucleus": "float16", "nucleus_distance": "float16"}, size=S, chunk=CHUNK
    ) as writer:
        # crop i of "nucleus" is filled with i / N so that a crop's identity is visible in its pixels
        nucleus = np.broadcast_to((np.arange(N) / N)[:, None, None], (N, S, S)).astype(np.float32)
        writer.append({"protein": protein, "nucleus": nucleus, "nucleus_distance": 2 * protein - 1}, _obs(N))
    return path


@pytest.fixture(scope="module")
def store(store_path):
    return CropStore.open(store_path)


def test_items_are_float32_in_channel_order(store):
    label_map = make_label_map(store.obs)
    ds = CropDataset(store, split="train", channels=("nucleus_distance", "protein"), label_map=label_map)
    assert len(ds) == int((store.obs["split"] == "train").sum())
    item = ds[3]
    assert set(item) == {"image", "label", "index"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (2, S, S)
    assert item["label"].dtype == torch.int64 and item["index"].dtype == torch.int64
    crop = int(item["index"])
    assert store.obs["split"].iloc[crop] == "train"
    expected = np.stack([store["nucleus_distance"][crop], store["protein"][crop]]).astype(np.float32)
    np.testing.assert_array_equal(item["image"].numpy(), expected)
    assert int(item["label"]) == label_map[store.obs["protein_id"].iloc[crop]]


def test_label_map_is_sorted_training_proteins(store):
    obs = store.obs.copy()
    obs.loc[obs["split"] == "val", "protein_id"] = "ZZZ_only_in_val"
    label_map = make_label_map(obs)
    assert list(label_map) == sorted(label_map)
    assert list(label_map.values()) == list(range(len(label_map)))
    assert "ZZZ_only_in_val" not in label_map
    assert make_label_map(obs, split=None)["ZZZ_only_in_val"] == len(label_map)
    with pytest.raises(InputError, match="no crops in split 'nope'"):
        make_label_map(obs, split="nope")


def test_unknown_proteins_and_no_label_map_give_minus_one(store):
    ds = CropDataset(store, split="val", channels=("protein",), label_map={"P1": 0})
    labels = ds.labels
    pids = store.obs["protein_id"].to_numpy()[ds.crop_index]
    assert np.all(labels[pids == "P1"] == 0) and np.all(labels[pids != "P1"] == -1)
    ds = CropDataset(store, split=None, channels=("protein",), label_map=None)
    assert len(ds) == N and np.all(ds.labels == -1)


def test_missing_channel_and_empty_split_name_the_store(store, store_path):
    with pytest.raises(InputError, match=re.escape(str(store_path)) + r".*'membrane'"):
        CropDataset(store, split="train", channels=("protein", "membrane"), label_map=None)
    with pytest.raises(InputError, match=re.escape(str(store_path)) + r".*no crops in split 'holdout'"):
        CropDataset(store_path, split="holdout", channels=("protein",), label_map=None)


def test_store_without_split_column(tmp_path):
    path = tmp_path / "nosplit.zarr"
    with CropStore.create(path, channels={"protein": "float32"}, size=4) as writer:
        writer.append({"protein": np.zeros((3, 4, 4))}, pd.DataFrame({"protein_id": ["a", "b", "c"]}))
    with pytest.raises(InputError, match="no 'split' column"):
        CropDataset(path, split="train", channels=("protein",), label_map=None)
    assert len(CropDataset(path, split=None, channels=("protein",), label_map=None)) == 3


def test_getitems_matches_getitem_in_request_order(store):
    for cache in (0, 3, "all"):
        ds = CropDataset(store, split=None, channels=("protein", "nucleus"), label_map=None, cache_chunks=cache)
        order = [57, 3, 99, 3, 16, 15, 0]
        items = ds.__getitems__(order)
        assert [int(it["index"]) for it in items] == order
        for pos, item in zip(order, items, strict=True):
            np.testing.assert_array_equal(item["image"].numpy(), ds[pos]["image"].numpy())
        batch = ds.read_batch(order)
        assert batch["image"].shape == (len(order), 2, S, S)
        np.testing.assert_allclose(batch["image"][:, 1, 0, 0].numpy(), np.array(order) / N, atol=1e-3)
    with pytest.raises(IndexError):
        ds[N]


def test_cache_all_keeps_every_chunk_after_one_pass(store):
    ds = CropDataset(store, split=None, channels=("protein", "nucleus"), label_map=None, cache_chunks="all")
    n_chunks = -(-N // ds.chunk_size)
    assert ds.cache_chunks == n_chunks
    first = ds.read_batch(np.random.default_rng(0).permutation(N))
    assert len(ds._cache) == 2 * n_chunks  # both channels of every chunk
    again = ds.read_batch(np.arange(N))
    order = np.argsort(first["index"].numpy())
    np.testing.assert_array_equal(first["image"].numpy()[order], again["image"].numpy())
    with pytest.raises(ValueError, match="'all'"):
        CropDataset(store, split=None, channels=("protein",), label_map=None, cache_chunks=-1)


def test_d4_codes_are_uniform_and_reproducible():
    codes = d4_codes(0, 0, np.arange(80_000))
    counts = np.bincount(codes, minlength=8)
    assert counts.min() > 0.95 * 10_000 and counts.max() < 1.05 * 10_000
    np.testing.assert_array_equal(codes[[5, 17]], d4_codes(0, 0, [5, 17]))
    assert (d4_codes(0, 1, np.arange(1000)) != codes[:1000]).mean() > 0.8
    assert (d4_codes(1, 0, np.arange(1000)) != codes[:1000]).mean() > 0.8


def test_apply_d4_gives_the_eight_distinct_symmetries():
    img = np.arange(2 * 5 * 5, dtype=np.float32).reshape(1, 2, 5, 5)
    variants = [apply_d4(img, [k])[0] for k in range(8)]
    assert len({v.tobytes() for v in variants}) == 8
    np.testing.assert_array_equal(variants[0], img[0])
    np.testing.assert_array_equal(variants[1], np.rot90(img[0], 1, axes=(1, 2)))
    np.testing.assert_array_equal(variants[4], img[0][..., ::-1])
    # channels move together: the same transform for every channel of a crop
    np.testing.assert_array_equal(variants[6][1] - variants[6][0], np.full((5, 5), 25.0))


def test_augmentation_reaches_all_eight_variants(store):
    ds = CropDataset(store, split="train", channels=("protein",), label_map=None, augment=True, seed=3)
    plain = CropDataset(store, split="train", channels=("protein",), label_map=None)
    original = plain[0]["image"].numpy()
    expected = {apply_d4(original[None], [k])[0].tobytes() for k in range(8)}
    seen = set()
    for epoch in range(64):
        ds.set_epoch(epoch)
        seen.add(ds[0]["image"].numpy().tobytes())
    assert seen == expected
    # reproducible: the same (seed, epoch, crop) gives the same image whatever the batch
    ds.set_epoch(5)
    alone = ds[2]["image"]
    in_batch = ds.__getitems__([7, 2, 0])[1]["image"]
    assert torch.equal(alone, in_batch)


def test_subset_keeps_labels_and_augmentation(store):
    ds = CropDataset(store, split="train", channels=("protein",), label_map=make_label_map(store.obs), augment=True)
    sub = ds.subset(ds.labels == 0)
    assert len(sub) == int((ds.labels == 0).sum()) and np.all(sub.labels == 0)
    assert sub.augment and torch.equal(sub[0]["image"], ds[int(np.flatnonzero(ds.labels == 0)[0])]["image"])


def test_pickles_and_works_in_worker_processes(store):
    ds = CropDataset(
        store, split="train", channels=("protein", "nucleus"), label_map=None, augment=True, cache_chunks=2
    )
    ds.read_batch([0, 1])  # opens arrays and fills the cache, which must not travel
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._arrays is None and not clone._cache
    assert torch.equal(clone[4]["image"], ds[4]["image"])
    sampler = CropBatchSampler(ds, 8, shuffle="chunks", window=2, seed=1)
    ref = [ds.read_batch(b) for b in sampler]
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2)
    got = list(loader)
    assert len(got) == len(ref)
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])


def test_sampler_orders(store):
    ds = CropDataset(store, split="train", channels=("protein",), label_map=None)
    n = len(ds)
    for mode in ("chunks", "random", "none"):
        sampler = CropBatchSampler(ds, 7, shuffle=mode, window=2, seed=0)
        batches = list(sampler)
        assert len(batches) == len(sampler) == -(-n // 7)
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(n))  # every item once per epoch
    assert np.array_equal(np.concatenate(list(CropBatchSampler(ds, 7, shuffle="none"))), np.arange(n))
    # chunk-shuffled: a batch spans at most two windows of chunks
    sampler = CropBatchSampler(ds, 8, shuffle="chunks", window=2, seed=0)
    for batch in sampler:
        assert len(np.unique(ds.crop_index[batch] // CHUNK)) <= 4
    # reproducible per (seed, epoch), different across epochs
    a, b = list(sampler), list(sampler)
    assert a == b
    sampler.set_epoch(1)
    assert list(sampler) != a
    sampler.set_epoch(0, start_batch=3)
    assert list(sampler) == a[3:]
    assert list(sampler) == a  # start_batch applies to one iteration only
    assert all(len(x) == 8 for x in CropBatchSampler(ds, 8, drop_last=True))


def test_sampler_replicas_partition_batches(store):
    ds = CropDataset(store, split=None, channels=("protein",), label_map=None)
    full = list(CropBatchSampler(ds, 10, shuffle="random", seed=4))
    parts = [list(CropBatchSampler(ds, 10, shuffle="random", seed=4, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(p) for p in parts}) == 1
    assert [b for i in range(len(parts[0])) for p in parts for b in [p[i]]] == full[: 3 * len(parts[0])]

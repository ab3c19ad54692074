from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from protloc.data.io import CropStore
from protloc.data.world.compartments import COMPARTMENTS
from protloc.errors import ConfigError, InputError
from protloc.eval.compartments import (
    CompartmentClassifier,
    _augment,
    agreement_table,
    classify,
    train_compartment_classifier,
)

S = 32


def _store(path, n_per: int = 12):
    """Crops of 4 proteins: P0/P1 nucleoplasm (threshold = the nucleus), P2/P3 plasma membrane (a ring
    far outside it); splits train (P0, P2) and val (P1, P3)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:S, :S]
    nucs, prots, thrs, pids, splits = [], [], [], [], []
    for k, (pid, split) in enumerate([("P0", "train"), ("P1", "val"), ("P2", "train"), ("P3", "val")]):
        for _ in range(n_per):
            cy, cx = rng.uniform(12, 20, size=2)
            r = np.hypot(yy - cy, xx - cx)
            nuc = np.exp(-(r**2) / 30.0)
            thr = (r < 6) if k < 2 else ((r > 11) & (r < 14))
            nucs.append(nuc)
            prots.append(thr * 0.8 + 0.1)
            thrs.append(thr.astype(np.uint8))
            pids.append(pid)
            splits.append(split)
    channels = {"nucleus": "float16", "protein": "float16", "threshold": "uint8"}
    with CropStore.create(path, channels=channels, size=S, chunk=8) as w:
        w.append(
            {"nucleus": np.stack(nucs), "protein": np.stack(prots), "threshold": np.stack(thrs)},
            pd.DataFrame({"protein_id": pids, "split": splits}),
        )
    return path


LABELS = {"P0": "nucleoplasm", "P1": "nucleoplasm", "P2": "plasma_membrane", "P3": "plasma_membrane"}


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = CompartmentClassifier()
    model(torch.rand(3, 2, S, S)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 146_924
    for side in (16, 24, 64):  # any multiple of 8 (the features are averaged over the image)
        assert model(torch.rand(2, 2, side, side)).shape == (2, len(COMPARTMENTS))
    with pytest.raises(InputError, match="nucleus, threshold"):
        model(torch.rand(3, 1, S, S))


def test_augment_turns_both_channels_alike_per_image() -> None:
    x = torch.rand(64, 1, 8, 8).repeat(1, 2, 1, 1)
    out = _augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0], out[:, 1])  # the same transform for the nucleus and the threshold
    d4 = [torch.rot90(v, k, dims=(-2, -1)) for v in (x[:, 0], x[:, 0].flip(-1)) for k in range(4)]
    which = [next(c for c in range(8) if torch.equal(out[i, 0], d4[c][i])) for i in range(64)]
    assert len(set(which)) > 4  # drawn per image, not once per batch


def test_learns_separable_compartments_deterministically(tmp_path) -> None:
    store = _store(tmp_path / "celle.zarr", n_per=32)
    kw = dict(labels=LABELS, image_size=S, epochs=10, batch_size=16, lr=5e-3, seed=0, progress=False)
    model, info = train_compartment_classifier(store, **kw)
    assert info["crops"] == 64 and info["proteins"] == 2 and info["class_counts"]["nucleoplasm"] == 32
    assert len(info["train_loss"]) == 10 and len(info["val_accuracy"]) == 10
    opened = CropStore.open(store)
    val = opened.obs["split"].to_numpy() == "val"
    crops = opened.read(np.flatnonzero(val), ["nucleus", "threshold"])
    nuc = torch.from_numpy(crops["nucleus"].astype(np.float32))[:, None]
    thr = torch.from_numpy(crops["threshold"].astype(np.float32))[:, None]
    probs = classify(model, nuc, thr)
    pids = opened.obs["protein_id"].astype(str).to_numpy()[val].tolist()
    table = agreement_table(probs, pids, LABELS)
    assert table["agreement"] > 0.8, table  # chance over the two classes is 0.5, over twelve 0.08
    again, _ = train_compartment_classifier(store, **kw)
    np.testing.assert_allclose(classify(again, nuc, thr), probs, atol=1e-6)
    # soft targets from weights are accepted; weights of the wrong size are refused
    w = {p: np.eye(len(COMPARTMENTS))[COMPARTMENTS.index(c)] for p, c in LABELS.items()}
    train_compartment_classifier(store, weights=w, **{**kw, "epochs": 1})
    with pytest.raises(InputError, match="'P0'.*12 non-negative"):
        train_compartment_classifier(store, weights={"P0": np.ones(3)}, **{**kw, "epochs": 1})


def test_unlabelled_split_and_bad_shapes_are_refused(tmp_path) -> None:
    store = _store(tmp_path / "celle.zarr", n_per=2)
    with pytest.raises(InputError, match="no crop of split 'train' has a labelled protein"):
        train_compartment_classifier(store, labels={"P1": "nucleoplasm"}, image_size=S, progress=False)
    with pytest.raises(InputError, match="no crop in split 'test'"):
        train_compartment_classifier(store, labels=LABELS, split="test", image_size=S, progress=False)
    with pytest.raises(InputError, match="unknown compartment 'nucleus'"):
        train_compartment_classifier(store, labels={**LABELS, "P0": "nucleus"}, image_size=S, progress=False)
    with pytest.raises(InputError, match=r"\[N, 1, S, S\]"):
        classify(CompartmentClassifier(), torch.rand(2, 1, S, S), torch.rand(3, 1, S, S))
    with pytest.raises(InputError, match=r"\[N, 1, S, S\]"):
        classify(CompartmentClassifier(), torch.rand(2, 2, S, S), torch.rand(2, 2, S, S))
    with pytest.raises(ConfigError, match="multiple of 8"):
        train_compartment_classifier(store, labels=LABELS, image_size=20, progress=False)


def test_agreement_table_arithmetic() -> None:
    nuc, pm, mito = (COMPARTMENTS.index(c) for c in ("nucleoplasm", "plasma_membrane", "mitochondria"))
    calls = [nuc, nuc, pm, mito, mito]
    pred = np.eye(len(COMPARTMENTS))[calls]
    pids = ["A", "A", "A", "B", "C"]
    labels = {"A": "nucleoplasm", "B": "plasma_membrane", "C": "mitochondria"}
    t = agreement_table(pred, pids, labels)
    # A: 2 of 3 images right; B: 0 of 1; C: 1 of 1 -> over proteins (2/3 + 0 + 1) / 3, over images 3/5
    assert t["agreement"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert t["agreement_images"] == pytest.approx(0.6) and t["n_images"] == 5 and t["n_proteins"] == 3
    assert t["per_compartment"]["nucleoplasm"] == {"agreement": pytest.approx(2 / 3), "n_proteins": 1}
    assert t["per_compartment"]["plasma_membrane"]["agreement"] == 0.0
    conf = np.array(t["confusion"])
    assert conf[nuc, nuc] == 2 and conf[nuc, pm] == 1 and conf[pm, mito] == 1 and conf[mito, mito] == 1
    assert conf.sum() == 5
    with pytest.raises(InputError, match="'D' has no label"):
        agreement_table(pred, ["A", "A", "A", "B", "D"], labels)
    with pytest.raises(InputError, match="unknown compartment 'nucleus'"):
        agreement_table(pred, pids, {**labels, "C": "nucleus"})
    with pytest.raises(InputError, match=r"pred must be \[4, 12\]"):
        agreement_table(pred, pids[:4], labels)

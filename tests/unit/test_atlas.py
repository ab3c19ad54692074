"""Atlas metrics: clustering score, leave-protein-out k-NN, and the AnnData entry point."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from protloc.analysis.atlas import atlas, clustering_score, knn_macro_f1, protein_level_table


def _blobs(n_classes: int = 5, per: int = 80, spread: float = 10.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, 2)) * spread
    y = np.repeat(np.arange(n_classes), per)
    x = centres[y] + rng.normal(size=(len(y), 2))
    return x, np.array([f"c{i}" for i in y], dtype=object)


def _proteins(n_prot: int = 60, per: int = 8, n_loc: int = 4, dim: int = 32, loc_signal: float = 0.0, seed: int = 0):
    """Each protein a tight cluster at a random position; ``loc_signal`` pulls it towards its class."""
    rng = np.random.default_rng(seed)
    prot = np.repeat(np.arange(n_prot), per)
    loc_of_prot = np.arange(n_prot) % n_loc
    loc_centre = rng.normal(size=(n_loc, dim)) * 5
    prot_centre = rng.normal(size=(n_prot, dim)) * 5 + loc_signal * loc_centre[loc_of_prot]
    x = prot_centre[prot] + 0.05 * rng.normal(size=(len(prot), dim))
    labels = np.array([f"loc{i}" for i in loc_of_prot[prot]], dtype=object)
    return x, labels, np.array([f"P{i}" for i in prot], dtype=object)


# -------------------------------------------------------------------------------- clustering score


def test_clustering_score_separated_beats_mixed():
    x, y = _blobs()
    good = clustering_score(x, y)
    mixed = clustering_score(x, np.random.default_rng(1).permutation(y))
    assert good > 3.0
    assert mixed < 0.5
    assert good > 10 * mixed


def test_clustering_score_matches_hand_computation():
    # class a: (0,0),(2,0),(1,0) -> centre (1,0), distances 1,1,0 -> size 1
    # class b: (10,0),(10,4),(10,2) -> centre (10,2), distances 2,2,0 -> size 2
    # class c: (0,10),(0,12) -> centre (0,11), distances 1,1 -> size 1
    x = np.array([[0, 0], [2, 0], [1, 0], [10, 0], [10, 4], [10, 2], [0, 10], [0, 12]], float)
    y = ["a", "a", "a", "b", "b", "b", "c", "c"]
    centres = np.array([[1, 0], [10, 2], [0, 11]], float)
    med = np.median(centres, axis=0)  # (1, 2)
    spread = np.median(np.linalg.norm(centres - med, axis=1))
    assert clustering_score(x, y) == pytest.approx(spread / 1.0)


def test_clustering_score_invariant_to_translation_and_scale():
    x, y = _blobs(seed=3)
    s = clustering_score(x, y)
    assert clustering_score(x * 7.5 + np.array([100.0, -3.0]), y) == pytest.approx(s, rel=1e-10)


def test_clustering_score_excludes_unlabelled_and_small_classes():
    x, y = _blobs(n_classes=3, seed=2)
    base = clustering_score(x, y)
    rng = np.random.default_rng(0)
    noise = rng.uniform(-100, 100, size=(200, 2))
    x2 = np.vstack([x, noise, [[500.0, 500.0]]])
    y2 = np.concatenate([y, np.array([""] * 100 + [None] * 100 + ["single"], dtype=object)])
    assert clustering_score(x2, y2) == pytest.approx(base)
    with pytest.raises(ValueError, match="at least 2 classes"):
        clustering_score(x, np.array(["a"] * len(x)))
    with pytest.raises(ValueError):
        clustering_score(x, np.array([""] * len(x)))


def test_clustering_score_by_group_uses_group_medians():
    x, y = _blobs(n_classes=4, per=40, seed=5)
    groups = np.array([f"{lab}-{i % 5}" for i, lab in enumerate(y)], dtype=object)
    s = clustering_score(x, y, groups=groups)
    assert np.isfinite(s) and s > 3.0
    # every point of a group must share a label
    bad = groups.copy()
    bad[0] = groups[-1]
    with pytest.raises(ValueError, match="several labels"):
        clustering_score(x, y, groups=bad)


# -------------------------------------------------------------------------------- k-NN


def test_knn_perfect_on_separable_data():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 50)
    x = 10.0 * np.eye(8)[y] + rng.normal(size=(len(y), 8))  # classes along different axes
    y = np.array([f"c{i}" for i in y], dtype=object)
    groups = np.arange(len(y)) // 5  # 10 groups per class, all within one class
    for metric in ("euclidean", "cosine"):
        r = knn_macro_f1(x, y, groups, k=5, metric=metric)
        assert r["macro_f1"] == pytest.approx(1.0)
        assert r["accuracy"] == pytest.approx(1.0)
        assert r["n"] == len(y) and r["n_classes"] == 4
        assert set(r["per_class_f1"]) == {"c0", "c1", "c2", "c3"}


def test_knn_excluding_same_protein_matters():
    # Proteins are tight clusters at random positions: identity is trivially recoverable, but the
    # localization signal is weak, so leave-protein-out must score far lower.
    x, y, p = _proteins(loc_signal=0.0)
    with_own = knn_macro_f1(x, y, p, k=5, exclude_same_group=False)
    without = knn_macro_f1(x, y, p, k=5)
    assert with_own["macro_f1"] == pytest.approx(1.0)
    assert without["macro_f1"] < 0.6
    assert without["exclude_same_group"] and not with_own["exclude_same_group"]
    # and with a real localization signal, leave-protein-out recovers it
    x, y, p = _proteins(loc_signal=3.0)
    assert knn_macro_f1(x, y, p, k=5)["macro_f1"] > 0.9


def test_knn_blocks_and_weighting_agree():
    x, y, p = _proteins(loc_signal=1.0, seed=4)
    a = knn_macro_f1(x, y, p, k=7, metric="euclidean")
    b = knn_macro_f1(x, y, p, k=7, metric="euclidean", block_size=13)
    assert a == b
    w = knn_macro_f1(x, y, p, k=7, weighted=True)
    assert 0.0 <= w["macro_f1"] <= 1.0 and w["weighted"]


def test_knn_drops_unlabelled_and_single_protein_classes():
    x, y, p = _proteins(loc_signal=3.0)
    y = y.copy()
    y[:8] = ""  # protein P0 unlabelled
    y[8:16] = "lonely"  # a class with a single protein
    r = knn_macro_f1(x, y, p, k=5)
    assert "lonely" not in r["per_class_f1"] and "" not in r["per_class_f1"]
    assert r["n"] == len(y) - 16


# -------------------------------------------------------------------------------- AnnData


def _adata(n_prot: int = 40, per: int = 5, seed: int = 0):
    import anndata as ad

    x, y, p = _proteins(n_prot=n_prot, per=per, n_loc=4, dim=24, loc_signal=3.0, seed=seed)
    n = len(y)
    y = y.copy()
    y[p == "P1"] = ""
    obs = pd.DataFrame(
        {
            "crop_index": np.arange(n),
            "protein_id": p,
            "fov_id": [f"f{i // 3}" for i in range(n)],
            "split": np.where(np.arange(n) % 5 == 0, "train", "test"),
            "label": y,
        },
        index=[str(i) for i in range(n)],
    )
    a = ad.AnnData(X=np.zeros((n, 0), dtype=np.float32), obs=obs)
    a.obsm["global"] = x.astype(np.float32)
    return a


def test_atlas_end_to_end_on_adata(tmp_path):
    # The only test that runs UMAP (numba JIT): ~200 points.
    a = _adata(n_prot=50, per=5)
    res = atlas(a, split="test", complexes={f"P{i}": f"cx{i % 3}" for i in range(0, 50, 2)})
    test = (a.obs["split"] == "test").to_numpy()
    assert res["n_crops"] == test.sum() == 200
    xy = a.obsm["X_umap"]
    assert xy.shape == (a.n_obs, 2)
    assert np.isfinite(xy[test]).all() and np.isnan(xy[~test]).all()
    cs = res["clustering_score"]
    assert set(cs) == {"localization", "localization_by_protein", "complex", "complex_by_protein"}
    assert cs["localization"] > 1.0
    assert res["knn"]["features"]["macro_f1"] > 0.9
    assert 0.0 <= res["knn"]["umap"]["macro_f1"] <= 1.0
    assert a.uns["atlas"] is res
    table = protein_level_table(a)
    assert len(table) == 50 and (table["n_crops"] == 4).all()
    assert {"n_fovs", "label", "x", "y"} <= set(table.columns)
    # the results survive an h5ad round trip (plain types only)
    a.write_h5ad(tmp_path / "a.h5ad")


def test_atlas_rejects_unknown_split():
    a = _adata(n_prot=8, per=3)
    with pytest.raises(ValueError, match="no crops in split"):
        atlas(a, split="validation")
    with pytest.raises(ValueError, match="not found in adata.obsm"):
        atlas(a, split="test", use_rep="nope")

"""Feature spectra: histograms, vectorised correlation, biclustering, family consensus."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from protloc.analysis.spectrum import (
    bicluster,
    consensus_spectra,
    family_correlation,
    feature_correlation,
    feature_spectra,
    roman,
    spectra_from_indices,
)


def _adata(indices: np.ndarray, proteins: list[str], k: int):
    import anndata as ad

    n = len(proteins)
    obs = pd.DataFrame({"protein_id": proteins, "label": [""] * n}, index=[str(i) for i in range(n)])
    a = ad.AnnData(X=np.zeros((n, 0), dtype=np.float32), obs=obs)
    a.obsm["local_indices"] = indices
    a.uns["cytoself"] = {"codebook_size1": k, "codebook_size2": k}
    return a


def test_spectra_hand_made_example():
    # 3 crops with 4 codes each, codebook of 5; proteins B (crop 0, 2) and A (crop 1)
    idx = np.array([[0, 0, 1, 4], [2, 2, 2, 2], [1, 1, 1, 0]])
    a = _adata(idx, ["B", "A", "B"], k=5)
    counts = feature_spectra(a, normalize="counts")
    assert list(counts.index) == ["A", "B"] and counts.index.name == "protein_id"
    assert list(counts.columns) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(counts.loc["A"], [0, 0, 4, 0, 0])
    np.testing.assert_array_equal(counts.loc["B"], [3, 4, 0, 0, 1])
    freq = feature_spectra(a)
    np.testing.assert_allclose(freq.loc["B"], np.array([3, 4, 0, 0, 1]) / 8)
    np.testing.assert_allclose(freq.sum(axis=1), 1.0)
    per_image = feature_spectra(a, normalize="per_image")
    np.testing.assert_allclose(per_image.loc["B"], np.array([3, 4, 0, 0, 1]) / 2)
    # codebook size comes from uns; 4-D index arrays are flattened
    idx4 = idx.reshape(3, 1, 2, 2)
    np.testing.assert_array_equal(spectra_from_indices(idx4, ["B", "A", "B"], codebook_size=5), freq)


def test_spectra_matches_naive_loop_and_rejects_bad_indices():
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 50, size=(300, 25))
    prot = rng.integers(0, 17, size=300).astype(str)
    s = spectra_from_indices(idx, prot, codebook_size=64, normalize=False)
    for p in ["0", "5", "16"]:
        np.testing.assert_array_equal(s.loc[p], np.bincount(idx[prot == p].ravel(), minlength=64))
    with pytest.raises(ValueError, match="out of range"):
        spectra_from_indices(idx, prot, codebook_size=10)
    with pytest.raises(ValueError, match="negative"):
        spectra_from_indices(idx - 1, prot)


def test_feature_correlation_matches_corrcoef_and_handles_constant_columns():
    rng = np.random.default_rng(1)
    x = rng.random((40, 12))
    x[:, 3] = 0.0  # unused code
    x[:, 7] = 0.25  # constant, non-zero
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero / invalid warnings
        r = feature_correlation(pd.DataFrame(x))
    live = [i for i in range(12) if i not in (3, 7)]
    np.testing.assert_allclose(r[np.ix_(live, live)], np.corrcoef(x[:, live].T), atol=1e-12)
    assert np.isfinite(r).all()
    assert (r[3] == 0).all() and (r[:, 7] == 0).all()
    np.testing.assert_array_equal(r, r.T)


def _planted(seed: int = 0):
    """Three families, each using its own block of codes; codes 30..31 never used."""
    rng = np.random.default_rng(seed)
    k, blocks = 32, {"ER": range(0, 10), "nucleolus": range(10, 20), "mito": range(20, 30)}
    rows, labels = {}, {}
    for fam, codes in blocks.items():
        profile = np.zeros(k)
        profile[list(codes)] = rng.random(len(codes)) + 0.5
        for j in range(6):
            rows[f"{fam}{j}"] = profile * rng.uniform(0.5, 1.5) + 0.05 * rng.random(k) * (np.arange(k) < 30)
            labels[f"{fam}{j}"] = fam
    spectra = pd.DataFrame(rows).T
    spectra = spectra.div(spectra.sum(axis=1), axis=0)
    return spectra, labels, blocks


def test_bicluster_is_permutation_and_groups_identical_profiles():
    spectra, _, blocks = _planted()
    order = bicluster(spectra, n_clusters=3)
    k = spectra.shape[1]
    assert sorted(order.feature_order.tolist()) == list(range(k))
    assert sorted(order.protein_order.tolist()) == list(range(len(spectra)))
    # unused codes at the end, labelled -1
    assert order.feature_order[-2:].tolist() == [30, 31]
    assert (order.feature_clusters[[30, 31]] == -1).all()
    # each planted block of codes is one cluster, and clusters are numbered left to right
    for codes in blocks.values():
        assert len(set(order.feature_clusters[list(codes)])) == 1
    assert order.n_clusters == 3
    assert [c for c, _, _ in order.cluster_spans()] == [1, 2, 3]
    assert order.cluster_names == {1: "i", 2: "ii", 3: "iii", -1: "unused"}
    # proteins of one family are contiguous in the protein order
    fams = [p.rstrip("0123456789") for p in order.proteins]
    assert sum(a != b for a, b in zip(fams, fams[1:], strict=False)) == 2
    assert order.apply(spectra).shape == spectra.shape
    # identical columns land next to each other
    dup = spectra.copy()
    dup[k] = dup[5]
    o2 = bicluster(dup, n_clusters=3)
    pos = {c: i for i, c in enumerate(o2.feature_order)}
    assert abs(pos[5] - pos[k]) == 1


def test_family_correlation_picks_planted_family_and_leaves_query_out():
    spectra, labels, _ = _planted(seed=2)
    consensus = consensus_spectra(spectra, labels)
    assert list(consensus.index) == ["ER", "mito", "nucleolus"]
    np.testing.assert_allclose(consensus.loc["ER"], spectra.loc[[f"ER{j}" for j in range(6)]].mean())

    r = family_correlation("nucleolus3", consensus, spectra=spectra)
    assert r.index[0] == "nucleolus" and r.iloc[0] > 0.8
    assert r.is_monotonic_decreasing
    # leave-one-out: the nucleolus consensus used is the mean of the 5 other members
    others = spectra.loc[[f"nucleolus{j}" for j in range(6) if j != 3]].mean()
    expected = np.corrcoef(spectra.loc["nucleolus3"], others)[0, 1]
    assert r["nucleolus"] == pytest.approx(expected)
    # the same via an explicit label mapping (attrs lost)
    plain = pd.DataFrame(consensus.to_numpy(), index=consensus.index, columns=consensus.columns)
    r2 = family_correlation("nucleolus3", plain, spectra=spectra, labels=labels)
    pd.testing.assert_series_equal(r, r2)

    # an "unknown" protein given as a spectrum
    query = spectra.loc["mito1"].to_numpy() * 0.9 + 0.1 * spectra.loc["ER2"].to_numpy()
    r3 = family_correlation(query, consensus)
    assert r3.index[0] == "mito" and len(r3) == 3


def test_roman():
    assert [roman(i) for i in (1, 4, 9, 11, 14, 40)] == ["i", "iv", "ix", "xi", "xiv", "xl"]

"""Tests for protloc.data.splits: random, per-FOV and homology-aware splits, sequence clustering."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from protloc.data import splits as splits_mod
from protloc.data.splits import (
    CELLE_FRACTIONS,
    CYTOSELF_FRACTIONS,
    CYTOSELF_REFERENCE_FRACTIONS,
    SPLIT_NAMES,
    HomologySplit,
    assign_splits,
    cdhit_word_size,
    cluster_sequences,
    homology_split,
    split_by_fov,
    split_by_protein,
    split_items,
)
from protloc.errors import ConfigError, InputError, ProtlocError

HAVE_CDHIT = shutil.which("cd-hit") is not None
HAVE_MMSEQS = shutil.which("mmseqs") is not None
needs_cdhit = pytest.mark.skipif(not HAVE_CDHIT, reason="cd-hit not on PATH")
needs_mmseqs = pytest.mark.skipif(not HAVE_MMSEQS, reason="mmseqs not on PATH")

AA = np.array(list("ACDEFGHIKLMNPQRSTVWY"))


def _random_seq(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(AA, n))


def _mutate(rng: np.random.Generator, seq: str, n_sub: int, *, indel: bool = False) -> str:
    """Exactly ``n_sub`` substitutions (each to a different residue), optionally two small indels."""
    s = list(seq)
    for i in rng.choice(len(s), n_sub, replace=False):
        s[i] = rng.choice([a for a in AA if a != s[i]])
    if indel:
        p = int(rng.integers(30, len(s) - 30))
        del s[p : p + 2]
        p = int(rng.integers(30, len(s) - 30))
        s[p:p] = list(_random_seq(rng, 3))
    return "".join(s)


@pytest.fixture(scope="module")
def designed_set() -> tuple[dict[str, str], list[list[str]]]:
    """Two families of mutated copies (~90 % identity) plus unrelated random sequences."""
    rng = np.random.default_rng(42)
    base_a, base_b = _random_seq(rng, 300), _random_seq(rng, 220)
    seqs = {f"famA_{i}": _mutate(rng, base_a, 30, indel=i % 2 == 0) for i in range(6)}
    # family B includes N-terminal fragments (>= 80 % of the longest) of the mutated copies
    seqs |= {f"famB_{i}": _mutate(rng, base_b, 22)[: 220 - 8 * i] for i in range(4)}
    seqs |= {f"rand_{i}": _random_seq(rng, int(rng.integers(80, 350))) for i in range(12)}
    expected = [sorted(k for k in seqs if k.startswith("famA")), sorted(k for k in seqs if k.startswith("famB"))]
    expected += [[k] for k in sorted(seqs) if k.startswith("rand")]
    return seqs, sorted(expected)


def _partition(clusters: dict[str, str]) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for pid, rep in clusters.items():
        groups.setdefault(rep, []).append(pid)
    return sorted(sorted(g) for g in groups.values())


# --------------------------------------------------------------------------------------------------
# fractions and random splits


def test_presets():
    assert CELLE_FRACTIONS == {"train": 0.8, "val": 0.2}
    assert CYTOSELF_FRACTIONS == {"train": 0.8, "val": 0.1, "test": 0.1}
    assert CYTOSELF_REFERENCE_FRACTIONS == {"train": 0.82, "val": 0.098, "test": 0.082}
    assert SPLIT_NAMES == ("train", "val", "test")
    for preset in (CELLE_FRACTIONS, CYTOSELF_FRACTIONS, CYTOSELF_REFERENCE_FRACTIONS):
        assert abs(sum(preset.values()) - 1) < 1e-9


@pytest.mark.parametrize(
    "fractions",
    [
        {"train": 0.8, "valid": 0.2},
        {"train": 0.8, "val": 0.3},
        {"train": 1.2, "val": -0.2},
        {"train": 1.0, "val": 0.0},
        {"train": float("nan"), "val": 0.2},
        {"train": "a", "val": 0.2},
        {},
    ],
)
def test_fractions_validation(fractions):
    with pytest.raises(ValueError):
        split_items(["a", "b"], fractions=fractions)
    with pytest.raises(ConfigError):
        split_by_protein(["a", "b"], fractions=fractions)


def test_fractions_tolerance():
    out = split_items(list("abcdefghij"), fractions={"train": 0.8000004, "val": 0.2})
    assert sorted(out.values()).count("train") == 8


@pytest.mark.parametrize(
    ("n", "fractions", "expected"),
    [
        (10, CYTOSELF_FRACTIONS, {"train": 8, "val": 1, "test": 1}),
        (100, CYTOSELF_FRACTIONS, {"train": 80, "val": 10, "test": 10}),
        (7, CELLE_FRACTIONS, {"train": 6, "val": 1}),
        (3, CYTOSELF_FRACTIONS, {"train": 1, "val": 1, "test": 1}),  # every split non-empty
        (2, CELLE_FRACTIONS, {"train": 1, "val": 1}),
        (1000, CYTOSELF_REFERENCE_FRACTIONS, {"train": 820, "val": 98, "test": 82}),
        (1, CELLE_FRACTIONS, {"train": 1}),
    ],
)
def test_split_items_counts(n, fractions, expected):
    out = split_items([f"id{i}" for i in range(n)], fractions=fractions)
    counts = {s: list(out.values()).count(s) for s in expected}
    assert counts == expected
    assert len(out) == n


def test_split_items_counts_sum_property():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(0, 60))
        raw = rng.random(3) + 0.01
        fr = dict(zip(SPLIT_NAMES, raw / raw.sum(), strict=True))
        out = split_items([str(i) for i in range(n)], fractions=fr, seed=int(rng.integers(1000)))
        assert len(out) == n
        counts = [list(out.values()).count(s) for s in SPLIT_NAMES]
        if n >= 3:
            assert min(counts) >= 1
        if min(fr.values()) * n >= 1:  # no split needed topping up: plain largest remainder
            for c, f in zip(counts, fr.values(), strict=True):
                assert abs(c - f * n) < 1


def test_split_items_deterministic_order_independent_and_seeded():
    ids = [f"P{i:04d}" for i in range(200)]
    a = split_items(ids, fractions=CYTOSELF_FRACTIONS, seed=3)
    b = split_items(list(reversed(ids)), fractions=CYTOSELF_FRACTIONS, seed=3)
    c = split_items(ids + ids[:50], fractions=CYTOSELF_FRACTIONS, seed=3)  # repeats count once
    assert a == b == c
    assert list(a) == sorted(ids)
    d = split_items(ids, fractions=CYTOSELF_FRACTIONS, seed=4)
    assert a != d


def test_split_items_missing_id():
    with pytest.raises(InputError, match="missing id"):
        split_items(["a", None, "b"], fractions=CELLE_FRACTIONS)  # type: ignore[list-item]
    with pytest.raises(InputError, match="row 1"):
        split_items(["a", float("nan")], fractions=CELLE_FRACTIONS)  # type: ignore[list-item]


def test_split_by_protein_no_protein_in_two_splits():
    rows = [(f"P{i % 37}", f"fov{i}") for i in range(300)]
    df = pd.DataFrame(rows, columns=["protein_id", "fov_id"])
    mapping = split_by_protein(df["protein_id"].tolist(), seed=1)
    assert set(mapping.values()) == {"train", "val"}
    out = assign_splits(df, mapping)
    assert out.groupby("protein_id")["split"].nunique().max() == 1
    assert list(mapping.values()).count("val") == round(0.2 * 37)


def test_split_by_fov_keeps_fov_together_proteins_everywhere():
    rows = []
    for fov in range(60):
        protein = f"P{fov % 5}"
        rows += [(protein, f"fov{fov}", c) for c in range(4)]
    df = pd.DataFrame(rows, columns=["protein_id", "fov_id", "crop"])
    mapping = split_by_fov(df["fov_id"].tolist(), seed=0)
    assert {s: list(mapping.values()).count(s) for s in SPLIT_NAMES} == {"train": 48, "val": 6, "test": 6}
    out = assign_splits(df, mapping, key="fov_id")
    assert out.groupby("fov_id")["split"].nunique().max() == 1
    assert out.groupby("protein_id")["split"].nunique().min() >= 2
    # stratified by protein: each protein (12 FOVs) is in all three splits, 10 / 1 / 1 FOVs
    strat = split_by_fov(df["fov_id"].tolist(), protein_ids=df["protein_id"].tolist(), seed=0)
    out = assign_splits(df, strat, key="fov_id")
    assert out.groupby("fov_id")["split"].nunique().max() == 1
    per_protein = out.drop_duplicates("fov_id").groupby("protein_id")["split"].value_counts().unstack()
    assert (per_protein[["train", "val", "test"]].to_numpy() == [10, 1, 1]).all()
    assert strat == split_by_fov(df["fov_id"].tolist()[::-1], protein_ids=df["protein_id"].tolist()[::-1], seed=0)


def test_split_by_fov_errors():
    with pytest.raises(InputError, match="2 fov ids but 1 protein"):
        split_by_fov(["f1", "f2"], protein_ids=["a"])
    with pytest.raises(InputError, match="two proteins"):
        split_by_fov(["f1", "f1"], protein_ids=["a", "b"])


def test_assign_splits_copy_and_errors():
    df = pd.DataFrame({"protein_id": ["a", "b", "a", "c"], "x": range(4)})
    out = assign_splits(df, {"a": "train", "b": "val", "c": "val"})
    assert out["split"].tolist() == ["train", "val", "train", "val"]
    assert "split" not in df.columns
    out2 = assign_splits(out, {"a": "val", "b": "val", "c": "val"}, column="split")
    assert (out2["split"] == "val").all()
    with pytest.raises(InputError) as exc:
        assign_splits(df, {"a": "train"})
    assert "'b'" in str(exc.value) and "row 1" in str(exc.value) and "2 row(s)" in str(exc.value)
    with pytest.raises(InputError, match="no column 'gene'"):
        assign_splits(df, {"a": "train"}, key="gene")


# --------------------------------------------------------------------------------------------------
# clustering


def test_cdhit_word_size():
    assert [cdhit_word_size(t) for t in (1.0, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4)] == [5, 5, 4, 4, 3, 3, 2, 2]
    with pytest.raises(ConfigError, match="mmseqs"):
        cdhit_word_size(0.3)


def test_cluster_parameter_validation():
    seqs = {"a": "MKVLA"}
    for kwargs in ({"identity": 0}, {"identity": 1.5}, {"identity": 0.9, "coverage": 1.2}, {"identity": "x"}):
        with pytest.raises(ConfigError):
            cluster_sequences(seqs, backend="python", **kwargs)
    with pytest.raises(ConfigError, match="unknown clustering backend"):
        cluster_sequences(seqs, identity=0.9, backend="blast")
    with pytest.raises(ConfigError, match="below 0.4"):
        cluster_sequences(seqs, identity=0.3, backend="cd-hit")
    with pytest.raises(InputError, match="'a'.*'J'"):
        cluster_sequences({"a": "MJ"}, identity=0.9, backend="python")
    assert cluster_sequences({}, identity=0.9, backend="python") == {}


def test_backend_resolution(monkeypatch):
    monkeypatch.setattr(splits_mod.shutil, "which", lambda name: None)
    seqs = {"a": "MKVLAGHHKLW", "b": "ACDEFGHIKLMN"}
    result = homology_split(seqs, identity=0.9, backend="auto")
    assert result.backend == "python"
    with pytest.raises(ProtlocError, match="cd-hit not found"):
        cluster_sequences(seqs, identity=0.9, backend="cd-hit")
    with pytest.raises(ProtlocError, match="mmseqs not found"):
        cluster_sequences(seqs, identity=0.9, backend="mmseqs")
    monkeypatch.setattr(splits_mod.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert splits_mod._resolve_backend("auto", 0.5) == "cd-hit"
    assert splits_mod._resolve_backend("auto", 0.3) == "mmseqs"  # cd-hit cannot go below 0.4


def test_python_backend_designed_set(designed_set):
    seqs, expected = designed_set
    clusters = cluster_sequences(seqs, identity=0.7, backend="python")
    assert _partition(clusters) == expected
    assert all(clusters[clusters[k]] == clusters[k] for k in clusters)  # representatives map to themselves
    # representative is the longest member, as in CD-HIT
    for group in expected:
        rep = clusters[group[0]]
        assert len(seqs[rep]) == max(len(seqs[k]) for k in group)
    # the mapping's order does not matter
    reordered = dict(reversed(list(seqs.items())))
    assert cluster_sequences(reordered, identity=0.7, backend="python") == clusters


def test_python_backend_identity_threshold():
    rng = np.random.default_rng(7)
    base = _random_seq(rng, 200)
    seqs = {"a": base, "b": _mutate(rng, base, 30)}  # exactly 85 % identical
    assert len(set(cluster_sequences(seqs, identity=0.8, backend="python").values())) == 1
    assert len(set(cluster_sequences(seqs, identity=0.9, backend="python").values())) == 2
    same = {"x": base, "y": base.lower(), "z": base + "*"}
    assert set(cluster_sequences(same, identity=1.0, backend="python").values()) == {"x"}


def test_python_backend_coverage_of_shorter_sequence():
    rng = np.random.default_rng(3)
    full = _random_seq(rng, 300)
    seqs = {"full": full, "frag": full[100:200]}  # a fragment: 100 % identity over the shorter
    assert len(set(cluster_sequences(seqs, identity=0.9, backend="python").values())) == 1
    # 60 residues shared + 40 unrelated: identity and coverage over the shorter are at most 0.6
    chimera = {"full": full, "chim": full[:60] + _random_seq(rng, 40)}
    assert len(set(cluster_sequences(chimera, identity=0.5, coverage=0.8, backend="python").values())) == 2
    assert len(set(cluster_sequences(chimera, identity=0.5, coverage=0.5, backend="python").values())) == 1


def test_python_backend_short_sequences_do_not_crash():
    seqs = {"a": "MK", "b": "MK", "c": "MKVLAGHHKLWMKVLAGHHKLW"}
    clusters = cluster_sequences(seqs, identity=0.9, backend="python")
    assert set(clusters) == {"a", "b", "c"}


def test_align_band_matches_expectations():
    """Identical sequences align fully; a shifted copy is found inside the band."""
    seq = _random_seq(np.random.default_rng(11), 60)
    q = splits_mod._codes(seq)
    width = 2 * splits_mod._BAND + 1
    base = 1 << 8
    packed = np.full((26, 26), splits_mod._NEG, dtype=np.int64)
    packed[:25, :25] = splits_mod._BLOSUM * base * base + np.eye(25, dtype=np.int64) * base
    strips = np.full((2, q.size + width - 1), splits_mod._SENTINEL, dtype=np.int64)
    strips[0, splits_mod._BAND : splits_mod._BAND + q.size] = q  # diagonal 0
    strips[1, splits_mod._BAND + 5 : splits_mod._BAND + 5 + q.size - 5] = q[5:]  # query[5:] only
    ident, start, end = splits_mod._align_band(q, strips, packed, base=base, width=width)
    assert ident.tolist() == [60, 55]
    assert start.tolist() == [0, 5] and end.tolist() == [59, 59]


def test_parse_clstr(tmp_path):
    path = tmp_path / "out.clstr"
    path.write_text(">Cluster 0\n0\t300aa, >s2... *\n1\t280aa, >s0... at 91.07%\n>Cluster 1\n0\t120aa, >s1... *\n")
    assert splits_mod._parse_clstr(path, 4) == [2, 1, 2, -1]


def test_tool_failure_message(tmp_path):
    with pytest.raises(ProtlocError, match=r"exit status 3.*boom"):
        splits_mod._run_tool(["sh", "-c", "echo boom >&2; exit 3"], tool="sh", cwd=tmp_path)
    with pytest.raises(ProtlocError, match="could not run"):
        splits_mod._run_tool(["/nonexistent/tool"], tool="tool", cwd=tmp_path)


@needs_cdhit
def test_cdhit_agrees_with_python(designed_set):
    seqs, expected = designed_set
    for identity in (0.7, 0.5):
        cd = cluster_sequences(seqs, identity=identity, backend="cd-hit")
        py = cluster_sequences(seqs, identity=identity, backend="python")
        assert _partition(cd) == _partition(py) == expected


@needs_cdhit
def test_cdhit_keeps_short_sequences_and_odd_ids():
    seqs = {"sp|P1|A_HUMAN": "MKVLAGHHKLW", "id with... dots": "MKVLAGHHKL", "tiny": "MKV"}
    clusters = cluster_sequences(seqs, identity=0.9, backend="cd-hit")
    assert set(clusters) == set(seqs)
    assert clusters["id with... dots"] == "sp|P1|A_HUMAN"
    assert clusters["tiny"] == "tiny"


@needs_mmseqs
@pytest.mark.slow  # MMseqs2 builds a ~0.5 GB k-mer index per prefilter step: seconds even on tiny input
def test_mmseqs_agrees_with_python(designed_set):
    seqs, expected = designed_set
    mm = homology_split(seqs, identity=0.7, backend="mmseqs")
    assert mm.backend == "mmseqs"
    assert _partition(mm.clusters) == expected


# --------------------------------------------------------------------------------------------------
# homology split


def _check_no_straddle(result: HomologySplit) -> None:
    by_cluster: dict[str, set[str]] = {}
    for pid, rep in result.clusters.items():
        by_cluster.setdefault(rep, set()).add(result.assignment[pid])
    assert all(len(s) == 1 for s in by_cluster.values())


def test_homology_split_python(designed_set):
    seqs, expected = designed_set
    result = homology_split(seqs, identity=0.7, backend="python", seed=0)
    assert isinstance(result, HomologySplit)
    assert result.backend == "python" and result.identity == 0.7 and result.coverage == 0.8
    assert set(result.assignment) == set(seqs)
    assert result.n_clusters == len(expected)
    _check_no_straddle(result)
    assert set(result.counts) == {"train", "val"}
    assert sum(result.counts.values()) == len(seqs)
    # deterministic, seed-dependent
    again = homology_split(dict(reversed(list(seqs.items()))), identity=0.7, backend="python", seed=0)
    assert again.assignment == result.assignment
    seeds = {tuple(homology_split(seqs, identity=0.7, backend="python", seed=s).assignment.values()) for s in range(5)}
    assert len(seeds) > 1


def test_homology_split_targets_and_nonempty():
    rng = np.random.default_rng(5)
    seqs = {f"p{i:02d}": _random_seq(rng, 60) for i in range(40)}  # 40 singleton clusters
    result = homology_split(seqs, identity=0.9, fractions=CYTOSELF_FRACTIONS, backend="python")
    assert result.counts == {"train": 32, "val": 4, "test": 4}
    # one big cluster and two singletons: every split still gets a cluster
    base = _random_seq(rng, 100)
    seqs = {f"f{i}": base for i in range(8)} | {"u1": _random_seq(rng, 90), "u2": _random_seq(rng, 95)}
    result = homology_split(seqs, identity=0.9, fractions=CYTOSELF_FRACTIONS, backend="python")
    assert set(result.counts) == {"train", "val", "test"}
    _check_no_straddle(result)
    with pytest.raises(ConfigError):
        homology_split(seqs, identity=0.9, fractions={"train": 0.5}, backend="python")


@needs_cdhit
def test_homology_split_cdhit(designed_set):
    seqs, _ = designed_set
    result = homology_split(seqs, identity=0.5, fractions=CYTOSELF_FRACTIONS, backend="cd-hit", seed=2)
    assert result.backend == "cd-hit"
    _check_no_straddle(result)
    assert set(result.counts) == {"train", "val", "test"}

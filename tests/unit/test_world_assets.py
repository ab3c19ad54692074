"""The shipped reference-cell-world assets load, validate and hold what they promise."""

from __future__ import annotations

import numpy as np
import pytest

from protloc.data.sequences import ALPHABET
from protloc.data.world import assets
from protloc.data.world.compartments import COMPARTMENTS, WEIGHT_COLUMNS

NLS_NUCLEOPLASMIN = "KRPAATKKAGQAKKKK"
NLS_NMYC = "PAAKRVKLD"


@pytest.fixture(scope="module")
def proteins():
    return assets.load_proteins()


@pytest.fixture(scope="module")
def nuclei():
    return assets.load_nuclei()


@pytest.fixture(scope="module")
def engineered():
    return assets.load_engineered_records()


def test_proteins_columns_and_dtypes(proteins):
    assert tuple(proteins.columns) == assets.PROTEIN_COLUMNS
    assert list(proteins.columns[6:18]) == list(WEIGHT_COLUMNS)
    assert proteins.columns[-1] == "sequence"
    for col in ("protein_id", "uniprot_id", "entrez_id", "label", "sequence"):
        assert proteins[col].dtype == "string"
    assert proteins["length"].dtype == np.int64
    assert len(proteins) >= 200
    assert proteins["protein_id"].is_unique


def test_protein_weights_sum_to_one_and_label_is_argmax(proteins):
    w = proteins[list(WEIGHT_COLUMNS)].to_numpy()
    assert (w >= 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-3)
    assert (np.asarray(COMPARTMENTS)[w.argmax(axis=1)] == proteins["label"].to_numpy(dtype=str)).all()
    assert set(proteins["label"]) <= set(COMPARTMENTS)


def test_protein_sequences_and_go_terms_valid(proteins):
    allowed = set(ALPHABET)
    for seq, length, go in zip(proteins["sequence"], proteins["length"], proteins["go_cc"], strict=True):
        assert set(seq) <= allowed and len(seq) == length
        assert all(t.startswith("GO:") and len(t) == 10 for t in go.split(";"))
    assert proteins["uniprot_id"].str.fullmatch(r"[A-Z0-9]{6,10}").all()
    assert proteins["entrez_id"].str.fullmatch(r"\d+").all()


def test_main_compartments_populated(proteins):
    counts = proteins["label"].value_counts()
    for comp in ("nucleoplasm", "cytosol", "mitochondria", "plasma_membrane"):
        assert counts.get(comp, 0) >= 10


def test_nuclei_shapes_dtypes_and_masks(nuclei):
    assert len(nuclei) >= 20
    for image, mask in nuclei:
        assert image.dtype == np.uint16 and mask.dtype == bool
        assert image.ndim == 2 and image.shape == mask.shape
        assert mask.any() and not mask.all()
        border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
        assert not border.any()
        assert image[mask].mean() > np.median(image[~mask])  # the nucleus is brighter than background
        assert image.max() <= 45000


def test_nuclei_sources_match(nuclei):
    sources = assets.load_nuclei_sources()
    assert len(sources) == len(nuclei)
    assert all(s.startswith(("mahotas-", "stardist-")) for s in sources)


def test_engineered_records(engineered):
    ids = [r["id"] for r in engineered]
    assert ids[:3] == ["GFP", "GFP_NLS_nucleoplasmin", "GFP_NLS_NMyc"]
    seqs = assets.load_engineered()
    assert list(seqs) == ids
    gfp = seqs["GFP"]
    assert len(gfp) == 238 and gfp.startswith("MSKGEELFTG")
    assert seqs["GFP_NLS_nucleoplasmin"] == gfp + NLS_NUCLEOPLASMIN
    assert seqs["GFP_NLS_NMyc"] == gfp + NLS_NMYC
    rand = next(r for r in engineered if r["id"] == "GFP_random_peptide")
    assert rand["sequence"] == gfp + rand["peptide"] and len(rand["peptide"]) == 16
    allowed = set(ALPHABET)
    for rec in engineered:
        assert set(rec["sequence"]) <= allowed
        assert {"construct", "source"} <= set(rec)


def test_engineered_top1_series(engineered):
    recs = {r["id"]: r for r in engineered}
    if "TOP1" not in recs:
        pytest.skip("TOP1 not shipped (see PROVENANCE.md)")
    top1 = recs["TOP1"]["sequence"]
    assert len(top1) == 765 and top1[58:65] == "KKHKEKE"
    gfp = recs["GFP"]["sequence"]
    for region in ("1-199", "1-146", "1-67", "148-199"):
        start, end = map(int, region.split("-"))
        rec = recs[f"GFP_TOP1_{region}"]
        assert rec["region"] == region
        assert rec["sequence"] == gfp + top1[start - 1 : end]


def test_provenance_names_every_asset():
    text = assets.asset_text("PROVENANCE.md")
    for name in ("proteins.tsv", "nuclei.npz", "engineered.fasta", "metapredict", "mahotas", "org.hs.eg.db"):
        assert name in text

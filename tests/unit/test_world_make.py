"""Tests of the reference cell world: sequence rules (synthetic.py) and the world on disk (make.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from protloc.data.io import read_tiff_with_axes
from protloc.data.sequences import read_fasta
from protloc.data.world import make as make_mod
from protloc.data.world.compartments import COMPARTMENTS, NUCLEAR, WEIGHT_COLUMNS
from protloc.data.world.make import make_world, render_compartment_gallery, world_proteins
from protloc.data.world.render import RenderParams
from protloc.data.world.synthetic import (
    SIGNALS,
    explain,
    make_synthetic_proteins,
    plant_signal,
    sequence_weights,
)
from protloc.errors import ConfigError, InputError

C = {c: i for i, c in enumerate(COMPARTMENTS)}

# Enhanced GFP (approximate; 239 aa): a freely diffusing reporter without targeting signals.
EGFP = (
    "MVSKGEELFTGVVPILVELDGDVNGHKFSVSGEGEGDATYGKLTLKFICTTGKLPVPWPTLVTTLTYGVQCFSRYPDHMKQHDFFKSAMPEGYVQER"
    "TIFFKDDGNYKTRAEVKFEGDTLVNRIELKGIDFKEDGNILGHKLEYNYNSHNVYIMADKQKNGIKVNFKIRHNIEDGSVQLADHYQQNTPIGDGPV"
    "LLPDNHYLSTQSALSKDPNEKRDHMVLLEFVTAAGITLGMDELYK"
)
NUCLEOPLASMIN_NLS = "KRPAATKKAGQAKKKK"
NMYC_NLS = "PPQKKIKS"
SV40_NLS = "PKKKRKV"


def background(length: int = 900, seed: int = 0) -> str:
    """A clean signal-free sequence (large: no passive nuclear share)."""
    df = make_synthetic_proteins(40, rng=np.random.default_rng(seed), length_range=(length, length))
    seq = df.loc[df["signals"] == "", "sequence"].iloc[0]
    assert explain(seq) == []
    return seq


# -- sequence rules ---------------------------------------------------------------------------------


def test_weights_sum_to_one_for_any_sequence():
    rng = np.random.default_rng(0)
    for _ in range(30):
        seq = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=int(rng.integers(20, 900))))
        w = sequence_weights(seq)
        assert w.shape == (12,) and np.all(w >= 0) and w.sum() == pytest.approx(1.0)


def test_no_signal_large_protein_is_cytosolic():
    w = sequence_weights(background())
    assert w[C["cytosol"]] > 0.99


def test_nls_sends_to_nucleoplasm_and_mutating_it_removes_the_nuclear_share():
    bg = background()
    with_nls = bg[:300] + SV40_NLS + bg[307:]
    w = sequence_weights(with_nls)
    assert w[C["nucleoplasm"]] > 0.9
    assert [h.signal for h in explain(with_nls)] == ["nls_monopartite"]
    # the classic SV40 K128T mutation (PKKKRKV -> PKTKRKV) abolishes import
    mutant = bg[:300] + "PKTKRKV" + bg[307:]
    assert explain(mutant) == []
    assert sequence_weights(mutant)[C["nucleoplasm"]] < 0.01


def test_signal_rules_reach_their_compartments():
    bg = background()
    rng = np.random.default_rng(1)
    cases = {
        "signal_peptide_kdel": "er",
        "signal_peptide": "vesicles",
        "mts": "mitochondria",
        "caax": "plasma_membrane",
        "myristoyl_polybasic": "plasma_membrane",
        "nols": "nucleolus",
        "nls_bipartite": "nucleoplasm",
        "transmembrane": "er",
        "nes": "cytosol",
    }
    for kit, compartment in cases.items():
        seq = plant_signal(bg, kit, rng=rng, position=200)
        w = sequence_weights(seq)
        assert COMPARTMENTS[int(np.argmax(w))] == compartment, (kit, explain(seq))
        assert any(h.compartment == compartment for h in explain(seq)), kit


def test_signal_peptide_with_kdel_is_er_and_without_is_secreted():
    bg = background()
    sp = "MKRLLLLALLAVLAGSAQA"
    secreted = sp + bg[len(sp) :]
    retained = secreted[:-4] + "KDEL"
    assert sequence_weights(secreted)[C["vesicles"]] == pytest.approx(0.8)
    assert sequence_weights(retained)[C["er"]] == pytest.approx(1.0)
    hits = explain(retained)
    assert ("signal_peptide", "er") in {(h.signal, h.compartment) for h in hits}
    assert hits[-1].signal == "er_retention" and hits[-1].end == len(retained)
    # KDEL alone (no signal peptide) is not read
    assert sequence_weights(bg[:-4] + "KDEL")[C["er"]] == 0


def test_caax_only_at_the_c_terminus():
    bg = background()
    assert sequence_weights(bg[:-4] + "CVLS")[C["plasma_membrane"]] == pytest.approx(1.0)
    inside = bg[:300] + "CVLS" + bg[304:]
    assert sequence_weights(inside)[C["plasma_membrane"]] == 0


def test_gfp_experiments():
    gfp = sequence_weights(EGFP)
    npm = sequence_weights(EGFP + NUCLEOPLASMIN_NLS)
    nmyc = sequence_weights(EGFP + NMYC_NLS)
    rand = sequence_weights(EGFP + "GSAGTNQDSWPY")
    # GFP alone diffuses: cytosol + nucleoplasm only, neither dominating strongly
    assert gfp[C["cytosol"]] + gfp[C["nucleoplasm"]] == pytest.approx(1.0)
    assert 0.3 < gfp[C["nucleoplasm"]] < 0.6
    # both NLSs make it mostly nuclear; the weaker N-Myc NLS less so than nucleoplasmin's
    assert npm[C["nucleoplasm"]] > nmyc[C["nucleoplasm"]] > 0.6
    assert npm[C["nucleoplasm"]] > 0.9
    # a random peptide changes nothing
    assert np.allclose(rand, gfp, atol=0.02)


def test_explain_reports_positions():
    seq = EGFP + NUCLEOPLASMIN_NLS
    hits = explain(seq)
    bi = [h for h in hits if h.signal == "nls_bipartite"]
    # GFP's C-terminal K extends the match by one residue
    assert len(bi) == 1 and seq[bi[0].start : bi[0].end] in ("K" + NUCLEOPLASMIN_NLS, NUCLEOPLASMIN_NLS)
    assert bi[0].end == len(seq)
    assert bi[0].compartment == "nucleoplasm"
    assert set(SIGNALS) >= {h.signal for h in hits}
    with pytest.raises(InputError):
        explain("MKV*J")


def test_make_synthetic_proteins_format_and_coverage():
    df = make_synthetic_proteins(30, rng=np.random.default_rng(0))
    for col in ("protein_id", "uniprot_id", "entrez_id", "length", "label", "go_cc", *WEIGHT_COLUMNS, "sequence"):
        assert col in df.columns
    assert df["protein_id"].iloc[0] == "SYN0001" and df["protein_id"].is_unique
    assert np.allclose(df[list(WEIGHT_COLUMNS)].sum(axis=1), 1.0)
    assert (df["length"] == df["sequence"].str.len()).all()
    assert df["length"].between(150, 700).all()
    # every compartment the rules can reach appears as a label
    reachable = {"nucleoplasm", "nucleolus", "cytosol", "mitochondria", "er", "vesicles", "plasma_membrane"}
    assert set(df["label"]) == reachable
    for row in df.itertuples():
        w = sequence_weights(row.sequence)
        assert row.label == COMPARTMENTS[int(np.argmax(w))]
    again = make_synthetic_proteins(30, rng=np.random.default_rng(0))
    pd.testing.assert_frame_equal(df, again)


# -- the world on disk --------------------------------------------------------------------------------


def _fake_proteins() -> pd.DataFrame:
    rows = []
    spec = {"NUCA": "nucleoplasm", "MITB": "mitochondria", "PMC": "plasma_membrane", "MIXD": None}
    rng = np.random.default_rng(0)
    for i, (pid, comp) in enumerate(spec.items()):
        w = np.zeros(12)
        if comp is None:
            w[C["cytosol"]], w[C["nucleolus"]] = 0.5, 0.5
        else:
            w[C[comp]] = 1.0
        row = {
            "protein_id": pid,
            "uniprot_id": f"P0000{i}",
            "entrez_id": str(100 + i),
            "length": 200,
            "label": comp or "cytosol",
            "go_cc": "",
        }
        row.update(dict(zip(WEIGHT_COLUMNS, w, strict=True)))
        row["sequence"] = "M" + "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=199))
        rows.append(row)
    return pd.DataFrame(rows)


def _fake_nuclei() -> list[tuple[np.ndarray, np.ndarray]]:
    yy, xx = np.mgrid[:60, :60] - 30
    mask = (yy / 22) ** 2 + (xx / 18) ** 2 <= 1
    img = (200 + 1500 * mask * (1 + 0.1 * np.sin(yy / 2.0) * np.cos(xx / 3.0))).astype(np.uint16)
    return [(img, mask), (img.T.copy(), mask.T.copy())]


@pytest.fixture
def fake_assets(monkeypatch):
    from protloc.data.world import assets

    monkeypatch.setattr(assets, "load_proteins", _fake_proteins)
    monkeypatch.setattr(assets, "load_nuclei", _fake_nuclei)
    monkeypatch.setattr(
        assets, "load_engineered", lambda: {"GFP": EGFP, "GFP_NLS_nucleoplasmin": EGFP + NUCLEOPLASMIN_NLS}
    )
    return assets


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_world_layout(tmp_path, fake_assets):
    out = make_world(tmp_path / "world", proteins=3, fovs=2, size=128, seed=1, progress=False)
    fovs = pd.read_csv(out / "fovs.csv")
    assert list(fovs.columns) == [
        "fov_id",
        "protein_id",
        "path",
        "gene_name",
        "uniprot_id",
        "label",
        "downsample",
        "pixel_size_um",
    ]
    assert len(fovs) == 6 and fovs["fov_id"].is_unique
    assert (fovs["downsample"] == 1).all() and (fovs["pixel_size_um"] == 0.4).all()
    assert fovs["fov_id"].iloc[0] == f"{fovs['protein_id'].iloc[0]}_F00"
    for row in fovs.itertuples():
        img, axes = read_tiff_with_axes(out / row.path)
        assert row.path.endswith("_proj.tif")
        assert axes == "CYX" and img.shape == (2, 128, 128) and img.dtype == np.uint16
        labels, laxes = read_tiff_with_axes(out / "truth" / f"{row.fov_id}_labels.tif")
        assert labels.shape == (2, 128, 128) and labels.dtype == np.int32
        nuc = labels[0] > 0
        assert np.array_equal(labels[0][nuc], labels[1][nuc])

    proteins = pd.read_csv(out / "proteins.csv", keep_default_na=False)
    assert list(proteins.columns[:3]) == ["protein_id", "uniprot_id", "label"]
    for col in (*WEIGHT_COLUMNS, "nucleus_proportion_expected", "engineered", "sequence"):
        assert col in proteins.columns
    assert len(proteins) == 5 and proteins["engineered"].sum() == 2
    eng = proteins[proteins["engineered"]].set_index("protein_id")
    assert eng.at["GFP_NLS_nucleoplasmin", "label"] == "nucleoplasm"
    assert not set(eng.index) & set(fovs["protein_id"])  # engineered constructs get no fields
    assert read_fasta(out / "sequences.fasta") == dict(zip(proteins["protein_id"], proteins["sequence"], strict=True))

    truth = pd.read_csv(out / "truth.csv")
    assert set(truth["protein_id"]) == set(proteins["protein_id"])
    imaged = truth[~truth["engineered"]]
    assert (imaged["n_fovs"] == 2).all() and (truth[truth["engineered"]]["n_fovs"] == 0).all()
    # the measured nucleus proportion agrees with the nuclear weights
    expected = imaged[[f"w_{c}" for c in NUCLEAR]].sum(axis=1)
    assert np.allclose(imaged["nucleus_proportion_expected"], expected)
    assert (np.abs(imaged["nucleus_proportion"] - expected) < 0.15).all()

    meta = json.loads((out / "world.json").read_text())
    assert meta["seed"] == 1 and meta["mode"] == "real" and meta["compartments"] == list(COMPARTMENTS)
    assert meta["counts"]["fovs"] == 6 and meta["counts"]["proteins"] == 3 and meta["counts"]["engineered"] == 2
    assert meta["render_params"]["size"] == 128 and "protloc_version" in meta
    per_fov = pd.read_csv(out / "truth" / "fovs.csv")
    assert len(per_fov) == 6 and (per_fov["n_cells"] > 0).all()


def test_make_world_is_deterministic_and_independent_of_workers(tmp_path, fake_assets):
    a = make_world(tmp_path / "a", proteins=2, fovs=2, size=96, seed=5, progress=False, include_engineered=False)
    b = make_world(
        tmp_path / "b", proteins=2, fovs=2, size=96, seed=5, progress=False, include_engineered=False, workers=2
    )
    c = make_world(tmp_path / "c", proteins=2, fovs=2, size=96, seed=6, progress=False, include_engineered=False)
    assert _tree(a) == _tree(b)
    assert _tree(a) != _tree(c)


def test_make_world_synthetic_mode_needs_no_assets(tmp_path, monkeypatch):
    from protloc.data.world import assets

    def missing():
        raise FileNotFoundError("no assets here")

    for name in ("load_proteins", "load_nuclei", "load_engineered"):
        monkeypatch.setattr(assets, name, missing)
    out = make_world(
        tmp_path / "syn",
        proteins=3,
        fovs=1,
        size=96,
        mode="synthetic",
        z=3,
        include_engineered=False,
        params=RenderParams(real_nucleus_fraction=0.0),
        progress=False,
    )
    fovs = pd.read_csv(out / "fovs.csv")
    assert fovs["protein_id"].tolist() == ["SYN0001", "SYN0002", "SYN0003"]
    img, axes = read_tiff_with_axes(out / fovs["path"].iloc[0])
    assert fovs["path"].iloc[0].endswith("_stack.tif") and axes == "ZCYX" and img.shape == (3, 2, 96, 96)
    proteins = pd.read_csv(out / "proteins.csv", keep_default_na=False)
    for row in proteins.itertuples():
        assert np.allclose([getattr(row, c) for c in WEIGHT_COLUMNS], sequence_weights(row.sequence))


def test_interrupted_make_leaves_nothing(tmp_path, fake_assets, monkeypatch):
    calls = {"n": 0}
    real = make_mod.render_fov

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(make_mod, "render_fov", flaky)
    with pytest.raises(RuntimeError, match="power cut"):
        make_world(tmp_path / "world", proteins=2, fovs=2, size=64, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path, fake_assets):
    out = tmp_path / "world"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / ".protloc-output").write_text("{}")  # a previous protloc output: --overwrite may replace it
    with pytest.raises(InputError, match="already exists"):
        make_world(out, proteins=1, fovs=1, size=64, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    make_world(out, proteins=1, fovs=1, size=64, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "fovs.csv").exists()


@pytest.mark.parametrize(
    "kwargs",
    [{"mode": "dream"}, {"fovs": 0}, {"workers": 0}, {"proteins": 0}, {"proteins": 99}],
)
def test_make_world_bad_arguments(tmp_path, fake_assets, kwargs):
    with pytest.raises(ConfigError):
        make_world(tmp_path / "w", size=64, progress=False, **kwargs)
    assert not (tmp_path / "w").exists()


def test_world_proteins_sampling_is_seeded(fake_assets):
    a = world_proteins(proteins=2, seed=0, include_engineered=False)
    b = world_proteins(proteins=2, seed=0, include_engineered=False)
    assert a["protein_id"].tolist() == b["protein_id"].tolist()
    picks = {tuple(world_proteins(proteins=2, seed=s, include_engineered=False)["protein_id"]) for s in range(8)}
    assert len(picks) > 1
    assert len(world_proteins(proteins=None, include_engineered=False)) == 4


def test_compartment_gallery():
    gallery = render_compartment_gallery(seed=0, size=64, params=RenderParams(real_nucleus_fraction=0.0))
    assert list(gallery) == list(COMPARTMENTS)
    for nucleus, protein in gallery.values():
        assert nucleus.shape == protein.shape == (64, 64)
        assert nucleus.dtype == protein.dtype == np.uint16
        assert nucleus.max() > 2 * np.median(nucleus)  # a nucleus is in view


def test_world_from_a_protein_table():
    nls = "MSDEAAGTPKKKRKVEDGSAALLAGWSTQE"
    plain = "MSDEAAGTAGSLEDGSAALLAGWSTQEAAN"
    table = world_proteins(
        protein_table=pd.DataFrame({"protein_id": ["a", "b"], "sequence": [nls, plain]}), include_engineered=False
    )
    assert list(table["protein_id"]) == ["a", "b"] and not table["engineered"].any()
    # Weights from the sequence rules when the table has none: the NLS protein is nuclear.
    assert table["nucleus_proportion_expected"].iloc[0] > 0.9 > table["nucleus_proportion_expected"].iloc[1]
    np.testing.assert_allclose(table[list(WEIGHT_COLUMNS)].sum(axis=1), 1.0)
    with pytest.raises(ConfigError, match="lacks column"):
        world_proteins(protein_table=pd.DataFrame({"protein_id": ["a"]}))
    with pytest.raises(InputError, match="row 2"):
        world_proteins(protein_table=pd.DataFrame({"protein_id": ["a", "b"], "sequence": [nls, "MK*J"]}))
    with pytest.raises(ConfigError, match="weight columns"):
        world_proteins(protein_table=pd.DataFrame({"protein_id": ["a"], "sequence": [nls], "w_cytosol": [1.0]}))


def test_proteome_world_samples_the_human_table_with_its_partition(tmp_path):
    from protloc.data.proteome import read_human_table

    table = world_proteins(proteins=30, seed=1, mode="proteome")
    human = read_human_table().set_index("accession")
    imaged = table[~table["engineered"]]
    assert len(imaged) == 30 and imaged["protein_id"].is_unique
    rows = human.loc[imaged["uniprot_id"]]
    # real sequences, gene symbols and the homology partition of the table, not a new draw
    assert (rows["sequence"].to_numpy() == imaged["sequence"].to_numpy()).all()
    assert (rows["gene_symbol"].to_numpy() == imaged["protein_id"].to_numpy()).all()
    assert (rows["partition"].to_numpy() == imaged["partition"].to_numpy()).all()
    assert (table.loc[table["engineered"], "partition"] == "").all()
    again = world_proteins(proteins=30, seed=1, mode="proteome")
    assert again["protein_id"].tolist() == table["protein_id"].tolist()
    with pytest.raises(ConfigError, match="human proteome table"):
        world_proteins(proteins=10**6, mode="proteome")

    out = make_world(
        tmp_path / "w",
        proteins=6,
        fovs=1,
        size=128,
        mode="proteome",
        seed=2,
        params=RenderParams(real_nucleus_fraction=0.0),
        progress=False,
    )
    fovs = pd.read_csv(out / "fovs.csv")
    truth = pd.read_csv(out / "truth.csv", keep_default_na=False)
    meta = json.loads((out / "world.json").read_text())
    assert set(fovs["partition"]) <= {"train", "val", "test"} and len(fovs) == 6
    per_protein = truth.set_index("protein_id")["partition"]
    assert (fovs["partition"].to_numpy() == per_protein.loc[fovs["protein_id"]].to_numpy()).all()
    assert meta["mode"] == "proteome" and sum(meta["partition"]["counts"].values()) == 6
    assert len(meta["partition"]["table_sha256"]) == 64


def test_protein_table_partition_is_checked():
    base = {"protein_id": ["a", "b"], "sequence": ["MKVLAAGWSTQE", "MSDEAAGTAGSL"]}
    table = world_proteins(
        protein_table=pd.DataFrame({**base, "partition": ["train", "test"]}), include_engineered=False
    )
    assert table["partition"].tolist() == ["train", "test"]
    with pytest.raises(ConfigError, match="'b'.*row 2.*'holdout'"):
        world_proteins(protein_table=pd.DataFrame({**base, "partition": ["train", "holdout"]}))


def test_proteome_world_can_hold_only_held_out_proteins():
    table = world_proteins(proteins=20, seed=0, mode="proteome", partitions=["test"], include_engineered=False)
    assert set(table["partition"]) == {"test"} and len(table) == 20
    with pytest.raises(ConfigError, match="partitions must be"):
        world_proteins(proteins=5, mode="proteome", partitions=["holdout"])
    with pytest.raises(ConfigError, match="need mode='proteome'"):
        world_proteins(proteins=5, mode="real", partitions=["test"])
    with pytest.raises(ConfigError, match="in partitions test"):
        world_proteins(proteins=5000, mode="proteome", partitions=["test"])


def test_proteome_world_counts_per_partition(tmp_path):
    table = world_proteins(mode="proteome", partitions={"train": 6, "test": 4}, include_engineered=False)
    assert table["partition"].value_counts().to_dict() == {"train": 6, "test": 4}
    same = world_proteins(mode="proteome", proteins=3, partitions={"train": 6, "test": 4}, include_engineered=False)
    assert same["protein_id"].tolist() == table["protein_id"].tolist()  # the counts decide, not proteins
    with pytest.raises(ConfigError, match="positive integer"):
        world_proteins(mode="proteome", partitions={"test": 0})
    from protloc.cli import main

    assert (
        main(
            [
                "-q",
                "world",
                "make",
                "--out",
                str(tmp_path / "w"),
                "--mode",
                "proteome",
                "--fovs",
                "1",
                "--size",
                "128",
                "--partition",
                "train=2",
                "--partition",
                "test=1",
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "w" / "world.json").read_text())
    assert meta["arguments"]["partitions"] == {"train": 2, "test": 1} and meta["counts"]["proteins"] == 3
    assert (
        main(
            [
                "-q",
                "world",
                "make",
                "--out",
                str(tmp_path / "w2"),
                "--mode",
                "proteome",
                "--partition",
                "train=2",
                "--partition",
                "test",
            ]
        )
        == 2
    )

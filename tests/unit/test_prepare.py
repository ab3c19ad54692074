from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from protloc.cli import main
from protloc.config import apply_overrides
from protloc.data.io import CropStore, read_image, read_table, write_table, write_tiff
from protloc.data.prepare import PrepareConfig, parse_fractions, prepare, spread_order
from protloc.data.sequences import read_fasta, write_fasta
from protloc.errors import ConfigError, InputError

SEQS = {
    "P1": "MKTAYIAKQRQISFVKSHFSRQ",
    "P2": "MPKKKRKVEDPLLGGSAAAWKL",
    "P3": "MLSRAVCGTSRQLAPVLGYLGSRQKHSLPDLPYDY",
}


def _fov(rng: np.random.Generator, size: int, *, nuclear: bool) -> np.ndarray:
    """A 2-channel (nucleus, protein) uint16 image with a grid of disk nuclei."""
    yy, xx = np.mgrid[:size, :size]
    nuc = np.zeros((size, size), np.float32)
    step = 40
    for cy in range(step // 2 + 5, size - 10, step):
        for cx in range(step // 2 + 5, size - 10, step):
            r = rng.uniform(9, 13)
            nuc[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1.0
    inside = nuc > 0
    prot = np.where(inside, 1.0, 0.2) if nuclear else np.where(inside, 0.1, 1.0)
    noise = rng.normal(0, 0.02, size=(2, size, size))
    img = np.stack([nuc * 3000 + 200, prot * 2000 + 100]) + noise * 1000
    return np.clip(img, 0, 65535).astype(np.uint16)


@pytest.fixture()
def fov_dir(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for p in SEQS:
        for k in range(3):
            fid = f"{p}_F{k}"
            img = _fov(rng, 300, nuclear=p == "P2")
            write_tiff(tmp_path / "fovs" / f"{fid}_proj.tif", img, axes="CYX")
            rows.append({"fov_id": fid, "protein_id": p, "path": f"fovs/{fid}_proj.tif", "label": "x", "downsample": 1})
    # one raw-scale z-stack (ZCYX), binned 2x by prepare
    stack = np.stack([_fov(rng, 600, nuclear=False)] * 3)
    write_tiff(tmp_path / "fovs" / "P1_Z_stack.tif", stack, axes="ZCYX")
    rows.append({"fov_id": "P1_Z", "protein_id": "P1", "path": "fovs/P1_Z_stack.tif", "label": "x", "downsample": 2})
    write_table(pd.DataFrame(rows), tmp_path / "fovs.csv")
    write_fasta(tmp_path / "seqs.fasta", SEQS)
    return tmp_path


def _cfg(**kw) -> PrepareConfig:
    return apply_overrides(PrepareConfig(), ["params.celle_size=128", *[f"{k}={v}" for k, v in kw.items()]])


def test_prepare_end_to_end(fov_dir):
    out = fov_dir / "out"
    summary = prepare(fov_dir / "fovs.csv", out, config=_cfg(), sequences=fov_dir / "seqs.fasta", progress=False)
    cyto = CropStore.open(out / "cytoself.zarr")
    celle = CropStore.open(out / "celle.zarr")
    assert len(cyto) == summary["cytoself_crops"] > 0
    assert len(celle) == summary["celle_crops"] > 0
    assert cyto.size == 100 and celle.size == 128
    assert set(cyto.channels) == {"protein", "nucleus", "nucleus_distance"}
    d = cyto.read(np.arange(len(cyto)))
    assert d["protein"].min() >= 0 and d["protein"].max() <= 1
    assert d["nucleus_distance"].min() >= -1 and d["nucleus_distance"].max() <= 1
    # crops are centred on a nucleus: the centre pixel is inside (positive distance)
    assert (d["nucleus_distance"][:, 50, 50] > 0).all()
    assert d["protein"].dtype == np.float16  # default store_dtype
    assert (celle.obs.groupby("fov_id").size() <= 4).all()  # celle_max_crops_per_fov
    t = celle.read(np.arange(len(celle)), channels=["threshold"])["threshold"]
    assert t.dtype == np.uint8 and set(np.unique(t)) <= {0, 1}
    # the z-stack was binned 2x (600 -> 300) and gave crops too
    assert (cyto.obs["fov_id"] == "P1_Z").sum() > 0
    # splits: cytoself by FOV (one split per FOV), CELL-E by protein (one split per protein)
    assert (cyto.obs.groupby("fov_id")["split"].nunique() == 1).all()
    assert (celle.obs.groupby("protein_id")["split"].nunique() == 1).all()
    prot = read_table(out / "proteins.csv")
    assert list(prot["protein_id"]) == list(SEQS)
    assert read_fasta(out / "sequences.fasta") == SEQS
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()


def test_prepare_workers_identical(fov_dir):
    a = prepare(fov_dir / "fovs.csv", fov_dir / "a", config=_cfg(), sequences=fov_dir / "seqs.fasta", progress=False)
    b = prepare(
        fov_dir / "fovs.csv", fov_dir / "b", config=_cfg(), sequences=fov_dir / "seqs.fasta", workers=2, progress=False
    )
    assert a == b
    sa, sb = CropStore.open(fov_dir / "a" / "cytoself.zarr"), CropStore.open(fov_dir / "b" / "cytoself.zarr")
    np.testing.assert_array_equal(sa["protein"][:], sb["protein"][:])
    pd.testing.assert_frame_equal(sa.obs, sb.obs)


def test_prepare_without_sequences_skips_celle(fov_dir):
    out = fov_dir / "out"
    s = prepare(fov_dir / "fovs.csv", out, config=_cfg(), progress=False)
    assert s["celle_crops"] == 0 and not (out / "celle.zarr").exists()


def test_prepare_homology_split(fov_dir):
    out = fov_dir / "out"
    cfg = _cfg(**{"celle_split.by": "homology", "celle_split.identity": 0.9, "celle_split.backend": "python"})
    prepare(fov_dir / "fovs.csv", out, config=cfg, sequences=fov_dir / "seqs.fasta", progress=False)
    obs = CropStore.open(out / "celle.zarr").obs
    assert (obs.groupby("protein_id")["split"].nunique() == 1).all()


def test_prepare_errors_name_culprit_and_keep_outputs(fov_dir):
    out = fov_dir / "out"
    prepare(fov_dir / "fovs.csv", out, config=_cfg(), sequences=fov_dir / "seqs.fasta", progress=False)
    before = (out / "cytoself.csv").read_bytes()
    with pytest.raises(InputError, match="already exists"):
        prepare(fov_dir / "fovs.csv", out, config=_cfg(), progress=False)
    # a sequence missing from the FASTA
    write_fasta(fov_dir / "short.fasta", {"P1": SEQS["P1"]})
    with pytest.raises(InputError, match="no sequence for protein 'P2'"):
        prepare(
            fov_dir / "fovs.csv", out, config=_cfg(), sequences=fov_dir / "short.fasta", overwrite=True, progress=False
        )
    # a corrupt TIFF: the run fails, naming the file, and the old output is intact
    (fov_dir / "fovs" / "P3_F1_proj.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(InputError, match="P3_F1_proj.tif"):
        prepare(
            fov_dir / "fovs.csv", out, config=_cfg(), sequences=fov_dir / "seqs.fasta", overwrite=True, progress=False
        )
    assert (out / "cytoself.csv").read_bytes() == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out")]


def test_fov_table_errors(fov_dir):
    df = read_table(fov_dir / "fovs.csv")
    df.loc[2, "path"] = "fovs/missing.tif"
    write_table(df, fov_dir / "bad.csv")
    with pytest.raises(InputError, match=r"bad\.csv.*row 2.*missing\.tif"):
        prepare(fov_dir / "bad.csv", fov_dir / "o", config=_cfg(), progress=False)
    df = read_table(fov_dir / "fovs.csv").drop(columns=["protein_id"])
    write_table(df, fov_dir / "bad2.csv")
    with pytest.raises(InputError, match="protein_id"):
        prepare(fov_dir / "bad2.csv", fov_dir / "o", config=_cfg(), progress=False)


def test_parse_fractions():
    assert parse_fractions("paper", kind="cytoself") == {"train": 0.8, "val": 0.1, "test": 0.1}
    assert parse_fractions("paper", kind="celle") == {"train": 0.8, "val": 0.2}
    assert parse_fractions("reference", kind="cytoself")["train"] == 0.82
    assert parse_fractions("train=0.5,val=0.5", kind="celle") == {"train": 0.5, "val": 0.5}
    with pytest.raises(ConfigError):
        parse_fractions("train=0.5,val=0.4", kind="celle")
    with pytest.raises(ConfigError):
        parse_fractions("reference", kind="celle")


def test_cli_prepare(fov_dir, capsys):
    rc = main(
        [
            "-q",
            "prepare",
            "--fovs",
            str(fov_dir / "fovs.csv"),
            "--out",
            str(fov_dir / "cli"),
            "--sequences",
            str(fov_dir / "seqs.fasta"),
            "--set",
            "params.celle_size=128",
        ]
    )
    assert rc == 0
    assert "cytoself_crops" in capsys.readouterr().out
    rc = main(
        [
            "-q",
            "prepare",
            "--fovs",
            str(fov_dir / "fovs.csv"),
            "--out",
            str(fov_dir / "cli2"),
            "--set",
            "params.sigmaa=1",
        ]
    )
    assert rc == 2
    assert "params.sigmaa" in capsys.readouterr().err


def test_spread_order_is_a_spread_permutation():
    centres = np.array([[10, 10, 1], [12, 11, 2], [90, 90, 3], [50, 52, 4], [88, 12, 5]])
    order = spread_order(centres, (100, 100))
    assert sorted(order.tolist()) == list(range(5))
    assert order[0] == 3  # nearest the image centre first
    assert set(order[1:3].tolist()) == {0, 2}  # then the two far corners, not the near neighbour of 0
    assert order[-1] == 1
    assert len(spread_order(np.zeros((0, 3)), (10, 10))) == 0


def test_caps_and_stratified_fov_split(fov_dir):
    out = fov_dir / "out"
    cfg = _cfg(
        **{
            "cytoself_max_crops_per_fov": 2,
            "celle": "false",
            "cytoself_split.stratify": "true",
            "store_dtype": "float32",
        }
    )
    prepare(fov_dir / "fovs.csv", out, config=cfg, sequences=fov_dir / "seqs.fasta", progress=False)
    store = CropStore.open(out / "cytoself.zarr")
    assert (store.obs.groupby("fov_id").size() <= 2).all()
    assert store["protein"].dtype == np.float32
    # stratified: every protein with >= 3 fields of view is in all three splits
    assert (store.obs.groupby("protein_id")["split"].nunique() == 3).all()
    assert not (out / "celle.zarr").exists()


def test_channel_order_and_axes_options(fov_dir):
    """Files with the protein first (and axes metadata that lies) give the same crops once told so."""
    table = read_table(fov_dir / "fovs.csv").iloc[:3].copy()  # P1's three 2-D projections
    write_table(table, fov_dir / "ref.csv")
    swapped = []
    for row in table.itertuples(index=False):
        arr = read_image(fov_dir / row.path)
        path = f"fovs/{row.fov_id}_swapped.tif"
        write_tiff(fov_dir / path, arr[::-1].copy(), axes="ZYX")  # protein first, channels labelled as slices
        swapped.append({**row._asdict(), "path": path})
    write_table(pd.DataFrame(swapped), fov_dir / "swapped.csv")
    ref = prepare(fov_dir / "ref.csv", fov_dir / "r", config=_cfg(celle=False), progress=False)
    got = prepare(
        fov_dir / "swapped.csv",
        fov_dir / "s",
        config=_cfg(celle=False, channel_order="protein,nucleus", axes="CYX"),
        progress=False,
    )
    assert got["cytoself_crops"] == ref["cytoself_crops"] > 0
    a, b = CropStore.open(fov_dir / "r" / "cytoself.zarr"), CropStore.open(fov_dir / "s" / "cytoself.zarr")
    np.testing.assert_array_equal(a["protein"][:], b["protein"][:])
    with pytest.raises(ConfigError, match="channel_order"):
        _cfg(channel_order="dapi,gfp")
    with pytest.raises(ConfigError, match="axes"):
        _cfg(axes="QYX")


def test_empty_sequence_cells_are_missing_not_the_residues_nan(fov_dir):
    table = read_table(fov_dir / "fovs.csv")
    seqs = [SEQS[p] for p in table["protein_id"]]
    seqs[0] = ""  # another row of P1 carries its sequence
    write_table(table.assign(sequence=seqs), fov_dir / "with_seq.csv")
    prepare(fov_dir / "with_seq.csv", fov_dir / "o1", config=_cfg(cytoself=False), progress=False)
    assert read_fasta(fov_dir / "o1" / "sequences.fasta") == SEQS
    # a protein whose every cell is empty is named, not read as "NAN"
    seqs = ["" if p == "P3" else SEQS[p] for p in table["protein_id"]]
    write_table(table.assign(sequence=seqs), fov_dir / "no_p3.csv")
    with pytest.raises(InputError, match="no sequence for protein 'P3'"):
        prepare(fov_dir / "no_p3.csv", fov_dir / "o2", config=_cfg(cytoself=False), progress=False)


def test_sequences_may_be_a_table(fov_dir):
    write_table(pd.DataFrame({"protein_id": list(SEQS), "sequence": list(SEQS.values())}), fov_dir / "s.tsv")
    prepare(
        fov_dir / "fovs.csv", fov_dir / "o", config=_cfg(cytoself=False), sequences=fov_dir / "s.tsv", progress=False
    )
    assert read_fasta(fov_dir / "o" / "sequences.fasta") == SEQS
    write_table(
        pd.DataFrame({"protein_id": ["P1", "P2", "P3"], "sequence": [SEQS["P1"], "", SEQS["P3"]]}), fov_dir / "bad.csv"
    )
    with pytest.raises(InputError, match=r"bad.csv: row 1: required column 'sequence' is empty"):
        prepare(
            fov_dir / "fovs.csv",
            fov_dir / "o3",
            config=_cfg(cytoself=False),
            sequences=fov_dir / "bad.csv",
            progress=False,
        )


def test_prepare_celle_split_follows_a_partition_column(fov_dir):
    table = read_table(fov_dir / "fovs.csv")
    part = {"P1": "train", "P2": "test", "P3": "val"}
    table["partition"] = table["protein_id"].map(part)
    write_table(table, fov_dir / "fovs_part.csv")
    out = fov_dir / "out"
    # the default (auto) takes the partition; cytoself keeps its split by field of view
    prepare(fov_dir / "fovs_part.csv", out, config=_cfg(), sequences=fov_dir / "seqs.fasta", progress=False)
    obs = CropStore.open(out / "celle.zarr").obs
    assert dict(obs.groupby("protein_id")["split"].first()) == part
    prot = read_table(out / "proteins.csv")
    assert dict(zip(prot["protein_id"], prot["celle_split"], strict=True)) == part
    # without the column, auto splits by protein (no protein in two splits)
    out2 = fov_dir / "out2"
    prepare(fov_dir / "fovs.csv", out2, config=_cfg(), sequences=fov_dir / "seqs.fasta", progress=False)
    assert (CropStore.open(out2 / "celle.zarr").obs.groupby("protein_id")["split"].nunique() == 1).all()
    # a bad or inconsistent partition names the row and protein
    table.loc[1, "partition"] = "test"
    write_table(table, fov_dir / "fovs_bad.csv")
    with pytest.raises(InputError, match="row 2: protein 'P1'"):
        prepare(
            fov_dir / "fovs_bad.csv", fov_dir / "o3", config=_cfg(), sequences=fov_dir / "seqs.fasta", progress=False
        )
    table.loc[1, "partition"] = "holdout"
    write_table(table, fov_dir / "fovs_bad.csv")
    with pytest.raises(InputError, match="'holdout'"):
        prepare(
            fov_dir / "fovs_bad.csv", fov_dir / "o4", config=_cfg(), sequences=fov_dir / "seqs.fasta", progress=False
        )
    with pytest.raises(InputError, match="no 'partition' column"):
        prepare(
            fov_dir / "fovs.csv",
            fov_dir / "o5",
            config=_cfg(**{"celle_split.by": "partition"}),
            sequences=fov_dir / "seqs.fasta",
            progress=False,
        )

"""protloc.data.imports: cytoself's released crops and CELL-E manifests -> crop stores."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pandas as pd
import pytest

from protloc._fs import OUTPUT_MARKER
from protloc.cli import main
from protloc.data.datasets import CelleDataset, CropDataset, make_label_map
from protloc.data.imports import import_celle_manifest, import_cytoself_crops, scale_distance
from protloc.data.io import CropStore, read_table, save_npy, write_tiff
from protloc.data.preprocess import normalize_distance
from protloc.data.sequences import read_fasta
from protloc.data.splits import split_by_fov, split_by_protein
from protloc.errors import InputError

S = 32  # crop side of the synthetic cytoself files (the real ones are 100)
PROTEINS = ("NPM1", "LMNB1", "TOMM20")
SEQS = {"NPM1": "MEDSMDMDMSPLRPQNYLFG", "LMNB1": "MATATPVPPRMGSRAGGPTTPLSP", "TOMM20": "MVGRNSAIAAGVCGALFIGY"}


def _crops(rng: np.random.Generator, n: int, size: int = S) -> dict[str, np.ndarray]:
    """Released-like crops: raw intensities and a signed distance in pixels."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    dist = np.repeat((size / 4 - r)[None], n, axis=0) * rng.uniform(0.8, 1.2, size=(n, 1, 1))
    return {
        "protein": (rng.random((n, size, size)) * 1000 + 50).astype(np.float32),
        "nucleus": (rng.random((n, size, size)) * 3000).astype(np.float32),
        "nucleus_distance": dist.astype(np.float32),
    }


def _labels(pids: list[str], fovs: list | None) -> pd.DataFrame:
    n = len(pids)
    table = pd.DataFrame(
        {
            "ensg": [f"ENSG{PROTEINS.index(p):05d}" for p in pids],
            "name": pids,
            "loc_grade1": ["nucleolus" if p == "NPM1" else "membrane" for p in pids],
            "protein_id": list(range(n)),  # OpenCell's own numbering, replaced by the name
        }
    )
    if fovs is not None:
        table["FOV_id"] = fovs
    return table


def _write_stacks(
    folder, *, per_fov: int = 3, fovs_per_protein: int = 4, with_fov: bool = True, size: int = S, seed: int = 0
) -> dict[str, np.ndarray]:
    """Two Image_data/Label_data pairs; FOV_id numbered per protein (0, 1, ...) as in a per-protein release."""
    rng = np.random.default_rng(seed)
    pids, fovs = [], []
    for p in PROTEINS:
        for f in range(fovs_per_protein):
            pids += [p] * per_fov
            fovs += [f] * per_fov
    n = len(pids)
    crops = _crops(rng, n, size)
    images = np.stack(
        [
            crops["protein"],
            crops["nucleus"],
            crops["nucleus_distance"],
            (crops["nucleus_distance"] > 0).astype(np.float32),
        ],
        axis=-1,
    )
    folder.mkdir(parents=True, exist_ok=True)
    cut = n // 2 + 1
    for k, (a, b) in enumerate(((0, cut), (cut, n))):
        save_npy(folder / f"Image_data{k:02d}.npy", images[a:b])
        _labels(pids[a:b], fovs[a:b] if with_fov else None).to_csv(folder / f"Label_data{k:02d}.csv", index=False)
    return crops


def _write_protein(
    folder, name: str, *, fovs: list | None, size: int = S, seed: int = 0, one_label_row: bool = False
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = len(fovs) if fovs is not None else 5
    crops = _crops(rng, n, size)
    folder.mkdir(parents=True, exist_ok=True)
    for key, suffix in (("protein", "_pro"), ("nucleus", "_nuc"), ("nucleus_distance", "_nucdist")):
        save_npy(folder / f"{name}{suffix}.npy", crops[key])
    labels = _labels([name] * n, fovs)
    (labels.iloc[:1] if one_label_row else labels).to_csv(folder / f"{name}_label.csv", index=False)
    return crops


def _fov_together(obs: pd.DataFrame) -> None:
    assert (obs.groupby(["protein_id", "fov_id"])["split"].nunique() == 1).all()


# ------------------------------------------------------------------------------------------ cytoself


def test_cytoself_stacks_round_trip(tmp_path):
    crops = _write_stacks(tmp_path / "released")
    out = tmp_path / "out"
    summary = import_cytoself_crops(tmp_path / "released", out, crop_size=S, progress=False)

    store = CropStore.open(out / "cytoself.zarr")
    n = 3 * 4 * 3
    assert len(store) == n == summary["cytoself_crops"]
    assert store.channels == ["protein", "nucleus", "nucleus_distance"] and store.size == S
    assert sorted(p.name for p in out.iterdir()) == [
        ".protloc-output",
        "cytoself.csv",
        "cytoself.zarr",
        "proteins.csv",
        "summary.json",
    ]
    obs = store.obs
    assert {"crop_index", "protein_id", "fov_id", "split", "label", "source", "source_row"} <= set(obs.columns)
    assert obs["protein_id"].tolist()[:3] == ["NPM1"] * 3 and obs["label"].iloc[0] == "nucleolus"
    assert obs["source"].iloc[0] == "Image_data00.npy" and obs["source"].iloc[-1] == "Image_data01.npy"
    # FOV_id is numbered per protein, so fields are named protein/FOV and never merged across proteins
    assert summary["fov_names"] == "protein_id/FOV_id" and summary["fovs"] == 12
    assert obs["fov_id"].iloc[0] == "NPM1/0"
    _fov_together(obs)
    assert set(obs["split"]) == {"train", "val", "test"}
    # the split is prepare's: split_by_fov over the fields of view
    expected = split_by_fov(list(dict.fromkeys(obs["fov_id"])), seed=0)
    assert obs["split"].tolist() == [expected[f] for f in obs["fov_id"]]

    # values: prepare's ranges and dtype, crops in release order
    data = store.read(slice(None))
    assert data["protein"].dtype == np.float16
    assert data["protein"].min() == 0 and data["protein"].max() == 1
    assert data["nucleus_distance"].min() == -1 and data["nucleus_distance"].max() == 1
    raw = crops["protein"][5]
    np.testing.assert_allclose(data["protein"][5], (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-3)
    np.testing.assert_allclose(data["nucleus_distance"][7], normalize_distance(crops["nucleus_distance"][7]), atol=1e-3)

    proteins = read_table(out / "proteins.csv")
    assert proteins.columns.tolist() == ["protein_id", "label", "n_cytoself_crops"]
    assert proteins["n_cytoself_crops"].tolist() == [12, 12, 12]
    assert json.loads((out / "summary.json").read_text()) == summary

    ds = CropDataset(
        out / "cytoself.zarr", split="train", channels=("protein", "nucleus_distance"), label_map=make_label_map(obs)
    )
    item = ds[0]
    assert tuple(item["image"].shape) == (2, S, S) and int(item["label"]) >= 0


def test_cytoself_per_protein_round_trip(tmp_path):
    src = tmp_path / "released"
    _write_protein(src, "NPM1", fovs=["a1", "a1", "a2", "a3", "a3"], seed=1)
    _write_protein(src, "LMNB1", fovs=["b1", "b2", "b2", "b3"], seed=2)
    _write_protein(src, "TOMM20", fovs=["c1"] * 5, seed=3, one_label_row=True)  # one row for all 5 crops
    summary = import_cytoself_crops(src, tmp_path / "out", crop_size=S, store_dtype="float32", seed=3, progress=False)
    store = CropStore.open(tmp_path / "out" / "cytoself.zarr")
    obs = store.obs
    assert len(store) == 5 + 4 + 5 and summary["fovs"] == 7 and summary["fov_names"] == "FOV_id"
    # proteins in file-name order; FOV_id kept as released when no id repeats across proteins
    assert obs["protein_id"].tolist() == ["LMNB1"] * 4 + ["NPM1"] * 5 + ["TOMM20"] * 5
    assert obs["fov_id"].tolist()[:4] == ["b1", "b2", "b2", "b3"]
    assert obs["source"].iloc[0] == "LMNB1_pro.npy" and obs["source_row"].tolist()[:4] == [0, 1, 2, 3]
    _fov_together(obs)
    assert store.read(0)["protein"].dtype == np.float32
    ds = CropDataset(store, split=None, channels=("protein", "nucleus", "nucleus_distance"), label_map=None)
    assert tuple(ds[13]["image"].shape) == (3, S, S)


def test_cytoself_as_released_and_seeds(tmp_path):
    crops = _write_stacks(tmp_path / "released", fovs_per_protein=10, per_fov=1)
    a = import_cytoself_crops(
        tmp_path / "released", tmp_path / "a", crop_size=S, rescale=False, store_dtype="float32", progress=False
    )
    assert not a["rescaled"]
    np.testing.assert_array_equal(
        CropStore.open(tmp_path / "a" / "cytoself.zarr").read(4)["nucleus"], crops["nucleus"][4]
    )
    import_cytoself_crops(tmp_path / "released", tmp_path / "b", crop_size=S, seed=1, progress=False)
    split_a = CropStore.open(tmp_path / "a" / "cytoself.zarr").obs["split"]
    split_b = CropStore.open(tmp_path / "b" / "cytoself.zarr").obs["split"]
    assert not split_a.equals(split_b)  # another seed, another split


def test_scale_distance_is_normalize_distance():
    rng = np.random.default_rng(0)
    d = rng.normal(0, 10, size=(6, 9, 9)).astype(np.float32)
    d[1] = np.abs(d[1])  # inside only
    d[2] = -np.abs(d[2])  # outside only
    d[3] = 0
    got = scale_distance(d)
    for k in range(len(d)):
        np.testing.assert_array_equal(got[k], normalize_distance(d[k]))


def test_cytoself_missing_fov_refused_or_split_by_crop(tmp_path, caplog):
    _write_stacks(tmp_path / "released", with_fov=False)
    with pytest.raises(InputError, match=r"Label_data00\.csv: has no FOV_id column.*--split-by-crop"):
        import_cytoself_crops(tmp_path / "released", tmp_path / "out", crop_size=S, progress=False)
    assert not (tmp_path / "out").exists()
    with caplog.at_level(logging.WARNING, logger="protloc"):
        summary = import_cytoself_crops(
            tmp_path / "released", tmp_path / "out", crop_size=S, allow_crop_split=True, progress=False
        )
    assert "split crop by crop" in caplog.text
    assert summary["crops_without_fov"] == 36 and summary["fovs"] == 0
    obs = CropStore.open(tmp_path / "out" / "cytoself.zarr").obs
    assert obs["fov_id"].is_unique and set(obs["split"]) == {"train", "val", "test"}


def _existing_output(tmp_path):
    """A previous protloc output (it holds the marker, so --overwrite may replace it)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous output")
    (out / OUTPUT_MARKER).write_text("{}")
    return out


def _untouched(out) -> bool:
    names = sorted(p.name for p in out.iterdir())
    return names == [OUTPUT_MARKER, "keep.txt"] and (out / "keep.txt").read_text() == "previous output"


def test_cytoself_existing_output(tmp_path):
    _write_stacks(tmp_path / "released")
    out = _existing_output(tmp_path)
    with pytest.raises(InputError, match=r"out: output already exists and is not empty.*--overwrite"):
        import_cytoself_crops(tmp_path / "released", out, crop_size=S, progress=False)
    assert _untouched(out)
    import_cytoself_crops(tmp_path / "released", out, crop_size=S, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and CropStore.open(out / "cytoself.zarr")
    empty = tmp_path / "empty"
    empty.mkdir()
    import_cytoself_crops(tmp_path / "released", empty, crop_size=S, progress=False)  # an empty folder is fine
    with pytest.raises(InputError, match="holds the input"):
        import_cytoself_crops(tmp_path / "released", tmp_path / "released", crop_size=S, overwrite=True, progress=False)


def _bad_label_rows(src):
    labels = pd.read_csv(src / "Label_data01.csv")
    labels.iloc[:-1].to_csv(src / "Label_data01.csv", index=False)


def _bad_nan(src):
    images = np.load(src / "Image_data01.npy")
    images[4, 3, 3, 2] = np.nan
    save_npy(src / "Image_data01.npy", images)


def _bad_empty_fov(src):
    labels = pd.read_csv(src / "Label_data00.csv")
    labels.loc[2, "FOV_id"] = np.nan
    labels.to_csv(src / "Label_data00.csv", index=False)


def _bad_missing_partner(src):
    (src / "Label_data01.csv").unlink()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_bad_label_rows, r"Label_data01\.csv: Image_data01\.npy holds 17 images but Label_data01\.csv has 16 rows"),
        (_bad_nan, r"Image_data01\.npy: row 4: crop 4 has NaN or infinite values in channel 'nucleus_distance'"),
        (_bad_empty_fov, r"Label_data00\.csv: row 2: empty FOV_id"),
        (_bad_missing_partner, r"Image_data01\.npy: no matching Label_data file"),
    ],
)
def test_cytoself_stacks_bad_input(tmp_path, damage, message):
    src = tmp_path / "released"
    _write_stacks(src)
    damage(src)
    out = _existing_output(tmp_path)
    with pytest.raises(InputError, match=message):
        import_cytoself_crops(src, out, crop_size=S, overwrite=True, progress=False)
    assert _untouched(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_cytoself_per_protein_bad_input(tmp_path):
    src = tmp_path / "released"
    out = _existing_output(tmp_path)

    def fails(message: str) -> None:
        with pytest.raises(InputError, match=message):
            import_cytoself_crops(src, out, crop_size=S, overwrite=True, progress=False)
        assert _untouched(out)

    _write_protein(src, "NPM1", fovs=["a", "a", "b"])
    (src / "NPM1_nucdist.npy").unlink()
    fails(r"NPM1_nucdist\.npy: file not found; importing protein 'NPM1' needs")
    _write_protein(src, "NPM1", fovs=["a", "a", "b"], size=40)  # wrong crop size
    fails(r"NPM1_pro\.npy: crops are 40 x 40 pixels, expected 32 x 32")
    _write_protein(src, "NPM1", fovs=["a", "a", "b"])
    pd.read_csv(src / "NPM1_label.csv").iloc[:2].to_csv(src / "NPM1_label.csv", index=False)
    fails(r"NPM1_label\.csv: has 2 rows but .*NPM1_pro\.npy holds 3 crops")
    _write_protein(src, "NPM1", fovs=["a", "a", "b"])
    save_npy(src / "NPM1_nuc.npy", np.zeros((2, S, S), np.float32))
    fails(r"NPM1_nuc\.npy: shape \(2, 32, 32\) differs")
    _write_protein(src, "NPM1", fovs=["a", "a", "b"])
    pro = np.load(src / "NPM1_pro.npy")
    pro[2, 0, 0] = np.inf
    save_npy(src / "NPM1_pro.npy", pro)
    fails(r"NPM1_pro\.npy: row 2: crop 2 has NaN or infinite values in channel 'protein'")
    _write_protein(src, "NPM1", fovs=["a", "a", "b"])
    _write_stacks(src)
    fails(r"released: holds both cytoself layouts")
    with pytest.raises(InputError, match=r"nowhere: folder not found"):
        import_cytoself_crops(tmp_path / "nowhere", tmp_path / "x", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no cytoself crops found"):
        import_cytoself_crops(tmp_path / "empty", tmp_path / "x", progress=False)


def test_cytoself_default_size_is_100(tmp_path):
    _write_stacks(tmp_path / "released")  # 32 px crops
    with pytest.raises(InputError, match=r"Image_data00\.npy: crops are 32 x 32 pixels, expected 100 x 100"):
        import_cytoself_crops(tmp_path / "released", tmp_path / "out", progress=False)


# -------------------------------------------------------------------------------------------- CELL-E


def _write_manifest(folder, *, split: bool = True, sizes=None, fmt: str = "tif", seed: int = 0) -> pd.DataFrame:
    """8 image pairs of 3 proteins; one sequence via metadata_json. Returns the raw images (nucleus, protein)."""
    rng = np.random.default_rng(seed)
    pids = ["NPM1", "NPM1", "NPM1", "LMNB1", "LMNB1", "TOMM20", "TOMM20", "TOMM20"]
    sizes = sizes or [(48, 48)] * 4 + [(48, 60), (56, 48), (48, 48), (48, 48)]
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows, raw = [], []
    for i, (pid, (h, w)) in enumerate(zip(pids, sizes, strict=True)):
        nuc = (rng.random((h, w)) * 4000).astype(np.uint16)
        pro = (rng.random((h, w)) * 1000).astype(np.uint16)
        for name, img in (("nuc", nuc), ("pro", pro)):
            path = folder / "img" / f"{i}_{name}.{fmt}"
            write_tiff(path, img, axes="YX") if fmt == "tif" else save_npy(path, img.astype(np.float32))
        row = {
            "nucleus_image": f"img/{i}_nuc.{fmt}",
            "protein_image": f"img/{i}_pro.{fmt}",
            "protein_id": pid,
            "sequence": SEQS[pid],
            "metadata_json": "",
            "label": "nucleolus" if pid == "NPM1" else "",
        }
        if split:
            row["split"] = "val" if pid == "LMNB1" else "train"
        rows.append(row)
        raw.append((nuc, pro))
    # one row takes its sequence from a JSON file
    (folder / "tomm20.json").write_text(json.dumps({"sequence": SEQS["TOMM20"]}))
    rows[7]["sequence"], rows[7]["metadata_json"] = "", "tomm20.json"
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return raw


def test_celle_manifest_round_trip(tmp_path):
    raw = _write_manifest(tmp_path)
    out = tmp_path / "out"
    summary = import_celle_manifest(tmp_path / "manifest.csv", out, image_size=48, progress=False)
    assert summary["celle_crops"] == 8 and summary["split_from"] == "manifest" and summary["centre_cropped"] == 2
    assert sorted(p.name for p in out.iterdir()) == [
        ".protloc-output",
        "celle.csv",
        "celle.zarr",
        "proteins.csv",
        "sequences.fasta",
        "summary.json",
    ]
    store = CropStore.open(out / "celle.zarr")
    assert store.channels == ["nucleus", "protein", "threshold"] and store.size == 48
    obs = store.obs
    assert obs["split"].tolist() == ["train"] * 3 + ["val"] * 2 + ["train"] * 3
    assert obs["fov_id"].iloc[0] == "img/0_pro.tif" and obs["manifest_row"].tolist() == list(range(8))
    assert obs["label"].iloc[0] == "nucleolus"
    data = store.read(slice(None))
    assert data["nucleus"].dtype == np.float16 and data["threshold"].dtype == np.uint8
    assert data["protein"].min() >= 0 and data["protein"].max() <= 1
    # row 4 is 48 x 60: centre-cropped to columns 6..54; threshold = raw protein >= its mean
    pro = raw[4][1][:, 6:54].astype(np.float64)
    np.testing.assert_array_equal(data["threshold"][4], (pro >= pro.mean()).astype(np.uint8))
    np.testing.assert_allclose(data["protein"][4], (pro - pro.min()) / (pro.max() - pro.min()), atol=1e-3)

    seqs = read_fasta(out / "sequences.fasta")
    assert seqs == {p: SEQS[p] for p in ("NPM1", "LMNB1", "TOMM20")}
    proteins = read_table(out / "proteins.csv")
    assert proteins.columns.tolist() == ["protein_id", "label", "celle_split", "n_celle_crops", "length", "sequence"]
    assert proteins["n_celle_crops"].tolist() == [3, 2, 3] and proteins["celle_split"].tolist()[1] == "val"

    ds = CelleDataset(out / "celle.zarr", split="train", sequences=seqs, image_size=32, crop_size=40, augment=True)
    item = ds[0]
    assert tuple(item["nucleus"].shape) == (1, 32, 32) and item["sequence"] == SEQS["NPM1"]
    assert len(CelleDataset(store, split="val", sequences=seqs, image_size=48)) == 2


def test_celle_manifest_protein_split(tmp_path):
    _write_manifest(tmp_path, split=False, fmt="npy")
    summary = import_celle_manifest(tmp_path / "manifest.csv", tmp_path / "out", image_size=40, seed=2, progress=False)
    obs = CropStore.open(tmp_path / "out" / "celle.zarr").obs
    assert summary["split_from"] == "by protein" and summary["centre_cropped"] == 8
    expected = split_by_protein(["NPM1", "LMNB1", "TOMM20"], seed=2)
    assert obs["split"].tolist() == [expected[p] for p in obs["protein_id"]]
    assert (obs.groupby("protein_id")["split"].nunique() == 1).all()
    # a split column is ignored on request
    _write_manifest(tmp_path / "with_split")
    summary = import_celle_manifest(
        tmp_path / "with_split" / "manifest.csv",
        tmp_path / "out2",
        image_size=40,
        keep_split=False,
        seed=2,
        progress=False,
    )
    assert summary["split_from"] == "by protein"


def test_celle_manifest_bad_input(tmp_path):
    out = _existing_output(tmp_path)
    manifest = tmp_path / "manifest.csv"

    def fails(message: str, **kw) -> None:
        with pytest.raises(InputError, match=message):
            import_celle_manifest(manifest, out, image_size=48, overwrite=True, progress=False, **kw)
        assert _untouched(out)

    _write_manifest(tmp_path)
    with pytest.raises(
        InputError,
        match=r"manifest\.csv: row 0: images .*0_nuc\.tif and .*0_pro\.tif are 48 x 48 "
        r"pixels, smaller than the 64 x 64 crops",
    ):
        import_celle_manifest(manifest, out, image_size=64, overwrite=True, progress=False)
    assert _untouched(out)

    write_tiff(tmp_path / "img" / "3_nuc.tif", np.ones((50, 48), np.uint16), axes="YX")
    fails(
        r"manifest\.csv: row 3: nucleus image .*3_nuc\.tif is 50 x 48 pixels but protein image .*3_pro\.tif "
        r"is 48 x 48"
    )

    _write_manifest(tmp_path, fmt="npy")
    save_npy(tmp_path / "img" / "2_pro.npy", np.full((48, 48), np.nan, np.float32))
    fails(r"manifest\.csv: row 2: .*2_pro\.npy: .*(NaN|non-finite|infinite)")

    _write_manifest(tmp_path)
    (tmp_path / "img" / "5_pro.tif").unlink()
    fails(r"manifest\.csv: row 5: protein_image file not found")

    _write_manifest(tmp_path)
    df = pd.read_csv(tmp_path / "manifest.csv", keep_default_na=False)
    df.loc[1, "sequence"] = "MKTAYIAKQRQ"
    df.to_csv(manifest, index=False)
    fails(r"manifest\.csv: row 1: protein 'NPM1' has a different sequence than in row 0")
    df.loc[1, "sequence"] = "MKT4Y"
    df.to_csv(manifest, index=False)
    fails(r"manifest\.csv: row 1: sequence 'NPM1': invalid residue '4' at position 4")
    df.loc[1, "sequence"] = SEQS["NPM1"]
    df.loc[1, "protein_id"] = "NPM 1"
    df.to_csv(manifest, index=False)
    fails(r"manifest\.csv: row 1: protein_id 'NPM 1' contains whitespace")
    df.loc[1, "protein_id"] = "NPM1"
    df.loc[6, "split"] = "holdout"
    df.to_csv(manifest, index=False)
    fails(r"manifest\.csv: row 6: split 'holdout' is not one of train, val, test")
    df.loc[6, "split"] = "train"
    df.to_csv(manifest, index=False)
    import_celle_manifest(manifest, out, image_size=48, overwrite=True, progress=False)  # repaired: it works
    assert CropStore.open(out / "celle.zarr") and not (out / "keep.txt").exists()


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_import_then_train_and_embed(tmp_path, capsys):
    _write_stacks(tmp_path / "released", size=100, per_fov=2)
    data = tmp_path / "cytoself_data"
    assert main(["-q", "import", "cytoself-crops", "--src", str(tmp_path / "released"), "--out", str(data)]) == 0
    printed = capsys.readouterr().out
    assert "== imported cytoself crops ==" in printed and re.search(r"cytoself_crops\s+24", printed)
    store = data / "cytoself.zarr"
    run = tmp_path / "run"
    rc = main(
        [
            "-q",
            "train",
            "cytoself",
            "--store",
            str(store),
            "--out",
            str(run),
            "--set",
            "schedule.max_steps=2",
            "--set",
            "schedule.eval_every=1",
            "--set",
            "data.batch_size=4",
            "--set",
            "data.chunk_window=2",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert (run / "best" / "model.safetensors").is_file()
    assert json.loads((run / "label_map.json").read_text()) == {"LMNB1": 0, "NPM1": 1, "TOMM20": 2}
    emb = tmp_path / "emb.h5ad"
    assert main(["-q", "embed", "--checkpoint", str(run), "--store", str(store), "--out", str(emb)]) == 0
    assert emb.is_file()

    # an existing output: one line, exit status 2, the folder untouched
    capsys.readouterr()
    assert main(["-q", "import", "cytoself-crops", "--src", str(tmp_path / "released"), "--out", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0] and "--overwrite" in err[0]
    assert len(CropStore.open(store)) == 24


def test_cli_import_celle_manifest(tmp_path, capsys):
    _write_manifest(tmp_path)
    out = tmp_path / "celle_data"
    assert (
        main(
            [
                "-q",
                "import",
                "celle-manifest",
                "--manifest",
                str(tmp_path / "manifest.csv"),
                "--out",
                str(out),
                "--image-size",
                "48",
                "--ignore-split",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert "== imported CELL-E manifest ==" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split_from"] == "by protein" and summary["image_size"] == 48
    assert len(CropStore.open(out / "celle.zarr")) == 8
    rc = main(
        ["-q", "import", "celle-manifest", "--manifest", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o2")]
    )
    assert rc == 2 and "nope.csv" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()

"""Tests for protloc.data.opencell: fields of view, cytoself crops, CELL-E manifests."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import tifffile

from protloc.data.io import save_npy, write_png, write_table, write_tiff
from protloc.data.opencell import (
    CytoselfStacks,
    FieldOfView,
    list_cytoself_proteins,
    load_celle_images,
    read_celle_manifest,
    read_cytoself_protein,
    read_fov,
)
from protloc.errors import InputError

RNG = np.random.default_rng(1)


def names(path) -> str:
    return re.escape(str(path))


def two_channels(z: int | None = 3, y: int = 12, x: int = 10):
    """Distinct nucleus / protein images (nucleus even, protein odd values) to check channel order."""
    shape = (y, x) if z is None else (z, y, x)
    nucleus = (RNG.integers(0, 1000, size=shape) * 2).astype(np.uint16)
    protein = (RNG.integers(0, 1000, size=shape) * 2 + 1).astype(np.uint16)
    return nucleus, protein


# ------------------------------------------------------------------------------- fields of view


def test_read_stack_zcyx(tmp_path):
    nuc, pro = two_channels(z=4)
    path = write_tiff(tmp_path / "a_stack.tif", np.stack([nuc, pro], axis=1), axes="ZCYX")
    fov = read_fov(path)
    assert isinstance(fov, FieldOfView) and fov.is_stack and fov.path == path
    assert fov.nucleus.shape == (4, 12, 10) and fov.nucleus.dtype == np.uint16
    np.testing.assert_array_equal(fov.nucleus, nuc)
    np.testing.assert_array_equal(fov.protein, pro)


def test_read_projection_cyx(tmp_path):
    nuc, pro = two_channels(z=None)
    path = write_tiff(tmp_path / "a_proj.tif", np.stack([nuc, pro]), axes="CYX")
    fov = read_fov(path)
    assert not fov.is_stack
    np.testing.assert_array_equal(fov.nucleus, nuc)
    np.testing.assert_array_equal(fov.protein, pro)


def test_channel_order_option(tmp_path):
    nuc, pro = two_channels(z=2)
    path = write_tiff(tmp_path / "b_stack.tif", np.stack([pro, nuc], axis=1), axes="ZCYX")
    fov = read_fov(path, channels=("protein", "nucleus"))
    np.testing.assert_array_equal(fov.nucleus, nuc)
    np.testing.assert_array_equal(fov.protein, pro)
    with pytest.raises(InputError, match=names(path) + r".*'nucleus' and 'protein'"):
        read_fov(path, channels=("protein", "dapi"))


@pytest.mark.parametrize(
    ("layout", "stack"),
    [
        ("ZCYX", True),  # z = 5, c = 2
        ("CZYX", True),
        ("CYX", False),
        ("YXC", False),
    ],
)
def test_axes_inferred_without_metadata(tmp_path, layout, stack):
    nuc, pro = two_channels(z=5 if stack else None)
    canonical = "ZCYX" if stack else "CYX"
    data = np.stack([nuc, pro], axis=canonical.index("C"))
    data = np.moveaxis(data, [canonical.index(a) for a in layout], range(len(layout)))
    path = tmp_path / "raw.tif"
    # tifffile's shape-only metadata (axes "QQYX"): no axes names, so the shape alone decides
    tifffile.imwrite(path, data, photometric="minisblack")
    with tifffile.TiffFile(path) as tif:
        assert set(tif.series[0].axes) <= set("QYX")
    fov = read_fov(path)
    assert fov.is_stack == stack
    np.testing.assert_array_equal(fov.nucleus, nuc)
    np.testing.assert_array_equal(fov.protein, pro)


def test_npy_fov_inferred(tmp_path):
    nuc, pro = two_channels(z=None)
    path = save_npy(tmp_path / "fov.npy", np.stack([nuc, pro], axis=-1))
    fov = read_fov(path)
    np.testing.assert_array_equal(fov.protein, pro)


def test_axes_argument_overrides_wrong_metadata(tmp_path):
    # ImageJ often saves a 2-channel image as a 2-slice z-stack
    nuc, pro = two_channels(z=None)
    path = write_tiff(tmp_path / "ij.tif", np.stack([nuc, pro]), axes="ZYX")
    with pytest.raises(InputError, match=names(path) + r".*no channel axis.*axes ZYX.*--set axes="):
        read_fov(path)
    fov = read_fov(path, axes="CYX")
    np.testing.assert_array_equal(fov.nucleus, nuc)
    np.testing.assert_array_equal(fov.protein, pro)


def test_singleton_time_axis_dropped(tmp_path):
    nuc, pro = two_channels(z=3)
    data = np.stack([nuc, pro], axis=1)[None]
    path = write_tiff(tmp_path / "t.tif", data, axes="TZCYX")
    fov = read_fov(path)
    assert fov.is_stack
    np.testing.assert_array_equal(fov.protein, pro)


def test_fov_three_channels(tmp_path):
    path = write_tiff(tmp_path / "c3.tif", np.zeros((4, 3, 6, 6), np.uint16) + 1, axes="ZCYX")
    with pytest.raises(InputError, match=names(path) + r".*exactly 2 channels.*found 3.*\(4, 3, 6, 6\)"):
        read_fov(path)


def test_fov_single_channel_2d(tmp_path):
    path = write_tiff(tmp_path / "one.tif", np.ones((6, 7), np.uint16))
    with pytest.raises(InputError, match=names(path) + r".*2-D single-channel image \(shape \(6, 7\)\)"):
        read_fov(path)


def test_fov_ambiguous_3d(tmp_path):
    path = tmp_path / "zyx.tif"
    tifffile.imwrite(path, np.ones((5, 6, 7), np.uint16), photometric="minisblack", metadata=None)
    with pytest.raises(InputError, match=names(path) + r".*2 channels.*\(5, 6, 7\)"):
        read_fov(path)


def test_fov_bad_axes_argument(tmp_path):
    path = write_tiff(tmp_path / "p.tif", np.ones((2, 6, 7), np.uint16), axes="CYX")
    with pytest.raises(InputError, match=names(path) + r".*axes 'ZCYX' do not fit.*\(2, 6, 7\)"):
        read_fov(path, axes="ZCYX")


def test_fov_missing_and_corrupt(tmp_path):
    with pytest.raises(InputError, match=r"gone_stack\.tif.*not found"):
        read_fov(tmp_path / "gone_stack.tif")
    bad = tmp_path / "bad_stack.tif"
    bad.write_bytes(b"garbage" * 20)
    with pytest.raises(InputError, match=names(bad) + r".*corrupt"):
        read_fov(bad)


# -------------------------------------------------------------------------- cytoself per protein


def write_protein(folder, name, n=3, *, label_rows=None, nuc=True, nucdist=True):
    pro = RNG.random((n, 100, 100)).astype(np.float32)
    save_npy(folder / f"{name}_pro.npy", pro)
    if nuc:
        save_npy(folder / f"{name}_nuc.npy", RNG.random((n, 100, 100)).astype(np.float32))
    if nucdist:
        save_npy(folder / f"{name}_nucdist.npy", RNG.random((n, 100, 100)).astype(np.float32) * 2 - 1)
    rows = n if label_rows is None else label_rows
    labels = pd.DataFrame(
        {
            "ensg": ["ENSG00000001"] * rows,
            "name": [name] * rows,
            "loc_grade1": ["nucleoplasm;nucleolus"] * rows,
            "loc_grade2": ["cytoplasm"] * rows,
            "protein_id": [412] * rows,
            "FOV_id": [f"{i:04d}" for i in range(rows)],
        }
    )
    write_table(labels, folder / f"{name}_label.csv")
    return pro


def test_cytoself_protein(tmp_path):
    pro = write_protein(tmp_path, "LMNB1")
    write_protein(tmp_path, "ACTB", nuc=False, nucdist=False)
    (tmp_path / "notes.txt").write_text("x")
    assert list_cytoself_proteins(tmp_path) == ["ACTB", "LMNB1"]
    out = read_cytoself_protein(tmp_path, "LMNB1")
    assert set(out) == {"protein", "nucleus", "nucleus_distance", "obs"}
    assert isinstance(out["protein"], np.memmap)
    np.testing.assert_array_equal(out["protein"], pro)
    obs = out["obs"]
    assert len(obs) == 3
    assert obs["protein_id"].tolist() == ["LMNB1"] * 3
    assert obs["label"].tolist() == ["nucleoplasm;nucleolus"] * 3
    assert obs["orig_protein_id"].tolist() == [412] * 3
    assert obs["fov_id"].tolist() == ["0000", "0001", "0002"]
    only_pro = read_cytoself_protein(tmp_path, "ACTB", mmap=False)
    assert set(only_pro) == {"protein", "obs"} and not isinstance(only_pro["protein"], np.memmap)


def test_cytoself_protein_one_label_row_broadcast(tmp_path):
    write_protein(tmp_path, "TOMM20", n=3, label_rows=1)
    obs = read_cytoself_protein(tmp_path, "TOMM20")["obs"]
    assert len(obs) == 3 and obs["protein_id"].tolist() == ["TOMM20"] * 3
    assert list(obs.index) == [0, 1, 2]


def test_cytoself_protein_normalization_fallbacks(tmp_path):
    save_npy(tmp_path / "X_pro.npy", np.zeros((2, 100, 100), np.float32))
    (tmp_path / "X_label.csv").write_text("ensg,other\nENSG0001,a\nENSG0001,b\n")
    obs = read_cytoself_protein(tmp_path, "X")["obs"]
    assert obs["protein_id"].tolist() == ["ENSG0001"] * 2
    assert obs["label"].isna().all()
    (tmp_path / "X_label.csv").write_text("gene\n0007\n")
    assert read_cytoself_protein(tmp_path, "X")["obs"]["protein_id"].tolist() == ["0007"] * 2


def test_cytoself_protein_label_row_mismatch(tmp_path):
    write_protein(tmp_path, "BAD", n=3, label_rows=2)
    label = tmp_path / "BAD_label.csv"
    with pytest.raises(InputError, match=names(label) + r": has 2 rows but .*BAD_pro\.npy holds 3 crops"):
        read_cytoself_protein(tmp_path, "BAD")


def test_cytoself_protein_array_mismatch(tmp_path):
    write_protein(tmp_path, "P", n=3)
    save_npy(tmp_path / "P_nuc.npy", np.zeros((4, 100, 100), np.float32))
    with pytest.raises(InputError, match=r"P_nuc\.npy: shape \(4, 100, 100\) differs .*P_pro\.npy"):
        read_cytoself_protein(tmp_path, "P")


def test_cytoself_protein_missing_files(tmp_path):
    with pytest.raises(InputError, match=r"Q_pro\.npy.*not found"):
        read_cytoself_protein(tmp_path, "Q")
    save_npy(tmp_path / "Q_pro.npy", np.zeros((1, 100, 100), np.float32))
    with pytest.raises(InputError, match=r"Q_label\.csv.*not found"):
        read_cytoself_protein(tmp_path, "Q")
    with pytest.raises(InputError, match=r"nowhere.*folder not found"):
        list_cytoself_proteins(tmp_path / "nowhere")


# ------------------------------------------------------------------------------ cytoself stacks


def write_stack(folder, number: str, n: int, *, label_rows=None, first=0):
    images = np.zeros((n, 100, 100, 4), dtype=np.float32)
    for i in range(n):
        images[i, :, :, 0] = first + i  # protein channel holds the global index
        images[i, :, :, 1] = -(first + i)
        images[i, :, :, 3] = 1
    save_npy(folder / f"Image_data{number}.npy", images)
    rows = n if label_rows is None else label_rows
    pd.DataFrame(
        {
            "ensg": [f"ENSG{first + i:05d}" for i in range(rows)],
            "name": [f"G{first + i}" for i in range(rows)],
            "loc_grade1": ["cytoplasm"] * rows,
            "loc_grade2": [""] * rows,
            "loc_grade3": [""] * rows,
            "protein_id": list(range(rows)),
            "FOV_id": list(range(rows)),
        }
    ).to_csv(folder / f"Label_data{number}.csv", index=False)


def test_cytoself_stacks(tmp_path):
    write_stack(tmp_path, "00", 3, first=0)
    write_stack(tmp_path, "01", 2, first=3)
    write_stack(tmp_path, "10", 3, first=5)
    stacks = CytoselfStacks(tmp_path)
    assert len(stacks) == 8
    assert stacks.CHANNELS == ("protein", "nucleus", "nucleus_distance", "nucleus_segmentation")
    assert [p.name for p in stacks.stacks] == ["Image_data00.npy", "Image_data01.npy", "Image_data10.npy"]
    obs = stacks.obs
    assert obs["stack"].tolist() == [0, 0, 0, 1, 1, 10, 10, 10]
    assert obs["row"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert obs["protein_id"].tolist() == [f"G{i}" for i in range(8)]
    assert (obs["label"] == "cytoplasm").all()
    item = stacks.get(4)
    assert set(item) == set(stacks.CHANNELS)
    assert item["protein"].shape == (100, 100) and (item["protein"] == 4).all()
    assert (item["nucleus"] == -4).all() and (item["nucleus_segmentation"] == 1).all()
    assert (stacks.get(-1)["protein"] == 7).all()
    batch = stacks.channel("protein", [7, 0, 4, 3, 0])
    assert batch.shape == (5, 100, 100)
    np.testing.assert_array_equal(batch[:, 0, 0], [7, 0, 4, 3, 0])
    with pytest.raises(IndexError):
        stacks.get(8)
    with pytest.raises(InputError, match=r"unknown channel 'dna'"):
        stacks.channel("dna", [0])


def test_cytoself_stacks_row_mismatch(tmp_path):
    write_stack(tmp_path, "00", 3)
    write_stack(tmp_path, "01", 3, label_rows=2)
    with pytest.raises(
        InputError,
        match=names(tmp_path / "Label_data01.csv") + r": Image_data01\.npy holds 3 images but Label_data01\.csv has 2",
    ):
        CytoselfStacks(tmp_path)


def test_cytoself_stacks_missing_partner(tmp_path):
    write_stack(tmp_path, "00", 2)
    write_stack(tmp_path, "01", 2)
    (tmp_path / "Label_data01.csv").unlink()
    with pytest.raises(InputError, match=r"Image_data01\.npy: no matching Label_data"):
        CytoselfStacks(tmp_path)
    (tmp_path / "Image_data01.npy").unlink()
    (tmp_path / "Label_data02.csv").write_text("ensg\nE\n")
    with pytest.raises(InputError, match=r"Label_data02\.csv: no matching Image_data"):
        CytoselfStacks(tmp_path)


def test_cytoself_stacks_wrong_shape_and_empty(tmp_path):
    with pytest.raises(InputError, match=r"no Image_data"):
        CytoselfStacks(tmp_path)
    save_npy(tmp_path / "Image_data00.npy", np.zeros((2, 100, 100, 3), np.float32))
    (tmp_path / "Label_data00.csv").write_text("ensg\nA\nB\n")
    with pytest.raises(InputError, match=r"Image_data00\.npy.*\(\.\.\., \?, \?, 4\)"):
        CytoselfStacks(tmp_path)


# ---------------------------------------------------------------------------------- CELL-E


def write_manifest(tmp_path, rows: dict, name="manifest.csv"):
    path = tmp_path / name
    write_table(pd.DataFrame(rows), path)
    return path


def celle_rows(tmp_path):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    nuc = RNG.integers(0, 65535, size=(16, 16), dtype=np.uint16)
    write_tiff(images / "n0.tif", nuc)
    write_png(images / "p0.png", RNG.integers(0, 255, size=(16, 16), dtype=np.uint8))
    save_npy(images / "n1.npy", RNG.random((1, 16, 16)).astype(np.float32))
    save_npy(images / "p1.npy", RNG.random((16, 16, 1)).astype(np.float32))
    (tmp_path / "meta").mkdir(exist_ok=True)
    (tmp_path / "meta" / "p1.json").write_text(json.dumps({"sequence": " MKTAYIAK \n", "gene": "X"}))
    rows = {
        "nucleus_image": ["images/n0.tif", "images/n1.npy"],
        "protein_image": ["images/p0.png", str(images / "p1.npy")],  # relative and absolute
        "protein_id": ["0001", "0002"],
        "sequence": ["MSEQ", ""],
        "metadata_json": ["", "meta/p1.json"],
        "split": ["train", "Test"],
    }
    return rows, nuc


@pytest.mark.parametrize("name", ["manifest.csv", "manifest.tsv"])
def test_celle_manifest(tmp_path, name):
    rows, nuc = celle_rows(tmp_path)
    path = write_manifest(tmp_path, rows, name)
    df = read_celle_manifest(path)
    assert df["protein_id"].tolist() == ["0001", "0002"]
    assert df["sequence"].tolist() == ["MSEQ", "MKTAYIAK"]
    assert df["split"].tolist() == ["train", "test"]
    assert df["nucleus_image"].iloc[0] == str((tmp_path / "images" / "n0.tif").resolve())
    assert df["metadata_json"].iloc[1] == str((tmp_path / "meta" / "p1.json").resolve())
    first = load_celle_images(df.iloc[0])
    assert first["nucleus"].dtype == np.float32 and first["nucleus"].shape == (16, 16)
    np.testing.assert_array_equal(first["nucleus"], nuc.astype(np.float32))
    second = load_celle_images(df.iloc[1])
    assert second["nucleus"].shape == (16, 16) and second["protein"].shape == (16, 16)


def test_celle_manifest_json_only(tmp_path):
    rows, _ = celle_rows(tmp_path)
    del rows["sequence"], rows["split"]
    rows["metadata_json"] = ["meta/p1.json", "meta/p1.json"]
    df = read_celle_manifest(write_manifest(tmp_path, rows))
    assert df["sequence"].tolist() == ["MKTAYIAK", "MKTAYIAK"]


def test_celle_manifest_missing_image(tmp_path):
    rows, _ = celle_rows(tmp_path)
    rows["protein_image"][1] = "images/absent.png"
    path = write_manifest(tmp_path, rows)
    with pytest.raises(InputError, match=names(path) + r": row 1: protein_image file not found: .*absent\.png"):
        read_celle_manifest(path)


def test_celle_manifest_missing_json_and_bad_json(tmp_path):
    rows, _ = celle_rows(tmp_path)
    rows["metadata_json"][1] = "meta/none.json"
    path = write_manifest(tmp_path, rows)
    with pytest.raises(InputError, match=names(path) + r": row 1: metadata_json file not found: .*none\.json"):
        read_celle_manifest(path)
    (tmp_path / "meta" / "bad.json").write_text("{not json")
    rows["metadata_json"][1] = "meta/bad.json"
    path = write_manifest(tmp_path, rows)
    with pytest.raises(InputError, match=r"bad\.json: not valid JSON.*manifest\.csv row 1"):
        read_celle_manifest(path)
    (tmp_path / "meta" / "noseq.json").write_text(json.dumps({"gene": "X"}))
    rows["metadata_json"][1] = "meta/noseq.json"
    path = write_manifest(tmp_path, rows)
    with pytest.raises(InputError, match=r"noseq\.json: has no 'sequence' key"):
        read_celle_manifest(path)


def test_celle_manifest_empty_sequence(tmp_path):
    rows, _ = celle_rows(tmp_path)
    rows["metadata_json"][1] = ""
    path = write_manifest(tmp_path, rows)
    with pytest.raises(InputError, match=names(path) + r": row 1: empty sequence cell for protein '0002'"):
        read_celle_manifest(path)


def test_celle_manifest_bad_split_and_columns(tmp_path):
    rows, _ = celle_rows(tmp_path)
    rows["split"][0] = "training"
    path = write_manifest(tmp_path, rows)
    with pytest.raises(InputError, match=names(path) + r": row 0: split 'training' is not one of train"):
        read_celle_manifest(path)
    rows, _ = celle_rows(tmp_path)
    del rows["sequence"], rows["metadata_json"]
    path = write_manifest(tmp_path, rows)
    with pytest.raises(InputError, match=names(path) + r": needs a 'sequence' or a 'metadata_json' column"):
        read_celle_manifest(path)
    del rows["protein_id"]
    path = write_manifest(tmp_path, rows)
    with pytest.raises(InputError, match=names(path) + r".*missing required column\(s\) 'protein_id'"):
        read_celle_manifest(path)


def test_load_celle_images_rejects_3d(tmp_path):
    rgb = tmp_path / "rgb.png"
    write_png(rgb, np.zeros((8, 8, 3), np.uint8))
    nuc = tmp_path / "n.png"
    write_png(nuc, np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match=names(rgb) + r": protein image must be 2-D, got 3-D"):
        load_celle_images({"nucleus_image": str(nuc), "protein_image": str(rgb)})

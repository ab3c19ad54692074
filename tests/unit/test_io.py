"""Tests for protloc.data.io: images, arrays, tables and crop stores."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import tifffile

from protloc.data.io import (
    CropStore,
    check_image,
    load_npy,
    read_image,
    read_png,
    read_table,
    read_tiff,
    read_tiff_with_axes,
    save_npy,
    write_png,
    write_table,
    write_tiff,
)
from protloc.errors import InputError

RNG = np.random.default_rng(0)


def names(path) -> str:
    """A regex matching the file's path as it appears in a message."""
    return re.escape(str(path))


def leftovers(folder) -> list[str]:
    """Temporary files or folders an atomic write might have left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------ TIFF


def test_tiff_zstack_roundtrip_keeps_axes(tmp_path):
    data = RNG.integers(0, 65535, size=(5, 2, 16, 12), dtype=np.uint16)
    out = write_tiff(tmp_path / "fov_stack.tif", data, axes="ZCYX")
    back, axes = read_tiff_with_axes(out)
    assert axes == "ZCYX"
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, data)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_imagej  # a Fiji user sees a hyperstack
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_dtypes_roundtrip_exactly(tmp_path, dtype):
    data = (RNG.random((2, 8, 9)) * 200).astype(dtype)
    write_tiff(tmp_path / "a.tif", data, axes="CYX")
    back, axes = read_tiff_with_axes(tmp_path / "a.tif")
    assert axes == "CYX" and back.dtype == dtype
    np.testing.assert_array_equal(back, data)


@pytest.mark.parametrize(
    ("dtype", "axes", "shape"),
    [
        (np.float64, "ZCYX", (3, 2, 6, 7)),  # ImageJ has no float64
        (np.int64, "CYX", (2, 6, 7)),
        (np.uint16, "CZYX", (2, 3, 6, 7)),  # not ImageJ's TZCYXS order
        (np.uint16, "ZCYX", (1, 2, 6, 7)),  # ImageJ would drop the singleton Z
        (np.uint16, "YXC", (6, 7, 2)),
    ],
)
def test_tiff_non_imagej_falls_back_to_shaped_metadata(tmp_path, dtype, axes, shape):
    data = RNG.integers(0, 1000, size=shape).astype(dtype)
    write_tiff(tmp_path / "b.tif", data, axes=axes)
    back, read_axes = read_tiff_with_axes(tmp_path / "b.tif")
    assert read_axes == axes
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, data)


def test_tiff_multipage_and_key(tmp_path):
    pages = RNG.integers(0, 65535, size=(4, 10, 11), dtype=np.uint16)
    write_tiff(tmp_path / "pages.tif", pages)
    np.testing.assert_array_equal(read_tiff(tmp_path / "pages.tif"), pages)
    np.testing.assert_array_equal(read_tiff(tmp_path / "pages.tif", key=2), pages[2])
    np.testing.assert_array_equal(read_tiff(tmp_path / "pages.tif", key=[0, 3]), pages[[0, 3]])
    with pytest.raises(InputError, match=r"page 9 out of range"):
        read_tiff(tmp_path / "pages.tif", key=9)


def test_tiff_three_leading_planes_not_mistaken_for_rgb(tmp_path):
    data = RNG.integers(0, 255, size=(3, 5, 6), dtype=np.uint8)
    write_tiff(tmp_path / "c.tif", data)
    np.testing.assert_array_equal(read_tiff(tmp_path / "c.tif"), data)


def test_tiff_external_imagej_hyperstack(tmp_path):
    data = RNG.integers(0, 65535, size=(4, 2, 8, 8), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "ij.tif", data, imagej=True, metadata={"axes": "ZCYX"})
    back, axes = read_tiff_with_axes(tmp_path / "ij.tif")
    assert axes == "ZCYX"
    np.testing.assert_array_equal(back, data)


def test_tiff_zlib_compression(tmp_path):
    data = np.zeros((3, 2, 32, 32), dtype=np.uint16)
    write_tiff(tmp_path / "z.tif", data, axes="ZCYX", compression="zlib")
    np.testing.assert_array_equal(read_tiff(tmp_path / "z.tif"), data)


def test_tiff_missing_file(tmp_path):
    path = tmp_path / "nope.tif"
    with pytest.raises(InputError, match=names(path) + r".*not found"):
        read_tiff(path)


def test_tiff_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.tif"
    path.write_bytes(b"this is not a tiff file at all" * 10)
    with pytest.raises(InputError, match=names(path) + r".*corrupt"):
        read_tiff(path)


@pytest.mark.parametrize("imagej", [True, False])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_tiff_truncated(tmp_path, imagej, fraction):
    data = RNG.integers(0, 65535, size=(3, 2, 48, 48), dtype=np.uint16)
    full = tmp_path / "full.tif"
    if imagej:
        tifffile.imwrite(full, data, imagej=True, metadata={"axes": "ZCYX"})
    else:
        tifffile.imwrite(full, data, metadata={"axes": "ZCYX"})
    raw = full.read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(InputError, match=names(path) + r".*(corrupt|truncated)"):
        read_tiff(path)


def test_tiff_empty_file(tmp_path):
    path = tmp_path / "empty.tif"
    path.write_bytes(b"")
    with pytest.raises(InputError, match=names(path)):
        read_tiff(path)


def test_tiff_nan_image(tmp_path):
    data = np.ones((6, 6), dtype=np.float32)
    data[2, 3] = np.nan
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, data)
    with pytest.raises(InputError, match=names(path) + r".*non-finite.*\(2, 3\)"):
        read_tiff(path)


def test_tiff_zero_size_image(tmp_path):
    path = tmp_path / "zero.tif"
    with pytest.warns(UserWarning):
        tifffile.imwrite(path, np.zeros((0, 5), dtype=np.uint16))
    with pytest.raises(InputError, match=names(path) + r".*empty"):
        read_tiff(path)


def test_write_tiff_rejects_bad_axes_and_empty(tmp_path):
    with pytest.raises(InputError, match=r"axes 'ZYX' has 3 letters"):
        write_tiff(tmp_path / "a.tif", np.zeros((2, 2, 4, 4), np.uint16), axes="ZYX")
    with pytest.raises(InputError, match=r"empty"):
        write_tiff(tmp_path / "b.tif", np.zeros((0, 4), np.uint16))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- PNG


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((7, 9), np.uint8), ((7, 9), np.uint16), ((7, 9, 3), np.uint8), ((7, 9, 4), np.uint8)],
)
def test_png_roundtrip(tmp_path, shape, dtype):
    data = RNG.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)
    out = write_png(tmp_path / "a.png", data)
    back = read_png(out)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, data)
    np.testing.assert_array_equal(read_image(out), data)
    assert leftovers(tmp_path) == []


def test_png_rejects_float(tmp_path):
    path = tmp_path / "f.png"
    with pytest.raises(InputError, match=names(path) + r".*integer pixels.*convert"):
        write_png(path, RNG.random((4, 4)).astype(np.float32))
    assert not path.exists()


def test_png_rejects_unsupported(tmp_path):
    with pytest.raises(InputError, match=r"uint8 or uint16"):
        write_png(tmp_path / "i.png", np.zeros((4, 4), dtype=np.int32))
    with pytest.raises(InputError, match=r"RGB"):
        write_png(tmp_path / "c.png", np.zeros((4, 4, 3), dtype=np.uint16))


def test_png_corrupt(tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 5)
    with pytest.raises(InputError, match=names(path)):
        read_png(path)


# ------------------------------------------------------------------------------------------- NPY


def test_npy_memmap_and_shape_checks(tmp_path):
    data = RNG.random((3, 10, 10, 4)).astype(np.float32)
    path = save_npy(tmp_path / "a.npy", data)
    assert leftovers(tmp_path) == []
    arr = load_npy(path, ndim=4, shape_tail=(10, 10, 4))
    assert isinstance(arr, np.memmap)
    assert not arr.flags.writeable
    np.testing.assert_array_equal(arr, data)
    loaded = load_npy(path, mmap=False, ndim=(3, 4), shape_tail=(None, None, 4))
    assert not isinstance(loaded, np.memmap)
    with pytest.raises(InputError, match=names(path) + r".*3-D array, got shape \(3, 10, 10, 4\)"):
        load_npy(path, ndim=3)
    with pytest.raises(InputError, match=names(path) + r".*\(\.\.\., 100, 100, 4\)"):
        load_npy(path, shape_tail=(100, 100, 4))


@pytest.mark.parametrize("mmap", [True, False])
def test_npy_truncated(tmp_path, mmap):
    full = tmp_path / "full.npy"
    np.save(full, np.zeros((20, 10, 10), dtype=np.float32))
    path = tmp_path / "cut.npy"
    path.write_bytes(full.read_bytes()[:2000])
    with pytest.raises(InputError, match=names(path) + r".*truncated"):
        load_npy(path, mmap=mmap)


def test_npy_bad_header_and_not_npy(tmp_path):
    bad = tmp_path / "hdr.npy"
    bad.write_bytes(b"\x93NUMPY\x01\x00garbage")
    with pytest.raises(InputError, match=names(bad)):
        load_npy(bad)
    text = tmp_path / "text.npy"
    text.write_bytes(b"hello world")
    with pytest.raises(InputError, match=names(text) + r".*not a NumPy"):
        load_npy(text)


@pytest.mark.parametrize("mmap", [True, False])
def test_npy_object_array_refused(tmp_path, mmap):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=names(path) + r".*Python objects"):
        load_npy(path, mmap=mmap)
    with pytest.raises(InputError, match=r"object array"):
        save_npy(tmp_path / "o2.npy", np.array([None], dtype=object))


def test_npy_missing(tmp_path):
    with pytest.raises(InputError, match=r"missing\.npy.*not found"):
        load_npy(tmp_path / "missing.npy")


# ------------------------------------------------------------------------------------ read_image


def test_read_image_dispatch(tmp_path):
    data = RNG.integers(0, 255, size=(5, 6), dtype=np.uint8)
    write_tiff(tmp_path / "a.TIFF", data)
    save_npy(tmp_path / "a.npy", data)
    write_png(tmp_path / "a.png", data)
    for name in ("a.TIFF", "a.npy", "a.png"):
        np.testing.assert_array_equal(read_image(tmp_path / name), data)
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match=r"a\.jpg.*unknown image format '\.jpg'"):
        read_image(tmp_path / "a.jpg")


def test_read_image_npy_nan(tmp_path):
    data = np.zeros((4, 4), dtype=np.float32)
    data[0, 1] = np.inf
    path = save_npy(tmp_path / "inf.npy", data)
    with pytest.raises(InputError, match=names(path) + r".*non-finite"):
        read_image(path)


def test_check_image():
    arr = np.zeros((2, 3), dtype=np.uint16)
    assert check_image(arr) is arr
    with pytest.raises(InputError, match=r"^x\.tif: nucleus must be 3-D"):
        check_image(arr, path="x.tif", ndim=3, name="nucleus")
    assert check_image(arr, ndim=(2, 3)) is arr
    with pytest.raises(InputError, match=r"non-numeric"):
        check_image(np.array([["a"]]))
    with pytest.raises(InputError, match=r"non-numeric"):
        check_image(np.zeros((2, 2), dtype=np.complex64))
    with pytest.raises(InputError, match=r"empty"):
        check_image(np.zeros((0, 3)))
    with pytest.raises(InputError, match=r"NaN or Inf"):
        check_image(np.array([[np.nan]]))


# ----------------------------------------------------------------------------------------- tables


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".txt"])
def test_table_roundtrip_keeps_string_ids(tmp_path, suffix):
    df = pd.DataFrame(
        {
            "fov_id": ["0001", "0002", "0010"],
            "protein_id": ["ENSG0001", "NA", "1e5x"],
            "count": [1, 2, 3],
            "score": [0.5, np.nan, 1.25],
            "flag": [True, False, True],
        }
    )
    path = write_table(df, tmp_path / f"t{suffix}")
    assert leftovers(tmp_path) == []
    sep = "\t" if suffix != ".csv" else ","
    assert path.read_text().splitlines()[0] == sep.join(df.columns)
    back = read_table(path, required=["fov_id", "protein_id"], unique=["fov_id"])
    assert back["fov_id"].tolist() == ["0001", "0002", "0010"]
    assert back["protein_id"].tolist() == ["ENSG0001", "NA", "1e5x"]
    assert back["count"].dtype.kind == "i"
    assert back["flag"].dtype == bool
    assert back["score"].iloc[0] == 0.5 and np.isnan(back["score"].iloc[1])


def test_table_tab_sniffed_in_csv_and_bom(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes("\ufeffa\tb\n1\tx,y\n".encode())
    df = read_table(path, required=["a", "b"])
    assert list(df.columns) == ["a", "b"]
    assert df["b"].tolist() == ["x,y"]


def test_table_na_tokens_only_missing_in_numeric_columns(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("gene,value\nNA,1.5\nNAN,NA\n")
    df = read_table(path)
    assert df["gene"].tolist() == ["NA", "NAN"]
    assert df["value"].dtype.kind == "f" and np.isnan(df["value"].iloc[1])


def test_table_dtype_str(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,x\n12,\n13,4\n")
    df = read_table(path, dtype={"id": str})
    assert df["id"].tolist() == ["12", "13"]
    assert df["x"].dtype.kind == "f"
    assert read_table(path, dtype=str)["x"].isna().iloc[0]


def test_table_missing_columns_named(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match=names(path) + r".*'c', 'd'.*has 'a', 'b'"):
        read_table(path, required=["a", "c", "d"])


def test_table_nan_in_required_names_row(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("a\tb\n1\tx\n2\t\n")
    with pytest.raises(InputError, match=names(path) + r": row 1: .*'b' is empty") as err:
        read_table(path, required=["a", "b"])
    assert err.value.row == 1 and err.value.path == str(path)


def test_table_duplicate_names_value_and_row(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("fov_id,x\nA,1\nB,2\nA,3\n")
    with pytest.raises(InputError, match=names(path) + r": row 2: duplicate value 'A' in column 'fov_id'"):
        read_table(path, unique=["fov_id"])


@pytest.mark.parametrize("text", ["", "a,b\n"])
def test_table_empty(tmp_path, text):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=names(path) + r".*(empty|no rows)"):
        read_table(path)


def test_table_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.csv.*not found"):
        read_table(tmp_path / "nope.csv")


def test_table_gzip(tmp_path):
    df = pd.DataFrame({"a": ["01", "02"]})
    path = write_table(df, tmp_path / "t.tsv.gz")
    assert read_table(path)["a"].tolist() == ["01", "02"]


# ------------------------------------------------------------------------------------ crop stores

S = 8
CHANNELS = {"protein": "float32", "nucleus": "float32", "threshold": "uint8"}


def batch(n: int, start: int = 0):
    arrays = {
        "protein": RNG.random((n, S, S)).astype(np.float32),
        "nucleus": RNG.random((n, S, S)).astype(np.float32),
        "threshold": RNG.integers(0, 2, size=(n, S, S), dtype=np.uint8),
    }
    obs = pd.DataFrame(
        {
            "protein_id": [f"P{start + i:04d}" for i in range(n)],
            "fov_id": [f"{start + i:04d}" for i in range(n)],
            "centre_y": np.arange(n) + 10,
        }
    )
    return arrays, obs


def test_cropstore_create_append_open_read(tmp_path):
    a1, o1 = batch(3)
    a2, o2 = batch(5, start=3)
    with CropStore.create(tmp_path / "train.zarr", channels=CHANNELS, size=S, chunk=4) as writer:
        writer.append(a1, o1)
        writer.append(a2, o2)
        assert len(writer) == 8
        assert not (tmp_path / "train.zarr").exists()  # still in its temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.csv", "train.zarr"]

    store = CropStore.open(tmp_path / "train.zarr")
    assert len(store) == 8 and store.size == S
    assert store.channels == ["protein", "nucleus", "threshold"]
    assert store.path == tmp_path / "train.zarr"
    assert store.obs["crop_index"].tolist() == list(range(8))
    assert store.obs["protein_id"].tolist() == [f"P{i:04d}" for i in range(8)]
    assert store.obs["fov_id"].iloc[0] == "0000"  # leading zeros survive the CSV
    full = {k: np.concatenate([a1[k], a2[k]]) for k in CHANNELS}
    np.testing.assert_array_equal(store["protein"][4], full["protein"][4])
    assert store["threshold"].dtype == np.uint8
    got = store.read([7, 0, 0, -1])
    for k in CHANNELS:
        np.testing.assert_array_equal(got[k], full[k][[7, 0, 0, 7]])
    sub = store.read(slice(2, 5), channels=["nucleus"])
    assert list(sub) == ["nucleus"]
    np.testing.assert_array_equal(sub["nucleus"], full["nucleus"][2:5])
    assert store.read(3)["protein"].shape == (S, S)
    assert store.read([])["protein"].shape == (0, S, S)
    with pytest.raises(IndexError):
        store.read([8])
    with pytest.raises(InputError, match=r"no channel 'distance'"):
        store["distance"]
    # the same store opened by its stem or CSV
    assert len(CropStore.open(tmp_path / "train")) == 8
    assert len(CropStore.open(tmp_path / "train.csv")) == 8


def test_cropstore_attrs(tmp_path):
    import zarr

    with CropStore.create(tmp_path / "s", channels={"protein": np.float32}, size=S) as writer:
        writer.append(*({"protein": batch(2)[0]["protein"]}, batch(2)[1]))
    attrs = dict(zarr.open_group(str(tmp_path / "s.zarr"), mode="r").attrs)
    assert attrs == {"protloc_crop_store": 1, "channels": ["protein"], "size": S, "n": 2}


def test_cropstore_empty_store(tmp_path):
    with CropStore.create(tmp_path / "e.zarr", channels={"protein": "float32"}, size=S):
        pass
    store = CropStore.open(tmp_path / "e.zarr")
    assert len(store) == 0 and list(store.obs.columns) == ["crop_index"]


def test_cropstore_exception_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with CropStore.create(tmp_path / "x.zarr", channels=CHANNELS, size=S) as writer:
            writer.append(*batch(2))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_cropstore_failed_overwrite_keeps_existing(tmp_path):
    with CropStore.create(tmp_path / "x.zarr", channels=CHANNELS, size=S) as writer:
        writer.append(*batch(3))
    before = CropStore.open(tmp_path / "x.zarr").read([0, 1, 2])
    csv_before = (tmp_path / "x.csv").read_text()

    bad_arrays, bad_obs = batch(2)
    bad_arrays["protein"][1, 0, 0] = np.nan
    with pytest.raises(InputError, match=r"x\.zarr.*'protein' has NaN or Inf values \(crop 1"):
        with CropStore.create(tmp_path / "x.zarr", channels=CHANNELS, size=S, overwrite=True) as writer:
            writer.append(*batch(4))
            writer.append(bad_arrays, bad_obs)
    store = CropStore.open(tmp_path / "x.zarr")
    assert len(store) == 3
    assert (tmp_path / "x.csv").read_text() == csv_before
    after = store.read([0, 1, 2])
    for k in CHANNELS:
        np.testing.assert_array_equal(after[k], before[k])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.csv", "x.zarr"]


def test_cropstore_overwrite(tmp_path):
    for n in (3, 5):
        with CropStore.create(tmp_path / "x.zarr", channels=CHANNELS, size=S, overwrite=True) as writer:
            writer.append(*batch(n))
    assert len(CropStore.open(tmp_path / "x.zarr")) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.csv", "x.zarr"]


def test_cropstore_refuses_existing(tmp_path):
    with CropStore.create(tmp_path / "x.zarr", channels=CHANNELS, size=S) as writer:
        writer.append(*batch(1))
    with pytest.raises(InputError, match=r"x\.zarr: output already exists"):
        CropStore.create(tmp_path / "x.zarr", channels=CHANNELS, size=S)
    # a table of the same name beside it would be clobbered, too
    (tmp_path / "y.csv").write_text("a\n1\n")
    with pytest.raises(InputError, match=r"y\.csv: output already exists"):
        CropStore.create(tmp_path / "y.zarr", channels=CHANNELS, size=S)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a, o: a.pop("nucleus"), r"missing channel\(s\) \['nucleus'\]"),
        (lambda a, o: a.update(extra=a["protein"]), r"unknown channel\(s\) \['extra'\]"),
        (lambda a, o: a.update(protein=a["protein"][:, :4]), r"'protein' has shape \(3, 4, 8\)"),
        (lambda a, o: a.update(protein=a["protein"][:2]), r"expected \(3, 8, 8\) for 3 obs rows"),
        (lambda a, o: a.update(threshold=a["protein"]), r"'threshold' is uint8, got float"),
        (lambda a, o: a.update(threshold=a["threshold"].astype(np.int64) + 300), r"do not fit its type uint8"),
    ],
)
def test_cropstore_append_validation(tmp_path, mutate, message):
    arrays, obs = batch(3)
    mutate(arrays, obs)
    with pytest.raises(InputError, match=message):
        with CropStore.create(tmp_path / "v.zarr", channels=CHANNELS, size=S) as writer:
            writer.append(arrays, obs)
    assert list(tmp_path.iterdir()) == []


def test_cropstore_create_validation(tmp_path):
    with pytest.raises(InputError, match=r"dtype must be integer, float or bool"):
        CropStore.create(tmp_path / "v", channels={"p": "U4"}, size=S)
    with pytest.raises(InputError, match=r"invalid channel name"):
        CropStore.create(tmp_path / "v", channels={"a/b": "float32"}, size=S)
    with pytest.raises(InputError, match=r"crop size"):
        CropStore.create(tmp_path / "v", channels={"p": "float32"}, size=0)
    with pytest.raises(InputError, match=r"at least one channel"):
        CropStore.create(tmp_path / "v", channels={}, size=S)


def test_cropstore_open_detects_row_mismatch(tmp_path):
    with CropStore.create(tmp_path / "m.zarr", channels=CHANNELS, size=S) as writer:
        writer.append(*batch(4))
    csv = tmp_path / "m.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(InputError, match=names(csv) + r".*3 rows but the store .*m\.zarr holds 4 crops"):
        CropStore.open(tmp_path / "m.zarr")


def test_cropstore_open_detects_bad_array_and_missing_csv(tmp_path):
    import zarr

    with CropStore.create(tmp_path / "m.zarr", channels=CHANNELS, size=S) as writer:
        writer.append(*batch(4))
    group = zarr.open_group(str(tmp_path / "m.zarr"), mode="r+")
    group.attrs["n"] = 5
    with pytest.raises(InputError, match=r"m\.zarr: channel 'protein' has shape \(4, 8, 8\), expected \(5"):
        CropStore.open(tmp_path / "m.zarr")
    group.attrs["n"] = 4
    (tmp_path / "m.csv").unlink()
    with pytest.raises(InputError, match=r"m\.csv: the crop table .* is missing"):
        CropStore.open(tmp_path / "m.zarr")


def test_cropstore_open_not_a_store(tmp_path):
    with pytest.raises(InputError, match=r"nothing\.zarr: crop store not found"):
        CropStore.open(tmp_path / "nothing.zarr")
    (tmp_path / "plain.zarr").mkdir()
    with pytest.raises(InputError, match=r"plain\.zarr"):
        CropStore.open(tmp_path / "plain.zarr")


def test_atomic_write_json_is_strict(tmp_path):
    import json

    from protloc._fs import atomic_write_json

    path = atomic_write_json(
        tmp_path / "x.json",
        {
            "nan": float("nan"),
            "inf": np.float32("inf"),
            "arr": np.arange(3),
            "i": np.int64(4),
            1: (1.5, None),
            "p": tmp_path / "a",
        },
    )
    got = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert got == {"nan": None, "inf": None, "arr": [0, 1, 2], "i": 4, "1": [1.5, None], "p": str(tmp_path / "a")}

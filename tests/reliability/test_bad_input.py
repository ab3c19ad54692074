"""Malformed inputs across the commands: each exits non-zero with one clear line naming the culprit,
and leaves every existing output and checkpoint untouched.

One table, one test per row. Every row runs ``protloc.cli.main`` on files built once per module in a
work folder; the folder's outputs and checkpoints are hashed before and after each row.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from protloc.cli import main
from protloc.data.io import CropStore, write_table, write_tiff
from protloc.pretrained import pretrained_path

GOOD_SEQ = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"


def _fov_image(rng: np.random.Generator, size: int = 200) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    nuc = np.zeros((size, size), np.float32)
    for cy in range(30, size - 20, 45):
        for cx in range(30, size - 20, 45):
            nuc[(yy - cy) ** 2 + (xx - cx) ** 2 <= 12**2] = 1.0
    prot = np.where(nuc > 0, 0.2, 1.0)
    img = np.stack([nuc * 3000 + 200, prot * 2000 + 100]) + rng.normal(0, 20, (2, size, size))
    return np.clip(img, 0, 65535).astype(np.uint16)


def _cytoself_store(path: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {
            "protein_id": ["P0", "P1"] * (n // 2),
            "fov_id": ["F0", "F1"] * (n // 2),
            "split": ["test"] * n,
            "label": ["er", "cytosol"] * (n // 2),
        }
    )
    chans = {"protein": "float32", "nucleus_distance": "float32"}
    with CropStore.create(path, channels=chans, size=100) as w:
        w.append({c: rng.random((n, 100, 100)).astype(np.float32) for c in chans}, obs)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The work folder: good inputs, broken inputs, existing outputs and checkpoints."""
    w = tmp_path_factory.mktemp("bad_input")
    rng = np.random.default_rng(0)
    # images
    write_tiff(w / "fov_a.tif", _fov_image(rng), axes="CYX")
    write_tiff(w / "fov_b.tif", _fov_image(rng), axes="CYX")
    write_tiff(w / "one_channel.tif", _fov_image(rng)[0], axes="YX")
    nan_fov = _fov_image(rng).astype(np.float32)
    nan_fov[1, 5, 5] = np.nan
    tifffile.imwrite(w / "nan_fov.tif", nan_fov, metadata={"axes": "CYX"})  # protloc's writer refuses NaN
    nuc = rng.random((64, 64)).astype(np.float32)
    write_tiff(w / "nucleus.tif", nuc)
    write_tiff(w / "nucleus_small.tif", nuc[:8, :8])
    write_tiff(w / "nucleus_const.tif", np.full((64, 64), 7, np.uint16))
    nan_nuc = nuc.copy()
    nan_nuc[3, 3] = np.nan
    np.save(w / "nucleus_nan.npy", nan_nuc)
    np.save(w / "nucleus_inf.npy", np.where(nuc > 0.5, np.inf, nuc))
    np.save(w / "nucleus_3d.npy", rng.random((4, 64, 64, 5)).astype(np.float32))
    np.save(w / "nucleus_complex.npy", nuc.astype(np.complex64))
    (w / "corrupt.tif").write_bytes(b"II*\x00" + bytes(rng.integers(0, 256, 300, dtype=np.uint8)))
    (w / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    # tables and sequences
    good = pd.DataFrame(
        {"fov_id": ["A", "B"], "protein_id": ["P1", "P2"], "path": ["fov_a.tif", "fov_b.tif"], "downsample": [1, 1]}
    )
    write_table(good, w / "fovs.csv")
    write_table(good.drop(columns=["path"]), w / "fovs_no_path.csv")
    write_table(pd.concat([good, good.iloc[:1]]), w / "fovs_duplicate.csv")
    write_table(good.assign(path=["fov_a.tif", "missing.tif"]), w / "fovs_dangling.csv")
    write_table(good.assign(path=["fov_a.tif", "one_channel.tif"]), w / "fovs_one_channel.csv")
    write_table(good.assign(path=["fov_a.tif", "nan_fov.tif"]), w / "fovs_nan.csv")
    write_table(good.assign(path=["fov_a.tif", "corrupt.tif"]), w / "fovs_corrupt.csv")
    (w / "empty.csv").write_text("")
    (w / "seqs.fasta").write_text(f">P1\n{GOOD_SEQ}\n>P2\n{GOOD_SEQ[::-1]}\n")
    (w / "empty.fasta").write_text("")
    (w / "bad_residue.fasta").write_text(f">ok\n{GOOD_SEQ}\n>broken\nMKT1AYQ\n")
    (w / "dup.fasta").write_text(f">x\n{GOOD_SEQ}\n>x\n{GOOD_SEQ}\n")
    (w / "no_header.fasta").write_text(f"{GOOD_SEQ}\n")
    (w / "typo.yaml").write_text("params:\n  sigmma: 2.0\n")
    (w / "not_yaml.yaml").write_text("params: [unclosed\n")
    # a crop store, a corrupt one and embeddings
    _cytoself_store(w / "cyto.zarr")
    shutil.copytree(w / "cyto.zarr", w / "corrupt.zarr")
    shutil.copyfile(w / "cyto.csv", w / "corrupt.csv")
    for f in (w / "corrupt.zarr").rglob("*"):
        if f.is_file() and f.name[0].isdigit():
            f.write_bytes(b"not a chunk")
    assert main(["-q", "embed", "--store", str(w / "cyto.zarr"), "--out", str(w / "emb.h5ad")]) == 0
    (w / "corrupt.h5ad").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    # checkpoints: a copy of the shipped CELL-E with its tokenizers, a truncated one, a wrong-shape one
    for name in ("celle-tiny", "vqgan-nucleus-tiny", "vqgan-threshold-tiny", "cytoself-tiny"):
        shutil.copytree(pretrained_path(name), w / "ckpt" / name)
    shutil.copytree(w / "ckpt" / "celle-tiny", w / "ckpt" / "truncated")
    data = (w / "ckpt" / "truncated" / "model.safetensors").read_bytes()
    (w / "ckpt" / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copytree(w / "ckpt" / "celle-tiny", w / "ckpt" / "wrong_shape")
    meta = json.loads((w / "ckpt" / "wrong_shape" / "config.json").read_text())
    meta["dim"] = 96
    (w / "ckpt" / "wrong_shape" / "config.json").write_text(json.dumps(meta))
    shutil.copytree(w / "ckpt" / "celle-tiny", w / "ckpt" / "bad_config")
    (w / "ckpt" / "bad_config" / "config.json").write_text("{not json")
    # existing outputs that a command must refuse to replace
    (w / "existing").mkdir()
    (w / "existing" / "keep.txt").write_text("do not touch")
    (w / "existing.h5ad").write_bytes(b"an earlier result")
    return w


CK = "{w}/ckpt/celle-tiny"
# (id, argv template, regex the one-line message must match)
CASES = [
    # sequences
    (
        "invalid residue",
        ["predict", "--checkpoint", CK, "--sequence", "MKT1AY", "--name", "q1", "--out", "{w}/o"],
        r"q1.*'1'.*position 4|position 4.*'1'",
    ),
    ("empty sequence", ["predict", "--checkpoint", CK, "--sequence", "", "--out", "{w}/o"], r"empty"),
    (
        "empty FASTA",
        ["predict", "--checkpoint", CK, "--fasta", "{w}/empty.fasta", "--out", "{w}/o"],
        r"empty.fasta.*(no sequences|empty)",
    ),
    (
        "FASTA bad residue",
        ["predict", "--checkpoint", CK, "--fasta", "{w}/bad_residue.fasta", "--out", "{w}/o"],
        r"bad_residue.fasta.*broken",
    ),
    (
        "FASTA duplicate id",
        ["predict", "--checkpoint", CK, "--fasta", "{w}/dup.fasta", "--out", "{w}/o"],
        r"dup.fasta.*'x'",
    ),
    (
        "FASTA without header",
        ["predict", "--checkpoint", CK, "--fasta", "{w}/no_header.fasta", "--out", "{w}/o"],
        r"no_header.fasta.*(header|>)",
    ),
    (
        "over-long masked sequence",
        ["fill", "--checkpoint", CK, "--sequence", "M" * 400 + "_", "--threshold", "{w}/nucleus.tif", "--out", "{w}/o"],
        r"(300|window|masked)",
    ),
    (
        "fill without mask",
        ["fill", "--checkpoint", CK, "--sequence", GOOD_SEQ, "--threshold", "{w}/nucleus.tif", "--out", "{w}/o"],
        r"_",
    ),
    # images
    (
        "nucleus too small",
        ["predict", "--checkpoint", CK, "--sequence", GOOD_SEQ, "--nucleus", "{w}/nucleus_small.tif", "--out", "{w}/o"],
        r"nucleus_small.tif.*(small|8)",
    ),
    (
        "nucleus constant",
        ["predict", "--checkpoint", CK, "--sequence", GOOD_SEQ, "--nucleus", "{w}/nucleus_const.tif", "--out", "{w}/o"],
        r"nucleus_const.tif.*constant",
    ),
    (
        "nucleus NaN",
        ["predict", "--checkpoint", CK, "--sequence", GOOD_SEQ, "--nucleus", "{w}/nucleus_nan.npy", "--out", "{w}/o"],
        r"nucleus_nan.npy.*(NaN|finite)",
    ),
    (
        "nucleus Inf",
        ["predict", "--checkpoint", CK, "--sequence", GOOD_SEQ, "--nucleus", "{w}/nucleus_inf.npy", "--out", "{w}/o"],
        r"nucleus_inf.npy.*(Inf|finite)",
    ),
    (
        "nucleus wrong dimensions",
        ["predict", "--checkpoint", CK, "--sequence", GOOD_SEQ, "--nucleus", "{w}/nucleus_3d.npy", "--out", "{w}/o"],
        r"nucleus_3d.npy.*(2-D|dimension|shape)",
    ),
    (
        "nucleus wrong dtype",
        [
            "predict",
            "--checkpoint",
            CK,
            "--sequence",
            GOOD_SEQ,
            "--nucleus",
            "{w}/nucleus_complex.npy",
            "--out",
            "{w}/o",
        ],
        r"nucleus_complex.npy.*(dtype|type|complex)",
    ),
    (
        "corrupt TIFF",
        ["predict", "--checkpoint", CK, "--sequence", GOOD_SEQ, "--nucleus", "{w}/corrupt.tif", "--out", "{w}/o"],
        r"corrupt.tif",
    ),
    (
        "corrupt NPY",
        ["predict", "--checkpoint", CK, "--sequence", GOOD_SEQ, "--nucleus", "{w}/corrupt.npy", "--out", "{w}/o"],
        r"corrupt.npy",
    ),
    # field-of-view tables and images for prepare
    (
        "manifest missing column",
        ["prepare", "--fovs", "{w}/fovs_no_path.csv", "--out", "{w}/o"],
        r"fovs_no_path.csv.*path",
    ),
    (
        "manifest duplicate row",
        ["prepare", "--fovs", "{w}/fovs_duplicate.csv", "--out", "{w}/o"],
        r"fovs_duplicate.csv.*(duplicate|unique).*A|fovs_duplicate.csv.*row",
    ),
    ("manifest dangling path", ["prepare", "--fovs", "{w}/fovs_dangling.csv", "--out", "{w}/o"], r"missing.tif"),
    ("empty manifest", ["prepare", "--fovs", "{w}/empty.csv", "--out", "{w}/o"], r"empty.csv.*empty"),
    (
        "single-channel field",
        ["prepare", "--fovs", "{w}/fovs_one_channel.csv", "--out", "{w}/o"],
        r"one_channel.tif.*channel",
    ),
    ("NaN in a field", ["prepare", "--fovs", "{w}/fovs_nan.csv", "--out", "{w}/o"], r"nan_fov.tif.*(NaN|finite)"),
    ("corrupt field TIFF", ["prepare", "--fovs", "{w}/fovs_corrupt.csv", "--out", "{w}/o"], r"corrupt.tif"),
    # configs
    (
        "unknown config key",
        ["prepare", "--fovs", "{w}/fovs.csv", "--out", "{w}/o", "--set", "params.sigmma=2"],
        r"sigmma.*sigma",
    ),
    (
        "config key typo in YAML",
        ["prepare", "--fovs", "{w}/fovs.csv", "--out", "{w}/o", "--config", "{w}/typo.yaml"],
        r"typo.yaml.*sigmma.*sigma",
    ),
    (
        "config value of the wrong type",
        ["train", "cytoself", "--store", "{w}/cyto.zarr", "--out", "{w}/o", "--set", "optim.lr=fast"],
        r"optim.lr.*fast",
    ),
    (
        "invalid YAML",
        ["prepare", "--fovs", "{w}/fovs.csv", "--out", "{w}/o", "--config", "{w}/not_yaml.yaml"],
        r"not_yaml.yaml",
    ),
    # checkpoints
    (
        "missing checkpoint",
        ["predict", "--checkpoint", "{w}/ckpt/nowhere", "--sequence", GOOD_SEQ, "--out", "{w}/o"],
        r"nowhere",
    ),
    (
        "checkpoint of the wrong model",
        ["predict", "--checkpoint", "{w}/ckpt/cytoself-tiny", "--sequence", GOOD_SEQ, "--out", "{w}/o"],
        r"cytoself-tiny.*(cytoself|model)",
    ),
    (
        "CELL-E checkpoint given to embed",
        ["embed", "--checkpoint", "{w}/ckpt/celle-tiny", "--store", "{w}/cyto.zarr", "--out", "{w}/o.h5ad"],
        r"celle-tiny.*(celle|model)",
    ),
    (
        "checkpoint of the wrong shape",
        ["predict", "--checkpoint", "{w}/ckpt/wrong_shape", "--sequence", GOOD_SEQ, "--out", "{w}/o"],
        r"wrong_shape.*shape",
    ),
    (
        "truncated checkpoint",
        ["predict", "--checkpoint", "{w}/ckpt/truncated", "--sequence", GOOD_SEQ, "--out", "{w}/o"],
        r"truncated.*(corrupt|truncated)",
    ),
    (
        "unreadable checkpoint config",
        ["predict", "--checkpoint", "{w}/ckpt/bad_config", "--sequence", GOOD_SEQ, "--out", "{w}/o"],
        r"bad_config.*config.json.*JSON",
    ),
    (
        "unknown shipped model",
        ["predict", "--checkpoint", "pretrained:celle-huge", "--sequence", GOOD_SEQ, "--out", "{w}/o"],
        r"celle-huge",
    ),
    # stores and embeddings
    ("missing store", ["embed", "--store", "{w}/nowhere.zarr", "--out", "{w}/o.h5ad"], r"nowhere.zarr"),
    ("corrupt Zarr store", ["embed", "--store", "{w}/corrupt.zarr", "--out", "{w}/o.h5ad"], r"corrupt.zarr"),
    ("corrupt embeddings", ["atlas", "--embeddings", "{w}/corrupt.h5ad", "--out", "{w}/o"], r"corrupt.h5ad"),
    (
        "unknown protein in spectrum",
        ["spectrum", "--embeddings", "{w}/emb.h5ad", "--out", "{w}/o", "--query", "NOPE1"],
        r"NOPE1",
    ),
    (
        "unknown protein to interpret",
        ["interpret", "--store", "{w}/cyto.zarr", "--out", "{w}/o", "--protein", "NOPE2"],
        r"NOPE2",
    ),
    # outputs that exist
    (
        "existing output folder",
        ["predict", "--checkpoint", CK, "--sequence", GOOD_SEQ, "--out", "{w}/existing"],
        r"existing.*(exists|overwrite)",
    ),
    (
        "existing output file",
        ["embed", "--store", "{w}/cyto.zarr", "--out", "{w}/existing.h5ad"],
        r"existing.h5ad.*(exists|overwrite)",
    ),
    (
        "existing prepare output",
        ["prepare", "--fovs", "{w}/fovs.csv", "--out", "{w}/existing"],
        r"existing.*(exists|overwrite)",
    ),
    (
        "existing world",
        ["world", "make", "--out", "{w}/existing", "--proteins", "2", "--fovs", "1"],
        r"existing.*(exists|overwrite)",
    ),
    # screens
    (
        "unknown engineered construct",
        ["screen", "--checkpoint", CK, "--id", "GFP_XYZ", "--insert", "N=PKKKRKV", "--out", "{w}/o"],
        r"GFP_XYZ",
    ),
    (
        "insertion point outside the sequence",
        [
            "screen",
            "--checkpoint",
            CK,
            "--sequence",
            GOOD_SEQ,
            "--insert",
            "N=PKKKRKV",
            "--at",
            "999",
            "--out",
            "{w}/o",
        ],
        r"999",
    ),
    (
        "nothing to resume",
        ["train", "cytoself", "--store", "{w}/cyto.zarr", "--out", "{w}/fresh_run", "--resume"],
        r"fresh_run.*nothing to resume",
    ),
]


@pytest.mark.parametrize(("argv", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(
    digest, ws: Path, argv: list[str], pattern: str, capsys
) -> None:
    before = digest(ws)
    rc = main(["-q", *[a.format(w=ws) for a in argv]])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    # one error line, last; warnings logged on the way (e.g. "no sequences given") may precede it
    errors = [line for line in lines if line.startswith("protloc: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert all(line.startswith(("WARNING ", "protloc: error: ")) for line in lines), lines  # no traceback
    assert re.search(pattern, errors[0]), errors[0]
    assert digest(ws) == before  # nothing written, changed or left behind (no temporary folders either)


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)

"""`protloc evaluate`: several CELL-E models, the VQGAN ceiling and the sequence baseline on shared crops."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from protloc.cli import main
from protloc.data.io import CropStore
from protloc.data.sequences import write_fasta
from protloc.train.celle import TrainCelleConfig, train_celle

S0, S = 40, 32  # stored crops, model images (S: CELLE_S of tests/conftest.py, the tokenizers' size)
N_TRAIN, N_VAL = 9, 6
SEQS = {"P0": "MKTAYIAKQRQISFVKSHFSRQ", "P1": "PKKKRKV" * 3, "P2": "ACDEFGHIKLMNPQRSTVWY" * 3}
ROWS = ("VQGAN ceiling", "A", "B", "sequence baseline")


def _make_store(path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = N_TRAIN + N_VAL
    yy, xx = np.mgrid[:S0, :S0]
    centres = rng.uniform(10, 30, size=(n, 2))
    nucleus = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 40.0)
    weight = np.array([0.9 if i % 3 == 1 else 0.2 for i in range(n)])[:, None, None]
    protein = np.clip(rng.random((n, S0, S0)) * ((1 - weight) + weight * nucleus), 0, 1)
    threshold = (protein >= protein.mean(axis=(1, 2), keepdims=True)).astype(np.uint8)
    obs = pd.DataFrame({"protein_id": [f"P{i % 3}" for i in range(n)], "split": ["train"] * N_TRAIN + ["val"] * N_VAL})
    channels = {"nucleus": "float16", "protein": "float16", "threshold": "uint8"}
    with CropStore.create(path, channels=channels, size=S0, chunk=8) as writer:
        writer.append({"nucleus": nucleus, "protein": protein, "threshold": threshold}, obs)
    write_fasta(path.parent / "sequences.fasta", SEQS)  # the default --sequences
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, celle_builders) -> dict:
    root = tmp_path_factory.mktemp("evaluate_cli")
    store = _make_store(root / "celle.zarr")
    base = TrainCelleConfig.tiny(
        str(store),
        nucleus=str(celle_builders.tokenizer(root / "vq_nucleus", "nucleus", 0)),
        threshold=str(celle_builders.tokenizer(root / "vq_threshold", "threshold", 1)),
    )
    cfg = dataclasses.replace(
        base,
        model=base.model.replace(grid_size=4, max_residues=32),
        data=dataclasses.replace(base.data, image_size=S, crop_size=S, batch_size=4, chunk_window=2),
        optim=dataclasses.replace(base.optim, warmup_steps=2),
        schedule=dataclasses.replace(base.schedule, max_steps=2, eval_every=2, log_every=1, eval_blank_sequence=False),
    )
    torch.set_num_threads(1)
    train_celle(cfg, run_dir=root / "run", progress=False)
    return {"store": store, "run": root / "run", "root": root}


def _argv(world, out: Path, *extra: str) -> list[str]:
    return [
        "-q",
        "evaluate",
        "--checkpoint",
        str(world["run"]),
        "--store",
        str(world["store"]),
        "--out",
        str(out),
        "--batch-size",
        "4",
        *extra,
    ]


def _one_line_error(capsys, rc: int, *words: str) -> None:
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("protloc: error:"), err
    for word in words:
        assert word in err[0], err[0]


def test_evaluate_two_models_shared_crops(world, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main([*_argv(world, out, "--checkpoint", str(world["run"]), "--name", "A", "--name", "B")])
    assert rc == 0
    stdout = capsys.readouterr().out
    for row in ROWS:
        assert f"| {row} |" in stdout
    assert {p.name for p in out.iterdir()} == {
        ".protloc-output",
        "metrics.json",
        "table.md",
        "per_image.csv",
        "per_protein.csv",
    }

    table = (out / "table.md").read_text()
    assert table.count("| Model |") == 2  # over proteins, then over images
    for row in ROWS:
        assert table.count(f"| {row} |") == 2

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["proteins"]) == list(ROWS) and list(metrics["images"]) == list(ROWS)
    assert metrics["same_crops"] is True
    assert metrics["settings"]["split"] == "val" and metrics["settings"]["seed"] == 0
    assert metrics["models"]["A"]["images"] == N_VAL and metrics["models"]["A"]["proteins"] == 3
    assert metrics["models"]["A"]["seconds"] >= 0 and metrics["seconds"] > 0
    ssim = metrics["proteins"]["A"]["ssim"]
    assert len(ssim) == 2 and -1 <= ssim[0] <= 1 and ssim[1] >= 0
    assert "pdf_pixel_accuracy" not in metrics["proteins"]["VQGAN ceiling"]
    assert set(metrics["proteins"]["sequence baseline"]) >= {
        "nucleus_proportion_accuracy",
        "nuclear_localization_correct",
    }
    # the same run with the same sampling seed: the same numbers
    assert metrics["proteins"]["A"] == metrics["proteins"]["B"]
    assert metrics["images"]["A"] == metrics["images"]["B"]

    per_image = pd.read_csv(out / "per_image.csv")
    assert per_image.columns[0] == "model" and list(per_image["model"].unique()) == list(ROWS)
    a = per_image[per_image["model"] == "A"].drop(columns="model").reset_index(drop=True)
    b = per_image[per_image["model"] == "B"].drop(columns="model").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    # every row scored the same crops against the same targets
    for row in ROWS:
        r = per_image[per_image["model"] == row].reset_index(drop=True)
        assert r[["index", "view"]].equals(a[["index", "view"]])
        np.testing.assert_allclose(r["nucleus_proportion_true"], a["nucleus_proportion_true"])
    per_protein = pd.read_csv(out / "per_protein.csv")
    assert list(per_protein.columns[:2]) == ["model", "protein_id"]
    assert len(per_protein) == 3 * len(ROWS)


def test_evaluate_without_reference_rows(world, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(_argv(world, out, "--no-ceiling", "--no-baseline", "--max-crops", "3", "--no-augment"))
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| CELL-E |" in stdout and "VQGAN ceiling" not in stdout and "sequence baseline" not in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["proteins"]) == ["CELL-E"] and metrics["models"]["CELL-E"]["images"] == 3
    assert metrics["settings"]["augment"] is False
    per_image = pd.read_csv(out / "per_image.csv")
    assert set(per_image["model"]) == {"CELL-E"} and per_image["view"].nunique() == 1  # centre crops


def test_evaluate_errors_are_one_line(world, tmp_path, capsys):
    capsys.readouterr()
    rc = main(
        [
            "-q",
            "evaluate",
            "--checkpoint",
            str(world["run"]),
            "--store",
            str(tmp_path / "missing.zarr"),
            "--out",
            str(tmp_path / "e1"),
        ]
    )
    _one_line_error(capsys, rc, "crop store not found")
    rc = main(_argv(world, tmp_path / "e2", "--checkpoint", str(world["run"]), "--name", "A"))
    _one_line_error(capsys, rc, "--name")
    rc = main(_argv(world, tmp_path / "e3", "--name", "VQGAN ceiling"))
    _one_line_error(capsys, rc, "reserved")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    (existing / ".protloc-output").write_text("{}")  # a previous protloc output: --overwrite may replace it
    rc = main(_argv(world, existing, "--no-ceiling", "--no-baseline"))
    _one_line_error(capsys, rc, "exists")
    assert (existing / "keep.txt").read_text() == "x"
    assert not any(p.name.startswith("e") and p.name != "existing" for p in tmp_path.iterdir())
    # --overwrite replaces it
    rc = main(_argv(world, existing, "--no-ceiling", "--no-baseline", "--max-crops", "2", "--overwrite"))
    assert rc == 0
    assert not (existing / "keep.txt").exists() and (existing / "metrics.json").is_file()

"""Smoke test of image to sequence: ``protloc train celle`` (masked mode, residues masked) -> ``protloc fill``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from protloc.cli import main
from protloc.data.sequences import read_fasta

S = 32  # the shared celle_inputs fixture (tests/conftest.py): CELLE_S


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory, celle_inputs) -> Path:
    root = tmp_path_factory.mktemp("fill_run")
    args = ["-q", "train", "celle", "--store", str(celle_inputs["store"]), "--out", str(root / "celle")]
    args += ["--nucleus-vqgan", str(celle_inputs["nucleus"]), "--threshold-vqgan", str(celle_inputs["threshold"])]
    for kv in (
        "schedule.max_steps=3",
        "schedule.eval_every=3",
        "data.batch_size=4",
        f"data.image_size={S}",
        "data.crop_size=0",
        "model.grid_size=4",
        "model.max_residues=24",
        "model.mode=masked",
        "model.masked_segments=[threshold,text]",
        "model.text_mask_prob=0.5",
    ):
        args += ["--set", kv]
    assert main(args) == 0
    metrics = [json.loads(line) for line in (root / "celle" / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in metrics if m.get("split") == "val"]
    assert val and "loss_text" in val[-1]  # validation reports the residue term
    return root / "celle"


def test_fill_writes_filled_sequences(masked_run, tmp_path, capsys):
    thr = np.zeros((40, 40), np.uint8)
    thr[10:30, 12:28] = 255
    np.save(tmp_path / "thr.npy", thr)
    out = tmp_path / "fill"
    args = ["-q", "fill", "--checkpoint", str(masked_run), "--sequence", "MKT__YIAK_RQ", "--name", "q1"]
    args += ["--threshold", str(tmp_path / "thr.npy"), "--samples", "2", "--steps", "2", "--out", str(out)]
    code = main(args)
    assert code == 0
    assert "3 residue(s) filled" in capsys.readouterr().out
    fasta = read_fasta(out / "filled.fasta")
    assert list(fasta) == ["q1_sample1", "q1_sample2"]
    table = pd.read_csv(out / "residues.csv")
    assert len(table) == 2 * 3 and sorted(set(table["position"])) == [4, 5, 10]
    p_cols = [c for c in table if c.startswith("p_")]
    assert len(p_cols) == 20
    np.testing.assert_allclose(table[p_cols].sum(axis=1), 1.0, atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    for filled in summary["sequences"][0]["filled"]:
        assert len(filled) == 12 and filled[:3] == "MKT" and filled[5:9] == "YIAK" and "_" not in filled
    assert (out / "residues_q1.png").is_file() and (out / "threshold.png").is_file()


def test_fill_user_errors(masked_run, celle_run_dir, tmp_path, capsys):
    np.save(tmp_path / "thr.npy", np.ones((32, 32), np.float32))
    base = ["-q", "fill", "--threshold", str(tmp_path / "thr.npy"), "--out", str(tmp_path / "o")]
    assert main([*base, "--checkpoint", str(masked_run), "--sequence", "MKTAYIAK"]) == 2
    assert "no '_'" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(masked_run), "--sequence", "MK_J*"]) == 2
    assert "query" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(masked_run), "--sequence", "M" + "_" * 30]) == 2
    assert "window" in capsys.readouterr().err
    # An autoregressive model cannot fill residues.
    assert main([*base, "--checkpoint", str(celle_run_dir), "--sequence", "MK_A"]) == 2
    assert "cannot fill residues" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

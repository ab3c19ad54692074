"""Smoke tests of ``protloc screen``: insertion / truncation / deletion / mutational screens and residue
attention with a tiny trained CELL-E."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from protloc.analysis.screens import SCREEN_COLUMNS
from protloc.cli import main
from protloc.data.io import read_png

S = 32  # the shared celle_run_dir fixture (smoke/conftest.py, image_size 32)
MAX_RESIDUES = 16  # and its max_residues
WT = "MKTAYIAKQRQ"  # 11 residues: fits the 16-residue window with its end token
LONG = "ACDEFGHIKLMNPQRSTVWY" * 2  # 40 residues: only 1-16 reach the model


@pytest.fixture(scope="module")
def run_dir(celle_run_dir) -> Path:
    return celle_run_dir


def _screen(run_dir: Path, out: Path, *args: str) -> int:
    return main(["-q", "screen", "--checkpoint", str(run_dir), "--out", str(out), *args])


def _read(out: Path) -> tuple[pd.DataFrame, dict]:
    return pd.read_csv(out / "screen.csv"), json.loads((out / "summary.json").read_text())


def _check_screen(out: Path) -> tuple[pd.DataFrame, dict]:
    assert {p.name for p in out.iterdir()} == {".protloc-output", "screen.csv", "screen.png", "summary.json"}
    df, summary = _read(out)
    assert list(df.columns) == list(SCREEN_COLUMNS)
    assert df["name"].iloc[0] == "wild type" and df["kind"].iloc[0] == "wild type"
    assert df["delta"].iloc[0] == 0.0 and not df["input_changed"].iloc[0]
    assert df["nucleus_proportion"].between(0, 1).all()
    assert np.allclose(df["delta"], df["nucleus_proportion"] - df["nucleus_proportion"].iloc[0])
    assert summary["wild_type_nucleus_proportion"] == pytest.approx(df["nucleus_proportion"].iloc[0])
    assert summary["variants"] == len(df) and summary["model_window"] == MAX_RESIDUES
    top = summary["top_variants"]
    assert len(top) == min(5, len(df) - 1) and "wild type" not in [r["name"] for r in top]
    deltas = [abs(r["delta"]) for r in top]
    assert deltas == sorted(deltas, reverse=True)
    assert deltas[0] == pytest.approx(df["delta"].abs().max())
    assert Path(summary["checkpoint"]).name == "best" and summary["step"] == 2 and summary["seconds"] >= 0
    assert read_png(out / "screen.png").ndim >= 2
    return df, summary


def test_insertion_screen_is_deterministic_and_batch_independent(run_dir, tmp_path, capsys):
    args = [
        "--sequence",
        WT,
        "--name",
        "toy",
        "--insert",
        "NLS=PKKKRKV",
        "--insert",
        "myc=PAAKRVKLD",
        "--at",
        "end",
        "--at",
        "5",
        "--samples",
        "2",
        "--seed",
        "3",
    ]
    assert _screen(run_dir, tmp_path / "a", *args) == 0
    assert "screen written" in capsys.readouterr().out
    df, summary = _check_screen(tmp_path / "a")
    assert list(df["name"]) == ["wild type", "NLS@end", "NLS@5", "myc@end", "myc@5"]
    assert list(df["position"].iloc[1:]) == [len(WT), 5, len(WT), 5] and list(df["length"].iloc[1:3]) == [18, 18]
    assert df["input_changed"].iloc[1:].all() and summary["outside_window"] == [] and summary["warnings"] == []
    assert df["sd"].iloc[1:].notna().all()  # two samples
    assert summary["mode"] == "insert"
    assert summary["sequence"] == {"name": "toy", "length": len(WT), "source": "sequence"}
    settings = summary["settings"]
    assert settings["peptides"] == {"NLS": "PKKKRKV", "myc": "PAAKRVKLD"} and settings["at"] == ["end", 5]
    assert settings["sampling"]["seed"] == 3 and settings["sampling"]["samples"] == 2
    assert summary["nucleus"]["source"].startswith("reference world nucleus")
    # same seed: the same table; another batch size: the same up to float rounding (common random numbers)
    assert _screen(run_dir, tmp_path / "b", *args) == 0
    pd.testing.assert_frame_equal(df, _read(tmp_path / "b")[0], check_exact=True)
    assert _screen(run_dir, tmp_path / "c", *args, "--batch-size", "1") == 0
    pd.testing.assert_frame_equal(df, _read(tmp_path / "c")[0], check_exact=False, rtol=1e-4, atol=1e-6)


def test_truncation_of_an_engineered_construct_and_a_fasta_deletion_scan(run_dir, tmp_path):
    out = tmp_path / "trunc"
    assert _screen(run_dir, out, "--id", "GFP", "--truncate", "100", "--min-length", "30") == 0
    df, summary = _check_screen(out)
    assert list(df["name"]) == ["wild type", "aa101-238", "aa201-238"] and list(df["length"]) == [238, 138, 38]
    assert summary["sequence"]["name"] == "GFP" and "engineered" in summary["sequence"]["source"]
    assert summary["settings"]["from"] == "n" and summary["settings"]["min_length"] == 30

    fasta = tmp_path / "q.fasta"
    fasta.write_text(f">other\nMKV\n>long one\n{LONG}\n")
    out = tmp_path / "del"
    assert _screen(run_dir, out, "--fasta", str(fasta), "--id", "long", "--delete", "8", "--step", "8") == 0
    df, summary = _check_screen(out)
    assert list(df["name"]) == ["wild type", "del1-8", "del9-16", "del17-24", "del25-32", "del33-40"]
    # deletions from residue 17 on leave the model's 16-residue window as it was: flagged
    assert list(df["input_changed"]) == [False, True, True, False, False, False]
    assert summary["outside_window"] == ["del17-24", "del25-32", "del33-40"]
    assert np.allclose(df["delta"].iloc[3:], 0.0)
    assert len(summary["warnings"]) == 1 and "16-residue" in summary["warnings"][0]
    assert summary["settings"]["window"] == 8 and summary["settings"]["step"] == 8


def test_mutational_scan_positions_are_one_based(run_dir, tmp_path):
    out = tmp_path / "mut"
    assert _screen(run_dir, out, "--sequence", LONG[:20], "--mutate", "AG", "--positions", "1-2,18") == 0
    df, summary = _check_screen(out)
    assert list(df["name"]) == ["wild type", "A1G", "C2A", "C2G", "V18A", "V18G"]
    assert list(df["position"].iloc[1:]) == [0, 1, 1, 17, 17] and (df["kind"].iloc[1:] == "substitution").all()
    assert summary["outside_window"] == ["V18A", "V18G"] and summary["warnings"]
    assert summary["settings"]["positions_1based"] == [1, 2, 18]


def test_residue_attention(run_dir, tmp_path):
    out = tmp_path / "att"
    assert _screen(run_dir, out, "--sequence", LONG[:20], "--attention", "--method", "mean", "--seed", "1") == 0
    assert {p.name for p in out.iterdir()} == {".protloc-output", "attention.csv", "attention.png", "summary.json"}
    table = pd.read_csv(out / "attention.csv")
    assert list(table.columns) == ["residue", "position", "present", "background", "difference"]
    assert "".join(table["residue"]) == LONG[:MAX_RESIDUES] and list(table["position"]) == list(range(1, 17))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "attention" and summary["settings"]["method"] == "mean"
    assert summary["n_present"] + summary["n_background"] == 16  # 4 x 4 patches, one group each by default
    assert summary["window"] == {"start": 1, "end": 16} and "1-16 of 20" in summary["warnings"][0]
    assert len(summary["top_residues"]) <= 5 and "samples" not in summary["settings"]["sampling"]
    assert np.isfinite(table["difference"]).all() or summary["n_present"] * summary["n_background"] == 0


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sequence", WT, "--insert", "NLS=PKKKRKV", "--truncate", "2"], "exactly one screen"),
        (["--sequence", WT], "exactly one screen"),
        (["--sequence", WT, "--insert", "NLS=PKK1RKV"], "invalid residue '1'"),
        (["--sequence", WT, "--truncate", "2", "--at", "end"], "--at applies to --insert"),
        (["--sequence", WT, "--mutate", "A", "--positions", "5-2"], "--positions"),
        (["--sequence", WT, "--mutate", "A", "--positions", "30"], "outside the sequence"),
        (["--sequence", WT, "--insert", "NLS=PKKKRKV", "--at", "99"], "outside 0..11"),
        (["--id", "NOPE", "--attention"], "no engineered construct 'NOPE'"),
        (["--sequence", WT, "--id", "GFP", "--attention"], "not both"),
    ],
)
def test_errors_are_one_line(run_dir, tmp_path, capsys, args, message):
    capsys.readouterr()
    assert _screen(run_dir, tmp_path / "x", *args) == 2
    line = _one_line_error(capsys)
    assert message in line
    if "peptide" in message or "invalid residue" in message:
        assert "NLS" in line
    assert not (tmp_path / "x").exists()


def test_existing_output_and_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    (out / ".protloc-output").write_text("{}")  # a previous protloc output: --overwrite may replace it
    args = ["--sequence", WT, "--truncate", "4"]
    capsys.readouterr()
    assert _screen(run_dir, out, *args) == 2
    assert "exists" in _one_line_error(capsys) and (out / "keep.txt").is_file()
    assert _screen(run_dir, out, *args, "--overwrite") == 0
    assert not (out / "keep.txt").exists()
    df, _ = _check_screen(out)
    assert list(df["name"]) == ["wild type", "aa5-11", "aa9-11"]

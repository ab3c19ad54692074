"""Smoke tests of ``protloc predict``: a tiny trained CELL-E -> threshold images, 2D PDFs, overlays, summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from protloc.cli import main
from protloc.data.io import read_png

S = 32  # the shared celle_run_dir fixture (smoke/conftest.py, image_size 32)
MAX_RESIDUES = 16  # and its max_residues
QUERIES = {  # FASTA header -> sequence
    "sp|P1|NLS_TEST": "MPKKKRKVEDA",
    "P2 a long one": "ACDEFGHIKLMNPQRSTVWY" * 2,  # 40 residues > 16: N-terminal window, no end token
    "P3": "MKTAYIAKQRQISFVKSHFSRQ",
}


@pytest.fixture(scope="module")
def run_dir(celle_run_dir) -> Path:
    return celle_run_dir


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict_inputs")
    (root / "queries.fasta").write_text("".join(f">{h}\n{seq}\n" for h, seq in QUERIES.items()))
    yy, xx = np.mgrid[:40, :48]
    nucleus = 200.0 + 3000.0 * np.exp(-((yy - 20) ** 2 + (xx - 26) ** 2) / 60.0)  # 40 x 48: centre-cropped
    np.save(root / "nucleus.npy", nucleus.astype(np.float32))
    return {"fasta": root / "queries.fasta", "nucleus": root / "nucleus.npy", "root": root}


def _predict(run_dir: Path, out: Path, *args: str) -> int:
    return main(["-q", "predict", "--checkpoint", str(run_dir), "--out", str(out), *args])


def test_single_sequence_with_the_default_nucleus(run_dir, tmp_path, capsys):
    out = tmp_path / "one"
    assert _predict(run_dir, out, "--sequence", "MKTAYIAKQRQISFVKSHFSRQ", "--seed", "3") == 0
    assert "predictions written" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert names == {
        ".protloc-output",
        "nucleus.png",
        "summary.json",
        "query_threshold.png",
        "query_probability.npy",
        "query_overlay.png",
    }
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nucleus"]["source"].startswith("reference world nucleus")
    assert summary["step"] == 2 and summary["image_size"] == S and Path(summary["checkpoint"]).name == "best"
    assert summary["sampling"] == {"samples": 1, "temperature": 1.0, "top_k_fraction": 0.25, "steps": 8, "seed": 3}
    (rec,) = summary["sequences"]
    assert rec["name"] == "query" and rec["length"] == 22
    assert (rec["window_start"], rec["window_end"], rec["end_token"]) == (0, MAX_RESIDUES, False)
    assert 0 <= rec["nucleus_proportion"] <= 1 and 0 <= rec["threshold_nucleus_proportion"] <= 1
    prob = np.load(out / "query_probability.npy")
    assert prob.dtype == np.float32 and prob.shape == (S, S) and (prob >= 0).all()
    assert prob.sum() == pytest.approx(1.0, abs=1e-4)
    thr = read_png(out / "query_threshold.png")
    assert thr.shape == (S, S) and set(np.unique(thr)) <= {0, 255}
    nuc = read_png(out / "nucleus.png")
    assert nuc.shape == (S, S) and nuc.max() > nuc.min()  # the reference nucleus is visible at 32 px


def test_fasta_with_a_nucleus_image_and_determinism(run_dir, inputs, tmp_path):
    args = [
        "--fasta",
        str(inputs["fasta"]),
        "--nucleus",
        str(inputs["nucleus"]),
        "--samples",
        "2",
        "--batch-size",
        "2",
        "--seed",
        "5",
        "--temperature",
        "0.9",
    ]
    assert _predict(run_dir, tmp_path / "a", *args) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    stems = [r["file_stem"] for r in summary["sequences"]]
    assert stems == ["sp_P1_NLS_TEST", "P2", "P3"]  # FASTA ids, made file-name safe
    assert summary["nucleus"]["input_shape"] == [40, 48] and summary["nucleus"]["crop"]["side"] == 40
    assert 0 < summary["nucleus"]["mask_fraction"] < 1
    long = summary["sequences"][1]
    assert long["length"] == 40 and long["window_end"] == MAX_RESIDUES and not long["end_token"]
    assert summary["sequences"][0]["end_token"]  # 11 residues: the whole sequence and its end fit
    for rec in summary["sequences"]:
        for f in rec["files"].values():
            assert (tmp_path / "a" / f).is_file()
        assert 0 <= rec["nucleus_proportion"] <= 1 and rec["seconds"] >= 0
    # Same seed, same outputs; another seed, other draws.
    assert _predict(run_dir, tmp_path / "b", *args) == 0
    for stem in stems:
        a = np.load(tmp_path / "a" / f"{stem}_probability.npy")
        assert np.array_equal(a, np.load(tmp_path / "b" / f"{stem}_probability.npy"))
    other = [*args[:-4], "--seed", "6", "--temperature", "0.9"]
    assert _predict(run_dir, tmp_path / "c", *other) == 0

    def prob(folder: str, stem: str) -> np.ndarray:
        return np.load(tmp_path / folder / f"{stem}_probability.npy")

    assert any(not np.array_equal(prob("a", s), prob("c", s)) for s in stems)


def test_run_predict_names_and_overwrite(run_dir, tmp_path):
    from protloc.commands.predict import run_predict

    out = tmp_path / "w"
    seqs = {"a/b": "MKV", "a:b": "MKVL", "..": "MAY"}
    summary = run_predict(checkpoint=run_dir / "last", out=out, sequences=seqs, progress=False)
    assert [r["file_stem"] for r in summary["sequences"]] == ["a_b", "a_b_2", "sequence"]
    assert summary["sequences"][0]["end_token"]
    (out / "stale.txt").write_text("x")
    run_predict(checkpoint=run_dir, out=out, sequences="MKV", overwrite=True, progress=False)
    assert not (out / "stale.txt").exists() and (out / "query_overlay.png").is_file()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_invalid_residue_missing_checkpoint_existing_out(run_dir, inputs, tmp_path, capsys):
    capsys.readouterr()
    assert _predict(run_dir, tmp_path / "x", "--sequence", "MKT1V") == 2
    line = _one_line_error(capsys)
    assert "invalid residue '1'" in line and "query" in line
    assert not (tmp_path / "x").exists()
    assert _predict(tmp_path / "nowhere", tmp_path / "x", "--sequence", "MKV") == 2
    assert "checkpoint not found" in _one_line_error(capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert _predict(run_dir, tmp_path / "full", "--sequence", "MKV") == 2
    assert "exists" in _one_line_error(capsys) and (tmp_path / "full" / "keep.txt").is_file()


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.ones((40, 40)), "constant"),
        (np.random.default_rng(0).random((40, 40, 3)), "2-D grey"),
        (np.random.default_rng(0).random((20, 40)), "at least 32 x 32"),
        (np.where(np.eye(40) > 0, np.nan, 1.0), "NaN"),
    ],
)
def test_bad_nucleus_images(run_dir, tmp_path, capsys, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    capsys.readouterr()
    assert _predict(run_dir, tmp_path / "x", "--sequence", "MKV", "--nucleus", str(path)) == 2
    line = _one_line_error(capsys)
    assert message in line and "bad.npy" in line


def test_plot_prediction_draws_into_given_axes():
    from matplotlib.figure import Figure

    from protloc.plotting.celle import plot_prediction

    yy, xx = np.mgrid[:16, :16]
    nuc = np.exp(-((yy - 8) ** 2 + (xx - 8) ** 2) / 10.0)
    prob = np.full((16, 16), 1 / 256)
    fig = Figure()
    ax = fig.subplots()
    assert plot_prediction(nuc, prob, threshold=nuc > 0.3, mask=nuc > 0.5, ax=ax, title="t") is fig
    assert ax.get_title() == "t" and ax.get_legend() is not None

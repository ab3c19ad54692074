"""``protloc localize`` end to end through the command line, with a tiny encoder saved by the test (and the
shipped ``encoder-small`` on the engineered GFP constructs when this installation has it)."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
import torch

from protloc.cli import main
from protloc.data.world.assets import load_engineered_records
from protloc.models.checkpoint import save_checkpoint
from protloc.models.encoder import EncoderConfig, ProteinEncoder
from protloc.pretrained import PRETRAINED, weights_dir

QUERIES = {
    "GFP_tail": "SKDPNEKRDHMVLLEFVTAAGITHGMDELYK",
    "NLS": "MAPKKKRKVGGSGGSW",
    "MITO": "MLSRAVCGTSRQLAPVLGYLGSRQ",
}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = ProteinEncoder(EncoderConfig.tiny())
    run = tmp_path_factory.mktemp("encoder") / "run"
    save_checkpoint(run / "last", model=model, config=model.config, extra={"thresholds": {"nucleus": 0.4}})
    return run


@pytest.fixture()
def fasta(tmp_path: Path) -> Path:
    path = tmp_path / "queries.fasta"
    path.write_text("".join(f">{name}\n{seq}\n" for name, seq in QUERIES.items()))
    return path


def test_localize_fasta_end_to_end(encoder: Path, fasta: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["localize", "--sequences", str(fasta), "--out", str(out), "--checkpoint", str(encoder)]
    assert main([*args, "--ig-steps", "4", "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "GFP_tail" in printed and "top compartments" in printed and str(out) in printed

    table = pd.read_csv(out / "localize.csv", index_col=0)
    assert list(table.index) == list(QUERIES) and table["length"].tolist() == [len(s) for s in QUERIES.values()]
    assert (table["nuclear"] == (table["p_nucleus"] >= 0.4)).all()  # the checkpoint's threshold
    adata = ad.read_h5ad(out / "localize.h5ad")
    assert adata.n_obs == len(QUERIES) and adata.obsm["X_encoder"].shape == (3, 2 * EncoderConfig.tiny().dim)
    assert adata.obsm["presence"].shape == (3, 13) and adata.obsm["distribution"].shape == (3, 12)
    assert adata.uns["localize"]["thresholds"]["nucleus"] == pytest.approx(0.4)
    importance = pd.read_csv(out / "importance.csv")
    assert len(importance) == sum(len(s) for s in QUERIES.values())
    assert sorted(p.name for p in (out / "importance").iterdir()) == ["GFP_tail.png", "MITO.png", "NLS.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["proteins"] == 3 and summary["threshold_source"].startswith("config.json extra")
    assert [s["name"] for s in summary["sequences"]] == list(QUERIES)

    # the output is guarded: refused without --overwrite, replaced with it
    assert main([*args, "--ig-steps", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--no-importance", "--overwrite"]) == 0
    assert not (out / "importance.csv").exists() and not (out / "importance").exists()


def test_localize_one_sequence_and_bad_input(encoder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "one"
    ckpt = ["--checkpoint", str(encoder)]
    assert main(["localize", "--sequence", QUERIES["NLS"], "--out", str(out), *ckpt, "--ig-steps", "2"]) == 0
    assert pd.read_csv(out / "localize.csv", index_col=0).index.tolist() == ["query"]
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["localize", "--sequence", "MKTBJ", "--out", str(bad), *ckpt]) == 2
    assert "invalid residue 'J' at position 5" in capsys.readouterr().err
    empty = tmp_path / "empty.fasta"
    empty.write_text("")
    assert main(["localize", "--sequences", str(empty), "--out", str(bad), *ckpt]) == 2
    assert "empty" in capsys.readouterr().err
    assert not bad.exists()
    # never inside what it reads
    inside = encoder / "last" / "out"
    assert main(["localize", "--sequence", "MKT", "--out", str(inside), *ckpt, "--overwrite"]) == 2
    assert "lies inside the input given as --checkpoint" in capsys.readouterr().err and not inside.exists()


def _shipped() -> bool:
    return "encoder-small" in PRETRAINED and (weights_dir() / "encoder-small" / "model.safetensors").is_file()


@pytest.mark.skipif(not _shipped(), reason="the shipped encoder-small weights are not in this installation")
def test_shipped_encoder_on_the_gfp_constructs(tmp_path: Path) -> None:
    records = [r for r in load_engineered_records() if r["id"].startswith("GFP")]
    fasta = tmp_path / "gfp.fasta"
    fasta.write_text("".join(f">{r['id']}\n{r['sequence']}\n" for r in records))
    out = tmp_path / "out"
    assert main(["localize", "--sequences", str(fasta), "--out", str(out), "--ig-steps", "8"]) == 0
    table = pd.read_csv(out / "localize.csv", index_col=0)
    assert list(table.index) == [r["id"] for r in records]
    assert table["p_nucleus"].between(0, 1).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["name"] == "pretrained:encoder-small"
    assert all(s["nucleus_peak"] for s in summary["sequences"])

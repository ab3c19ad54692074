"""A CELL-E trained on ESM-2 keeps working after its language-model weights move: --embedder-path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from protloc.cli import main
from protloc.commands.predict import run_predict
from protloc.errors import InputError
from protloc.train.celle import TrainCelleConfig, train_celle

S = 32  # CELLE_S of tests/conftest.py
MAX_RESIDUES = 16  # CELLE_MAX_RESIDUES of tests/conftest.py


def test_moved_esm2_weights(tmp_path: Path, celle_inputs, write_tiny_esm2, capsys) -> None:
    esm_path = tmp_path / "models" / "esm2_tiny.pt"
    esm_path.parent.mkdir()
    write_tiny_esm2(esm_path)
    base = TrainCelleConfig.tiny(
        str(celle_inputs["store"]), nucleus=str(celle_inputs["nucleus"]), threshold=str(celle_inputs["threshold"])
    )
    cfg = dataclasses.replace(
        base,
        model=base.model.replace(grid_size=4, max_residues=MAX_RESIDUES, embedder="esm2", text_dim=32),
        embedder=dataclasses.replace(base.embedder, path=str(esm_path)),
        data=dataclasses.replace(base.data, image_size=S, crop_size=0, batch_size=4, chunk_window=2),
        optim=dataclasses.replace(base.optim, warmup_steps=1),
        schedule=dataclasses.replace(base.schedule, max_steps=1, eval_every=1, log_every=1, eval_batches=1),
    )
    train_celle(cfg, run_dir=tmp_path / "run", progress=False)
    moved = tmp_path / "elsewhere" / "esm2_tiny.pt"
    moved.parent.mkdir()
    esm_path.rename(moved)

    with pytest.raises(InputError, match="esm2_tiny.pt"):  # the recorded path is gone: named
        run_predict(checkpoint=tmp_path / "run", out=tmp_path / "p0", sequences="MKTAYIAKQRQ", progress=False)
    summary = run_predict(
        checkpoint=tmp_path / "run", out=tmp_path / "p1", sequences="MKTAYIAKQRQ", embedder_path=moved, progress=False
    )
    assert 0.0 <= summary["sequences"][0]["nucleus_proportion"] <= 1.0
    rc = main(
        [
            "-q",
            "predict",
            "--checkpoint",
            str(tmp_path / "run"),
            "--sequence",
            "MKTAYIAKQRQ",
            "--out",
            str(tmp_path / "p2"),
            "--embedder-path",
            str(moved),
        ]
    )
    assert rc == 0 and (tmp_path / "p2" / "summary.json").is_file()

"""Smoke test of the protein encoder's training: the CLI, resume, and the encoder as CELL-E's embedder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from protloc.cli import main
from protloc.data.proteome import CORPUS_COLUMNS
from protloc.data.sequences import STANDARD
from protloc.data.world.compartments import COMPARTMENTS, WEIGHT_COLUMNS
from protloc.train.celle import TrainCelleConfig, train_celle
from protloc.train.encoder import EncoderTrainConfig, train_encoder
from protloc.train.loop import MetricsLogger

S = 32  # CELLE_S of tests/conftest.py
MAX_RESIDUES = 16  # CELLE_MAX_RESIDUES of tests/conftest.py


def _write_corpus(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    letters = np.array(list(STANDARD))
    rows = []
    for i in range(n):
        w = np.zeros(len(COMPARTMENTS))
        w[rng.choice(len(COMPARTMENTS), size=1 + i % 2, replace=False)] = 1.0
        w[(i // 4) % 2] = float(i % 8 < 4)  # val proteins in and out of the nucleus
        w /= w.sum()
        human = i % 2 == 0
        part = "val" if human and i % 4 == 0 else "train"
        seq = "".join(rng.choice(letters, size=int(rng.integers(8, 70))))
        rows.append(
            {
                "accession": f"P{i:05d}",
                "human": human,
                "partition": part,
                "length": len(seq),
                "label": "",
                "go_cc": "",
                **dict(zip(WEIGHT_COLUMNS, w, strict=True)),
                "sequence": seq,
            }
        )
    df = pd.DataFrame(rows)[list(CORPUS_COLUMNS)]
    df["sample_weight"] = 1.0
    df.to_csv(path, sep="\t", index=False)
    return path


def _args(corpus: Path, out: Path, steps: int) -> list[str]:
    sets = [f"schedule.max_steps={steps}", "schedule.eval_every=2", "schedule.log_every=1", "save_every=2"]
    sets += ["data.tokens_per_batch=400", "data.epoch_size=16", "optim.warmup_steps=2"]
    return ["-q", "train", "encoder", "--corpus", str(corpus), "--out", str(out)] + [
        x for s in sets for x in ("--set", s)
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.tsv.gz")


def test_cli_train_and_exact_resume(corpus: Path, tmp_path: Path, capsys) -> None:
    full = tmp_path / "full"
    assert main(_args(corpus, full, 4)) == 0
    assert "train encoder" in capsys.readouterr().out
    val = [r for r in MetricsLogger.read(full / "metrics.jsonl") if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 4]
    for key in ("loss", "presence", "distribution", "mlm", "val_macro_auroc", "val_score"):
        assert np.isfinite(val[-1][key]), key
    meta = json.loads((full / "best" / "config.json").read_text())
    assert meta["model_type"].endswith("ProteinEncoder") and len(meta["extra"]["corpus_sha256"]) == 64

    part = tmp_path / "part"
    assert main(_args(corpus, part, 2)) == 0
    assert main([*_args(corpus, part, 4), "--resume"]) == 0
    from safetensors.torch import load_file

    a, b = load_file(str(full / "last" / "model.safetensors")), load_file(str(part / "last" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # a finished run is never overwritten
    assert main(_args(corpus, full, 4)) != 0
    assert "already holds a run" in capsys.readouterr().err


def test_human_only_and_encoder_in_celle(corpus: Path, tmp_path: Path, celle_inputs) -> None:
    cfg = EncoderTrainConfig.tiny(str(corpus))
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, human_only=True, tokens_per_batch=400, epoch_size=0),
        schedule=dataclasses.replace(cfg.schedule, max_steps=1, eval_every=1, log_every=1),
    )
    summary = train_encoder(cfg, run_dir=tmp_path / "enc", progress=False)
    assert summary["steps"] == 1 and 0 <= summary["best_val_macro_auroc"] <= 1

    base = TrainCelleConfig.tiny(
        str(celle_inputs["store"]), nucleus=str(celle_inputs["nucleus"]), threshold=str(celle_inputs["threshold"])
    )
    celle = dataclasses.replace(
        base,
        model=base.model.replace(grid_size=4, max_residues=MAX_RESIDUES, embedder="encoder", text_dim=32),
        embedder=dataclasses.replace(base.embedder, path=str(tmp_path / "enc")),
        data=dataclasses.replace(base.data, image_size=S, crop_size=0, batch_size=4, chunk_window=2),
        optim=dataclasses.replace(base.optim, warmup_steps=1),
        schedule=dataclasses.replace(base.schedule, max_steps=2, eval_every=2, log_every=1, eval_batches=1),
    )
    out = train_celle(celle, run_dir=tmp_path / "celle", progress=False)
    assert out["steps"] == 2

"""Smoke tests of CELL-E training: tokenizers -> transformer, resume, ablations, loading, the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from protloc.cli import main
from protloc.config import load_config
from protloc.errors import ConfigError, InputError
from protloc.eval.load import load_celle_run
from protloc.train.celle import TrainCelleConfig, train_celle
from protloc.train.loop import MetricsLogger

S = 32  # CELLE_S of tests/conftest.py (the celle_builders store and tokenizers)
N_TRAIN, N_VAL = 16, 8
SEQS = {
    "P0": "MKTAYIAKQRQISFVKSHFSRQ",
    "P1": "PKKKRKV" * 3,
    "P2": "ACDEFGHIKLMNPQRSTVWY" * 4,  # 80 residues: longer than max_residues below (random windows)
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, celle_builders) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("celle")
    store = celle_builders.store(
        root / "celle.zarr", n_train=N_TRAIN, n_val=N_VAL, chunk=8, centres=(8, 24), sequences=SEQS
    )
    return {
        "store": store,
        "nucleus": celle_builders.tokenizer(root / "vq_nucleus", "nucleus", 0),
        "threshold": celle_builders.tokenizer(root / "vq_threshold", "threshold", 1),
    }


def _config(world, *, max_steps: int, **model_changes) -> TrainCelleConfig:
    base = TrainCelleConfig.tiny(str(world["store"]), nucleus=str(world["nucleus"]), threshold=str(world["threshold"]))
    return dataclasses.replace(
        base,
        model=base.model.replace(grid_size=4, max_residues=32, **model_changes),
        data=dataclasses.replace(base.data, image_size=S, crop_size=0, batch_size=4, chunk_window=2),
        optim=dataclasses.replace(base.optim, warmup_steps=2),
        schedule=dataclasses.replace(base.schedule, max_steps=max_steps, eval_every=2, log_every=1),
    )


def _val_records(run: Path) -> list[dict]:
    return [r for r in MetricsLogger.read(run / "metrics.jsonl") if r["split"] == "val"]


def test_train_checkpoints_metrics_and_load(world, tmp_path):
    run = tmp_path / "run"
    summary = train_celle(_config(world, max_steps=3), run_dir=run, progress=False)
    assert summary["steps"] == 3 and summary["samples_per_s"] > 0
    assert sorted(p.name for p in run.iterdir()) == ["best", "config.yaml", "last", "metrics.jsonl"]
    val = _val_records(run)
    assert [r["step"] for r in val] == [2, 3]
    for key in ("loss", "loss_text", "loss_nucleus", "loss_threshold", "acc_threshold", "blank_loss_threshold"):
        assert np.isfinite(val[-1][key]), key
    assert "blank_loss_text" not in val[-1]  # padding has no residues to predict
    # The resolved config reloads; the run reloads with its tokenizers.
    assert load_config(TrainCelleConfig, path=run / "config.yaml").model.grid_size == 4
    loaded = load_celle_run(run)
    assert loaded.checkpoint.name == "best" and loaded.image_size == S
    assert loaded.model.config.grid_size == 4 and not loaded.model.training
    meta = json.loads((run / "last" / "config.json").read_text())
    assert len(meta["extra"]["tokenizers"]["nucleus_sha256"]) == 64


def test_resume_is_bit_identical(world, tmp_path):
    full = tmp_path / "full"
    train_celle(_config(world, max_steps=4), run_dir=full, progress=False)
    part = tmp_path / "part"
    train_celle(_config(world, max_steps=2), run_dir=part, progress=False)
    summary = train_celle(_config(world, max_steps=4), run_dir=part, resume=True, progress=False)
    assert summary["steps"] == 4 and summary["steps_this_run"] == 2
    a = load_celle_run(full / "last").model.state_dict()
    b = load_celle_run(part / "last").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _val_records(full)] == [r["loss"] for r in _val_records(part)]


def test_token_cache_gives_the_same_training(world, tmp_path):
    cfg = _config(world, max_steps=6)  # 3 passes over 16 crops: views repeat
    summary = train_celle(cfg, run_dir=tmp_path / "cached", progress=False)
    assert summary["token_cache_hit_rate"] > 0
    off = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, token_cache=0))
    train_celle(off, run_dir=tmp_path / "plain", progress=False)
    a = load_celle_run(tmp_path / "cached" / "last").model.state_dict()
    b = load_celle_run(tmp_path / "plain" / "last").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_masked_mode_and_no_sequence_ablation(world, tmp_path):
    train_celle(_config(world, max_steps=2, mode="masked"), run_dir=tmp_path / "masked", progress=False)
    rec = _val_records(tmp_path / "masked")[-1]
    assert np.isfinite(rec["loss_threshold"]) and 0 < rec["mask_ratio"] <= 1
    cfg = _config(world, max_steps=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, text="none"))
    train_celle(cfg, run_dir=tmp_path / "none", progress=False)
    rec = _val_records(tmp_path / "none")[-1]
    assert "loss_text" not in rec and np.isfinite(rec["loss_threshold"])
    assert load_celle_run(tmp_path / "none").encoder.blank


def test_tokenizer_checks(world, tmp_path, celle_builders):
    cfg = _config(world, max_steps=1)
    with pytest.raises(ConfigError, match="grid_size"):
        train_celle(
            dataclasses.replace(cfg, model=cfg.model.replace(grid_size=8)), run_dir=tmp_path / "a", progress=False
        )
    swapped = dataclasses.replace(cfg, tokenizers=dataclasses.replace(cfg.tokenizers, nucleus=str(world["threshold"])))
    with pytest.raises(InputError, match="threshold"):
        train_celle(swapped, run_dir=tmp_path / "b", progress=False)
    # A run whose tokenizer weights changed afterwards refuses to load.
    vq_dir = tmp_path / "vq"
    celle_builders.tokenizer(vq_dir, "threshold", 5)
    run = tmp_path / "c"
    changed = dataclasses.replace(cfg, tokenizers=dataclasses.replace(cfg.tokenizers, threshold=str(vq_dir)))
    train_celle(changed, run_dir=run, progress=False)
    celle_builders.tokenizer(vq_dir, "threshold", 6)
    with pytest.raises(InputError, match="changed"):
        load_celle_run(run)


def test_cli_trains_both_tokenizers_and_celle(world, tmp_path, capsys):
    store = world["store"]
    vq_args = ["--set", "schedule.max_steps=2", "--set", "schedule.eval_every=2", "--set", "data.batch_size=4"]
    vq_args += ["--set", "data.image_size=32", "--set", "model.image_size=32", "--set", "data.chunk_window=2"]
    for kind in ("nucleus", "threshold"):
        code = main(
            ["-q", "train", "vqgan", "--kind", kind, "--store", str(store), "--out", str(tmp_path / kind), *vq_args]
        )
        assert code == 0
        assert (tmp_path / kind / "last" / "model.safetensors").is_file()
    # --resume alone continues with the run's own config.yaml (image size, kind, store, ...)
    assert (
        main(["-q", "train", "vqgan", "--out", str(tmp_path / "nucleus"), "--resume", "--set", "schedule.max_steps=3"])
        == 0
    )
    meta = json.loads((tmp_path / "nucleus" / "last" / "config.json").read_text())
    assert meta["extra"]["step"] == 3 and meta["image_size"] == 32 and meta["extra"]["kind"] == "nucleus"
    args = ["-q", "train", "celle", "--store", str(store), "--out", str(tmp_path / "celle")]
    args += ["--nucleus-vqgan", str(tmp_path / "nucleus"), "--threshold-vqgan", str(tmp_path / "threshold")]
    args += ["--set", "schedule.max_steps=2", "--set", "schedule.eval_every=2", "--set", "data.batch_size=4"]
    args += ["--set", "data.image_size=32", "--set", "model.grid_size=4", "--set", "model.max_residues=32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train celle" in out and "loss_threshold" in out
    assert (tmp_path / "celle" / "best" / "model.safetensors").is_file()
    # A user error is one line and exit status 2.
    bad = [a if a != str(tmp_path / "celle") else str(tmp_path / "celle_bad") for a in args]
    assert main([*bad[:-4], "--set", "model.grid_size=8", "--set", "model.max_residues=32"]) == 2
    assert "does not fit" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_shipped_yaml_equals_preset(name):
    root = Path(__file__).resolve().parents[2]
    preset = TrainCelleConfig.tiny() if name == "tiny" else TrainCelleConfig.paper()
    assert load_config(TrainCelleConfig, path=root / "configs" / "celle" / f"{name}.yaml") == preset


def test_sequence_encoder_memory_blank_and_errors(tmp_path):
    from protloc.models.celle import CelleConfig
    from protloc.models.embedders import EmbedderConfig, SequenceEncoder

    cfg = CelleConfig.tiny().replace(embedder="descriptors", text_dim=66)
    enc = SequenceEncoder(cfg, EmbedderConfig(cache_dir=str(tmp_path / "cache")))
    a = enc(["MKV", "PKKKRKV"], [True, False])
    assert a["text_emb"].shape == (2, 8, 66) and a["text_mask"].sum(1).tolist() == [5, 8]
    assert enc.cache is not None and enc.cache.misses == 2
    b = enc(["MKV", "PKKKRKV"], torch.tensor([True, False]))  # from memory, not from disk or the embedder
    assert enc.cache.hits == 0 and torch.equal(a["text_emb"], b["text_emb"])
    fresh = SequenceEncoder(cfg, EmbedderConfig(cache_dir=str(tmp_path / "cache")))
    assert torch.equal(fresh(["MKV"], [True])["text_emb"], a["text_emb"][:1, :5]) and fresh.cache.hits == 1
    blank = SequenceEncoder(cfg, blank=True)(["MKV", "PKKKRKV"], [True, True])
    assert blank["text_ids"].tolist() == [[2], [2]] and blank["text_emb"].shape == (2, 1, 66)
    with pytest.raises(ConfigError, match="text_dim=66"):
        SequenceEncoder(CelleConfig.tiny().replace(embedder="descriptors"))
    with pytest.raises(ConfigError, match="local weights"):
        SequenceEncoder(CelleConfig.tiny().replace(embedder="esm2", text_dim=32))
    with pytest.raises(InputError, match="residue"):
        enc(["MK1V"], [True])


def test_train_with_local_esm2_and_disk_cache(world, tmp_path):
    """The paper-style path: a frozen language model from a local file, embeddings cached on disk."""
    esm = pytest.importorskip("esm")
    import argparse

    torch.manual_seed(0)
    lm = esm.ESM2(num_layers=1, embed_dim=32, attention_heads=2, alphabet="ESM-1b", token_dropout=True)
    ns = argparse.Namespace(encoder_layers=1, encoder_embed_dim=32, encoder_attention_heads=2, token_dropout=True)
    ckpt = tmp_path / "tiny_esm2.pt"
    state = {f"encoder.sentence_encoder.{k}": v for k, v in lm.state_dict().items()}
    torch.save({"cfg": {"model": ns}, "model": state}, ckpt)
    cfg = _config(world, max_steps=2, embedder="esm2", text_dim=32)
    cache = tmp_path / "emb_cache"
    cfg = dataclasses.replace(cfg, embedder=dataclasses.replace(cfg.embedder, path=str(ckpt), cache_dir=str(cache)))
    summary = train_celle(cfg, run_dir=tmp_path / "run", progress=False)
    assert np.isfinite(summary["best_val_loss"])
    assert len(list(cache.rglob("*.safetensors"))) >= 3  # one per distinct sequence window
    run = load_celle_run(tmp_path / "run")
    assert run.encoder.embedder is not None and run.encoder.embedder.dim == 32

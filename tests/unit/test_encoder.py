"""The protein sequence encoder: shapes, padding invariance, gradients, checkpoints, clipping, batches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from protloc.data.sequence_data import ProteinDataset, TokenBudgetBatchSampler, length_batches, mask_residues
from protloc.data.sequences import ALPHABET, STANDARD, Tokenizer, clip_residues
from protloc.data.world.compartments import COMPARTMENTS, WEIGHT_COLUMNS
from protloc.errors import ConfigError
from protloc.models.checkpoint import load_checkpoint, save_checkpoint
from protloc.models.embedders import EMBEDDERS, build_embedder
from protloc.models.encoder import EncoderConfig, ProteinEncoder, count_parameters
from protloc.train.encoder import EncoderOptimConfig, lr_at

TOK = Tokenizer()


def _seqs(rng: np.random.Generator, lengths) -> list[str]:
    letters = np.array(list(STANDARD))
    return ["".join(rng.choice(letters, size=int(n))) for n in lengths]


def _table(n: int = 12, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    w = np.zeros((n, len(COMPARTMENTS)))
    for i in range(n):
        w[i, rng.choice(len(COMPARTMENTS), size=1 + i % 2, replace=False)] = 1.0
    w /= w.sum(1, keepdims=True)
    seqs = _seqs(rng, rng.integers(5, 60, size=n))
    df = pd.DataFrame({"accession": [f"P{i:05d}" for i in range(n)], "human": [i % 3 == 0 for i in range(n)]})
    for j, c in enumerate(WEIGHT_COLUMNS):
        df[c] = w[:, j]
    df["sequence"] = seqs
    return df


def test_presets_and_parameter_count() -> None:
    assert 800_000 <= count_parameters(ProteinEncoder(EncoderConfig.small())) <= 1_000_000
    assert count_parameters(ProteinEncoder(EncoderConfig.tiny())) < 50_000
    assert EncoderConfig.small().max_residues == 1000
    with pytest.raises(ConfigError, match="heads"):
        EncoderConfig(dim=30, heads=4)


@torch.no_grad()
def test_shapes_and_padding_invariance() -> None:
    torch.manual_seed(0)
    model = ProteinEncoder(EncoderConfig.tiny()).eval()
    seqs = _seqs(np.random.default_rng(1), [7, 23, 15])
    ids, mask = (torch.from_numpy(a) for a in TOK.encode_batch(seqs, max_len=100))
    out = model(ids, mask)
    b, length = ids.shape
    assert out["residues"].shape == (b, length, 32) and out["pooled"].shape == (b, 64)
    assert out["presence"].shape == (b, 13) and out["distribution"].shape == (b, 12)
    assert out["mlm"].shape == (b, length, TOK.vocab_size)
    assert float(out["residues"][~mask].abs().max()) == 0.0
    for k, seq in enumerate(seqs):
        one_ids, one_mask = (torch.from_numpy(a) for a in TOK.encode_batch([seq], max_len=100))
        alone = model(one_ids, one_mask)
        n = int(one_mask.sum())
        torch.testing.assert_close(alone["residues"][0], out["residues"][k, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(alone["pooled"][0], out["pooled"][k], atol=1e-5, rtol=0)
        torch.testing.assert_close(alone["presence"][0], out["presence"][k], atol=1e-5, rtol=0)


def test_loss_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = ProteinEncoder(EncoderConfig.tiny())
    ds = ProteinDataset(_table(), mask_prob=0.3, seed=0)
    batch = ds.collate(list(range(6)))
    assert (batch["mlm_targets"] != -100).any()
    out = model.loss(batch)
    assert set(out) == {"loss", "presence", "distribution", "mlm"}
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    # per-sample weights; no masked residue: the masked-residue term is 0
    batch = ProteinDataset(_table(), mask_prob=0.0).collate([0, 1, 2])
    out = model.loss({**batch, "weight": torch.tensor([1.0, 0.0, 0.0])})
    assert float(out["mlm"]) == 0.0 and torch.isfinite(out["loss"])


def test_checkpoint_round_trip_and_embedder(tmp_path) -> None:
    torch.manual_seed(0)
    model = ProteinEncoder(EncoderConfig.tiny()).eval()
    save_checkpoint(tmp_path / "enc", model=model, config=model.config)
    loaded, cfg, _ = load_checkpoint(tmp_path / "enc", model_cls=ProteinEncoder, config_cls=EncoderConfig)
    assert cfg == model.config
    ids, mask = (torch.from_numpy(a) for a in TOK.encode_batch(["MKTAYIAK", "MKV"], max_len=20))
    torch.testing.assert_close(loaded(ids, mask)["pooled"], model(ids, mask)["pooled"])
    assert "encoder" in EMBEDDERS and EMBEDDERS["encoder"].contextual
    emb = build_embedder("encoder", path=str(tmp_path / "enc"))
    assert emb.dim == 32 and emb.frozen
    out, residues = emb(ids, mask), model.encode(ids, mask)
    # residues as encoded; <cls> holds the summary the localization heads read
    torch.testing.assert_close(out[:, 1:], residues[:, 1:])
    torch.testing.assert_close(out[:, 0], model.summary(residues, mask))
    torch.testing.assert_close(model.presence(out[:, 0]), model(ids, mask)["presence"])
    assert emb.cache_config()["weights"]
    with pytest.raises(ConfigError):
        build_embedder("encoder")


def test_clip_residues_keeps_both_ends() -> None:
    seq = "".join(ALPHABET[i % 20] for i in range(1500))
    clipped = clip_residues(seq)
    assert len(clipped) == 1000 and clipped[:500] == seq[:500] and clipped[500:] == seq[-500:]
    assert clip_residues("MKV") == "MKV"
    assert clip_residues("ABCDEFG", 3) == "ABFG"[:2] + "G" and len(clip_residues("ABCDEFG", 3)) == 3
    with pytest.raises(ConfigError):
        clip_residues("MKV", 0)


def test_masking() -> None:
    ids, mask = TOK.encode_batch(["ACDEFGHIK" * 20, "MKV"], max_len=500)
    masked, targets = mask_residues(ids, mask, 0.1, np.random.default_rng(0))
    chosen = targets != -100
    assert chosen.any() and (masked[chosen] == TOK.mask_id).all()
    assert not chosen[:, 0].any() and not chosen[~mask].any()  # never <cls> or padding
    assert (targets[chosen] == ids[chosen]).all() and (masked[~chosen] == ids[~chosen]).all()


def test_sampler_budget_determinism_and_resume() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 300, size=400)
    weights = np.where(np.arange(400) < 50, 3.0, 1.0)
    make = dict(epoch_size=200, tokens_per_batch=1024, max_batch_size=16, seed=3)
    s = TokenBudgetBatchSampler(lengths, weights, **make)
    s.set_epoch(1, 0)
    epoch1 = list(s)
    assert len(epoch1) == len(s)
    for b in epoch1:
        assert len(b) <= 16 and (len(b) == 1 or len(b) * lengths[b].max() <= 1024)
    assert epoch1 == list(TokenBudgetBatchSampler(lengths, weights, **make).batches(1))
    s.set_epoch(0, 0)
    assert list(s) != epoch1  # a new draw each epoch
    s.set_epoch(1, 3)
    assert list(s) == epoch1[3:]
    assert list(s) == epoch1  # start_batch only for the first pass
    drawn = {i for b in epoch1 for i in b}
    assert len(drawn) <= 200
    # human up-weighting: the first 50 are drawn more often over epochs
    counts = np.zeros(400)
    for e in range(10):
        for b in s.batches(e):
            counts[b] += 1
    assert counts[:50].mean() > counts[50:].mean()
    # two processes split the batches
    halves = [TokenBudgetBatchSampler(lengths, weights, num_replicas=2, rank=r, **make).batches(1) for r in (0, 1)]
    assert len(halves[0]) == len(halves[1])
    # validation: every protein once, by length
    v = TokenBudgetBatchSampler(lengths, shuffle=False, tokens_per_batch=1024)
    assert sorted(i for b in v for i in b) == list(range(400))
    assert length_batches(np.array([0]), np.array([5000]), 1024, 8) == [[0]]


def test_dataset_targets_and_weights() -> None:
    table = _table().assign(sample_weight=2.0)
    ds = ProteinDataset(table, human_weight=3.0, max_residues=20)
    assert ds.presence.shape == (12, 13) and ds.distribution.shape == (12, 12)
    assert np.allclose(ds.weights, np.where(table["human"], 6.0, 2.0))
    assert ds.lengths.max() <= 22
    batch = ds.collate([0, 1])
    assert batch["ids"][:, 0].tolist() == [TOK.cls_id] * 2


def test_lr_schedule() -> None:
    o = EncoderOptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(5, o, 110) == pytest.approx(5e-4)
    assert lr_at(10, o, 110) == pytest.approx(1e-3)
    assert lr_at(110, o, 110) == pytest.approx(1e-4)
    assert lr_at(60, o, 110) == pytest.approx(0.55e-3)

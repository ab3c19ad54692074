"""Image to sequence: masked-residue training of the masked CELL-E and batched filling."""

from __future__ import annotations

import pytest
import torch

from protloc.errors import ConfigError, InputError
from protloc.eval.fill import STANDARD_AMINO_ACIDS, fill_residues, parse_masked
from protloc.eval.predict import SamplingConfig
from protloc.models.celle import Celle, CelleConfig
from protloc.models.embedders import OneHotEmbedder

SEQS = ["MKVLAAGICWRRDEEQQHP", "MSTNPKPQRKTKRNTNRRPQDVKF", "MAYW"]
ONEHOT = OneHotEmbedder()


def _cfg(**kw) -> CelleConfig:
    base = {"max_residues": 32, "masked_segments": ("threshold", "text")}
    return CelleConfig.tiny(mode="masked").replace(**{**base, **kw})


def _model(cfg: CelleConfig, seed: int = 0) -> Celle:
    torch.manual_seed(seed)
    return Celle(cfg).eval()


def _batch(cfg: CelleConfig, seqs=SEQS, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids, mask = ONEHOT.tokenize(seqs, max_len=cfg.max_residues, add_end=True)
    b, G = len(seqs), cfg.grid_tokens
    return {
        "text_ids": ids,
        "text_mask": mask,
        "text_emb": ONEHOT(ids, mask),
        "nucleus": torch.randint(0, cfg.num_nucleus_codes, (b, G), generator=g),
        "threshold": torch.randint(0, cfg.num_threshold_codes, (b, G), generator=g),
    }


def test_config_checks():
    with pytest.raises(ConfigError, match="mode='masked'"):
        CelleConfig.tiny().replace(masked_segments=("threshold", "text"))
    with pytest.raises(ConfigError, match="per-residue embedder"):
        CelleConfig.paper().replace(mode="masked", masked_segments=("threshold", "text"))
    with pytest.raises(ConfigError, match="text_mask_prob"):
        _cfg(text_mask_prob=1.5)


def test_residue_mask_hides_the_residue_and_nothing_else():
    cfg = _cfg()
    model = _model(cfg)
    batch = _batch(cfg, seqs=[SEQS[0]])
    rmask = torch.zeros_like(batch["text_mask"])
    rmask[0, 5] = True
    kw = dict(text_mask=batch["text_mask"], nucleus=batch["nucleus"], threshold=batch["threshold"], residue_mask=rmask)
    ref = model(text_emb=batch["text_emb"], **kw).logits
    other = batch["text_emb"].clone()
    other[0, 5] = other[0, 5].roll(4, dims=-1)  # another residue under the mask: nothing changes
    torch.testing.assert_close(model(text_emb=other, **kw).logits, ref)
    other = batch["text_emb"].clone()
    other[0, 6] = other[0, 6].roll(4, dims=-1)  # an unmasked residue: the masked row's prediction changes
    assert not torch.allclose(model(text_emb=other, **kw).logits[0, 5], ref[0, 5])
    with pytest.raises(InputError, match="real residues"):
        bad = rmask.clone()
        bad[0, 0] = True
        model(text_emb=batch["text_emb"], **{**kw, "residue_mask": bad})


def test_sample_residue_mask_schedule():
    cfg = _cfg(text_mask_prob=0.5)
    model = _model(cfg)
    ids, mask = ONEHOT.tokenize(SEQS * 20, max_len=cfg.max_residues, add_end=True)
    rmask, chosen = model.sample_residue_mask(ids, mask, generator=torch.Generator().manual_seed(0))
    assert 0 < int(chosen.sum()) < len(chosen)
    assert not rmask[:, 0].any() and not (rmask & ~mask).any()
    assert not rmask[ids == 3].any()  # never the end token <sep>
    assert torch.equal(rmask.any(1), chosen)  # a chosen sample masks at least one residue, others none


def test_loss_and_gradients_with_text_masking():
    cfg = _cfg(text_mask_prob=0.5)
    model = _model(cfg).train()
    batch = _batch(cfg, seqs=SEQS * 4)
    losses = model.loss(batch, generator=torch.Generator().manual_seed(3))
    assert {"loss", "loss_text", "loss_threshold", "acc_text", "acc_threshold", "mask_ratio"} <= set(losses)
    w = cfg.loss_weights
    torch.testing.assert_close(losses["loss"], w.text * losses["loss_text"] + w.threshold * losses["loss_threshold"])
    losses["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # Only text: no threshold term (and no NaN from an empty mean).
    only_text = _cfg(text_mask_prob=1.0)
    out = _model(only_text).loss(_batch(only_text), generator=torch.Generator().manual_seed(0))
    assert "loss_threshold" not in out and torch.isfinite(out["loss"]) and "loss_text" in out


def _fill(model, batch, rmask, **kw):
    return fill_residues(
        model,
        text_ids=batch["text_ids"],
        text_mask=batch["text_mask"],
        residue_mask=rmask,
        nucleus=batch["nucleus"],
        threshold=batch["threshold"],
        embed=ONEHOT,
        **kw,
    )


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_fill_changes_only_masked_positions_in_steps_passes(steps, monkeypatch):
    cfg = _cfg()
    model = _model(cfg)
    batch = _batch(cfg)
    rmask = torch.zeros_like(batch["text_mask"])
    rmask[0, 2:9] = True
    rmask[1, [1, 4, 20]] = True
    rmask[2, 3] = True
    calls = []
    forward = Celle.forward
    monkeypatch.setattr(Celle, "forward", lambda self, **k: calls.append(1) or forward(self, **k))
    out = _fill(model, batch, rmask, sampling=SamplingConfig(steps=steps, seed=5))
    # One pass per step for all masked positions of the batch, not one per residue (11 here).
    assert len(calls) == steps
    assert torch.equal(out.ids[~rmask], batch["text_ids"][~rmask])
    letters = torch.tensor([ONEHOT.tokenizer.vocab[a] for a in STANDARD_AMINO_ACIDS])
    assert torch.isin(out.ids[rmask], letters).all()
    torch.testing.assert_close(out.probs[rmask].sum(-1), torch.ones(int(rmask.sum())))
    assert (out.probs[~rmask] == 0).all()
    assert ((out.step[rmask] >= 0) & (out.step[rmask] < steps)).all() and (out.step[~rmask] == -1).all()
    if steps == 1:
        assert (out.step[rmask] == 0).all()
    again = _fill(model, batch, rmask, sampling=SamplingConfig(steps=steps, seed=5))
    assert torch.equal(again.ids, out.ids)


def test_fill_refuses_models_that_cannot():
    cfg = CelleConfig.tiny(mode="masked").replace(max_residues=32)
    batch = _batch(cfg)
    with pytest.raises(ConfigError, match="cannot fill residues"):
        _fill(_model(cfg), batch, torch.zeros_like(batch["text_mask"]))


def test_parse_masked():
    assert parse_masked("MK__L") == ("MKAAL", [2, 3])
    with pytest.raises(InputError, match="seq 1"):
        parse_masked("MK_J*", name="seq 1")


def test_fill_learns_from_images():
    """A few hundred steps on a toy task where the threshold image decides the masked residues: the
    fill reads the image."""
    cfg = _cfg(text_mask_prob=1.0, max_residues=8, depth=1, grid_size=2, num_nucleus_codes=8, num_threshold_codes=8)
    torch.manual_seed(0)
    model = Celle(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    G = cfg.grid_tokens

    def batch(n: int) -> dict[str, torch.Tensor]:
        label = torch.randint(0, 2, (n,), generator=g)
        seqs = ["K" * 8 if y else "E" * 8 for y in label.tolist()]
        ids, mask = ONEHOT.tokenize(seqs, max_len=8, add_end=False)
        thr = torch.where(label[:, None] == 1, torch.full((n, G), 7), torch.full((n, G), 3))
        return {
            "text_ids": ids,
            "text_mask": mask,
            "text_emb": ONEHOT(ids, mask),
            "nucleus": torch.zeros(n, G, dtype=torch.long),
            "threshold": thr,
        }

    for _ in range(100):
        loss = model.loss(batch(8), generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = batch(8)
    rmask = test["text_mask"].clone()
    rmask[:, 0] = False
    out = _fill(model, test, rmask, sampling=SamplingConfig(steps=2, temperature=0.5, seed=0))
    assert torch.equal(out.ids, test["text_ids"])

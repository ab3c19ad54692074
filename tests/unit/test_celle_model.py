from __future__ import annotations

import pytest
import torch

from protloc.config import apply_overrides, config_from_dict, config_to_dict
from protloc.errors import ConfigError, InputError
from protloc.models.celle import Celle, CelleConfig, CelleLossWeights
from protloc.models.checkpoint import load_checkpoint, save_checkpoint
from protloc.models.embedders import OneHotEmbedder

SEQS = ["MKVLAAGICWRRDEEQQHP", "MSTNPKPQRKTKRNTNRRPQDVKFPGGGQIVGGVYLLPRRGPRLGVRATRKTSERSQPRGRRQPIPKAR", "MAY"]
ONEHOT = OneHotEmbedder()


def _model(cfg: CelleConfig | None = None, seed: int = 0) -> Celle:
    torch.manual_seed(seed)
    return Celle(cfg or CelleConfig.tiny()).eval()


def _batch(cfg: CelleConfig, seqs=SEQS, seed: int = 1, add_end=True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids, mask = ONEHOT.tokenize(seqs, max_len=cfg.max_residues, add_end=add_end)
    b, G = len(seqs), cfg.grid_tokens
    return {
        "text_ids": ids,
        "text_mask": mask,
        "text_emb": ONEHOT(ids, mask),
        "nucleus": torch.randint(0, cfg.num_nucleus_codes, (b, G), generator=g),
        "threshold": torch.randint(0, cfg.num_threshold_codes, (b, G), generator=g),
    }


def _forward(model: Celle, batch: dict[str, torch.Tensor], **kw) -> torch.Tensor:
    thr = batch["threshold"] if model.config.mode == "masked" else batch["threshold"][:, :-1]
    return model(
        text_emb=batch["text_emb"], text_mask=batch["text_mask"], nucleus=batch["nucleus"], threshold=thr, **kw
    ).logits


# ---------------------------------------------------------------------------------------------- config


def test_presets():
    paper = CelleConfig.paper()
    assert (paper.depth, paper.heads, paper.dim_head, paper.dim) == (32, 16, 64, 768)
    assert paper.input_len == 1512 and paper.text_len == 1001 and paper.vocab_size == 1054
    assert paper.loss_weights == CelleLossWeights(1 / 9, 1 / 9, 8 / 9)
    assert paper.attn_dropout == paper.ff_dropout == 0.1 and paper.embedder == "tape"
    assert CelleConfig.reference().loss_weights.threshold == pytest.approx(7 / 9)
    tiny = CelleConfig.tiny()
    assert tiny.input_len == 301 + 64 + 63 and tiny.text_projection
    assert CelleConfig.tiny(mode="masked").input_len == 301 + 128
    cfg = apply_overrides(tiny, ["loss_weights.threshold=0.5", "mode=masked", "masked_segments=[threshold,nucleus]"])
    assert config_from_dict(CelleConfig, config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "changes",
    [
        {"mode": "diffusion"},
        {"dim_head": 12},
        {"text_dim": 25, "text_projection": False},
        {"embedder": "bert"},
        {"masked_segments": ("nucleus",)},
        {"attn_dropout": 1.0},
        {"depth": 0},
        {"text_vocab_size": 33},
        {"loss_weights": CelleLossWeights(text=-1.0)},
    ],
)
def test_config_errors(changes):
    with pytest.raises(ConfigError):
        CelleConfig.tiny().replace(**changes)


def test_paper_parameter_count():
    with torch.device("meta"):
        model = Celle(CelleConfig.paper())
    n = model.num_parameters()
    per_block = 768 * 3072 + 1024 * 768 + 768 + (768 * 6144 + 6144) + (3072 * 768 + 768) + 4 * 768
    assert n == 32 * per_block + 2 * 512 * 768 + 2 * 768 + 768 * 1054 + 1054


# ---------------------------------------------------------------------------------------------- forward


def test_shapes_and_segment_restricted_logits():
    cfg = CelleConfig.tiny()
    model = _model(cfg)
    batch = _batch(cfg)
    out = model(
        text_emb=batch["text_emb"],
        text_mask=batch["text_mask"],
        nucleus=batch["nucleus"].view(3, 8, 8),
        threshold=batch["threshold"][:, :-1],
    )
    tl, G = cfg.text_len, cfg.grid_tokens
    assert out.logits.shape == (3, cfg.input_len, cfg.vocab_size)
    assert out.segments.tolist() == [0] * (tl - 1) + [1] * G + [2] * (G - 1) + [2]
    # Random logits: the argmax still always lies in the row's vocabulary.
    am = out.logits.argmax(-1)  # [B, P]
    text_rows, nuc_rows, thr_rows = am[:, : tl - 1], am[:, tl - 1 : tl - 1 + G], am[:, tl - 1 + G :]
    assert ((text_rows >= 5) & (text_rows < 30) | (text_rows == 3)).all()
    assert ((nuc_rows >= 30) & (nuc_rows < 30 + 128)).all()
    assert (thr_rows >= 30 + 128).all()
    finite = torch.isfinite(out.logits[0])
    assert finite[: tl - 1].sum(-1).eq(26).all() and finite[tl - 1 :].sum(-1).eq(128).all()


def test_gradients_reach_every_parameter():
    cfg = CelleConfig.tiny().replace(attn_dropout=0.0, ff_dropout=0.0)
    model = _model(cfg).train()
    losses = model.loss(_batch(cfg))
    assert set(losses) == {
        "loss",
        "loss_text",
        "loss_nucleus",
        "loss_threshold",
        "acc_text",
        "acc_nucleus",
        "acc_threshold",
    }
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_loss_weights_and_ignored_padding():
    cfg = CelleConfig.tiny()
    model = _model(cfg)
    batch = _batch(cfg)
    losses = model.loss(batch)
    w = cfg.loss_weights
    want = w.text * losses["loss_text"] + w.nucleus * losses["loss_nucleus"] + w.threshold * losses["loss_threshold"]
    torch.testing.assert_close(losses["loss"], want)
    # Extra padding columns (with junk ids / embeddings) change nothing.
    padded = dict(batch)
    padded["text_ids"] = torch.cat([batch["text_ids"], torch.zeros(3, 5, dtype=torch.long)], 1)
    padded["text_mask"] = torch.cat([batch["text_mask"], torch.zeros(3, 5, dtype=torch.bool)], 1)
    padded["text_emb"] = torch.cat([batch["text_emb"], torch.randn(3, 5, 25)], 1)
    for k, v in model.loss(padded).items():
        torch.testing.assert_close(v, losses[k], atol=1e-6, rtol=1e-6)


def _positions_to_check(cfg: CelleConfig) -> list[int]:
    tl, G = cfg.text_len, cfg.grid_tokens
    # first residue, a middle residue, first nucleus token, last nucleus token, first / middle /
    # last input threshold token
    return [1, 10, tl, tl + G - 1, tl + G, tl + G + 20, tl + 2 * G - 2]


def _perturb(batch: dict[str, torch.Tensor], cfg: CelleConfig, t: int) -> dict[str, torch.Tensor]:
    tl, G = cfg.text_len, cfg.grid_tokens
    out = {k: v.clone() for k, v in batch.items()}
    if t < tl:
        out["text_emb"][:, t] = out["text_emb"][:, t].roll(3, dims=-1)
    elif t < tl + G:
        out["nucleus"][:, t - tl] = (out["nucleus"][:, t - tl] + 1) % cfg.num_nucleus_codes
    else:
        out["threshold"][:, t - tl - G] = (out["threshold"][:, t - tl - G] + 1) % cfg.num_threshold_codes
    return out


def test_causal_mask_at_every_segment_boundary():
    cfg = CelleConfig.tiny()
    model = _model(cfg)
    batch = _batch(cfg, seqs=[SEQS[1]])
    ref = _forward(model, batch)
    for t in _positions_to_check(cfg):
        logits = _forward(model, _perturb(batch, cfg, t))
        torch.testing.assert_close(logits[:, :t], ref[:, :t], atol=0, rtol=0, msg=f"position {t}")
        assert not torch.equal(logits[:, t:], ref[:, t:]), t


def test_masked_mode_is_bidirectional():
    cfg = CelleConfig.tiny(mode="masked")
    model = _model(cfg)
    batch = _batch(cfg, seqs=[SEQS[1]])
    mask = torch.zeros(1, cfg.grid_tokens, dtype=torch.bool)
    mask[:, ::3] = True
    ref = _forward(model, batch, threshold_mask=mask)
    assert ref.shape == (1, cfg.input_len, cfg.vocab_size)
    late = _perturb(batch, cfg, cfg.text_len + cfg.grid_tokens + 40)
    logits = _forward(model, late, threshold_mask=mask)
    assert not torch.allclose(logits[:, :10], ref[:, :10])  # the text rows see a later image token
    # A masked token's identity is hidden: changing it changes nothing.
    hidden = _perturb(batch, cfg, cfg.text_len + cfg.grid_tokens + 3)
    torch.testing.assert_close(_forward(model, hidden, threshold_mask=mask), ref)


def test_masked_mode_loss():
    cfg = CelleConfig.tiny(mode="masked").replace(masked_segments=("threshold", "nucleus"))
    model = _model(cfg).train()
    gen = torch.Generator().manual_seed(0)
    losses = model.loss(_batch(cfg), generator=gen)
    assert {"loss", "loss_threshold", "acc_threshold", "loss_nucleus", "acc_nucleus", "mask_ratio"} == set(losses)
    losses["loss"].backward()
    assert model.mask_embed["threshold"].grad.abs().sum() > 0
    masks = model.sample_mask(2000, generator=gen)
    counts = masks.sum(1)
    assert counts.min() >= 1 and counts.max() <= cfg.grid_tokens
    # Cosine schedule: E[cos(pi/2 u)] = 2/pi.
    assert abs(masks.float().mean().item() - 2 / torch.pi) < 0.03
    with pytest.raises(ConfigError):
        model.new_cache(1)


def test_padding_never_changes_real_logits():
    cfg = CelleConfig.tiny()
    model = _model(cfg)
    both = _batch(cfg, seqs=[SEQS[0], SEQS[1]])
    alone = {k: v[:1] for k, v in both.items()}
    n = int(alone["text_mask"].sum())
    alone["text_ids"], alone["text_mask"], alone["text_emb"] = (
        alone["text_ids"][:, :n],
        alone["text_mask"][:, :n],
        alone["text_emb"][:, :n],
    )
    a = _forward(model, alone)
    b = _forward(model, both)[:1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    junk = {k: v.clone() for k, v in both.items()}
    junk["text_emb"][0, n:] = torch.randn_like(junk["text_emb"][0, n:])
    torch.testing.assert_close(_forward(model, junk), _forward(model, both))


def test_text_length_limits():
    cfg = CelleConfig.tiny()
    model = _model(cfg)
    batch = _batch(cfg)
    bad = dict(batch)
    bad["text_mask"] = torch.ones(3, cfg.text_len + 1, dtype=torch.bool)
    bad["text_emb"] = torch.zeros(3, cfg.text_len + 1, 25)
    with pytest.raises(InputError, match="crop"):
        _forward(model, bad)
    with pytest.raises(InputError, match="at most"):
        model(
            text_emb=batch["text_emb"],
            text_mask=batch["text_mask"],
            nucleus=batch["nucleus"],
            threshold=batch["threshold"],
        )
    with pytest.raises(InputError):
        model(text_emb=batch["text_emb"][..., :10], text_mask=batch["text_mask"], nucleus=batch["nucleus"])


def test_attention_weights_and_same_logits():
    cfg = CelleConfig.tiny()
    model = _model(cfg)
    batch = _batch(cfg, seqs=SEQS[:2])
    out = model(
        text_emb=batch["text_emb"],
        text_mask=batch["text_mask"],
        nucleus=batch["nucleus"],
        threshold=batch["threshold"][:, :-1],
        return_attention=True,
    )
    assert len(out.attentions) == cfg.depth
    assert out.attentions[0].shape == (2, cfg.heads, cfg.input_len, cfg.input_len)
    torch.testing.assert_close(out.attentions[1].sum(-1), torch.ones(2, cfg.heads, cfg.input_len))
    torch.testing.assert_close(out.logits, _forward(model, batch), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize("token_shift", [True, False])
def test_incremental_pass_equals_full_pass(token_shift):
    cfg = CelleConfig.tiny().replace(token_shift=token_shift)
    model = _model(cfg)
    batch = _batch(cfg, seqs=SEQS[:2])
    full = _forward(model, batch)
    tl, G = cfg.text_len, cfg.grid_tokens
    cache = model.new_cache(2)
    # Prompt: text + the first nucleus tokens; then uneven chunks, then one threshold token per step.
    steps = [
        model.forward_step(
            cache, text_emb=batch["text_emb"], text_mask=batch["text_mask"], nucleus=batch["nucleus"][:, :5]
        )
    ]
    steps.append(model.forward_step(cache, nucleus=batch["nucleus"][:, 5:6]))
    steps.append(model.forward_step(cache, nucleus=batch["nucleus"][:, 6:40]))
    steps.append(model.forward_step(cache, nucleus=batch["nucleus"][:, 40:], threshold=batch["threshold"][:, :3]))
    for i in range(3, G - 1):
        steps.append(model.forward_step(cache, threshold=batch["threshold"][:, i : i + 1]))
    inc = torch.cat(steps, 1)
    assert cache.length == cfg.input_len == inc.shape[1]
    finite = torch.isfinite(full)
    assert torch.equal(finite, torch.isfinite(inc))
    torch.testing.assert_close(inc[finite], full[finite], atol=1e-5, rtol=1e-5)
    assert full[0, tl - 1 + G :].isfinite().sum() == 128 * G  # the threshold rows were all compared


@pytest.mark.parametrize("seqs", [SEQS[:2], SEQS[2:]])
def test_trimmed_text_equals_full_pass(seqs):
    """trim_text leaves the padding out of the cache; every other row equals the full pass."""
    cfg = CelleConfig.tiny()
    model = _model(cfg)
    batch = _batch(cfg, seqs=seqs)
    full = _forward(model, batch)
    tl, G = cfg.text_len, cfg.grid_tokens
    cache = model.new_cache(len(seqs))
    first = model.forward_step(
        cache, text_emb=batch["text_emb"], text_mask=batch["text_mask"], nucleus=batch["nucleus"][:, :7], trim_text=True
    )
    keep = int(batch["text_mask"].sum(1).max())
    assert cache.skipped == tl - keep and cache.length == tl + 7 and cache.kv.length == keep + 7
    assert first.shape[1] == keep + 7
    steps = [first[:, keep:], model.forward_step(cache, nucleus=batch["nucleus"][:, 7:])]
    for i in range(G - 1):
        steps.append(model.forward_step(cache, threshold=batch["threshold"][:, i : i + 1]))
    inc = torch.cat(steps, 1)
    assert cache.length == cfg.input_len
    torch.testing.assert_close(first[:, :keep], full[:, :keep], atol=1e-5, rtol=1e-5)
    ref = full[:, tl:]
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(inc))
    torch.testing.assert_close(inc[finite], ref[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["autoregressive", "masked"])
def test_trimmed_full_pass_equals_untrimmed(mode):
    cfg = CelleConfig.tiny(mode=mode)
    model = _model(cfg)
    batch = _batch(cfg, seqs=SEQS[:2])
    kw = {"threshold_mask": torch.rand(2, cfg.grid_tokens) < 0.5} if mode == "masked" else {}
    full = _forward(model, batch, **kw)
    out = model(
        text_emb=batch["text_emb"],
        text_mask=batch["text_mask"],
        nucleus=batch["nucleus"],
        threshold=batch["threshold"] if mode == "masked" else batch["threshold"][:, :-1],
        trim_text=True,
        **kw,
    )
    keep = int(batch["text_mask"].sum(1).max())
    n_img = full.shape[1] - cfg.text_len
    assert out.logits.shape[1] == keep + n_img
    torch.testing.assert_close(out.logits[:, keep:], full[:, cfg.text_len :], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[:, :keep], full[:, :keep], atol=1e-5, rtol=1e-5)
    assert torch.equal(
        out.segments[keep:],
        model(
            text_emb=batch["text_emb"],
            text_mask=batch["text_mask"],
            nucleus=batch["nucleus"],
            threshold=batch["threshold"] if mode == "masked" else batch["threshold"][:, :-1],
            **kw,
        ).segments[cfg.text_len :],
    )


def test_bf16_incremental_close_to_fp32():
    """A bf16 copy (decoding steps take the explicit-attention path) follows the fp32 model closely."""
    cfg = CelleConfig.tiny()
    model = _model(cfg)
    batch = _batch(cfg, seqs=SEQS[:2])
    full = _forward(model, batch)[:, cfg.text_len - 1 + cfg.grid_tokens :]  # threshold rows
    half = _model(cfg).to(torch.bfloat16)
    cache = half.new_cache(2)
    assert cache.kv.k.dtype == torch.bfloat16
    steps = [
        half.forward_step(
            cache, text_emb=batch["text_emb"], text_mask=batch["text_mask"], nucleus=batch["nucleus"], trim_text=True
        )[:, -1:]
    ]
    for i in range(cfg.grid_tokens - 1):
        steps.append(half.forward_step(cache, threshold=batch["threshold"][:, i : i + 1]))
    inc = torch.cat(steps, 1).float()
    finite = torch.isfinite(full)
    p_full = full.masked_fill(~finite, float("-inf")).softmax(-1)
    p_inc = inc.softmax(-1)
    assert (p_full - p_inc).abs().max() < 0.02


def test_forward_step_errors():
    cfg = CelleConfig.tiny()
    model = _model(cfg)
    batch = _batch(cfg, seqs=SEQS[:1])
    cache = model.new_cache(1)
    with pytest.raises(InputError, match="first step"):
        model.forward_step(cache, nucleus=batch["nucleus"][:, :2])
    model.forward_step(cache, text_emb=batch["text_emb"], text_mask=batch["text_mask"])
    with pytest.raises(InputError, match="continue"):
        model.forward_step(cache, threshold=batch["threshold"][:, :1])  # nucleus grid not complete
    with pytest.raises(InputError, match="first step only"):
        model.forward_step(cache, text_emb=batch["text_emb"], text_mask=batch["text_mask"])


# ---------------------------------------------------------------------------------------------- others


def test_learned_embedder_lives_in_the_model():
    cfg = CelleConfig.tiny().replace(embedder="learned", text_dim=64, text_projection=False)
    model = _model(cfg).train()
    batch = _batch(cfg)
    del batch["text_emb"]
    loss = model.loss(batch)["loss"]
    loss.backward()
    assert model.text_embedder.embedding.weight.grad.abs().sum() > 0
    with pytest.raises(InputError, match="text_ids"):
        model(text_mask=batch["text_mask"], nucleus=batch["nucleus"])


def test_save_load_round_trip(tmp_path):
    cfg = CelleConfig.tiny(mode="masked")
    model = _model(cfg)
    batch = _batch(cfg)
    mask = torch.rand(3, cfg.grid_tokens, generator=torch.Generator().manual_seed(0)) < 0.5
    want = _forward(model, batch, threshold_mask=mask)
    save_checkpoint(tmp_path / "ckpt", model=model, config=cfg)
    loaded, cfg2, _ = load_checkpoint(tmp_path / "ckpt", model_cls=Celle, config_cls=CelleConfig)
    assert cfg2 == cfg
    torch.testing.assert_close(_forward(loaded, batch, threshold_mask=mask), want, atol=0, rtol=0)

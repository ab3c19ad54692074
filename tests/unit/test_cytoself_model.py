from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from protloc.config import apply_overrides, config_from_dict, config_to_dict
from protloc.errors import ConfigError, InputError
from protloc.models.cytoself import Cytoself, CytoselfConfig, CytoselfLossWeights

LOSS_KEYS = {"loss", "recon1", "recon2", "vq1", "vq2", "fc1", "fc2", "perplexity1", "perplexity2", "acc1", "acc2"}


def _model(cfg: CytoselfConfig | None = None, seed: int = 0) -> Cytoself:
    torch.manual_seed(seed)
    return Cytoself(cfg or CytoselfConfig.tiny(num_classes=5))


def _batch(cfg: CytoselfConfig, n: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    return {"image": x, "label": torch.randint(0, cfg.num_classes, (n,), generator=g)}


def test_tiny_forward_shapes():
    cfg = CytoselfConfig.tiny(num_classes=5)
    model = _model(cfg)
    out = model(_batch(cfg, n=2)["image"])
    assert out.reconstruction.shape == (2, 2, 100, 100)
    assert out.reconstruction2.shape == (2, 16, 25, 25)
    assert out.z1.shape == out.q1.shape == (2, 16, 25, 25)
    assert out.z2.shape == out.q2.shape == (2, 144, 4, 4)
    assert out.idx1.shape == (2, 1, 25, 25)
    assert out.idx2.shape == (2, 9, 4, 4)
    assert out.logits1.shape == out.logits2.shape == (2, 5)
    assert cfg.decoder1_sizes == [(50, 50), (100, 100)]
    assert cfg.decoder2_sizes == [(7, 7), (13, 13), (25, 25)]


def test_paper_forward_shapes_one_image():
    cfg = CytoselfConfig.paper()
    model = _model(cfg).eval()
    assert (cfg.local_grid, cfg.global_grid, cfg.vq2_dim, cfg.vq2_split) == (25, 4, 64, 9)
    with torch.no_grad():
        out = model(torch.rand(1, 2, 100, 100))
    assert out.reconstruction.shape == (1, 2, 100, 100)
    assert out.reconstruction2.shape == out.z1.shape == out.q1.shape == (1, 64, 25, 25)
    assert out.q2.shape == (1, 576, 4, 4) and out.idx2.shape == (1, 9, 4, 4) and out.idx1.shape == (1, 1, 25, 25)
    assert out.logits1.shape == out.logits2.shape == (1, 1311)
    assert model.fc1[1].in_features == 40000 and model.fc2[1].in_features == 9216
    assert model.vq2.codebook.shape == (2048, 64) and model.vq1.codebook.shape == (2048, 64)


def test_loss_keys_finite_and_weighted_total():
    cfg = CytoselfConfig.tiny(num_classes=5)
    model = _model(cfg)
    losses = model.loss(_batch(cfg))
    assert set(losses) == LOSS_KEYS
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    for k in ("perplexity1", "perplexity2", "acc1", "acc2"):
        assert not losses[k].requires_grad
    terms = sum(losses[k] for k in ("recon1", "recon2", "vq1", "vq2", "fc1", "fc2"))
    torch.testing.assert_close(losses["loss"], terms)

    weights = CytoselfLossWeights(recon1=2.0, recon2=0.0, vq1=1.0, vq2=0.5, fc1=0.0, fc2=3.0)
    model_w = _model(dataclasses.replace(cfg, loss_weights=weights))
    lw = model_w.loss(_batch(cfg))
    expected = 2 * lw["recon1"] + lw["vq1"] + 0.5 * lw["vq2"] + 3 * lw["fc2"]
    torch.testing.assert_close(lw["loss"], expected)


def test_gradients_reach_every_parameter():
    cfg = CytoselfConfig.tiny(num_classes=5)
    model = _model(cfg)
    model.loss(_batch(cfg, n=4))["loss"].backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_recon2_target_detach_switch():
    cfg = CytoselfConfig.tiny(num_classes=5)
    grads = {}
    for detach in (False, True):
        model = _model(dataclasses.replace(cfg, detach_recon2_target=detach), seed=0)
        model.loss(_batch(cfg))["recon2"].backward()
        grads[detach] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # decoder2 sees the same loss either way; encoder1 loses the gradient through the target when detached.
    dec = [n for n in grads[False] if n.startswith("decoder2.")]
    assert dec and all(torch.allclose(grads[False][n], grads[True][n]) for n in dec)
    enc = [n for n in grads[False] if n.startswith("encoder1.")]
    assert any(not torch.allclose(grads[False][n], grads[True][n]) for n in enc)


def test_eval_encoding_independent_of_batch_and_restores_mode():
    cfg = CytoselfConfig.tiny(num_classes=5)
    model = _model(cfg)
    model.loss(_batch(cfg, n=4))  # update BatchNorm running statistics once
    x = _batch(cfg, n=2)["image"]
    others = torch.rand(5, 2, 100, 100)
    assert model.training
    a = model.encode(x)
    b = model.encode(torch.cat([others[:3], x, others[3:]]))
    assert model.training  # encode switched to eval and back
    assert torch.equal(a.idx1, b.idx1[3:5]) and torch.equal(a.idx2, b.idx2[3:5])
    assert torch.equal(a.q1, b.q1[3:5]) and torch.equal(a.q2, b.q2[3:5])
    torch.testing.assert_close(a.z2, b.z2[3:5], rtol=0, atol=1e-5)
    # The reference's defect: in train mode the same crop's encoding changes with its batch.
    with torch.no_grad():
        ta, tb = model(x), model(torch.cat([others[:3], x, others[3:]]))
    assert not torch.allclose(ta.z2, tb.z2[3:5], atol=1e-3)


def test_decode_indices_matches_decode_and_forward():
    cfg = CytoselfConfig.tiny(num_classes=5)
    model = _model(cfg).eval()
    x = _batch(cfg, n=2)["image"]
    with torch.no_grad():
        out = model(x)
        enc = model.encode(x)
        from_idx = model.decode_indices(enc.idx1, enc.idx2)
    assert torch.equal(enc.q1, out.q1) and torch.equal(enc.q2, out.q2)
    torch.testing.assert_close(from_idx, out.reconstruction)
    assert from_idx.shape == (2, 2, 100, 100)
    with pytest.raises(InputError, match="q2"):
        model.decode(enc.q1, enc.q2[:, :10])


def test_safetensors_round_trip(tmp_path):
    cfg = CytoselfConfig.tiny(num_classes=5)
    model = _model(cfg, seed=0)
    model.loss(_batch(cfg))  # non-default BatchNorm statistics
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    fresh = _model(cfg, seed=123)
    fresh.load_state_dict(load_file(str(path)), strict=True)
    model.eval()
    fresh.eval()
    x = _batch(cfg, n=2, seed=7)["image"]
    with torch.no_grad():
        a, b = model(x), fresh(x)
    assert torch.equal(a.reconstruction, b.reconstruction)
    assert torch.equal(a.idx1, b.idx1) and torch.equal(a.idx2, b.idx2)
    assert torch.equal(a.logits2, b.logits2)


def test_ablation_no_fc():
    cfg = dataclasses.replace(CytoselfConfig.tiny(num_classes=5), use_fc=False)
    model = _model(cfg)
    assert model.fc1 is None and model.fc2 is None
    batch = _batch(cfg)
    del batch["label"]  # not needed without the ID task
    losses = model.loss(batch)
    assert set(losses) == LOSS_KEYS - {"fc1", "fc2", "acc1", "acc2"}
    losses["loss"].backward()
    out = model(batch["image"])
    assert out.logits1 is None and out.logits2 is None


def test_ablation_no_decoder():
    cfg = dataclasses.replace(CytoselfConfig.tiny(num_classes=5), use_decoder=False)
    model = _model(cfg)
    losses = model.loss(_batch(cfg))
    assert set(losses) == LOSS_KEYS - {"recon1", "recon2"}
    losses["loss"].backward()
    assert model(_batch(cfg)["image"]).reconstruction is None
    with pytest.raises(RuntimeError, match="no decoder"):
        model.decode(torch.zeros(1, 16, 25, 25), torch.zeros(1, 144, 4, 4))


def test_ablation_no_split():
    cfg = dataclasses.replace(CytoselfConfig.tiny(num_classes=5), split_quantization=False)
    model = _model(cfg)
    assert model.vq2.codebook.shape == (128, 144)
    out = model(_batch(cfg)["image"])
    assert out.idx2.shape == (3, 1, 4, 4) and out.q2.shape == (3, 144, 4, 4)
    assert torch.isfinite(model.loss(_batch(cfg))["loss"])


@pytest.mark.parametrize("channels", [("protein",), ("protein", "nucleus")])
def test_ablation_channels(channels):
    cfg = dataclasses.replace(CytoselfConfig.tiny(num_classes=5), channels=channels)
    model = _model(cfg)
    batch = _batch(cfg)
    assert batch["image"].shape[1] == len(channels)
    out = model(batch["image"])
    assert out.reconstruction.shape == batch["image"].shape
    assert torch.isfinite(model.loss(batch)["loss"])


def test_other_input_size():
    cfg = dataclasses.replace(CytoselfConfig.tiny(num_classes=5), input_size=64)
    assert (cfg.local_grid, cfg.global_grid) == (16, 2)
    assert cfg.decoder1_sizes == [(32, 32), (64, 64)] and cfg.decoder2_sizes == [(4, 4), (8, 8), (16, 16)]
    model = _model(cfg)
    out = model(_batch(cfg, n=2)["image"])
    assert out.reconstruction.shape == (2, 2, 64, 64) and out.reconstruction2.shape == (2, 16, 16, 16)


def test_input_errors_name_shapes():
    cfg = CytoselfConfig.tiny(num_classes=5)
    model = _model(cfg)
    with pytest.raises(InputError, match=r"\[B, 2, 100, 100\].*got \[1, 3, 100, 100\]"):
        model(torch.rand(1, 3, 100, 100))
    with pytest.raises(InputError, match=r"got \[1, 2, 64, 64\]"):
        model.encode(torch.rand(1, 2, 64, 64))
    with pytest.raises(ValueError):  # InputError is a ValueError
        model(torch.rand(2, 100, 100))
    with pytest.raises(InputError, match="label"):
        model.loss({"image": torch.rand(2, 2, 100, 100), "label": torch.zeros(3, dtype=torch.long)})


def test_config_validation():
    tiny = CytoselfConfig.tiny()
    with pytest.raises(ConfigError, match="divisible"):
        dataclasses.replace(tiny, global_dim=100)
    dataclasses.replace(tiny, global_dim=100, split_quantization=False)  # fine without split
    with pytest.raises(ConfigError, match="input_size"):
        dataclasses.replace(tiny, input_size=8)
    with pytest.raises(ConfigError, match="enc2_stages"):
        dataclasses.replace(tiny, enc2_stages=((4, 4, 2, 32, 1),))  # even kernel
    with pytest.raises(ConfigError, match="channels"):
        dataclasses.replace(tiny, channels=())
    with pytest.raises(ConfigError, match="residual_second_kernel"):
        dataclasses.replace(tiny, residual_second_kernel=5)


def test_config_dict_round_trip_and_overrides():
    for cfg in (CytoselfConfig.paper(), CytoselfConfig.tiny(num_classes=3), CytoselfConfig.reference_wide()):
        assert config_from_dict(CytoselfConfig, config_to_dict(cfg)) == cfg
    cfg = apply_overrides(CytoselfConfig.tiny(), ["loss_weights.fc1=0.5", "channels=[protein]", "use_fc=false"])
    assert cfg.loss_weights.fc1 == 0.5 and cfg.channels == ("protein",) and not cfg.use_fc
    with pytest.raises(ConfigError, match="divisible"):
        apply_overrides(CytoselfConfig.paper(), ["global_split=7"])


def test_autocast_bfloat16_cpu():
    cfg = CytoselfConfig.tiny(num_classes=5)
    model = _model(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.loss(_batch(cfg, n=2))
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss"].dtype == torch.float32
    losses["loss"].backward()
    # on CPU the ID heads run in float32 (no per-step cast of the large fc1 weight); the decoder in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_batch(cfg, n=2)["image"])
    assert out.logits1.dtype == out.logits2.dtype == torch.float32
    assert out.reconstruction.dtype == torch.bfloat16
    # and the result is close to the float32 model's
    model.eval()
    x = _batch(cfg, n=2)["image"]
    with torch.no_grad():
        ref = model(x).logits2
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).logits2
    assert torch.allclose(ref, low, atol=0.1 * float(ref.abs().max()) + 1e-3)


def test_parameter_counts_paper_vs_reference_wide():
    paper = Cytoself(CytoselfConfig.paper())
    wide = Cytoself(CytoselfConfig.reference_wide())
    counts, wide_counts = paper.parameter_counts(), wide.parameter_counts()
    total = paper.num_parameters()
    print(f"paper: {total:,} parameters {counts}")
    print(f"reference_wide: {wide.num_parameters():,} parameters {wide_counts}")
    assert total == sum(counts.values()) == paper.num_parameters(trainable_only=True)
    # fc1 (40000 x 1000) dominates the paper model; the reference's decoder1 is ~100x larger than at width 64.
    assert counts["fc1"] > 40_000_000
    assert wide_counts["decoder1"] > 50 * counts["decoder1"]
    assert 40_000_000 < total < 70_000_000


def test_stochastic_depth_trains_and_eval_is_deterministic():
    tiny = CytoselfConfig.tiny(num_classes=5)
    # Two blocks in the last stage: the second one is residual, so stochastic depth applies to it.
    stages = tiny.enc2_stages[:-1] + ((4, 3, 1, 96, 2),)
    cfg = dataclasses.replace(tiny, enc2_stages=stages, drop_path=0.5)
    model = _model(cfg)
    rates = [m.drop_path.p for m in model.modules() if hasattr(m, "drop_path") and hasattr(m.drop_path, "p")]
    assert rates and max(rates) < 0.5 and rates == sorted(rates)  # ramped linearly over the blocks
    model.loss(_batch(cfg))["loss"].backward()
    x = _batch(cfg, n=2)["image"]
    a, b = model.encode(x), model.encode(x)
    assert torch.equal(a.z2, b.z2)


def test_fuse_for_inference_keeps_encodings():
    cfg = CytoselfConfig.tiny(num_classes=5)
    model = _model(cfg)
    model.loss(_batch(cfg, n=4))  # non-trivial BatchNorm running statistics
    model.eval()
    x = _batch(cfg, n=3)["image"]
    a = model.encode(x)
    ra = model.decode(a.q1, a.q2)
    fused = copy.deepcopy(model).fuse_for_inference()
    b = fused.encode(x)
    assert torch.equal(a.idx1, b.idx1) and torch.equal(a.idx2, b.idx2)
    torch.testing.assert_close(a.z2, b.z2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ra, fused.decode(b.q1, b.q2), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    with pytest.raises(RuntimeError, match="fused for inference"):
        fused.train()

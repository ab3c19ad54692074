"""Unit tests of the VQGAN tokenizer (protloc.models.vqgan): shapes, round trips, gradients, losses, configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from protloc.config import config_from_dict, config_to_dict
from protloc.errors import ConfigError
from protloc.eval.metrics import threshold_metrics
from protloc.models.vqgan import (
    VQGAN,
    AttnBlock,
    PatchDiscriminator,
    PerceptualLoss,
    VQGANConfig,
    adaptive_weight,
    hinge_d_loss,
    vanilla_d_loss,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(VQGANConfig.tiny())


def test_tiny_shapes(tiny):
    tiny.eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        out = tiny(x)
    assert out.reconstruction.shape == (2, 1, 64, 64)
    assert out.indices.shape == (2, 8, 8) and out.indices.dtype == torch.int64
    assert int(out.indices.max()) < 128 and int(out.indices.min()) >= 0
    assert tiny.grid_size == 8 and tiny.config.downsampling == 8
    assert tiny.codebook.shape == (128, 32)
    assert out.vq.usage.sum() == 2 * 64
    # fully convolutional: any size divisible by f
    with torch.no_grad():
        assert tiny(torch.rand(1, 1, 32, 48)).indices.shape == (1, 4, 6)
    with pytest.raises(ValueError, match="divisible by 8"):
        tiny(torch.rand(1, 1, 60, 64))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        tiny(torch.rand(1, 2, 64, 64))


def test_paper_shapes_and_size():
    cfg = VQGANConfig.paper()
    assert (cfg.image_size, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_resolutions) == (
        256,
        128,
        (1, 1, 2, 2, 4),
        2,
        (16,),
    )
    assert (cfg.z_channels, cfg.embed_dim, cfg.n_embed, cfg.grid_size) == (256, 256, 512, 16)
    # Shapes only: on the meta device nothing is computed (a real forward is 390 GFLOP).
    with torch.device("meta"):
        model = VQGAN(cfg)
        x = torch.empty(1, 1, 256, 256)
        z = model.encode_latent(x)
        assert z.shape == (1, 256, 16, 16)
        assert model.decode(z).shape == (1, 1, 256, 256)
        idx = torch.zeros(1, 16, 16, dtype=torch.long)
        assert model.decode_indices(idx).shape == (1, 1, 256, 256)
    assert sum(p.numel() for p in model.parameters()) == 72_006_017
    # attention after every ResNet block of the 16 x 16 level (2 encoder, 3 decoder) + the two middle blocks
    assert sum(isinstance(m, AttnBlock) for m in model.modules()) == 2 + 3 + 2


def test_encode_decode_indices_round_trip(tiny):
    tiny.eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        quantized, indices = tiny.encode(x)
        assert quantized.shape == (3, 32, 8, 8) and indices.shape == (3, 8, 8)
        assert torch.equal(tiny.quantize.lookup(indices[:, None]), quantized)
        from_idx = tiny.decode_indices(indices)
        assert torch.allclose(from_idx, tiny.decode(quantized), atol=1e-6)
        assert torch.allclose(from_idx, tiny(x).reconstruction, atol=1e-6)
        # re-encoding the same images gives the same tokens
        assert torch.equal(tiny.encode(x)[1], indices)
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        tiny.decode_indices(indices[:, None])


def test_value_range_maps_to_minus_one_one():
    model = VQGAN(VQGANConfig.tiny().replace(value_range=(0.0, 255.0)))
    x = torch.tensor([0.0, 127.5, 255.0])
    assert torch.allclose(model.normalize(x), torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(model.denormalize(model.normalize(x)), x)
    with pytest.raises(ConfigError, match="value_range must be"):
        VQGANConfig.tiny().replace(value_range=(1.0, 1.0))


def test_sigmoid_output_is_in_unit_interval():
    model = VQGAN(VQGANConfig.tiny().replace(output="sigmoid")).eval()
    with torch.no_grad():
        rec = model(torch.rand(1, 1, 64, 64)).reconstruction
    assert float(rec.min()) > 0 and float(rec.max()) < 1


def _generator_loss(model: VQGAN, disc: PatchDiscriminator, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    rec = F.mse_loss(out.reconstruction, x)
    g = -disc(out.reconstruction).mean()
    w = adaptive_weight(rec, g, model.last_layer)
    return rec + out.vq.loss + 0.8 * w * g


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    # (With one channel per GroupNorm group the bias of a conv feeding the norm would be cancelled exactly
    # and rightly get no gradient; tiny has at least 2 channels per group.)
    model = VQGAN(VQGANConfig.tiny().replace(dropout=0.1))
    disc = PatchDiscriminator(in_channels=1, channels=16)
    x = torch.rand(4, 1, 64, 64)

    _generator_loss(model, disc, x).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name

    disc.zero_grad()
    with torch.no_grad():
        fake = model(x).reconstruction
    hinge_d_loss(disc(x), disc(fake)).backward()
    for name, p in disc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_adaptive_weight_is_the_gradient_norm_ratio():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    rec = (w * torch.arange(5.0)).pow(2).sum()
    g = -(3.0 * w).sum()
    weight = adaptive_weight(rec, g, w)
    expected = (2 * w * torch.arange(5.0) ** 2).norm() / ((3.0 * torch.ones(5)).norm() + 1e-4)
    assert torch.isfinite(weight) and not weight.requires_grad
    assert torch.allclose(weight, expected.detach())
    # graphs are kept for the backward pass; a vanishing GAN gradient is clamped, not infinite
    (rec + weight * g).backward()
    assert w.grad is not None
    w2 = torch.nn.Parameter(torch.ones(3))
    assert float(adaptive_weight((w2**2).sum(), (0 * w2).sum(), w2, max_weight=10.0)) == 10.0


def test_discriminator_shapes_init_and_losses():
    torch.manual_seed(0)
    disc = PatchDiscriminator(in_channels=1)
    assert disc(torch.rand(2, 1, 256, 256)).shape == (2, 1, 30, 30)
    assert disc(torch.rand(2, 1, 64, 64)).shape == (2, 1, 6, 6)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and sum(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules()) == 3
    big = convs[3].weight.detach()
    assert abs(float(big.std()) - 0.02) < 0.002 and abs(float(big.mean())) < 0.002
    ones = torch.ones(4)
    assert float(hinge_d_loss(2 * ones, -2 * ones)) == 0.0
    assert float(hinge_d_loss(0 * ones, 0 * ones)) == 1.0
    assert float(vanilla_d_loss(0 * ones, 0 * ones)) == pytest.approx(float(F.softplus(torch.tensor(0.0))))


def test_threshold_metrics():
    target = (torch.rand(2, 1, 16, 16) > 0.6).float()
    nucleus = torch.zeros(2, 1, 16, 16)
    nucleus[..., 4:12, 4:12] = 1.0
    perfect = threshold_metrics(target.clone(), target, nucleus)
    assert torch.equal(perfect["pixel_accuracy"], torch.ones(2))
    assert torch.allclose(perfect["nucleus_proportion_accuracy"], torch.ones(2))
    inverted = threshold_metrics(1.0 - target, target, nucleus)
    assert torch.equal(inverted["pixel_accuracy"], torch.zeros(2))
    # all signal inside the nucleus vs all outside: proportions 1 and 0
    inside = torch.zeros_like(target)
    inside[..., 6:8, 6:8] = 1.0
    outside = torch.zeros_like(target)
    outside[..., 0:2, 0:2] = 1.0
    assert torch.allclose(threshold_metrics(outside, inside, nucleus)["nucleus_proportion_accuracy"], torch.zeros(2))


def test_perceptual_loss_from_local_file(tmp_path):
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.05 for k, v in PerceptualLoss().state_dict().items()}
    state = {k: (v.abs() if k.startswith("lin") else v) for k, v in state.items()}
    path = tmp_path / "lpips.safetensors"
    save_file(state, str(path))
    lpips = PerceptualLoss.from_file(path)
    assert not any(p.requires_grad for p in lpips.parameters())
    a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    assert torch.allclose(lpips(a, a), torch.zeros(2))
    assert (lpips(a, b) > 0).all()
    # the loss differentiates with respect to the images
    a.requires_grad_(True)
    lpips(a, b).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0

    with pytest.raises(ConfigError, match="no such file"):
        PerceptualLoss.from_file(tmp_path / "missing.pt")
    bad = tmp_path / "bad.safetensors"
    save_file({"features.0.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(ConfigError, match="does not hold VGG16 features"):
        PerceptualLoss.from_file(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        PerceptualLoss.from_file(junk)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_size": 100}, "not divisible by the downsampling factor 16"),
        ({"ch_mult": ()}, "ch_mult must be a non-empty list"),
        ({"ch_mult": (1, 0)}, "ch_mult must be a non-empty list"),
        ({"attn_resolutions": (20,)}, r"attn_resolutions entry 20 matches no level resolution \(levels: \[256, 128"),
        ({"norm_groups": 48}, "norm_groups 48 does not divide the level width 128"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"n_embed": 0}, "n_embed must be a positive integer"),
        ({"embed_dim": True}, "embed_dim must be a positive integer"),
        ({"commitment_cost": -1.0}, "commitment_cost must be >= 0"),
        ({"output": "tanh"}, "output must be 'linear' or 'sigmoid'"),
    ],
)
def test_config_validation(changes, message):
    with pytest.raises(ConfigError, match=message):
        VQGANConfig.paper().replace(**changes)


def test_config_round_trips_through_dicts():
    cfg = VQGANConfig.tiny()
    data = config_to_dict(cfg)
    assert data["ch_mult"] == [1, 2, 2, 4]
    assert config_from_dict(VQGANConfig, data) == cfg
    with pytest.raises(ConfigError, match="not one of"):
        config_from_dict(VQGANConfig, {**data, "output": "relu"})


def test_forward_returns_the_prequantization_latent(tiny):
    tiny.eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        out = tiny(x)
        assert torch.equal(out.latent, tiny.encode_latent(x))
        assert torch.equal(tiny.quantize(out.latent).indices[:, 0], out.indices)


def test_codebook_restart_in_the_trainer_uses_batch_latents_and_resets_adam():
    import dataclasses
    from types import SimpleNamespace

    from protloc.train.vqgan import TrainVQGANConfig, VQGANCodebookConfig, _restart_codes, reset_optimizer_rows

    torch.manual_seed(0)
    model = VQGAN(VQGANConfig.tiny())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(4, 1, 64, 64)
    out = model(x)
    (F.mse_loss(out.reconstruction, x) + out.vq.loss).backward()
    opt.step()
    code = model.quantize.codebook
    before = code.detach().clone()
    moments = {k: v.clone() for k, v in opt.state[code].items()}
    assert moments["exp_avg"].abs().sum() > 0

    usage = out.vq.usage
    dead = usage < 1
    n_dead = int(dead.sum())
    assert 0 < n_dead < 128  # fewer than the 256 latents: drawn without replacement, all distinct
    cfg = dataclasses.replace(TrainVQGANConfig.tiny(), codebook=VQGANCodebookConfig(restart_every=1))
    accel = SimpleNamespace(num_processes=1)
    wrapped = SimpleNamespace(optimizer=opt)  # like accelerate's AcceleratedOptimizer
    assert _restart_codes(model, wrapped, out.latent, usage, cfg, 7, accel) == n_dead
    after = code.detach()
    assert torch.equal(after[~dead], before[~dead])
    latents = out.latent.detach().permute(0, 2, 3, 1).reshape(-1, 32)  # [4 * 8 * 8, 32]
    assert (after[dead][:, None] == latents[None]).all(-1).any(1).all()  # each restarted code is a batch latent
    for key in ("exp_avg", "exp_avg_sq"):
        assert (opt.state[code][key][dead] == 0).all()
        assert torch.equal(opt.state[code][key][~dead], moments[key][~dead])
    # re-quantizing the batch now uses every restarted code; the draw depends only on (seed, step)
    with torch.no_grad():
        assert (model.quantize(out.latent).usage[dead] > 0).all()
    again = VQGAN(VQGANConfig.tiny())
    again.load_state_dict({**model.state_dict(), "quantize.codebook": before})
    _restart_codes(again, opt, out.latent, usage, cfg, 7, accel)
    assert torch.equal(again.quantize.codebook.detach(), after)
    assert _restart_codes(again, opt, out.latent, torch.ones(128, dtype=torch.long), cfg, 8, accel) == 0

    reset_optimizer_rows(torch.optim.Adam([torch.nn.Parameter(torch.ones(3))]), code, dead)  # no state: no-op

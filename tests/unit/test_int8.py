"""Weight-only int8 linear layers and the CELL-E prediction precisions."""

from __future__ import annotations

import pytest
import torch

from protloc.errors import ConfigError
from protloc.eval.load import set_precision
from protloc.models.celle import Celle, CelleConfig
from protloc.nn.int8 import Int8Linear, quantize_linears


def test_int8_linear_error_bound_and_paths():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear(lin)
    assert q.weight_int8.dtype == torch.int8 and q.scale.shape == (48,)
    # Rounding error of the weights: half a step of each channel's scale, plus the bf16 rounding of the
    # scale itself (relative 2^-9 of the largest weight).
    err = (q.dequantized(torch.float32) - lin.weight).abs().amax(dim=1)
    assert (err <= 0.5 * q.scale.float() + 2**-8 * lin.weight.abs().amax(dim=1)).all()
    for rows in (1, 3, 40):  # fused kernel (few rows) and dequantised path (many rows)
        x = torch.randn(2, rows, 64)
        out = q(x)
        assert out.shape == (2, rows, 48) and out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), lin(x).detach(), atol=0.05, rtol=0.05)
    q.fused = False  # a device without the fused kernel: same results from the dequantised weight
    x = torch.randn(1, 64)
    torch.testing.assert_close(q(x).float(), lin(x).detach(), atol=0.05, rtol=0.05)


def test_quantize_linears_converts_nested_layers():
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()))
    assert quantize_linears(net, skip=("1.0",)) == 1
    assert isinstance(net[0], Int8Linear) and isinstance(net[1][0], torch.nn.Linear)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_generation_close_to_fp32(precision):
    """The next-token distributions of a bf16 / int8 CELL-E follow the fp32 model's closely."""
    cfg = CelleConfig.tiny().replace(max_residues=24, grid_size=4)
    torch.manual_seed(0)
    model = Celle(cfg).eval()
    with torch.no_grad():  # larger weights than the init's std 0.02, so that the logits are not all ~0
        for p in model.parameters():
            p.mul_(3.0)
    reduced = Celle(cfg).eval()
    reduced.load_state_dict(model.state_dict())
    set_precision(reduced, precision)
    g = torch.Generator().manual_seed(1)
    text = {"text_mask": torch.ones(2, 20, dtype=torch.bool), "text_emb": torch.randn(2, 20, cfg.text_dim, generator=g)}
    nucleus = torch.randint(0, 128, (2, cfg.grid_tokens), generator=g)
    threshold = torch.randint(0, 128, (2, cfg.grid_tokens), generator=g)
    full = model(nucleus=nucleus, threshold=threshold[:, :-1], **text).logits[:, -cfg.grid_tokens :].softmax(-1)
    cache = reduced.new_cache(2)
    rows = [reduced.forward_step(cache, nucleus=nucleus, trim_text=True, **text)[:, -1:]]
    for i in range(cfg.grid_tokens - 1):
        rows.append(reduced.forward_step(cache, threshold=threshold[:, i : i + 1]))
    approx = torch.cat(rows, 1).float().softmax(-1)
    # Measured: max |dp| 0.018 (bf16), 0.033 (int8), for probabilities up to 0.37; mean total-variation
    # distance 0.022 (int8) over 128 codes, with weights 3x the initial scale.
    assert (approx - full).abs().max() < 0.05
    assert 0.5 * (approx - full).abs().sum(-1).mean() < 0.04
    assert (approx - full).abs().max() > 0  # really another precision


def test_unknown_precision():
    with pytest.raises(ConfigError, match="precision"):
        set_precision(Celle(CelleConfig.tiny()), "fp8")

from __future__ import annotations

import math

import pytest
import torch

import protloc.nn.quantize as quantize
from protloc.nn.quantize import VectorQuantizer, VQOutput


def _vq(k: int = 32, dim: int = 4, split: int = 1, beta: float = 0.25, seed: int = 0) -> VectorQuantizer:
    torch.manual_seed(seed)
    return VectorQuantizer(codebook_size=k, dim=dim, split=split, commitment_cost=beta)


def test_shapes_and_types_with_split():
    vq = _vq(k=16, dim=4, split=9)
    z = torch.randn(2, 36, 4, 4)
    out = vq(z)
    assert isinstance(out, VQOutput)
    assert out.quantized.shape == (2, 36, 4, 4)
    assert out.indices.shape == (2, 9, 4, 4) and out.indices.dtype == torch.int64
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < 16
    assert out.usage.shape == (16,) and int(out.usage.sum()) == 2 * 9 * 4 * 4
    for t in (out.loss, out.codebook_loss, out.commitment_loss, out.perplexity):
        assert t.ndim == 0 and torch.isfinite(t)


def test_codebook_init_range():
    vq = _vq(k=2048, dim=64)
    bound = math.sqrt(3 / 2048)
    assert float(vq.codebook.detach().abs().max()) <= bound
    assert float(vq.codebook.detach().abs().max()) > 0.9 * bound


def test_matches_brute_force_nearest_neighbour():
    vq = _vq(k=64, dim=8, split=3)
    z = torch.randn(3, 24, 5, 6)
    out = vq(z)
    # Brute force in float64: [B, H, W, split, dim] sub-vectors vs codes.
    sub = z.permute(0, 2, 3, 1).reshape(-1, 8).double()
    expected = torch.cdist(sub, vq.codebook.detach().double()).argmin(1)
    got = out.indices.permute(0, 2, 3, 1).reshape(-1)
    assert torch.equal(got, expected)


def test_codebook_entry_maps_to_its_index_and_split_order():
    vq = _vq(k=10, dim=3, split=4)
    chosen = torch.tensor([[7, 2, 2, 9], [0, 5, 1, 3]])  # [B=2, split=4] at a 1x1 grid
    # Channel c = s * dim + d: sub-vector s is channels [s*dim, (s+1)*dim).
    z = vq.codebook.detach()[chosen].reshape(2, 12, 1, 1)
    with torch.no_grad():
        out = vq(z)
    assert torch.equal(out.indices[:, :, 0, 0], chosen)
    assert torch.equal(out.quantized, z)
    assert float(out.loss) == 0.0


def test_lookup_round_trip_exact_without_grad():
    vq = _vq(k=32, dim=4, split=9)
    z = torch.randn(2, 36, 4, 4)
    with torch.no_grad():
        out = vq(z)
    assert torch.equal(vq.lookup(out.indices), out.quantized)
    # With gradients recorded the straight-through value equals the codes up to rounding.
    out_st = vq(z.requires_grad_())
    torch.testing.assert_close(vq.lookup(out_st.indices), out_st.quantized.detach(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, 9, H, W\]"):
        vq.lookup(out.indices[:, :3])


def test_straight_through_and_codebook_gradients():
    vq = _vq(k=16, dim=4, split=2, beta=0.25)
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = vq(z)
    g = torch.randn_like(out.quantized)
    (out.quantized * g).sum().backward(retain_graph=True)
    torch.testing.assert_close(z.grad, g)  # identity gradient through the quantizer
    assert vq.codebook.grad is None  # no gradient to the codebook through the straight-through path
    z.grad = None
    out.loss.backward()
    assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0
    assert z.grad is not None and z.grad.abs().sum() > 0  # commitment term
    # Both terms have the same value; the total weighs the commitment by beta.
    torch.testing.assert_close(out.codebook_loss, out.commitment_loss)
    torch.testing.assert_close(out.loss, 1.25 * out.codebook_loss)


def test_perplexity_uniform_and_single_code():
    vq = _vq(k=8, dim=2)
    codes = vq.codebook.detach()
    z = torch.cat([codes, codes]).reshape(1, 16, 2).permute(0, 2, 1).reshape(1, 2, 4, 4)  # every code twice
    out = vq(z)
    assert out.usage.tolist() == [2] * 8
    torch.testing.assert_close(out.perplexity, torch.tensor(8.0))
    one = codes[3].reshape(1, 2, 1, 1).expand(1, 2, 4, 4).contiguous()
    out = vq(one)
    torch.testing.assert_close(out.perplexity, torch.tensor(1.0))
    assert int(out.usage[3]) == 16


def test_deterministic_and_chunking_invariant(monkeypatch):
    vq = _vq(k=128, dim=8)
    z = torch.randn(4, 8, 10, 10)
    a = vq(z).indices
    assert torch.equal(a, vq(z).indices)
    monkeypatch.setattr(quantize, "_CPU_BLOCK_ELEMENTS", 128 * 7)  # 7 rows per block, ragged last block
    assert torch.equal(a, vq(z).indices)


def test_autocast_distances_in_float32():
    vq = _vq(k=64, dim=8, split=2)
    z = torch.randn(2, 16, 5, 5)
    ref = vq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
        out_bf16 = vq(z.bfloat16())
    assert torch.equal(out.indices, ref.indices)
    assert torch.isfinite(out_bf16.loss) and out_bf16.loss.dtype == torch.float32
    assert out_bf16.indices.shape == (2, 2, 5, 5)


def test_channels_last_input_gives_same_result():
    vq = _vq(k=32, dim=4, split=3)
    z = torch.randn(2, 12, 6, 6)
    a = vq(z)
    b = vq(z.contiguous(memory_format=torch.channels_last))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)


def test_bad_input_and_arguments():
    vq = _vq(k=8, dim=4, split=2)
    with pytest.raises(ValueError, match=r"\[B, 8, H, W\].*got \[2, 4, 3, 3\]"):
        vq(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError):
        VectorQuantizer(codebook_size=0, dim=4)
    with pytest.raises(ValueError):
        VectorQuantizer(codebook_size=4, dim=4, commitment_cost=-1)


def test_restart_codes_copies_candidates_into_dead_codes_only():
    vq = _vq(k=16, dim=4)
    before = vq.codebook.detach().clone()
    candidates = torch.randn(40, 4) + 10.0  # far from every initial code
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[1, 5, 6, 15]] = True
    n = vq.restart_codes(dead, candidates, generator=torch.Generator().manual_seed(0))
    after = vq.codebook.detach()
    assert n == 4 and vq.codebook.requires_grad
    assert torch.equal(after[~dead], before[~dead])  # live codes untouched
    # every restarted code is one of the candidates, each a different one (drawn without replacement)
    match = (after[dead][:, None, :] == candidates[None]).all(-1)  # [4, 40]
    assert match.any(1).all() and len(set(match.int().argmax(1).tolist())) == 4
    # the restarted codes are used again: each candidate it came from now maps to it
    chosen = candidates[match.int().argmax(1)]
    assert vq.nearest(chosen).tolist() == [1, 5, 6, 15]

    # the same generator seed gives the same draw; index form = mask form; duplicates ignored
    other = _vq(k=16, dim=4)
    gen = torch.Generator().manual_seed(0)
    assert other.restart_codes(torch.tensor([15, 1, 6, 5, 5]), candidates, generator=gen) == 4
    assert torch.equal(other.codebook.detach(), after)


def test_restart_codes_edge_cases():
    vq = _vq(k=8, dim=3)
    before = vq.codebook.detach().clone()
    assert vq.restart_codes(torch.zeros(8, dtype=torch.bool), torch.empty(0, 3)) == 0  # nothing dead: no draw
    assert torch.equal(vq.codebook.detach(), before)
    # fewer candidates than dead codes: drawn with replacement
    one = torch.full((1, 3), 2.0)
    assert vq.restart_codes(torch.ones(8, dtype=torch.bool), one) == 8
    assert torch.equal(vq.codebook.detach(), one.expand(8, 3))
    # noise: near, not at, the candidates, scaled by the candidates' spread
    vq = _vq(k=8, dim=3)
    candidates = torch.randn(100, 3)
    vq.restart_codes(torch.arange(8), candidates, generator=torch.Generator().manual_seed(1), noise=0.01)
    gap = torch.cdist(vq.codebook.detach(), candidates).min(1).values
    assert (gap > 0).all() and (gap < 0.2).all()
    with pytest.raises(ValueError, match=r"mask must have shape \[8\]"):
        vq.restart_codes(torch.ones(7, dtype=torch.bool), candidates)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 8\)"):
        vq.restart_codes(torch.tensor([8]), candidates)
    with pytest.raises(ValueError, match=r"candidates must be \[N >= 1, 3\]"):
        vq.restart_codes(torch.tensor([0]), torch.randn(5, 4))
    with pytest.raises(ValueError, match="noise must be >= 0"):
        vq.restart_codes(torch.tensor([0]), candidates, noise=-1.0)


def test_restart_codes_leaves_forward_unchanged():
    vq = _vq(k=16, dim=4, split=2)
    z = torch.randn(2, 8, 3, 3)
    a = vq(z)
    vq.restart_codes(torch.zeros(16, dtype=torch.bool), torch.randn(4, 4))
    b = vq(z)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)

from __future__ import annotations

import pytest
import torch

from protloc.errors import ConfigError
from protloc.nn.attention import (
    GEGLU,
    Attention,
    AxialRotary2D,
    FeedForward,
    ImageSpan,
    KVCache,
    RotaryEmbedding,
    TokenShift2D,
    TransformerBlock,
    apply_rotary,
    attention_mask,
)


def _seed(s: int = 0) -> torch.Generator:
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


# ---------------------------------------------------------------------------------------------- rotary


def test_rotary_preserves_norm_and_is_relative():
    g = _seed()
    rot = RotaryEmbedding(16)
    q = torch.randn(16, generator=g)
    k = torch.randn(16, generator=g)

    def score(pq: int, pk: int) -> torch.Tensor:
        return apply_rotary(q, rot(torch.tensor(pq))) @ apply_rotary(k, rot(torch.tensor(pk)))

    torch.testing.assert_close(apply_rotary(q, rot(torch.tensor(7))).norm(), q.norm())
    # The attention score depends only on the offset between positions (RoFormer).
    torch.testing.assert_close(score(3, 10), score(23, 30), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(3, 10), score(3, 11))


def test_rotary_partial_leaves_rest_unchanged():
    x = torch.randn(2, 3, 5, 12)
    angles = RotaryEmbedding(8)(torch.arange(5))  # [5, 4] -> 8 rotated channels
    out = apply_rotary(x, angles)
    assert out.shape == x.shape
    torch.testing.assert_close(out[..., 8:], x[..., 8:])
    torch.testing.assert_close(apply_rotary(x, torch.zeros(5, 4)), x)
    with pytest.raises(ValueError):
        apply_rotary(x, torch.zeros(5, 7))


def test_axial_rotary_grid_rows_and_columns():
    rot = AxialRotary2D(8)
    angles = rot.grid(3, 4)  # [12, 4]: 2 row angles, 2 column angles
    assert angles.shape == (12, 4)
    grid = angles.view(3, 4, 4)
    # Row angles constant along a row, column angles constant along a column.
    assert torch.allclose(grid[:, :, :2], grid[:, :1, :2].expand(3, 4, 2))
    assert torch.allclose(grid[:, :, 2:], grid[:1, :, 2:].expand(3, 4, 2))
    torch.testing.assert_close(grid[2, 1, :2], RotaryEmbedding(4)(torch.tensor(2)))
    with pytest.raises(ConfigError):
        AxialRotary2D(6)
    with pytest.raises(ConfigError):
        RotaryEmbedding(5)


# ---------------------------------------------------------------------------------------------- attention


def test_attention_causal_mask():
    g = _seed()
    attn = Attention(16, heads=2, dim_head=8, causal=True).eval()
    x = torch.randn(2, 9, 16, generator=g)
    angles = RotaryEmbedding(8)(torch.arange(9))
    out, _ = attn(x, angles=angles)
    for t in (0, 4, 8):
        x2 = x.clone()
        x2[:, t] += 1.0
        out2, _ = attn(x2, angles=angles)
        torch.testing.assert_close(out2[:, :t], out[:, :t])
        assert not torch.allclose(out2[:, t:], out[:, t:])


def test_attention_bidirectional_sees_future():
    g = _seed()
    attn = Attention(16, heads=2, dim_head=8, causal=False).eval()
    x = torch.randn(1, 6, 16, generator=g)
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert not torch.allclose(attn(x)[0][:, 0], attn(x2)[0][:, 0])


def test_attention_key_padding_mask():
    g = _seed()
    attn = Attention(16, heads=2, dim_head=8, causal=False).eval()
    x = torch.randn(2, 7, 16, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    out, _ = attn(x, key_mask=mask)
    x2 = x.clone()
    x2[0, 4:] = torch.randn(3, 16, generator=g)
    out2, _ = attn(x2, key_mask=mask)
    torch.testing.assert_close(out2[0, :4], out[0, :4])
    torch.testing.assert_close(out2[1], out[1])


def test_attention_weights_path_matches_sdpa():
    g = _seed()
    attn = Attention(16, heads=2, dim_head=8, causal=True).eval()
    x = torch.randn(2, 6, 16, generator=g)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    angles = RotaryEmbedding(8)(torch.arange(6))
    fast, none = attn(x, angles=angles, key_mask=mask)
    slow, probs = attn(x, angles=angles, key_mask=mask, return_attention=True)
    assert none is None
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=1e-5)
    assert probs.shape == (2, 2, 6, 6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 6))
    assert torch.all(probs.triu(1) == 0)  # causal
    assert torch.all(probs[1, :, :, 4:] == 0)  # padded keys


def test_attention_mask_is_minimal_and_equivalent():
    # Unpadded causal pass from the start: left to SDPA's is_causal; one cached query: nothing to mask.
    assert attention_mask(5, 0, torch.ones(2, 5, dtype=torch.bool), causal=True) == (None, True)
    assert attention_mask(1, 9, torch.ones(2, 10, dtype=torch.bool), causal=True) == (None, False)
    assert attention_mask(4, 0, None, causal=False) == (None, False)
    km = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    m = attention_mask(6, 0, km, causal=True)
    assert not m.is_causal and m.mask.shape == (2, 1, 6, 6) and not m.mask[1, 0, 5, 4] and not m.mask[0, 0, 2, 3]
    g = _seed()
    attn = Attention(16, heads=2, dim_head=8, causal=True).eval()
    x = torch.randn(2, 6, 16, generator=g)
    angles = RotaryEmbedding(8)(torch.arange(6))
    explicit, _ = attn(x, angles=angles, return_attention=True)
    fast, _ = attn(x, angles=angles, mask=attention_mask(6, 0, None, causal=True))
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)


def test_bf16_single_query_step_matches_fp32():
    """The explicit bf16 path of one decoding query agrees with the fp32 SDPA path."""
    g = _seed()
    attn = Attention(16, heads=2, dim_head=8, causal=True).eval()
    x = torch.randn(1, 12, 16, generator=g)
    angles = RotaryEmbedding(8)(torch.arange(12))
    ref, _ = attn(x, angles=angles)
    half = Attention(16, heads=2, dim_head=8, causal=True).eval()
    half.load_state_dict(attn.state_dict())
    half = half.to(torch.bfloat16)
    cache = KVCache(num_layers=1, batch_size=1, heads=2, dim_head=8, max_len=12, dtype=torch.bfloat16)
    outs = []
    for t in range(12):
        out, _ = half(x[:, t : t + 1].bfloat16(), angles=angles[t : t + 1], cache=cache.layers[0])
        cache.advance(1)
        outs.append(out.float())
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=3e-2, rtol=3e-2)


def test_kv_cache_incremental_equals_full():
    g = _seed()
    attn = Attention(16, heads=2, dim_head=8, causal=True).eval()
    x = torch.randn(2, 10, 16, generator=g)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 2:4] = False
    angles = RotaryEmbedding(8)(torch.arange(10))
    full, _ = attn(x, angles=angles, key_mask=mask)
    cache = KVCache(num_layers=1, batch_size=2, heads=2, dim_head=8, max_len=10)
    outs = []
    for lo, hi in ((0, 4), (4, 5), (5, 9), (9, 10)):
        km = cache.write_mask(mask[:, lo:hi])
        o, _ = attn(x[:, lo:hi], angles=angles[lo:hi], key_mask=km, cache=cache.layers[0])
        cache.advance(hi - lo)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        cache.write_mask(mask[:, :1])


# ---------------------------------------------------------------------------------------------- token shift


def test_token_shift_values_and_borders():
    shift = TokenShift2D(3, 4)
    x = torch.arange(1, 13, dtype=torch.float32)[None, :, None].expand(1, 12, 8).clone()  # token k has value k+1
    out, state = shift(x)
    grid = out.view(3, 4, 8)
    val = torch.arange(1, 13, dtype=torch.float32).view(3, 4)
    above = torch.zeros(3, 4)
    above[1:] = val[:-1]
    left = torch.zeros(3, 4)
    left[:, 1:] = val[:, :-1]
    torch.testing.assert_close(grid[..., 0:2], above[..., None].expand(3, 4, 2))
    torch.testing.assert_close(grid[..., 2:4], left[..., None].expand(3, 4, 2))
    torch.testing.assert_close(grid[..., 4:], val[..., None].expand(3, 4, 4))
    torch.testing.assert_close(state, x[:, -4:])


def test_token_shift_chunked_equals_full():
    g = _seed()
    shift = TokenShift2D(4, 5)
    x = torch.randn(2, 18, 12, generator=g)  # a partial grid (teacher forcing drops the last tokens)
    full, _ = shift(x)
    pieces, state, pos = [], None, 0
    for n in (3, 1, 7, 1, 1, 5):
        out, state = shift(x[:, pos : pos + n], grid_start=pos, state=state)
        pieces.append(out)
        pos += n
    torch.testing.assert_close(torch.cat(pieces, 1), full)
    with pytest.raises(ValueError):
        shift(x[:, :2], grid_start=3)  # continuing a grid needs the state
    with pytest.raises(ValueError):
        shift(torch.randn(1, 21, 12))


# ---------------------------------------------------------------------------------------------- blocks


def test_geglu_and_feedforward():
    x = torch.randn(2, 3, 8)
    assert GEGLU()(x).shape == (2, 3, 4)
    assert FeedForward(8, mult=2)(torch.randn(2, 3, 8)).shape == (2, 3, 8)


def _block_inputs(g: torch.Generator):
    # 3 text positions, then a 3 x 3 grid: spans over positions 3..11.
    x = torch.randn(2, 12, 32, generator=g)
    angles = RotaryEmbedding(8)(torch.arange(12))
    return x, angles


def test_block_incremental_with_token_shift_equals_full():
    g = _seed()
    block = TransformerBlock(32, heads=2, dim_head=8, causal=True, shift_grid=(3, 3)).eval()
    x, angles = _block_inputs(g)
    full, _ = block(x, angles=angles, spans=[ImageSpan(3, 12, 0)])
    cache = KVCache(num_layers=1, batch_size=2, heads=2, dim_head=8, max_len=12)
    state: dict[str, torch.Tensor] = {}
    outs = []
    for lo, hi in ((0, 5), (5, 6), (6, 7), (7, 11), (11, 12)):
        km = cache.write_mask(torch.ones(2, hi - lo, dtype=torch.bool))
        s = max(lo, 3)
        spans = [ImageSpan(s - lo, hi - lo, s - 3)] if hi > 3 else []
        o, _ = block(
            x[:, lo:hi], angles=angles[lo:hi], key_mask=km, spans=spans, cache=cache.layers[0], shift_state=state
        )
        cache.advance(hi - lo)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    # Without token shift the image region differs, i.e. the shift really acted.
    plain = TransformerBlock(32, heads=2, dim_head=8, causal=True).eval()
    plain.load_state_dict(block.state_dict())
    assert not torch.allclose(plain(x, angles=angles)[0][:, 3:], full[:, 3:])
    torch.testing.assert_close(plain(x, angles=angles)[0][:, :3], full[:, :3])


def test_block_gradients_and_attention():
    g = _seed()
    block = TransformerBlock(32, heads=2, dim_head=8, shift_grid=(3, 3), attn_dropout=0.1, ff_dropout=0.1)
    x, angles = _block_inputs(g)
    out, attn = block(x, angles=angles, spans=[ImageSpan(3, 12, 0)], return_attention=True)
    assert attn.shape == (2, 2, 12, 12)
    out.square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

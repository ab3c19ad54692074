"""Transformer building blocks for CELL-E: rotary positions, KV cache, 2-D token shift, GEGLU.

CELL-E (Khwaja et al., S.3.6) is a decoder-only transformer over ``[BOS + residues | nucleus tokens |
threshold tokens]`` with rotary position embeddings (RoFormer, Su et al. 2021), a token shift on image
tokens (a quarter of the channels from the token above, a quarter from the token to the left) and
causal full attention. This module holds the pieces, each usable on its own:

- :class:`RotaryEmbedding` (1-D) and :class:`AxialRotary2D` (rows / columns) produce rotation
  *angles*; :func:`apply_rotary` rotates queries and keys by them.
- :class:`Attention` runs ``F.scaled_dot_product_attention`` (or an explicit softmax when attention
  weights are requested, for attention rollout) with causal and key-padding masks and an optional
  :class:`KVCache` for incremental decoding.
- :class:`TokenShift2D` shifts channels of image tokens within a grid; it takes and returns a small
  state (the previous grid row) so that a chunked / incremental pass equals the full pass.
- :class:`GEGLU` feed-forward and the pre-norm :class:`TransformerBlock`.

The reference implementation's cached decoding disagrees with its own teacher-forced pass once
token shift is on (up to 4e-2 in the logits, ``shared/REFERENCE_NOTES.md``); here the shift reads
the cached previous-row inputs, and the tests check equality to 1e-5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protloc.errors import ConfigError

__all__ = [
    "AxialRotary2D",
    "Attention",
    "FeedForward",
    "GEGLU",
    "ImageSpan",
    "KVCache",
    "LayerKVCache",
    "RotaryEmbedding",
    "TokenShift2D",
    "TransformerBlock",
    "AttentionMask",
    "apply_rotary",
    "apply_rotary_cos_sin",
    "attention_mask",
    "rotary_cos_sin",
]


# --------------------------------------------------------------------------------------------------
# Rotary position embeddings (RoFormer, CELL-E S.3.6 ref. [78])
# --------------------------------------------------------------------------------------------------


class RotaryEmbedding(nn.Module):
    """Rotation angles of 1-D rotary position embeddings.

    Channel pair ``i`` (of ``dim // 2``) of a position ``p`` is rotated by ``p * base**(-2i / dim)``.

    Parameters
    ----------
    dim
        Number of rotated channels (even).
    base
        Frequency base (RoFormer: 10000).

    Examples
    --------
    >>> rot = RotaryEmbedding(8)
    >>> rot(torch.arange(5)).shape
    torch.Size([5, 4])
    """

    def __init__(self, dim: int, *, base: float = 10000.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ConfigError(f"rotary dim must be a positive even number, got {dim}")
        self.dim = dim
        self.base = float(base)
        inv_freq = self.base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        # Derived from (dim, base): not saved in checkpoints.
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        """Angles ``[..., dim // 2]`` (float32) for integer or real ``positions`` of any shape."""
        return positions.to(torch.float32)[..., None] * self.inv_freq


class AxialRotary2D(nn.Module):
    """Rotation angles of 2-D axial rotary embeddings: half the channels for rows, half for columns.

    Parameters
    ----------
    dim
        Number of rotated channels (divisible by 4): ``dim // 2`` follow the row index and
        ``dim // 2`` the column index.
    base
        Frequency base of both axes.

    Examples
    --------
    >>> rot = AxialRotary2D(8)
    >>> rot.grid(3, 3).shape  # row-major grid positions
    torch.Size([9, 4])
    """

    def __init__(self, dim: int, *, base: float = 10000.0):
        super().__init__()
        if dim < 4 or dim % 4:
            raise ConfigError(f"axial rotary dim must be a positive multiple of 4, got {dim}")
        self.dim = dim
        self.rows = RotaryEmbedding(dim // 2, base=base)
        self.cols = RotaryEmbedding(dim // 2, base=base)

    def forward(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Angles ``[..., dim // 2]``: row angles then column angles."""
        return torch.cat([self.rows(rows), self.cols(cols)], dim=-1)

    def grid(self, height: int, width: int) -> Tensor:
        """Angles ``[height * width, dim // 2]`` of a grid in row-major (raster) order."""
        idx = torch.arange(height * width, device=self.rows.inv_freq.device)
        return self(torch.div(idx, width, rounding_mode="floor"), idx % width)


def apply_rotary(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate the first ``2 * angles.shape[-1]`` channels of ``x`` (RoFormer, "rotate half" layout).

    Channel ``i`` is paired with channel ``i + R/2`` (``R`` rotated channels) and the pair is rotated
    by ``angles[..., i]``; channels beyond ``R`` pass unchanged.

    Parameters
    ----------
    x
        ``[..., P, D]`` queries or keys (e.g. ``[B, H, P, D]``).
    angles
        ``[P, R/2]`` or any shape broadcastable to ``x[..., :R/2]`` (e.g. ``[B, 1, P, R/2]``).

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``x``.
    """
    return apply_rotary_cos_sin(x, *rotary_cos_sin(angles, x.dtype))


def rotary_cos_sin(angles: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of rotary ``angles`` in ``dtype``: compute them once per pass and hand them to
    every layer (:func:`apply_rotary_cos_sin`, ``Attention.forward(rotary=...)``)."""
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary_cos_sin(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """:func:`apply_rotary` with precomputed ``cos`` / ``sin`` of the angles (:func:`rotary_cos_sin`)."""
    half = cos.shape[-1]
    rot = 2 * half
    if rot > x.shape[-1]:
        raise ValueError(f"{rot} rotary channels for a head of {x.shape[-1]} channels")
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:rot], x[..., rot:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


# --------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------


class LayerKVCache:
    """One layer's view of a :class:`KVCache` (keys and values ``[B, H, max_len, dim_head]``)."""

    def __init__(self, parent: KVCache, index: int):
        self.parent = parent
        self.index = index

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v`` ``[B, H, n, Dh]`` at the parent's current length; return all keys / values so far."""
        start = self.parent.length
        stop = start + k.shape[2]
        if stop > self.parent.max_len:
            raise ValueError(f"KV cache overflow: {stop} positions for a cache of {self.parent.max_len}")
        self.parent.k[self.index, :, :, start:stop] = k
        self.parent.v[self.index, :, :, start:stop] = v
        return self.parent.k[self.index, :, :, :stop], self.parent.v[self.index, :, :, :stop]

    def buffers(self) -> tuple[Tensor, Tensor, Tensor]:
        """The whole contiguous key and value buffers ``[B, H, max_len, Dh]`` and the positions
        ``0 .. max_len - 1``. A product with the whole buffers (positions past the written ones masked)
        avoids the copy that a bf16 batched product makes of the strided ``[:length]`` views."""
        return self.parent.k[self.index], self.parent.v[self.index], self.parent.positions


class KVCache:
    """Pre-allocated keys, values and key-padding mask of every layer, for incremental decoding.

    One step writes ``n`` new positions: :meth:`write_mask` stores their key mask, every layer's
    :meth:`LayerKVCache.append` stores its keys and values, then :meth:`advance` moves
    :attr:`length` on by ``n``.

    Parameters
    ----------
    num_layers, batch_size, heads, dim_head, max_len
        Sizes: the cache holds ``[num_layers, B, heads, max_len, dim_head]`` keys and values.
    device, dtype
        Where and in which precision to allocate.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        heads: int,
        dim_head: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (num_layers, batch_size, heads, max_len, dim_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)
        self.positions = torch.arange(max_len, device=device)  # for length masks over the whole buffers
        self.max_len = max_len
        self.length = 0
        self.layers = [LayerKVCache(self, i) for i in range(num_layers)]

    def write_mask(self, key_mask: Tensor) -> Tensor:
        """Store the key mask ``[B, n]`` (True = real token) of the next ``n`` positions.

        Returns
        -------
        torch.Tensor
            The key mask ``[B, length + n]`` of every position so far.
        """
        stop = self.length + key_mask.shape[1]
        if stop > self.max_len:
            raise ValueError(f"KV cache overflow: {stop} positions for a cache of {self.max_len}")
        self.key_mask[:, self.length : stop] = key_mask
        return self.key_mask[:, :stop]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as written (after every layer appended them)."""
        self.length += n


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


class AttentionMask(NamedTuple):
    """Which keys each query may attend, computed once per pass and shared by all layers.

    Attributes
    ----------
    mask
        Boolean ``[B or 1, 1, n_query, n_key]`` (True = may attend), or None when every query may attend
        every key (or ``is_causal`` says it all).
    is_causal
        The plain causal mask of a pass without cached keys or padding: left to
        ``F.scaled_dot_product_attention(is_causal=True)``, which skips the masked blocks.
    """

    mask: Tensor | None
    is_causal: bool = False


def attention_mask(
    n_query: int, offset: int, key_mask: Tensor | None, *, causal: bool, device: torch.device | None = None
) -> AttentionMask:
    """The attention mask of ``n_query`` new positions after ``offset`` cached ones.

    Parameters
    ----------
    n_query, offset
        New positions and positions already in the cache (``n_key = offset + n_query``).
    key_mask
        ``[B, >= n_key]`` True on real tokens, or None (all real).
    causal
        Mask future positions.
    device
        Where to build the mask.

    Returns
    -------
    AttentionMask
        As small as the case allows: None when nothing is masked (one new query of a causal model sees
        every key before it), ``is_causal`` for an unpadded causal pass from the start.
    """
    n_key = offset + n_query
    km = None
    if key_mask is not None and not bool(key_mask[:, :n_key].all()):
        km = key_mask[:, None, None, :n_key].bool()
    need_causal = causal and n_query > 1
    if need_causal and km is None and offset == 0:
        return AttentionMask(None, True)
    mask = None
    if need_causal:
        q_pos = torch.arange(offset, n_key, device=device)[:, None]
        mask = (torch.arange(n_key, device=device)[None, :] <= q_pos)[None, None]
    if km is not None:
        mask = km if mask is None else mask & km
    return AttentionMask(mask)


class Attention(nn.Module):
    """Multi-head self-attention with rotary positions, causal / key-padding masks and a KV cache.

    Parameters
    ----------
    dim
        Model width.
    heads, dim_head
        Number of heads and channels per head (CELL-E paper: 16 x 64).
    dropout
        Dropout on the attention probabilities and on the output (paper S.3.6 setting: 0.1).
    causal
        Mask future positions (CELL-E); False for bidirectional attention (CELL-E 2).
    """

    def __init__(self, dim: int, *, heads: int = 8, dim_head: int = 64, dropout: float = 0.0, causal: bool = True):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.causal = causal
        self.dropout = dropout
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.out_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        *,
        angles: Tensor | None = None,
        key_mask: Tensor | None = None,
        cache: LayerKVCache | None = None,
        return_attention: bool = False,
        rotary: tuple[Tensor, Tensor] | None = None,
        mask: AttentionMask | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend.

        Parameters
        ----------
        x
            ``[B, n, dim]`` inputs of the ``n`` new positions.
        angles
            Rotary angles of the new positions, ``[n, R/2]`` or ``[B, n, R/2]`` (``R <= dim_head``).
        key_mask
            ``[B, n_key]`` True on real tokens; with a cache, ``n_key`` counts the cached positions
            too (see :meth:`KVCache.write_mask`). Padded keys are never attended.
        cache
            This layer's cache; the new keys / values are appended and all cached ones attended.
        return_attention
            Also return the attention probabilities ``[B, H, n, n_key]`` (explicit softmax path).
        rotary
            Precomputed ``(cos, sin)`` of the angles (:func:`rotary_cos_sin`), instead of ``angles``.
        mask
            Precomputed :func:`attention_mask` (shared by all layers of a pass), instead of deriving it
            from ``key_mask`` and the cache length.

        Returns
        -------
        out : torch.Tensor
            ``[B, n, dim]``.
        attention : torch.Tensor or None
            The attention probabilities when ``return_attention``.
        """
        b, n, _ = x.shape
        # [B, n, 3 * H * Dh] -> 3 x [B, H, n, Dh]
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        if rotary is None and angles is not None:
            if angles.dim() == 3:  # [B, n, R/2] -> [B, 1, n, R/2]
                angles = angles[:, None]
            rotary = rotary_cos_sin(angles, q.dtype)
        if rotary is not None:
            cos, sin = rotary
            if cos.dim() == 3:
                cos, sin = cos[:, None], sin[:, None]
            # Queries and keys in one call (half the small ops of a decoding step).
            q, k = apply_rotary_cos_sin(torch.stack([q, k]), cos, sin).unbind(0)
        offset = 0
        if cache is not None:
            offset = cache.parent.length
            k, v = cache.append(k, v)
        if mask is None:
            mask = attention_mask(n, offset, key_mask, causal=self.causal, device=x.device)
        p_drop = self.dropout if self.training else 0.0
        attn = None
        # One new query in reduced precision on a CPU (a decoding step): two small matmuls beat the CPU
        # flash kernel, which is slow in bf16 (measured 0.3 vs 1.3 ms per layer at 1258 keys).
        explicit = return_attention or (n == 1 and q.dtype != torch.float32 and q.device.type == "cpu")
        if explicit and not return_attention and cache is not None:
            # The whole cache buffers, with unwritten and padded keys masked: contiguous operands, no copy.
            k_all, v_all, positions = cache.buffers()
            n_key, max_len = k.shape[2], k_all.shape[2]
            allowed = positions < n_key  # [max_len]
            if mask.mask is not None:  # padded keys: [B or 1, 1, 1, n_key]
                allowed = F.pad(mask.mask, (0, max_len - n_key), value=False) & allowed
            scores = (q @ k_all.transpose(-1, -2)).float() / math.sqrt(self.dim_head)  # [B, H, 1, max_len]
            scores = scores.masked_fill(~allowed, float("-inf"))
            out = scores.softmax(dim=-1).to(v_all.dtype) @ v_all
        elif explicit:
            scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.dim_head)  # [B, H, n, n_key]
            full = mask.mask
            if mask.is_causal:
                full = torch.ones(n, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - n)
            if full is not None:
                scores = scores.masked_fill(~full, float("-inf"))
            attn = scores.softmax(dim=-1)
            out = F.dropout(attn, p_drop, self.training).to(v.dtype) @ v
            if not return_attention:
                attn = None
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask.mask, dropout_p=p_drop, is_causal=mask.is_causal
            )
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)  # [B, n, H * Dh]
        return self.out_dropout(self.to_out(out)), attn


# --------------------------------------------------------------------------------------------------
# Token shift on image grids (CELL-E S.3.6, "time-shifting" ref. [79])
# --------------------------------------------------------------------------------------------------


class ImageSpan(NamedTuple):
    """A run of image tokens inside a chunk of the sequence.

    Attributes
    ----------
    start, stop
        Slice of the chunk that holds the image tokens.
    grid_start
        Raster index (``row * width + col``) of the token at ``start`` within its grid.
    """

    start: int
    stop: int
    grid_start: int


class TokenShift2D(nn.Module):
    """Shift channels of image tokens from the token above and the token to the left.

    Of ``C`` channels, the first ``C // 4`` of token ``(r, c)`` are taken from ``(r - 1, c)``, the
    next ``C // 4`` from ``(r, c - 1)``, the rest stay (paper S.3.6). A missing neighbour (first
    row, first column) gives zeros. Both neighbours precede the token in raster order, so the shift
    keeps causality.

    The shift of a chunk of tokens needs the ``width`` tokens before it (one grid row): pass them as
    ``state`` and get the updated state back, so that processing a grid in chunks (down to one
    token at a time, as in generation) gives exactly the full-grid result.

    Parameters
    ----------
    height, width
        Grid size (CELL-E paper: 16 x 16).
    """

    def __init__(self, height: int, width: int):
        super().__init__()
        if height < 1 or width < 1:
            raise ConfigError(f"token-shift grid must be positive, got {height} x {width}")
        self.height = height
        self.width = width

    def forward(self, x: Tensor, *, grid_start: int = 0, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Shift a run of consecutive tokens of one grid.

        Parameters
        ----------
        x
            ``[B, n, C]`` tokens with raster indices ``grid_start .. grid_start + n - 1``.
        grid_start
            Raster index of ``x[:, 0]``.
        state
            ``[B, width, C]`` unshifted inputs of raster indices ``grid_start - width .. grid_start - 1``
            (the state returned by the previous call on this grid); required when ``grid_start > 0``.

        Returns
        -------
        shifted : torch.Tensor
            ``[B, n, C]``.
        state : torch.Tensor
            ``[B, width, C]`` inputs of the last ``width`` raster indices up to ``grid_start + n - 1``.
        """
        b, n, c = x.shape
        w = self.width
        if grid_start < 0 or grid_start + n > self.height * w:
            raise ValueError(f"tokens {grid_start}..{grid_start + n - 1} do not fit a {self.height} x {w} grid")
        if state is None:
            if grid_start != 0:
                raise ValueError("token shift of a grid continued at index > 0 needs the previous state")
            state = x.new_zeros(b, w, c)
        # ext[:, w + k] holds raster index grid_start + k; ext[:, :w] the previous row.
        ext = torch.cat([state, x], dim=1)  # [B, w + n, C]
        has_above: Tensor | float
        has_left: Tensor | float
        if n == 1:  # a decoding step: plain numbers, no index tensors to build
            has_above, has_left = float(grid_start >= w), float(grid_start % w != 0)
        else:
            g = torch.arange(grid_start, grid_start + n, device=x.device)
            has_above = (g >= w).to(x.dtype)[None, :, None]
            has_left = (g % w != 0).to(x.dtype)[None, :, None]
        q = c // 4
        above = ext[:, 0:n, :q] * has_above  # raster index g - w
        left = ext[:, w - 1 : w - 1 + n, q : 2 * q] * has_left  # raster index g - 1
        shifted = torch.cat([above, left, x[..., 2 * q :]], dim=-1)
        return shifted, ext[:, -w:]


# --------------------------------------------------------------------------------------------------
# Feed-forward and block
# --------------------------------------------------------------------------------------------------


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): split the last dimension in two, ``a * gelu(gate)``."""

    def forward(self, x: Tensor) -> Tensor:
        a, gate = x.chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward ``dim -> 2 * mult * dim -> (GEGLU) mult * dim -> dim`` with dropout.

    Parameters
    ----------
    dim
        Model width.
    mult
        Hidden width multiplier (CELL-E / DALL-E: 4).
    dropout
        Dropout on the hidden activations (paper setting: 0.1).
    """

    def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        hidden = mult * dim
        self.net = nn.Sequential(nn.Linear(dim, 2 * hidden), GEGLU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(shift(norm(x)))``, then ``x + ff(shift(norm(x)))``.

    The token shift (if ``shift_grid`` is given) acts only on the image tokens named by ``spans``.

    Parameters
    ----------
    dim, heads, dim_head
        Width, heads and channels per head.
    ff_mult
        Feed-forward hidden multiplier.
    attn_dropout, ff_dropout
        Dropout rates (paper: 0.1 each).
    causal
        Causal attention (CELL-E) or bidirectional (CELL-E 2).
    shift_grid
        ``(height, width)`` of the image grids for :class:`TokenShift2D`; None disables the shift.
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int,
        ff_mult: int = 4,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        causal: bool = True,
        shift_grid: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=heads, dim_head=dim_head, dropout=attn_dropout, causal=causal)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=ff_mult, dropout=ff_dropout)
        self.shift = TokenShift2D(*shift_grid) if shift_grid is not None else None

    def _shift(self, h: Tensor, spans: Sequence[ImageSpan], state: dict[str, Tensor] | None, key: str) -> Tensor:
        if self.shift is None or not spans:
            return h
        pieces = []
        pos = 0
        for span in spans:
            if span.start > pos:
                pieces.append(h[:, pos : span.start])
            prev = None
            if span.grid_start > 0:
                if state is None or key not in state:
                    raise ValueError("token shift continues a grid but no shift state was given")
                prev = state[key]
            shifted, new_state = self.shift(h[:, span.start : span.stop], grid_start=span.grid_start, state=prev)
            if state is not None:
                state[key] = new_state
            pieces.append(shifted)
            pos = span.stop
        if pos < h.shape[1]:
            pieces.append(h[:, pos:])
        return torch.cat(pieces, dim=1)

    def forward(
        self,
        x: Tensor,
        *,
        angles: Tensor | None = None,
        key_mask: Tensor | None = None,
        spans: Sequence[ImageSpan] = (),
        cache: LayerKVCache | None = None,
        shift_state: dict[str, Tensor] | None = None,
        return_attention: bool = False,
        rotary: tuple[Tensor, Tensor] | None = None,
        mask: AttentionMask | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Run the block on ``x [B, n, dim]``.

        Parameters
        ----------
        angles, key_mask, cache, return_attention, rotary, mask
            See :meth:`Attention.forward`.
        spans
            Image-token runs of ``x`` to token-shift, in order.
        shift_state
            Per-block dict holding the previous-row inputs (``"attn"``, ``"ff"``) for chunked /
            incremental passes; updated in place. None in a full pass.

        Returns
        -------
        x : torch.Tensor
            ``[B, n, dim]``.
        attention : torch.Tensor or None
            ``[B, H, n, n_key]`` when ``return_attention``.
        """
        h = self._shift(self.norm_attn(x), spans, shift_state, "attn")
        a, attn = self.attn(
            h,
            angles=angles,
            key_mask=key_mask,
            cache=cache,
            return_attention=return_attention,
            rotary=rotary,
            mask=mask,
        )
        x = x + a
        h = self._shift(self.norm_ff(x), spans, shift_state, "ff")
        return x + self.ff(h), attn

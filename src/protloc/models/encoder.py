"""The protein sequence encoder: residues -> per-residue vectors, a pooled protein vector and localization.

A small convolution + transformer encoder trained on the Swiss-Prot GO cellular-component corpus
(:mod:`protloc.data.proteome`, ``protloc train encoder``):

- **input**: protloc token ids (:class:`~protloc.data.sequences.Tokenizer`, ``<cls>`` first, ``<sep>``
  last, ``<pad>=0``) and their mask; sequences longer than ``max_residues`` are first shortened to their
  two ends with :func:`~protloc.data.sequences.clip_residues` (DeepLoc's 500 + 500);
- **trunk**: an embedding table (``embed_dim``) projected to ``dim``, residual dilated convolution
  blocks (pre-LayerNorm -- not BatchNorm, whose statistics padding would change -- GELU, dropout;
  the input is multiplied by the mask before each convolution, so padding never leaks into real
  positions), then pre-norm transformer layers with a key-padding mask;
- **pooling**: light attention (Staerk et al. 2021): a per-channel softmax over the real positions of
  attention logits weighting value vectors, concatenated with a masked max-pool of the values,
  ``[B, 2 * dim]``;
- **heads**: ``presence`` (13 logits: the 12 compartments of
  :data:`~protloc.data.world.compartments.COMPARTMENTS` and ``nucleus``), ``distribution`` (12 logits,
  softmax over the compartments) from the pooled vector, and ``mlm`` (30 logits per position) from the
  residues.

Padding invariance: a protein gives the same outputs alone or padded inside a batch (up to float
rounding), because every convolution sees zeros beyond the sequence and attention ignores padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protloc.data.sequences import Tokenizer
from protloc.errors import ConfigError, InputError

__all__ = ["N_COMPARTMENTS", "N_PRESENCE", "EncoderConfig", "ProteinEncoder", "count_parameters"]

#: Compartments of the reference world (the distribution head's classes).
N_COMPARTMENTS = 12
#: Presence outputs: the compartments plus ``nucleus``.
N_PRESENCE = N_COMPARTMENTS + 1
_VOCAB = Tokenizer().vocab_size


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of :class:`ProteinEncoder`. Presets: :meth:`small` (shipped), :meth:`tiny` (tests).

    Attributes
    ----------
    embed_dim
        Token embedding width (projected to ``dim``).
    dim
        Hidden width of the trunk; ``residues`` are ``[B, L, dim]`` and ``pooled`` ``[B, 2 * dim]``.
    conv_blocks
        Residual dilated convolution blocks.
    kernel_size
        Convolution kernel (odd).
    dilations
        Dilation of each block, cycled when there are more blocks than entries.
    layers
        Pre-norm transformer layers after the convolutions.
    heads
        Attention heads (must divide ``dim``).
    ffn_mult
        Feed-forward width of a transformer layer, in multiples of ``dim``.
    dropout
        Dropout in the trunk and the heads.
    max_residues
        The most residues a sequence may have (longer ones: :func:`~protloc.data.sequences.clip_residues`).
    mlm_weight
        Weight of the masked-residue loss in :meth:`ProteinEncoder.loss`.
    """

    embed_dim: int = 64
    dim: int = 128
    conv_blocks: int = 3
    kernel_size: int = 9
    dilations: tuple[int, ...] = (1, 2, 4)
    layers: int = 2
    heads: int = 4
    ffn_mult: int = 4
    dropout: float = 0.1
    max_residues: int = 1000
    mlm_weight: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))
        _check(self.embed_dim >= 1, f"model.embed_dim must be >= 1, got {self.embed_dim}")
        _check(self.dim >= 1, f"model.dim must be >= 1, got {self.dim}")
        _check(self.conv_blocks >= 0, f"model.conv_blocks must be >= 0, got {self.conv_blocks}")
        _check(
            self.kernel_size >= 1 and self.kernel_size % 2 == 1,
            f"model.kernel_size must be odd, got {self.kernel_size}",
        )
        _check(len(self.dilations) >= 1 and min(self.dilations) >= 1, "model.dilations must be positive integers")
        _check(self.layers >= 0, f"model.layers must be >= 0, got {self.layers}")
        _check(
            self.heads >= 1 and self.dim % self.heads == 0,
            f"model.heads ({self.heads}) must divide model.dim ({self.dim})",
        )
        _check(self.ffn_mult >= 1, f"model.ffn_mult must be >= 1, got {self.ffn_mult}")
        _check(0 <= self.dropout < 1, f"model.dropout must be in [0, 1), got {self.dropout}")
        _check(self.max_residues >= 1, f"model.max_residues must be >= 1, got {self.max_residues}")
        _check(self.mlm_weight >= 0, f"model.mlm_weight must be >= 0, got {self.mlm_weight}")

    @classmethod
    def small(cls) -> EncoderConfig:
        """The shipped encoder: 64 -> 128, three dilated convolution blocks (1, 2, 4), two transformer layers."""
        return cls()

    @classmethod
    def tiny(cls) -> EncoderConfig:
        """A test-sized encoder: 16 -> 32, one convolution block, one transformer layer."""
        return cls(embed_dim=16, dim=32, conv_blocks=1, kernel_size=5, dilations=(1,), layers=1, heads=2, ffn_mult=2)


class _ConvBlock(nn.Module):
    """Pre-LayerNorm residual dilated convolution: ``x + dropout(gelu(conv(norm(x) * mask)))``."""

    def __init__(self, dim: int, kernel: int, dilation: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, m: Tensor) -> Tensor:
        h = self.norm(x) * m  # [B, L, D], zero on padding
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return (x + self.drop(F.gelu(h))) * m


class _TransformerLayer(nn.Module):
    """Pre-norm self-attention + feed-forward layer with a key-padding mask."""

    def __init__(self, dim: int, heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, ffn_mult * dim)
        self.ff2 = nn.Linear(ffn_mult * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, m: Tensor, attn_mask: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # no dropout on the attention weights: it would need the [B, H, L, L] matrix (no fused CPU kernel)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, L, d/H]
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        x = x + self.drop(self.ff2(self.drop(F.gelu(self.ff1(self.norm2(x))))))
        return x * m


class ProteinEncoder(nn.Module):
    """Protein sequence encoder (see the module notes).

    Parameters
    ----------
    config
        The architecture.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(_VOCAB, c.embed_dim, padding_idx=0)
        self.inp = nn.Linear(c.embed_dim, c.dim)
        self.convs = nn.ModuleList(
            _ConvBlock(c.dim, c.kernel_size, c.dilations[i % len(c.dilations)], c.dropout) for i in range(c.conv_blocks)
        )
        self.layers = nn.ModuleList(_TransformerLayer(c.dim, c.heads, c.ffn_mult, c.dropout) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.dim)
        # light attention pooling: per-channel attention logits and values
        self.att = nn.Linear(c.dim, c.dim)
        self.val = nn.Linear(c.dim, c.dim)
        self.head = nn.Sequential(nn.Linear(2 * c.dim, c.dim), nn.GELU(), nn.Dropout(c.dropout))
        self.presence = nn.Linear(c.dim, N_PRESENCE)
        self.distribution = nn.Linear(c.dim, N_COMPARTMENTS)
        self.mlm = nn.Linear(c.dim, _VOCAB)

    @property
    def dim(self) -> int:
        """Width of the per-residue vectors."""
        return self.config.dim

    def encode(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Per-residue vectors ``[B, L, dim]`` of token ids ``[B, L]`` (mask True on real tokens); zero on padding."""
        if ids.dim() != 2 or mask.shape != ids.shape:
            raise InputError(f"expected ids and mask [B, L], got {tuple(ids.shape)} and {tuple(mask.shape)}")
        m = mask.bool()[..., None]
        x = self.inp(self.embed(ids)) * m
        for block in self.convs:
            x = block(x, m)
        if self.layers:
            keep = mask.bool()[:, None, None, :]  # [B, 1, 1, L] True where attention may look
            for layer in self.layers:
                x = layer(x, m, keep)
        return self.norm(x) * m

    def pool(self, residues: Tensor, mask: Tensor) -> Tensor:
        """Light-attention pooling ``[B, 2 * dim]``: attention-weighted sum of values, then their masked max."""
        m = mask.bool()[..., None]
        logits = self.att(residues).float().masked_fill(~m, float("-inf"))
        weights = torch.softmax(logits, dim=1)  # per channel over the positions
        values = self.val(residues).float()
        attended = (weights * values).sum(1)
        maxed = values.masked_fill(~m, float("-inf")).amax(1)
        return torch.cat([attended, maxed], dim=-1)

    def summary(self, residues: Tensor, mask: Tensor) -> Tensor:
        """The sequence's localization summary ``[B, dim]``: the pooled vector after the shared head, the
        input of the presence and distribution heads (``residues`` from :meth:`encode`)."""
        return self.head(self.pool(residues, mask).to(residues.dtype))

    def forward(self, ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Encode a batch.

        Parameters
        ----------
        ids
            ``int64 [B, L]`` token ids (``<cls>`` first, ``<sep>`` last, padded with 0).
        mask
            ``bool [B, L]``, True on real tokens.

        Returns
        -------
        dict
            ``residues [B, L, dim]`` (zero on padding), ``pooled [B, 2 * dim]``, ``presence [B, 13]``
            and ``distribution [B, 12]`` logits, ``mlm [B, L, 30]`` logits.
        """
        residues = self.encode(ids, mask)
        pooled = self.pool(residues, mask)
        h = self.head(pooled.to(residues.dtype))  # = summary(residues, mask)
        return {
            "residues": residues,
            "pooled": pooled,
            "presence": self.presence(h),
            "distribution": self.distribution(h),
            "mlm": self.mlm(residues),
        }

    def loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Training loss of a batch.

        Parameters
        ----------
        batch
            ``ids`` (input with masked residues), ``mask``, ``mlm_targets`` (``-100`` where not masked),
            ``presence [B, 13]``, ``distribution [B, 12]``, optional per-sample ``weight [B]``.

        Returns
        -------
        dict
            ``loss`` = ``presence`` + ``distribution`` + ``mlm_weight * mlm``, and the three terms:
            mean binary cross-entropy of the presence logits, cross-entropy of the distribution against
            the soft targets, cross-entropy of the masked residues (0 when none is masked).
        """
        out = self(batch["ids"], batch["mask"])
        w = batch.get("weight")
        presence = F.binary_cross_entropy_with_logits(
            out["presence"].float(), batch["presence"].float(), reduction="none"
        ).mean(1)
        target = batch["distribution"].float()
        distribution = -(target * torch.log_softmax(out["distribution"].float(), dim=-1)).sum(-1)
        if w is not None:
            w = w.float()
            total = w.sum().clamp_min(1e-12)
            presence, distribution = (presence * w).sum() / total, (distribution * w).sum() / total
        else:
            presence, distribution = presence.mean(), distribution.mean()
        targets = batch["mlm_targets"]
        picked = targets != -100
        if bool(picked.any()):
            mlm = F.cross_entropy(out["mlm"][picked].float(), targets[picked])
        else:
            mlm = out["mlm"].sum() * 0.0
        loss = presence + distribution + self.config.mlm_weight * mlm
        return {"loss": loss, "presence": presence.detach(), "distribution": distribution.detach(), "mlm": mlm.detach()}


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

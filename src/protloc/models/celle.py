"""CELL-E: a transformer from amino-acid sequence and nucleus image tokens to protein-threshold tokens.

Khwaja et al., "CELL-E: A Text-To-Image Transformer for Protein Localization Prediction" (Sec. 4,
S.3.6), with CELL-E 2's bidirectional masked-token variant as ``mode="masked"``. One sequence per
sample (S.3.6)::

    [ BOS + residues (+ end) + pad | nucleus tokens (g x g) | threshold tokens (g x g) ]
      text_len = 1 + max_residues    grid_tokens              grid_tokens (last one dropped at input)

    paper: 1001 + 256 + 255 = 1512 input positions of width 768

- Text: per-residue embeddings of a (usually frozen) sequence embedder
  (:mod:`protloc.models.embedders`) computed outside the model and passed in as ``text_emb
  [B, L, d_text]`` (``L <= text_len``; right-padded to ``text_len`` here), optionally projected to
  ``dim``. The ``learned`` embedder is the exception: it trains, so the model owns it and takes
  ``text_ids``.
- Images: learned ``nn.Embedding`` tables for nucleus and threshold codebook indices (S.3.6).
- Positions: rotary. Half of each head's channels rotate with the 1-D text position (image tokens sit
  at fixed 1-D positions just after the text: ``text_len`` for nucleus, ``text_len + 1`` for
  threshold tokens, which tells the two grids apart); the other half are 2-D axial (rows / columns)
  for image tokens and unrotated for text. Nucleus and threshold grids share the same 2-D positions
  -- the reference shifts the image grid by one position.
- Token shift (S.3.6): in every block, before attention and before the feed-forward, a quarter of
  each image token's channels come from the token above and a quarter from the token to the left.
- Logits ``[B, P, 30 + K_nucleus + K_threshold]`` restricted per position to the vocabulary of the
  token it predicts (S.3.6 "selective masking"): residues (+ end token), nucleus codes, threshold
  codes; everything else is ``-inf``.
- Loss: per-segment mean cross-entropy weighted text 1/9, nucleus 1/9, threshold 8/9 (paper; the
  reference code's 7/9 is :meth:`CelleConfig.reference`).

Examples
--------
>>> import torch
>>> cfg = CelleConfig.tiny()
>>> model = Celle(cfg).eval()
>>> B, G = 2, cfg.grid_tokens
>>> text_emb = torch.randn(B, 20, cfg.text_dim); text_mask = torch.ones(B, 20, dtype=torch.bool)
>>> text_ids = torch.randint(5, 30, (B, 20)); text_ids[:, 0] = 2
>>> nucleus = torch.randint(0, 128, (B, G)); threshold = torch.randint(0, 128, (B, G))
>>> out = model(text_emb=text_emb, text_mask=text_mask, nucleus=nucleus, threshold=threshold[:, :-1])
>>> tuple(out.logits.shape)
(2, 428, 286)
>>> batch = dict(text_emb=text_emb, text_ids=text_ids, text_mask=text_mask, nucleus=nucleus, threshold=threshold)
>>> sorted(model.loss(batch))
['acc_nucleus', 'acc_text', 'acc_threshold', 'loss', 'loss_nucleus', 'loss_text', 'loss_threshold']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protloc.data.sequences import Tokenizer
from protloc.errors import ConfigError, InputError
from protloc.models.embedders import EMBEDDERS, LearnedEmbedder
from protloc.nn.attention import (
    AxialRotary2D,
    ImageSpan,
    KVCache,
    RotaryEmbedding,
    TransformerBlock,
    attention_mask,
    rotary_cos_sin,
)

__all__ = [
    "Celle",
    "CelleCache",
    "CelleConfig",
    "CelleLossWeights",
    "CelleOutput",
    "MODES",
    "SEGMENTS",
    "trimmed_text_len",
]

#: Training / inference modes: CELL-E (causal, next-token) and CELL-E 2 (bidirectional, masked tokens).
MODES = ("autoregressive", "masked")
#: Segment names, in sequence order; ``CelleOutput.segments`` holds their indices.
SEGMENTS = ("text", "nucleus", "threshold")
_MASKABLE = ("threshold", "nucleus", "text")
_TOKENIZER = Tokenizer()


@dataclass(frozen=True)
class CelleLossWeights:
    """Weights of the per-segment mean cross-entropies (paper S.3.6: 1/9, 1/9, 8/9)."""

    text: float = 1 / 9
    nucleus: float = 1 / 9
    threshold: float = 8 / 9


@dataclass(frozen=True)
class CelleConfig:
    """Configuration of :class:`Celle`. Presets: :meth:`paper`, :meth:`reference`, :meth:`tiny`.

    Attributes
    ----------
    mode
        ``"autoregressive"`` (CELL-E: causal attention, next-token loss) or ``"masked"`` (CELL-E 2:
        bidirectional attention, threshold tokens masked with a cosine schedule, learned ``[MASK]``
        embedding).
    depth, dim, heads, dim_head, ff_mult
        Transformer size (paper: 32 blocks, width 768, 16 heads x 64, GEGLU x 4).
    attn_dropout, ff_dropout
        Dropout on attention probabilities / outputs and on the feed-forward hidden layer (0.1).
    max_residues
        Residues per sequence (paper: 1000); the text segment has ``1 + max_residues`` positions
        (BOS, residues and the end token when it fits, padding).
    grid_size
        Side of the VQGAN token grids (paper: 16, i.e. 256 tokens per image).
    num_nucleus_codes, num_threshold_codes
        Codebook sizes of the nucleus and threshold VQGANs (paper: 512 each).
    text_vocab_size
        Sequence vocabulary (TAPE IUPAC: 30).
    embedder
        Sequence embedder name (:data:`protloc.models.embedders.EMBEDDERS`; paper: ``"tape"``).
        Recorded for the pipeline; only ``"learned"`` lives inside the model.
    embedder_path
        Local weights of ``esm2`` / ``tape`` (for the pipeline).
    text_dim
        Width of the text embeddings (TAPE 768, one-hot 25, descriptors 66, ESM-2 by model).
    text_projection
        Project text embeddings to ``dim`` with a learned linear layer (required when
        ``text_dim != dim``; the paper uses TAPE's 768 directly).
    token_shift
        Token shift on image tokens (paper S.3.6).
    rotary_base_text, rotary_base_image
        RoPE frequency bases of the 1-D text and 2-D image positions (not given in the paper).
    masked_segments
        ``mode="masked"``: which segments are masked and predicted: ``"threshold"``, optionally
        ``"nucleus"``, and ``"text"`` for image to sequence (CELL-E 2): residues replaced by a learned
        ``[MASK]`` and predicted from the rest of the sequence and both images (needs a per-residue
        embedder).
    text_mask_prob
        With ``"text"`` masked: the share of training samples whose residues are masked (cosine
        schedule over the residues, images given whole, as when filling a sequence); the others have
        their threshold tokens masked as usual, with the sequence whole, as when predicting an image.
    loss_weights
        Per-segment loss weights.
    """

    mode: str = "autoregressive"
    depth: int = 32
    dim: int = 768
    heads: int = 16
    dim_head: int = 64
    ff_mult: int = 4
    attn_dropout: float = 0.1
    ff_dropout: float = 0.1
    max_residues: int = 1000
    grid_size: int = 16
    num_nucleus_codes: int = 512
    num_threshold_codes: int = 512
    text_vocab_size: int = 30
    embedder: str = "tape"
    embedder_path: str | None = None
    text_dim: int = 768
    text_projection: bool = False
    token_shift: bool = True
    rotary_base_text: float = 10000.0
    rotary_base_image: float = 100.0
    masked_segments: tuple[str, ...] = ("threshold",)
    text_mask_prob: float = 0.5
    loss_weights: CelleLossWeights = field(default_factory=CelleLossWeights)

    def __post_init__(self) -> None:
        object.__setattr__(self, "masked_segments", tuple(self.masked_segments))
        if isinstance(self.loss_weights, dict):
            object.__setattr__(self, "loss_weights", CelleLossWeights(**self.loss_weights))
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        positive = (
            "depth",
            "dim",
            "heads",
            "dim_head",
            "ff_mult",
            "max_residues",
            "grid_size",
            "num_nucleus_codes",
            "num_threshold_codes",
            "text_dim",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.dim_head % 8:
            # Half the head for 1-D text rotary, a quarter each for image rows and columns, in pairs.
            raise ConfigError(f"dim_head must be a multiple of 8 (rotary split), got {self.dim_head}")
        if self.text_vocab_size != _TOKENIZER.vocab_size:
            raise ConfigError(f"text_vocab_size must be {_TOKENIZER.vocab_size} (TAPE IUPAC tokens)")
        if self.embedder not in EMBEDDERS:
            raise ConfigError(f"unknown embedder {self.embedder!r}; choose one of {', '.join(EMBEDDERS)}")
        if self.text_dim != self.dim and not self.text_projection:
            raise ConfigError(f"text_dim ({self.text_dim}) differs from dim ({self.dim}): set text_projection=true")
        for name in ("attn_dropout", "ff_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("rotary_base_text", "rotary_base_image"):
            if getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be > 1, got {getattr(self, name)}")
        bad = [s for s in self.masked_segments if s not in _MASKABLE]
        if (
            bad
            or "threshold" not in self.masked_segments
            or len(set(self.masked_segments)) != len(self.masked_segments)
        ):
            raise ConfigError(
                "masked_segments must hold 'threshold' and optionally 'nucleus' and 'text', got "
                f"{self.masked_segments!r}"
            )
        if "text" in self.masked_segments:
            if self.mode != "masked":
                raise ConfigError("masked_segments 'text' (filling residues) needs mode='masked'")
            if EMBEDDERS[self.embedder].contextual:
                raise ConfigError(
                    f"masked_segments 'text' needs a per-residue embedder (onehot, descriptors, learned): the "
                    f"{self.embedder!r} vectors of a masked residue's neighbours carry its identity"
                )
        if not 0.0 <= self.text_mask_prob <= 1.0:
            raise ConfigError(f"text_mask_prob must be in [0, 1], got {self.text_mask_prob}")
        for name in ("text", "nucleus", "threshold"):
            w = getattr(self.loss_weights, name)
            if not (isinstance(w, int | float) and math.isfinite(w) and w >= 0):
                raise ConfigError(f"loss_weights.{name} must be a finite number >= 0, got {w!r}")

    @classmethod
    def paper(cls) -> CelleConfig:
        """The published CELL-E (S.3.6): depth 32, 16 x 64 heads, width 768 (TAPE), 1000 residues,
        16 x 16 grids of 512 codes, dropout 0.1, loss weights 1/9, 1/9, 8/9."""
        return cls()

    @classmethod
    def reference(cls) -> CelleConfig:
        """:meth:`paper` with the reference code's threshold loss weight 7/9."""
        return cls(loss_weights=CelleLossWeights(threshold=7 / 9))

    @classmethod
    def tiny(cls, *, mode: str = "autoregressive") -> CelleConfig:
        """CPU tests and demos: depth 2, 4 x 16 heads, width 64, 300 residues (GFP plus an NLS fit), 8 x 8
        grids of 128 codes, one-hot text (25) projected to the width."""
        return cls(
            mode=mode,
            depth=2,
            dim=64,
            heads=4,
            dim_head=16,
            max_residues=300,
            grid_size=8,
            num_nucleus_codes=128,
            num_threshold_codes=128,
            embedder="onehot",
            text_dim=25,
            text_projection=True,
        )

    def replace(self, **changes: object) -> CelleConfig:
        """A copy with fields replaced (validated)."""
        return dataclasses.replace(self, **changes)

    @property
    def text_len(self) -> int:
        """Positions of the text segment: BOS + ``max_residues`` (S.3.6: 1001)."""
        return 1 + self.max_residues

    @property
    def grid_tokens(self) -> int:
        """Tokens per image grid (paper: 256)."""
        return self.grid_size * self.grid_size

    @property
    def total_len(self) -> int:
        """Positions of the whole layout: text + nucleus + threshold (paper: 1513)."""
        return self.text_len + 2 * self.grid_tokens

    @property
    def input_len(self) -> int:
        """Input positions of a training pass: the last threshold token is dropped in the
        autoregressive mode (paper: 1512), all kept in the masked mode."""
        return self.total_len - (1 if self.mode == "autoregressive" else 0)

    @property
    def vocab_size(self) -> int:
        """Logit classes: text + nucleus codes + threshold codes (paper: 1054)."""
        return self.text_vocab_size + self.num_nucleus_codes + self.num_threshold_codes

    @property
    def nucleus_offset(self) -> int:
        """First logit index of the nucleus codes."""
        return self.text_vocab_size

    @property
    def threshold_offset(self) -> int:
        """First logit index of the threshold codes."""
        return self.text_vocab_size + self.num_nucleus_codes


class CelleOutput(NamedTuple):
    """Outputs of :meth:`Celle.forward`.

    Attributes
    ----------
    logits
        ``[B, P, vocab_size]``, ``-inf`` outside the vocabulary of the segment each row predicts.
        Autoregressive: row ``p`` predicts the token at position ``p + 1``; masked: row ``p`` predicts
        position ``p``.
    segments
        ``int64 [P]``: index into :data:`SEGMENTS` of the token each row predicts.
    attentions
        Per block, attention probabilities ``[B, H, P, P]`` (``return_attention=True``), else None.
    """

    logits: Tensor
    segments: Tensor
    attentions: tuple[Tensor, ...] | None


class CelleCache:
    """Incremental-decoding state of :meth:`Celle.forward_step`: KV cache and token-shift rows.

    Attributes
    ----------
    kv
        Keys, values and key mask of every block.
    shift
        Per block, the previous-row inputs of the token shift (``"attn"`` / ``"ff"``).
    """

    def __init__(self, kv: KVCache, depth: int):
        self.kv = kv
        self.shift: list[dict[str, Tensor]] = [{} for _ in range(depth)]
        #: Trailing text-padding positions left out of the cache (``forward_step(trim_text=True)``).
        self.skipped = 0

    @property
    def length(self) -> int:
        """Layout positions processed so far (skipped padding included)."""
        return self.kv.length + self.skipped


def trimmed_text_len(text_mask: Tensor) -> int:
    """Text positions up to the batch's last real token (``text_mask [B, L]``): what a pass with
    ``trim_text=True`` keeps of the text segment (BOS is always real, so at least 1)."""
    return int(text_mask.bool().any(dim=0).nonzero().max()) + 1


def _flatten_grid(tokens: Tensor, name: str) -> Tensor:
    """``[B, h, w]`` or ``[B, n]`` token ids -> ``[B, n]`` (raster order)."""
    if tokens.dim() == 3:
        return tokens.reshape(tokens.shape[0], -1)
    if tokens.dim() != 2:
        raise InputError(f"{name} tokens must be [B, n] or [B, h, w], got shape {tuple(tokens.shape)}")
    return tokens


class Celle(nn.Module):
    """The CELL-E transformer (see the module docstring for the layout).

    Parameters
    ----------
    config
        A :class:`CelleConfig`.
    """

    model_type = "celle"

    def __init__(self, config: CelleConfig):
        super().__init__()
        self.config = c = config
        g, G = c.grid_size, c.grid_tokens
        self.autoregressive = c.mode == "autoregressive"
        # Text: a trainable embedder lives here; frozen ones stay outside (precomputed, cached).
        self.text_embedder = LearnedEmbedder(c.text_dim) if EMBEDDERS[c.embedder].trainable else None
        self.text_proj = nn.Linear(c.text_dim, c.dim) if c.text_projection else nn.Identity()
        # Image token embeddings, learned (S.3.6).
        self.nucleus_embed = nn.Embedding(c.num_nucleus_codes, c.dim)
        self.threshold_embed = nn.Embedding(c.num_threshold_codes, c.dim)
        self.mask_embed = nn.ParameterDict()
        if not self.autoregressive:
            for seg in c.masked_segments:
                self.mask_embed[seg] = nn.Parameter(torch.zeros(c.dim))
        self.text_rotary = RotaryEmbedding(c.dim_head // 2, base=c.rotary_base_text)
        self.image_rotary = AxialRotary2D(c.dim_head // 2, base=c.rotary_base_image)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                c.dim,
                heads=c.heads,
                dim_head=c.dim_head,
                ff_mult=c.ff_mult,
                attn_dropout=c.attn_dropout,
                ff_dropout=c.ff_dropout,
                causal=self.autoregressive,
                shift_grid=(g, g) if c.token_shift else None,
            )
            for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.dim)
        self.to_logits = nn.Linear(c.dim, c.vocab_size)
        self.apply(self._init_weights)
        for p in self.mask_embed.values():
            nn.init.normal_(p, std=0.02)

        # Derived tables (not saved): rotary angles of every layout position, segment of every
        # position, and the vocabulary each segment may predict.
        tl = c.text_len
        text_part = torch.cat(
            [
                self.text_rotary(torch.arange(tl)),
                self.text_rotary(torch.full((G,), tl)),  # nucleus grid: 1-D position text_len
                self.text_rotary(torch.full((G,), tl + 1)),  # threshold grid: text_len + 1
            ]
        )  # [total_len, dim_head / 4]
        grid = self.image_rotary.grid(g, g)  # [G, dim_head / 4]; the same for both grids
        image_part = torch.cat([torch.zeros(tl, grid.shape[1]), grid, grid])
        self.register_buffer("angles", torch.cat([text_part, image_part], dim=-1), persistent=False)
        seg = torch.cat([torch.zeros(tl), torch.ones(G), torch.full((G,), 2)]).long()  # [total_len]
        self.register_buffer("position_segments", seg, persistent=False)
        allowed = torch.zeros(3, c.vocab_size, dtype=torch.bool)
        allowed[0, _TOKENIZER.vocab["A"] :] = True  # the 25 residue letters (ids 5..29) ...
        allowed[0, c.text_vocab_size :] = False
        allowed[0, _TOKENIZER.sep_id] = True  # ... and the end token
        allowed[1, c.nucleus_offset : c.threshold_offset] = True
        allowed[2, c.threshold_offset :] = True
        self.register_buffer("segment_vocab", allowed, persistent=False)  # [3, V]

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def num_parameters(self, *, trainable_only: bool = False) -> int:
        """Number of parameters (optionally only those with ``requires_grad``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ----------------------------------------------------------------------------------------------
    # embedding of the segments

    def _embed_text(
        self,
        text_emb: Tensor | None,
        text_ids: Tensor | None,
        text_mask: Tensor,
        residue_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Text segment ``[B, text_len, dim]`` and its key mask ``[B, text_len]``; residues under
        ``residue_mask`` become the learned text ``[MASK]``."""
        c = self.config
        if text_mask.dim() != 2:
            raise InputError(f"text_mask must be [B, L], got shape {tuple(text_mask.shape)}")
        b, n = text_mask.shape
        if n > c.text_len:
            raise InputError(
                f"text has {n} positions, more than the model's {c.text_len} (BOS + {c.max_residues}); crop the "
                "sequence, and leave out the end token when the residues fill the window"
            )
        mask = text_mask.bool()
        if not bool(mask[:, 0].all()):
            raise InputError("text position 0 (the BOS token) must be a real token in every sample")
        if self.text_embedder is not None:
            if text_ids is None:
                raise InputError(f"embedder {c.embedder!r} is part of the model: pass text_ids")
            emb = self.text_embedder(text_ids, mask)  # [B, L, text_dim]
        else:
            if text_emb is None:
                raise InputError(f"pass text_emb [B, L, {c.text_dim}] (embeddings of the {c.embedder!r} embedder)")
            emb = text_emb
        if emb.shape[:2] != (b, n) or emb.shape[-1] != c.text_dim:
            raise InputError(f"text embeddings must be [{b}, {n}, {c.text_dim}], got {tuple(emb.shape)}")
        # Zero the padded positions so their content never matters, then pad to text_len (S.3.6).
        # In the model's precision (a bf16 model takes float32 embeddings from the encoder).
        dtype = self.nucleus_embed.weight.dtype
        emb = emb.to(dtype) * mask[..., None].to(dtype)
        pad = c.text_len - n
        if pad:
            emb = F.pad(emb, (0, 0, 0, pad))
            mask = F.pad(mask, (0, pad), value=False)
        x = self.text_proj(emb)
        if residue_mask is not None:
            if "text" not in self.mask_embed:
                raise InputError("residues are not masked in this configuration (masked_segments lacks 'text')")
            if residue_mask.shape != text_mask.shape:
                raise InputError(
                    f"residue_mask must have the shape of text_mask {tuple(text_mask.shape)}, got "
                    f"{tuple(residue_mask.shape)}"
                )
            rmask = residue_mask.bool()
            if bool((rmask & ~text_mask.bool()).any()) or bool(rmask[:, 0].any()):
                raise InputError("residue_mask may only mark real residues (not BOS or padding)")
            if pad:
                rmask = F.pad(rmask, (0, pad), value=False)
            x = torch.where(rmask[..., None], self.mask_embed["text"].to(x.dtype), x)
        return x, mask

    def _embed_image(self, ids: Tensor, seg: str, masked: Tensor | None) -> Tensor:
        table = self.nucleus_embed if seg == "nucleus" else self.threshold_embed
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.num_embeddings):
            raise InputError(f"{seg} token ids must lie in 0..{table.num_embeddings - 1}")
        x = table(ids)  # [B, n, dim]
        if masked is not None:
            if seg not in self.mask_embed:
                raise InputError(f"{seg} tokens are not masked in this configuration (masked_segments)")
            if masked.shape != ids.shape:
                raise InputError(f"{seg}_mask must have the shape of the {seg} tokens {tuple(ids.shape)}")
            x = torch.where(masked.bool()[..., None], self.mask_embed[seg].to(x.dtype), x)
        return x

    def _spans(self, ranges: Sequence[tuple[int, int]]) -> list[ImageSpan]:
        """Image-token runs of a chunk made of the absolute position ranges ``[lo, hi)``, in order."""
        tl, G = self.config.text_len, self.config.grid_tokens
        spans = []
        offset = 0
        for start, stop in ranges:
            for lo in (tl, tl + G):
                s, e = max(start, lo), min(stop, lo + G)
                if s < e:
                    spans.append(ImageSpan(offset + s - start, offset + e - start, s - lo))
            offset += stop - start
        return spans

    def _run(
        self,
        x: Tensor,
        ranges: Sequence[tuple[int, int]],
        key_mask: Tensor,
        *,
        cache: CelleCache | None = None,
        return_attention: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """Blocks + masked logits for a chunk ``x [B, n, dim]`` holding the absolute layout positions of
        ``ranges`` (consecutive ``[lo, hi)`` runs; more than one when padding is left out)."""
        n = x.shape[1]
        angles = torch.cat([self.angles[lo:hi] for lo, hi in ranges])  # [n, dim_head / 2]
        if angles.shape[0] != n:
            raise InputError(f"chunk of {n} positions for position ranges {list(ranges)}")
        # Shared by every block: the rotation (cos, sin) in the activations' dtype and the attention mask.
        rotary = rotary_cos_sin(angles, x.dtype)
        offset = cache.kv.length if cache is not None else 0
        mask = attention_mask(n, offset, key_mask, causal=self.autoregressive, device=x.device)
        spans = self._spans(ranges)
        attns = []
        for i, block in enumerate(self.blocks):
            x, attn = block(
                x,
                rotary=rotary,
                mask=mask,
                spans=spans,
                cache=cache.kv.layers[i] if cache is not None else None,
                shift_state=cache.shift[i] if cache is not None else None,
                return_attention=return_attention,
            )
            if attn is not None:
                attns.append(attn)
        rows = torch.cat([self._row_segments(lo, hi - lo) for lo, hi in ranges])
        logits = self.to_logits(self.norm(x))  # [B, n, V]
        logits = logits.masked_fill(~self.segment_vocab[rows], float("-inf"))
        return logits, (tuple(attns) if return_attention else None)

    def _row_segments(self, start: int, n: int) -> Tensor:
        """Segment of the token each row predicts: the next position (autoregressive) or its own."""
        shift = 1 if self.autoregressive else 0
        return self.position_segments[start + shift : start + shift + n]

    # ----------------------------------------------------------------------------------------------
    # forward

    def forward(
        self,
        *,
        text_mask: Tensor,
        nucleus: Tensor,
        threshold: Tensor | None = None,
        text_emb: Tensor | None = None,
        text_ids: Tensor | None = None,
        threshold_mask: Tensor | None = None,
        nucleus_mask: Tensor | None = None,
        residue_mask: Tensor | None = None,
        return_attention: bool = False,
        trim_text: bool = False,
    ) -> CelleOutput:
        """Full (teacher-forced) pass.

        Parameters
        ----------
        text_mask
            ``bool [B, L]``, True on real text tokens (position 0 is BOS), ``L <= text_len``.
        nucleus
            Nucleus token ids ``[B, G]`` or ``[B, g, g]`` (all ``G = grid_size**2``).
        threshold
            Threshold token ids ``[B, T]`` (or ``[B, g, g]`` in masked mode). Autoregressive:
            ``T <= G - 1`` (teacher forcing drops the last token, S.3.6); masked: ``T = G``.
        text_emb
            ``[B, L, text_dim]`` embeddings of a frozen embedder (position 0 = BOS).
        text_ids
            ``int64 [B, L]`` token ids, needed instead of ``text_emb`` with the ``learned`` embedder.
        threshold_mask, nucleus_mask
            Masked mode: ``bool [B, G]``, True where the token is replaced by the learned ``[MASK]``.
        residue_mask
            Masked mode with ``"text"`` in ``masked_segments``: ``bool [B, L]``, True on residues
            replaced by the learned text ``[MASK]`` (image to sequence).
        return_attention
            Also return every block's attention probabilities (explicit softmax; slower).
        trim_text
            Leave the text padding after the batch's longest sequence out of the pass (exact: padded
            keys are never attended). The outputs then lack those rows; the image rows are the last
            ``G + T``.

        Returns
        -------
        CelleOutput
        """
        c = self.config
        G = c.grid_tokens
        if residue_mask is not None and self.autoregressive:
            raise InputError("token masks are for mode='masked'")
        x_text, key_text = self._embed_text(text_emb, text_ids, text_mask, residue_mask)
        b = x_text.shape[0]
        nucleus = _flatten_grid(nucleus, "nucleus")
        if nucleus.shape != (b, G):
            raise InputError(f"nucleus tokens must be [{b}, {G}], got {tuple(nucleus.shape)}")
        if threshold is None:
            threshold = nucleus.new_zeros(b, 0)
        threshold = _flatten_grid(threshold, "threshold")
        n_thr = threshold.shape[1]
        if threshold.shape[0] != b:
            raise InputError(f"threshold tokens have batch size {threshold.shape[0]}, text has {b}")
        if self.autoregressive:
            if n_thr > G - 1:
                raise InputError(
                    f"autoregressive input holds at most {G - 1} threshold tokens (the last is only a target); "
                    f"got {n_thr}"
                )
            if threshold_mask is not None or nucleus_mask is not None:
                raise InputError("token masks are for mode='masked'")
        else:
            if n_thr != G:
                raise InputError(f"masked mode needs all {G} threshold tokens, got {n_thr}")
            if threshold_mask is not None:
                threshold_mask = _flatten_grid(threshold_mask, "threshold_mask")
            if nucleus_mask is not None:
                nucleus_mask = _flatten_grid(nucleus_mask, "nucleus_mask")
        x = torch.cat(
            [
                x_text,
                self._embed_image(nucleus, "nucleus", nucleus_mask),
                self._embed_image(threshold, "threshold", threshold_mask),
            ],
            dim=1,
        )  # [B, P, dim]
        key_mask = torch.cat([key_text, key_text.new_ones(b, G + n_thr)], dim=1)  # [B, P]
        ranges = [(0, x.shape[1])]
        if trim_text:
            keep = trimmed_text_len(key_text)
            if keep < c.text_len:
                x = torch.cat([x[:, :keep], x[:, c.text_len :]], dim=1)
                key_mask = torch.cat([key_mask[:, :keep], key_mask[:, c.text_len :]], dim=1)
                ranges = [(0, keep), (c.text_len, c.text_len + G + n_thr)]
        logits, attns = self._run(x, ranges, key_mask, return_attention=return_attention)
        segments = torch.cat([self._row_segments(lo, hi - lo) for lo, hi in ranges])
        return CelleOutput(logits, segments, attns)

    # ----------------------------------------------------------------------------------------------
    # incremental decoding

    def new_cache(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_len: int | None = None,
    ) -> CelleCache:
        """An empty :class:`CelleCache` for :meth:`forward_step` (autoregressive mode), holding ``max_len``
        positions (default :attr:`CelleConfig.input_len`; fewer suffice when the text padding is left out)."""
        if not self.autoregressive:
            raise ConfigError("incremental decoding needs mode='autoregressive' (masked mode is bidirectional)")
        c = self.config
        ref = self.to_logits.weight
        kv = KVCache(
            num_layers=c.depth,
            batch_size=batch_size,
            heads=c.heads,
            dim_head=c.dim_head,
            max_len=c.input_len if max_len is None else max_len,
            device=device if device is not None else ref.device,
            dtype=dtype if dtype is not None else ref.dtype,
        )
        return CelleCache(kv, c.depth)

    @torch.no_grad()
    def forward_step(
        self,
        cache: CelleCache,
        *,
        text_mask: Tensor | None = None,
        text_emb: Tensor | None = None,
        text_ids: Tensor | None = None,
        nucleus: Tensor | None = None,
        threshold: Tensor | None = None,
        trim_text: bool = False,
    ) -> Tensor:
        """Process the next chunk of the sequence with the cache (no gradients); equals the full pass.

        The chunk is the given pieces in layout order, continuing at ``cache.length``: the text
        (whole, only in the first step), then nucleus tokens (continuing the nucleus grid), then
        threshold tokens (once the nucleus grid is complete). A typical generation feeds text +
        nucleus first, then one threshold token per step.

        Parameters
        ----------
        cache
            From :meth:`new_cache`; updated in place.
        text_mask, text_emb, text_ids
            As in :meth:`forward`, first step only.
        nucleus, threshold
            ``int64 [B, n]`` token ids of the chunk.
        trim_text
            Leave the text padding after the longest sequence of the batch out of the pass and the cache.
            Padded positions are never attended, so every other row is unchanged (exact); a short
            protein then costs its own length, not ``max_residues``. The returned logits lack the rows
            of the left-out positions.

        Returns
        -------
        torch.Tensor
            Masked logits ``[B, n_chunk, vocab_size]``; the last row predicts the next token.
        """
        c = self.config
        tl, G = c.text_len, c.grid_tokens
        start = cache.length
        pos = start
        pieces: list[Tensor] = []
        masks: list[Tensor] = []
        ranges: list[tuple[int, int]] = []
        if text_mask is not None:
            if pos != 0:
                raise InputError("the text goes in the first step only")
            x_text, key_text = self._embed_text(text_emb, text_ids, text_mask)
            keep = tl
            if trim_text:
                keep = trimmed_text_len(key_text)
                x_text, key_text = x_text[:, :keep], key_text[:, :keep]
                cache.skipped = tl - keep
            pieces.append(x_text)
            masks.append(key_text)
            ranges.append((0, keep))
            pos = tl
        elif pos == 0:
            raise InputError("the first step must include the text (text_mask and text_emb / text_ids)")
        for seg, ids, lo, hi in (("nucleus", nucleus, tl, tl + G), ("threshold", threshold, tl + G, tl + 2 * G - 1)):
            if ids is None:
                continue
            if ids.dim() != 2:
                raise InputError(f"{seg} tokens must be [B, n], got shape {tuple(ids.shape)}")
            if not lo <= pos or pos + ids.shape[1] > hi:
                raise InputError(
                    f"{ids.shape[1]} {seg} token(s) at position {pos} do not continue the {seg} grid "
                    f"(positions {lo}..{hi - 1})"
                )
            pieces.append(self._embed_image(ids, seg, None))
            masks.append(torch.ones(ids.shape, dtype=torch.bool, device=ids.device))
            pos += ids.shape[1]
        if not pieces:
            raise InputError("forward_step got no tokens")
        image_start = tl if text_mask is not None else start
        if pos > image_start:
            if ranges and ranges[-1][1] == image_start:
                ranges[-1] = (ranges[-1][0], pos)
            else:
                ranges.append((image_start, pos))
        x = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]  # [B, n, dim]
        if x.shape[0] != cache.kv.k.shape[1]:
            raise InputError(f"batch size {x.shape[0]} differs from the cache's {cache.kv.k.shape[1]}")
        key_mask = cache.kv.write_mask(torch.cat(masks, dim=1) if len(masks) > 1 else masks[0])  # [B, cached + n]
        logits, _ = self._run(x, ranges, key_mask, cache=cache)
        cache.kv.advance(x.shape[1])
        return logits

    # ----------------------------------------------------------------------------------------------
    # loss

    def sample_mask(self, batch_size: int, *, generator: torch.Generator | None = None) -> Tensor:
        """MaskGIT cosine schedule: per sample ``r = cos(pi/2 * u)``, ``u ~ U(0, 1)``; mask ``ceil(r G)``
        random tokens (at least one). Returns ``bool [B, G]``."""
        G = self.config.grid_tokens
        device = self.to_logits.weight.device
        u = torch.rand(batch_size, generator=generator, device=device)
        n_mask = torch.ceil(torch.cos(0.5 * math.pi * u) * G).clamp(1, G).long()  # [B]
        scores = torch.rand(batch_size, G, generator=generator, device=device)
        ranks = scores.argsort(dim=1).argsort(dim=1)  # random permutation ranks [B, G]
        return ranks < n_mask[:, None]

    @staticmethod
    def _ce(
        logits: Tensor, target: Tensor, valid: Tensor | None = None, denominator: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Cross-entropy and accuracy over the valid entries (``logits [..., C]``): means, or sums divided
        by ``denominator`` when one is given."""
        if valid is not None:
            logits, target = logits[valid], target[valid]
        else:
            logits, target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
        if denominator is None:
            loss = F.cross_entropy(logits.float(), target)
            acc = (logits.argmax(-1) == target).float().mean()
        else:
            loss = F.cross_entropy(logits.float(), target, reduction="sum") / denominator
            acc = (logits.argmax(-1) == target).float().sum() / denominator
        return loss, acc.detach()

    @staticmethod
    def _denominators(
        counts: dict[str, Tensor | int], count_reducer: Callable[[Tensor], Tensor] | None, device: torch.device
    ) -> tuple[dict[str, Tensor | None], dict[str, bool]]:
        """Per-segment divisors of the summed cross-entropy and whether each segment has a term.

        Without ``count_reducer``: no divisor (plain means) and a term where this batch has targets.
        With one: the reducer's value for the segment's target count, and a term where it is positive,
        so that every data-parallel process has the same terms.
        """
        if count_reducer is None:
            return dict.fromkeys(counts), {k: int(v) > 0 for k, v in counts.items()}
        local = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in counts.values()])
        reduced = count_reducer(local)
        return (
            {k: reduced[i] for i, k in enumerate(counts)},
            {k: bool(reduced[i] > 0) for i, k in enumerate(counts)},
        )

    def loss(
        self,
        batch: dict[str, Tensor],
        *,
        generator: torch.Generator | None = None,
        count_reducer: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Weighted per-segment cross-entropy.

        Parameters
        ----------
        batch
            ``text_ids`` ``[B, L]`` and ``text_mask`` ``[B, L]``, ``text_emb`` ``[B, L, text_dim]``
            (unless the embedder is part of the model), ``nucleus`` and ``threshold`` token ids
            ``[B, G]`` or ``[B, g, g]``; masked mode optionally ``threshold_mask`` / ``nucleus_mask``
            (else drawn with :meth:`sample_mask`) and ``residue_mask`` (else drawn with
            :meth:`sample_residue_mask`).
        generator
            Random generator for the masked mode's token masks.
        count_reducer
            For data-parallel training: maps this batch's target counts ``[text, nucleus, threshold]``
            (float32) to the divisors of each segment's summed cross-entropy, the counts summed over all
            processes divided by their number. Averaging the processes' gradients then gives exactly
            the mean over the global batch, however the text targets are shared out (a plain mean per
            process weights a process with short sequences like one with long ones). A collective: every
            process calls it once per call of this method. ``None``: means over this batch.

        Returns
        -------
        dict of torch.Tensor
            Autoregressive: ``loss``, ``loss_text``, ``loss_nucleus``, ``loss_threshold`` and
            ``acc_*`` (padding ignored; each term a mean over its segment's targets, weighted by
            :attr:`CelleConfig.loss_weights`; no text terms when no sample has a residue). Masked:
            ``loss``, ``loss_threshold``, ``acc_threshold``, ``mask_ratio`` (+ ``loss_nucleus`` /
            ``acc_nucleus`` when nucleus tokens are masked too, ``loss_text`` / ``acc_text`` when
            residues are, :meth:`sample_residue_mask`), over the masked tokens only; a segment with no
            masked token in the batch has no term.
        """
        c = self.config
        tl, G = c.text_len, c.grid_tokens
        w = c.loss_weights
        text_ids, text_mask = batch["text_ids"], batch["text_mask"].bool()
        if text_ids.shape != text_mask.shape:
            raise InputError(f"text_ids {tuple(text_ids.shape)} and text_mask {tuple(text_mask.shape)} differ in shape")
        nucleus = _flatten_grid(batch["nucleus"], "nucleus")
        threshold = _flatten_grid(batch["threshold"], "threshold")
        if threshold.shape[1] != G:
            raise InputError(f"threshold tokens must be [B, {G}], got {tuple(threshold.shape)}")
        common = dict(text_mask=text_mask, text_emb=batch.get("text_emb"), text_ids=text_ids, nucleus=nucleus)
        o_nuc, o_thr = c.nucleus_offset, c.threshold_offset
        if self.autoregressive:
            self._check_text_targets(text_ids, text_mask)
            b = nucleus.shape[0]
            denom, has = self._denominators(
                {"text": text_mask[:, 1:].sum(), "nucleus": b * G, "threshold": b * G}, count_reducer, nucleus.device
            )
            logits = self(threshold=threshold[:, :-1], **common).logits  # [B, tl + 2G - 1, V]
            n = text_ids.shape[1]
            # Row p predicts token p + 1 (S.3.6: the sequence shifted by one).
            loss_n, acc_n = self._ce(logits[:, tl - 1 : tl - 1 + G, o_nuc:o_thr], nucleus, None, denom["nucleus"])
            loss_h, acc_h = self._ce(logits[:, tl - 1 + G :, o_thr:], threshold, None, denom["threshold"])
            total = w.nucleus * loss_n + w.threshold * loss_h
            out = {
                "loss_nucleus": loss_n.detach(),
                "loss_threshold": loss_h.detach(),
                "acc_nucleus": acc_n,
                "acc_threshold": acc_h,
            }
            if has["text"]:
                # No text targets at all (every sequence replaced by padding): no text term.
                loss_t, acc_t = self._ce(
                    logits[:, : n - 1, : c.text_vocab_size], text_ids[:, 1:], text_mask[:, 1:], denom["text"]
                )
                total = total + w.text * loss_t
                out.update(loss_text=loss_t.detach(), acc_text=acc_t)
            return {"loss": total, **out}
        b = nucleus.shape[0]
        given_thr = batch.get("threshold_mask")
        thr_mask = self.sample_mask(b, generator=generator) if given_thr is None else _flatten_grid(given_thr, "mask")
        thr_mask = thr_mask.bool()
        nuc_mask = None
        if "nucleus" in c.masked_segments:
            nuc_mask = batch.get("nucleus_mask")
            nuc_mask = self.sample_mask(b, generator=generator) if nuc_mask is None else _flatten_grid(nuc_mask, "mask")
            nuc_mask = nuc_mask.bool()
        res_mask = None
        if "text" in c.masked_segments:
            self._check_text_targets(text_ids, text_mask)
            res_mask = batch.get("residue_mask")
            if res_mask is None:
                res_mask, to_text = self.sample_residue_mask(text_ids, text_mask, generator=generator)
                if given_thr is None:
                    # A sample fills residues from whole images, or predicts images from a whole sequence.
                    thr_mask = thr_mask & ~to_text[:, None]
                    if nuc_mask is not None and batch.get("nucleus_mask") is None:
                        nuc_mask = nuc_mask & ~to_text[:, None]
            res_mask = res_mask.bool()
        logits = self(
            threshold=threshold, threshold_mask=thr_mask, nucleus_mask=nuc_mask, residue_mask=res_mask, **common
        ).logits
        zero = torch.zeros((), dtype=torch.long, device=nucleus.device)
        counts = {
            "text": res_mask.sum() if res_mask is not None else zero,
            "nucleus": nuc_mask.sum() if nuc_mask is not None else zero,
            "threshold": thr_mask.sum(),
        }
        denom, has = self._denominators(counts, count_reducer, nucleus.device)
        out: dict[str, Tensor] = {"mask_ratio": thr_mask.float().mean()}
        total = logits.new_zeros((), dtype=torch.float32)
        if has["threshold"]:
            loss_h, acc_h = self._ce(logits[:, tl + G :, o_thr:], threshold, thr_mask, denom["threshold"])
            total = total + w.threshold * loss_h
            out.update(loss_threshold=loss_h.detach(), acc_threshold=acc_h)
        if has["nucleus"]:
            loss_n, acc_n = self._ce(logits[:, tl : tl + G, o_nuc:o_thr], nucleus, nuc_mask, denom["nucleus"])
            total = total + w.nucleus * loss_n
            out.update(loss_nucleus=loss_n.detach(), acc_nucleus=acc_n)
        if has["text"]:
            n = text_ids.shape[1]
            loss_t, acc_t = self._ce(logits[:, :n, : c.text_vocab_size], text_ids, res_mask, denom["text"])
            total = total + w.text * loss_t
            out.update(loss_text=loss_t.detach(), acc_text=acc_t)
        return {"loss": total, **out}

    def sample_residue_mask(
        self, text_ids: Tensor, text_mask: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Residue masks of image-to-sequence training (masked mode with ``"text"``).

        Each sample is chosen with probability :attr:`CelleConfig.text_mask_prob`; a chosen sample
        masks ``ceil(r n)`` of its ``n`` residues (at least one), ``r = cos(pi/2 u)``, ``u ~ U(0, 1)``
        (MaskGIT's cosine schedule, as for image tokens). BOS, the end token and padding are never masked.

        Returns
        -------
        residue_mask : torch.Tensor
            ``bool [B, L]``.
        chosen : torch.Tensor
            ``bool [B]``: the samples with masked residues.
        """
        device = text_ids.device
        b, n = text_ids.shape
        residue = text_mask.bool() & (text_ids >= _TOKENIZER.vocab["A"]) & (text_ids < self.config.text_vocab_size)
        residue[:, 0] = False
        n_res = residue.sum(dim=1)  # [B]
        chosen = (torch.rand(b, generator=generator, device=device) < self.config.text_mask_prob) & (n_res > 0)
        u = torch.rand(b, generator=generator, device=device)
        n_mask = torch.ceil(torch.cos(0.5 * math.pi * u) * n_res).clamp_min(1).long()
        scores = torch.rand(b, n, generator=generator, device=device).masked_fill(~residue, 2.0)
        ranks = scores.argsort(dim=1).argsort(dim=1)  # residues first, in random order
        mask = (ranks < n_mask[:, None]) & residue & chosen[:, None]
        return mask, chosen

    def _check_text_targets(self, text_ids: Tensor, text_mask: Tensor) -> None:
        targets = text_ids[:, 1:][text_mask[:, 1:]]
        ok = self.segment_vocab[0, : self.config.text_vocab_size]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.config.text_vocab_size):
            raise InputError("text ids outside the 30-token vocabulary")
        if targets.numel() and not bool(ok[targets].all()):
            raise InputError("text targets after BOS must be residue letters or the end token <sep>")

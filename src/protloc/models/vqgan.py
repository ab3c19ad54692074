"""VQGAN image tokenizers of CELL-E (Khwaja et al., Sec. 4.2-4.3, S.3.4-S.3.5).

CELL-E turns each 256 x 256 single-channel image (the nucleus reference image, and the mean-thresholded
protein image) into a 16 x 16 grid of tokens from a 512-code codebook with a VQGAN (Esser et al. 2021,
"Taming Transformers for High-Resolution Image Synthesis"). This module writes that recipe:

- :class:`VQGAN`: convolutional encoder (ResNet blocks with GroupNorm and SiLU, self-attention at the
  resolutions listed in ``attn_resolutions``, strided-convolution downsampling between levels, a
  res-attention-res middle block), a 1x1 ``quant_conv`` to the code dimension, the shared
  :class:`~protloc.nn.quantize.VectorQuantizer`, a 1x1 ``post_quant_conv`` and the mirrored decoder
  (nearest-neighbour x2 upsampling followed by a 3x3 convolution);
- :class:`PatchDiscriminator`: the PatchGAN discriminator (pix2pix ``NLayerDiscriminator``) that taming
  switches on after ``disc_start`` steps;
- :func:`hinge_d_loss`, :func:`vanilla_d_loss` and :func:`adaptive_weight` (taming's
  ``calculate_adaptive_weight``: the GAN term is scaled so that its gradient at the last decoder layer
  has the size of the reconstruction gradient);
- :class:`PerceptualLoss`: LPIPS (VGG16 features + learned channel weights, Zhang et al. 2018) built
  only from weights the user supplies as a local file; nothing is downloaded.

Models hold no optimizer and do no logging; the training loop is :mod:`protloc.train.vqgan`.

Examples
--------
>>> import torch
>>> model = VQGAN(VQGANConfig.tiny()).eval()
>>> with torch.no_grad():
...     out = model(torch.rand(2, 1, 64, 64))
...     decoded = model.decode_indices(out.indices)
>>> out.reconstruction.shape, out.indices.shape
(torch.Size([2, 1, 64, 64]), torch.Size([2, 8, 8]))
>>> torch.allclose(decoded, out.reconstruction, atol=1e-6)
True
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protloc.errors import ConfigError
from protloc.nn.quantize import VectorQuantizer, VQOutput

__all__ = [
    "PatchDiscriminator",
    "PerceptualLoss",
    "VQGAN",
    "VQGANConfig",
    "VQGANOutput",
    "adaptive_weight",
    "hinge_d_loss",
    "vanilla_d_loss",
]


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class VQGANConfig:
    """Configuration of :class:`VQGAN`. Presets: :meth:`paper`, :meth:`tiny`.

    Attributes
    ----------
    image_size
        Side of the square input (paper: 256). It must be divisible by the downsampling factor
        ``2 ** (len(ch_mult) - 1)``; it places the attention layers (``attn_resolutions``) and gives
        :attr:`grid_size`.
    in_channels
        Image channels, input and output (paper: 1, a grey nucleus image or a binary threshold image).
    ch
        Width of the stem convolution; level ``i`` is ``ch * ch_mult[i]`` wide (taming: 128).
    ch_mult
        Width multipliers of the resolution levels; one downsampling between consecutive levels
        (paper / taming f16: ``(1, 1, 2, 2, 4)``, 256 -> 16).
    num_res_blocks
        ResNet blocks per encoder level (the decoder has one more per level, as in taming).
    attn_resolutions
        Feature-map sides at which each ResNet block is followed by self-attention (taming f16:
        ``(16,)``). The middle blocks always have one attention layer.
    dropout
        Dropout inside the ResNet blocks (taming: 0).
    z_channels
        Channels of the encoder output / decoder input (taming f16: 256).
    embed_dim
        Dimension of a code (taming f16: 256).
    n_embed
        Codebook size (paper Sec. 4.2: 512).
    commitment_cost
        VQ-VAE commitment weight beta (taming: 0.25).
    norm_groups
        GroupNorm groups (taming: 32); every level width must be divisible by it.
    value_range
        ``(lo, hi)``: the pixel range of the images the model takes and returns (CELL-E's crops: [0, 1]).
        Inside, images are mapped affinely to [-1, 1], the range taming's VQGAN is trained in
        (:meth:`VQGAN.normalize`), and reconstructions are mapped back.
    output
        ``"linear"``: the decoder's last convolution is the reconstruction (taming); ``"sigmoid"``:
        squashed into ``value_range``, an option for the binary threshold images.
    """

    image_size: int = 256
    in_channels: int = 1
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 512
    commitment_cost: float = 0.25
    norm_groups: int = 32
    value_range: tuple[float, float] = (0.0, 1.0)
    output: Literal["linear", "sigmoid"] = "linear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "value_range", tuple(float(v) for v in self.value_range))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        for name in (
            "image_size",
            "in_channels",
            "ch",
            "num_res_blocks",
            "z_channels",
            "embed_dim",
            "n_embed",
            "norm_groups",
        ):
            if not _positive_int(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.ch_mult or not all(_positive_int(m) for m in self.ch_mult):
            raise ConfigError(f"ch_mult must be a non-empty list of positive integers, got {self.ch_mult!r}")
        factor = self.downsampling
        if self.image_size % factor:
            raise ConfigError(
                f"image_size {self.image_size} is not divisible by the downsampling factor {factor} "
                f"(2 ** (len(ch_mult) - 1) for ch_mult {list(self.ch_mult)})"
            )
        levels = self.level_resolutions
        for r in self.attn_resolutions:
            if r not in levels:
                raise ConfigError(f"attn_resolutions entry {r!r} matches no level resolution (levels: {levels})")
        for width in (self.ch, *(self.ch * m for m in self.ch_mult)):
            if width % self.norm_groups:
                raise ConfigError(
                    f"norm_groups {self.norm_groups} does not divide the level width {width} (ch x ch_mult)"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.commitment_cost < 0:
            raise ConfigError(f"commitment_cost must be >= 0, got {self.commitment_cost}")
        if len(self.value_range) != 2 or not self.value_range[1] > self.value_range[0]:
            raise ConfigError(f"value_range must be (lo, hi) with hi > lo, got {self.value_range!r}")
        if self.output not in ("linear", "sigmoid"):
            raise ConfigError(f"output must be 'linear' or 'sigmoid', got {self.output!r}")

    @classmethod
    def paper(cls) -> VQGANConfig:
        """CELL-E's tokenizers (Sec. 4.2, S.3.4): taming's f16 VQGAN on 256 x 256 single-channel images,
        16 x 16 tokens, 512 codes of 256 dimensions."""
        return cls()

    @classmethod
    def tiny(cls) -> VQGANConfig:
        """A CPU model for tests and demos: 64 px, widths 16-64, f = 8 -> 8 x 8 tokens, 128 codes of 32 dims,
        one ResNet block per level, attention only in the middle blocks, GroupNorm with 8 groups.

        0.47 GFLOP per 64 px image forward; trains at about 40 images/s on one CPU core (batch 16, with
        the discriminator). Widths 32-128 (``ch=32``) reconstruct a little better at 2.7x the cost.
        """
        return cls(
            image_size=64,
            ch=16,
            norm_groups=8,
            ch_mult=(1, 2, 2, 4),
            num_res_blocks=1,
            attn_resolutions=(),
            z_channels=32,
            embed_dim=32,
            n_embed=128,
        )

    def replace(self, **changes: object) -> VQGANConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def downsampling(self) -> int:
        """Downsampling factor f = ``2 ** (len(ch_mult) - 1)`` (paper: 16)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Side of the token grid, ``image_size / f`` (paper: 16)."""
        return self.image_size // self.downsampling

    @property
    def level_resolutions(self) -> list[int]:
        """Feature-map side at each encoder level (paper: 256, 128, 64, 32, 16)."""
        return [self.image_size // 2**i for i in range(len(self.ch_mult))]


class VQGANOutput(NamedTuple):
    """Result of :meth:`VQGAN.forward`.

    Attributes
    ----------
    reconstruction
        ``[B, C, S, S]`` decoded image.
    indices
        ``[B, h, w]`` int64 code indices (the image tokens).
    vq
        The quantizer's :class:`~protloc.nn.quantize.VQOutput` (loss, perplexity, code usage, ...).
    latent
        ``[B, embed_dim, h, w]`` the continuous latent before quantization (:meth:`VQGAN.encode_latent`),
        e.g. for restarting unused codes without a second encoder pass.
    """

    reconstruction: Tensor
    indices: Tensor
    vq: VQOutput
    latent: Tensor


# --------------------------------------------------------------------------------------------------
# building blocks (taming-transformers' diffusionmodules/model.py recipe)
# --------------------------------------------------------------------------------------------------


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice (dropout before the second conv), plus a (1x1) shortcut.

    Parameters
    ----------
    in_channels, out_channels
        Widths; a 1x1 convolution adapts the shortcut when they differ.
    dropout
        Dropout rate before the second convolution.
    groups
        GroupNorm groups.
    """

    def __init__(self, *, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map, with a residual connection.

    Parameters
    ----------
    channels
        Width (query / key / value dimension).
    groups
        GroupNorm groups.
    """

    def __init__(self, *, channels: int, groups: int = 32) -> None:
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)  # taming's q, k, v 1x1 convs, fused
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # 3 x [B, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, [B, HW, C]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """3x3 convolution with stride 2, padded on the right and bottom only (taming: exact halving)."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """ResNet blocks of one resolution (each optionally followed by attention) and the resampling step."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        blocks: int,
        attention: bool,
        resample: nn.Module | None,
        dropout: float,
        groups: int,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        self.attns = nn.ModuleList()
        for i in range(blocks):
            self.blocks.append(
                ResnetBlock(
                    in_channels=in_channels if i == 0 else out_channels,
                    out_channels=out_channels,
                    dropout=dropout,
                    groups=groups,
                )
            )
            if attention:
                self.attns.append(AttnBlock(channels=out_channels, groups=groups))
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if len(self.attns):
                x = self.attns[i](x)
        return self.resample(x)


class _Middle(nn.Sequential):
    """ResNet -> attention -> ResNet at the lowest resolution."""

    def __init__(self, *, channels: int, dropout: float, groups: int) -> None:
        super().__init__(
            ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout, groups=groups),
            AttnBlock(channels=channels, groups=groups),
            ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout, groups=groups),
        )


class Encoder(nn.Module):
    """Image ``[B, C, S, S]`` in [-1, 1] units -> latent ``[B, z_channels, S / f, S / f]``."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        c = config
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.levels = nn.ModuleList()
        width = c.ch
        last = len(c.ch_mult) - 1
        for i, (mult, res) in enumerate(zip(c.ch_mult, c.level_resolutions, strict=True)):
            out = c.ch * mult
            self.levels.append(
                _Level(
                    in_channels=width,
                    out_channels=out,
                    blocks=c.num_res_blocks,
                    attention=res in c.attn_resolutions,
                    resample=Downsample(channels=out) if i < last else None,
                    dropout=c.dropout,
                    groups=c.norm_groups,
                )
            )
            width = out
        self.mid = _Middle(channels=width, dropout=c.dropout, groups=c.norm_groups)
        self.norm_out = _group_norm(width, c.norm_groups)
        self.conv_out = nn.Conv2d(width, c.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``[B, z_channels, h, w]`` -> image ``[B, C, h f, w f]`` in [-1, 1] units, the encoder's mirror image."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        c = config
        width = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, width, 3, padding=1)
        self.mid = _Middle(channels=width, dropout=c.dropout, groups=c.norm_groups)
        self.levels = nn.ModuleList()
        # From the lowest resolution up; one more ResNet block per level than the encoder (taming).
        levels = list(zip(c.ch_mult, c.level_resolutions, strict=True))[::-1]
        for i, (mult, res) in enumerate(levels):
            out = c.ch * mult
            self.levels.append(
                _Level(
                    in_channels=width,
                    out_channels=out,
                    blocks=c.num_res_blocks + 1,
                    attention=res in c.attn_resolutions,
                    resample=Upsample(channels=out) if i < len(levels) - 1 else None,
                    dropout=c.dropout,
                    groups=c.norm_groups,
                )
            )
            width = out
        self.norm_out = _group_norm(width, c.norm_groups)
        self.conv_out = nn.Conv2d(width, c.in_channels, 3, padding=1)
        self.sigmoid = c.output == "sigmoid"

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        # In the model's [-1, 1] units; "sigmoid" squashes into that interval.
        return 2.0 * torch.sigmoid(h) - 1.0 if self.sigmoid else h


class VQGAN(nn.Module):
    """Vector-quantized autoencoder of taming-transformers, the tokenizer of CELL-E (paper Sec. 4.2-4.3).

    Parameters
    ----------
    config
        The architecture (:meth:`VQGANConfig.paper` or :meth:`VQGANConfig.tiny`).

    Notes
    -----
    Inputs and reconstructions are in the units of the data, ``config.value_range`` (CELL-E: nucleus
    intensities in [0, 1] or a {0, 1} threshold image). The encoder and decoder work in [-1, 1], the range
    of taming's training images; :meth:`normalize` / :meth:`denormalize` convert. The GAN discriminator
    and the losses live outside the model (:class:`PatchDiscriminator`, :mod:`protloc.train.vqgan`); taming
    computes them in [-1, 1] units, where a squared error is 4 x the one in [0, 1] units (in [0, 1] units
    the codebook loss outweighs the reconstruction of dim nucleus images and the encoder collapses to a
    single code).
    """

    model_type = "vqgan"

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.quantize = VectorQuantizer(
            codebook_size=config.n_embed, dim=config.embed_dim, commitment_cost=config.commitment_cost
        )
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    @property
    def codebook(self) -> Tensor:
        """The code vectors, ``[n_embed, embed_dim]`` (a parameter: detach before editing)."""
        return self.quantize.codebook

    @property
    def grid_size(self) -> int:
        """Side of the token grid for ``config.image_size`` inputs (paper: 16)."""
        return self.config.grid_size

    @property
    def last_layer(self) -> Tensor:
        """Weight of the decoder's last convolution (where :func:`adaptive_weight` compares gradients)."""
        return self.decoder.conv_out.weight

    def _check(self, x: Tensor) -> None:
        c = self.config
        f = c.downsampling
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(
                f"VQGAN expects [B, {c.in_channels}, H, W] with H and W divisible by {f}, got {list(x.shape)}"
            )

    def normalize(self, x: Tensor) -> Tensor:
        """Map images from ``config.value_range`` to the model's [-1, 1] units."""
        lo, hi = self.config.value_range
        return (x - lo) * (2.0 / (hi - lo)) - 1.0

    def denormalize(self, y: Tensor) -> Tensor:
        """Map images from the model's [-1, 1] units back to ``config.value_range``."""
        lo, hi = self.config.value_range
        return (y + 1.0) * (0.5 * (hi - lo)) + lo

    def encode_latent(self, x: Tensor) -> Tensor:
        """Continuous latent before quantization, ``[B, embed_dim, h, w]``."""
        self._check(x)
        return self.quant_conv(self.encoder(self.normalize(x)))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Quantize images.

        Parameters
        ----------
        x
            ``[B, C, S, S]``.

        Returns
        -------
        quantized
            ``[B, embed_dim, h, w]`` codebook vectors (straight-through while gradients are recorded).
        indices
            ``[B, h, w]`` int64 tokens.
        """
        vq = self.quantize(self.encode_latent(x))
        return vq.quantized, vq.indices[:, 0]

    def decode(self, quantized: Tensor) -> Tensor:
        """Decode ``[B, embed_dim, h, w]`` code vectors (or any mixture of them, e.g. CELL-E's
        probability-weighted sum, paper Eq. 3) to ``[B, C, h f, w f]`` images in ``config.value_range`` units."""
        return self.denormalize(self.decoder(self.post_quant_conv(quantized)))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Decode ``[B, h, w]`` tokens to ``[B, C, h f, w f]`` images."""
        if indices.ndim != 3:
            raise ValueError(f"decode_indices expects [B, h, w] token indices, got {list(indices.shape)}")
        return self.decode(self.quantize.lookup(indices[:, None]))

    def forward(self, x: Tensor) -> VQGANOutput:
        """Encode, quantize and decode ``x`` ``[B, C, S, S]``; see :class:`VQGANOutput`."""
        latent = self.encode_latent(x)
        vq = self.quantize(latent)
        return VQGANOutput(self.decode(vq.quantized), vq.indices[:, 0], vq, latent)


# --------------------------------------------------------------------------------------------------
# discriminator and GAN losses
# --------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix ``NLayerDiscriminator``, as used by taming's VQGAN).

    ``4x4`` convolutions: one stride-2 layer without normalisation, ``layers - 1`` further stride-2
    layers and one stride-1 layer with BatchNorm (widths ``channels * min(2 ** n, 8)``), LeakyReLU 0.2,
    and a final stride-1 convolution to one logit per patch (256 px input, 3 layers: 30 x 30 logits,
    each seeing a 70 x 70 patch).

    Parameters
    ----------
    in_channels
        Image channels.
    channels
        Width of the first layer (taming: 64).
    layers
        Number of stride-2 / BatchNorm layers (taming: 3).

    Notes
    -----
    Weights are drawn as in pix2pix / taming: convolutions N(0, 0.02), BatchNorm scales N(1, 0.02) and
    shifts 0.
    """

    def __init__(self, *, in_channels: int = 1, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        if not (_positive_int(in_channels) and _positive_int(channels) and _positive_int(layers)):
            raise ValueError(
                f"in_channels, channels and layers must be positive, got {in_channels}, {channels}, {layers}"
            )
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1
            # No bias before BatchNorm (its shift plays that role).
            seq += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        seq.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """pix2pix initialisation: conv weights N(0, 0.02), BatchNorm N(1, 0.02) / 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Patch logits ``[B, 1, h', w']`` (positive = judged real)."""
        return self.main(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss ``(mean relu(1 - D(x)) + mean relu(1 + D(G(z)))) / 2`` (taming)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating GAN discriminator loss ``(mean softplus(-D(x)) + mean softplus(D(G(z)))) / 2``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_weight(
    rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, *, max_weight: float = 1e4, eps: float = 1e-4
) -> Tensor:
    """Taming's adaptive GAN weight ``||d rec / d w|| / (||d g / d w|| + eps)``, clamped to ``[0, max_weight]``.

    ``w`` is the decoder's last layer: the generator term then pushes that layer about as hard as the
    reconstruction term does, whatever their raw scales (Esser et al. 2021, Eq. 7).

    Parameters
    ----------
    rec_loss
        Reconstruction (+ perceptual) loss, a scalar depending on ``last_layer``.
    g_loss
        Generator loss ``-mean D(G(z))``, a scalar depending on ``last_layer``.
    last_layer
        The parameter to compare gradients at (:attr:`VQGAN.last_layer`).
    max_weight, eps
        Upper clamp and the denominator's guard.

    Returns
    -------
    Tensor
        A detached scalar (multiply by ``disc_weight``). The graphs are kept for the backward pass.
    """
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = rec_grad.norm() / (g_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


# --------------------------------------------------------------------------------------------------
# LPIPS from local weights
# --------------------------------------------------------------------------------------------------

# VGG16 "D" feature layers: output widths, "M" = 2x2 max pool. LPIPS taps the ReLU after the last
# convolution of each of the five blocks (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_WIDTHS = (64, 128, 256, 512, 512)
# LPIPS normalises [-1, 1] inputs to ImageNet statistics with this shift / scale.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class PerceptualLoss(nn.Module):
    """LPIPS distance (Zhang et al. 2018; taming's perceptual term) with VGG16 features, frozen.

    Built with random weights; fill it with :meth:`from_file`. Its state-dict keys are those of
    torchvision's ``vgg16().features`` (``features.<i>.weight`` / ``.bias``) plus the five LPIPS channel
    weightings ``lin<k>.model.1.weight`` ``[1, C_k, 1, 1]`` of the ``lpips`` / taming ``vgg.pth`` file,
    so a user can merge those two published files into one (nothing is downloaded here).

    Parameters
    ----------
    input_range
        ``(lo, hi)`` of the images compared; they are mapped to [-1, 1] (LPIPS's range) and a single
        channel is repeated to three.
    """

    def __init__(self, *, input_range: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 3
        for item in _VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(width, int(item), 3, padding=1), nn.ReLU(inplace=False)]
                width = int(item)
        self.features = nn.Sequential(*layers)
        # Indices (in self.features) of the ReLUs whose outputs LPIPS compares.
        self._taps = [i for i, m in enumerate(layers) if isinstance(m, nn.ReLU) and _is_block_end(layers, i)]
        for k, c in enumerate(_LPIPS_WIDTHS):
            self.add_module(f"lin{k}", _LinWrapper(nn.Sequential(nn.Dropout(0.0), nn.Conv2d(c, 1, 1, bias=False))))
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        lo, hi = float(input_range[0]), float(input_range[1])
        if not hi > lo:
            raise ValueError(f"input_range must be (lo, hi) with hi > lo, got {input_range}")
        self.input_range = (lo, hi)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Always stays in eval mode (a frozen loss network)."""
        return super().train(False)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, input_range: tuple[float, float] = (0.0, 1.0)) -> PerceptualLoss:
        """Load LPIPS weights from a local ``.safetensors`` or ``.pt`` / ``.pth`` state dict.

        Raises
        ------
        ConfigError
            If the file is missing, unreadable, or its keys / shapes do not match (named).
        """
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"loss.perceptual_weights: no such file {str(p)!r} (LPIPS weights are never downloaded)")
        try:
            if p.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(p))
            else:
                state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # safetensors / unpickling raise many types
            raise ConfigError(f"loss.perceptual_weights: cannot read {str(p)!r} ({exc})") from exc
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ConfigError(f"loss.perceptual_weights: {str(p)!r} is not a state dict of tensors")
        module = cls(input_range=input_range)
        expected = module.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise ConfigError(
                f"loss.perceptual_weights: {str(p)!r} does not hold VGG16 features + LPIPS weights "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}); expected keys "
                "'features.<i>.weight/bias' (torchvision vgg16) and 'lin<k>.model.1.weight' (LPIPS vgg.pth)"
            )
        module.load_state_dict(state, strict=True)
        return module

    def _normalise(self, x: Tensor) -> Tensor:
        lo, hi = self.input_range
        x = (x - lo) * (2.0 / (hi - lo)) - 1.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"PerceptualLoss compares 1- or 3-channel images, got {x.shape[1]} channels")
        return (x - self.shift) / self.scale

    def _feats(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._taps:
                # Unit-normalise each position's channel vector (LPIPS).
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            if len(out) == len(self._taps):
                break
        return out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """LPIPS distance per image, ``[B]``: sum over the five layers of the weighted, spatially averaged
        squared feature differences."""
        fa, fb = self._feats(self._normalise(a)), self._feats(self._normalise(b))
        total = a.new_zeros(a.shape[0])
        for k, (x, y) in enumerate(zip(fa, fb, strict=True)):
            lin: _LinWrapper = getattr(self, f"lin{k}")
            total = total + lin.model((x - y).pow(2)).mean(dim=(1, 2, 3))
        return total


class _LinWrapper(nn.Module):
    """Holds LPIPS's ``model = Sequential(Dropout, Conv1x1)`` so the keys read ``lin<k>.model.1.weight``."""

    def __init__(self, model: nn.Sequential) -> None:
        super().__init__()
        self.model = model


def _is_block_end(layers: list[nn.Module], i: int) -> bool:
    """A ReLU ends a VGG block when the next layer is a pool or it is the last layer."""
    return i == len(layers) - 1 or isinstance(layers[i + 1], nn.MaxPool2d)

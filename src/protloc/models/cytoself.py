"""cytoself: self-supervised protein-localization embeddings (Kobayashi et al., Nature Methods 2022).

A two-level VQ-VAE-2 whose encoders are the two halves of EfficientNet-B0, with split quantization of
the global representation and a protein-identification pretext task on both representations (paper
Fig. 1b, Methods "Model architecture", Supp. Fig. 9)::

    x [B, C, 100, 100] -- encoder1 --> z1 [B, 64, 25, 25] -- VQ1 --> q1, idx1 [B, 1, 25, 25]   (local)
                                        z1 -- encoder2 --> z2 [B, 576, 4, 4]
                                        z2 -- VQ2 (split 9) --> q2, idx2 [B, 9, 4, 4]           (global)
    q2 -- decoder2 (4 -> 7 -> 13 -> 25, 1x1 "mselyr1") --> r2 [B, 64, 25, 25]    ~ z1
    concat(q1, nearest-resize(q2)) -- decoder1 (25 -> 50 -> 100) --> x_hat [B, C, 100, 100]  ~ x
    flatten(q1) -- fc1 --> logits1;  flatten(q2) -- fc2 --> logits2                  (protein ID)

Examples
--------
>>> import torch
>>> model = Cytoself(CytoselfConfig.tiny(num_classes=5))
>>> batch = {"image": torch.randn(2, 2, 100, 100), "label": torch.tensor([0, 3])}
>>> losses = model.loss(batch)
>>> sorted(k for k in losses if not k.startswith(("perplexity", "acc")))
['fc1', 'fc2', 'loss', 'recon1', 'recon2', 'vq1', 'vq2']
>>> enc = model.encode(batch["image"])
>>> tuple(enc.q2.shape), tuple(enc.idx2.shape), tuple(enc.q1.shape)
((2, 144, 4, 4), (2, 9, 4, 4), (2, 16, 25, 25))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protloc.errors import ConfigError, InputError
from protloc.nn.blocks import MBConvEncoder, ResidualDecoder, conv_output_size, fuse_batchnorm_
from protloc.nn.quantize import VectorQuantizer, VQOutput

__all__ = [
    "Cytoself",
    "CytoselfConfig",
    "CytoselfEncoding",
    "CytoselfLossWeights",
    "CytoselfOutput",
]

Stage = tuple[int, int, int, int, int]

# EfficientNet-B0 (Tan & Le 2019, Table 1) split in two (cytoself Supp. Fig. 9):
# (expand_ratio, kernel, stride, out_channels, repeats). Stage 5 of B0 has stride 1; cytoself uses
# stride 2 there so that encoder2 pools 25 -> 13 -> 7 -> 4.
PAPER_ENC1_STAGES: tuple[Stage, ...] = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 1, 40, 2))
PAPER_ENC2_STAGES: tuple[Stage, ...] = ((6, 3, 2, 80, 3), (6, 5, 2, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


@dataclass(frozen=True)
class CytoselfLossWeights:
    """Weights of the loss terms in the total (the paper gives none; the reference uses 1 everywhere)."""

    recon1: float = 1.0
    recon2: float = 1.0
    vq1: float = 1.0
    vq2: float = 1.0
    fc1: float = 1.0
    fc2: float = 1.0


@dataclass(frozen=True)
class CytoselfConfig:
    """Configuration of :class:`Cytoself`. Presets: :meth:`paper`, :meth:`small`, :meth:`tiny`, :meth:`reference_wide`.

    Attributes
    ----------
    channels
        Input channel names, in order (paper: protein + nuclear distance transform; Fig. 6 ablations:
        ``("protein",)``, ``("protein", "nucleus")``).
    input_size
        Side of the square input crop (paper: 100).
    num_classes
        Number of protein identities for the pretext task (paper: 1311).
    stem_channels
        Width of the 3x3 stem of both encoders (EfficientNet-B0: 32).
    enc1_stages, enc2_stages
        MBConv stages ``(expand_ratio, kernel, stride, out_channels, repeats)`` of encoder1 and encoder2.
    local_dim
        Channels of the local representation z1/q1 and code size of VQ1 (paper: 64).
    global_dim
        Channels of the global representation z2/q2 (paper: 576).
    global_split
        Number of sub-vectors per global vector for split quantization (paper: 9, codes of 576/9 = 64).
    split_quantization
        Use split quantization in VQ2 (False: codes of ``global_dim``, paper Fig. 6 ablation).
    codebook_size1, codebook_size2
        Codebook sizes of VQ1 and VQ2 (paper: 2048 each).
    commitment_cost
        VQ-VAE commitment weight beta.
    decoder1_width
        Hidden width of decoder1 after its input 1x1 convolution (TensorFlow cytoself: 64; the PyTorch
        reference: 640, about 50x the FLOPs, see :meth:`reference_wide`).
    decoder2_width
        Hidden width of decoder2 (default 64 like decoder1; the PyTorch reference keeps the 576 input
        width).
    decoder_min_width
        Smallest hidden width when decoders halve their width after each upsampling step.
    residual_layers
        Residual layers per upsampling step (VQ-VAE-2: 2).
    residual_second_kernel
        Kernel of the second convolution of each residual layer: 1 (VQ-VAE-2, default) or 3 (the PyTorch
        reference's two 3x3 convolutions).
    fc_hidden
        Hidden units of the two-layer perceptron heads fc1/fc2 (paper: 1000).
    use_fc
        Protein-identification pretext task (False: no fc1/fc2, paper Fig. 6 ablation).
    use_decoder
        Reconstruction pretext task (False: no decoders and no reconstruction losses).
    detach_recon2_target
        Stop gradients through z1 as the target of the decoder2 reconstruction (False = the reference:
        encoder1 also learns from that loss).
    drop_path
        Largest stochastic-depth rate of the MBConv blocks, ramped linearly over the blocks of both
        encoders as in EfficientNet (default 0: off).
    loss_weights
        Weights of the loss terms.
    """

    channels: tuple[str, ...] = ("protein", "nucleus_distance")
    input_size: int = 100
    num_classes: int = 1311
    stem_channels: int = 32
    enc1_stages: tuple[tuple[int, int, int, int, int], ...] = PAPER_ENC1_STAGES
    enc2_stages: tuple[tuple[int, int, int, int, int], ...] = PAPER_ENC2_STAGES
    local_dim: int = 64
    global_dim: int = 576
    global_split: int = 9
    split_quantization: bool = True
    codebook_size1: int = 2048
    codebook_size2: int = 2048
    commitment_cost: float = 0.25
    decoder1_width: int = 64
    decoder2_width: int = 64
    decoder_min_width: int = 16
    residual_layers: int = 2
    residual_second_kernel: int = 1
    fc_hidden: int = 1000
    use_fc: bool = True
    use_decoder: bool = True
    detach_recon2_target: bool = False
    drop_path: float = 0.0
    loss_weights: CytoselfLossWeights = field(default_factory=CytoselfLossWeights)

    def __post_init__(self) -> None:
        # Normalise sequences so that configs built from lists compare equal and stay hashable.
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "enc1_stages", tuple(tuple(s) for s in self.enc1_stages))
        object.__setattr__(self, "enc2_stages", tuple(tuple(s) for s in self.enc2_stages))
        if isinstance(self.loss_weights, dict):
            object.__setattr__(self, "loss_weights", CytoselfLossWeights(**self.loss_weights))

        if not self.channels or not all(isinstance(c, str) and c for c in self.channels):
            raise ConfigError(f"channels must be a non-empty list of channel names, got {self.channels!r}")
        if len(set(self.channels)) != len(self.channels):
            raise ConfigError(f"channels has duplicates: {self.channels!r}")
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int) or self.input_size < 16:
            raise ConfigError(f"input_size must be an integer >= 16, got {self.input_size!r}")
        positive = (
            "num_classes",
            "stem_channels",
            "local_dim",
            "global_dim",
            "global_split",
            "codebook_size1",
            "codebook_size2",
            "decoder1_width",
            "decoder2_width",
            "decoder_min_width",
            "fc_hidden",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.residual_layers < 0:
            raise ConfigError(f"residual_layers must be >= 0, got {self.residual_layers}")
        if self.residual_second_kernel not in (1, 3):
            raise ConfigError(f"residual_second_kernel must be 1 or 3, got {self.residual_second_kernel}")
        if self.commitment_cost < 0:
            raise ConfigError(f"commitment_cost must be >= 0, got {self.commitment_cost}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"drop_path must be in [0, 1), got {self.drop_path}")
        for name in ("enc1_stages", "enc2_stages"):
            stages = getattr(self, name)
            if not stages:
                raise ConfigError(f"{name} must have at least one stage")
            for i, stage in enumerate(stages):
                if len(stage) != 5 or not all(isinstance(v, int) and not isinstance(v, bool) for v in stage):
                    raise ConfigError(
                        f"{name}[{i}] must be 5 integers (expand, kernel, stride, out_channels, repeats), got {stage!r}"
                    )
                expand, kernel, stride, out, repeats = stage
                if expand < 1 or kernel < 1 or kernel % 2 == 0 or stride not in (1, 2) or out < 1 or repeats < 1:
                    raise ConfigError(
                        f"{name}[{i}] = {stage!r}: need expand >= 1, odd kernel, stride 1 or 2, out >= 1, repeats >= 1"
                    )
        if self.split_quantization and self.global_dim % self.global_split != 0:
            raise ConfigError(
                f"global_dim ({self.global_dim}) must be divisible by global_split ({self.global_split}) "
                "for split quantization"
            )

    # ---- presets -------------------------------------------------------------------------------------
    @classmethod
    def paper(cls, num_classes: int = 1311) -> CytoselfConfig:
        """The published configuration (Methods, Supp. Fig. 9): 2048 x 64 codebooks, split 9, decoder width 64.

        Residual layers use two 3x3 convolutions as the reference implementations do (about 2.2 GFLOP per
        image forward; the 3x3 + 1x1 VQ-VAE-2 variant, ``residual_second_kernel=1``, is 1.5 GFLOP).
        """
        return cls(num_classes=num_classes, residual_second_kernel=3)

    @classmethod
    def reference_wide(cls, num_classes: int = 1311) -> CytoselfConfig:
        """What the PyTorch reference runs: decoder1 640 wide, decoder2 576 wide, two 3x3 convs per residual layer.

        About 50x the forward FLOPs of :meth:`paper`, almost all of them in decoder1.
        """
        return cls(num_classes=num_classes, decoder1_width=640, decoder2_width=576, residual_second_kernel=3)

    @classmethod
    def tiny(cls, num_classes: int = 10) -> CytoselfConfig:
        """A small model for CPU tests and demos, with the paper's grids (local 25x25, global 4x4, split 9).

        Narrow one-block stages with the paper's strides, 16-d codes (global 9 x 16 = 144), 128-code
        codebooks, 128 hidden fc units, decoder1 16 wide (8 at 100x100), decoder2 32 wide. Trains at about
        120 images/s (batch 32) on a 2-core CPU. (No MBConv block here has a residual connection: every
        stage changes width or stride.)
        """
        return cls(
            num_classes=num_classes,
            stem_channels=16,
            enc1_stages=((1, 3, 1, 8, 1), (4, 3, 2, 16, 1), (4, 5, 1, 24, 1)),
            enc2_stages=((4, 3, 2, 32, 1), (4, 5, 2, 48, 1), (4, 5, 2, 64, 1), (4, 3, 1, 96, 1)),
            local_dim=16,
            global_dim=144,
            global_split=9,
            codebook_size1=128,
            codebook_size2=128,
            decoder1_width=16,
            decoder2_width=32,
            decoder_min_width=8,
            fc_hidden=128,
        )

    @classmethod
    def small(cls, num_classes: int = 1311) -> CytoselfConfig:
        """Between :meth:`tiny` and :meth:`paper`: about a fifth of the paper's FLOPs, for training on a CPU.

        EfficientNet-B0's expansion ratio 6 and kernels with fewer, narrower blocks (encoder1 16-24-40,
        encoder2 80-112-192-320), 32-d codes (global 9 x 32 = 288), 512-code codebooks, decoders 32
        and 64 wide, 512 hidden fc units: 15 M parameters (10 M of them in fc1), 0.46 GFLOP per image
        forward; trains at 34 images/s (batch 32, float32) on a 2-core AMD EPYC
        (``benchmarks/cytoself_speed.py``), about 55 with bf16 autocast on a 2-core AVX512-BF16 CPU.
        """
        return cls(
            num_classes=num_classes,
            stem_channels=24,
            enc1_stages=((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 1, 40, 1)),
            enc2_stages=((6, 3, 2, 80, 2), (6, 5, 2, 112, 1), (6, 5, 2, 192, 2), (6, 3, 1, 320, 1)),
            local_dim=32,
            global_dim=288,
            global_split=9,
            codebook_size1=512,
            codebook_size2=512,
            decoder1_width=32,
            decoder2_width=64,
            decoder_min_width=16,
            fc_hidden=512,
        )

    # ---- derived shapes ------------------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        """Number of input channels, ``len(channels)``."""
        return len(self.channels)

    def _pool(self, size: int, strides: list[int]) -> tuple[int, list[int]]:
        """Size after ``strides``, and the sizes from which each stride-2 step starts."""
        before = []
        for s in strides:
            if s == 2:
                before.append(size)
            size = conv_output_size(size, stride=s)
        return size, before

    def _enc1_strides(self) -> list[int]:
        return [2] + [s[2] for s in self.enc1_stages]  # stem stride 2

    def _enc2_strides(self) -> list[int]:
        return [1] + [s[2] for s in self.enc2_stages]  # stem stride 1

    @property
    def local_grid(self) -> int:
        """Side of the local representation (paper: 25)."""
        return self._pool(self.input_size, self._enc1_strides())[0]

    @property
    def global_grid(self) -> int:
        """Side of the global representation (paper: 4)."""
        return self._pool(self.local_grid, self._enc2_strides())[0]

    @property
    def local_shape(self) -> tuple[int, int, int]:
        """``(local_dim, g, g)`` of z1/q1."""
        return (self.local_dim, self.local_grid, self.local_grid)

    @property
    def global_shape(self) -> tuple[int, int, int]:
        """``(global_dim, g, g)`` of z2/q2."""
        return (self.global_dim, self.global_grid, self.global_grid)

    @property
    def vq2_split(self) -> int:
        """Sub-vectors per global vector (1 without split quantization)."""
        return self.global_split if self.split_quantization else 1

    @property
    def vq2_dim(self) -> int:
        """Code dimension of VQ2."""
        return self.global_dim // self.vq2_split

    @property
    def decoder1_sizes(self) -> list[tuple[int, int]]:
        """Upsampling targets of decoder1, undoing encoder1's stride-2 steps (paper: 50, 100)."""
        before = self._pool(self.input_size, self._enc1_strides())[1]
        return [(s, s) for s in reversed(before)]

    @property
    def decoder2_sizes(self) -> list[tuple[int, int]]:
        """Upsampling targets of decoder2, undoing encoder2's stride-2 steps (paper: 7, 13, 25)."""
        before = self._pool(self.local_grid, self._enc2_strides())[1]
        # Without downsampling in encoder2 one constant-size step still gives decoder2 its residual layers.
        return [(s, s) for s in reversed(before)] or [(self.local_grid, self.local_grid)]

    def replace(self, **changes: object) -> CytoselfConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


class CytoselfOutput(NamedTuple):
    """Everything :meth:`Cytoself.forward` computes; parts an ablation removes are ``None``.

    Attributes
    ----------
    reconstruction
        ``[B, C, S, S]`` decoder1 output (``None`` without decoders).
    reconstruction2
        ``[B, local_dim, g1, g1]`` decoder2 output, compared with z1 (``None`` without decoders).
    z1, z2
        Pre-quantization encoder outputs ``[B, local_dim, g1, g1]``, ``[B, global_dim, g2, g2]``.
    q1, q2
        Quantized local and global representations (straight-through while training).
    idx1, idx2
        Code indices ``[B, 1, g1, g1]`` and ``[B, split, g2, g2]``.
    logits1, logits2
        ``[B, num_classes]`` protein-ID logits of fc1/fc2 (``None`` without the fc heads).
    vq1, vq2
        The full :class:`~protloc.nn.quantize.VQOutput` of each quantizer.
    """

    reconstruction: Tensor | None
    reconstruction2: Tensor | None
    z1: Tensor
    z2: Tensor
    q1: Tensor
    q2: Tensor
    idx1: Tensor
    idx2: Tensor
    logits1: Tensor | None
    logits2: Tensor | None
    vq1: VQOutput
    vq2: VQOutput


class CytoselfEncoding(NamedTuple):
    """Eval-mode encodings from :meth:`Cytoself.encode`.

    Attributes
    ----------
    q1
        Local representation ``[B, local_dim, g1, g1]`` (exact codebook vectors).
    q2
        Global representation ``[B, global_dim, g2, g2]`` (exact codebook vectors), the one the paper
        clusters and embeds with UMAP.
    idx1, idx2
        Code indices ``[B, 1, g1, g1]`` and ``[B, split, g2, g2]`` (feature spectra use ``idx1``).
    z1, z2
        Pre-quantization encoder outputs.
    """

    q1: Tensor
    q2: Tensor
    idx1: Tensor
    idx2: Tensor
    z1: Tensor
    z2: Tensor


def _classifier(in_features: int, hidden: int, num_classes: int) -> nn.Sequential:
    # Paper Methods: "a 2-layer perceptron ... fully connected layers with 1000 hidden units and ReLU".
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
    )


class Cytoself(nn.Module):
    """The cytoself model: EfficientNet encoders, two (split) vector quantizers, residual decoders, fc heads.

    Parameters
    ----------
    config
        Model configuration; stored as ``self.config``.

    Notes
    -----
    Weights use PyTorch's default initialisation except the codebooks (uniform in ``+-sqrt(3 / K)``).
    The model holds no optimizer and does no logging.

    Images are converted to channels-last memory layout on entry (``self.channels_last``, default True):
    on CPU this makes the depthwise convolutions of the MBConv blocks 3-10x faster in backward. Outputs
    are the same tensors up to their strides.
    """

    def __init__(self, config: CytoselfConfig):
        super().__init__()
        self.config = c = config
        self.channels_last = True
        n1 = sum(s[4] for s in c.enc1_stages)
        n2 = sum(s[4] for s in c.enc2_stages)
        # EfficientNet ramps the stochastic-depth rate linearly over all blocks; encoder1 + encoder2 = B0.
        rates = [c.drop_path * i / (n1 + n2) for i in range(n1 + n2)]

        self.encoder1 = MBConvEncoder(
            c.in_channels,
            c.local_dim,
            stem_channels=c.stem_channels,
            stem_stride=2,
            stages=c.enc1_stages,
            drop_path=rates[:n1],
        )
        self.vq1 = VectorQuantizer(
            codebook_size=c.codebook_size1, dim=c.local_dim, split=1, commitment_cost=c.commitment_cost
        )
        self.encoder2 = MBConvEncoder(
            c.local_dim,
            c.global_dim,
            stem_channels=c.stem_channels,
            stem_stride=1,
            stages=c.enc2_stages,
            drop_path=rates[n1:],
        )
        self.vq2 = VectorQuantizer(
            codebook_size=c.codebook_size2, dim=c.vq2_dim, split=c.vq2_split, commitment_cost=c.commitment_cost
        )

        self.decoder1: ResidualDecoder | None = None
        self.decoder2: ResidualDecoder | None = None
        if c.use_decoder:
            common = dict(
                residual_layers=c.residual_layers,
                min_width=c.decoder_min_width,
                linear_output=True,
                second_kernel_size=c.residual_second_kernel,
            )
            # decoder2's linear output conv is the paper's "mselyr1" (adapts to z1's 64 channels).
            self.decoder2 = ResidualDecoder(
                c.global_dim, c.decoder2_width, c.local_dim, sizes=c.decoder2_sizes, **common
            )
            self.decoder1 = ResidualDecoder(
                c.local_dim + c.global_dim, c.decoder1_width, c.in_channels, sizes=c.decoder1_sizes, **common
            )

        self.fc1: nn.Sequential | None = None
        self.fc2: nn.Sequential | None = None
        if c.use_fc:
            g1, g2 = c.local_grid, c.global_grid
            self.fc1 = _classifier(c.local_dim * g1 * g1, c.fc_hidden, c.num_classes)  # 64*25*25 = 40000 -> 1000
            self.fc2 = _classifier(c.global_dim * g2 * g2, c.fc_hidden, c.num_classes)  # 576*4*4 = 9216 -> 1000

    # ---- helpers -------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        c = self.config
        expected = (c.in_channels, c.input_size, c.input_size)
        if not isinstance(x, Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != expected:
            got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InputError(
                f"cytoself expects images [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(channels {', '.join(c.channels)}), got {got}"
            )
        if not x.is_floating_point():
            raise InputError(f"cytoself expects floating-point images, got dtype {x.dtype}")

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def num_parameters(self, *, trainable_only: bool = False) -> int:
        """Number of parameters (optionally only those with ``requires_grad``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per top-level part (encoder1, vq1, encoder2, vq2, decoder1/2, fc1/2)."""
        return {name: sum(p.numel() for p in module.parameters()) for name, module in self.named_children()}

    # ---- model ---------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> CytoselfOutput:
        """Run the whole model on images ``x`` ``[B, C, S, S]``; see :class:`CytoselfOutput`."""
        self._check_input(x)
        x = self._layout(x)
        z1 = self.encoder1(x)  # [B, 64, 25, 25]
        vq1 = self.vq1(z1)  # q1 [B, 64, 25, 25], idx1 [B, 1, 25, 25]
        # Paper Methods: encoder1's latent vectors "have two destinations: encoder2 and VQ1", so encoder2
        # reads the unquantized z1.
        z2 = self.encoder2(z1)  # [B, 576, 4, 4]
        vq2 = self.vq2(z2)  # q2 [B, 576, 4, 4], idx2 [B, 9, 4, 4]
        q1, q2 = vq1.quantized, vq2.quantized

        recon = recon2 = None
        if self.decoder1 is not None and self.decoder2 is not None:
            recon2 = self.decoder2(q2)  # [B, 64, 25, 25], compared with z1
            recon = self.decode(q1, q2)  # [B, C, 100, 100]
        logits1 = logits2 = None
        if self.fc1 is not None and self.fc2 is not None:
            logits1 = self._head(self.fc1, q1)  # [B, num_classes]
            logits2 = self._head(self.fc2, q2)
        return CytoselfOutput(recon, recon2, z1, z2, q1, q2, vq1.indices, vq2.indices, logits1, logits2, vq1, vq2)

    @staticmethod
    def _head(head: nn.Module, q: Tensor) -> Tensor:
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # Under CPU autocast the 40,000 x 1,000 fc1 weight (paper) would be cast to bf16 and its
            # gradient back every step, which costs more than the float32 product saves (9% of a step).
            with torch.autocast("cpu", enabled=False):
                return head(q.float())
        return head(q)

    def decode(self, q1: Tensor, q2: Tensor) -> Tensor:
        """decoder1 on the local ``q1`` ``[B, 64, 25, 25]`` and global ``q2`` ``[B, 576, 4, 4]`` -> ``[B, C, S, S]``.

        q2 is resized (nearest) to q1's grid and concatenated along channels (paper Methods). Use it to
        decode edited representations (e.g. with features zeroed, paper Fig. 5).
        """
        if self.decoder1 is None:
            raise RuntimeError("this cytoself model has no decoder (config.use_decoder is False)")
        c = self.config
        if q1.ndim != 4 or tuple(q1.shape[1:]) != c.local_shape:
            raise InputError(f"decode expects q1 [B, {', '.join(map(str, c.local_shape))}], got {list(q1.shape)}")
        if q2.ndim != 4 or tuple(q2.shape[1:]) != c.global_shape:
            raise InputError(f"decode expects q2 [B, {', '.join(map(str, c.global_shape))}], got {list(q2.shape)}")
        if torch.is_autocast_enabled(q1.device.type):
            # Cast the (float32) codes before upsampling and concatenating, not the 640-channel result.
            dtype = torch.get_autocast_dtype(q1.device.type)
            q1, q2 = q1.to(dtype), q2.to(dtype)
        q2_up = F.interpolate(q2, size=q1.shape[-2:], mode="nearest")  # [B, 576, 25, 25]
        return self.decoder1(torch.cat([q1, q2_up.to(q1.dtype)], dim=1))  # [B, 640, 25, 25] -> [B, C, S, S]

    def decode_indices(self, idx1: Tensor, idx2: Tensor) -> Tensor:
        """Decode stored code indices ``idx1`` ``[B, 1, g1, g1]`` and ``idx2`` ``[B, split, g2, g2]`` to images."""
        return self.decode(self.vq1.lookup(idx1), self.vq2.lookup(idx2))

    @torch.no_grad()
    def fuse_for_inference(self) -> Cytoself:
        """Fold BatchNorm layers into their convolutions for faster eval-mode inference (in place).

        Encodings and decodings are unchanged up to float rounding; the model can no longer be trained
        (``train()`` raises). Used by ``protloc embed``.
        """
        self.eval()
        fuse_batchnorm_(self)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        self._inference_only = True
        return self

    def train(self, mode: bool = True) -> Cytoself:
        if mode and getattr(self, "_inference_only", False):
            raise RuntimeError("this model was fused for inference (fuse_for_inference); reload it to train")
        return super().train(mode)

    @torch.no_grad()
    def encode(self, x: Tensor) -> CytoselfEncoding:
        """Embeddings of images ``x`` ``[B, C, S, S]``, always computed in eval mode.

        The module is switched to eval mode for the call (BatchNorm running statistics, no stochastic
        depth) and switched back afterwards, so a crop's encoding does not depend on the other crops of
        its batch (the PyTorch reference extracts embeddings in train mode, where it does).
        """
        self._check_input(x)
        x = self._layout(x)
        was_training = self.training
        self.eval()
        try:
            z1 = self.encoder1(x)
            vq1 = self.vq1(z1)
            z2 = self.encoder2(z1)
            vq2 = self.vq2(z2)
        finally:
            self.train(was_training)
        return CytoselfEncoding(vq1.quantized, vq2.quantized, vq1.indices, vq2.indices, z1, z2)

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Losses and metrics for a batch ``{"image": [B, C, S, S] float, "label": [B] int64}``.

        Returns
        -------
        dict
            ``"loss"``: the weighted total to minimise; unweighted terms ``"recon1"`` (MSE of decoder1 vs
            the image), ``"recon2"`` (MSE of decoder2 vs z1), ``"vq1"``, ``"vq2"`` (VQ-VAE losses),
            ``"fc1"``, ``"fc2"`` (protein-ID cross-entropy); detached metrics ``"perplexity1"``,
            ``"perplexity2"``, ``"acc1"``, ``"acc2"``. Terms of parts an ablation removes are absent
            (no ``recon*`` without decoders, no ``fc*``/``acc*`` without fc heads). ``"label"`` is only
            needed with fc heads.
        """
        c = self.config
        x = batch["image"]
        out = self(x)
        w = c.loss_weights
        terms: dict[str, Tensor] = {"vq1": out.vq1.loss, "vq2": out.vq2.loss}
        if out.reconstruction is not None and out.reconstruction2 is not None:
            terms["recon1"] = F.mse_loss(out.reconstruction.float(), x.float())
            target = out.z1.detach() if c.detach_recon2_target else out.z1
            terms["recon2"] = F.mse_loss(out.reconstruction2.float(), target.float())
        metrics: dict[str, Tensor] = {"perplexity1": out.vq1.perplexity, "perplexity2": out.vq2.perplexity}
        if out.logits1 is not None and out.logits2 is not None:
            if "label" not in batch:
                raise InputError('batch has no "label": the protein-ID heads (use_fc) need one per image')
            label = batch["label"]
            if label.shape != (x.shape[0],) or label.is_floating_point():
                raise InputError(f"label must be integer [B={x.shape[0]}], got {label.dtype} {list(label.shape)}")
            label = label.long()
            for i, logits in ((1, out.logits1), (2, out.logits2)):
                terms[f"fc{i}"] = F.cross_entropy(logits.float(), label)
                metrics[f"acc{i}"] = (logits.detach().argmax(1) == label).float().mean()
        total = sum(getattr(w, k) * v for k, v in terms.items())
        ordered = {"loss": total}
        for k in ("recon1", "recon2", "vq1", "vq2", "fc1", "fc2"):
            if k in terms:
                ordered[k] = terms[k]
        ordered.update({k: v.detach() for k, v in metrics.items()})
        return ordered

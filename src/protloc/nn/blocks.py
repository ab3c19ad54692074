"""Convolutional building blocks: EfficientNet MBConv encoders and residual upsampling decoders.

cytoself (Kobayashi et al., Methods "Model architecture", Supp. Fig. 9) splits EfficientNet-B0 (Tan & Le
2019) in two to build its encoders, and decodes with "a stack of residual blocks" (VQ-VAE-2). All
convolutions use 'same'-style padding ``k // 2``, so a stride-2 convolution maps ``n`` to ``ceil(n / 2)``
(100 -> 50 -> 25 -> 13 -> 7 -> 4). Activation is SiLU (swish) throughout, as in EfficientNet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "fuse_batchnorm_",
    "ConvBNAct",
    "DropPath",
    "MBConv",
    "MBConvEncoder",
    "ResidualDecoder",
    "ResidualLayer",
    "ResidualStack",
    "SqueezeExcite",
    "conv_output_size",
]


def conv_output_size(size: int, *, stride: int) -> int:
    """Spatial size after a 'same'-padded (``k // 2``, odd ``k``) convolution: ``ceil(size / stride)``."""
    return -(-size // stride)


class ConvBNAct(nn.Sequential):
    """Convolution (no bias) -> BatchNorm -> SiLU (optional).

    Parameters
    ----------
    in_channels, out_channels
        Channel counts.
    kernel_size
        Odd kernel size; padding is ``kernel_size // 2``.
    stride
        Convolution stride.
    groups
        Convolution groups (``in_channels`` for a depthwise convolution).
    act
        Apply SiLU after the BatchNorm.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
    ):
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
        ]
        if act:
            layers.append(nn.SiLU(inplace=True))
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) as in EfficientNet: global pool -> 1x1 -> SiLU -> 1x1 -> sigmoid.

    Parameters
    ----------
    channels
        Channels of the feature map being gated.
    squeeze_channels
        Bottleneck width (EfficientNet: 0.25 x the MBConv block's *input* channels).
    """

    def __init__(self, channels: int, *, squeeze_channels: int):
        super().__init__()
        # Linear layers on the pooled [B, C] vector: the same maps as 1x1 convolutions on [B, C, 1, 1],
        # without the per-call overhead of a convolution (large on CPU for 1x1 spatial inputs).
        self.reduce = nn.Linear(channels, squeeze_channels)
        self.expand = nn.Linear(squeeze_channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3))  # [B, C]
        s = torch.sigmoid(self.expand(F.silu(self.reduce(s))))  # [B, C]
        return x * s[:, :, None, None]


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop a residual branch per sample while training.

    Parameters
    ----------
    p
        Drop probability; kept branches are scaled by ``1 / (1 - p)``. Identity in eval mode or when 0.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MBConv(nn.Module):
    """EfficientNet-B0 inverted residual block (MobileNetV2 + squeeze-excite).

    1x1 expand (skipped when ``expand_ratio == 1``) -> depthwise ``kernel_size`` conv with ``stride`` ->
    squeeze-excite -> 1x1 linear projection; BatchNorm after every convolution, SiLU after all but the
    projection. Residual connection (with optional stochastic depth) when ``stride == 1`` and
    ``in_channels == out_channels``.

    Parameters
    ----------
    in_channels, out_channels
        Channel counts.
    expand_ratio
        Width multiplier of the hidden (depthwise) layer (EfficientNet-B0: 1 or 6).
    kernel_size
        Depthwise kernel size (3 or 5).
    stride
        Depthwise stride (1 or 2).
    se_ratio
        Squeeze-excite bottleneck as a fraction of ``in_channels`` (EfficientNet: 0.25).
    drop_path
        Stochastic depth probability of the residual branch (default 0: off).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        expand_ratio: int,
        kernel_size: int,
        stride: int,
        se_ratio: float = 0.25,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"MBConv stride must be 1 or 2, got {stride}")
        if expand_ratio < 1:
            raise ValueError(f"expand_ratio must be >= 1, got {expand_ratio}")
        hidden = in_channels * expand_ratio
        self.expand = ConvBNAct(in_channels, hidden, kernel_size=1) if expand_ratio != 1 else nn.Identity()
        self.depthwise = ConvBNAct(hidden, hidden, kernel_size=kernel_size, stride=stride, groups=hidden)
        self.se = SqueezeExcite(hidden, squeeze_channels=max(1, int(in_channels * se_ratio)))
        self.project = ConvBNAct(hidden, out_channels, kernel_size=1, act=False)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_path = DropPath(drop_path) if self.use_residual else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        if self.use_residual:
            y = self.drop_path(y) + x
        return y


class MBConvEncoder(nn.Module):
    """Stem convolution -> stages of :class:`MBConv` blocks -> 1x1 head (a slice of EfficientNet-B0).

    Parameters
    ----------
    in_channels
        Input channels.
    out_channels
        Channels of the 1x1 ConvBNAct head (cytoself: 64 for encoder1, 576 for encoder2).
    stem_channels
        Width of the 3x3 ConvBNAct stem.
    stem_stride
        Stride of the stem (cytoself: 2 for encoder1, 1 for encoder2).
    stages
        ``(expand_ratio, kernel_size, stride, out_channels, repeats)`` per stage (EfficientNet-B0 Table 1);
        only the first block of a stage has the stage's stride.
    drop_path
        Stochastic depth probability, one per block (``sum(repeats)`` values) or one for all.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stem_channels: int,
        stem_stride: int,
        stages: Sequence[tuple[int, int, int, int, int]],
        drop_path: Sequence[float] | float = 0.0,
    ):
        super().__init__()
        n_blocks = sum(stage[4] for stage in stages)
        rates = [float(drop_path)] * n_blocks if isinstance(drop_path, int | float) else list(drop_path)
        if len(rates) != n_blocks:
            raise ValueError(f"drop_path needs one value per block ({n_blocks}), got {len(rates)}")
        self.stem = ConvBNAct(in_channels, stem_channels, kernel_size=3, stride=stem_stride)
        blocks: list[nn.Module] = []
        width = stem_channels
        for expand, kernel, stride, out, repeats in stages:
            for r in range(repeats):
                blocks.append(
                    MBConv(
                        width,
                        out,
                        expand_ratio=expand,
                        kernel_size=kernel,
                        stride=stride if r == 0 else 1,
                        drop_path=rates[len(blocks)],
                    )
                )
                width = out
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNAct(width, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


class ResidualLayer(nn.Module):
    """Pre-activation residual layer at constant width (VQ-VAE / VQ-VAE-2 decoder style).

    ``x + BN(conv_b(act(BN(conv3x3(act(x))))))`` with ``conv_b`` a 1x1 convolution (VQ-VAE-2) or, with
    ``second_kernel_size=3``, a second 3x3 convolution (the cytoself PyTorch reference's residual unit).

    Parameters
    ----------
    channels
        Input, hidden and output width.
    second_kernel_size
        Kernel of the second convolution: 1 (default) or 3.
    """

    def __init__(self, channels: int, *, second_kernel_size: int = 1):
        super().__init__()
        if second_kernel_size % 2 != 1:
            raise ValueError(f"second_kernel_size must be odd, got {second_kernel_size}")
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, second_kernel_size, padding=second_kernel_size // 2, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn1(self.conv1(F.silu(x)))
        y = self.bn2(self.conv2(F.silu(y)))
        return x + y


class ResidualStack(nn.Sequential):
    """``num_layers`` :class:`ResidualLayer` at constant width.

    Parameters
    ----------
    channels
        Width.
    num_layers
        Number of residual layers (cytoself/VQ-VAE-2: 2).
    second_kernel_size
        See :class:`ResidualLayer`.
    """

    def __init__(self, channels: int, *, num_layers: int, second_kernel_size: int = 1):
        super().__init__(*(ResidualLayer(channels, second_kernel_size=second_kernel_size) for _ in range(num_layers)))


class _Upsample(nn.Module):
    """Bilinear resize to an exact target size (so odd sizes such as 4 -> 7 -> 13 -> 25 come out exactly)."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class ResidualDecoder(nn.Module):
    """Upsampling decoder built from residual stacks (cytoself decoder1 / decoder2).

    ``1x1 ConvBNAct(in_channels -> width)``, then for each target size: bilinear upsample to that size,
    ``residual_layers`` residual layers at the current width, and a 1x1 ConvBNAct that halves the width
    (never below ``min_width``); finally a 1x1 convolution to ``out_channels`` (plain and linear when
    ``linear_output``, else followed by BN + SiLU).

    Parameters
    ----------
    in_channels
        Channels of the input feature map.
    width
        Hidden width after the input projection (halved after every upsampling step).
    out_channels
        Output channels.
    sizes
        Target ``(H, W)`` of each upsampling step, in order (e.g. ``[(50, 50), (100, 100)]``).
    residual_layers
        Residual layers per step.
    min_width
        Lower bound of the hidden width.
    linear_output
        Plain linear output convolution (reconstructions, cytoself's ``mselyr1``).
    second_kernel_size
        Kernel of the second convolution of each residual layer (see :class:`ResidualLayer`).
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        out_channels: int,
        *,
        sizes: Sequence[tuple[int, int]],
        residual_layers: int = 2,
        min_width: int = 16,
        linear_output: bool = True,
        second_kernel_size: int = 1,
    ):
        super().__init__()
        if not sizes:
            raise ValueError("ResidualDecoder needs at least one target size")
        self.sizes = [(int(h), int(w)) for h, w in sizes]
        self.input = ConvBNAct(in_channels, width, kernel_size=1)
        steps = []
        w = width
        for size in self.sizes:
            w_next = max(min_width, w // 2)
            steps.append(
                nn.Sequential(
                    _Upsample(size),
                    ResidualStack(w, num_layers=residual_layers, second_kernel_size=second_kernel_size),
                    ConvBNAct(w, w_next, kernel_size=1),
                )
            )
            w = w_next
        self.steps = nn.Sequential(*steps)
        self.output = nn.Conv2d(w, out_channels, 1) if linear_output else ConvBNAct(w, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.steps(self.input(x)))


def fuse_batchnorm_(module: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d into that convolution, in place.

    Used for inference only (embedding, prediction): in eval mode a BatchNorm is an affine map of
    the convolution's output, so folding it into the weights gives the same result (to float rounding)
    without the extra pass over the activations -- about a fifth of cytoself's embedding time on CPU.
    Covers :class:`ConvBNAct` (and any ``Sequential`` with adjacent conv/BN) and :class:`ResidualLayer`.

    Parameters
    ----------
    module
        The model, in eval mode.

    Returns
    -------
    int
        Number of BatchNorm layers folded.
    """
    if module.training:
        raise RuntimeError("fuse_batchnorm_ needs a model in eval mode (BatchNorm running statistics)")
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    n = 0
    for sub in list(module.modules()):
        if isinstance(sub, nn.Sequential):
            names = list(sub._modules)
            for a, b in zip(names, names[1:], strict=False):
                conv, bn = sub._modules[a], sub._modules[b]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    sub._modules[a] = fuse_conv_bn_eval(conv, bn)
                    sub._modules[b] = nn.Identity()
                    n += 1
        elif isinstance(sub, ResidualLayer):
            for c, b in (("conv1", "bn1"), ("conv2", "bn2")):
                conv, bn = getattr(sub, c), getattr(sub, b)
                if isinstance(bn, nn.BatchNorm2d):
                    setattr(sub, c, fuse_conv_bn_eval(conv, bn))
                    setattr(sub, b, nn.Identity())
                    n += 1
    return n

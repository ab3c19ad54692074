"""Weight-only int8 linear layers for fast CPU decoding.

A CELL-E decoding step multiplies one token by every weight of the transformer: it is bound by the
memory traffic of the weights (1.3 GB in fp32 at the paper size), not by arithmetic. Storing the
weights as int8 with one scale per output channel (symmetric, ``w ~ q * s``, ``q`` in -127..127) reads a
quarter of the bytes. Activations stay in floating point (bf16 by default):

- a few rows (decoding steps): ``torch._weight_int8pack_mm``, PyTorch's fused int8-weight kernel, where
  the device has it;
- many rows (the prompt, training-style passes) or no fused kernel: the weight is dequantised to the
  activations' dtype for that call (a per-layer copy, small next to the product).

The rounding error is at most half a step of each channel's scale, ``max|w| / 254``; the tests bound its
effect on CELL-E's token probabilities.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Int8Linear", "quantize_linears"]

logger = logging.getLogger(__name__)

#: Rows up to which the fused int8 kernel is used (measured on a 2-core AVX-512 CPU: it beats bf16 at
#: one row, 2x fewer bytes, and loses from about 8 rows, where the product is no longer memory-bound).
FUSED_MAX_ROWS = 4


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights and per-output-channel scales (inference only).

    Parameters
    ----------
    linear
        The layer to quantise (its weights are copied; it is left unchanged).
    dtype
        Floating dtype of the activations, scales and bias (default bfloat16).
    """

    def __init__(self, linear: nn.Linear, *, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # [out]
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))
        self.fused = True

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """The weight ``[out, in]`` back in floating point."""
        return self.weight_int8.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.scale.dtype)
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        out = None
        if self.fused and rows.shape[0] <= FUSED_MAX_ROWS:
            try:
                out = torch._weight_int8pack_mm(rows.contiguous(), self.weight_int8, self.scale)
            except (AttributeError, RuntimeError, NotImplementedError) as err:  # no fused kernel here
                logger.debug("int8 fused kernel unavailable (%s); dequantising instead", err)
                self.fused = False
        if out is None:
            out = F.linear(rows, self.dequantized(rows.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_linears(module: nn.Module, *, dtype: torch.dtype = torch.bfloat16, skip: tuple[str, ...] = ()) -> int:
    """Replace every ``nn.Linear`` under ``module`` (in place) by an :class:`Int8Linear`.

    Parameters
    ----------
    module
        Model to convert (e.g. the CELL-E transformer's blocks).
    dtype
        Activation dtype of the converted layers.
    skip
        Qualified names of layers to leave as they are.

    Returns
    -------
    int
        Number of layers converted.
    """
    n = 0
    for name, child in list(module.named_children()):
        if name in skip:
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child, dtype=dtype))
            n += 1
        else:
            prefix = name + "."
            inner = tuple(s[len(prefix) :] for s in skip if s.startswith(prefix))
            n += quantize_linears(child, dtype=dtype, skip=inner)
    return n

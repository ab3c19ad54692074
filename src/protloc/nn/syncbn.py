"""BatchNorm whose batch statistics span every data-parallel process.

With ``N`` processes each seeing ``B / N`` crops, an ordinary BatchNorm normalises each process's share
by its own mean and variance, so an ``N``-process run is not the single-process run with batch ``B`` it
is meant to be (cytoself's encoders and decoders are full of BatchNorm). PyTorch's
:class:`torch.nn.SyncBatchNorm` fixes this on GPUs only: its forward refuses CPU tensors. protloc's
:class:`SyncBatchNorm2d` computes the same global statistics and gradients with one small all-reduce
forward and one backward, in plain PyTorch, so it works on any device and backend (gloo on CPU
included); :func:`convert_sync_batchnorm` uses PyTorch's layer on CUDA and this one elsewhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SyncBatchNorm2d", "convert_sync_batchnorm"]


def _world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _SyncBatchNorm(torch.autograd.Function):
    """BatchNorm over the union of every process's batch, with one all-reduce forward and one backward.

    Forward: each process's per-channel count, sum and sum of squares about its own mean (from
    :func:`torch.var_mean`, accurate) are combined in float64 into the global mean and biased variance
    (Chan et al.'s parallel variance), and the input is normalised with PyTorch's fused eval-mode
    batch norm. Backward: the textbook BatchNorm input gradient with the per-channel means of ``dy`` and
    ``dy * x_hat`` taken over all processes; the weight and bias gradients are this process's sums,
    which data-parallel training averages like any other parameter's.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):  # type: ignore[override]
        c = x.shape[1]
        var_l, mean_l = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        n_l = x.numel() // c
        mean_l, var_l = mean_l.double(), var_l.double()
        packed = torch.cat([mean_l * n_l, (var_l + mean_l.square()) * n_l, mean_l.new_full((1,), float(n_l))])
        dist.all_reduce(packed)
        n = packed[-1]
        mean = packed[:c] / n
        var = (packed[c : 2 * c] / n - mean.square()).clamp_min(0)
        mean32, var32 = mean.to(x.dtype), var.to(x.dtype)
        y = F.batch_norm(x, mean32, var32, weight, bias, False, 0.0, eps)
        invstd = torch.rsqrt(var32 + eps)
        ctx.save_for_backward(x, weight, mean32, invstd)
        ctx.n = float(n)
        n_out = n.to(x.dtype)
        ctx.mark_non_differentiable(mean32, var32, n_out)
        return y, mean32, var32, n_out

    @staticmethod
    def backward(ctx, dy: Tensor, *_unused: Tensor):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        sum_dy = dy.sum(dim=(0, 2, 3))
        sum_dy_xhat = invstd * ((dy * x).sum(dim=(0, 2, 3)) - mean * sum_dy)
        grad_weight = sum_dy_xhat.clone() if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.clone() if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            both = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(both)
            mean_dy, mean_dy_xhat = both[:c] / ctx.n, both[c:] / ctx.n
            k = invstd if weight is None else invstd * weight
            # dx = k (dy - mean(dy) - x_hat mean(dy x_hat)), with x_hat = (x - mean) invstd
            scale_x = -k * invstd * mean_dy_xhat
            shift = -k * mean_dy - scale_x * mean
            grad_x = dy * k[None, :, None, None] + x * scale_x[None, :, None, None] + shift[None, :, None, None]
        return grad_x, grad_weight, grad_bias, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` with batch statistics over all processes of the default group.

    In training mode with more than one process, the mean and the (biased) variance are those of the
    union of every process's batch, and the input gradient accounts for every process's share of them
    (one small all-reduce forward, one backward, as PyTorch's CUDA-only :class:`~torch.nn.SyncBatchNorm`
    does). The running statistics are updated with the global values (unbiased variance), identically
    on every process. In eval mode, or with one process, it is exactly :class:`torch.nn.BatchNorm2d`;
    the state dict is the same, so checkpoints load into either.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _world() > 1):
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        dtype = x.dtype
        x = x.float()
        weight = self.weight.float() if self.affine else None
        bias = self.bias.float() if self.affine else None
        y, mean, var, n = _SyncBatchNorm.apply(x, weight, bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        return y.to(dtype)


def convert_sync_batchnorm(module: nn.Module, *, device: torch.device | str | None = None) -> nn.Module:
    """Replace every :class:`torch.nn.BatchNorm2d` of ``module`` by a synchronised one (in place).

    A module trained on CUDA gets :class:`torch.nn.SyncBatchNorm` (PyTorch's fused kernels), one trained
    on any other device :class:`SyncBatchNorm2d`. The same parameter and buffer objects are kept, so
    the state dict keys do not change and an optimizer built before still holds the parameters.

    Parameters
    ----------
    module
        The model.
    device
        The device it will train on (default: that of its parameters).

    Returns
    -------
    torch.nn.Module
        ``module`` (or its replacement when it is itself a BatchNorm).
    """
    if device is None:
        on_cuda = any(p.is_cuda for p in module.parameters())
    else:
        on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        new = SyncBatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        # the same Parameter and buffer objects: an optimizer built before the conversion keeps working
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = _convert(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module

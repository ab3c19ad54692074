"""BatchNorm whose batch statistics span every data-parallel process.

With ``N`` processes each seeing ``B / N`` crops, an ordinary BatchNorm normalises each process's share
by its own mean and variance, so an ``N``-process run is not the single-process run with batch ``B`` it
is meant to be (cytoself's encoders and decoders are full of BatchNorm). PyTorch's
:class:`torch.nn.SyncBatchNorm` fixes this on GPUs only: its forward refuses CPU tensors. protloc's
:class:`SyncBatchNorm2d` computes the same global statistics with two differentiable all-reduces
(:func:`torch.distributed.nn.functional.all_reduce`), so it works on any device and backend (gloo on
CPU included); :func:`convert_sync_batchnorm` uses PyTorch's layer on CUDA and this one elsewhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["SyncBatchNorm2d", "convert_sync_batchnorm"]


def _world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class SyncBatchNorm2d(nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` with batch statistics over all processes of the default group.

    In training mode with more than one process, the mean and the (biased) variance are those of the
    union of every process's batch: the mean from an all-reduce of ``[sum, count]``, then the variance
    from an all-reduce of the squared deviations from it (two passes, as numerically careful as a
    single-process BatchNorm). Gradients flow through both all-reduces. The running statistics are
    updated with the global values (unbiased variance), identically on every process. In eval mode, or
    with one process, it is exactly :class:`torch.nn.BatchNorm2d`; the state dict is the same, so
    checkpoints load into either.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _world() > 1):
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()
        count = torch.full((1,), x.numel() // c, dtype=torch.float32, device=x.device)
        total = all_reduce(torch.cat([xf.sum(dim=(0, 2, 3)), count]))
        n = total[c]
        mean = total[:c] / n
        centred = xf - mean[None, :, None, None]
        var = all_reduce(centred.square().sum(dim=(0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


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

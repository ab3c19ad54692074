"""Vector quantization (VQ-VAE) with optional split quantization (cytoself).

A :class:`VectorQuantizer` replaces every ``dim``-dimensional vector of a feature map by its nearest
entry of a learned codebook (van den Oord et al. 2017, "Neural Discrete Representation Learning";
VQ-VAE-2, Razavi et al. 2019). With ``split > 1`` it implements cytoself's *split quantization*
(Kobayashi et al., Methods "Split quantization", Supp. Fig. 7): each ``split * dim`` channel vector is
cut into ``split`` consecutive sub-vectors which are all quantized against the *same* codebook, so a
4x4x576 global representation becomes 4x4x9 = 144 quantized vectors instead of 16.

The nearest code is found with one matrix product (``||E||^2 - 2 z E^T``), ``argmin`` and an
``F.embedding`` lookup; code usage is a ``torch.bincount``. No softmax histogram or one-hot matmul (the
PyTorch reference spends 85% of its embedding time there).

:meth:`VectorQuantizer.restart_codes` re-initialises unused codes to encoder outputs (Jukebox's random
restarts); the VQGAN trainer can call it, :meth:`~VectorQuantizer.forward` never does.

Examples
--------
>>> import torch
>>> vq = VectorQuantizer(codebook_size=16, dim=4, split=3)
>>> out = vq(torch.randn(2, 12, 5, 5))
>>> out.quantized.shape, out.indices.shape
(torch.Size([2, 12, 5, 5]), torch.Size([2, 3, 5, 5]))
>>> torch.equal(vq.lookup(out.indices), out.quantized)
True
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VQOutput", "VectorQuantizer"]

# Elements of the [N, K] distance matrix computed at once. On CPU a cache-sized block (8 MiB) is as fast
# as one big product and keeps argmin reading from cache; elsewhere (GPU) large blocks avoid launch
# overhead, still bounded (embedding 256 crops: 160,000 local vectors x 2048 codes = 1.3 GB in one piece).
_CPU_BLOCK_ELEMENTS = 1 << 21
_DEVICE_BLOCK_ELEMENTS = 1 << 27


class VQOutput(NamedTuple):
    """Result of :meth:`VectorQuantizer.forward`.

    Attributes
    ----------
    quantized
        ``[B, split * dim, H, W]``: codebook vectors in place of the input vectors. While gradients are
        being recorded it is the straight-through value ``z + sg[e - z]`` (forward value ``e``, gradient
        copied to ``z``); otherwise exactly the codebook entries.
    indices
        ``[B, split, H, W]`` int64 code indices.
    loss
        ``codebook_loss + commitment_cost * commitment_loss`` (VQ-VAE Eq. 3), a scalar.
    codebook_loss
        ``mean ||sg[z] - e||^2``: moves the codes towards the encoder outputs.
    commitment_loss
        ``mean ||z - sg[e]||^2``: keeps the encoder outputs close to their codes.
    perplexity
        ``exp(entropy)`` of the code usage in this batch (1 = one code used, K = uniform use), detached.
    usage
        ``[K]`` int64: how many (sub-)vectors of this batch were assigned to each code.
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    codebook_loss: Tensor
    commitment_loss: Tensor
    perplexity: Tensor
    usage: Tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with a learned codebook and optional split quantization.

    Parameters
    ----------
    codebook_size
        Number of codes K (cytoself: 2048 for both VQ1 and VQ2, Methods "Model architecture").
    dim
        Dimension of one code (cytoself: 64).
    split
        Number of consecutive ``dim``-sized sub-vectors each channel vector is cut into, all quantized
        against this one codebook (cytoself VQ2: 9, so 576 = 9 x 64 channels; Methods "Split
        quantization"). The input must have ``split * dim`` channels.
    commitment_cost
        Weight beta of the commitment loss (VQ-VAE: 0.25).

    Notes
    -----
    The codebook is initialised uniform in ``+-sqrt(3 / K)`` (the variance-scaling initialisation of
    the TensorFlow VQ-VAE layer that cytoself builds on). The distance computation runs in float32,
    also under autocast, and has no gradient: the codebook learns through ``codebook_loss`` only.
    """

    def __init__(self, *, codebook_size: int, dim: int, split: int = 1, commitment_cost: float = 0.25):
        super().__init__()
        if codebook_size < 1 or dim < 1 or split < 1:
            raise ValueError(f"codebook_size, dim and split must be positive, got {codebook_size}, {dim}, {split}")
        if commitment_cost < 0:
            raise ValueError(f"commitment_cost must be >= 0, got {commitment_cost}")
        self.codebook_size = codebook_size
        self.dim = dim
        self.split = split
        self.commitment_cost = commitment_cost
        self.codebook = nn.Parameter(torch.empty(codebook_size, dim))  # [K, dim]
        self.reset_parameters()

    @property
    def channels(self) -> int:
        """Number of input channels, ``split * dim``."""
        return self.split * self.dim

    def reset_parameters(self) -> None:
        """Draw the codebook uniform in ``+-sqrt(3 / K)``."""
        bound = math.sqrt(3.0 / self.codebook_size)
        nn.init.uniform_(self.codebook, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, dim={self.dim}, split={self.split}, "
            f"commitment_cost={self.commitment_cost}"
        )

    def _check(self, z: Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.channels:
            raise ValueError(
                f"VectorQuantizer expects [B, {self.channels}, H, W] (split {self.split} x dim {self.dim}), "
                f"got {list(z.shape)}"
            )

    @torch.no_grad()
    def nearest(self, flat: Tensor) -> Tensor:
        """Index of the nearest code for each row of ``flat`` ``[N, dim]`` -> ``[N]`` int64.

        ``||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2``; the ``||z||^2`` term is the same for every code of
        a row, so the argmin only needs ``||e||^2 - 2 z.e``. That is one matrix product of ``[z, 1]`` with
        ``[-2 E, ||E||^2]`` (no separate broadcast pass over the ``[N, K]`` block), in float32.
        """
        with torch.autocast(device_type=flat.device.type, enabled=False):
            codebook = self.codebook.detach().float()  # [K, dim]
            table = torch.cat([-2.0 * codebook, codebook.pow(2).sum(1, keepdim=True)], dim=1)  # [K, dim + 1]
            flat = F.pad(flat.float(), (0, 1), value=1.0)  # [N, dim + 1]
            block = _CPU_BLOCK_ELEMENTS if flat.device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS
            rows = max(1, block // self.codebook_size)
            out = [torch.mm(chunk, table.t()).argmin(1) for chunk in flat.split(rows)]  # [n, K] -> [n]
            return torch.cat(out) if len(out) > 1 else out[0]

    def forward(self, z: Tensor) -> VQOutput:
        """Quantize ``z`` ``[B, split * dim, H, W]``; see :class:`VQOutput`."""
        self._check(z)
        b, _, h, w = z.shape
        # [B, C, H, W] -> [B, H, W, split, dim] -> [N, dim], N = B*H*W*split; channel c = s*dim + d.
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
        idx = self.nearest(flat)  # [N]
        codes = F.embedding(idx, self.codebook)  # [N, dim]

        # VQ-VAE Eq. 3: codebook term moves e to sg[z], commitment term moves z to sg[e]. float32 under autocast.
        flat32, codes32 = flat.float(), codes.float()
        codebook_loss = F.mse_loss(codes32, flat32.detach())
        commitment_loss = F.mse_loss(flat32, codes32.detach())
        loss = codebook_loss + self.commitment_cost * commitment_loss

        if flat.requires_grad:
            # Straight-through estimator: forward value e, gradient d/de copied to z.
            codes = flat + (codes - flat).detach()
        # [N, dim] -> [B, C, H, W]; left in channels-last strides (the layout the convolutions prefer).
        quantized = codes.reshape(b, h, w, self.channels).permute(0, 3, 1, 2)
        indices = idx.reshape(b, h, w, self.split).permute(0, 3, 1, 2).contiguous()  # [B, split, H, W]

        with torch.no_grad():
            usage = torch.bincount(idx, minlength=self.codebook_size)  # [K]
            perplexity = self.perplexity_from_usage(usage)
        return VQOutput(quantized, indices, loss, codebook_loss, commitment_loss, perplexity, usage)

    @torch.no_grad()
    def restart_codes(
        self,
        dead: Tensor,
        candidates: Tensor,
        *,
        generator: torch.Generator | None = None,
        noise: float = 0.0,
    ) -> int:
        """Re-initialise dead codes in place to randomly drawn encoder outputs ("random restarts").

        A code that no encoder output is nearest to gets no gradient from the codebook loss and stays
        unused for good ("codebook collapse"). Jukebox (Dhariwal et al. 2020, "Jukebox: A Generative Model
        for Music", Sec. 3.1, "Random restarts for embeddings") therefore resets such codes to encoder
        outputs drawn at random from the current batch, so that they sit where the data is and get used
        again; later VQGAN practice does the same. This method performs one such restart; deciding which
        codes are dead, and when, is up to the caller (e.g. usage summed over recent batches).
        :meth:`forward` never calls it. An optimizer's per-row state of the codebook (Adam's moments) is
        not touched; reset it separately so stale moments do not move the fresh codes.

        Parameters
        ----------
        dead
            The codes to restart: a bool mask ``[K]`` or an integer index tensor (duplicates are ignored).
        candidates
            ``[N, dim]`` vectors to draw from, normally the current batch's pre-quantization latents
            (sub-vectors when ``split > 1``). Drawn without replacement when ``N`` is at least the number of
            dead codes, with replacement otherwise.
        generator
            CPU random generator for the draw (and the noise); ``None``: the global generator. Pass a
            generator seeded identically on every process to keep data-parallel replicas identical.
        noise
            Add Gaussian noise with standard deviation ``noise`` times each dimension's standard deviation
            over ``candidates`` (0: copy the candidates exactly). Separates codes drawn from (nearly)
            identical latents.

        Returns
        -------
        int
            The number of codes restarted.

        Raises
        ------
        ValueError
            If ``dead`` is a mask of the wrong length, an index is out of range, ``candidates`` is not
            ``[N, dim]`` with ``N >= 1`` (when there is a code to restart), or ``noise < 0``.
        """
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        k = self.codebook_size
        dead = torch.as_tensor(dead, device=self.codebook.device)
        if dead.dtype == torch.bool:
            if dead.shape != (k,):
                raise ValueError(f"a dead-code mask must have shape [{k}], got {list(dead.shape)}")
            rows = dead.nonzero().flatten()
        else:
            rows = dead.flatten().long().unique()
            if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= k):
                raise ValueError(f"dead-code indices must lie in [0, {k}), got {rows.tolist()}")
        n_dead = len(rows)
        if n_dead == 0:
            return 0
        if candidates.ndim != 2 or candidates.shape[1] != self.dim or candidates.shape[0] < 1:
            raise ValueError(f"candidates must be [N >= 1, {self.dim}], got {list(candidates.shape)}")
        n = candidates.shape[0]
        if n >= n_dead:
            pick = torch.randperm(n, generator=generator)[:n_dead]
        else:
            pick = torch.randint(n, (n_dead,), generator=generator)
        new = candidates.detach()[pick.to(candidates.device)].float()  # [n_dead, dim]
        if noise > 0:
            std = candidates.detach().float().std(0, correction=0) if n > 1 else new.new_zeros(self.dim)
            eps = torch.randn(n_dead, self.dim, generator=generator).to(new.device)
            new = new + noise * std * eps
        self.codebook[rows] = new.to(self.codebook.dtype).to(self.codebook.device)
        return n_dead

    @staticmethod
    def perplexity_from_usage(usage: Tensor) -> Tensor:
        """``exp(-sum p log p)`` of the code frequencies ``p = usage / usage.sum()`` (0 log 0 = 0)."""
        p = usage.float() / usage.sum().clamp_min(1).float()
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
        return entropy.exp()

    def lookup(self, indices: Tensor) -> Tensor:
        """Codebook vectors for ``indices`` ``[B, split, H, W]`` -> ``[B, split * dim, H, W]``.

        The inverse of the index output of :meth:`forward`: ``lookup(out.indices)`` equals the quantized
        tensor (for decoding stored indices, or decoding with some codes zeroed).
        """
        if indices.ndim != 4 or indices.shape[1] != self.split:
            raise ValueError(f"lookup expects indices [B, {self.split}, H, W], got {list(indices.shape)}")
        b, s, h, w = indices.shape
        codes = F.embedding(indices.long(), self.codebook)  # [B, split, H, W, dim]
        return codes.permute(0, 1, 4, 2, 3).reshape(b, s * self.dim, h, w)

"""Training CELL-E's image tokenizers: one explicit VQGAN loop (``protloc train vqgan --kind ...``).

CELL-E trains two VQGANs before its transformer (paper Sec. 4.2-4.3, S.3.4-S.3.5): one on the nucleus
reference images (``kind="nucleus"``) and one on the protein images binarized at their mean
(``kind="threshold"``). The protocol, from the paper and the taming-transformers recipe it used:

- reconstruction loss only (mean-squared error, S.3.4) for the first ``loss.disc_start`` steps (paper:
  50,000, about 7 epochs), then a PatchGAN discriminator with the hinge loss, whose generator term is
  scaled by taming's adaptive weight times ``loss.disc_weight``; plus the codebook / commitment loss;
- Adam with learning rate 4.5e-6 (S.3.4) and betas (0.5, 0.9) (taming), one optimizer for the
  autoencoder and one for the discriminator;
- random flips of the training crops (S.3.6: "random cropping and random flips, just as was performed
  when training the VQGAN models"); none in validation.

Not in the paper, and off in its preset: restarts of unused codebook entries to encoder outputs of the
current batch every ``codebook.restart_every`` steps (Jukebox's "random restarts", see
:class:`VQGANCodebookConfig`); the tiny preset uses them, and the training metrics then log
``codes_restarted`` (codes restarted within each logging window).

Each step makes one autoencoder update, then (from ``disc_start`` on) one discriminator update on the
same batch, the discriminator seeing the reconstruction of that step (detached). As in taming, the
losses and the discriminator work on images in [-1, 1] (:meth:`~protloc.models.vqgan.VQGAN.normalize`
of the [0, 1] crops), so an MSE ``rec_loss`` is 4 x the MSE in [0, 1] units.

Validation (eval mode, every ``schedule.eval_every`` steps) reports ``rec_loss`` (the training
reconstruction loss), ``rec_mse`` / ``rec_l1`` in the crops' [0, 1] units, the codebook ``perplexity``
and ``dead_codes`` (codes no validation image uses) and, for the threshold tokenizer, the
``pixel_accuracy`` of the reconstruction binarized at 0.5 and the ``nucleus_proportion_accuracy``
(paper S.3.7, Table S.2: 0.87-0.88 and 0.99 for the paper's VQGAN; see :func:`threshold_metrics`).
``best/`` keeps the lowest validation ``rec_loss``.

A run folder holds::

    config.yaml      the resolved TrainVQGANConfig
    metrics.jsonl    {"step", "split": "train" | "val", losses, perplexity, dead codes, accuracies, ...}
    last/  best/     checkpoints (model.safetensors + config.json; last/ also trainer_state.pt with both
                     optimizers, the discriminator weights, step, data position and RNG states)

``resume=True`` continues from ``last/`` and sees the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from protloc.data.datasets import TokenizerKind, VQGANCrops, check_celle_store
from protloc.errors import ConfigError
from protloc.eval.metrics import threshold_metrics
from protloc.models.vqgan import (
    VQGAN,
    PatchDiscriminator,
    PerceptualLoss,
    VQGANConfig,
    adaptive_weight,
    hinge_d_loss,
    vanilla_d_loss,
)
from protloc.nn.quantize import VQOutput
from protloc.train.engine import (
    CropDataConfig,
    Run,
    ScheduleConfig,
    chunk_cache,
    crop_samplers,
    eval_mode,
    open_crop_store,
    sum_over_processes,
)
from protloc.train.loop import (
    check_adam_options,
    check_run_options,
    clip_gradients,
    seed_process,
    set_lr,
)
from protloc.train.loop import (
    check_config as _check,
)

__all__ = [
    "TrainVQGANConfig",
    "VQGANCodebookConfig",
    "VQGANDataConfig",
    "VQGANLossConfig",
    "VQGANOptimConfig",
    "VQGANScheduleConfig",
    "reset_optimizer_rows",
    "train_vqgan",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VQGANDataConfig(CropDataConfig):
    """Which crops, at which size, in which batches (and the fields of :class:`CropDataConfig`).

    Attributes
    ----------
    store
        The CELL-E crop store of ``protloc prepare`` (``OUT/celle.zarr``: ``nucleus`` and ``protein`` in
        [0, 1], ``threshold`` uint8, 256 x 256), with ``train`` and ``val`` rows in its ``split`` column.
    image_size
        Side of the images the VQGAN sees; must equal ``model.image_size``. Smaller than the store's
        crops: the crops are area-averaged down to it and, for the threshold tokenizer, the target is
        recomputed as ``pixel >= mean`` of the resized protein crop (paper Sec. 4.3), so it stays a
        binary mean-threshold image. At the store's size the stored ``threshold`` channel is used.
    batch_size
        Crops per optimizer step (per process). The paper does not state its batch size.
    augment
        Random horizontal and vertical flips of the training crops (paper S.3.4-S.3.6).
    """

    image_size: int = 256

    def __post_init__(self) -> None:
        _check(self.image_size >= 1, f"data.image_size must be >= 1, got {self.image_size}")
        super().__post_init__()


@dataclass(frozen=True)
class VQGANLossConfig:
    """Loss terms (taming's ``VQLPIPSWithDiscriminator``, with the paper's MSE reconstruction).

    Attributes
    ----------
    reconstruction
        ``"mse"`` (paper S.3.4: "initially trained solely using mean-squared error") or ``"l1"`` (taming).
    codebook_weight
        Weight of the quantizer loss (taming: 1).
    vq_weighting
        How the quantizer loss combines its two terms (beta = ``model.commitment_cost``): ``"vqvae"``,
        ``codebook + beta x commitment``, as the VQGAN paper writes it (Esser et al. 2021, Eq. 4) and
        VQ-VAE defines it; ``"taming"``, ``beta x codebook + commitment``, what taming's code computes by
        default (``legacy=True``), which the paper's runs probably used. The latter holds the encoder
        outputs 4x more firmly to their codes; on the dim, sparse nucleus crops of a short run it
        collapsed the encoder to one or two codes, where ``"vqvae"`` used 90-100 of 128.
    disc_start
        Steps of reconstruction-only training before the discriminator is switched on (paper: 50,000).
    disc_weight
        Multiplier of the adaptive generator weight (taming's VQGAN configs: 0.8).
    disc_loss
        ``"hinge"`` (taming's VQGAN) or ``"vanilla"`` (non-saturating softplus).
    disc_channels, disc_layers
        PatchGAN width and depth (taming: 64, 3).
    adaptive_weight_max
        Upper clamp of the adaptive weight (taming: 1e4).
    perceptual_weights
        Path of local LPIPS weights (torchvision ``vgg16().features`` keys + LPIPS ``lin<k>.model.1.weight``
        keys, one ``.safetensors`` / ``.pt`` file; see :class:`~protloc.models.vqgan.PerceptualLoss`).
        Empty: no perceptual term (the paper reports only MSE). Nothing is ever downloaded.
    perceptual_weight
        Weight of the LPIPS term when ``perceptual_weights`` is set (taming: 1).
    """

    reconstruction: Literal["mse", "l1"] = "mse"
    codebook_weight: float = 1.0
    vq_weighting: Literal["vqvae", "taming"] = "vqvae"
    disc_start: int = 50_000
    disc_weight: float = 0.8
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_channels: int = 64
    disc_layers: int = 3
    adaptive_weight_max: float = 1e4
    perceptual_weights: str = ""
    perceptual_weight: float = 1.0

    def __post_init__(self) -> None:
        _check(
            self.reconstruction in ("mse", "l1"),
            f"loss.reconstruction must be 'mse' or 'l1', got {self.reconstruction!r}",
        )
        _check(
            self.disc_loss in ("hinge", "vanilla"),
            f"loss.disc_loss must be 'hinge' or 'vanilla', got {self.disc_loss!r}",
        )
        _check(
            self.vq_weighting in ("vqvae", "taming"),
            f"loss.vq_weighting must be 'vqvae' or 'taming', got {self.vq_weighting!r}",
        )
        _check(self.codebook_weight >= 0, f"loss.codebook_weight must be >= 0, got {self.codebook_weight}")
        _check(self.disc_start >= 0, f"loss.disc_start must be >= 0, got {self.disc_start}")
        _check(self.disc_weight >= 0, f"loss.disc_weight must be >= 0, got {self.disc_weight}")
        _check(self.disc_channels >= 1, f"loss.disc_channels must be >= 1, got {self.disc_channels}")
        _check(self.disc_layers >= 1, f"loss.disc_layers must be >= 1, got {self.disc_layers}")
        _check(self.adaptive_weight_max > 0, f"loss.adaptive_weight_max must be > 0, got {self.adaptive_weight_max}")
        _check(self.perceptual_weight >= 0, f"loss.perceptual_weight must be >= 0, got {self.perceptual_weight}")


@dataclass(frozen=True)
class VQGANCodebookConfig:
    """Restarts of unused codebook entries (Jukebox's "random restarts"; off in the paper preset).

    Every ``restart_every`` steps, each code used fewer than ``restart_min_usage`` times by the training
    batches of those steps (summed over all processes) is set to an encoder output (pre-quantization
    latent vector) drawn at random from the current batch, and its rows of the autoencoder optimizer's
    Adam moments are zeroed (see :meth:`~protloc.nn.quantize.VectorQuantizer.restart_codes`,
    :func:`reset_optimizer_rows`). Dhariwal et al. 2020 (Jukebox, Sec. 3.1) introduced this against
    codebook collapse; a short CPU run of the tiny VQGAN otherwise leaves 40-80 of its 128 codes unused.
    Neither CELL-E nor taming-transformers restarts codes, so :meth:`TrainVQGANConfig.paper` keeps it off;
    :meth:`TrainVQGANConfig.tiny` turns it on (a deviation from the paper's recipe).

    Attributes
    ----------
    restart_every
        Steps between restarts, also the window over which code usage is counted (0: never restart).
    restart_min_usage
        A code is dead, and restarted, if fewer latent vectors than this were assigned to it over the
        window (1: codes no vector used).
    restart_noise
        Gaussian noise added to a restarted code, in units of each latent dimension's standard deviation
        over the batch (0: the drawn latent exactly).
    restart_until
        Last step at which codes may be restarted (0: no limit), so the codebook and decoder can settle
        before the end of training.
    """

    restart_every: int = 0
    restart_min_usage: int = 1
    restart_noise: float = 0.0
    restart_until: int = 0

    def __post_init__(self) -> None:
        _check(self.restart_every >= 0, f"codebook.restart_every must be >= 0, got {self.restart_every}")
        _check(self.restart_min_usage >= 1, f"codebook.restart_min_usage must be >= 1, got {self.restart_min_usage}")
        _check(
            math.isfinite(self.restart_noise) and self.restart_noise >= 0,
            f"codebook.restart_noise must be >= 0, got {self.restart_noise}",
        )
        _check(self.restart_until >= 0, f"codebook.restart_until must be >= 0, got {self.restart_until}")

    @property
    def enabled(self) -> bool:
        """Whether codes are ever restarted."""
        return self.restart_every > 0

    def restarts_at(self, step: int) -> bool:
        """Whether codes are restarted after optimizer step ``step`` (counted from 1)."""
        return (
            self.enabled and step % self.restart_every == 0 and (not self.restart_until or step <= self.restart_until)
        )


@dataclass(frozen=True)
class VQGANOptimConfig:
    """Two Adam optimizers, autoencoder and discriminator (paper S.3.4: lr 4.5e-6; taming: betas (0.5, 0.9)).

    Attributes
    ----------
    lr
        Learning rate of both optimizers.
    betas
        Adam's moment decay rates.
    scale_lr
        Multiply ``lr`` by ``batch_size x processes`` (what taming's ``main.py`` does with its
        ``base_learning_rate``; the paper's 4.5e-6 may be that base value). Off by default: ``lr`` is
        the learning rate Adam uses.
    grad_clip
        Clip each network's gradient norm to this value (0: no clipping, as in taming).
    """

    lr: float = 4.5e-6
    betas: tuple[float, float] = (0.5, 0.9)
    scale_lr: bool = False
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        check_adam_options(self.lr, self.betas, self.grad_clip)


@dataclass(frozen=True)
class VQGANScheduleConfig(ScheduleConfig):
    """Step budget, validation and logging (the fields of :class:`ScheduleConfig`).

    Attributes
    ----------
    max_steps
        Optimizer steps to train for. The paper trained "until convergence" (344 epochs for the nucleus
        VQGAN, 371 for the threshold one, with 50,000 steps ~ 7 epochs); the paper preset's 2,450,000
        is 343 of those epochs.
    eval_batches
        Validate on this many batches (the first ones of the split, in store order); 0 = the whole split.
    log_every
        Log averaged training metrics every this many steps; the training ``dead_codes`` count codes
        unused over those steps' batches.
    """

    max_steps: int = 2_450_000
    eval_every: int = 5000


@dataclass(frozen=True)
class TrainVQGANConfig:
    """Everything :func:`train_vqgan` needs. Presets: :meth:`paper`, :meth:`tiny`.

    Attributes
    ----------
    kind
        ``"nucleus"`` (Phase 1, the nucleus reference images) or ``"threshold"`` (Phase 2, the protein
        images binarized at their mean), paper Sec. 4.1.
    model, data, loss, codebook, optim, schedule
        See :class:`~protloc.models.vqgan.VQGANConfig`, :class:`VQGANDataConfig`,
        :class:`VQGANLossConfig`, :class:`VQGANCodebookConfig`, :class:`VQGANOptimConfig`,
        :class:`VQGANScheduleConfig`.
    mixed_precision
        ``"no"``, ``"bf16"`` or ``"fp16"`` (GPU only; CPU runs fall back to float32).
    seed
        Seeds initialisation, data order and augmentation.
    save_every
        Write ``last/`` every this many steps (0: at every validation); also at the end.
    """

    kind: TokenizerKind = "nucleus"
    model: VQGANConfig = field(default_factory=VQGANConfig.paper)
    data: VQGANDataConfig = field(default_factory=VQGANDataConfig)
    loss: VQGANLossConfig = field(default_factory=VQGANLossConfig)
    codebook: VQGANCodebookConfig = field(default_factory=VQGANCodebookConfig)
    optim: VQGANOptimConfig = field(default_factory=VQGANOptimConfig)
    schedule: VQGANScheduleConfig = field(default_factory=VQGANScheduleConfig)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    save_every: int = 5000

    def __post_init__(self) -> None:
        _check(self.kind in ("nucleus", "threshold"), f"kind must be 'nucleus' or 'threshold', got {self.kind!r}")
        check_run_options(self.mixed_precision, self.save_every)
        _check(
            self.data.image_size == self.model.image_size,
            f"data.image_size ({self.data.image_size}) differs from model.image_size ({self.model.image_size}); "
            "set both (e.g. --set data.image_size=64 --set model.image_size=64)",
        )
        _check(self.model.in_channels == 1, f"model.in_channels must be 1 (grey images), got {self.model.in_channels}")

    @classmethod
    def paper(cls, store: str = "", kind: TokenizerKind = "nucleus") -> TrainVQGANConfig:
        """The paper's protocol (S.3.4-S.3.5): the f16 VQGAN at 256 px, MSE only for 50,000 steps, then the
        hinge PatchGAN, Adam 4.5e-6, about 343 epochs; no code restarts (the paper does not restart codes)."""
        return cls(kind=kind, data=VQGANDataConfig(store=store, num_workers=4))

    @classmethod
    def tiny(cls, store: str = "", kind: TokenizerKind = "nucleus") -> TrainVQGANConfig:
        """A CPU demo: the tiny VQGAN at 64 px (8 x 8 tokens), batch 16, Adam 2e-4, the discriminator
        from step 600 (32 wide), 1,500 steps, unused codes restarted every 50 steps.

        The paper's 4.5e-6 is for hundreds of epochs on GPUs; a few thousand CPU steps need a larger
        learning rate. The code restarts are not in the paper: without them 1,500 steps on the CELL-E demo
        store left 41 (nucleus) and 78 (threshold) of the 128 codes unused on the validation crops; with
        them none, at a lower validation reconstruction error (MSE 0.0059 vs 0.0063 and 0.094 vs 0.102).
        """
        return cls(
            kind=kind,
            model=VQGANConfig.tiny(),
            data=VQGANDataConfig(store=store, image_size=64, batch_size=16),
            loss=VQGANLossConfig(disc_start=600, disc_channels=32),
            codebook=VQGANCodebookConfig(restart_every=50),
            optim=VQGANOptimConfig(lr=2e-4),
            schedule=VQGANScheduleConfig(max_steps=1500, eval_every=250, eval_batches=0, log_every=10),
            save_every=0,
        )


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------


def _vq_loss(weighting: str, vq: VQOutput, beta: float) -> Tensor:
    """The quantizer loss: VQ-VAE's ``codebook + beta commitment`` or taming's ``beta codebook + commitment``."""
    if weighting == "vqvae":
        return vq.loss
    return beta * vq.codebook_loss + vq.commitment_loss


def _rec_loss(kind: str, reconstruction: Tensor, target: Tensor) -> Tensor:
    if kind == "mse":
        return F.mse_loss(reconstruction, target)
    return F.l1_loss(reconstruction, target)


class _GANLoss:
    """The VQGAN's two losses (taming's ``VQLPIPSWithDiscriminator``): the autoencoder's and the discriminator's.

    As in taming, both work on images in [-1, 1] (:meth:`~protloc.models.vqgan.VQGAN.normalize` of the
    [0, 1] crops). Call inside the accelerator's autocast.
    """

    def __init__(self, cfg: TrainVQGANConfig, model: VQGAN, disc: Any, perceptual: PerceptualLoss | None) -> None:
        self.cfg, self.model, self.disc, self.perceptual = cfg.loss, model, disc, perceptual
        self.beta = cfg.model.commitment_cost
        self.d_loss_fn = hinge_d_loss if cfg.loss.disc_loss == "hinge" else vanilla_d_loss

    def autoencoder(self, x: Tensor, out: Any, *, gan: bool) -> tuple[Tensor, dict[str, Any], Tensor, Tensor]:
        """Reconstruction + codebook (+ perceptual) (+ the adaptively weighted GAN term when ``gan``).

        Returns the loss, its terms (detached, for the log) and the real and reconstructed images in the
        model's units (the discriminator's inputs).
        """
        c = self.cfg
        rec = out.reconstruction
        real, fake = self.model.normalize(x), self.model.normalize(rec.float())
        rec_loss = _rec_loss(c.reconstruction, fake, real)
        if self.perceptual is not None:
            rec_loss = rec_loss + c.perceptual_weight * self.perceptual(rec.float(), x).mean()
        vq_loss = _vq_loss(c.vq_weighting, out.vq, self.beta)
        loss = rec_loss + c.codebook_weight * vq_loss
        logs = {"rec_loss": rec_loss.detach(), "vq_loss": vq_loss.detach()}
        if gan:
            g_loss = -self.disc(fake).float().mean()
            d_weight = c.disc_weight * adaptive_weight(
                rec_loss, g_loss, self.model.last_layer, max_weight=c.adaptive_weight_max
            )
            loss = loss + d_weight * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight)
        return loss, logs, real, fake

    def discriminator(self, real: Tensor, fake: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminator's loss on real images vs this step's reconstructions (detached), and its terms."""
        logits_real = self.disc(real).float()
        logits_fake = self.disc(fake.detach()).float()
        d_loss = self.d_loss_fn(logits_real, logits_fake)
        logs = {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().mean()}
        logs["logits_fake"] = logits_fake.detach().mean()
        return d_loss, logs


@torch.no_grad()
def _evaluate(
    model: VQGAN,
    loader: DataLoader,
    accelerator: Any,
    *,
    cfg: TrainVQGANConfig,
    perceptual: PerceptualLoss | None,
) -> dict[str, float]:
    """Validation means over images (eval mode) and code statistics over the whole pass."""
    device = accelerator.device
    sums: dict[str, Tensor] = {}
    usage = torch.zeros(model.config.n_embed, dtype=torch.float64, device=device)
    beta = model.config.commitment_cost
    count = torch.zeros((), dtype=torch.float64, device=device)

    def add(key: str, per_image: Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + per_image.detach().double().sum()

    with eval_mode(model):
        for i, batch in enumerate(loader):
            if cfg.schedule.eval_batches and i >= cfg.schedule.eval_batches:
                break
            x = batch["image"].to(device)
            with accelerator.autocast():
                out = model(x)
            rec = out.reconstruction.float()
            n = x.shape[0]
            err = rec - x  # data units
            add("rec_mse", err.pow(2).mean(dim=(1, 2, 3)))
            add("rec_l1", err.abs().mean(dim=(1, 2, 3)))
            err = model.normalize(rec) - model.normalize(x)  # the model's units: the training loss
            add("rec_loss", (err.pow(2) if cfg.loss.reconstruction == "mse" else err.abs()).mean(dim=(1, 2, 3)))
            add("vq_loss", _vq_loss(cfg.loss.vq_weighting, out.vq, beta).detach().expand(n))
            if perceptual is not None:
                add("perceptual", perceptual(rec, x))
            if cfg.kind == "threshold":
                for key, value in threshold_metrics(rec, x, batch["nucleus"].to(device)).items():
                    add(key, value)
            usage += out.vq.usage.double()
            count += n
    keys = list(sums)
    *values, count, usage = sum_over_processes(accelerator, [*(sums[k] for k in keys), count, usage])
    total = float(count)
    if total == 0:
        raise RuntimeError("validation saw no crops")
    val = {k: float(v) / total for k, v in zip(keys, values, strict=True)}
    val["perplexity"] = float(model.quantize.perplexity_from_usage(usage))
    val["dead_codes"] = int((usage == 0).sum())
    val["codes_used"] = model.config.n_embed - val["dead_codes"]
    return val


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------


def _load_perceptual(cfg: TrainVQGANConfig) -> PerceptualLoss | None:
    if not cfg.loss.perceptual_weights:
        return None
    return PerceptualLoss.from_file(cfg.loss.perceptual_weights, input_range=cfg.model.value_range)


def reset_optimizer_rows(optimizer: Any, param: Tensor, rows: Tensor) -> None:
    """Zero the per-element optimizer state (Adam's ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) of
    rows ``rows`` (bool mask or indices) of ``param``, in place.

    After a codebook restart the old moments of a restarted code describe the code it replaced; Adam would
    keep moving the fresh code by them. Zeroed moments start it like a new parameter (the bias correction
    uses the parameter's shared step count, so the first update is ~ ``lr`` in size). Accepts an
    Accelerate-wrapped optimizer; does nothing if the parameter has no state yet.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    state = inner.state.get(param)
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        buf = state.get(key)
        if isinstance(buf, Tensor) and buf.shape == param.shape:
            buf[rows.to(buf.device)] = 0


def _restart_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for the code restart after ``step``: the same on every process and after a resume."""
    entropy = np.random.SeedSequence([int(seed) % (1 << 63), int(step), 0x7E57A87]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


@torch.no_grad()
def _restart_codes(
    model: VQGAN,
    optimizer: Any,
    latent: Tensor,
    usage: Tensor,
    cfg: TrainVQGANConfig,
    step: int,
    accelerator: Any,
) -> int:
    """Restart the codes used fewer than ``codebook.restart_min_usage`` times (``usage``, all processes)
    with latent vectors of this step's batch (gathered from all processes, drawn with a generator seeded
    by ``(seed, step)``, so every process makes the same change); zero their Adam moments."""
    dead = usage < cfg.codebook.restart_min_usage  # [K] bool
    if not bool(dead.any()):
        return 0
    quantizer = model.quantize
    candidates = latent.detach().float().permute(0, 2, 3, 1).reshape(-1, quantizer.dim)  # [B*h*w, dim]
    if accelerator.num_processes > 1:
        candidates = accelerator.gather(candidates.contiguous())
    n = quantizer.restart_codes(
        dead, candidates, generator=_restart_generator(cfg.seed, step), noise=cfg.codebook.restart_noise
    )
    reset_optimizer_rows(optimizer, quantizer.codebook, dead)
    return n


class _CodeUsage:
    """Code usage of the training batches, all processes together: restarts and the logging window.

    Counts the codes the quantizer assigned since the last restart (summed over processes, so every
    process restarts the same codes; see :class:`VQGANCodebookConfig`) and over the logging window
    (its perplexity and dead codes are logged), and the codes restarted in the window and the run.
    """

    def __init__(self, model: VQGAN, cfg: TrainVQGANConfig, accelerator: Any) -> None:
        self.model, self.cfg, self.accelerator = model, cfg, accelerator
        self.since_restart = torch.zeros(cfg.model.n_embed, dtype=torch.long, device=accelerator.device)
        self.window = torch.zeros_like(self.since_restart)
        self.restarted = self.window_restarted = 0

    def _summed(self, usage: Tensor) -> Tensor:
        return self.accelerator.reduce(usage.clone(), "sum") if self.accelerator.num_processes > 1 else usage

    def update(self, out: Any, optimizer: Any, step: int) -> None:
        """Count the codes of optimizer step ``step`` (``out``: the VQGAN's output); restart dead ones when due."""
        if self.cfg.codebook.enabled:
            self.since_restart += self._summed(out.vq.usage)
            if self.cfg.codebook.restarts_at(step):
                n = _restart_codes(
                    self.model, optimizer, out.latent, self.since_restart, self.cfg, step, self.accelerator
                )
                self.window_restarted += n
                self.restarted += n
                self.since_restart.zero_()
        self.window += out.vq.usage

    def window_stats(self) -> tuple[dict[str, Any], dict[str, int]]:
        """``({perplexity, dead_codes}, {codes_restarted} or {})`` of the window, then a new window (a collective)."""
        usage = self._summed(self.window)
        stats = {"perplexity": self.model.quantize.perplexity_from_usage(usage), "dead_codes": int((usage == 0).sum())}
        restarted = {"codes_restarted": self.window_restarted} if self.cfg.codebook.enabled else {}
        self.window.zero_()
        self.window_restarted = 0
        return stats, restarted

    def state_dict(self) -> dict[str, Any]:
        """The restart counters, for ``last/trainer_state.pt``."""
        return {"restart_usage": self.since_restart.detach().cpu().clone(), "codes_restarted": self.restarted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a state without restart usage, or of another codebook size, starts at 0)."""
        self.restarted = int(state.get("codes_restarted", 0))
        saved = state.get("restart_usage")
        if saved is not None and saved.shape == self.since_restart.shape:
            self.since_restart.copy_(saved)


def train_vqgan(
    cfg: TrainVQGANConfig,
    *,
    run_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a CELL-E image tokenizer (VQGAN) on a CELL-E crop store.

    Parameters
    ----------
    cfg
        The training configuration (``cfg.data.store`` must be set; ``cfg.kind`` picks the images).
    run_dir
        Output folder (``config.yaml``, ``metrics.jsonl``, ``last/``, ``best/``).
    resume
        Continue the run in ``run_dir`` from ``last/`` (weights, discriminator, both optimizers, step,
        RNG, data position). ``cfg.schedule.max_steps`` may be raised; the model and kind must be the run's.
    progress
        Show a tqdm progress bar.

    Returns
    -------
    dict
        ``steps``, ``steps_this_run``, ``epochs`` (fractional passes over the training split),
        ``best_val_loss`` (validation reconstruction loss), ``best_step``, ``images_per_s`` (training
        throughput of this call, validation excluded), ``images_seen``, ``codes_restarted`` (codebook
        restarts over the whole run, see :class:`VQGANCodebookConfig`), ``last_val`` (the last validation
        record), ``run_dir``.

    Raises
    ------
    InputError
        If the store is missing, lacks channels or a split, its crops are smaller than
        ``data.image_size``, ``run_dir`` already holds a run (without ``resume``) or holds none to resume.
    ConfigError
        If ``data.store`` is unset, the perceptual weights cannot be loaded, or ``resume`` meets a
        different model or kind.
    """
    run = Run(
        run_dir,
        resume=resume,
        mixed_precision=cfg.mixed_precision,
        name=f"vqgan-{cfg.kind}",
        best="rec_loss",
        progress=progress,
    )
    store = open_crop_store(
        cfg.data,
        source="the CELL-E crop store from `protloc prepare` (OUT/celle.zarr)",
        channels=["nucleus"] if cfg.kind == "nucleus" else ["nucleus", "protein", "threshold"],
        purpose=f" for the {cfg.kind} tokenizer",
        min_size=cfg.data.image_size,
    )
    check_celle_store(store)  # before anything is written: a cytoself store has nucleus crops too
    run.use_store(store)  # resuming: the run's own crops, or a clear refusal
    saved_extra = run.check_resume_model(cfg.model, config_cls=VQGANConfig, model_cls=VQGAN)
    if resume and saved_extra.get("kind") != cfg.kind:
        raise ConfigError(
            f"cannot resume {run.dir}: it trains the {saved_extra.get('kind')!r} tokenizer, not {cfg.kind!r}"
        )
    perceptual = _load_perceptual(cfg)
    dcfg, lcfg, ocfg = cfg.data, cfg.loss, cfg.optim
    run.setup(cfg)

    # ---- data ----------------------------------------------------------------------------------
    read = dict(kind=cfg.kind, image_size=dcfg.image_size, cache_chunks=chunk_cache(dcfg))
    train_ds = VQGANCrops(store, split=dcfg.train_split, augment=dcfg.augment, seed=cfg.seed, **read)
    val_ds = VQGANCrops(store, split=dcfg.val_split, with_nucleus=cfg.kind == "threshold", **read)
    sampler, val_sampler = crop_samplers(run, dcfg, train_ds.base, val_ds.base)
    loader = run.train_loader(train_ds, sampler, num_workers=dcfg.num_workers, path=store.path)
    val_loader = DataLoader(
        val_ds,
        batch_sampler=val_sampler,
        num_workers=dcfg.num_workers,
        pin_memory=run.pin_memory,
        generator=torch.Generator().manual_seed(cfg.seed),
    )

    # ---- models, optimizers, state -------------------------------------------------------------
    model = VQGAN(cfg.model)
    disc = PatchDiscriminator(in_channels=cfg.model.in_channels, channels=lcfg.disc_channels, layers=lcfg.disc_layers)
    seed_process(cfg.seed, run.rank)  # after the initialisation, which must be the same on every process
    lr = ocfg.lr * (dcfg.batch_size * run.world if ocfg.scale_lr else 1)
    opt_ae = torch.optim.Adam(model.parameters(), lr=lr, betas=ocfg.betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=ocfg.betas)
    codes = _CodeUsage(model, cfg, run.accelerator)
    if perceptual is not None:
        perceptual = perceptual.to(run.device)
    run.attach(
        model,
        cfg.model,
        state=lambda: {
            "opt_ae": opt_ae.state_dict(),
            "opt_disc": opt_d.state_dict(),
            "discriminator": {k: v.detach().cpu().clone() for k, v in disc.state_dict().items()},
            **codes.state_dict(),
        },
        extra=lambda **more: {"kind": cfg.kind, "step": run.step, "image_size": dcfg.image_size, **more},
    )
    if (state := run.resume()) is not None:
        disc.load_state_dict(state["discriminator"], strict=True)
        opt_ae.load_state_dict(state["opt_ae"])
        opt_d.load_state_dict(state["opt_disc"])
        codes.load_state_dict(state)
    set_lr(lr, opt_ae, opt_d)
    wrapped, wrapped_disc, opt_ae, opt_d = run.accelerator.prepare(model, disc, opt_ae, opt_d)
    losses = _GANLoss(cfg, model, wrapped_disc, perceptual)

    # ---- loop ----------------------------------------------------------------------------------
    wrapped.train()
    wrapped_disc.train()
    with run:
        for batch in run.batches(loader):
            x = batch["image"].to(run.device, non_blocking=run.pin_memory)
            gan = run.step >= lcfg.disc_start  # taming's adopt_weight: no GAN term before disc_start

            # -- autoencoder update: reconstruction + codebook (+ perceptual) (+ adaptive GAN term)
            with run.accelerator.autocast():
                out = wrapped(x)
                loss, logs, real, fake = losses.autoencoder(x, out, gan=gan)
            opt_ae.zero_grad(set_to_none=True)
            run.accelerator.backward(loss)
            clip_gradients(run.accelerator, wrapped.parameters(), ocfg.grad_clip)
            opt_ae.step()
            logs["loss"] = loss.detach()

            # -- discriminator update on the same batch (real vs this step's reconstruction)
            if gan:
                with run.accelerator.autocast():
                    d_loss, d_logs = losses.discriminator(real, fake)
                opt_d.zero_grad(set_to_none=True)
                run.accelerator.backward(d_loss)
                clip_gradients(run.accelerator, wrapped_disc.parameters(), ocfg.grad_clip)
                opt_d.step()
                logs.update(d_logs)

            # -- this step's codes; unused codes restarted when due (Jukebox), still part of the step
            codes.update(out, opt_ae, step=run.step + 1)
            # GAN terms are averaged over the steps that had them (the window counts each key's steps).
            run.step_done(x.shape[0], {k: float(v) for k, v in logs.items()})

            if run.should_log():
                means = run.window_means()
                usage, restarted = codes.window_stats()
                run.log(
                    "train", means, **usage, gan=gan, lr=opt_ae.param_groups[0]["lr"], **run.progress(), **restarted
                )
            if run.should_eval():
                run.evaluated(_evaluate(model, val_loader, run.accelerator, cfg=cfg, perceptual=perceptual))
            if run.end_step():
                break
    return run.finish(codes_restarted=codes.restarted, last_val=run.last_val)

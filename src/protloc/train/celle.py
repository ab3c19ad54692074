"""Training the CELL-E transformer (``protloc train celle``), Phase 3 of the paper (Sec. 4.1, S.3.6).

The two image tokenizers (:mod:`protloc.train.vqgan`) are trained first and stay frozen here: each
step turns the batch's nucleus and protein-threshold images into token grids with them, embeds the
sequence windows with the (frozen) sequence embedder, and makes one Adam step (lr 3e-4, S.3.6) on
the weighted per-segment cross-entropy of :meth:`protloc.models.celle.Celle.loss`.

- Data: :class:`~protloc.data.datasets.CelleDataset` over the CELL-E crop store of ``protloc prepare``
  (split by protein, 80/20, S.3.1), with random crops and flips applied identically to both images
  and random 1000-residue windows of longer sequences in training; centre crops, no flips and the
  N-terminal window in validation (the reference draws random windows there too).
- Sequence embeddings: a frozen embedder's outputs are computed once per distinct window, kept in
  memory (and, with ``embedder.cache_dir``, on disk), never re-run per step; the ``learned``
  embedder is part of the model and trains.
- ``data.text="none"`` replaces every sequence by padding (only the start token): the paper's
  "no sequence" ablation, the baseline that shows what the sequence contributes.
- Validation (eval mode, deterministic) reports the loss and accuracy per segment; with
  ``schedule.eval_blank_sequence`` also the same model's losses with the sequence replaced by
  padding (an in-run probe of how much the predictions use the sequence).

A run folder holds::

    config.yaml      the resolved TrainCelleConfig
    metrics.jsonl    {"step", "split": "train" | "val", loss, loss_text, loss_nucleus, loss_threshold, acc_*, ...}
    last/  best/     model.safetensors + config.json (CelleConfig; extra: the tokenizers' paths and
                     SHA-256, image and crop size, embedder) (+ trainer_state.pt in last/)

``best/`` keeps the lowest validation ``loss``. :func:`load_celle_run` rebuilds the model, both
tokenizers and the sequence encoder from a run (checking the tokenizer weights are unchanged).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from protloc.config import save_config
from protloc.data.datasets import CelleDataset, CropBatchSampler
from protloc.data.io import CropStore
from protloc.data.sequences import default_sequences, read_sequences
from protloc.errors import ConfigError, InputError
from protloc.eval.load import load_tokenizer
from protloc.models.celle import Celle, CelleConfig
from protloc.models.checkpoint import (
    load_model_weights,
    load_trainer_state,
    save_checkpoint,
)
from protloc.models.embedders import EmbedderConfig, SequenceEncoder
from protloc.models.vqgan import VQGAN
from protloc.train.loop import (
    MetricsLogger,
    check_adam_options,
    check_resume_model,
    check_run_dir,
    check_run_options,
    check_store_splits,
    infinite_loader,
    make_accelerator,
    mean_over_processes,
    process_rng_states,
    remove_stale_temporaries,
    restore_process_rng,
    seed_everything,
    seed_process,
)
from protloc.train.loop import check_config as _check

__all__ = [
    "CelleDataConfig",
    "CelleOptimConfig",
    "CelleScheduleConfig",
    "TokenizerConfig",
    "TrainCelleConfig",
    "train_celle",
]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CelleDataConfig:
    """Which crops and sequences, at which size, in which batches.

    Attributes
    ----------
    store
        The CELL-E crop store of ``protloc prepare`` (``OUT/celle.zarr``), ``train`` and ``val`` rows
        in its ``split`` column (by protein, paper S.3.1).
    sequences
        FASTA keyed by ``protein_id``, or a table with ``protein_id`` and ``sequence`` columns. Empty:
        the ``sequences.fasta`` (else ``proteins.csv``) beside the store.
    image_size
        Side of the images the tokenizers see (paper: 256); must equal theirs.
    crop_size
        Window cut from each stored crop before resizing to ``image_size``: at a random offset in
        training (paper S.3.6: "random cropping"), centred in validation. 0: the whole crop.
    batch_size
        Samples per optimizer step (per process). The paper does not give its batch size.
    num_workers
        DataLoader worker processes (0: read in the training process).
    augment
        Random crops, flips and sequence windows in training (paper S.3.6).
    text
        ``"sequence"`` (the protein's sequence) or ``"none"`` (every sequence replaced by padding:
        the "no sequence" ablation).
    eval_window
        Window of sequences longer than ``model.max_residues`` in validation: ``"start"``
        (N-terminal), ``"center"`` or ``"end"``.
    shuffle, chunk_window
        Training order (see :class:`~protloc.data.datasets.CropBatchSampler`).
    train_split, val_split
        Values of the ``split`` column used for training and validation.
    token_cache
        Keep the tokens of up to this many training image views (crop x flips x crop offset) in
        memory, so a view seen again is not re-encoded by the VQGANs (2 x grid tokens of int16 each:
        1 KB at the paper's 16 x 16). Pays off when views repeat: flips only (``crop_size`` 0) give 4
        per crop. 0: encode every batch.
    """

    store: str = ""
    sequences: str = ""
    image_size: int = 256
    crop_size: int = 0
    batch_size: int = 8
    num_workers: int = 0
    augment: bool = True
    text: Literal["sequence", "none"] = "sequence"
    eval_window: Literal["start", "center", "end"] = "start"
    shuffle: Literal["chunks", "random"] = "chunks"
    chunk_window: int = 16
    train_split: str = "train"
    val_split: str = "val"
    token_cache: int = 0

    def __post_init__(self) -> None:
        _check(self.image_size >= 1, f"data.image_size must be >= 1, got {self.image_size}")
        _check(self.token_cache >= 0, f"data.token_cache must be >= 0, got {self.token_cache}")
        _check(self.crop_size >= 0, f"data.crop_size must be >= 0 (0 = whole crop), got {self.crop_size}")
        _check(
            self.crop_size == 0 or self.crop_size >= self.image_size,
            f"data.crop_size ({self.crop_size}) must be 0 or at least data.image_size ({self.image_size})",
        )
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(self.chunk_window >= 1, f"data.chunk_window must be >= 1, got {self.chunk_window}")
        _check(self.text in ("sequence", "none"), f"data.text must be 'sequence' or 'none', got {self.text!r}")
        _check(
            self.eval_window in ("start", "center", "end"),
            f"data.eval_window must be 'start', 'center' or 'end', got {self.eval_window!r}",
        )
        _check(self.shuffle in ("chunks", "random"), f"data.shuffle must be 'chunks' or 'random', got {self.shuffle!r}")
        _check(self.train_split != self.val_split, "data.train_split and data.val_split must differ")


@dataclass(frozen=True)
class TokenizerConfig:
    """The two frozen VQGANs (``protloc train vqgan`` runs, or checkpoint folders).

    Attributes
    ----------
    nucleus, threshold
        A VQGAN run folder (its ``best/`` checkpoint is used, else ``last/``) or a checkpoint folder
        (``model.safetensors`` + ``config.json``) of the nucleus and the threshold tokenizer.
    """

    nucleus: str = ""
    threshold: str = ""


@dataclass(frozen=True)
class CelleOptimConfig:
    """Adam (paper S.3.6: learning rate 3e-4).

    Attributes
    ----------
    lr
        Learning rate.
    betas
        Adam's moment decay rates (PyTorch defaults; the paper does not give them).
    weight_decay
        L2 penalty of Adam (0: none, as in the paper).
    grad_clip
        Clip the gradient norm to this value (0: no clipping).
    warmup_steps
        Linear learning-rate warm-up from 0 over this many steps (0: none, the paper's constant rate).
    """

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        check_adam_options(self.lr, self.betas, self.grad_clip)
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(frozen=True)
class CelleScheduleConfig:
    """Step budget, validation and logging.

    Attributes
    ----------
    max_steps
        Optimizer steps. The paper trained to convergence (130 epochs); with its 80% training split of
        OpenCell (about 1,000 proteins x a few hundred crops) and no stated batch size the step count
        is not given, so the paper preset's 1,000,000 is a budget, not a published number.
    eval_every
        Validate every this many steps (0: once per pass over the training split); also at the end.
    eval_batches
        Validate on this many batches (the first ones, store order); 0: the whole split.
    eval_blank_sequence
        Also report the validation losses with every sequence replaced by padding (``blank_*``).
    log_every
        Log averaged training metrics every this many steps.
    """

    max_steps: int = 1_000_000
    eval_every: int = 5000
    eval_batches: int = 0
    eval_blank_sequence: bool = False
    log_every: int = 50

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, f"schedule.max_steps must be >= 1, got {self.max_steps}")
        _check(self.eval_every >= 0, f"schedule.eval_every must be >= 0, got {self.eval_every}")
        _check(self.eval_batches >= 0, f"schedule.eval_batches must be >= 0, got {self.eval_batches}")
        _check(self.log_every >= 1, f"schedule.log_every must be >= 1, got {self.log_every}")


@dataclass(frozen=True)
class TrainCelleConfig:
    """Everything :func:`train_celle` needs. Presets: :meth:`paper`, :meth:`tiny`.

    Attributes
    ----------
    model, data, tokenizers, embedder, optim, schedule
        See :class:`~protloc.models.celle.CelleConfig`, :class:`CelleDataConfig`,
        :class:`TokenizerConfig`, :class:`EmbedderConfig`, :class:`CelleOptimConfig`,
        :class:`CelleScheduleConfig`.
    mixed_precision
        ``"no"``, ``"bf16"`` or ``"fp16"`` (GPU only; CPU runs fall back to float32).
    seed
        Seeds initialisation, data order, augmentation and token masks.
    save_every
        Write ``last/`` every this many steps (0: at every validation); also at the end.
    """

    model: CelleConfig = field(default_factory=CelleConfig.paper)
    data: CelleDataConfig = field(default_factory=CelleDataConfig)
    tokenizers: TokenizerConfig = field(default_factory=TokenizerConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    optim: CelleOptimConfig = field(default_factory=CelleOptimConfig)
    schedule: CelleScheduleConfig = field(default_factory=CelleScheduleConfig)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    save_every: int = 5000

    def __post_init__(self) -> None:
        check_run_options(self.mixed_precision, self.save_every)
        _check(
            self.data.image_size % self.model.grid_size == 0,
            f"data.image_size ({self.data.image_size}) is not a multiple of model.grid_size ({self.model.grid_size})",
        )

    @classmethod
    def paper(cls, store: str = "", *, nucleus: str = "", threshold: str = "") -> TrainCelleConfig:
        """The paper's protocol (S.3.6): the depth-32 model on 256 px crops, Adam 3e-4, TAPE embeddings."""
        return cls(
            data=CelleDataConfig(store=store, num_workers=4),
            tokenizers=TokenizerConfig(nucleus=nucleus, threshold=threshold),
        )

    @classmethod
    def tiny(cls, store: str = "", *, nucleus: str = "", threshold: str = "") -> TrainCelleConfig:
        """A CPU demo: the tiny model (depth 2, width 64, 8 x 8 grids of 128 codes, one-hot text) on 64 px
        images (the tiny VQGANs' size), batch 16, Adam 3e-4 with 100 warm-up steps, gradient norm clipped
        at 1, 2,500 steps, tokens of seen views cached (the VQGAN encoders cost more than this transformer)."""
        return cls(
            model=CelleConfig.tiny(),
            data=CelleDataConfig(store=store, image_size=64, batch_size=16, token_cache=200_000),
            tokenizers=TokenizerConfig(nucleus=nucleus, threshold=threshold),
            optim=CelleOptimConfig(warmup_steps=100, grad_clip=1.0),
            schedule=CelleScheduleConfig(
                max_steps=2500, eval_every=250, eval_batches=0, eval_blank_sequence=True, log_every=10
            ),
            save_every=0,
        )



@torch.no_grad()
def _tokenize_images(tokenizer: VQGAN, images: Tensor) -> Tensor:
    """Token grid ``[B, g, g]`` of ``[B, 1, S, S]`` images with a frozen VQGAN (float32, no autocast)."""
    with torch.autocast(device_type=images.device.type, enabled=False):
        return tokenizer.encode(images.float())[1]


# --------------------------------------------------------------------------------------------------
# the loss module and evaluation
# --------------------------------------------------------------------------------------------------


class _LossModule(nn.Module):
    """Puts ``Celle.loss`` behind ``forward`` (DDP synchronises gradients and Accelerate applies
    autocast only through ``forward``). With several processes, ``count_reducer`` makes each segment's
    loss the global batch's mean (see :meth:`Celle.loss`)."""

    def __init__(self, model: Celle, count_reducer: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.model = model
        self.count_reducer = count_reducer

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.model.loss(batch, count_reducer=self.count_reducer)


class _Batches:
    """Turns loader batches into model batches: tokens from the frozen VQGANs, text from the encoder.

    With ``cache_items > 0`` the tokens of each image view ``(index, view)`` are kept (int16, CPU,
    least recently used dropped), so a view seen again skips the VQGAN encoders; the tokens are the
    same either way.
    """

    def __init__(
        self,
        nucleus: VQGAN,
        threshold: VQGAN,
        encoder: SequenceEncoder,
        device: torch.device,
        *,
        cache_items: int = 0,
    ) -> None:
        self.nucleus, self.threshold, self.encoder, self.device = nucleus, threshold, encoder, device
        self.cache_items = int(cache_items)
        self.cache: OrderedDict[tuple[int, int], Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def _encode(self, nuc: Tensor, thr: Tensor) -> tuple[Tensor, Tensor]:
        pin = self.device.type == "cuda"
        nuc = nuc.to(self.device, non_blocking=pin)
        thr = thr.to(self.device, non_blocking=pin)
        return _tokenize_images(self.nucleus, nuc), _tokenize_images(self.threshold, thr)

    def tokens(self, batch: Mapping[str, Any], *, cache: bool = True) -> dict[str, Tensor]:
        if not (cache and self.cache_items and "view" in batch):
            nuc, thr = self._encode(batch["nucleus"], batch["threshold"])
            return {"nucleus": nuc, "threshold": thr}
        keys = list(zip(batch["index"].tolist(), batch["view"].tolist(), strict=True))
        found: list[Tensor | None] = []
        for key in keys:
            hit = self.cache.get(key)
            if hit is not None:
                self.cache.move_to_end(key)
            found.append(hit)
        todo = [j for j, t in enumerate(found) if t is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            sel = torch.tensor(todo)
            nuc, thr = self._encode(batch["nucleus"][sel], batch["threshold"][sel])
            small = max(self.nucleus.config.n_embed, self.threshold.config.n_embed) <= 1 << 15
            both = torch.stack([nuc.flatten(1), thr.flatten(1)], dim=1)  # [n, 2, G]
            both = both.to("cpu", torch.int16 if small else torch.int32)
            for j, pair in zip(todo, both, strict=True):
                found[j] = pair
                self.cache[keys[j]] = pair
            while len(self.cache) > self.cache_items:
                self.cache.popitem(last=False)
        stacked = torch.stack([t for t in found if t is not None]).to(self.device, torch.int64)  # [B, 2, G]
        g = self.nucleus.grid_size
        return {"nucleus": stacked[:, 0].view(-1, g, g), "threshold": stacked[:, 1].view(-1, g, g)}

    def text(self, batch: Mapping[str, Any], encoder: SequenceEncoder | None = None) -> dict[str, Tensor]:
        return (encoder or self.encoder)(batch["sequence"], batch["add_end"])


#: Terms :meth:`protloc.models.celle.Celle.loss` may return.
_LOSS_KEYS = (
    "loss", "loss_text", "loss_nucleus", "loss_threshold", "acc_text", "acc_nucleus", "acc_threshold", "mask_ratio",
)  # fmt: skip


@torch.no_grad()
def _evaluate(
    model: Celle,
    val_batches: list[dict[str, Any]],
    batches: _Batches,
    accelerator: Any,
    *,
    seed: int,
    blank: SequenceEncoder | None,
) -> dict[str, float]:
    """Losses and accuracies per segment over the validation batches (eval mode, deterministic).

    Each batch's means are weighted by its number of samples. Masked-mode token masks come from a
    generator seeded by ``seed`` and the batch number, so every validation sees the same masks.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device
    # Every term the loss may return, with its own sample count: a term can be absent from a batch (no
    # masked residue in it, say), and processes must reduce the same vector.
    prefixes = ("", "blank_") if blank is not None else ("",)
    keys = [p + k for p in prefixes for k in _LOSS_KEYS]
    sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in keys}
    counts = {k: torch.zeros((), dtype=torch.float64, device=device) for k in keys}
    count = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for i, vb in enumerate(val_batches):
            n = vb["nucleus"].shape[0]
            runs = [("", batches.text(vb))]
            if blank is not None:
                runs.append(("blank_", batches.text(vb, blank)))
            for prefix, text in runs:
                gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
                with accelerator.autocast():
                    out = model.loss({**vb, **text}, generator=gen)
                for key, value in out.items():
                    name = prefix + key
                    if name not in sums:
                        raise RuntimeError(f"unexpected loss term {key!r}: add it to _LOSS_KEYS")
                    sums[name] = sums[name] + value.detach().double() * n
                    counts[name] = counts[name] + n
            count += n
    finally:
        model.train(was_training)
    if accelerator.num_processes > 1:
        packed = torch.cat([torch.stack([sums[k] for k in keys]), torch.stack([counts[k] for k in keys]), count[None]])
        packed = accelerator.reduce(packed, "sum")
        sums = {k: packed[i] for i, k in enumerate(keys)}
        counts = {k: packed[len(keys) + i] for i, k in enumerate(keys)}
        count = packed[-1]
    if float(count) == 0:
        raise RuntimeError("validation saw no samples")
    return {k: float(sums[k]) / float(counts[k]) for k in sorted(keys) if float(counts[k]) > 0}


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------


def _open_store(cfg: TrainCelleConfig) -> CropStore:
    if not cfg.data.store:
        raise ConfigError("data.store is not set: give the CELL-E crop store from `protloc prepare` (OUT/celle.zarr)")
    store = CropStore.open(cfg.data.store)
    missing = [c for c in ("nucleus", "protein", "threshold") if c not in store.channels]
    if missing:
        raise InputError(
            f"the store lacks channel(s) {missing} (it has {store.channels}); use the CELL-E store (celle.zarr) "
            "of `protloc prepare`",
            path=store.path,
        )
    check_store_splits(store, cfg.data.train_split, cfg.data.val_split)
    return store


def _check_tokenizer(cfg: TrainCelleConfig, kind: str, vq: VQGAN, ckpt: Path) -> None:
    c, m = vq.config, cfg.model
    codes = m.num_nucleus_codes if kind == "nucleus" else m.num_threshold_codes
    problems = []
    if c.image_size != cfg.data.image_size:
        problems.append(f"it takes {c.image_size} px images, data.image_size is {cfg.data.image_size}")
    if c.grid_size != m.grid_size:
        problems.append(f"it makes {c.grid_size} x {c.grid_size} tokens, model.grid_size is {m.grid_size}")
    if c.n_embed != codes:
        problems.append(f"it has {c.n_embed} codes, model.num_{kind}_codes is {codes}")
    if problems:
        raise ConfigError(f"the {kind} tokenizer ({ckpt}) does not fit this CELL-E: " + "; ".join(problems))


def _lr_at(cfg: CelleOptimConfig, step: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def train_celle(
    cfg: TrainCelleConfig,
    *,
    run_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the CELL-E transformer on a CELL-E crop store with two frozen VQGAN tokenizers.

    Parameters
    ----------
    cfg
        The training configuration (``data.store``, ``tokenizers.nucleus`` and ``tokenizers.threshold``
        must be set).
    run_dir
        Output folder (``config.yaml``, ``metrics.jsonl``, ``last/``, ``best/``).
    resume
        Continue the run in ``run_dir`` from ``last/`` (weights, optimizer, step, RNG, data position);
        ``cfg.schedule.max_steps`` may be raised, the model and tokenizers must be the run's.
    progress
        Show a tqdm progress bar.

    Returns
    -------
    dict
        ``steps``, ``steps_this_run``, ``epochs``, ``best_val_loss``, ``best_step``, ``samples_per_s``
        (training throughput of this call, validation excluded), ``last_val`` (the last validation
        record), ``run_dir``.

    Raises
    ------
    InputError
        If the store, sequences or tokenizers are missing or do not fit, ``run_dir`` already holds a
        run (without ``resume``) or holds none to resume.
    ConfigError
        If a setting is missing or inconsistent, or ``resume`` meets a different model.
    """
    run = Path(run_dir)
    last_dir, best_dir = check_run_dir(run, resume=resume)
    store = _open_store(cfg)
    seq_path = Path(cfg.data.sequences) if cfg.data.sequences else default_sequences(store.path)
    sequences = read_sequences(seq_path)
    saved_extra: dict[str, Any] = {}
    if resume:
        saved_extra = check_resume_model(last_dir, cfg.model, config_cls=CelleConfig, model_cls=Celle)
    dcfg, ocfg, scfg = cfg.data, cfg.optim, cfg.schedule

    accelerator = make_accelerator(cfg.mixed_precision)
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    device = accelerator.device
    tok_sha = saved_extra.get("tokenizers", {})
    vq_nuc, nuc_ckpt, nuc_sha = load_tokenizer(
        cfg.tokenizers.nucleus, "nucleus", sha256=tok_sha.get("nucleus_sha256"), map_location=device
    )
    vq_thr, thr_ckpt, thr_sha = load_tokenizer(
        cfg.tokenizers.threshold, "threshold", sha256=tok_sha.get("threshold_sha256"), map_location=device
    )
    _check_tokenizer(cfg, "nucleus", vq_nuc, nuc_ckpt)
    _check_tokenizer(cfg, "threshold", vq_thr, thr_ckpt)
    encoder = SequenceEncoder(cfg.model, cfg.embedder, device=device, blank=dcfg.text == "none")
    blank_encoder = None
    if scfg.eval_blank_sequence and dcfg.text != "none":
        blank_encoder = SequenceEncoder(cfg.model, cfg.embedder, device=device, blank=True)
    batches = _Batches(vq_nuc, vq_thr, encoder, device, cache_items=dcfg.token_cache)
    if main:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
    seed_everything(cfg.seed)

    # ---- data ----------------------------------------------------------------------------------
    cache = dcfg.chunk_window + 1
    common = dict(
        sequences=sequences,
        image_size=dcfg.image_size,
        crop_size=dcfg.crop_size,
        max_residues=cfg.model.max_residues,
        eval_window=dcfg.eval_window,
        seed=cfg.seed,
        cache_chunks=cache,
    )
    train_ds = CelleDataset(store, split=dcfg.train_split, augment=dcfg.augment, **common)
    val_ds = CelleDataset(store, split=dcfg.val_split, augment=False, **common)
    sampler = CropBatchSampler(
        train_ds,
        dcfg.batch_size,
        shuffle=dcfg.shuffle,
        window=dcfg.chunk_window,
        drop_last=True,
        seed=cfg.seed,
        num_replicas=world,
        rank=rank,
    )
    steps_per_epoch = len(sampler)
    if steps_per_epoch == 0:
        raise InputError(
            f"the training split has {len(train_ds)} crops, fewer than one batch of {dcfg.batch_size} per process",
            path=store.path,
        )
    val_sampler = CropBatchSampler(
        val_ds, dcfg.batch_size, shuffle="none", seed=cfg.seed, num_replicas=world, rank=rank
    )
    pin = device.type == "cuda"
    loader = DataLoader(
        train_ds,
        batch_sampler=sampler,
        num_workers=dcfg.num_workers,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(cfg.seed),  # iterators must not move the global RNG
    )
    eval_every = scfg.eval_every or steps_per_epoch

    # Validation is deterministic: its tokens are computed once and kept (a few bytes per token).
    val_cache: list[dict[str, Any]] = []

    def validation_batches() -> list[dict[str, Any]]:
        if not val_cache:
            for i, idx in enumerate(val_sampler):
                if scfg.eval_batches and i >= scfg.eval_batches:
                    break
                raw = val_ds.read_batch(idx)
                tokens = batches.tokens(raw, cache=False)
                val_cache.append({**tokens, "sequence": raw["sequence"], "add_end": raw["add_end"]})
        return val_cache

    # ---- model, optimizer, state ---------------------------------------------------------------
    model = Celle(cfg.model)
    seed_process(cfg.seed, rank)  # after the initialisation, which must be the same on every process
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad],
        lr=ocfg.lr,
        betas=ocfg.betas,
        weight_decay=ocfg.weight_decay,
    )
    step = epoch = batch_in_epoch = samples_seen = 0
    best_val, best_step = math.inf, -1
    metrics = MetricsLogger(run / METRICS_FILE)
    if main:
        remove_stale_temporaries(run)
        if not resume and metrics.drop_after(-1):
            # metrics of an earlier attempt that died before its first checkpoint: this run starts over
            logger.info("cleared the metrics of an earlier attempt that never reached a checkpoint")
    if resume:
        load_model_weights(last_dir, model, strict=True)
        state = load_trainer_state(last_dir)
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        samples_seen = int(state.get("samples_seen", 0))
        best_val, best_step = float(state["best_val_loss"]), int(state["best_step"])
        if main:
            dropped = metrics.drop_after(step)
            if dropped:
                logger.info("dropped %d metric records logged after step %d", dropped, step)
        restore_process_rng(state, accelerator, seed=cfg.seed, step=step)
        logger.info("resumed %s at step %d (epoch %d, batch %d)", run, step, epoch, batch_in_epoch)
    if batch_in_epoch >= steps_per_epoch:
        epoch, batch_in_epoch = epoch + 1, 0
    count_reducer = None
    if world > 1:

        def count_reducer(counts: Tensor) -> Tensor:
            return accelerator.reduce(counts, reduction="sum") / world

    loss_module = _LossModule(model, count_reducer)
    wrapped, optimizer = accelerator.prepare(loss_module, optimizer)
    start_step = step
    last_val: dict[str, Any] = {}
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("CELL-E: %.3g M trainable parameters, %d steps per epoch", n_params / 1e6, steps_per_epoch)

    def trainer_state() -> dict[str, Any]:
        return {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "samples_seen": samples_seen,
            "best_val_loss": best_val,
            "best_step": best_step,
        }

    def extra(**more: Any) -> dict[str, Any]:
        return {
            "step": step,
            "image_size": dcfg.image_size,
            "crop_size": dcfg.crop_size,
            "text": dcfg.text,
            "eval_window": dcfg.eval_window,
            "embedder_path": cfg.embedder.path,
            "tokenizers": {
                "nucleus": str(nuc_ckpt.resolve()),
                "nucleus_sha256": nuc_sha,
                "threshold": str(thr_ckpt.resolve()),
                "threshold_sha256": thr_sha,
            },
            **more,
        }

    def save_last() -> None:
        accelerator.wait_for_everyone()
        rng = process_rng_states(accelerator)  # a collective: before the main-process-only write
        if main:
            state = {**trainer_state(), **rng}
            save_checkpoint(last_dir, model=model, config=cfg.model, trainer_state=state, extra=extra())

    def set_epoch(e: int, start: int) -> None:
        sampler.set_epoch(e, start)
        train_ds.set_epoch(e)

    # ---- loop ----------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    max_steps = scfg.max_steps
    bar = tqdm(
        total=max_steps, initial=step, desc="celle", unit="step", disable=not (progress and main), dynamic_ncols=True
    )
    window: dict[str, float] = {}
    window_counts: dict[str, int] = {}
    window_steps, window_samples, window_time = 0, 0, 0.0
    train_time, train_samples = 0.0, 0
    saved_at = step if resume else -1
    wrapped.train()
    try:
        if step >= max_steps:
            logger.info("the run already reached max_steps=%d; nothing to train", max_steps)
        else:
            t_last = time.perf_counter()
            for ep, index, raw in infinite_loader(loader, set_epoch, start_epoch=epoch, start_batch=batch_in_epoch):
                batch = {**batches.tokens(raw), **batches.text(raw)}
                lr = _lr_at(ocfg, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with accelerator.autocast():
                    out = wrapped(batch)
                loss = out["loss"]
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                if ocfg.grad_clip > 0:
                    accelerator.clip_grad_norm_(wrapped.parameters(), ocfg.grad_clip)
                optimizer.step()

                step += 1
                epoch, batch_in_epoch = ep, index + 1
                n = int(batch["nucleus"].shape[0]) * world
                samples_seen += n
                for key, value in out.items():
                    # A term absent from a step (no masked residue in the batch, say) is averaged over the
                    # steps that had it.
                    window[key] = window.get(key, 0.0) + float(value.detach())
                    window_counts[key] = window_counts.get(key, 0) + 1
                window_steps += 1
                window_samples += n
                now = time.perf_counter()
                window_time += now - t_last
                train_time += now - t_last
                train_samples += n
                bar.update(1)

                if step % scfg.log_every == 0:
                    means = mean_over_processes(accelerator, window, window_counts)
                    if not math.isfinite(means["loss"]):
                        logger.warning("training loss is %s at step %d", means["loss"], step)
                    if main:
                        metrics.log(
                            step,
                            "train",
                            means,
                            lr=lr,
                            epoch=epoch + batch_in_epoch / steps_per_epoch,
                            samples_per_s=window_samples / max(window_time, 1e-9),
                        )
                    bar.set_postfix(loss=f"{means['loss']:.4g}", refresh=False)
                    window, window_counts, window_steps, window_samples, window_time = {}, {}, 0, 0, 0.0

                last_step = step >= max_steps
                evaluated = False
                if step % eval_every == 0 or last_step:
                    val = _evaluate(
                        model, validation_batches(), batches, accelerator, seed=cfg.seed, blank=blank_encoder
                    )
                    evaluated = True
                    improved = val["loss"] < best_val
                    if improved:
                        best_val, best_step = val["loss"], step
                        accelerator.wait_for_everyone()
                        if main:
                            save_checkpoint(best_dir, model=model, config=cfg.model, extra=extra(val=val))
                    last_val = {"step": step, **val}
                    if main:
                        metrics.log(step, "val", val, best_loss=best_val, improved=improved)
                    bar.set_postfix(loss=f"{float(loss.detach()):.4g}", val=f"{val['loss']:.4g}", refresh=False)
                if (cfg.save_every and step % cfg.save_every == 0) or (not cfg.save_every and evaluated):
                    save_last()
                    saved_at = step
                if last_step:
                    break
                t_last = time.perf_counter()
        if saved_at != step:
            save_last()
    finally:
        bar.close()
        metrics.close()

    summary = {
        "steps": step,
        "steps_this_run": step - start_step,
        "epochs": epoch + batch_in_epoch / steps_per_epoch,
        "best_val_loss": best_val,
        "best_step": best_step,
        "samples_per_s": train_samples / train_time if train_time > 0 else 0.0,
        "samples_seen": samples_seen,
        "token_cache_hit_rate": batches.hits / max(1, batches.hits + batches.misses),
        "last_val": last_val,
        "run_dir": str(run),
    }
    logger.info(
        "trained CELL-E for %d steps (%.3g samples/s); best validation loss %.5g at step %d",
        step,
        summary["samples_per_s"],
        best_val,
        best_step,
    )
    return summary

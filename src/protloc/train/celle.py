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
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from protloc.data.datasets import CelleDataset
from protloc.data.sequences import default_sequences, read_sequences
from protloc.errors import ConfigError
from protloc.eval.load import load_tokenizer
from protloc.models.celle import Celle, CelleConfig
from protloc.models.embedders import EmbedderConfig, SequenceEncoder
from protloc.models.vqgan import VQGAN
from protloc.train.engine import (
    CropDataConfig,
    LossModule,
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
from protloc.train.loop import check_config as _check

__all__ = [
    "CelleDataConfig",
    "CelleOptimConfig",
    "CelleScheduleConfig",
    "CelleTokenizerConfig",
    "TrainCelleConfig",
    "train_celle",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CelleDataConfig(CropDataConfig):
    """Which crops and sequences, at which size, in which batches (and the fields of :class:`CropDataConfig`).

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
    augment
        Random crops, flips and sequence windows in training (paper S.3.6).
    text
        ``"sequence"`` (the protein's sequence) or ``"none"`` (every sequence replaced by padding:
        the "no sequence" ablation).
    eval_window
        Window of sequences longer than ``model.max_residues`` in validation: ``"start"``
        (N-terminal), ``"center"`` or ``"end"``.
    token_cache
        Keep the tokens of up to this many training image views (crop x flips x crop offset) in
        memory, so a view seen again is not re-encoded by the VQGANs (2 x grid tokens of int16 each:
        1 KB at the paper's 16 x 16). Pays off when views repeat: flips only (``crop_size`` 0) give 4
        per crop. 0: encode every batch.
    """

    sequences: str = ""
    image_size: int = 256
    crop_size: int = 0
    text: Literal["sequence", "none"] = "sequence"
    eval_window: Literal["start", "center", "end"] = "start"
    token_cache: int = 0

    def __post_init__(self) -> None:
        _check(self.image_size >= 1, f"data.image_size must be >= 1, got {self.image_size}")
        _check(self.token_cache >= 0, f"data.token_cache must be >= 0, got {self.token_cache}")
        _check(self.crop_size >= 0, f"data.crop_size must be >= 0 (0 = whole crop), got {self.crop_size}")
        _check(
            self.crop_size == 0 or self.crop_size >= self.image_size,
            f"data.crop_size ({self.crop_size}) must be 0 or at least data.image_size ({self.image_size})",
        )
        super().__post_init__()
        _check(self.text in ("sequence", "none"), f"data.text must be 'sequence' or 'none', got {self.text!r}")
        _check(
            self.eval_window in ("start", "center", "end"),
            f"data.eval_window must be 'start', 'center' or 'end', got {self.eval_window!r}",
        )


@dataclass(frozen=True)
class CelleTokenizerConfig:
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
class CelleScheduleConfig(ScheduleConfig):
    """Step budget, validation and logging (and the fields of :class:`ScheduleConfig`).

    Attributes
    ----------
    max_steps
        Optimizer steps. The paper trained to convergence (130 epochs); with its 80% training split of
        OpenCell (about 1,000 proteins x a few hundred crops) and no stated batch size the step count
        is not given, so the paper preset's 1,000,000 is a budget, not a published number.
    eval_batches
        Validate on this many batches (the first ones, store order); 0: the whole split.
    eval_blank_sequence
        Also report the validation losses with every sequence replaced by padding (``blank_*``).
    """

    max_steps: int = 1_000_000
    eval_every: int = 5000
    eval_blank_sequence: bool = False


@dataclass(frozen=True)
class TrainCelleConfig:
    """Everything :func:`train_celle` needs. Presets: :meth:`paper`, :meth:`tiny`.

    Attributes
    ----------
    model, data, tokenizers, embedder, optim, schedule
        See :class:`~protloc.models.celle.CelleConfig`, :class:`CelleDataConfig`,
        :class:`CelleTokenizerConfig`, :class:`EmbedderConfig`, :class:`CelleOptimConfig`,
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
    tokenizers: CelleTokenizerConfig = field(default_factory=CelleTokenizerConfig)
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
            tokenizers=CelleTokenizerConfig(nucleus=nucleus, threshold=threshold),
        )

    @classmethod
    def tiny(cls, store: str = "", *, nucleus: str = "", threshold: str = "") -> TrainCelleConfig:
        """A CPU demo: the tiny model (depth 2, width 64, 8 x 8 grids of 128 codes, one-hot text) on 64 px
        images (the tiny VQGANs' size), batch 16, Adam 3e-4 with 100 warm-up steps, gradient norm clipped
        at 1, 2,500 steps, tokens of seen views cached (the VQGAN encoders cost more than this transformer)."""
        return cls(
            model=CelleConfig.tiny(),
            data=CelleDataConfig(store=store, image_size=64, batch_size=16, token_cache=200_000),
            tokenizers=CelleTokenizerConfig(nucleus=nucleus, threshold=threshold),
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
# batches and evaluation
# --------------------------------------------------------------------------------------------------


class _Batches:
    """Turns loader batches into model batches: tokens from the frozen VQGANs, text from the encoder.

    With ``cache_items > 0`` the tokens of each image view ``(index, view)`` are kept (int16, CPU,
    least recently used dropped), so a view seen again skips the VQGAN encoders; the tokens are the
    same either way. :meth:`validation` tokenizes the (deterministic) validation batches once.
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
        self.val_batches: list[dict[str, Any]] = []

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

    def validation(self, dataset: CelleDataset, sampler: Any, *, max_batches: int) -> list[dict[str, Any]]:
        """The validation batches' tokens and sequences (the first ``max_batches``; 0: all).

        Validation is deterministic: the tokens are computed at the first call and kept (a few bytes per
        token); later calls return the same list.
        """
        if not self.val_batches:
            for i, idx in enumerate(sampler):
                if max_batches and i >= max_batches:
                    break
                raw = dataset.read_batch(idx)
                tokens = self.tokens(raw, cache=False)
                self.val_batches.append({**tokens, "sequence": raw["sequence"], "add_end": raw["add_end"]})
        return self.val_batches


#: Terms :meth:`protloc.models.celle.Celle.loss` may return.
_LOSS_KEYS = ("loss", "loss_text", "loss_nucleus", "loss_threshold")
_LOSS_KEYS += ("acc_text", "acc_nucleus", "acc_threshold", "mask_ratio")


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
    device = accelerator.device
    # Every term the loss may return, with its own sample count: a term can be absent from a batch (no
    # masked residue in it, say), and processes must reduce the same vector.
    prefixes = ("", "blank_") if blank is not None else ("",)
    keys = [p + k for p in prefixes for k in _LOSS_KEYS]
    sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in keys}
    counts = {k: torch.zeros((), dtype=torch.float64, device=device) for k in keys}
    count = torch.zeros((), dtype=torch.float64, device=device)
    with eval_mode(model):
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
    *reduced, count = sum_over_processes(accelerator, [*(sums[k] for k in keys), *(counts[k] for k in keys), count])
    sums, counts = (
        dict(zip(keys, reduced[: len(keys)], strict=True)),
        dict(zip(keys, reduced[len(keys) :], strict=True)),
    )
    if float(count) == 0:
        raise RuntimeError("validation saw no samples")
    return {k: float(sums[k]) / float(counts[k]) for k in sorted(keys) if float(counts[k]) > 0}


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------


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


def _load_tokenizers(
    cfg: TrainCelleConfig, saved: Mapping[str, Any], device: torch.device
) -> tuple[VQGAN, VQGAN, dict]:
    """Both frozen tokenizers, checked against the config (and, when resuming, against the SHA-256 of the
    weights the run was trained with: ``saved`` = ``last/``'s ``tokenizers`` record); returns them and the
    record for the checkpoints (resolved paths and SHA-256)."""
    record: dict[str, str] = {}
    vqgans = []
    for kind in ("nucleus", "threshold"):
        vq, ckpt, sha = load_tokenizer(
            getattr(cfg.tokenizers, kind), kind, sha256=saved.get(f"{kind}_sha256"), map_location=device
        )
        vqgans.append((kind, vq, ckpt))
        record.update({kind: str(ckpt.resolve()), f"{kind}_sha256": sha})
    for kind, vq, ckpt in vqgans:
        _check_tokenizer(cfg, kind, vq, ckpt)
    return vqgans[0][1], vqgans[1][1], record


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
        (training throughput of this call, validation excluded), ``samples_seen``,
        ``token_cache_hit_rate``, ``last_val`` (the last validation record), ``run_dir``.

    Raises
    ------
    InputError
        If the store, sequences or tokenizers are missing or do not fit, ``run_dir`` already holds a
        run (without ``resume``) or holds none to resume.
    ConfigError
        If a setting is missing or inconsistent, or ``resume`` meets a different model.
    """
    run = Run(
        run_dir, resume=resume, mixed_precision=cfg.mixed_precision, name="celle", unit="samples", progress=progress
    )
    source = "the CELL-E crop store from `protloc prepare` (OUT/celle.zarr)"
    store = open_crop_store(cfg.data, source=source, channels=("nucleus", "protein", "threshold"))
    run.use_store(store)  # resuming: the run's own crops, or a clear refusal
    sequences = read_sequences(Path(cfg.data.sequences) if cfg.data.sequences else default_sequences(store.path))
    saved_extra = run.check_resume_model(cfg.model, config_cls=CelleConfig, model_cls=Celle)
    dcfg, ocfg, scfg = cfg.data, cfg.optim, cfg.schedule

    # ---- frozen tokenizers and sequence encoders (before seeding: they are loaded, not drawn) ---
    vq_nuc, vq_thr, tokenizers = _load_tokenizers(cfg, saved_extra.get("tokenizers", {}), run.device)
    encoder = SequenceEncoder(cfg.model, cfg.embedder, device=run.device, blank=dcfg.text == "none")
    blank_encoder = None
    if scfg.eval_blank_sequence and dcfg.text != "none":
        blank_encoder = SequenceEncoder(cfg.model, cfg.embedder, device=run.device, blank=True)
    batches = _Batches(vq_nuc, vq_thr, encoder, run.device, cache_items=dcfg.token_cache)
    run.setup(cfg)

    # ---- data ----------------------------------------------------------------------------------
    common = dict(
        sequences=sequences,
        image_size=dcfg.image_size,
        crop_size=dcfg.crop_size,
        max_residues=cfg.model.max_residues,
        eval_window=dcfg.eval_window,
        seed=cfg.seed,
        cache_chunks=chunk_cache(dcfg),
    )
    train_ds = CelleDataset(store, split=dcfg.train_split, augment=dcfg.augment, **common)
    val_ds = CelleDataset(store, split=dcfg.val_split, augment=False, **common)
    sampler, val_sampler = crop_samplers(run, dcfg, train_ds, val_ds)
    loader = run.train_loader(train_ds, sampler, num_workers=dcfg.num_workers, path=store.path)

    # ---- model, optimizer, state ---------------------------------------------------------------
    model = Celle(cfg.model)
    seed_process(cfg.seed, run.rank)  # after the initialisation, which must be the same on every process
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=ocfg.lr, betas=ocfg.betas, weight_decay=ocfg.weight_decay)
    run.attach(
        model,
        cfg.model,
        state=lambda: {"optimizer": optimizer.state_dict()},
        extra=lambda **more: {
            "step": run.step,
            "image_size": dcfg.image_size,
            "crop_size": dcfg.crop_size,
            "text": dcfg.text,
            "eval_window": dcfg.eval_window,
            "embedder_path": cfg.embedder.path,
            "tokenizers": tokenizers,
            **more,
        },
    )
    if (state := run.resume()) is not None:
        optimizer.load_state_dict(state["optimizer"])
    count_reducer = None
    if run.world > 1:
        # Each segment's loss is then the global batch's mean, not a mean of per-process means (Celle.loss).
        def count_reducer(counts: Tensor) -> Tensor:
            return run.accelerator.reduce(counts, reduction="sum") / run.world

    wrapped, optimizer = run.accelerator.prepare(LossModule(model, count_reducer=count_reducer), optimizer)
    n_params = sum(p.numel() for p in trainable)
    logger.info("CELL-E: %.3g M trainable parameters, %d steps per epoch", n_params / 1e6, run.steps_per_epoch)

    # ---- loop ----------------------------------------------------------------------------------
    wrapped.train()
    with run:
        for raw in run.batches(loader):
            batch = {**batches.tokens(raw), **batches.text(raw)}
            lr = _lr_at(ocfg, run.step)
            set_lr(lr, optimizer)
            with run.accelerator.autocast():
                out = wrapped(batch)
            optimizer.zero_grad(set_to_none=True)
            run.accelerator.backward(out["loss"])
            clip_gradients(run.accelerator, wrapped.parameters(), ocfg.grad_clip)
            optimizer.step()
            # A term absent from a step (no masked residue in the batch, say) is averaged over the steps
            # that had it.
            run.step_done(batch["nucleus"].shape[0], {k: float(v.detach()) for k, v in out.items()})

            if run.should_log():
                run.log("train", run.window_means(), lr=lr, **run.progress())
            if run.should_eval():
                val_batches = batches.validation(val_ds, val_sampler, max_batches=scfg.eval_batches)
                run.evaluated(
                    _evaluate(model, val_batches, batches, run.accelerator, seed=cfg.seed, blank=blank_encoder)
                )
            if run.end_step():
                break
    return run.finish(token_cache_hit_rate=batches.hits / max(1, batches.hits + batches.misses), last_val=run.last_val)

"""Training cytoself: one explicit loop, counted in optimizer steps (``protloc train cytoself``).

Protocol (paper Methods, "Training protocol"): Adam with learning rate 4e-4; the learning rate is
multiplied by 0.1 whenever the validation loss has not improved for 4 checks and training stops
after 12 checks without improvement. The paper checks once per epoch; here a check is every
``schedule.eval_every`` steps (``0`` = once per pass over the training split, the paper's epoch).
The plateau counter restarts after each reduction and the best checkpoint is kept besides the last
(both differ from the PyTorch reference, see ``shared/REFERENCE_NOTES.md``).

A run folder holds::

    config.yaml        the resolved TrainCytoselfConfig (model.num_classes filled in from the data)
    label_map.json     protein_id -> class index (the training split's proteins, sorted)
    metrics.jsonl      {"step", "split": "train" | "val", losses, perplexities, accuracies, lr, ...}
    last/  best/       checkpoints (model.safetensors + config.json [+ trainer_state.pt in last/])

``resume=True`` continues from ``last/``: weights, optimizer, plateau counters, step, RNG states and
the position in the data order, so a resumed run sees the batches an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from protloc._fs import atomic_write_text
from protloc.config import save_config
from protloc.data.datasets import CropBatchSampler, CropDataset, make_label_map
from protloc.data.io import CropStore
from protloc.errors import ConfigError, InputError
from protloc.models.checkpoint import (
    load_model_weights,
    load_trainer_state,
    save_checkpoint,
)
from protloc.models.cytoself import Cytoself, CytoselfConfig
from protloc.nn.syncbn import convert_sync_batchnorm
from protloc.train.loop import (
    MetricsLogger,
    PlateauController,
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
from protloc.train.loop import (
    check_config as _check,
)

__all__ = [
    "CytoselfDataConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainCytoselfConfig",
    "train_cytoself",
]

logger = logging.getLogger(__name__)

LABEL_MAP_FILE = "label_map.json"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class CytoselfDataConfig:
    """Where the crops come from and how they are batched.

    Attributes
    ----------
    store
        The crop store (``OUT/cytoself.zarr`` from ``protloc prepare``); must have ``train`` and
        ``val`` rows in its ``split`` column.
    channels
        Store channels fed to the model, in order; must equal ``model.channels``.
    batch_size
        Crops per optimizer step (per process).
    num_workers
        DataLoader worker processes (0: read in the training process).
    augment
        Random element of the dihedral group D4 (4 rotations x flip) per training crop.
    shuffle
        ``"chunks"``: chunk-shuffled order (shuffle Zarr chunks, then crops within a window of
        ``chunk_window`` chunks), about 20x faster reading than ``"random"`` (a uniform permutation).
    chunk_window
        Chunks mixed per window in ``"chunks"`` mode (also the per-process chunk cache size).
    train_split, val_split
        Values of the ``split`` column used for training and validation.
    """

    store: str = ""
    channels: tuple[str, ...] = ("protein", "nucleus_distance")
    batch_size: int = 32
    num_workers: int = 0
    augment: bool = True
    shuffle: Literal["chunks", "random"] = "chunks"
    chunk_window: int = 16
    train_split: str = "train"
    val_split: str = "val"

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        _check(len(self.channels) > 0, "data.channels must name at least one channel")
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(self.chunk_window >= 1, f"data.chunk_window must be >= 1, got {self.chunk_window}")
        _check(self.shuffle in ("chunks", "random"), f"data.shuffle must be 'chunks' or 'random', got {self.shuffle!r}")
        _check(self.train_split != self.val_split, "data.train_split and data.val_split must differ")


@dataclass(frozen=True)
class OptimConfig:
    """Adam (paper: learning rate 4e-4).

    Attributes
    ----------
    lr
        Initial learning rate.
    betas
        Adam's moment decay rates.
    weight_decay
        L2 penalty added by Adam (0 in the paper).
    grad_clip
        Clip the gradient norm to this value (0: no clipping, as in the paper).
    """

    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        check_adam_options(self.lr, self.betas, self.grad_clip)


@dataclass(frozen=True)
class ScheduleConfig:
    """Step budget, validation and the plateau schedule.

    Attributes
    ----------
    max_steps
        Optimizer steps to train for (0: no limit; the run ends by early stopping, as in the paper).
    eval_every
        Validate every this many steps (0: once per pass over the training split = the paper's epoch).
        Validation also runs at the last step.
    eval_batches
        Validate on this many batches (a fixed, spread-out subset of the split); 0 = the whole split.
    log_every
        Log averaged training metrics every this many steps.
    plateau_patience
        Validation checks without improvement before each learning-rate reduction (paper: 4 epochs).
    lr_factor
        Learning-rate multiplier at each reduction (paper: 0.1).
    stop_patience
        Consecutive checks without improvement before stopping (paper: 12 epochs; 0 = never).
    min_delta
        Smallest decrease of the validation loss that counts as an improvement.
    """

    max_steps: int = 0
    eval_every: int = 0
    eval_batches: int = 0
    log_every: int = 50
    plateau_patience: int = 4
    lr_factor: float = 0.1
    stop_patience: int = 12
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_steps", "eval_every", "eval_batches", "stop_patience"):
            _check(getattr(self, name) >= 0, f"schedule.{name} must be >= 0, got {getattr(self, name)}")
        _check(self.log_every >= 1, f"schedule.log_every must be >= 1, got {self.log_every}")
        _check(self.plateau_patience >= 1, f"schedule.plateau_patience must be >= 1, got {self.plateau_patience}")
        _check(0 < self.lr_factor <= 1, f"schedule.lr_factor must be in (0, 1], got {self.lr_factor}")
        _check(self.min_delta >= 0, f"schedule.min_delta must be >= 0, got {self.min_delta}")


def _paper_model() -> CytoselfConfig:
    return CytoselfConfig.paper()


@dataclass(frozen=True)
class TrainCytoselfConfig:
    """Everything ``train_cytoself`` needs. Presets: :meth:`paper`, :meth:`tiny`.

    Attributes
    ----------
    model
        The model. ``model.num_classes`` is always set to the number of proteins in the training
        split (the preset's value is a placeholder); ``model.channels`` must equal ``data.channels``.
    data, optim, schedule
        See :class:`CytoselfDataConfig`, :class:`OptimConfig`, :class:`ScheduleConfig`.
    mixed_precision
        ``"no"``, ``"bf16"`` or ``"fp16"`` (GPU only; CPU runs fall back to float32).
    sync_batchnorm
        With several processes, compute BatchNorm statistics over the whole global batch
        (:mod:`protloc.nn.syncbn`), so that ``N`` processes with batch ``B`` train like one process with
        batch ``N x B``; ``False`` keeps per-process statistics (cheaper, the usual DDP default). No
        effect on a one-process run.
    seed
        Seeds initialisation, data order and augmentation.
    save_every
        Write ``last/`` every this many steps (0: at every validation check); also at the end.
    """

    model: CytoselfConfig = field(default_factory=_paper_model)
    data: CytoselfDataConfig = field(default_factory=CytoselfDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    sync_batchnorm: bool = True
    seed: int = 0
    save_every: int = 5000

    def __post_init__(self) -> None:
        check_run_options(self.mixed_precision, self.save_every)

    @classmethod
    def paper(cls, store: str = "") -> TrainCytoselfConfig:
        """The paper's protocol: the published model, Adam 4e-4, one validation per epoch, lr x0.1
        after 4 epochs without improvement, stop after 12, no step limit."""
        return cls(
            model=CytoselfConfig.paper(),
            data=CytoselfDataConfig(store=store, num_workers=4),
            schedule=ScheduleConfig(max_steps=0, eval_every=0, log_every=50),
            save_every=5000,
        )

    @classmethod
    def tiny(cls, store: str = "") -> TrainCytoselfConfig:
        """A CPU demo: the tiny model, batch 32, validation every 100 steps, 2000 steps at most."""
        return cls(
            model=CytoselfConfig.tiny(),
            data=CytoselfDataConfig(store=store, batch_size=32),
            schedule=ScheduleConfig(max_steps=2000, eval_every=100, log_every=10),
            save_every=500,
        )


class _LossModule(nn.Module):
    """Puts ``Cytoself.loss`` behind ``forward``.

    Data-parallel wrappers synchronise gradients (and Accelerate applies autocast) only through
    ``forward``; calling ``model.loss`` on a wrapped model would bypass both.
    """

    def __init__(self, model: Cytoself) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.model.loss(batch)


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _read_label_map(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read the label map ({exc})", path=path) from exc
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise InputError("the label map must be a JSON object of protein_id -> class index", path=path)
    return {str(k): int(v) for k, v in data.items()}


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def _evaluate(
    model: Cytoself,
    loader: DataLoader,
    accelerator: Any,
    *,
    max_batches: int,
) -> dict[str, float]:
    """Mean of every loss / metric over the validation batches (weighted by batch size), eval mode."""
    was_training = model.training
    model.eval()
    sums: dict[str, Tensor] = {}
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    try:
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            batch = _to_device(batch, accelerator.device)
            with accelerator.autocast():
                out = model.loss(batch)
            n = batch["image"].shape[0]
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + value.detach().double() * n
            count += n
    finally:
        model.train(was_training)
    keys = list(sums)  # the model's order, the same on every rank
    if accelerator.num_processes > 1:
        # One collective call per evaluation; every rank runs the same number of batches.
        packed = torch.stack([sums[k] for k in keys] + [count])
        packed = accelerator.reduce(packed, reduction="sum")
        sums = {k: packed[i] for i, k in enumerate(keys)}
        count = packed[-1]
    total = float(count)
    if total == 0:
        raise RuntimeError("validation saw no crops")
    return {k: float(sums[k]) / total for k in keys}


def _resolve(cfg: TrainCytoselfConfig, label_map: Mapping[str, int], store: CropStore) -> TrainCytoselfConfig:
    if tuple(cfg.model.channels) != tuple(cfg.data.channels):
        raise ConfigError(
            f"data.channels {list(cfg.data.channels)} differ from model.channels {list(cfg.model.channels)}; "
            "set both (e.g. --set data.channels=[protein] --set model.channels=[protein])"
        )
    if store.size != cfg.model.input_size:
        raise InputError(
            f"the crops are {store.size}x{store.size} pixels but model.input_size is {cfg.model.input_size}",
            path=store.path,
        )
    n = len(label_map)
    if cfg.model.num_classes != n:
        logger.info("model.num_classes set to %d (proteins in the training split)", n)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=n))


def train_cytoself(
    cfg: TrainCytoselfConfig,
    *,
    run_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train cytoself on a crop store.

    Parameters
    ----------
    cfg
        The training configuration (``cfg.data.store`` must be set).
    run_dir
        Output folder (``config.yaml``, ``label_map.json``, ``metrics.jsonl``, ``last/``, ``best/``).
    resume
        Continue the run in ``run_dir`` from ``last/`` (weights, optimizer, plateau state, step,
        RNG, data position). ``cfg.schedule.max_steps`` may be raised to train longer; the model
        and the label map must be those of the run.
    progress
        Show a tqdm progress bar.

    Returns
    -------
    dict
        ``steps`` (total optimizer steps), ``epochs`` (passes over the training split, fractional),
        ``best_val_loss``, ``best_step``, ``stopped_early``, ``images_per_s`` (training throughput
        of this call, validation excluded), ``run_dir``.

    Raises
    ------
    InputError
        If the store is missing or has no ``train`` / ``val`` rows, channels are missing, the crop
        size differs from the model's, ``run_dir`` already holds a run (without ``resume``) or holds
        none to resume.
    ConfigError
        If ``data.store`` is unset or the config is inconsistent.
    """
    run = Path(run_dir)
    last_dir, best_dir = check_run_dir(run, resume=resume)
    if not cfg.data.store:
        raise ConfigError("data.store is not set: give the crop store from `protloc prepare` (OUT/cytoself.zarr)")

    store = CropStore.open(cfg.data.store)
    check_store_splits(store, cfg.data.train_split, cfg.data.val_split)

    label_path = run / LABEL_MAP_FILE
    label_map = _read_label_map(label_path) if resume else make_label_map(store.obs, split=cfg.data.train_split)
    cfg = _resolve(cfg, label_map, store)
    if resume:
        check_resume_model(last_dir, cfg.model, config_cls=CytoselfConfig, model_cls=Cytoself)
    model_cfg = cfg.model
    dcfg, ocfg, scfg = cfg.data, cfg.optim, cfg.schedule

    accelerator = make_accelerator(cfg.mixed_precision)
    main = accelerator.is_main_process
    if main:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
        if not resume:
            atomic_write_text(label_path, json.dumps(label_map, indent=1) + "\n")
    seed_everything(cfg.seed)

    # ---- data ----------------------------------------------------------------------------------
    cache = dcfg.chunk_window + 1
    train_ds = CropDataset(
        store,
        split=dcfg.train_split,
        channels=dcfg.channels,
        label_map=label_map,
        augment=dcfg.augment,
        seed=cfg.seed,
        cache_chunks=cache,
    )
    val_ds = CropDataset(store, split=dcfg.val_split, channels=dcfg.channels, label_map=label_map, cache_chunks=cache)
    unknown = int((val_ds.labels < 0).sum())
    if unknown:
        # Proteins absent from the training split have no class; the ID loss cannot score them.
        logger.warning("%d validation crops show proteins absent from the training split; skipping them", unknown)
        val_ds = val_ds.subset(val_ds.labels >= 0)
        if len(val_ds) == 0:
            raise InputError("no validation crop shows a protein of the training split", path=store.path)
    world, rank = accelerator.num_processes, accelerator.process_index
    sampler = CropBatchSampler(
        train_ds,
        dcfg.batch_size,
        shuffle=dcfg.shuffle,
        window=dcfg.chunk_window,
        drop_last=True,  # a last batch of 1 would break BatchNorm
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
    # A fixed, spread-out subset when eval_batches limits validation; store order otherwise.
    val_sampler = CropBatchSampler(
        val_ds,
        dcfg.batch_size,
        shuffle="chunks" if scfg.eval_batches else "none",
        window=dcfg.chunk_window,
        seed=cfg.seed,
        num_replicas=world,
        rank=rank,
    )
    pin = accelerator.device.type == "cuda"
    # A private generator: creating a loader iterator draws a seed, which must not move the global
    # RNG (a resumed run creates its iterator at a different step than an uninterrupted one).
    loader_gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        train_ds, batch_sampler=sampler, num_workers=dcfg.num_workers, pin_memory=pin, generator=loader_gen
    )
    val_loader = DataLoader(val_ds, batch_sampler=val_sampler, num_workers=dcfg.num_workers, pin_memory=pin)
    eval_every = scfg.eval_every or steps_per_epoch

    # ---- model, optimizer, state ---------------------------------------------------------------
    model = Cytoself(model_cfg)
    if world > 1 and cfg.sync_batchnorm:
        convert_sync_batchnorm(model, device=accelerator.device)
    seed_process(cfg.seed, rank)  # after the initialisation, which must be the same on every process
    optimizer = torch.optim.Adam(model.parameters(), lr=ocfg.lr, betas=ocfg.betas, weight_decay=ocfg.weight_decay)
    wrapped, optimizer = accelerator.prepare(_LossModule(model), optimizer)
    controller = PlateauController(
        patience=scfg.plateau_patience,
        factor=scfg.lr_factor,
        stop_patience=scfg.stop_patience,
        min_delta=scfg.min_delta,
    )
    step = epoch = batch_in_epoch = images_seen = 0
    best_val, best_step, stopped_early = math.inf, -1, False
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
        controller.load_state_dict(state["controller"])
        step, epoch, batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        images_seen = int(state.get("images_seen", 0))
        best_val, best_step = float(state["best_val_loss"]), int(state["best_step"])
        if state.get("stopped_early"):
            logger.info("the run had stopped early at step %d; continuing as asked", step)
        if main:
            dropped = metrics.drop_after(step)
            if dropped:
                logger.info(
                    "dropped %d metric records logged after step %d (lost with the interruption)", dropped, step
                )
        restore_process_rng(state, accelerator, seed=cfg.seed, step=step)
        logger.info("resumed %s at step %d (epoch %d, batch %d)", run, step, epoch, batch_in_epoch)
    if batch_in_epoch >= steps_per_epoch:
        epoch, batch_in_epoch = epoch + 1, 0
    _set_lr(optimizer, ocfg.lr * controller.lr_scale)
    start_step = step

    def trainer_state() -> dict[str, Any]:
        return {
            "optimizer": optimizer.state_dict(),
            "controller": controller.state_dict(),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "images_seen": images_seen,
            "best_val_loss": best_val,
            "best_step": best_step,
            "stopped_early": stopped_early,
        }

    def save_last() -> None:
        accelerator.wait_for_everyone()
        rng = process_rng_states(accelerator)  # a collective: before the main-process-only write
        if main:
            save_checkpoint(
                last_dir,
                model=model,
                config=model_cfg,
                trainer_state={**trainer_state(), **rng},
                extra={"label_map": label_map, "step": step, "channels": list(dcfg.channels)},
            )

    def set_epoch(e: int, start: int) -> None:
        sampler.set_epoch(e, start)
        train_ds.set_epoch(e)

    # ---- loop ----------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    max_steps = scfg.max_steps
    bar = tqdm(
        total=max_steps or None,
        initial=step,
        desc="cytoself",
        unit="step",
        disable=not (progress and main),
        dynamic_ncols=True,
    )
    window: dict[str, Tensor] = {}
    window_steps, window_images, window_time = 0, 0, 0.0
    train_time, train_images = 0.0, 0
    saved_at = step if resume else -1
    wrapped.train()
    try:
        if max_steps and step >= max_steps:
            logger.info("the run already reached max_steps=%d; nothing to train", max_steps)
        else:
            t_last = time.perf_counter()
            for ep, index, batch in infinite_loader(loader, set_epoch, start_epoch=epoch, start_batch=batch_in_epoch):
                batch = _to_device(batch, accelerator.device)
                out = wrapped(batch)
                loss = out["loss"]
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                if ocfg.grad_clip > 0:
                    accelerator.clip_grad_norm_(wrapped.parameters(), ocfg.grad_clip)
                optimizer.step()
                step += 1
                epoch, batch_in_epoch = ep, index + 1
                n_img = int(batch["image"].shape[0]) * world
                images_seen += n_img
                for key, value in out.items():
                    window[key] = window.get(key, 0.0) + value.detach().float()
                window_steps += 1
                window_images += n_img
                now = time.perf_counter()
                window_time += now - t_last
                train_time += now - t_last
                train_images += n_img
                bar.update(1)

                if step % scfg.log_every == 0:
                    means = mean_over_processes(accelerator, {k: float(v) for k, v in window.items()}, window_steps)
                    if not math.isfinite(means["loss"]):
                        logger.warning("training loss is %s at step %d", means["loss"], step)
                    if main:
                        metrics.log(
                            step,
                            "train",
                            means,
                            lr=optimizer.param_groups[0]["lr"],
                            epoch=epoch + batch_in_epoch / steps_per_epoch,
                            images_per_s=window_images / max(window_time, 1e-9),
                        )
                    bar.set_postfix(loss=f"{means['loss']:.4g}", refresh=False)
                    window, window_steps, window_images, window_time = {}, 0, 0, 0.0

                last_step = bool(max_steps) and step >= max_steps
                evaluated = False
                if step % eval_every == 0 or last_step:
                    val = _evaluate(model, val_loader, accelerator, max_batches=scfg.eval_batches)
                    improved, lr_changed, stop = controller.update(val["loss"])
                    evaluated = True
                    if improved:
                        best_val, best_step = val["loss"], step
                        accelerator.wait_for_everyone()
                        if main:
                            save_checkpoint(
                                best_dir,
                                model=model,
                                config=model_cfg,
                                trainer_state=None,
                                extra={
                                    "label_map": label_map,
                                    "step": step,
                                    "val": val,
                                    "channels": list(dcfg.channels),
                                },
                            )
                    if lr_changed:
                        _set_lr(optimizer, ocfg.lr * controller.lr_scale)
                        logger.info("validation plateau: learning rate now %.3g", ocfg.lr * controller.lr_scale)
                    if main:
                        metrics.log(
                            step,
                            "val",
                            val,
                            best_loss=controller.best,
                            improved=improved,
                            lr=optimizer.param_groups[0]["lr"],
                            checks_without_improvement=controller.num_bad,
                        )
                    if stop:
                        stopped_early = True
                        logger.info(
                            "stopping early at step %d: %d validation checks without improvement",
                            step,
                            controller.num_bad,
                        )
                    bar.set_postfix(loss=f"{float(out['loss'].detach()):.4g}", val=f"{val['loss']:.4g}", refresh=False)
                if (cfg.save_every and step % cfg.save_every == 0) or (not cfg.save_every and evaluated):
                    save_last()
                    saved_at = step
                if stopped_early or last_step:
                    break
                t_last = time.perf_counter()
        if saved_at != step:
            save_last()
    finally:
        bar.close()
        metrics.close()

    summary = {
        "steps": step,
        "epochs": epoch + batch_in_epoch / steps_per_epoch,
        "best_val_loss": best_val,
        "best_step": best_step,
        "stopped_early": stopped_early,
        "images_per_s": train_images / train_time if train_time > 0 else 0.0,
        "images_seen": images_seen,
        "steps_this_run": step - start_step,
        "run_dir": str(run),
    }
    logger.info(
        "trained %d steps (%.3g images/s); best validation loss %.5g at step %d%s",
        step,
        summary["images_per_s"],
        best_val,
        best_step,
        " (stopped early)" if stopped_early else "",
    )
    return summary

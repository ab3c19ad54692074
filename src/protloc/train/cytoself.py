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
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from protloc.data.datasets import CropDataset, make_label_map
from protloc.data.io import CropStore
from protloc.errors import ConfigError, InputError
from protloc.models.cytoself import Cytoself, CytoselfConfig
from protloc.nn.syncbn import convert_sync_batchnorm
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
    PlateauController,
    check_adam_options,
    check_run_options,
    clip_gradients,
    seed_process,
    set_lr,
    warmup_cosine,
)
from protloc.train.loop import check_config as _check

__all__ = [
    "CytoselfDataConfig",
    "CytoselfOptimConfig",
    "CytoselfScheduleConfig",
    "TrainCytoselfConfig",
    "train_cytoself",
]

logger = logging.getLogger(__name__)

LABEL_MAP_FILE = "label_map.json"


@dataclass(frozen=True)
class CytoselfDataConfig(CropDataConfig):
    """Which crops, which channels, in which batches (and the fields of :class:`CropDataConfig`).

    Attributes
    ----------
    store
        The crop store (``OUT/cytoself.zarr`` from ``protloc prepare``); must have ``train`` and
        ``val`` rows in its ``split`` column.
    channels
        Store channels fed to the model, in order; must equal ``model.channels``.
    batch_size
        Crops per optimizer step (per process).
    augment
        Random element of the dihedral group D4 (4 rotations x flip) per training crop.
    """

    channels: tuple[str, ...] = ("protein", "nucleus_distance")
    batch_size: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        _check(len(self.channels) > 0, "data.channels must name at least one channel")
        super().__post_init__()


@dataclass(frozen=True)
class CytoselfOptimConfig:
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
class CytoselfScheduleConfig(ScheduleConfig):
    """Step budget, validation and the plateau schedule (and the fields of :class:`ScheduleConfig`).

    Attributes
    ----------
    max_steps
        Optimizer steps to train for (0: no limit; the run ends by early stopping, as in the paper).
    eval_every
        Validate every this many steps (0: once per pass over the training split = the paper's epoch).
        Validation also runs at the last step.
    eval_batches
        Validate on this many batches (a fixed, spread-out subset of the split); 0 = the whole split.
    plateau_patience
        Validation checks without improvement before each learning-rate reduction (paper: 4 epochs).
    lr_factor
        Learning-rate multiplier at each reduction (paper: 0.1).
    stop_patience
        Consecutive checks without improvement before stopping (paper: 12 epochs; 0 = never).
    min_delta
        Smallest decrease of the validation loss that counts as an improvement.
    lr_decay
        ``"plateau"`` (the paper: x ``lr_factor`` after ``plateau_patience`` checks without improvement)
        or ``"cosine"`` (half a cosine from ``optim.lr`` to ``min_lr_ratio * optim.lr`` at ``max_steps``,
        for a fixed budget; needs ``max_steps``; the plateau counter then only stops the run).
    warmup_steps
        Linear warm-up of the learning rate over the first steps (0: none, the paper).
    min_lr_ratio
        Final learning rate of the cosine decay, as a share of ``optim.lr``.
    """

    min_max_steps: ClassVar[int] = 0  # early stopping ends a run without a step limit

    plateau_patience: int = 4
    lr_factor: float = 0.1
    stop_patience: int = 12
    min_delta: float = 0.0
    lr_decay: Literal["plateau", "cosine"] = "plateau"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.lr_decay in ("plateau", "cosine"),
            f"schedule.lr_decay must be 'plateau' or 'cosine', got {self.lr_decay!r}",
        )
        _check(
            self.lr_decay != "cosine" or self.max_steps > 0,
            "schedule.lr_decay=cosine needs schedule.max_steps > 0 (the length of the decay)",
        )
        _check(self.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.stop_patience >= 0, f"schedule.stop_patience must be >= 0, got {self.stop_patience}")
        _check(self.plateau_patience >= 1, f"schedule.plateau_patience must be >= 1, got {self.plateau_patience}")
        _check(0 < self.lr_factor <= 1, f"schedule.lr_factor must be in (0, 1], got {self.lr_factor}")
        _check(self.min_delta >= 0, f"schedule.min_delta must be >= 0, got {self.min_delta}")


def _paper_model() -> CytoselfConfig:
    return CytoselfConfig.paper()


@dataclass(frozen=True)
class TrainCytoselfConfig:
    """Everything ``train_cytoself`` needs. Presets: :meth:`paper`, :meth:`small`, :meth:`tiny`.

    Attributes
    ----------
    model
        The model. ``model.num_classes`` is always set to the number of proteins in the training
        split (the preset's value is a placeholder); ``model.channels`` must equal ``data.channels``.
    data, optim, schedule
        See :class:`CytoselfDataConfig`, :class:`CytoselfOptimConfig`, :class:`CytoselfScheduleConfig`.
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
    optim: CytoselfOptimConfig = field(default_factory=CytoselfOptimConfig)
    schedule: CytoselfScheduleConfig = field(default_factory=CytoselfScheduleConfig)
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
            schedule=CytoselfScheduleConfig(max_steps=0, eval_every=0, log_every=50),
            save_every=5000,
        )

    @classmethod
    def small(cls, store: str = "") -> TrainCytoselfConfig:
        """The CPU recipe of the shipped ``cytoself-small``: the small model, 4,500 steps of 32 in ~1.7 h on one core.

        Differs from the paper's protocol where a CPU budget needs it (``benchmarks/cytoself_quality.py``
        measures each change): uniformly shuffled batches from the whole training split held in memory
        (chunk-window batches show the protein-ID heads ~20 proteins at a time), Adam 1e-3 with a linear
        warm-up and cosine decay over a fixed step budget instead of the plateau schedule, bf16 autocast
        (on CPUs with native bfloat16, else float32), validation on 40 batches every 500 steps.
        """
        return cls(
            model=CytoselfConfig.small(),
            data=CytoselfDataConfig(store=store, batch_size=32, shuffle="random", in_memory=True),
            optim=CytoselfOptimConfig(lr=1e-3),
            schedule=CytoselfScheduleConfig(
                max_steps=4500,
                eval_every=500,
                eval_batches=40,
                log_every=50,
                lr_decay="cosine",
                warmup_steps=100,
                stop_patience=0,
            ),
            mixed_precision="bf16",
            save_every=250,
        )

    @classmethod
    def tiny(cls, store: str = "") -> TrainCytoselfConfig:
        """A CPU demo: the tiny model, batch 32, validation every 100 steps, 2000 steps at most."""
        return cls(
            model=CytoselfConfig.tiny(),
            data=CytoselfDataConfig(store=store, batch_size=32),
            schedule=CytoselfScheduleConfig(max_steps=2000, eval_every=100, log_every=10),
            save_every=500,
        )


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


@torch.no_grad()
def _evaluate(model: Cytoself, loader: DataLoader, accelerator: Any, *, max_batches: int) -> dict[str, float]:
    """Mean of every loss / metric over the validation batches (weighted by batch size), eval mode."""
    sums: dict[str, Tensor] = {}
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    with eval_mode(model):
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
    keys = list(sums)  # the model's order, the same on every rank
    *values, count = sum_over_processes(accelerator, [*(sums[k] for k in keys), count])
    total = float(count)
    if total == 0:
        raise RuntimeError("validation saw no crops")
    return {k: float(v) / total for k, v in zip(keys, values, strict=True)}


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


def _check_store_fits(store: Any, label_map: Mapping[str, int], split: str, label_path: Path) -> None:
    """On resume: the store's training proteins must be the run's (its label map), or the ID heads mean nothing."""
    train = store.obs.loc[store.obs["split"].astype(str) == split, "protein_id"].astype(str)
    unknown = sorted(set(train) - set(label_map))
    if unknown:
        raise InputError(
            f"this store's training proteins are not those of the run being resumed ({len(unknown)} of "
            f"{train.nunique()} are not in {label_path}, e.g. {unknown[0]!r}): resume with the store the run "
            "was trained on",
            path=store.path,
        )


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
        ``steps`` (total optimizer steps), ``steps_this_run``, ``epochs`` (passes over the training
        split, fractional), ``best_val_loss``, ``best_step``, ``images_per_s`` (training throughput
        of this call, validation excluded), ``images_seen``, ``stopped_early``, ``run_dir``.

    Raises
    ------
    InputError
        If the store is missing or has no ``train`` / ``val`` rows, channels are missing, the crop
        size differs from the model's, ``run_dir`` already holds a run (without ``resume``) or holds
        none to resume.
    ConfigError
        If ``data.store`` is unset or the config is inconsistent.
    """
    run = Run(run_dir, resume=resume, mixed_precision=cfg.mixed_precision, name="cytoself", progress=progress)
    store = open_crop_store(cfg.data, source="the crop store from `protloc prepare` (OUT/cytoself.zarr)")
    run.use_store(store)  # resuming: the run's own crops, or a clear refusal
    label_path = run.dir / LABEL_MAP_FILE
    label_map = _read_label_map(label_path) if resume else make_label_map(store.obs, split=cfg.data.train_split)
    if resume:
        _check_store_fits(store, label_map, cfg.data.train_split, label_path)
    cfg = _resolve(cfg, label_map, store)
    run.check_resume_model(cfg.model, config_cls=CytoselfConfig, model_cls=Cytoself)
    dcfg, ocfg, scfg = cfg.data, cfg.optim, cfg.schedule
    run.setup(cfg, files=None if resume else {LABEL_MAP_FILE: json.dumps(label_map, indent=1) + "\n"})

    # ---- data ----------------------------------------------------------------------------------
    read = dict(channels=dcfg.channels, label_map=label_map, cache_chunks=chunk_cache(dcfg))
    train_ds = CropDataset(store, split=dcfg.train_split, augment=dcfg.augment, seed=cfg.seed, **read)
    val_ds = CropDataset(store, split=dcfg.val_split, **read)
    unknown = int((val_ds.labels < 0).sum())
    if unknown:
        # Proteins absent from the training split have no class; the ID loss cannot score them.
        logger.warning("%d validation crops show proteins absent from the training split; skipping them", unknown)
        val_ds = val_ds.subset(val_ds.labels >= 0)
        if len(val_ds) == 0:
            raise InputError("no validation crop shows a protein of the training split", path=store.path)
    # A fixed, spread-out subset when eval_batches limits validation; store order otherwise.
    val_shuffle = "chunks" if scfg.eval_batches else "none"
    sampler, val_sampler = crop_samplers(run, dcfg, train_ds, val_ds, val_shuffle=val_shuffle)
    loader = run.train_loader(train_ds, sampler, num_workers=dcfg.num_workers, path=store.path)
    val_loader = DataLoader(val_ds, batch_sampler=val_sampler, num_workers=dcfg.num_workers, pin_memory=run.pin_memory)

    # ---- model, optimizer, state ---------------------------------------------------------------
    model = Cytoself(cfg.model)
    if run.world > 1 and cfg.sync_batchnorm:
        convert_sync_batchnorm(model, device=run.device)
    seed_process(cfg.seed, run.rank)  # after the initialisation, which must be the same on every process
    # The fused Adam kernel: one pass over each parameter instead of several (CPU and CUDA).
    fused = run.device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(
        model.parameters(), lr=ocfg.lr, betas=ocfg.betas, weight_decay=ocfg.weight_decay, fused=fused
    )
    wrapped, optimizer = run.accelerator.prepare(LossModule(model), optimizer)
    controller = PlateauController(
        patience=scfg.plateau_patience,
        factor=scfg.lr_factor,
        stop_patience=scfg.stop_patience,
        min_delta=scfg.min_delta,
    )
    run.attach(
        model,
        cfg.model,
        state=lambda: {"optimizer": optimizer.state_dict(), "controller": controller.state_dict()},
        extra=lambda **more: {"label_map": label_map, "step": run.step, **more, "channels": list(dcfg.channels)},
    )
    if (state := run.resume()) is not None:
        optimizer.load_state_dict(state["optimizer"])
        controller.load_state_dict(state["controller"])
    cosine = scfg.lr_decay == "cosine"

    def lr_now() -> float:
        """The learning rate of the next step: warm-up x (plateau scale | cosine)."""
        peak = ocfg.lr if cosine else ocfg.lr * controller.lr_scale
        return warmup_cosine(
            run.step + 1,
            peak,
            warmup_steps=scfg.warmup_steps,
            max_steps=scfg.max_steps if cosine else 0,
            min_ratio=scfg.min_lr_ratio,
        )

    # ---- loop ----------------------------------------------------------------------------------
    wrapped.train()
    with run:
        for batch in run.batches(loader):
            set_lr(lr_now(), optimizer)
            batch = _to_device(batch, run.device)
            out = wrapped(batch)
            optimizer.zero_grad(set_to_none=True)
            run.accelerator.backward(out["loss"])
            clip_gradients(run.accelerator, wrapped.parameters(), ocfg.grad_clip)
            optimizer.step()
            run.step_done(batch["image"].shape[0], out)

            if run.should_log():
                run.log("train", run.window_means(), lr=optimizer.param_groups[0]["lr"], **run.progress())
            if run.should_eval():
                val = _evaluate(model, val_loader, run.accelerator, max_batches=scfg.eval_batches)
                improved, lr_changed, stop = controller.update(val["loss"])
                if lr_changed and not cosine:
                    set_lr(lr_now(), optimizer)
                    logger.info("validation plateau: learning rate now %.3g", ocfg.lr * controller.lr_scale)
                run.evaluated(
                    val,
                    improved=improved,
                    lr=optimizer.param_groups[0]["lr"],
                    checks_without_improvement=controller.num_bad,
                )
                if stop:
                    run.stop_early(f"{controller.num_bad} validation checks without improvement")
            if run.end_step():
                break
    return run.finish(stopped_early=run.stopped_early)

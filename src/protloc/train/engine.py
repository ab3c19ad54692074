"""The training engine: one run's bookkeeping, shared by every ``protloc train`` trainer.

A trainer (:func:`~protloc.train.cytoself.train_cytoself`, :func:`~protloc.train.vqgan.train_vqgan`,
:func:`~protloc.train.celle.train_celle`) keeps what is its own: its inputs and their checks, its data,
its model and optimizers, and its update step. A :class:`Run` keeps the rest of a run, the same for all:

- **set-up**: the run folder check (a finished run is never overwritten; ``--resume`` needs ``last/``),
  the Accelerate accelerator, ``config.yaml`` (and files such as a label map), seeding, temporaries that
  killed writes left behind, metrics of an attempt that never reached a checkpoint;
- **data position**: the training loader with its private generator, epochs and the batch within the
  epoch, so a resumed run sees the batches an uninterrupted run would have seen;
- **resume**: model weights, the step, data position, best validation and every process's RNG state
  from ``last/``; metric lines logged after that checkpoint are dropped;
- **the metric window** (:class:`MetricWindow`): training values summed between two logging steps and
  averaged over all processes, with the window's throughput, and the tqdm bar;
- **the cadence**: validation every ``schedule.eval_every`` steps and at the last step, ``best/`` on
  each improvement of the validation metric, ``last/`` every ``save_every`` steps (or at each
  validation), early stopping, and the summary returned at the end;
- **divergence**: a training value or the weights turning NaN / Inf stop the run with
  :class:`~protloc.errors.TrainingDiverged` (naming the step and the terms) before anything non-finite
  is validated or saved, so ``last/`` keeps the previous good state to resume from. Python-number
  values are checked at every step with one process; otherwise (tensor values, which would need a host
  synchronisation, or several processes, which must agree) at the points that already communicate:
  the logging step (the reduced window means), before validation and before each checkpoint (one
  all-reduced flag). The checks read values only: no number or random draw of the run changes.

A trainer reads top to bottom (the shape of nanoGPT's ``train.py``)::

    run = Run(run_dir, resume=resume, mixed_precision=cfg.mixed_precision, name="mymodel")
    store = open_crop_store(cfg.data, ...)                        # the trainer's inputs and checks
    run.check_resume_model(cfg.model, config_cls=MyConfig, model_cls=MyModel)
    run.setup(cfg)                                                # config.yaml, seeds
    sampler, val_sampler = crop_samplers(run, cfg.data, train_ds, val_ds)
    loader = run.train_loader(train_ds, sampler, num_workers=cfg.data.num_workers)
    model = MyModel(cfg.model)
    seed_process(cfg.seed, run.rank)                              # after the identical initialisation
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    wrapped, optimizer = run.accelerator.prepare(LossModule(model), optimizer)
    run.attach(model, cfg.model, state=lambda: {"optimizer": optimizer.state_dict()},
               extra=lambda **more: {"step": run.step, **more})
    if (state := run.resume()) is not None:
        optimizer.load_state_dict(state["optimizer"])
    with run:                                                     # closes the bar and metrics.jsonl
        for batch in run.batches(loader):
            out = wrapped(batch)                                  # the update: the trainer's own
            optimizer.zero_grad(set_to_none=True)
            run.accelerator.backward(out["loss"])
            optimizer.step()
            run.step_done(len(batch["image"]), out)
            if run.should_log():
                run.log("train", run.window_means(), lr=cfg.optim.lr, **run.progress())
            if run.should_eval():
                run.evaluated(evaluate(model, val_loader, run.accelerator))
            if run.end_step():                                    # last/ on its cadence; True to stop
                break
    return run.finish()

A new trainer (a protein-sequence encoder on a Swiss-Prot corpus, say) brings its own dataset and a
batch sampler with ``set_epoch(epoch, start_batch)``, ``len()`` (batches per epoch and process) and
``batch_size``, its own data config, a schedule config derived from :class:`ScheduleConfig`, and its
unit (``Run(..., unit="sequences")`` logs ``sequences_per_s`` and saves ``sequences_seen``); its
top-level config needs ``seed``, ``mixed_precision``, ``save_every`` and ``schedule``. Nothing else in
:class:`Run` is about images: the crop-store pieces (:class:`CropDataConfig`, :func:`open_crop_store`,
:func:`crop_samplers`) are separate helpers for the image trainers. Also here: :class:`LossModule` (a
model's ``loss`` behind ``forward``), :func:`eval_mode` and :func:`sum_over_processes` (one packed
all-reduce per validation).

Records in ``metrics.jsonl`` are written in the order a trainer gives them; a ``val`` record is the
validation values, then ``best_<metric>`` and ``improved``, then the trainer's additions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from protloc._fs import atomic_write_text, lock_output, release_output
from protloc.config import save_config
from protloc.data.datasets import CropBatchSampler
from protloc.data.io import CropStore
from protloc.errors import ConfigError, InputError, TrainingDiverged
from protloc.models.checkpoint import (
    CONFIG_FILE as CHECKPOINT_CONFIG_FILE,
)
from protloc.models.checkpoint import (
    TRAINER_FILE,
    describe_nonfinite,
    load_checkpoint_config,
    load_model_weights,
    load_trainer_state,
    nonfinite_tensors,
    save_checkpoint,
)
from protloc.train.loop import (
    MetricsLogger,
    infinite_loader,
    make_accelerator,
    mean_over_processes,
    process_rng_states,
    restore_process_rng,
    seed_everything,
)
from protloc.train.loop import check_config as _check

__all__ = [
    "METRICS_FILE",
    "CropDataConfig",
    "LossModule",
    "MetricWindow",
    "Run",
    "ScheduleConfig",
    "check_resume_model",
    "check_run_dir",
    "check_store_splits",
    "crop_samplers",
    "eval_mode",
    "open_crop_store",
    "remove_stale_temporaries",
    "sum_over_processes",
]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# configuration shared by the trainers (fields stay flat: ``data.batch_size``, ``schedule.max_steps``)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropDataConfig:
    """Where the crops come from and how they are batched (the image trainers' ``data`` section).

    Each trainer's data config derives from this one and adds its own fields (channels, image size,
    sequences, ...); what ``augment`` draws is the trainer's (see its data config).

    Attributes
    ----------
    store
        The crop store of ``protloc prepare``; must have ``train_split`` and ``val_split`` rows in its
        ``split`` column.
    batch_size
        Crops per optimizer step (per process).
    num_workers
        DataLoader worker processes (0: read in the training process).
    augment
        Random augmentation of the training crops; none in validation.
    shuffle
        ``"chunks"``: chunk-shuffled order (shuffle Zarr chunks, then crops within a window of
        ``chunk_window`` chunks), about 20x faster reading than ``"random"`` (a uniform permutation).
    chunk_window
        Chunks mixed per window in ``"chunks"`` mode (also the per-process chunk cache size).
    in_memory
        Keep every decompressed chunk once read (per process; about ``2 x channels x size^2`` bytes per
        float16 crop: 2 GB for 51,000 two-channel 100-px crops), so that ``shuffle: random`` reads at
        memory speed after the first pass. A window of 16 chunks holds crops of only ~20 proteins
        (crops are stored field by field), which a protein-classification task learns as a drifting
        prior; a uniform order over the whole split does not have that bias.
    train_split, val_split
        Values of the ``split`` column used for training and validation.
    """

    store: str = ""
    batch_size: int = 8
    num_workers: int = 0
    augment: bool = True
    shuffle: Literal["chunks", "random"] = "chunks"
    chunk_window: int = 16
    in_memory: bool = False
    train_split: str = "train"
    val_split: str = "val"

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(self.chunk_window >= 1, f"data.chunk_window must be >= 1, got {self.chunk_window}")
        _check(self.shuffle in ("chunks", "random"), f"data.shuffle must be 'chunks' or 'random', got {self.shuffle!r}")
        _check(self.train_split != self.val_split, "data.train_split and data.val_split must differ")


@dataclass(frozen=True)
class ScheduleConfig:
    """Step budget, validation and logging (every trainer's ``schedule`` section derives from this).

    Attributes
    ----------
    max_steps
        Optimizer steps to train for (0, where a trainer allows it: no limit, the run ends by early
        stopping).
    eval_every
        Validate every this many steps (0: once per pass over the training split); also at the last step.
    eval_batches
        Validate on this many batches; 0 = the whole split.
    log_every
        Log averaged training metrics every this many steps.
    """

    #: The smallest accepted ``max_steps`` (0 only for a trainer that stops by itself).
    min_max_steps: ClassVar[int] = 1

    max_steps: int = 0
    eval_every: int = 0
    eval_batches: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        least = self.min_max_steps
        _check(self.max_steps >= least, f"schedule.max_steps must be >= {least}, got {self.max_steps}")
        _check(self.eval_every >= 0, f"schedule.eval_every must be >= 0, got {self.eval_every}")
        _check(self.eval_batches >= 0, f"schedule.eval_batches must be >= 0, got {self.eval_batches}")
        _check(self.log_every >= 1, f"schedule.log_every must be >= 1, got {self.log_every}")


# --------------------------------------------------------------------------------------------------
# run folders
# --------------------------------------------------------------------------------------------------


def check_run_dir(run: Path, *, resume: bool) -> tuple[Path, Path]:
    """Check a run folder before training; return its ``last/`` and ``best/`` checkpoint folders.

    Raises
    ------
    InputError
        With ``resume``, if there is no ``last/`` checkpoint with trainer state; without it, if the
        folder already holds a run (nothing is ever overwritten).
    """
    last_dir, best_dir = run / "last", run / "best"
    if resume:
        if not (last_dir / TRAINER_FILE).is_file():
            raise InputError("nothing to resume: no last/ checkpoint with trainer state", path=run)
    elif last_dir.exists():
        raise InputError("the run folder already holds a run (last/); resume it or choose another folder", path=run)
    return last_dir, best_dir


def remove_stale_temporaries(run: Path) -> list[str]:
    """Delete what killed writes left in a run folder: ``.NAME.*.tmp`` and ``.NAME.old-PID`` entries.

    Checkpoints and metrics are written to such temporary siblings and renamed into place (``protloc._fs``);
    a process killed mid-write (SIGKILL, power loss) leaves them behind. Call it on the main process only.
    Returns the names removed.
    """
    removed = []
    if not run.is_dir():
        return removed
    for entry in run.iterdir():
        if entry.name.startswith(".") and (entry.name.endswith(".tmp") or ".old-" in entry.name):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted write in %s", len(removed), run)
    return removed


def check_resume_model(last_dir: Path, model_config: Any, *, config_cls: type, model_cls: type) -> dict[str, Any]:
    """Refuse to resume a run with a different model config; return the checkpoint's ``extra``.

    Raises
    ------
    ConfigError
        Naming the model fields that differ.
    """
    saved, extra = load_checkpoint_config(last_dir, config_cls=config_cls, model_cls=model_cls)
    if saved != model_config:
        changed = [f.name for f in dataclasses.fields(saved) if getattr(saved, f.name) != getattr(model_config, f.name)]
        raise ConfigError(
            f"cannot resume {last_dir.parent} with a different model: model.{', model.'.join(changed)} changed"
        )
    return extra


# --------------------------------------------------------------------------------------------------
# crop stores (the image trainers' data)
# --------------------------------------------------------------------------------------------------


def check_store_splits(store: Any, *splits: str) -> None:
    """Check that a crop store has a ``split`` column with rows in each of ``splits``.

    Raises
    ------
    InputError
        Naming the store and the splits it has.
    """
    if "split" not in store.obs.columns:
        raise InputError(
            "the crop table has no 'split' column; re-run `protloc prepare` with a train/val split", path=store.path
        )
    present = set(store.obs["split"].astype(str))
    for wanted in splits:
        if wanted not in present:
            raise InputError(
                f"the store has no {wanted!r} rows (splits present: {sorted(present)}); training and validation "
                "need both: re-run `protloc prepare` with a split",
                path=store.path,
            )


def open_crop_store(
    data: CropDataConfig,
    *,
    source: str,
    channels: Sequence[str] = (),
    purpose: str = "",
    min_size: int = 0,
) -> CropStore:
    """Open ``data.store`` and check it can train: the channels, the crop size, both splits.

    Parameters
    ----------
    data
        The data config (``store``, ``train_split``, ``val_split``).
    source
        Where such a store comes from, for the messages, e.g. ``"the CELL-E crop store from `protloc
        prepare` (OUT/celle.zarr)"``.
    channels
        Channels the trainer reads.
    purpose
        Appended to the missing-channel message (e.g. ``" for the threshold tokenizer"``).
    min_size
        Smallest accepted crop side (``data.image_size`` of a trainer that only shrinks crops); 0: any.

    Raises
    ------
    ConfigError
        If ``data.store`` is unset.
    InputError
        If the store is missing, lacks a channel or a split, or its crops are smaller than ``min_size``.
    """
    if not data.store:
        raise ConfigError(f"data.store is not set: give {source}")
    store = CropStore.open(data.store)
    missing = [c for c in channels if c not in store.channels]
    if missing:
        raise InputError(
            f"the store lacks channel(s) {missing}{purpose} (it has {store.channels}); use {source}", path=store.path
        )
    if min_size > store.size:
        raise InputError(
            f"data.image_size {min_size} is larger than the store's {store.size}x{store.size} crops", path=store.path
        )
    check_store_splits(store, data.train_split, data.val_split)
    return store


def chunk_cache(data: CropDataConfig) -> int | Literal["all"]:
    """The ``cache_chunks`` of a training crop dataset: every chunk with ``in_memory``, else a window's worth."""
    return "all" if data.in_memory else data.chunk_window + 1


def crop_samplers(
    run: Run,
    data: CropDataConfig,
    train: Any,
    val: Any,
    *,
    val_shuffle: Literal["chunks", "none"] = "none",
) -> tuple[CropBatchSampler, CropBatchSampler]:
    """The training and validation batch samplers of a crop dataset, sharded over the run's processes.

    Training drops the last partial batch (a batch of 1 would break BatchNorm) in ``data.shuffle``
    order; validation keeps store order (``val_shuffle="none"``) or a fixed, spread-out chunk-shuffled
    order (``"chunks"``, for a validation limited to a few batches). Call after :meth:`Run.setup`.
    """
    seed, world, rank = run.seed, run.world, run.rank
    sampler = CropBatchSampler(
        train,
        data.batch_size,
        shuffle=data.shuffle,
        window=data.chunk_window,
        drop_last=True,
        seed=seed,
        num_replicas=world,
        rank=rank,
    )
    val_sampler = CropBatchSampler(
        val, data.batch_size, shuffle=val_shuffle, window=data.chunk_window, seed=seed, num_replicas=world, rank=rank
    )
    return sampler, val_sampler


# --------------------------------------------------------------------------------------------------
# models and validation
# --------------------------------------------------------------------------------------------------


class LossModule(nn.Module):
    """Puts ``model.loss(batch, **options)`` behind ``forward``.

    Data-parallel wrappers synchronise gradients (and Accelerate applies autocast) only through
    ``forward``; calling ``model.loss`` on a wrapped model would bypass both.
    """

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__()
        self.model = model
        self.options = options

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return self.model.loss(batch, **self.options)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the ``with`` block; restore its mode afterwards (also on errors)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def sum_over_processes(accelerator: Any, tensors: Sequence[Tensor]) -> list[Tensor]:
    """Sum each tensor over all processes in one collective call; same shapes back, in order.

    Validation sums (per-metric sums, sample counts, code usage) are flattened into one vector, reduced
    once, and cut back apart, instead of one all-reduce per value. Every process must pass the same
    shapes in the same order. With one process the tensors come back as they are.
    """
    if accelerator.num_processes == 1:
        return list(tensors)
    packed = accelerator.reduce(torch.cat([t.reshape(-1) for t in tensors]), reduction="sum")
    out, start = [], 0
    for t in tensors:
        out.append(packed[start : start + t.numel()].view(t.shape))
        start += t.numel()
    return out


class MetricWindow:
    """The running log window: training values between two logging steps, and the throughput.

    Per key, the sum over the steps that reported it and their number (a term missing from some steps,
    such as a GAN term before the discriminator starts, is averaged over the steps that had it). Tensor
    values are summed on their device as float32 (no host synchronisation per step); Python numbers are
    summed as float64 on the host. Samples and seconds are counted for the window and in total.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.samples, self.seconds = 0, 0.0
        self.total_samples, self.total_seconds = 0, 0.0
        self.rate = 0.0  # samples per second of the last closed window

    def add(self, values: Mapping[str, Any], samples: int, seconds: float) -> None:
        """Add one step: its values, its samples (all processes) and its duration."""
        for key, value in values.items():
            value = value.detach().float() if isinstance(value, Tensor) else float(value)
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1
        self.samples += samples
        self.seconds += seconds
        self.total_samples += samples
        self.total_seconds += seconds

    def close(self, accelerator: Any) -> dict[str, float]:
        """Each value's mean over the window's steps and all processes (a collective); starts a new window."""
        means = mean_over_processes(accelerator, {k: float(v) for k, v in self.sums.items()}, self.counts)
        self.rate = self.samples / max(self.seconds, 1e-9)
        self.sums, self.counts, self.samples, self.seconds = {}, {}, 0, 0.0
        return means

    @property
    def throughput(self) -> float:
        """Samples per second over every step added (0 before any)."""
        return self.total_samples / self.total_seconds if self.total_seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


class Run:
    """The bookkeeping of one training run (see the module notes for a trainer's use of it).

    Parameters
    ----------
    run_dir
        The run folder (``config.yaml``, ``metrics.jsonl``, ``last/``, ``best/`` and the trainer's files).
    resume
        Continue the run in ``run_dir`` from ``last/`` (it must exist); otherwise the folder must not
        hold a run yet.
    mixed_precision
        ``"no"``, ``"bf16"`` or ``"fp16"`` (:func:`~protloc.train.loop.make_accelerator`).
    name
        The progress bar's label and the summary's name for the model.
    unit
        What a batch is made of, in the logged throughput and counters: ``"images"`` gives
        ``images_per_s`` and ``images_seen``.
    best
        The validation metric (lower is better) that picks ``best/`` and is returned as ``best_val_loss``.
    progress
        Show a tqdm progress bar (main process only).

    Attributes
    ----------
    accelerator, device, world, rank, main
        The accelerator, its device, the number of processes, this process's index, whether it is the
        main process (the only one that writes).
    step, epoch, batch_in_epoch
        Optimizer steps taken; the data position (pass over the training split, next batch in it).
    seen
        Samples trained on, all processes together.
    best_val, best_step
        The best validation ``best`` metric so far and its step (``inf`` / ``-1`` before any).
    stopped_early
        Whether :meth:`stop_early` was called.
    last_val
        The last validation record (``{"step": ..., **values}``; empty before any).
    window
        The :class:`MetricWindow` of training values since the last logging step.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        resume: bool,
        mixed_precision: str,
        name: str,
        unit: str = "images",
        best: str = "loss",
        progress: bool = True,
    ) -> None:
        self.dir = Path(run_dir)
        self.resuming = bool(resume)
        self.last_dir, self.best_dir = check_run_dir(self.dir, resume=self.resuming)
        self.name, self.unit, self.best_metric, self.progress_bar = name, unit, best, progress
        self.accelerator = make_accelerator(mixed_precision)
        self.device: torch.device = self.accelerator.device
        self.world: int = self.accelerator.num_processes
        self.rank: int = self.accelerator.process_index
        self.main: bool = self.accelerator.is_main_process
        if self.main:
            # two trainers writing one run folder (a --resume started while the first still runs) would
            # interleave metrics and checkpoints: the second refuses at once, naming the first's process
            lock_output(self.dir)
        self.step = self.epoch = self.batch_in_epoch = self.seen = 0
        self.best_val, self.best_step = math.inf, -1
        self.stopped_early = False
        self.last_val: dict[str, Any] = {}
        self.steps_per_epoch = 0
        self._cfg: Any = None
        self._pending_files: dict[str, str] = {}
        self._metrics: MetricsLogger | None = None
        self._set_epoch: Callable[[int, int], None] | None = None
        self._model: nn.Module | None = None
        self._model_config: Any = None
        self._state: Callable[[], dict[str, Any]] = dict
        self._extra: Callable[..., dict[str, Any]] = dict
        self._data_extra: dict[str, Any] = {}
        self._bar: Any = None
        self._start_step, self._saved_at = 0, -1
        self._position = (0, 0)
        self._evaluated = False
        self._last_loss: Any = None
        self.window = MetricWindow()
        self._t_last = 0.0
        self._window_start = 1  # the first step of the open window
        self._nonfinite: dict[str, int] = {}  # term -> first step it was NaN / Inf (Python numbers only)

    # ---- set-up --------------------------------------------------------------------------------

    @property
    def seed(self) -> int:
        """The run's seed (``cfg.seed`` given to :meth:`setup`)."""
        return int(self._cfg.seed)

    @property
    def pin_memory(self) -> bool:
        """Whether loaders should pin host memory (on a CUDA device)."""
        return self.device.type == "cuda"

    def use_store(self, store: Any) -> None:
        """Record the training data (its :attr:`~protloc.data.io.CropStore.fingerprint`, saved with each
        checkpoint); when resuming, refuse a store of other crops than the run was trained on.

        Raises
        ------
        InputError
            Resuming on a store whose fingerprint differs from the one ``last/`` recorded (runs saved before
            fingerprints were recorded are not checked).
        """
        fingerprint = store.fingerprint
        self._data_extra = {"store": str(store.path), "store_fingerprint": fingerprint}
        if not self.resuming:
            return
        try:
            meta = json.loads((self.last_dir / CHECKPOINT_CONFIG_FILE).read_text(encoding="utf-8"))
            recorded = meta.get("extra") or {}
        except (OSError, ValueError, AttributeError):
            return  # a damaged last/ is reported by the checks that load it
        if recorded.get("store_fingerprint") not in (None, fingerprint):
            raise InputError(
                f"cannot resume {self.dir}: it was trained on {recorded.get('store')}, and this store holds other "
                "crops (another protein, field of view or split, size or channel set); resume with the run's own "
                "store, or start a new run",
                path=store.path,
            )

    def check_resume_model(self, model_config: Any, *, config_cls: type, model_cls: type) -> dict[str, Any]:
        """When resuming, refuse a model config other than the run's; return ``last/``'s ``extra`` ({} if new).

        Raises
        ------
        ConfigError
            Naming the model fields that differ.
        """
        if not self.resuming:
            return {}
        return check_resume_model(self.last_dir, model_config, config_cls=config_cls, model_cls=model_cls)

    def setup(self, cfg: Any, *, files: Mapping[str, str] | None = None) -> None:
        """Write ``config.yaml`` (and ``files``: name -> text) on the main process, then seed everything.

        ``cfg`` is the resolved training config: ``seed``, ``save_every`` and ``schedule`` (a
        :class:`ScheduleConfig`) drive the run. Also removes temporaries that killed writes left in the
        folder and, for a new run, the metrics of an earlier attempt that never reached a checkpoint.
        Everything drawing random numbers that must be the same in every run (model initialisation,
        data order) comes after this call.
        """
        self._cfg = cfg
        self._pending_files = dict(files or {})
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not self.resuming:
                self._write_config()
            # Resuming: config.yaml is rewritten only when everything has loaded and the loop starts
            # (batches()), so a resume that fails (another store, a damaged last/) leaves the run as it was.
        seed_everything(cfg.seed)
        self._metrics = MetricsLogger(self.dir / METRICS_FILE)
        if self.main:
            remove_stale_temporaries(self.dir)
            if not self.resuming and self._metrics.drop_after(-1):
                # metrics of an earlier attempt that died before its first checkpoint: this run starts over
                logger.info("cleared the metrics of an earlier attempt that never reached a checkpoint")

    def _write_config(self) -> None:
        if self._cfg is None:
            return
        save_config(self._cfg, self.dir / CONFIG_FILE)
        for name, text in self._pending_files.items():
            atomic_write_text(self.dir / name, text)
        self._pending_files = {}

    def train_loader(
        self,
        dataset: Any,
        sampler: Any,
        *,
        num_workers: int,
        path: str | os.PathLike | None = None,
        items: str = "crops",
    ) -> DataLoader:
        """The training loader: ``dataset`` in the batches of ``sampler``, with a private generator.

        ``sampler`` (a batch sampler) must have ``set_epoch(epoch, start_batch)``, ``len()`` (batches per
        epoch of this process) and ``batch_size``; ``dataset.set_epoch(epoch)`` is called too when it
        exists (epoch-dependent augmentation). ``path`` and ``items`` (what the dataset holds) name the
        data in errors.

        Raises
        ------
        InputError
            If the training split holds less than one batch per process.
        """
        self.steps_per_epoch = len(sampler)
        if self.steps_per_epoch == 0:
            raise InputError(
                f"the training split has {len(dataset)} {items}, fewer than one batch of {sampler.batch_size} "
                "per process",
                path=path,
            )
        set_dataset_epoch = getattr(dataset, "set_epoch", None)

        def set_epoch(epoch: int, start: int) -> None:
            sampler.set_epoch(epoch, start)
            if set_dataset_epoch is not None:
                set_dataset_epoch(epoch)

        self._set_epoch = set_epoch
        # A private generator: creating a loader iterator draws a seed, which must not move the global
        # RNG (a resumed run creates its iterator at a different step than an uninterrupted one).
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def attach(
        self,
        model: nn.Module,
        config: Any,
        *,
        state: Callable[[], dict[str, Any]],
        extra: Callable[..., dict[str, Any]],
    ) -> None:
        """Say what the checkpoints hold.

        Parameters
        ----------
        model, config
            The (unwrapped) model and its dataclass config, saved in ``last/`` and ``best/``.
        state
            Returns the trainer's own resume state (optimizers, schedulers, ...), saved in
            ``last/trainer_state.pt`` beside the run's counters and RNG states.
        extra
            ``extra(**more)`` returns the checkpoint's ``extra`` metadata; ``best/`` passes ``val=``.
        """
        self._model, self._model_config, self._state, self._extra = model, config, state, extra

    def resume(self) -> dict[str, Any] | None:
        """Continue from ``last/`` when resuming: return its trainer state for the trainer's own parts.

        Loads the attached model's weights, restores the step, data position, samples seen and best
        validation, drops metric lines logged after the checkpoint, and restores every process's RNG
        states (last: nothing after this call may draw random numbers that a fresh run would not).
        Returns ``None`` for a new run.
        """
        if not self.resuming:
            return None
        load_model_weights(self.last_dir, self._model, strict=True)
        state = load_trainer_state(self.last_dir)
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.seen = int(state.get(f"{self.unit}_seen", 0))
        self.best_val, self.best_step = float(state["best_val_loss"]), int(state["best_step"])
        if state.get("stopped_early"):
            logger.info("the run had stopped early at step %d; continuing as asked", self.step)
        if self.main:
            dropped = self._metrics.drop_after(self.step)
            if dropped:
                logger.info(
                    "dropped %d metric records logged after step %d (lost with the interruption)", dropped, self.step
                )
        restore_process_rng(state, self.accelerator, seed=self.seed, step=self.step)
        logger.info("resumed %s at step %d (epoch %d, batch %d)", self.dir, self.step, self.epoch, self.batch_in_epoch)
        self._saved_at = self.step  # last/ holds this step already
        return state

    # ---- the loop ------------------------------------------------------------------------------

    def batches(self, loader: Iterable[T]) -> Iterator[T]:
        """Training batches from the run's data position on, until the trainer breaks out of the loop.

        Each pass over ``loader`` is a fresh epoch (reshuffled, augmented anew); nothing is yielded if
        the run already reached ``schedule.max_steps``.
        """
        from tqdm.auto import tqdm

        if self.main and self.resuming:
            self._write_config()  # the resumed run's settings (e.g. a longer schedule), now that all loaded
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self._start_step = self.step
        self._window_start = self.step + 1
        max_steps = self._cfg.schedule.max_steps
        self._bar = tqdm(
            total=max_steps or None,
            initial=self.step,
            desc=self.name,
            unit="step",
            disable=not (self.progress_bar and self.main),
            dynamic_ncols=True,
        )
        if max_steps and self.step >= max_steps:
            logger.info("the run already reached max_steps=%d; nothing to train", max_steps)
            return
        self._t_last = time.perf_counter()
        for epoch, index, batch in infinite_loader(
            loader, self._set_epoch, start_epoch=self.epoch, start_batch=self.batch_in_epoch
        ):
            self._position = (epoch, index + 1)
            yield batch

    def step_done(self, samples: int, values: Mapping[str, Any]) -> None:
        """Count one optimizer step on a batch of ``samples`` (this process's); add ``values`` to the :attr:`window`.

        The step's time runs from the end of the previous step (:meth:`end_step`), so validation and
        checkpoints are not counted in the throughput. ``values["loss"]`` is shown on the progress bar.

        Raises
        ------
        TrainingDiverged
            With one process, if a Python-number value is NaN or infinite (tensor values, and values of
            several processes, are checked at the next logging step, validation or checkpoint).
        """
        self.step += 1
        for key, value in values.items():
            if not isinstance(value, Tensor) and not math.isfinite(value):
                self._nonfinite.setdefault(key, self.step)
        self.epoch, self.batch_in_epoch = self._position
        n = int(samples) * self.world
        self.seen += n
        self.window.add(values, n, time.perf_counter() - self._t_last)
        loss = values.get("loss")
        self._last_loss = loss.detach() if isinstance(loss, Tensor) else loss
        self._bar.update(1)
        if self._nonfinite and self.world == 1:
            raise self._diverged(list(self._nonfinite))

    def at_last_step(self) -> bool:
        """Whether this step is the last one (``schedule.max_steps`` reached)."""
        max_steps = self._cfg.schedule.max_steps
        return bool(max_steps) and self.step >= max_steps

    def should_log(self) -> bool:
        """Whether to log the training window at this step (every ``schedule.log_every`` steps)."""
        return self.step % self._cfg.schedule.log_every == 0

    def should_eval(self) -> bool:
        """Whether to validate at this step: every ``schedule.eval_every`` steps (0: once per epoch) and at the last.

        When it is, first checks that the training values and the weights are finite (a collective:
        every process calls it at every step).

        Raises
        ------
        TrainingDiverged
            If a training value or a weight is NaN or infinite (on any process).
        """
        every = self._cfg.schedule.eval_every or self.steps_per_epoch
        due = self.step % every == 0 or self.at_last_step()
        if due:
            self.check_finite()
        return due

    def window_means(self) -> dict[str, float]:
        """The window's mean of every value over its steps and all processes; starts a new window.

        A collective (every process calls it at the same step). The window's throughput goes to
        :meth:`progress`.

        Raises
        ------
        TrainingDiverged
            If a mean is NaN or infinite (a value of some step and process was).
        """
        means = self.window.close(self.accelerator)
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        if bad:
            raise self._diverged(bad)
        self._window_start = self.step + 1
        self._bar.set_postfix(loss=f"{means['loss']:.4g}", refresh=False)
        return means

    def progress(self) -> dict[str, float]:
        """``epoch`` (fractional passes over the training split) and ``<unit>_per_s`` of the last window."""
        return {
            "epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
            f"{self.unit}_per_s": self.window.rate,
        }

    def log(self, split: str, values: Mapping[str, Any] | None = None, **more: Any) -> None:
        """Write one ``metrics.jsonl`` record at the current step (main process only; keys in the order given)."""
        if self.main:
            self._metrics.log(self.step, split, values, **more)

    def evaluated(self, val: Mapping[str, Any], *, improved: bool | None = None, **more: Any) -> bool:
        """Record a validation: keep ``best/`` if it improved, log the ``val`` record; return ``improved``.

        Parameters
        ----------
        val
            The validation values (``val[best]`` is the metric that picks ``best/``).
        improved
            Whether this is a new best; ``None``: ``val[best]`` is below the best so far.
        **more
            Added to the ``val`` record after ``best_<metric>`` and ``improved``.
        """
        score = val[self.best_metric]
        if not math.isfinite(float(score)):  # validation values are reduced: every process agrees
            raise self._diverged([f"validation {self.best_metric}"], step=self.step)
        if improved is None:
            improved = score < self.best_val
        if improved:
            self.best_val, self.best_step = score, self.step
            self.accelerator.wait_for_everyone()
            self.check_finite()
            if self.main:
                save_checkpoint(
                    self.best_dir,
                    model=self._model,
                    config=self._model_config,
                    trainer_state=None,
                    extra={**self._extra(val=val), **self._data_extra},
                )
        self.last_val = {"step": self.step, **val}
        self._evaluated = True
        self.log("val", val, **{f"best_{self.best_metric}": self.best_val}, improved=improved, **more)
        self._bar.set_postfix(loss=f"{float(self._last_loss):.4g}", val=f"{score:.4g}", refresh=False)
        return improved

    def stop_early(self, reason: str) -> None:
        """End the run after this step (:meth:`end_step` returns ``True``); ``reason`` goes to the log."""
        self.stopped_early = True
        logger.info("stopping early at step %d: %s", self.step, reason)

    def end_step(self) -> bool:
        """Finish a step: write ``last/`` when due; return ``True`` when the run ends here.

        ``last/`` is written every ``save_every`` steps, or after each validation when ``save_every`` is 0.
        The run ends at ``schedule.max_steps`` or after :meth:`stop_early`.
        """
        save_every = self._cfg.save_every
        if (save_every and self.step % save_every == 0) or (not save_every and self._evaluated):
            self.save_last()
        self._evaluated = False
        if self.stopped_early or self.at_last_step():
            return True
        self._t_last = time.perf_counter()
        return False

    def save_last(self) -> None:
        """Write ``last/``: weights, the trainer's state, the run's counters and every process's RNG states.

        A collective (every process calls it); only the main process writes.

        Raises
        ------
        TrainingDiverged
            If a training value or a weight is NaN or infinite (nothing is written).
        """
        self.accelerator.wait_for_everyone()
        self.check_finite()
        rng = process_rng_states(self.accelerator)  # a collective: before the main-process-only write
        if self.main:
            counters = {
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                f"{self.unit}_seen": self.seen,
                "best_val_loss": self.best_val,
                "best_step": self.best_step,
                "stopped_early": self.stopped_early,
            }
            save_checkpoint(
                self.last_dir,
                model=self._model,
                config=self._model_config,
                trainer_state={**self._state(), **counters, **rng},
                extra={**self._extra(), **self._data_extra},
            )
        self._saved_at = self.step

    def check_finite(self) -> None:
        """Stop the run if a training value of the open window or a weight is NaN or infinite.

        A collective (every process calls it at the same step): each process checks its own values and
        the attached model's weights, and one all-reduced flag makes every process stop together.

        Raises
        ------
        TrainingDiverged
            Naming the step, the terms and / or the weights.
        """
        terms = list(self._nonfinite)
        tensors = {k: v for k, v in self.window.sums.items() if isinstance(v, Tensor) and k not in self._nonfinite}
        if tensors:
            finite = torch.isfinite(torch.stack([v.reshape(()) for v in tensors.values()])).tolist()
            terms += [k for k, fine in zip(tensors, finite, strict=True) if not fine]
        bad = nonfinite_tensors(self._model.state_dict()) if self._model is not None else []
        local = bool(terms or bad)
        if self.world > 1:
            flag = torch.tensor([float(local)], device=self.device)
            local = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        if local:
            raise self._diverged(terms, weights=describe_nonfinite(bad) if bad else "")

    def _diverged(self, terms: Sequence[str], *, weights: str = "", step: int | None = None) -> TrainingDiverged:
        """The error of a run whose ``terms`` (or ``weights``) turned non-finite; says what to do."""
        if step is None:  # the first step with a known non-finite value, else the open window
            known = [self._nonfinite[t] for t in terms if t in self._nonfinite]
            step = min(known) if known else None
        if step is not None:
            when = f"at step {step}"
        elif self._window_start < self.step:
            when = f"between steps {self._window_start} and {self.step}"
        else:
            when = f"at step {self.step}"
        what = []
        if terms:
            more = f" and {len(terms) - 5} more" if len(terms) > 5 else ""
            what.append(f"{', '.join(terms[:5])}{more} became NaN or infinite")
        if weights:
            what.append(f"the weights: {weights}")
        if not what:
            what.append("a value became NaN or infinite on another process")
        lr = getattr(getattr(self._cfg, "optim", None), "lr", None)
        lower = f"a lower optim.lr (now {lr:g})" if isinstance(lr, int | float) else "a lower learning rate"
        if self._saved_at >= 0:
            advice = (
                f"nothing non-finite was saved: last/ (step {self._saved_at}) is intact; resume from it with "
                f"--resume and {lower}, e.g. --set optim.lr=..."
            )
        else:
            advice = f"no checkpoint was written; train again with {lower}"
        return TrainingDiverged(f"{self.dir}: training diverged {when}: {'; '.join(what)}; {advice}")

    def close(self) -> None:
        """Close the progress bar and the metrics file."""
        if self._bar is not None:
            self._bar.close()
        if self._metrics is not None:
            self._metrics.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        if exc_type is not None and self.main:
            release_output(self.dir)

    def finish(self, **extra: Any) -> dict[str, Any]:
        """Write ``last/`` unless this step's is written; return (and log) the run's summary.

        Returns
        -------
        dict
            ``steps`` (total), ``steps_this_run``, ``epochs`` (fractional passes over the training split),
            ``best_val_loss`` (the best ``best`` metric), ``best_step``, ``<unit>_per_s`` (training
            throughput of this call, validation excluded), ``<unit>_seen`` (all processes, whole run),
            then ``extra``, then ``run_dir``.
        """
        if self._saved_at != self.step:
            self.save_last()
        summary = {
            "steps": self.step,
            "steps_this_run": self.step - self._start_step,
            "epochs": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
            "best_val_loss": self.best_val,
            "best_step": self.best_step,
            f"{self.unit}_per_s": self.window.throughput,
            f"{self.unit}_seen": self.seen,
            **extra,
            "run_dir": str(self.dir),
        }
        logger.info(
            "trained %s for %d steps (%.3g %s/s); best validation %s %.5g at step %d%s",
            self.name,
            self.step,
            summary[f"{self.unit}_per_s"],
            self.unit,
            self.best_metric,
            self.best_val,
            self.best_step,
            " (stopped early)" if self.stopped_early else "",
        )
        if self.main:
            release_output(self.dir)
        return summary

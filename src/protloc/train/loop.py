"""Building blocks of protloc's explicit, step-counted training loops (the run itself: :mod:`protloc.train.engine`).

- :class:`MetricsLogger`: one JSON line per record in ``metrics.jsonl``, flushed as written, so a
  run can be followed (``tail -f``) and survives a crash up to the last line;
- :class:`PlateauController`: learning-rate reduction on a validation plateau and early stopping,
  with the counters the cytoself paper describes (and the reference code gets wrong);
- seeding and random states per process (:func:`seed_everything`, :func:`seed_process`,
  :func:`process_rng_states`, :func:`restore_process_rng`), :func:`mean_over_processes`,
  :func:`make_accelerator`, :func:`infinite_loader`, :func:`set_lr`, :func:`clip_gradients`;
- config checks shared by the training configs (:func:`check_config`, :func:`check_run_options`,
  :func:`check_adam_options`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import numpy as np
import torch

from protloc._fs import atomic_path
from protloc.errors import ConfigError
from protloc.models.checkpoint import capture_rng_state, restore_rng_state

__all__ = [
    "MetricsLogger",
    "PlateauController",
    "check_adam_options",
    "check_config",
    "check_run_options",
    "clip_gradients",
    "cpu_has_bf16",
    "cpu_name",
    "infinite_loader",
    "make_accelerator",
    "mean_over_processes",
    "process_rng_states",
    "resolve_precision",
    "restore_process_rng",
    "seed_everything",
    "seed_process",
    "set_lr",
    "to_python",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def to_python(value: Any) -> Any:
    """Turn tensors / NumPy scalars (and containers of them) into JSON-serialisable Python values."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.item() if value.numel() == 1 else value.cpu().tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_python(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _json_default(value: Any) -> Any:
    converted = to_python(value)
    if converted is value:
        raise TypeError(f"not JSON serialisable: {type(value).__name__}")
    return converted


class MetricsLogger:
    """Append metrics as JSON lines: ``{"step": ..., "split": "train" | "val", ...}``.

    Parameters
    ----------
    path
        The ``.jsonl`` file (created with its folder; appended to if it exists).

    Notes
    -----
    Each record is flushed when written. Non-finite floats are written as JSON ``NaN`` /
    ``Infinity`` (Python's ``json`` reads them back), so a diverging loss is recorded rather than
    crashing the logger.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] | None = None

    def _file(self) -> IO[str]:
        if self._fh is None or self._fh.closed:
            self._fh = open(self.path, "a", encoding="utf-8")  # kept open: one line per step
        return self._fh

    def log(self, step: int, split: str, metrics: Mapping[str, Any] | None = None, **more: Any) -> dict[str, Any]:
        """Write one record and return it.

        Parameters
        ----------
        step
            Optimizer steps taken so far.
        split
            ``"train"`` or ``"val"`` (any short tag is accepted).
        metrics, **more
            Values (tensors are converted with :func:`to_python`).
        """
        record: dict[str, Any] = {"step": int(step), "split": str(split)}
        for source in (metrics or {}, more):
            for key, value in source.items():
                if key in ("step", "split"):
                    raise ValueError(f"metric name {key!r} is reserved")
                record[str(key)] = to_python(value)
        fh = self._file()
        fh.write(json.dumps(record, default=_json_default) + "\n")
        fh.flush()
        return record

    def drop_after(self, step: int) -> int:
        """Remove records with ``step`` greater than ``step`` (after resuming from that step).

        Returns the number of records removed. The file is rewritten atomically.
        """
        self.close()
        if not self.path.is_file():
            return 0
        kept: list[str] = []
        dropped = 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                rec_step = int(json.loads(line).get("step", -1))
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                # A line cut short by a crash: drop it too.
                dropped += 1
                continue
            if rec_step > step:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        return dropped

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict[str, Any]]:
        """Read all records of a metrics file."""
        text = Path(path).read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def close(self) -> None:
        """Close the file (a later :meth:`log` reopens it)."""
        if self._fh is not None and not self._fh.closed:
            self._fh.close()
        self._fh = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class PlateauController:
    """Reduce the learning rate on a validation plateau; stop after a longer one.

    The cytoself protocol (paper Methods, "Training protocol"): the learning rate is multiplied by
    0.1 every time the validation loss has not improved for 4 epochs, and training ends when it has
    not improved for 12 consecutive epochs. Here a "check" is whatever the loop calls
    :meth:`update` on (an epoch, or every ``eval_every`` steps).

    Parameters
    ----------
    patience
        Checks without improvement before each reduction. The reduction counter restarts after every
        reduction, so a long plateau reduces every ``patience`` checks (4, 8, ...); the PyTorch
        reference never reset it and reduced at every check after the 4th.
    factor
        Multiplier of the learning rate at each reduction.
    stop_patience
        Stop once this many consecutive checks have not improved on the best loss (0: never stop).
    min_delta
        A loss counts as an improvement only if it is below ``best - min_delta``.

    Attributes
    ----------
    best : float
        Best loss so far (``inf`` before the first check).
    lr_scale : float
        Product of all reductions so far (multiply the base learning rate by it).
    num_bad : int
        Consecutive checks since the best.
    """

    def __init__(self, patience: int = 4, factor: float = 0.1, stop_patience: int = 12, min_delta: float = 0.0) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"factor must be in (0, 1], got {factor}")
        if stop_patience < 0:
            raise ValueError(f"stop_patience must be >= 0, got {stop_patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.patience = int(patience)
        self.factor = float(factor)
        self.stop_patience = int(stop_patience)
        self.min_delta = float(min_delta)
        self.best = math.inf
        self.num_bad = 0
        self.bad_since_reduction = 0
        self.lr_scale = 1.0
        self.num_reductions = 0
        self.num_checks = 0

    def update(self, val_loss: float) -> tuple[bool, bool, bool]:
        """Record one validation loss.

        Parameters
        ----------
        val_loss
            The check's loss; NaN counts as no improvement.

        Returns
        -------
        improved : bool
            The loss is a new best (save the best checkpoint).
        lr_scale_changed : bool
            :attr:`lr_scale` was just multiplied by ``factor`` (apply it to the optimizer).
        should_stop : bool
            ``stop_patience`` consecutive checks without improvement.
        """
        loss = float(val_loss)
        self.num_checks += 1
        improved = not math.isnan(loss) and loss < self.best - self.min_delta
        changed = False
        if improved:
            self.best = loss
            self.num_bad = 0
            self.bad_since_reduction = 0
        else:
            self.num_bad += 1
            self.bad_since_reduction += 1
            if self.bad_since_reduction >= self.patience:
                self.lr_scale *= self.factor
                self.num_reductions += 1
                self.bad_since_reduction = 0
                changed = True
        stop = self.stop_patience > 0 and self.num_bad >= self.stop_patience
        return improved, changed, stop

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "patience": self.patience,
            "factor": self.factor,
            "stop_patience": self.stop_patience,
            "min_delta": self.min_delta,
            "best": self.best,
            "num_bad": self.num_bad,
            "bad_since_reduction": self.bad_since_reduction,
            "lr_scale": self.lr_scale,
            "num_reductions": self.num_reductions,
            "num_checks": self.num_checks,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counters (the settings given to ``__init__`` win over the saved ones)."""
        self.best = float(state["best"])
        self.num_bad = int(state["num_bad"])
        self.bad_since_reduction = int(state["bad_since_reduction"])
        self.lr_scale = float(state["lr_scale"])
        self.num_reductions = int(state.get("num_reductions", 0))
        self.num_checks = int(state.get("num_checks", 0))

    def __repr__(self) -> str:
        return (
            f"PlateauController(best={self.best:.6g}, num_bad={self.num_bad}, "
            f"bad_since_reduction={self.bad_since_reduction}, lr_scale={self.lr_scale:g})"
        )


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and all CUDA devices)."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)  # also seeds every CUDA device


def seed_process(seed: int, rank: int, step: int = 0) -> None:
    """Give process ``rank`` of a data-parallel run its own random streams (dropout, masks, noise).

    Every process starts from :func:`seed_everything` with the run's seed, so the model is initialised
    identically everywhere; called after that, this reseeds every process but the first from
    ``(seed, rank, step)``, so the processes do not draw the same dropout masks for their different
    crops. Process 0 keeps the run's stream, which keeps a one-process run exactly as it was.
    """
    if rank:
        derived = np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(1, dtype=np.uint64)[0]
        seed_everything(int(derived) & ((1 << 63) - 1))


def process_rng_states(accelerator: Any) -> dict[str, Any]:
    """Every process's RNG states, for a trainer state: ``{"rng": first process's, "rng_ranks": [all, in
    process order]}`` (:func:`restore_process_rng` reads them back). A collective: all processes call it."""
    states = [capture_rng_state()]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        states = gather_object(states)
    return {"rng": states[0], "rng_ranks": states}


def restore_process_rng(state: Mapping[str, Any], accelerator: Any, *, seed: int, step: int) -> None:
    """Restore this process's RNG states from a trainer state saved with ``rng_ranks``.

    A state saved by a run with another number of processes (or before per-process states were kept)
    restores the first process's states and reseeds the others with :func:`seed_process`.
    """
    ranks = state.get("rng_ranks")
    world, rank = accelerator.num_processes, accelerator.process_index
    if ranks is not None and len(ranks) == world:
        restore_rng_state(ranks[rank])
        return
    if world > 1:
        logger.warning(
            "the checkpoint holds random states of %s process(es), this run has %d: processes other than the "
            "first are reseeded, so the resumed run will not repeat an uninterrupted one exactly",
            len(ranks) if ranks is not None else "an unknown number of",
            world,
        )
    restore_rng_state(state["rng"])
    seed_process(seed, rank, step)


def mean_over_processes(
    accelerator: Any, sums: Mapping[str, float], counts: Mapping[str, int] | int
) -> dict[str, float]:
    """Means of logged values over every process: ``sum of sums / sum of counts`` per key.

    Training metrics are computed on each process's share of the batch; logging only the first
    process's would report a noisier, different curve than a one-process run with the same global
    batch. One small gather per logging step (a collective: every process calls it at the same step).
    Keys missing on some processes are averaged over the processes that have them.
    """
    if isinstance(counts, int):
        counts = dict.fromkeys(sums, counts)
    parts = [(dict(sums), dict(counts))]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object(parts)
    total: dict[str, float] = {}
    n: dict[str, int] = {}
    for part_sums, part_counts in parts:
        for k, v in part_sums.items():
            total[k] = total.get(k, 0.0) + float(v)
            n[k] = n.get(k, 0) + int(part_counts[k])
    return {k: total[k] / n[k] for k in total}


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bfloat16 natively (oneDNN's check: AVX512-BF16, AMX or similar).

    Without such instructions bfloat16 is emulated and slower than float32.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (throughputs compare only between runs on one machine)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def resolve_precision(mixed_precision: str, *, cpu: bool) -> str:
    """The precision a run asking for ``mixed_precision`` gets on this machine (logged when it differs).

    ``"bf16"`` stays bf16 on GPUs that support it and on CPUs with native bfloat16, becomes ``"fp16"``
    on older GPUs and ``"no"`` (float32) on other CPUs; ``"fp16"`` needs a GPU.
    """
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {mixed_precision!r}")
    if cpu and mixed_precision == "bf16" and not cpu_has_bf16():
        logger.info("this CPU has no native bfloat16 instructions; training in float32")
        return "no"
    if cpu and mixed_precision == "fp16":
        logger.info("mixed_precision='fp16' needs a GPU; training on CPU in float32")
        return "no"
    if mixed_precision == "bf16" and not cpu and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        logger.info("this GPU has no bfloat16 support; using fp16 mixed precision instead")
        return "fp16"
    return mixed_precision


def make_accelerator(mixed_precision: str = "no", cpu: bool | None = None, **kwargs: Any) -> Any:
    """Build an :class:`accelerate.Accelerator`, falling back to full precision on CPU.

    Parameters
    ----------
    mixed_precision
        ``"no"``, ``"bf16"`` or ``"fp16"``. On CPU, ``"bf16"`` autocast is used where the CPU has
        native bfloat16 instructions (AVX512-BF16 / AMX: oneDNN runs the convolutions in bfloat16,
        about 1.7x faster for the ``paper`` cytoself in a probe on an AVX512-BF16 CPU); elsewhere, and for
        ``"fp16"`` (unsupported on CPU), the accelerator falls back to ``"no"`` and says so in the log.
    cpu
        Force the CPU (``True``), or let Accelerate pick the device (``False``); ``None`` = CPU
        exactly when no CUDA device is present.
    **kwargs
        Passed to :class:`accelerate.Accelerator`.

    Returns
    -------
    accelerate.Accelerator
    """
    from accelerate import Accelerator

    if cpu is None:
        cpu = not torch.cuda.is_available()
    mixed_precision = resolve_precision(mixed_precision, cpu=cpu)
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        # Accelerate keeps one precision per process; a second run in the same process (tests,
        # benchmarks) may ask for another. The process group (PartialState) is kept.
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, **kwargs)


def infinite_loader(
    loader: Iterable[T],
    set_epoch: Callable[[int, int], None] | None = None,
    *,
    start_epoch: int = 0,
    start_batch: int = 0,
) -> Iterator[tuple[int, int, T]]:
    """Iterate a data loader forever, one fresh pass per epoch: yields ``(epoch, batch_index, batch)``.

    Unlike :func:`itertools.cycle`, which stores the first pass and replays it (same order, same
    augmentations, and every batch kept in memory), each epoch re-iterates ``loader`` so shuffling
    and augmentation are drawn anew.

    Parameters
    ----------
    loader
        Anything iterable, re-iterable once per epoch (a :class:`~torch.utils.data.DataLoader`).
    set_epoch
        Called as ``set_epoch(epoch, start_batch)`` before each pass; it must make the pass begin at
        batch ``start_batch`` of that epoch (non-zero only for the first pass of a resumed run), e.g.
        :meth:`protloc.data.datasets.CropBatchSampler.set_epoch`. Without it, a non-zero
        ``start_batch`` is reached by reading and discarding batches.
    start_epoch, start_batch
        Where to begin (a resumed run's position).

    Raises
    ------
    RuntimeError
        If a pass yields no batch at all (it would otherwise loop forever).
    """
    epoch, first = int(start_epoch), int(start_batch)
    while True:
        skip = 0
        if set_epoch is not None:
            set_epoch(epoch, first)
        else:
            skip = first
        index = first
        yielded = False
        for batch in loader:
            if skip:
                skip -= 1
                continue
            yielded = True
            yield epoch, index, batch
            index += 1
        if not yielded and first == 0:
            raise RuntimeError("the data loader yielded no batch in a whole epoch")
        epoch, first = epoch + 1, 0


def warmup_cosine(step: int, lr: float, *, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warm-up, then cosine decay.

    Rises linearly to ``lr`` over ``warmup_steps`` steps, then follows half a cosine down to
    ``min_ratio * lr`` at ``max_steps`` (constant ``lr`` when ``max_steps`` is 0 or within the warm-up).
    A function of the step alone, so a resumed run follows the same curve.
    """
    if warmup_steps and step <= warmup_steps:
        return lr * step / warmup_steps
    if not max_steps or max_steps <= warmup_steps:
        return lr
    t = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(lr: float, *optimizers: Any) -> None:
    """Set the learning rate of every parameter group of ``optimizers`` (Accelerate-wrapped or not)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


def clip_gradients(accelerator: Any, parameters: Iterable[torch.Tensor], max_norm: float) -> None:
    """Clip the gradient norm of ``parameters`` to ``max_norm`` (0: no clipping)."""
    if max_norm > 0:
        accelerator.clip_grad_norm_(parameters, max_norm)


def check_config(condition: bool, message: str) -> None:
    """Raise :class:`~protloc.errors.ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def check_run_options(mixed_precision: str, save_every: int) -> None:
    """Validate the run settings shared by every training configuration (``mixed_precision``, ``save_every``)."""
    check_config(save_every >= 0, f"save_every must be >= 0, got {save_every}")
    check_config(
        mixed_precision in ("no", "bf16", "fp16"),
        f"mixed_precision must be 'no', 'bf16' or 'fp16', got {mixed_precision!r}",
    )


def check_adam_options(lr: float, betas: tuple[float, ...], grad_clip: float) -> None:
    """Validate the Adam settings shared by every training configuration (``optim.*``)."""
    check_config(lr > 0, f"optim.lr must be > 0, got {lr}")
    check_config(
        len(betas) == 2 and all(0 <= b < 1 for b in betas),
        f"optim.betas must be two values in [0, 1), got {betas}",
    )
    check_config(grad_clip >= 0, f"optim.grad_clip must be >= 0, got {grad_clip}")

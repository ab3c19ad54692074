"""Training the protein sequence encoder on the Swiss-Prot corpus (``protloc train encoder``).

Data (:mod:`protloc.data.proteome`, :mod:`protloc.data.sequence_data`): the corpus of
``scripts/build_protein_corpus.py``. Training rows are those of partition ``train`` (all non-human
proteins and the human train partition; with ``data.human_only`` the human ones only -- the baseline
that shows what the other species add); validation rows are the human ``val`` partition; ``test`` rows
are never read. Each epoch draws ``data.epoch_size`` training proteins by weighted sampling without
replacement (human proteins weigh ``data.human_weight``, times a ``sample_weight`` column when the
corpus has one), in length-sorted batches of at most ``data.tokens_per_batch`` padded tokens, in
shuffled order; ``data.mask_prob`` of the residues are masked for the masked-residue loss.

Loss (:meth:`~protloc.models.encoder.ProteinEncoder.loss`): presence BCE (12 compartments + nucleus) +
distribution cross-entropy + ``model.mlm_weight`` x masked-residue cross-entropy. AdamW with linear
warm-up and cosine decay to ``optim.min_lr_ratio`` of the peak at ``schedule.max_steps``; gradient norm
clipped to ``optim.grad_clip``.

Validation (every ``schedule.eval_every`` steps and at the end) on the human val rows: the mean loss
terms (masked inputs, a fixed masking), then on the unmasked inputs the AUROC of each presence output
(``val_auroc_<name>``; a compartment with a single class among the val proteins is skipped),
``val_macro_auroc`` (mean over the 12 compartments) and ``val_nucleus_auroc``. ``best/`` is kept on the
lowest ``val_score = 1 - val_macro_auroc``; ``schedule.stop_patience`` checks without improvement stop
the run. With several processes every process validates the whole split (the same numbers everywhere).

``mixed_precision="bf16"`` trains under bfloat16 autocast through Accelerate, on a GPU and on a CPU with
native bfloat16 (AVX512-BF16 / AMX, where this model is faster; see ``benchmarks/encoder_speed.py``;
other CPUs train in float32). Torch's thread count is left as the environment sets it.

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``last/`` and ``best/`` (``model.safetensors`` +
``config.json``, whose ``extra`` records the corpus and its SHA-256); ``resume=True`` continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from protloc.data.proteome import PRESENCE_NAMES, read_corpus, table_sha256
from protloc.data.sequence_data import ProteinDataset, TokenBudgetBatchSampler
from protloc.errors import ConfigError, InputError
from protloc.models.encoder import N_COMPARTMENTS, EncoderConfig, ProteinEncoder
from protloc.train.engine import LossModule, Run, ScheduleConfig, eval_mode
from protloc.train.loop import check_adam_options, clip_gradients, seed_process, set_lr, warmup_cosine
from protloc.train.loop import check_config as _check

__all__ = [
    "EncoderDataConfig",
    "EncoderOptimConfig",
    "EncoderScheduleConfig",
    "EncoderTrainConfig",
    "evaluate_encoder",
    "lr_at",
    "train_encoder",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderDataConfig:
    """The corpus and its batches.

    Attributes
    ----------
    corpus
        ``corpus.tsv.gz`` of ``scripts/build_protein_corpus.py``.
    human_only
        Train on the human train partition only (baseline).
    human_weight
        Sampling weight of a human protein (others 1), times the corpus's ``sample_weight`` if any.
    epoch_size
        Proteins drawn per epoch (0 or more than there are: all of them).
    tokens_per_batch
        Padded tokens (residues + ``<cls>`` + ``<sep>``) per batch.
    max_batch_size
        Sequences per batch at most.
    mask_prob
        Share of residues replaced by ``<mask>`` for the masked-residue loss.
    num_workers
        DataLoader worker processes (0: in the training process).
    """

    corpus: str = ""
    human_only: bool = False
    human_weight: float = 3.0
    epoch_size: int = 50_000
    tokens_per_batch: int = 16384
    max_batch_size: int = 256
    mask_prob: float = 0.1
    num_workers: int = 0

    def __post_init__(self) -> None:
        _check(self.human_weight > 0, f"data.human_weight must be > 0, got {self.human_weight}")
        _check(self.epoch_size >= 0, f"data.epoch_size must be >= 0, got {self.epoch_size}")
        _check(self.tokens_per_batch >= 1, f"data.tokens_per_batch must be >= 1, got {self.tokens_per_batch}")
        _check(self.max_batch_size >= 1, f"data.max_batch_size must be >= 1, got {self.max_batch_size}")
        _check(0 <= self.mask_prob < 1, f"data.mask_prob must be in [0, 1), got {self.mask_prob}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class EncoderOptimConfig:
    """AdamW with warm-up and cosine decay.

    Attributes
    ----------
    lr
        Peak learning rate.
    betas
        AdamW's moment decay rates.
    weight_decay
        Decoupled weight decay (not on biases, norms and embeddings).
    warmup_steps
        Linear warm-up from 0 to ``lr``.
    min_lr_ratio
        The learning rate at ``schedule.max_steps``, as a share of ``lr`` (cosine decay).
    grad_clip
        Gradient-norm clipping (0: none).
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup_steps: int = 500
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        check_adam_options(self.lr, self.betas, self.grad_clip)
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class EncoderScheduleConfig(ScheduleConfig):
    """Step budget, validation, logging and early stopping (and the fields of :class:`ScheduleConfig`).

    Attributes
    ----------
    stop_patience
        Stop after this many validation checks without a better ``val_score`` (0: never).
    """

    max_steps: int = 20_000
    eval_every: int = 500
    log_every: int = 50
    stop_patience: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.stop_patience >= 0, f"schedule.stop_patience must be >= 0, got {self.stop_patience}")


@dataclass(frozen=True)
class EncoderTrainConfig:
    """Everything :func:`train_encoder` needs. Presets: :meth:`small` (the shipped encoder), :meth:`tiny`.

    Attributes
    ----------
    model, data, optim, schedule
        See :class:`~protloc.models.encoder.EncoderConfig`, :class:`EncoderDataConfig`,
        :class:`EncoderOptimConfig`, :class:`EncoderScheduleConfig`.
    mixed_precision
        ``"no"`` or ``"bf16"`` (autocast, also on CPU).
    seed
        Seeds initialisation, data order and masking.
    save_every
        Write ``last/`` every this many steps (0: at every validation); also at the end.
    """

    model: EncoderConfig = field(default_factory=EncoderConfig.small)
    data: EncoderDataConfig = field(default_factory=EncoderDataConfig)
    optim: EncoderOptimConfig = field(default_factory=EncoderOptimConfig)
    schedule: EncoderScheduleConfig = field(default_factory=EncoderScheduleConfig)
    mixed_precision: Literal["no", "bf16"] = "no"
    seed: int = 0
    save_every: int = 500

    def __post_init__(self) -> None:
        _check(
            self.mixed_precision in ("no", "bf16"),
            f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}",
        )
        _check(self.save_every >= 0, f"save_every must be >= 0, got {self.save_every}")

    @classmethod
    def small(cls, corpus: str = "") -> EncoderTrainConfig:
        """The shipped encoder's recipe (``encoder-small``): sized to about 60 minutes on 2 CPU cores.

        The small model without dropout (the run sees each protein about once, so there is nothing to
        regularise, and dropout's random masks cost 13% of a CPU step), 8192-token batches (more
        updates for the same compute), 3200 steps at peak learning rate 2e-3 after 200 warm-up steps,
        human proteins drawn 5x as often as others, bfloat16 autocast, validation every 500 steps.
        The shipped ``encoder-small`` is this recipe with ``data.human_only=true``: on the human val
        partition it beat the same recipe on the whole corpus (macro AUROC 0.768 vs 0.733; see
        ``benchmarks/localize.py``); its ``recipe.json`` lists the commands it went through.
        """
        return cls(
            model=dataclasses.replace(EncoderConfig.small(), dropout=0.0),
            data=EncoderDataConfig(corpus=corpus, human_weight=5.0, tokens_per_batch=8192),
            optim=EncoderOptimConfig(lr=2e-3, warmup_steps=200),
            schedule=EncoderScheduleConfig(max_steps=3200, eval_every=500, log_every=25),
            save_every=250,
            mixed_precision="bf16",
        )

    @classmethod
    def tiny(cls, corpus: str = "") -> EncoderTrainConfig:
        """A test-sized run: the tiny model, 2048-token batches, 200 steps, validation every 50."""
        return cls(
            model=EncoderConfig.tiny(),
            data=EncoderDataConfig(corpus=corpus, epoch_size=2000, tokens_per_batch=2048, max_batch_size=32),
            optim=EncoderOptimConfig(warmup_steps=10),
            schedule=EncoderScheduleConfig(max_steps=200, eval_every=50, log_every=10),
            save_every=50,
        )

    @classmethod
    def paper(cls, corpus: str = "") -> EncoderTrainConfig:
        """Alias of :meth:`small` (``protloc train``'s ``--preset paper``)."""
        return cls.small(corpus)


def lr_at(step: int, optim: EncoderOptimConfig, max_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (1-based): linear warm-up, then cosine decay."""
    return warmup_cosine(
        step, optim.lr, warmup_steps=optim.warmup_steps, max_steps=max_steps, min_ratio=optim.min_lr_ratio
    )


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not name.startswith("embed.") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if y.min() == y.max():
        return None
    return float(roc_auc_score(y, p))


@torch.no_grad()
def evaluate_encoder(
    model: ProteinEncoder,
    loader: Iterable[dict[str, Tensor]],
    device: torch.device,
    *,
    max_batches: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """Validation values of ``model`` on ``loader`` (eval mode): mean loss terms and presence AUROCs.

    Parameters
    ----------
    model
        The encoder.
    loader
        Batches of :meth:`~protloc.data.sequence_data.ProteinDataset.collate` (masked inputs).
    device
        Where the model is.
    max_batches
        Stop after this many batches (0: all).
    autocast
        Returns the precision context of each forward pass.

    Returns
    -------
    dict
        ``loss``, ``presence``, ``distribution``, ``mlm`` (means over proteins; ``mlm`` over masked residues'
        batches), ``val_auroc_<name>`` per presence output with both classes, ``val_macro_auroc`` (mean of
        the 12 compartments'), ``val_nucleus_auroc`` (when both classes occur) and
        ``val_score = 1 - val_macro_auroc``.
    """
    sums: dict[str, float] = {}
    count = 0
    probs, targets = [], []
    with eval_mode(model):
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            batch = _to_device(batch, device)
            with autocast():
                out = model.loss(batch)
            n = int(batch["ids"].shape[0])
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            count += n
            original = torch.where(batch["mlm_targets"] != -100, batch["mlm_targets"], batch["ids"])
            with autocast():
                logits = model(original, batch["mask"])["presence"]
            probs.append(torch.sigmoid(logits.float()).cpu().numpy())
            targets.append(batch["presence"].cpu().numpy())
    if count == 0:
        raise RuntimeError("validation saw no proteins")
    values = {k: v / count for k, v in sums.items()}
    p, y = np.concatenate(probs), np.concatenate(targets)
    aurocs: dict[str, float] = {}
    for j, name in enumerate(PRESENCE_NAMES):
        a = _auroc(y[:, j], p[:, j])
        if a is not None:
            aurocs[name] = a
    compartments = [aurocs[n] for n in PRESENCE_NAMES[:N_COMPARTMENTS] if n in aurocs]
    macro = float(np.mean(compartments)) if compartments else 0.5
    values["val_macro_auroc"] = macro
    if "nucleus" in aurocs:
        values["val_nucleus_auroc"] = aurocs["nucleus"]
    values["val_score"] = 1.0 - macro
    values.update({f"val_auroc_{k}": v for k, v in aurocs.items()})
    return values


def _rows(cfg: EncoderTrainConfig) -> tuple[Any, Any]:
    if not cfg.data.corpus:
        raise ConfigError(
            "data.corpus is not set: give the corpus.tsv.gz of scripts/build_protein_corpus.py (--corpus)"
        )
    table = read_corpus(cfg.data.corpus)
    train = table["partition"] == "train"
    if cfg.data.human_only:
        train &= table["human"]
    val = table["human"] & (table["partition"] == "val")
    if not train.any():
        raise InputError(
            "the corpus has no training rows" + (" (human_only)" if cfg.data.human_only else ""), path=cfg.data.corpus
        )
    if not val.any():
        raise InputError("the corpus has no human 'val' rows to validate on", path=cfg.data.corpus)
    return table[train].reset_index(drop=True), table[val].reset_index(drop=True)


def train_encoder(
    cfg: EncoderTrainConfig,
    *,
    run_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the protein sequence encoder (see the module notes).

    Parameters
    ----------
    cfg
        The training configuration (``cfg.data.corpus`` must be set).
    run_dir
        Output folder (``config.yaml``, ``metrics.jsonl``, ``last/``, ``best/``).
    resume
        Continue the run in ``run_dir`` from ``last/``; ``schedule.max_steps`` may be raised.
    progress
        Show a progress bar.

    Returns
    -------
    dict
        The engine's summary (``steps``, ``best_val_loss`` = the best ``val_score``, ``best_step``,
        ``sequences_per_s``, ``sequences_seen``, ...), ``stopped_early``, ``best_val_macro_auroc`` and
        the ``last_val`` record.

    Raises
    ------
    ConfigError
        If ``data.corpus`` is unset or the configuration is invalid.
    InputError
        If the corpus is unreadable or lacks training or human val rows, or the run folder does not fit.
    """
    run = Run(
        run_dir,
        resume=resume,
        mixed_precision=cfg.mixed_precision,
        name="encoder",
        unit="sequences",
        best="val_score",
        progress=progress,
    )
    train_rows, val_rows = _rows(cfg)
    run.check_resume_model(cfg.model, config_cls=EncoderConfig, model_cls=ProteinEncoder)
    dcfg, ocfg, scfg = cfg.data, cfg.optim, cfg.schedule
    run.setup(cfg)
    corpus_sha = table_sha256(dcfg.corpus) if run.main else ""

    # ---- data ----------------------------------------------------------------------------------
    common = dict(max_residues=cfg.model.max_residues, mask_prob=dcfg.mask_prob, seed=cfg.seed)
    train_ds = ProteinDataset(train_rows, human_weight=dcfg.human_weight, **common)
    val_ds = ProteinDataset(val_rows, **common)
    logger.info(
        "training on %d proteins (%d human), validating on %d human val proteins",
        len(train_ds),
        int(train_rows["human"].sum()),
        len(val_ds),
    )
    sampler = TokenBudgetBatchSampler(
        train_ds.lengths,
        train_ds.weights,
        epoch_size=dcfg.epoch_size,
        tokens_per_batch=dcfg.tokens_per_batch,
        max_batch_size=dcfg.max_batch_size,
        seed=cfg.seed,
        num_replicas=run.world,
        rank=run.rank,
    )
    val_sampler = TokenBudgetBatchSampler(
        val_ds.lengths, shuffle=False, tokens_per_batch=dcfg.tokens_per_batch, max_batch_size=dcfg.max_batch_size
    )
    loader = run.train_loader(train_ds, sampler, num_workers=dcfg.num_workers, path=dcfg.corpus, items="proteins")
    loader.collate_fn = train_ds.collate
    val_loader = DataLoader(val_ds, batch_sampler=val_sampler, num_workers=dcfg.num_workers, collate_fn=val_ds.collate)

    # ---- model, optimizer, state ---------------------------------------------------------------
    model = ProteinEncoder(cfg.model)
    seed_process(cfg.seed, run.rank)
    optimizer = torch.optim.AdamW(_param_groups(model, ocfg.weight_decay), lr=ocfg.lr, betas=ocfg.betas)
    wrapped, optimizer = run.accelerator.prepare(LossModule(model), optimizer)
    counters = {"checks_without_improvement": 0}
    run.attach(
        model,
        cfg.model,
        state=lambda: {"optimizer": optimizer.state_dict(), **counters},
        extra=lambda **more: {
            "step": run.step,
            **more,
            "corpus": str(dcfg.corpus),
            "corpus_sha256": corpus_sha,
            "human_only": dcfg.human_only,
            "presence_names": list(PRESENCE_NAMES),
        },
    )
    if (state := run.resume()) is not None:
        optimizer.load_state_dict(state["optimizer"])
        counters["checks_without_improvement"] = int(state.get("checks_without_improvement", 0))

    autocast = run.accelerator.autocast  # bf16 on GPUs and on CPUs with native bfloat16 (make_accelerator)

    # ---- loop ----------------------------------------------------------------------------------
    wrapped.train()
    with run:
        for batch in run.batches(loader):
            lr = lr_at(run.step + 1, ocfg, scfg.max_steps)
            set_lr(lr, optimizer)
            batch = _to_device(batch, run.device)
            with autocast():
                out = wrapped(batch)
            optimizer.zero_grad(set_to_none=True)
            run.accelerator.backward(out["loss"])
            clip_gradients(run.accelerator, wrapped.parameters(), ocfg.grad_clip)
            optimizer.step()
            run.step_done(int(batch["ids"].shape[0]), out)

            if run.should_log():
                run.log("train", run.window_means(), lr=lr, **run.progress())
            if run.should_eval():
                val = evaluate_encoder(model, val_loader, run.device, max_batches=scfg.eval_batches, autocast=autocast)
                improved = run.evaluated(val, lr=lr)
                counters["checks_without_improvement"] = 0 if improved else counters["checks_without_improvement"] + 1
                if scfg.stop_patience and counters["checks_without_improvement"] >= scfg.stop_patience:
                    run.stop_early(f"{scfg.stop_patience} validation checks without improvement")
            if run.end_step():
                break
    best_auroc = 1.0 - run.best_val if math.isfinite(run.best_val) else float("nan")
    return run.finish(stopped_early=run.stopped_early, best_val_macro_auroc=best_auroc, last_val=run.last_val)

"""Which compartment does a CELL-E image show? A classifier of (nucleus, threshold) images.

CELL-E's pixel metrics (threshold pixel accuracy, nucleus proportion) cannot tell a mitochondrial
network from an ER reticulum: both are "cytoplasmic pixels". To ask whether a generated image draws the
*right compartment*, a small CNN is trained on **real** threshold crops (with their nucleus images) of
the training proteins, labelled with each protein's compartment, and then names the compartment of
other images. Its agreement with the truth on real held-out images is the ceiling (how well the
compartment can be read from a 64 px threshold image at all); its agreement on the images CELL-E
generated for the same crops says how much of that CELL-E draws.

- :class:`CompartmentClassifier`: 4 convolution stages (BatchNorm, GELU, stride-2), global average
  pooling, a linear layer to the 12 compartments of :data:`~protloc.data.world.compartments.COMPARTMENTS`
  (147k parameters; about 2 s per 1,000 crops and epoch at 64 px on one CPU thread).
- :func:`train_compartment_classifier`: trains it on the crops of one split of a CELL-E crop store,
  with soft targets from the proteins' compartment weights when given (GO-derived: a protein can be in
  several compartments), a random flip and quarter turn per image as augmentation (the same for both
  channels: a cell has no up), and inverse-frequency class weights in the loss (nucleoplasm and plasma
  membrane proteins outnumber centrosome proteins twenty to one; unweighted, the classifier would learn to
  say "nucleoplasm", and its agreement would mostly measure the class mix). Loss weights rather than a
  class-balanced sampler: every crop is seen once per epoch, and no rare-class crop is repeated many times.
- :func:`classify`, :func:`agreement_table`: probabilities for images and agreement with labels, per
  protein (every protein counts once), per compartment and as a confusion matrix.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from protloc.data.datasets import CelleDataset
from protloc.data.io import CropStore
from protloc.data.world.compartments import COMPARTMENTS
from protloc.errors import ConfigError, InputError

__all__ = ["CompartmentClassifier", "agreement_table", "classify", "train_compartment_classifier"]

N_CLASSES = len(COMPARTMENTS)


class CompartmentClassifier(nn.Module):
    """A small CNN: ``[B, 2, S, S]`` (nucleus, threshold) -> logits ``[B, 12]``.

    Parameters
    ----------
    width
        Channels of the first stage (doubled twice; 16 gives 146,924 parameters).

    Notes
    -----
    Every stage halves the side (stride-2 convolution), then the features are averaged over the image,
    so any side works; the CELL-E images are 64 px (tests use 16 or 32).
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        chans = [2, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.GELU(),
                nn.Conv2d(cout, cout, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.GELU(),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, 12]`` of images ``[B, 2, S, S]`` (channel 0 nucleus, channel 1 threshold)."""
        if x.dim() != 4 or x.shape[1] != 2:
            raise InputError(f"expected images [B, 2, S, S] (nucleus, threshold), got {tuple(x.shape)}")
        return self.head(self.features(x).mean(dim=(-2, -1)))


def _stack(nucleus: Tensor, threshold: Tensor) -> Tensor:
    """``[N, 2, S, S]``: the nucleus image and the threshold image binarised at 0.5."""
    if nucleus.dim() != 4 or nucleus.shape[1] != 1 or nucleus.shape != threshold.shape:
        raise InputError(
            f"nucleus and threshold images must both be [N, 1, S, S], got {tuple(nucleus.shape)} and "
            f"{tuple(threshold.shape)}"
        )
    return torch.cat([nucleus.float(), (threshold.float() >= 0.5).float()], dim=1)


def _read_split(
    store: CropStore,
    *,
    split: str,
    labels: Mapping[str, str],
    image_size: int,
    max_crops: int | None,
    seed: int,
    progress: bool,
) -> tuple[Tensor, list[str], int]:
    """(images [N, 2, S, S] as float16, protein ids, skipped crops) of the labelled crops of a split.

    The crops are read once, in store order (one Zarr read per chunk), centre-cropped and area-averaged
    to ``image_size`` by :class:`~protloc.data.datasets.CelleDataset` (threshold recomputed at the mean
    of the resized protein image, as CELL-E sees it); float16 holds {0, 1} exactly and the nucleus to
    3 decimals, at half the memory (28,000 crops of 64 px: 0.9 GB).
    """
    from tqdm.auto import tqdm

    proteins = store.obs["protein_id"].astype(str)
    split_mask = (store.obs["split"].astype(str) == split).to_numpy() if "split" in store.obs else None
    if split_mask is None or not split_mask.any():
        raise InputError(f"the crop store has no crop in split {split!r}", path=store.path)
    ids = sorted(set(proteins[split_mask]))
    dataset = CelleDataset(
        store, split=split, sequences=dict.fromkeys(ids, "M"), image_size=image_size, augment=False, seed=seed
    )
    keep = np.flatnonzero([str(p) in labels for p in dataset.protein_ids])
    skipped = len(dataset) - keep.size
    if keep.size == 0:
        raise InputError(f"no crop of split {split!r} has a labelled protein (e.g. {ids[0]!r})", path=store.path)
    if max_crops is not None and keep.size > max_crops:
        keep = np.sort(np.random.default_rng(seed).choice(keep, size=max_crops, replace=False))
    images, pids = [], []
    for start in tqdm(
        range(0, keep.size, 256), desc=f"read {split} crops", unit="batch", leave=False, disable=not progress
    ):
        batch = dataset.read_batch(keep[start : start + 256])
        images.append(_stack(batch["nucleus"], batch["threshold"]).to(torch.float16))
        pids += [str(p) for p in batch["protein_id"]]
    return torch.cat(images), pids, int(skipped)


def _targets(pids: Sequence[str], labels: Mapping[str, str], weights: Mapping[str, np.ndarray] | None) -> Tensor:
    out = np.zeros((len(pids), N_CLASSES), dtype=np.float32)
    for i, p in enumerate(pids):
        if labels[p] not in COMPARTMENTS:
            raise InputError(f"protein {p!r}: unknown compartment {labels[p]!r} (use one of {', '.join(COMPARTMENTS)})")
        w = None if weights is None else weights.get(p)
        if w is not None:
            w = np.asarray(w, dtype=np.float64).reshape(-1)
            if w.size != N_CLASSES or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise InputError(f"protein {p!r}: compartment weights must be {N_CLASSES} non-negative numbers")
            out[i] = w / w.sum()
        else:
            out[i, COMPARTMENTS.index(labels[p])] = 1.0
    return torch.from_numpy(out)


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """A random element of D4 per image (flip, then quarter turns), the same for both of its channels."""
    codes = torch.randint(0, 8, (x.shape[0],), generator=g)
    out = torch.empty_like(x)
    for code in codes.unique().tolist():
        sel = codes == code
        block = x[sel].flip(-1) if code >= 4 else x[sel]
        out[sel] = torch.rot90(block, code % 4, dims=(-2, -1))
    return out


def train_compartment_classifier(
    store: CropStore | str | os.PathLike,
    *,
    labels: Mapping[str, str],
    weights: Mapping[str, np.ndarray] | None = None,
    split: str = "train",
    val_split: str | None = "val",
    image_size: int = 64,
    epochs: int = 4,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    max_crops: int | None = None,
    progress: bool = True,
) -> tuple[CompartmentClassifier, dict[str, Any]]:
    """Train a :class:`CompartmentClassifier` on the real crops of one split of a CELL-E crop store.

    Parameters
    ----------
    store
        A CELL-E crop store (``celle.zarr`` of ``protloc prepare``) or its path.
    labels
        ``protein_id`` -> compartment name; crops of proteins without a label are skipped (counted).
    weights
        ``protein_id`` -> the 12 compartment weights (soft targets); None: one-hot labels.
    split, val_split
        Split trained on; split whose accuracy (argmax vs label, over images) is recorded per epoch.
    image_size
        Side the stored crops are area-averaged to (CELL-E's ``image_size``); a multiple of 8.
    epochs, batch_size, lr
        AdamW schedule (cosine decay to zero over the epochs).
    seed
        Seeds the initialisation, the order and the augmentation: the same seed gives the same model.
    max_crops
        Train (and validate) on at most this many crops (a seeded subsample); None: all.
    progress
        Progress bars.

    Returns
    -------
    model
        The classifier in eval mode.
    info
        ``crops``, ``proteins``, ``skipped_crops``, ``class_counts``, ``epochs``, ``train_loss`` and
        ``val_accuracy`` per epoch, ``seconds``, ``parameters``.

    Raises
    ------
    InputError
        If the split has no crop, no crop of it (or of ``val_split``, when that split exists) has a
        label, a label is not a compartment, or a protein's weights are not 12 non-negative numbers.
    ConfigError
        On non-positive settings.
    """
    from tqdm.auto import tqdm

    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("image_size", image_size)):
        if int(value) < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if image_size % 8:
        raise ConfigError(f"image_size must be a multiple of 8, got {image_size}")
    if max_crops is not None and int(max_crops) < 1:
        raise ConfigError(f"max_crops must be a positive integer or None, got {max_crops!r}")
    t0 = time.perf_counter()
    opened = store if isinstance(store, CropStore) else CropStore.open(store)
    x, pids, skipped = _read_split(
        opened, split=split, labels=labels, image_size=image_size, max_crops=max_crops, seed=seed, progress=progress
    )
    y = _targets(pids, labels, weights)
    hard = np.array([COMPARTMENTS.index(labels[p]) for p in pids])
    counts = np.bincount(hard, minlength=N_CLASSES)
    # Inverse-frequency class weights (each class counts as much in the loss), from the hard labels.
    class_w = torch.tensor(
        np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max(1, (counts > 0).sum()), 0.0),
        dtype=torch.float32,
    )
    val = None
    if val_split is not None and "split" in opened.obs and (opened.obs["split"].astype(str) == val_split).any():
        vx, vpids, _ = _read_split(
            opened,
            split=val_split,
            labels=labels,
            image_size=image_size,
            max_crops=max_crops,
            seed=seed,
            progress=progress,
        )
        val = (vx, np.array([COMPARTMENTS.index(labels[p]) for p in vpids]))

    torch.manual_seed(seed)
    # channels_last runs the CPU convolutions about 1.5x faster; the state dict is the same.
    model = CompartmentClassifier().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(pids) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    history: list[float] = []
    val_acc: list[float] = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(pids), generator=g)
        total, n = 0.0, 0
        for start in tqdm(
            range(0, len(pids), batch_size), desc="compartment classifier", leave=False, disable=not progress
        ):
            idx = order[start : start + batch_size]
            xb = _augment(x[idx].float(), g).contiguous(memory_format=torch.channels_last)
            logits = model(xb)
            logp = torch.log_softmax(logits, dim=-1)
            per = -(y[idx] * logp).sum(-1) * (y[idx] * class_w).sum(-1)
            loss = per.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        history.append(total / max(n, 1))
        if val is not None:
            model.eval()
            pred = classify(model, val[0][:, :1].float(), val[0][:, 1:].float()).argmax(1)
            val_acc.append(float((pred == val[1]).mean()))
    model.to(memory_format=torch.contiguous_format).eval()
    info = {
        "split": split,
        "val_split": val_split,
        "crops": len(pids),
        "proteins": len(set(pids)),
        "skipped_crops": skipped,
        "class_counts": {c: int(k) for c, k in zip(COMPARTMENTS, counts, strict=True)},
        "class_weighting": "inverse frequency of the proteins' main compartment, over crops",
        "targets": "soft (compartment weights)" if weights is not None else "one-hot labels",
        "epochs": int(epochs),
        "train_loss": history,
        "val_accuracy": val_acc,
        "image_size": int(image_size),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - t0,
    }
    return model, info


@torch.no_grad()
def classify(model: CompartmentClassifier, nucleus: Tensor, threshold: Tensor, batch_size: int = 256) -> np.ndarray:
    """Compartment probabilities ``float32 [N, 12]`` of images ``[N, 1, S, S]`` (threshold binarised at 0.5).

    Parameters
    ----------
    model
        A trained :class:`CompartmentClassifier` (used in eval mode).
    nucleus, threshold
        Nucleus images in [0, 1] and threshold images (real, reconstructed or generated).
    batch_size
        Images per forward pass.

    Returns
    -------
    numpy.ndarray
        Softmax probabilities in :data:`~protloc.data.world.compartments.COMPARTMENTS` order.

    Raises
    ------
    InputError
        If the images are not both ``[N, 1, S, S]``.
    ConfigError
        If ``batch_size`` is not positive.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    x = _stack(nucleus, threshold)
    was = model.training
    model.eval()
    out = [
        torch.softmax(model(x[i : i + batch_size].contiguous(memory_format=torch.channels_last)), dim=-1)
        for i in range(0, x.shape[0], batch_size)
    ]
    model.train(was)
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, N_CLASSES), np.float32)


def agreement_table(pred: np.ndarray, protein_ids: Sequence[str], labels: Mapping[str, str]) -> dict[str, Any]:
    """Agreement of per-image compartment calls with each protein's label.

    Parameters
    ----------
    pred
        ``[N, 12]`` probabilities (or scores) per image; the call is the argmax.
    protein_ids
        The protein of each image.
    labels
        ``protein_id`` -> compartment name.

    Returns
    -------
    dict
        ``agreement`` (mean over proteins of each protein's share of agreeing images), ``agreement_images``
        (over images), ``n_images``, ``n_proteins``, ``per_compartment`` (compartment -> ``agreement`` over
        its proteins and ``n_proteins``) and ``confusion`` (12 x 12 image counts, rows truth, columns call).

    Raises
    ------
    InputError
        If ``pred`` is not ``[len(protein_ids), 12]``, a protein has no label or a label is not a
        compartment.
    """
    pred = np.asarray(pred)
    if pred.ndim != 2 or pred.shape[1] != N_CLASSES or pred.shape[0] != len(protein_ids):
        raise InputError(f"pred must be [{len(protein_ids)}, {N_CLASSES}], got {tuple(pred.shape)}")
    missing = [p for p in protein_ids if str(p) not in labels]
    if missing:
        raise InputError(f"protein {missing[0]!r} has no label")
    unknown = sorted({str(labels[str(p)]) for p in protein_ids} - set(COMPARTMENTS))
    if unknown:
        raise InputError(f"unknown compartment {unknown[0]!r} (use one of {', '.join(COMPARTMENTS)})")
    call = pred.argmax(1)
    truth = np.array([COMPARTMENTS.index(labels[str(p)]) for p in protein_ids], dtype=np.int64)
    hit = (call == truth).astype(np.float64)
    per_protein: dict[str, list[float]] = {}
    for p, h in zip(protein_ids, hit, strict=True):
        per_protein.setdefault(str(p), []).append(h)
    means = {p: float(np.mean(v)) for p, v in per_protein.items()}
    per_comp: dict[str, dict[str, Any]] = {}
    for c in COMPARTMENTS:
        vals = [m for p, m in means.items() if labels[p] == c]
        if vals:
            per_comp[c] = {"agreement": float(np.mean(vals)), "n_proteins": len(vals)}
    confusion = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)
    np.add.at(confusion, (truth, call), 1)
    return {
        "agreement": float(np.mean(list(means.values()))) if means else float("nan"),
        "agreement_images": float(hit.mean()) if hit.size else float("nan"),
        "n_images": int(hit.size),
        "n_proteins": len(means),
        "per_compartment": per_comp,
        "confusion": confusion.tolist(),
    }

"""``protloc embed``: cytoself localization encodings of every crop, into AnnData (``.h5ad``).

The model runs in eval mode under ``torch.inference_mode`` (the reference extracts embeddings in
train mode, so the same crop's encoding depends on its batch). Crops are read from the crop store and
written to the ``.h5ad`` file batch by batch, so memory stays bounded whatever the number of crops:
the AnnData skeleton (``obs``, ``uns``) is written first, then the ``obsm`` arrays are created as
chunked HDF5 datasets in AnnData's on-disk encoding and filled in place. The file is built under a
temporary name and renamed when complete.

Resuming: the encodings are first written in shards of ``shard_size`` crops to ``<out>.partial/``
(each shard a ``.npz`` written atomically), with ``job.json`` recording what is being embedded (the
weights' SHA-256, the store, its size, the split, the options). Run the same command again after an
interruption (Ctrl-C, SIGKILL, a lost machine) and the finished shards are kept: the run continues
with the first missing one. A shard never holds half a batch, so no row is lost or written twice. The
``.h5ad`` is assembled from the shards at the end (one shard in memory at a time) and the partial
folder removed. If the job changed (other weights, store or options) the partial folder is discarded.

Encodings are finite or refused: a batch whose encodings hold NaN or Inf stops the run with an
:class:`~protloc.errors.InputError` naming the checkpoint and the crops (nothing non-finite is written;
a partial folder this run created is removed, as for any user error).

``obsm`` keys:

- ``global``: flattened global (VQ2) quantized representation, ``[N, C2 * H2 * W2]`` (9216 for the
  paper model), float32 -- what the paper's UMAP atlas uses;
- ``global_indices``: VQ2 code indices ``[N, split * H2 * W2]`` (144), int16;
- ``local_indices``: VQ1 code indices ``[N, H1 * W1]`` (625), int16 -- feature spectra;
- ``local`` (only with ``include_local=True``): flattened local quantized representation
  ``[N, C1 * H1 * W1]`` (40000), float32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from protloc._fs import atomic_path, check_overwrite, resumable_dir
from protloc.config import config_to_dict
from protloc.data.io import CropStore
from protloc.errors import ConfigError, InputError
from protloc.eval.load import load_cytoself_for_inference

logger = logging.getLogger(__name__)

__all__ = ["embed", "read_obsm"]


def _create_obsm(f: h5py.File, key: str, shape: tuple[int, int], dtype: Any, rows_per_chunk: int) -> h5py.Dataset:
    grp = f["obsm"]
    chunks = (max(1, min(rows_per_chunk, shape[0])), shape[1]) if shape[0] > 0 else None
    ds = grp.create_dataset(key, shape=shape, dtype=dtype, chunks=chunks)
    # AnnData's on-disk encoding of a dense array, so anndata.read_h5ad() picks it up
    ds.attrs["encoding-type"] = "array"
    ds.attrs["encoding-version"] = "0.2.0"
    return ds


def embed(
    checkpoint: str | os.PathLike,
    store: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str | None = None,
    batch_size: int = 256,
    include_local: bool = False,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    shard_size: int = 4096,
) -> Path:
    """Embed every crop of a crop store with a trained cytoself model (resumable, see the module notes).

    Parameters
    ----------
    checkpoint
        Checkpoint or run folder (see :func:`load_cytoself`).
    store
        Crop store written by ``protloc prepare`` (``cytoself.zarr``).
    out
        Output ``.h5ad`` path (written atomically).
    split
        Only crops of this split (``train``/``val``/``test``); ``None`` = all.
    batch_size
        Crops per forward pass; memory use is proportional to it, not to the store size.
    include_local
        Also store the full local representation (40000 floats per crop for the paper model).
    device
        Torch device (default: CUDA when available, else CPU).
    overwrite
        Replace an existing output.
    progress
        Show a progress bar.
    shard_size
        Crops per resumable shard (rounded up to whole batches): the work an interruption can lose.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        # the Python API checks what the command line checks when parsing (a negative batch wrote zeros)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    out = check_overwrite(
        out, overwrite=overwrite, inputs={"--checkpoint": checkpoint, "--store": store}, ours=_written_by_embed
    )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_cytoself_for_inference(checkpoint, device=dev)
    cfg = model.config
    crops = CropStore.open(store)
    missing = [c for c in cfg.channels if c not in crops.channels]
    if missing:
        raise InputError(f"the model needs channel(s) {missing}; the store has {crops.channels}", path=crops.path)
    if crops.size != cfg.input_size:
        raise InputError(f"crops are {crops.size} px but the model was trained on {cfg.input_size} px", path=crops.path)
    obs = crops.obs
    rows = np.arange(len(obs)) if split is None else np.flatnonzero(obs["split"].astype(str).to_numpy() == split)
    if len(rows) == 0:
        raise InputError(f"no crops in split {split!r}", path=crops.path)
    sub = obs.iloc[rows].reset_index(drop=True)
    sub.index = sub["crop_index"].astype(str).to_numpy()
    for col in sub.columns:
        if sub[col].dtype == object:
            sub[col] = sub[col].astype(str)

    # one probe batch fixes the output shapes
    with torch.inference_mode():
        probe = _batch(crops, rows[:1], cfg.channels, dev)
        enc = model.encode(probe)
    shapes = {
        "global": (int(np.prod(enc.q2.shape[1:])), np.float32),
        "global_indices": (int(np.prod(enc.idx2.shape[1:])), np.int16),
        "local_indices": (int(np.prod(enc.idx1.shape[1:])), np.int16),
    }
    if include_local:
        shapes["local"] = (int(np.prod(enc.q1.shape[1:])), np.float32)
    uns = {
        "cytoself": {
            "checkpoint": str(Path(checkpoint).resolve()),
            "store": str(Path(crops.path).resolve()),
            "store_fingerprint": crops.fingerprint,
            "split": split or "all",
            "codebook_size1": int(cfg.codebook_size1),
            "codebook_size2": int(cfg.codebook_size2),
            "global_shape": list(enc.q2.shape[1:]),
            "global_indices_shape": list(enc.idx2.shape[1:]),
            "local_shape": list(enc.q1.shape[1:]),
            "local_indices_shape": list(enc.idx1.shape[1:]),
            "config": json.dumps(config_to_dict(cfg)),
        }
    }
    adata = ad.AnnData(obs=sub, uns=uns)
    n = len(rows)
    per_shard = max(1, -(-int(shard_size) // batch_size)) * batch_size
    partial = out.with_name(out.name + ".partial")
    job = {
        "weights_sha256": _weights_digest(checkpoint),
        "store": str(Path(crops.path).resolve()),
        "store_crops": len(obs),
        "split": split,
        "rows": n,
        "batch_size": batch_size,
        "shard": per_shard,
        "keys": sorted(shapes),
    }
    with resumable_dir(partial, job, kind="embedding"):
        shards = [(start, min(n, start + per_shard)) for start in range(0, n, per_shard)]
        done = sum(b - a for a, b in shards if (partial / _shard_name(a)).is_file())
        if done:
            logger.info("resuming: %d of %d crops were embedded before (%s)", done, n, partial)
        bar = tqdm(total=n, initial=done, desc="embed", unit="crop", disable=not progress, dynamic_ncols=True)
        with torch.inference_mode():
            for a, b in shards:
                if (partial / _shard_name(a)).is_file():
                    continue
                parts: dict[str, list[np.ndarray]] = {k: [] for k in shapes}
                for start in range(a, b, batch_size):
                    idx = rows[start : min(b, start + batch_size)]
                    enc = model.encode(_batch(crops, idx, cfg.channels, dev))
                    parts["global"].append(_finite(enc.q2, "global", idx, obs, checkpoint))
                    parts["global_indices"].append(enc.idx2.flatten(1).cpu().numpy().astype(np.int16))
                    parts["local_indices"].append(enc.idx1.flatten(1).cpu().numpy().astype(np.int16))
                    if include_local:
                        parts["local"].append(_finite(enc.q1, "local", idx, obs, checkpoint))
                    bar.update(len(idx))
                with atomic_path(partial / _shard_name(a)) as tmp:
                    with open(tmp, "wb") as fh:
                        np.savez(fh, **{k: np.concatenate(v) for k, v in parts.items()})
        bar.close()
        with atomic_path(out) as tmp:
            adata.write_h5ad(tmp)
            with h5py.File(tmp, "r+") as f:
                dsets = {k: _create_obsm(f, k, (n, d), dt, batch_size) for k, (d, dt) in shapes.items()}
                for a, b in shards:
                    with np.load(partial / _shard_name(a)) as shard:
                        for k in shapes:
                            block = shard[k]
                            if block.shape[0] != b - a:
                                raise InputError(
                                    f"shard {_shard_name(a)} holds {block.shape[0]} rows, not {b - a}", path=partial
                                )
                            dsets[k][a:b] = block
    logger.info("embedded %d crops into %s", n, out)
    return Path(out)


def _finite(encoding: torch.Tensor, key: str, rows: np.ndarray, obs: Any, checkpoint: str | os.PathLike) -> np.ndarray:
    """One batch's ``[B, ...]`` encodings as ``float32 [B, D]``; refuse any holding NaN or Inf.

    Raises
    ------
    InputError
        Naming the checkpoint, the crops (store rows and their ``crop_index``) and how many there are.
    """
    block = encoding.flatten(1).float().cpu().numpy()
    bad = ~np.isfinite(block).all(axis=1)
    if bad.any():
        where = rows[bad]
        crop_index = obs["crop_index"].to_numpy()[where] if "crop_index" in obs.columns else where
        shown = ", ".join(f"{int(r)} (crop_index {c})" for r, c in zip(where[:5], crop_index[:5], strict=True))
        more = f" and {len(where) - 5} more" if len(where) > 5 else ""
        raise InputError(
            f"the model's {key} encodings of {len(where)} crop(s) are NaN or infinite, store rows {shown}{more}; "
            "nothing was written: check these crops and the checkpoint",
            path=checkpoint,
        )
    return block


def _written_by_embed(path: Path) -> bool:
    """Whether ``path`` is an ``.h5ad`` of ``protloc embed`` (it has ``uns/cytoself``): what --overwrite may replace."""
    try:
        with h5py.File(path, "r") as f:
            return "uns/cytoself" in f
    except OSError:
        return False


def _shard_name(start: int) -> str:
    return f"shard-{start:012d}.npz"


def _weights_digest(checkpoint: str | os.PathLike) -> str:
    path = Path(checkpoint)
    for cand in (path / "model.safetensors", path / "best" / "model.safetensors", path / "last" / "model.safetensors"):
        if cand.is_file():
            h = hashlib.sha256()
            with open(cand, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            return h.hexdigest()
    return ""


def _batch(store: CropStore, rows: np.ndarray, channels: tuple[str, ...], device: torch.device) -> torch.Tensor:
    data = store.read(rows, channels=list(channels))
    x = np.stack([np.asarray(data[c], dtype=np.float32) for c in channels], axis=1)
    return torch.from_numpy(x).to(device)


def read_obsm(path: str | os.PathLike, key: str, *, rows: np.ndarray | None = None) -> np.ndarray:
    """Read (some rows of) one ``obsm`` array of an ``.h5ad`` file without loading the rest.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    key
        ``obsm`` key, e.g. ``"global"``.
    rows
        Sorted row indices; ``None`` reads all rows.
    """
    p = Path(path)
    with h5py.File(p, "r") as f:
        if "obsm" not in f or key not in f["obsm"]:
            raise InputError(f"no obsm[{key!r}] in this file", path=p)
        ds = f["obsm"][key]
        if rows is None:
            return ds[:]
        rows = np.asarray(rows)
        if len(rows) and np.any(np.diff(rows) <= 0):
            order = np.argsort(rows)
            out = np.empty((len(rows), ds.shape[1]), dtype=ds.dtype)
            out[order] = ds[rows[order]]
            return out
        return ds[rows]

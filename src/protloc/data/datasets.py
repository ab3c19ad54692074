"""PyTorch datasets over crop stores, read lazily from Zarr.

:class:`CropDataset` serves the crops of one split of a :class:`~protloc.data.io.CropStore` as
``{"image": float32 [C, S, S], "label": int64, "index": int64}``. Nothing is preloaded: crops are
read from the Zarr arrays when asked for, so the full OpenCell set (1.1 M crops, 44 GB per channel
as float32) trains on a machine with a few GB of memory.

Reading one crop at a time from a chunked Zarr array is slow: every read decompresses the whole
chunk (64 crops by default) to keep one. Two things fix that:

- :meth:`CropDataset.__getitems__` (which :class:`torch.utils.data.DataLoader` calls with a whole
  batch of indices) reads the batch sorted, with one Zarr call per chunk it touches, and can keep the
  last few decompressed chunks in a small cache (``cache_chunks``);
- :class:`CropBatchSampler` orders an epoch "chunk-shuffled": the chunks are shuffled, then crops are
  shuffled within a window of ``window`` consecutive chunks of that order, so a batch touches a few
  chunks instead of ``batch_size`` of them and each chunk is decompressed about once per epoch.

Augmentation draws one of the 8 elements of the dihedral group D4 (4 rotations x optional flip) per
crop from a hash of ``(seed, epoch, crop_index)``, so an epoch is reproducible whatever the order,
batching or number of worker processes.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from protloc.data.io import CropStore
from protloc.data.preprocess import threshold_mean
from protloc.data.sequences import crop_is_full_end, crop_sequence
from protloc.errors import ConfigError, InputError

__all__ = [
    "CelleDataset",
    "CropBatchSampler",
    "CropDataset",
    "TokenizerKind",
    "VQGANCrops",
    "check_celle_store",
    "apply_d4",
    "d4_codes",
    "make_label_map",
]

logger = logging.getLogger(__name__)

ShuffleMode = Literal["chunks", "random", "none"]
#: The two images CELL-E tokenizes: the nucleus crop and the protein's threshold image.
TokenizerKind = Literal["nucleus", "threshold"]

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> _U64(30))) * _MIX1
        z = (z ^ (z >> _U64(27))) * _MIX2
        return z ^ (z >> _U64(31))


def _as_u64(value: int) -> np.ndarray:
    return np.asarray(int(value) % (1 << 64), dtype=np.uint64)


def d4_codes(seed: int, epoch: int, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Draw one dihedral-group element (0..7) per crop, reproducibly.

    The draw is a hash of ``(seed, epoch, index)``, i.e. an independent per-item random number that
    does not depend on the order the crops are read in, on the batch or on the worker process.

    Parameters
    ----------
    seed
        Run seed.
    epoch
        Pass over the data (a new draw each epoch).
    indices
        Crop indices (store positions).

    Returns
    -------
    numpy.ndarray
        ``int64`` codes in ``0..7``: ``code & 3`` quarter turns after a left-right flip when
        ``code >= 4`` (see :func:`apply_d4`).
    """
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    h = _splitmix64(_as_u64(seed))
    h = _splitmix64(h ^ _as_u64(epoch))
    h = _splitmix64(h ^ idx)
    # The top bits of SplitMix64 are the best mixed; 3 of them give a uniform 0..7.
    return (h >> _U64(61)).astype(np.int64)


def hash_uniform(seed: int, epoch: int, indices: Sequence[int] | np.ndarray, *, salt: int) -> np.ndarray:
    """Per-item uniform numbers in [0, 1) from a hash of ``(seed, epoch, index, salt)``.

    Like :func:`d4_codes`, independent of read order, batching and worker processes; ``salt`` gives
    independent streams for independent choices (crop offsets, flips, sequence windows).
    """
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    h = _splitmix64(_as_u64(seed) ^ _splitmix64(_as_u64(salt)))
    h = _splitmix64(h ^ _as_u64(epoch))
    h = _splitmix64(h ^ idx)
    # 53 top bits -> a float64 in [0, 1) with full mantissa precision.
    return (h >> _U64(11)).astype(np.float64) / float(1 << 53)


def apply_d4(images: np.ndarray, codes: np.ndarray | Sequence[int]) -> np.ndarray:
    """Apply one D4 element per image (flip left-right when ``code >= 4``, then ``code % 4`` quarter turns).

    Parameters
    ----------
    images
        ``[N, C, S, S]`` (square crops: a quarter turn keeps the shape).
    codes
        ``N`` codes in ``0..7`` (see :func:`d4_codes`).

    Returns
    -------
    numpy.ndarray
        A new contiguous ``[N, C, S, S]`` array. All 8 codes give distinct images for a generic crop.
    """
    codes = np.asarray(codes, dtype=np.int64)
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"apply_d4 needs [N, C, S, S] square crops, got shape {images.shape}")
    if codes.shape != (images.shape[0],):
        raise ValueError(f"need one code per image: {codes.shape} codes for {images.shape[0]} images")
    out = np.empty_like(images)
    # Grouping by code keeps this vectorised: at most 8 array operations per batch.
    for code in np.unique(codes):
        sel = codes == code
        block = images[sel]
        if code >= 4:
            block = block[..., ::-1]
        out[sel] = np.rot90(block, int(code) % 4, axes=(-2, -1))
    return out


def make_label_map(obs: pd.DataFrame, *, split: str | None = "train") -> dict[str, int]:
    """Map the protein ids of one split to class indices ``0..n-1`` (sorted ids).

    Parameters
    ----------
    obs
        A crop table with ``protein_id`` (and ``split`` unless ``split`` is ``None``) columns.
    split
        The split whose proteins are the classes (``"train"``); ``None`` takes every row.

    Returns
    -------
    dict of str to int

    Raises
    ------
    InputError
        If a column is missing or the split has no rows.
    """
    if "protein_id" not in obs.columns:
        raise InputError("the crop table has no 'protein_id' column to build class labels from")
    rows = obs
    if split is not None:
        if "split" not in obs.columns:
            raise InputError("the crop table has no 'split' column; re-run `protloc prepare` with a split")
        rows = obs[obs["split"].astype(str) == split]
        if rows.empty:
            found = sorted(obs["split"].dropna().astype(str).unique().tolist())
            raise InputError(f"no crops in split {split!r} to build class labels from (splits present: {found})")
    ids = sorted(rows["protein_id"].dropna().astype(str).unique().tolist())
    return {pid: i for i, pid in enumerate(ids)}


class CropDataset(Dataset):
    """The crops of one split of a crop store, read lazily, optionally D4-augmented.

    Parameters
    ----------
    store
        A :class:`~protloc.data.io.CropStore` or the path of one (``name.zarr``).
    split
        Keep the rows whose ``split`` column equals this (``"train"``, ``"val"``, ``"test"``);
        ``None`` keeps every crop.
    channels
        Store channels stacked into ``image``, in this order (e.g. ``("protein", "nucleus_distance")``).
    label_map
        ``protein_id`` -> class index; proteins not in it (and every crop when ``None``) get label -1.
    augment
        Apply a uniformly drawn element of D4 (all 8: 4 rotations x flip) to each crop, drawn from
        ``(seed, epoch, crop_index)`` (see :meth:`set_epoch`).
    seed
        Augmentation seed.
    cache_chunks
        Keep up to this many decompressed Zarr chunks per channel in memory (per process). Pays off
        with :class:`CropBatchSampler`'s chunk-shuffled order (use at least its ``window``); 0 reads
        only the crops asked for, chunk by chunk; ``"all"`` keeps every chunk once read (the whole
        store in memory after one pass: uniform shuffling at memory speed).

    Raises
    ------
    InputError
        If the store lacks one of ``channels``, has no ``split`` column, or the split has no rows.

    Notes
    -----
    Items are ``{"image": float32 tensor [C, S, S], "label": int64 tensor, "index": int64 tensor}``
    (``index`` = the crop's row in the store). Float16 stores are cast to float32.

    The Zarr arrays are opened on first use in each process (and re-opened when the process id
    changes), so the dataset can be handed to :class:`~torch.utils.data.DataLoader` workers.
    """

    def __init__(
        self,
        store: CropStore | str | os.PathLike,
        *,
        split: str | None,
        channels: Sequence[str],
        label_map: Mapping[str, int] | None,
        augment: bool = False,
        seed: int = 0,
        cache_chunks: int | Literal["all"] = 0,
    ) -> None:
        opened = store if isinstance(store, CropStore) else CropStore.open(store)
        self.store_path: Path = opened.path
        self.channels: tuple[str, ...] = tuple(str(c) for c in channels)
        if not self.channels:
            raise InputError("no channels requested", path=self.store_path)
        missing = [c for c in self.channels if c not in opened.channels]
        if missing:
            raise InputError(
                f"channel(s) {missing} missing from the crop store (it has {opened.channels})", path=self.store_path
            )
        if len(set(self.channels)) != len(self.channels):
            raise InputError(f"channels repeat a name: {list(self.channels)}", path=self.store_path)
        obs = opened.obs
        if split is None:
            rows = np.arange(len(obs), dtype=np.int64)
        else:
            if "split" not in obs.columns:
                raise InputError(
                    "the crop table has no 'split' column; re-run `protloc prepare` with a split",
                    path=self.store_path,
                )
            split_col = obs["split"].astype(str).to_numpy()
            rows = np.flatnonzero(split_col == split).astype(np.int64)
            if rows.size == 0:
                found = sorted(set(obs["split"].dropna().astype(str)))
                raise InputError(
                    f"no crops in split {split!r} (splits present: {found}); re-run `protloc prepare` "
                    f"with a split that fills it",
                    path=self.store_path,
                )
        self.split = split
        # Positions are rows of the store; crop_index equals the row (CropStore.open checks it).
        self.crop_index: np.ndarray = rows
        self.label_map: dict[str, int] | None = (
            None if label_map is None else {str(k): int(v) for k, v in label_map.items()}
        )
        labels = np.full(rows.size, -1, dtype=np.int64)
        if self.label_map is not None:
            if "protein_id" not in obs.columns:
                raise InputError("the crop table has no 'protein_id' column for labels", path=self.store_path)
            pids = obs["protein_id"].astype(str).to_numpy()[rows]
            labels = np.fromiter((self.label_map.get(p, -1) for p in pids), dtype=np.int64, count=rows.size)
        self.labels: np.ndarray = labels
        self.size = opened.size
        self.n_store = len(opened)
        first = opened[self.channels[0]]
        self.chunk_size = int(first.chunks[0])
        self.augment = bool(augment)
        self.seed = int(seed)
        self.epoch = 0
        if cache_chunks == "all":
            cache_chunks = -(-self.n_store // self.chunk_size)
        if isinstance(cache_chunks, str) or cache_chunks < 0:
            raise ValueError(f"cache_chunks must be >= 0 or 'all', got {cache_chunks!r}")
        self.cache_chunks = int(cache_chunks)
        # The opened store's arrays serve this process; other processes open their own.
        self._pid: int | None = os.getpid()
        self._arrays: dict[str, Any] | None = {c: opened[c] for c in self.channels}
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    # -- lazy, per-process access ------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # Zarr handles and decompressed chunks stay in the process that made them.
        state["_arrays"] = None
        state["_pid"] = None
        state["_cache"] = OrderedDict()
        return state

    def _zarr_arrays(self) -> dict[str, Any]:
        pid = os.getpid()
        if self._arrays is None or self._pid != pid:
            import zarr

            try:
                group = zarr.open_group(str(self.store_path), mode="r")
                self._arrays = {c: group[c] for c in self.channels}
            except Exception as exc:  # zarr raises version-specific types
                raise InputError(f"cannot open the crop store ({exc})", path=self.store_path) from exc
            self._cache = OrderedDict()
            self._pid = pid
        return self._arrays

    # -- Dataset API --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.crop_index.size)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of pass ``epoch`` over the data."""
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= int(i) < n:
            raise IndexError(f"item {i} out of range for a dataset of {n} crops")
        batch = self.read_batch([int(i) % n])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, items: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """Batched fetch used by :class:`~torch.utils.data.DataLoader` (one Zarr read per chunk).

        Returns one dict per item, as ``__getitem__`` would, so any ``collate_fn`` works.
        """
        batch = self.read_batch(items)
        return [
            {"image": batch["image"][j], "label": batch["label"][j], "index": batch["index"][j]}
            for j in range(len(batch["index"]))
        ]

    def read_batch(self, items: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Read several items at once, already stacked.

        Parameters
        ----------
        items
            Dataset positions (``0..len-1``), any order, repeats allowed.

        Returns
        -------
        dict
            ``"image"`` float32 ``[B, C, S, S]``, ``"label"`` int64 ``[B]``, ``"index"`` int64 ``[B]``
            (crop indices in the store), in the order of ``items``.
        """
        pos = np.asarray(items, dtype=np.int64).reshape(-1)
        n = len(self)
        if pos.size and (pos.min() < 0 or pos.max() >= n):
            raise IndexError(f"item out of range for a dataset of {n} crops")
        crops = self.crop_index[pos]
        uniq, inverse = np.unique(crops, return_inverse=True)
        s = self.size
        image = np.empty((uniq.size, len(self.channels), s, s), dtype=np.float32)
        for c, name in enumerate(self.channels):
            image[:, c] = self._read_sorted(name, uniq)
        image = image[inverse.reshape(-1)]
        if self.augment and image.shape[0]:
            image = apply_d4(image, d4_codes(self.seed, self.epoch, crops))
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "label": torch.from_numpy(self.labels[pos]),
            "index": torch.from_numpy(crops.copy()),
        }

    def _read_sorted(self, name: str, uniq: np.ndarray) -> np.ndarray:
        """Read sorted, unique crop indices of one channel: one Zarr call per chunk touched."""
        try:
            return self._read_chunks(name, uniq)
        except (RuntimeError, ValueError, OSError, EOFError) as exc:
            # a damaged or truncated chunk surfaces as a codec error deep in zarr / numcodecs
            first = int(uniq[0]) if uniq.size else 0
            raise InputError(
                f"cannot read channel {name!r} near crop {first}: a chunk is damaged or truncated ({exc})",
                path=self.store_path,
            ) from exc

    def _read_chunks(self, name: str, uniq: np.ndarray) -> np.ndarray:
        arr = self._zarr_arrays()[name]
        out = np.empty((uniq.size, self.size, self.size), dtype=arr.dtype)
        if uniq.size == 0:
            return out
        chunk = self.chunk_size
        chunk_ids = uniq // chunk
        # Boundaries of runs of equal chunk id in the sorted indices.
        starts = np.flatnonzero(np.r_[True, chunk_ids[1:] != chunk_ids[:-1]])
        stops = np.r_[starts[1:], uniq.size]
        for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
            cid = int(chunk_ids[a])
            if self.cache_chunks:
                block = self._cached_chunk(name, arr, cid)
                out[a:b] = block[uniq[a:b] - cid * chunk]
            else:
                # The chunk is decompressed whole anyway; slicing only the span needed saves the copy.
                lo, hi = int(uniq[a]), int(uniq[b - 1]) + 1
                block = np.asarray(arr[lo:hi])
                out[a:b] = block[uniq[a:b] - lo]
        return out

    def _cached_chunk(self, name: str, arr: Any, cid: int) -> np.ndarray:
        key = (name, cid)
        block = self._cache.get(key)
        if block is not None:
            self._cache.move_to_end(key)
            return block
        lo = cid * self.chunk_size
        block = np.asarray(arr[lo : min(lo + self.chunk_size, self.n_store)])
        self._cache[key] = block
        while len(self._cache) > self.cache_chunks * len(self.channels):
            self._cache.popitem(last=False)
        return block

    def subset(self, keep: Sequence[int] | np.ndarray) -> CropDataset:
        """A dataset over some of this one's items (same store, channels, labels and augmentation).

        Parameters
        ----------
        keep
            A boolean mask of length ``len(self)`` or dataset positions.
        """
        sel = np.asarray(keep)
        if sel.dtype == np.bool_:
            if sel.shape != (len(self),):
                raise ValueError(f"mask of shape {sel.shape} does not match {len(self)} items")
            sel = np.flatnonzero(sel)
        sel = np.unique(sel.astype(np.int64))
        if sel.size and (sel[0] < 0 or sel[-1] >= len(self)):
            raise IndexError(f"subset position out of range for a dataset of {len(self)} crops")
        new = copy.copy(self)
        new.crop_index = self.crop_index[sel]
        new.labels = self.labels[sel]
        # The Zarr handles may be shared; the chunk cache must not be (it is mutated on reads).
        new._cache = OrderedDict()
        return new

    def __repr__(self) -> str:
        return (
            f"CropDataset({str(self.store_path)!r}, split={self.split!r}, n={len(self)}, "
            f"channels={list(self.channels)}, augment={self.augment})"
        )


class CropBatchSampler(Sampler[list[int]]):
    """Batches of dataset positions in a reproducible, Zarr-friendly order.

    Parameters
    ----------
    dataset
        The :class:`CropDataset` to sample (its crop indices and chunk size set the grouping).
    batch_size
        Items per batch.
    shuffle
        ``"chunks"`` (default): shuffle the chunks, then shuffle crops within windows of ``window``
        consecutive chunks of that order; ``"random"``: a uniform permutation (one chunk read per
        crop); ``"none"``: store order (validation, embedding).
    window
        Chunks mixed together in ``"chunks"`` mode. Larger windows mix proteins better (a chunk
        holds neighbouring crops, often of one protein) at the cost of ``window`` cached chunks.
    drop_last
        Drop the last incomplete batch of each epoch.
    seed
        Order seed; the order of epoch ``e`` depends only on ``(seed, e)``.
    num_replicas, rank
        For data-parallel training: this process takes every ``num_replicas``-th batch starting at
        ``rank``; every process gets the same number of batches.

    Notes
    -----
    :meth:`set_epoch` selects the epoch; ``start_batch`` makes the next iteration begin at that batch
    of the epoch, which is how a resumed run continues with the data it had not yet seen.
    """

    def __init__(
        self,
        dataset: CropDataset,
        batch_size: int,
        *,
        shuffle: ShuffleMode = "chunks",
        window: int = 16,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle not in ("chunks", "random", "none"):
            raise ValueError(f"shuffle must be 'chunks', 'random' or 'none', got {shuffle!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        self.crop_index = np.asarray(dataset.crop_index, dtype=np.int64)
        self.chunk_size = int(dataset.chunk_size)
        self.batch_size = int(batch_size)
        self.shuffle: ShuffleMode = shuffle
        self.window = int(window)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select epoch ``epoch``; the next iteration starts at its batch ``start_batch`` (of this rank)."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def _order(self) -> np.ndarray:
        n = self.crop_index.size
        if self.shuffle == "none":
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.shuffle == "random":
            return rng.permutation(n).astype(np.int64)
        chunk_of = self.crop_index // self.chunk_size
        # Positions are sorted by crop index, so each chunk's members form one contiguous run.
        chunk_ids, first = np.unique(chunk_of, return_index=True)
        bounds = np.r_[first, n]
        perm = rng.permutation(chunk_ids.size)
        parts = []
        for w in range(0, perm.size, self.window):
            members = np.concatenate([np.arange(bounds[c], bounds[c + 1]) for c in perm[w : w + self.window]])
            parts.append(rng.permutation(members))
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)

    def _batches_total(self) -> int:
        n = self.crop_index.size
        full = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        # Equal share per rank, so that data-parallel processes step together.
        return (full // self.num_replicas) * self.num_replicas

    def __len__(self) -> int:
        """Batches per epoch for this rank (not counting ``start_batch``)."""
        return self._batches_total() // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        total = self._batches_total()
        start, self.start_batch = self.start_batch, 0
        mine = range(self.rank, total, self.num_replicas)
        for b in list(mine)[start:]:
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


# --------------------------------------------------------------------------------------------------
# CELL-E: paired nucleus / protein images with the protein's sequence
# --------------------------------------------------------------------------------------------------

_SALT_CROP_Y, _SALT_CROP_X, _SALT_FLIP, _SALT_WINDOW = 11, 12, 13, 14


def check_celle_store(store: CropStore) -> None:
    """Refuse a cytoself crop store where a CELL-E one is needed (``evaluate``, ``train vqgan / celle``).

    A cytoself store has ``protein`` and ``nucleus`` channels too, so without this a CELL-E command reads its
    100 px crops (another crop size and scale than the model was trained on) and reports numbers that mean
    nothing. The cytoself store's signature is its ``nucleus_distance`` channel without a ``threshold`` one.
    """
    channels = list(store.channels)
    if "nucleus_distance" in channels and "threshold" not in channels:
        raise InputError(
            f"this is a cytoself crop store (channels {', '.join(channels)}), not a CELL-E one: give the "
            "celle.zarr of `protloc prepare` (with nucleus, protein and threshold channels)",
            path=store.path,
        )


class _CropView(Dataset):
    """What a dataset that reads its crops through a :class:`CropDataset` (``self.base``) shares.

    Subclasses set ``base`` and ``epoch`` and implement ``__getitems__`` (batched reads, one Zarr read per
    chunk); items, lengths, store rows and chunking are the base dataset's.
    """

    base: CropDataset
    epoch: int

    @property
    def crop_index(self) -> np.ndarray:
        """Store rows of the items (for :class:`CropBatchSampler`)."""
        return self.base.crop_index

    @property
    def chunk_size(self) -> int:
        """Crops per Zarr chunk of the store."""
        return self.base.chunk_size

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        """Select the random draws (crop offsets, flips, sequence windows) of pass ``epoch``."""
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= int(i) < n:
            raise IndexError(f"item {i} out of range for a dataset of {n} crops")
        return self.__getitems__([int(i) % n])[0]

    def __getitems__(self, items: Sequence[int]) -> list[dict[str, Any]]:
        raise NotImplementedError


class CelleDataset(_CropView):
    """Paired nucleus and protein-threshold images with the protein's sequence (CELL-E, paper S.3.6).

    Reads a CELL-E crop store of ``protloc prepare`` (``celle.zarr``: ``nucleus`` and ``protein`` in
    [0, 1], ``threshold`` uint8, one protein per crop) lazily, like :class:`CropDataset`.

    Items are ``{"nucleus": float32 [1, S, S], "threshold": float32 [1, S, S] in {0, 1}, "sequence":
    str, "add_end": bool, "seq_start": int64, "protein_id": str, "index": int64, "view": int64}`` (+
    ``"protein"`` ``[1, S, S]`` with ``with_protein``), ``S = image_size``. ``(index, view)`` identifies
    the images exactly (``view`` encodes the flips and the crop offset).

    Parameters
    ----------
    store
        The CELL-E crop store (or its path).
    split
        ``split`` column value to keep (``None``: all crops).
    sequences
        ``protein_id`` -> amino-acid sequence (validated); every protein of the split needs one.
    image_size
        Output side. The (optionally cropped) images are area-averaged down to it.
    crop_size
        Side of the square window cut from each stored crop before resizing (0: the whole crop).
        Training cuts it at a random offset (paper S.3.6: "random cropping"), evaluation at the centre.
    augment
        Training mode: random crop offsets, random horizontal / vertical flips applied identically to
        both images (paper S.3.4, S.3.6), random sequence windows. Off: centre crop, no flip, the
        N-terminal window -- deterministic evaluation (the reference draws random windows there).
    max_residues
        Sequence window length (paper: 1000). Longer sequences are cropped to a window; the end
        token is kept only when the window reaches the C-terminus and fits (paper S.3.6).
    eval_window
        Window of long sequences without ``augment``: ``"start"`` (N-terminal), ``"center"`` or ``"end"``.
    seed
        Augmentation seed; every random choice is a hash of ``(seed, epoch, crop)``, so a pass is
        reproducible whatever the order, batching or number of workers (see :meth:`set_epoch`).
    with_protein
        Also return the (cropped, resized, flipped) protein intensity image.
    cache_chunks
        Decompressed Zarr chunks kept per channel (see :class:`CropDataset`).

    Notes
    -----
    When the images are neither cropped nor resized the stored ``threshold`` channel is used;
    otherwise the threshold is recomputed as ``pixel >= mean`` of the final protein image, so it stays
    the paper's mean-threshold image (Sec. 4.3) at the size the model sees.

    Raises
    ------
    InputError
        If the store lacks a channel, the split or ``protein_id`` column, a protein has no sequence,
        or ``crop_size`` / ``image_size`` do not fit the stored crops.
    """

    def __init__(
        self,
        store: CropStore | str | os.PathLike,
        *,
        split: str | None,
        sequences: Mapping[str, str],
        image_size: int,
        crop_size: int = 0,
        augment: bool = False,
        max_residues: int = 1000,
        eval_window: str = "start",
        seed: int = 0,
        with_protein: bool = False,
        cache_chunks: int | Literal["all"] = 0,
    ) -> None:
        opened = store if isinstance(store, CropStore) else CropStore.open(store)
        check_celle_store(opened)
        self.crop_size = int(crop_size) or opened.size
        if not 1 <= self.crop_size <= opened.size:
            raise InputError(
                f"crop_size {crop_size} must be between 1 and the store's crop size {opened.size}", path=opened.path
            )
        if not 1 <= int(image_size) <= self.crop_size:
            raise InputError(
                f"image_size {image_size} must be between 1 and the crop size {self.crop_size}", path=opened.path
            )
        if max_residues < 1:
            raise ConfigError(f"max_residues must be >= 1, got {max_residues}")
        if eval_window not in ("start", "center", "end"):
            raise ConfigError(f"eval_window must be 'start', 'center' or 'end', got {eval_window!r}")
        self.image_size = int(image_size)
        self.resample = self.crop_size != opened.size or self.image_size != opened.size
        channels = ["nucleus", "protein" if (self.resample or with_protein) else "threshold"]
        if with_protein and not self.resample:
            channels.append("threshold")
        self.base = CropDataset(opened, split=split, channels=channels, label_map=None, cache_chunks=cache_chunks)
        if "protein_id" not in opened.obs.columns:
            raise InputError("the crop table has no 'protein_id' column", path=opened.path)
        pids = opened.obs["protein_id"].astype(str).to_numpy()[self.base.crop_index]
        missing = sorted(set(pids) - set(map(str, sequences)))
        if missing:
            row = int(self.base.crop_index[np.flatnonzero(pids == missing[0])[0]])
            raise InputError(
                f"no sequence for protein {missing[0]!r} ({len(missing)} protein(s) of split {split!r} lack one); "
                "give the sequences.fasta or proteins.csv of `protloc prepare`",
                path=opened.path,
                row=row,
            )
        self.protein_ids: np.ndarray = pids
        self.sequences = {p: str(sequences[p]) for p in set(pids)}
        self.max_residues = int(max_residues)
        self.eval_window = eval_window
        self.augment = bool(augment)
        self.with_protein = bool(with_protein)
        self.seed = int(seed)
        self.epoch = 0
        self.split = split

    def __getitems__(self, items: Sequence[int]) -> list[dict[str, Any]]:
        """Batched fetch used by :class:`~torch.utils.data.DataLoader` (one Zarr read per chunk)."""
        batch = self.read_batch(items)
        keys = [k for k in batch if k not in ("sequence", "protein_id")]
        return [
            {**{k: batch[k][j] for k in keys}, "sequence": batch["sequence"][j], "protein_id": batch["protein_id"][j]}
            for j in range(len(batch["index"]))
        ]

    def window(self, seq: str, crop: int) -> tuple[str, int, bool]:
        """The sequence window of crop ``crop`` this epoch: ``(window, start, add_end)``."""
        if self.augment and len(seq) > self.max_residues:
            u = float(hash_uniform(self.seed, self.epoch, [crop], salt=_SALT_WINDOW)[0])
            start = int(u * (len(seq) - self.max_residues + 1))
            window = seq[start : start + self.max_residues]
        else:
            window, start = crop_sequence(seq, self.max_residues, mode=self.eval_window)
        # The end token only if the window reaches the C-terminus and fits in BOS + max_residues.
        add_end = crop_is_full_end(seq, start, self.max_residues) and len(window) < self.max_residues
        return window, start, add_end

    def read_batch(self, items: Sequence[int] | np.ndarray) -> dict[str, Any]:
        """Read, crop, resize, threshold and flip several items; see the class docstring for the keys."""
        pos = np.asarray(items, dtype=np.int64).reshape(-1)
        raw = self.base.read_batch(pos)
        crops = raw["index"].numpy()
        stack = raw["image"]  # [B, C, S0, S0]
        b, s0, c = stack.shape[0], stack.shape[-1], self.crop_size
        if self.augment:
            oy = (hash_uniform(self.seed, self.epoch, crops, salt=_SALT_CROP_Y) * (s0 - c + 1)).astype(np.int64)
            ox = (hash_uniform(self.seed, self.epoch, crops, salt=_SALT_CROP_X) * (s0 - c + 1)).astype(np.int64)
            codes = (hash_uniform(self.seed, self.epoch, crops, salt=_SALT_FLIP) * 4).astype(np.int64)
        else:
            oy = ox = np.full(b, (s0 - c) // 2, dtype=np.int64)
            codes = np.zeros(b, dtype=np.int64)
        if c < s0 and b:
            windows = [stack[j, :, y : y + c, x : x + c] for j, (y, x) in enumerate(zip(oy, ox, strict=True))]
            stack = torch.stack(windows)
        if self.image_size != stack.shape[-1] and b:
            # Area averaging: each output pixel is the mean of its footprint.
            stack = torch.nn.functional.interpolate(stack, size=(self.image_size, self.image_size), mode="area")
        nucleus = stack[:, :1]
        if self.resample:
            protein = stack[:, 1:2]
            # Paper Sec. 4.3: threshold at the mean of the image the model sees.
            threshold = (protein >= protein.mean(dim=(-2, -1), keepdim=True)).float()
        else:
            protein = stack[:, 1:2] if self.with_protein else None
            threshold = (stack[:, -1:] > 0).float()
        out = {"nucleus": nucleus, "threshold": threshold}
        if self.with_protein:
            out["protein"] = protein
        if codes.any():
            # Bit 0: left-right flip, bit 1: up-down flip, the same for every image of a sample.
            flip_h = torch.from_numpy(codes & 1).bool().view(-1, 1, 1, 1)
            flip_v = torch.from_numpy(codes & 2).bool().view(-1, 1, 1, 1)
            for key, value in out.items():
                value = torch.where(flip_h, value.flip(-1), value)
                out[key] = torch.where(flip_v, value.flip(-2), value)
        out = {k: v.contiguous() for k, v in out.items()}
        pids = self.protein_ids[pos].tolist()
        windows = [self.window(self.sequences[p], int(crop)) for p, crop in zip(pids, crops.tolist(), strict=True)]
        out["sequence"] = [w[0] for w in windows]
        out["seq_start"] = torch.tensor([w[1] for w in windows], dtype=torch.int64)
        out["add_end"] = torch.tensor([w[2] for w in windows], dtype=torch.bool)
        out["protein_id"] = pids
        out["index"] = torch.from_numpy(crops.copy())
        # Which view of the crop the images are (flip + crop offset): with ``index`` it identifies the
        # images exactly, so their tokens can be cached (see protloc.train.celle).
        out["view"] = torch.from_numpy(codes + 4 * (oy * (s0 + 1) + ox))
        return out

    def __repr__(self) -> str:
        return (
            f"CelleDataset({str(self.base.store_path)!r}, split={self.split!r}, n={len(self)}, "
            f"image_size={self.image_size}, crop_size={self.crop_size}, augment={self.augment})"
        )


class VQGANCrops(_CropView):
    """Single-channel images for a tokenizer, from a CELL-E crop store (lazy Zarr reads).

    Items are ``{"image": float32 [1, S, S], "index": int64}`` plus ``"nucleus"`` ``[1, S, S]`` when
    ``with_nucleus`` (the reference image, for the nucleus-proportion metric of the threshold tokenizer).

    Parameters
    ----------
    store
        The crop store (``OUT/celle.zarr``).
    split
        ``split`` column value to keep.
    kind
        ``"nucleus"``: the ``nucleus`` channel; ``"threshold"``: the mean-thresholded protein image.
    image_size
        Output side; crops larger than that are area-averaged down, and the threshold image is then
        recomputed as ``pixel >= mean`` of the resized ``protein`` crop (paper Sec. 4.3; the stored
        ``threshold`` channel is used when no resizing happens).
    augment
        Flip each crop horizontally and / or vertically, drawn from a hash of ``(seed, epoch, crop)``
        like :func:`d4_codes` (reproducible whatever the order or workers).
    seed
        Augmentation seed.
    with_nucleus
        Also return the (resized, flipped alike) nucleus crop.
    cache_chunks
        Decompressed Zarr chunks kept per channel (see :class:`CropDataset`).

    Raises
    ------
    InputError
        If the store lacks a needed channel or the split, or ``image_size`` exceeds the crop size.
    """

    def __init__(
        self,
        store: CropStore | str | os.PathLike,
        *,
        split: str,
        kind: TokenizerKind,
        image_size: int,
        augment: bool = False,
        seed: int = 0,
        with_nucleus: bool = False,
        cache_chunks: int | Literal["all"] = 0,
    ) -> None:
        opened = store if isinstance(store, CropStore) else CropStore.open(store)
        check_celle_store(opened)
        if image_size > opened.size:
            raise InputError(
                f"data.image_size {image_size} is larger than the store's {opened.size}x{opened.size} crops",
                path=opened.path,
            )
        self.kind = kind
        self.image_size = int(image_size)
        self.resize = self.image_size != opened.size
        source = "nucleus" if kind == "nucleus" else ("protein" if self.resize else "threshold")
        channels = [source]
        if with_nucleus and source != "nucleus":
            channels.append("nucleus")
        self.with_nucleus = bool(with_nucleus)
        self.base = CropDataset(opened, split=split, channels=channels, label_map=None, cache_chunks=cache_chunks)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.epoch = 0

    def __getitems__(self, items: Sequence[int]) -> list[dict[str, Tensor]]:
        """Batched fetch used by :class:`~torch.utils.data.DataLoader` (one Zarr read per chunk)."""
        batch = self.read_batch(items)
        return [{k: v[j] for k, v in batch.items()} for j in range(len(batch["index"]))]

    def read_batch(self, items: Sequence[int] | np.ndarray) -> dict[str, Tensor]:
        """Read, resize, threshold and flip several items; see the class docstring for the keys."""
        raw = self.base.read_batch(items)
        crops = raw["index"]
        stack = raw["image"]  # [B, C, 256, 256] float32, channels as in self.base.channels
        if self.resize:
            # Area averaging (adaptive average pooling): the mean of each output pixel's footprint.
            stack = F.interpolate(stack, size=(self.image_size, self.image_size), mode="area")
        image = stack[:, :1]
        if self.kind == "threshold":
            if self.resize:
                image = torch.from_numpy(threshold_mean(image.numpy()).astype(np.float32))
            else:
                image = (image > 0).float()  # the stored uint8 {0, 1} channel
        out = {"image": image}
        if self.with_nucleus:
            out["nucleus"] = stack[:, :1] if self.kind == "nucleus" else stack[:, 1:2]
        if self.augment and len(crops):
            # Two bits of the per-crop hash: bit 0 = left-right flip, bit 1 = up-down flip.
            codes = torch.from_numpy(d4_codes(self.seed, self.epoch, crops.numpy()))
            flip_h = (codes & 1).bool().view(-1, 1, 1, 1)
            flip_v = (codes & 2).bool().view(-1, 1, 1, 1)
            for key, value in out.items():
                value = torch.where(flip_h, value.flip(-1), value)
                out[key] = torch.where(flip_v, value.flip(-2), value)
        out = {k: v.contiguous() for k, v in out.items()}
        out["index"] = crops
        return out

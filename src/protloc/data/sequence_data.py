"""Protein-sequence batches for the sequence encoder: a corpus dataset and a token-budget batch sampler.

- :class:`ProteinDataset` holds a corpus table's sequences (shortened with
  :func:`~protloc.data.sequences.clip_residues`), their presence / distribution targets
  (:func:`~protloc.data.proteome.compartment_targets`) and sampling weights; its :meth:`~ProteinDataset.collate`
  tokenizes a batch (``<cls>`` + residues + ``<sep>``) and masks residues for the masked-residue loss.
- :class:`TokenBudgetBatchSampler` draws each epoch's proteins by weighted sampling without replacement
  (``epoch_size`` of them, Efraimidis-Spirakis keys from a generator seeded by ``(seed, epoch)``), sorts
  them by length, cuts them into batches of at most ``tokens_per_batch`` padded tokens and
  ``max_batch_size`` sequences, and shuffles the batch order. Every epoch has exactly ``len(sampler)``
  batches (the first epoch's count): a later epoch whose draw packs into more batches drops the last
  ones of its shuffled order, one with fewer repeats its first ones. So the training engine's
  epoch / batch position is exact, and ``set_epoch(epoch, start_batch)`` resumes mid-epoch.

Masking is reproducible on resume: a batch's masking generator is seeded by the run's seed, the epoch and
the batch's protein indices, never by a global random state.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from protloc.data.proteome import compartment_targets
from protloc.data.sequences import Tokenizer, clip_residues
from protloc.errors import ConfigError

__all__ = ["ProteinDataset", "TokenBudgetBatchSampler", "length_batches", "mask_residues"]

_TOKENIZER = Tokenizer()


def mask_residues(
    ids: np.ndarray, mask: np.ndarray, prob: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Replace a random ``prob`` share of the residue positions by ``<mask>``.

    Parameters
    ----------
    ids, mask
        ``int64 [B, L]`` token ids and ``bool [B, L]`` mask (:meth:`~protloc.data.sequences.Tokenizer.encode_batch`).
    prob
        Chance of each residue (not ``<cls>`` / ``<sep>`` / padding) to be masked.
    rng
        The generator.

    Returns
    -------
    masked : numpy.ndarray
        The ids with ``<mask>`` at the chosen positions.
    targets : numpy.ndarray
        The original ids at the chosen positions, ``-100`` elsewhere.
    """
    residue = mask & (ids >= len(Tokenizer.SPECIAL_TOKENS))
    chosen = residue & (rng.random(ids.shape) < prob)
    targets = np.where(chosen, ids, -100)
    masked = np.where(chosen, _TOKENIZER.mask_id, ids)
    return masked, targets


class ProteinDataset(torch.utils.data.Dataset):
    """The proteins of a corpus table, with targets and sampling weights.

    Parameters
    ----------
    table
        Rows of :func:`~protloc.data.proteome.read_corpus` (``sequence``, ``human`` and the weight columns).
    max_residues
        Longer sequences keep their two ends (:func:`~protloc.data.sequences.clip_residues`).
    human_weight
        Sampling weight of human proteins (others: 1); a ``sample_weight`` column multiplies it.
    mask_prob
        Share of residues masked by :meth:`collate` (0: none).
    seed
        The run's seed (masking generators).
    """

    def __init__(
        self,
        table: pd.DataFrame,
        *,
        max_residues: int = 1000,
        human_weight: float = 1.0,
        mask_prob: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.accessions = table["accession"].astype(str).tolist()
        self.sequences = [clip_residues(str(s), max_residues) for s in table["sequence"]]
        self.lengths = np.asarray([len(s) + 2 for s in self.sequences], dtype=np.int64)  # + <cls>, <sep>
        self.presence, self.distribution = compartment_targets(table)
        human = table["human"].to_numpy(dtype=bool)
        weights = np.where(human, float(human_weight), 1.0)
        if "sample_weight" in table.columns:
            weights = weights * table["sample_weight"].to_numpy(dtype=float)
        self.weights = weights.astype(np.float64)
        self.max_residues = int(max_residues)
        self.mask_prob = float(mask_prob)
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> int:
        return int(index)

    def set_epoch(self, epoch: int) -> None:
        """The epoch (part of the masking seed)."""
        self.epoch = int(epoch)

    def collate(self, indices: Sequence[int]) -> dict[str, Tensor]:
        """The batch of ``indices``.

        Returns
        -------
        dict
            ``ids`` (masked), ``mask``, ``mlm_targets``, ``presence``, ``distribution``, ``index``.
        """
        idx = np.asarray(indices, dtype=np.int64)
        ids, mask = _TOKENIZER.encode_batch([self.sequences[i] for i in idx], max_len=self.max_residues)
        if self.mask_prob > 0:
            key = zlib.crc32(idx.tobytes())
            rng = np.random.default_rng([self.seed, self.epoch, key])
            ids, targets = mask_residues(ids, mask, self.mask_prob, rng)
        else:
            targets = np.full_like(ids, -100)
        return {
            "ids": torch.from_numpy(ids),
            "mask": torch.from_numpy(mask),
            "mlm_targets": torch.from_numpy(targets),
            "presence": torch.from_numpy(self.presence[idx]),
            "distribution": torch.from_numpy(self.distribution[idx]),
            "index": torch.from_numpy(idx),
        }


def length_batches(
    order: np.ndarray, lengths: np.ndarray, tokens_per_batch: int, max_batch_size: int
) -> list[list[int]]:
    """Cut ``order`` (indices sorted by length) into batches of at most ``tokens_per_batch`` padded tokens.

    A batch's padded size is its count times its longest length; a sequence longer than the budget gets
    a batch of its own.
    """
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order.tolist():
        n = int(lengths[i])
        wider = max(longest, n)
        if cur and (wider * (len(cur) + 1) > tokens_per_batch or len(cur) >= max_batch_size):
            batches.append(cur)
            cur, wider = [], n
        cur.append(i)
        longest = wider
    if cur:
        batches.append(cur)
    return batches


class TokenBudgetBatchSampler:
    """Weighted, length-bucketed batches under a token budget (see the module notes).

    Parameters
    ----------
    lengths
        Tokens per sequence (residues + 2).
    weights
        Sampling weights (> 0), or ``None`` for uniform.
    epoch_size
        Proteins drawn per epoch (at most all; 0 = all).
    tokens_per_batch
        Padded tokens per batch.
    max_batch_size
        Sequences per batch.
    shuffle
        Draw and shuffle (training); ``False``: every protein once, by length, fixed order (validation).
    seed
        Seeds every epoch's draws with ``(seed, epoch)``.
    num_replicas, rank
        Data-parallel processes: process ``rank`` takes every ``num_replicas``-th batch.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        weights: np.ndarray | None = None,
        *,
        epoch_size: int = 0,
        tokens_per_batch: int = 16384,
        max_batch_size: int = 256,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if tokens_per_batch < 1 or max_batch_size < 1:
            raise ConfigError("tokens_per_batch and max_batch_size must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        n = len(self.lengths)
        w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (n,) or not np.all(np.isfinite(w)) or (w <= 0).any():
            raise ConfigError("sampling weights must be positive and finite, one per sequence")
        self.weights = w
        self.epoch_size = n if epoch_size <= 0 else min(int(epoch_size), n)
        self.tokens_per_batch, self.batch_size = int(tokens_per_batch), int(max_batch_size)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch, self.start_batch = 0, 0
        total = len(self._epoch_batches(0))
        self._per_process = -(-total // self.num_replicas) if self.shuffle else len(self._mine(self._epoch_batches(0)))

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if not self.shuffle:
            order = np.argsort(self.lengths, kind="stable")
            return length_batches(order, self.lengths, self.tokens_per_batch, self.batch_size)
        rng = np.random.default_rng([self.seed, int(epoch)])
        n = len(self.lengths)
        if self.epoch_size < n:
            keys = np.log1p(-rng.random(n)) / self.weights  # Efraimidis-Spirakis: the largest keys win
            drawn = np.argpartition(-keys, self.epoch_size - 1)[: self.epoch_size]
        else:
            drawn = np.arange(n)
        drawn = drawn[rng.permutation(drawn.size)]  # ties in length broken at random
        order = drawn[np.argsort(self.lengths[drawn], kind="stable")]
        batches = length_batches(order, self.lengths, self.tokens_per_batch, self.batch_size)
        return [batches[i] for i in rng.permutation(len(batches))]

    def _mine(self, batches: list[list[int]]) -> list[list[int]]:
        return batches[self.rank :: self.num_replicas]

    def batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of ``epoch`` (exactly ``len(self)`` of them when shuffling)."""
        batches = self._epoch_batches(epoch)
        if self.shuffle:
            want = self._per_process * self.num_replicas
            batches = [batches[i % len(batches)] for i in range(want)]
        return self._mine(batches)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Start the next pass at batch ``start_batch`` of ``epoch``."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        return self._per_process

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches(self.epoch)
        start, self.start_batch = self.start_batch, 0
        yield from batches[start:]

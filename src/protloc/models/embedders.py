"""Per-residue sequence embedders for CELL-E, with an on-disk cache for frozen ones.

CELL-E feeds the amino-acid sequence to its transformer as per-residue vectors from a fixed protein
language model (TAPE, 768 dims), and compares one-hot (25), physicochemical descriptors (66) and other
language models (paper S.3.6, Table S.1). Every embedder here shares protloc's TAPE-layout tokenizer
(:class:`protloc.data.sequences.Tokenizer`: 30 tokens, ``<pad>=0, <mask>=1, <cls>=2, <sep>=3,
<unk>=4``, letters ``A..Z`` without ``J`` at 5..29), puts ``<cls>`` (the BOS token) at position 0 and
returns ``[B, L, dim]``:

=============== ====== ========================================================================
name            dim    what
=============== ====== ========================================================================
``onehot``      25     one channel per amino-acid letter; special tokens are zero rows
``descriptors`` 66     ten descriptor scales of the ``peptides`` package (Osorio et al. 2015)
``learned``     any    ``nn.Embedding(30, dim)``, trained with the model (not frozen)
``esm2``        model  a local fair-esm ``.pt`` checkpoint or Hugging Face ``transformers`` folder
``tape``        768    TAPE BERT from local weights, if ``tape_proteins`` is installed
``encoder``     model  protloc's protein sequence encoder (``protloc train encoder``), a local
                       checkpoint or ``pretrained:NAME``
=============== ====== ========================================================================

Frozen embedders (all but ``learned`` by default) run once per sequence:
:meth:`Embedder.embed_sequences` stores each result in an :class:`EmbeddingCache` (one safetensors
file per hash of embedder, settings and sequence), so training and generation never re-run the
language model -- the reference re-ran TAPE at each of the 256 generation steps, about 97% of its
time (``shared/REFERENCE_NOTES.md``). Nothing here downloads weights.

Examples
--------
>>> emb = build_embedder("onehot")
>>> ids, mask = emb.tokenize(["MKV", "MA"], max_len=10)
>>> ids.tolist()
[[2, 16, 14, 25, 3], [2, 16, 5, 3, 0]]
>>> emb(ids, mask).shape
torch.Size([2, 5, 25])
"""

from __future__ import annotations

import argparse
import difflib
import functools
import hashlib
import json
import logging
import os
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from protloc._fs import atomic_path
from protloc.data.sequences import ALPHABET, STANDARD, Tokenizer
from protloc.errors import ConfigError, InputError, ProtlocError

if TYPE_CHECKING:
    from protloc.models.celle import CelleConfig

__all__ = [
    "DESCRIPTOR_SCALES",
    "EMBEDDERS",
    "EmbedderConfig",
    "DescriptorEmbedder",
    "ESM2Embedder",
    "Embedder",
    "EncoderEmbedder",
    "EmbeddingCache",
    "LearnedEmbedder",
    "OneHotEmbedder",
    "SequenceEncoder",
    "TAPEEmbedder",
    "build_embedder",
    "descriptor_table",
    "pad_embeddings",
]

logger = logging.getLogger(__name__)

_TOKENIZER = Tokenizer()
_N_SPECIAL = len(Tokenizer.SPECIAL_TOKENS)
#: Residue letters in token-id order (ids 5..29).
_LETTERS = "".join(sorted(ALPHABET))


class Embedder(nn.Module):
    """Base class: a module mapping TAPE-layout token ids to per-token vectors ``[B, L, dim]``.

    Subclasses set :attr:`dim`, implement :meth:`_embed` and :meth:`cache_config`.

    Parameters
    ----------
    frozen
        Freeze the embedder: no gradients, always in eval mode, outputs computed under
        ``torch.no_grad`` and cacheable by :meth:`embed_sequences`.
    """

    #: Registry name (key of :data:`EMBEDDERS`).
    name: ClassVar[str] = ""
    #: Whether the embedder has weights that train with the model by default.
    trainable: ClassVar[bool] = False
    #: Whether a residue's vector depends on its neighbours (protein language models). A masked residue
    #: then leaks through its neighbours' vectors, so CELL-E cannot be trained to fill residues with it.
    contextual: ClassVar[bool] = False

    def __init__(self, *, frozen: bool = True):
        super().__init__()
        self.tokenizer = _TOKENIZER
        self._frozen = bool(frozen)
        self.dim = 0

    @property
    def frozen(self) -> bool:
        """True when the embedder is fixed (no gradients, eval mode)."""
        return self._frozen

    def _freeze(self) -> None:
        if self._frozen:
            self.requires_grad_(False)
            super().train(False)

    def train(self, mode: bool = True) -> Embedder:
        """Set training mode; a frozen embedder stays in eval mode."""
        return super().train(False if self._frozen else mode)

    def tokenize(
        self, seqs: Sequence[str], *, max_len: int, add_end: bool | Sequence[bool] = True
    ) -> tuple[Tensor, Tensor]:
        """Token ids and mask of a batch: ``<cls>`` + residues (+ ``<sep>``), right-padded.

        Parameters
        ----------
        seqs
            Amino-acid sequences, already cropped to at most ``max_len`` residues
            (:func:`protloc.data.sequences.crop_sequence`).
        max_len
            The most residues a sequence may have.
        add_end
            Append ``<sep>`` (per sequence or for all); False for a crop that stops before the
            C-terminus (paper S.3.6, :func:`protloc.data.sequences.crop_is_full_end`).

        Returns
        -------
        ids : torch.Tensor
            ``int64 [B, L]``.
        mask : torch.Tensor
            ``bool [B, L]``, True on real tokens.
        """
        ids, mask = self.tokenizer.encode_batch(seqs, max_len=max_len, add_end=add_end)
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def _embed(self, ids: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """Embed token ids ``[B, L]`` (mask ``[B, L]``, True on real tokens) to ``[B, L, dim]``.

        Padded positions are zero.
        """
        if ids.dim() != 2:
            raise InputError(f"expected token ids [B, L], got shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.tokenizer.vocab_size):
            raise InputError(f"token ids must lie in 0..{self.tokenizer.vocab_size - 1}")
        if mask is None:
            mask = ids != self.tokenizer.pad_id
        mask = mask.bool()
        if self._frozen:
            with torch.no_grad():
                out = self._embed(ids, mask)
        else:
            out = self._embed(ids, mask)
        return out * mask[..., None].to(out.dtype)

    def cache_config(self) -> dict[str, Any]:
        """JSON-serialisable settings that, with the sequence, determine the output (cache key)."""
        raise NotImplementedError

    def cache_key(self, seq: str, *, add_end: bool = True) -> str:
        """SHA-256 hex key of (embedder name, :meth:`cache_config`, sequence, end token)."""
        payload = json.dumps(
            {"embedder": self.name, "config": self.cache_config(), "sequence": seq, "add_end": bool(add_end)},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def embed_sequences(
        self,
        seqs: Sequence[str],
        *,
        max_len: int,
        add_end: bool | Sequence[bool] = True,
        cache: EmbeddingCache | None = None,
        batch_size: int = 8,
    ) -> list[Tensor]:
        """Embed sequences one by one (batched internally), reading and filling ``cache``.

        Parameters
        ----------
        seqs
            Amino-acid sequences of at most ``max_len`` residues.
        max_len
            The most residues a sequence may have.
        add_end
            Whether each sequence gets the ``<sep>`` end token (see :meth:`tokenize`).
        cache
            On-disk cache; only for frozen embedders (a trainable one changes as it trains).
        batch_size
            Sequences per forward pass on cache misses (sorted by length to limit padding).

        Returns
        -------
        list of torch.Tensor
            Per sequence, float32 CPU ``[L_i, dim]`` with ``L_i = 1 + len(seq) + add_end``.
        """
        if cache is not None and not self._frozen:
            raise ConfigError(f"embedder {self.name!r} is trainable; its embeddings cannot be cached")
        seqs = list(seqs)
        ends = [bool(add_end)] * len(seqs) if isinstance(add_end, bool) else [bool(e) for e in add_end]
        if len(ends) != len(seqs):
            raise ConfigError(f"add_end has {len(ends)} entries for {len(seqs)} sequences")
        out: list[Tensor | None] = [None] * len(seqs)
        todo: dict[tuple[str, bool], list[int]] = {}
        keys: dict[tuple[str, bool], str] = {}
        for i, (seq, end) in enumerate(zip(seqs, ends, strict=True)):
            item = (seq, end)
            if item in todo:
                todo[item].append(i)
                continue
            if cache is not None:
                keys[item] = key = self.cache_key(seq, add_end=end)
                hit = cache.get(key)
                if hit is not None and hit.shape[-1] == self.dim:
                    out[i] = hit
                    continue
            todo[item] = [i]
        items = sorted(todo, key=lambda it: len(it[0]))
        for lo in range(0, len(items), batch_size):
            chunk = items[lo : lo + batch_size]
            ids, mask = self.tokenize([s for s, _ in chunk], max_len=max_len, add_end=[e for _, e in chunk])
            device = _module_device(self)
            with torch.no_grad():
                emb = self(ids.to(device), mask.to(device)).float().cpu()  # [b, L, dim]
            for j, item in enumerate(chunk):
                vec = emb[j, : int(mask[j].sum())].contiguous()  # [L_j, dim]
                if cache is not None:
                    cache.put(keys[item], vec, metadata={"embedder": self.name, "length": str(len(item[0]))})
                for i in todo[item]:
                    out[i] = vec
        missing = [i for i, t in enumerate(out) if t is None]
        if missing:
            raise RuntimeError(f"sequences {missing} were not embedded")
        return [t for t in out if t is not None]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, frozen={self._frozen}"


def _module_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Table embedders
# --------------------------------------------------------------------------------------------------


class OneHotEmbedder(Embedder):
    """One-hot amino acids: 25 channels, one per letter of :data:`~protloc.data.sequences.ALPHABET`.

    Channel ``i`` is token id ``5 + i`` (letters in alphabetical order, as in the tokenizer). Special
    tokens (``<cls>``, ``<sep>``, ``<pad>``, ...) are zero rows, as in the paper's 25-dim one-hot
    ablation (Table S.1); the transformer tells them apart by position. With
    ``special_channels=True`` two extra channels flag ``<cls>`` and ``<sep>`` (27 dims).

    Parameters
    ----------
    special_channels
        Add indicator channels for the start and end tokens.
    """

    name = "onehot"

    def __init__(self, *, special_channels: bool = False):
        super().__init__(frozen=True)
        self.special_channels = bool(special_channels)
        n_letters = len(_LETTERS)
        self.dim = n_letters + (2 if special_channels else 0)
        table = torch.zeros(self.tokenizer.vocab_size, self.dim)
        table[_N_SPECIAL:, :n_letters] = torch.eye(n_letters)
        if special_channels:
            table[self.tokenizer.cls_id, n_letters] = 1.0
            table[self.tokenizer.sep_id, n_letters + 1] = 1.0
        self.register_buffer("table", table, persistent=False)  # [30, dim]
        self._freeze()

    def _embed(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.table[ids]

    def cache_config(self) -> dict[str, Any]:
        return {"special_channels": self.special_channels}


#: The descriptor scales of :class:`DescriptorEmbedder`: ``peptides.tables`` attribute and the number
#: of per-residue values. These are the ten scales of the R Peptides ``aaDescriptors`` function
#: (Osorio et al. 2015, CELL-E ref. [61]), whose 66 columns the CELL-E paper uses (Table S.1, refs.
#: [62]-[71]): Cruciani properties, Kidera factors, Z-scales, FASGAI, T-scales, VHSE, ProtFP,
#: ST-scales, BLOSUM indices and MS-WHIM scores.
DESCRIPTOR_SCALES: tuple[tuple[str, int], ...] = (
    ("CRUCIANI", 3),
    ("KIDERA", 10),
    ("Z_SCALES", 5),
    ("FASGAI", 6),
    ("T_SCALES", 5),
    ("VHSE", 8),
    ("PROTFP", 8),
    ("ST_SCALES", 8),
    ("BLOSUM", 10),
    ("MSWHIM", 3),
)

# Extra IUPAC letters as averages of standard residues (after standardisation). X ("any") is the mean
# of all 20 standard residues, i.e. zero in every standardised column. U (selenocysteine) and O
# (pyrrolysine) take the values of their closest standard residues, cysteine and lysine.
_EXTRA_RESIDUES = {"B": "DN", "Z": "EQ", "X": STANDARD, "U": "C", "O": "K"}


def _column_order(name: str) -> tuple[str, int]:
    digits = "".join(ch for ch in name if ch.isdigit())
    return name.rstrip("0123456789"), int(digits) if digits else 0


@functools.lru_cache(maxsize=1)
def descriptor_table() -> tuple[tuple[str, ...], np.ndarray]:
    """The standardised 66-column descriptor table of the 25 residue letters.

    Columns are those of :data:`DESCRIPTOR_SCALES`, each scale's components in numeric order
    (``KF1 .. KF10``). Every column is standardised to mean 0 and standard deviation 1 (population)
    over the 20 standard amino acids, so no scale dominates by its units. ``B``, ``Z``, ``X``, ``U``,
    ``O`` are averages of the residues they stand for (``B = (D + N) / 2``, ``Z = (E + Q) / 2``,
    ``X`` = mean of all 20 = 0, ``U = C``, ``O = K``).

    Returns
    -------
    columns : tuple of str
        66 column names.
    table : numpy.ndarray
        ``float32 [25, 66]``, rows in the order of the letters' token ids (``A, B, C, ..., Z``).

    Raises
    ------
    ProtlocError
        If the ``peptides`` package is not installed.
    """
    try:
        import peptides.tables as tables
    except ImportError as exc:
        raise ProtlocError(
            "the 'descriptors' embedder needs the optional 'peptides' package (GPL-3.0): "
            "pip install 'protloc[descriptors]'"
        ) from exc
    columns: list[str] = []
    values: list[list[float]] = []
    for attr, expected in DESCRIPTOR_SCALES:
        scale: Mapping[str, Mapping[str, float]] = getattr(tables, attr)
        if len(scale) != expected:
            raise ProtlocError(f"peptides.tables.{attr} has {len(scale)} components, expected {expected}")
        for comp in sorted(scale, key=_column_order):
            columns.append(comp)
            values.append([float(scale[comp][aa]) for aa in STANDARD])
    raw = np.asarray(values, dtype=np.float64).T  # [20 standard residues, 66]
    z = (raw - raw.mean(axis=0)) / raw.std(axis=0)
    rows = {aa: z[i] for i, aa in enumerate(STANDARD)}
    for letter, members in _EXTRA_RESIDUES.items():
        rows[letter] = np.mean([rows[m] for m in members], axis=0)
    table = np.stack([rows[letter] for letter in _LETTERS]).astype(np.float32)
    return tuple(columns), table


class DescriptorEmbedder(Embedder):
    """Physicochemical descriptors: 66 standardised values per residue (see :func:`descriptor_table`).

    Special tokens are zero rows (zero is also the mean residue, as every column is standardised).
    """

    name = "descriptors"

    def __init__(self) -> None:
        super().__init__(frozen=True)
        columns, values = descriptor_table()
        self.columns = columns
        self.dim = len(columns)
        table = torch.zeros(self.tokenizer.vocab_size, self.dim)
        table[_N_SPECIAL:] = torch.from_numpy(values)
        self.register_buffer("table", table, persistent=False)  # [30, 66]
        self._freeze()

    def _embed(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.table[ids]

    def cache_config(self) -> dict[str, Any]:
        return {"scales": [a for a, _ in DESCRIPTOR_SCALES], "standardised": True, "extras": _EXTRA_RESIDUES}


class LearnedEmbedder(Embedder):
    """A trainable ``nn.Embedding(30, dim)`` (``<pad>`` row fixed at zero); not frozen.

    The paper's "random initialization" ablation (Table S.1). Its outputs change while it trains, so
    they are never cached.

    Parameters
    ----------
    dim
        Embedding width.
    """

    name = "learned"
    trainable = True

    def __init__(self, dim: int = 64):
        super().__init__(frozen=False)
        if dim < 1:
            raise ConfigError(f"learned embedder dim must be >= 1, got {dim}")
        self.dim = dim
        self.embedding = nn.Embedding(self.tokenizer.vocab_size, dim, padding_idx=self.tokenizer.pad_id)

    def _embed(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.embedding(ids)

    def cache_config(self) -> dict[str, Any]:
        return {"dim": self.dim}


# --------------------------------------------------------------------------------------------------
# Language-model embedders (local weights only)
# --------------------------------------------------------------------------------------------------

#: The ESM-1b / ESM-2 vocabulary (33 tokens), as in fair-esm's ``Alphabet.from_architecture("ESM-1b")``
#: and the Hugging Face ESM tokenizers; used when a transformers folder has no ``vocab.txt``.
_ESM_VOCAB = (
    "<cls>",
    "<pad>",
    "<eos>",
    "<unk>",
    "L",
    "A",
    "G",
    "V",
    "S",
    "E",
    "R",
    "T",
    "I",
    "D",
    "P",
    "K",
    "Q",
    "N",
    "F",
    "Y",
    "M",
    "H",
    "W",
    "C",
    "X",
    "B",
    "U",
    "Z",
    "O",
    ".",
    "-",
    "<null_1>",
    "<mask>",
)


def _esm_lookup(vocab: Mapping[str, int]) -> Tensor:
    """Map protloc token ids (30) to ESM ids: specials to their ESM counterparts, letters by letter."""
    special = {"<pad>": "<pad>", "<mask>": "<mask>", "<cls>": "<cls>", "<sep>": "<eos>", "<unk>": "<unk>"}
    lut = []
    for tok in Tokenizer.SPECIAL_TOKENS:
        lut.append(vocab[special[tok]])
    for letter in _LETTERS:
        lut.append(vocab.get(letter, vocab["<unk>"]))
    return torch.tensor(lut, dtype=torch.long)


def _weights_fingerprint(module: nn.Module) -> str:
    """A cheap content hash of a model's weights: names, shapes, sums and the first values of each."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in module.state_dict().items():
            flat = p.detach().reshape(-1)
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            if flat.numel():
                f64 = flat.double()
                h.update(np.asarray([f64.sum().item(), f64.abs().sum().item()]).tobytes())
                h.update(flat[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class ESM2Embedder(Embedder):
    """ESM-2 (or ESM-1b) per-residue representations from a LOCAL checkpoint.

    Two formats are read, never downloaded:

    - a fair-esm checkpoint file (``esm2_t33_650M_UR50D.pt`` and the like; ``pip install fair-esm``).
      It is unpickled with ``torch.load(weights_only=True)``, allowing only ``argparse.Namespace``
      besides tensors; ``trust_checkpoint=True`` lifts that restriction for checkpoints of other
      provenance.
    - a Hugging Face ``transformers`` model folder (``config.json`` + weights, e.g.
      ``facebook/esm2_t33_650M_UR50D`` saved locally; ``pip install transformers``).

    protloc's token ids are mapped to the ESM alphabet (``<cls>`` -> ``<cls>``, ``<sep>`` -> ``<eos>``,
    letters by letter), so position 0 is ESM's own BOS token.

    Parameters
    ----------
    path
        The checkpoint file or folder.
    layer
        Which layer's representation (default: the last, after ESM's final layer norm).
    frozen
        Fixed language model (paper: fixed embeddings generalise better, Table S.1).
    trust_checkpoint
        Allow arbitrary pickled objects in a fair-esm file (only for files you trust).

    Raises
    ------
    InputError
        If ``path`` does not exist or is not an ESM checkpoint.
    ProtlocError
        If the package needed for its format is not installed.
    """

    name = "esm2"
    contextual = True

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        layer: int | None = None,
        frozen: bool = True,
        trust_checkpoint: bool = False,
    ):
        super().__init__(frozen=frozen)
        p = Path(path).expanduser()
        if not p.exists():
            raise InputError(
                "ESM checkpoint not found (protloc never downloads weights: give a local fair-esm .pt file "
                "or a transformers model folder)",
                path=p,
            )
        self.path = p
        if p.is_dir():
            self.source = "transformers"
            self.model, vocab, n_layers = self._load_transformers(p)
        else:
            self.source = "fair-esm"
            self.model, vocab, n_layers = self._load_fair_esm(p, trust_checkpoint)
        self.num_layers = n_layers
        if self.source == "transformers":
            self.dim = int(self.model.config.hidden_size)
        else:
            self.dim = int(self.model.embed_tokens.embedding_dim)
        self.layer = n_layers if layer is None else int(layer)
        if not 0 <= self.layer <= n_layers:
            raise ConfigError(f"layer must be in 0..{n_layers} for this model, got {layer}")
        self.register_buffer("lut", _esm_lookup(vocab), persistent=False)  # [30] protloc id -> ESM id
        self.esm_pad_id = vocab["<pad>"]
        self._fingerprint = _weights_fingerprint(self.model)
        self._freeze()

    @staticmethod
    def _load_fair_esm(p: Path, trust: bool) -> tuple[nn.Module, dict[str, int], int]:
        try:
            import esm.pretrained
        except ImportError as exc:
            raise ProtlocError(
                "reading a fair-esm checkpoint needs the 'fair-esm' package (pip install fair-esm)"
            ) from exc
        try:
            if trust:
                data = torch.load(p, map_location="cpu", weights_only=False)
            else:
                with torch.serialization.safe_globals([argparse.Namespace]):
                    data = torch.load(p, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
            raise InputError(
                f"cannot read the ESM checkpoint ({exc}); if it is a trusted file holding other Python "
                "objects, pass trust_checkpoint=True",
                path=p,
            ) from exc
        if not isinstance(data, dict) or "model" not in data or not ({"cfg", "args"} & set(data)):
            raise InputError("not a fair-esm checkpoint (expected a dict with 'model' and 'cfg' or 'args')", path=p)
        # fair-esm picks the ESM-2 loader by a model name starting with "esm2"; ESM-1b files have "args".
        model_name = "esm2_local" if "cfg" in data else "esm1b_local"
        try:
            with warnings.catch_warnings():
                # No contact-regression weights: irrelevant for representations.
                warnings.filterwarnings("ignore", message="Regression weights not found")
                model, alphabet = esm.pretrained.load_model_and_alphabet_core(model_name, data, None)
        except (RuntimeError, KeyError, AttributeError, ValueError) as exc:
            raise InputError(f"cannot build an ESM model from the checkpoint ({exc})", path=p) from exc
        return model, dict(alphabet.tok_to_idx), len(model.layers)

    @staticmethod
    def _load_transformers(p: Path) -> tuple[nn.Module, dict[str, int], int]:
        if not (p / "config.json").is_file():
            raise InputError("not a transformers model folder: config.json is missing", path=p)
        try:
            from transformers import EsmModel
        except ImportError as exc:
            raise ProtlocError(
                "reading a transformers ESM folder needs the 'transformers' package (pip install transformers)"
            ) from exc
        try:
            model = EsmModel.from_pretrained(str(p), local_files_only=True, add_pooling_layer=False)
        except (OSError, ValueError, RuntimeError) as exc:
            raise InputError(f"cannot load the ESM model ({exc})", path=p) from exc
        vocab_file = p / "vocab.txt"
        tokens = vocab_file.read_text(encoding="utf-8").split() if vocab_file.is_file() else list(_ESM_VOCAB)
        vocab = {tok: i for i, tok in enumerate(tokens)}
        missing = [t for t in ("<cls>", "<pad>", "<eos>", "<unk>", "<mask>") if t not in vocab]
        if missing:
            raise InputError(f"vocab.txt lacks the ESM special tokens {missing}", path=vocab_file)
        return model, vocab, int(model.config.num_hidden_layers)

    def _embed(self, ids: Tensor, mask: Tensor) -> Tensor:
        esm_ids = self.lut[ids].masked_fill(~mask, self.esm_pad_id)  # [B, L] in the ESM alphabet
        if self.source == "transformers":
            out = self.model(
                input_ids=esm_ids, attention_mask=mask.long(), output_hidden_states=self.layer != self.num_layers
            )
            if self.layer == self.num_layers:
                return out.last_hidden_state  # [B, L, dim]
            return out.hidden_states[self.layer]
        return self.model(esm_ids, repr_layers=[self.layer])["representations"][self.layer]  # [B, L, dim]

    def cache_config(self) -> dict[str, Any]:
        return {"source": self.source, "layer": self.layer, "weights": self._fingerprint}


class TAPEEmbedder(Embedder):
    """TAPE BERT (``bert-base``, 768 dims; the CELL-E paper's language model) from local weights.

    Needs the ``tape_proteins`` package and a local folder written by TAPE's ``save_pretrained``
    (``config.json`` + ``pytorch_model.bin``); TAPE's IUPAC vocabulary is protloc's token layout, so
    ids pass unchanged. Nothing is downloaded.

    Parameters
    ----------
    path
        The local TAPE model folder.
    frozen
        Fixed language model (paper default).

    Raises
    ------
    ProtlocError
        If ``tape_proteins`` is not installed or ``path`` is not given / not found.
    """

    name = "tape"
    contextual = True

    def __init__(self, path: str | os.PathLike | None = None, *, frozen: bool = True):
        super().__init__(frozen=frozen)
        if path is None:
            raise ConfigError(
                "the 'tape' embedder needs path= to local TAPE weights (protloc never downloads them); "
                "'esm2', 'descriptors' or 'onehot' work without TAPE"
            )
        p = Path(path).expanduser()
        if not p.is_dir():
            raise InputError("TAPE model folder not found", path=p)
        try:
            from tape import ProteinBertModel
        except ImportError as exc:
            raise ProtlocError(
                "the 'tape' embedder needs the 'tape_proteins' package, which is not installed; "
                "use 'esm2', 'descriptors' or 'onehot' instead"
            ) from exc
        try:
            self.model = ProteinBertModel.from_pretrained(str(p))
        except (OSError, ValueError, RuntimeError) as exc:
            raise InputError(f"cannot load the TAPE model ({exc})", path=p) from exc
        self.path = p
        self.dim = int(self.model.config.hidden_size)
        self._fingerprint = _weights_fingerprint(self.model)
        self._freeze()

    def _embed(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.model(ids, input_mask=mask.long())[0]  # sequence output [B, L, 768]

    def cache_config(self) -> dict[str, Any]:
        return {"weights": self._fingerprint}


class EncoderEmbedder(Embedder):
    """The per-residue vectors of protloc's protein sequence encoder (:mod:`protloc.models.encoder`).

    Position 0 (``<cls>``) holds the encoder's summary of the sequence (:meth:`ProteinEncoder.summary
    <protloc.models.encoder.ProteinEncoder.summary>`, the vector its localization heads read); the
    others hold the contextual per-residue vectors.

    Parameters
    ----------
    path
        A checkpoint folder of ``protloc train encoder`` (``model.safetensors`` + ``config.json``), a run
        folder (its ``best/``, else ``last/``) or ``pretrained:NAME`` (a shipped encoder).
    frozen
        Fixed encoder (the default; its outputs are then cacheable).

    Raises
    ------
    ConfigError
        If ``path`` is not given.
    InputError
        If the checkpoint is missing or is not a protein encoder's.
    """

    name = "encoder"
    contextual = True

    def __init__(self, path: str | os.PathLike | None = None, *, frozen: bool = True):
        super().__init__(frozen=frozen)
        from protloc.models.checkpoint import find_checkpoint, load_checkpoint
        from protloc.models.encoder import EncoderConfig, ProteinEncoder
        from protloc.pretrained import resolve_checkpoint

        if path is None or not str(path):
            raise ConfigError("the 'encoder' embedder needs path= to a protein encoder checkpoint (or pretrained:NAME)")
        p = find_checkpoint(resolve_checkpoint(path), what="protein encoder")
        self.model, _, _ = load_checkpoint(p, model_cls=ProteinEncoder, config_cls=EncoderConfig)
        self.path = p
        self.dim = int(self.model.dim)
        self._fingerprint = _weights_fingerprint(self.model)
        self._freeze()

    def _embed(self, ids: Tensor, mask: Tensor) -> Tensor:
        residues = self.model.encode(ids, mask)
        # The <cls> position carries the encoder's localization summary of the window (light-attention
        # pooling + head, what its presence / distribution heads read) rather than the raw <cls> vector:
        # CELL-E's transformer then sees the protein-level call in one token beside the residues.
        summary = self.model.summary(residues, mask).to(residues.dtype)
        return torch.cat([summary[:, None], residues[:, 1:]], dim=1)

    def cache_config(self) -> dict[str, Any]:
        return {"weights": self._fingerprint, "dim": self.dim, "cls": "summary"}


#: Registry of embedders by name.
EMBEDDERS: dict[str, type[Embedder]] = {
    "onehot": OneHotEmbedder,
    "descriptors": DescriptorEmbedder,
    "learned": LearnedEmbedder,
    "esm2": ESM2Embedder,
    "tape": TAPEEmbedder,
    "encoder": EncoderEmbedder,
}


def build_embedder(name: str, **kwargs: Any) -> Embedder:
    """Build a registered embedder by name (:data:`EMBEDDERS`).

    Parameters
    ----------
    name
        ``"onehot"``, ``"descriptors"``, ``"learned"``, ``"esm2"``, ``"tape"`` or ``"encoder"``.
    **kwargs
        Passed to the embedder (e.g. ``path=`` for ``esm2`` / ``tape`` / ``encoder``, ``dim=`` for ``learned``).

    Raises
    ------
    ConfigError
        For an unknown name or unexpected keyword arguments.
    """
    if name not in EMBEDDERS:
        close = difflib.get_close_matches(name, list(EMBEDDERS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown embedder {name!r}{hint}; choose one of {', '.join(EMBEDDERS)}")
    try:
        return EMBEDDERS[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"embedder {name!r}: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# Cache and batching
# --------------------------------------------------------------------------------------------------


class EmbeddingCache:
    """On-disk cache of per-sequence embeddings: ``<dir>/<key[:2]>/<key>.safetensors``.

    Keys come from :meth:`Embedder.cache_key` (a SHA-256 of embedder, settings and sequence). Files
    are written atomically; an unreadable file counts as a miss and is rewritten.

    Parameters
    ----------
    directory
        Cache folder (created on first write).

    Attributes
    ----------
    hits, misses
        Lookup counters.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.directory)!r}, hits={self.hits}, misses={self.misses})"

    def path(self, key: str) -> Path:
        """File of ``key``."""
        if len(key) < 3 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"cache keys are hex digests, got {key!r}")
        return self.directory / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> Tensor | None:
        """The cached ``[L, dim]`` tensor, or None (a miss)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            tensor = load_file(str(path))["embedding"]
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            logger.warning("embedding cache: ignoring unreadable %s (%s)", path, exc)
            self.misses += 1
            return None
        self.hits += 1
        return tensor

    def put(self, key: str, tensor: Tensor, *, metadata: Mapping[str, str] | None = None) -> Path:
        """Store ``tensor`` under ``key`` (atomically); return its file."""
        from safetensors.torch import save_file

        path = self.path(key)
        with atomic_path(path) as tmp:
            save_file({"embedding": tensor.detach().cpu().contiguous()}, str(tmp), metadata=dict(metadata or {}))
        return path


def pad_embeddings(embeddings: Sequence[Tensor], *, length: int | None = None) -> tuple[Tensor, Tensor]:
    """Right-pad per-sequence embeddings ``[L_i, dim]`` into a batch.

    Parameters
    ----------
    embeddings
        Outputs of :meth:`Embedder.embed_sequences`.
    length
        Padded length (default: the longest).

    Returns
    -------
    emb : torch.Tensor
        ``[B, L, dim]``, zeros at padding.
    mask : torch.Tensor
        ``bool [B, L]``, True on real tokens.
    """
    if not embeddings:
        raise InputError("no embeddings to pad")
    dim = embeddings[0].shape[-1]
    longest = max(e.shape[0] for e in embeddings)
    length = longest if length is None else length
    if longest > length:
        raise InputError(f"an embedding has {longest} positions, more than length={length}")
    emb = embeddings[0].new_zeros(len(embeddings), length, dim)
    mask = torch.zeros(len(embeddings), length, dtype=torch.bool)
    for i, e in enumerate(embeddings):
        if e.shape[-1] != dim:
            raise InputError(f"embedding {i} has {e.shape[-1]} channels, expected {dim}")
        emb[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = True
    return emb, mask


# --------------------------------------------------------------------------------------------------
# CELL-E's sequence inputs: token ids, masks and frozen embeddings, each window embedded once
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedderConfig:
    """Where the sequence embedder named by ``model.embedder`` comes from.

    Attributes
    ----------
    path
        Local weights for ``esm2`` / ``tape``, or the protein encoder checkpoint (or ``pretrained:NAME``)
        for ``encoder`` (nothing is downloaded).
    cache_dir
        On-disk cache of per-window embeddings (safetensors); empty: in memory only.
    memory_items
        Embedded windows kept in memory (least recently used are dropped).
    """

    path: str = ""
    cache_dir: str = ""
    memory_items: int = 4096

    def __post_init__(self) -> None:
        if self.memory_items < 0:
            raise ConfigError(f"embedder.memory_items must be >= 0, got {self.memory_items}")


class SequenceEncoder:
    """Token ids, masks and (frozen) embeddings of sequence windows, each window embedded once.

    Parameters
    ----------
    config
        The CELL-E model config (``embedder``, ``text_dim``, ``max_residues``).
    embedder
        Where the embedder's weights and cache live.
    device
        Device the embedder runs on and outputs go to.
    blank
        Replace every sequence by padding (only the start token): the "no sequence" ablation.

    Notes
    -----
    The ``learned`` embedder is part of the model (it trains); then only ids and masks are produced.
    """

    def __init__(
        self,
        config: CelleConfig,
        embedder: EmbedderConfig | None = None,
        *,
        device: torch.device | str = "cpu",
        blank: bool = False,
    ) -> None:
        embedder = embedder or EmbedderConfig()
        self.config = config
        self.device = torch.device(device)
        self.blank = bool(blank)
        self.trainable = EMBEDDERS[config.embedder].trainable
        self.embedder = None
        self.cache = None
        if not self.trainable:
            kwargs: dict[str, Any] = {}
            if config.embedder in ("esm2", "tape", "encoder"):
                path = embedder.path or config.embedder_path
                if not path:
                    raise ConfigError(
                        f"the {config.embedder} embedder needs local weights: set embedder.path (nothing is downloaded)"
                    )
                kwargs["path"] = path
            self.embedder = build_embedder(config.embedder, **kwargs).to(self.device)
            if self.embedder.dim != config.text_dim:
                raise ConfigError(
                    f"the {config.embedder} embedder gives {self.embedder.dim}-dimensional vectors but "
                    f"model.text_dim is {config.text_dim}: set model.text_dim={self.embedder.dim}"
                )
            self.cache = EmbeddingCache(embedder.cache_dir) if embedder.cache_dir else None
        self.memory: OrderedDict[tuple[str, bool], Tensor] = OrderedDict()
        self.memory_items = embedder.memory_items

    def _embed(self, seqs: Sequence[str], ends: Sequence[bool]) -> list[Tensor]:
        assert self.embedder is not None
        out: list[Tensor | None] = [None] * len(seqs)
        todo: list[int] = []
        for i, key in enumerate(zip(seqs, ends, strict=True)):
            hit = self.memory.get(key)
            if hit is not None:
                self.memory.move_to_end(key)
                out[i] = hit
            else:
                todo.append(i)
        if todo:
            fresh = self.embedder.embed_sequences(
                [seqs[i] for i in todo],
                max_len=self.config.max_residues,
                add_end=[ends[i] for i in todo],
                cache=self.cache,
            )
            for i, vec in zip(todo, fresh, strict=True):
                out[i] = vec
                if self.memory_items:
                    self.memory[(seqs[i], ends[i])] = vec
            while len(self.memory) > self.memory_items:
                self.memory.popitem(last=False)
        return [t for t in out if t is not None]

    def __call__(self, seqs: Sequence[str], add_end: Sequence[bool] | Tensor) -> dict[str, Tensor]:
        """``text_ids``, ``text_mask`` (and ``text_emb`` for a frozen embedder) of a batch, on ``device``."""
        ends = [bool(e) for e in (add_end.tolist() if isinstance(add_end, Tensor) else add_end)]
        tok = _TOKENIZER
        if self.blank:
            b = len(seqs)
            ids = torch.full((b, 1), tok.cls_id, dtype=torch.int64)
            mask = torch.ones(b, 1, dtype=torch.bool)
            out = {"text_ids": ids.to(self.device), "text_mask": mask.to(self.device)}
            if self.embedder is not None:
                out["text_emb"] = self.embedder(out["text_ids"], out["text_mask"]).float()
            return out
        ids_np, mask_np = tok.encode_batch(list(seqs), max_len=self.config.max_residues, add_end=ends)
        out = {
            "text_ids": torch.from_numpy(ids_np).to(self.device),
            "text_mask": torch.from_numpy(mask_np).to(self.device),
        }
        if self.embedder is not None:
            emb, _ = pad_embeddings(self._embed(list(seqs), ends), length=ids_np.shape[1])
            out["text_emb"] = emb.to(self.device)
        return out

"""Protein sequences: alphabet, validation, tokenization, cropping and FASTA input/output.

CELL-E reads the amino-acid sequence of the tagged protein through the TAPE language model, whose
IUPAC vocabulary has 30 tokens: 25 amino-acid letters and 5 special tokens (CELL-E paper, S.3.6).
Sequences are limited to 1000 residues; longer ones are cropped to a 1000-residue window, and the end
token is only appended when the window reaches the true C-terminus (S.3.6). This module holds those
pieces, independent of torch.

Accepted residues are the 20 standard amino acids plus the IUPAC extras ``B`` (Asx), ``Z`` (Glx),
``X`` (any), ``U`` (selenocysteine) and ``O`` (pyrrolysine) -- exactly the letters in the TAPE
vocabulary, so every valid sequence can be tokenized without ``<unk>``.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protloc._fs import atomic_path
from protloc.data.io import read_table
from protloc.errors import ConfigError, InputError

__all__ = [
    "STANDARD",
    "EXTENDED",
    "ALPHABET",
    "CROP_MODES",
    "validate_sequence",
    "Tokenizer",
    "crop_sequence",
    "crop_is_full_end",
    "clip_residues",
    "FastaRecord",
    "iter_fasta",
    "read_fasta",
    "write_fasta",
    "uniprot_accession",
    "read_sequences",
    "default_sequences",
]

logger = logging.getLogger(__name__)

#: The 20 standard amino acids.
STANDARD = "ACDEFGHIKLMNPQRSTVWY"
#: IUPAC extras: Asx, Glx, any, selenocysteine, pyrrolysine.
EXTENDED = "BZXUO"
#: Every residue letter accepted by :func:`validate_sequence` (25 letters, as in the TAPE vocabulary).
ALPHABET = STANDARD + EXTENDED

#: Window choices of :func:`crop_sequence`.
CROP_MODES = ("start", "center", "end", "random")

_ALLOWED = frozenset(ALPHABET)
_ALLOWED_TEXT = "20 standard amino acids plus B, Z, X, U, O"
_WHITESPACE = re.compile(r"\s+")


def _label(name: str | None) -> str:
    return "sequence" if name is None else f"sequence {name!r}"


def validate_sequence(seq: str, *, name: str | None = None, path: str | os.PathLike | None = None) -> str:
    """Check and normalise an amino-acid sequence.

    All whitespace is removed (so a sequence pasted over several lines is accepted), letters are
    upper-cased and a single trailing ``*`` (a translated stop codon) is dropped.

    Parameters
    ----------
    seq
        The sequence as read.
    name
        Record name used in error messages (protein ID, FASTA record).
    path
        File the sequence came from, used in error messages.

    Returns
    -------
    str
        The cleaned sequence: upper case, letters of :data:`ALPHABET` only.

    Raises
    ------
    InputError
        If the sequence is empty or holds a character outside :data:`ALPHABET`. The message names
        the first offending residue, its 1-based position (in the cleaned sequence) and the record.
    """
    if not isinstance(seq, str):
        raise InputError(f"{_label(name)}: expected a string, got {type(seq).__name__}", path=path)
    clean, bad = _clean(seq)
    if not clean:
        raise InputError(f"{_label(name)} is empty", path=path)
    if bad:
        raise InputError(_invalid_message(clean, bad, name), path=path)
    return clean


def _clean(seq: str) -> tuple[str, list[int]]:
    """Normalised sequence and the 0-based positions of residues outside the alphabet."""
    clean = _WHITESPACE.sub("", seq).upper()
    if clean.endswith("*"):
        clean = clean[:-1]
    if _ALLOWED.issuperset(clean):
        return clean, []
    return clean, [i for i, c in enumerate(clean) if c not in _ALLOWED]


def _invalid_message(clean: str, bad: list[int], name: str | None) -> str:
    pos = bad[0]
    more = f"; {len(bad) - 1} more invalid residue(s) follow" if len(bad) > 1 else ""
    return f"{_label(name)}: invalid residue {clean[pos]!r} at position {pos + 1} (allowed: {_ALLOWED_TEXT}){more}"


class Tokenizer:
    """The TAPE IUPAC tokenizer used by CELL-E (30 tokens: 5 special + 25 amino acids, paper S.3.6).

    Token ids follow TAPE's ``IUPAC_VOCAB`` so that ids index the pretrained TAPE embedding table:
    ``<pad>=0, <mask>=1, <cls>=2, <sep>=3, <unk>=4``, then the 25 letters of :data:`ALPHABET` in
    alphabetical order, ``A=5, B=6, C=7, ..., Y=28, Z=29``.

    ``<cls>`` is the start token prepended to every sequence and ``<sep>`` the end token.
    """

    SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<sep>", "<unk>")

    def __init__(self) -> None:
        tokens = list(self.SPECIAL_TOKENS) + sorted(ALPHABET)
        #: token string -> id
        self.vocab: dict[str, int] = {tok: i for i, tok in enumerate(tokens)}
        self._id_to_token = tokens
        self.pad_id = self.vocab["<pad>"]
        self.mask_id = self.vocab["<mask>"]
        self.cls_id = self.vocab["<cls>"]
        self.sep_id = self.vocab["<sep>"]
        self.unk_id = self.vocab["<unk>"]
        self.vocab_size = len(tokens)
        # Byte -> id lookup for fast encoding; -1 marks bytes outside the alphabet.
        self._lut = np.full(256, -1, dtype=np.int64)
        for letter in ALPHABET:
            self._lut[ord(letter)] = self.vocab[letter]
            self._lut[ord(letter.lower())] = self.vocab[letter]
        self._n_special = len(self.SPECIAL_TOKENS)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"

    def __len__(self) -> int:
        return self.vocab_size

    def _residue_ids(self, seq: str) -> np.ndarray:
        raw = seq.encode("ascii", errors="replace")
        ids = self._lut[np.frombuffer(raw, dtype=np.uint8)]
        if ids.size == 0 or (ids < 0).any():
            # Slow path: normalise (whitespace, trailing stop) or raise a precise error.
            clean = validate_sequence(seq)
            ids = self._lut[np.frombuffer(clean.encode("ascii"), dtype=np.uint8)]
        return ids

    def encode(self, seq: str, *, add_special: bool = True, add_end: bool = True) -> np.ndarray:
        """Token ids of one sequence.

        Parameters
        ----------
        seq
            Amino-acid sequence (anything :func:`validate_sequence` accepts).
        add_special
            Prepend ``<cls>`` and append ``<sep>``.
        add_end
            With ``add_special``, whether to append ``<sep>``. Pass ``False`` for a crop that stops
            before the true C-terminus (paper S.3.6; see :func:`crop_is_full_end`).

        Returns
        -------
        numpy.ndarray
            ``int64`` ids, length ``len(seq)`` (+1 for ``<cls>``, +1 for ``<sep>``).
        """
        ids = self._residue_ids(seq)
        if not add_special:
            return ids
        parts = [np.array([self.cls_id], dtype=np.int64), ids]
        if add_end:
            parts.append(np.array([self.sep_id], dtype=np.int64))
        return np.concatenate(parts)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Residue string of a token-id sequence; special tokens (pad, mask, cls, sep, unk) are dropped."""
        arr = np.asarray(ids, dtype=np.int64).ravel()
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            raise InputError(f"token id {int(bad)} is outside the vocabulary (0..{self.vocab_size - 1})")
        return "".join(self._id_to_token[i] for i in arr.tolist() if i >= self._n_special)

    def encode_batch(
        self,
        seqs: Sequence[str],
        *,
        max_len: int,
        add_special: bool = True,
        add_end: bool | Sequence[bool] = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode and right-pad a batch of sequences.

        Parameters
        ----------
        seqs
            Amino-acid sequences.
        max_len
            The most residues a sequence may have (special tokens not counted). A longer sequence is
            an error: crop it first with :func:`crop_sequence`, which makes the choice of window
            explicit.
        add_special
            Add ``<cls>`` / ``<sep>`` around every sequence.
        add_end
            Per sequence (or for all), whether ``<sep>`` is appended; see :meth:`encode`.

        Returns
        -------
        ids : numpy.ndarray
            ``int64 [B, L]``, padded with ``pad_id`` to the longest encoded sequence of the batch.
        mask : numpy.ndarray
            ``bool [B, L]``, True on real tokens (including ``<cls>`` / ``<sep>``), False on padding.

        Raises
        ------
        InputError
            If a sequence is longer than ``max_len`` residues or holds an invalid residue.
        """
        if max_len < 1:
            raise ConfigError(f"max_len must be >= 1, got {max_len}")
        seqs = list(seqs)
        ends = [add_end] * len(seqs) if isinstance(add_end, bool) else [bool(e) for e in add_end]
        if len(ends) != len(seqs):
            raise ConfigError(f"add_end has {len(ends)} entries for {len(seqs)} sequences")
        encoded = []
        for k, (seq, end) in enumerate(zip(seqs, ends, strict=True)):
            ids = self.encode(seq, add_special=add_special, add_end=end)
            n_res = ids.size - (1 + int(end) if add_special else 0)
            if n_res > max_len:
                raise InputError(
                    f"sequence {k} has {n_res} residues, more than max_len={max_len}; "
                    "crop it first (protloc.data.sequences.crop_sequence)",
                    row=k,
                )
            encoded.append(ids)
        width = max((e.size for e in encoded), default=0)
        out = np.full((len(encoded), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encoded), width), dtype=bool)
        for k, ids in enumerate(encoded):
            out[k, : ids.size] = ids
            mask[k, : ids.size] = True
        return out, mask


def crop_sequence(
    seq: str,
    max_len: int,
    *,
    mode: str = "start",
    rng: np.random.Generator | None = None,
) -> tuple[str, int]:
    """Cut a sequence to at most ``max_len`` residues.

    CELL-E limits sequences to 1000 residues and crops longer ones to a random 1000-residue window
    (paper S.3.6). The reference implementation draws a random window at validation time too, which
    makes evaluation non-deterministic; here the random window is for training only and evaluation
    uses a fixed window (``mode="start"`` by default).

    Parameters
    ----------
    seq
        The (validated) sequence.
    max_len
        Window length in residues.
    mode
        ``"random"`` (training: uniform start, needs ``rng``), ``"start"`` (N-terminal window; the
        deterministic evaluation default, since many targeting signals -- signal peptides, mitochondrial
        and chloroplast transit peptides -- sit at the N-terminus), ``"center"`` or ``"end"``
        (C-terminal window).
    rng
        Random generator for ``mode="random"``.

    Returns
    -------
    window : str
        The cropped sequence (the whole sequence if it is not longer than ``max_len``).
    start : int
        0-based index of the window's first residue in ``seq``.
    """
    if max_len < 1:
        raise ConfigError(f"max_len must be >= 1, got {max_len}")
    if mode not in CROP_MODES:
        raise ConfigError(f"unknown crop mode {mode!r}; choose one of {', '.join(CROP_MODES)}")
    n = len(seq)
    if n <= max_len:
        return seq, 0
    slack = n - max_len
    if mode == "random":
        if rng is None:
            raise ConfigError("crop mode 'random' needs a numpy random Generator (rng=...)")
        start = int(rng.integers(0, slack + 1))
    elif mode == "start":
        start = 0
    elif mode == "center":
        start = slack // 2
    else:  # "end"
        start = slack
    return seq[start : start + max_len], start


def crop_is_full_end(seq: str, start: int, max_len: int) -> bool:
    """Whether the window ``seq[start:start + max_len]`` reaches the true C-terminus.

    CELL-E appends the end token only then: "If the right end of the crop ended before the true end of
    the amino acid sequence, no end token was applied" (paper S.3.6).
    """
    return start + max_len >= len(seq)


def clip_residues(seq: str, max_residues: int = 1000) -> str:
    """Shorten a long sequence to its two ends, as DeepLoc does: the first and last ``max_residues // 2``.

    Sorting signals sit at both termini (signal peptides and transit peptides at the N-terminus, ER
    retention, peroxisomal and GPI signals at the C-terminus), so a sequence longer than
    ``max_residues`` keeps its first ``ceil(max_residues / 2)`` and last ``floor(max_residues / 2)``
    residues, joined (DeepLoc 1.0/2.0 use 500 + 500 of 1000). Shorter sequences are returned unchanged.

    Parameters
    ----------
    seq
        The (validated) sequence.
    max_residues
        The most residues kept.

    Returns
    -------
    str
        ``seq`` itself, or ``seq[:head] + seq[-tail:]`` with ``head + tail == max_residues``.
    """
    if max_residues < 1:
        raise ConfigError(f"max_residues must be >= 1, got {max_residues}")
    if len(seq) <= max_residues:
        return seq
    tail = max_residues // 2
    head = max_residues - tail
    return seq[:head] + (seq[-tail:] if tail else "")


# --------------------------------------------------------------------------------------------------
# FASTA


@dataclass(frozen=True)
class FastaRecord:
    """One FASTA record.

    Attributes
    ----------
    id
        First whitespace-delimited token of the header (UniProt ``sp|P12345|NAME_HUMAN`` kept whole;
        see :func:`uniprot_accession`).
    description
        The rest of the header line after the id ("" if none).
    sequence
        The residues, concatenated over lines (validated and upper-cased when read with
        ``validate=True``).
    """

    id: str
    description: str
    sequence: str


def _open_text(path: Path) -> io.TextIOBase:
    """Open a text file, transparently gunzipping (by magic number, not only by the ``.gz`` suffix)."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _iter_raw(path: Path) -> Iterator[tuple[int, str, str, list[tuple[int, str]]]]:
    """Yield ``(header_line, id, description, [(line_no, residues), ...])`` per record (1-based lines)."""
    header: tuple[int, str, str] | None = None
    chunks: list[tuple[int, str]] = []
    seen_any = False
    try:
        fh = _open_text(path)
    except OSError as exc:
        raise InputError(f"cannot read FASTA file: {exc.strerror or exc}", path=path) from exc
    with fh:
        try:
            for line_no, line in enumerate(fh, start=1):
                text = line.strip()
                if not text:
                    continue
                if text.startswith(">"):
                    if header is not None:
                        yield (*header, chunks)
                    head = text[1:].strip()
                    if not head:
                        raise InputError("FASTA header without a record id", path=path, row=f"line {line_no}")
                    parts = head.split(None, 1)
                    header = (line_no, parts[0], parts[1].strip() if len(parts) > 1 else "")
                    chunks = []
                    seen_any = True
                elif header is None:
                    shown = text if len(text) <= 40 else text[:37] + "..."
                    raise InputError(
                        f"text before the first FASTA header ('>'): {shown!r}; is this a FASTA file?",
                        path=path,
                        row=f"line {line_no}",
                    )
                else:
                    chunks.append((line_no, _WHITESPACE.sub("", text)))
        except (OSError, EOFError) as exc:  # e.g. a truncated or corrupt gzip stream
            raise InputError(f"cannot read FASTA file: {exc}", path=path) from exc
    if header is not None:
        yield (*header, chunks)
    if not seen_any:
        raise InputError("no FASTA records (empty file or no '>' header)", path=path)


def _locate(chunks: list[tuple[int, str]], pos: int) -> int:
    """Line number holding 0-based residue ``pos`` of the joined sequence."""
    for line_no, text in chunks:
        if pos < len(text):
            return line_no
        pos -= len(text)
    return chunks[-1][0] if chunks else 0


def _iter_records(path: Path, *, validate: bool) -> Iterator[tuple[int, FastaRecord]]:
    """Yield ``(header_line, record)``; shared by :func:`iter_fasta` and :func:`read_fasta`."""
    for header_line, rid, desc, chunks in _iter_raw(path):
        seq = "".join(text for _, text in chunks)
        if not seq:
            raise InputError(f"record {rid!r} has no sequence", path=path, row=f"line {header_line}")
        if validate:
            clean, bad = _clean(seq)
            if not clean:  # a record holding only "*"
                raise InputError(f"record {rid!r} has no sequence", path=path, row=f"line {header_line}")
            if bad:
                # Line/position are exact: lines hold no whitespace and only a final "*" was dropped.
                raise InputError(_invalid_message(clean, bad, rid), path=path, row=f"line {_locate(chunks, bad[0])}")
            seq = clean
        yield header_line, FastaRecord(id=rid, description=desc, sequence=seq)


def iter_fasta(path: str | os.PathLike, *, validate: bool = True) -> Iterator[FastaRecord]:
    """Iterate over the records of a FASTA file (plain or gzip-compressed).

    Sequences may span several lines; blank lines are ignored. Duplicate ids are not checked here
    (see :func:`read_fasta`).

    Parameters
    ----------
    path
        FASTA file, optionally gzip-compressed.
    validate
        Check and normalise every sequence as :func:`validate_sequence` does.

    Yields
    ------
    FastaRecord

    Raises
    ------
    InputError
        For an empty file, text before the first header, a header without a sequence, or (with
        ``validate``) an invalid residue; the message names the file, line, record and position.
    """
    for _, rec in _iter_records(Path(path), validate=validate):
        yield rec


def read_fasta(path: str | os.PathLike, *, validate: bool = True) -> dict[str, str]:
    """Read a FASTA file into ``{id: sequence}``, in file order.

    Parameters
    ----------
    path
        FASTA file, optionally gzip-compressed.
    validate
        Check and normalise every sequence as :func:`validate_sequence` does.

    Raises
    ------
    InputError
        As :func:`iter_fasta`, and for a record id that occurs twice (naming the id and both lines).
    """
    p = Path(path)
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for header_line, rec in _iter_records(p, validate=validate):
        if rec.id in out:
            raise InputError(
                f"duplicate record id {rec.id!r} (first seen at line {first_line[rec.id]})",
                path=p,
                row=f"line {header_line}",
            )
        out[rec.id] = rec.sequence
        first_line[rec.id] = header_line
    logger.debug("read %d sequences from %s", len(out), p)
    return out


def write_fasta(
    path: str | os.PathLike,
    records: Mapping[str, str] | Iterable[FastaRecord],
    *,
    width: int = 60,
) -> Path:
    """Write sequences to a FASTA file atomically (gzip-compressed if the name ends in ``.gz``).

    Parameters
    ----------
    path
        Output file.
    records
        ``{id: sequence}`` or :class:`FastaRecord` objects (their description is written after the id).
    width
        Residues per line; ``0`` writes each sequence on one line.

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    InputError
        For an empty or whitespace-containing id, a duplicate id, or an invalid sequence.
    """
    if width < 0:
        raise ConfigError(f"width must be >= 0, got {width}")
    p = Path(path)
    if isinstance(records, Mapping):
        items = [FastaRecord(str(k), "", v) for k, v in records.items()]
    else:
        items = list(records)
    seen: set[str] = set()
    lines: list[str] = []
    for rec in items:
        rid = rec.id
        if not rid or _WHITESPACE.search(rid) or rid.startswith(">"):
            raise InputError(f"invalid FASTA record id {rid!r} (must be non-empty, without whitespace)", path=p)
        if rid in seen:
            raise InputError(f"duplicate record id {rid!r}", path=p)
        seen.add(rid)
        seq = validate_sequence(rec.sequence, name=rid, path=p)
        desc = " ".join(rec.description.split())
        lines.append(f">{rid} {desc}" if desc else f">{rid}")
        if width:
            lines.extend(seq[i : i + width] for i in range(0, len(seq), width))
        else:
            lines.append(seq)
    text = "\n".join(lines) + "\n" if lines else ""
    with atomic_path(p) as tmp:
        if p.name.endswith(".gz"):
            # No stored name (it would be the temporary file's) and mtime=0: byte-identical outputs.
            with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
                gz.write(text.encode("utf-8"))
        else:
            tmp.write_text(text, encoding="utf-8")
    logger.debug("wrote %d sequences to %s", len(items), p)
    return p


# UniProt accession format (https://www.uniprot.org/help/accession_numbers), optional isoform suffix.
_UNIPROT_ACC = re.compile(r"^(?:[OPQ][0-9][A-Z0-9]{3}[0-9]|[A-NR-Z][0-9](?:[A-Z][A-Z0-9]{2}[0-9]){1,2})(?:-\d+)?$")


def uniprot_accession(record_id: str) -> str | None:
    """The UniProt accession in a FASTA record id, or None.

    Handles UniProt headers ``sp|P12345|NAME_HUMAN`` / ``tr|A0A024R161|...`` (the middle field) and
    bare accessions (``P12345``, isoforms ``P12345-2`` kept with their suffix).
    """
    token = record_id.strip()
    parts = token.split("|")
    if len(parts) >= 2 and parts[0] in ("sp", "tr"):
        candidate = parts[1]
    else:
        candidate = token
    return candidate if _UNIPROT_ACC.match(candidate) else None


def read_sequences(path: str | os.PathLike) -> dict[str, str]:
    """``protein_id`` -> sequence from a FASTA file or a table with ``protein_id`` and ``sequence`` columns."""
    p = Path(path)
    if not p.is_file():
        raise InputError("sequence file not found", path=p)
    name = p.name.lower().removesuffix(".gz")
    if name.endswith((".fasta", ".fa", ".faa", ".fas")):
        return read_fasta(p)
    table = read_table(p, required=("protein_id", "sequence"), unique=("protein_id",), dtype={"protein_id": str})
    return {
        str(pid): validate_sequence(str(s), name=str(pid), path=p)
        for pid, s in zip(table["protein_id"], table["sequence"], strict=True)
    }


def default_sequences(store: Path) -> Path:
    """The sequence file beside a crop store: ``sequences.fasta``, else ``proteins.csv`` (from `protloc prepare`)."""
    for name in ("sequences.fasta", "proteins.csv"):
        candidate = store.parent / name
        if candidate.is_file():
            return candidate
    raise InputError(
        "data.sequences is not set and neither sequences.fasta nor proteins.csv lies beside the store", path=store
    )

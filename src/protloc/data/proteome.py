"""The Swiss-Prot localization corpus and the shipped human proteome table.

``scripts/build_protein_corpus.py`` turns Debian's ``metastudent-data`` (UniProtKB/Swiss-Prot as of
2014-01 with GO cellular-component annotations, 392,822 proteins of all species) into two tables:

- **the corpus** (``corpus.tsv.gz``, built into a cache, not shipped): every protein whose GO terms
  reach one of the reference world's 12 compartments, human or not, with its partition: human proteins
  carry their homology partition (``train`` / ``val`` / ``test``); non-human proteins are ``train``,
  except those that match a human val or test protein at >= 30% identity, which are left out;
- **the human table** (``human_proteome.tsv.gz``, shipped with the package): the human proteins with
  gene symbol, Entrez id, GO terms, the 12 compartment weights and the partition. It is **the** split for
  every encoder and CELL-E evaluation.

Both share the columns of :data:`CORPUS_COLUMNS`; the human table adds :data:`HUMAN_COLUMNS`. A
compartment's weight is its share of the protein's GO votes (the world assets' rule, summing to 1);
a protein is *in* a compartment when its weight is positive. Targets for the sequence encoder come from
:func:`compartment_targets`: one presence bit per compartment plus ``nucleus`` (any of
:data:`~protloc.data.world.compartments.NUCLEAR`), and the weight distribution.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd

from protloc.data.sequences import validate_sequence
from protloc.data.world.compartments import COMPARTMENTS, NUCLEAR, WEIGHT_COLUMNS
from protloc.errors import InputError

__all__ = [
    "PARTITIONS",
    "PRESENCE_NAMES",
    "CORPUS_COLUMNS",
    "HUMAN_COLUMNS",
    "human_table_path",
    "read_corpus",
    "read_human_table",
    "compartment_targets",
    "table_sha256",
]

#: The homology partition's splits.
PARTITIONS: tuple[str, ...] = ("train", "val", "test")

#: Names of the encoder's presence outputs: the 12 compartments, then ``nucleus`` (any nuclear one).
PRESENCE_NAMES: tuple[str, ...] = (*COMPARTMENTS, "nucleus")

#: Columns every corpus row has.
CORPUS_COLUMNS: tuple[str, ...] = (
    "accession",
    "human",
    "partition",
    "length",
    "label",
    "go_cc",
    *WEIGHT_COLUMNS,
    "sequence",
)

#: Extra columns of the human table.
HUMAN_COLUMNS: tuple[str, ...] = ("gene_symbol", "entrez_id", "cluster", "label_source")


def human_table_path() -> Path:
    """The shipped human proteome table (``protloc/data/proteome_assets/human_proteome.tsv.gz``)."""
    return Path(__file__).resolve().parent / "proteome_assets" / "human_proteome.tsv.gz"


def _read(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"no such table: {path}")
    try:
        df = pd.read_csv(path, sep="\t", dtype={"entrez_id": str, "accession": str}, keep_default_na=False)
    except (OSError, ValueError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(f"{path}: not a readable tab-separated table ({exc})") from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing columns {', '.join(missing)}")
    bad = sorted(set(df["partition"]) - set(PARTITIONS))
    if bad:
        raise InputError(f"{path}: unknown partition(s) {', '.join(map(str, bad))}; expected {', '.join(PARTITIONS)}")
    w = df[list(WEIGHT_COLUMNS)].to_numpy(dtype=float)
    rows = np.flatnonzero(~np.isfinite(w).all(1) | (w < 0).any(1) | (np.abs(w.sum(1) - 1) > 1e-3))
    if rows.size:
        r = int(rows[0])
        raise InputError(
            f"{path}: row {r + 2} ({df['accession'].iloc[r]}): compartment weights must be >= 0 and sum to 1"
        )
    df["human"] = df["human"].astype(bool)
    return df


def read_corpus(path: str | os.PathLike, *, validate: bool = False) -> pd.DataFrame:
    """Read a corpus table written by ``scripts/build_protein_corpus.py``.

    Parameters
    ----------
    path
        ``corpus.tsv.gz`` (or the human table, which has the same columns and more).
    validate
        Also check every sequence's residues (slow on the full corpus; the build already did).

    Raises
    ------
    InputError
        Naming the file (and row) for a missing column, an unknown partition, weights that are not a
        distribution or an invalid residue.
    """
    path = Path(path)
    df = _read(path, CORPUS_COLUMNS)
    if validate:
        for i, (acc, seq) in enumerate(zip(df["accession"], df["sequence"], strict=True)):
            validate_sequence(seq, name=f"row {i + 2} ({acc})", path=path)
    return df


def read_human_table(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read the human proteome table (the shipped one by default).

    Returns
    -------
    pandas.DataFrame
        One row per human protein: :data:`CORPUS_COLUMNS` + :data:`HUMAN_COLUMNS`.
    """
    p = human_table_path() if path is None else Path(path)
    if path is None and not p.is_file():
        raise InputError(
            "the human proteome table is missing from this installation; rebuild it with "
            "scripts/build_protein_corpus.py",
            path=p,
        )
    return _read(p, CORPUS_COLUMNS + HUMAN_COLUMNS)


def compartment_targets(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The encoder's targets of a corpus table.

    Returns
    -------
    presence : numpy.ndarray
        ``float32 [N, 13]``: 1 where the compartment's weight is positive, in :data:`PRESENCE_NAMES`
        order; the last column is 1 when any nuclear compartment is.
    distribution : numpy.ndarray
        ``float32 [N, 12]``: the compartment weights (each row sums to 1).
    """
    w = df[list(WEIGHT_COLUMNS)].to_numpy(dtype=np.float32)
    present = (w > 0).astype(np.float32)
    nuclear = [i for i, c in enumerate(COMPARTMENTS) if c in NUCLEAR]
    nucleus = present[:, nuclear].max(1, keepdims=True)
    return np.concatenate([present, nucleus], axis=1), w / w.sum(1, keepdims=True)


def table_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a table file (the partition's identity, recorded in encoder recipes)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

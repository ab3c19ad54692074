"""Loaders of the real ingredients of the reference cell world.

The assets live in ``protloc/data/world/assets/`` and are rebuilt from registry packages by
``scripts/build_world_assets.py``; ``PROVENANCE.md`` next to them names every source and licence.

- ``proteins.tsv``: real human proteins (UniProt sequences) with compartment weights derived from
  their GO cellular-component annotations (:func:`load_proteins`).
- ``nuclei.npz``: real DNA-stain nucleus patches with their masks (:func:`load_nuclei`).
- ``engineered.fasta``: the GFP / NLS / TOP1-deletion constructs of CELL-E's in-silico
  experiments (:func:`load_engineered`, :func:`load_engineered_records`).
"""

from __future__ import annotations

import io
from importlib import resources
from importlib.resources.abc import Traversable

import numpy as np
import pandas as pd

from protloc.data.sequences import ALPHABET
from protloc.data.world.compartments import COMPARTMENTS, WEIGHT_COLUMNS
from protloc.errors import InputError

__all__ = [
    "PROTEIN_COLUMNS",
    "asset_text",
    "load_proteins",
    "load_nuclei",
    "load_nuclei_sources",
    "load_engineered",
    "load_engineered_records",
]

#: Columns of ``proteins.tsv``, in file order.
PROTEIN_COLUMNS: tuple[str, ...] = (
    "protein_id",
    "uniprot_id",
    "entrez_id",
    "length",
    "label",
    "go_cc",
    *WEIGHT_COLUMNS,
    "sequence",
)
_ID_COLUMNS = ("protein_id", "uniprot_id", "entrez_id", "label", "go_cc", "sequence")
_ALLOWED = frozenset(ALPHABET)
_WEIGHT_TOL = 1e-3


def _asset(name: str) -> Traversable:
    return resources.files("protloc.data.world").joinpath("assets", name)


def asset_text(name: str) -> str:
    """Return the text of the asset file ``name`` (e.g. ``"PROVENANCE.md"``)."""
    return _asset(name).read_text(encoding="utf-8")


def load_proteins() -> pd.DataFrame:
    """Load and validate the real-protein table.

    Returns
    -------
    pandas.DataFrame
        One row per protein with the columns of :data:`PROTEIN_COLUMNS`: identifiers, ``label``
        and ``go_cc`` and ``sequence`` as ``string`` dtype, ``length`` as int64 and one float
        weight column per compartment (``w_<compartment>``, in COMPARTMENTS order).

    Raises
    ------
    InputError
        If the file's columns, weights, labels or sequences are not as documented.
    """
    name = "proteins.tsv"
    with _asset(name).open("rb") as fh:
        df = pd.read_csv(fh, sep="\t", dtype=str, keep_default_na=False)
    if tuple(df.columns) != PROTEIN_COLUMNS:
        raise InputError(f"columns {list(df.columns)} differ from {list(PROTEIN_COLUMNS)}", path=name)
    for col in _ID_COLUMNS:
        df[col] = df[col].astype("string")
    df["length"] = df["length"].astype("int64")
    for col in WEIGHT_COLUMNS:
        df[col] = df[col].astype("float64")
    if df["protein_id"].duplicated().any():
        raise InputError("duplicate protein_id", path=name)
    weights = df[list(WEIGHT_COLUMNS)].to_numpy()
    if (weights < 0).any() or not np.allclose(weights.sum(axis=1), 1.0, atol=_WEIGHT_TOL):
        raise InputError("compartment weights must be >= 0 and sum to 1", path=name)
    argmax = np.asarray(COMPARTMENTS)[weights.argmax(axis=1)]
    for i, (label, best, seq, length) in enumerate(zip(df["label"], argmax, df["sequence"], df["length"], strict=True)):
        if label != best:
            raise InputError(f"label {label!r} is not the argmax compartment {best!r}", path=name, row=i)
        if not seq or not set(seq) <= _ALLOWED or len(seq) != length:
            raise InputError("invalid sequence or length", path=name, row=i)
    return df


def _load_npz() -> dict[str, np.ndarray]:
    data = _asset("nuclei.npz").read_bytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def load_nuclei() -> list[tuple[np.ndarray, np.ndarray]]:
    """Load the real nucleus patches.

    Returns
    -------
    list of (numpy.ndarray, numpy.ndarray)
        ``(image, mask)`` pairs in file order: ``image`` is a 2-D uint16 patch (real DNA-stain
        intensities, linearly rescaled per source image to at most about 40000) and ``mask`` a
        boolean array of the same shape marking the nucleus, which never touches the patch border.
        The pixel size is unknown: scale patches to the wanted nucleus diameter.

    Raises
    ------
    InputError
        If an image has no mask of the same shape or a mask is empty.
    """
    arrays = _load_npz()
    keys = sorted(k for k in arrays if k.startswith("image_"))
    out = []
    for key in keys:
        idx = key.removeprefix("image_")
        image, mask = arrays[key], arrays.get(f"mask_{idx}")
        if mask is None or mask.shape != image.shape or image.ndim != 2 or not mask.any():
            raise InputError(f"nucleus {idx}: missing, empty or misshapen mask", path="nuclei.npz")
        out.append((image.astype(np.uint16, copy=False), mask.astype(bool, copy=False)))
    return out


def load_nuclei_sources() -> list[str]:
    """Return the origin of each nucleus patch (package, file and label), in :func:`load_nuclei` order."""
    return [str(s) for s in _load_npz()["source"]]


def load_engineered_records() -> list[dict[str, str]]:
    """Load the engineered constructs with their header fields.

    Returns
    -------
    list of dict
        One dict per FASTA record, in file order, with ``id``, ``sequence`` and every
        ``key=value`` pair of the header (``construct``, ``source`` and, where present,
        ``peptide``, ``region``, ``ref``, ``seed``).

    Raises
    ------
    InputError
        If a record is malformed, duplicated or holds an invalid residue.
    """
    name = "engineered.fasta"
    records: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    chunks: list[str] = []

    def close() -> None:
        if current is not None:
            current["sequence"] = "".join(chunks)
            records.append(current)

    for line in asset_text(name).splitlines():
        if line.startswith(">"):
            close()
            rid, *fields = line[1:].split()
            current = {"id": rid}
            for field in fields:
                key, sep, value = field.partition("=")
                if not sep or key in ("id", "sequence"):
                    raise InputError(f"bad header field {field!r}", path=name, row=rid)
                current[key] = value
            chunks = []
        elif line.strip():
            if current is None:
                raise InputError("sequence before the first header", path=name)
            chunks.append(line.strip())
    close()
    seen: set[str] = set()
    for rec in records:
        if rec["id"] in seen:
            raise InputError("duplicate record id", path=name, row=rec["id"])
        seen.add(rec["id"])
        if not rec["sequence"] or not set(rec["sequence"]) <= _ALLOWED:
            raise InputError("empty sequence or invalid residue", path=name, row=rec["id"])
    return records


def load_engineered() -> dict[str, str]:
    """Return the engineered constructs as ``{id: sequence}`` in file order."""
    return {rec["id"]: rec["sequence"] for rec in load_engineered_records()}

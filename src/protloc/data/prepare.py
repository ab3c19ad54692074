"""``protloc prepare``: fields of view -> cytoself and CELL-E crop stores + manifests.

The pipeline follows the two papers' methods. Per field of view (FOV): z maximum-intensity projection,
2x XY binning (cytoself Methods: 1024 -> 512; skipped for FOVs whose table row says ``downsample=1``),
nucleus segmentation, signed nuclear distance, then cell-centred crops away from the image edges:
100 x 100 (protein, nucleus, nuclear distance) for cytoself and 256 x 256 (nucleus, protein,
``pixel >= mean`` threshold) for CELL-E. Splits are written to the manifests: cytoself by field of
view (8:1:1, cytoself Methods), CELL-E by protein (80/20, CELL-E S.3.1) or homology-aware (S.3.2).

Output folder layout::

    OUT/
      cytoself.zarr  cytoself.csv    crops [N, 100, 100] + one manifest row per crop
      celle.zarr     celle.csv       crops [M, 256, 256] + one manifest row per crop
      proteins.csv                   protein_id, label, split columns, crop counts, sequence
      sequences.fasta                the validated sequences used
      fovs.csv                       per-FOV statistics (nuclei, crops, split)
      config.yaml  summary.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from protloc._fs import atomic_dir, atomic_path, check_inputs, check_out, resumable_dir
from protloc.config import config_to_dict, save_config
from protloc.data.io import CropStore, read_table, write_table
from protloc.data.opencell import read_fov
from protloc.data.preprocess import FovCrops, PrepareParams, process_fov
from protloc.data.sequences import read_fasta, validate_sequence, write_fasta
from protloc.data.splits import (
    CELLE_FRACTIONS,
    CYTOSELF_FRACTIONS,
    CYTOSELF_REFERENCE_FRACTIONS,
    SPLIT_NAMES,
    homology_split,
    split_by_fov,
    split_items,
)
from protloc.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

__all__ = ["PrepareConfig", "SplitConfig", "parse_fractions", "prepare", "read_fov_table", "spread_order"]

CYTOSELF_CHANNELS = {"protein": "float32", "nucleus": "float32", "nucleus_distance": "float32"}
CELLE_CHANNELS = {"nucleus": "float32", "protein": "float32", "threshold": "uint8"}


SPLIT_BY = ("fov", "protein", "homology", "partition", "auto")


@dataclass(frozen=True)
class SplitConfig:
    """How one output's crops are split into train / val / test.

    Attributes
    ----------
    by
        ``"fov"`` (all crops of a field of view share a split; cytoself Methods), ``"protein"`` (no
        protein in two splits; CELL-E S.3.1), ``"homology"`` (sequence clusters never straddle
        splits; CELL-E S.3.2), ``"partition"`` (the fov table's ``partition`` column, e.g. the
        homology partition a ``proteome`` world carries) or ``"auto"`` (``partition`` when the table
        has that column, else ``protein``; CELL-E's default).
    fractions
        ``"paper"`` (cytoself 0.8/0.1/0.1, CELL-E 0.8/0.2), ``"reference"`` (the cytoself reference
        code's 0.82/0.098/0.082) or explicit ``"train=0.7,val=0.15,test=0.15"``.
    identity, coverage, backend
        Homology clustering: identity threshold, alignment coverage of the shorter sequence (paper:
        0.8) and backend (``auto``, ``cd-hit``, ``mmseqs``, ``python``).
    seed
        Seed of the deterministic shuffle.
    stratify
        With ``by="fov"``: split each protein's fields of view separately (the cytoself reference
        code), so each protein lands in every split. Off by default: the paper splits the whole data
        set 8:1:1, and with few fields per protein stratification distorts the fractions (4 fields
        can only split 2/1/1).
    """

    by: str = "fov"
    fractions: str = "paper"
    identity: float = 0.4
    coverage: float = 0.8
    backend: str = "auto"
    seed: int = 0
    stratify: bool = False

    def __post_init__(self) -> None:
        if self.by not in SPLIT_BY:
            raise ConfigError(f"split.by must be one of {', '.join(SPLIT_BY)}, got {self.by!r}")
        if not 0.0 < self.identity <= 1.0:
            raise ConfigError(f"split.identity must be in (0, 1], got {self.identity}")
        if not 0.0 < self.coverage <= 1.0:
            raise ConfigError(f"split.coverage must be in (0, 1], got {self.coverage}")


@dataclass(frozen=True)
class PrepareConfig:
    """Configuration of :func:`prepare` (YAML keys / ``--set`` overrides map onto it).

    Attributes
    ----------
    params
        Image preprocessing (segmentation, crop sizes, normalisation).
    cytoself, celle
        Which outputs to write.
    cytoself_split, celle_split
        How each output is split (defaults: by field of view 8:1:1; CELL-E by the table's
        ``partition`` column when it has one -- a ``proteome`` world's homology partition -- else by
        protein 80/20).
    cytoself_max_crops_per_fov, celle_max_crops_per_fov
        Caps on crops per field of view (0 = all). Kept crops are spread out (farthest-point order
        from the crop nearest the image centre). CELL-E's 256 px crops around neighbouring nuclei
        overlap almost entirely, so by default 4 per field are kept (the paper took one random
        256 px crop per 512 px image per epoch).
    store_dtype
        Floating-point type of stored crops: ``float16`` halves the disk use at a precision (~1e-3)
        far below the noise of fluorescence images; ``float32`` keeps full precision.
    chunk
        Crops per Zarr chunk.
    channel_order
        What the image files' channels 0 and 1 hold: ``"nucleus,protein"`` (OpenCell's order, default) or
        ``"protein,nucleus"``.
    axes
        Axes of every image file, e.g. ``"ZCYX"``, ``"CZYX"``, ``"CYX"``, ``"YXC"``; empty (default): from the
        file's ImageJ / tifffile metadata, else inferred from the shape. Set it when a file's metadata is
        wrong (ImageJ stacks often label channels as slices).
    """

    params: PrepareParams = field(default_factory=PrepareParams)
    cytoself: bool = True
    celle: bool = True
    cytoself_split: SplitConfig = field(default_factory=lambda: SplitConfig(by="fov"))
    celle_split: SplitConfig = field(default_factory=lambda: SplitConfig(by="auto"))
    cytoself_max_crops_per_fov: int = 0
    celle_max_crops_per_fov: int = 4
    store_dtype: str = "float16"
    chunk: int = 64
    channel_order: str = "nucleus,protein"
    axes: str = ""

    def __post_init__(self) -> None:
        if self.channel_order not in ("nucleus,protein", "protein,nucleus"):
            raise ConfigError(
                f"channel_order must be 'nucleus,protein' or 'protein,nucleus', got {self.channel_order!r}"
            )
        if self.axes and (
            len(set(self.axes)) != len(self.axes)
            or not set(self.axes) <= set("TZCYXS")
            or not {"Y", "X"} <= set(self.axes)
        ):
            raise ConfigError(
                f"axes must be letters of TZCYXS including Y and X, each once (e.g. ZCYX), got {self.axes!r}"
            )
        if self.store_dtype not in ("float16", "float32"):
            raise ConfigError(f"store_dtype must be float16 or float32, got {self.store_dtype!r}")
        if self.cytoself_max_crops_per_fov < 0 or self.celle_max_crops_per_fov < 0:
            raise ConfigError("max crops per field of view must be >= 0 (0 = all)")


def parse_fractions(spec: str, *, kind: str) -> dict[str, float]:
    """Turn a fractions spec (``paper``, ``reference`` or ``train=..,val=..``) into a dict.

    Parameters
    ----------
    spec
        The spec string.
    kind
        ``"cytoself"`` or ``"celle"``: which paper's default ``paper`` means.
    """
    s = spec.strip().lower()
    if s == "paper":
        return dict(CYTOSELF_FRACTIONS if kind == "cytoself" else CELLE_FRACTIONS)
    if s == "reference":
        if kind != "cytoself":
            raise ConfigError("fractions 'reference' exists only for cytoself (0.82/0.098/0.082)")
        return dict(CYTOSELF_REFERENCE_FRACTIONS)
    out: dict[str, float] = {}
    for part in s.split(","):
        if "=" not in part:
            raise ConfigError(f"fractions {spec!r}: expected paper, reference or name=value pairs")
        name, val = part.split("=", 1)
        name = name.strip()
        if name not in SPLIT_NAMES:
            raise ConfigError(f"fractions {spec!r}: unknown split {name!r} (use {', '.join(SPLIT_NAMES)})")
        try:
            out[name] = float(val)
        except ValueError as exc:
            raise ConfigError(f"fractions {spec!r}: {val!r} is not a number") from exc
    if abs(sum(out.values()) - 1.0) > 1e-6:
        raise ConfigError(f"fractions {spec!r} must sum to 1 (they sum to {sum(out.values()):.4f})")
    return out


def read_fov_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read and check a field-of-view table; ``path`` column resolved to absolute paths.

    Raises
    ------
    InputError
        Missing columns, duplicate ``fov_id``, missing image files, or a bad ``downsample`` value,
        naming the table and the row.
    """
    path = Path(path)
    df = read_table(path, required=("fov_id", "protein_id", "path"), unique=("fov_id",))
    df = df.copy()
    base = path.parent
    resolved = []
    for i, p in enumerate(df["path"].astype(str)):
        full = (base / p) if not Path(p).is_absolute() else Path(p)
        if not full.is_file():
            raise InputError(f"image file {p!r} of field {df['fov_id'].iloc[i]!r} not found", path=path, row=i)
        resolved.append(str(full.resolve()))
    df["path"] = resolved
    if "downsample" in df.columns:
        vals = []
        for i, v in enumerate(df["downsample"]):
            try:
                f = int(float(v))
            except (TypeError, ValueError):
                f = -1
            if f not in (1, 2):
                raise InputError(f"downsample must be 1 or 2, got {v!r}", path=path, row=i)
            vals.append(f)
        df["downsample"] = vals
    return df


def _blank(value: object) -> bool:
    """An empty table cell (pandas reads it as NaN): no sequence, not the residues ``NAN``."""
    return value is None or (isinstance(value, float) and np.isnan(value)) or not str(value).strip()


def _sequence_table(source: Path) -> dict[str, str]:
    """``protein_id`` -> sequence from a CSV/TSV with those columns (read_table names an empty cell's row)."""
    table = read_table(source, required=("protein_id", "sequence"), unique=("protein_id",), dtype=str)
    return {
        str(pid): validate_sequence(str(s), name=str(pid), path=source)
        for pid, s in zip(table["protein_id"], table["sequence"], strict=True)
    }


def _collect_sequences(
    fovs: pd.DataFrame, fov_table: Path, sequences: str | os.PathLike | None
) -> dict[str, str] | None:
    """Sequences per protein from a FASTA, a ``sequence`` column, or a ``proteins.csv`` beside the table."""
    proteins = list(dict.fromkeys(fovs["protein_id"].astype(str)))
    source: Path | None = None
    seqs: dict[str, str] | None = None
    if sequences is not None:
        source = Path(sequences)
        if source.suffix.lower() in (".csv", ".tsv", ".tab", ".txt"):
            seqs = _sequence_table(source)
        else:
            seqs = read_fasta(source)
    elif "sequence" in fovs.columns:
        source = fov_table
        seqs = {}
        for i, (pid, s) in enumerate(zip(fovs["protein_id"].astype(str), fovs["sequence"], strict=True)):
            if _blank(s):
                continue  # another row of the protein may carry it; a protein with none is named below
            s = validate_sequence(str(s), name=pid, path=fov_table)
            if pid in seqs and seqs[pid] != s:
                raise InputError(f"protein {pid!r} has two different sequences", path=fov_table, row=i)
            seqs[pid] = s
    elif (fov_table.parent / "proteins.csv").is_file():
        source = fov_table.parent / "proteins.csv"
        seqs = _sequence_table(source)
    if seqs is None:
        return None
    missing = [p for p in proteins if p not in seqs]
    if missing:
        first = missing[0]
        row = int(np.flatnonzero(fovs["protein_id"].astype(str).to_numpy() == first)[0])
        raise InputError(
            f"no sequence for protein {first!r} (row {row} of {fov_table}; {len(missing)} proteins missing)",
            path=source,
        )
    return {p: seqs[p] for p in proteins}


def _assign(
    split: SplitConfig, *, kind: str, fovs: pd.DataFrame, seqs: Mapping[str, str] | None
) -> tuple[dict[str, str], str]:
    """Return (key -> split, key column) for one output."""
    fractions = parse_fractions(split.fractions, kind=kind)
    if split.by == "fov":
        mapping = split_by_fov(
            list(fovs["fov_id"].astype(str)),
            protein_ids=list(fovs["protein_id"].astype(str)) if split.stratify else None,
            fractions=fractions,
            seed=split.seed,
        )
        return {str(k): v for k, v in mapping.items()}, "fov_id"
    proteins = list(dict.fromkeys(fovs["protein_id"].astype(str)))
    by = split.by
    if by == "auto":
        by = "partition" if "partition" in fovs.columns else "protein"
        logger.info("%s split: %s", kind, "the table's partition column" if by == "partition" else "by protein")
    if by == "partition":
        return _partition_split(fovs, kind=kind), "protein_id"
    if by == "protein":
        return split_items(proteins, fractions=fractions, seed=split.seed), "protein_id"
    if seqs is None:
        raise InputError("a homology split needs sequences: pass --sequences FASTA")
    result = homology_split(
        {p: seqs[p] for p in proteins},
        identity=split.identity,
        fractions=fractions,
        coverage=split.coverage,
        seed=split.seed,
        backend=split.backend,
    )
    assignment = getattr(result, "assignment", result)
    logger.info(
        "%s homology split at %.0f%% identity (backend %s)",
        kind,
        100 * split.identity,
        getattr(result, "backend", split.backend),
    )
    return dict(assignment), "protein_id"


def _partition_split(fovs: pd.DataFrame, *, kind: str) -> dict[str, str]:
    """protein_id -> split from the table's ``partition`` column (one value per protein, a split name)."""
    if "partition" not in fovs.columns:
        raise InputError(f"{kind} split by partition: the fov table has no 'partition' column")
    mapping: dict[str, str] = {}
    for i, (pid, part) in enumerate(zip(fovs["protein_id"].astype(str), fovs["partition"], strict=True)):
        value = "" if _blank(part) else str(part).strip()
        if value not in SPLIT_NAMES:
            raise InputError(
                f"row {i + 1}: protein {pid!r} has partition {value!r}; use one of {', '.join(SPLIT_NAMES)}"
            )
        if mapping.setdefault(pid, value) != value:
            raise InputError(f"row {i + 1}: protein {pid!r} is in partition {value!r} and {mapping[pid]!r}")
    return mapping


def spread_order(centres: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Order crop centres so that any prefix is spread out over the image.

    Farthest-point order starting from the centre nearest the image centre; deterministic.

    Parameters
    ----------
    centres
        ``[K, >=2]`` array of (y, x, ...) rows.
    shape
        Image shape (Y, X).

    Returns
    -------
    numpy.ndarray
        A permutation of ``range(K)``.
    """
    k = len(centres)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    yx = centres[:, :2].astype(np.float64)
    mid = np.array(shape[:2], dtype=np.float64) / 2.0
    order = [int(np.argmin(((yx - mid) ** 2).sum(axis=1)))]
    dist = ((yx - yx[order[0]]) ** 2).sum(axis=1)
    for _ in range(k - 1):
        nxt = int(np.argmax(dist))
        order.append(nxt)
        dist = np.minimum(dist, ((yx - yx[nxt]) ** 2).sum(axis=1))
    return np.asarray(order, dtype=np.int64)


def _cap(arrays: dict[str, np.ndarray], centres: np.ndarray, cap: int, shape: tuple[int, int]):
    if cap <= 0 or len(centres) <= cap:
        return arrays, centres
    keep = np.sort(spread_order(centres, shape)[:cap])  # keep store order = label order
    return {k: v[keep] for k, v in arrays.items()}, centres[keep]


def _process_one(item: tuple[int, str, PrepareParams, int, int, str, str, str]) -> tuple[int, FovCrops, int]:
    """Worker: read one FOV and cut its crops (top level so it pickles for process pools)."""
    index, path, params, cyto_cap, celle_cap, store_dtype, channel_order, axes = item
    fov = read_fov(path, channels=tuple(channel_order.split(",")), axes=axes or None)
    crops = process_fov(fov.nucleus, fov.protein, params=params, source=path)
    n_nuclei = int(crops.labels.max()) if crops.labels.size else 0
    shape = crops.labels.shape
    cyto, cyto_c = _cap(crops.cytoself, crops.cytoself_centres, cyto_cap, shape)
    celle, celle_c = _cap(crops.celle, crops.celle_centres, celle_cap, shape)

    def cast(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v.astype(store_dtype) if v.dtype.kind == "f" else v for k, v in d.items()}

    # the label image is not needed downstream; do not ship it back from the worker
    crops = dataclasses.replace(
        crops,
        labels=np.zeros((0, 0), dtype=np.int32),
        cytoself=cast(cyto),
        cytoself_centres=cyto_c,
        celle=cast(celle),
        celle_centres=celle_c,
    )
    return index, crops, n_nuclei


def _iter_results(items: list, workers: int) -> Iterator[tuple[int, FovCrops, int]]:
    if workers <= 1 or len(items) <= 1:
        yield from map(_process_one, items)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        # map keeps input order, so the stores are identical whatever the number of workers
        yield from pool.map(_process_one, items, chunksize=1)


# ------------------------------------------------------------------------------------------- resuming
# The expensive part of prepare is per field of view (reading, segmentation, cropping). Each field's
# result is kept in <out>.partial/fov-<index>.npz, written atomically, so a run that is interrupted
# (Ctrl-C, SIGKILL, a lost machine) and started again with the same inputs only processes the fields it
# had not finished; the stores are then written from the kept results, in table order, exactly as an
# uninterrupted run writes them. job.json fingerprints the inputs: the table, every image's size and
# modification time, the sequences and the configuration; any change discards the kept results.


def _fingerprint(fov_table: Path, fovs: pd.DataFrame, seqs: Mapping[str, str] | None, cfg: PrepareConfig) -> str:
    h = hashlib.sha256()
    h.update(fov_table.read_bytes())
    for path in fovs["path"].astype(str):
        try:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())
    h.update(json.dumps(sorted((seqs or {}).items())).encode())
    h.update(json.dumps(config_to_dict(cfg), sort_keys=True, default=str).encode())
    return h.hexdigest()


def _shard(partial: Path, index: int) -> Path:
    return partial / f"fov-{index:07d}.npz"


def _save_shard(path: Path, crops: FovCrops, n_nuclei: int) -> None:
    arrays = {
        "n_nuclei": np.asarray(n_nuclei),
        "cytoself_centres": crops.cytoself_centres,
        "celle_centres": crops.celle_centres,
    }
    arrays.update({f"cytoself.{k}": v for k, v in crops.cytoself.items()})
    arrays.update({f"celle.{k}": v for k, v in crops.celle.items()})
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def _load_shard(path: Path) -> tuple[FovCrops, int]:
    with np.load(path) as z:
        crops = FovCrops(
            labels=np.zeros((0, 0), dtype=np.int32),
            cytoself={k.split(".", 1)[1]: z[k] for k in z.files if k.startswith("cytoself.")},
            cytoself_centres=z["cytoself_centres"],
            celle={k.split(".", 1)[1]: z[k] for k in z.files if k.startswith("celle.")},
            celle_centres=z["celle_centres"],
        )
        return crops, int(z["n_nuclei"])


def _iter_resumable(items: list, workers: int, partial: Path) -> Iterator[tuple[int, FovCrops, int]]:
    """Every field's result in table order: kept ones from disk, the others computed (and kept)."""
    todo = [it for it in items if not _shard(partial, it[0]).is_file()]
    computed = _iter_results(todo, workers)
    for item in items:
        index = item[0]
        path = _shard(partial, index)
        if path.is_file():
            crops, n_nuclei = _load_shard(path)
            yield index, crops, n_nuclei
            continue
        got, crops, n_nuclei = next(computed)
        assert got == index  # both walk the table in order
        _save_shard(path, crops, n_nuclei)
        yield index, crops, n_nuclei


def _obs(centres: np.ndarray, *, start: int, row: pd.Series, split: str, label: str | None) -> pd.DataFrame:
    n = len(centres)
    return pd.DataFrame(
        {
            "crop_index": np.arange(start, start + n, dtype=np.int64),
            "protein_id": [str(row["protein_id"])] * n,
            "fov_id": [str(row["fov_id"])] * n,
            "centre_y": centres[:, 0].astype(np.int64),
            "centre_x": centres[:, 1].astype(np.int64),
            "nucleus_label": centres[:, 2].astype(np.int64),
            "split": [split] * n,
            "label": [label if label is not None else ""] * n,
        }
    )


def prepare(
    fov_table: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: PrepareConfig | None = None,
    sequences: str | os.PathLike | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = True,
) -> dict[str, Any]:
    """Preprocess fields of view into crop stores and manifests.

    Parameters
    ----------
    fov_table
        CSV/TSV with ``fov_id``, ``protein_id``, ``path`` (+ optional ``label``, ``sequence``,
        ``downsample``), see ``docs/design/data_layer.md``.
    out
        Output folder (written atomically: nothing appears unless the whole run succeeds).
    config
        :class:`PrepareConfig`; defaults follow the papers.
    sequences
        FASTA whose record ids are the ``protein_id`` values; needed for CELL-E outputs unless the
        table has a ``sequence`` column or a ``proteins.csv`` lies beside it.
    workers
        Processes over fields of view (results are identical for any number).
    overwrite
        Replace an existing ``out``.
    progress
        Show a progress bar.
    resume
        Keep every field's crops in ``<out>.partial/`` until the stores are written, so that the same call
        after an interruption continues where it stopped. Needs about the stores' size again in temporary
        disk space; ``False`` keeps nothing (an interrupted run starts over).

    Returns
    -------
    dict
        Summary counts (also written to ``summary.json``).
    """
    cfg = config or PrepareConfig()
    fov_table = Path(fov_table)
    out = check_out(out, overwrite=overwrite, inputs={"--fovs": fov_table, "--sequences": sequences})
    fovs = read_fov_table(fov_table)
    # The images the table names are inputs too: an output holding them would delete them on --overwrite.
    check_inputs(out, {f"{fov_table.name} 'path'": [str(x) for x in fovs["path"]]})
    seqs = _collect_sequences(fovs, fov_table, sequences)
    do_cytoself = cfg.cytoself and cfg.params.cytoself_size > 0
    do_celle = cfg.celle and cfg.params.celle_size > 0
    if do_celle and seqs is None:
        logger.warning("no sequences given (--sequences FASTA): CELL-E crops are skipped")
        do_celle = False
    if not (do_cytoself or do_celle):
        raise ConfigError("nothing to do: both cytoself and CELL-E outputs are disabled")

    cyto_split = _assign(cfg.cytoself_split, kind="cytoself", fovs=fovs, seqs=seqs) if do_cytoself else None
    celle_split = _assign(cfg.celle_split, kind="celle", fovs=fovs, seqs=seqs) if do_celle else None
    labels = fovs["label"].astype(str) if "label" in fovs.columns else None

    items = []
    for i, row in enumerate(fovs.itertuples(index=False)):
        params = cfg.params
        if "downsample" in fovs.columns:
            params = dataclasses.replace(params, downsample=int(row.downsample) == 2)
        if not do_cytoself:
            params = dataclasses.replace(params, cytoself_size=0)
        if not do_celle:
            params = dataclasses.replace(params, celle_size=0)
        items.append(
            (
                i,
                str(row.path),
                params,
                cfg.cytoself_max_crops_per_fov,
                cfg.celle_max_crops_per_fov,
                cfg.store_dtype,
                cfg.channel_order,
                cfg.axes,
            )
        )

    dt = cfg.store_dtype
    cyto_channels = {k: (dt if v == "float32" else v) for k, v in CYTOSELF_CHANNELS.items()}
    celle_channels = {k: (dt if v == "float32" else v) for k, v in CELLE_CHANNELS.items()}
    fov_stats = []
    n_done = {"cytoself": 0, "celle": 0}
    partial = out.with_name(out.name + ".partial")
    job = {"fingerprint": _fingerprint(fov_table, fovs, seqs, cfg)}
    with resumable_dir(partial, job, kind="prepare") if resume else contextlib.nullcontext():
        kept = len(list(partial.glob("fov-*.npz"))) if resume else 0
        if kept:
            logger.info("resuming: %d of %d fields of view were processed before (%s)", kept, len(items), partial)
        with atomic_dir(out) as tmp:
            # the stores are finalised (renamed into tmp) when the ExitStack closes; any error inside
            # removes them and atomic_dir removes tmp, so a failed run leaves nothing behind
            with contextlib.ExitStack() as stack:
                stores = {}
                if do_cytoself:
                    stores["cytoself"] = stack.enter_context(
                        CropStore.create(
                            tmp / "cytoself.zarr",
                            channels=cyto_channels,
                            size=cfg.params.cytoself_size,
                            chunk=cfg.chunk,
                        )
                    )
                if do_celle:
                    stores["celle"] = stack.enter_context(
                        CropStore.create(
                            tmp / "celle.zarr", channels=celle_channels, size=cfg.params.celle_size, chunk=cfg.chunk
                        )
                    )
                bar = stack.enter_context(tqdm(total=len(items), desc="prepare", unit="fov", disable=not progress))
                results = _iter_resumable(items, workers, partial) if resume else _iter_results(items, workers)
                for index, crops, n_nuclei in results:
                    row = fovs.iloc[index]
                    label = labels.iloc[index] if labels is not None else None
                    stat = {"fov_id": row["fov_id"], "protein_id": row["protein_id"], "n_nuclei": n_nuclei}
                    for name, split_spec, centres, arrays in (
                        ("cytoself", cyto_split, crops.cytoself_centres, crops.cytoself),
                        ("celle", celle_split, crops.celle_centres, crops.celle),
                    ):
                        if name not in stores:
                            continue
                        mapping, key = split_spec
                        split = mapping[str(row[key])]
                        start = n_done[name]
                        obs = _obs(centres, start=start, row=row, split=split, label=label)
                        if len(obs):
                            stores[name].append(arrays, obs)
                        n_done[name] += len(obs)
                        stat.update({f"n_{name}": len(obs), f"{name}_split": split})
                    if n_nuclei == 0:
                        logger.warning("%s: no nuclei found", row["path"])
                    fov_stats.append(stat)
                    bar.update(1)
                if not any(n_done[name] for name in stores):
                    # Empty stores would train and embed nothing; say why instead (before anything is kept).
                    nuclei = sum(int(st["n_nuclei"]) for st in fov_stats)
                    raise InputError(
                        f"no crop was cut from any of the {len(fovs)} fields of view ({nuclei} nuclei found): check "
                        "the channel order (--set channel_order=protein,nucleus), the image scale (downsample) and "
                        "the images themselves",
                        path=fov_table,
                    )
                for name in stores:
                    if not n_done[name]:
                        logger.warning("no %s crop was cut from any field of view: its store is empty", name)

            fov_df = pd.DataFrame(fov_stats)
            write_table(fov_df, tmp / "fovs.csv")
            prot = _protein_table(fovs, fov_df, seqs, cyto_split, celle_split)
            write_table(prot, tmp / "proteins.csv")
            if seqs is not None:
                write_fasta(tmp / "sequences.fasta", seqs)
            save_config(cfg, tmp / "config.yaml")
            summary = {
                "fovs": len(fovs),
                "proteins": int(fovs["protein_id"].nunique()),
                "nuclei": int(fov_df["n_nuclei"].sum()) if len(fov_df) else 0,
                "cytoself_crops": n_done["cytoself"],
                "celle_crops": n_done["celle"],
            }
            for name, col in (("cytoself", "n_cytoself"), ("celle", "n_celle")):
                if col in fov_df.columns:
                    split_col = f"{name}_split"
                    counts = fov_df.groupby(split_col)[col].sum().to_dict()
                    summary[f"{name}_split"] = {k: int(counts.get(k, 0)) for k in SPLIT_NAMES if k in counts}
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(partial, ignore_errors=True)  # also a --no-resume run's stale leftovers of an earlier one
    logger.info("prepared %d fields of view into %s", len(fovs), out)
    return summary


def _protein_table(
    fovs: pd.DataFrame,
    fov_df: pd.DataFrame,
    seqs: Mapping[str, str] | None,
    cyto_split: tuple[dict[str, str], str] | None,
    celle_split: tuple[dict[str, str], str] | None,
) -> pd.DataFrame:
    proteins = list(dict.fromkeys(fovs["protein_id"].astype(str)))
    table = pd.DataFrame({"protein_id": proteins})
    if "label" in fovs.columns:
        first_label = dict(zip(fovs["protein_id"].astype(str)[::-1], fovs["label"].astype(str)[::-1], strict=True))
        table["label"] = [first_label[p] for p in proteins]
    for name, split in (("cytoself", cyto_split), ("celle", celle_split)):
        if split is None:
            continue
        mapping, key = split
        if key == "protein_id":
            table[f"{name}_split"] = [mapping[p] for p in proteins]
        counts = fov_df.groupby("protein_id")[f"n_{name}"].sum()
        table[f"n_{name}_crops"] = [int(counts.get(p, 0)) for p in proteins]
    if seqs is not None:
        table["length"] = [len(seqs[p]) for p in proteins]
        table["sequence"] = [seqs[p] for p in proteins]
    return table

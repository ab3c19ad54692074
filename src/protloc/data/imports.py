"""Import OpenCell data that comes already cut: cytoself's released crops and CELL-E manifests.

``protloc prepare`` cuts crops from fields of view. Two other layouts were released with the papers;
the functions here write them into the same crop stores, so ``protloc train`` and ``protloc embed``
take them without a conversion script:

* :func:`import_cytoself_crops`: cytoself's released crops (``Image_data*.npy`` + ``Label_data*.csv``,
  or per protein ``<name>_pro.npy``, ``_nuc.npy``, ``_nucdist.npy``, ``_label.csv``) ->
  ``OUT/cytoself.zarr`` (channels ``protein``, ``nucleus`` in [0, 1], ``nucleus_distance`` in
  [-1, 1]), split 8:1:1 by field of view like ``protloc prepare``;
* :func:`import_celle_manifest`: a CELL-E manifest (nucleus / protein image pairs + sequences) ->
  ``OUT/celle.zarr`` (channels ``nucleus``, ``protein`` in [0, 1], ``threshold`` = ``protein >=
  mean`` in {0, 1}), keeping the manifest's ``split`` column or splitting 80/20 by protein.

Output folder layouts::

    OUT/  cytoself.zarr  cytoself.csv  proteins.csv  summary.json
    OUT/  celle.zarr  celle.csv  sequences.fasta  proteins.csv  summary.json

The folder is written atomically (:func:`protloc._fs.atomic_dir`): an import that fails or is
interrupted leaves nothing behind, and an existing output is replaced only once the new one is
complete. Crops are read and written in pieces, so memory stays bounded for the full data sets.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from protloc._fs import atomic_dir, atomic_write_text, check_out
from protloc.data.io import CropStore, write_table
from protloc.data.opencell import (
    CytoselfStacks,
    list_cytoself_proteins,
    load_celle_images,
    read_celle_manifest,
    read_cytoself_protein,
)
from protloc.data.prepare import CELLE_CHANNELS, CYTOSELF_CHANNELS, parse_fractions
from protloc.data.preprocess import _minmax_stack, threshold_mean
from protloc.data.sequences import validate_sequence, write_fasta
from protloc.data.splits import SPLIT_NAMES, split_by_fov, split_by_protein
from protloc.errors import ConfigError, InputError

__all__ = ["CELLE_SIZE", "CYTOSELF_SIZE", "import_celle_manifest", "import_cytoself_crops", "scale_distance"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

#: Side of cytoself's released crops (and of ``protloc prepare``'s cytoself crops).
CYTOSELF_SIZE = 100
#: Side of ``protloc prepare``'s CELL-E crops: what ``protloc train vqgan`` / ``celle`` expect.
CELLE_SIZE = 256

_CYTO_CHANNELS = tuple(CYTOSELF_CHANNELS)  # protein, nucleus, nucleus_distance (store order)
_CYTO_SUFFIX = {"protein": "_pro.npy", "nucleus": "_nuc.npy", "nucleus_distance": "_nucdist.npy"}
_IMAGE_DATA = re.compile(r"^Image_data(\d+)\.npy$")
_LABEL_DATA = re.compile(r"^Label_data(\d+)\.csv$")
#: Crops read per piece: 512 x 3 channels x 100 x 100 float32 is about 60 MB (a few times that with temporaries).
_PIECE = 512
_WHITESPACE = re.compile(r"\s")


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------


def _check_inputs_outside(out: Path, inputs: list[Path]) -> None:
    """Refuse an ``out`` that is, or holds, one of the inputs: replacing it would delete them."""
    if not out.exists():
        return
    target = Path(os.path.abspath(out))
    for item in inputs:
        resolved = Path(os.path.abspath(item))
        if resolved == target or target in resolved.parents:
            raise InputError(f"the output folder holds the input {item}; choose another output", path=out)


def _check_dtype(store_dtype: str) -> str:
    if store_dtype not in ("float16", "float32"):
        raise ConfigError(f"store_dtype must be float16 or float32, got {store_dtype!r}")
    return store_dtype


def _fractions(fractions: str | Mapping[str, float], *, kind: str) -> dict[str, float]:
    if isinstance(fractions, str):
        return parse_fractions(fractions, kind=kind)
    return {str(k): float(v) for k, v in fractions.items()}


def _text(value: object) -> str | None:
    """A table cell as text; ``None`` for an empty or missing cell (``3.0`` read from a number column is ``"3"``)."""
    if value is None:
        return None
    if isinstance(value, float | np.floating):
        if np.isnan(value):
            return None
        if float(value).is_integer():
            return str(int(value))
    if isinstance(value, np.integer):
        return str(int(value))
    s = str(value).strip()
    return s or None


def _texts(s: pd.Series) -> list[str | None]:
    return [_text(v) for v in s.tolist()]


def _split_counts(splits: pd.Series) -> dict[str, int]:
    counts = splits.value_counts().to_dict()
    return {k: int(counts[k]) for k in SPLIT_NAMES if k in counts}


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def scale_distance(distance: np.ndarray) -> np.ndarray:
    """Scale a stack of signed nuclear distance crops to [-1, 1], each crop on its own.

    Vectorized :func:`protloc.data.preprocess.normalize_distance` with ``mode="separate"`` (what
    ``protloc prepare`` uses): positive values are divided by the crop's largest value, negative ones
    by its largest magnitude negative value; zero stays zero.

    Parameters
    ----------
    distance
        ``[n, H, W]`` signed distances (pixels, or any scale), finite.

    Returns
    -------
    numpy.ndarray
        float32 ``[n, H, W]`` in [-1, 1].
    """
    d = np.asarray(distance, dtype=np.float32)
    if d.size == 0:
        return d.copy()
    flat = d.reshape(len(d), -1)
    pos = flat.max(axis=1)
    neg = -flat.min(axis=1)
    pos = np.where(pos > 0, pos, np.float32(1.0)).astype(np.float32)[:, None, None]
    neg = np.where(neg > 0, neg, np.float32(1.0)).astype(np.float32)[:, None, None]
    out = np.where(d > 0, d / pos, np.where(d < 0, d / neg, np.float32(0.0))).astype(np.float32)
    np.clip(out, -1.0, 1.0, out=out)
    return out


# --------------------------------------------------------------------------------------------------
# cytoself's released crops
# --------------------------------------------------------------------------------------------------


@dataclass
class _CytoSource:
    """One group of released crops: an ``Image_dataXX.npy`` stack or one protein's files."""

    name: str  # written to the obs ``source`` column: the image file (stack) or the protein's file stem
    files: dict[str, Path]  # channel -> file holding it (named in errors)
    label_file: Path
    n: int
    offset: int  # first global image index (stacks layout)
    protein_id: list[str]
    label: list[str]
    fov: list[str | None]  # FOV_id per crop (None: none given)


def _cyto_layout(src: Path) -> str:
    if not src.exists():
        raise InputError("folder not found", path=src)
    if not src.is_dir():
        raise InputError("expected a folder of cytoself crops", path=src)
    names = [p.name for p in src.iterdir() if p.is_file()]
    stacks = any(_IMAGE_DATA.match(n) or _LABEL_DATA.match(n) for n in names)
    proteins = any(n.endswith("_pro.npy") for n in names)
    if stacks and proteins:
        raise InputError(
            "holds both cytoself layouts (Image_data*.npy stacks and per-protein <name>_pro.npy files); "
            "import them from separate folders",
            path=src,
        )
    if stacks:
        return "stacks"
    if proteins:
        return "proteins"
    raise InputError(
        "no cytoself crops found: expected Image_data*.npy + Label_data*.csv (the full set) or per protein "
        "<name>_pro.npy, <name>_nuc.npy, <name>_nucdist.npy and <name>_label.csv",
        path=src,
    )


def _label_columns(obs: pd.DataFrame, label_file: Path, *, allow_crop_split: bool) -> tuple[list, list, list]:
    """protein_id, label and FOV_id per row of a normalised label table, checked."""
    pids = _texts(obs["protein_id"])
    for row, pid in enumerate(pids):
        if pid is None:
            raise InputError("empty protein name (column 'name', else 'ensg')", path=label_file, row=row)
    labels = [v or "" for v in _texts(obs["label"])] if "label" in obs.columns else [""] * len(obs)
    if "fov_id" not in obs.columns:
        if not allow_crop_split:
            raise InputError(
                "has no FOV_id column, so crops cannot be split by field of view (neighbouring crops of one "
                "field would land in different splits); add a FOV_id column, or pass allow_crop_split=True "
                "(--split-by-crop) to split crop by crop",
                path=label_file,
            )
        return pids, labels, [None] * len(obs)
    fovs = _texts(obs["fov_id"])
    if not allow_crop_split:
        for row, f in enumerate(fovs):
            if f is None:
                raise InputError(
                    "empty FOV_id; every crop needs its field of view (or pass allow_crop_split=True / "
                    "--split-by-crop to split crops without one crop by crop)",
                    path=label_file,
                    row=row,
                )
    return pids, labels, fovs


def _check_crop_shape(shape: tuple[int, ...], size: int, *, path: Path) -> None:
    if tuple(shape) != (size, size):
        raise InputError(
            f"crops are {shape[0]} x {shape[1]} pixels, expected {size} x {size} (crop_size; cytoself's "
            f"released crops are {CYTOSELF_SIZE} x {CYTOSELF_SIZE})",
            path=path,
        )


def _stack_sources(src: Path, size: int, *, allow_crop_split: bool) -> tuple[CytoselfStacks, list[_CytoSource]]:
    stacks = CytoselfStacks(src)
    if stacks.stacks:
        _check_crop_shape(stacks.image_shape, size, path=stacks.stacks[0])
    label_files = {int(m.group(1)): p for p in src.iterdir() if (m := _LABEL_DATA.match(p.name))}
    sources = []
    offset = 0
    for image in stacks.stacks:
        key = int(_IMAGE_DATA.match(image.name).group(1))  # type: ignore[union-attr]
        rows = stacks.obs.iloc[offset : offset + int((stacks.obs["stack"] == key).sum())]
        label_file = label_files[key]
        pids, labels, fovs = _label_columns(rows, label_file, allow_crop_split=allow_crop_split)
        sources.append(
            _CytoSource(
                name=image.name,
                files={c: image for c in _CYTO_CHANNELS},
                label_file=label_file,
                n=len(rows),
                offset=offset,
                protein_id=pids,
                label=labels,
                fov=fovs,
            )
        )
        offset += len(rows)
    return stacks, sources


def _protein_files(src: Path, name: str) -> dict[str, Path]:
    files = {c: src / f"{name}{suffix}" for c, suffix in _CYTO_SUFFIX.items()}
    for f in files.values():
        if not f.is_file():
            raise InputError(
                f"file not found; importing protein {name!r} needs {name}_pro.npy, {name}_nuc.npy, "
                f"{name}_nucdist.npy and {name}_label.csv",
                path=f,
            )
    return files


def _protein_sources(src: Path, size: int, *, allow_crop_split: bool) -> list[_CytoSource]:
    sources = []
    for name in list_cytoself_proteins(src):
        files = _protein_files(src, name)
        data = read_cytoself_protein(src, name)  # memory-mapped; checks shapes and label rows
        _check_crop_shape(tuple(data["protein"].shape[1:]), size, path=files["protein"])
        label_file = src / f"{name}_label.csv"
        pids, labels, fovs = _label_columns(data["obs"], label_file, allow_crop_split=allow_crop_split)
        sources.append(
            _CytoSource(
                name=f"{name}_pro.npy",
                files=files,
                label_file=label_file,
                n=int(data["protein"].shape[0]),
                offset=0,
                protein_id=pids,
                label=labels,
                fov=fovs,
            )
        )
        del data
    return sources


def _cyto_pieces(
    layout: str, src: Path, stacks: CytoselfStacks | None, sources: list[_CytoSource], piece: int
) -> Iterator[tuple[int, _CytoSource, int, dict[str, np.ndarray]]]:
    """(source number, source, first row, channel -> [n, S, S] crops), ``piece`` crops at a time."""
    for k, source in enumerate(sources):
        if layout == "stacks":
            assert stacks is not None
            for start in range(0, source.n, piece):
                idx = np.arange(source.offset + start, source.offset + min(start + piece, source.n))
                yield k, source, start, {c: stacks.channel(c, idx) for c in _CYTO_CHANNELS}
        else:
            data = read_cytoself_protein(src, source.name[: -len("_pro.npy")])
            for start in range(0, source.n, piece):
                stop = min(start + piece, source.n)
                yield k, source, start, {c: np.asarray(data[c][start:stop]) for c in _CYTO_CHANNELS}
            del data


def _check_finite(arrays: Mapping[str, np.ndarray], source: _CytoSource, start: int) -> None:
    for c in _CYTO_CHANNELS:
        a = arrays[c]
        kind = a.dtype.kind
        if kind not in "biuf":
            raise InputError(f"channel {c!r} has non-numeric data type {a.dtype}", path=source.files[c])
        if kind == "f" and a.size:
            bad = ~np.isfinite(a).reshape(len(a), -1).all(axis=1)
            if bad.any():
                row = start + int(np.flatnonzero(bad)[0])
                raise InputError(
                    f"crop {row} has NaN or infinite values in channel {c!r} ({int(bad.sum())} such crop(s) "
                    f"among rows {start}..{start + len(a) - 1})",
                    path=source.files[c],
                    row=row,
                )


def _cyto_fov_ids(sources: list[_CytoSource]) -> tuple[list[list[str]], bool, int]:
    """Split keys per source: the FOV_id (``protein/FOV_id`` when ids repeat across proteins), or a per-crop key."""
    owners: dict[str, str] = {}
    shared = False
    for s in sources:
        for pid, f in zip(s.protein_id, s.fov, strict=True):
            if f is not None and owners.setdefault(f, pid) != pid:
                shared = True
                break
        if shared:
            break
    if shared:
        logger.info("FOV_id values repeat across proteins: fields of view are named <protein_id>/<FOV_id>")
    out = []
    n_without = 0
    for s in sources:
        keys = []
        for row, (pid, f) in enumerate(zip(s.protein_id, s.fov, strict=True)):
            if f is None:
                keys.append(f"{s.name}#{row}")
                n_without += 1
            else:
                keys.append(f"{pid}/{f}" if shared else f)
        out.append(keys)
    return out, shared, n_without


def import_cytoself_crops(
    src: PathLike,
    out: PathLike,
    *,
    seed: int = 0,
    fractions: str | Mapping[str, float] = "paper",
    stratify: bool = False,
    crop_size: int = CYTOSELF_SIZE,
    rescale: bool = True,
    allow_crop_split: bool = False,
    store_dtype: str = "float16",
    chunk: int = 64,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write cytoself's released crops into a crop store for ``protloc train cytoself`` / ``embed``.

    Reads either layout of the release with :mod:`protloc.data.opencell`: the full set
    (``Image_dataXX.npy`` ``[N, S, S, 4]`` with ``Label_dataXX.csv``, read by
    :class:`~protloc.data.opencell.CytoselfStacks`) or per protein (``<name>_pro.npy``,
    ``<name>_nuc.npy``, ``<name>_nucdist.npy`` ``[N, S, S]`` and ``<name>_label.csv`` with N rows or
    one, read by :func:`~protloc.data.opencell.read_cytoself_protein`). From the label tables:
    ``protein_id`` from ``name`` (else ``ensg``), ``label`` from ``loc_grade1``, the field of view from
    ``FOV_id``. The fourth channel of the stacks (nuclear segmentation) is not copied.

    Crops are split by field of view with :func:`protloc.data.splits.split_by_fov`, as ``protloc
    prepare`` splits its cytoself crops (8:1:1 by default): all crops of a field share a split. A field
    is identified by its ``FOV_id``; when the same ``FOV_id`` appears under two proteins (ids numbered
    per protein) fields are named ``<protein_id>/<FOV_id>`` instead. Without a ``FOV_id`` column (or
    with an empty cell) the import refuses, naming the label file, unless ``allow_crop_split``: then
    those crops are split one by one (a warning says how many), which puts near-identical neighbours
    on both sides of the split.

    Parameters
    ----------
    src
        Folder of the released files (one layout only).
    out
        Output folder: ``cytoself.zarr`` + ``cytoself.csv``, ``proteins.csv`` (``protein_id``,
        ``label``, ``n_cytoself_crops``) and ``summary.json``. It must not exist or be empty unless
        ``overwrite``.
    seed
        Seed of the split.
    fractions
        ``"paper"`` (0.8 / 0.1 / 0.1), ``"reference"`` (0.82 / 0.098 / 0.082), ``"train=..,val=..[,test=..]"``
        or a mapping; as ``protloc prepare``'s ``cytoself_split.fractions``.
    stratify
        Split each protein's fields of view separately (``cytoself_split.stratify`` of ``prepare``).
    crop_size
        Expected crop side; other sizes are refused (the cytoself model takes ``model.input_size``).
    rescale
        Scale every crop as ``protloc prepare`` does: ``protein`` and ``nucleus`` min-max to [0, 1]
        (a constant crop becomes zeros), ``nucleus_distance`` to [-1, 1] with positive and negative
        values scaled separately (:func:`scale_distance`). The released distance is on another scale
        (cytoself's own loader multiplies it by 0.01); scaling gives models the value ranges of
        ``prepare``'s stores. ``False`` stores the values as released.
    allow_crop_split
        Split crops without a field of view one by one instead of refusing.
    store_dtype
        ``"float16"`` (default, as ``prepare``) or ``"float32"``.
    chunk
        Crops per Zarr chunk.
    overwrite
        Replace an existing output folder (only once the new one is complete).
    progress
        Show a progress bar.

    Returns
    -------
    dict
        Summary counts (also written to ``summary.json``).

    Raises
    ------
    InputError
        Naming the file (and the row where there is one): no crops found, both layouts in one folder,
        a missing file, label rows that do not match the crops, crops of another size, NaN / infinite
        values, an empty protein name or ``FOV_id``, a missing ``FOV_id`` column; or an existing
        output folder without ``overwrite``.
    ConfigError
        For bad ``fractions`` or ``store_dtype``.
    """
    src = Path(src)
    dtype = _check_dtype(store_dtype)
    fr = _fractions(fractions, kind="cytoself")
    if isinstance(crop_size, bool) or not isinstance(crop_size, int | np.integer) or crop_size < 1:
        raise ConfigError(f"crop_size must be a positive integer, got {crop_size!r}")
    layout = _cyto_layout(src)
    out = check_out(out, overwrite=overwrite, inputs={"the crops folder": src})
    _check_inputs_outside(out, [src])

    stacks: CytoselfStacks | None = None
    if layout == "stacks":
        stacks, sources = _stack_sources(src, crop_size, allow_crop_split=allow_crop_split)
    else:
        sources = _protein_sources(src, crop_size, allow_crop_split=allow_crop_split)
    n_total = sum(s.n for s in sources)
    if n_total == 0:
        raise InputError("the released files hold no crops", path=src)

    keys, shared, n_without = _cyto_fov_ids(sources)
    if n_without:
        logger.warning(
            "%d of %d crops have no FOV_id: they are split crop by crop, so neighbouring crops of one field of "
            "view can land in different splits",
            n_without,
            n_total,
        )
    protein_of: dict[str, str] = {}
    for s, ks in zip(sources, keys, strict=True):
        for pid, key in zip(s.protein_id, ks, strict=True):
            protein_of.setdefault(key, pid)
    fov_list = list(protein_of)
    mapping = split_by_fov(
        fov_list,
        protein_ids=[protein_of[k] for k in fov_list] if stratify else None,
        fractions=fr,
        seed=seed,
    )

    channels = {c: dtype for c in _CYTO_CHANNELS}
    obs_parts: list[pd.DataFrame] = []
    with atomic_dir(out) as tmp:
        with (
            CropStore.create(tmp / "cytoself.zarr", channels=channels, size=crop_size, chunk=chunk) as writer,
            tqdm(total=n_total, desc="import cytoself", unit="crop", disable=not progress) as bar,
        ):
            for k, source, start, arrays in _cyto_pieces(layout, src, stacks, sources, _PIECE):
                _check_finite(arrays, source, start)
                if rescale:
                    crops = {
                        "protein": _minmax_stack(arrays["protein"])[0],
                        "nucleus": _minmax_stack(arrays["nucleus"])[0],
                        "nucleus_distance": scale_distance(arrays["nucleus_distance"]),
                    }
                else:
                    crops = {c: np.asarray(arrays[c], dtype=np.float32) for c in _CYTO_CHANNELS}
                stop = start + len(crops["protein"])
                fov_ids = keys[k][start:stop]
                table = pd.DataFrame(
                    {
                        "protein_id": source.protein_id[start:stop],
                        "fov_id": fov_ids,
                        "split": [mapping[f] for f in fov_ids],
                        "label": source.label[start:stop],
                        "source": source.name,
                        "source_row": np.arange(start, stop, dtype=np.int64),
                    }
                )
                writer.append(crops, table)
                obs_parts.append(table[["protein_id", "split", "label"]])
                bar.update(len(table))

        obs = pd.concat(obs_parts, ignore_index=True)
        proteins = list(dict.fromkeys(obs["protein_id"]))
        labelled = obs[obs["label"] != ""].drop_duplicates("protein_id").set_index("protein_id")["label"]
        counts = obs.groupby("protein_id").size()
        write_table(
            pd.DataFrame(
                {
                    "protein_id": proteins,
                    "label": [str(labelled.get(p, "")) for p in proteins],
                    "n_cytoself_crops": [int(counts[p]) for p in proteins],
                }
            ),
            tmp / "proteins.csv",
        )
        split_counts = _split_counts(obs["split"])
        summary: dict[str, Any] = {
            "source": str(src),
            "layout": "Image_data stacks" if layout == "stacks" else "per-protein files",
            "files": len(sources),
            "proteins": len(proteins),
            "fovs": len(fov_list) - n_without,
            "cytoself_crops": n_total,
            "cytoself_split": split_counts,
            "crops_without_fov": n_without,
            "fov_names": "protein_id/FOV_id" if shared else "FOV_id",
            "crop_size": int(crop_size),
            "rescaled": bool(rescale),
            "store_dtype": dtype,
            "seed": int(seed),
        }
        for name in ("train", "val"):
            if name not in split_counts:
                logger.warning(
                    "the split has no %r crops (%d fields of view): training needs both train and val",
                    name,
                    len(fov_list),
                )
        _write_json(tmp / "summary.json", summary)
    logger.info("imported %d cytoself crops of %d proteins into %s", n_total, len(proteins), out)
    return summary


# --------------------------------------------------------------------------------------------------
# CELL-E manifests
# --------------------------------------------------------------------------------------------------


def _manifest_sequences(df: pd.DataFrame, manifest: Path) -> tuple[list[str], dict[str, str]]:
    """Checked protein ids per row and one validated sequence per protein."""
    pids: list[str] = []
    seqs: dict[str, str] = {}
    first: dict[str, int] = {}
    for row, (pid_raw, seq) in enumerate(zip(df["protein_id"], df["sequence"], strict=True)):
        pid = str(pid_raw).strip()
        if _WHITESPACE.search(pid):
            raise InputError(
                f"protein_id {pid!r} contains whitespace; it becomes a FASTA record id, which cannot",
                path=manifest,
                row=row,
            )
        try:
            clean = validate_sequence(str(seq), name=pid)
        except InputError as exc:
            raise InputError(exc.message, path=manifest, row=row) from exc
        if pid in seqs and seqs[pid] != clean:
            raise InputError(
                f"protein {pid!r} has a different sequence than in row {first[pid]}; one protein, one sequence",
                path=manifest,
                row=row,
            )
        seqs.setdefault(pid, clean)
        first.setdefault(pid, row)
        pids.append(pid)
    return pids, seqs


def _fov_names(df: pd.DataFrame, manifest: Path) -> list[str]:
    """A ``fov_id`` per row: the manifest's own column, else the protein image relative to the manifest."""
    if "fov_id" in df.columns:
        names = _texts(df["fov_id"])
        for row, name in enumerate(names):
            if name is None:
                raise InputError("empty fov_id", path=manifest, row=row)
        return [str(n) for n in names]
    base = manifest.parent.resolve()
    out = []
    for p in df["protein_image"]:
        try:
            out.append(Path(p).relative_to(base).as_posix())
        except ValueError:
            out.append(Path(p).as_posix())
    return out


def import_celle_manifest(
    manifest: PathLike,
    out: PathLike,
    *,
    image_size: int = CELLE_SIZE,
    keep_split: bool = True,
    fractions: str | Mapping[str, float] = "paper",
    seed: int = 0,
    store_dtype: str = "float16",
    chunk: int = 64,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the image pairs of a CELL-E manifest into a crop store for ``protloc train vqgan`` / ``celle``.

    The manifest is read and checked by :func:`protloc.data.opencell.read_celle_manifest` (columns
    ``nucleus_image``, ``protein_image``, ``protein_id``, ``sequence`` or ``metadata_json``, optional
    ``split``, ``label``, ``fov_id``); each pair by :func:`~protloc.data.opencell.load_celle_images`.
    One crop per row, processed as ``protloc prepare`` processes its CELL-E crops:

    * the two images must have the same size; an image larger than ``image_size`` in either direction
      is centre-cropped to ``image_size`` x ``image_size`` (counted in the summary); a smaller one is
      refused, naming the manifest row and the file (nothing is resized: the scale would change);
    * ``nucleus`` and ``protein`` are min-max scaled to [0, 1] (a constant image becomes zeros);
    * ``threshold`` is ``protein >= mean`` of the cropped protein image (uint8 0 / 1).

    Parameters
    ----------
    manifest
        The CELL-E manifest (CSV / TSV).
    out
        Output folder: ``celle.zarr`` + ``celle.csv`` (one row per manifest row: ``crop_index``,
        ``protein_id``, ``fov_id``, ``split``, ``label``, ``manifest_row``), ``sequences.fasta``,
        ``proteins.csv`` and ``summary.json``. Must not exist or be empty unless ``overwrite``.
    image_size
        Crop side. The default 256 is ``prepare``'s CELL-E crop size, which the ``tiny`` and ``paper``
        presets of ``protloc train vqgan`` / ``celle`` accept (a smaller ``data.image_size`` is a
        resize of it).
    keep_split
        Keep the manifest's ``split`` column (``train`` / ``val`` / ``test``) when it has one. Without
        the column, or with ``keep_split=False``, proteins are split 80/20 with
        :func:`protloc.data.splits.split_by_protein`, as ``protloc prepare``'s default CELL-E split.
    fractions
        Fractions of that protein split: ``"paper"`` (0.8 / 0.2), ``"train=..,val=..[,test=..]"`` or a
        mapping.
    seed
        Seed of that protein split.
    store_dtype
        ``"float16"`` (default, as ``prepare``) or ``"float32"`` for ``nucleus`` and ``protein``.
    chunk
        Crops per Zarr chunk.
    overwrite
        Replace an existing output folder (only once the new one is complete).
    progress
        Show a progress bar.

    Returns
    -------
    dict
        Summary counts (also written to ``summary.json``).

    Raises
    ------
    InputError
        Naming the manifest and row (and the image file where there is one): a missing column or file,
        an empty or invalid sequence, two sequences for one protein, a ``protein_id`` with whitespace,
        an unknown split, images that differ in size or are smaller than ``image_size``, unreadable or
        NaN images; or an existing output folder without ``overwrite``.
    ConfigError
        For bad ``image_size``, ``fractions`` or ``store_dtype``.
    """
    manifest = Path(manifest)
    dtype = _check_dtype(store_dtype)
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer) or image_size < 1:
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    size = int(image_size)
    fr = _fractions(fractions, kind="celle")
    out = check_out(out, overwrite=overwrite, inputs={"the manifest": manifest})
    df = read_celle_manifest(manifest)
    _check_inputs_outside(out, [manifest, *(Path(p) for c in ("nucleus_image", "protein_image") for p in df[c])])
    pids, seqs = _manifest_sequences(df, manifest)
    labels = [v or "" for v in _texts(df["label"])] if "label" in df.columns else [""] * len(df)
    fov_ids = _fov_names(df, manifest)

    if keep_split and "split" in df.columns:
        splits = [str(s) for s in df["split"]]
        split_from = "manifest"
    else:
        mapping = split_by_protein(list(seqs), fractions=fr, seed=seed)
        splits = [mapping[p] for p in pids]
        split_from = "by protein"
    for name in ("train", "val"):
        if name not in splits:
            logger.warning("%s: no %r rows (split %s); training needs both train and val", manifest, name, split_from)

    channels = {k: (dtype if v == "float32" else v) for k, v in CELLE_CHANNELS.items()}
    n = len(df)
    n_cropped = 0
    n_constant = 0
    with atomic_dir(out) as tmp:
        with (
            CropStore.create(tmp / "celle.zarr", channels=channels, size=size, chunk=chunk) as writer,
            tqdm(total=n, desc="import CELL-E", unit="image", disable=not progress) as bar,
        ):
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                nuc_batch = np.empty((stop - start, size, size), dtype=np.float32)
                pro_batch = np.empty((stop - start, size, size), dtype=np.float32)
                for j, row in enumerate(range(start, stop)):
                    rec = df.iloc[row]
                    try:
                        images = load_celle_images(rec)
                    except InputError as exc:
                        raise InputError(str(exc), path=manifest, row=row) from exc
                    nuc, pro = images["nucleus"], images["protein"]
                    if nuc.shape != pro.shape:
                        raise InputError(
                            f"nucleus image {rec['nucleus_image']} is {nuc.shape[0]} x {nuc.shape[1]} pixels but "
                            f"protein image {rec['protein_image']} is {pro.shape[0]} x {pro.shape[1]}; a pair must "
                            "match pixel for pixel",
                            path=manifest,
                            row=row,
                        )
                    h, w = nuc.shape
                    if h < size or w < size:
                        raise InputError(
                            f"images {rec['nucleus_image']} and {rec['protein_image']} are {h} x {w} pixels, smaller "
                            f"than the {size} x {size} crops (image_size); images are cropped, never enlarged: "
                            "pass a smaller image_size (--image-size) or leave this row out",
                            path=manifest,
                            row=row,
                        )
                    if (h, w) != (size, size):
                        n_cropped += 1
                    y0, x0 = (h - size) // 2, (w - size) // 2
                    nuc_batch[j] = nuc[y0 : y0 + size, x0 : x0 + size]
                    pro_batch[j] = pro[y0 : y0 + size, x0 : x0 + size]
                nuc_n, _ = _minmax_stack(nuc_batch)
                pro_n, constant = _minmax_stack(pro_batch)
                n_constant += constant
                table = pd.DataFrame(
                    {
                        "protein_id": pids[start:stop],
                        "fov_id": fov_ids[start:stop],
                        "split": splits[start:stop],
                        "label": labels[start:stop],
                        "manifest_row": np.arange(start, stop, dtype=np.int64),
                    }
                )
                writer.append({"nucleus": nuc_n, "protein": pro_n, "threshold": threshold_mean(pro_batch)}, table)
                bar.update(stop - start)
        if n_cropped:
            logger.info("%s: centre-cropped %d of %d image pairs to %d x %d", manifest, n_cropped, n, size, size)
        if n_constant:
            logger.warning("%s: %d protein images are constant (stored as zeros)", manifest, n_constant)

        write_fasta(tmp / "sequences.fasta", seqs)
        crops = pd.DataFrame({"protein_id": pids, "split": splits, "label": labels})
        proteins = list(seqs)
        table = pd.DataFrame({"protein_id": proteins})
        if "label" in df.columns:
            labelled = crops[crops["label"] != ""].drop_duplicates("protein_id").set_index("protein_id")["label"]
            table["label"] = [str(labelled.get(p, "")) for p in proteins]
        by_protein = crops.groupby("protein_id")["split"].agg(lambda s: ",".join(x for x in SPLIT_NAMES if x in set(s)))
        table["celle_split"] = [by_protein[p] for p in proteins]
        table["n_celle_crops"] = [int(v) for v in crops.groupby("protein_id").size().reindex(proteins)]
        table["length"] = [len(seqs[p]) for p in proteins]
        table["sequence"] = [seqs[p] for p in proteins]
        write_table(table, tmp / "proteins.csv")
        summary: dict[str, Any] = {
            "manifest": str(manifest),
            "proteins": len(proteins),
            "celle_crops": n,
            "celle_split": _split_counts(crops["split"]),
            "split_from": split_from,
            "image_size": size,
            "centre_cropped": n_cropped,
            "store_dtype": dtype,
        }
        if split_from == "by protein":
            summary["seed"] = int(seed)
        _write_json(tmp / "summary.json", summary)
    logger.info("imported %d CELL-E image pairs of %d proteins into %s", n, len(proteins), out)
    return summary

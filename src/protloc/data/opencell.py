"""Readers for the OpenCell data layouts: fields of view, cytoself's released crops, CELL-E manifests.

* Fields of view: ``*_stack.tif`` z-stacks (``ZCYX``, two channels) and ``*_proj.tif`` projections
  (``CYX``); channel 0 is the nucleus (Hoechst), channel 1 the tagged protein, unless told otherwise.
* cytoself's released crops, read exactly as released: per protein ``<name>_pro.npy``,
  ``<name>_nuc.npy``, ``<name>_nucdist.npy`` and ``<name>_label.csv``; or the full set
  ``Image_dataXX.npy`` ``[N, 100, 100, 4]`` with ``Label_dataXX.csv``.
* CELL-E manifests: a table of nucleus / protein image paths, protein IDs and sequences.

See ``docs/design/data_layer.md`` for the layouts.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from protloc.data.io import TIFF_SUFFIXES, check_image, load_npy, read_image, read_table, read_tiff_with_axes
from protloc.errors import InputError

__all__ = [
    "FieldOfView",
    "read_fov",
    "list_cytoself_proteins",
    "read_cytoself_protein",
    "CytoselfStacks",
    "read_celle_manifest",
    "load_celle_images",
    "SPLITS",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

SPLITS = ("train", "val", "test")

_FOV_CHANNELS = ("nucleus", "protein")
# Axes letters a field of view may carry; S (samples) is treated as the channel axis.
_KNOWN_AXES = set("TZCYXS")


# --------------------------------------------------------------------------------------------------
# fields of view
# --------------------------------------------------------------------------------------------------


# eq=False: comparing arrays field by field is ambiguous; two reads are equal only if identical.
@dataclass(frozen=True, eq=False)
class FieldOfView:
    """One field of view, split into its two channels.

    Attributes
    ----------
    nucleus, protein
        ``(Z, Y, X)`` for a z-stack, ``(Y, X)`` for a projection; the file's pixel type.
    path
        The file read.
    is_stack
        Whether the images are z-stacks.
    """

    nucleus: np.ndarray
    protein: np.ndarray
    path: Path
    is_stack: bool


def _single_channel_error(shape: tuple[int, ...], path: Path) -> InputError:
    return InputError(
        f"a 2-D single-channel image (shape {shape}); a field of view needs 2 channels (nucleus, protein)",
        path=path,
    )


def _infer_fov_axes(shape: tuple[int, ...], *, path: Path) -> str:
    if len(shape) == 4:
        # z-stacks are ZCYX; a CZYX file shows itself by a leading 2 that is not followed by a 2.
        return "CZYX" if shape[0] == 2 and shape[1] != 2 else "ZCYX"
    if len(shape) == 3:
        if shape[0] == 2:
            return "CYX"
        if shape[-1] == 2:
            return "YXC"
        raise InputError(
            f"cannot tell which axis holds the 2 channels (nucleus, protein) in an image of shape {shape}; "
            "expected (2, Y, X) or (Y, X, 2), or give the axes (protloc prepare --set axes=CYX; "
            "e.g. 'ZYX' files are single-channel)",
            path=path,
        )
    if len(shape) == 2:
        raise _single_channel_error(shape, path)
    raise InputError(f"a field of view must be 3-D (C, Y, X) or 4-D (Z, C, Y, X), got shape {shape}", path=path)


def _trusted_axes(axes: str, ndim: int) -> bool:
    """Whether axes read from a file describe it (rather than tifffile's generic I / Q labels)."""
    return len(axes) == ndim and set(axes) <= _KNOWN_AXES and "Y" in axes and "X" in axes


def read_fov(
    path: PathLike,
    *,
    channels: Sequence[str] = _FOV_CHANNELS,
    axes: str | None = None,
) -> FieldOfView:
    """Read an OpenCell field of view: a ``*_stack.tif`` z-stack or a ``*_proj.tif`` projection.

    The axes are taken from ``axes`` when given, else from the file's axes metadata (ImageJ or
    tifffile) when it has some, else inferred from the shape: 4-D is ``ZCYX`` (``CZYX`` if the first
    dimension is 2 and the second is not); 3-D is ``CYX`` when the first dimension is 2, ``YXC`` when
    the last one is.

    Parameters
    ----------
    path
        The image file (TIFF; ``.png`` / ``.npy`` work too, with inferred or given axes).
    channels
        What channels 0 and 1 hold: ``("nucleus", "protein")`` (OpenCell's order) or
        ``("protein", "nucleus")``.
    axes
        Axes of the file, e.g. ``"ZCYX"``, ``"CZYX"``, ``"CYX"``, ``"YXC"``; overrides the file's
        metadata (ImageJ files often label channels as Z).

    Returns
    -------
    FieldOfView

    Raises
    ------
    InputError
        If the file cannot be read, ``channels`` is not a permutation of nucleus / protein, the
        axes do not fit the shape, or the image does not hold exactly 2 channels.
    """
    p = Path(path)
    chans = tuple(channels)
    if sorted(chans) != sorted(_FOV_CHANNELS):
        raise InputError(f"channels must name 'nucleus' and 'protein' once each, got {chans}", path=p)
    if p.suffix.lower() in TIFF_SUFFIXES:
        data, file_axes = read_tiff_with_axes(p)
    else:
        data, file_axes = read_image(p), ""
    shape = tuple(int(n) for n in data.shape)
    if data.ndim == 2:
        raise _single_channel_error(shape, p)

    if axes is not None:
        ax = axes.upper()
        if file_axes and _trusted_axes(file_axes, data.ndim) and file_axes != ax:
            logger.info("%s: using axes %s as given instead of the file's %s", p, ax, file_axes)
        if len(ax) != data.ndim or len(set(ax)) != len(ax) or not set(ax) <= _KNOWN_AXES:
            raise InputError(
                f"axes {axes!r} do not fit the image of shape {shape}: give one distinct letter of "
                f"T, Z, C, Y, X per dimension",
                path=p,
            )
    elif _trusted_axes(file_axes, data.ndim):
        ax = file_axes
    else:
        ax = _infer_fov_axes(shape, path=p)
    ax = ax.replace("S", "C") if "C" not in ax else ax

    # Singleton T is harmless (ImageJ "frames" of 1); a real time series is not a field of view.
    if "T" in ax:
        t = ax.index("T")
        if shape[t] != 1:
            raise InputError(f"time series are not supported (T = {shape[t]}, axes {ax}, shape {shape})", path=p)
        data = np.take(data, 0, axis=t)
        ax = ax.replace("T", "")
    if "Y" not in ax or "X" not in ax:
        raise InputError(f"axes {ax!r} lack Y and X (shape {shape})", path=p)
    if "C" not in ax:
        raise InputError(
            f"found no channel axis (axes {ax}, shape {shape}); a field of view needs 2 channels "
            "(nucleus, protein); if one of the axes is really the channel axis, give the axes "
            "(protloc prepare --set axes=CYX, ...)",
            path=p,
        )
    extra = set(ax) - set("ZCYX")
    if extra:
        raise InputError(f"unexpected axes {sorted(extra)} in {ax} (shape {shape})", path=p)
    n_channels = data.shape[ax.index("C")]
    if n_channels != 2:
        raise InputError(
            f"expected exactly 2 channels (nucleus, protein), found {n_channels} (axes {ax}, shape {shape})",
            path=p,
        )
    is_stack = "Z" in ax
    target = "ZCYX" if is_stack else "CYX"
    data = np.moveaxis(data, [ax.index(a) for a in target], list(range(len(target))))
    c_axis = 1 if is_stack else 0
    images = {name: np.ascontiguousarray(np.take(data, i, axis=c_axis)) for i, name in enumerate(chans)}
    logger.debug("read field of view %s: %s %s", p, target, data.shape)
    return FieldOfView(nucleus=images["nucleus"], protein=images["protein"], path=p, is_stack=is_stack)


# --------------------------------------------------------------------------------------------------
# cytoself released crops
# --------------------------------------------------------------------------------------------------


def _normalize_labels(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``protein_id`` and ``label`` columns to a cytoself label table.

    ``protein_id`` comes from ``name`` (gene name), else ``ensg``, else an existing ``protein_id``,
    else the first column; ``label`` from ``loc_grade1``, else an existing ``label``, else missing.
    The released label tables have their own ``protein_id`` column (an OpenCell number); when it is
    replaced it is kept as ``orig_protein_id`` (likewise ``orig_label``). ``FOV_id`` is also
    copied to ``fov_id``.
    """
    out = df.copy()
    if "name" in out.columns:
        source = "name"
    elif "ensg" in out.columns:
        source = "ensg"
    elif "protein_id" in out.columns:
        source = "protein_id"
    else:
        source = out.columns[0]
    if source != "protein_id" and "protein_id" in out.columns:
        out = out.rename(columns={"protein_id": "orig_protein_id"})
    ids = out[source]
    out["protein_id"] = ids.where(ids.isna(), ids.astype(str))

    if "loc_grade1" in out.columns:
        if "label" in out.columns:
            out = out.rename(columns={"label": "orig_label"})
        out["label"] = out["loc_grade1"]
    elif "label" not in out.columns:
        out["label"] = None
    if "FOV_id" in out.columns and "fov_id" not in out.columns:
        out["fov_id"] = out["FOV_id"]
    return out


def _check_folder(folder: PathLike) -> Path:
    f = Path(folder)
    if not f.exists():
        raise InputError("folder not found", path=f)
    if not f.is_dir():
        raise InputError("expected a folder", path=f)
    return f


def list_cytoself_proteins(folder: PathLike) -> list[str]:
    """Names of the proteins in a folder of cytoself per-protein crops.

    Parameters
    ----------
    folder
        Folder holding ``<name>_pro.npy`` files (and their ``_nuc``, ``_nucdist``, ``_label``).

    Returns
    -------
    list of str
        The ``<name>`` of every ``<name>_pro.npy``, sorted.

    Raises
    ------
    InputError
        If the folder does not exist.
    """
    f = _check_folder(folder)
    return sorted(p.name[: -len("_pro.npy")] for p in f.glob("*_pro.npy") if p.is_file())


def read_cytoself_protein(folder: PathLike, name: str, *, mmap: bool = True) -> dict[str, Any]:
    """Read one protein's released cytoself crops.

    Parameters
    ----------
    folder
        Folder of per-protein files.
    name
        The protein's file stem: reads ``<name>_pro.npy`` (required), ``<name>_nuc.npy`` and
        ``<name>_nucdist.npy`` (optional) and ``<name>_label.csv`` (required).
    mmap
        Memory-map the arrays.

    Returns
    -------
    dict
        ``protein``, ``nucleus``, ``nucleus_distance``: ``[N, H, W]`` arrays (the last two only if
        their file exists); ``obs``: the label table with one row per crop (a one-row table is
        repeated for all N crops) plus ``protein_id`` and ``label`` columns.

    Raises
    ------
    InputError
        If a required file is missing or unreadable, the arrays differ in shape, or the label table
        has neither N rows nor one.
    """
    f = _check_folder(folder)
    files = {
        "protein": f / f"{name}_pro.npy",
        "nucleus": f / f"{name}_nuc.npy",
        "nucleus_distance": f / f"{name}_nucdist.npy",
    }
    label_path = f / f"{name}_label.csv"
    out: dict[str, Any] = {}
    for key, path in files.items():
        if key != "protein" and not path.exists():
            continue
        out[key] = load_npy(path, mmap=mmap, ndim=3)
    ref = files["protein"]
    shape = out["protein"].shape
    for key in ("nucleus", "nucleus_distance"):
        if key in out and out[key].shape != shape:
            raise InputError(
                f"shape {out[key].shape} differs from {shape} of {ref}",
                path=files[key],
            )
    n = shape[0]
    obs = read_table(label_path)
    if len(obs) == 1 and n != 1:
        obs = pd.concat([obs] * n, ignore_index=True)
    elif len(obs) != n:
        raise InputError(
            f"has {len(obs)} rows but {ref} holds {n} crops (expected {n} rows, or 1 row for the whole protein)",
            path=label_path,
        )
    out["obs"] = _normalize_labels(obs)
    return out


_IMAGE_DATA = re.compile(r"^Image_data(\d+)\.npy$")
_LABEL_DATA = re.compile(r"^Label_data(\d+)\.csv$")


class CytoselfStacks:
    """cytoself's full released data set: ``Image_dataXX.npy`` ``[N, H, W, 4]`` + ``Label_dataXX.csv``.

    The image stacks are memory-mapped; the labels are read into one table.

    Parameters
    ----------
    folder
        Folder with the stacks; pairs are matched by their number (``Image_data03.npy`` with
        ``Label_data03.csv``).

    Attributes
    ----------
    obs : pandas.DataFrame
        All label rows in stack order, with ``stack`` (the file number), ``row`` (row in that stack),
        ``protein_id`` and ``label`` columns added.
    stacks : list of pathlib.Path
        The image files in order.

    Raises
    ------
    InputError
        If no stacks are found, a stack lacks its partner file, an array is not ``[N, H, W, 4]``, or
        a stack's row count differs from its label table's.
    """

    CHANNELS: tuple[str, ...] = ("protein", "nucleus", "nucleus_distance", "nucleus_segmentation")

    def __init__(self, folder: PathLike) -> None:
        f = _check_folder(folder)
        self.folder = f
        images: dict[int, Path] = {}
        labels: dict[int, Path] = {}
        for p in sorted(f.iterdir()):
            for pattern, found in ((_IMAGE_DATA, images), (_LABEL_DATA, labels)):
                m = pattern.match(p.name)
                if m:
                    key = int(m.group(1))
                    if key in found:
                        raise InputError(f"two files share number {key}: {found[key].name} and {p.name}", path=p)
                    found[key] = p
        if not images and not labels:
            raise InputError("no Image_data*.npy / Label_data*.csv files found", path=f)
        for key in sorted(set(images) | set(labels)):
            if key not in labels:
                raise InputError(f"no matching Label_data file for number {key}", path=images[key])
            if key not in images:
                raise InputError(f"no matching Image_data file for number {key}", path=labels[key])

        self.stacks: list[Path] = []
        self._arrays: list[np.ndarray] = []
        frames: list[pd.DataFrame] = []
        image_shape: tuple[int, int] | None = None
        for key in sorted(images):
            arr = load_npy(images[key], mmap=True, ndim=4, shape_tail=(None, None, len(self.CHANNELS)))
            if image_shape is None:
                image_shape = (int(arr.shape[1]), int(arr.shape[2]))
            elif tuple(arr.shape[1:3]) != image_shape:
                raise InputError(
                    f"crops are {tuple(arr.shape[1:3])}, but {self.stacks[0].name} has {image_shape}",
                    path=images[key],
                )
            lab = read_table(labels[key])
            if len(lab) != arr.shape[0]:
                raise InputError(
                    f"{images[key].name} holds {arr.shape[0]} images but {labels[key].name} has {len(lab)} rows",
                    path=labels[key],
                )
            lab = lab.copy()
            lab["stack"] = key
            lab["row"] = np.arange(len(lab), dtype=np.int64)
            frames.append(lab)
            self.stacks.append(images[key])
            self._arrays.append(arr)
        self.image_shape: tuple[int, int] = image_shape if image_shape is not None else (0, 0)
        self.obs = _normalize_labels(pd.concat(frames, ignore_index=True))
        sizes = np.array([len(a) for a in self._arrays], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)])
        logger.debug("found %d cytoself stacks (%d images) in %s", len(self.stacks), len(self), f)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __repr__(self) -> str:
        return f"CytoselfStacks({str(self.folder)!r}, stacks={len(self.stacks)}, n={len(self)})"

    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if indices.size and (indices.min() < -n or indices.max() >= n):
            raise IndexError(f"image index out of range for {n} images")
        idx = indices % max(n, 1)
        stack = np.searchsorted(self._offsets, idx, side="right") - 1
        return stack, idx - self._offsets[stack]

    def get(self, i: int) -> dict[str, np.ndarray]:
        """All four channels of image ``i`` as ``(H, W)`` arrays (in memory)."""
        stack, row = self._locate(np.array([int(i)]))
        arr = self._arrays[int(stack[0])]
        r = int(row[0])
        return {name: np.array(arr[r, :, :, k]) for k, name in enumerate(self.CHANNELS)}

    def channel(self, name: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """One channel of several images, ``[n, H, W]``, in the order of ``indices``.

        Parameters
        ----------
        name
            One of :attr:`CHANNELS`.
        indices
            Global image indices (rows of :attr:`obs`).
        """
        if name not in self.CHANNELS:
            raise InputError(f"unknown channel {name!r}; expected one of {list(self.CHANNELS)}", path=self.folder)
        k = self.CHANNELS.index(name)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        stack, row = self._locate(idx)
        dtype = self._arrays[0].dtype
        out = np.empty((idx.size, *self.image_shape), dtype=dtype)
        for s in np.unique(stack):
            sel = np.flatnonzero(stack == s)
            rows = row[sel]
            # sorted rows read the memory map front to back
            order = np.argsort(rows, kind="stable")
            out[sel[order]] = self._arrays[int(s)][rows[order], :, :, k]
        return out


# --------------------------------------------------------------------------------------------------
# CELL-E manifests
# --------------------------------------------------------------------------------------------------


def _resolve(base: Path, value: Any) -> Path:
    p = Path(str(value).strip()).expanduser()
    return p if p.is_absolute() else (base / p)


def _read_sequence_json(path: Path, *, manifest: Path, row: int) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc}); referenced by {manifest} row {row}", path=path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read ({exc}); referenced by {manifest} row {row}", path=path) from exc
    if not isinstance(meta, Mapping) or "sequence" not in meta:
        raise InputError(f"has no 'sequence' key; referenced by {manifest} row {row}", path=path)
    seq = meta["sequence"]
    if not isinstance(seq, str):
        raise InputError(f"'sequence' must be a string, got {type(seq).__name__}", path=path)
    return seq


def read_celle_manifest(path: PathLike) -> pd.DataFrame:
    """Read and check a CELL-E manifest (CSV or TSV).

    Columns: ``nucleus_image``, ``protein_image`` (paths relative to the manifest's folder, or
    absolute; TIFF / PNG / NPY), ``protein_id``, and ``sequence`` or ``metadata_json`` (a JSON file
    with a ``"sequence"`` key; a non-empty ``sequence`` cell wins), optional ``split``
    (``train`` / ``val`` / ``test``, case-insensitive). Other columns are kept.

    Parameters
    ----------
    path
        The manifest.

    Returns
    -------
    pandas.DataFrame
        The manifest with ``nucleus_image`` / ``protein_image`` (and ``metadata_json``) as absolute
        path strings, ``protein_id`` as strings, a filled ``sequence`` column (whitespace stripped)
        and ``split`` lower-cased.

    Raises
    ------
    InputError
        Naming the manifest and row: a missing column, a missing image or JSON file, an empty
        sequence, an unknown split.
    """
    p = Path(path)
    df = read_table(
        p,
        required=("nucleus_image", "protein_image", "protein_id"),
        dtype={
            "nucleus_image": str,
            "protein_image": str,
            "protein_id": str,
            "sequence": str,
            "metadata_json": str,
            "split": str,
        },
    )
    if "sequence" not in df.columns and "metadata_json" not in df.columns:
        raise InputError("needs a 'sequence' or a 'metadata_json' column", path=p)
    base = p.parent.resolve()
    for col in ("nucleus_image", "protein_image"):
        resolved = []
        for row, value in enumerate(df[col]):
            f = _resolve(base, value)
            if not f.is_file():
                raise InputError(f"{col} file not found: {f}", path=p, row=row)
            resolved.append(str(f))
        df[col] = resolved

    sequences: list[str] = []
    cache: dict[Path, str] = {}
    has_seq = "sequence" in df.columns
    has_json = "metadata_json" in df.columns
    json_paths: list[str | None] = []
    for row in range(len(df)):
        seq = df["sequence"].iloc[row] if has_seq else None
        seq = "" if seq is None or (isinstance(seq, float) and np.isnan(seq)) else str(seq).strip()
        jp = df["metadata_json"].iloc[row] if has_json else None
        jpath = None
        if jp is not None and not (isinstance(jp, float) and np.isnan(jp)) and str(jp).strip():
            jpath = _resolve(base, jp)
        json_paths.append(None if jpath is None else str(jpath))
        if not seq and jpath is not None:
            if jpath not in cache:
                if not jpath.is_file():
                    raise InputError(f"metadata_json file not found: {jpath}", path=p, row=row)
                cache[jpath] = _read_sequence_json(jpath, manifest=p, row=row)
            seq = cache[jpath].strip()
        if not seq:
            where = "sequence cell" if jpath is None else f"sequence in {jpath}"
            raise InputError(f"empty {where} for protein {df['protein_id'].iloc[row]!r}", path=p, row=row)
        sequences.append(seq)
    df["sequence"] = sequences
    if has_json:
        df["metadata_json"] = json_paths

    if "split" in df.columns:
        splits = df["split"].fillna("").astype(str).str.strip().str.lower()
        bad = ~splits.isin(SPLITS)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"split {df['split'].iloc[row]!r} is not one of {', '.join(SPLITS)}", path=p, row=row)
        df["split"] = splits
    logger.debug("read CELL-E manifest %s: %d rows", p, len(df))
    return df


def _as_2d(image: np.ndarray, *, path: Path, name: str) -> np.ndarray:
    if image.ndim == 3:
        if image.shape[0] == 1:
            image = image[0]
        elif image.shape[-1] == 1:
            image = image[..., 0]
    check_image(image, path=path, ndim=2, name=name)
    return image.astype(np.float32, copy=False)


def load_celle_images(row: Mapping[str, Any] | pd.Series) -> dict[str, np.ndarray]:
    """Read the nucleus and protein images of one manifest row.

    Parameters
    ----------
    row
        A row of :func:`read_celle_manifest` (``nucleus_image`` / ``protein_image`` paths).

    Returns
    -------
    dict of str to numpy.ndarray
        ``nucleus`` and ``protein`` as 2-D ``float32`` with their original intensities (normalizing
        is :mod:`protloc.data.preprocess`'s job); a singleton channel dimension is dropped.

    Raises
    ------
    InputError
        If an image cannot be read or is not 2-D.
    """
    out = {}
    for name in ("nucleus", "protein"):
        path = Path(row[f"{name}_image"])
        out[name] = _as_2d(read_image(path), path=path, name=f"{name} image")
    return out

"""Reading and writing images, arrays, tables and Zarr crop stores.

Every reader checks what it reads and raises :class:`protloc.errors.InputError` naming the file (and
row, for tables) on anything a user can get wrong: a missing file, a corrupt or truncated TIFF / NPY,
an empty image, NaN or Inf pixels, a missing table column. Every writer writes to a temporary
sibling and renames it into place (:mod:`protloc._fs`), so a failure never leaves a half-written file.

Crop stores (see ``docs/design/data_layer.md``) are a Zarr group ``<name>.zarr`` holding one
``[N, S, S]`` array per channel, plus the table ``<name>.csv`` beside it with one row per crop.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pandas as pd
import tifffile
import zarr

from protloc._fs import atomic_dir, atomic_path
from protloc.errors import InputError

__all__ = [
    "CropStore",
    "CropStoreWriter",
    "check_image",
    "load_npy",
    "read_image",
    "read_png",
    "read_table",
    "read_tiff",
    "read_tiff_with_axes",
    "save_npy",
    "write_png",
    "write_table",
    "write_tiff",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

TIFF_SUFFIXES = (".tif", ".tiff")
PNG_SUFFIXES = (".png",)
NPY_SUFFIXES = (".npy",)

# ImageJ hyperstacks store axes in this fixed order; any subset in this order is representable.
_IMAGEJ_ORDER = "TZCYXS"
# The pixel types ImageJ itself understands (tifffile also writes int16, but ImageJ shows it with a
# calibration offset, which would surprise a Fiji user).
_IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


# --------------------------------------------------------------------------------------------------
# shared validation
# --------------------------------------------------------------------------------------------------


def _require_file(path: PathLike, *, what: str = "file") -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found", path=p)
    if not p.is_file():
        raise InputError(f"{what} is not a regular file (is it a folder?)", path=p)
    return p


def _ndim_ok(actual: int, expected: int | Sequence[int] | None) -> bool:
    if expected is None:
        return True
    if isinstance(expected, int | np.integer):
        return actual == int(expected)
    return actual in tuple(int(e) for e in expected)


def _describe_ndim(expected: int | Sequence[int]) -> str:
    if isinstance(expected, int | np.integer):
        return f"{int(expected)}-D"
    return " or ".join(f"{int(e)}-D" for e in expected)


def check_image(
    array: Any,
    *,
    path: PathLike | None = None,
    ndim: int | Sequence[int] | None = None,
    name: str = "image",
) -> np.ndarray:
    """Validate an image array: numeric, non-empty, finite and of the expected dimensionality.

    Parameters
    ----------
    array
        The image (anything :func:`numpy.asarray` accepts; memory maps are not copied).
    path
        The file it came from, named in error messages.
    ndim
        Expected number of dimensions (an int, or a sequence of allowed ints); ``None`` accepts any.
    name
        What the array is called in error messages (``"image"``, ``"nucleus"``, ...).

    Returns
    -------
    numpy.ndarray
        The same data as an array.

    Raises
    ------
    InputError
        If the array is empty, not real-numeric (e.g. strings, objects, complex), has the wrong
        number of dimensions, or a float array holds NaN or Inf.
    """
    arr = array if isinstance(array, np.ndarray) else np.asarray(array)
    dt = arr.dtype
    numeric = dt == np.bool_ or (np.issubdtype(dt, np.number) and not np.issubdtype(dt, np.complexfloating))
    if not numeric:
        raise InputError(f"{name} has non-numeric data type {dt}; expected integer or float pixels", path=path)
    if arr.size == 0:
        raise InputError(f"{name} is empty (shape {tuple(arr.shape)})", path=path)
    if ndim is not None and not _ndim_ok(arr.ndim, ndim):
        raise InputError(
            f"{name} must be {_describe_ndim(ndim)}, got {arr.ndim}-D array of shape {tuple(arr.shape)}",
            path=path,
        )
    if np.issubdtype(dt, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            bad = np.argwhere(~finite)
            first = tuple(int(i) for i in bad[0])
            value = arr[first]
            raise InputError(
                f"{name} contains {len(bad)} non-finite value(s) (NaN or Inf); first is {value} at index {first}",
                path=path,
            )
    return arr


# --------------------------------------------------------------------------------------------------
# TIFF
# --------------------------------------------------------------------------------------------------


class _ErrorCollector(logging.Handler):
    """Collects ERROR records that tifffile logs in this thread.

    tifffile does not raise on some truncated files: it logs an error ("invalid page offset",
    "ImageJ series metadata invalid") and quietly returns fewer pages. We turn those into errors.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _tifffile_errors() -> Iterator[list[str]]:
    handler = _ErrorCollector()
    tif_logger = logging.getLogger("tifffile")
    tif_logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        tif_logger.removeHandler(handler)


def _read_tiff(path: PathLike, key: int | slice | Sequence[int] | None) -> tuple[np.ndarray, str]:
    p = _require_file(path)
    try:
        with _tifffile_errors() as errors, tifffile.TiffFile(p) as tif:
            if not tif.series or not tif.pages:
                raise InputError("TIFF file holds no image data", path=p)
            if len(tif.series) > 1:
                logger.debug("%s holds %d image series; reading the first", p, len(tif.series))
            if key is None:
                series = tif.series[0]
                data = series.asarray()
                axes = str(series.axes)
            else:
                n_pages = len(tif.pages)
                try:
                    data = tif.asarray(key=key)
                except IndexError as exc:
                    raise InputError(f"page {key!r} out of range (the file has {n_pages} pages)", path=p) from exc
                page_axes = str(tif.pages[0].axes)
                axes = page_axes if data.ndim == len(page_axes) else "I" + page_axes
            if errors:
                raise InputError(
                    f"corrupt or truncated TIFF file ({'; '.join(errors)})",
                    path=p,
                )
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # tifffile raises many types (TiffFileError, ValueError, zlib.error, ...)
        raise InputError(f"cannot read TIFF file, it is corrupt or truncated ({exc})", path=p) from exc
    if len(axes) != data.ndim:
        # tifffile's axes always match the series shape; if not, fall back to generic labels
        # rather than return a wrong description.
        axes = ("Q" * data.ndim + "YX")[-data.ndim :] if data.ndim else ""
    check_image(data, path=p)
    return data, axes


def read_tiff(path: PathLike, *, key: int | slice | Sequence[int] | None = None) -> np.ndarray:
    """Read a TIFF image (single page, multi-page, z-stack or ImageJ hyperstack).

    Parameters
    ----------
    path
        The ``.tif`` / ``.tiff`` file.
    key
        Page(s) to read instead of the whole first series: an int, slice or sequence of page indices.

    Returns
    -------
    numpy.ndarray
        The pixels in the file's own type (e.g. ``uint16``), shaped as the file's first series
        (e.g. ``(Z, C, Y, X)`` for an ImageJ ``ZCYX`` hyperstack).

    Raises
    ------
    InputError
        If the file is missing, not a TIFF, corrupt or truncated, empty, or holds NaN / Inf pixels.
    """
    return _read_tiff(path, key)[0]


def read_tiff_with_axes(path: PathLike) -> tuple[np.ndarray, str]:
    """Read a TIFF image and its axes labels.

    The axes come from tifffile's first series: ImageJ hyperstack or tifffile metadata when the file
    has it (``"ZCYX"``, ``"CYX"``, ``"YX"``, ...); otherwise generic labels such as ``"IYX"``
    (pages) or ``"QYX"`` (unknown).

    A file whose structure or metadata tifffile reports as broken is refused rather than read the
    way tifffile falls back to (a truncated hyperstack would otherwise come back as a single plane).

    Parameters
    ----------
    path
        The ``.tif`` / ``.tiff`` file.

    Returns
    -------
    data : numpy.ndarray
        The pixels.
    axes : str
        One upper-case letter per dimension of ``data``.

    Raises
    ------
    InputError
        As :func:`read_tiff`.
    """
    return _read_tiff(path, None)


def _check_axes(axes: str, shape: tuple[int, ...], *, path: PathLike | None) -> str:
    ax = axes.upper()
    if len(ax) != len(shape):
        raise InputError(f"axes {axes!r} has {len(ax)} letters but the data has shape {shape}", path=path)
    if len(set(ax)) != len(ax) or not ax.isalpha():
        raise InputError(f"axes {axes!r} must be distinct letters, one per dimension", path=path)
    return ax


def _imagej_compatible(axes: str, data: np.ndarray) -> bool:
    if data.dtype not in _IMAGEJ_DTYPES:
        return False
    if any(a not in _IMAGEJ_ORDER for a in axes):
        return False
    if [_IMAGEJ_ORDER.index(a) for a in axes] != sorted(_IMAGEJ_ORDER.index(a) for a in axes):
        return False
    if not (axes.endswith("YX") or axes.endswith("YXS")):
        return False
    if "S" in axes and (data.dtype != np.uint8 or data.shape[-1] != 3):
        # ImageJ only knows 8-bit RGB
        return False
    # ImageJ drops singleton dimensions, which would change the axes read back.
    return all(n > 1 for n in data.shape)


def write_tiff(
    path: PathLike,
    data: Any,
    *,
    axes: str | None = None,
    compression: str | None = None,
) -> Path:
    """Write an image to a TIFF file atomically.

    With ``axes`` (one letter per dimension, e.g. ``"ZCYX"``), the axes are stored in the file so
    that :func:`read_tiff_with_axes` returns them: as ImageJ hyperstack metadata when ImageJ can
    represent the data (axes a subset of ``TZCYXS`` in that order, no singleton dimensions, dtype
    ``uint8``, ``uint16`` or ``float32``), else as tifffile's own shaped metadata (any dtype, any
    order). Without ``axes`` every leading dimension is written as grey pages (never guessed to be RGB)
    and the shape is still restored on reading.

    Parameters
    ----------
    path
        Output file.
    data
        The image (numeric, non-empty, finite).
    axes
        Axes labels, e.g. ``"YX"``, ``"CYX"``, ``"ZCYX"``, ``"YXS"`` (S = RGB samples).
    compression
        tifffile compression name; ``"zlib"`` (lossless) needs no extra package, others may need
        ``imagecodecs``.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    InputError
        If the data are empty, non-numeric or non-finite, ``axes`` does not fit the shape, or the
        compression is unavailable.
    """
    p = Path(path)
    arr = check_image(data, path=p, name="data")
    kwargs: dict[str, Any] = {"compression": compression}
    if axes is None:
        # minisblack: tifffile would otherwise read a leading or trailing dimension of 3 or 4 as RGB.
        kwargs.update(photometric="minisblack")
    else:
        ax = _check_axes(axes, arr.shape, path=p)
        if _imagej_compatible(ax, arr):
            kwargs.update(imagej=True, metadata={"axes": ax})
        else:
            rgb = ax.endswith("S") and arr.shape[-1] in (3, 4)
            kwargs.update(metadata={"axes": ax}, photometric="rgb" if rgb else "minisblack")
    with atomic_path(p) as tmp:
        try:
            tifffile.imwrite(tmp, arr, **kwargs)
        except ImportError as exc:
            raise InputError(
                f"TIFF compression {compression!r} needs the imagecodecs package; 'zlib' works without it",
                path=p,
            ) from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"cannot write TIFF ({exc})", path=p) from exc
    logger.debug("wrote %s %s %s", p, arr.shape, arr.dtype)
    return p


# --------------------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------------------


def read_png(path: PathLike) -> np.ndarray:
    """Read a PNG image.

    Parameters
    ----------
    path
        The ``.png`` file.

    Returns
    -------
    numpy.ndarray
        ``(Y, X)`` ``uint8`` or ``uint16`` for greyscale, ``(Y, X, 2)`` for grey + alpha,
        ``(Y, X, 3)`` / ``(Y, X, 4)`` ``uint8`` for RGB / RGBA. Palette images are expanded to RGB(A);
        1-bit images become ``uint8`` 0 / 255.

    Raises
    ------
    InputError
        If the file is missing, not a readable image, or empty.
    """
    from PIL import Image, UnidentifiedImageError

    p = _require_file(path)
    try:
        with Image.open(p) as img:
            img.load()
            mode = img.mode
            if mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            elif mode == "PA":
                img = img.convert("RGBA")
            elif mode == "1":
                img = img.convert("L")
            arr = np.array(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read PNG image, it is corrupt or not an image ({exc})", path=p) from exc
    if mode in ("I", "I;16", "I;16B", "I;16L") and arr.dtype != np.uint16:
        # Pillow hands some 16-bit greyscale PNGs back as 32-bit "I"; they always fit in uint16.
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.uint16).max):
            raise InputError(f"unexpected {mode} pixel values outside the 16-bit range", path=p)
        arr = arr.astype(np.uint16)
    return check_image(arr, path=p)


def write_png(path: PathLike, data: Any) -> Path:
    """Write an integer image to a PNG file atomically (lossless).

    Parameters
    ----------
    path
        Output file.
    data
        ``(Y, X)`` ``uint8`` or ``uint16`` greyscale, or ``(Y, X, 2|3|4)`` ``uint8`` grey-alpha /
        RGB / RGBA. Float images are refused: PNG stores integers, so convert explicitly first.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    InputError
        For float or other unsupported pixel types or shapes.
    """
    from PIL import Image

    p = Path(path)
    arr = np.asarray(data)
    if np.issubdtype(arr.dtype, np.floating):
        raise InputError(
            f"PNG stores integer pixels, got a {arr.dtype} image; convert it first, e.g. "
            "(np.clip(x, 0, 1) * 255).round().astype(np.uint8) for 8 bits or * 65535 -> np.uint16, "
            "or write a TIFF to keep floats",
            path=p,
        )
    arr = check_image(arr, path=p, ndim=(2, 3), name="data")
    if arr.ndim == 2:
        if arr.dtype not in (np.uint8, np.uint16):
            raise InputError(f"greyscale PNG must be uint8 or uint16, got {arr.dtype}; convert with .astype()", path=p)
    elif arr.dtype != np.uint8 or arr.shape[-1] not in (2, 3, 4):
        raise InputError(
            f"colour PNG must be (Y, X, 3) RGB or (Y, X, 4) RGBA uint8, got shape {arr.shape} {arr.dtype}",
            path=p,
        )
    # native byte order: Pillow maps big-endian uint16 to a different mode.
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    img = Image.fromarray(arr)
    with atomic_path(p) as tmp:
        # format given explicitly: the temporary file's suffix is .tmp
        img.save(tmp, format="PNG")
    return p


# --------------------------------------------------------------------------------------------------
# NumPy
# --------------------------------------------------------------------------------------------------


def load_npy(
    path: PathLike,
    *,
    mmap: bool = True,
    ndim: int | tuple[int, ...] | None = None,
    shape_tail: tuple[int | None, ...] | None = None,
) -> np.ndarray:
    """Load a ``.npy`` array, memory-mapped read-only by default.

    Pickled (object) arrays are never loaded: unpickling runs arbitrary code.

    Parameters
    ----------
    path
        The ``.npy`` file.
    mmap
        Memory-map the file (``np.load(mmap_mode="r")``) instead of reading it into memory.
    ndim
        Expected number of dimensions (an int or a tuple of allowed ints).
    shape_tail
        Expected trailing shape, e.g. ``(100, 100, 4)``; ``None`` entries match any size.

    Returns
    -------
    numpy.ndarray
        A read-only :class:`numpy.memmap` when ``mmap``, else an in-memory array.

    Raises
    ------
    InputError
        If the file is missing, not a ``.npy`` file, truncated, holds objects, or has the wrong
        dimensions.
    """
    p = _require_file(path)
    try:
        arr = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        msg = str(exc)
        if ("allow_pickle" in msg and "Object arrays" in msg) or "Python objects" in msg:
            raise InputError(
                "the array holds Python objects (pickled data), which protloc never loads; save a "
                "numeric array instead",
                path=p,
            ) from exc
        if "pickled data" in msg or "allow_pickle" in msg:
            raise InputError("not a NumPy .npy file (no .npy header)", path=p) from exc
        raise InputError(f"corrupt or truncated .npy file ({msg})", path=p) from exc
    except (OSError, EOFError) as exc:
        raise InputError(f"cannot read .npy file ({exc})", path=p) from exc
    if not isinstance(arr, np.ndarray):
        # np.load returns an NpzFile for .npz archives
        with contextlib.suppress(Exception):
            arr.close()
        raise InputError("expected a single-array .npy file, got an .npz archive", path=p)
    if arr.dtype.hasobject:
        raise InputError("the array holds Python objects, which protloc never loads", path=p)
    if ndim is not None and not _ndim_ok(arr.ndim, ndim):
        raise InputError(
            f"expected a {_describe_ndim(ndim)} array, got shape {tuple(arr.shape)}",
            path=p,
        )
    if shape_tail is not None:
        tail = tuple(shape_tail)
        actual = tuple(arr.shape[-len(tail) :]) if tail else ()
        ok = len(arr.shape) >= len(tail) and all(e is None or e == a for e, a in zip(tail, actual, strict=True))
        if not ok:
            want = "(..., " + ", ".join("?" if e is None else str(e) for e in tail) + ")"
            raise InputError(f"expected an array of shape {want}, got {tuple(arr.shape)}", path=p)
    return arr


def save_npy(path: PathLike, array: Any) -> Path:
    """Save an array to a ``.npy`` file atomically (never pickled).

    Parameters
    ----------
    path
        Output file.
    array
        Numeric (or other non-object) array.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    InputError
        If the array holds Python objects.
    """
    p = Path(path)
    arr = np.asarray(array)
    if arr.dtype.hasobject:
        raise InputError("cannot save an object array to .npy without pickling", path=p)
    with atomic_path(p) as tmp, open(tmp, "wb") as fh:
        # a file handle, not a name: np.save would append ".npy" to the temporary name
        np.save(fh, arr, allow_pickle=False)
    return p


# --------------------------------------------------------------------------------------------------
# any image
# --------------------------------------------------------------------------------------------------


def read_image(path: PathLike) -> np.ndarray:
    """Read a TIFF, PNG or NPY image, chosen by the file suffix.

    Parameters
    ----------
    path
        ``.tif`` / ``.tiff``, ``.png`` or ``.npy`` file (an ``.npy`` is read into memory).

    Returns
    -------
    numpy.ndarray
        The validated image (non-empty, numeric, finite).

    Raises
    ------
    InputError
        For an unknown suffix or any error of the format's reader.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return read_tiff(p)
    if suffix in PNG_SUFFIXES:
        return read_png(p)
    if suffix in NPY_SUFFIXES:
        return check_image(load_npy(p, mmap=False), path=p)
    known = ", ".join(TIFF_SUFFIXES + PNG_SUFFIXES + NPY_SUFFIXES)
    raise InputError(f"unknown image format {p.suffix!r}; expected one of {known}", path=p)


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------

_TAB_SUFFIXES = {".tsv", ".tab", ".txt"}
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zip"}
# Only in a column that is otherwise numeric do these mean "missing"; in a text column they are text
# (a protein could be called "NA" or "NAN").
_NA_TOKENS = {"NA", "N/A", "n/a", "NaN", "nan", "-nan", "null", "NULL", "None", "#N/A"}
_BOOL_TOKENS = {"True": True, "False": False, "TRUE": True, "FALSE": False, "true": True, "false": False}
# "0001", "-007": identifiers with leading zeros, which a number conversion would destroy.
_LEADING_ZERO = re.compile(r"^\s*[+-]?0\d")


def _table_suffix(path: Path) -> tuple[str, bool]:
    suffixes = [s.lower() for s in path.suffixes]
    compressed = bool(suffixes) and suffixes[-1] in _COMPRESSION_SUFFIXES
    if compressed:
        suffixes = suffixes[:-1]
    return (suffixes[-1] if suffixes else ""), compressed


def _table_sep(path: Path) -> str:
    suffix, compressed = _table_suffix(path)
    if suffix in _TAB_SUFFIXES:
        return "\t"
    if compressed:
        return ","
    # a ".csv" exported from a spreadsheet as tab-separated is common; look at the header line.
    with open(path, "rb") as fh:
        header = fh.readline(65536).decode("utf-8", errors="replace")
    return "\t" if header.count("\t") > header.count(",") else ","


def _infer_column(s: pd.Series) -> pd.Series:
    """Convert a column read as text to numbers or booleans where that loses nothing."""
    values = s.dropna()
    if values.empty:
        return s.astype(float)
    text = values.astype(str)
    if text.isin(_BOOL_TOKENS).all():
        if len(values) == len(s):
            return s.map(_BOOL_TOKENS).astype(bool)
        return s
    if text.str.match(_LEADING_ZERO).any():
        return s
    is_na = text.isin(_NA_TOKENS)
    if is_na.all():
        return s
    candidate = s.where(~s.isin(_NA_TOKENS))
    try:
        num = pd.to_numeric(candidate)
    except (ValueError, TypeError, OverflowError):
        return s
    if num.dtype == object:
        return s
    return num


def _is_text_dtype(dtype: Any) -> bool:
    if dtype in (str, object, "str", "object", "string"):
        return True
    try:
        return np.dtype(dtype).kind in "OUS"
    except TypeError:
        return False


def _read_table(
    path: PathLike,
    *,
    required: Sequence[str] = (),
    unique: Sequence[str] = (),
    dtype: Any = None,
    allow_empty: bool = False,
) -> pd.DataFrame:
    p = _require_file(path, what="table")
    if isinstance(required, str) or isinstance(unique, str):
        raise TypeError("required= and unique= take sequences of column names, not a string")
    sep = _table_sep(p)
    try:
        # Everything is read as text with only empty cells missing, then converted column by
        # column: pandas' own inference turns "0001" into 1 and gene names like "NA" into NaN.
        df = pd.read_csv(
            p,
            sep=sep,
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            encoding="utf-8-sig",  # drops the byte-order mark spreadsheets write
            skip_blank_lines=True,
        )
    except pd.errors.EmptyDataError as exc:
        raise InputError("the table is empty (no header line)", path=p) from exc
    except pd.errors.ParserError as exc:
        raise InputError(f"cannot parse the table ({exc})", path=p) from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"the table is not UTF-8 text ({exc})", path=p) from exc
    df.columns = [str(c).strip() for c in df.columns]
    if df.columns.duplicated().any():
        dup = df.columns[df.columns.duplicated()][0]
        raise InputError(f"column {dup!r} appears more than once in the header", path=p)
    if len(df) == 0 and not allow_empty:
        raise InputError("the table has a header but no rows", path=p)

    wanted = list(dict.fromkeys([*required, *unique]))
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise InputError(
            f"missing required column(s) {', '.join(repr(c) for c in missing)}; "
            f"the table has {', '.join(repr(c) for c in df.columns)}",
            path=p,
        )

    explicit = dict(dtype) if isinstance(dtype, Mapping) else {}
    for col in df.columns:
        want = explicit.get(col) if isinstance(dtype, Mapping) else dtype
        if want is None:
            df[col] = _infer_column(df[col])
        elif _is_text_dtype(want):
            # already text; astype(str) would turn empty cells into the string "nan"
            continue
        else:
            try:
                df[col] = df[col].astype(want)
            except (ValueError, TypeError) as exc:
                raise InputError(f"column {col!r} cannot be read as {want} ({exc})", path=p) from exc

    for col in required:
        s = df[col]
        blank = s.isna()
        if s.dtype == object:
            blank |= s.astype(str).str.strip().eq("")
        if blank.any():
            row = int(np.flatnonzero(blank.to_numpy())[0])
            raise InputError(
                f"required column {col!r} is empty (line {row + 2} of the file)",
                path=p,
                row=row,
            )
    for col in unique:
        dup = df[col].duplicated(keep="first").to_numpy()
        if dup.any():
            row = int(np.flatnonzero(dup)[0])
            value = df[col].iloc[row]
            shown = value.item() if isinstance(value, np.generic) else value
            first = int(np.flatnonzero((df[col] == value).to_numpy())[0])
            raise InputError(
                f"duplicate value {shown!r} in column {col!r} (line {row + 2} of the file; first seen in row {first})",
                path=p,
                row=row,
            )
    return df


def read_table(
    path: PathLike,
    *,
    required: Sequence[str] = (),
    unique: Sequence[str] = (),
    dtype: Any = None,
) -> pd.DataFrame:
    """Read a CSV or TSV table and check its columns.

    The separator follows the suffix: ``.tsv``, ``.tab`` and ``.txt`` are tab-separated; ``.csv``
    (and anything else) is comma-separated unless its header line has more tabs than commas.
    ``.gz`` / ``.bz2`` / ``.xz`` / ``.zip`` compression is undone by pandas.

    Cells are read as text and only an empty cell is missing. Each column is then turned into
    numbers (or booleans) only when that loses nothing, so identifiers survive as strings:
    ``"0001"`` stays ``"0001"``, ``"ENSG00000123"`` stays text, a protein called ``"NA"`` stays
    ``"NA"``. In a column that is otherwise numeric, ``NA`` / ``NaN`` / ``null`` mean missing. A
    column of plain numbers (``"12"``) does become numeric; pass ``dtype={"col": str}`` to keep it
    text.

    Parameters
    ----------
    path
        The table file.
    required
        Columns that must exist and have no empty cell.
    unique
        Columns that must exist and hold no repeated value.
    dtype
        Optional type for all columns (e.g. ``str``), or a mapping column -> type; columns not in
        the mapping are inferred as above.

    Returns
    -------
    pandas.DataFrame
        The table, with a default ``RangeIndex`` (row ``i`` is data line ``i + 2`` of the file).

    Raises
    ------
    InputError
        If the file is missing or unparsable, the table has no rows, a required column is missing
        (all missing ones are named) or has an empty cell (column and row named), or a unique column
        has a repeated value (value and row named).
    """
    return _read_table(path, required=required, unique=unique, dtype=dtype)


def write_table(df: pd.DataFrame, path: PathLike) -> Path:
    """Write a DataFrame atomically as CSV, or TSV for ``.tsv`` / ``.tab`` / ``.txt`` (no index).

    Parameters
    ----------
    df
        The table.
    path
        Output file; ``.gz`` etc. compress it.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"write_table expects a pandas DataFrame, got {type(df).__name__}")
    p = Path(path)
    suffix, compressed = _table_suffix(p)
    sep = "\t" if suffix in _TAB_SUFFIXES else ","
    compression = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zip": "zip"}[p.suffix.lower()] if compressed else None
    with atomic_path(p) as tmp:
        df.to_csv(tmp, sep=sep, index=False, compression=compression)
    return p


# --------------------------------------------------------------------------------------------------
# Zarr crop stores
# --------------------------------------------------------------------------------------------------

_STORE_MARKER = "protloc_crop_store"
_STORE_VERSION = 1
_CHANNEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _store_paths(path: PathLike) -> tuple[Path, Path]:
    """``out/train``, ``out/train.zarr`` or ``out/train.csv`` -> (``out/train.zarr``, ``out/train.csv``)."""
    p = Path(path)
    if p.suffix == ".zarr":
        zpath = p
    elif p.suffix == ".csv":
        zpath = p.with_suffix(".zarr")
    else:
        zpath = p.with_name(p.name + ".zarr")
    return zpath, zpath.with_suffix(".csv")


def _create_zarr_array(group: Any, name: str, *, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any):
    if hasattr(group, "create_array"):  # zarr >= 3
        return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype)
    return group.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype)  # zarr 2


class CropStoreWriter:
    """Writes a crop store; returned by :meth:`CropStore.create`, use it as a context manager.

    Crops are written to a temporary folder beside the store; on a clean exit of the ``with``
    block the obs table is written and both are renamed into place. On an exception nothing is left
    behind and a previous store at the same path is untouched.
    """

    def __init__(
        self,
        path: Path,
        csv_path: Path,
        *,
        channels: dict[str, np.dtype],
        size: int,
        chunk: int,
    ) -> None:
        self.path = path
        self.csv_path = csv_path
        self.channels = list(channels)
        self.size = size
        self._dtypes = channels
        self._chunk = chunk
        self._stack: contextlib.ExitStack | None = None
        self._group: Any = None
        self._arrays: dict[str, Any] = {}
        self._obs: list[pd.DataFrame] = []
        self._n = 0
        self._written = 0
        # Crops are buffered and written in whole chunks: appending a few crops at a time to a Zarr
        # array re-reads and re-writes its last partial chunk each time, which dominated run time.
        self._pending: dict[str, list[np.ndarray]] = {name: [] for name in channels}
        self._done = False

    def __len__(self) -> int:
        return self._n

    def __enter__(self) -> CropStoreWriter:
        if self._stack is not None or self._done:
            raise RuntimeError("a CropStoreWriter can be entered only once")
        stack = contextlib.ExitStack()
        tmp = stack.enter_context(atomic_dir(self.path))
        try:
            self._group = zarr.open_group(str(tmp), mode="w")
            s = self.size
            for name, dt in self._dtypes.items():
                self._arrays[name] = _create_zarr_array(
                    self._group, name, shape=(0, s, s), chunks=(self._chunk, s, s), dtype=dt
                )
            self._write_attrs()
        except BaseException:
            stack.__exit__(*sys.exc_info())
            raise
        self._stack = stack
        return self

    def _write_attrs(self) -> None:
        self._group.attrs.update(
            {_STORE_MARKER: _STORE_VERSION, "channels": self.channels, "size": self.size, "n": self._n}
        )

    def append(self, arrays: Mapping[str, Any], obs: pd.DataFrame) -> None:
        """Append a batch of crops and their obs rows.

        Parameters
        ----------
        arrays
            One ``[n, S, S]`` array per channel of the store (no more, no fewer). Values are cast to
            the channel's dtype; float values must be finite, integer values must fit the dtype.
        obs
            ``n`` rows describing the crops, in the same order. A ``crop_index`` column is set to the
            crops' positions in the store.

        Raises
        ------
        InputError
            On a missing or unknown channel, a wrong shape, a row count that differs from ``n``,
            non-finite values or values the channel's dtype cannot hold.
        """
        if self._stack is None:
            raise RuntimeError("use CropStore.create(...) as a context manager: `with ... as writer:`")
        where = self.path
        if not isinstance(obs, pd.DataFrame):
            raise InputError(f"obs must be a pandas DataFrame, got {type(obs).__name__}", path=where)
        missing = [c for c in self.channels if c not in arrays]
        unknown = [c for c in arrays if c not in self._dtypes]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing channel(s) {missing}")
            if unknown:
                parts.append(f"unknown channel(s) {unknown}")
            raise InputError(f"{'; '.join(parts)}; the store has channels {self.channels}", path=where)
        n = len(obs)
        s = self.size
        batch: dict[str, np.ndarray] = {}
        for name in self.channels:
            arr = np.asarray(arrays[name])
            if arr.shape != (n, s, s):
                raise InputError(
                    f"channel {name!r} has shape {arr.shape}, expected ({n}, {s}, {s}) for {n} obs rows",
                    path=where,
                )
            batch[name] = self._cast(name, arr)
        if n == 0:
            return
        for name in self.channels:
            self._pending[name].append(batch[name])
        frame = obs.reset_index(drop=True).copy()
        if "crop_index" in frame.columns:
            frame = frame.drop(columns="crop_index")
        frame.insert(0, "crop_index", np.arange(self._n, self._n + n, dtype=np.int64))
        self._obs.append(frame)
        self._n += n
        if self._n - self._written >= self._chunk:
            self._flush(final=False)
        logger.debug("appended %d crops to %s (now %d)", n, self.path, self._n)

    def _flush(self, *, final: bool) -> None:
        """Write buffered crops: whole chunks only, unless ``final``."""
        pending = self._n - self._written
        count = pending if final else (pending // self._chunk) * self._chunk
        if count == 0:
            return
        start, stop = self._written, self._written + count
        for name in self.channels:
            block = np.concatenate(self._pending[name], axis=0)
            arr = self._arrays[name]
            arr.resize((stop, self.size, self.size))
            arr[start:stop] = block[:count]
            self._pending[name] = [block[count:]] if count < len(block) else []
        self._written = stop

    def _cast(self, name: str, arr: np.ndarray) -> np.ndarray:
        target = self._dtypes[name]
        where = self.path
        src = arr.dtype
        numeric = src == np.bool_ or (np.issubdtype(src, np.number) and not np.issubdtype(src, np.complexfloating))
        if not numeric:
            raise InputError(f"channel {name!r} has non-numeric data type {src}", path=where)
        if np.issubdtype(src, np.floating) and arr.size and not np.isfinite(arr).all():
            crop = int(np.flatnonzero(~np.isfinite(arr).reshape(len(arr), -1).all(axis=1))[0])
            raise InputError(f"channel {name!r} has NaN or Inf values (crop {crop} of this batch)", path=where)
        if np.issubdtype(target, np.integer) or target == np.bool_:
            if np.issubdtype(src, np.floating):
                raise InputError(f"channel {name!r} is {target}, got float values; convert them explicitly", path=where)
            if arr.size and np.issubdtype(target, np.integer):
                info = np.iinfo(target)
                lo, hi = arr.min(), arr.max()
                if lo < info.min or hi > info.max:
                    raise InputError(f"channel {name!r} values {lo}..{hi} do not fit its type {target}", path=where)
        return np.ascontiguousarray(arr, dtype=target)

    def close(self) -> None:
        """Finish the store: write the obs table and move both into place."""
        if self._stack is None:
            raise RuntimeError("the writer is not open")
        stack, self._stack = self._stack, None
        try:
            self._flush(final=True)
            self._write_attrs()
            if self._obs:
                obs = pd.concat(self._obs, ignore_index=True)
            else:
                obs = pd.DataFrame({"crop_index": pd.Series([], dtype=np.int64)})
            with atomic_path(self.csv_path) as tmp_csv:
                obs.to_csv(tmp_csv, index=False)
                # The two renames cannot be one atomic step; the Zarr group goes first and
                # CropStore.open() checks that both agree on the number of crops.
                stack.close()
        except BaseException:
            stack.__exit__(*sys.exc_info())
            raise
        finally:
            self._done = True
        logger.info("wrote crop store %s (%d crops, channels %s)", self.path, self._n, self.channels)

    def abort(self) -> None:
        """Discard everything written so far."""
        if self._stack is None:
            return
        stack, self._stack = self._stack, None
        self._done = True
        stack.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._stack is None:
            return False
        if exc_type is None:
            self.close()
            return False
        stack, self._stack = self._stack, None
        self._done = True
        stack.__exit__(exc_type, exc, tb)
        return False


def _describe(indices: Any) -> str:
    """A short description of a crop selection for error messages."""
    if isinstance(indices, slice):
        return f"{indices.start or 0}:{'' if indices.stop is None else indices.stop}"
    if isinstance(indices, int | np.integer):
        return str(int(indices))
    idx = np.asarray(indices).ravel()
    return f"{idx[:3].tolist()}{'...' if idx.size > 3 else ''} ({idx.size} crops)"


class CropStore:
    """A read-only crop store: ``<name>.zarr`` (one ``[N, S, S]`` array per channel) + ``<name>.csv``.

    Open one with :meth:`CropStore.open`; write one with :meth:`CropStore.create`.

    Examples
    --------
    >>> with CropStore.create("out/train", channels={"protein": "float32"}, size=100) as w:  # doctest: +SKIP
    ...     w.append({"protein": crops}, obs)
    >>> store = CropStore.open("out/train.zarr")  # doctest: +SKIP
    >>> store["protein"][0].shape  # doctest: +SKIP
    (100, 100)
    """

    def __init__(self, path: Path, csv_path: Path, group: Any, obs: pd.DataFrame) -> None:
        self._path = path
        self._csv_path = csv_path
        self._group = group
        attrs = dict(group.attrs)
        self._channels = [str(c) for c in attrs["channels"]]
        self._size = int(attrs["size"])
        self._n = int(attrs["n"])
        self._obs = obs

    @staticmethod
    def create(
        path: PathLike,
        *,
        channels: Mapping[str, str | np.dtype | type],
        size: int,
        chunk: int = 64,
        overwrite: bool = False,
    ) -> CropStoreWriter:
        """Start writing a crop store.

        Parameters
        ----------
        path
            ``out/name.zarr`` (or ``out/name``); the obs table goes to ``out/name.csv``.
        channels
            Channel name -> dtype, in store order, e.g. ``{"protein": "float32", "threshold": "uint8"}``.
        size
            Crop side ``S`` in pixels.
        chunk
            Crops per Zarr chunk along the first axis.
        overwrite
            Replace an existing store (only once the new one is complete).

        Returns
        -------
        CropStoreWriter
            A context manager; call ``append`` inside the ``with`` block.

        Raises
        ------
        InputError
            If the store or its CSV exists and ``overwrite`` is false, or channels / size / chunk
            are invalid.
        """
        zpath, cpath = _store_paths(path)
        if not overwrite:
            for existing in (zpath, cpath):
                if existing.exists():
                    raise InputError("output already exists (pass --overwrite to replace it)", path=existing)
        if not channels:
            raise InputError("a crop store needs at least one channel", path=zpath)
        dtypes: dict[str, np.dtype] = {}
        for name, dt in channels.items():
            if not isinstance(name, str) or not _CHANNEL_NAME.match(name):
                raise InputError(f"invalid channel name {name!r}: use letters, digits, '_', '.', '-'", path=zpath)
            try:
                d = np.dtype(dt)
            except TypeError as exc:
                raise InputError(f"channel {name!r}: invalid dtype {dt!r}", path=zpath) from exc
            if not (d == np.bool_ or np.issubdtype(d, np.integer) or np.issubdtype(d, np.floating)):
                raise InputError(f"channel {name!r}: dtype must be integer, float or bool, got {d}", path=zpath)
            dtypes[name] = d
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
            raise InputError(f"crop size must be a positive integer, got {size!r}", path=zpath)
        if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 1:
            raise InputError(f"chunk must be a positive integer, got {chunk!r}", path=zpath)
        return CropStoreWriter(zpath, cpath, channels=dtypes, size=int(size), chunk=int(chunk))

    @classmethod
    def open(cls, path: PathLike) -> CropStore:
        """Open a crop store for reading (arrays stay on disk; the obs table is loaded).

        Parameters
        ----------
        path
            ``out/name.zarr`` (or ``out/name`` / ``out/name.csv``).

        Returns
        -------
        CropStore

        Raises
        ------
        InputError
            If the store or its CSV is missing, the folder is not a protloc crop store, a channel
            array is missing or has the wrong shape, or the CSV row count differs from the store's.
        """
        zpath, cpath = _store_paths(path)
        if not zpath.is_dir():
            raise InputError("crop store not found (expected a .zarr folder)", path=zpath)
        try:
            group = zarr.open_group(str(zpath), mode="r")
            attrs = dict(group.attrs)
        except Exception as exc:  # zarr raises version-specific types for a non-group folder
            raise InputError(f"not a Zarr group ({exc})", path=zpath) from exc
        version = attrs.get(_STORE_MARKER)
        if version is None:
            raise InputError(f"not a protloc crop store (no {_STORE_MARKER!r} attribute)", path=zpath)
        if version != _STORE_VERSION:
            raise InputError(
                f"crop store format version {version!r} is not supported (this protloc reads {_STORE_VERSION})",
                path=zpath,
            )
        try:
            channels = [str(c) for c in attrs["channels"]]
            size = int(attrs["size"])
            n = int(attrs["n"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"crop store attributes are incomplete or invalid ({exc})", path=zpath) from exc
        for name in channels:
            try:
                arr = group[name]
            except KeyError as exc:
                raise InputError(f"channel array {name!r} is missing", path=zpath) from exc
            if tuple(arr.shape) != (n, size, size):
                raise InputError(
                    f"channel {name!r} has shape {tuple(arr.shape)}, expected ({n}, {size}, {size}) "
                    f"from the store attributes",
                    path=zpath,
                )
        if not cpath.is_file():
            raise InputError(f"the crop table of store {zpath} is missing", path=cpath)
        # identifiers and annotations stay text even when they look numeric (fov_id "0001", "12")
        text = {col: str for col in ("protein_id", "fov_id", "split", "label", "sequence")}
        obs = _read_table(cpath, required=("crop_index",), dtype=text, allow_empty=True)
        if len(obs) != n:
            raise InputError(f"the crop table has {len(obs)} rows but the store {zpath} holds {n} crops", path=cpath)
        if n and not np.array_equal(obs["crop_index"].to_numpy(), np.arange(n)):
            bad = int(np.flatnonzero(obs["crop_index"].to_numpy() != np.arange(n))[0])
            raise InputError(
                f"crop_index must be 0..{n - 1} in order (store {zpath}); found {obs['crop_index'].iloc[bad]}",
                path=cpath,
                row=bad,
            )
        return cls(zpath, cpath, group, obs)

    @property
    def path(self) -> Path:
        """The ``.zarr`` folder."""
        return self._path

    @property
    def csv_path(self) -> Path:
        """The obs table beside the store."""
        return self._csv_path

    @property
    def channels(self) -> list[str]:
        """Channel names in store order."""
        return list(self._channels)

    @property
    def size(self) -> int:
        """Crop side ``S`` in pixels."""
        return self._size

    @property
    def obs(self) -> pd.DataFrame:
        """One row per crop, in store order (``crop_index`` = position)."""
        return self._obs

    @property
    def fingerprint(self) -> str:
        """A short hash of what the store holds: crop size, channels and, per crop, protein, field and split.

        Runs and embeddings record it, so a command given a store of other crops can refuse the pair
        (``--resume`` on another store, ``atlas --store`` of another run). Two stores prepared alike from the
        same fields of view have the same fingerprint; moving or copying a store keeps it.
        """
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.sha256(f"{self._size}|{','.join(self._channels)}|{self._n}|".encode())
            cols = [c for c in ("protein_id", "fov_id", "split") if c in self._obs.columns]
            h.update(self._obs[cols].astype(str).to_csv(index=False).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def __len__(self) -> int:
        return self._n

    def __contains__(self, channel: object) -> bool:
        return channel in self._channels

    def __getitem__(self, channel: str) -> Any:
        """The lazy Zarr array ``[N, S, S]`` of one channel."""
        if channel not in self._channels:
            raise InputError(f"no channel {channel!r}; the store has {self._channels}", path=self._path)
        return self._group[channel]

    def __repr__(self) -> str:
        return f"CropStore({str(self._path)!r}, n={self._n}, size={self._size}, channels={self._channels})"

    def read(
        self,
        indices: int | slice | Sequence[int] | np.ndarray,
        channels: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Read crops into memory.

        Parameters
        ----------
        indices
            A crop index (gives ``[S, S]`` arrays), a slice, or a sequence of indices in any order,
            repeats allowed (gives ``[n, S, S]`` in that order). Negative indices count from the end.
        channels
            Channels to read; all by default.

        Returns
        -------
        dict of str to numpy.ndarray
            Channel name -> crops.
        """
        names = self._channels if channels is None else list(channels)
        for name in names:
            if name not in self._channels:
                raise InputError(f"no channel {name!r}; the store has {self._channels}", path=self._path)
        try:
            return self._read(indices, names)
        except (RuntimeError, ValueError, OSError, EOFError) as exc:
            # a damaged or truncated chunk surfaces as a codec error deep in zarr / numcodecs
            raise InputError(
                f"cannot read crops {_describe(indices)}: a chunk is damaged or truncated ({exc})", path=self._path
            ) from exc

    def _read(self, indices: int | slice | Sequence[int] | np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        n = self._n
        if isinstance(indices, slice):
            return {name: np.asarray(self._group[name][indices]) for name in names}
        if isinstance(indices, int | np.integer):
            i = int(indices)
            if not -n <= i < n:
                raise IndexError(f"crop {i} out of range for a store of {n} crops")
            return {name: np.asarray(self._group[name][i % n]) for name in names}
        idx = np.asarray(indices)
        if idx.dtype == np.bool_:
            if idx.shape != (n,):
                raise IndexError(f"boolean mask of shape {idx.shape} does not match {n} crops")
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise IndexError("indices must be an int, a slice or a 1-D sequence of ints")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"crop index out of range for a store of {n} crops")
        idx = idx % max(n, 1)
        s = self._size
        out: dict[str, np.ndarray] = {}
        if idx.size == 0:
            for name in names:
                out[name] = np.empty((0, s, s), dtype=self._group[name].dtype)
            return out
        # Sorted unique indices touch each chunk once; the inverse puts crops back in request order.
        uniq, inverse = np.unique(idx, return_inverse=True)
        for name in names:
            block = np.asarray(self._group[name].oindex[uniq])
            out[name] = block[inverse]
        return out

"""Image pre-processing: fields of view -> nucleus-centred crops for cytoself and CELL-E, and single
images -> the inputs a trained CELL-E takes.

The steps follow the papers:

* cytoself (Kobayashi et al. 2022, Methods "Image data pre-processing"): z maximum-intensity
  projection, 2x XY downsampling (1024 -> 512), nucleus segmentation (Gaussian low-pass + Li
  threshold, "Nucleus segmentation"), a signed distance transform of the nucleus mask (positive
  inside, negative outside), 100 x 100 crops centred on cells away from the image edges, intensities
  normalized to [0, 1] and the distance channel to [-1, 1].
* CELL-E (Khwaja et al. 2023, S.3.1 and Sec. 4.3): maximum-intensity projection, 256 x 256 crops,
  and a binarized protein image ``pixel >= mean`` used as the threshold-image target.

The model-input functions at the end (:func:`nucleus_to_model`, :func:`threshold_to_model`,
:func:`reference_nucleus`) turn one user image into the ``[S, S]`` crop a CELL-E model sees in
``protloc predict``, ``fill`` and ``screen``, scaled and resized as ``protloc prepare`` and the CELL-E data
pipeline treat the training crops.

Everything here is NumPy / SciPy / scikit-image on in-memory arrays (PyTorch only to resize a model
input as the CELL-E data pipeline does); reading and writing files is the job of :mod:`protloc.data.io`
and :mod:`protloc.data.prepare`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from protloc.data.io import check_image
from protloc.errors import ConfigError, InputError, ProtlocError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_NUCLEUS_DIAMETER_UM",
    "DEFAULT_PIXEL_SIZE_UM",
    "FovCrops",
    "PrepareParams",
    "cell_centres",
    "downsample2x",
    "extract_crops",
    "max_project",
    "normalize_distance",
    "normalize_intensity",
    "nucleus_to_model",
    "process_fov",
    "reference_nucleus",
    "segment_nuclei",
    "signed_distance",
    "square_to_model",
    "threshold_mean",
    "threshold_to_model",
]

_SEGMENTATION_METHODS = ("li", "cellpose")
_DISTANCE_MODES = ("separate", "maxabs")
_INTENSITY_NORMS = ("crop", "fov")


# ----------------------------------------------------------------------------------------------------
# small helpers


def _as_array(image: object, *, what: str, source: str | None) -> np.ndarray:
    """Return ``image`` as an ndarray of a real numeric dtype, or raise :class:`InputError`."""
    arr = np.asarray(image)
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"{what}: expected a numeric image, got dtype {arr.dtype}", path=source)
    return arr


def _check_finite(arr: np.ndarray, *, what: str, source: str | None) -> None:
    """Raise :class:`InputError` if a float array holds NaN or infinite values."""
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise InputError(f"{what}: {n_bad} NaN or infinite pixel(s)", path=source)


def _check_2d(arr: np.ndarray, *, what: str, source: str | None) -> None:
    if arr.ndim != 2:
        raise InputError(f"{what}: expected a 2-D (Y, X) image, got shape {arr.shape}", path=source)


def _minmax_stack(stack: np.ndarray) -> tuple[np.ndarray, int]:
    """Min-max scale each trailing 2-D image of ``stack`` to [0, 1] (float32).

    Constant images (e.g. a crop without protein signal) have no range to scale; they become zeros
    rather than NaN. Returns the scaled stack and the number of constant images.
    """
    x = np.asarray(stack, dtype=np.float32)
    if x.size == 0:
        return x.copy(), 0
    lo = x.min(axis=(-2, -1), keepdims=True)
    hi = x.max(axis=(-2, -1), keepdims=True)
    rng = hi - lo
    constant = rng <= 0
    # Divide (not multiply by 1 / range) so the maximum maps to exactly 1.0 in float32.
    out = (x - lo) / np.where(constant, np.float32(1.0), rng)
    out *= ~constant
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False), int(np.count_nonzero(constant))


# ----------------------------------------------------------------------------------------------------
# projection, downsampling, intensity normalization


def max_project(stack: np.ndarray, *, axis: int = 0, source: str | None = None) -> np.ndarray:
    """Maximum-intensity projection along z.

    cytoself (Methods, "Image data pre-processing") and CELL-E (S.3.1) both reduce each 3-D confocal
    stack to 2-D with a maximum-intensity projection along the z axis.

    Parameters
    ----------
    stack
        A z-stack ``(Z, Y, X)`` (or ``(Z, C, Y, X)`` with ``axis=0``), or an already projected 2-D
        image ``(Y, X)``, which is returned unchanged.
    axis
        The z axis.
    source
        File the image came from; named in error messages.

    Returns
    -------
    numpy.ndarray
        The projection, same dtype as ``stack``.

    Raises
    ------
    InputError
        If ``stack`` has fewer than two dimensions or ``axis`` is out of range.
    """
    arr = _as_array(stack, what="max_project", source=source)
    if arr.ndim < 2:
        raise InputError(f"max_project: expected a 2-D image or a z-stack, got shape {arr.shape}", path=source)
    if arr.ndim == 2:
        return arr
    if not -arr.ndim <= axis < arr.ndim:
        raise InputError(f"max_project: axis {axis} out of range for shape {arr.shape}", path=source)
    if arr.shape[axis] == 0:
        raise InputError(f"max_project: empty z axis in shape {arr.shape}", path=source)
    return arr.max(axis=axis)


def downsample2x(image: np.ndarray, *, source: str | None = None) -> np.ndarray:
    """Downsample by two in X and Y with a 2 x 2 block mean.

    cytoself (Methods) downsamples the 1024 x 1024 projections by a factor of two to 512 x 512.
    The mean over 2 x 2 blocks is the area-averaging (anti-aliased) choice. An odd last row / column
    has no partner and is dropped.

    Parameters
    ----------
    image
        Array whose last two axes are ``(Y, X)``; leading axes (channels, z) are kept.
    source
        File the image came from; named in error messages.

    Returns
    -------
    numpy.ndarray
        float32 array of shape ``(..., Y // 2, X // 2)``.

    Raises
    ------
    InputError
        If the image is not at least 2-D or smaller than 2 x 2.
    """
    arr = _as_array(image, what="downsample2x", source=source)
    if arr.ndim < 2 or arr.shape[-1] < 2 or arr.shape[-2] < 2:
        raise InputError(f"downsample2x: need an image of at least 2 x 2 pixels, got shape {arr.shape}", path=source)
    h, w = arr.shape[-2] // 2 * 2, arr.shape[-1] // 2 * 2
    a = arr[..., :h, :w].astype(np.float32, copy=False)
    # Sum of the four phases of the 2 x 2 grid: cheaper than reshape + mean and exact for uint16 input.
    out = a[..., 0::2, 0::2] + a[..., 1::2, 0::2]
    out += a[..., 0::2, 1::2]
    out += a[..., 1::2, 1::2]
    out *= np.float32(0.25)
    return out


def normalize_intensity(
    image: np.ndarray,
    *,
    low: float = 0.0,
    high: float = 100.0,
    source: str | None = None,
) -> np.ndarray:
    """Scale intensities to [0, 1] between two percentiles, clipping outside values.

    The defaults (0th and 100th percentiles) are plain min-max scaling, as in cytoself (Methods:
    "The raw pixel intensities in the fluorescence channel are normalized between 0 and 1").
    Other percentiles (e.g. ``low=0.5, high=99.5``) make the scaling robust to hot pixels.

    Parameters
    ----------
    image
        Image of any shape; one scale is used for the whole array.
    low, high
        Percentiles (0-100) mapped to 0 and 1; ``low < high``.
    source
        File the image came from; named in error messages.

    Returns
    -------
    numpy.ndarray
        float32 array in [0, 1], same shape as ``image``.

    Raises
    ------
    InputError
        On NaN / infinite pixels, an empty image, or a constant image (nothing to normalize).
    ConfigError
        If the percentiles are not ``0 <= low < high <= 100``.
    """
    if not 0.0 <= low < high <= 100.0:
        raise ConfigError(f"normalize_intensity: need 0 <= low < high <= 100, got low={low}, high={high}")
    arr = _as_array(image, what="normalize_intensity", source=source)
    if arr.size == 0:
        raise InputError("normalize_intensity: empty image", path=source)
    _check_finite(arr, what="normalize_intensity", source=source)
    x = arr.astype(np.float32, copy=False)
    if low == 0.0 and high == 100.0:
        lo, hi = float(x.min()), float(x.max())
    else:
        lo, hi = (float(v) for v in np.percentile(x, [low, high]))
    if hi <= lo:
        if float(x.min()) == float(x.max()):
            raise InputError("constant image: nothing to normalize", path=source)
        raise InputError(f"percentiles {low} and {high} are equal ({lo}): nothing to normalize", path=source)
    out = (x - np.float32(lo)) / np.float32(hi - lo)
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------------
# nucleus segmentation


def segment_nuclei(
    nucleus: np.ndarray,
    *,
    method: str = "li",
    sigma: float = 2.0,
    min_area: int = 64,
    fill_holes: bool = True,
    split_touching: bool = True,
    min_distance: int = 7,
    cellpose_model: str | None = None,
    source: str | None = None,
) -> np.ndarray:
    """Segment nuclei in a 2-D nucleus-stain (Hoechst) image.

    Method ``"li"`` follows the thresholding step of cytoself (Methods, "Nucleus segmentation"): a
    Gaussian low-pass filter, then Li's iterative minimum cross-entropy threshold. The paper's custom
    Laplacian-based refinement is replaced by the standard equivalents: hole filling, removal of
    specks smaller than ``min_area`` and a distance-transform watershed that splits touching nuclei
    (the under-segmentation the refinement targets).

    Method ``"cellpose"`` runs a Cellpose model from local weights (``cellpose_model``); cellpose is
    an optional dependency (``pip install 'protloc[cellpose]'``) and nothing is downloaded.

    Parameters
    ----------
    nucleus
        2-D nucleus image ``(Y, X)``, any numeric dtype.
    method
        ``"li"`` or ``"cellpose"``.
    sigma
        Standard deviation (pixels) of the Gaussian low-pass filter; 0 disables it.
    min_area
        Objects with fewer pixels are removed.
    fill_holes
        Fill holes inside objects (dim nucleoli, intra-nuclear gaps).
    split_touching
        Split touching nuclei with a watershed on the distance transform.
    min_distance
        Minimum distance (pixels) between two nucleus centres (distance-transform peaks) when
        splitting; larger values split less.
    cellpose_model
        Path to Cellpose weights, required for ``method="cellpose"``.
    source
        File the image came from; named in error messages.

    Returns
    -------
    numpy.ndarray
        int32 label image: 0 background, 1..K nuclei (sequential). A constant image gives all
        zeros (with a warning).

    Raises
    ------
    InputError
        If the image is not 2-D or holds NaN / infinite values.
    ConfigError
        On an unknown method or invalid parameters.
    ProtlocError
        If ``method="cellpose"`` but cellpose is not installed or the weights are missing.
    """
    if method not in _SEGMENTATION_METHODS:
        raise ConfigError(f"segment_nuclei: unknown method {method!r}; choose one of {_SEGMENTATION_METHODS}")
    if sigma < 0 or min_area < 0 or min_distance < 1:
        raise ConfigError(
            f"segment_nuclei: need sigma >= 0, min_area >= 0, min_distance >= 1; got "
            f"sigma={sigma}, min_area={min_area}, min_distance={min_distance}"
        )
    arr = _as_array(nucleus, what="segment_nuclei", source=source)
    _check_2d(arr, what="segment_nuclei", source=source)
    _check_finite(arr, what="segment_nuclei", source=source)
    if arr.size == 0 or arr.min() == arr.max():
        logger.warning("%s: constant nucleus image; no nuclei segmented", source or "segment_nuclei")
        return np.zeros(arr.shape, dtype=np.int32)

    if method == "cellpose":
        labels = _segment_cellpose(arr, model_path=cellpose_model, source=source)
        if min_area > 0:
            labels = _remove_small_labels(labels, min_area)
        return _relabel(labels)

    from skimage.filters import threshold_li

    x = arr.astype(np.float32, copy=False)
    smooth = ndimage.gaussian_filter(x, sigma) if sigma > 0 else x
    if smooth.min() == smooth.max():
        logger.warning("%s: nucleus image constant after smoothing; no nuclei segmented", source or "segment_nuclei")
        return np.zeros(arr.shape, dtype=np.int32)
    mask = smooth > threshold_li(smooth)
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    components, n = ndimage.label(mask)
    if min_area > 0 and n > 0:
        components = _remove_small_labels(components, min_area)
        mask = components > 0
    if not mask.any():
        return np.zeros(arr.shape, dtype=np.int32)
    if split_touching:
        labels = _watershed_split(mask, components, min_distance=min_distance)
    else:
        labels = components
    return _relabel(labels)


def _remove_small_labels(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Zero the labels with fewer than ``min_area`` pixels (version-independent remove_small_objects)."""
    areas = np.bincount(labels.ravel())
    small = areas < min_area
    small[0] = False
    if not small.any():
        return labels
    out = labels.copy()
    out[small[labels]] = 0
    return out


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Relabel to 1..K in order of first label value; int32."""
    from skimage.segmentation import relabel_sequential

    out, _, _ = relabel_sequential(np.asarray(labels).astype(np.int32, copy=False))
    return out.astype(np.int32, copy=False)


def _watershed_split(mask: np.ndarray, components: np.ndarray, *, min_distance: int) -> np.ndarray:
    """Split touching nuclei: watershed of -distance from distance-transform peaks, within ``mask``."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    distance = ndimage.distance_transform_edt(mask)
    # exclude_border=False: nuclei near the edge still need a seed; labels= keeps peaks per component.
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    seeds = np.zeros(mask.shape, dtype=bool)
    seeds[tuple(peaks.T)] = True
    # Adjacent peak pixels (a flat ridge of the distance map) are one seed, not several.
    markers, n_markers = ndimage.label(seeds, structure=np.ones((3, 3), dtype=bool))
    labels = watershed(-distance, markers, mask=mask)
    # A component without any seed would stay unlabelled: keep it whole.
    missing = mask & (labels == 0)
    if missing.any():
        extra, _ = ndimage.label(missing)
        labels = np.where(missing, extra + n_markers, labels)
    return labels


def _segment_cellpose(image: np.ndarray, *, model_path: str | None, source: str | None) -> np.ndarray:
    """Run a Cellpose model from local weights; never downloads."""
    if model_path is None:
        raise ConfigError(
            "segmentation 'cellpose' needs cellpose_model: the path to local Cellpose weights "
            "(protloc never downloads models)"
        )
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ProtlocError(f"Cellpose weights not found: {path}")
    try:
        from cellpose import models as cp_models
    except ImportError as exc:
        raise ProtlocError(
            "segmentation 'cellpose' needs the optional cellpose package: "
            "pip install 'protloc[cellpose]' (or pip install cellpose)"
        ) from exc
    logger.info("segmenting %s with Cellpose weights %s", source or "image", path)
    model = cp_models.CellposeModel(pretrained_model=str(path), gpu=False)
    result = model.eval(image.astype(np.float32, copy=False))
    # eval returns (masks, flows, styles[, diams]) depending on the cellpose version; masks first.
    masks = np.asarray(result[0])
    if masks.shape != image.shape:
        raise ProtlocError(f"Cellpose returned masks of shape {masks.shape} for an image of shape {image.shape}")
    return masks.astype(np.int32, copy=False)


# ----------------------------------------------------------------------------------------------------
# distance transform


def signed_distance(labels_or_mask: np.ndarray, *, source: str | None = None) -> np.ndarray:
    """Signed Euclidean distance to the nucleus boundary, in pixels.

    cytoself (Methods): pixels inside a nucleus get a positive value, the shortest distance to the
    nuclear boundary; pixels outside get a negative value, minus the shortest distance to the
    boundary. Concretely, with ``scipy.ndimage.distance_transform_edt``:

    * inside: distance to the nearest background pixel (>= 1);
    * outside: minus the distance to the nearest nucleus pixel (<= -1).

    The sign flips between adjacent pixels across the boundary; no pixel is exactly 0. Touching
    nuclei are treated as one foreground (``labels > 0``). If every pixel is nucleus, the region
    beyond the image edge counts as background (inside values are distances to the image edge + 1).

    Parameters
    ----------
    labels_or_mask
        2-D label image or boolean mask; nonzero = nucleus.
    source
        File the image came from; named in error messages.

    Returns
    -------
    numpy.ndarray
        float32 signed distance, same shape.

    Raises
    ------
    InputError
        If the input is not 2-D or holds no nucleus pixel ("no nuclei"): the outside distance is then
        undefined.
    """
    arr = np.asarray(labels_or_mask)
    _check_2d(arr, what="signed_distance", source=source)
    mask = arr > 0
    if not mask.any():
        raise InputError("signed_distance: no nuclei", path=source)
    if mask.all():
        inside = ndimage.distance_transform_edt(np.pad(mask, 1, constant_values=False))[1:-1, 1:-1]
        return inside.astype(np.float32)
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    return (inside - outside).astype(np.float32)


def normalize_distance(distance: np.ndarray, *, mode: str = "separate", source: str | None = None) -> np.ndarray:
    """Scale a signed distance map to [-1, 1].

    The cytoself paper only says the nuclear distance channel "is normalized between -1 and 1"; two
    readings are offered:

    * ``"separate"`` (default): positive values are divided by the largest positive value and
      negative values by the largest magnitude negative value, so the deepest point inside a nucleus
      is +1 and the farthest point outside is -1 (both ends of the range are used);
    * ``"maxabs"``: everything is divided by ``max |d|``, preserving the ratio of inside to outside
      distances.

    Zero stays zero; an all-zero input is returned as zeros.

    Parameters
    ----------
    distance
        Signed distance map (any shape), e.g. from :func:`signed_distance` or a crop of it.
    mode
        ``"separate"`` or ``"maxabs"``.
    source
        File the map came from; named in error messages.

    Returns
    -------
    numpy.ndarray
        float32 array in [-1, 1].

    Raises
    ------
    InputError
        On NaN / infinite values.
    ConfigError
        On an unknown mode.
    """
    if mode not in _DISTANCE_MODES:
        raise ConfigError(f"normalize_distance: unknown mode {mode!r}; choose one of {_DISTANCE_MODES}")
    d = np.asarray(distance, dtype=np.float32)
    _check_finite(d, what="normalize_distance", source=source)
    if d.size == 0:
        return d.copy()
    if mode == "maxabs":
        m = float(np.abs(d).max())
        out = d / np.float32(m) if m > 0 else np.zeros_like(d)
    else:
        pos_max = float(d.max())
        neg_max = -float(d.min())
        out = np.zeros_like(d)
        if pos_max > 0:
            pos = d > 0
            out[pos] = d[pos] / np.float32(pos_max)
        if neg_max > 0:
            neg = d < 0
            out[neg] = d[neg] / np.float32(neg_max)
    np.clip(out, -1.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------------
# CELL-E threshold image


def threshold_mean(image: np.ndarray, *, source: str | None = None) -> np.ndarray:
    """Binarize at the mean intensity: ``pixel >= mean`` (CELL-E Sec. 4.3).

    CELL-E applies this to each protein crop; for a stack ``(..., Y, X)`` each trailing 2-D image is
    thresholded at its own mean. Min-max scaling does not change the result (up to rounding), so raw
    or normalized crops give the same mask. A constant image is all ones (every pixel equals the mean).

    Parameters
    ----------
    image
        2-D image, or a stack of images ``(..., Y, X)``.
    source
        File the image came from; named in error messages.

    Returns
    -------
    numpy.ndarray
        uint8 array of 0 / 1, same shape.

    Raises
    ------
    InputError
        If the image has fewer than two dimensions or holds NaN / infinite values.
    """
    arr = _as_array(image, what="threshold_mean", source=source)
    if arr.ndim < 2:
        raise InputError(f"threshold_mean: expected a 2-D image or a stack, got shape {arr.shape}", path=source)
    _check_finite(arr, what="threshold_mean", source=source)
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    x = arr.astype(np.float64, copy=False)
    mean = x.mean(axis=(-2, -1), keepdims=True)
    return (x >= mean).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# crops


def cell_centres(labels: np.ndarray, *, crop_size: int, margin: int = 0, source: str | None = None) -> np.ndarray:
    """Centres of the nuclei that can be cropped.

    cytoself (Methods): crops are "chosen so that at least one cell is present and centered" and
    "cells (and their nuclei) that are too close to image edges are ignored". A nucleus is kept if

    * it does not touch the image border (its bounding box is at least ``max(margin, 1)`` pixels
      from every edge), and
    * the ``crop_size`` x ``crop_size`` crop centred on its rounded centroid lies fully inside the
      image (crop rows ``y - crop_size // 2 : y - crop_size // 2 + crop_size``, see
      :func:`extract_crops`).

    Parameters
    ----------
    labels
        2-D int label image (0 background).
    crop_size
        Side of the square crop, > 0.
    margin
        Minimum distance (pixels) between a nucleus bounding box and the image edge.
    source
        File the image came from; named in error messages.

    Returns
    -------
    numpy.ndarray
        int64 array ``[K, 3]`` of rows ``(y, x, label)``, sorted by label.

    Raises
    ------
    InputError
        If ``labels`` is not a 2-D integer image.
    ConfigError
        If ``crop_size <= 0`` or ``margin < 0``.
    """
    if crop_size <= 0 or margin < 0:
        raise ConfigError(f"cell_centres: need crop_size > 0 and margin >= 0, got {crop_size}, {margin}")
    lab = np.asarray(labels)
    _check_2d(lab, what="cell_centres", source=source)
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        raise InputError(f"cell_centres: expected an integer label image, got dtype {lab.dtype}", path=source)
    empty = np.zeros((0, 3), dtype=np.int64)
    n = int(lab.max()) if lab.size else 0
    if n <= 0:
        return empty
    lab = lab.astype(np.int64, copy=False)
    h, w = lab.shape
    edge = max(margin, 1)
    half = crop_size // 2
    boxes = ndimage.find_objects(lab)
    present = [i + 1 for i, box in enumerate(boxes) if box is not None]
    centroids = ndimage.center_of_mass(np.ones_like(lab, dtype=np.float64), lab, present)
    rows = []
    for label, (cy, cx) in zip(present, centroids, strict=True):
        ys, xs = boxes[label - 1]
        if ys.start < edge or xs.start < edge or h - ys.stop < edge or w - xs.stop < edge:
            continue
        # floor(c + 0.5): round half up, deterministic (np.rint rounds half to even).
        y, x = int(np.floor(cy + 0.5)), int(np.floor(cx + 0.5))
        y0, x0 = y - half, x - half
        if y0 < 0 or x0 < 0 or y0 + crop_size > h or x0 + crop_size > w:
            continue
        rows.append((y, x, label))
    if not rows:
        return empty
    return np.asarray(rows, dtype=np.int64)


def extract_crops(
    images: Mapping[str, np.ndarray],
    centres: np.ndarray,
    *,
    size: int,
    source: str | None = None,
) -> dict[str, np.ndarray]:
    """Cut square crops centred on given points from co-registered 2-D images.

    The crop of centre ``(y, x)`` spans rows ``y - size // 2 : y - size // 2 + size`` (and the same
    for columns), so for even sizes the centre is the pixel just below / right of the middle.

    Parameters
    ----------
    images
        Channel name -> 2-D image; all the same shape.
    centres
        ``[K, 2]`` or ``[K, 3]`` integer array of ``(y, x[, label])`` rows (e.g. from
        :func:`cell_centres`).
    size
        Side of the crops, > 0.
    source
        File the images came from; named in error messages.

    Returns
    -------
    dict[str, numpy.ndarray]
        Channel name -> ``[K, size, size]`` array, same dtype as the input image.

    Raises
    ------
    InputError
        If the images are not 2-D or differ in shape, or a crop leaves the image (names the centre).
    ConfigError
        If ``size <= 0``.
    """
    if size <= 0:
        raise ConfigError(f"extract_crops: size must be > 0, got {size}")
    arrays = {name: np.asarray(img) for name, img in images.items()}
    shape = None
    for name, arr in arrays.items():
        _check_2d(arr, what=f"extract_crops: channel {name!r}", source=source)
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise InputError(f"extract_crops: channel {name!r} has shape {arr.shape}, expected {shape}", path=source)
    c = np.asarray(centres)
    if c.size == 0:
        c = np.zeros((0, 2), dtype=np.int64)
    if c.ndim != 2 or c.shape[1] < 2:
        raise InputError(f"extract_crops: centres must be [K, 2] or [K, 3], got shape {c.shape}", path=source)
    yx = np.rint(c[:, :2]).astype(np.int64)
    half = size // 2
    if shape is not None:
        h, w = shape
        for k, (y, x) in enumerate(yx):
            y0, x0 = y - half, x - half
            if y0 < 0 or x0 < 0 or y0 + size > h or x0 + size > w:
                raise InputError(
                    f"extract_crops: crop of size {size} centred on (y={y}, x={x}) leaves the {h} x {w} image",
                    path=source,
                    row=k,
                )
    out: dict[str, np.ndarray] = {}
    for name, arr in arrays.items():
        crops = np.empty((len(yx), size, size), dtype=arr.dtype)
        for k, (y, x) in enumerate(yx):
            crops[k] = arr[y - half : y - half + size, x - half : x - half + size]
        out[name] = crops
    return out


# ----------------------------------------------------------------------------------------------------
# one field of view, end to end


@dataclass(frozen=True)
class PrepareParams:
    """Parameters of :func:`process_fov` (and of ``protloc prepare``).

    Attributes
    ----------
    downsample
        Downsample 2x in XY after projection (cytoself Methods: 1024 -> 512).
    segmentation
        ``"li"`` (cytoself Methods) or ``"cellpose"`` (needs ``cellpose_model``).
    sigma
        Gaussian low-pass sigma (pixels) before the Li threshold.
    min_nucleus_area
        Smaller objects (pixels, after downsampling) are removed.
    min_distance
        Minimum distance between nucleus centres when splitting touching nuclei.
    distance_norm
        ``"separate"`` or ``"maxabs"``, see :func:`normalize_distance`.
    intensity_norm
        ``"crop"``: min-max scale each crop channel on its own; ``"fov"``: scale the whole field of
        view once, then crop.
    cytoself_size
        cytoself crop side (100 in the paper); 0 disables cytoself crops.
    celle_size
        CELL-E crop side (256 in the paper); 0 disables CELL-E crops.
    edge_margin
        Minimum distance (pixels) between a nucleus and the image edge.
    cellpose_model
        Path to local Cellpose weights for ``segmentation="cellpose"``.
    """

    downsample: bool = True
    segmentation: str = "li"
    sigma: float = 2.0
    min_nucleus_area: int = 64
    min_distance: int = 7
    distance_norm: str = "separate"
    intensity_norm: str = "crop"
    cytoself_size: int = 100
    celle_size: int = 256
    edge_margin: int = 0
    cellpose_model: str | None = None

    def __post_init__(self) -> None:
        if self.segmentation not in _SEGMENTATION_METHODS:
            raise ConfigError(f"segmentation must be one of {_SEGMENTATION_METHODS}, got {self.segmentation!r}")
        if self.distance_norm not in _DISTANCE_MODES:
            raise ConfigError(f"distance_norm must be one of {_DISTANCE_MODES}, got {self.distance_norm!r}")
        if self.intensity_norm not in _INTENSITY_NORMS:
            raise ConfigError(f"intensity_norm must be one of {_INTENSITY_NORMS}, got {self.intensity_norm!r}")
        for name in ("cytoself_size", "celle_size", "edge_margin", "min_nucleus_area"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.sigma < 0:
            raise ConfigError(f"sigma must be >= 0, got {self.sigma}")
        if self.min_distance < 1:
            raise ConfigError(f"min_distance must be >= 1, got {self.min_distance}")
        if self.segmentation == "cellpose" and self.cellpose_model is None:
            raise ConfigError("segmentation 'cellpose' needs cellpose_model: the path to local Cellpose weights")


def _empty_centres() -> np.ndarray:
    return np.zeros((0, 3), dtype=np.int64)


@dataclass(frozen=True)
class FovCrops:
    """The crops of one field of view (output of :func:`process_fov`).

    Attributes
    ----------
    labels
        int32 nucleus label image of the processed (projected, downsampled) 2-D field of view.
    cytoself
        ``protein``, ``nucleus`` (float32 in [0, 1]) and ``nucleus_distance`` (float32 in [-1, 1]),
        each ``[K1, S, S]``; empty dict when disabled.
    cytoself_centres
        int64 ``[K1, 3]`` rows ``(y, x, label)`` in processed-FOV pixels.
    celle
        ``nucleus``, ``protein`` (float32 in [0, 1]) and ``threshold`` (uint8 {0, 1}), each
        ``[K2, S, S]``; empty dict when disabled.
    celle_centres
        int64 ``[K2, 3]`` rows ``(y, x, label)``.
    """

    labels: np.ndarray
    cytoself: dict[str, np.ndarray] = field(default_factory=dict)
    cytoself_centres: np.ndarray = field(default_factory=_empty_centres)
    celle: dict[str, np.ndarray] = field(default_factory=dict)
    celle_centres: np.ndarray = field(default_factory=_empty_centres)


def _to_2d(image: np.ndarray, *, what: str, source: str | None) -> np.ndarray:
    arr = _as_array(image, what=what, source=source)
    if arr.ndim not in (2, 3):
        raise InputError(
            f"{what}: expected a 2-D image (Y, X) or a z-stack (Z, Y, X), got shape {arr.shape}", path=source
        )
    return max_project(arr, axis=0, source=source)


def process_fov(
    nucleus: np.ndarray,
    protein: np.ndarray,
    *,
    params: PrepareParams,
    source: str | None = None,
) -> FovCrops:
    """Turn one field of view into cytoself and CELL-E crops.

    Steps: z maximum-intensity projection of 3-D inputs -> optional 2x downsampling -> nucleus
    segmentation -> signed distance on the whole field of view (so distances near crop edges see the
    nuclei outside the crop) -> cell centres for each crop size -> crops -> normalization:

    * intensities: ``params.intensity_norm == "crop"`` min-max scales each crop channel on its own;
      ``"fov"`` scales the whole field of view once. An image without contrast (e.g. no protein
      signal) becomes zeros instead of failing; such crops are counted in the log;
    * distance: each crop with :func:`normalize_distance` (``params.distance_norm``);
    * CELL-E threshold: :func:`threshold_mean` of each raw protein crop (Sec. 4.3).

    A field of view smaller than a crop size gives no crops of that kind (warning); so does one
    without nuclei. ``cytoself_size=0`` / ``celle_size=0`` disable an output.

    Parameters
    ----------
    nucleus, protein
        Nucleus and protein channels, each ``(Y, X)`` or ``(Z, Y, X)``, same shape.
    params
        Processing parameters.
    source
        File / FOV id named in messages.

    Returns
    -------
    FovCrops
        Label image, crops and centres.

    Raises
    ------
    InputError
        On a shape mismatch between the channels, non-2-D/3-D inputs or NaN / infinite pixels.
    """
    where = source or "field of view"
    nuc_arr = np.asarray(nucleus)
    pro_arr = np.asarray(protein)
    if nuc_arr.shape != pro_arr.shape:
        raise InputError(f"nucleus shape {nuc_arr.shape} differs from protein shape {pro_arr.shape}", path=source)
    nuc = _to_2d(nuc_arr, what="nucleus channel", source=source)
    pro = _to_2d(pro_arr, what="protein channel", source=source)
    _check_finite(nuc, what="nucleus channel", source=source)
    _check_finite(pro, what="protein channel", source=source)
    if params.downsample:
        nuc = downsample2x(nuc, source=source)
        pro = downsample2x(pro, source=source)
    nuc = nuc.astype(np.float32, copy=False)
    pro = pro.astype(np.float32, copy=False)

    labels = segment_nuclei(
        nuc,
        method=params.segmentation,
        sigma=params.sigma,
        min_area=params.min_nucleus_area,
        min_distance=params.min_distance,
        cellpose_model=params.cellpose_model,
        source=source,
    )
    has_nuclei = bool(labels.any())
    if not has_nuclei:
        logger.warning("%s: no nuclei found; no crops", where)
        distance = np.zeros(labels.shape, dtype=np.float32)  # unused: no centres to crop
    else:
        distance = signed_distance(labels, source=source)

    if params.intensity_norm == "fov":
        nuc_n, _ = _minmax_stack(nuc)
        pro_n, n_const = _minmax_stack(pro)
        if n_const:
            logger.warning("%s: protein channel is constant; its crops are zeros", where)

    def centres_for(size: int, kind: str) -> np.ndarray:
        if not has_nuclei:
            return _empty_centres()
        if labels.shape[0] < size or labels.shape[1] < size:
            logger.warning(
                "%s: field of view %s is smaller than the %s crop size %d; no %s crops",
                where,
                labels.shape,
                kind,
                size,
                kind,
            )
            return _empty_centres()
        return cell_centres(labels, crop_size=size, margin=params.edge_margin, source=source)

    def intensity_crops(centres: np.ndarray, size: int, kind: str) -> dict[str, np.ndarray]:
        if params.intensity_norm == "fov":
            return extract_crops({"nucleus": nuc_n, "protein": pro_n}, centres, size=size, source=source)
        raw = extract_crops({"nucleus": nuc, "protein": pro}, centres, size=size, source=source)
        out = {}
        for name, stack in raw.items():
            out[name], n_const = _minmax_stack(stack)
            if n_const:
                logger.info(
                    "%s: %d of %d %s %s crops are constant (scaled to zeros)",
                    where,
                    n_const,
                    len(stack),
                    kind,
                    name,
                )
        return out

    # A disabled output (size 0) is an empty dict; an enabled one always has all its channels, with
    # zero crops when the FOV is too small or has no usable nucleus, so callers can concatenate.
    cytoself: dict[str, np.ndarray] = {}
    cyto_centres = _empty_centres()
    if params.cytoself_size > 0:
        size = params.cytoself_size
        cyto_centres = centres_for(size, "cytoself")
        inten = intensity_crops(cyto_centres, size, "cytoself")
        dist = extract_crops({"d": distance}, cyto_centres, size=size, source=source)["d"]
        dist_n = np.empty(dist.shape, dtype=np.float32)
        for k in range(len(dist)):
            dist_n[k] = normalize_distance(dist[k], mode=params.distance_norm, source=source)
        cytoself = {"protein": inten["protein"], "nucleus": inten["nucleus"], "nucleus_distance": dist_n}

    celle: dict[str, np.ndarray] = {}
    celle_centres = _empty_centres()
    if params.celle_size > 0:
        size = params.celle_size
        celle_centres = centres_for(size, "CELL-E")
        inten = intensity_crops(celle_centres, size, "CELL-E")
        raw_pro = extract_crops({"protein": pro}, celle_centres, size=size, source=source)["protein"]
        celle = {
            "nucleus": inten["nucleus"],
            "protein": inten["protein"],
            "threshold": threshold_mean(raw_pro),
        }

    logger.debug(
        "%s: %d nuclei, %d cytoself crops, %d CELL-E crops",
        where,
        int(labels.max()),
        len(cyto_centres),
        len(celle_centres),
    )
    return FovCrops(
        labels=labels,
        cytoself=cytoself,
        cytoself_centres=cyto_centres,
        celle=celle,
        celle_centres=celle_centres,
    )


# ----------------------------------------------------------------------------------------------------
# one user image -> the input of a trained CELL-E (protloc predict, fill, screen)

#: Reference-world geometry of the default nucleus (protloc.data.world.render.RenderParams defaults):
#: a 12 um nucleus at 0.4 um per pixel is 30 px across in a field of view and in its CELL-E crops.
DEFAULT_NUCLEUS_DIAMETER_UM = 12.0
DEFAULT_PIXEL_SIZE_UM = 0.4


def square_to_model(
    image: np.ndarray,
    size: int,
    *,
    source: str,
    name: str,
    scale: Callable[[np.ndarray], np.ndarray],
    check: Callable[[np.ndarray], None] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """A 2-D image -> ``[size, size]`` float32: its largest centred square, scaled, then area-averaged.

    The square is ``scale``-d (to [0, 1]) and then area-averaged to ``size`` (as the CELL-E data
    pipeline resizes its crops); the result is clipped to [0, 1].

    Parameters
    ----------
    image
        A 2-D grey image (``[1, Y, X]`` and ``[Y, X, 1]`` are squeezed), at least ``size`` on each side.
    size
        The model's image size.
    source
        Where the image came from, named in error messages.
    name
        What the image is (``"nucleus"``, ``"threshold"``), named in error messages.
    scale
        Maps the float64 centred square to [0, 1] (raises :class:`InputError` when it cannot).
    check
        Sees the whole 2-D float64 image first (raises :class:`InputError` on bad values).

    Returns
    -------
    image : numpy.ndarray
        ``float32 [size, size]`` in [0, 1].
    info : dict
        ``input_shape`` ``[h, w]`` and ``crop`` ``{"y", "x", "side"}`` of the centred square.

    Raises
    ------
    InputError
        A non-numeric, empty, non-finite or non-2-D image, or one smaller than ``size``.
    """
    import torch

    arr = check_image(image, path=source, name=f"{name} image")  # numeric, non-empty, finite
    if arr.ndim > 2:
        arr = np.squeeze(arr)  # a [1, Y, X] or [Y, X, 1] grey image
    if arr.ndim != 2:
        raise InputError(f"the {name} image must be a 2-D grey image, got shape {tuple(np.shape(image))}", path=source)
    arr = arr.astype(np.float64)
    if check is not None:
        check(arr)
    h, w = arr.shape
    if min(h, w) < size:
        raise InputError(
            f"the {name} image is {h} x {w} px; the model needs at least {size} x {size} (its image size)",
            path=source,
        )
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    crop = scale(arr[y0 : y0 + side, x0 : x0 + side])
    t = torch.from_numpy(crop.astype(np.float32))[None, None]
    if side != size:
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="area")
    out = t[0, 0].clamp(0.0, 1.0).numpy().astype(np.float32)
    return out, {"input_shape": [int(h), int(w)], "crop": {"y": int(y0), "x": int(x0), "side": int(side)}}


def nucleus_to_model(image: np.ndarray, size: int, *, source: str) -> tuple[np.ndarray, dict[str, Any]]:
    """A 2-D grey image -> the ``[size, size]`` float32 nucleus crop in [0, 1] a CELL-E model sees.

    Largest centred square, min-max scaled to [0, 1] (as ``protloc prepare`` scales each crop), then
    area-averaged to ``size`` (as the CELL-E data pipeline resizes its crops): the result lies in
    [0, 1] without necessarily reaching both ends.

    Parameters
    ----------
    image
        The nucleus image (DNA stain), at least ``size`` on each side.
    size
        The model's image size.
    source
        Where the image came from, named in error messages.

    Returns
    -------
    image : numpy.ndarray
        ``float32 [size, size]``.
    info : dict
        As :func:`square_to_model`.

    Raises
    ------
    InputError
        As :func:`square_to_model`, and for an image that is constant in its centred square.
    """

    def minmax(crop: np.ndarray) -> np.ndarray:
        lo, hi = float(crop.min()), float(crop.max())
        if not hi > lo:
            raise InputError(
                f"the nucleus image is constant ({lo:g}) in its centred square: nothing to scale", path=source
            )
        return (crop - lo) / (hi - lo)

    return square_to_model(image, size, source=source, name="nucleus", scale=minmax)


def threshold_to_model(image: np.ndarray, size: int, *, source: str) -> np.ndarray:
    """A 2-D threshold image -> the binary ``[size, size]`` float32 crop a CELL-E threshold tokenizer takes.

    The centred square (as for the nucleus, :func:`nucleus_to_model`), scaled by its maximum,
    area-averaged to ``size``, then binarised at 0.5.

    Parameters
    ----------
    image
        The protein-threshold image (e.g. a ``NAME_threshold.png`` of ``protloc predict``), at least
        ``size`` on each side, without negative pixels.
    size
        The model's image size.
    source
        Where the image came from, named in error messages.

    Returns
    -------
    numpy.ndarray
        ``float32 [size, size]`` of 0 and 1.

    Raises
    ------
    InputError
        As :func:`square_to_model`, and for negative pixels.
    """

    def non_negative(arr: np.ndarray) -> None:
        if (arr < 0).any():
            raise InputError("the threshold image has negative pixels", path=source)

    def by_max(crop: np.ndarray) -> np.ndarray:
        top = float(crop.max())
        return crop / top if top > 0 else crop

    out, _ = square_to_model(image, size, source=source, name="threshold", scale=by_max, check=non_negative)
    return (out >= 0.5).astype(np.float32)


def reference_nucleus(size: int, field_px: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The default nucleus: a real DNA-stain nucleus of the reference world's assets, as a CELL-E crop.

    The first patch of ``nuclei.npz`` whose mask was not completed over a neighbour (nucleus 1 of the
    mahotas ``nuclear.png`` demo image), background-subtracted and zeroed outside its mask, is centred
    (mask centroid) in an empty field of ``field_px`` crop pixels at the reference world's scale: a
    12 um nucleus at 0.4 um per pixel (30 px across at the paper's 256 px crops). The field is then
    made into the model's input like any nucleus image (:func:`nucleus_to_model`). Nothing is
    downloaded: the patch ships with protloc.

    Parameters
    ----------
    size
        The model's image size.
    field_px
        Side of the field in crop pixels (the run's training crops, e.g. the paper's 256).

    Returns
    -------
    image : numpy.ndarray
        ``float32 [size, size]`` in [0, 1].
    info : dict
        ``source`` (which patch), ``field_px``, ``nucleus_diameter_um`` and ``pixel_size_um``.
    """
    from protloc.data.world.assets import load_nuclei, load_nuclei_sources

    patches, sources = load_nuclei(), load_nuclei_sources()
    index = next((i for i, s in enumerate(sources) if "neighbour_filled" not in s), 0)
    image, mask = patches[index]
    img = image.astype(np.float64)
    background = float(np.median(img[~mask])) if (~mask).any() else 0.0
    img = np.where(mask, np.clip(img - background, 0.0, None), 0.0)
    diameter = 2.0 * np.sqrt(mask.sum() / np.pi)  # equivalent diameter, patch pixels
    target = DEFAULT_NUCLEUS_DIAMETER_UM / DEFAULT_PIXEL_SIZE_UM  # crop pixels
    # Work at the patch's resolution: the field spans field_px crop pixels = field_px * diameter / target
    # patch pixels; nucleus_to_model area-averages it down to the model's size.
    canvas = max(int(round(field_px * diameter / target)), size)
    field_img = np.zeros((canvas, canvas), dtype=np.float64)
    ys, xs = np.nonzero(mask)
    oy, ox = canvas // 2 - int(round(ys.mean())), canvas // 2 - int(round(xs.mean()))
    h, w = img.shape
    ty0, tx0 = max(0, oy), max(0, ox)
    ty1, tx1 = min(canvas, oy + h), min(canvas, ox + w)
    field_img[ty0:ty1, tx0:tx1] = img[ty0 - oy : ty1 - oy, tx0 - ox : tx1 - ox]
    out, _ = nucleus_to_model(field_img, size, source="reference nucleus")
    info = {
        "source": f"reference world nucleus {index} ({sources[index]})",
        "field_px": int(field_px),
        "nucleus_diameter_um": DEFAULT_NUCLEUS_DIAMETER_UM,
        "pixel_size_um": DEFAULT_PIXEL_SIZE_UM,
    }
    return out, info

"""Render one field of view of the reference cell world.

The physical model works at the OpenCell *binned* scale (about 0.4 um per pixel: OpenCell images are
0.2 um per pixel and binned 2x before crops are cut). A field of view holds HEK293T-like cells: nuclei
10-14 um across, cells about twice the nucleus radius, densely packed in loose clusters. Every length
below is given in micrometres and converted with ``pixel_size_um``, so the same model renders at other
scales too.

Rendering happens in four steps:

1. **Layout**: nucleus centres are thrown Poisson-disc style (non-overlapping, some touching, denser in
   patches); each nucleus is either a real patch from the nucleus bank (rescaled, rotated, flipped) or a
   procedural one (perturbed ellipse, chromatin texture, heterochromatin spots, nucleoli holes); a few
   cells are mitotic (condensed chromosomes, rounded cell). Cells grow around their nucleus by a
   domain-warped nearest-nucleus tessellation limited to a per-cell radius.
2. **Compartment patterns**: one spatial pattern per compartment and cell (see
   :data:`~protloc.data.world.compartments.COMPARTMENTS`), each normalised to unit total per cell. The
   protein image is the weight-mixture of these patterns times a log-normal per-cell expression level,
   so a weight is the fraction of a cell's protein signal in that compartment.
3. **Optics**: Gaussian point-spread function; for z-stacks, extra defocus blur away from the focal
   slice (light is conserved, so a maximum projection recovers about the focal image).
4. **Noise**: an auto-exposure scales the noise-free image to ``protein_peak`` / ``nucleus_peak``
   photons; photon shot noise on top of a background, camera gain, Gaussian read noise and an offset,
   clipped to ``uint16``. Shot noise is drawn as N(lambda, lambda) when the background is at least 20
   photons per pixel (indistinguishable from Poisson there, and 4x cheaper), else as Poisson.

Everything random comes from the generator passed in; the layout is drawn first and each compartment
gets its own child generator, so the images do not depend on which compartments are computed (asking
for ``return_maps`` does not change the protein image).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from protloc.data.world.compartments import COMPARTMENTS, NUCLEAR
from protloc.errors import ConfigError, InputError

__all__ = [
    "NucleusTemplate",
    "RenderParams",
    "RenderedFOV",
    "expected_nucleus_proportion",
    "prepare_nuclei_bank",
    "render_fov",
]

logger = logging.getLogger(__name__)

N_COMPARTMENTS = len(COMPARTMENTS)
_C = {name: i for i, name in enumerate(COMPARTMENTS)}
_NUCLEAR_IDX = np.array([_C[c] for c in COMPARTMENTS if c in NUCLEAR])
# Background (photons per pixel) from which shot noise is drawn with its Gaussian approximation.
_GAUSSIAN_SHOT_NOISE_MIN = 20.0


# --------------------------------------------------------------------------------------------------
# parameters and results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderParams:
    """Parameters of the field-of-view renderer.

    Lengths are in micrometres unless the name says ``_px``; intensities are in photons unless the name
    says ``_adu`` (camera units).

    Attributes
    ----------
    size
        Output image side in pixels (square fields of view).
    pixel_size_um
        Pixel size; 0.4 um is OpenCell's binned scale.
    nucleus_diameter_um, nucleus_diameter_sd_um
        Mean and spread of the nucleus diameter (HEK293T: 10-14 um).
    cell_to_nucleus_ratio
        Cell radius / nucleus radius (before neighbours and the tessellation cut the cell).
    cell_density
        Cells per 1000 um^2 (1.5 gives about 2 cells per 100 x 100 crop at 0.4 um per pixel).
    clustering
        Strength of patchy cell density (0 = uniform).
    real_nucleus_fraction
        Share of interphase nuclei taken from the nucleus bank (when one is given).
    mitotic_fraction
        Share of mitotic cells.
    expression_sigma
        Sigma of the log-normal per-cell expression level.
    psf_sigma_um
        Sigma of the Gaussian point-spread function.
    defocus_sigma_um
        Extra blur sigma per slice of distance from the focal slice (z-stacks).
    protein_peak, nucleus_peak
        Photons at the 99.9th percentile of the noise-free image (an auto-exposure).
    background
        Background photons per pixel (autofluorescence, out-of-focus light).
    gain_adu
        Camera gain, ADU per photon.
    read_noise_adu
        Gaussian read noise (ADU).
    offset_adu
        Camera offset (ADU).
    z
        Number of z-slices; 1 renders a 2-D image.
    """

    size: int = 512
    pixel_size_um: float = 0.4
    nucleus_diameter_um: float = 12.0
    nucleus_diameter_sd_um: float = 1.2
    cell_to_nucleus_ratio: float = 2.0
    cell_density: float = 1.5
    clustering: float = 0.8
    real_nucleus_fraction: float = 0.5
    mitotic_fraction: float = 0.05
    expression_sigma: float = 0.5
    psf_sigma_um: float = 0.4
    defocus_sigma_um: float = 0.6
    protein_peak: float = 3000.0
    nucleus_peak: float = 4000.0
    background: float = 30.0
    gain_adu: float = 2.0
    read_noise_adu: float = 4.0
    offset_adu: float = 100.0
    z: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.size, int | np.integer) or self.size < 32:
            raise ConfigError(f"RenderParams.size must be an integer >= 32, got {self.size!r}")
        if not isinstance(self.z, int | np.integer) or self.z < 1:
            raise ConfigError(f"RenderParams.z must be an integer >= 1, got {self.z!r}")
        positive = (
            "pixel_size_um",
            "nucleus_diameter_um",
            "cell_density",
            "psf_sigma_um",
            "protein_peak",
            "nucleus_peak",
            "gain_adu",
        )
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"RenderParams.{name} must be a positive number, got {value!r}")
        non_negative = (
            "nucleus_diameter_sd_um",
            "clustering",
            "expression_sigma",
            "defocus_sigma_um",
            "background",
            "read_noise_adu",
            "offset_adu",
        )
        for name in non_negative:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"RenderParams.{name} must be a number >= 0, got {value!r}")
        for name in ("real_nucleus_fraction", "mitotic_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value <= 1):
                raise ConfigError(f"RenderParams.{name} must be in [0, 1], got {value!r}")
        if not self.cell_to_nucleus_ratio > 1:
            raise ConfigError(f"RenderParams.cell_to_nucleus_ratio must be > 1, got {self.cell_to_nucleus_ratio!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the parameters as a plain dictionary (for ``world.json``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class RenderedFOV:
    """One rendered field of view.

    Attributes
    ----------
    nucleus, protein
        ``uint16`` images, ``(Y, X)`` or ``(Z, Y, X)`` for z-stacks.
    nucleus_labels, cell_labels
        ``int32`` label images ``(Y, X)``; nucleus ``k`` belongs to cell ``k``; 0 is background. A cell
        whose nucleus lies outside the field has a cell label but no nucleus label.
    mitotic
        ``bool`` array indexed by label (entry 0 is background, ``False``).
    expression
        Per-cell expression level (indexed by label, entry 0 is 0).
    nucleus_proportion
        Fraction of the noise-free, in-focus protein signal that falls inside nuclei: what an ideal
        measurement on the images would give (compare with the summed weights of
        :data:`~protloc.data.world.compartments.NUCLEAR`).
    weights
        The compartment weights used (normalised to sum 1).
    compartment_maps
        With ``return_maps=True``: ``float32 [12, Y, X]``, the noise-free object-level intensity of each
        compartment before optical blur, in the same photon units as the protein image; each cell holds
        ``expression[cell]`` times the exposure scale in every compartment, so
        ``protein ~ blur(sum_c weights[c] * compartment_maps[c])``. Otherwise ``None``.
    """

    nucleus: np.ndarray
    protein: np.ndarray
    nucleus_labels: np.ndarray
    cell_labels: np.ndarray
    mitotic: np.ndarray
    expression: np.ndarray
    nucleus_proportion: float
    weights: np.ndarray
    compartment_maps: np.ndarray | None = None

    @property
    def n_cells(self) -> int:
        """Number of cells (labels) in the field."""
        return len(self.mitotic) - 1


@dataclass(frozen=True)
class NucleusTemplate:
    """A real nucleus prepared for stamping (see :func:`prepare_nuclei_bank`).

    Attributes
    ----------
    image
        ``float32`` DNA intensity, normalised to median 1 inside the mask, 0 outside.
    mask
        ``bool`` nucleus mask.
    nucleoli
        ``float32`` soft nucleolus map in [0, 1] (dark holes of the DNA stain).
    diameter
        Equivalent diameter of the mask in the template's own pixels.
    """

    image: np.ndarray
    mask: np.ndarray
    nucleoli: np.ndarray
    diameter: float


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian random field with unit standard deviation and correlation length ``sigma`` px."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    field = ndi.gaussian_filter(noise, sigma, mode="wrap")
    # White noise blurred by a 2-D Gaussian has standard deviation 1 / (2 sqrt(pi) sigma): divide by
    # it instead of measuring the std (one pass less over the image).
    field *= np.float32(2.0 * math.sqrt(math.pi) * sigma)
    return field


def _coarse_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Low-frequency unit-ish noise (correlation length about ``cell`` px), cheap at any size.

    Drawn on a grid ``cell`` px apart and interpolated bilinearly, one axis at a time: far cheaper than
    a wide Gaussian blur of a full-size field, and smooth enough for warps and density. (No matrix
    products: OpenBLAS threads would spin on every core and double the CPU time of parallel workers.)
    """
    gy = int(math.ceil(shape[0] / cell)) + 2
    gx = int(math.ceil(shape[1] / cell)) + 2
    coarse = ndi.gaussian_filter(rng.standard_normal((gy, gx)), 0.7, mode="wrap")
    coarse = (coarse / (coarse.std() + 1e-12)).astype(np.float32)
    ty = np.arange(shape[0], dtype=np.float32) / np.float32(cell)
    tx = np.arange(shape[1], dtype=np.float32) / np.float32(cell)
    y0 = ty.astype(np.intp)
    x0 = tx.astype(np.intp)
    fy = (ty - y0)[:, None]
    fx = (tx - x0)[None, :]
    rows = coarse[y0] * (1 - fy) + coarse[y0 + 1] * fy  # (H, gx)
    return rows[:, x0] * (1 - fx) + rows[:, x0 + 1] * fx


def _per_label_sum(labels_flat: np.ndarray, values_flat: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(labels_flat, weights=values_flat, minlength=n + 1)[: n + 1]


def _safe_inverse(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x, dtype=np.float64)
    np.divide(1.0, x, out=out, where=x > 0)
    return out


def _label_boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels of a label whose 4-neighbour has another label (the canvas edge is no boundary)."""
    b = np.zeros(labels.shape, dtype=bool)
    diff_y = labels[1:, :] != labels[:-1, :]
    diff_x = labels[:, 1:] != labels[:, :-1]
    b[1:, :] |= diff_y
    b[:-1, :] |= diff_y
    b[:, 1:] |= diff_x
    b[:, :-1] |= diff_x
    return b & (labels > 0)


# --------------------------------------------------------------------------------------------------
# nucleus bank
# --------------------------------------------------------------------------------------------------


def prepare_nuclei_bank(
    patches: Sequence[tuple[np.ndarray, np.ndarray]] | Sequence[NucleusTemplate],
) -> list[NucleusTemplate]:
    """Turn real nucleus patches into stamping templates.

    Each patch is cropped to its mask, background-subtracted and normalised to median 1 inside the
    mask; its nucleoli are found as the darkest smooth regions well inside the nucleus (about the
    lowest 12 % of the smoothed intensity). Where none are found, two are added procedurally and the
    DNA is darkened there, so that every template has nucleoli that match dark holes of its DNA stain.

    Parameters
    ----------
    patches
        ``(image, mask)`` pairs as returned by ``assets.load_nuclei()``; templates are passed through.

    Returns
    -------
    list of NucleusTemplate
        One template per usable patch (patches whose mask has fewer than 30 pixels are skipped).

    Raises
    ------
    InputError
        If a patch's image and mask differ in shape or are not 2-D.
    """
    out: list[NucleusTemplate] = []
    for k, item in enumerate(patches):
        if isinstance(item, NucleusTemplate):
            out.append(item)
            continue
        image, mask = item
        image = np.asarray(image, dtype=np.float32)
        mask = np.asarray(mask, dtype=bool)
        if image.ndim != 2 or image.shape != mask.shape:
            raise InputError(
                f"nucleus patch must be a 2-D image with a mask of the same shape, got {image.shape} and {mask.shape}",
                row=k,
            )
        if mask.sum() < 30:
            logger.debug("skipping nucleus patch %d: mask of %d pixels", k, int(mask.sum()))
            continue
        out.append(_prepare_template(image, mask, seed=k))
    return out


def _prepare_template(image: np.ndarray, mask: np.ndarray, *, seed: int) -> NucleusTemplate:
    ys, xs = np.nonzero(mask)
    pad = 2
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, mask.shape[0])
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, mask.shape[1])
    img = image[y0:y1, x0:x1].astype(np.float32)
    m = mask[y0:y1, x0:x1]
    outside = img[~m]
    bg = float(np.median(outside)) if outside.size else 0.0
    img = np.clip(img - bg, 0, None)
    inside_median = float(np.median(img[m]))
    if inside_median <= 0:
        inside_median = float(img[m].mean()) or 1.0
    img = np.where(m, img / inside_median, 0).astype(np.float32)
    diameter = 2.0 * math.sqrt(m.sum() / math.pi)

    depth = ndi.distance_transform_edt(m)
    smooth = ndi.gaussian_filter(img, max(diameter / 40.0, 0.7))
    inner = depth > 0.15 * diameter
    nucleoli = np.zeros(m.shape, dtype=np.float32)
    if inner.sum() >= 20:
        thr = np.percentile(smooth[inner], 12)
        dark = inner & (smooth < thr)
        lab, n = ndi.label(dark)
        if n:
            sizes = np.bincount(lab.ravel())[1:]
            min_area = max(3.0, (0.03 * diameter) ** 2 * math.pi)
            keep = np.flatnonzero(sizes >= min_area) + 1
            keep = keep[np.argsort(sizes[keep - 1])[::-1][:4]]
            if keep.size:
                nucleoli = np.isin(lab, keep).astype(np.float32)
                nucleoli = ndi.gaussian_filter(nucleoli, max(diameter / 80.0, 0.5))
                nucleoli = np.clip(nucleoli * 1.6, 0, 1) * m
    if nucleoli.max() <= 0:
        # No dark holes in this patch: plant two nucleoli and darken the stain there, as in real
        # nuclei, so nucleolar proteins still sit in visible holes.
        rng = np.random.default_rng(seed)
        cand = np.flatnonzero(depth.ravel() > 0.25 * diameter)
        if cand.size == 0:
            cand = np.flatnonzero(m.ravel())
        yy, xx = np.indices(m.shape)
        for c in rng.choice(cand, size=min(2, cand.size), replace=False):
            cy, cx = divmod(int(c), m.shape[1])
            r = 0.09 * diameter
            d = np.hypot(yy - cy, xx - cx)
            nucleoli = np.maximum(nucleoli, 1.0 / (1.0 + np.exp((d - r) / 0.6)))
        nucleoli = (nucleoli * m).astype(np.float32)
        img = img * (1 - 0.55 * nucleoli)
    return NucleusTemplate(
        image=img.astype(np.float32), mask=m, nucleoli=nucleoli.astype(np.float32), diameter=diameter
    )


# --------------------------------------------------------------------------------------------------
# nucleus stamps
# --------------------------------------------------------------------------------------------------


def _stamp_grid(cy: float, cx: float, half: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    iy, ix = int(round(cy)), int(round(cx))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    # Sub-pixel centre: coordinates relative to the true centre.
    yy += iy - cy
    xx += ix - cx
    return iy - half, ix - half, yy, xx


def _procedural_nucleus(
    cy: float, cx: float, r: float, rng: np.random.Generator, px: float
) -> tuple[int, int, np.ndarray, None, np.ndarray]:
    """Perturbed ellipse with 2-4 nucleoli; DNA texture is added globally later."""
    aspect = rng.uniform(1.0, 1.35)
    a, b = r * math.sqrt(aspect), r / math.sqrt(aspect)
    half = int(math.ceil(a * 1.25)) + 2
    y0, x0, yy, xx = _stamp_grid(cy, cx, half)
    phi = rng.uniform(0, math.pi)
    cos, sin = math.cos(phi), math.sin(phi)
    u = xx * cos + yy * sin
    v = -xx * sin + yy * cos
    # Smooth boundary perturbation: a few low angular harmonics with decreasing amplitude, evaluated
    # as powers of the unit complex direction (no arctan/cos per pixel).
    zc = u / a + 1j * (v / b)
    rho = np.abs(zc)
    unit = zc / np.maximum(rho, 1e-6)
    edge = np.ones(rho.shape)
    power = unit
    for k in range(2, 6):
        power = power * unit
        amp = rng.normal(0, 0.045 / (k - 1)) * np.exp(1j * rng.uniform(0, 2 * math.pi))
        edge += (power * amp).real
    mask = rho <= edge
    nucleoli = np.zeros(mask.shape, dtype=np.float32)
    for _ in range(int(rng.integers(2, 5))):
        t = rng.uniform(0, 2 * math.pi)
        s = rng.uniform(0, 0.5)
        ny, nx = s * b * math.sin(t), s * a * math.cos(t)
        # rotate the offset back into image axes
        oy = nx * sin + ny * cos
        ox = nx * cos - ny * sin
        rad = rng.uniform(0.8, 1.5) / px
        d = np.hypot(yy - oy, xx - ox)
        nucleoli = np.maximum(nucleoli, 1.0 / (1.0 + np.exp((d - rad) / 0.5)))
    nucleoli *= mask
    return y0, x0, mask, None, nucleoli


def _mitotic_nucleus(
    cy: float, cx: float, r: float, angle: float, rng: np.random.Generator
) -> tuple[int, int, np.ndarray, None, np.ndarray]:
    """Condensed chromosomes: a metaphase plate (thin bar) or a compact prometaphase blob."""
    half = int(math.ceil(r)) + 3
    y0, x0, yy, xx = _stamp_grid(cy, cx, half)
    cos, sin = math.cos(angle), math.sin(angle)
    u = xx * cos + yy * sin
    v = -xx * sin + yy * cos
    if rng.random() < 0.6:
        a, b = 0.85 * r, rng.uniform(0.2, 0.3) * r  # metaphase plate, long axis along `angle`
    else:
        a = b = rng.uniform(0.45, 0.6) * r  # prometaphase: compact, lumpy
    theta = np.arctan2(v / b, u / a)
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    edge = np.ones_like(theta)
    for k in (3, 5, 7, 9):
        edge += rng.normal(0, 0.06) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    mask = rho <= edge
    return y0, x0, mask, None, np.zeros(mask.shape, dtype=np.float32)


def _real_nucleus(
    cy: float, cx: float, r: float, template: NucleusTemplate, rng: np.random.Generator
) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """Rescale a template to radius ``r``, rotate by a random angle, flip at random."""
    scale = 2.0 * r / template.diameter
    h, w = template.mask.shape
    half = int(math.ceil(0.5 * math.hypot(h, w) * scale)) + 2
    y0, x0, yy, xx = _stamp_grid(cy, cx, half)
    angle = rng.uniform(0, 2 * math.pi)
    flip = -1.0 if rng.random() < 0.5 else 1.0
    cos, sin = math.cos(angle), math.sin(angle)
    # output (y, x) relative to the centre -> template coordinates (inverse rotation, then scale)
    ty = (cos * yy - sin * xx) / scale
    tx = flip * (sin * yy + cos * xx) / scale
    ys, xs = np.nonzero(template.mask)
    ty += ys.mean()
    tx += xs.mean()
    stack = np.stack([template.mask.astype(np.float32), template.image, template.nucleoli])
    coords = np.stack([ty, tx])
    warped = [ndi.map_coordinates(ch, coords, order=1, mode="constant", cval=0.0) for ch in stack]
    mask = warped[0] > 0.5
    dna = np.where(mask, warped[1], 0).astype(np.float32)
    nucleoli = np.clip(warped[2], 0, 1) * mask
    return y0, x0, mask, dna, nucleoli.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    shape: tuple[int, int]
    margin: int
    n: int
    nuc: np.ndarray  # int32 nucleus labels
    cell: np.ndarray  # int32 cell labels
    nucm: np.ndarray  # bool nucleus mask
    cyto: np.ndarray  # bool cytoplasm mask (cell minus nucleus)
    dist: np.ndarray  # float32 distance to the nearest nucleus pixel
    rel: np.ndarray  # float32 relative position in the cytoplasm, 0 at the nucleus, 1 at the cell edge
    nucleoli: np.ndarray  # float32 soft nucleolus map
    dna: np.ndarray  # float32 DNA stain (object level, before optics)
    tex: np.ndarray  # float32 unit-std fine texture
    centres: np.ndarray  # (n + 1, 2) float
    radius: np.ndarray  # (n + 1,) nucleus radius px
    extent: np.ndarray  # (n + 1,) cytoplasm reach beyond the nucleus px
    mitotic: np.ndarray  # (n + 1,) bool
    angle: np.ndarray  # (n + 1,) golgi/centrosome side (interphase) or spindle axis (mitotic)
    edge: np.ndarray  # (n + 1,) distance centre -> nucleus edge along `angle`
    plate_half: np.ndarray  # (n + 1,) half-thickness of the chromosome mass along `angle` (mitotic)
    expression: np.ndarray  # (n + 1,)
    px: float


def _place_centres(
    params: RenderParams, rng: np.random.Generator, shape: tuple[int, int], r_mean: float
) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    area_um2 = h * w * params.pixel_size_um**2
    n_target = int(rng.poisson(params.cell_density * area_um2 / 1000.0))
    density = _coarse_noise(rng, shape, cell=6 * r_mean)
    accept = np.exp(params.clustering * (density - density.max()))
    sd = params.nucleus_diameter_sd_um / params.nucleus_diameter_um
    centres = np.empty((max(n_target, 1), 2))
    radii = np.empty(max(n_target, 1))
    n = 0
    tries = 0
    max_tries = 40 * n_target + 100
    batch = 256
    while n < n_target and tries < max_tries:
        cand = rng.uniform(0, 1, size=(batch, 2)) * np.array([h - 1, w - 1])
        u = rng.uniform(0, 1, size=batch)
        rr = r_mean * np.exp(rng.normal(0, sd, size=batch))
        for k in range(batch):
            tries += 1
            if u[k] > accept[int(cand[k, 0]), int(cand[k, 1])]:
                continue
            if n:
                d = np.hypot(centres[:n, 0] - cand[k, 0], centres[:n, 1] - cand[k, 1])
                # 0.95 of the summed radii: elliptic nuclei then sometimes touch (the later one is
                # clipped where they would overlap), as in dense HEK293T cultures.
                if np.any(d < 0.95 * (radii[:n] + rr[k])):
                    continue
            centres[n] = cand[k]
            radii[n] = rr[k]
            n += 1
            if n >= n_target:
                break
    return centres[:n], radii[:n]


def _paste(canvas: np.ndarray, y0: int, x0: int, patch: np.ndarray, where: np.ndarray) -> None:
    """Write ``patch`` into ``canvas`` at ``(y0, x0)`` where ``where`` holds, clipped to the canvas."""
    h, w = canvas.shape
    ph, pw = patch.shape
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + ph, h), min(x0 + pw, w)
    if ys >= ye or xs >= xe:
        return
    sub = (slice(ys - y0, ye - y0), slice(xs - x0, xe - x0))
    dst = canvas[ys:ye, xs:xe]
    m = where[sub]
    dst[m] = patch[sub][m]


def _layout(params: RenderParams, rng: np.random.Generator, bank: list[NucleusTemplate] | None) -> _Layout:
    px = params.pixel_size_um
    r_mean = params.nucleus_diameter_um / 2.0 / px
    ratio = params.cell_to_nucleus_ratio
    # Margin wide enough that cells whose nucleus lies just outside the field still reach into it.
    margin = int(math.ceil(r_mean * (ratio - 1) * 1.3))
    shape = (params.size + 2 * margin, params.size + 2 * margin)
    h, w = shape

    centres, radii = _place_centres(params, rng, shape, r_mean)
    n = len(centres)
    mitotic = np.zeros(n + 1, dtype=bool)
    mitotic[1:] = rng.random(n) < params.mitotic_fraction
    real = np.zeros(n + 1, dtype=bool)
    if bank:
        real[1:] = (rng.random(n) < params.real_nucleus_fraction) & ~mitotic[1:]
    angle = np.zeros(n + 1)
    angle[1:] = rng.uniform(0, 2 * math.pi, size=n)
    level = np.zeros(n + 1, dtype=np.float32)
    level[1:] = np.exp(rng.normal(0, 0.15, size=n))  # DNA content / staining per nucleus

    nuc = np.zeros(shape, dtype=np.int32)
    nucleoli = np.zeros(shape, dtype=np.float32)
    dna_real = np.zeros(shape, dtype=np.float32)
    for i in range(n):
        lab = i + 1
        cy, cx = centres[i]
        if mitotic[lab]:
            y0, x0, mask, dna, nol = _mitotic_nucleus(cy, cx, radii[i], angle[lab], rng)
        elif real[lab]:
            template = bank[int(rng.integers(len(bank)))]
            y0, x0, mask, dna, nol = _real_nucleus(cy, cx, radii[i], template, rng)
        else:
            y0, x0, mask, dna, nol = _procedural_nucleus(cy, cx, radii[i], rng, px)
        # Nuclei never overlap: a later nucleus only takes still-free pixels.
        ph, pw = mask.shape
        free = np.zeros_like(mask)
        ys, xs = max(y0, 0), max(x0, 0)
        ye, xe = min(y0 + ph, h), min(x0 + pw, w)
        if ys >= ye or xs >= xe:
            continue
        free[ys - y0 : ye - y0, xs - x0 : xe - x0] = nuc[ys:ye, xs:xe] == 0
        where = mask & free
        _paste(nuc, y0, x0, np.full(mask.shape, lab, dtype=np.int32), where)
        _paste(nucleoli, y0, x0, nol, where)
        if dna is not None:
            _paste(dna_real, y0, x0, dna, where)
    nucm = nuc > 0

    # Chromatin texture of procedural nuclei: smooth noise, bright heterochromatin spots, dark
    # nucleoli; condensed mitotic chromosomes are about twice as bright per pixel.
    tex = _smooth_noise(rng, shape, 0.5 / px)
    nuc_flat = np.flatnonzero(nucm)
    n_spots = int(nuc_flat.size * px**2 / 2.0)  # one heterochromatin spot per 2 um^2
    spots = np.zeros(h * w, dtype=np.float32)
    if n_spots:
        spots += np.bincount(rng.choice(nuc_flat, size=n_spots), minlength=h * w).astype(np.float32)
    sig_spot = 0.3 / px
    spots = ndi.gaussian_filter(spots.reshape(shape), sig_spot) * np.float32(2 * math.pi * sig_spot**2)
    # evaluated on nucleus pixels only (a quarter of the field or less)
    lab_f = nuc.ravel()[nuc_flat]
    tex_f = tex.ravel()[nuc_flat]
    proc = (1.0 + 0.22 * tex_f + 0.7 * spots.ravel()[nuc_flat]) * (1.0 - 0.6 * nucleoli.ravel()[nuc_flat])
    mit = 2.2 * (1.0 + 0.3 * tex_f)
    values = np.where(real[lab_f], dna_real.ravel()[nuc_flat], np.where(mitotic[lab_f], mit, proc))
    dna = np.zeros(h * w, dtype=np.float32)
    dna[nuc_flat] = np.clip(values, 0, None) * level[lab_f]
    dna = dna.reshape(shape)

    # Cells: nearest-nucleus tessellation, domain-warped so that borders between cells are irregular,
    # limited to a per-cell reach beyond the nucleus whose edge wobbles too.
    dist, (iy, ix) = ndi.distance_transform_edt(~nucm, return_indices=True)
    dist = dist.astype(np.float32)
    nearest = nuc.ravel().take(iy * w + ix)
    extent = np.zeros(n + 1)
    extent[1:] = radii * (ratio - 1) * rng.uniform(0.75, 1.25, size=n)
    # no warp right at the nucleus, so that no cell reaches across a neighbour's nucleus
    warp_amp = (1.0 / px) * np.minimum(1.0, dist / (2.0 / px))
    wy = _coarse_noise(rng, shape, cell=5.0 / px) * warp_amp
    wx = _coarse_noise(rng, shape, cell=5.0 / px) * warp_amp
    wobble = _coarse_noise(rng, shape, cell=r_mean * 0.8)
    wy += np.arange(h, dtype=np.float32)[:, None]
    wx += np.arange(w, dtype=np.float32)[None, :]
    src = np.clip(np.rint(wy), 0, h - 1).astype(np.intp) * w + np.clip(np.rint(wx), 0, w - 1).astype(np.intp)
    near_w = nearest.ravel().take(src).reshape(shape)
    dist_w = dist.ravel().take(src).reshape(shape)
    reach = extent[near_w] * (1.0 + 0.18 * wobble)
    cell = np.where(dist_w <= reach, near_w, 0).astype(np.int32)
    cell[nucm] = nuc[nucm]

    # Mitotic cells round up: keep only a disc around the chromosomes.
    round_r = np.zeros(n + 1)
    for lab in np.flatnonzero(mitotic):
        cy, cx = centres[lab - 1]
        rr = radii[lab - 1] * rng.uniform(1.45, 1.7)
        round_r[lab] = rr
        y0, y1 = max(int(cy - rr - 2), 0), min(int(cy + rr + 3), h)
        x0, x1 = max(int(cx - rr - 2), 0), min(int(cx + rr + 3), w)
        if y0 >= y1 or x0 >= x1:
            continue
        sub = cell[y0:y1, x0:x1]
        yy, xx = np.mgrid[y0:y1, x0:x1]
        inside = np.hypot(yy - cy, xx - cx) <= rr
        sub[(sub == lab) & ~inside] = 0
        # the rounded cell fills its disc, pushing neighbours' cytoplasm aside
        sub[inside & (nuc[y0:y1, x0:x1] == 0)] = lab

    cyto = (cell > 0) & ~nucm
    ext_px = np.where(mitotic, round_r, extent)
    rel = np.zeros(shape, dtype=np.float32)
    inv_ext = _safe_inverse(ext_px).astype(np.float32)
    rel_all = dist * inv_ext[cell]
    rel[cyto] = np.clip(rel_all[cyto], 0, 1)
    # mitotic cells: position relative to the rounded cell's radius, from the chromosome mass outward
    if mitotic.any():
        mit_px = cyto & mitotic[cell]
        if mit_px.any():
            cc = np.zeros((n + 1, 2))
            cc[1:] = centres
            lab_m = cell[mit_px]
            yy, xx = np.nonzero(mit_px)
            d = np.hypot(yy - cc[lab_m, 0], xx - cc[lab_m, 1])
            rel[mit_px] = np.clip(d * inv_ext[lab_m], 0, 1)

    all_centres = np.zeros((n + 1, 2))
    all_centres[1:] = centres
    all_radii = np.zeros(n + 1)
    all_radii[1:] = radii
    labels = np.arange(n + 1)
    edge = np.zeros(n + 1)
    edge[1:] = _edge_along(nuc, labels[1:], all_centres[1:], angle[1:], r_mean)
    plate_half = np.zeros(n + 1)
    mit_labels = np.flatnonzero(mitotic)
    if mit_labels.size:
        # the spindle axis is perpendicular to the plate's long axis
        plate_half[mit_labels] = _edge_along(
            nuc, mit_labels, all_centres[mit_labels], angle[mit_labels] + math.pi / 2, r_mean
        )

    expression = np.zeros(n + 1)
    expression[1:] = np.exp(rng.normal(0, params.expression_sigma, size=n))

    return _Layout(
        shape=shape,
        margin=margin,
        n=n,
        nuc=nuc,
        cell=cell,
        nucm=nucm,
        cyto=cyto,
        dist=dist,
        rel=rel,
        nucleoli=nucleoli,
        dna=dna,
        tex=tex,
        centres=all_centres,
        radius=all_radii,
        extent=ext_px,
        mitotic=mitotic,
        angle=angle,
        edge=edge,
        plate_half=plate_half,
        expression=expression,
        px=px,
    )


def _edge_along(
    nuc: np.ndarray, labels: np.ndarray, centres: np.ndarray, angle: np.ndarray, r_mean: float
) -> np.ndarray:
    """Distance from each centre to the edge of its own nucleus along ``angle`` (marching in 0.5 px)."""
    if labels.size == 0:
        return np.zeros(0)
    h, w = nuc.shape
    steps = np.arange(0, 3.0 * max(r_mean, 1.0), 0.5)
    py = centres[:, 0, None] + np.sin(angle[:, None]) * steps[None, :]
    px_ = centres[:, 1, None] + np.cos(angle[:, None]) * steps[None, :]
    iy = np.clip(np.rint(py), 0, h - 1).astype(np.intp)
    ix = np.clip(np.rint(px_), 0, w - 1).astype(np.intp)
    outside = nuc[iy, ix] != labels[:, None]
    first = np.where(outside.any(axis=1), outside.argmax(axis=1), len(steps) - 1)
    return steps[first]


# --------------------------------------------------------------------------------------------------
# compartment patterns
# --------------------------------------------------------------------------------------------------


@dataclass
class _Pattern:
    """A compartment pattern with unit total per cell: a diffuse image plus weighted point sources."""

    diffuse: np.ndarray | None = None  # float32 canvas
    idx: np.ndarray | None = None  # flat pixel indices of point sources
    w: np.ndarray | None = None  # their weights


def _unit_diffuse(img: np.ndarray, lay: _Layout) -> np.ndarray:
    """Scale ``img`` (zero outside cells) so that each cell's total is 1."""
    sums = _per_label_sum(lay.cell.ravel(), img.ravel(), lay.n)
    scale = _safe_inverse(sums).astype(np.float32)
    return (img * scale[lay.cell]).astype(np.float32)


def _unit_points(idx: np.ndarray, w: np.ndarray, lay: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """Scale point weights so that each cell's points total 1 (cell taken at the point's pixel)."""
    labs = lay.cell.ravel()[idx]
    sums = _per_label_sum(labs, w, lay.n)
    return idx, (w * _safe_inverse(sums)[labs]).astype(np.float32)


def _sample_pixels(
    mask: np.ndarray, density: float, rng: np.random.Generator, accept: np.ndarray | None = None
) -> np.ndarray:
    """Draw about ``density * mask.sum()`` pixels of ``mask`` (flat indices), thinned by ``accept``."""
    flat = np.flatnonzero(mask)
    k = int(rng.poisson(density * flat.size)) if flat.size else 0
    if k == 0:
        return np.zeros(0, dtype=np.intp)
    pick = flat[rng.integers(0, flat.size, size=k)]
    if accept is not None:
        pick = pick[rng.random(k) < accept.ravel()[pick]]
    return pick


def _keep_in_cell(
    py: np.ndarray, px_: np.ndarray, owner: np.ndarray, lay: _Layout, region: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Round point coordinates; keep those inside ``region`` and in cell ``owner``. Returns flat idx, keep."""
    h, w = lay.shape
    iy = np.rint(py).astype(np.intp)
    ix = np.rint(px_).astype(np.intp)
    ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    flat = np.where(ok, iy * w + ix, 0)
    ok &= (lay.cell.ravel()[flat] == owner) & region.ravel()[flat]
    return flat[ok], ok


def _dissolve(img: np.ndarray, lay: _Layout) -> np.ndarray:
    """Nuclear pattern for interphase cells, cytosol-like diffuse signal in mitotic cells."""
    mit_cell = lay.mitotic[lay.cell]
    return np.where(mit_cell, lay.cyto.astype(np.float32), img * ~mit_cell)


def _p_nucleoplasm(lay: _Layout, rng: np.random.Generator) -> _Pattern:
    tex = _smooth_noise(rng, lay.shape, 0.8 / lay.px)
    img = lay.nucm * (1.0 - 0.92 * lay.nucleoli) * np.clip(1.0 + 0.15 * tex, 0.3, None)
    return _Pattern(diffuse=_unit_diffuse(_dissolve(img.astype(np.float32), lay), lay))


def _p_nucleolus(lay: _Layout, rng: np.random.Generator) -> _Pattern:
    img = lay.nucleoli * np.clip(1.0 + 0.25 * lay.tex, 0.3, None) * lay.nucm
    return _Pattern(diffuse=_unit_diffuse(_dissolve(img.astype(np.float32), lay), lay))


def _envelope_ring(lay: _Layout) -> np.ndarray:
    width = max(1.5, 0.5 / lay.px)
    return lay.cyto & (lay.dist <= width)


def _p_nuclear_envelope(lay: _Layout, rng: np.random.Generator) -> _Pattern:
    # A thin rim just outside the nucleus mask: the nuclear envelope is not part of the NUCLEAR
    # compartments, so the nucleus-proportion truth stays clean.
    ring = _envelope_ring(lay)
    img = ring * np.clip(1.0 + 0.3 * _smooth_noise(rng, lay.shape, 0.6 / lay.px), 0.2, None)
    return _Pattern(diffuse=_unit_diffuse(_dissolve(img.astype(np.float32), lay), lay))


def _p_chromatin(lay: _Layout, rng: np.random.Generator) -> _Pattern:
    # Chromatin-bound proteins follow the DNA stain, also on condensed mitotic chromosomes.
    return _Pattern(diffuse=_unit_diffuse(lay.dna * lay.nucm, lay))


def _cytosol_image(lay: _Layout, rng: np.random.Generator) -> np.ndarray:
    tex = _smooth_noise(rng, lay.shape, 1.0 / lay.px)
    # thinner cell periphery: less signal towards the edge in a projection
    img = lay.cyto * np.clip(1.0 + 0.12 * tex, 0.5, None) * (1.0 - 0.45 * lay.rel**2)
    return img.astype(np.float32)


def _p_cytosol(lay: _Layout, rng: np.random.Generator) -> _Pattern:
    return _Pattern(diffuse=_unit_diffuse(_cytosol_image(lay, rng), lay))


def _p_mitochondria(lay: _Layout, rng: np.random.Generator) -> _Pattern:
    # Short tubes: persistent random walks from seeds concentrated around the nucleus.
    # about one tube per 5 um^2 of cytoplasm
    seeds = _sample_pixels(lay.cyto, lay.px**2 / 5.0, rng, accept=1.0 - 0.6 * lay.rel)
    w_img = lay.shape[1]
    sy, sx = np.divmod(seeds, w_img)
    n_steps = max(int(round(3.0 / (0.7 * lay.px))), 2)  # ~3 um long tubes
    step = 0.7
    theta = rng.uniform(0, 2 * math.pi, size=(seeds.size, 1)) + np.cumsum(
        rng.normal(0, 0.3, size=(seeds.size, n_steps)), axis=1
    )
    offset = rng.uniform(-0.5, 0.5, size=(seeds.size, 1)) * n_steps * step
    py = sy[:, None] + np.cumsum(np.sin(theta) * step, axis=1) - np.sin(theta[:, :1]) * offset
    px_ = sx[:, None] + np.cumsum(np.cos(theta) * step, axis=1) - np.cos(theta[:, :1]) * offset
    owner = np.repeat(lay.cell.ravel()[seeds][:, None], n_steps, axis=1)
    bright = np.repeat(np.exp(rng.normal(0, 0.3, size=(seeds.size, 1))), n_steps, axis=1)
    idx, keep = _keep_in_cell(py, px_, owner, lay, lay.cyto)
    idx, w = _unit_points(idx, bright[keep], lay)
    return _Pattern(idx=idx, w=w)


def _p_er(lay: _Layout, rng: np.random.Generator) -> _Pattern:
    # Reticular network: the zero set of a smooth random field is a web of lines. Denser near the
    # nucleus (sheets), continuous with the nuclear envelope.
    field = _smooth_noise(rng, lay.shape, 0.7 / lay.px)
    tubules = np.exp(-((field / 0.4) ** 2))
    near = np.exp(-lay.dist * (lay.px / 1.2))
    img = lay.cyto * (tubules * (1.25 - lay.rel) + 0.35 * near) + 0.8 * _envelope_ring(lay)
    return _Pattern(diffuse=_unit_diffuse(img.astype(np.float32), lay))


def _perinuclear_fallback(
    lay: _Layout, idx: np.ndarray, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Points for cells that got none: the ``k`` cytoplasm pixels of each closest to its nucleus.

    Cells whose nucleus was clipped by a neighbour, or that are squeezed, can miss the geometric
    construction of a perinuclear organelle; this keeps the organelle compact and perinuclear there
    instead of leaving the cell to the uniform fallback of :func:`_complete`.
    """
    got = np.zeros(lay.n + 1, dtype=bool)
    got[lay.cell.ravel()[idx]] = True
    has_cyto = np.bincount(lay.cell[lay.cyto], minlength=lay.n + 1)[: lay.n + 1] > 0
    need = np.flatnonzero(~got & has_cyto)
    need = need[need > 0]
    if need.size == 0:
        return np.zeros(0, dtype=np.intp), np.zeros(0)
    cyto_flat = np.flatnonzero(lay.cyto)
    owner = lay.cell.ravel()[cyto_flat]
    sel = np.isin(owner, need)
    cand, cand_owner = cyto_flat[sel], owner[sel]
    # order by owner, then by distance to the nucleus (jittered so ties break at random)
    key = lay.dist.ravel()[cand] + rng.uniform(0, 0.5, size=cand.size)
    order = np.lexsort((key, cand_owner))
    cand, cand_owner = cand[order], cand_owner[order]
    first = np.searchsorted(cand_owner, need)
    rank = np.arange(cand.size) - np.repeat(first, np.diff(np.append(first, cand.size)))
    pick = cand[rank < k]
    return pick, np.ones(pick.size)


def _p_golgi(lay: _Layout, rng: np.random.Generator) -> _Pattern:
    labs = np.arange(1, lay.n + 1)
    inter = labs[~lay.mitotic[1:]]
    k = 40
    idx_parts: list[np.ndarray] = [np.zeros(0, dtype=np.intp)]
    w_parts: list[np.ndarray] = [np.zeros(0)]
    if inter.size:
        # A ribbon of stacks hugging the nucleus on one side (the same side as the centrosome).
        R = lay.edge[inter][:, None]
        along = rng.normal(0, 2.2 / lay.px, size=(inter.size, k))
        out = np.abs(rng.normal(0, 0.5 / lay.px, size=(inter.size, k))) + 0.5 / lay.px
        ang = lay.angle[inter][:, None] + along / np.maximum(R, 1.0)
        rad = R + out
        py = lay.centres[inter, 0][:, None] + np.sin(ang) * rad
        px_ = lay.centres[inter, 1][:, None] + np.cos(ang) * rad
        owner = np.repeat(inter[:, None], k, axis=1)
        bright = np.exp(rng.normal(0, 0.4, size=(inter.size, k)))
        idx, keep = _keep_in_cell(py, px_, owner, lay, lay.cyto)
        idx_parts.append(idx)
        w_parts.append(bright[keep])
    if lay.mitotic.any():
        # Mitotic Golgi fragments into dispersed vesicles.
        pick = _sample_pixels(lay.cyto & lay.mitotic[lay.cell], 0.05, rng)
        idx_parts.append(pick)
        w_parts.append(np.exp(rng.normal(0, 0.4, size=pick.size)))
    extra, extra_w = _perinuclear_fallback(lay, np.concatenate(idx_parts), 8, rng)
    idx, w = _unit_points(np.concatenate([*idx_parts, extra]), np.concatenate([*w_parts, extra_w]), lay)
    return _Pattern(idx=idx, w=w)


def _p_vesicles(lay: _Layout, rng: np.random.Generator) -> _Pattern:
    # about one vesicle per 6 um^2 of cytoplasm, somewhat more towards the periphery
    pick = _sample_pixels(lay.cyto, lay.px**2 / 6.0, rng, accept=0.4 + 0.6 * lay.rel)
    bright = rng.exponential(1.0, size=pick.size) + 0.3
    idx, w = _unit_points(pick, bright, lay)
    return _Pattern(idx=idx, w=w)


def _p_plasma_membrane(lay: _Layout, rng: np.random.Generator) -> _Pattern:
    # The cell outline; where a nucleus touches the cell edge the membrane is left out of the nucleus
    # mask so that no membrane signal counts as nuclear.
    outline = _label_boundaries(lay.cell) & ~lay.nucm
    img = outline * np.clip(1.0 + 0.25 * _smooth_noise(rng, lay.shape, 1.0 / lay.px), 0.3, None)
    return _Pattern(diffuse=_unit_diffuse(img.astype(np.float32), lay))


def _p_cytoskeleton(lay: _Layout, rng: np.random.Generator) -> _Pattern:
    # Straight-ish filaments spanning the cell, roughly aligned per cell (stress fibres / bundles), on
    # top of a diffuse pool of unpolymerised subunits (a fifth of the signal).
    cells = lay.cell > 0
    seeds = _sample_pixels(cells, lay.px**2 / 8.0, rng)  # one filament per 8 um^2 of cell
    pool = 0.2 * _unit_diffuse(_cytosol_image(lay, rng), lay)
    if seeds.size == 0:
        return _Pattern(diffuse=pool)
    owner = lay.cell.ravel()[seeds]
    main = rng.uniform(0, math.pi, size=lay.n + 1)
    theta = main[owner] + rng.normal(0, 0.45, size=seeds.size)
    length = 2.0 * (lay.radius[owner] + lay.extent[owner])
    step = 0.6
    t = np.arange(-1.0, 1.0 + 1e-9, step / max(float(length.max()), 1.0))
    half = (0.5 * length)[:, None] * t[None, :]
    sy, sx = np.divmod(seeds, lay.shape[1])
    py = sy[:, None] + np.sin(theta)[:, None] * half
    px_ = sx[:, None] + np.cos(theta)[:, None] * half
    own = np.repeat(owner[:, None], t.size, axis=1)
    bright = np.repeat(np.exp(rng.normal(0, 0.25, size=(seeds.size, 1))), t.size, axis=1)
    idx, keep = _keep_in_cell(py, px_, own, lay, lay.cyto)
    idx, w = _unit_points(idx, bright[keep], lay)
    return _Pattern(diffuse=pool, idx=idx, w=0.8 * w)


def _p_centrosome(lay: _Layout, rng: np.random.Generator) -> _Pattern:
    labs = np.arange(1, lay.n + 1)
    if labs.size == 0:
        return _Pattern(idx=np.zeros(0, dtype=np.intp), w=np.zeros(0, dtype=np.float32))
    # Candidate distances beyond the nucleus edge, in order of preference: the first one that lands
    # in the cell's own cytoplasm wins.
    offsets = np.array([2.0, 1.5, 3.0, 1.0, 4.0, 5.0, 6.5, 8.0]) * (0.4 / lay.px)
    mit_factor = np.array([1.0, 0.85, 0.7, 1.15, 0.55, 1.3, 0.4, 0.3])
    ang = lay.angle[labs] + rng.normal(0, 0.3, size=labs.size)
    mit = lay.mitotic[labs]
    base = np.where(mit, lay.plate_half[labs] + 3.0 / lay.px, lay.edge[labs])
    # mitotic cells: two spindle poles on both sides of the plate (perpendicular to its long axis)
    spindle = lay.angle[labs] + math.pi / 2
    dirs = [np.where(mit, spindle, ang), np.where(mit, spindle + math.pi, ang)]
    idx_parts, w_parts = [], []
    second = rng.random(labs.size) < 0.5  # duplicated centrosome (G2) half the time
    jitter = rng.uniform(0, 2 * math.pi, size=labs.size)
    for pole, d in enumerate(dirs):
        rad = np.where(mit[:, None], base[:, None] * mit_factor[None, :], base[:, None] + offsets[None, :])
        py = lay.centres[labs, 0][:, None] + np.sin(d)[:, None] * rad
        px_ = lay.centres[labs, 1][:, None] + np.cos(d)[:, None] * rad
        if pole == 1:
            # interphase: a second dot right next to the first one
            sep = 1.2 * (0.4 / lay.px)
            py = py + np.where(mit, 0.0, np.sin(jitter) * sep)[:, None]
            px_ = px_ + np.where(mit, 0.0, np.cos(jitter) * sep)[:, None]
        owner = np.repeat(labs[:, None], offsets.size, axis=1)
        h, w = lay.shape
        iy = np.clip(np.rint(py), 0, h - 1).astype(np.intp)
        ix = np.clip(np.rint(px_), 0, w - 1).astype(np.intp)
        inb = (py >= 0) & (py <= h - 1) & (px_ >= 0) & (px_ <= w - 1)
        flat = iy * w + ix
        ok = inb & (lay.cell.ravel()[flat] == owner) & lay.cyto.ravel()[flat]
        first = ok.argmax(axis=1)
        has = ok[np.arange(labs.size), first]
        if pole == 1:
            has &= mit | second
        idx_parts.append(flat[np.arange(labs.size), first][has])
        w_parts.append(np.where(pole == 1, 0.7, 1.0) * np.ones(int(has.sum())))
    extra, extra_w = _perinuclear_fallback(lay, np.concatenate(idx_parts), 1, rng)
    idx, w = _unit_points(np.concatenate([*idx_parts, extra]), np.concatenate([*w_parts, extra_w]), lay)
    return _Pattern(idx=idx, w=w)


_BUILDERS = {
    "nucleoplasm": _p_nucleoplasm,
    "nucleolus": _p_nucleolus,
    "nuclear_envelope": _p_nuclear_envelope,
    "chromatin": _p_chromatin,
    "cytosol": _p_cytosol,
    "mitochondria": _p_mitochondria,
    "er": _p_er,
    "golgi": _p_golgi,
    "vesicles": _p_vesicles,
    "plasma_membrane": _p_plasma_membrane,
    "cytoskeleton": _p_cytoskeleton,
    "centrosome": _p_centrosome,
}
if tuple(_BUILDERS) != COMPARTMENTS:  # the builder table must follow the fixed compartment order
    raise RuntimeError("render._BUILDERS is out of sync with compartments.COMPARTMENTS")


def _complete(pattern: _Pattern, lay: _Layout, name: str) -> _Pattern:
    """Give cells that got no signal for a compartment (e.g. no room for a Golgi) a uniform fallback.

    Without it those cells would silently drop the compartment and the weights would stop being
    fractions of the signal. The fallback fills the cell's nucleus (nuclear compartments) or its
    cytoplasm (the others), or the whole cell when that region is empty, so that the nucleus
    proportion truth still holds.
    """
    totals = np.zeros(lay.n + 1)
    if pattern.diffuse is not None:
        totals += _per_label_sum(lay.cell.ravel(), pattern.diffuse.ravel(), lay.n)
    if pattern.idx is not None and pattern.idx.size:
        totals += _per_label_sum(lay.cell.ravel()[pattern.idx], pattern.w, lay.n)
    present = np.bincount(lay.cell.ravel(), minlength=lay.n + 1)[: lay.n + 1] > 0
    missing = present & (totals < 0.5)
    missing[0] = False
    if not missing.any():
        return pattern
    logger.debug("%s: %d cell(s) without pattern, using a uniform fallback", name, int(missing.sum()))
    region = lay.nucm if name in NUCLEAR else lay.cyto
    has_region = np.bincount(lay.cell[region], minlength=lay.n + 1)[: lay.n + 1] > 0
    where = missing[lay.cell] & np.where(has_region[lay.cell], region, True)
    fill = _unit_diffuse(where.astype(np.float32), lay)
    diffuse = fill if pattern.diffuse is None else pattern.diffuse + fill
    return _Pattern(diffuse=diffuse, idx=pattern.idx, w=pattern.w)


# --------------------------------------------------------------------------------------------------
# optics and noise
# --------------------------------------------------------------------------------------------------


def _camera(photons: np.ndarray, params: RenderParams, rng: np.random.Generator) -> np.ndarray:
    """Shot noise, gain, read noise and offset; rounded and clipped to ``uint16``."""
    lam = np.clip(photons, 0, None) + np.float32(params.background)
    if params.background >= _GAUSSIAN_SHOT_NOISE_MIN:
        # Every pixel receives at least `background` photons, where the Poisson distribution is
        # indistinguishable from N(lam, lam) at camera precision; the normal draw is ~4x cheaper.
        counts = lam + np.sqrt(lam) * rng.standard_normal(lam.shape, dtype=np.float32)
    else:
        counts = rng.poisson(lam).astype(np.float32)
    adu = counts * np.float32(params.gain_adu) + np.float32(params.offset_adu)
    if params.read_noise_adu > 0:
        adu += rng.standard_normal(adu.shape, dtype=np.float32) * np.float32(params.read_noise_adu)
    return np.clip(np.rint(adu), 0, 65535).astype(np.uint16)


def _exposure(clean: np.ndarray, peak: float) -> float:
    # Auto-exposure on a subsample: the 99.9th percentile of the noise-free image maps to `peak`.
    ref = float(np.percentile(clean[::2, ::2], 99.9))
    if ref <= 0:
        ref = float(clean.max())
    return peak / ref if ref > 0 else 0.0


# --------------------------------------------------------------------------------------------------
# render
# --------------------------------------------------------------------------------------------------


def _check_weights(weights: Any) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (N_COMPARTMENTS,):
        raise InputError(f"weights must have shape ({N_COMPARTMENTS},) (one per compartment), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise InputError(f"weights must be finite, >= 0 and not all zero, got {w.tolist()}")
    return w / w.sum()


def render_fov(
    weights: np.ndarray,
    *,
    params: RenderParams,
    rng: np.random.Generator,
    nuclei_bank: Sequence[NucleusTemplate] | Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    return_maps: bool = False,
) -> RenderedFOV:
    """Render one field of view of cells expressing a protein with the given localization.

    Parameters
    ----------
    weights
        ``(12,)`` compartment weights in :data:`~protloc.data.world.compartments.COMPARTMENTS` order
        (normalised to sum 1): the fraction of each cell's protein signal in each compartment.
    params
        Renderer parameters.
    rng
        Source of all randomness (seed it per field of view for order-independent results).
    nuclei_bank
        Real nucleus patches (``(image, mask)`` pairs or prepared :class:`NucleusTemplate`; pass the
        output of :func:`prepare_nuclei_bank` when rendering many fields). ``None`` or empty: all nuclei
        are procedural.
    return_maps
        Also return the noise-free per-compartment maps (all 12 compartments; slower).

    Returns
    -------
    RenderedFOV
        Images, labels and truths.

    Raises
    ------
    InputError
        If ``weights`` has the wrong shape or is negative, non-finite or all zero.
    """
    w = _check_weights(weights)
    bank = None
    if nuclei_bank:
        bank = (
            list(nuclei_bank)
            if all(isinstance(t, NucleusTemplate) for t in nuclei_bank)
            else prepare_nuclei_bank(nuclei_bank)
        )
    # Child seeds are drawn before the layout so every compartment has a fixed stream.
    comp_seeds = rng.integers(0, 2**63 - 1, size=N_COMPARTMENTS + 1)
    lay = _layout(params, rng, bank)
    noise_rng = np.random.default_rng(int(comp_seeds[-1]))

    m = lay.margin
    crop = (slice(m, m + params.size), slice(m, m + params.size))
    wanted = np.flatnonzero((w > 0) | return_maps)
    h, w_img = lay.shape
    diffuse_sum = np.zeros(lay.shape, dtype=np.float32)
    point_idx: list[np.ndarray] = []
    point_w: list[np.ndarray] = []
    maps: np.ndarray | None = None
    if return_maps:
        maps = np.zeros((N_COMPARTMENTS, params.size, params.size), dtype=np.float32)
    expr_img = lay.expression.astype(np.float32)[lay.cell]
    cell_flat = lay.cell.ravel()
    point_sigma = 0.3 / lay.px
    for c in wanted:
        name = COMPARTMENTS[c]
        pat = _complete(_BUILDERS[name](lay, np.random.default_rng(int(comp_seeds[c]))), lay, name)
        if w[c] > 0:
            if pat.diffuse is not None:
                diffuse_sum += np.float32(w[c]) * pat.diffuse
            if pat.idx is not None and pat.idx.size:
                point_idx.append(pat.idx)
                point_w.append(w[c] * pat.w * lay.expression[cell_flat[pat.idx]])
        if maps is not None:
            obj = np.zeros(lay.shape, dtype=np.float32)
            if pat.diffuse is not None:
                obj += pat.diffuse * expr_img
            if pat.idx is not None and pat.idx.size:
                pts = np.bincount(pat.idx, weights=pat.w * lay.expression[cell_flat[pat.idx]], minlength=h * w_img)
                obj += ndi.gaussian_filter(pts.reshape(lay.shape).astype(np.float32), point_sigma)
            maps[c] = obj[crop]
    diffuse_sum *= expr_img
    points = None
    if point_idx:
        points = (
            np.bincount(np.concatenate(point_idx), weights=np.concatenate(point_w), minlength=h * w_img)
            .reshape(lay.shape)
            .astype(np.float32)
        )

    def optics(extra_sigma: float) -> np.ndarray:
        # Blur is linear: the diffuse part gets the PSF (+ defocus), point sources additionally their
        # own size, composed into one Gaussian.
        sig = math.hypot(params.psf_sigma_um / lay.px, extra_sigma)
        out = ndi.gaussian_filter(diffuse_sum, sig)
        if points is not None:
            out += ndi.gaussian_filter(points, math.hypot(sig, point_sigma))
        return out[crop]

    def optics_dna(extra_sigma: float) -> np.ndarray:
        sig = math.hypot(params.psf_sigma_um / lay.px, extra_sigma)
        return ndi.gaussian_filter(lay.dna, sig)[crop]

    protein_focus = optics(0.0)
    dna_focus = optics_dna(0.0)
    nuc_crop = lay.nuc[crop] > 0
    total = float(protein_focus.sum(dtype=np.float64))
    nucleus_proportion = float(protein_focus[nuc_crop].sum(dtype=np.float64)) / total if total > 0 else 0.0
    p_scale = _exposure(protein_focus, params.protein_peak)
    n_scale = _exposure(dna_focus, params.nucleus_peak)
    if maps is not None:
        maps *= np.float32(p_scale)

    if params.z == 1:
        protein = _camera(protein_focus * p_scale, params, noise_rng)
        nucleus = _camera(dna_focus * n_scale, params, noise_rng)
    else:
        z_focus = (params.z - 1) / 2.0
        prot_slices, nuc_slices = [], []
        for k in range(params.z):
            extra = abs(k - z_focus) * params.defocus_sigma_um / lay.px
            p = protein_focus if extra == 0 else optics(extra)
            d = dna_focus if extra == 0 else optics_dna(extra)
            prot_slices.append(_camera(p * p_scale, params, noise_rng))
            nuc_slices.append(_camera(d * n_scale, params, noise_rng))
        protein = np.stack(prot_slices)
        nucleus = np.stack(nuc_slices)

    # Relabel the cells visible in the field to 1..k (nucleus k belongs to cell k).
    cell_crop = lay.cell[crop]
    present = np.unique(cell_crop)
    present = present[present > 0]
    lut = np.zeros(lay.n + 1, dtype=np.int32)
    lut[present] = np.arange(1, present.size + 1, dtype=np.int32)
    mitotic = np.zeros(present.size + 1, dtype=bool)
    mitotic[1:] = lay.mitotic[present]
    expression = np.zeros(present.size + 1)
    expression[1:] = lay.expression[present]
    return RenderedFOV(
        nucleus=nucleus,
        protein=protein,
        nucleus_labels=lut[lay.nuc[crop]],
        cell_labels=lut[cell_crop],
        mitotic=mitotic,
        expression=expression,
        nucleus_proportion=nucleus_proportion,
        weights=w,
        compartment_maps=maps,
    )


def expected_nucleus_proportion(weights: np.ndarray) -> float:
    """Sum of the weights of the :data:`~protloc.data.world.compartments.NUCLEAR` compartments."""
    w = _check_weights(weights)
    return float(w[_NUCLEAR_IDX].sum())

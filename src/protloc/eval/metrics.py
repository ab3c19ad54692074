"""CELL-E's image-accuracy metrics (paper S.3.7 "Performance Evaluation", Table S.2), vectorised torch.

Every image metric takes batched images ``[B, 1, S, S]`` (CPU or GPU, any floating dtype) and returns one
value per image, a float32 tensor ``[B]`` on the input device. The paper reports each metric as
mean +- standard deviation (Table S.2); :func:`summarize`, :func:`mean_sd_over_proteins` and
:func:`mean_sd_over_images` do the aggregation.

Images, as in the paper:

- *predicted threshold image*: the protein threshold VQGAN's decoding of the sampled tokens (or, for the
  VQGAN ceiling of Table S.2, of the ground-truth tokens), binarised at 0.5;
- *2D PDF*: the probability-weighted decoding of paper Eq. 3 (``v = sum_i w_i p(v_i)``), a continuous map
  whose pixels are lowered where the model is unsure;
- *target threshold image*: the ground-truth protein image binarised at its mean, {0, 1};
- *nucleus mask*: the paper segments the nucleus channel with Cellpose (S.3.7, Fig. S.10); we use the
  mean-threshold stand-in (see :func:`nucleus_mask`).

Definitions (S.3.7 wording quoted in each function):

- nucleus proportion ``p(x) = sum(x * mask) / sum(x)`` (0 for an all-zero image);
- nucleus proportion accuracy ``1 - |p(pdf) - p(target)|``;
- threshold pixel accuracy ``1 - mean |pred - target|`` of binary images (= fraction of equal pixels);
- 2D PDF pixel accuracy ``1 - mean |pdf - target|`` with the PDF clipped to [0, 1] (not rescaled, so that
  unsure tokens lower the score, as the paper says they do);
- SSIM (Wang et al. 2004; 11 x 11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03), predicted vs target
  threshold image;
- nuclear localization: an image is "nuclear" when more than 50% of its intensity lies in the nucleus.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from protloc.errors import InputError

__all__ = [
    "celle_metrics",
    "mean_sd_over_images",
    "mean_sd_over_proteins",
    "nuclear_localization",
    "nuclear_localization_accuracy",
    "nucleus_mask",
    "nucleus_proportion",
    "nucleus_proportion_accuracy",
    "pdf_pixel_accuracy",
    "ssim",
    "summarize",
    "threshold_metrics",
    "threshold_pixel_accuracy",
]


def _mean_mask(nucleus: Tensor) -> Tensor:
    """Nucleus mask of reference crops ``[B, 1, S, S]``: ``pixel >= mean`` of each crop (bool).

    The paper segments the nucleus channel with Cellpose (S.3.7); a mean threshold is a cheap, model-free
    stand-in that marks the bright nuclei of a crop (the same rule as the protein threshold, Sec. 4.3).
    """
    return nucleus >= nucleus.mean(dim=(-2, -1), keepdim=True)


def threshold_metrics(reconstruction: Tensor, target: Tensor, nucleus: Tensor) -> dict[str, Tensor]:
    """Per-image accuracies of a threshold-image reconstruction (paper S.3.7, Table S.2).

    Parameters
    ----------
    reconstruction
        ``[B, 1, S, S]`` decoder output; binarized at 0.5.
    target
        ``[B, 1, S, S]`` {0, 1} threshold image.
    nucleus
        ``[B, 1, S, S]`` nucleus reference crops (masked with :func:`nucleus_mask`'s rule, unchecked).

    Returns
    -------
    dict
        ``pixel_accuracy`` ``[B]``: fraction of pixels where the binarized reconstruction equals the
        target (1 - pixel MAE); ``nucleus_proportion_accuracy`` ``[B]``: ``1 - |p_rec - p_target|``, ``p``
        = fraction of an image's threshold pixels inside the nucleus mask (0 for an empty image).
    """
    pred = (reconstruction >= 0.5).float()
    tgt = (target >= 0.5).float()
    mask = _mean_mask(nucleus).float()
    pixel = (pred == tgt).float().mean(dim=(1, 2, 3))

    def proportion(x: Tensor) -> Tensor:
        return (x * mask).sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3)).clamp_min(1.0)

    return {"pixel_accuracy": pixel, "nucleus_proportion_accuracy": 1.0 - (proportion(pred) - proportion(tgt)).abs()}


#: Column of :func:`summarize`'s table holding the number of images of each protein (not a metric).
N_IMAGES = "n_images"


# --------------------------------------------------------------------------------------------- checks
def _check_image(name: str, x: object) -> Tensor:
    """Validate one ``[B, 1, S, S]`` image batch: a tensor, 4-D, one channel, square, finite."""
    if not isinstance(x, Tensor):
        raise InputError(f"{name} must be a torch.Tensor of shape [B, 1, S, S], got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3]:
        raise InputError(f"{name} must have shape [B, 1, S, S], got {list(x.shape)}")
    if x.shape[0] == 0 or x.shape[2] == 0:
        raise InputError(f"{name} is empty: shape {list(x.shape)}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{name} contains {n_bad} NaN/Inf value(s)")
    if x.is_complex():
        raise InputError(f"{name} must be real, got dtype {x.dtype}")
    return x


def _check_images(**images: Tensor) -> list[Tensor]:
    """Validate several image batches and require them to have the same shape."""
    checked = [_check_image(name, x) for name, x in images.items()]
    shapes = {name: list(x.shape) for name, x in zip(images, checked, strict=True)}
    if len({tuple(s) for s in shapes.values()}) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise InputError(f"image shapes must match: {listed}")
    return checked


def _float(x: Tensor) -> Tensor:
    """``x`` as a float tensor (float32 unless already float64) for the arithmetic."""
    return x.double() if x.dtype == torch.float64 else x.float()


def _as_mask(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _binarize(x: Tensor) -> Tensor:
    """Binary {0, 1} float image: ``x >= 0.5`` (the rule of :func:`threshold_metrics`)."""
    return (x >= 0.5).float()


def _per_image(x: Tensor) -> Tensor:
    return x.to(torch.float32)


# ---------------------------------------------------------------------------------------------- masks
def nucleus_mask(nucleus: Tensor) -> Tensor:
    """Boolean nucleus mask ``[B, 1, S, S]`` of nucleus reference crops (paper S.3.7, Fig. S.10).

    The paper masks the nucleus channel with Cellpose (S.3.7: "we first create a mask (Fig. S.10) of the
    nucleus channel using Cellpose"). protloc does not depend on Cellpose; this is the model-free
    stand-in used throughout the package (``pixel >= mean`` of each crop), so the metrics here agree with
    the VQGAN trainer's reconstruction ceiling (:func:`threshold_metrics`).

    Parameters
    ----------
    nucleus
        ``[B, 1, S, S]`` nucleus reference crops (finite).

    Returns
    -------
    Tensor
        ``[B, 1, S, S]`` bool, True inside the nucleus.
    """
    (nucleus,) = _check_images(nucleus=nucleus)
    return _mean_mask(nucleus)


# ---------------------------------------------------------------------------------- nucleus proportion
def nucleus_proportion(image: Tensor, mask: Tensor) -> Tensor:
    """Fraction of an image's total intensity inside the nucleus mask (paper S.3.7).

    S.3.7, "Nucleus Proportion Accuracy": "We take a sum over the predicted 2D PDF pixels found within
    the nucleus mask, and divide this by the sum of pixels across the image." The same ratio serves
    binary threshold images (fraction of "on" pixels in the nucleus) and continuous probability maps.

    Parameters
    ----------
    image
        ``[B, 1, S, S]`` non-negative image: threshold image or 2D PDF. Negative values (a decoder can
        undershoot 0 slightly) are clipped to 0.
    mask
        ``[B, 1, S, S]`` nucleus mask (bool, or numeric with non-zero = inside), e.g. from
        :func:`nucleus_mask`.

    Returns
    -------
    Tensor
        ``[B]`` float32 in [0, 1]; 0 for an all-zero image.
    """
    image, mask = _check_images(image=image, mask=mask)
    x = _float(image).clamp_min(0.0)
    inside = (x * _as_mask(mask)).sum(dim=(1, 2, 3))
    total = x.sum(dim=(1, 2, 3))
    return _per_image(torch.where(total > 0, inside / total.clamp_min(torch.finfo(x.dtype).tiny), 0.0))


def nucleus_proportion_accuracy(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Nucleus proportion accuracy ``1 - |p(pred) - p(target)|`` (paper S.3.7, Table S.2).

    S.3.7: the proportion of intensity in the nucleus is computed for the prediction (the 2D PDF) and,
    "for the ground truth, we use a similar masking calculation, but consider the values of the ground
    truth protein image. These values are subtracted to calculate a mean-average error (MAE). Since the
    maximum possible value is 1 and minimum possible value is 0, we report accuracy as 1 - MAE."
    Sec. 2 names the ground-truth image: the metric "measures how close the estimated proportion of pixel
    intensity within the nucleus is to the ground truth thresholded image".

    Parameters
    ----------
    pred
        ``[B, 1, S, S]`` predicted image (2D PDF, or a threshold image for the VQGAN ceiling).
    target
        ``[B, 1, S, S]`` ground-truth image (the threshold image in :func:`celle_metrics`).
    mask
        ``[B, 1, S, S]`` nucleus mask.

    Returns
    -------
    Tensor
        ``[B]`` float32 in [0, 1]; see :func:`nucleus_proportion` (``p`` of an all-zero image is 0).
    """
    _check_images(pred=pred, target=target, mask=mask)
    return 1.0 - (nucleus_proportion(pred, mask) - nucleus_proportion(target, mask)).abs()


# ---------------------------------------------------------------------------------------- pixel errors
def threshold_pixel_accuracy(pred_threshold: Tensor, target_threshold: Tensor) -> Tensor:
    """Predicted threshold pixel accuracy: ``1 - MAE`` of binary images (paper S.3.7, Table S.2).

    S.3.7: "We simply calculate a pixel-wise MAE between the predicted protein threshold image of CELL-E
    and the ground truth protein threshold image." Both images are binarised at 0.5 (``x >= 0.5``), so
    ``1 - MAE`` is the fraction of pixels where they agree.

    Parameters
    ----------
    pred_threshold
        ``[B, 1, S, S]`` predicted threshold image (decoder output, any range).
    target_threshold
        ``[B, 1, S, S]`` ground-truth threshold image.

    Returns
    -------
    Tensor
        ``[B]`` float32 in [0, 1].
    """
    pred, target = _check_images(pred_threshold=pred_threshold, target_threshold=target_threshold)
    return _per_image((_binarize(pred) == _binarize(target)).float().mean(dim=(1, 2, 3)))


def pdf_pixel_accuracy(pdf: Tensor, target_threshold: Tensor, *, normalize: Literal["clip", "max"] = "clip") -> Tensor:
    """Predicted 2D PDF pixel accuracy: ``1 - mean |pdf - target|`` (paper S.3.7, Table S.2).

    S.3.7: "This metric is similar to Predicted Threshold Pixel Accuracy, except we evaluate the
    difference using the predicted 2D PDF, rather than the predicted protein threshold image. We expect
    this number to be less accurate as tokens with less confidence will reduce the pixel value, while
    all values in the protein threshold image are 0 or 1."

    Normalisation: the PDF of Eq. 3 is a probability-weighted sum of decoded threshold patches (token
    probabilities "clipped between 0 and 1"), so it already lives on the threshold image's [0, 1] scale,
    and the paper's explanation of the lower score (0.63-0.68 vs 0.77, Table S.2) is exactly that unsure
    tokens *reduce the pixel value*. The default ``"clip"`` therefore uses the PDF as is, clipped to
    [0, 1] (decoders over/undershoot slightly); the target is binarised at 0.5. Rescaling each PDF by its
    maximum (``"max"``, all-zero maps stay 0) would partly undo that confidence penalty (a uniformly
    unsure map would score like a confident one); it is offered for the "normalized ... heatmap" of the
    paper's figures (Sec. 4.6), which is a display step.

    Parameters
    ----------
    pdf
        ``[B, 1, S, S]`` predicted 2D probability map.
    target_threshold
        ``[B, 1, S, S]`` ground-truth threshold image.
    normalize
        ``"clip"`` (default): clip to [0, 1]; ``"max"``: clip negatives to 0 and divide by each map's
        maximum.

    Returns
    -------
    Tensor
        ``[B]`` float32 in [0, 1].
    """
    pdf, target = _check_images(pdf=pdf, target_threshold=target_threshold)
    p = _float(pdf)
    if normalize == "clip":
        p = p.clamp(0.0, 1.0)
    elif normalize == "max":
        p = p.clamp_min(0.0)
        peak = p.amax(dim=(1, 2, 3), keepdim=True)
        p = torch.where(peak > 0, p / peak.clamp_min(torch.finfo(p.dtype).tiny), torch.zeros_like(p))
    else:
        raise InputError(f"normalize must be 'clip' or 'max', got {normalize!r}")
    return _per_image(1.0 - (p - _binarize(target).to(p.dtype)).abs().mean(dim=(1, 2, 3)))


# ------------------------------------------------------------------------------------------------ SSIM
def _gaussian_kernel(win_size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Normalised 1-D Gaussian ``[win_size]`` (scipy's ``gaussian_filter`` taps for radius ``win//2``)."""
    r = (win_size - 1) // 2
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def ssim(
    x: Tensor,
    y: Tensor,
    *,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Mean structural similarity of each image pair (Wang et al. 2004; paper S.3.7, Table S.2).

    S.3.7: "Structural similarity index measure (SSIM) is a measure of local perceptual similarity
    between images. It considers neighboring pixels to evaluate loss contextually by incorporating
    luminance and contrast information." The paper does not give its settings; this is the reference
    definition of Wang et al. (2004): local means, variances and covariance under a normalised Gaussian
    window (11 x 11, sigma 1.5, population statistics), ``C1 = (K1 L)^2``, ``C2 = (K2 L)^2`` with
    ``K1 = 0.01``, ``K2 = 0.03`` and ``L = data_range``::

        SSIM = (2 mu_x mu_y + C1) (2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1) (s_x^2 + s_y^2 + C2))

    averaged over the window positions that fit inside the image (no padding). This equals
    ``skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1.0)``, which also averages over the interior only.

    Parameters
    ----------
    x, y
        ``[B, 1, S, S]`` image batches with ``S >= win_size``.
    data_range
        Dynamic range ``L`` of the images (1.0 for [0, 1] images).
    win_size
        Odd side of the Gaussian window (11: radius ``int(3.5 sigma + 0.5) = 5`` for sigma 1.5).
    sigma
        Standard deviation of the Gaussian window, in pixels.
    k1, k2
        Stabilising constants of Wang et al. (2004).

    Returns
    -------
    Tensor
        ``[B]`` float32 mean SSIM per image, at most 1 (1 for identical images).
    """
    x, y = _check_images(x=x, y=y)
    if win_size < 1 or win_size % 2 == 0:
        raise InputError(f"win_size must be a positive odd integer, got {win_size}")
    if win_size > x.shape[-1]:
        raise InputError(
            f"images of size {x.shape[-1]} are smaller than the SSIM window ({win_size}); pass a smaller win_size"
        )
    if not (data_range > 0 and math.isfinite(data_range)):
        raise InputError(f"data_range must be a positive number, got {data_range}")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise InputError(f"sigma must be a positive number, got {sigma}")
    a = x.double() if x.dtype == torch.float64 or y.dtype == torch.float64 else x.float()
    b = y.to(a.dtype)
    k = _gaussian_kernel(win_size, sigma, a.dtype, a.device)
    kh, kw = k.view(1, 1, 1, -1), k.view(1, 1, -1, 1)

    def blur(t: Tensor) -> Tensor:  # separable 'valid' Gaussian filter
        return F.conv2d(F.conv2d(t, kh), kw)

    # one pass over the 5 maps of each image: x, y, x^2, y^2, xy, as channels folded into the batch
    stack = torch.cat([a, b, a * a, b * b, a * b], dim=1)  # [B, 5, S, S]
    n, c = stack.shape[:2]
    m = blur(stack.reshape(n * c, 1, *stack.shape[2:])).reshape(n, c, *(s - win_size + 1 for s in stack.shape[2:]))
    mu_x, mu_y, e_xx, e_yy, e_xy = m.unbind(dim=1)
    var_x, var_y, cov = e_xx - mu_x * mu_x, e_yy - mu_y * mu_y, e_xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return _per_image(s.mean(dim=(-2, -1)))


# ---------------------------------------------------------------------------------- nuclear localization
def nuclear_localization(image: Tensor, mask: Tensor, threshold: float = 0.5) -> Tensor:
    """Is each image "nuclear": more than ``threshold`` of its intensity inside the nucleus? (S.3.7).

    S.3.7, "Nuclear Localization Prediction": "If > 50% of this intensity was contained within the area
    of the nuclear mask, the assigned label would be positive for nuclear localization. Otherwise, the
    protein would be designated as non-nuclear." The comparison is strict: exactly 50% is non-nuclear,
    and so is an all-zero image (proportion 0).

    Parameters
    ----------
    image
        ``[B, 1, S, S]`` ground-truth threshold image or predicted 2D PDF.
    mask
        ``[B, 1, S, S]`` nucleus mask.
    threshold
        Proportion that must be exceeded (0.5 in the paper).

    Returns
    -------
    Tensor
        ``[B]`` bool.
    """
    return nucleus_proportion(image, mask) > threshold


def nuclear_localization_accuracy(pred: Tensor, target: Tensor, mask: Tensor, threshold: float = 0.5) -> Tensor:
    """Per-image agreement of the nuclear-localization calls of prediction and target (paper S.3.7).

    S.3.7: the ground-truth label comes from "the ground truth thresholded protein image", the predicted
    label from "a summation over the masked and unmasked regions of the predicted 2D PDF"; both use the
    > 50% rule of :func:`nuclear_localization`. The mean over images is Table S.1's "Nucleus
    Localization Prediction Accuracy".

    Parameters
    ----------
    pred
        ``[B, 1, S, S]`` predicted 2D PDF (or threshold image).
    target
        ``[B, 1, S, S]`` ground-truth threshold image.
    mask
        ``[B, 1, S, S]`` nucleus mask.
    threshold
        See :func:`nuclear_localization`.

    Returns
    -------
    Tensor
        ``[B]`` float32: 1.0 where the calls agree, else 0.0.
    """
    _check_images(pred=pred, target=target, mask=mask)
    agree = nuclear_localization(pred, mask, threshold) == nuclear_localization(target, mask, threshold)
    return _per_image(agree.float())


# ------------------------------------------------------------------------------------------- all at once
def celle_metrics(
    *,
    pred_threshold: Tensor,
    pdf: Tensor | None,
    target_threshold: Tensor,
    nucleus: Tensor,
    pdf_normalize: Literal["clip", "max"] = "clip",
) -> dict[str, Tensor]:
    """All per-image metrics of paper S.3.7 / Table S.2 with one nucleus mask.

    Which image enters which metric, following S.3.7:

    - nucleus proportion and nuclear localization of the prediction use the **2D PDF** ("We take a sum
      over the predicted 2D PDF pixels found within the nucleus mask"; "For the predicted label, we took
      a summation ... of the predicted 2D PDF"); those of the ground truth use the **target threshold
      image** ("computing the proportion of intensity on the ground truth thresholded protein image");
    - threshold pixel accuracy: binarised predicted vs target threshold image;
    - 2D PDF pixel accuracy: PDF vs target threshold image (:func:`pdf_pixel_accuracy`);
    - SSIM: binarised predicted threshold image vs target threshold image. S.3.7 does not name the
      images, but Table S.2 reports SSIM for the VQGAN ceiling (the ground-truth threshold image through
      the threshold VQGAN), which has no PDF and leaves the PDF row empty, so SSIM compares threshold
      images. Windows where both images are empty count as identical, so a sparse target against an
      empty prediction still scores close to 1.

    With ``pdf=None`` (the VQGAN ceiling of Table S.2: "the ground truth threshold image passed through
    the protein threshold VQGAN") the binarised ``pred_threshold`` stands in for the PDF in the
    nucleus-proportion and localization metrics, and ``pdf_pixel_accuracy`` is left out.

    Parameters
    ----------
    pred_threshold
        ``[B, 1, S, S]`` predicted threshold image (decoder output; binarised at 0.5).
    pdf
        ``[B, 1, S, S]`` predicted 2D probability map (paper Eq. 3), or None.
    target_threshold
        ``[B, 1, S, S]`` ground-truth threshold image ({0, 1}; binarised at 0.5).
    nucleus
        ``[B, 1, S, S]`` nucleus reference crops; masked once with :func:`nucleus_mask`.
    pdf_normalize
        Passed to :func:`pdf_pixel_accuracy`; also how the PDF is scaled for the proportions (which do
        not depend on a positive scale, so only the clipping matters there).

    Returns
    -------
    dict[str, Tensor]
        ``[B]`` float32 tensors: ``nucleus_proportion_accuracy``, ``threshold_pixel_accuracy``,
        ``pdf_pixel_accuracy`` (only with a PDF), ``ssim``, ``nuclear_localization_correct`` (1.0 / 0.0),
        ``nucleus_proportion_pred``, ``nucleus_proportion_true``.
    """
    images = {"pred_threshold": pred_threshold, "target_threshold": target_threshold, "nucleus": nucleus}
    if pdf is not None:
        images["pdf"] = pdf
    _check_images(**images)
    if pdf_normalize not in ("clip", "max"):
        raise InputError(f"pdf_normalize must be 'clip' or 'max', got {pdf_normalize!r}")
    mask = nucleus_mask(nucleus)
    pred_bin, target_bin = _binarize(pred_threshold), _binarize(target_threshold)
    # the proportion is scale-free, so only the clipping to [0, 1] of "clip" can change it
    located = pred_bin if pdf is None else (_float(pdf).clamp(0.0, 1.0) if pdf_normalize == "clip" else pdf)
    p_pred, p_true = nucleus_proportion(located, mask), nucleus_proportion(target_bin, mask)
    out = {
        "nucleus_proportion_accuracy": 1.0 - (p_pred - p_true).abs(),
        "threshold_pixel_accuracy": threshold_pixel_accuracy(pred_bin, target_bin),
    }
    if pdf is not None:
        out["pdf_pixel_accuracy"] = pdf_pixel_accuracy(pdf, target_bin, normalize=pdf_normalize)
    out["ssim"] = ssim(pred_bin, target_bin, data_range=1.0)
    out["nuclear_localization_correct"] = ((p_pred > 0.5) == (p_true > 0.5)).float()
    out["nucleus_proportion_pred"] = p_pred
    out["nucleus_proportion_true"] = p_true
    return {k: _per_image(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------- aggregation
def _to_numpy(name: str, v: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    arr = v.detach().to("cpu", torch.float64).numpy() if isinstance(v, Tensor) else np.asarray(v, dtype=np.float64)
    if arr.ndim != 1:
        raise InputError(f"per-image metric {name!r} must be 1-D [N], got shape {list(arr.shape)}")
    return arr


def summarize(per_image: Mapping[str, Tensor | np.ndarray], protein_ids: Sequence[str]) -> pd.DataFrame:
    """Per-protein means of per-image metrics (one row per protein).

    Parameters
    ----------
    per_image
        Metric name -> ``[N]`` values, one per image (e.g. :func:`celle_metrics` outputs concatenated
        over batches); bool values count as 0 / 1. NaNs (e.g. an undefined metric) are skipped by the
        mean.
    protein_ids
        ``N`` protein identifiers, the protein of each image.

    Returns
    -------
    pandas.DataFrame
        Index ``protein_id`` (sorted), one float column per metric (the mean over the protein's images),
        and ``n_images``.
    """
    ids = [str(p) for p in protein_ids]
    if not per_image:
        raise InputError("per_image has no metrics")
    columns = {name: _to_numpy(name, v) for name, v in per_image.items()}
    if N_IMAGES in columns or "protein_id" in columns:
        raise InputError(f"metric names {N_IMAGES!r} and 'protein_id' are reserved")
    for name, arr in columns.items():
        if len(arr) != len(ids):
            raise InputError(f"per-image metric {name!r} has {len(arr)} values but there are {len(ids)} protein ids")
    frame = pd.DataFrame(columns)
    frame.insert(0, "protein_id", ids)
    grouped = frame.groupby("protein_id", sort=True)
    out = grouped.mean()
    out[N_IMAGES] = grouped.size()
    return out


def mean_sd_over_proteins(df: pd.DataFrame, *, ddof: int = 0) -> dict[str, tuple[float, float]]:
    """Mean +- standard deviation of each metric over proteins (rows of :func:`summarize`).

    Every protein counts once, whatever its number of images. The paper's Table S.2 / S.1 numbers are
    mean +- population standard deviation over *images* (its nuclear-localization row, e.g.
    0.8946 +- 0.3071, is exactly ``p +- sqrt(p (1 - p))`` of a 0/1 per-image variable): use
    :func:`mean_sd_over_images` to reproduce that format; ``ddof=0`` here keeps the same convention.

    Parameters
    ----------
    df
        Output of :func:`summarize` (the ``n_images`` column is ignored).
    ddof
        Delta degrees of freedom of the standard deviation (0: population, 1: sample).

    Returns
    -------
    dict[str, tuple[float, float]]
        Metric -> ``(mean, sd)`` over proteins (NaN rows skipped; sd is NaN when too few proteins).
    """
    metrics = df.drop(columns=[N_IMAGES], errors="ignore")
    return {str(c): (float(metrics[c].mean()), float(metrics[c].std(ddof=ddof))) for c in metrics.columns}


def mean_sd_over_images(
    per_image: Mapping[str, Tensor | np.ndarray], *, ddof: int = 0
) -> dict[str, tuple[float, float]]:
    """Mean +- standard deviation of each metric over all images (the paper's Table S.2 / S.1 format).

    S.3.7: "we generated a single prediction per image"; the tables report mean +- standard deviation
    over those images (population sd: the nuclear-localization accuracy 0.8946 +- 0.3071 of Table S.1 is
    ``p +- sqrt(p (1 - p))``).

    Parameters
    ----------
    per_image
        Metric name -> ``[N]`` per-image values.
    ddof
        Delta degrees of freedom (0: population sd, as in the paper).

    Returns
    -------
    dict[str, tuple[float, float]]
        Metric -> ``(mean, sd)`` over images (NaNs skipped).
    """
    out = {}
    for name, v in per_image.items():
        arr = _to_numpy(name, v)
        arr = arr[~np.isnan(arr)]
        sd = float(np.std(arr, ddof=ddof)) if arr.size > ddof else float("nan")
        out[name] = (float(arr.mean()) if arr.size else float("nan"), sd)
    return out

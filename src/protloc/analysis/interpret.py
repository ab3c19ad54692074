"""Feature-zeroing interpretation of cytoself codes (paper Fig. 5).

"We passed images into the autoencoder but prevented usage of a given feature by zeroing it before
decoding. By computing the difference between the input and reconstructed images, we identify
specific regions of the images that are impacted, and thus causally linked, to that feature."

Here a feature is one code of a codebook: every local (VQ1) vector quantized to that code -- or,
with ``level="global"``, every global (VQ2) sub-vector -- is set to zero, the crop is decoded again,
and the difference map is ``reconstruction - reconstruction_without_code``. Taking the difference of
two reconstructions (rather than input minus zeroed reconstruction) removes the model's ordinary
reconstruction error from the map, so what remains is the code's own contribution; the input-based
map is returned too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from protloc.models.cytoself import Cytoself

__all__ = ["ZeroingResult", "feature_zeroing", "top_codes"]


@dataclass(frozen=True)
class ZeroingResult:
    """Outputs of :func:`feature_zeroing`.

    Attributes
    ----------
    codes
        The zeroed codes, in the order of the other fields.
    reconstruction
        ``[B, C, S, S]`` reconstruction with every code present.
    zeroed
        ``[K, B, C, S, S]`` reconstruction with code ``codes[k]`` zeroed.
    difference
        ``[K, B, S, S]`` ``reconstruction - zeroed`` on the analysed channel: what the code draws.
    input_difference
        ``[K, B, S, S]`` ``input - zeroed`` on the analysed channel (the paper's wording).
    usage
        ``[K, B]`` fraction of a crop's positions (local grid or global sub-vectors) using the code.
    crop_index
        The crop store's ``crop_index`` of each of the ``B`` crops, when the caller read them from a store
        (:func:`protloc.commands.interpret.feature_zeroing`); empty otherwise.
    """

    codes: tuple[int, ...]
    reconstruction: np.ndarray
    zeroed: np.ndarray
    difference: np.ndarray
    input_difference: np.ndarray
    usage: np.ndarray
    crop_index: tuple[int, ...] = ()


def top_codes(indices: np.ndarray, *, k: int = 3) -> list[int]:
    """The ``k`` most frequent codes in a set of index maps (a protein's strongest spectrum peaks).

    Parameters
    ----------
    indices
        Integer code indices of any shape (e.g. ``[N, 625]`` local indices of one protein's crops).
    k
        How many codes.
    """
    flat = np.asarray(indices).ravel().astype(np.int64)
    if flat.size == 0:
        return []
    counts = np.bincount(flat)
    order = np.argsort(-counts, kind="stable")
    return [int(c) for c in order[:k] if counts[c] > 0]


@torch.no_grad()
def feature_zeroing(
    model: Cytoself,
    images: torch.Tensor,
    codes: Sequence[int],
    *,
    level: str = "local",
    channel: int = 0,
) -> ZeroingResult:
    """Zero one code at a time before decoding and map what changes.

    Parameters
    ----------
    model
        A trained :class:`~protloc.models.cytoself.Cytoself` (put in eval mode here).
    images
        ``[B, C, S, S]`` crops.
    codes
        Codes to zero, one at a time.
    level
        ``"local"`` (VQ1 codes, as in the paper's spectra) or ``"global"`` (VQ2 codes).
    channel
        Image channel of the difference maps (0 = protein).

    Returns
    -------
    ZeroingResult
    """
    if level not in ("local", "global"):
        raise ValueError(f"level must be 'local' or 'global', got {level!r}")
    if not model.config.use_decoder:
        raise ValueError("this model was trained without a decoder: nothing to decode")
    model.eval()
    enc = model.encode(images)
    q1, q2 = enc.q1, enc.q2
    recon = model.decode(q1, q2)
    zeroed, usage = [], []
    for code in codes:
        if level == "local":
            # q1 [B, D, H, W], idx1 [B, 1, H, W]: zero the vectors quantized to `code`
            hit = (enc.idx1 == int(code)).to(q1.dtype)  # [B, 1, H, W]
            z = model.decode(q1 * (1.0 - hit), q2)
        else:
            # q2 [B, split*D, H, W] holds `split` sub-vectors per position; idx2 [B, split, H, W]
            b, c, h, w = q2.shape
            split = enc.idx2.shape[1]
            hit = (enc.idx2 == int(code)).to(q2.dtype)  # [B, split, H, W]
            keep = (1.0 - hit).repeat_interleave(c // split, dim=1)  # [B, C, H, W]
            z = model.decode(q1, q2 * keep)
        zeroed.append(z)
        usage.append(hit.flatten(1).mean(dim=1))
    zeroed_t = torch.stack(zeroed)  # [K, B, C, S, S]
    rec = recon.float().cpu().numpy()
    zer = zeroed_t.float().cpu().numpy()
    img = images.float().cpu().numpy()
    return ZeroingResult(
        codes=tuple(int(c) for c in codes),
        reconstruction=rec,
        zeroed=zer,
        difference=rec[None, :, channel] - zer[:, :, channel],
        input_difference=img[None, :, channel] - zer[:, :, channel],
        usage=torch.stack(usage).cpu().numpy() if usage else np.zeros((0, len(images))),
    )

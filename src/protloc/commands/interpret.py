"""``protloc interpret``: feature zeroing of one protein's strongest codes (cytoself paper Fig. 5).

- :func:`feature_zeroing`: a protein's crops in a store -> the crops using its top code most and what
  zeroing each of its top codes changes (:func:`protloc.analysis.interpret.feature_zeroing`);
- :func:`run_interpret`: the command: the figure and a JSON summary.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from protloc._fs import atomic_dir
from protloc.analysis.interpret import ZeroingResult
from protloc.commands._output import check_out, safe_name, save_fig, write_json
from protloc.commands.inputs import load_cytoself
from protloc.data.io import CropStore
from protloc.errors import InputError

__all__ = ["feature_zeroing", "run_interpret"]

#: Crops encoded per forward pass when ranking a protein's codes.
_ENCODE_BATCH = 256


def feature_zeroing(
    store: str | os.PathLike,
    *,
    protein: str,
    checkpoint: str | os.PathLike | None = None,
    top: int = 3,
    n_crops: int = 4,
    split: str | None = None,
    level: str = "local",
    device: str = "cpu",
) -> tuple[np.ndarray, ZeroingResult]:
    """Feature zeroing of one protein's strongest codes (cytoself Fig. 5).

    The ``top`` most frequent codes over the protein's crops (its strongest spectrum peaks) are zeroed
    one at a time before decoding, on the ``n_crops`` crops that use the first of them most.

    Parameters
    ----------
    store
        A cytoself crop store (``cytoself.zarr`` of ``protloc prepare``).
    protein
        The ``protein_id`` whose crops are analysed.
    checkpoint
        A ``protloc train cytoself`` run / checkpoint folder, ``pretrained:NAME`` or ``None`` (the shipped
        ``cytoself-small``).
    top
        Codes to zero.
    n_crops
        Crops to analyse.
    split
        Only crops of this split (``None``: all).
    level
        ``"local"`` (VQ1 codes) or ``"global"`` (VQ2 codes).
    device
        Torch device.

    Returns
    -------
    images : numpy.ndarray
        ``[n_crops, S, S]``: the protein channel of the analysed crops, in store order.
    result : ZeroingResult
        :func:`~protloc.analysis.interpret.feature_zeroing` of those crops, with their ``crop_index``;
        draw both with :func:`~protloc.plotting.interpret.plot_feature_zeroing`.

    Raises
    ------
    InputError
        No crops of ``protein`` (in ``split``).
    """
    import torch

    from protloc.analysis.interpret import feature_zeroing as zero_codes
    from protloc.analysis.interpret import top_codes

    model = load_cytoself(checkpoint, device=device)
    crops = CropStore.open(store)
    obs = crops.obs
    mask = obs["protein_id"].astype(str).to_numpy() == protein
    if split is not None:
        mask &= obs["split"].astype(str).to_numpy() == split
    rows = np.flatnonzero(mask)
    if len(rows) == 0:
        where = f" in split {split!r}" if split else ""
        raise InputError(f"no crops of protein {protein!r}{where}", path=crops.path)
    channels = list(model.config.channels)
    data = crops.read(rows, channels=channels)
    x = torch.from_numpy(np.stack([np.asarray(data[c], np.float32) for c in channels], 1)).to(device)
    parts = []
    with torch.inference_mode():
        for s in range(0, len(x), _ENCODE_BATCH):
            enc = model.encode(x[s : s + _ENCODE_BATCH])
            parts.append((enc.idx1 if level == "local" else enc.idx2).cpu().numpy())
    idx = np.concatenate(parts)
    codes = top_codes(idx, k=top)
    # analyse the crops that use the top code most
    usage = (idx.reshape(len(x), -1) == codes[0]).mean(axis=1) if codes else np.zeros(len(x))
    pick = np.sort(np.argsort(-usage, kind="stable")[:n_crops])
    result = zero_codes(model, x[pick], codes, level=level)
    crop_index = tuple(int(v) for v in obs["crop_index"].to_numpy()[rows[pick]])
    return x[pick, 0].cpu().numpy(), dataclasses.replace(result, crop_index=crop_index)


def run_interpret(
    checkpoint: str | os.PathLike,
    store: str | os.PathLike,
    out: str | os.PathLike,
    *,
    protein: str,
    top: int = 3,
    n_crops: int = 4,
    split: str | None = None,
    level: str = "local",
    device: str = "cpu",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Feature zeroing for one protein's strongest codes (paper Fig. 5): ``protloc interpret``.

    The ``top`` most frequent codes over the protein's crops are zeroed one at a time before
    decoding (:func:`feature_zeroing`); ``feature_zeroing_<protein>.png`` shows, for ``n_crops`` crops,
    the input, the reconstruction and each code's difference map in red, and
    ``feature_zeroing_<protein>.json`` holds the summary that is returned. The folder ``out`` is written
    beside it and moved into place when complete.

    Parameters
    ----------
    checkpoint, store, protein, top, n_crops, split, level, device
        As :func:`feature_zeroing`.
    out
        Output folder.
    overwrite
        Replace an existing non-empty ``out``.

    Returns
    -------
    dict
        ``protein``, ``level``, ``codes``, ``crops`` (their ``crop_index``), ``mean_abs_difference`` and
        ``usage`` per code.
    """
    from protloc.plotting.interpret import plot_feature_zeroing

    out = check_out(out, overwrite=overwrite, inputs={"--checkpoint": checkpoint, "--store": store})
    images, result = feature_zeroing(
        store,
        protein=protein,
        checkpoint=checkpoint,
        top=top,
        n_crops=n_crops,
        split=split,
        level=level,
        device=device,
    )
    codes = list(result.codes)
    summary = {
        "protein": protein,
        "level": level,
        "codes": codes,
        "crops": list(result.crop_index),
        "mean_abs_difference": [float(np.abs(d).mean()) for d in result.difference],
        "usage": [float(u.mean()) for u in result.usage],
    }
    safe = safe_name(protein)
    with atomic_dir(out) as tmp:
        fig = plot_feature_zeroing(images, result, title=f"{protein}: {level} codes {codes}")
        save_fig(fig, tmp / f"feature_zeroing_{safe}.png")
        write_json(tmp / f"feature_zeroing_{safe}.json", summary)
    return summary

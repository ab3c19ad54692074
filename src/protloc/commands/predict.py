"""``protloc predict``: where proteins go, from their sequence and one nucleus image (CELL-E, paper Sec. 4.6, S.3.7).

- :func:`predict_sequences`: sequences -> AnnData (one observation per sequence: nucleus proportions,
  the 2D probability density maps and the predicted threshold images);
- :func:`run_predict`: the command: that AnnData written as PNG / NPY files and ``summary.json``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd

from protloc._fs import atomic_dir
from protloc.commands._output import check_out, save_fig, unique_stems, write_json
from protloc.commands.inputs import (
    ImageInput,
    check_batch_size,
    gather_sequences,
    load_celle,
    model_nucleus,
    resolve_device,
)
from protloc.data.io import save_npy, write_png
from protloc.eval.predict import SamplingConfig

if TYPE_CHECKING:
    from protloc.eval.load import CelleRun

logger = logging.getLogger(__name__)

__all__ = ["predict_sequences", "run_predict"]


def predict_sequences(
    sequences: Mapping[str, str] | str,
    *,
    run: CelleRun,
    nucleus: str | os.PathLike | np.ndarray | ImageInput | None = None,
    sampling: SamplingConfig | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> ad.AnnData:
    """Predict protein-threshold images and probability maps of sequences against one nucleus image.

    Sequences are predicted in batches of ``batch_size`` (:func:`protloc.eval.predict.predict`); the
    same seed, batch size and sequence order give the same outputs.

    Parameters
    ----------
    sequences
        ``name -> amino-acid sequence``, or one sequence (named ``query``).
    run
        A loaded CELL-E (:func:`~protloc.commands.inputs.load_celle`).
    nucleus
        Nucleus image file or array, or ``None`` for the reference nucleus
        (:func:`~protloc.commands.inputs.model_nucleus`).
    sampling
        :class:`~protloc.eval.predict.SamplingConfig` (``samples`` draws per sequence; the threshold image
        is their pixel-wise majority).
    batch_size
        Sequences per generation batch (each batch holds ``batch_size * samples`` rows).
    progress
        Show a progress bar over the sequences.

    Returns
    -------
    anndata.AnnData
        One observation per sequence. ``obs``: ``length``, ``window_start``, ``window_end`` (0-based,
        exclusive: the residues the model saw), ``nucleus_proportion`` (probability-map share inside the
        nucleus mask, S.3.7), ``threshold_nucleus_proportion``, ``threshold_fraction``, ``end_token`` and
        ``seconds`` (the sequence's share of its batch's time). ``obsm``: ``probability`` ``float32 [n, S, S]``
        (the 2D probability density map of Eq. 3, each summing to 1) and ``threshold`` ``uint8 [n, S, S]``
        (predicted binary image). ``uns``: ``nucleus`` (the image as the model saw it), ``nucleus_mask``,
        ``sampling``, ``checkpoint``, ``nucleus_source``.

    Raises
    ------
    InputError
        An invalid residue (naming the sequence), a bad nucleus image.
    ConfigError
        An invalid batch size.
    """
    import torch
    from tqdm.auto import tqdm

    from protloc.eval.metrics import nucleus_proportion
    from protloc.eval.predict import predict

    records = gather_sequences(sequences)
    sampling = sampling or SamplingConfig()
    check_batch_size(batch_size)
    nuc = model_nucleus(run, nucleus)
    size, window = run.image_size, run.model.config.max_residues
    nuc_t = torch.from_numpy(nuc.image)[None, None]
    probs, thrs, rows, mask_np = [], [], [], None
    bar = tqdm(total=len(records), desc="predict", unit="seq", disable=not progress, dynamic_ncols=True)
    with bar:
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            t_batch = time.perf_counter()
            res = predict(run, [s for _, s in batch], nuc_t.expand(len(batch), 1, size, size), sampling=sampling)
            prob = res["probability"].float().cpu()
            thr_t = res["threshold"].float().cpu()
            thr = (thr_t[:, 0] > 0.5).numpy()
            mask = res["nucleus_mask"].cpu()
            mask_np = mask[0, 0].numpy() if mask_np is None else mask_np
            thr_prop = nucleus_proportion(thr_t, mask).tolist()
            prob_prop = res["nucleus_proportion"].float().cpu().tolist()
            starts = res["window_start"].cpu().tolist()
            ends = res["add_end"].cpu().tolist()
            seconds = round((time.perf_counter() - t_batch) / len(batch), 4)
            for i, (name, seq) in enumerate(batch):
                s0 = int(starts[i])
                rows.append(
                    {
                        "name": name,
                        "length": len(seq),
                        "window_start": s0,
                        "window_end": min(len(seq), s0 + window),
                        "nucleus_proportion": float(prob_prop[i]),
                        "threshold_nucleus_proportion": float(thr_prop[i]),
                        "threshold_fraction": float(thr[i].mean()),
                        "end_token": bool(ends[i]),
                        "seconds": seconds,
                    }
                )
            probs.append(prob[:, 0].numpy())
            thrs.append(thr.astype(np.uint8))
            bar.update(len(batch))
    obs = pd.DataFrame(rows).set_index("name")
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(obs=obs)
    adata.obs_names_make_unique()
    adata.obsm["probability"] = np.concatenate(probs).astype(np.float32)
    adata.obsm["threshold"] = np.concatenate(thrs)
    adata.uns["nucleus"] = nuc.image.astype(np.float32)
    adata.uns["nucleus_mask"] = np.asarray(mask_np, dtype=np.uint8)
    adata.uns["sampling"] = {
        "samples": sampling.samples,
        "temperature": sampling.temperature,
        "top_k_fraction": sampling.top_k_fraction,
        "steps": sampling.steps,
        "seed": sampling.seed,
    }
    adata.uns["checkpoint"] = str(run.checkpoint)
    adata.uns["nucleus_source"] = {k: str(v) for k, v in nuc.info.items()}
    return adata


def run_predict(
    *,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    sequences: Mapping[str, str] | str | None = None,
    fasta: str | os.PathLike | None = None,
    nucleus: str | os.PathLike | np.ndarray | None = None,
    sampling: SamplingConfig | None = None,
    batch_size: int = 8,
    device: str | None = "cpu",
    precision: str = "fp32",
    embedder_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict where proteins go with a trained CELL-E (paper Sec. 4.6, S.3.7): ``protloc predict``.

    For each sequence, conditioned on one nucleus image (:func:`predict_sequences`), writes into ``out``:

    - ``<name>_threshold.png``: the predicted protein-threshold image (uint8 0 / 255; with several
      samples the pixel-wise majority);
    - ``<name>_probability.npy``: the 2D probability density map (Eq. 3), ``float32 [S, S]`` summing to 1;
    - ``<name>_overlay.png``: the map as a heatmap over the nucleus image, with the nucleus-mask outline;

    plus ``nucleus.png`` (the nucleus input as the model sees it, uint8) and ``summary.json`` (what is
    returned). ``<name>`` is the sequence name made file-name safe (characters other than letters,
    digits, ``-``, ``_``, ``.`` become ``_``; repeats get ``_2``, ``_3``, ...). The folder is written
    next to ``out`` and moved into place when complete.

    Parameters
    ----------
    checkpoint
        A ``protloc train celle`` run folder (``best/``, else ``last/``) or checkpoint folder.
    out
        Output folder; an existing non-empty one is refused unless ``overwrite`` (then it is replaced).
    sequences
        ``name -> amino-acid sequence``, or one sequence (named ``query``). Exactly one of
        ``sequences`` and ``fasta``.
    fasta
        FASTA file; record ids name the outputs.
    nucleus
        Nucleus image: a 2-D grey TIFF / PNG / NPY file or array, at least the model's image size on
        each side. Its largest centred square is min-max scaled to [0, 1] (as ``protloc prepare`` scales
        crops) and area-averaged to the model's image size (as CELL-E's data pipeline resizes crops).
        ``None``: a real nucleus shipped with the reference world (the first ``nuclei.npz`` patch not
        completed over a neighbour), centred at the reference world's scale (12 um across at 0.4 um per
        pixel) in a field as wide as the run's training crops (``data.crop_size``, else the paper's
        256 px crops).
    sampling
        :class:`protloc.eval.predict.SamplingConfig`: draws per sequence, sampling temperature, share
        of threshold codes kept (paper: 25 %), decoding passes of the masked (CELL-E 2) mode, seed.
    batch_size
        Sequences per generation batch (each batch holds ``batch_size * samples`` rows). The same
        seed, batch size and sequence order give the same outputs.
    device
        Torch device (``None``: CUDA when available).
    precision
        ``"fp32"``, ``"bf16"`` or ``"int8"`` transformer weights (:func:`~protloc.eval.load.set_precision`).
    embedder_path
        ESM-2 / TAPE weights to use instead of the path recorded at training time (when the weights moved);
        ignored by models with one-hot / descriptor / learned residues.
    overwrite
        Replace an existing non-empty ``out``.
    progress
        Show a progress bar over the sequences.

    Returns
    -------
    dict
        The content of ``summary.json``: ``checkpoint``, ``step``, ``mode``, ``image_size``,
        ``max_residues``, ``nucleus`` (source, how it was cropped, mask fraction), ``sampling``,
        ``batch_size``, ``device``, ``seconds`` and ``sequences``: per sequence ``name``, ``file_stem``,
        ``length``, ``window_start`` (0-based) and ``window_end`` (exclusive) of the residues the model
        saw, ``end_token``, ``nucleus_proportion`` (share of the probability map inside the nucleus
        mask, S.3.7), ``threshold_nucleus_proportion`` (share of the predicted threshold pixels inside
        it), ``threshold_fraction``, ``files`` and ``seconds`` (its share of its batch's time).

    Raises
    ------
    InputError
        A missing checkpoint / FASTA / image, an invalid residue (named), a bad nucleus image (wrong
        dimensions, too small, constant, NaN), an existing output.
    ConfigError
        Invalid sampling settings or batch size.
    """
    from protloc.plotting.celle import plot_prediction

    records = gather_sequences(sequences, fasta, warn_unknown=False)  # predict_sequences warns
    sampling = sampling if sampling is not None else SamplingConfig()
    check_batch_size(batch_size)
    out = check_out(
        out,
        overwrite=overwrite,
        inputs={"--checkpoint": checkpoint, "--fasta": fasta, "--nucleus": nucleus, "--embedder-path": embedder_path},
    )
    t_load = time.perf_counter()
    device = resolve_device(device)
    run = load_celle(checkpoint, device=device, precision=precision, embedder_path=embedder_path)
    nuc = model_nucleus(run, nucleus)
    load_seconds = time.perf_counter() - t_load

    t0 = time.perf_counter()
    pred = predict_sequences(
        dict(records), run=run, nucleus=nuc, sampling=sampling, batch_size=batch_size, progress=progress
    )
    stems = unique_stems([name for name, _ in records])
    mask = pred.uns["nucleus_mask"]
    per_seq: list[dict[str, Any]] = []
    with atomic_dir(out) as tmp:
        write_png(tmp / "nucleus.png", (nuc.image * 255).round().astype(np.uint8))
        for i, ((name, seq), stem) in enumerate(zip(records, stems, strict=True)):
            row = pred.obs.iloc[i]
            p = pred.obsm["probability"][i]
            files = {
                "threshold": f"{stem}_threshold.png",
                "probability": f"{stem}_probability.npy",
                "overlay": f"{stem}_overlay.png",
            }
            write_png(tmp / files["threshold"], (pred.obsm["threshold"][i] > 0).astype(np.uint8) * 255)
            save_npy(tmp / files["probability"], p)
            fig = plot_prediction(nuc.image, p, mask=mask, title=f"{name} ({len(seq)} aa)")
            save_fig(fig, tmp / files["overlay"])
            per_seq.append(
                {
                    "name": name,
                    "file_stem": stem,
                    "length": int(row["length"]),
                    "window_start": int(row["window_start"]),
                    "window_end": int(row["window_end"]),
                    "end_token": bool(row["end_token"]),
                    "nucleus_proportion": float(row["nucleus_proportion"]),
                    "threshold_nucleus_proportion": float(row["threshold_nucleus_proportion"]),
                    "threshold_fraction": float(row["threshold_fraction"]),
                    "files": files,
                    "seconds": float(row["seconds"]),
                }
            )
        summary: dict[str, Any] = {
            "checkpoint": str(run.checkpoint.resolve()),
            "step": run.extra.get("step"),
            "mode": "autoregressive" if run.model.autoregressive else "masked",
            "image_size": run.image_size,
            "max_residues": run.model.config.max_residues,
            "nucleus": {**nuc.info, "file": "nucleus.png", "mask_fraction": float(np.mean(mask))},
            "sampling": dict(pred.uns["sampling"]),
            "batch_size": batch_size,
            "device": str(device),
            "precision": precision,
            "load_seconds": round(load_seconds, 3),
            "seconds": round(time.perf_counter() - t0, 3),
            "sequences": per_seq,
        }
        write_json(tmp / "summary.json", summary)
    logger.info("predicted %d sequence(s) in %.1f s into %s", len(per_seq), summary["seconds"], out)
    return summary

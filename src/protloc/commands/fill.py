"""``protloc fill``: image to sequence, CELL-E 2's second direction (:func:`protloc.eval.fill.fill_sequences`).

- :func:`fill_masked`: sequences with ``_`` at the residues to fill + a threshold and a nucleus image ->
  the filled sequences and the per-residue probabilities (two DataFrames);
- :func:`run_fill`: the command: those tables written as FASTA, CSV, plots and ``summary.json``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from protloc._fs import atomic_dir
from protloc.commands._output import check_out, save_fig, unique_stems, write_csv, write_json
from protloc.commands.inputs import (
    ImageInput,
    gather_sequences,
    load_celle,
    model_nucleus,
    model_threshold,
    resolve_device,
)
from protloc.data.io import write_png
from protloc.eval.fill import parse_masked
from protloc.eval.predict import SamplingConfig

if TYPE_CHECKING:
    from protloc.eval.load import CelleRun

logger = logging.getLogger(__name__)

__all__ = ["fill_masked", "run_fill"]


def _check_masked(sequence: str, name: str) -> Any:
    # parse_masked names the sequence and residue on bad input
    return parse_masked(sequence, name=name)


def fill_masked(
    sequences: Mapping[str, str] | str,
    *,
    run: CelleRun,
    threshold: str | os.PathLike | np.ndarray | ImageInput,
    nucleus: str | os.PathLike | np.ndarray | ImageInput | None = None,
    sampling: SamplingConfig | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fill the ``_`` residues of sequences from a nucleus and a protein-threshold image.

    The model must be a masked-mode CELL-E trained with ``"text"`` in ``model.masked_segments``. Every
    sequence is filled against the same two images, in ``sampling.steps`` passes for all its masked
    positions (:func:`protloc.eval.fill.fill_sequences`).

    Parameters
    ----------
    sequences
        ``{name: sequence}`` (or one string, named ``query``) with ``_`` at the residues to fill.
    run
        A loaded CELL-E (:func:`~protloc.commands.inputs.load_celle`).
    threshold
        The protein-threshold image (path or array, :func:`~protloc.commands.inputs.model_threshold`):
        its centred square, scaled by its maximum, area-averaged to the model's size and binarised at 0.5.
    nucleus
        Nucleus image (path or array), ``None`` for the reference nucleus
        (:func:`~protloc.commands.inputs.model_nucleus`).
    sampling
        :class:`~protloc.eval.predict.SamplingConfig`: ``samples`` fills per sequence; ``top_k_fraction``
        of the 20 residues.

    Returns
    -------
    filled : pandas.DataFrame
        One row per sequence and sample: ``name``, ``sample`` (1-based), ``filled`` (the sequence).
    residues : pandas.DataFrame
        One row per filled position and sample: ``name``, ``sample``, ``position`` (1-based),
        ``residue``, ``probability`` (of that residue), ``step`` (the pass that committed it) and one
        ``p_<residue>`` column per residue of the alphabet.

    Raises
    ------
    InputError
        A sequence without ``_`` or with an invalid residue (named), a sequence longer than the model's
        window, bad images.
    ConfigError
        A model not trained to fill residues.
    """
    import torch

    from protloc.eval.fill import fill_sequences

    records = gather_sequences(sequences, check=_check_masked)
    sampling = sampling or SamplingConfig()
    nuc = model_nucleus(run, nucleus)
    thr = model_threshold(run, threshold)
    b, size = len(records), run.image_size
    nuc_t = torch.from_numpy(nuc.image)[None, None].expand(b, 1, size, size)
    thr_t = torch.from_numpy(thr.image)[None, None].expand(b, 1, size, size)
    result = fill_sequences(run, [seq for _, seq in records], nuc_t, thr_t, sampling=sampling)
    alphabet = result["alphabet"]
    filled_rows: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for i, (name, _) in enumerate(records):
        probs = result["probs"][i].numpy()  # [samples, L, A]
        steps_of = result["step"][i].numpy()
        for k, filled in enumerate(result["filled"][i]):
            filled_rows.append({"name": name, "sample": k + 1, "filled": filled})
            for pos in result["positions"][i]:
                res = filled[pos]
                row = {
                    "name": name,
                    "sample": k + 1,
                    "position": pos + 1,
                    "residue": res,
                    "probability": float(probs[k, pos, alphabet.index(res)]),
                    "step": int(steps_of[k, pos]),
                }
                row.update({f"p_{a}": float(probs[k, pos, j]) for j, a in enumerate(alphabet)})
                rows.append(row)
    return pd.DataFrame(filled_rows, columns=["name", "sample", "filled"]), pd.DataFrame(rows)


def run_fill(
    *,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    threshold: str | os.PathLike | np.ndarray,
    sequences: Mapping[str, str] | str | None = None,
    fasta: str | os.PathLike | None = None,
    nucleus: str | os.PathLike | np.ndarray | None = None,
    sampling: SamplingConfig | None = None,
    device: str | None = "cpu",
    precision: str = "fp32",
    embedder_path: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Image to sequence: fill the ``_`` residues of sequences from a nucleus and a threshold image
    (``protloc fill``; :func:`fill_masked`).

    Writes into ``out`` (written beside it and moved into place when complete):

    - ``filled.fasta``: per sequence and sample, the filled sequence (``>NAME_sampleK``, ``NAME`` made
      file-name safe and unique as in :func:`~protloc.commands.predict.run_predict`);
    - ``residues.csv``: per filled position and sample, ``name``, ``sample``, ``position`` (1-based),
      ``residue``, ``probability`` (of that residue), ``step`` (the pass that committed it) and one
      ``p_<residue>`` column per residue of the alphabet;
    - ``residues_<name>.png``: the mean residue probabilities over the samples (residues x positions),
      with the first sample's residues marked;
    - ``nucleus.png``, ``threshold.png`` (the images as the model sees them) and ``summary.json``.

    Parameters
    ----------
    checkpoint
        A ``protloc train celle`` run folder or checkpoint folder.
    out
        Output folder.
    threshold
        The protein-threshold image (path or array): its centred square, scaled by its maximum,
        area-averaged to the model's size and binarised at 0.5.
    sequences, fasta
        ``{name: sequence}`` (or one string) or a FASTA file, with ``_`` at the residues to fill.
    nucleus
        Nucleus image as in :func:`~protloc.commands.predict.run_predict` (default: the reference nucleus).
    sampling
        :class:`~protloc.eval.predict.SamplingConfig`; ``top_k_fraction`` of the 20 residues. Its fields
        may also be given as keywords (``samples=4, steps=2``).
    device, precision
        Torch device (``None``: CUDA when available) and transformer weights (``"fp32"`` / ``"bf16"`` / ``"int8"``).
    embedder_path
        ESM-2 / TAPE weights to use instead of the path recorded at training time (when the weights moved);
        ignored by models with one-hot / descriptor / learned residues.
    overwrite
        Replace an existing non-empty ``out``.

    Returns
    -------
    dict
        The summary written to ``summary.json``.

    Raises
    ------
    InputError
        Missing files, a sequence without ``_`` or with an invalid residue (named), a sequence longer
        than the model's window, bad images, an existing output.
    ConfigError
        A model not trained to fill residues; invalid sampling settings.
    """
    from protloc.data.sequences import write_fasta
    from protloc.plotting.celle import plot_residue_probabilities

    t0 = time.perf_counter()
    # parse_masked names the sequence and residue on bad input, before anything is loaded.
    records = gather_sequences(sequences, fasta, check=_check_masked)
    sampling = sampling if sampling is not None else SamplingConfig()
    out = check_out(
        out,
        overwrite=overwrite,
        inputs={
            "--checkpoint": checkpoint,
            "--fasta": fasta,
            "--threshold": threshold,
            "--nucleus": nucleus,
            "--embedder-path": embedder_path,
        },
    )
    device = resolve_device(device)
    run = load_celle(checkpoint, device=device, precision=precision, embedder_path=embedder_path)
    nuc = model_nucleus(run, nucleus)
    thr = model_threshold(run, threshold)
    filled, residues = fill_masked(dict(records), run=run, threshold=thr, nucleus=nuc, sampling=sampling)
    p_cols = [c for c in residues.columns if c.startswith("p_")]
    alphabet = "".join(c[2:] for c in p_cols)
    stems = unique_stems([name for name, _ in records])
    per_seq: list[dict[str, Any]] = []
    with atomic_dir(out) as tmp:
        write_png(tmp / "nucleus.png", (nuc.image * 255).round().astype(np.uint8))
        write_png(tmp / "threshold.png", (thr.image * 255).astype(np.uint8))
        fasta_records: dict[str, str] = {}
        for (name, seq), stem in zip(records, stems, strict=True):
            mine = filled[filled["name"] == name]
            for k, text in zip(mine["sample"], mine["filled"], strict=True):
                fasta_records[f"{stem}_sample{k}"] = text  # unique even when names repeat
            rows = residues[residues["name"] == name]
            first = rows[rows["sample"] == 1]
            n_pos = len(first)
            probs = rows[p_cols].to_numpy(np.float32).reshape(len(mine), n_pos, len(p_cols))
            fig = plot_residue_probabilities(
                probs.mean(axis=0),
                first["position"].tolist(),
                alphabet,
                chosen="".join(first["residue"]),
                title=f"{name}: {n_pos} residue(s) filled, mean of {sampling.samples} sample(s)",
            )
            file = f"residues_{stem}.png"
            save_fig(fig, tmp / file)
            per_seq.append(
                {
                    "name": name,
                    "length": len(seq),
                    "masked": n_pos,
                    "filled": mine["filled"].tolist(),
                    "mean_probability": float(np.mean(rows["probability"].to_numpy())),
                    "plot": file,
                }
            )
        write_fasta(tmp / "filled.fasta", fasta_records)
        write_csv(residues, tmp / "residues.csv")
        summary: dict[str, Any] = {
            "checkpoint": str(run.checkpoint.resolve()),
            "step": run.extra.get("step"),
            "image_size": run.image_size,
            "max_residues": run.model.config.max_residues,
            "nucleus": {**nuc.info, "file": "nucleus.png"},
            "threshold": {**thr.info, "file": "threshold.png", "fraction": float(thr.image.mean())},
            "sampling": dict(vars(sampling)),
            "alphabet": alphabet,
            "device": str(device),
            "precision": precision,
            "sequences": per_seq,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        write_json(tmp / "summary.json", summary)
    logger.info("filled %d sequence(s) in %.1f s into %s", len(records), summary["seconds"], out)
    return summary

"""``protloc localize``: where proteins go from their sequence alone, with the protein encoder.

- :func:`localize_inputs`: ``(name, sequence)`` records from a mapping, one sequence, or a FASTA / CSV /
  TSV file;
- :func:`localize_sequences`: sequences -> AnnData (one observation per protein: presence probabilities
  of the 12 compartments and the nucleus, calls at the encoder's thresholds, the distribution over
  compartments, the protein vector) and a long table of per-residue importance;
- :func:`run_localize`: the command: those written as CSV, ``.h5ad``, importance plots and
  ``summary.json``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from protloc._fs import atomic_dir
from protloc.commands._output import check_out, save_fig, unique_stems, write_csv, write_json
from protloc.commands.inputs import check_batch_size, gather_sequences, resolve_device
from protloc.data.proteome import PRESENCE_NAMES
from protloc.data.sequences import read_sequences
from protloc.data.world.compartments import COMPARTMENTS
from protloc.errors import ConfigError, InputError
from protloc.pretrained import resolve_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CHECKPOINT", "MAX_PLOTS", "localize_inputs", "localize_sequences", "run_localize"]

#: The encoder ``protloc localize`` uses unless told otherwise.
DEFAULT_CHECKPOINT = "pretrained:encoder-small"
#: Importance plots written at most (the CSV holds every protein).
MAX_PLOTS = 200
#: Peak window of the importance tracks, in residues.
PEAK_WIDTH = 9
_FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas", ".fna")
_IMPORTANCE_COLUMNS = ["protein", "position", "residue", "importance_nucleus", "importance_top", "top_compartment"]


# ----------------------------------------------------------------------------------------------- inputs
def _looks_like_path(text: str) -> bool:
    # a sequence holds letters only (and maybe whitespace / a final '*'); a separator or a dot means a file
    return os.sep in text or "/" in text or "." in text or Path(text).is_file()


def _is_fasta(path: Path) -> bool:
    if path.name.lower().removesuffix(".gz").endswith(_FASTA_SUFFIXES):
        return True
    if path.suffix.lower() == ".gz" or not path.is_file():
        return False
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                return line.lstrip().startswith(">")
    return False


def localize_inputs(sequences: Mapping[str, str] | str | os.PathLike) -> tuple[list[tuple[str, str]], Path | None]:
    """``(name, sequence)`` records to localize, and the file they came from (or None).

    Parameters
    ----------
    sequences
        ``name -> sequence``; one sequence (named ``query``); or a file: FASTA (``.fasta`` / ``.fa`` /
        ``.faa``, or any file whose first line starts with ``>``; record ids name the proteins) or a CSV /
        TSV table with ``protein_id`` and ``sequence`` columns. A string holding ``/`` or ``.`` (or naming
        an existing file) is a path.

    Raises
    ------
    InputError
        A missing or empty file, no sequences, an invalid residue (naming the protein, the residue and its
        1-based position), a repeated protein id.
    """
    if isinstance(sequences, Mapping):
        return gather_sequences(sequences), None
    if isinstance(sequences, str) and not _looks_like_path(sequences):
        return gather_sequences(sequences), None
    if not isinstance(sequences, str | os.PathLike):
        raise InputError(f"expected sequences, one sequence or a file, got {type(sequences).__name__}")
    path = Path(sequences)
    if not path.is_file():
        raise InputError("sequence file not found", path=path)
    if _is_fasta(path):
        return gather_sequences(None, fasta=path), path
    records = list(read_sequences(path).items())
    if not records:
        raise InputError("the table holds no sequences", path=path)
    return records, path


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"ig_steps must be a positive integer, got {steps!r}")
    return steps


# ------------------------------------------------------------------------------------------- computation
def localize_sequences(
    sequences: Mapping[str, str] | str | os.PathLike,
    *,
    checkpoint: str | os.PathLike = DEFAULT_CHECKPOINT,
    batch_size: int = 32,
    importance: bool = True,
    ig_steps: int = 32,
    device: str | None = "cpu",
    progress: bool = False,
    precision: str = "fp32",
) -> tuple[ad.AnnData, pd.DataFrame]:
    """Localization of proteins from their sequence with a trained protein encoder.

    Parameters
    ----------
    sequences
        ``name -> sequence``, one sequence (named ``query``), or a FASTA / CSV / TSV file
        (:func:`localize_inputs`). Sequences longer than the encoder's 1000 residues keep their first and
        last 500 (DeepLoc's rule; flagged ``clipped`` and logged).
    checkpoint
        A ``protloc train encoder`` run folder (``best/``, else ``last/``), a checkpoint folder or
        ``pretrained:NAME``.
    batch_size
        Sequences per forward pass (sorted by length, so batches hold similar lengths).
    importance
        Also compute the per-residue importance (integrated gradients, ``ig_steps`` interpolation steps,
        :func:`protloc.eval.localize.integrated_gradients`) of the ``nucleus`` output and of each protein's
        top compartment.
    ig_steps
        Integrated-gradients steps.
    device
        Torch device (``None``: CUDA when available).
    progress
        Show progress bars.
    precision
        ``"fp32"`` or ``"bf16"`` (bfloat16 autocast for the probabilities; importance stays fp32).

    Returns
    -------
    adata : anndata.AnnData
        One observation per protein (named as given). ``obs``: ``length``, ``clipped``,
        ``top_compartment`` (highest presence probability of the 12 compartments) and ``top_probability``,
        ``nuclear`` (``p_nucleus`` at or above its threshold), ``p_nucleus``, ``p_<compartment>`` (presence
        probability), ``call_<compartment>`` (at or above its threshold), ``d_<compartment>`` (share of
        the protein in each compartment: the distribution output); with ``importance`` also
        ``nucleus_peak`` / ``top_peak`` (``"start-end"``, 1-based) and ``nucleus_peak_residues`` /
        ``top_peak_residues`` (the 9-residue windows of largest importance). ``obsm``: ``X_encoder`` (the
        pooled protein vector), ``presence`` ``[N, 13]`` (probabilities, compartments then nucleus),
        ``distribution`` ``[N, 12]``. ``uns["localize"]``: the model (``name``, ``checkpoint``,
        ``sha256``), ``thresholds`` and ``threshold_source`` (the checkpoint's validation-chosen
        thresholds, else ``"default 0.5"``), ``compartments``, ``presence_names``, ``max_residues``,
        ``clipped`` (count) and the importance settings.
    importance : pandas.DataFrame
        Long table, one row per protein and residue the model saw (a clipped middle has no rows):
        ``protein``, ``position`` (1-based in the original sequence), ``residue``, ``importance_nucleus``,
        ``importance_top`` (of ``top_compartment``'s presence logit), ``top_compartment``. Positive values
        push the output up. Empty (with these columns) without ``importance``.

    Raises
    ------
    InputError
        Bad input (an invalid residue named with its protein and position, an empty FASTA file), a missing
        checkpoint.
    ConfigError
        A batch size or step count that is not a positive integer.
    """
    records, _ = localize_inputs(sequences)
    check_batch_size(batch_size)
    _check_steps(ig_steps)
    return _localize(
        records, checkpoint, batch_size, importance, ig_steps, resolve_device(device), progress, precision=precision
    )


def _localize(
    records: list[tuple[str, str]],
    checkpoint: str | os.PathLike,
    batch_size: int,
    importance: bool,
    ig_steps: int,
    device: str,
    progress: bool,
    *,
    precision: str = "fp32",
) -> tuple[ad.AnnData, pd.DataFrame]:
    from tqdm.auto import tqdm

    from protloc.eval.localize import (
        IG_BASELINE,
        NUCLEUS,
        encoder_info,
        encoder_outputs,
        integrated_gradients,
        load_encoder,
        peak_window,
    )

    model, config = load_encoder(checkpoint, device=device)
    info = encoder_info(checkpoint)
    names = [name for name, _ in records]
    seqs = [seq for _, seq in records]
    out = encoder_outputs(model, seqs, batch_size=batch_size, progress=progress, precision=precision)
    presence, distribution, clipped = out["presence"], out["distribution"], out["clipped"]
    for name, seq, cut in zip(names, seqs, clipped, strict=True):
        if cut:
            logger.info(
                "%s has %d residues: the encoder sees its first %d and last %d (DeepLoc's rule)",
                name,
                len(seq),
                config.max_residues - config.max_residues // 2,
                config.max_residues // 2,
            )
    thresholds = info["thresholds"]
    n_c = len(COMPARTMENTS)
    top = presence[:, :n_c].argmax(1)
    obs = pd.DataFrame(index=pd.Index(names, name="protein", dtype=str))
    obs["length"] = np.asarray([len(s) for s in seqs], dtype=np.int64)
    obs["clipped"] = clipped
    obs["top_compartment"] = pd.Categorical([COMPARTMENTS[i] for i in top], categories=list(COMPARTMENTS))
    obs["top_probability"] = presence[np.arange(len(seqs)), top].astype(np.float64)
    obs["nuclear"] = presence[:, NUCLEUS] >= thresholds["nucleus"]
    obs["p_nucleus"] = presence[:, NUCLEUS].astype(np.float64)
    for j, c in enumerate(COMPARTMENTS):
        obs[f"p_{c}"] = presence[:, j].astype(np.float64)
    for j, c in enumerate(COMPARTMENTS):
        obs[f"call_{c}"] = presence[:, j] >= thresholds[c]
    for j, c in enumerate(COMPARTMENTS):
        obs[f"d_{c}"] = distribution[:, j].astype(np.float64)

    frames: list[pd.DataFrame] = []
    gaps: list[float] = []
    if importance:
        peaks: dict[str, list[Any]] = {
            k: [] for k in ("nucleus_peak", "nucleus_peak_residues", "top_peak", "top_peak_residues")
        }
        bar = tqdm(total=len(seqs), desc="importance", unit="seq", disable=not progress)
        with bar:
            for name, seq, t in zip(names, seqs, top, strict=True):
                imp = integrated_gradients(model, seq, [NUCLEUS, int(t)], steps=ig_steps)
                gaps.extend(np.abs(imp.gap).tolist())
                seen = np.flatnonzero(np.isfinite(imp.attributions[0]))
                frames.append(
                    pd.DataFrame(
                        {
                            "protein": name,
                            "position": seen + 1,
                            "residue": np.asarray(list(seq))[seen],
                            "importance_nucleus": imp.attributions[0, seen],
                            "importance_top": imp.attributions[1, seen],
                            "top_compartment": COMPARTMENTS[int(t)],
                        }
                    )
                )
                for key, track in (("nucleus", imp.attributions[0]), ("top", imp.attributions[1])):
                    p = peak_window(track, width=PEAK_WIDTH)
                    peaks[f"{key}_peak"].append(f"{p.start}-{p.end}")
                    peaks[f"{key}_peak_residues"].append(seq[p.start - 1 : p.end])
                bar.update(1)
        for key, values in peaks.items():
            obs[key] = values
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=_IMPORTANCE_COLUMNS)

    adata = ad.AnnData(obs=obs)
    adata.obsm["X_encoder"] = out["pooled"]
    adata.obsm["presence"] = presence
    adata.obsm["distribution"] = distribution
    uns: dict[str, Any] = {
        "name": info["name"],
        "checkpoint": info["checkpoint"],
        "sha256": info["sha256"],
        "thresholds": {k: float(v) for k, v in thresholds.items()},
        "threshold_source": info["threshold_source"],
        "compartments": list(COMPARTMENTS),
        "presence_names": list(PRESENCE_NAMES),
        "max_residues": int(config.max_residues),
        "clipped": int(clipped.sum()),
        "top_compartment": "highest presence probability of the 12 compartments",
        "importance": bool(importance),
    }
    if info["step"] is not None:
        uns["step"] = int(info["step"])
    if importance:
        uns.update(
            ig_steps=int(ig_steps),
            ig_baseline=f"every residue {IG_BASELINE!r} (<mask>), <cls>/<sep> kept",
            ig_max_gap=float(max(gaps, default=0.0)),
            peak_width=PEAK_WIDTH,
        )
    adata.uns["localize"] = uns
    return adata, table


# ------------------------------------------------------------------------------------------------ command
def run_localize(
    sequences: Mapping[str, str] | str | os.PathLike,
    out: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike = DEFAULT_CHECKPOINT,
    overwrite: bool = False,
    batch_size: int = 32,
    importance: bool = True,
    ig_steps: int = 32,
    device: str | None = "cpu",
    max_plots: int = MAX_PLOTS,
    progress: bool = True,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Localize proteins from their sequence and write the results: ``protloc localize``.

    Writes into ``out`` (built beside it and moved into place when complete; nothing is left on an error):

    - ``localize.csv``: one row per protein, the ``obs`` of :func:`localize_sequences` (``protein`` first);
    - ``localize.h5ad``: the AnnData (also ``obsm["X_encoder"]``, ``presence``, ``distribution``);
    - with importance: ``importance.csv`` (the long per-residue table) and ``importance/<name>.png`` (the
      nucleus and top-compartment tracks with their peak windows) for the first ``max_plots`` proteins
      (``<name>`` made file-name safe, repeats numbered);
    - ``summary.json``: what is returned.

    Parameters
    ----------
    sequences
        ``name -> sequence``, one sequence (named ``query``), or a FASTA / CSV / TSV file
        (:func:`localize_inputs`).
    out
        Output folder; an existing non-empty one is refused unless ``overwrite`` (then it is replaced).
    checkpoint
        Encoder run / checkpoint folder, or ``pretrained:NAME``.
    overwrite
        Replace an existing output folder protloc wrote.
    batch_size, importance, ig_steps, device
        As :func:`localize_sequences`.
    max_plots
        Importance plots written at most (0: none).
    progress
        Show progress bars.

    Returns
    -------
    dict
        The content of ``summary.json``: the model (``model``: name, checkpoint, SHA-256, step),
        ``thresholds`` and ``threshold_source``, ``proteins``, ``clipped``, ``nuclear``, settings,
        ``files``, ``seconds`` and per protein (``sequences``): ``name``, ``length``, ``clipped``,
        ``top_compartment``, ``top_probability``, ``p_nucleus``, ``nuclear``, ``calls`` (compartments at or
        above their thresholds), ``top_compartments`` (the three most probable, ``[name, probability]``),
        the peaks and the ``plot`` file (or None).
    """
    records, source = localize_inputs(sequences)
    check_batch_size(batch_size)
    _check_steps(ig_steps)
    if isinstance(max_plots, bool) or not isinstance(max_plots, int) or max_plots < 0:
        raise ConfigError(f"max_plots must be a non-negative integer, got {max_plots!r}")
    out = check_out(
        out, overwrite=overwrite, inputs={"--checkpoint": resolve_checkpoint(checkpoint), "--sequences": source}
    )
    device = resolve_device(device)
    t0 = time.perf_counter()
    adata, table = _localize(
        records, checkpoint, batch_size, importance, ig_steps, device, progress, precision=precision
    )
    seconds = time.perf_counter() - t0
    uns = adata.uns["localize"]
    stems = unique_stems([name for name, _ in records])
    n_plots = min(len(records), max_plots) if importance else 0
    if importance and len(records) > n_plots:
        logger.info(
            "importance plots for the first %d of %d proteins (importance.csv holds them all)", n_plots, len(records)
        )
    files = {"table": "localize.csv", "anndata": "localize.h5ad", "summary": "summary.json"}
    if importance:
        files["importance"] = "importance.csv"
    per_seq: list[dict[str, Any]] = []
    with atomic_dir(out) as tmp:
        write_csv(adata.obs, tmp / files["table"], index=True)
        adata.write_h5ad(tmp / files["anndata"])
        if importance:
            write_csv(table, tmp / files["importance"])
            if n_plots:
                (tmp / "importance").mkdir()
            by_protein = dict(tuple(table.groupby("protein", sort=False))) if n_plots else {}
        for i, ((name, seq), stem) in enumerate(zip(records, stems, strict=True)):
            row = adata.obs.iloc[i]
            entry: dict[str, Any] = {
                "name": name,
                "file_stem": stem,
                "length": int(row["length"]),
                "clipped": bool(row["clipped"]),
                "top_compartment": str(row["top_compartment"]),
                "top_probability": float(row["top_probability"]),
                "p_nucleus": float(row["p_nucleus"]),
                "nuclear": bool(row["nuclear"]),
                "calls": [c for c in COMPARTMENTS if bool(row[f"call_{c}"])],
                "top_compartments": _top(row, 3),
            }
            if importance:
                entry.update(
                    nucleus_peak=str(row["nucleus_peak"]),
                    nucleus_peak_residues=str(row["nucleus_peak_residues"]),
                    top_peak=str(row["top_peak"]),
                    top_peak_residues=str(row["top_peak_residues"]),
                    plot=None,
                )
                if i < n_plots:
                    entry["plot"] = f"importance/{stem}.png"
                    fig = _importance_figure(name, seq, by_protein[name], row)
                    save_fig(fig, tmp / entry["plot"])
            per_seq.append(entry)
        summary: dict[str, Any] = {
            "model": {k: uns[k] for k in ("name", "checkpoint", "sha256") if k in uns} | {"step": uns.get("step")},
            "thresholds": dict(uns["thresholds"]),
            "threshold_source": uns["threshold_source"],
            "proteins": len(records),
            "clipped": int(uns["clipped"]),
            "nuclear": int(adata.obs["nuclear"].sum()),
            "max_residues": int(uns["max_residues"]),
            "batch_size": batch_size,
            "device": str(device),
            "importance": bool(importance),
            "ig_steps": ig_steps if importance else None,
            "precision": precision,
            "ig_baseline": uns.get("ig_baseline"),
            "ig_max_gap": uns.get("ig_max_gap"),
            "plots": n_plots,
            "files": files,
            "seconds": round(seconds, 3),
            "sequences": per_seq,
        }
        write_json(tmp / files["summary"], summary)
    logger.info("localized %d protein(s) in %.1f s into %s", len(records), seconds, out)
    return summary


def _top(row: pd.Series, k: int) -> list[list[Any]]:
    """The ``k`` compartments of highest presence probability: ``[[name, probability], ...]``."""
    probs = sorted(((float(row[f"p_{c}"]), c) for c in COMPARTMENTS), reverse=True)[:k]
    return [[c, round(p, 4)] for p, c in probs]


def _importance_figure(name: str, seq: str, rows: pd.DataFrame, obs_row: pd.Series) -> Any:
    """The nucleus and top-compartment importance tracks of one protein, one above the other."""
    from matplotlib.figure import Figure

    from protloc.plotting.localize import plot_importance

    n = len(seq)
    pos = rows["position"].to_numpy() - 1
    fig = Figure(figsize=(max(6.0, min(16.0, 0.08 * n + 4.0)), 5.6), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    top = str(obs_row["top_compartment"])
    for ax, column, peak, label in (
        (axes[0], "importance_nucleus", obs_row["nucleus_peak"], f"nucleus (p = {obs_row['p_nucleus']:.2f})"),
        (axes[1], "importance_top", obs_row["top_peak"], f"{top} (p = {obs_row['top_probability']:.2f})"),
    ):
        track = np.full(n, np.nan)
        track[pos] = rows[column].to_numpy()
        start, end = (int(v) for v in str(peak).split("-"))
        plot_importance(seq, track, title=f"{name}: {label}", peak=(start, end), ylabel="importance", ax=ax)
    return fig

"""``protloc screen``: in-silico screens of one protein with a trained CELL-E (paper Fig. 4-6, S.3.8).

- :func:`screen_sequence`: the wild type (a sequence, a FASTA record, or a shipped engineered construct);
- :func:`screen_variants`: the variants of one screen (insertions, truncations, deletions, substitutions);
- :func:`screen`: variants -> DataFrame of nucleus proportions (common random numbers);
- :func:`attention`: one sequence -> DataFrame of residue attention, protein-present vs background (S.3.8);
- :func:`run_screen`: the command: a screen or the attention written as CSV, PNG and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from protloc._fs import atomic_dir
from protloc.commands._output import check_out, save_fig, write_csv, write_json
from protloc.commands.inputs import ImageInput, check_batch_size, load_celle, model_nucleus, resolve_device
from protloc.data.sequences import read_fasta, validate_sequence
from protloc.errors import ConfigError, InputError
from protloc.eval.predict import SamplingConfig

if TYPE_CHECKING:
    from protloc.analysis.screens import Variant
    from protloc.eval.load import CelleRun

logger = logging.getLogger(__name__)

__all__ = ["SCREEN_MODES", "attention", "run_screen", "screen", "screen_sequence", "screen_variants"]

SCREEN_MODES = ("insert", "truncate", "delete", "mutate", "attention")
"""The kinds of ``protloc screen`` (:func:`run_screen`), one per call."""


def screen_sequence(
    sequence: str | None = None,
    *,
    name: str | None = None,
    fasta: str | os.PathLike | None = None,
    record_id: str | None = None,
) -> tuple[str, str, str]:
    """The wild type of a screen: a given sequence, a FASTA record, or a shipped engineered construct.

    Parameters
    ----------
    sequence
        The amino-acid sequence (named ``name``, default ``query``).
    name
        Name of ``sequence``.
    fasta
        FASTA file holding the wild type (record ``record_id``; may be left out for a one-record file).
    record_id
        A FASTA record id; without ``fasta``, one of the engineered constructs shipped with the reference
        world (``GFP``, ``GFP_NLS_nucleoplasmin``, ``TOP1``, ...).

    Returns
    -------
    tuple
        ``(name, sequence, source)``.

    Raises
    ------
    InputError
        Both or neither of a sequence and a FASTA record, an unknown record or construct, an invalid residue.
    """
    if sequence is not None:
        if fasta is not None or record_id is not None:
            raise InputError("give either a sequence or a FASTA record (--fasta / --id), not both")
        label = name or "query"
        return label, validate_sequence(sequence, name=label), "sequence"
    if name is not None:
        raise InputError("--name names a --sequence; a FASTA record is named by its id")
    if fasta is None:
        if record_id is None:
            raise InputError("give a sequence (--sequence) or a FASTA record (--fasta with --id)")
        from protloc.data.world.assets import load_engineered

        constructs = load_engineered()
        if record_id not in constructs:
            raise InputError(
                f"no engineered construct {record_id!r} (shipped: {', '.join(constructs)}); "
                "pass --fasta to read the id from a file"
            )
        return record_id, constructs[record_id], "engineered constructs (protloc/data/world/assets/engineered.fasta)"
    path = Path(fasta)
    if not path.is_file():
        raise InputError("FASTA file not found", path=path)
    records = read_fasta(path)
    if not records:
        raise InputError("the FASTA file holds no sequences", path=path)
    if record_id is None:
        if len(records) > 1:
            raise InputError(f"the FASTA file holds {len(records)} sequences: pick one with --id", path=path)
        record_id = next(iter(records))
    if record_id not in records:
        shown = ", ".join(list(records)[:5]) + (", ..." if len(records) > 5 else "")
        raise InputError(f"no record {record_id!r} in the FASTA file (ids: {shown})", path=path)
    return record_id, records[record_id], str(path)


def screen_variants(
    sequence: str,
    *,
    mode: str,
    name: str = "query",
    peptides: Mapping[str, str] | None = None,
    at: Sequence[int | str] = ("end",),
    step: int | None = None,
    from_: str = "n",
    min_length: int = 1,
    window: int | None = None,
    residues: str = "A",
    positions: Sequence[int] | None = None,
) -> tuple[list[Variant], dict[str, Any]]:
    """The variants of one screen of a (validated) sequence, wild type first (:mod:`protloc.analysis.screens`).

    Parameters
    ----------
    sequence
        The wild type.
    mode
        ``"insert"``: every peptide of ``peptides`` (name -> sequence) at every point of ``at``
        (``"start"``, ``"end"`` or ``i`` = after ``i`` residues, 0..len): the GFP + NLS experiment of
        Fig. 4; ``"truncate"``: terminal truncations by multiples of ``step`` from ``from_`` (``"n"`` /
        ``"c"``), keeping at least ``min_length`` residues: the TOP1 series of Fig. 5; ``"delete"``:
        internal deletions of ``window`` residues, sliding by ``step`` (default ``window``); ``"mutate"``:
        point substitutions to ``residues`` (one-letter codes or ``"all"``) at ``positions`` (0-based;
        default every residue).
    name
        The wild type's name (variant names start with it).
    peptides, at, step, from_, min_length, window, residues, positions
        The options of ``mode`` (the others are ignored).

    Returns
    -------
    variants : list of Variant
        Wild type first.
    settings : dict
        The options that made them (for ``summary.json``).

    Raises
    ------
    InputError
        Insertion points or positions outside the sequence, a truncation or substitution that changes nothing.
    ConfigError
        An unknown mode, or ``"attention"`` (not a variant screen: :func:`attention`).
    """
    from protloc.analysis.screens import deletion_scan, insertion_variants, mutational_scan, truncation_series

    n = len(sequence)
    if mode == "insert":
        peptides = dict(peptides or {})
        at = list(at or ["end"])
        for p in at:
            if isinstance(p, int) and not isinstance(p, bool) and not 0 <= p <= n:
                raise InputError(f"insertion point {p} is outside 0..{n} (residues before the insertion)")
        variants = insertion_variants(sequence, peptides, at, seq_name=name)
        return variants, {"peptides": peptides, "at": at}
    if mode == "truncate":
        variants = truncation_series(sequence, step=step, from_=from_, min_length=min_length, seq_name=name)
        if len(variants) == 1:
            raise InputError(f"no truncation of {step} residues leaves at least {min_length} of {n}")
        return variants, {"step": step, "from": from_, "min_length": min_length}
    if mode == "delete":
        variants = deletion_scan(sequence, window=window, step=step, seq_name=name)
        return variants, {"window": window, "step": window if step is None else step}
    if mode == "mutate":
        if positions is not None:
            positions = list(positions)
            bad = [p + 1 for p in positions if not 0 <= p < n]
            if bad:
                raise InputError(f"position(s) {bad[:5]} (1-based) outside the sequence of {n} residues")
        variants = mutational_scan(sequence, residues=residues, positions=positions, seq_name=name)
        if len(variants) == 1:
            raise InputError("no substitutions: every chosen position already holds the target residue")
        where = "all" if positions is None else [p + 1 for p in positions]
        return variants, {"residues": residues, "positions_1based": where}
    if mode == "attention":
        raise ConfigError("attention is not a variant screen: use protloc.commands.screen.attention")
    raise ConfigError(f"screen mode must be one of {', '.join(SCREEN_MODES)}, got {mode!r}")


def screen(
    variants: Sequence[Variant],
    *,
    run: CelleRun,
    nucleus: str | os.PathLike | np.ndarray | ImageInput | None = None,
    sampling: SamplingConfig | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> pd.DataFrame:
    """Predict every variant against one nucleus image with the same sampling noise (common random numbers).

    Parameters
    ----------
    variants
        From :func:`screen_variants` (or :mod:`protloc.analysis.screens`); row 0 is the reference of ``delta``.
    run
        A loaded CELL-E (:func:`~protloc.commands.inputs.load_celle`).
    nucleus
        Nucleus image (path or array), ``None`` for the reference nucleus
        (:func:`~protloc.commands.inputs.model_nucleus`).
    sampling
        :class:`~protloc.eval.predict.SamplingConfig`; ``samples`` draws per variant.
    batch_size
        Variants per generation batch (the results do not depend on it).
    progress
        Show a progress bar.

    Returns
    -------
    pandas.DataFrame
        The :func:`~protloc.analysis.screens.predict_variants` table (wild type first; ``nucleus_proportion``,
        ``sd``, ``delta``, ``input_changed``, ...).
    """
    import torch

    from protloc.analysis.screens import predict_variants

    check_batch_size(batch_size)
    nuc = model_nucleus(run, nucleus)
    return predict_variants(
        run,
        variants,
        torch.from_numpy(nuc.image)[None, None],
        sampling=sampling,
        batch_size=batch_size,
        progress=progress,
    )


def attention(
    sequence: str,
    *,
    run: CelleRun,
    nucleus: str | os.PathLike | np.ndarray | ImageInput | None = None,
    sampling: SamplingConfig | None = None,
    method: str = "rollout",
    present_min: float = 0.5,
    background_max: float = 0.5,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The residues attended by protein-present vs background patches of one generated threshold image (S.3.8).

    Parameters
    ----------
    sequence
        A validated amino-acid sequence.
    run
        A loaded CELL-E.
    nucleus
        Nucleus image (path or array) or ``None`` (reference nucleus).
    sampling
        :class:`~protloc.eval.predict.SamplingConfig` of the one generated image (``samples`` is not used).
    method
        ``"rollout"`` (attention rollout, as S.3.8) or ``"mean"`` (raw attention averaged over layers).
    present_min, background_max
        Patch groups: a patch whose threshold fraction is ``>= present_min`` is "present", ``<
        background_max`` "background".

    Returns
    -------
    table : pandas.DataFrame
        Per residue the model saw: ``residue``, ``position`` (1-based), ``present``, ``background``,
        ``difference``.
    result : dict
        :func:`~protloc.analysis.screens.residue_attention`'s result (``window_start``, ``n_present``,
        ``n_background``, ...).

    Raises
    ------
    ConfigError
        An unknown method.
    """
    import torch

    from protloc.analysis.screens import residue_attention

    if method not in ("rollout", "mean"):
        raise ConfigError(f"attention method must be 'rollout' or 'mean', got {method!r}")
    nuc = model_nucleus(run, nucleus)
    res = residue_attention(
        run,
        sequence,
        torch.from_numpy(nuc.image)[None, None],
        sampling=sampling,
        method=method,  # type: ignore[arg-type]
        present_min=present_min,
        background_max=background_max,
    )
    table = pd.DataFrame(
        {
            "residue": list(res["residues"]),
            "position": res["positions"],
            "present": res["present"],
            "background": res["background"],
            "difference": res["difference"],
        }
    )
    return table, res


def run_screen(
    *,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    mode: str,
    sequence: str | None = None,
    name: str | None = None,
    fasta: str | os.PathLike | None = None,
    record_id: str | None = None,
    nucleus: str | os.PathLike | np.ndarray | None = None,
    peptides: Mapping[str, str] | None = None,
    at: Sequence[int | str] = ("end",),
    step: int | None = None,
    from_: str = "n",
    min_length: int = 1,
    window: int | None = None,
    residues: str = "A",
    positions: Sequence[int] | None = None,
    method: str = "rollout",
    present_min: float = 0.5,
    background_max: float = 0.5,
    sampling: SamplingConfig | None = None,
    batch_size: int = 8,
    device: str | None = "cpu",
    precision: str = "fp32",
    embedder_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """In-silico screen of one protein with a trained CELL-E (paper Fig. 4-6, S.3.8): ``protloc screen``.

    One ``mode`` per call: ``"insert"``, ``"truncate"``, ``"delete"``, ``"mutate"`` (the variants of
    :func:`screen_variants`, predicted by :func:`screen`) or ``"attention"`` (the residues attended by
    protein-present vs background patches of one generated threshold image, :func:`attention`; ``method``
    ``"rollout"`` or ``"mean"``, patch groups by ``present_min`` / ``background_max``, S.3.8).

    Every variant is predicted against the same nucleus image (``nucleus`` as in
    :func:`~protloc.commands.predict.run_predict`, default the reference nucleus) with the same sampling
    noise (common random numbers), so a ``delta`` reflects the sequence change. Writes into ``out`` (a
    folder written beside it and moved into place when complete): ``screen.csv`` (the
    :func:`~protloc.analysis.screens.predict_variants` table, wild type first), ``screen.png``
    (:func:`~protloc.plotting.screens.plot_screen`) and ``summary.json``; for ``"attention"``
    ``attention.csv`` (``residue``, ``position`` 1-based, ``present``, ``background``, ``difference``),
    ``attention.png`` and ``summary.json``.

    The wild type is ``sequence`` (named ``name``, default ``query``), or record ``record_id`` of
    ``fasta`` (may be left out for a one-record file), or -- ``record_id`` without ``fasta`` -- one of the
    engineered constructs shipped with the reference world (``GFP``, ``GFP_NLS_nucleoplasmin``, ``TOP1``, ...)
    (:func:`screen_sequence`).

    Parameters
    ----------
    sampling
        :class:`~protloc.eval.predict.SamplingConfig` shared by all variants (default: its defaults).

    The other parameters are those of :func:`screen_sequence`, :func:`screen_variants`, :func:`attention`
    and :func:`~protloc.commands.predict.run_predict`.

    Returns
    -------
    dict
        The content of ``summary.json``: ``mode``, ``settings`` (the mode's options, sampling, batch size,
        device), ``sequence`` (name, length, source), ``checkpoint``, ``step``, ``model_window``
        (``max_residues``), ``nucleus``, ``warnings``, ``files``, ``seconds`` and, for a screen,
        ``variants``, ``wild_type_nucleus_proportion``, ``top_variants`` (the 5 largest ``|delta|``) and
        ``outside_window`` (variants whose model input equals the wild type's: the change lies beyond the
        model's N-terminal window); for attention, ``window``, ``n_present`` / ``n_background`` and
        ``top_residues`` (the 5 largest present - background differences).

    Raises
    ------
    InputError
        A missing checkpoint / FASTA / record / image, an invalid residue (named), positions outside the
        sequence, an existing output.
    ConfigError
        An unknown mode or method, invalid sampling settings or batch size.
    """
    from protloc.plotting.screens import plot_residue_attention, plot_screen

    t0 = time.perf_counter()
    if mode not in SCREEN_MODES:
        raise ConfigError(f"screen mode must be one of {', '.join(SCREEN_MODES)}, got {mode!r}")
    if mode == "attention" and method not in ("rollout", "mean"):
        raise ConfigError(f"attention method must be 'rollout' or 'mean', got {method!r}")
    seq_name, seq, seq_source = screen_sequence(sequence, name=name, fasta=fasta, record_id=record_id)
    sampling = sampling if sampling is not None else SamplingConfig()
    check_batch_size(batch_size)
    if mode != "attention":
        variants, mode_settings = screen_variants(
            seq,
            mode=mode,
            name=seq_name,
            peptides=peptides,
            at=at,
            step=step,
            from_=from_,
            min_length=min_length,
            window=window,
            residues=residues,
            positions=positions,
        )
    else:
        variants, mode_settings = [], {"method": method, "present_min": present_min, "background_max": background_max}
    out = check_out(
        out, overwrite=overwrite, inputs={"--checkpoint": checkpoint, "--fasta": fasta, "--nucleus": nucleus}
    )
    device = resolve_device(device)
    run = load_celle(checkpoint, device=device, precision=precision, embedder_path=embedder_path)
    nuc = model_nucleus(run, nucleus)
    max_residues = run.model.config.max_residues
    sampling_settings = dataclasses.asdict(sampling)
    if mode == "attention":
        sampling_settings.pop("samples")  # one draw
    summary: dict[str, Any] = {
        "mode": mode,
        "settings": {
            **mode_settings,
            "sampling": sampling_settings,
            "batch_size": batch_size,
            "device": str(device),
            "precision": precision,
        },
        "sequence": {"name": seq_name, "length": len(seq), "source": seq_source},
        "checkpoint": str(run.checkpoint.resolve()),
        "step": run.extra.get("step"),
        "model_window": max_residues,
        "nucleus": nuc.info,
    }
    warnings: list[str] = []
    if mode == "attention":
        table, res = attention(
            seq,
            run=run,
            nucleus=nuc,
            sampling=sampling,
            method=method,
            present_min=present_min,
            background_max=background_max,
        )
    else:
        table = screen(variants, run=run, nucleus=nuc, sampling=sampling, batch_size=batch_size, progress=progress)
    with atomic_dir(out) as tmp:
        if mode == "attention":
            write_csv(table, tmp / "attention.csv")
            fig = plot_residue_attention(res, seq)
            fig.axes[0].set_title(f"{seq_name}: residue attention ({method}, S.3.8)", fontsize=10)
            save_fig(fig, tmp / "attention.png")
            start, n_res = int(res["window_start"]), len(res["residues"])
            if n_res < len(seq):
                warnings.append(
                    f"the model sees residues {start + 1}-{start + n_res} of {len(seq)}: "
                    "the attention covers only those"
                )
            for group, count in (("present", res["n_present"]), ("background", res["n_background"])):
                if count == 0:
                    warnings.append(f"no {group} patches in the generated threshold image: its column is empty (NaN)")
            finite = table[np.isfinite(table["difference"])]
            top = finite.reindex(finite["difference"].sort_values(ascending=False, kind="stable").index).head(5)
            summary.update(
                {
                    "window": {"start": start + 1, "end": start + n_res},
                    "n_present": res["n_present"],
                    "n_background": res["n_background"],
                    "top_residues": top.to_dict(orient="records"),
                    "files": ["attention.csv", "attention.png", "summary.json"],
                }
            )
        else:
            write_csv(table, tmp / "screen.csv")
            wt = float(table["nucleus_proportion"].iloc[0])
            title = f"{seq_name}: {mode} screen (wild type nucleus proportion {wt:.3f})"
            save_fig(plot_screen(table, title=title), tmp / "screen.png")
            rest = table.iloc[1:]
            unchanged = [str(v) for v in rest.loc[~rest["input_changed"].astype(bool), "name"]]
            if unchanged:
                warnings.append(
                    f"{len(unchanged)} of {len(rest)} variant(s) change the sequence only beyond the model's "
                    f"{max_residues}-residue N-terminal window: their input equals the wild type's (delta 0)"
                )
            order = rest["delta"].abs().sort_values(ascending=False, kind="stable").index
            top_cols = ["name", "kind", "position", "detail", "nucleus_proportion", "delta", "input_changed"]
            top_rows = []
            for rec in rest.loc[order[:5], top_cols].to_dict(orient="records"):
                rec["position"] = None if pd.isna(rec["position"]) else int(rec["position"])
                rec["input_changed"] = bool(rec["input_changed"])
                top_rows.append(rec)
            summary.update(
                {
                    "variants": len(table),
                    "wild_type_nucleus_proportion": wt,
                    "top_variants": top_rows,
                    "outside_window": unchanged,
                    "files": ["screen.csv", "screen.png", "summary.json"],
                }
            )
        for w in warnings:
            logger.warning("%s", w)
        summary["warnings"] = warnings
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        write_json(tmp / "summary.json", summary)
    logger.info("%s screen of %s written to %s in %.1f s", mode, seq_name, out, summary["seconds"])
    return summary

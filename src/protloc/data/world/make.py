"""Build the reference cell world on disk.

:func:`make_world` writes a folder that ``protloc prepare`` reads like an OpenCell download, plus the
ground truth that real data never has::

    <out>/
      fovs.csv                 fov_id, protein_id, path, gene_name, uniprot_id, label, downsample,
                               pixel_size_um
      fovs/<fov_id>_proj.tif   CYX uint16 (channel 0 nucleus, 1 protein), or <fov_id>_stack.tif (ZCYX)
      proteins.csv             protein_id, uniprot_id, label, w_*, nucleus_proportion_expected,
                               engineered, sequence
      sequences.fasta          one record per protein (id = protein_id)
      truth.csv                per protein: label, weights, expected and measured nucleus proportion,
                               n_fovs, engineered
      truth/<fov_id>_labels.tif  2YX int32: nucleus labels, cell labels
      truth/fovs.csv           per field: n_cells, n_mitotic, nucleus_proportion, labels path
      world.json               every parameter, the seed, mode, protloc version, compartments, counts

Randomness: field ``k`` (in table order) is rendered with ``SeedSequence([seed, 0, k])``, protein
sampling uses ``SeedSequence([seed, 1])`` and synthetic proteins ``SeedSequence([seed, 2])``, so the
output does not depend on the number of workers or the order in which fields finish.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile
from tqdm.auto import tqdm

from protloc._fs import atomic_dir, check_out
from protloc.data.io import write_table
from protloc.data.sequences import validate_sequence, write_fasta
from protloc.data.splits import SPLIT_NAMES
from protloc.data.world.compartments import COMPARTMENTS, NUCLEAR, WEIGHT_COLUMNS
from protloc.data.world.render import (
    NucleusTemplate,
    RenderParams,
    expected_nucleus_proportion,
    prepare_nuclei_bank,
    render_fov,
)
from protloc.data.world.synthetic import make_synthetic_proteins, sequence_weights
from protloc.errors import ConfigError

__all__ = ["MODES", "make_world", "render_compartment_gallery", "world_proteins"]

logger = logging.getLogger(__name__)

MODES = ("real", "proteome", "synthetic")

#: Splits a world's ``partition`` column may hold (the homology partition of the human table).
PARTITIONS = SPLIT_NAMES

#: Spawn keys of the random streams (see the module docstring).
_STREAM_FOV, _STREAM_SAMPLE, _STREAM_SYNTHETIC, _STREAM_GALLERY = 0, 1, 2, 3

#: The world renders at OpenCell's binned scale, so ``protloc prepare`` must not bin again.
WORLD_DOWNSAMPLE = 1

# zlib is in the standard library: no imagecodecs needed.
_ZLIB_FAST: dict[str, Any] = {"compression": "zlib", "compressionargs": {"level": 1}}

_PROTEIN_COLUMNS = ["protein_id", "uniprot_id", "label", *WEIGHT_COLUMNS, "nucleus_proportion_expected"]


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *keys]))


def _normalised_weights(df: pd.DataFrame) -> np.ndarray:
    w = df[list(WEIGHT_COLUMNS)].to_numpy(dtype=np.float64)
    sums = w.sum(axis=1, keepdims=True)
    bad = np.flatnonzero(~(sums[:, 0] > 0))
    if bad.size:
        raise ConfigError(f"protein {df['protein_id'].iloc[bad[0]]!r} has no positive compartment weight")
    return w / sums


def _custom_proteins(table: pd.DataFrame) -> pd.DataFrame:
    """A user's protein table: ``protein_id`` and ``sequence``, optional ``w_*`` weights (else from the
    sequence rules), ``label`` (else the argmax compartment), ``uniprot_id`` and ``gene_name``."""
    if not isinstance(table, pd.DataFrame) or table.empty:
        raise ConfigError("protein_table must be a non-empty pandas DataFrame")
    missing = [c for c in ("protein_id", "sequence") if c not in table]
    if missing:
        raise ConfigError(f"protein_table lacks column(s) {missing}")
    out = table.copy().reset_index(drop=True)
    out["protein_id"] = out["protein_id"].astype(str)
    out["sequence"] = [
        validate_sequence(str(seq), name=f"protein_table row {i + 1} ({pid})")
        for i, (pid, seq) in enumerate(zip(out["protein_id"], out["sequence"], strict=True))
    ]
    given = [c for c in WEIGHT_COLUMNS if c in out]
    if given and len(given) != len(WEIGHT_COLUMNS):
        raise ConfigError(f"protein_table has some weight columns but lacks {sorted(set(WEIGHT_COLUMNS) - set(given))}")
    if not given:
        weights = np.stack([sequence_weights(seq) for seq in out["sequence"]])
        for j, col in enumerate(WEIGHT_COLUMNS):
            out[col] = weights[:, j]
    if "label" not in out:
        w = out[list(WEIGHT_COLUMNS)].to_numpy(dtype=np.float64)
        out["label"] = [COMPARTMENTS[int(np.argmax(row))] for row in w]
    if "uniprot_id" not in out:
        out["uniprot_id"] = ""
    return out


def world_proteins(
    *,
    proteins: int | None = 100,
    seed: int = 0,
    mode: str = "real",
    include_engineered: bool = True,
    protein_table: pd.DataFrame | None = None,
    partitions: Sequence[str] | Mapping[str, int] | None = None,
) -> pd.DataFrame:
    """The protein table of a world (what :func:`make_world` writes to ``proteins.csv``).

    Parameters
    ----------
    proteins
        Number of imaged proteins: sampled deterministically from the real asset table
        (``mode="real"``; ``None`` = all 384), from the shipped human proteome table
        (``mode="proteome"``; ``None`` = all 15,172) or generated (``mode="synthetic"``; ``None`` = 100).
    seed
        World seed.
    mode
        ``"real"``: the 384 real proteins of the world assets, weights from their GO annotations;
        ``"proteome"``: proteins of the human table of :func:`protloc.data.proteome.read_human_table`
        (Swiss-Prot sequences, GO-derived weights) with its homology ``partition`` (train / val / test),
        which reaches ``fovs.csv``, ``proteins.csv`` and ``truth.csv`` and from there the CELL-E split of
        ``protloc prepare``; ``"synthetic"``: proteins with planted signals and weights from
        :func:`~protloc.data.world.synthetic.sequence_weights`.
    include_engineered
        Append the engineered constructs (GFP, GFP + NLS, ...) with weights from the sequence rules and
        ``engineered=True``; they get no fields of view.
    protein_table
        Image these proteins instead (``proteins`` and ``mode`` are then not used): columns
        ``protein_id`` and ``sequence``, optionally the twelve ``w_*`` compartment weights (else from the
        sequence rules of :func:`~protloc.data.world.synthetic.sequence_weights`), ``label``,
        ``uniprot_id``, ``gene_name``, ``partition``. E.g. short proteins with chosen signals for a test.
    partitions
        ``proteome`` mode only: draw ``proteins`` from these partitions of the human table (e.g.
        ``["test"]`` for a world of held-out proteins only), or, as a mapping, this many proteins from
        each partition (e.g. ``{"train": 200, "test": 300}``; ``proteins`` is then not used);
        None: all partitions.

    Returns
    -------
    pandas.DataFrame
        Columns ``protein_id, uniprot_id, label, w_*, nucleus_proportion_expected, engineered,
        sequence`` (plus ``gene_name``; plus ``partition`` in ``proteome`` mode or when
        ``protein_table`` has one, empty for the engineered constructs).
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if proteins is not None and (not isinstance(proteins, int | np.integer) or proteins < 1):
        raise ConfigError(f"proteins must be a positive integer or None, got {proteins!r}")
    if partitions is not None and mode != "proteome":
        raise ConfigError(f"partitions select proteins of the human table: they need mode='proteome', not {mode!r}")
    if protein_table is not None:
        table = _custom_proteins(protein_table)
        weights = _normalised_weights(table)
    elif mode == "real":
        from protloc.data.world import assets  # lazy: the asset tables are only needed here

        table = assets.load_proteins()
        if proteins is not None:
            if proteins > len(table):
                raise ConfigError(f"proteins={proteins} but the real asset table holds only {len(table)}")
            pick = _rng(seed, _STREAM_SAMPLE).choice(len(table), size=proteins, replace=False)
            table = table.iloc[np.sort(pick)]
        table = table.reset_index(drop=True)
        weights = _normalised_weights(table)
    elif mode == "proteome":
        table = _proteome_table(proteins, seed, partitions)
        weights = _normalised_weights(table)
    else:
        table = make_synthetic_proteins(100 if proteins is None else int(proteins), rng=_rng(seed, _STREAM_SYNTHETIC))
        weights = _normalised_weights(table)
    df = pd.DataFrame(
        {
            "protein_id": table["protein_id"].astype(str),
            "gene_name": table["gene_name"].astype(str) if "gene_name" in table else table["protein_id"].astype(str),
            "uniprot_id": table["uniprot_id"].fillna("").astype(str),
            "label": table["label"].astype(str),
        }
    )
    for j, col in enumerate(WEIGHT_COLUMNS):
        df[col] = weights[:, j]
    df["nucleus_proportion_expected"] = [expected_nucleus_proportion(w) for w in weights]
    df["engineered"] = False
    df["sequence"] = table["sequence"].astype(str).to_numpy()
    has_partition = "partition" in table
    if has_partition:
        df["partition"] = _check_partition(table)

    if include_engineered:
        from protloc.data.world import assets

        rows = []
        for name, seq in assets.load_engineered().items():
            w = sequence_weights(seq)
            row = {"protein_id": name, "gene_name": name, "uniprot_id": "", "label": COMPARTMENTS[int(np.argmax(w))]}
            row.update(dict(zip(WEIGHT_COLUMNS, w.tolist(), strict=True)))
            row.update(nucleus_proportion_expected=expected_nucleus_proportion(w), engineered=True, sequence=seq)
            if has_partition:
                row["partition"] = ""  # no fields of view, so in no split
            rows.append(row)
        if rows:
            df = pd.concat([df, pd.DataFrame(rows, columns=df.columns)], ignore_index=True)
    dup = df["protein_id"][df["protein_id"].duplicated()]
    if len(dup):
        raise ConfigError(f"duplicate protein_id {dup.iloc[0]!r} in the world table (an engineered name clash?)")
    return df[
        [
            "protein_id",
            "gene_name",
            "uniprot_id",
            "label",
            *WEIGHT_COLUMNS,
            "nucleus_proportion_expected",
            "engineered",
            "sequence",
            *(["partition"] if has_partition else []),
        ]
    ]


def _proteome_table(
    proteins: int | None, seed: int, partitions: Sequence[str] | Mapping[str, int] | None
) -> pd.DataFrame:
    """A deterministic sample of the shipped human table, in the table's order, world columns."""
    from protloc.data.proteome import read_human_table  # lazy: a 6 MB table only this mode needs

    human = read_human_table()
    if isinstance(partitions, Mapping):
        counts = {str(k): v for k, v in partitions.items()}
        bad = [p for p in counts if p not in PARTITIONS]
        if bad or not counts:
            raise ConfigError(f"partitions must be some of {', '.join(PARTITIONS)}, got {sorted(counts)}")
        for name, n in counts.items():
            if not isinstance(n, int | np.integer) or n < 1:
                raise ConfigError(f"partition {name!r}: the number of proteins must be a positive integer, got {n!r}")
        picks = []
        for k, name in enumerate(PARTITIONS):
            if name not in counts:
                continue
            rows = np.flatnonzero(human["partition"].to_numpy() == name)
            if counts[name] > rows.size:
                raise ConfigError(
                    f"partition {name!r}: {counts[name]} proteins asked for, the human proteome table holds {rows.size}"
                )
            picks.append(rows[_rng(seed, _STREAM_SAMPLE, k).choice(rows.size, size=counts[name], replace=False)])
        human = human.iloc[np.sort(np.concatenate(picks))]
        proteins = None
    elif partitions is not None:
        chosen = [str(p) for p in partitions]
        bad = [p for p in chosen if p not in PARTITIONS]
        if bad or not chosen:
            raise ConfigError(f"partitions must be some of {', '.join(PARTITIONS)}, got {chosen}")
        human = human[human["partition"].isin(chosen)]
    if proteins is not None:
        if proteins > len(human):
            where = f" in partitions {', '.join(partitions)}" if partitions is not None else ""
            raise ConfigError(f"proteins={proteins} but the human proteome table holds only {len(human)}{where}")
        pick = _rng(seed, _STREAM_SAMPLE).choice(len(human), size=proteins, replace=False)
        human = human.iloc[np.sort(pick)]
    human = human.reset_index(drop=True)
    # Gene symbols are unique in the table and are what a cell biologist reads in an atlas.
    out = pd.DataFrame(
        {
            "protein_id": human["gene_symbol"].astype(str),
            "gene_name": human["gene_symbol"].astype(str),
            "uniprot_id": human["accession"].astype(str),
            "label": human["label"].astype(str),
            "sequence": human["sequence"].astype(str),
            "partition": human["partition"].astype(str),
        }
    )
    for col in WEIGHT_COLUMNS:
        out[col] = human[col].to_numpy(dtype=np.float64)
    return out


def _check_partition(table: pd.DataFrame) -> list[str]:
    values = table["partition"].fillna("").astype(str).tolist()
    for i, v in enumerate(values):
        if v not in PARTITIONS:
            raise ConfigError(
                f"protein {table['protein_id'].iloc[i]!r} (row {i + 1}) has partition {v!r}; "
                f"use one of {', '.join(PARTITIONS)}"
            )
    return values


# --------------------------------------------------------------------------------------------------
# rendering jobs (top-level functions so that worker processes can run them)
# --------------------------------------------------------------------------------------------------

_WORKER_BANK: list[NucleusTemplate] | None = None


def _init_worker(bank: list[NucleusTemplate] | None) -> None:
    # The nucleus bank is sent once per worker process, not with every job.
    global _WORKER_BANK
    _WORKER_BANK = bank


def _render_job_in_worker(job: dict[str, Any]) -> dict[str, Any]:
    return _render_job(job, _WORKER_BANK)


def _render_job(job: dict[str, Any], bank: list[NucleusTemplate] | None) -> dict[str, Any]:
    fov = render_fov(
        job["weights"],
        params=job["params"],
        rng=_rng(job["seed"], _STREAM_FOV, job["index"]),
        nuclei_bank=bank,
    )
    root = Path(job["root"])
    axes = "CYX" if fov.protein.ndim == 2 else "ZCYX"
    image = np.stack([fov.nucleus, fov.protein], axis=0 if fov.protein.ndim == 2 else 1)
    # tifffile directly rather than io.write_tiff: the whole world folder is already written
    # atomically, and zlib level 1 compresses noisy images as well as the default level 6 in a fifth
    # of the time (the default level costs about as much as rendering the field).
    tifffile.imwrite(root / job["path"], image, imagej=True, metadata={"axes": axes}, **_ZLIB_FAST)
    labels = np.stack([fov.nucleus_labels, fov.cell_labels]).astype(np.int32)
    # int32 is not an ImageJ type: tifffile's own shaped metadata keeps the axes
    tifffile.imwrite(
        root / job["labels_path"], labels, metadata={"axes": "CYX"}, photometric="minisblack", **_ZLIB_FAST
    )
    return {
        "fov_id": job["fov_id"],
        "protein_id": job["protein_id"],
        "labels_path": job["labels_path"],
        "n_cells": fov.n_cells,
        "n_nuclei": int(len(np.unique(fov.nucleus_labels)) - 1),
        "n_mitotic": int(fov.mitotic.sum()),
        "nucleus_proportion": fov.nucleus_proportion,
    }


def _load_bank(params: RenderParams) -> list[NucleusTemplate] | None:
    if params.real_nucleus_fraction <= 0:
        return None
    from protloc.data.world import assets  # lazy: the nucleus patches are only needed here

    return prepare_nuclei_bank(assets.load_nuclei())


def make_world(
    out: str | os.PathLike,
    *,
    proteins: int | None = 100,
    fovs: int = 4,
    seed: int = 0,
    size: int = 512,
    mode: str = "real",
    z: int = 1,
    include_engineered: bool = True,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    params: RenderParams | None = None,
    protein_table: pd.DataFrame | None = None,
    partitions: Sequence[str] | Mapping[str, int] | None = None,
) -> Path:
    """Render the reference cell world into ``out``.

    Parameters
    ----------
    out
        Output folder (built in a temporary sibling and moved into place at the end, so an interrupted
        run leaves nothing behind).
    proteins
        Number of imaged proteins (see :func:`world_proteins`; ``None`` = all real ones).
    fovs
        Fields of view per imaged protein.
    seed
        World seed; the same seed gives byte-identical files.
    size
        Field-of-view side in pixels (overrides ``params.size``).
    mode
        ``"real"`` or ``"synthetic"`` (see :func:`world_proteins`).
    z
        z-slices per field; ``z > 1`` writes ``*_stack.tif`` (ZCYX) instead of ``*_proj.tif`` (CYX).
    include_engineered
        Add the engineered constructs to the protein table, FASTA and truth (no fields of view).
    workers
        Rendering processes; results do not depend on it.
    overwrite
        Replace an existing ``out``.
    progress
        Show a progress bar over fields of view.
    params
        Renderer parameters (``size`` and ``z`` are taken from the arguments above). With
        ``real_nucleus_fraction > 0`` the real nucleus patches come from the packaged assets.
    protein_table
        Your own proteins instead of sampled / generated ones (see :func:`world_proteins`).
    partitions
        ``proteome`` mode: draw only from these partitions of the human table (see :func:`world_proteins`).

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    InputError
        If ``out`` exists and ``overwrite`` is not set.
    ConfigError
        For invalid arguments.
    """
    if not isinstance(fovs, int | np.integer) or fovs < 1:
        raise ConfigError(f"fovs must be a positive integer, got {fovs!r}")
    if not isinstance(workers, int | np.integer) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    out_path = check_out(out, overwrite=overwrite)
    params = replace(params or RenderParams(), size=int(size), z=int(z))
    table = world_proteins(
        proteins=proteins,
        seed=seed,
        mode=mode,
        include_engineered=include_engineered,
        protein_table=protein_table,
        partitions=partitions,
    )
    bank = _load_bank(params)

    imaged = table[~table["engineered"]].reset_index(drop=True)
    weights = imaged[list(WEIGHT_COLUMNS)].to_numpy()
    suffix = "_proj.tif" if params.z == 1 else "_stack.tif"
    jobs = []
    for i, pid in enumerate(imaged["protein_id"]):
        for f in range(fovs):
            fov_id = f"{pid}_F{f:02d}"
            jobs.append(
                {
                    "index": len(jobs),
                    "seed": seed,
                    "fov_id": fov_id,
                    "protein_id": pid,
                    "weights": weights[i],
                    "params": params,
                    "path": f"fovs/{fov_id}{suffix}",
                    "labels_path": f"truth/{fov_id}_labels.tif",
                }
            )

    with atomic_dir(out_path) as tmp:
        (tmp / "fovs").mkdir()
        (tmp / "truth").mkdir()
        for job in jobs:
            job["root"] = str(tmp)
        bar = tqdm(total=len(jobs), desc="rendering world", unit="FOV", disable=not progress)
        results: list[dict[str, Any]] = []
        try:
            if workers == 1 or len(jobs) <= 1:
                for job in jobs:
                    results.append(_render_job(job, bank))
                    bar.update()
            else:
                with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(bank,)) as pool:
                    chunk = max(1, min(8, math.ceil(len(jobs) / (4 * workers))))
                    for res in pool.map(_render_job_in_worker, jobs, chunksize=chunk):
                        results.append(res)
                        bar.update()
        finally:
            bar.close()
        mode = "protein_table" if protein_table is not None else mode  # what world.json records
        _write_tables(
            tmp,
            table,
            imaged,
            jobs,
            results,
            params=params,
            seed=seed,
            mode=mode,
            proteins=proteins,
            fovs=fovs,
            include_engineered=include_engineered,
            partitions=partitions,
        )
    logger.info("wrote the %s world (%d proteins, %d fields of view) to %s", mode, len(imaged), len(jobs), out_path)
    return out_path


def _write_tables(
    root: Path,
    table: pd.DataFrame,
    imaged: pd.DataFrame,
    jobs: list[dict[str, Any]],
    results: list[dict[str, Any]],
    *,
    params: RenderParams,
    seed: int,
    mode: str,
    proteins: int | None,
    fovs: int,
    include_engineered: bool,
    partitions: Sequence[str] | Mapping[str, int] | None = None,
) -> None:
    info = imaged.set_index("protein_id")
    fov_rows = [
        {
            "fov_id": job["fov_id"],
            "protein_id": job["protein_id"],
            "path": job["path"],
            "gene_name": info.at[job["protein_id"], "gene_name"],
            "uniprot_id": info.at[job["protein_id"], "uniprot_id"],
            "label": info.at[job["protein_id"], "label"],
            "downsample": WORLD_DOWNSAMPLE,
            "pixel_size_um": params.pixel_size_um,
            **({"partition": info.at[job["protein_id"], "partition"]} if "partition" in info else {}),
        }
        for job in jobs
    ]
    write_table(pd.DataFrame(fov_rows), root / "fovs.csv")

    per_fov = pd.DataFrame(results)
    write_table(per_fov, root / "truth" / "fovs.csv")

    extra = ["partition"] if "partition" in table else []
    proteins_csv = table[[*_PROTEIN_COLUMNS, "engineered", "sequence", *extra]]
    write_table(proteins_csv, root / "proteins.csv")
    write_fasta(root / "sequences.fasta", dict(zip(table["protein_id"], table["sequence"], strict=True)))

    measured = per_fov.groupby("protein_id")["nucleus_proportion"].agg(["mean", "size"])
    truth = table[["protein_id", "label", *WEIGHT_COLUMNS, "nucleus_proportion_expected", "engineered", *extra]].copy()
    truth["nucleus_proportion"] = truth["protein_id"].map(measured["mean"])
    truth["n_fovs"] = truth["protein_id"].map(measured["size"]).fillna(0).astype(int)
    write_table(truth, root / "truth.csv")

    from protloc import __version__

    meta = {
        "protloc_world": 1,
        "protloc_version": __version__,
        "mode": mode,
        "seed": int(seed),
        "arguments": {
            "proteins": None if proteins is None else int(proteins),
            "fovs": int(fovs),
            "size": params.size,
            "z": params.z,
            "include_engineered": bool(include_engineered),
            "partitions": (
                None
                if partitions is None
                else {str(k): int(v) for k, v in partitions.items()}
                if isinstance(partitions, Mapping)
                else [str(p) for p in partitions]
            ),
        },
        "render_params": params.to_dict(),
        "compartments": list(COMPARTMENTS),
        "nuclear_compartments": [c for c in COMPARTMENTS if c in NUCLEAR],
        "downsample": WORLD_DOWNSAMPLE,
        "pixel_size_um": params.pixel_size_um,
        "partition": _partition_meta(table, mode) if extra else None,
        "layout": {
            "fov_table": "fovs.csv",
            "image_axes": "CYX" if params.z == 1 else "ZCYX",
            "channels": ["nucleus", "protein"],
            "labels_axes": "CYX",
            "labels_channels": ["nucleus_labels", "cell_labels"],
        },
        "counts": {
            "proteins": int(len(imaged)),
            "engineered": int(table["engineered"].sum()),
            "fovs": len(jobs),
            "cells": int(per_fov["n_cells"].sum()) if len(per_fov) else 0,
            "mitotic_cells": int(per_fov["n_mitotic"].sum()) if len(per_fov) else 0,
        },
    }
    (root / "world.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _partition_meta(table: pd.DataFrame, mode: str) -> dict[str, Any]:
    imaged = table[~table["engineered"]]
    meta: dict[str, Any] = {
        "column": "partition",
        "counts": {p: int((imaged["partition"] == p).sum()) for p in PARTITIONS},
    }
    if mode == "proteome":
        from protloc.data.proteome import human_table_path, table_sha256

        meta["source"] = "protloc.data.proteome human table (homology partition, issue 16)"
        meta["table_sha256"] = table_sha256(human_table_path())
    else:
        meta["source"] = "the protein table given to make_world"
    return meta


# --------------------------------------------------------------------------------------------------
# gallery
# --------------------------------------------------------------------------------------------------


def render_compartment_gallery(
    *,
    seed: int = 0,
    size: int = 100,
    params: RenderParams | None = None,
    nuclei_bank: Sequence[NucleusTemplate] | Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One example crop per compartment (pure weights), e.g. for a README figure.

    Each compartment gets its own interphase field (no mitotic cells); the crop is centred on the
    nucleus nearest the field's centre.

    Parameters
    ----------
    seed
        Seed of the gallery.
    size
        Crop side in pixels (100 = a cytoself crop).
    params
        Renderer parameters (the field is rendered at ``max(2 * size, 128)`` pixels, without mitoses).
    nuclei_bank
        Real nucleus patches; ``None`` loads the packaged ones when ``params.real_nucleus_fraction > 0``.

    Returns
    -------
    dict
        ``{compartment: (nucleus, protein)}``, ``uint16`` ``(size, size)`` arrays, in compartment order.
    """
    if not isinstance(size, int | np.integer) or size < 16:
        raise ConfigError(f"size must be an integer >= 16, got {size!r}")
    base = params or RenderParams()
    field = max(2 * int(size), 128)
    p = replace(base, size=field, z=1, mitotic_fraction=0.0)
    bank = prepare_nuclei_bank(nuclei_bank) if nuclei_bank else _load_bank(p)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for c, name in enumerate(COMPARTMENTS):
        w = np.zeros(len(COMPARTMENTS))
        w[c] = 1.0
        fov = render_fov(w, params=p, rng=_rng(seed, _STREAM_GALLERY, c), nuclei_bank=bank)
        labels = fov.nucleus_labels
        cy, cx = (field - 1) / 2.0, (field - 1) / 2.0
        best = None
        if labels.max() > 0:
            ys, xs = np.nonzero(labels)
            lab = labels[ys, xs]
            counts = np.bincount(lab)
            my = np.bincount(lab, weights=ys)[counts > 0] / counts[counts > 0]
            mx = np.bincount(lab, weights=xs)[counts > 0] / counts[counts > 0]
            k = int(np.argmin((my - cy) ** 2 + (mx - cx) ** 2))
            best = (my[k], mx[k])
        y, x = best if best is not None else (cy, cx)
        y0 = int(np.clip(round(y - size / 2), 0, field - size))
        x0 = int(np.clip(round(x - size / 2), 0, field - size))
        sl = (slice(y0, y0 + size), slice(x0, x0 + size))
        out[name] = (fov.nucleus[sl].copy(), fov.protein[sl].copy())
    return out

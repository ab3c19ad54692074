"""``protloc prepare``: fields of view -> cytoself and CELL-E crop stores (:func:`protloc.data.prepare.prepare`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = ["run_prepare"]


def run_prepare(
    fovs: str | os.PathLike,
    out: str | os.PathLike,
    *,
    sequences: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = True,
) -> dict[str, Any]:
    """Preprocess fields of view into crop stores and manifests (``protloc prepare``).

    Parameters
    ----------
    fovs
        Field-of-view table (CSV/TSV: ``fov_id``, ``protein_id``, ``path``, optional ``label``, ``sequence``).
    out
        Output folder (written atomically).
    sequences
        FASTA of the proteins (ids = ``protein_id``).
    config, overrides
        YAML file of :class:`~protloc.data.prepare.PrepareConfig` keys and ``a.b=c`` overrides
        (:func:`protloc.config.load_config`); neither: the papers' defaults.
    workers, overwrite, progress, resume
        As :func:`protloc.data.prepare.prepare`.

    Returns
    -------
    dict
        Summary counts (also written to ``summary.json``).
    """
    from protloc.config import load_config
    from protloc.data.prepare import PrepareConfig, prepare

    cfg = load_config(PrepareConfig, path=config, overrides=list(overrides))
    return prepare(
        fovs,
        out,
        config=cfg,
        sequences=sequences,
        workers=workers,
        overwrite=overwrite,
        progress=progress,
        resume=resume,
    )

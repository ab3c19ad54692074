"""``protloc embed``: cytoself encodings of every crop of a crop store (:func:`protloc.eval.embed.embed`).

- :func:`embed`: the encodings as an in-memory AnnData (the ``.h5ad`` kept when ``out`` is given);
- :func:`run_embed`: the command: the ``.h5ad`` file, resumable shard by shard.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import anndata as ad

from protloc.pretrained import DEFAULT_CYTOSELF, resolve_checkpoint

__all__ = ["embed", "run_embed"]


def run_embed(
    store: str | os.PathLike,
    out: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    split: str | None = None,
    batch_size: int = 256,
    include_local: bool = False,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    shard_size: int = 4096,
) -> Path:
    """Encode every crop of ``store`` into the ``.h5ad`` file ``out`` (``protloc embed``).

    ``obs``: ``protein_id``, ``fov_id``, ``split``, ``label``, ...; ``obsm``: ``global`` (the atlas input),
    ``global_indices`` and ``local_indices`` (for feature spectra), optionally ``local``. An interrupted
    run continues from its finished shards when called again.

    Parameters
    ----------
    store
        Crop store written by ``protloc prepare`` (``cytoself.zarr``).
    out
        Output ``.h5ad`` path (written atomically; an existing one is refused unless ``overwrite``).
    checkpoint
        A ``protloc train cytoself`` run / checkpoint folder, ``pretrained:NAME`` or ``None`` (the shipped
        ``cytoself-small``).
    split, batch_size, include_local, device, overwrite, progress, shard_size
        As :func:`protloc.eval.embed.embed`.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    from protloc.eval.embed import embed as embed_store

    return embed_store(
        resolve_checkpoint(checkpoint, default=DEFAULT_CYTOSELF),
        store,
        out,
        split=split,
        batch_size=batch_size,
        include_local=include_local,
        device=device,
        overwrite=overwrite,
        progress=progress,
        shard_size=shard_size,
    )


def embed(
    store: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    split: str | None = None,
    batch_size: int = 256,
    include_local: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> ad.AnnData:
    """cytoself encodings of a crop store's crops (``protloc embed``), as an in-memory AnnData.

    ``obs``: ``protein_id``, ``fov_id``, ``split``, ``label``, ...; ``obsm``: ``global`` (the atlas
    input), ``global_indices`` and ``local_indices`` (for feature spectra), optionally ``local``. With
    ``out`` the ``.h5ad`` is kept there (replacing an existing one); otherwise it is written to a
    temporary file and read back.

    Parameters
    ----------
    store
        Crop store written by ``protloc prepare`` (``cytoself.zarr``).
    checkpoint
        cytoself run / checkpoint folder, ``pretrained:NAME`` or ``None`` (the shipped ``cytoself-small``).
    out
        Keep the ``.h5ad`` here.
    split
        Only crops of this split (``None``: all).
    batch_size
        Crops per forward pass.
    include_local
        Also return the full local representation.
    device
        Torch device (``None``: CUDA when available).
    progress
        Show a progress bar.
    """
    options = dict(split=split, batch_size=batch_size, include_local=include_local, device=device, progress=progress)
    if out is not None:
        return ad.read_h5ad(run_embed(store, out, checkpoint=checkpoint, overwrite=True, **options))
    with tempfile.TemporaryDirectory(prefix="protloc-embed-") as tmp:
        adata = ad.read_h5ad(run_embed(store, Path(tmp) / "embeddings.h5ad", checkpoint=checkpoint, **options))
        adata = adata.to_memory() if adata.isbacked else adata
    return adata

"""Weights shipped with protloc: small models trained on the reference cell world and on Swiss-Prot.

Nine checkpoints live in ``protloc/weights/`` (installed with the package, no download):

- ``cytoself-small``: cytoself (``small`` preset, its protein-ID heads left out), the default of
  ``protloc embed`` / ``atlas`` / ``spectrum`` / ``interpret``: the atlas model of the README;
- ``cytoself-tiny``: the earlier, smaller cytoself (``tiny`` preset), kept for quick tests and as the
  benchmark's "before";
- ``vqgan-nucleus-tiny`` and ``vqgan-threshold-tiny``: CELL-E's two image tokenizers;
- ``celle-tiny``: the CELL-E transformer (``tiny`` preset) on the frozen per-residue vectors of
  ``encoder-small``, trained on the train partition of a 4,400-protein proteome world; it finds its two
  tokenizers beside it and is the default of ``predict``, ``screen`` and ``evaluate``;
- ``celle2-tiny-masked``, ``celle-tiny-onehot``, ``celle-tiny-noseq``: the same data and budget with
  masked (CELL-E 2) decoding, with one-hot residues, and without any sequence (the paper's ablations),
  shipped so that their held-out rows can be measured again (``protloc demo`` does);
- ``encoder-small``: the protein sequence encoder (``protloc localize``; the ``encoder`` embedder of
  CELL-E), trained on the Swiss-Prot corpus of ``scripts/build_protein_corpus.py``; its folder also
  holds a model card (``README.md``) and the call thresholds chosen on the human val partition.

Each folder holds ``model.safetensors`` (stored in float16 to keep the package small; loaded into the
float32 model), ``config.json`` and ``recipe.json``: the training configuration, the command that
reproduces it, the world it was trained on, its validation numbers and how far the float16 copy is from
the float32 original. They are what ``protloc demo`` uses unless asked to train, and the default
``--checkpoint`` of ``protloc predict``, ``embed``, ``fill``, ``screen``, ``evaluate`` and ``interpret``.

Anywhere a checkpoint path is accepted, ``pretrained:NAME`` names one of them.

The image models are small and were trained on a synthetic (if realistic) world: they demonstrate the
methods and make the tool usable at once. For real images, train on your own data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from protloc.errors import InputError

__all__ = [
    "DEFAULT_CYTOSELF",
    "PREFIX",
    "PRETRAINED",
    "list_pretrained",
    "pretrained_path",
    "resolve_checkpoint",
    "weights_dir",
]

#: Prefix that names a shipped checkpoint wherever a checkpoint path is accepted.
PREFIX = "pretrained:"

#: Shipped checkpoint name -> model kind.
PRETRAINED: dict[str, str] = {
    "cytoself-small": "cytoself",
    "cytoself-tiny": "cytoself",
    "vqgan-nucleus-tiny": "vqgan",
    "vqgan-threshold-tiny": "vqgan",
    "celle-tiny": "celle",
    "celle2-tiny-masked": "celle",
    "celle-tiny-onehot": "celle",
    "celle-tiny-noseq": "celle",
    "encoder-small": "encoder",
}


#: The shipped cytoself used when no checkpoint is given.
DEFAULT_CYTOSELF = "cytoself-small"


def weights_dir() -> Path:
    """The folder of the shipped checkpoints (``protloc/weights``)."""
    return Path(__file__).resolve().parent / "weights"


def pretrained_path(name: str) -> Path:
    """The checkpoint folder of a shipped model.

    Parameters
    ----------
    name
        One of :data:`PRETRAINED` (with or without the ``pretrained:`` prefix).

    Raises
    ------
    InputError
        For an unknown name, or when the package was installed without its weights.
    """
    key = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    if key not in PRETRAINED:
        raise InputError(f"no shipped model called {key!r}; shipped: {', '.join(PRETRAINED)}")
    path = weights_dir() / key
    if not (path / "model.safetensors").is_file():
        raise InputError(
            f"the shipped model {key!r} is missing from this installation (reinstall protloc from its source)",
            path=path,
        )
    return path


def resolve_checkpoint(spec: str | os.PathLike | None, *, default: str | None = None) -> Path:
    """A checkpoint path from a user's argument.

    Parameters
    ----------
    spec
        A path, ``pretrained:NAME``, or ``None`` for ``default``.
    default
        Shipped model used when ``spec`` is ``None``.

    Raises
    ------
    InputError
        When ``spec`` is ``None`` and there is no default, or a shipped name is unknown.
    """
    if spec is None:
        if default is None:
            raise InputError("no checkpoint given")
        return pretrained_path(default)
    text = os.fspath(spec)
    if text.startswith(PREFIX):
        return pretrained_path(text)
    return Path(text)


def read_recipe(name: str) -> dict[str, Any]:
    """The ``recipe.json`` of a shipped model (training config, command, world, validation numbers)."""
    path = pretrained_path(name) / "recipe.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the recipe: {exc}", path=path) from exc


def list_pretrained() -> list[dict[str, Any]]:
    """One row per shipped model: ``name``, ``kind``, ``megabytes``, ``steps``, ``trained_on`` and ``summary``."""
    rows = []
    for name, kind in PRETRAINED.items():
        path = weights_dir() / name
        weights = path / "model.safetensors"
        row: dict[str, Any] = {"name": name, "kind": kind, "available": weights.is_file()}
        if weights.is_file():
            recipe = read_recipe(name)
            row.update(
                megabytes=round(weights.stat().st_size / 2**20, 2),
                steps=recipe.get("steps"),
                trained_on=recipe.get("trained_on", {}).get("description"),
                summary=recipe.get("summary", ""),
            )
        rows.append(row)
    return rows

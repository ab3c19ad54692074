"""The inputs several commands read the same way: checkpoints, sequences, and the images a CELL-E sees.

- :func:`load_cytoself`, :func:`load_celle`: a trained model from a run / checkpoint folder,
  ``pretrained:NAME`` or ``None`` (the shipped default); :func:`resolve_device`.
- :func:`gather_sequences`: ``(name, sequence)`` records from a mapping, one string or a FASTA file.
- :func:`model_nucleus`, :func:`model_threshold`: a user's nucleus / threshold image (file or array) as
  the ``[S, S]`` crop a loaded CELL-E takes (:mod:`protloc.data.preprocess`), with where it came from.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from protloc.data.io import read_image
from protloc.data.preprocess import PrepareParams, nucleus_to_model, reference_nucleus, threshold_to_model
from protloc.data.sequences import STANDARD, read_fasta, validate_sequence
from protloc.errors import ConfigError, InputError
from protloc.pretrained import DEFAULT_CYTOSELF, resolve_checkpoint

if TYPE_CHECKING:
    from protloc.eval.load import CelleRun
    from protloc.models.cytoself import Cytoself

__all__ = [
    "ImageInput",
    "check_batch_size",
    "gather_sequences",
    "load_celle",
    "load_cytoself",
    "model_nucleus",
    "model_threshold",
    "resolve_device",
]

logger = logging.getLogger(__name__)


class ImageInput(NamedTuple):
    """An image as a CELL-E model takes it, and where it came from.

    Attributes
    ----------
    image
        ``float32 [S, S]`` in [0, 1] (a threshold image: 0 / 1).
    info
        ``source`` and how the image was cropped and scaled (:func:`model_nucleus`, :func:`model_threshold`).
    """

    image: np.ndarray
    info: dict[str, Any]


# ------------------------------------------------------------------------------------------- models
def resolve_device(device: str | None) -> str:
    """``device``, or (``None``) ``"cuda"`` when available, else ``"cpu"``."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_cytoself(checkpoint: str | os.PathLike | None = None, *, device: str = "cpu") -> Cytoself:
    """A trained cytoself model in eval mode.

    Parameters
    ----------
    checkpoint
        A ``protloc train cytoself`` run folder (``best/``, else ``last/``), a checkpoint folder,
        ``pretrained:NAME``, or ``None`` (the shipped ``cytoself-small``).
    device
        Torch device.
    """
    from protloc.eval.load import load_cytoself as load_checkpoint

    return load_checkpoint(resolve_checkpoint(checkpoint, default=DEFAULT_CYTOSELF), device=device)


def load_celle(
    checkpoint: Any = None,
    *,
    device: str | None = "cpu",
    precision: str = "fp32",
    embedder_path: str | os.PathLike | None = None,
) -> CelleRun:
    """A trained CELL-E with its tokenizers and sequence encoder (:func:`protloc.eval.load.load_celle_run`).

    Parameters
    ----------
    checkpoint
        A ``protloc train celle`` run folder (``best/``, else ``last/``), a checkpoint folder,
        ``pretrained:NAME``, ``None`` (the shipped ``celle-tiny``), or an already loaded run (returned as is).
    device
        Torch device (``None``: CUDA when available).
    precision
        ``"fp32"``, ``"bf16"`` or ``"int8"`` transformer weights (:func:`~protloc.eval.load.set_precision`).
    embedder_path
        ESM-2 / TAPE weights to use instead of the path recorded at training time (when the weights moved).

    Raises
    ------
    InputError
        A checkpoint folder that does not exist (or the errors of :func:`~protloc.eval.load.load_celle_run`).
    """
    if hasattr(checkpoint, "model") and hasattr(checkpoint, "threshold"):
        return checkpoint
    from protloc.eval.load import load_celle_run
    from protloc.models.embedders import EmbedderConfig

    ckpt = resolve_checkpoint(checkpoint, default="celle-tiny")
    if not ckpt.exists():
        raise InputError("checkpoint not found (give a `protloc train celle` run or checkpoint folder)", path=ckpt)
    embedder = EmbedderConfig(path=str(embedder_path)) if embedder_path else None
    return load_celle_run(ckpt, map_location=resolve_device(device), precision=precision, embedder=embedder)


def check_batch_size(batch_size: Any) -> int:
    """``batch_size`` if it is a positive integer.

    Raises
    ------
    ConfigError
        Anything else (a bool, a float, zero, a negative number).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


# ---------------------------------------------------------------------------------------- sequences
def gather_sequences(
    sequences: Mapping[str, str] | str | None,
    fasta: str | os.PathLike | None = None,
    *,
    check: Callable[[str, str], Any] | None = None,
    warn_unknown: bool = True,
) -> list[tuple[str, str]]:
    """``(name, sequence)`` records from a mapping / one string or from a FASTA file (exactly one).

    Parameters
    ----------
    sequences
        ``name -> sequence``, or one sequence (named ``query``).
    fasta
        FASTA file; record ids name the sequences.
    check
        ``check(sequence, name)`` raises on a bad sequence; ``None``: validate them as amino-acid
        sequences (:func:`~protloc.data.sequences.validate_sequence`, which also normalises them).
    warn_unknown
        Log a warning for a sequence without any standard residue (only ``X`` and the like): allowed, but its
        prediction reflects no sequence information.

    Raises
    ------
    InputError
        Both or neither of ``sequences`` and ``fasta``, a missing or empty FASTA file, no sequences,
        an invalid residue (naming the sequence).
    """
    if (sequences is None) == (fasta is None):
        raise InputError("give either sequences or a FASTA file (exactly one)")
    if fasta is not None:
        path = Path(fasta)
        if not path.is_file():
            raise InputError("FASTA file not found", path=path)
        records = list(read_fasta(path, validate=check is None).items())
        if not records:
            raise InputError("the FASTA file holds no sequences", path=path)
    else:
        if isinstance(sequences, str):
            sequences = {"query": sequences}
        assert sequences is not None
        records = [
            (str(name), seq if check is not None else validate_sequence(seq, name=str(name)))
            for name, seq in sequences.items()
        ]
        if not records:
            raise InputError("no sequences to predict")
    if check is not None:
        for name, seq in records:
            check(seq, name)
    else:
        for name, seq in records:
            if warn_unknown and seq and not set(seq) & set(STANDARD):
                # Allowed (a user may probe the model with it), but the prediction then reflects no sequence.
                logger.warning(
                    "sequence %r has no standard residue (only %s): its prediction reflects no sequence information",
                    name,
                    "".join(sorted(set(seq))),
                )
    return records


# ------------------------------------------------------------------------------------------- images
def _default_celle_crop() -> int:
    """The CELL-E crop side of ``protloc prepare`` (the paper's 256 px)."""
    return int(PrepareParams().celle_size)


def model_nucleus(run: CelleRun, nucleus: str | os.PathLike | np.ndarray | ImageInput | None) -> ImageInput:
    """The ``[S, S]`` nucleus input of ``run`` and a description of its source.

    Parameters
    ----------
    run
        A loaded CELL-E (its image size and training crop size are used).
    nucleus
        A 2-D grey image file (TIFF / PNG / NPY) or array, at least the model's image size on each side:
        its largest centred square is min-max scaled to [0, 1] and area-averaged to the model's size
        (:func:`~protloc.data.preprocess.nucleus_to_model`). ``None``: the reference nucleus
        (:func:`~protloc.data.preprocess.reference_nucleus`) centred in a field as wide as the run's
        training crops (``data.crop_size``, else the paper's 256 px). An :class:`ImageInput` is returned
        as is.

    Returns
    -------
    ImageInput
        The image and ``info``: ``source`` and the crop (a given image) or the reference geometry.
    """
    if isinstance(nucleus, ImageInput):
        return nucleus
    size = run.image_size
    if nucleus is None:
        field = int(run.extra.get("crop_size") or 0) or _default_celle_crop()
        return ImageInput(*reference_nucleus(size, field))
    if isinstance(nucleus, np.ndarray):
        source, raw = "nucleus array", nucleus
    else:
        source = str(nucleus)
        raw = read_image(nucleus)
    nuc, info = nucleus_to_model(raw, size, source=source)
    return ImageInput(nuc, {"source": source, **info})


def model_threshold(run: CelleRun, threshold: str | os.PathLike | np.ndarray | ImageInput) -> ImageInput:
    """The binary ``[S, S]`` threshold-image input of ``run`` (:func:`~protloc.data.preprocess.threshold_to_model`).

    Parameters
    ----------
    run
        A loaded CELL-E.
    threshold
        A 2-D protein-threshold image file or array (an :class:`ImageInput` is returned as is).

    Returns
    -------
    ImageInput
        The image and ``info``: ``source`` (the path, or ``"threshold array"``).

    Raises
    ------
    InputError
        A missing file, or the errors of :func:`~protloc.data.preprocess.threshold_to_model`.
    """
    if isinstance(threshold, ImageInput):
        return threshold
    if isinstance(threshold, np.ndarray):
        source, raw = "threshold array", threshold
    else:
        source = str(threshold)
        if not Path(threshold).is_file():
            raise InputError("threshold image not found", path=threshold)
        raw = read_image(threshold)
    return ImageInput(threshold_to_model(raw, run.image_size, source=source), {"source": source})

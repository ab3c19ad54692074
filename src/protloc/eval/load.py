"""Loading trained runs for inference: cytoself, the VQGAN tokenizers and CELL-E.

Every command that uses a trained model loads it here; nothing here imports :mod:`protloc.train`.
A run folder of ``protloc train`` (its ``best/``, else ``last/``) or a checkpoint folder is accepted
everywhere (:func:`protloc.models.checkpoint.find_checkpoint`), loaded strictly and put in eval mode.

- :func:`load_cytoself` / :func:`load_cytoself_for_inference`: the cytoself VQ-VAE-2.
- :func:`load_tokenizer`: a frozen VQGAN tokenizer, checked against the SHA-256 a CELL-E run recorded.
- :func:`load_celle_run`: a CELL-E transformer with both tokenizers and its sequence encoder
  (:class:`CelleRun`), in a prediction precision (:func:`set_precision`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from protloc.errors import ConfigError, InputError
from protloc.models.celle import Celle, CelleConfig
from protloc.models.checkpoint import MODEL_FILE, find_checkpoint, load_checkpoint
from protloc.models.cytoself import Cytoself, CytoselfConfig
from protloc.models.embedders import EmbedderConfig, SequenceEncoder
from protloc.models.vqgan import VQGAN, VQGANConfig

__all__ = [
    "PRECISIONS",
    "CelleRun",
    "load_celle_run",
    "load_cytoself",
    "load_cytoself_for_inference",
    "load_tokenizer",
    "set_precision",
]


def load_cytoself(checkpoint: str | os.PathLike, *, device: str | torch.device = "cpu") -> Cytoself:
    """Load a trained cytoself model (strictly) and put it in eval mode.

    Parameters
    ----------
    checkpoint
        A checkpoint folder (``model.safetensors`` + ``config.json``) or a run folder holding
        ``best/`` (preferred) or ``last/``.
    device
        Torch device.
    """
    path = find_checkpoint(checkpoint, what="cytoself")
    model, _, _ = load_checkpoint(path, model_cls=Cytoself, config_cls=CytoselfConfig, map_location="cpu")
    return model.to(device).eval()


def load_cytoself_for_inference(checkpoint: str | os.PathLike, *, device: str | torch.device = "cpu") -> Cytoself:
    """:func:`load_cytoself` with BatchNorm folded into the convolutions (eval only, ~1.3x faster on CPU)."""
    return load_cytoself(checkpoint, device=device).fuse_for_inference()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_tokenizer(
    path: str | os.PathLike,
    kind: Literal["nucleus", "threshold"],
    *,
    sha256: str | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[VQGAN, Path, str]:
    """Load a frozen VQGAN tokenizer.

    Parameters
    ----------
    path
        A ``protloc train vqgan`` run folder (``best/``, else ``last/``) or a checkpoint folder.
    kind
        ``"nucleus"`` or ``"threshold"``; must match the kind the checkpoint was trained as (when recorded).
    sha256
        Expected SHA-256 of its ``model.safetensors`` (a CELL-E run records it); a mismatch is an error.
    map_location
        Device of the weights.

    Returns
    -------
    model
        The VQGAN in eval mode with ``requires_grad`` off.
    checkpoint
        The checkpoint folder used.
    digest
        SHA-256 of its weights file.

    Raises
    ------
    InputError
        If no checkpoint is found, it is a different kind, or its weights changed.
    """
    if not str(path):
        raise ConfigError(f"tokenizers.{kind} is not set: give the {kind} VQGAN run of `protloc train vqgan`")
    ckpt = find_checkpoint(path, what=f"{kind} VQGAN")
    digest = _sha256(ckpt / MODEL_FILE)
    if sha256 is not None and digest != sha256:
        raise InputError(
            f"the {kind} tokenizer's weights changed since the CELL-E model was trained with them "
            f"(SHA-256 {digest[:12]}..., recorded {sha256[:12]}...)",
            path=ckpt,
        )
    model, _, extra = load_checkpoint(ckpt, model_cls=VQGAN, config_cls=VQGANConfig, map_location=map_location)
    trained_as = extra.get("kind")
    if trained_as is not None and trained_as != kind:
        raise InputError(f"this VQGAN was trained as the {trained_as!r} tokenizer, not the {kind!r} one", path=ckpt)
    model.requires_grad_(False)
    return model.eval(), ckpt, digest


@dataclass
class CelleRun:
    """A trained CELL-E with everything needed to use it (see :func:`load_celle_run`).

    Attributes
    ----------
    model
        The transformer, eval mode.
    nucleus, threshold
        The frozen VQGAN tokenizers it was trained with.
    encoder
        The sequence encoder (embedder + cache) of the run.
    checkpoint
        The checkpoint folder loaded.
    extra
        The checkpoint's metadata (image size, tokenizer paths and hashes, step, validation record).
    """

    model: Celle
    nucleus: VQGAN
    threshold: VQGAN
    encoder: SequenceEncoder
    checkpoint: Path
    extra: dict[str, Any]

    @property
    def image_size(self) -> int:
        """Side of the images the tokenizers take."""
        return int(self.extra["image_size"])


#: Weight precisions of a loaded CELL-E for prediction (:func:`load_celle_run`, :func:`set_precision`):
#: the floating dtype of the model; ``int8`` adds int8 weights in the transformer blocks' linear layers.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16}


def set_precision(model: Celle, precision: str) -> Celle:
    """Put a CELL-E in a prediction precision, in place.

    ``"fp32"``: as trained. ``"bf16"``: every weight (and so the KV cache) in bfloat16. ``"int8"``: bf16,
    with the transformer blocks' linear layers holding int8 weights and per-channel scales
    (:class:`protloc.nn.int8.Int8Linear`; a decoding step reads a quarter of the fp32 bytes). For
    inference only: the reduced precisions cannot be trained or saved as checkpoints.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    model.to(PRECISIONS[precision])
    if precision == "int8":
        from protloc.nn.int8 import quantize_linears

        quantize_linears(model.blocks)
    return model


def _tokenizer_path(recorded: str, ckpt: Path) -> Path:
    """A recorded tokenizer path; a relative one is relative to the CELL-E checkpoint folder.

    Training records absolute paths; relative ones let a model travel with its tokenizers (the shipped
    ``celle-tiny`` finds ``../vqgan-nucleus-tiny`` beside it).
    """
    path = Path(recorded)
    return path if path.is_absolute() else ckpt / path


def load_celle_run(
    path: str | os.PathLike,
    *,
    embedder: EmbedderConfig | None = None,
    map_location: str | torch.device = "cpu",
    precision: str = "fp32",
) -> CelleRun:
    """Load a trained CELL-E (``best/`` of a run folder, else ``last/``, or a checkpoint folder).

    The tokenizers are loaded from the paths recorded at training time (a relative one from the
    checkpoint folder) and checked against the recorded SHA-256 of their weights.

    Parameters
    ----------
    path
        A ``protloc train celle`` run folder or one of its checkpoint folders.
    embedder
        Embedder weights / cache (default: the path recorded in the run, in-memory cache).
    map_location
        Device.
    precision
        ``"fp32"`` (as trained), ``"bf16"`` or ``"int8"`` (:func:`set_precision`): faster prediction on
        CPUs with AVX512-BF16 and on GPUs, with token probabilities close to fp32
        (``benchmarks/celle_speed.py`` measures the speed and the difference). The tokenizers stay in fp32.

    Raises
    ------
    InputError
        If the checkpoint or a tokenizer is missing or changed.
    """
    ckpt = find_checkpoint(path, what="CELL-E")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    model, config, extra = load_checkpoint(ckpt, model_cls=Celle, config_cls=CelleConfig, map_location=map_location)
    set_precision(model, precision)
    tok = extra.get("tokenizers")
    if not isinstance(tok, dict):
        raise InputError("the checkpoint records no tokenizers (not a `protloc train celle` run?)", path=ckpt)
    nucleus, _, _ = load_tokenizer(
        _tokenizer_path(tok["nucleus"], ckpt), "nucleus", sha256=tok.get("nucleus_sha256"), map_location=map_location
    )
    threshold, _, _ = load_tokenizer(
        _tokenizer_path(tok["threshold"], ckpt),
        "threshold",
        sha256=tok.get("threshold_sha256"),
        map_location=map_location,
    )
    emb = embedder or EmbedderConfig(path=str(extra.get("embedder_path") or ""))
    encoder = SequenceEncoder(config, emb, device=map_location, blank=extra.get("text") == "none")
    return CelleRun(model=model, nucleus=nucleus, threshold=threshold, encoder=encoder, checkpoint=ckpt, extra=extra)

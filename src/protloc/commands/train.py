"""``protloc train``: the training configuration of a model, built once for the command line and the API,
and the run (:mod:`protloc.train.cytoself`, :mod:`protloc.train.vqgan`, :mod:`protloc.train.celle`,
:mod:`protloc.train.encoder`).

- :func:`train_config`: preset, then a YAML file, then ``a.b=c`` overrides, then the named options;
- :func:`run_train`: train with a configuration into a run folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protloc.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["MODELS", "PRESETS", "run_train", "train_config"]

#: The models ``protloc train`` trains.
MODELS = ("cytoself", "vqgan", "celle", "encoder")
#: The starting configurations: the quick one the shipped weights came from, and the papers'.
PRESETS = ("tiny", "paper")
#: Models whose presets differ from :data:`PRESETS` (the protein encoder: ``tiny`` and the shipped ``small``;
#: cytoself adds ``small``, the CPU recipe of the shipped ``cytoself-small``).
MODEL_PRESETS = {"encoder": ("tiny", "small"), "cytoself": ("tiny", "small", "paper")}


def _config_class(model: str) -> Any:
    if model == "cytoself":
        from protloc.train.cytoself import TrainCytoselfConfig

        return TrainCytoselfConfig
    if model == "vqgan":
        from protloc.train.vqgan import TrainVQGANConfig

        return TrainVQGANConfig
    if model == "celle":
        from protloc.train.celle import TrainCelleConfig

        return TrainCelleConfig
    if model == "encoder":
        from protloc.train.encoder import EncoderTrainConfig

        return EncoderTrainConfig
    raise ConfigError(f"model must be 'cytoself', 'vqgan', 'celle' or 'encoder', got {model!r}")


def train_config(
    model: str,
    *,
    out: str | os.PathLike,
    store: str | os.PathLike | None = None,
    preset: str = "tiny",
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    kind: str | None = None,
    corpus: str | os.PathLike | None = None,
    sequences: str | os.PathLike | None = None,
    nucleus_vqgan: str | os.PathLike | None = None,
    threshold_vqgan: str | os.PathLike | None = None,
    resume: bool = False,
) -> Any:
    """The training configuration of ``protloc train MODEL`` (and :func:`protloc.api.train`).

    The ``preset``, then the YAML ``config`` -- or, when resuming without one, the run's own
    ``out/config.yaml``, so that a resume needs no other option -- then the ``a.b=c`` ``overrides``, then
    the named options (``store`` is ``data.store``; ``kind`` of a VQGAN; ``sequences`` and the two
    tokenizers of CELL-E), which win over an override of the same key.

    Parameters
    ----------
    model
        ``"cytoself"``, ``"vqgan"``, ``"celle"`` or ``"encoder"``.
    out
        The run folder (read for ``config.yaml`` when resuming).
    store
        The crop store (``data.store``); ``None`` keeps the configured one.
    preset
        ``"tiny"`` or ``"paper"`` (the encoder: ``"tiny"`` or ``"small"``).
    config
        YAML file of configuration keys.
    overrides
        ``a.b=c`` settings.
    kind
        VQGAN only: ``"nucleus"`` or ``"threshold"`` (``kind``); ``None`` keeps the configured one.
    corpus
        Encoder only: ``data.corpus`` (``corpus.tsv.gz`` of ``scripts/build_protein_corpus.py``).
    sequences, nucleus_vqgan, threshold_vqgan
        CELL-E only: ``data.sequences``, ``tokenizers.nucleus`` and ``tokenizers.threshold``.
    resume
        The run will continue from ``out/last``.

    Returns
    -------
    TrainCytoselfConfig, TrainVQGANConfig, TrainCelleConfig or EncoderTrainConfig

    Raises
    ------
    ConfigError
        An unknown model or preset, an unknown or invalid key.
    """
    from protloc.config import load_config

    cls = _config_class(model)
    presets = MODEL_PRESETS.get(model, PRESETS)
    if preset not in presets:
        raise ConfigError(f"preset must be {' or '.join(map(repr, presets))}, got {preset!r}")
    named: list[tuple[str, Any]] = [] if model == "encoder" else [("data.store", store)]
    if model == "encoder":
        named.append(("data.corpus", corpus))
    elif model == "vqgan":
        named.append(("kind", kind))
    elif model == "celle":
        named += [
            ("data.sequences", sequences),
            ("tokenizers.nucleus", nucleus_vqgan),
            ("tokenizers.threshold", threshold_vqgan),
        ]
    settings = [*overrides, *(f"{key}={value}" for key, value in named if value is not None)]
    path = config
    saved = Path(out) / "config.yaml"
    if path is None and resume and saved.is_file():
        logger.info("resuming with %s", saved)
        path = saved
    base = getattr(cls, preset)()
    return load_config(cls, base=base, path=path, overrides=settings)


def run_train(cfg: Any, *, out: str | os.PathLike, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train with ``cfg`` (from :func:`train_config`) into the run folder ``out``.

    The run folder gets ``config.yaml``, ``metrics.jsonl``, ``best/`` and ``last/``. ``resume``
    continues from ``out/last``. Under ``accelerate launch`` the same call trains on every process.

    Parameters
    ----------
    cfg
        A ``TrainCytoselfConfig``, ``TrainVQGANConfig``, ``TrainCelleConfig`` or ``EncoderTrainConfig``.
    out
        Run folder.
    resume
        Continue from ``out/last``.
    progress
        Show progress bars.

    Returns
    -------
    dict
        The trainer's summary (steps, last validation, ...).
    """
    from protloc.train.celle import TrainCelleConfig, train_celle
    from protloc.train.cytoself import TrainCytoselfConfig, train_cytoself
    from protloc.train.encoder import EncoderTrainConfig, train_encoder
    from protloc.train.vqgan import TrainVQGANConfig, train_vqgan

    trainers = {
        TrainCytoselfConfig: train_cytoself,
        TrainVQGANConfig: train_vqgan,
        TrainCelleConfig: train_celle,
        EncoderTrainConfig: train_encoder,
    }
    trainer = trainers.get(type(cfg))
    if trainer is None:
        raise ConfigError(f"not a training configuration: {type(cfg).__name__}")
    return trainer(cfg, run_dir=out, resume=resume, progress=progress)

"""Checkpoints: ``model.safetensors`` + ``config.json`` (+ ``trainer_state.pt``), written atomically.

A checkpoint is a folder::

    model.safetensors   the model's state dict (wrapper prefixes stripped, contiguous CPU tensors)
    config.json         the model config (``protloc.config.config_to_dict``) plus "model_type",
                        "protloc_version" and "extra" (e.g. the label map)
    trainer_state.pt    optimizer, schedule, step, epoch, RNG states; only plain containers and
                        tensors, so it loads with ``torch.load(weights_only=True)``

Every file is written to a temporary name and the whole folder is built beside the destination and
swapped in at the end (:func:`protloc._fs.atomic_dir`): a crash while saving leaves the previous
checkpoint as it was. Loading is strict: a missing or unexpected key, or a shape mismatch, is an
error that names the checkpoint and the keys (the reference's non-strict loads silently left layers
at their random initialisation). Weights must be finite both ways: saving NaN / Inf weights raises
:class:`~protloc.errors.NonFiniteError` (nothing is written), loading them an
:class:`~protloc.errors.InputError` naming the tensors (:func:`nonfinite_tensors`, one pass).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from protloc import __version__
from protloc._fs import atomic_dir, atomic_path
from protloc.config import config_from_dict, config_to_dict
from protloc.errors import ConfigError, InputError, NonFiniteError

__all__ = [
    "CONFIG_FILE",
    "MODEL_FILE",
    "TRAINER_FILE",
    "capture_rng_state",
    "describe_nonfinite",
    "find_checkpoint",
    "load_checkpoint",
    "load_checkpoint_config",
    "load_model_weights",
    "load_trainer_state",
    "nonfinite_tensors",
    "restore_rng_state",
    "save_checkpoint",
    "unwrap_model",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINER_FILE = "trainer_state.pt"
_RESERVED = ("model_type", "protloc_version", "extra")
# torch.compile, DataParallel / DistributedDataParallel and Accelerate wrap the model and prefix
# its state-dict keys with these.
_PREFIXES = ("_orig_mod.", "module.")
_MAX_KEYS_SHOWN = 5

M = TypeVar("M", bound=nn.Module)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip ``torch.compile`` / (Distributed)DataParallel wrappers (``_orig_mod`` / ``module``)."""
    seen = 0
    while seen < 8:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner
        seen += 1
    return model


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def model_type_of(cls: type) -> str:
    """The ``model_type`` recorded for a model class (its ``model_type`` attribute, else its name)."""
    value = getattr(cls, "model_type", None)
    return value if isinstance(value, str) and value else cls.__name__


def _state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, tensor in unwrap_model(model).state_dict().items():
        name = _strip_prefixes(key)
        if name in out:
            raise RuntimeError(f"two state-dict entries map to {name!r} after stripping wrapper prefixes")
        t = tensor.detach().to("cpu")
        # safetensors refuses tensors that share memory (tied weights, views of one buffer); a copy
        # of each such tensor keeps every key, so the checkpoint still loads strictly.
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        shared = ptr in storages or storage.nbytes() != t.numel() * t.element_size()
        if t.numel() and (shared or not t.is_contiguous()):
            t = t.clone(memory_format=torch.contiguous_format)
        if t.numel():
            storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, int, int]]:
    """The floating-point tensors holding NaN or Inf: ``(name, non-finite values, values)`` in order.

    One pass over the values: NumPy's ``isfinite`` for CPU tensors (several times faster than torch's
    per-tensor ops on small CPU tensors); on an accelerator one fused max-norm per dtype and a single
    host synchronisation (:func:`_finite_fused`). Values are counted only for offending tensors.
    Integer tensors are skipped.
    """
    names = [k for k, t in tensors.items() if t.numel() and (t.is_floating_point() or t.is_complex())]
    cpu = [k for k in names if tensors[k].device.type == "cpu"]
    other = [k for k in names if tensors[k].device.type != "cpu"]
    bad = set()
    for k in cpu:
        t = tensors[k].detach()
        if t.dtype not in (torch.float16, torch.float32, torch.float64) and not t.is_complex():
            t = t.float()  # bfloat16 and other types NumPy lacks
        if not np.isfinite(t.resolve_conj().numpy()).all():
            bad.add(k)
    if other:
        fine = _finite_fused([tensors[k].detach() for k in other])
        bad.update(k for k, ok in zip(other, fine, strict=True) if not ok)
    return [(k, int((~torch.isfinite(tensors[k])).sum()), tensors[k].numel()) for k in names if k in bad]


def _finite_fused(tensors: list[torch.Tensor]) -> list[bool]:
    """Whether each tensor is finite: one fused max-norm per dtype, one host synchronisation in all.

    The max of ``|x|`` is NaN / Inf exactly when some value is (it never overflows); this is the
    accelerator path of :func:`nonfinite_tensors`, which runs it on any device.
    """
    if not tensors:
        return []
    order, norms = [], []
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        order += group
        norms += [n.float().reshape(()) for n in torch._foreach_norm([tensors[i] for i in group], float("inf"))]
    flags = torch.isfinite(torch.stack(norms)).tolist()
    out = [True] * len(tensors)
    for i, ok in zip(order, flags, strict=True):
        out[i] = ok
    return out


def describe_nonfinite(bad: list[tuple[str, int, int]]) -> str:
    """``bad`` of :func:`nonfinite_tensors` in words: the first tensors and their non-finite counts."""
    shown = [f"{name} ({n} of {total} values)" for name, n, total in bad]
    return f"{len(bad)} tensor(s) hold NaN or Inf: {_show(shown)}"


# --------------------------------------------------------------------------------------------------
# RNG states as plain containers (weights_only-loadable)
# --------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU and CUDA) RNG states, as tensors, lists and scalars only."""
    py_version, py_internal, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": int(py_version), "internal": list(py_internal), "gauss_next": py_gauss},
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNG states captured by :func:`capture_rng_state` (missing parts are skipped)."""
    if "python" in state:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(v) for v in py["internal"]), py["gauss_next"]))
    if "numpy" in state:
        npy = state["numpy"]
        key = npy["key"].numpy() if isinstance(npy["key"], torch.Tensor) else np.asarray(npy["key"])
        np.random.set_state(
            (npy["bit_generator"], key.astype(np.uint32), int(npy["pos"]), int(npy["has_gauss"]), float(npy["gauss"]))
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            logger.warning(
                "checkpoint has CUDA RNG states for %d devices, this machine has %d; not restoring them",
                len(cuda),
                torch.cuda.device_count(),
            )


# --------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    model: nn.Module,
    config: Any,
    trainer_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (replacing an existing one only once complete).

    Parameters
    ----------
    directory
        The checkpoint folder, e.g. ``run/last``.
    model
        The model (compiled / DDP / Accelerate wrappers are unwrapped; key prefixes stripped).
    config
        The model's dataclass config, written to ``config.json``.
    trainer_state
        Optimizer / schedule / step state for resuming (plain containers and tensors only), written
        to ``trainer_state.pt``; the current RNG states are added as ``"rng"`` unless present.
        ``None`` writes no trainer state (e.g. a ``best/`` checkpoint for inference).
    extra
        JSON-serialisable metadata stored in ``config.json`` under ``"extra"`` (e.g. the label map).

    Returns
    -------
    pathlib.Path
        ``directory``.

    Raises
    ------
    NonFiniteError
        If a weight is NaN or infinite (nothing is written; an existing ``directory`` stays as it was).
    """
    from safetensors.torch import save_file

    dest = Path(directory)
    base = unwrap_model(model)
    cfg_dict = config_to_dict(config)
    if not isinstance(cfg_dict, dict):
        raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}")
    clash = [k for k in _RESERVED if k in cfg_dict]
    if clash:
        raise ValueError(f"config fields {clash} clash with the checkpoint's reserved keys")
    meta = {
        **cfg_dict,
        "model_type": model_type_of(type(base)),
        "protloc_version": __version__,
        "extra": dict(extra) if extra is not None else {},
    }
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=False) + "\n"
    except TypeError as exc:
        raise TypeError(f"checkpoint config / extra must be JSON-serialisable: {exc}") from exc
    tensors = _state_for_saving(base)
    bad = nonfinite_tensors(tensors)
    if bad:
        raise NonFiniteError(f"{dest}: refusing to save non-finite weights, {describe_nonfinite(bad)}")
    state = None
    if trainer_state is not None:
        state = dict(trainer_state)
        state.setdefault("rng", capture_rng_state())
    with atomic_dir(dest) as tmp:
        with atomic_path(tmp / MODEL_FILE) as f:
            save_file(tensors, str(f), metadata={"format": "pt", "model_type": meta["model_type"]})
        with atomic_path(tmp / CONFIG_FILE) as f:
            f.write_text(meta_text, encoding="utf-8")
        if state is not None:
            with atomic_path(tmp / TRAINER_FILE) as f:
                torch.save(state, f)
    logger.debug("saved checkpoint %s (%d tensors)", dest, len(tensors))
    return dest


def find_checkpoint(path: str | os.PathLike, *, what: str = "model") -> Path:
    """The checkpoint folder of a run: ``path`` itself, else its ``best/``, else its ``last/``.

    Every loader of a trained model (cytoself, the VQGAN tokenizers, CELL-E) accepts either a run folder
    of ``protloc train`` or one of its checkpoint folders; this is the one place that decides which.

    Parameters
    ----------
    path
        A checkpoint folder (holding ``model.safetensors``) or a run folder holding ``best/`` or ``last/``.
    what
        What is looked for, for the error message (e.g. ``"VQGAN"``).

    Raises
    ------
    InputError
        If neither ``path`` nor its ``best/`` or ``last/`` holds ``model.safetensors``.
    """
    p = Path(path)
    if (p / MODEL_FILE).is_file():
        return p
    for sub in ("best", "last"):
        if (p / sub / MODEL_FILE).is_file():
            return p / sub
    raise InputError(f"no {what} checkpoint ({MODEL_FILE}) here, nor in best/ or last/", path=p)


def _read_meta(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise InputError("checkpoint folder not found", path=directory)
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file():
        raise InputError(f"not a protloc checkpoint: {CONFIG_FILE} is missing", path=directory)
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"invalid JSON ({exc})", path=cfg_path) from exc
    if not isinstance(meta, dict):
        raise InputError("expected a JSON object", path=cfg_path)
    return meta


def _load_tensors(directory: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / MODEL_FILE
    if not path.is_file():
        raise InputError(f"not a protloc checkpoint: {MODEL_FILE} is missing", path=directory)
    try:
        tensors = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"cannot read the weights, the file is corrupt or truncated ({exc})", path=path) from exc
    return {_strip_prefixes(k): v for k, v in tensors.items()}


def _show(keys: list[str]) -> str:
    head = ", ".join(keys[:_MAX_KEYS_SHOWN])
    more = f" and {len(keys) - _MAX_KEYS_SHOWN} more" if len(keys) > _MAX_KEYS_SHOWN else ""
    return head + more


def load_model_weights(directory: str | os.PathLike, model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Load a checkpoint's ``model.safetensors`` into an existing model (in place).

    Parameters
    ----------
    directory
        The checkpoint folder.
    model
        The model to fill (wrappers are unwrapped).
    strict
        Refuse missing or unexpected keys. Shape mismatches are always refused.

    Returns
    -------
    torch.nn.Module
        ``model``.

    Raises
    ------
    InputError
        On a missing / unexpected key (``strict``) or a shape mismatch, naming the checkpoint and the
        first offending keys; or if a tensor holds NaN or Inf, naming the first such tensors.
    """
    src = Path(directory)
    base = unwrap_model(model)
    device = next((p.device for p in base.parameters()), torch.device("cpu"))
    tensors = _load_tensors(src, device)
    expected = {_strip_prefixes(k): v for k, v in base.state_dict().items()}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    mismatched = [
        f"{k} (checkpoint {list(tensors[k].shape)}, model {list(v.shape)})"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch for {_show(mismatched)}")
    if strict and missing:
        problems.append(f"missing keys {_show(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys {_show(unexpected)}")
    if problems:
        raise InputError(
            f"checkpoint does not fit the model {type(base).__name__}: {'; '.join(problems)}",
            path=src / MODEL_FILE,
        )
    bad = nonfinite_tensors(tensors)
    if bad:
        raise InputError(
            f"the checkpoint's weights are not finite, {describe_nonfinite(bad)}; "
            "use an earlier checkpoint or train again",
            path=src,
        )
    if missing or unexpected:
        logger.warning(
            "%s: non-strict load; %d missing key(s) (%s), %d unexpected key(s) (%s)",
            src,
            len(missing),
            _show(missing),
            len(unexpected),
            _show(unexpected),
        )
    # The state dict may have been taken through a wrapper; load into the bare module by bare names.
    base.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=strict)
    return model


def load_checkpoint_config(
    directory: str | os.PathLike, *, config_cls: type, model_cls: type | None = None
) -> tuple[Any, dict[str, Any]]:
    """Read a checkpoint's config and extra metadata without loading the weights.

    Parameters
    ----------
    directory
        The checkpoint folder.
    config_cls
        The config dataclass to build.
    model_cls
        If given, the checkpoint's ``model_type`` must be this class's.

    Returns
    -------
    config
        The ``config_cls`` instance.
    extra
        The ``extra`` metadata.

    Raises
    ------
    InputError
        If ``config.json`` is missing or invalid, or the model type or config does not fit.
    """
    src = Path(directory)
    meta = _read_meta(src)
    if model_cls is not None:
        found, wanted = meta.get("model_type"), model_type_of(model_cls)
        if found != wanted:
            raise InputError(f"checkpoint holds a {found!r} model, not a {wanted!r}", path=src / CONFIG_FILE)
    cfg_data = {k: v for k, v in meta.items() if k not in _RESERVED}
    try:
        config = config_from_dict(config_cls, cfg_data)
    except ConfigError as exc:
        raise InputError(f"config does not fit {config_cls.__name__}: {exc}", path=src / CONFIG_FILE) from exc
    saved_version = meta.get("protloc_version")
    if saved_version != __version__:
        logger.info("%s was written by protloc %s (this is %s)", src, saved_version, __version__)
    return config, dict(meta.get("extra") or {})


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    model_cls: type[M],
    config_cls: type,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
) -> tuple[M, Any, dict[str, Any]]:
    """Build a model from a checkpoint folder.

    Parameters
    ----------
    directory
        The checkpoint folder.
    model_cls
        The model class; must match the checkpoint's ``model_type``. Built as ``model_cls(config)``.
    config_cls
        The model's config dataclass.
    map_location
        Device for the weights (the model is moved there).
    strict
        Refuse missing or unexpected keys (shape mismatches are always refused).

    Returns
    -------
    model
        The model with the checkpoint's weights, in eval mode.
    config
        The ``config_cls`` instance read from ``config.json``.
    extra
        The ``extra`` metadata saved with it (e.g. ``{"label_map": ...}``).

    Raises
    ------
    InputError
        If files are missing or corrupt, the ``model_type`` differs, the config does not parse, or
        the weights do not fit the model or are not finite.
    """
    src = Path(directory)
    config, extra = load_checkpoint_config(src, config_cls=config_cls, model_cls=model_cls)
    model = model_cls(config)
    model.to(map_location)
    load_model_weights(src, model, strict=strict)
    model.eval()
    return model, config, extra


def load_trainer_state(directory: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read ``trainer_state.pt`` safely (``torch.load(weights_only=True)``: no code is unpickled).

    Raises
    ------
    InputError
        If the file is missing or cannot be read.
    """
    path = Path(directory) / TRAINER_FILE
    if not path.is_file():
        raise InputError(f"{TRAINER_FILE} is missing (a checkpoint saved without trainer state?)", path=path.parent)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling raises many types (UnpicklingError, RuntimeError, EOFError)
        raise InputError(f"cannot read the trainer state ({exc})", path=path) from exc
    if not isinstance(state, dict):
        raise InputError("the trainer state is not a dict", path=path)
    return state

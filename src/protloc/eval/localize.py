"""Localization from sequence alone with the protein encoder, and which residues drive it.

The computation behind ``protloc localize`` (:mod:`protloc.commands.localize`), on a trained
:class:`~protloc.models.encoder.ProteinEncoder`:

- :func:`load_encoder` / :func:`encoder_info`: a checkpoint folder, a ``protloc train encoder`` run folder
  (``best/``, else ``last/``) or ``pretrained:NAME``, loaded strictly in eval mode; its name, the SHA-256 of
  its weights and the per-output decision thresholds it carries (:func:`checkpoint_thresholds`).
- :func:`encoder_outputs`, :func:`presence_probabilities`, :func:`distribution_probabilities`: batched
  inference (sequences sorted by length so a batch holds similar lengths and little padding; results in
  input order). ``presence`` holds 13 independent probabilities (sigmoid): the 12 compartments of
  :data:`~protloc.data.world.compartments.COMPARTMENTS` then ``nucleus``
  (:data:`~protloc.data.proteome.PRESENCE_NAMES`); ``distribution`` is a softmax over the 12 compartments.
- :func:`integrated_gradients` / :func:`residue_importance`: per-residue importance of a presence logit
  by integrated gradients (Sundararajan et al. 2017) with respect to the token embeddings, summed over the
  embedding dimensions (a signed score per residue: positive pushes the logit up).
- :func:`peak_window`: the window of residues with the largest summed importance.
- :func:`construct_report`: the engineered GFP / NLS / TOP1 constructs shipped with the reference world,
  their nuclear probability and where the nucleus importance peaks.

Sequences longer than the encoder's ``max_residues`` (1000) are shortened as DeepLoc does
(:func:`~protloc.data.sequences.clip_residues`: the first 500 and the last 500 residues). Importance
tracks are always indexed by the position in the *original* sequence (:func:`clipped_positions`): the
clipped middle, which the model never saw, holds NaN.

Examples
--------
>>> import numpy as np
>>> peak_window(np.array([0.0, 0.1, 0.9, 1.2, 0.8, -0.2, 0.0]), width=3)
Peak(start=3, end=5, score=2.9)
>>> clipped_positions(6, max_residues=4).tolist()
[1, 2, 5, 6]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from protloc.data.proteome import PRESENCE_NAMES
from protloc.data.sequences import Tokenizer, clip_residues, validate_sequence
from protloc.data.world.compartments import COMPARTMENTS
from protloc.errors import ConfigError, InputError
from protloc.models.checkpoint import CONFIG_FILE, MODEL_FILE, find_checkpoint, load_checkpoint
from protloc.models.encoder import EncoderConfig, ProteinEncoder
from protloc.pretrained import PREFIX, resolve_checkpoint

__all__ = [
    "IG_BASELINE",
    "NUCLEUS",
    "Importance",
    "Peak",
    "checkpoint_thresholds",
    "clipped_positions",
    "construct_report",
    "distribution_probabilities",
    "encoder_info",
    "encoder_outputs",
    "integrated_gradients",
    "load_encoder",
    "peak_window",
    "presence_probabilities",
    "residue_importance",
]

logger = logging.getLogger(__name__)

_TOKENIZER = Tokenizer()
#: Index of the ``nucleus`` output in the presence logits.
NUCLEUS = PRESENCE_NAMES.index("nucleus")
#: What the integrated-gradients path starts from (recorded in outputs).
IG_BASELINE = "mask"
#: Padded tokens per forward pass of integrated gradients (interpolation steps are batched up to this).
_IG_TOKENS = 16384


# ------------------------------------------------------------------------------------------- loading
def _checkpoint_dir(checkpoint: str | os.PathLike) -> Path:
    path = resolve_checkpoint(checkpoint)
    return find_checkpoint(path, what="protein encoder")


def load_encoder(
    checkpoint: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> tuple[ProteinEncoder, EncoderConfig]:
    """Load a trained protein encoder (strictly) in eval mode.

    Parameters
    ----------
    checkpoint
        A checkpoint folder (``model.safetensors`` + ``config.json``), a ``protloc train encoder`` run
        folder (its ``best/``, else ``last/``) or ``pretrained:NAME`` (:mod:`protloc.pretrained`).
    device
        Torch device.

    Returns
    -------
    model
        The :class:`~protloc.models.encoder.ProteinEncoder`, eval mode.
    config
        Its :class:`~protloc.models.encoder.EncoderConfig`.

    Raises
    ------
    InputError
        No checkpoint there, one of another model, or weights that do not fit.
    """
    path = _checkpoint_dir(checkpoint)
    model, config, _ = load_checkpoint(path, model_cls=ProteinEncoder, config_cls=EncoderConfig, map_location="cpu")
    return model.to(device).eval(), config


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read JSON ({exc})", path=path) from exc
    if not isinstance(data, dict):
        raise InputError("expected a JSON object", path=path)
    return data


def _parse_thresholds(value: Any, where: Path) -> dict[str, float]:
    """``{presence name: threshold}`` of a mapping (by name) or a list (in PRESENCE_NAMES order)."""
    if isinstance(value, Mapping):
        pairs = {str(k): v for k, v in value.items()}
        unknown = sorted(set(pairs) - set(PRESENCE_NAMES))
        if unknown:
            logger.warning("%s: ignoring thresholds of unknown outputs %s", where, ", ".join(unknown))
    elif isinstance(value, list | tuple) and len(value) == len(PRESENCE_NAMES):
        pairs = dict(zip(PRESENCE_NAMES, value, strict=True))
    else:
        raise InputError(
            f"'thresholds' must map the outputs ({', '.join(PRESENCE_NAMES)}) to numbers, or list "
            f"{len(PRESENCE_NAMES)} numbers in that order",
            path=where,
        )
    out = {}
    for name in PRESENCE_NAMES:
        if name not in pairs:
            continue
        t = pairs[name]
        if isinstance(t, bool) or not isinstance(t, int | float) or not (0.0 <= float(t) <= 1.0):
            raise InputError(f"threshold of {name!r} must be a number in [0, 1], got {t!r}", path=where)
        out[name] = float(t)
    return out


def checkpoint_thresholds(checkpoint: str | os.PathLike) -> tuple[dict[str, float], str]:
    """The per-output decision thresholds a checkpoint carries (chosen on validation proteins).

    Looked for, in this order, as a ``thresholds`` entry of ``config.json`` (top level, then its
    ``extra``), then of ``recipe.json`` (top level, then any section of it, e.g. ``validation``). The
    entry maps output names (:data:`~protloc.data.proteome.PRESENCE_NAMES`) to probabilities, or lists
    the 13 thresholds in that order. Outputs it leaves out get 0.5.

    Parameters
    ----------
    checkpoint
        A checkpoint or run folder, or ``pretrained:NAME``.

    Returns
    -------
    thresholds
        ``{name: threshold}`` for every presence output.
    source
        Where they came from (``"config.json"``, ``"config.json extra"``, ``"recipe.json"``,
        ``"recipe.json <section>"``), with ``"; 0.5 for ..."`` when some were missing, or ``"default 0.5"``
        when the checkpoint carries none.
    """
    ckpt = _checkpoint_dir(checkpoint)
    candidates: list[tuple[str, Any]] = []
    config = _read_json(ckpt / CONFIG_FILE)
    candidates.append(("config.json", config.get("thresholds")))
    extra = config.get("extra")
    if isinstance(extra, Mapping):
        candidates.append(("config.json extra", extra.get("thresholds")))
    recipe_path = ckpt / "recipe.json"
    if recipe_path.is_file():
        recipe = _read_json(recipe_path)
        candidates.append(("recipe.json", recipe.get("thresholds")))
        candidates.extend(
            (f"recipe.json {key}", section.get("thresholds"))
            for key, section in recipe.items()
            if isinstance(section, Mapping)
        )
    for source, value in candidates:
        if value is None:
            continue
        where = recipe_path if source.startswith("recipe") else ckpt / CONFIG_FILE
        found = _parse_thresholds(value, where)
        missing = [n for n in PRESENCE_NAMES if n not in found]
        if missing:
            source += f"; 0.5 for {', '.join(missing)}"
        return {n: found.get(n, 0.5) for n in PRESENCE_NAMES}, source
    return dict.fromkeys(PRESENCE_NAMES, 0.5), "default 0.5"


def encoder_info(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """What identifies a protein encoder checkpoint and how its outputs are called.

    Parameters
    ----------
    checkpoint
        A checkpoint or run folder, or ``pretrained:NAME``.

    Returns
    -------
    dict
        ``name`` (``pretrained:NAME``, else the checkpoint folder), ``checkpoint`` (the folder loaded,
        absolute), ``sha256`` (of its ``model.safetensors``: the model's fingerprint), ``thresholds`` and
        ``threshold_source`` (:func:`checkpoint_thresholds`), ``step`` (recorded by training, or None).
    """
    ckpt = _checkpoint_dir(checkpoint)
    text = os.fspath(checkpoint)
    name = text if text.startswith(PREFIX) else str(ckpt.resolve())
    thresholds, source = checkpoint_thresholds(ckpt)
    extra = _read_json(ckpt / CONFIG_FILE).get("extra") or {}
    return {
        "name": name,
        "checkpoint": str(ckpt.resolve()),
        "sha256": _sha256(ckpt / MODEL_FILE),
        "thresholds": thresholds,
        "threshold_source": source,
        "step": extra.get("step") if isinstance(extra, Mapping) else None,
    }


# ----------------------------------------------------------------------------------------- inference
def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _max_residues(model: ProteinEncoder) -> int:
    return int(model.config.max_residues)


def _validated(seqs: Sequence[str]) -> list[str]:
    if isinstance(seqs, str):
        raise InputError("expected a list of sequences, got one string (wrap it in a list)")
    return [validate_sequence(s, name=f"#{i + 1}") for i, s in enumerate(seqs)]


def _batch(seqs: Sequence[str], max_residues: int, device: torch.device) -> tuple[Tensor, Tensor]:
    ids, mask = _TOKENIZER.encode_batch(seqs, max_len=max_residues)
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def encoder_outputs(
    model: ProteinEncoder,
    seqs: Sequence[str],
    *,
    batch_size: int = 32,
    progress: bool = False,
    precision: str = "fp32",
) -> dict[str, np.ndarray]:
    """Run the encoder over sequences, in batches of similar lengths.

    Parameters
    ----------
    model
        A protein encoder (:func:`load_encoder`); used in eval mode on its own device.
    seqs
        Amino-acid sequences (validated here; longer than ``max_residues``: clipped to both ends).
    batch_size
        Sequences per forward pass. Sequences are sorted by length first, so a batch holds similar
        lengths; the encoder is padding-invariant, so batching does not change the results beyond
        float rounding.
    progress
        Show a progress bar over the sequences.
    precision
        ``"fp32"``, or ``"bf16"``: bfloat16 autocast (the shipped encoder trained under it; about 1.2x
        faster on CPUs with AVX512-BF16, probabilities within about 3e-3 of fp32).

    Returns
    -------
    dict
        In input order: ``presence`` ``float32 [N, 13]`` (sigmoid of the presence logits, in
        :data:`~protloc.data.proteome.PRESENCE_NAMES` order), ``distribution`` ``float32 [N, 12]``
        (softmax over the compartments), ``pooled`` ``float32 [N, 2 * dim]`` (the protein vector) and
        ``clipped`` ``bool [N]`` (longer than ``max_residues``).

    Raises
    ------
    InputError
        An invalid residue (naming the sequence's 1-based index, residue and position).
    ConfigError
        A batch size that is not a positive integer.
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    n_max = _max_residues(model)
    full = _validated(seqs)
    clipped = [clip_residues(s, n_max) for s in full]
    n = len(clipped)
    dim = 2 * int(model.config.dim)
    presence = np.zeros((n, len(PRESENCE_NAMES)), dtype=np.float32)
    distribution = np.zeros((n, len(COMPARTMENTS)), dtype=np.float32)
    pooled = np.zeros((n, dim), dtype=np.float32)
    order = np.argsort([len(s) for s in clipped], kind="stable")
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=n, desc="localize", unit="seq", disable=not progress) as bar:
            for start in range(0, n, batch_size):
                rows = order[start : start + batch_size]
                ids, mask = _batch([clipped[i] for i in rows], n_max, device)
                with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = model(ids, mask)
                presence[rows] = torch.sigmoid(out["presence"].float()).cpu().numpy()
                distribution[rows] = torch.softmax(out["distribution"].float(), dim=-1).cpu().numpy()
                pooled[rows] = out["pooled"].float().cpu().numpy()
                bar.update(len(rows))
    finally:
        model.train(was_training)
    return {
        "presence": presence,
        "distribution": distribution,
        "pooled": pooled,
        "clipped": np.asarray([len(s) > n_max for s in full], dtype=bool),
    }


def presence_probabilities(
    model: ProteinEncoder, seqs: Sequence[str], *, batch_size: int = 32, precision: str = "fp32"
) -> np.ndarray:
    """Presence probabilities ``float32 [N, 13]`` (12 compartments, then ``nucleus``), in input order.

    See :func:`encoder_outputs` (sigmoid of the presence logits; length-sorted batches; no gradients).
    """
    return encoder_outputs(model, seqs, batch_size=batch_size, precision=precision)["presence"]


def distribution_probabilities(model: ProteinEncoder, seqs: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
    """Distribution over the 12 compartments ``float32 [N, 12]`` (softmax; rows sum to 1), in input order.

    See :func:`encoder_outputs`.
    """
    return encoder_outputs(model, seqs, batch_size=batch_size)["distribution"]


# ------------------------------------------------------------------------------------------ importance
def clipped_positions(length: int, max_residues: int = 1000) -> np.ndarray:
    """1-based positions, in the original sequence, of the residues the encoder sees.

    ``arange(1, length + 1)`` for a sequence of at most ``max_residues``; for a longer one the positions
    of :func:`~protloc.data.sequences.clip_residues`'s two ends: the first ``max_residues - max_residues // 2``
    and the last ``max_residues // 2`` (DeepLoc's 500 + 500).
    """
    if length <= max_residues:
        return np.arange(1, length + 1)
    tail = max_residues // 2
    head = max_residues - tail
    return np.concatenate([np.arange(1, head + 1), np.arange(length - tail + 1, length + 1)])


@dataclass(frozen=True)
class Importance:
    """Integrated-gradients importance of presence logits for one sequence (:func:`integrated_gradients`).

    Attributes
    ----------
    targets
        The presence outputs explained (names of :data:`~protloc.data.proteome.PRESENCE_NAMES`).
    attributions
        ``float64 [T, length]``: per target, one signed score per residue of the *original* sequence
        (index ``i`` is residue ``i + 1``); NaN where the model saw nothing (the clipped middle of a
        sequence longer than ``max_residues``).
    logits
        ``[T]`` the targets' logits for the sequence.
    baseline_logits
        ``[T]`` the targets' logits for the baseline (every residue replaced by ``<mask>``).
    steps
        Interpolation steps.
    clipped
        Whether the sequence was clipped.
    """

    targets: tuple[str, ...]
    attributions: np.ndarray
    logits: np.ndarray
    baseline_logits: np.ndarray
    steps: int
    clipped: bool

    @property
    def gap(self) -> np.ndarray:
        """``[T]`` completeness error: sum of the attributions minus ``logit - baseline_logit`` (near 0)."""
        return np.nansum(self.attributions, axis=1) - (self.logits - self.baseline_logits)


def _forward_from_embeddings(model: ProteinEncoder, ids: Tensor, mask: Tensor, emb: Tensor) -> Tensor:
    """Presence logits with the token-embedding layer's output replaced by ``emb`` (same shape)."""
    handle = model.embed.register_forward_hook(lambda module, args, output: emb)
    try:
        return model(ids, mask)["presence"].float()
    finally:
        handle.remove()


def integrated_gradients(
    model: ProteinEncoder,
    seq: str,
    targets: Sequence[int | str],
    *,
    steps: int = 32,
) -> Importance:
    """Integrated gradients of presence logits with respect to the token embeddings of one sequence.

    For each target logit ``f``, the attribution of residue ``i`` is
    ``sum_d (x_id - b_id) * mean_k df/dx_id (b + a_k (x - b))`` over the embedding dimensions ``d``, with
    the midpoint rule ``a_k = (k + 1/2) / steps`` (Sundararajan et al. 2017). The attributions sum to
    ``f(x) - f(b)`` up to the rule's error (:attr:`Importance.gap`; it shrinks as ``1 / steps**2``).
    The interpolation steps are batched (several steps per forward pass, up to ~16k tokens).

    The **baseline** ``b`` is the same sequence with every residue token replaced by ``<mask>``
    (``<cls>`` and ``<sep>`` kept), not the zero embedding: ``<mask>`` is the token the encoder learned
    to read as "a residue whose identity is unknown" (masked-residue training), so the baseline is a
    protein of the same length with no sequence information, close to what the model was trained on.
    A zero vector is no token's embedding (``<pad>``'s zero row only ever appears masked out), so the
    model never saw it at a real position, and its path would mix in the effect of that unseen input.
    With a ``<mask>`` baseline the attributions measure what each residue's identity adds, and the
    length (which the baseline shares) gets none; ``<cls>`` / ``<sep>`` are identical in both and get 0.

    Parameters
    ----------
    model
        A protein encoder (eval mode is used; gradients are taken only with respect to the input).
    seq
        One amino-acid sequence (clipped to both ends when longer than ``max_residues``).
    targets
        Presence outputs to explain: indices into, or names of,
        :data:`~protloc.data.proteome.PRESENCE_NAMES` (``"nucleus"`` or :data:`NUCLEUS`, ``"cytosol"``, ...).
    steps
        Interpolation steps.

    Returns
    -------
    Importance
        Attributions per target over the original sequence (NaN in a clipped middle).

    Raises
    ------
    InputError
        An invalid residue.
    ConfigError
        An unknown target or ``steps`` < 1.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    index = []
    for t in targets:
        if isinstance(t, str):
            if t not in PRESENCE_NAMES:
                raise ConfigError(f"unknown presence output {t!r}; choose from {', '.join(PRESENCE_NAMES)}")
            index.append(PRESENCE_NAMES.index(t))
        elif isinstance(t, int | np.integer) and 0 <= int(t) < len(PRESENCE_NAMES):
            index.append(int(t))
        else:
            raise ConfigError(f"presence output index must be in 0..{len(PRESENCE_NAMES) - 1}, got {t!r}")
    if not index:
        raise ConfigError("give at least one target")
    full = validate_sequence(seq)
    n_max = _max_residues(model)
    seen = clip_residues(full, n_max)
    positions = clipped_positions(len(full), n_max)
    device = _device_of(model)
    ids, mask = _batch([seen], n_max, device)  # [1, L + 2]
    base_ids = ids.clone()
    base_ids[:, 1 : 1 + len(seen)] = _TOKENIZER.mask_id
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = model.embed(ids).float()  # [1, L, E]
            b = model.embed(base_ids).float()
            ends = _forward_from_embeddings(model, ids.expand(2, -1), mask.expand(2, -1), torch.cat([x, b]))
        logits = ends[0, index].cpu().numpy().astype(np.float64)
        base_logits = ends[1, index].cpu().numpy().astype(np.float64)
        diff = x - b
        alphas = (torch.arange(steps, dtype=torch.float32, device=device) + 0.5) / steps
        chunk = max(1, _IG_TOKENS // ids.shape[1])
        grads = torch.zeros((len(index), *x.shape[1:]), dtype=torch.float32, device=device)
        for start in range(0, steps, chunk):
            a = alphas[start : start + chunk].view(-1, 1, 1)
            path = (b + a * diff).detach().requires_grad_(True)  # [k, L, E]
            with torch.enable_grad():
                out = _forward_from_embeddings(
                    model, ids.expand(len(a), -1), mask.expand(len(a), -1), path.to(model.embed.weight.dtype)
                )
                for j, t in enumerate(index):
                    # the samples of a batch are independent (no batch statistics), so the gradient of the
                    # sum is each sample's own gradient
                    (g,) = torch.autograd.grad(out[:, t].sum(), path, retain_graph=j < len(index) - 1)
                    grads[j] += g.float().sum(0)
        attr = (diff[0] * grads / steps).sum(-1)[:, 1 : 1 + len(seen)]  # [T, L_seen]
    finally:
        model.train(was_training)
    tracks = np.full((len(index), len(full)), np.nan)
    tracks[:, positions - 1] = attr.detach().cpu().numpy().astype(np.float64)
    return Importance(
        targets=tuple(PRESENCE_NAMES[i] for i in index),
        attributions=tracks,
        logits=logits,
        baseline_logits=base_logits,
        steps=steps,
        clipped=len(full) > n_max,
    )


def residue_importance(model: ProteinEncoder, seq: str, *, steps: int = 32) -> dict[str, Any]:
    """Importance of every residue for the ``nucleus`` output and for the protein's top compartment.

    The top compartment is the one of the 12 compartments with the highest presence probability.
    Both are explained in one call of :func:`integrated_gradients` (baseline: every residue ``<mask>``).

    Parameters
    ----------
    model
        A protein encoder.
    seq
        One amino-acid sequence.
    steps
        Interpolation steps.

    Returns
    -------
    dict
        ``nucleus`` and ``top`` ``float64 [length]`` signed tracks over the original sequence (NaN in a
        clipped middle), ``top_compartment``, ``importance`` (the :class:`Importance`).
    """
    p = presence_probabilities(model, [seq], batch_size=1)[0]
    top = int(np.argmax(p[: len(COMPARTMENTS)]))
    imp = integrated_gradients(model, seq, [NUCLEUS, top], steps=steps)
    return {
        "nucleus": imp.attributions[0],
        "top": imp.attributions[1],
        "top_compartment": COMPARTMENTS[top],
        "importance": imp,
    }


class Peak(NamedTuple):
    """A window of residues: 1-based ``start`` and ``end`` (inclusive) and its summed importance ``score``."""

    start: int
    end: int
    score: float


def peak_window(track: Sequence[float] | np.ndarray, width: int = 9) -> Peak:
    """The ``width``-residue window with the largest summed (signed) importance.

    The window that pushes the explained output up the most; windows touching NaN (a clipped middle)
    are skipped. Ties go to the first window. A track shorter than ``width`` is one window.

    Parameters
    ----------
    track
        Importance per residue (index ``i`` is residue ``i + 1``).
    width
        Window length in residues.

    Returns
    -------
    Peak
        ``start``, ``end`` (1-based, inclusive) and ``score`` (the window's sum, rounded to 6 digits).

    Raises
    ------
    InputError
        An empty track, or no window without NaN.
    ConfigError
        ``width`` < 1.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(f"width must be a positive integer, got {width!r}")
    t = np.asarray(track, dtype=np.float64).ravel()
    if t.size == 0:
        raise InputError("empty importance track")
    w = min(width, t.size)
    finite = np.isfinite(t)
    csum = np.concatenate([[0.0], np.cumsum(np.where(finite, t, 0.0))])
    cbad = np.concatenate([[0], np.cumsum(~finite)])
    sums = csum[w:] - csum[:-w]
    bad = (cbad[w:] - cbad[:-w]) > 0
    if bad.all():
        raise InputError(f"no {w}-residue window of the track is free of NaN")
    sums = np.where(bad, -np.inf, sums)
    i = int(np.argmax(sums))
    return Peak(start=i + 1, end=i + w, score=round(float(sums[i]), 6))


# -------------------------------------------------------------------------------------------- constructs
def construct_report(
    checkpoint: str | os.PathLike | ProteinEncoder,
    *,
    steps: int = 32,
    width: int = 9,
) -> dict[str, dict[str, Any]]:
    """Nuclear probability and nucleus-importance peak of the engineered constructs of the reference world.

    The constructs of ``engineered.fasta`` (:func:`~protloc.data.world.assets.load_engineered_records`):
    GFP alone, GFP + the nucleoplasmin and N-Myc NLS peptides, GFP + a random peptide (control), TOP1 and
    GFP + TOP1 N-terminal fragments (CELL-E Fig. 4-5). For a GFP fusion, the *appended* part is every
    residue after GFP's 238; the question is whether the nucleus importance peaks there.

    Parameters
    ----------
    checkpoint
        A protein encoder checkpoint / run folder, ``pretrained:NAME``, or a loaded encoder.
    steps
        Integrated-gradients steps.
    width
        Peak window length (:func:`peak_window`).

    Returns
    -------
    dict
        Construct id -> ``construct`` (kind, from the FASTA header), ``length``, ``nuclear_probability``
        (presence probability of ``nucleus``), ``top_compartment`` and its ``top_probability``,
        ``appended`` (``[start, end]`` 1-based of the residues after GFP, or None), ``peptide`` (the
        header's, or None), ``appended_importance`` (summed nucleus importance of the appended residues,
        or None), ``ig_gap`` (completeness error of the nucleus attributions) and ``peak``: ``start``,
        ``end`` (1-based, inclusive), ``residues``, ``score`` and ``in_appended`` (whether the window
        overlaps the appended part; None without one). In file order.
    """
    from protloc.data.world.assets import load_engineered_records

    model = checkpoint if isinstance(checkpoint, ProteinEncoder) else load_encoder(checkpoint)[0]
    records = load_engineered_records()
    gfp = next((r["sequence"] for r in records if r["id"] == "GFP"), None)
    seqs = [r["sequence"] for r in records]
    out = encoder_outputs(model, seqs, batch_size=len(seqs))
    report: dict[str, dict[str, Any]] = {}
    for rec, presence in zip(records, out["presence"], strict=True):
        seq = rec["sequence"]
        top = int(np.argmax(presence[: len(COMPARTMENTS)]))
        imp = integrated_gradients(model, seq, [NUCLEUS], steps=steps)
        track = imp.attributions[0]
        peak = peak_window(track, width=width)
        fused = gfp is not None and rec["id"] != "GFP" and seq.startswith(gfp) and len(seq) > len(gfp)
        appended = [len(gfp) + 1, len(seq)] if fused else None
        report[rec["id"]] = {
            "construct": rec.get("construct", rec["id"]),
            "length": len(seq),
            "nuclear_probability": float(presence[NUCLEUS]),
            "top_compartment": COMPARTMENTS[top],
            "top_probability": float(presence[top]),
            "appended": appended,
            "peptide": rec.get("peptide"),
            "appended_importance": float(np.nansum(track[appended[0] - 1 :])) if appended else None,
            "ig_gap": float(imp.gap[0]),
            "peak": {
                "start": peak.start,
                "end": peak.end,
                "residues": seq[peak.start - 1 : peak.end],
                "score": peak.score,
                "in_appended": (peak.end >= appended[0]) if appended else None,
            },
        }
    return report

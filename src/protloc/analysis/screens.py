"""In-silico insertion / deletion / substitution screens and residue attention with CELL-E.

Khwaja et al., CELL-E, Sec. 2.3 ("Analysis of NLS using CELL-E"), Fig. 4-6 and S.3.8:

- Fig. 4: GFP, GFP + an NLS (nucleoplasmin ``KRPAATKKAGQAKKKK``, N-Myc ``PAAKRVKLD``) and GFP + a random
  peptide, predicted against one nucleus image: an *insertion screen*
  (:func:`insertion_variants`).
- Fig. 5: the TOP1 N-terminal deletion / truncation series of Mo et al. 2000: a *deletion screen*
  (:func:`truncation_series`, :func:`deletion_scan`); :func:`mutational_scan` adds point substitutions.
- Fig. 6 / S.3.8: attention from the generated threshold-image patches back to the residues, compared
  between patches where protein is present and background patches (:func:`residue_attention`).

:func:`predict_variants` predicts every variant and tabulates its nucleus proportion (S.3.7) and the change from
the wild type. The engineered constructs of the paper (GFP, GFP + NLS variants, the TOP1 series) ship with
the synthetic world in ``protloc/data/world/assets/engineered.fasta``.

Common random numbers
---------------------
Every variant is generated with the *same* Gumbel noise: at each decoding step, sample ``j`` of every
variant gets the same noise, drawn from a generator seeded with ``sampling.seed``. So two variants
differ only through their sequence (and their nucleus image, if they have different ones), which
removes most of the sampling noise from the differences. The noise of a variant also does not depend on
how the variants are batched nor on its position in the batch (tested), and one variant screened alone
gets exactly the noise of ``predict([sequence], ..., sampling=sampling)``. (:func:`protloc.eval.predict.predict`
itself draws one noise row per batch row, so there a sequence's noise depends on its batch position.)

Examples
--------
>>> [v.name for v in insertion_variants("MKV", {"NLS": "PKKKRKV"}, positions=["start", "end"])]
['wild type', 'NLS@start', 'NLS@end']
>>> [v.sequence for v in truncation_series("MKVLAAG", step=2, min_length=3)]
['MKVLAAG', 'VLAAG', 'AAG']
>>> [v.name for v in mutational_scan("MKV", residues="A", positions=[1, 2])]
['wild type', 'K2A', 'V3A']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from protloc.data.sequences import STANDARD, validate_sequence
from protloc.errors import ConfigError, InputError
from protloc.eval.metrics import nucleus_mask, nucleus_proportion
from protloc.eval.predict import (
    SamplingConfig,
    _text_kwargs,
    _windows,
    generate,
    probability_map,
)

if TYPE_CHECKING:
    from protloc.eval.load import CelleRun

__all__ = [
    "KINDS",
    "SCREEN_COLUMNS",
    "Variant",
    "construct_experiment",
    "deletion_scan",
    "insertion_variants",
    "mutational_scan",
    "residue_attention",
    "predict_variants",
    "truncation_series",
]

KINDS = ("wild type", "insertion", "deletion", "substitution")
"""The kinds of :class:`Variant`."""

SCREEN_COLUMNS = (
    "name",
    "kind",
    "position",
    "length",
    "detail",
    "nucleus_proportion",
    "sd",
    "delta",
    "input_changed",
)
"""Columns of the :func:`predict_variants` table, in order."""

WILD_TYPE = "wild type"


@dataclass(frozen=True)
class Variant:
    """One sequence of a screen.

    Attributes
    ----------
    name
        Label, e.g. ``"wild type"``, ``"NLS@end"``, ``"aa11-765"``, ``"del21-30"``, ``"K5A"``.
    sequence
        The full (validated) variant sequence.
    kind
        ``"wild type"``, ``"insertion"``, ``"deletion"`` or ``"substitution"``.
    position
        0-based index in the wild-type sequence where the change starts (insertion: the residue the
        peptide is inserted before, ``len(wild type)`` for an append; deletion: first deleted residue;
        substitution: the substituted residue); ``None`` for the wild type.
    detail
        Human-readable description of the change (1-based residue numbers).
    """

    name: str
    sequence: str
    kind: str
    position: int | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"variant kind must be one of {', '.join(map(repr, KINDS))}, got {self.kind!r}")
        if self.position is not None and (isinstance(self.position, bool) or not isinstance(self.position, int)):
            raise ConfigError(f"variant position must be an int or None, got {self.position!r}")


# ---------------------------------------------------------------------------------------------- generators


def _wild_type(seq: str, name: str) -> tuple[str, Variant]:
    clean = validate_sequence(seq, name=name)
    return clean, Variant(WILD_TYPE, clean, WILD_TYPE, None, f"{len(clean)} residues")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _position(value: Any, n: int, *, allow_end: bool) -> int:
    """A 0-based index in ``0 .. n - 1`` (``0 .. n`` with ``allow_end``)."""
    hi = n if allow_end else n - 1
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value <= hi:
        raise InputError(f"position {value!r} is outside the sequence (0-based, 0..{hi})")
    return int(value)


def insertion_variants(
    seq: str,
    peptides: Mapping[str, str],
    positions: Sequence[int | Literal["start", "end"]] = ("end",),
    *,
    seq_name: str = "wild type",
) -> list[Variant]:
    """Insert each peptide at each position (paper Fig. 4: GFP + NLS at the C-terminus).

    Parameters
    ----------
    seq
        The wild-type sequence.
    peptides
        Peptide name -> sequence, e.g. ``{"nucleoplasmin NLS": "KRPAATKKAGQAKKKK"}``.
    positions
        Where to insert: ``"start"`` (N-terminal fusion, = 0), ``"end"`` (C-terminal fusion,
        = ``len(seq)``) or a 0-based index ``i``: the peptide goes before residue ``i`` (1-based ``i + 1``).
    seq_name
        Name of the wild type in error messages.

    Returns
    -------
    list of Variant
        The wild type, then one insertion per (peptide, position), peptides outer, named
        ``"<peptide>@<start|end|i>"``.

    Raises
    ------
    InputError
        On an invalid residue in the sequence or a peptide (naming it), a position outside ``0..len(seq)``.
    """
    clean, wt = _wild_type(seq, seq_name)
    if isinstance(positions, str):
        positions = [positions]
    if not peptides:
        raise InputError("no peptides to insert")
    resolved: list[tuple[str, int]] = []
    for p in positions:
        if p == "start":
            resolved.append(("start", 0))
        elif p == "end":
            resolved.append(("end", len(clean)))
        elif isinstance(p, str):
            raise InputError(f"insertion position must be 'start', 'end' or an int, got {p!r}")
        else:
            i = _position(p, len(clean), allow_end=True)
            resolved.append((str(i), i))
    if not resolved:
        raise InputError("no insertion positions")
    out = [wt]
    for pep_name, pep in peptides.items():
        pep_clean = validate_sequence(pep, name=f"peptide {pep_name!r}")
        for label, i in resolved:
            where = "appended" if i == len(clean) else f"before residue {i + 1}"
            out.append(
                Variant(
                    f"{pep_name}@{label}",
                    clean[:i] + pep_clean + clean[i:],
                    "insertion",
                    i,
                    f"{pep_clean} ({len(pep_clean)} aa) {where}",
                )
            )
    return out


def truncation_series(
    seq: str,
    *,
    step: int,
    from_: Literal["n", "c"] = "n",
    min_length: int = 1,
    seq_name: str = "wild type",
) -> list[Variant]:
    """Progressive terminal truncations (paper Fig. 5: the TOP1 N-terminal deletion series).

    Variant ``k`` (``k = 1, 2, ...``) removes the first (``from_="n"``) or last (``"c"``) ``k * step``
    residues, as long as at least ``min_length`` residues remain.

    Returns
    -------
    list of Variant
        The wild type, then the truncations from the shortest deletion on, ``kind="deletion"``, named by
        the residues kept (1-based, inclusive: ``"aa11-765"``); ``position`` is the first deleted residue.
    """
    clean, wt = _wild_type(seq, seq_name)
    step = _positive_int(step, "step")
    min_length = _positive_int(min_length, "min_length")
    if from_ not in ("n", "c"):
        raise ConfigError(f"from_ must be 'n' or 'c', got {from_!r}")
    n = len(clean)
    out = [wt]
    k = step
    while n - k >= min_length:
        if from_ == "n":
            out.append(Variant(f"aa{k + 1}-{n}", clean[k:], "deletion", 0, f"deleted 1-{k}"))
        else:
            out.append(Variant(f"aa1-{n - k}", clean[: n - k], "deletion", n - k, f"deleted {n - k + 1}-{n}"))
        k += step
    return out


def deletion_scan(seq: str, *, window: int, step: int | None = None, seq_name: str = "wild type") -> list[Variant]:
    """Internal deletions of ``window`` residues, the window sliding by ``step`` (default: ``window``,
    i.e. non-overlapping). Only whole windows are deleted: a tail shorter than ``window`` is not scanned
    unless a window starting at ``len(seq) - window`` is reached by the step.

    Returns
    -------
    list of Variant
        The wild type, then one deletion per window start ``0, step, ...``, named ``"del<a>-<b>"``
        (1-based inclusive), ``position`` = first deleted residue.

    Raises
    ------
    InputError
        If ``window`` is not shorter than the sequence (nothing would remain).
    """
    clean, wt = _wild_type(seq, seq_name)
    window = _positive_int(window, "window")
    step = window if step is None else _positive_int(step, "step")
    n = len(clean)
    if window >= n:
        raise InputError(f"deletion window {window} must be shorter than the sequence ({n} residues)")
    out = [wt]
    for start in range(0, n - window + 1, step):
        a, b = start + 1, start + window
        out.append(
            Variant(f"del{a}-{b}", clean[:start] + clean[start + window :], "deletion", start, f"deleted {a}-{b}")
        )
    return out


def mutational_scan(
    seq: str,
    *,
    residues: str = "A",
    positions: Sequence[int] | None = None,
    seq_name: str = "wild type",
) -> list[Variant]:
    """Point substitutions (e.g. an alanine scan, or all 19 alternatives per position).

    Parameters
    ----------
    residues
        Target residues: a string of one-letter codes (default ``"A"``: alanine scan), or ``"all"`` for
        the 20 standard amino acids. A position whose wild-type residue equals the target is skipped.
    positions
        0-based positions to mutate; default every position.

    Returns
    -------
    list of Variant
        The wild type, then substitutions named in the usual notation ``"K5A"`` (1-based), positions outer,
        targets in the order given.
    """
    clean, wt = _wild_type(seq, seq_name)
    if not isinstance(residues, str):
        raise InputError(f"residues must be a string of one-letter codes or 'all', got {residues!r}")
    targets = STANDARD if residues.strip().lower() == "all" else validate_sequence(residues, name="target residues")
    targets = "".join(dict.fromkeys(targets))  # unique, order kept
    idx = range(len(clean)) if positions is None else [_position(p, len(clean), allow_end=False) for p in positions]
    out = [wt]
    for i in idx:
        for r in targets:
            if r != clean[i]:
                out.append(
                    Variant(
                        f"{clean[i]}{i + 1}{r}",
                        clean[:i] + r + clean[i + 1 :],
                        "substitution",
                        i,
                        f"{clean[i]} -> {r} at residue {i + 1}",
                    )
                )
    return out


# ---------------------------------------------------------------------------------------------- screening


def _check_images(images: Tensor, n: int, size: int, *, what: str) -> Tensor:
    if not isinstance(images, Tensor):
        raise InputError(f"{what} must be a torch tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1:] != (1, size, size) or images.shape[0] not in {1, n}:
        raise InputError(
            f"{what} must be [1, 1, {size}, {size}] or [{n}, 1, {size}, {size}], got {tuple(images.shape)}"
        )
    x = images.float()
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise InputError(f"{what} pixels must be finite and in [0, 1]")
    return x


def _check_run(run: CelleRun) -> None:
    c = run.model.config
    if run.nucleus.grid_size != c.grid_size or run.threshold.grid_size != c.grid_size:
        raise InputError(
            f"the tokenizers give {run.nucleus.grid_size} / {run.threshold.grid_size}-token grids at "
            f"{run.image_size} px, the model expects {c.grid_size}"
        )


def predict_variants(
    run: CelleRun,
    variants: Sequence[Variant],
    nucleus_images: Tensor,
    *,
    sampling: SamplingConfig | None = None,
    batch_size: int = 8,
    progress: bool | Callable[[int, int], None] = False,
) -> pd.DataFrame:
    """Predict every variant and tabulate its nucleus proportion (paper Fig. 4-5, S.3.7).

    Parameters
    ----------
    run
        A loaded CELL-E (:func:`protloc.eval.load.load_celle_run`).
    variants
        From the generators above (or hand-made); row 0 is the reference for ``delta`` (the generators put
        the wild type first).
    nucleus_images
        ``[1, 1, S, S]`` (one nucleus image for every variant, as in the paper) or ``[V, 1, S, S]`` (one per
        variant), in [0, 1].
    sampling
        :class:`~protloc.eval.predict.SamplingConfig`; ``samples`` draws per variant. Every variant gets the
        same noise (common random numbers, see the module docstring), so a variant's result is independent
        of ``batch_size`` and of its place in the list, and equals ``predict([sequence], ...)`` with the
        same sampling.
    batch_size
        Variants per forward batch (each expands to ``samples`` rows).
    progress
        ``True`` for a tqdm bar, or a callable ``(done, total)`` called after each batch.

    Returns
    -------
    pandas.DataFrame
        One row per variant, columns :data:`SCREEN_COLUMNS`: ``name``, ``kind``, ``position`` (0-based, or
        ``None``), ``length`` (residues), ``detail``, ``nucleus_proportion`` (mean over samples of the
        probability-map share inside the nucleus mask, S.3.7; equals the share of the mean map),
        ``sd`` (its standard deviation over samples, ``ddof=1``; NaN with one sample), ``delta``
        (``nucleus_proportion`` minus row 0's) and ``input_changed`` (False when the variant's model input
        -- the N-terminal window of ``max_residues`` residues and its end token -- equals row 0's, e.g. a
        change beyond the window: the model cannot see it and its ``delta`` is 0).
    """
    sampling = sampling or SamplingConfig()
    variants = list(variants)
    if not variants:
        raise InputError("no variants to screen")
    for i, v in enumerate(variants):
        if not isinstance(v, Variant):
            raise InputError(f"variant {i} is a {type(v).__name__}, not a Variant")
    batch_size = _positive_int(batch_size, "batch_size")
    _check_run(run)
    model = run.model
    c = model.config
    device = model.to_logits.weight.device
    V, n, S = len(variants), sampling.samples, run.image_size
    images = _check_images(nucleus_images, V, S, what="nucleus images").to(device)
    windows, _, ends = _windows([v.sequence for v in variants], c.max_residues)
    with torch.autocast(device_type=device.type, enabled=False):
        nuc_tokens = run.nucleus.encode(images)[1].reshape(images.shape[0], -1)  # [1 or V, G]
    masks = nucleus_mask(images)  # [1 or V, 1, S, S]
    shared = images.shape[0] == 1

    props = np.empty((V, n), dtype=np.float64)
    bar = tqdm(total=V, desc="screen", unit="variant", disable=progress is not True, dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, V, batch_size):
            hi = min(V, lo + batch_size)
            b = hi - lo
            text = run.encoder(windows[lo:hi], ends[lo:hi])
            text = {k: v.to(device).repeat_interleave(n, dim=0) for k, v in text.items()}
            nuc = nuc_tokens.expand(b, -1) if shared else nuc_tokens[lo:hi]
            # Common random numbers: rows are variant * n + sample, and every variant's sample j gets the
            # same noise, so a variant's result does not depend on its batch or position.
            result = generate(
                model,
                text=text,
                nucleus=nuc.repeat_interleave(n, dim=0),
                sampling=sampling,  # the default generator: seeded with sampling.seed for every batch
                noise_period=n,
            )
            with torch.autocast(device_type=device.type, enabled=False):
                maps = probability_map(run.threshold, result.probs)  # [b * n, 1, S, S]
            mask = (masks.expand(b, -1, -1, -1) if shared else masks[lo:hi]).repeat_interleave(n, dim=0)
            props[lo:hi] = nucleus_proportion(maps, mask).double().cpu().numpy().reshape(b, n)
            bar.update(b)
            if callable(progress):
                progress(hi, V)
    finally:
        model.train(was_training)
        bar.close()

    mean = props.mean(axis=1)
    sd = props.std(axis=1, ddof=1) if n > 1 else np.full(V, np.nan)
    ref_input = (windows[0], ends[0])
    return pd.DataFrame(
        {
            "name": [v.name for v in variants],
            "kind": [v.kind for v in variants],
            "position": pd.array([v.position for v in variants], dtype="Int64"),
            "length": [len(v.sequence) for v in variants],
            "detail": [v.detail for v in variants],
            "nucleus_proportion": mean,
            "sd": sd,
            "delta": mean - mean[0],
            "input_changed": [(w, e) != ref_input for w, e in zip(windows, ends, strict=True)],
        },
        columns=list(SCREEN_COLUMNS),
    )


def construct_experiment(
    run: CelleRun,
    constructs: Mapping[str, str],
    nucleus_images: Tensor,
    *,
    reference: str | None = None,
    sampling: SamplingConfig | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Engineered constructs against several nucleus images: the GFP / GFP + NLS experiment (paper Fig. 4).

    Every construct is predicted against each nucleus image with the same sampling noise (common random
    numbers, :func:`predict_variants`), so the change from the reference construct on one image reflects the
    sequence alone; its spread over the images says how robust the change is.

    Parameters
    ----------
    run
        A loaded CELL-E.
    constructs
        ``name -> sequence``; the first (or ``reference``) is the reference, e.g. GFP.
    nucleus_images
        ``[N, 1, S, S]`` nucleus images in [0, 1].
    reference
        Name of the reference construct (default: the first).
    sampling
        Draws per construct and image, temperature, seed.
    batch_size
        Constructs per generation batch.
    progress
        Show a progress bar over the images.

    Returns
    -------
    per_image
        One row per image and construct: ``image``, ``construct``, ``nucleus_proportion``, ``delta`` (minus
        the reference on the same image).
    summary
        One row per construct: ``construct``, ``length``, ``nucleus_proportion`` (mean over images),
        ``nucleus_proportion_sd``, ``delta`` (mean), ``delta_sd``, ``above_reference`` (images where the
        construct is above the reference), ``images``.

    Raises
    ------
    InputError
        No constructs, an unknown reference, a construct longer than the model's window (its C-terminal
        change would be invisible), or bad images.
    """
    if not constructs:
        raise InputError("no constructs")
    names = list(constructs)
    ref = names[0] if reference is None else reference
    if ref not in constructs:
        raise InputError(f"reference construct {ref!r} is not among the constructs ({', '.join(names)})")
    _check_run(run)
    window = run.model.config.max_residues
    too_long = {k: len(v) for k, v in constructs.items() if len(v) > window}
    if too_long:
        raise InputError(f"the model's window ({window} residues) would cut these constructs: {too_long}")
    order = [ref] + [k for k in names if k != ref]
    variants = [
        Variant(k, validate_sequence(constructs[k], name=k), WILD_TYPE if k == ref else "insertion") for k in order
    ]
    images = torch.as_tensor(nucleus_images, dtype=torch.float32)
    if images.ndim != 4 or images.shape[0] < 1:
        raise InputError(f"nucleus images must be [N, 1, S, S], got {list(images.shape)}")
    rows = []
    for j in tqdm(range(images.shape[0]), desc="constructs", unit="nucleus", disable=not progress, dynamic_ncols=True):
        table = predict_variants(run, variants, images[j : j + 1], sampling=sampling, batch_size=batch_size)
        for name, prop, delta in zip(table["name"], table["nucleus_proportion"], table["delta"], strict=True):
            rows.append({"image": j, "construct": name, "nucleus_proportion": float(prop), "delta": float(delta)})
    per_image = pd.DataFrame(rows, columns=["image", "construct", "nucleus_proportion", "delta"])
    n = images.shape[0]
    summary = []
    for name in order:
        d = per_image[per_image["construct"] == name]
        summary.append(
            {
                "construct": name,
                "length": len(constructs[name]),
                "nucleus_proportion": float(d["nucleus_proportion"].mean()),
                "nucleus_proportion_sd": float(d["nucleus_proportion"].std(ddof=1)) if n > 1 else float("nan"),
                "delta": float(d["delta"].mean()),
                "delta_sd": float(d["delta"].std(ddof=1)) if n > 1 else float("nan"),
                "above_reference": int((d["delta"] > 0).sum()) if name != ref else 0,
                "images": n,
            }
        )
    return per_image, pd.DataFrame(summary)


# ---------------------------------------------------------------------------------------------- attention


def _rollout(layers: Tensor) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020): ``A_hat = 0.5 A + 0.5 I`` per layer (the residual
    connection), rows renormalised, multiplied from the first layer up: ``R = A_hat_L ... A_hat_1``.
    ``layers``: ``[L, P, P]`` head-averaged attention; returns ``[P, P]``."""
    eye = torch.eye(layers.shape[-1], dtype=layers.dtype, device=layers.device)
    out = eye
    for a in layers:
        a_hat = 0.5 * a + 0.5 * eye
        a_hat = a_hat / a_hat.sum(dim=-1, keepdim=True)
        out = a_hat @ out
    return out


def _as_tokens(tokens: Tensor | np.ndarray | Sequence[int], G: int, K: int) -> Tensor:
    t = torch.as_tensor(tokens)
    if t.numel() != G or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise InputError(
            f"threshold_tokens must be {G} integer token ids ([G], [1, G] or [g, g]), got {tuple(t.shape)}"
        )
    t = t.reshape(1, G).long()
    if int(t.min()) < 0 or int(t.max()) >= K:
        raise InputError(f"threshold token ids must lie in 0..{K - 1}")
    return t


@torch.no_grad()
def residue_attention(
    run: CelleRun,
    sequence: str,
    nucleus_image: Tensor,
    *,
    threshold_tokens: Tensor | np.ndarray | Sequence[int] | None = None,
    sampling: SamplingConfig | None = None,
    method: Literal["rollout", "mean"] = "rollout",
    reduce: Literal["mean", "median"] = "mean",
    present_min: float = 0.5,
    background_max: float = 0.5,
) -> dict[str, Any]:
    """Attention from the threshold-image patches to the residues, protein-present vs background (S.3.8).

    The threshold tokens (given, or generated with ``sampling``, one sample) are decoded with the threshold
    VQGAN and binarised at 0.5; a patch's *fraction* is the mean of its ``S/g x S/g`` pixels. Patches with
    fraction ``>= present_min`` are "present", those ``< background_max`` "background" (defaults 0.5 / 0.5:
    every patch in one group; the paper's S.3.8 uses 0.75 / 0.25 and leaves the middle out).

    One teacher-forced pass with the tokens gives every block's attention ``[H, P, P]``, averaged over the
    heads. The query of patch ``p`` is the row that predicts it: position ``text_len + G - 1 + p`` in the
    autoregressive mode (the last nucleus token predicts patch 0), ``text_len + G + p`` in the masked mode
    (all tokens visible, no ``[MASK]``).

    - ``method="rollout"`` (default, as S.3.8): attention rollout of Abnar & Zuidema (2020) with the
      residual identity, ``A_hat = 0.5 A + 0.5 I`` renormalised, multiplied over all layers; the rolled-out
      rows are read at the residues.
    - ``method="mean"``: the raw attention averaged over layers (and heads).

    Each group is then summarised per residue over its patches with ``reduce`` (the paper takes a median
    of the attention matrices per group *before* the rollout; here each patch is rolled out and the
    per-patch residue weights are reduced, which keeps a patch's path through the layers intact).

    Parameters
    ----------
    run
        A loaded CELL-E; a sequence-blind run (no residue tokens) is refused.
    sequence
        The protein; longer ones are cropped to the N-terminal window of ``max_residues`` as in ``predict``.
    nucleus_image
        ``[1, 1, S, S]`` in [0, 1].
    threshold_tokens
        ``G`` threshold token ids (``[G]``, ``[1, G]`` or ``[g, g]``); default: generated.
    sampling
        For the generation (``samples`` is ignored: one draw).

    Returns
    -------
    dict
        - ``present``, ``background``, ``difference`` (``present - background``): ``float64 [n]`` per residue
          of the window (NaN where a group is empty);
        - ``per_patch`` ``float64 [G, n]``: every patch's weights on the residues;
        - ``residues`` (the window, str), ``window_start`` (0-based, int), ``positions`` (1-based residue
          numbers ``int [n]``);
        - ``tokens`` ``int64 [G]`` (CPU tensor), ``patch_fraction`` ``float64 [G]``, ``present_patches`` and
          ``background_patches`` ``bool [G]``, ``n_present`` and ``n_background``;
        - ``method`` and ``reduce``.
    """
    if method not in ("rollout", "mean"):
        raise ConfigError(f"method must be 'rollout' or 'mean', got {method!r}")
    if reduce not in ("mean", "median"):
        raise ConfigError(f"reduce must be 'mean' or 'median', got {reduce!r}")
    for name, value in (("present_min", present_min), ("background_max", background_max)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
    if background_max > present_min:
        raise ConfigError(f"background_max ({background_max}) must not exceed present_min ({present_min})")
    if not isinstance(sequence, str):
        raise InputError(f"sequence must be a string, got {type(sequence).__name__}")
    if getattr(run.encoder, "blank", False):
        raise InputError("this run is sequence-blind (no residue tokens): there is no attention to residues")
    _check_run(run)
    sampling = dataclasses.replace(sampling or SamplingConfig(), samples=1)
    model = run.model
    c = model.config
    G, g, tl, S = c.grid_tokens, c.grid_size, c.text_len, run.image_size
    device = model.to_logits.weight.device
    image = _check_images(nucleus_image, 1, S, what="nucleus image").to(device)
    if S % g:
        raise InputError(f"image size {S} is not a multiple of the {g}-token grid")
    windows, starts, ends = _windows([sequence], c.max_residues)
    window = windows[0]
    text = _text_kwargs(run.encoder(windows, ends), device)
    with torch.autocast(device_type=device.type, enabled=False):
        nuc = run.nucleus.encode(image)[1].reshape(1, -1)
    if threshold_tokens is None:
        tokens = generate(model, text=text, nucleus=nuc, sampling=sampling).tokens  # [1, G]
    else:
        tokens = _as_tokens(threshold_tokens, G, c.num_threshold_codes).to(device)
    with torch.autocast(device_type=device.type, enabled=False):
        decoded = run.threshold.decode_indices(tokens.reshape(1, g, g)).float()[:, :1]  # [1, 1, S, S]
    fraction = F.avg_pool2d((decoded >= 0.5).float(), S // g).reshape(G).double().cpu().numpy()

    was_training = model.training
    model.eval()
    try:
        thr = tokens[:, :-1] if model.autoregressive else tokens
        out = model(threshold=thr, nucleus=nuc, return_attention=True, **text)
    finally:
        model.train(was_training)
    layers = torch.stack([a[0].float().mean(dim=0) for a in out.attentions])  # [L, P, P]
    attn = _rollout(layers) if method == "rollout" else layers.mean(dim=0)
    q0 = tl + G - 1 if model.autoregressive else tl + G
    n_res = len(window)
    per_patch = attn[q0 : q0 + G, 1 : 1 + n_res].double().cpu().numpy()  # [G, n]; column 0 is BOS

    present_patches = fraction >= present_min
    background_patches = fraction < background_max
    agg = np.median if reduce == "median" else np.mean

    def summary(sel: np.ndarray) -> np.ndarray:
        return agg(per_patch[sel], axis=0) if sel.any() else np.full(n_res, np.nan)

    present, background = summary(present_patches), summary(background_patches)
    return {
        "present": present,
        "background": background,
        "difference": present - background,
        "per_patch": per_patch,
        "residues": window,
        "window_start": int(starts[0]),
        "positions": np.arange(starts[0] + 1, starts[0] + 1 + n_res),
        "tokens": tokens[0].cpu(),
        "patch_fraction": fraction,
        "present_patches": present_patches,
        "background_patches": background_patches,
        "n_present": int(present_patches.sum()),
        "n_background": int(background_patches.sum()),
        "method": method,
        "reduce": reduce,
    }

"""Scores of a multi-label localization predictor on held-out proteins (``benchmarks/localize.py``).

Thresholds are chosen on the validation proteins and applied unchanged to the test proteins, as
DeepLoc 2.0 does: a threshold tuned on the test set would flatter every row.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> y = rng.integers(0, 2, size=(200, 2)).astype(float)
>>> p = np.clip(y * 0.6 + rng.uniform(0, 0.4, size=y.shape), 0, 1)
>>> t = choose_thresholds(y, p)
>>> report = multilabel_scores(y, p, t, names=("a", "b"))
>>> round(report["macro_auroc"], 3), round(report["macro_f1"], 3)
(1.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import f1_score, matthews_corrcoef, roc_auc_score

__all__ = ["choose_thresholds", "multilabel_scores", "auroc_or_nan"]

_GRID = np.round(np.arange(0.02, 0.99, 0.02), 2)


def auroc_or_nan(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC, or NaN when ``y`` has one class only."""
    y = np.asarray(y)
    if y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, p))


def choose_thresholds(y: np.ndarray, p: np.ndarray, *, metric: str = "mcc") -> np.ndarray:
    """Per-column probability threshold maximising MCC (or F1) on validation labels.

    Parameters
    ----------
    y, p
        ``[N, C]`` 0/1 labels and probabilities.
    metric
        ``"mcc"`` or ``"f1"``.

    Returns
    -------
    numpy.ndarray
        ``[C]`` thresholds from a 0.02 grid (0.5 for a column with one class).
    """
    y, p = np.asarray(y), np.asarray(p)
    if y.shape != p.shape or y.ndim != 2:
        raise ValueError(f"labels {y.shape} and probabilities {p.shape} must be the same [N, C] shape")
    score = matthews_corrcoef if metric == "mcc" else f1_score
    out = np.full(y.shape[1], 0.5)
    for c in range(y.shape[1]):
        if y[:, c].min() == y[:, c].max():
            continue
        vals = [score(y[:, c], p[:, c] >= t) for t in _GRID]
        out[c] = _GRID[int(np.argmax(vals))]
    return out


def multilabel_scores(
    y: np.ndarray, p: np.ndarray, thresholds: np.ndarray, *, names: Sequence[str]
) -> dict[str, object]:
    """AUROC, MCC and F1 per column at the given thresholds, and their macro means.

    Returns
    -------
    dict
        ``per_class`` (name -> auroc, mcc, f1, positives), ``macro_auroc``, ``macro_mcc``, ``macro_f1``
        (means over columns with both classes).
    """
    y, p = np.asarray(y), np.asarray(p)
    per: dict[str, dict[str, float]] = {}
    for c, name in enumerate(names):
        yc, pc = y[:, c], p[:, c] >= thresholds[c]
        two = yc.min() != yc.max()
        per[name] = {
            "auroc": auroc_or_nan(yc, p[:, c]),
            "mcc": float(matthews_corrcoef(yc, pc)) if two else float("nan"),
            "f1": float(f1_score(yc, pc, zero_division=0)) if two else float("nan"),
            "positives": int(yc.sum()),
            "threshold": float(thresholds[c]),
        }

    def mean(key: str) -> float:
        vals = [v[key] for v in per.values() if np.isfinite(v[key])]
        return float(np.mean(vals)) if vals else float("nan")

    return {"per_class": per, "macro_auroc": mean("auroc"), "macro_mcc": mean("mcc"), "macro_f1": mean("f1")}

"""Writing a command's output folder: the guard of every ``out`` (:func:`protloc._fs.check_out`, re-exported
here) and the figure / table / JSON writers and file names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from protloc._fs import atomic_path, atomic_write_json, check_out

__all__ = ["check_out", "safe_name", "save_fig", "unique_stems", "write_csv", "write_json"]


def save_fig(fig: Any, path: Path, *, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically, in the format of ``path``'s suffix (PNG by default)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically (:func:`protloc._fs.atomic_write_json`)."""
    return atomic_write_json(path, obj)


def write_csv(table: pd.DataFrame | pd.Series, path: Path, *, index: bool = False) -> Path:
    """Write a table as CSV atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=index)
    return path


def safe_name(name: str) -> str:
    """A file-name-safe version of a protein id: characters other than letters, digits, ``-_.`` become ``_``."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def unique_stems(names: Sequence[str]) -> list[str]:
    """File-name-safe, unique (also ignoring case) stems for output names: repeats get ``_2``, ``_3``, ..."""
    stems: list[str] = []
    taken: set[str] = set()
    for name in names:
        base = safe_name(name).lstrip(".")[:100] or "sequence"
        stem, k = base, 1
        while stem.lower() in taken:
            k += 1
            stem = f"{base}_{k}"
        taken.add(stem.lower())
        stems.append(stem)
    return stems

"""Atomic file and directory writes.

Outputs and checkpoints are written to a temporary sibling and renamed into place, so a crash or a
bad input never leaves a half-written file where a good one was (or should be).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from protloc.errors import InputError, ProtlocError

logger = logging.getLogger(__name__)

__all__ = [
    "atomic_path",
    "atomic_dir",
    "atomic_write_json",
    "atomic_write_text",
    "check_out",
    "check_overwrite",
    "json_ready",
    "resumable_dir",
]


def _umask() -> int:
    # mkstemp/mkdtemp create private (0600/0700) entries; outputs should get the ordinary permissions
    # the user's umask gives new files. Reading the umask means setting it, so set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def check_overwrite(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Refuse to replace an existing output file unless ``overwrite`` is set (``protloc embed``'s ``.h5ad``;
    output folders go through :func:`check_out`).

    Returns the path as a :class:`~pathlib.Path`.
    """
    p = Path(path)
    if p.exists() and not overwrite:
        raise InputError("output already exists (pass --overwrite to replace it)", path=p)
    return p


def check_out(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Refuse an existing output folder that is not empty unless ``overwrite`` (an empty folder is fine).

    The one guard of every command's output folder (``protloc world make``, ``prepare``, ``import``,
    ``atlas``, ``spectrum``, ``interpret``, ``predict``, ``fill``, ``screen``, ``evaluate``): called before
    the slow work, then the folder is written beside ``path`` and moved into place when complete
    (:func:`atomic_dir`). Returns the path as a :class:`~pathlib.Path`.

    Raises
    ------
    InputError
        ``path`` exists, is not an empty folder, and ``overwrite`` is False.
    """
    p = Path(path)
    if p.exists() and not overwrite and (not p.is_dir() or any(p.iterdir())):
        raise InputError("output already exists and is not empty (pass --overwrite to replace it)", path=p)
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; move it onto ``path`` on success.

    An existing ``path`` is replaced only after the new one is complete (the old one is moved
    aside first, then deleted), so a failure leaves the previous output intact.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_ready(obj: Any) -> Any:
    """``obj`` with NumPy scalars and arrays made plain, non-finite floats as ``None`` (strict JSON has no
    NaN), paths and other objects as strings."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str | int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    item = getattr(obj, "item", None)  # NumPy / torch scalars
    if callable(item) and getattr(obj, "ndim", 1) == 0:
        return json_ready(item())
    tolist = getattr(obj, "tolist", None)  # NumPy arrays
    if callable(tolist):
        return json_ready(tolist())
    return str(obj)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, strict JSON (see :func:`json_ready`) atomically."""
    return atomic_write_text(path, json.dumps(json_ready(obj), indent=2, allow_nan=False) + "\n")


@contextlib.contextmanager
def resumable_dir(partial: str | os.PathLike, job: Mapping[str, Any], *, kind: str) -> Iterator[Path]:
    """A folder of work kept between attempts of one resumable job (``protloc prepare`` / ``embed``).

    On entry, a ``partial`` folder whose ``job.json`` equals ``job`` is kept as it is (minus the
    temporaries of writes that were cut off), and any other is discarded and started afresh. On success
    the folder is removed. An interruption (Ctrl-C, a crash, SIGKILL) keeps it, so the same call continues
    where it stopped. A user error (:class:`~protloc.errors.ProtlocError`, e.g. a corrupt image met
    half-way) removes a folder this call created -- fixing the input changes the job, so its work could
    not be reused -- and leaves one it resumed as it found it apart from any results added. ``kind``
    names the job in the log ("embedding", "prepare").
    """
    partial = Path(partial)
    meta = partial / "job.json"
    want = json_ready(job)
    created = True
    if partial.is_dir():
        try:
            created = json.loads(meta.read_text()) != want
        except (OSError, ValueError):
            pass
        if created:
            logger.warning("discarding %s: it belongs to another %s job (other inputs or settings)", partial, kind)
            shutil.rmtree(partial)
        else:
            for stale in partial.glob(".*.tmp"):  # a result whose write was cut off
                stale.unlink(missing_ok=True)
    if created:
        partial.mkdir(parents=True)
        atomic_write_json(meta, want)
    try:
        yield partial
    except ProtlocError:
        if created:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(partial, ignore_errors=True)

"""Atomic file and directory writes.

Outputs and checkpoints are written to a temporary sibling and renamed into place, so a crash or a
bad input never leaves a half-written file where a good one was (or should be).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from protloc.errors import InputError, ProtlocError

logger = logging.getLogger(__name__)

__all__ = [
    "atomic_path",
    "atomic_dir",
    "atomic_write_json",
    "atomic_write_text",
    "OUTPUT_MARKER",
    "check_inputs",
    "check_out",
    "check_overwrite",
    "release_outputs",
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


#: What a command reads, for the output guard: ``{"--checkpoint": path, "--fasta": path, ...}``; a value
#: may also be several paths or ``None`` (not given).
Inputs = Mapping[str, "str | os.PathLike | Iterable[str | os.PathLike] | None"]


def _absolute(path: str | os.PathLike) -> Path:
    # resolve(strict=False) follows the symlinks of the part that exists, so two spellings of one folder
    # (a relative path, a link to it) compare equal.
    return Path(os.path.expanduser(os.fspath(path))).resolve(strict=False)


def _check_place(p: Path) -> None:
    """Refuse an output whose nearest existing ancestor is not a folder (a parent that is a file)."""
    for parent in _absolute(p).parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"cannot write the output here: {parent} is a file, not a folder", path=p)
            return


def check_inputs(p: str | os.PathLike, inputs: Inputs | None) -> None:
    """Refuse an output that is, contains or lies inside one of the command's inputs (even with --overwrite)."""
    if not inputs:
        return
    out = _absolute(p)
    for label, value in inputs.items():
        if value is None:
            continue
        # Arrays (an in-memory nucleus image) and mappings (sequences given as text) are not files.
        if isinstance(value, str | os.PathLike):
            paths = [value]
        elif isinstance(value, list | tuple):
            paths = [v for v in value if isinstance(v, str | os.PathLike)]
        else:
            continue
        for given in paths:
            if not os.fspath(given):
                continue
            src = _absolute(given)
            if src == out:
                why = f"holds the input given as {label} (it is that input)"
            elif out in src.parents:
                why = f"holds the input given as {label} ({given}); replacing it would delete that input"
            elif src in out.parents:
                why = f"lies inside the input given as {label} ({given})"
            else:
                continue
            raise InputError(f"the output {why}: choose another output (--overwrite does not change this)", path=p)


# ---------------------------------------------------------------------------------------- output locks
# A lock per output, so that a second run writing the same output refuses at once instead of silently
# replacing the first run's result when it finishes. The lock files live in one folder per user (not beside
# the output, which stays clean) and name the process that holds them; a lock whose process is gone (a
# killed run) is cleared. This protects runs on one machine (the folder is local).
_LOCK_DIR = Path(os.environ.get("PROTLOC_LOCK_DIR") or Path(tempfile.gettempdir()) / f"protloc-locks-{os.getuid()}")
_HELD: dict[Path, Path] = {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _lock(p: Path) -> None:
    out = _absolute(p)
    if out in _HELD:
        return
    _LOCK_DIR.mkdir(parents=True, exist_ok=True)
    lock = _LOCK_DIR / (hashlib.sha256(str(out).encode()).hexdigest()[:24] + ".lock")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "output": str(out), "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(lock.read_text(encoding="utf-8"))
                pid, host = int(held["pid"]), str(held["host"])
            except (OSError, ValueError, KeyError, TypeError):
                pid, host = -1, me["host"]  # unreadable: a write cut off by a kill
            if host == me["host"] and (pid == me["pid"] or pid < 0 or not _alive(pid)):
                logger.info("clearing a stale lock on %s (process %s is gone)", out, pid)
                lock.unlink(missing_ok=True)
                continue
            started = time.strftime("%H:%M:%S", time.localtime(float(held.get("started", 0))))
            raise InputError(
                f"another protloc run (process {pid} on {host}, started {started}) is writing this output; "
                f"wait for it or choose another output (if that run is gone, remove {lock})",
                path=p,
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(me, fh)
        _HELD[out] = lock
        return
    raise InputError(f"cannot take the lock {lock} of this output", path=p)


def _release(path: str | os.PathLike) -> None:
    if not _HELD:  # every atomic write calls this: no path resolution unless a lock is held
        return
    lock = _HELD.pop(_absolute(path), None)
    if lock is not None:
        lock.unlink(missing_ok=True)


def lock_output(path: str | os.PathLike) -> None:
    """Hold the output lock of ``path`` (a training run folder, say) until :func:`release_output`.

    Raises
    ------
    InputError
        When another live protloc process on this machine holds it.
    """
    _lock(Path(path))


def release_output(path: str | os.PathLike) -> None:
    """Release a lock taken with :func:`lock_output` (nothing happens if this process does not hold it)."""
    _release(path)


def release_outputs() -> None:
    """Release the output locks this process holds (the command line does it after every command)."""
    for out in list(_HELD):
        _release(out)


atexit.register(release_outputs)


def check_overwrite(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Inputs | None = None,
    ours: Callable[[Path], bool] | None = None,
) -> Path:
    """The guard of an output file (``protloc embed``'s ``.h5ad``, ``weights --write-config``'s YAML; output
    folders go through :func:`check_out`).

    Refuses (one line naming the file) a file that exists unless ``overwrite``; with ``overwrite``, a file
    that ``ours`` does not recognise as one protloc wrote (never a file of the user's); a file that is one of
    the command's ``inputs`` (even with ``overwrite``); a place whose parent is a file; and a file another run
    is writing (see :func:`check_out`). Returns the path as a :class:`~pathlib.Path`.
    """
    p = Path(path)
    _check_place(p)
    check_inputs(p, inputs)
    if p.exists() and not overwrite:
        raise InputError("output already exists (pass --overwrite to replace it)", path=p)
    if p.is_dir():
        raise InputError("the output is a folder, not a file", path=p)
    if overwrite and ours is not None and p.is_file() and not ours(p):
        raise InputError(
            "--overwrite replaces only files protloc wrote, and this one is not one: remove it yourself or choose "
            "another output",
            path=p,
        )
    _lock(p)
    return p


#: The file that marks a folder as a protloc output (written into every guarded output folder): --overwrite
#: replaces only folders that hold it, never a folder of the user's.
OUTPUT_MARKER = ".protloc-output"


def check_out(path: str | os.PathLike, *, overwrite: bool, inputs: Inputs | None = None) -> Path:
    """The guard of every command's output folder, called before the slow work.

    Used by ``protloc world make``, ``prepare``, ``import``, ``atlas``, ``spectrum``, ``interpret``,
    ``predict``, ``fill``, ``screen`` and ``evaluate``; the folder is then written beside ``path`` and moved
    into place when complete (:func:`atomic_dir`). Refuses, in one line naming the folder:

    - an existing folder that is not empty, unless ``overwrite`` (an empty folder is fine); ``overwrite``
      replaces only a folder protloc wrote (it holds :data:`OUTPUT_MARKER`), never one of the user's;
    - an output that is, contains or lies inside one of the command's ``inputs`` (checkpoints, stores,
      tables, images), even with ``overwrite``: replacing it would delete what the command reads;
    - a place whose parent is a regular file;
    - an output another protloc process is writing: a lock is held from here until the folder is in place
      (or the command ends); a lock left by a killed run is cleared.

    Returns the path as a :class:`~pathlib.Path`.
    """
    p = Path(path)
    _check_place(p)
    check_inputs(p, inputs)
    if p.exists() and not overwrite and (not p.is_dir() or any(p.iterdir())):
        raise InputError("output already exists and is not empty (pass --overwrite to replace it)", path=p)
    if p.exists() and not p.is_dir():
        raise InputError("the output is a file, not a folder", path=p)
    if overwrite and p.is_dir() and any(p.iterdir()) and not (p / OUTPUT_MARKER).is_file():
        raise InputError(
            f"--overwrite replaces only folders protloc wrote (they hold {OUTPUT_MARKER}), and this one does not; "
            "remove it yourself or choose another output",
            path=p,
        )
    _lock(p)
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
    finally:
        _release(dest)  # the output guard's lock, when this is the guarded output (check_overwrite)


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
        if _HELD and _absolute(dest) in _HELD:  # a guarded command output (check_out): mark it as protloc's
            # constant content: the same command gives byte-identical outputs
            (tmp / OUTPUT_MARKER).write_text('{"written_by": "protloc"}\n', encoding="utf-8")
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
    finally:
        _release(dest)  # the output guard's lock, when this is the guarded output (check_out)


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

"""Exceptions raised for user errors.

Every error a user can cause (bad file, bad residue, bad config key) is a :class:`ProtlocError`; the
CLI prints its message on one line and exits non-zero. Anything else is a bug and keeps its traceback.
Non-finite numbers are never saved, loaded or reported silently: a checkpoint holding NaN / Inf is an
:class:`InputError`, training whose loss or weights turn non-finite stops with :class:`TrainingDiverged`.
"""

from __future__ import annotations

from os import PathLike


class ProtlocError(Exception):
    """Base class of all user-facing protloc errors."""


class InputError(ProtlocError, ValueError):
    """Bad input data: names the file and, where there is one, the row / record / residue.

    Parameters
    ----------
    message
        What is wrong, in words a user can act on.
    path
        The offending file, if any; prefixed to the message.
    row
        The offending row, record or item (0-based row of a table, FASTA record name, ...).
    """

    def __init__(self, message: str, *, path: str | PathLike | None = None, row: object | None = None):
        self.path = None if path is None else str(path)
        self.row = row
        where = []
        if self.path is not None:
            where.append(self.path)
        if row is not None:
            where.append(f"row {row}" if isinstance(row, int) else str(row))
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.message = message


class ConfigError(ProtlocError, ValueError):
    """An invalid configuration: unknown key, wrong type, impossible value."""


class NonFiniteError(ProtlocError, ValueError):
    """Numbers that must be finite are NaN or infinite (weights about to be saved, a training loss)."""


class TrainingDiverged(NonFiniteError):
    """A training loss or the weights turned NaN / infinite: the run stopped without saving them.

    The message names the step and the terms; the last checkpoint written before (``last/``) is intact,
    so the run can be resumed from it (``--resume``) with a lower learning rate.
    """

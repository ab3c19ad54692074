"""A file system that refuses a write (full disk, read-only folder) gives one line and leaves nothing behind.

The refusals are simulated (this suite runs as root, which ignores permission bits, and cannot fill a disk):
the first temporary folder cannot be created, or a write fails half-way through the output.
"""

from __future__ import annotations

import errno
import os

import pytest

from protloc import _fs
from protloc.cli import main

SEQ = "MKTAYIAKQRQ"


def _fail(code: int):
    """A stand-in for os.replace / tempfile.mkdtemp that fails as the real call would, naming its path."""

    def raise_(*args, **kwargs):
        if args:  # os.replace(src, dst)
            path = str(args[0])
        else:  # tempfile.mkdtemp(prefix=..., suffix=..., dir=...)
            path = os.path.join(str(kwargs["dir"]), f"{kwargs['prefix']}k2j4{kwargs['suffix']}")
        raise OSError(code, os.strerror(code), path)

    return raise_


@pytest.mark.parametrize(
    "target, code",
    [("tempfile.mkdtemp", errno.ENOSPC), ("tempfile.mkdtemp", errno.EROFS), ("os.replace", errno.ENOSPC)],
    ids=["full disk at the start", "read-only folder", "full disk half-way"],
)
def test_a_refused_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, target, code):
    monkeypatch.setattr(_fs, "_LOCK_DIR", tmp_path / "locks")
    module, name = target.split(".")
    monkeypatch.setattr(getattr(_fs, module), name, _fail(code))
    out = tmp_path / "pred"
    rc = main(["-q", "predict", "--sequence", SEQ, "--out", str(out), "--samples", "1"])
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("protloc: error: ") and os.strerror(code) in err[0]
    assert ".tmp" not in err[0] and str(tmp_path) in err[0]  # the output's own name, not a temporary's
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["locks"])  # no output, no .tmp left
    assert not list((tmp_path / "locks").glob("*.lock"))

"""SIGTERM (``kill``, ``timeout``, SLURM) is handled like Ctrl-C: temporaries removed, advice that works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def test_sigterm_removes_temporaries_and_says_what_to_do(tmp_path: Path) -> None:
    out = tmp_path / "world"
    env = {**os.environ, "PROTLOC_LOCK_DIR": str(tmp_path / "locks"), "OMP_NUM_THREADS": "1"}
    argv = ["world", "make", "--out", str(out), "--proteins", "40", "--fovs", "2", "--size", "256"]
    proc = subprocess.Popen([sys.executable, "-m", "protloc", "-q", *argv], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        # wait until the output is being written (its temporary sibling exists), then terminate
        while not list(tmp_path.glob(".world.*.tmp")):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the world never started writing"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("protloc: terminated (SIGTERM).") and "run the same command again" in lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locks"]  # no .tmp, no half-written output
    assert not list((tmp_path / "locks").glob("*.lock"))

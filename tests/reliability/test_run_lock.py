"""Two trainers never write one run folder at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from protloc._fs import release_output
from protloc.errors import InputError
from protloc.train.engine import Run


def test_a_second_run_on_a_busy_folder_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # another live process holds the run folder (as a first `protloc train` would)
    code = (
        "import sys, time; from protloc._fs import lock_output; lock_output(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=f"another protloc run \\(process {holder.pid}"):
            Run(run_dir, resume=False, mixed_precision="no", name="test")
    finally:
        holder.kill()
        holder.wait()
    # once the holder is gone its lock is stale: a new run takes the folder
    run = Run(run_dir, resume=False, mixed_precision="no", name="test")
    assert run.dir == run_dir
    release_output(run_dir)


def test_a_finished_run_releases_its_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    Run(run_dir, resume=False, mixed_precision="no", name="test")
    release_output(run_dir)  # what finish() does
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from protloc._fs import lock_output; lock_output(sys.argv[1])",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert out.returncode == 0, out.stderr

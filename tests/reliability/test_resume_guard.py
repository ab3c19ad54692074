"""A resume that cannot go on changes nothing: the run folder stays as it was, and a plain --resume still works.

Before, a failed resume had already rewritten ``config.yaml`` (pointing at the wrong store, say), so the
next plain ``--resume`` failed too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from protloc.cli import main
from protloc.data.io import CropStore

S = 32  # the crop side of the cytoself_store fixture (conftest.py)

ARGS = ["--set", f"model.input_size={S}", "--set", "data.batch_size=8", "--set", "data.chunk_window=2"]
ARGS += ["--set", "schedule.eval_every=2", "--set", "schedule.log_every=1"]


def _other_store(path: Path) -> Path:
    """Another store of other proteins (a different label map)."""
    rng = np.random.default_rng(1)
    n = 48
    fov = np.arange(n) // 8
    obs = pd.DataFrame(
        {
            "protein_id": [f"Q{f % 2}" for f in fov],
            "fov_id": [f"g{f}" for f in fov],
            "split": [("train", "val")[f % 2] for f in fov],
        }
    )
    x = rng.random((n, S, S)).astype(np.float32)
    chans = {"protein": "float16", "nucleus": "float16", "nucleus_distance": "float16"}
    with CropStore.create(path, channels=chans, size=S, chunk=16) as w:
        w.append({"protein": x, "nucleus": x, "nucleus_distance": 2 * x - 1}, obs)
    return path


def test_a_failed_resume_leaves_the_run_as_it_was(digest, cytoself_store: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    argv = ["-q", "train", "cytoself", "--store", str(cytoself_store), "--out", str(run), *ARGS]
    assert main([*argv, "--set", "schedule.max_steps=2"]) == 0
    before = digest(run)
    capsys.readouterr()

    # another store: its proteins are not the run's label map
    other = _other_store(tmp_path / "other.zarr")
    resume = ["-q", "train", "cytoself", "--out", str(run), "--resume", "--set", "schedule.max_steps=4"]
    assert main([*resume, "--store", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("protloc: error: "), err
    assert "other.zarr: cannot resume" in err[0] and f"it was trained on {cytoself_store}" in err[0], err[0]
    assert digest(run) == before

    # a damaged last/: reported, and nothing rewritten
    state = run / "last" / "trainer_state.pt"
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])
    damaged = digest(run)
    assert main(resume) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainer_state.pt" in err[0], err
    assert digest(run) == damaged

    # repaired, a plain --resume continues with the run's own config
    state.write_bytes(good)
    assert main(resume) == 0
    assert "max_steps: 4" in (run / "config.yaml").read_text()
    shutil.rmtree(run)

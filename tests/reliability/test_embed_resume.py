"""``protloc embed`` resumes where it stopped: no row lost, none written twice, the same result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import protloc.eval.embed as embed_mod
from protloc.data.io import CropStore
from protloc.eval.embed import embed
from protloc.pretrained import pretrained_path

CKPT = pretrained_path("cytoself-tiny")


def _store(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:100, :100]
    dist = np.clip((np.hypot(yy - 50, xx - 50) - 20) / 30, -1, 1).astype(np.float32)
    obs = pd.DataFrame(
        {
            "protein_id": [f"P{i % 7}" for i in range(n)],
            "fov_id": [f"F{i // 20}" for i in range(n)],
            "split": np.where(np.arange(n) % 5 == 0, "test", "train"),
        }
    )
    with CropStore.create(path, channels={"protein": "float16", "nucleus_distance": "float16"}, size=100) as w:
        for a in range(0, n, 256):
            b = min(n, a + 256)
            w.append(
                {
                    "protein": rng.random((b - a, 100, 100)).astype(np.float16),
                    "nucleus_distance": np.broadcast_to(dist, (b - a, 100, 100)).astype(np.float16),
                },
                obs.iloc[a:b],
            )
    return path


def _same(a: Path, b: Path) -> None:
    x, y = ad.read_h5ad(a), ad.read_h5ad(b)
    pd.testing.assert_frame_equal(x.obs, y.obs)
    assert set(x.obsm) == set(y.obsm)
    for k in x.obsm:
        np.testing.assert_array_equal(np.asarray(x.obsm[k]), np.asarray(y.obsm[k]), err_msg=k)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("embed_resume")
    store = _store(root / "cyto.zarr", 40)
    ref = embed(CKPT, store, root / "ref.h5ad", batch_size=4, shard_size=8, progress=False)
    return store, ref


def test_an_interrupted_embedding_continues_with_the_missing_shards(small, tmp_path, monkeypatch, caplog) -> None:
    store, ref = small
    calls = {"n": 0}
    real = embed_mod._batch

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # in the third shard (2 batches of 4 per shard of 8)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "emb.h5ad"
    monkeypatch.setattr(embed_mod, "_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        embed(CKPT, store, out, batch_size=4, shard_size=8, progress=False)
    partial = tmp_path / "emb.h5ad.partial"
    assert not out.exists() and sorted(p.name for p in partial.glob("shard-*")) == [
        "shard-000000000000.npz",
        "shard-000000000008.npz",
    ]
    monkeypatch.setattr(embed_mod, "_batch", real)
    calls["n"] = 0
    with caplog.at_level("INFO", logger="protloc.eval.embed"):
        embed(CKPT, store, out, batch_size=4, shard_size=8, progress=False)
    assert "16 of 40 crops were embedded before" in caplog.text
    assert not partial.exists()
    _same(out, ref)


def test_a_changed_job_starts_over(small, tmp_path, monkeypatch, caplog) -> None:
    store, ref = small
    out = tmp_path / "emb.h5ad"
    partial = tmp_path / "emb.h5ad.partial"
    partial.mkdir()
    (partial / "job.json").write_text('{"weights_sha256": "something else"}')
    (partial / "shard-000000000000.npz").write_bytes(b"from another job")
    with caplog.at_level("WARNING", logger="protloc.eval.embed"):
        embed(CKPT, store, out, batch_size=4, shard_size=8, progress=False)
    assert "another embedding job" in caplog.text
    _same(out, ref)


def test_sigkill_then_the_same_command_resumes(tmp_path: Path) -> None:
    store = _store(tmp_path / "cyto.zarr", 1500)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "protloc",
        "-q",
        "embed",
        "--checkpoint",
        str(CKPT),
        "--store",
        str(store),
        "--batch-size",
        "50",
    ]
    ref = subprocess.run([*cmd, "--out", str(tmp_path / "ref.h5ad")], env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out, partial = tmp_path / "emb.h5ad", tmp_path / "emb.h5ad.partial"
    for shards in (1, 3):  # kill twice, after more and more shards
        proc = subprocess.Popen(
            [*cmd, "--out", str(out), "--shard-size", "100"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 300
        while len(list(partial.glob("shard-*.npz"))) < shards and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the embedding finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not out.exists()
    done = subprocess.run([*cmd, "--out", str(out), "--shard-size", "100"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not partial.exists()
    _same(out, tmp_path / "ref.h5ad")

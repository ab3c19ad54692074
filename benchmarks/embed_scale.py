"""``protloc embed`` over a very large crop store: throughput and peak memory (issue 8).

Usage: ``.venv/bin/python benchmarks/embed_scale.py [--crops 1000000] [--source runs/demo/prepared/cytoself.zarr]
[--checkpoint pretrained:cytoself-tiny] [--batch-size 256] [--work /tmp/protloc_embed_scale]
[--json benchmarks/results/embed_scale.json]``

The store is built without writing a million crops: ``--real`` distinct chunks (64 crops each) are
copied from ``--source`` (the demo world's test crops, else random crops), and every other chunk
file of the Zarr array is a hard link to one of them, so the store takes a few MB on disk yet reads
through the whole path -- Zarr chunk lookup, zstd decompression, the model, the resumable shards and
the ``.h5ad`` assembly. Caveats: the data repeats (page-cache friendly: this measures compute and
memory, not disk bandwidth), and the ``.h5ad`` and its shards take about 11 KB per crop of real disk.

``protloc embed`` runs as a subprocess; its peak resident memory (RSS of the process tree, polled every
0.2 s) is reported with crops/s, for the embedding and for the whole command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from protloc.data.io import CropStore

CHUNK = 64


def _rss_tree(pid: int) -> int:
    """Resident memory of a process and its children, in bytes (Linux /proc)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo.extend(int(c) for c in fh.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def build_store(work: Path, n: int, source: Path | None, real: int) -> Path:
    """A crop store of ``n`` crops made of ``real`` distinct chunks, hard-linked."""
    store = work / "cytoself.zarr"
    if store.exists():
        shutil.rmtree(store)
        (work / "cytoself.csv").unlink(missing_ok=True)
    m = real * CHUNK
    chans = {"protein": "float16", "nucleus_distance": "float16"}
    if source is not None and source.exists():
        src = CropStore.open(source)
        rows = np.linspace(0, len(src) - 1, m).astype(int)
        data = src.read(rows, channels=list(chans))
    else:
        rng = np.random.default_rng(0)
        data = {c: rng.random((m, 100, 100)).astype(np.float16) for c in chans}
    obs = pd.DataFrame(
        {
            "protein_id": [f"P{i % 1000:04d}" for i in range(m)],
            "fov_id": [f"F{i // 50:06d}" for i in range(m)],
            "split": "test",
        }
    )
    with CropStore.create(store, channels=chans, size=100, chunk=CHUNK) as w:
        w.append(data, obs)
    n_chunks = -(-n // CHUNK)
    n = n_chunks * CHUNK
    for c in chans:
        meta_path = store / c / "zarr.json"
        meta = json.loads(meta_path.read_text())
        meta["shape"][0] = n
        meta_path.write_text(json.dumps(meta, indent=2))
        base = store / c / "c"
        for i in range(real, n_chunks):
            target = base / str(i) / "0" / "0"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(base / str(i % real) / "0" / "0", target)
    group_meta = store / "zarr.json"
    meta = json.loads(group_meta.read_text())
    meta["attributes"]["n"] = n
    group_meta.write_text(json.dumps(meta, indent=2))
    idx = np.arange(n)
    table = pd.DataFrame(
        {
            "crop_index": idx,
            "protein_id": [f"P{i % 1000:04d}" for i in idx],
            "fov_id": [f"F{i // 50:07d}" for i in idx],
            "split": "test",
            "label": "",
        }
    )
    table.to_csv(work / "cytoself.csv", index=False)
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--crops", type=int, default=1_000_000)
    ap.add_argument("--real", type=int, default=16, help="distinct chunks of 64 crops")
    ap.add_argument("--source", type=Path, default=Path("runs/demo/prepared/cytoself.zarr"))
    ap.add_argument("--checkpoint", default="pretrained:cytoself-tiny")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--work", type=Path, default=Path("/tmp/protloc_embed_scale"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/embed_scale.json"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store = build_store(args.work, args.crops, args.source, args.real)
    build_s = time.perf_counter() - t0
    n = len(CropStore.open(store))
    out = args.work / "embeddings.h5ad"
    out.unlink(missing_ok=True)
    shutil.rmtree(args.work / "embeddings.h5ad.partial", ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "protloc",
        "-q",
        "embed",
        "--checkpoint",
        args.checkpoint,
        "--store",
        str(store),
        "--out",
        str(out),
        "--batch-size",
        str(args.batch_size),
    ]
    t1 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _rss_tree(proc.pid))
        time.sleep(0.2)
    total_s = time.perf_counter() - t1
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.read()[-3000:])
    row = {
        "crops": n,
        "crops_from": str(args.source) if args.source.exists() else "random",
        "distinct_chunks": args.real,
        "batch_size": args.batch_size,
        "store_build_s": round(build_s, 1),
        "embed_command_s": round(total_s, 1),
        "crops_per_s": round(n / total_s, 1),
        "peak_rss_mb": round(peak / 2**20, 1),
        "h5ad_gb": round(out.stat().st_size / 2**30, 2),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(row, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": [row]}, indent=2) + "\n"
    )
    out.unlink()


if __name__ == "__main__":
    main()

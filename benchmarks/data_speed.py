"""Throughput of the data path: world rendering and ``protloc prepare``, 1 vs 2 worker processes.

Run: ``.venv/bin/python benchmarks/data_speed.py [--proteins 25 --fovs 4 --size 512] [--json out.json]``

Prints a table (fields of view per second, crops per second, speed-up of 2 workers over 1, all measured
in the same run) and writes it as JSON. Absolute times on shared machines are noisy; the ratios are
the meaningful part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from protloc.data.prepare import prepare
from protloc.data.world.make import make_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proteins", type=int, default=25)
    parser.add_argument("--fovs", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/data_speed.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for workers in (1, 2):
            t0 = time.perf_counter()
            world = make_world(
                tmp / f"world{workers}",
                proteins=args.proteins,
                fovs=args.fovs,
                size=args.size,
                workers=workers,
                progress=False,
            )
            t_world = time.perf_counter() - t0
            t0 = time.perf_counter()
            summary = prepare(
                Path(world) / "fovs.csv",
                tmp / f"prep{workers}",
                sequences=Path(world) / "sequences.fasta",
                workers=workers,
                progress=False,
            )
            t_prep = time.perf_counter() - t0
            n = summary["fovs"]
            crops = summary["cytoself_crops"] + summary["celle_crops"]
            rows.append(
                {
                    "workers": workers,
                    "fovs": n,
                    "world_s": t_world,
                    "world_fov_per_s": n / t_world,
                    "prepare_s": t_prep,
                    "prepare_fov_per_s": n / t_prep,
                    "crops_per_s": crops / t_prep,
                }
            )
    for r in rows[1:]:
        r["world_speedup"] = rows[0]["world_s"] / r["world_s"]
        r["prepare_speedup"] = rows[0]["prepare_s"] / r["prepare_s"]
    header = f"{'workers':>7} {'fovs':>5} {'world fov/s':>11} {'prepare fov/s':>13} {'crops/s':>8} {'speed-up':>16}"
    print(header)
    for r in rows:
        sp = f"{r.get('world_speedup', 1):.2f} / {r.get('prepare_speedup', 1):.2f}"
        print(
            f"{r['workers']:>7} {r['fovs']:>5} {r['world_fov_per_s']:>11.1f} {r['prepare_fov_per_s']:>13.1f} "
            f"{r['crops_per_s']:>8.0f} {sp:>16}"
        )
    out = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "args": vars(args) | {"json": str(args.json)},
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Throughput of `hemofm embed --cluster local:N` with 1 and 2 workers, and single-process.

Prints one table from one run: cells/s for the single-process pipeline and for a
LocalCluster of 1 and 2 worker processes (each single-threaded), on the same synthetic
crops, with the speed-up over 1 worker. Chunk folders are removed between runs so that
every run computes everything.

Usage::

    python benchmarks/bench_cluster.py                 # handcrafted, 2,000 crops
    python benchmarks/bench_cluster.py --model dinobloom-s --n 200
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_embed import random_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="handcrafted")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--chunk-size", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hemofm-bc")
    args = parser.parse_args()

    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.cluster import EmbedJob, chunk_dir, embed_on_cluster
    from napari_hemofm.core.embed import embed_table
    from napari_hemofm.core.inputs import collect_cells, scan_inputs
    from napari_hemofm.core.models import load_backbone
    from napari_hemofm.core.synthetic import WBC_CLASSES, write_crop_folder

    root = args.workdir / f"crops{args.n}"
    if not root.exists():
        write_crop_folder(root, n_per_class=args.n // len(WBC_CLASSES), seed=0, size=128)
    weights = random_weights(args.model, args.workdir / "weights")
    scan = scan_inputs([root])
    n = len(scan.sources)
    rows = []

    t = time.perf_counter()
    table = CellTable()
    table.add_cells(collect_cells(scan).cells)
    embed_table(table, load_backbone(args.model, weights=weights))
    rows.append(("single process (2 prefetch threads)", n / (time.perf_counter() - t)))

    job = EmbedJob(args.model, weights=None if weights is None else str(weights))
    for workers in (1, 2):
        out = args.workdir / f"out{workers}.h5ad"
        shutil.rmtree(chunk_dir(out), ignore_errors=True)
        t = time.perf_counter()
        embed_on_cluster(scan, job, out, cluster=f"local:{workers}", chunk_size=args.chunk_size)
        rows.append(
            (f"LocalCluster, {workers} worker(s) x 1 thread", n / (time.perf_counter() - t))
        )

    base = rows[1][1]
    print(
        f"\n{args.model}, {n} crops 128x128 PNG, chunk size {args.chunk_size}, "
        "wall time including cluster start-up"
    )
    print(f"{'run':<40} {'cells/s':>9} {'vs 1 worker':>12}")
    for name, rate in rows:
        print(f"{name:<40} {rate:>9.1f} {rate / base:>12.2f}")


if __name__ == "__main__":
    main()

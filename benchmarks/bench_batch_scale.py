"""Speed of the batch report at scale, and the error of its approximate neighbour search.

Synthetic embeddings shaped like a foundation model's: ``--types`` cell types in
``--labs`` labs, each cell its type's centre plus noise with a power-law spectrum
(variance of axis i ~ i^-1, so no few axes hold it all) plus its lab's offset.

Prints three tables:

1. time of each part of a report at ``--n`` cells (neighbour search, iLISI ... LOBO) and
   of the whole ``batch_report`` with and without the leave-one-batch-out probes;
2. the neighbour search of one cell type: exact vs among a seeded sample of reference
   cells (and pynndescent with ``--nndescent``): time and recall of the exact 90
   neighbours;
3. the metrics of a ``--compare-n``-cell report with the exact and the sampled search
   side by side.

Run: ``python benchmarks/bench_batch_scale.py`` (defaults: 100,000 x 384, 8 types,
2 labs). Results: docs/performance.md and docs/batch.md.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def make_data(n: int, dim: int, n_types: int, n_labs: int, shift: float, seed: int):
    """Embeddings (float32), lab and type of each cell."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(np.arange(1, dim + 1))
    centres = rng.normal(size=(n_types, dim)) * scale * 6.0
    t = rng.integers(0, n_types, n)
    lab = rng.integers(0, n_labs, n)
    offsets = rng.normal(size=(n_labs, dim)) * scale * shift
    X = centres[t] + rng.normal(size=(n, dim)) * scale + offsets[lab]
    labs = np.array([f"lab{i}" for i in range(n_labs)], dtype=object)[lab]
    types = np.array([f"type{i}" for i in range(n_types)], dtype=object)[t]
    return X.astype(np.float32), labs, types


def timed(fn, *args, **kwargs):
    """Result, wall seconds (and CPU seconds of this process in ``timed.cpu``)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    timed.cpu = time.process_time() - cpu
    return out, time.perf_counter() - start


def search_table(args, X, b, y) -> None:
    """Table 2: one type's neighbour search, exact vs sampled."""
    from napari_hemofm.core import batch as bm
    from napari_hemofm.core.batch.neighbors import nearest_neighbors, neighbor_recall

    rows = np.flatnonzero(y == "type0")
    Xg = X[rows]
    exact, t_exact = timed(nearest_neighbors, Xg, 100, method="exact")
    bg = b[rows]

    def scores(nb):
        """iLISI and kBET of the type with these neighbours (its labs mixed or not)."""
        given = {"all cells": nb}
        ilisi = bm.compute_ilisi(Xg, bg, neighbors=given)
        return ilisi, bm.compute_kbet(Xg, bg, neighbors=given)

    e_ilisi, e_kbet = scores(exact)
    print(f"one cell type: {len(rows):,} cells, k = 90")
    print("| search | time (s) | recall of the exact 90 | iLISI | kBET acceptance |")
    print("|---|---|---|---|---|")
    print(f"| exact (brute force) | {t_exact:.1f} | 1.000 | {e_ilisi:.3f} | {e_kbet:.3f} |")
    for m in (1000, 3000, 6000):
        approx, t = timed(nearest_neighbors, Xg, 100, method="sample", reference_cells=m)
        a_ilisi, a_kbet = scores(approx)
        recall = neighbor_recall(approx.first(90), exact.first(90))
        print(
            f"| among {m:,} reference cells | {t:.1f} | {recall:.3f} | {a_ilisi:.3f} | "
            f"{a_kbet:.3f} |"
        )
    if args.nndescent:
        for label, seed in (("first call, with compilation", 0), ("second call", 1)):
            nnd, t = timed(nearest_neighbors, Xg, 100, method="nndescent", seed=seed)
            n_ilisi, n_kbet = scores(nnd)
            recall = neighbor_recall(nnd.first(90), exact.first(90))
            print(
                f"| pynndescent ({label}) | {t:.1f} | {recall:.3f} | {n_ilisi:.3f} | "
                f"{n_kbet:.3f} |"
            )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--types", type=int, default=8)
    parser.add_argument("--labs", type=int, default=2)
    parser.add_argument("--shift", type=float, default=0.3)
    parser.add_argument("--compare-n", type=int, default=40_000)
    parser.add_argument("--nndescent", action="store_true", help="also time pynndescent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--search-only", action="store_true", help="table 2 only")
    args = parser.parse_args()

    from napari_hemofm.core import batch as bm

    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    X, b, y = make_data(args.n, args.dim, args.types, args.labs, args.shift, args.seed)
    print(f"data: {args.n:,} x {args.dim} float32, {args.types} types, {args.labs} labs\n")

    # 1. the whole report
    bm.batch_report(X[:2000], b[:2000], y[:2000], lobo=True)  # warm imports
    if args.search_only:
        return search_table(args, X, b, y)
    rep, t_nolobo = timed(bm.batch_report, X, b, y, lobo=False)
    c_nolobo = timed.cpu
    rep_lobo, t_lobo = timed(bm.batch_report, X, b, y, lobo=True)
    c_lobo = timed.cpu
    _, t_ilisi = timed(bm.ilisi_per_cell, X, b, y)
    c_ilisi = timed.cpu
    lobo = rep_lobo["lobo"]
    methods = {v["neighbors"]["method"] for v in rep["per_label"].values() if v.get("mixing")}
    print(f"load during the runs: {os.getloadavg()[0]:.1f}")
    print("| step | wall (s) | CPU of this process (s) |")
    print("|---|---|---|")
    print(f"| batch_report(lobo=False) | {t_nolobo:.1f} | {c_nolobo:.1f} |")
    print(
        f"| batch_report (LOBO kNN + linear on a seeded sample of {lobo['n_cells']:,} "
        f"cells) | {t_lobo:.1f} | {c_lobo:.1f} |"
    )
    print(f"| ilisi_per_cell (colouring) | {t_ilisi:.1f} | {c_ilisi:.1f} |")
    print(f"neighbour search used: {sorted(methods)}\n")

    search_table(args, X, b, y)

    # 3. metrics: exact vs approximate search
    n = min(args.compare_n, args.n)
    ex = bm.batch_report(X[:n], b[:n], y[:n], lobo=False, neighbor_method="exact")
    ap = bm.batch_report(X[:n], b[:n], y[:n], lobo=False, neighbor_method="sample")
    print(f"metrics of {n:,} cells: exact neighbours vs among 3,000 reference cells per type")
    print("| metric | exact | approximate | difference |")
    print("|---|---|---|---|")
    for key in ("ilisi", "ilisi_raw", "kbet_acceptance", "graph_connectivity"):
        e, a = ex["metrics"][key], ap["metrics"][key]
        print(f"| {key} | {e:.4f} | {a:.4f} | {a - e:+.4f} |")


if __name__ == "__main__":
    main()

"""The first map of a session: first ``compute_umap`` call of a fresh process vs a warm one.

Each row is measured in its own fresh Python process (``subprocess``), which times two
calls of the same size on the same seeded embeddings (clustered, 384-D, like DinoBloom-S):

- ``first``: the first call of the process, ``import umap`` included (what the Cell map's
  first map waited for);
- ``warm``: the second call in the same process (everything compiled);
- ``ratio``: first / warm (issue 13's target: <= 2, goal 1.3).

Scenarios:

- ``before``: the code as it was (umap-learn's own NN-descent, numba compiling in memory);
- ``cold cache``: ``compute_umap`` with an empty numba cache directory (the first map after
  installing: everything compiles once and is written to the cache);
- ``fresh process``: ``compute_umap`` in a new process once the cache holds the code
  (every later session);
- ``after warm-up``: a new process that runs ``warm_up_umap()`` first (what the Cell map
  does in a background thread when it opens) and then times its first real map.

The numba cache goes to a temporary ``NUMBA_CACHE_DIR`` so the runs do not depend on (or
touch) the installed package's cache. Two cores shared with other work make single runs
noisy: compare rows of one run.

Usage::

    python benchmarks/bench_umap_first_call.py                 # 5,000 cells
    python benchmarks/bench_umap_first_call.py --n 20000 --skip-before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
import numpy as np
mode, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(seed)
centres = rng.normal(scale=4.0, size=(12, 384))
X = (centres[rng.integers(0, 12, n)] + rng.normal(size=(n, 384))).astype(np.float32)

def before(X):
    # the code before issue 13: PCA, then umap-learn with its own neighbour search
    import umap
    from napari_hemofm.core.reduce import compute_pca
    Z = compute_pca(X, 50, seed=0)
    r = umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, random_state=0, n_jobs=1)
    return r.fit_transform(Z)

def after(X):
    from napari_hemofm.core.reduce import compute_umap
    return compute_umap(X)

fn = before if mode == "before" else after
warm_up = None
if mode == "warm-up":
    from napari_hemofm.core.reduce import warm_up_umap
    warm_up = warm_up_umap()
t0 = time.perf_counter(); fn(X); first = time.perf_counter() - t0
t0 = time.perf_counter(); fn(X); warm = time.perf_counter() - t0
print(json.dumps({"first": first, "warm": warm, "warm_up": warm_up}))
"""


def run_child(mode: str, n: int, seed: int, cache_dir: str) -> dict:
    """One fresh process; returns its timings."""
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(n), str(seed)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="cells (default 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-before", action="store_true", help="skip the old code's row")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as old_cache, tempfile.TemporaryDirectory() as cache:
        if not args.skip_before:
            # its own empty cache: only pynndescent's cache=True functions may land there
            rows.append(("before", run_child("before", args.n, args.seed, old_cache)))
        rows.append(("cold cache", run_child("after", args.n, args.seed, cache)))
        rows.append(("fresh process", run_child("after", args.n, args.seed, cache)))
        rows.append(("after warm-up", run_child("warm-up", args.n, args.seed, cache)))

    print(f"compute_umap, {args.n:,} cells x 384 dims, {time.strftime('%Y-%m-%d')}, "
          f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}")  # fmt: skip
    head = ("scenario", "first (s)", "warm (s)", "first/warm", "warm-up (s)")
    print(f"{head[0]:<15} {head[1]:>10} {head[2]:>10} {head[3]:>11} {head[4]:>12}")
    for name, r in rows:
        wu = "-" if r["warm_up"] is None else f"{r['warm_up']:.1f}"
        ratio = r["first"] / r["warm"]
        print(f"{name:<15} {r['first']:>10.1f} {r['warm']:>10.1f} {ratio:>11.2f} {wu:>12}")


if __name__ == "__main__":
    main()

"""One correction, end to end through the Python API: relabel -> retrain -> table updated.

This is what a key press in the Review gallery costs before the views redraw:
``Review.relabel`` (label journal write included when the project is saved) and
``Review.retrain`` (snapshot of the pending change, the incremental probe update and the
new predictions written into the cell table). ``bench_probe_retrain.py`` times the probe
alone; this adds the table around it.

Data: seeded Gaussian clusters (8 classes), 100k cells x 384-d float32, 20k labelled; the
table is saved once so every relabel is journalled and fsynced like in the app.

Rows (median and max ms over ``--repeats`` corrections, each a fresh random choice):

- ``relabel 1 labelled``: change the class of one labelled cell;
- ``label 1 unlabelled``: give an unlabelled cell a class;
- ``unlabel 1``: remove a label;
- ``lasso 50``: relabel 50 neighbouring cells at once;
- ``undo``: undo the last step.

``ratio`` is the median over the 1 s target of issue 5 (lower is better).

Run::

    python benchmarks/bench_review_loop.py [--n 100000] [--labelled 20000] [--dim 384]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_MS = 1000.0


def make_table(n: int, n_labelled: int, dim: int, n_classes: int = 8, seed: int = 0):
    """A cell table of ``n`` cells in ``n_classes`` Gaussian clusters, ``n_labelled`` labelled."""
    from napari_hemofm._testing import table_of

    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, size=(n_classes, dim)).astype(np.float32)
    k = rng.integers(0, n_classes, n)
    X = centres[k] + rng.normal(0, 0.6, size=(n, dim)).astype(np.float32)
    table = table_of(
        [f"lab/c{i}#0" for i in range(n)],
        source=np.char.add("smear_", (np.arange(n) // 100).astype(str)),
        batch=np.where(np.arange(n) % 2, "lab_a", "lab_b"),
        embeddings=X,
    )
    names = np.array([f"class_{c}" for c in range(n_classes)], dtype=object)
    chosen = rng.choice(n, n_labelled, replace=False)
    table.set_labels(table.cell_ids[chosen].tolist(), names[k[chosen]].tolist(), origin="imported")
    return table, names, k


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


CHANGES = ("relabel 1 labelled", "label 1 unlabelled", "unlabel 1", "lasso 50", "undo")


def make_step(name: str, review, names: np.ndarray, truth: np.ndarray, rng):
    """The label change ``name`` on a random cell (or 50 neighbours) as a callable."""
    table = review.table
    labelled = np.flatnonzero(table.obs["label"].notna().to_numpy())
    unlabelled = np.flatnonzero(table.obs["label"].isna().to_numpy())
    if name == "relabel 1 labelled":
        row = rng.choice(labelled)
        cur = table.obs["label"].iloc[row]
        new = rng.choice([c for c in names if c != cur])
        return lambda: review.relabel([row], new)
    if name == "label 1 unlabelled":
        row = rng.choice(unlabelled)
        return lambda: review.relabel([row], names[truth[row]])
    if name == "unlabel 1":
        row = rng.choice(labelled)
        return lambda: review.relabel([row], None)
    if name == "lasso 50":
        X = table.embeddings
        centre = X[rng.integers(len(X))]
        rows = np.argsort(((X[:2000] - centre) ** 2).sum(1))[:50]
        new = rng.choice(names)
        return lambda: review.relabel(rows, new)
    review.relabel([rng.choice(unlabelled)], names[0])
    review.retrain()
    return review.undo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--labelled", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--probes", nargs="+", default=["knn", "linear"])
    args = parser.parse_args()

    from napari_hemofm.core.review import Review

    print(
        f"# {platform.processor() or platform.machine()}, {args.n} cells, "
        f"{args.labelled} labelled, {args.dim}-d"
    )
    t0 = time.perf_counter()
    table, names, truth = make_table(args.n, args.labelled, args.dim)
    print(f"# table built in {time.perf_counter() - t0:.1f} s")
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        table.save(Path(tmp) / "p.h5ad")  # from now on every relabel is journalled + fsynced
        for kind in args.probes:
            review = Review(table, probe=kind)
            t_fit = timed(review.retrain)
            rows_out.append((kind, "full fit", t_fit, t_fit))
            rng = np.random.default_rng(1)
            for name in CHANGES:
                times = []
                for _ in range(args.repeats):
                    step = make_step(name, review, names, truth, rng)

                    def correction(step=step, review=review):
                        step()
                        review.retrain()

                    times.append(timed(correction))
                rows_out.append((kind, name, statistics.median(times), max(times)))
            review.close()
    print(f"{'probe':8} {'change':22} {'median ms':>10} {'max ms':>9} {'ratio to 1 s':>13}")
    for kind, name, med, mx in rows_out:
        ratio = "" if name == "full fit" else f"{med / TARGET_MS:.3f}"
        print(f"{kind:8} {name:22} {med:10.1f} {mx:9.1f} {ratio:>13}")


if __name__ == "__main__":
    main()

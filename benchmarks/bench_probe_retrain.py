"""How long one label change takes to refresh every prediction (the review loop's probe).

Target (DESIGN.md): a label change refreshes the predictions of 100k cells in < 1 s.

Data: seeded synthetic Gaussian clusters standing in for DinoBloom-S embeddings:
100,000 cells x 384-d float32, 8 classes with unequal sizes (35 % ... 3 %), class centres
close enough that the probes are not perfect; 20,000 cells labelled at random.

For each probe (``LiveProbe("knn")``: k = 20, Euclidean; ``LiveProbe("linear")``:
logistic regression, lbfgs, C = dim * n_classes / 100) it times

- the full fit (all neighbour lists / the logistic regression from zero, and every
  prediction);
- one label change, ``--reps`` times each on different cells: relabel a labelled cell,
  label an unlabelled cell, remove a label, and a batch of 50 relabels as from a lasso
  (the 50 cells nearest a random cell, labelled or not, all set to one class).

After each change every prediction and confidence of the probe is current (kNN
re-counts only the cells whose labelled neighbours changed, the linear probe
re-predicts all cells). At the end the incrementally updated probe is compared with a
fresh fit on the final labels: the share of cells with the same prediction (and, for
kNN, the same vote share; for linear, the largest probability difference).

The machine is shared: the load average is printed; figures move by +-30 % between runs.

Run:  python benchmarks/bench_probe_retrain.py [--n 100000 --labelled 20000 --dim 384]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

CLASS_SHARES = np.array([0.35, 0.20, 0.12, 0.10, 0.08, 0.07, 0.05, 0.03])


def make_data(
    n: int, dim: int, n_labelled: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings (n, dim) float32, true classes (n,) and the labels (n,) object (None = not)."""
    rng = np.random.default_rng(seed)
    shares = CLASS_SHARES / CLASS_SHARES.sum()
    centres = rng.normal(scale=0.14, size=(len(shares), dim)).astype(np.float32)
    truth = rng.choice(len(shares), size=n, p=shares)
    X = centres[truth] + rng.normal(size=(n, dim)).astype(np.float32)
    names = np.array([f"type_{i}" for i in range(len(shares))], dtype=object)
    labels = np.full(n, None, dtype=object)
    lab = rng.choice(n, n_labelled, replace=False)
    labels[lab] = names[truth[lab]]
    return X, names[truth], labels


def lasso(X: np.ndarray, centre: int, m: int = 50) -> np.ndarray:
    """The ``m`` cells nearest ``centre`` (what a lasso on the map would catch)."""
    d = np.einsum("ij,ij->i", X - X[centre], X - X[centre])
    return np.argpartition(d, m)[:m]


def run(kind: str, X: np.ndarray, truth: np.ndarray, labels: np.ndarray, reps: int, seed: int):
    from napari_hemofm.core.probe import LiveProbe

    rng = np.random.default_rng(seed + 1)
    names = np.array(sorted(set(truth.tolist())), dtype=object)
    labels = labels.copy()
    probe = LiveProbe(kind)
    t0 = time.perf_counter()
    probe.fit(X, labels)
    rows_out = [(kind, "full fit", [time.perf_counter() - t0], len(X), probe.n_iter_)]
    acc = float(np.mean(probe.prediction == truth))

    def other(label):
        return names[
            (np.flatnonzero(names == label)[0] + rng.integers(1, len(names))) % len(names)
        ]

    ops = {
        "relabel a labelled cell": lambda: (
            (r := rng.choice(np.flatnonzero(np.not_equal(labels, None)), 1)),
            [other(labels[r[0]])],
        ),
        "label an unlabelled cell": lambda: (
            (r := rng.choice(np.flatnonzero(np.equal(labels, None)), 1)),
            [truth[r[0]]],
        ),
        "remove a label": lambda: (
            rng.choice(np.flatnonzero(np.not_equal(labels, None)), 1),
            [None],
        ),
        "lasso: 50 cells to one class": lambda: (
            (r := lasso(X, int(rng.integers(len(X))))),
            [names[rng.integers(len(names))]] * len(r),
        ),
    }
    for name, make in ops.items():
        times, changed, iters = [], [], []
        for _ in range(reps):
            r, new = make()
            t0 = time.perf_counter()
            upd = probe.update(r, new)
            times.append(time.perf_counter() - t0)
            labels[r] = new
            changed.append(len(upd.rows))
            iters.append(probe.n_iter_)
        rows_out.append((kind, name, times, int(np.median(changed)), int(np.median(iters))))

    fresh = LiveProbe(kind)
    fresh.fit(X, labels)
    same = float(np.mean(fresh.prediction == probe.prediction))
    ok = ~np.isnan(fresh.confidence)
    if kind == "knn":
        extra = f"same vote share: {np.mean(fresh.confidence[ok] == probe.confidence[ok]):.6f}"
    else:
        extra = f"max |proba diff|: {np.nanmax(np.abs(fresh.proba - probe.proba)):.2e}"
    return rows_out, acc, same, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--labelled", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe", choices=("knn", "linear", "both"), default="both")
    args = parser.parse_args()

    import torch

    torch.zeros(1)  # import and thread-pool start-up are not part of any timing
    X, truth, labels = make_data(args.n, args.dim, args.labelled, args.seed)
    print(
        f"{args.n} cells x {args.dim}-d, {args.labelled} labelled, 8 classes; "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}"
    )
    kinds = ("knn", "linear") if args.probe == "both" else (args.probe,)
    table, summary = [], []
    for kind in kinds:
        rows, acc, same, extra = run(kind, X, truth, labels, args.reps, args.seed)
        table += rows
        summary.append(
            f"{kind}: accuracy of the first fit vs the true classes {acc:.3f}; after all "
            f"updates, same prediction as a fresh fit: {same:.6f}; {extra}"
        )
    print()
    print("| probe | operation | median ms | max ms | median / 1 s | rows changed | lbfgs iter |")
    print("|---|---|---|---|---|---|---|")
    for kind, name, times, changed, iters in table:
        med, worst = 1e3 * np.median(times), 1e3 * np.max(times)
        it = str(iters) if kind == "linear" else "-"
        print(
            f"| {kind} | {name} | {med:.0f} | {worst:.0f} | {med / 1e3:.3f} | {changed} | {it} |"
        )
    print()
    for line in summary:
        print(line)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

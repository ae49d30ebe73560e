"""Do the review queues help on real crops? "Label next" and "Suspect labels".

Data: the two-lab project of ../shared/data (never copied into the repo): ``pbc_dev``
(800 CellaVision crops, 8 classes x 100) and ``bccd_crops`` (283 crops of another lab:
neutrophil 169, eosinophil 67, lymphocyte 29, monocyte 17, basophil 1), embedded with the
``handcrafted`` backend (the DinoBloom weights cannot be downloaded here). Pass
``--project PATH`` to reuse an embedded project (e.g. /work/cache/twolab.h5ad);
otherwise the script runs ``hemofm embed`` into a temporary folder first (~15 s).

(a) "Label next" (:func:`label_next`): a kNN probe (k = 20) trained on all pbc_dev labels
predicts the bccd cells (a new lab). Add 20 bccd labels (their folder names) picked by

- ``queue``: ``label_next`` (least sure, spread by k-means++), in one round of 20, and in
  two rounds of 10 (re-query after the first 10);
- ``random``: 20 bccd cells at random;
- ``lowest margin``: the 20 smallest margins (uncertainty alone, for reference);

then score the bccd cells not labelled in that arm: balanced accuracy over the classes
present among them (the basophil, 1 cell, counts when it is left). Choosing unsure
cells also removes hard cells from the scored set, so "before" is scored on each arm's
own remaining cells and the gain is the difference. Mean and sd over 5 seeds (the seed
of the k-means++ draws / of the random choice).

(b) "Suspect labels" (:func:`suspect_labels`): flip 5 % of the pbc_dev labels (40 cells)
to another class at random, rank the labelled cells by cross-validated disagreement,
and report the precision of the top N (N = 40 = the number flipped, 10, 20, 50), the
recall at N = 40, and the recall and size of the whole suspect list; mean over 5 seeds.
Random ranking would give a precision of 0.05.

Run:  python benchmarks/bench_label_queues.py [--project PATH] [--seeds 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
NEW_LAB, OLD_LAB = "bccd_crops", "pbc_dev"


def load_project(path: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings (n, dim), curated labels (n,) object, batches (n,) object."""
    from napari_hemofm.core.cells import CellTable

    if path is None:
        from napari_hemofm.cli import main as hemofm

        tmp = Path(tempfile.mkdtemp(prefix="hemofm_queues_"))
        path = tmp / "twolab.h5ad"
        inputs = [str(DATA / OLD_LAB), str(DATA / NEW_LAB)]
        if hemofm(["embed", *inputs, "--model", "handcrafted", "--out", str(path)]) != 0:
            sys.exit("embedding failed")
    table = CellTable.load(path)
    obs = table.obs
    labels = obs["label"].astype(object).where(obs["label"].notna(), None).to_numpy()
    return table.embeddings, labels, obs["batch"].astype(str).to_numpy(dtype=object)


def balanced_accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``truth`` (a missing prediction is wrong)."""
    recalls = [np.mean(pred[truth == c] == c) for c in np.unique(truth.astype(str))]
    return float(np.mean(recalls))


def sd(a: np.ndarray) -> str:
    return f" +- {a.std(ddof=1):.3f}" if len(a) > 1 else ""


def queue_experiment(X, truth, batch, *, seeds: int, k: int, kind: str) -> dict[str, list]:
    from napari_hemofm.core.classify import LiveProbe, label_next

    new = np.flatnonzero(batch == NEW_LAB)
    start = np.where(batch == OLD_LAB, truth, None).astype(object)
    base = LiveProbe(kind, k=k)
    base.fit(X, start)
    results: dict[str, list] = {}

    def score(probe, picked):
        left = np.setdiff1d(new, picked)
        return balanced_accuracy(truth[left], probe.prediction[left]), balanced_accuracy(
            truth[left], base.prediction[left]
        )

    def add(probe, rows):
        probe.update(rows, truth[rows])

    for seed in range(seeds):
        arms = {}
        # one round of 20
        p = LiveProbe(kind, k=k)
        p.fit(X, start)
        rows = label_next(p, X, start, 20, seed=seed)
        add(p, rows)
        arms["queue (label_next), 1 x 20"] = score(p, rows)
        # two rounds of 10
        p = LiveProbe(kind, k=k)
        p.fit(X, start)
        labels = start.copy()
        first = label_next(p, X, labels, 10, seed=seed)
        add(p, first)
        labels[first] = truth[first]
        second = label_next(p, X, labels, 10, seed=seed + 1000)
        add(p, second)
        arms["queue (label_next), 2 x 10"] = score(p, np.r_[first, second])
        # random
        rng = np.random.default_rng(seed)
        rows = rng.choice(new, 20, replace=False)
        p = LiveProbe(kind, k=k)
        p.fit(X, start)
        add(p, rows)
        arms["random 20"] = score(p, rows)
        if seed == 0:  # deterministic: once is enough
            p = LiveProbe(kind, k=k)
            p.fit(X, start)
            m = p.margin()
            rows = new[np.argsort(m[new], kind="stable")[:20]]
            add(p, rows)
            arms["lowest margin 20"] = score(p, rows)
        for name, value in arms.items():
            results.setdefault(name, []).append(value)
    results["_before_all"] = [balanced_accuracy(truth[new], base.prediction[new])]
    return results


def suspect_experiment(X, truth, batch, *, seeds: int, k: int, kind: str) -> dict[int, list]:
    from napari_hemofm.core.classify import suspect_labels

    old = np.flatnonzero(batch == OLD_LAB)
    classes = np.unique(truth[old].astype(str))
    out: dict = {}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        labels = np.full(len(X), None, dtype=object)
        labels[old] = truth[old]
        flipped = rng.choice(old, round(0.05 * len(old)), replace=False)
        for r in flipped:
            labels[r] = rng.choice([c for c in classes if c != truth[r]])
        table = suspect_labels(X, labels, kind=kind, k=k, seed=seed)
        hit = np.isin(table["row"].to_numpy(), flipped)
        n_flip = len(flipped)
        for n in (n_flip, 10, 20, 50):
            out.setdefault(("precision", n), []).append(hit[:n].mean() if len(hit) else 0.0)
        out.setdefault(("recall", n_flip), []).append(hit[:n_flip].sum() / n_flip)
        out.setdefault(("recall", "all"), []).append(hit.sum() / n_flip)
        out.setdefault(("size", "all"), []).append(len(table))
        out.setdefault(("fixed", "all"), []).append(
            np.mean(table["suggestion"].to_numpy()[hit] == truth[table["row"].to_numpy()[hit]])
            if hit.any()
            else np.nan
        )
    out["n_flipped"] = n_flip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, help="an embedded two-lab project (.h5ad)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()
    if args.project is None and not (DATA / NEW_LAB).is_dir():
        sys.exit(f"no data at {DATA}: pass --project or provide ../shared/data")
    X, truth, batch = load_project(args.project)
    names, counts = np.unique(batch, return_counts=True)
    sizes = dict(zip(names.tolist(), counts.tolist(), strict=True))
    print(f"{len(X)} cells x {X.shape[1]}-d; batches {sizes}")

    for kind in ("knn", "linear"):
        res = queue_experiment(X, truth, batch, seeds=args.seeds, k=args.k, kind=kind)
        before_all = res.pop("_before_all")[0]
        print(f"\n(a) label next, {kind} probe trained on {OLD_LAB}; {NEW_LAB} balanced accuracy")
        print(f"before any {NEW_LAB} label, on all {NEW_LAB} cells: {before_all:.3f}")
        print("| arm | before (same cells) | after | gain | runs |")
        print("|---|---|---|---|---|")
        for name, values in res.items():
            after = np.array([v[0] for v in values])
            before = np.array([v[1] for v in values])
            gain = after - before
            print(
                f"| {name} | {before.mean():.3f}{sd(before)} | {after.mean():.3f}{sd(after)} "
                f"| {gain.mean():+.3f}{sd(gain)} | {len(values)} |"
            )

    for kind in ("knn", "linear"):
        res = suspect_experiment(X, truth, batch, seeds=args.seeds, k=args.k, kind=kind)
        n_flip = res.pop("n_flipped")
        print(
            f"\n(b) suspect labels, {kind}: {n_flip} of {(batch == OLD_LAB).sum()} {OLD_LAB} "
            f"labels flipped; mean +- sd over {args.seeds} seeds"
        )
        print("| measure | value |")
        print("|---|---|")
        for (what, n), values in res.items():
            v = np.asarray(values, dtype=float)
            label = {
                "precision": f"precision of the top {n}",
                "recall": f"recall of the top {n}" if n != "all" else "recall of all suspects",
                "size": "suspects (all disagreements)",
                "fixed": "flipped suspects whose suggestion is the true class",
            }[what]
            print(f"| {label} | {np.nanmean(v):.3f} +- {np.nanstd(v, ddof=1):.3f} |")


if __name__ == "__main__":
    main()

"""A new lab in 20 clicks: how much do 20 labels of a new lab fix a probe trained elsewhere?

Data: ``pbc_dev`` (800 CellaVision crops, 8 classes, all labelled) and ``bccd_crops``
(283 crops of another lab, labels hidden), embedded with the offline ``handcrafted``
backend into one project (batches ``pbc_dev`` and ``bccd_crops``). Pass
``--project PATH`` to reuse an embedded project; otherwise ``hemofm embed`` runs into
a temporary folder first.

Everything goes through :class:`~napari_hemofm.core.review.Review`, as in the Review
panel: the probe is trained on the PBC labels, then bccd cells are labelled in rounds
of 5 (their folder names play the user) and the probe is retrained after each round:

- ``guided``: ``Review.label_next(5, scope={"batch": "bccd_crops"})`` (scoped to the
  new lab; the first picks cover every class the probe predicts there), queue
  strategy ``--strategy`` (default ``hybrid``);
- ``random``: 5 bccd cells at random per round;

each with the label-aware alignment on (``Review.align_by = "batch"``, the default)
and off (``None``). Score: balanced accuracy on the bccd cells not labelled in that
arm, over the four bccd classes with 17 cells or more (the single basophil is left
out, so chance is 1/4 throughout). Mean +- sd over ``--seeds`` seeds.

``--plot FILE`` draws the learning curve (balanced accuracy vs bccd labels, one panel
per probe). ``--ceiling`` also prints the in-lab ceiling: 5-fold cross-validation on
the bccd cells alone (all labels, the same probes).

Run:  python benchmarks/bench_new_lab.py [--project PATH] [--seeds 5] [--plot FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

NEW_LAB, OLD_LAB = "bccd_crops", "pbc_dev"
SCORED = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")
STEPS = (0, 5, 10, 15, 20, 30, 40)


def load_table(path: Path | None):
    """The two-lab CellTable (embedding it first when no project is given)."""
    from labs import two_lab_project

    from napari_hemofm.core.cells import CellTable

    return CellTable.load(two_lab_project(path))


def balanced_accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over :data:`SCORED` (a missing prediction is wrong)."""
    return float(np.mean([np.mean(pred[truth == c] == c) for c in SCORED]))


def run_arm(table, truth, *, kind: str, arm: str, align: bool, seed: int, strategy: str):
    """Balanced accuracy on the unlabelled new-lab cells after each step of :data:`STEPS`."""
    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.review import Review

    t = CellTable(table.adata.copy())
    batch = t.obs["batch"].astype(str).to_numpy()
    new = np.flatnonzero(batch == NEW_LAB)
    t.set_labels(t.cell_ids[new].tolist(), [None] * len(new))
    review = Review(t, probe=kind)
    review.queue_strategy = strategy
    review.align_by = "batch" if align else None
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    out = []
    review.retrain()
    for i, step in enumerate(STEPS):
        if i:
            want = step - len(picked)
            if arm == "guided":
                ids = review.label_next(
                    want, seed=seed * 100 + i, scope={"batch": NEW_LAB}, strategy=strategy
                )
                rows = t.positions(ids).tolist()
            else:
                rows = rng.choice(np.setdiff1d(new, picked), want, replace=False).tolist()
            picked += rows
            for r in rows:  # one click per cell, as in the gallery
                review.relabel([t.cell_ids[r]], truth[r])
            review.retrain()
        left = np.setdiff1d(new, picked)
        pred = t.obs["prediction"].astype(object).to_numpy()
        out.append(balanced_accuracy(truth[left], pred[left]))
    return out


def ceiling(X: np.ndarray, truth: np.ndarray, batch: np.ndarray) -> dict[str, float]:
    """5-fold CV balanced accuracy on the new lab alone (all its labels)."""
    from napari_hemofm.core.evaluation import evaluate_probe

    keep = (batch == NEW_LAB) & np.isin(truth, SCORED)
    out = {}
    for kind in ("knn", "linear"):
        res = evaluate_probe(X[keep], truth[keep], probe=kind, split="cv")["results"]
        for name, scores in res.items():
            out[name] = scores["balanced_accuracy"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--strategy", default="hybrid", choices=["uncertain", "hybrid", "typical"])
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--ceiling", action="store_true")
    args = parser.parse_args()
    table = load_table(args.project)
    truth = table.obs["label"].astype(object).to_numpy()
    batch = table.obs["batch"].astype(str).to_numpy()
    if args.ceiling:
        print("in-lab ceiling (5-fold CV on bccd alone):", ceiling(table.embeddings, truth, batch))
    curves: dict[tuple[str, str, bool], np.ndarray] = {}
    for kind in ("knn", "linear"):
        for align in (True, False):
            for arm in ("guided", "random"):
                t0 = time.perf_counter()
                runs = [
                    run_arm(
                        table,
                        truth,
                        kind=kind,
                        arm=arm,
                        align=align,
                        seed=s,
                        strategy=args.strategy,
                    )
                    for s in range(args.seeds)
                ]
                curves[kind, arm, align] = np.array(runs)
                a = np.array(runs)
                row = " | ".join(
                    f"{m:.3f} +- {sd:.3f}"
                    for m, sd in zip(a.mean(0), a.std(0, ddof=1), strict=True)
                )
                print(
                    f"| {kind} | {arm} | {'aligned' if align else 'raw'} | {row} | "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, kind in zip(axes, ("knn", "linear"), strict=True):
            for (k, arm, align), a in curves.items():
                if k != kind:
                    continue
                style = "-" if align else ":"
                colour = "C0" if arm == "guided" else "C1"
                label = f"{'Label next (scoped)' if arm == 'guided' else 'random'}, "
                label += "aligned" if align else "no alignment"
                m, sd = a.mean(0), a.std(0, ddof=1)
                ax.plot(STEPS, m, style, color=colour, marker="o", ms=3, label=label)
                ax.fill_between(STEPS, m - sd, m + sd, color=colour, alpha=0.1)
            ax.axhline(0.25, color="grey", lw=0.8, ls="--")
            ax.axvline(20, color="grey", lw=0.5)
            ax.set_title(f"{'kNN k=20' if kind == 'knn' else 'linear'}: PBC probe on bccd_crops")
            ax.set_xlabel("bccd labels added")
        axes[0].set_ylabel("balanced accuracy, unlabelled bccd cells")
        axes[1].legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()

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

``--plot DIR`` also writes two figures (the tables are unchanged):

- ``probes_label_next.png``: a learning curve on bccd_crops: balanced accuracy on the
  bccd cells not yet labelled vs the number of bccd labels added (0, 5, 10, 15, 20, 30,
  40), ``label_next`` in rounds of 5 (re-asked after each round) vs random, mean +- sd
  over the seeds, one panel per probe (kNN k = ``--k``, linear). Scored over the bccd
  classes with >= 10 cells (not the single basophil), so chance stays 1/4 even when an
  arm labels the basophil; the curve's table is printed too;
- ``probes_suspects.png``: precision of the top N suspects vs N after the 5 % flips of
  (b), kNN and linear, mean +- sd over the seeds (N up to the shortest suspect list).

``--strategy hybrid`` runs the queue arms with ``label_next(..., strategy="hybrid")``
(half of the pool least sure, half novel cells far from every labelled cell).

Run:  python benchmarks/bench_label_queues.py [--project PATH] [--seeds 5] [--plot DIR]
      [--strategy uncertain|hybrid]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
NEW_LAB, OLD_LAB = "bccd_crops", "pbc_dev"


def load_project(path: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings (n, dim), curated labels (n,) object, batches (n,) object."""
    from labs import two_lab_project

    from napari_hemofm.core.cells import CellTable

    table = CellTable.load(two_lab_project(path))
    obs = table.obs
    labels = obs["label"].astype(object).where(obs["label"].notna(), None).to_numpy()
    return table.embeddings, labels, obs["batch"].astype(str).to_numpy(dtype=object)


def balanced_accuracy(truth: np.ndarray, pred: np.ndarray, classes=None) -> float:
    """Mean recall over the classes present in ``truth`` (a missing prediction is wrong).

    ``classes``: score only these (those of them present in ``truth``); default all.
    """
    present = np.unique(truth.astype(str))
    if classes is not None:
        present = [c for c in present if c in set(classes)]
    recalls = [np.mean(pred[truth == c] == c) for c in present]
    return float(np.mean(recalls))


def sd(a: np.ndarray) -> str:
    return f" +- {a.std(ddof=1):.3f}" if len(a) > 1 else ""


def queue_experiment(
    X, truth, batch, *, seeds: int, k: int, kind: str, strategy: str = "uncertain"
) -> dict[str, list]:
    from napari_hemofm.core.probe import LiveProbe
    from napari_hemofm.core.queues import label_next

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
        rows = label_next(p, X, start, 20, seed=seed, strategy=strategy)
        add(p, rows)
        arms["queue (label_next), 1 x 20"] = score(p, rows)
        # two rounds of 10
        p = LiveProbe(kind, k=k)
        p.fit(X, start)
        labels = start.copy()
        first = label_next(p, X, labels, 10, seed=seed, strategy=strategy)
        add(p, first)
        labels[first] = truth[first]
        second = label_next(p, X, labels, 10, seed=seed + 1000, strategy=strategy)
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
    from napari_hemofm.core.queues import suspect_labels

    old = np.flatnonzero(batch == OLD_LAB)
    classes = np.unique(truth[old].astype(str))
    out: dict = {}
    hits: list[np.ndarray] = []  # per seed: is the i-th suspect a flipped label? (bool)
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        labels = np.full(len(X), None, dtype=object)
        labels[old] = truth[old]
        flipped = rng.choice(old, round(0.05 * len(old)), replace=False)
        for r in flipped:
            labels[r] = rng.choice([c for c in classes if c != truth[r]])
        table = suspect_labels(X, labels, kind=kind, k=k, seed=seed)
        hit = np.isin(table["row"].to_numpy(), flipped)
        hits.append(hit)
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
    out["hits"] = hits
    return out


STEPS = (0, 5, 10, 15, 20, 30, 40)
MIN_SCORED = 10  # learning curve: score the new-lab classes with at least this many cells


def scored_classes(truth: np.ndarray, batch: np.ndarray) -> list[str]:
    """New-lab classes with at least ``MIN_SCORED`` cells (drops bccd's single basophil).

    Scoring "the classes present among the unlabelled cells" would make the chance
    level jump from 1/5 to 1/4 in any arm that labels the one basophil (the queue
    often does); a fixed set of classes keeps every point of the curve comparable.
    """
    names, counts = np.unique(truth[batch == NEW_LAB].astype(str), return_counts=True)
    return [c for c, n in zip(names.tolist(), counts.tolist(), strict=True) if n >= MIN_SCORED]


def learning_curve(
    X,
    truth,
    batch,
    *,
    seeds: int,
    k: int,
    kind: str,
    steps=STEPS,
    round_size: int = 5,
    strategy: str = "uncertain",
) -> dict[str, np.ndarray]:
    """Balanced accuracy on the unlabelled new-lab cells as new-lab labels are added.

    Starts from a probe trained on all old-lab labels. ``label next``: rounds of
    ``round_size`` cells from :func:`label_next`, re-asked after each round (seed
    ``seed + 1000 * labels added so far``); ``random``: the first cells of a random order
    of the new-lab cells (seed ``10000 + seed``). Each arm is scored on the new-lab cells
    it has not labelled, over :func:`scored_classes` (every new-lab cell, scored or not,
    can be labelled and votes once labelled).

    Returns
    -------
    dict of str to ndarray of shape (seeds, len(steps))
        Balanced accuracy (higher is better) per arm, seed and step.
    """
    from napari_hemofm.core.probe import LiveProbe
    from napari_hemofm.core.queues import label_next

    new = np.flatnonzero(batch == NEW_LAB)
    start = np.where(batch == OLD_LAB, truth, None).astype(object)
    scored = scored_classes(truth, batch)
    steps = list(steps)
    out = {arm: np.full((seeds, len(steps)), np.nan) for arm in ("label next", "random")}
    for seed in range(seeds):
        order = np.random.default_rng(10_000 + seed).permutation(new)
        for arm in out:
            probe = LiveProbe(kind, k=k)
            probe.fit(X, start)
            labels = start.copy()
            done = 0
            for j, step in enumerate(steps):
                while done < step:
                    take = min(round_size, step - done)
                    if arm == "random":
                        rows = order[done : done + take]
                    else:
                        rows = label_next(
                            probe, X, labels, take, seed=seed + 1000 * done, strategy=strategy
                        )
                    probe.update(rows, truth[rows])
                    labels[rows] = truth[rows]
                    done += take
                left = new[np.equal(labels[new], None)]
                out[arm][seed, j] = balanced_accuracy(
                    truth[left], probe.prediction[left], classes=scored
                )
    return out


def _mean_sd(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd (ddof 1; 0 for one run) over the rows of ``values`` (runs, points)."""
    spread = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1])
    return values.mean(axis=0), spread


def _band(ax, x, values: np.ndarray, **style) -> None:
    """Mean line and a mean +- sd band (clipped to [0, 1]) of ``values`` (runs, len(x))."""
    mean, spread = _mean_sd(values)
    (line,) = ax.plot(x, mean, **style)
    low, high = np.clip(mean - spread, 0, 1), np.clip(mean + spread, 0, 1)
    ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, lw=0)


def plot_figures(
    out: Path, curves: dict, suspects: dict, *, steps, scored: list[str], k: int, seeds: int
) -> None:
    """Write ``probes_label_next.png`` and ``probes_suspects.png`` into ``out``.

    ``curves``: per probe kind, :func:`learning_curve`'s result; ``suspects``: per kind,
    ``hits`` (one bool array per seed, suspect list order), ``n_flipped`` and ``n_old``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    size, dpi = (1000 / 110, 450 / 110), 110
    source = "handcrafted features; PBC (CellaVision) \u2192 BCCD"
    names = {"knn": f"kNN probe (k = {k}, as DinoBloom)", "linear": "linear probe"}
    with plt.rc_context({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 10}):
        fig, axes = plt.subplots(1, len(curves), figsize=size, sharey=True)
        axes = np.atleast_1d(axes)
        for ax, (kind, arms) in zip(axes, curves.items(), strict=True):
            label = "Label next (rounds of 5)"
            _band(ax, steps, arms["label next"], marker="o", ms=4, label=label)
            _band(ax, steps, arms["random"], marker="s", ms=4, label="random cells")
            n = len(scored)
            ax.axhline(1 / n, ls="--", color="grey", lw=1, label=f"chance (1/{n})")
            ax.set_title(names[kind])
            ax.set_xlabel(f"{NEW_LAB} labels added")
            ax.set_xticks(steps)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(f"balanced accuracy,\nunlabelled {NEW_LAB} cells")
        axes[0].legend(loc="upper left")
        fig.suptitle(
            f"Label next on a new lab ({source})\nscored over {', '.join(scored)}; "
            f"mean \u00b1 sd over {seeds} seeds",
            fontsize=12,
        )
        fig.tight_layout()
        fig.savefig(out / "probes_label_next.png", dpi=dpi)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=size)
        first = next(iter(suspects.values()))
        n_flip, n_old = first["n_flipped"], first["n_old"]
        for kind, res in suspects.items():
            stop = min(100, *(len(h) for h in res["hits"]))  # the shortest list ends here
            x = np.arange(1, stop + 1)
            prec = np.array([np.cumsum(h[:stop]) / x for h in res["hits"]])
            _band(ax, x, prec, label=names[kind])
        ax.axhline(n_flip / n_old, ls="--", color="grey", lw=1, label="random ranking (5 %)")
        ax.axvline(n_flip, ls=":", color="black", lw=1, label=f"N = {n_flip} (labels flipped)")
        ax.set_xlabel("N (top N of the suspect list; each curve stops at its shortest list)")
        ax.set_ylabel("precision of the top N\n(share that are flipped)")
        ax.set_ylim(0, 1.05)
        ax.set_xlim(0, None)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", bbox_to_anchor=(0, 0.1))
        ax.set_title(
            f"Suspect labels: {n_flip} of {n_old} {OLD_LAB} labels flipped at random\n"
            f"({source}; mean \u00b1 sd over {seeds} seeds)"
        )
        fig.tight_layout()
        fig.savefig(out / "probes_suspects.png", dpi=dpi)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, help="an embedded two-lab project (.h5ad)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--plot", type=Path, metavar="DIR", help="also write the two figures")
    parser.add_argument(
        "--strategy",
        choices=("uncertain", "hybrid"),
        default="uncertain",
        help="label_next's pool (default: the library default, uncertain)",
    )
    args = parser.parse_args()
    if args.project is None and not (DATA / NEW_LAB).is_dir():
        sys.exit(f"no data at {DATA}: pass --project or provide ../shared/data")
    X, truth, batch = load_project(args.project)
    names, counts = np.unique(batch, return_counts=True)
    sizes = dict(zip(names.tolist(), counts.tolist(), strict=True))
    print(f"{len(X)} cells x {X.shape[1]}-d; batches {sizes}; strategy {args.strategy!r}")

    for kind in ("knn", "linear"):
        res = queue_experiment(
            X, truth, batch, seeds=args.seeds, k=args.k, kind=kind, strategy=args.strategy
        )
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

    suspects = {}
    for kind in ("knn", "linear"):
        res = suspect_experiment(X, truth, batch, seeds=args.seeds, k=args.k, kind=kind)
        n_flip = res.pop("n_flipped")
        suspects[kind] = {
            "hits": res.pop("hits"),
            "n_flipped": n_flip,
            "n_old": int((batch == OLD_LAB).sum()),
        }
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

    if args.plot is not None:
        curves = {}
        for kind in ("knn", "linear"):
            curves[kind] = learning_curve(
                X, truth, batch, seeds=args.seeds, k=args.k, kind=kind, strategy=args.strategy
            )
            print(
                f"\nlearning curve, {kind}: balanced accuracy on unlabelled {NEW_LAB} over "
                f"{', '.join(scored_classes(truth, batch))}; mean +- sd over {args.seeds} seeds"
            )
            print("| arm | " + " | ".join(str(s) for s in STEPS) + " |")
            print("|---|" + "---|" * len(STEPS))
            for arm, values in curves[kind].items():
                cells = (f"{m:.3f} +- {d:.3f}" for m, d in zip(*_mean_sd(values), strict=True))
                print(f"| {arm} | " + " | ".join(cells) + " |")
        plot_figures(
            args.plot,
            curves,
            suspects,
            steps=list(STEPS),
            scored=scored_classes(truth, batch),
            k=args.k,
            seeds=args.seeds,
        )
        print(f"\nfigures written to {args.plot}")


if __name__ == "__main__":
    main()

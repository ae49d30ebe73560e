"""Accuracy and speed of the ``handcrafted`` backbone on real crops (DinoBloom protocol).

Reads ../shared/data relative to the repository root (never copied into the repo):

- ``pbc_dev`` (800 crops, 8 classes): 5-fold StratifiedKFold (no shuffle) on the raw
  vectors, no standardisation: kNN k=20 and k=1 (uniform, Euclidean) and logistic
  regression (lbfgs, C = dim * n_classes / 100, max_iter 1000). Balanced accuracy,
  accuracy and weighted F1 averaged over folds; per-class recall of kNN k=20 from the
  out-of-fold predictions.
- cross-lab: kNN k=20 fitted on all of pbc_dev, tested on ``bccd_crops`` (another lab,
  Wright-Giemsa). Balanced accuracy over the 4 classes BCCD has enough of (neutrophil,
  eosinophil, lymphocyte, monocyte; 1 basophil) and accuracy over all 283 crops, with
  the kNN fitted on all 8 PBC classes and on the 5 shared ones only.
- speed: crops per second on one thread, and with a thread pool, on decoded crops.

Run:  python benchmarks/bench_handcrafted_pbc.py [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SCORABLE = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")
SHARED = ("basophil", *SCORABLE)


def load_crops(folder: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Every image under ``folder/<class>/``, labelled by its folder, in sorted order."""
    from napari_hemofm.core.io import is_image_file, read_image

    crops, labels = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(class_dir.iterdir()):
            if is_image_file(path):
                crops.append(np.asarray(read_image(path)))
                labels.append(class_dir.name)
    return crops, np.asarray(labels)


def cv_scores(X: np.ndarray, y: np.ndarray) -> tuple[dict[str, dict[str, float]], np.ndarray]:
    """The DinoBloom probes under 5-fold stratified CV; also kNN-20 out-of-fold predictions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    n_classes = len(np.unique(y))
    probes = {
        "knn_k20": lambda: KNeighborsClassifier(n_neighbors=20),
        "knn_k1": lambda: KNeighborsClassifier(n_neighbors=1),
        "linear": lambda: LogisticRegression(C=X.shape[1] * n_classes / 100, max_iter=1000),
    }
    scores: dict[str, dict[str, list[float]]] = {
        k: {"balanced_accuracy": [], "accuracy": [], "weighted_f1": []} for k in probes
    }
    oof = np.empty(len(y), dtype=y.dtype)
    for train, test in StratifiedKFold(n_splits=5).split(X, y):
        for name, make in probes.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # lbfgs convergence on unscaled features
                pred = make().fit(X[train], y[train]).predict(X[test])
            s = scores[name]
            s["balanced_accuracy"].append(balanced_accuracy_score(y[test], pred))
            s["accuracy"].append(accuracy_score(y[test], pred))
            s["weighted_f1"].append(f1_score(y[test], pred, average="weighted"))
            if name == "knn_k20":
                oof[test] = pred
    means = {k: {m: float(np.mean(v)) for m, v in s.items()} for k, s in scores.items()}
    return means, oof


def recall_table(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> list[str]:
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y, pred, labels=classes)
    head = "| true \\ predicted | " + " | ".join(c[:5] for c in classes) + " | recall |"
    lines = [head, "|" + "---|" * (len(classes) + 2)]
    for i, c in enumerate(classes):
        n = cm[i].sum()
        recall = f"{cm[i, i] / n:.2f}" if n else "-"
        lines.append(f"| {c} (n={n}) | " + " | ".join(map(str, cm[i])) + f" | {recall} |")
    return lines


def cross_lab(
    Xp: np.ndarray, yp: np.ndarray, Xb: np.ndarray, yb: np.ndarray
) -> tuple[list[str], dict[str, np.ndarray]]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.neighbors import KNeighborsClassifier

    scorable = np.isin(yb, SCORABLE)
    lines = [
        "| kNN k=20 fitted on | balanced acc. (4 classes) | accuracy (all 283) |",
        "|---|---|---|",
    ]
    preds = {}
    for label, keep in (
        ("pbc_dev, 8 classes", np.ones(len(yp), bool)),
        ("pbc_dev, 5 shared classes", np.isin(yp, SHARED)),
    ):
        pred = KNeighborsClassifier(n_neighbors=20).fit(Xp[keep], yp[keep]).predict(Xb)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # predictions outside the 4 scored classes
            bacc = balanced_accuracy_score(yb[scorable], pred[scorable])
        lines.append(f"| {label} | {bacc:.3f} | {accuracy_score(yb, pred):.3f} |")
        preds[label] = pred
    return lines, preds


GROUPS = {
    "size (red-cell units)": lambda n: n.endswith("_rbc") and "diameter" in n,
    "N/C ratio + nucleus shape": lambda n: (
        n.startswith(("nucleus_cell", "nucleus_sol"))
        or n in ("nucleus_circularity", "nucleus_thickness", "nucleus_lobes")
    ),
    "OD in red-cell units": lambda n: "_od_rbc_" in n,
    "OD relative to the nucleus": lambda n: "_relod_" in n,
    "cytoplasm hue (mean)": lambda n: "logchroma" in n,
    "cytoplasm hue histogram": lambda n: "chroma_hist" in n,
    "texture (DoG, GLCM)": lambda n: "_dog_" in n or "glcm" in n,
}


def by_group(Xp: np.ndarray, yp: np.ndarray, Xb: np.ndarray, yb: np.ndarray) -> list[str]:
    """Which feature groups carry over to the other lab (kNN-20 on that group alone)."""
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    from napari_hemofm.core.features import FEATURE_NAMES

    keep, scorable = np.isin(yp, SHARED), np.isin(yb, SCORABLE)
    lines = [
        "| features alone | dims | pbc_dev CV bal. acc. | cross-lab bal. acc. (4) |",
        "|---|---|---|---|",
    ]
    for name, test in GROUPS.items():
        cols = [i for i, n in enumerate(FEATURE_NAMES) if test(n)]
        knn = KNeighborsClassifier(n_neighbors=20)
        oof = cross_val_predict(knn, Xp[:, cols], yp, cv=StratifiedKFold(5))
        pred = knn.fit(Xp[keep][:, cols], yp[keep]).predict(Xb[:, cols])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cross = balanced_accuracy_score(yb[scorable], pred[scorable])
        lines.append(
            f"| {name} | {len(cols)} | {balanced_accuracy_score(yp, oof):.3f} | {cross:.3f} |"
        )
    return lines


def within_lab(Xb: np.ndarray, yb: np.ndarray) -> str:
    """kNN-20 5-fold CV inside bccd_crops (its 4 scorable classes): the features' use there."""
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    keep = np.isin(yb, SCORABLE)
    scores = {}
    for k in (20, 5):
        pred = cross_val_predict(
            KNeighborsClassifier(n_neighbors=k), Xb[keep], yb[keep], cv=StratifiedKFold(5)
        )
        scores[k] = balanced_accuracy_score(yb[keep], pred)
    return (
        f"within bccd_crops (5-fold CV, 4 classes, {keep.sum()} crops): balanced accuracy "
        f"kNN k=20 {scores[20]:.3f}, k=5 {scores[5]:.3f}"
    )


def speed(crops: list[np.ndarray], threads: int) -> list[str]:
    """Crops per second on decoded crops: wall clock, and per CPU second on one thread
    (the CPU figure does not move when other programs share the cores)."""
    from napari_hemofm.core.features import HandcraftedBackbone

    bb = HandcraftedBackbone()
    sample = crops[:: max(1, len(crops) // 200)]
    bb.embed_crops(sample[:5])  # warm-up (imports)
    wall, cpu = time.perf_counter(), time.process_time()
    bb.embed_crops(sample)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    t = time.perf_counter()
    bb.embed_crops(crops, n_threads=threads)
    many = len(crops) / (time.perf_counter() - t)
    return [
        "| extraction | crops/s |",
        "|---|---|",
        f"| 1 thread, per CPU second ({len(sample)} crops) | {len(sample) / cpu:.0f} |",
        f"| 1 thread, wall clock | {len(sample) / wall:.0f} |",
        f"| {threads} threads, wall clock ({len(crops)} crops) | {many:.0f} |",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    pbc, bccd = DATA / "pbc_dev", DATA / "bccd_crops"
    if not pbc.is_dir():
        print(f"no data: {pbc} is missing (see ../shared/data/README.md)")
        return 1
    from napari_hemofm.core.features import FEATURE_VERSION, INPUT_SIZE, HandcraftedBackbone

    bb = HandcraftedBackbone()
    print(f"handcrafted features v{FEATURE_VERSION}: dim {bb.dim}, input size {INPUT_SIZE}\n")

    crops, y = load_crops(pbc)
    t = time.perf_counter()
    X = bb.embed_crops(crops, n_threads=args.threads)
    print(
        f"pbc_dev: {len(y)} crops, {len(set(y))} classes, embedded in "
        f"{time.perf_counter() - t:.1f} s ({args.threads} threads)\n"
    )
    means, oof = cv_scores(X, y)
    print("5-fold StratifiedKFold (no shuffle), raw features, mean over folds\n")
    print("| probe | balanced accuracy | accuracy | weighted F1 |")
    print("|---|---|---|---|")
    for name, s in means.items():
        print(
            f"| {name} | {s['balanced_accuracy']:.3f} | {s['accuracy']:.3f} "
            f"| {s['weighted_f1']:.3f} |"
        )
    print("\nkNN k=20, out-of-fold predictions\n")
    print("\n".join(recall_table(y, oof, sorted(set(y)))))

    if bccd.is_dir():
        bcrops, yb = load_crops(bccd)
        Xb = bb.embed_crops(bcrops, n_threads=args.threads)
        lines, preds = cross_lab(X, y, Xb, yb)
        print(f"\ncross-lab: fit on pbc_dev, test on bccd_crops ({len(yb)} crops)\n")
        print("\n".join(lines))
        print("\nkNN k=20 fitted on the 5 shared classes\n")
        print("\n".join(recall_table(yb, preds["pbc_dev, 5 shared classes"], list(SHARED))))
        print("\nwhat carries over: kNN k=20 on one feature group, fitted on the shared classes\n")
        print("\n".join(by_group(X, y, Xb, yb)))
        print("\n" + within_lab(Xb, yb))
    else:
        print(f"\n(cross-lab skipped: {bccd} is missing)")

    print()
    print("\n".join(speed(crops, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

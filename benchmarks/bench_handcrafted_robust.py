"""Does the ``handcrafted`` backbone survive another lab? In-domain and cross-lab accuracy.

Two real labs (``pbc_dev``: PBC, CellaVision, May-Gruenwald-Giemsa, 360 px;
``bccd_crops``: BCCD, Wright-Giemsa, 130-330 px tight crops) and four simulated looks
of each (``benchmarks/labs.py``: tinted stain, yellowed glass, blurred, 120 px), made
in memory from the same cells and never written to the repository.

For every lab x look (kNN k=20, raw vectors, the DinoBloom protocol):

- *in-domain*: 5-fold ``StratifiedKFold`` balanced accuracy inside that lab and look
  (PBC: 8 classes; BCCD: its 4 classes with >= 5 cells);
- *cross-lab*: fitted on one original lab's 5 shared classes (basophil, eosinophil,
  lymphocyte, monocyte, neutrophil), tested on every look of the *other* lab, and of
  its own lab (train on the original, test on the tinted / yellowed / ... copy of the
  same cells: the stain / optics shift alone). Balanced accuracy over the test lab's
  shared classes with >= 5 cells.

``--stain-norm`` embeds every crop after stain normalisation (built-in reference).
Embeddings are cached in /tmp by code hash (``labs.py``). Run from the repository root:

    python benchmarks/bench_handcrafted_robust.py [--stain-norm none|reinhard|macenko]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from labs import LABS, MIN_SCORED, SHARED, VARIANTS, embed_variant, load_lab


def cv_bacc(X: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    classes, counts = np.unique(y, return_counts=True)
    keep = np.isin(y, classes[counts >= MIN_SCORED])
    pred = cross_val_predict(
        KNeighborsClassifier(n_neighbors=20), X[keep], y[keep], cv=StratifiedKFold(5)
    )
    return float(balanced_accuracy_score(y[keep], pred))


def transfer_bacc(Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, yte: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.neighbors import KNeighborsClassifier

    fit = np.isin(ytr, SHARED)
    classes, counts = np.unique(yte[np.isin(yte, SHARED)], return_counts=True)
    scored = np.isin(yte, classes[counts >= MIN_SCORED])
    pred = KNeighborsClassifier(n_neighbors=20).fit(Xtr[fit], ytr[fit]).predict(Xte[scored])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # predictions outside the scored classes
        return float(balanced_accuracy_score(yte[scored], pred))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stain-norm", default="none", choices=("none", "reinhard", "macenko"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    t0 = time.perf_counter()
    data = {lab: load_lab(lab) for lab in LABS}
    X = {
        (lab, v): embed_variant(
            lab, v, data[lab][0], stain_norm=args.stain_norm, threads=args.threads
        )
        for lab in LABS
        for v in VARIANTS
    }
    y = {lab: data[lab][1] for lab in LABS}
    print(
        f"stain normalisation: {args.stain_norm}; "
        f"embedded / loaded in {time.perf_counter() - t0:.0f} s"
    )
    print()
    print("| test lab | look | in-domain CV | from pbc_dev | from bccd_crops |")
    print("|---|---|---|---|---|")
    for lab in LABS:
        for v in VARIANTS:
            row = [f"{cv_bacc(X[lab, v], y[lab]):.3f}"]
            for src in LABS:
                if src == lab and v == "original":
                    row.append("-")  # the training cells themselves
                    continue
                row.append(f"{transfer_bacc(X[src, 'original'], y[src], X[lab, v], y[lab]):.3f}")
            print(f"| {lab} | {v} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

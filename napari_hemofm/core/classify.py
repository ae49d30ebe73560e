"""Probes on embeddings: the DinoBloom evaluation protocol (kNN and linear probe).

The protocol follows DinoBloom's ``dinov2/eval/general_patch_eval.py`` (see
``../shared/docs/dinobloom.md`` section 4): features are used raw (no scaling);
kNN with k = 20 and k = 1, uniform weights, Euclidean distance; logistic regression
with lbfgs, ``C = dim * n_classes / 100``, ``max_iter = 1000``; 5-fold stratified
cross-validation without shuffling, or leave-one-batch-out; accuracy, balanced
accuracy and weighted F1, averaged over folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

Probe = Literal["knn", "linear"]
Split = Literal["cv", "batch"]

KNN_KS = (20, 1)
"""Neighbour counts of the kNN probe, as DinoBloom reports them (``knn_k20``, ``knn_k1``)."""


def linear_probe_c(dim: int, n_classes: int) -> float:
    """DinoBloom's inverse regularisation strength for the linear probe.

    Parameters
    ----------
    dim : int
        Embedding dimension M.
    n_classes : int
        Number of classes.

    Returns
    -------
    float
        ``C = M * n_classes / 100`` (e.g. 384 * 21 / 100 = 80.64).
    """
    return dim * n_classes / 100.0


def make_probe(probe: Probe, *, dim: int, n_classes: int, k: int = 20) -> Any:
    """An unfitted scikit-learn estimator for ``probe`` with DinoBloom's settings.

    Parameters
    ----------
    probe : {"knn", "linear"}
    dim, n_classes : int
        Embedding dimension and number of classes (for the linear probe's C).
    k : int
        Neighbours for the kNN probe.
    """
    if probe == "knn":
        from sklearn.neighbors import KNeighborsClassifier

        return KNeighborsClassifier(n_neighbors=k, weights="uniform", metric="minkowski", p=2)
    if probe == "linear":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=linear_probe_c(dim, n_classes), max_iter=1000, solver="lbfgs")
    raise ValueError(f"probe must be 'knn' or 'linear', got {probe!r}")


def _scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            # a class missing from a test fold is expected in leave-one-batch-out
            warnings.simplefilter("ignore", UserWarning)
            return {
                "accuracy": float(accuracy_score(y_true, y_pred)),
                "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
                "weighted_f1": float(f1_score(y_true, y_pred, average="weighted")),
            }


def _splits(
    labels: np.ndarray, split: Split, batches: np.ndarray | None, n_splits: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    if split == "cv":
        from sklearn.model_selection import StratifiedKFold

        _, counts = np.unique(labels, return_counts=True)
        if counts.min() < n_splits:
            raise ValueError(
                f"{n_splits}-fold stratified CV needs >= {n_splits} labelled cells per class; "
                f"the smallest class has {counts.min()}"
            )
        folds = StratifiedKFold(n_splits=n_splits, shuffle=False)
        return list(folds.split(np.zeros(len(labels)), labels))
    if split == "batch":
        if batches is None:
            raise ValueError("split='batch' needs the batch of each cell")
        names = list(dict.fromkeys(batches.tolist()))
        if len(names) < 2:
            raise ValueError(f"leave-one-batch-out needs >= 2 batches; got {names}")
        return [(np.flatnonzero(batches != b), np.flatnonzero(batches == b)) for b in names]
    raise ValueError(f"split must be 'cv' or 'batch', got {split!r}")


def evaluate_probe(
    X: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    *,
    probe: Probe = "knn",
    split: Split = "cv",
    batches: Sequence[str] | np.ndarray | None = None,
    n_splits: int = 5,
) -> dict[str, Any]:
    """Score a probe on labelled embeddings with the DinoBloom protocol.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings, used raw.
    labels : array-like of shape (n_cells,)
        Class of each cell; cells with a missing label (None / NaN / "") are left out.
    probe : {"knn", "linear"}
        ``"knn"`` scores k = 20 and k = 1 (uniform, Euclidean); ``"linear"`` is
        logistic regression (lbfgs, C = dim * n_classes / 100, max_iter 1000).
    split : {"cv", "batch"}
        ``"cv"``: stratified k-fold without shuffling; ``"batch"``: leave one batch out
        (each batch is the test set once).
    batches : array-like of shape (n_cells,), optional
        Batch of each cell (needed for ``split="batch"``; reported for ``"cv"``).
    n_splits : int
        Folds for ``split="cv"``.

    Returns
    -------
    dict
        ``{"probe", "split", "n_cells", "classes", "results": {name: {"accuracy",
        "balanced_accuracy", "weighted_f1"}}}`` with names ``knn_k20`` and ``knn_k1``,
        or ``linear``; each metric is the mean over folds (higher is better). With
        ``split="batch"`` there is also ``"per_batch"``: the scores on each held-out batch.

    Raises
    ------
    ValueError
        If fewer than two classes are labelled, lengths differ, a class is too small
        for the folds, or embeddings contain NaN (cells not embedded yet).
    """
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(labels, dtype=object)
    if X.ndim != 2 or X.shape[0] != len(y):
        raise ValueError(f"X has shape {X.shape} but there are {len(y)} labels")
    keep = np.array([not _missing(v) for v in y], dtype=bool)
    if batches is not None:
        batches = np.asarray(batches, dtype=object)
        if len(batches) != len(y):
            raise ValueError(f"{len(batches)} batches for {len(y)} cells")
        batches = batches[keep]
    X, y = X[keep], y[keep].astype(str)
    if not np.isfinite(X).all():
        raise ValueError("some labelled cells have no embedding (NaN): embed them first")
    classes = sorted(set(y.tolist()))
    if len(classes) < 2:
        raise ValueError(f"need >= 2 labelled classes to evaluate; got {classes}")
    folds = _splits(y, split, batches, n_splits)
    names = [f"knn_k{k}" for k in KNN_KS] if probe == "knn" else ["linear"]
    per_fold: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for train, test in folds:
        for name in names:
            k = int(name.removeprefix("knn_k")) if probe == "knn" else 20
            est = make_probe(probe, dim=X.shape[1], n_classes=len(classes), k=k)
            est.fit(X[train], y[train])
            per_fold[name].append(_scores(y[test], est.predict(X[test])))
    results = {
        name: {m: float(np.mean([f[m] for f in folds_])) for m in folds_[0]}
        for name, folds_ in per_fold.items()
    }
    out: dict[str, Any] = {
        "probe": probe,
        "split": split,
        "n_cells": len(y),
        "classes": classes,
        "results": results,
    }
    if split == "batch":
        held = list(dict.fromkeys(batches.tolist()))
        out["per_batch"] = {
            str(b): {name: per_fold[name][i] for name in names} for i, b in enumerate(held)
        }
    return out


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()

"""The DinoBloom evaluation protocol and cross-validated scores of the review probe.

:func:`evaluate_probe` scores a probe once, as the DinoBloom paper does
(``hemofm eval``, the batch report's leave-one-batch-out probes).
:func:`probe_metrics` cross-validates the review loop's probe on the labelled cells
(the Review panel's metrics); :func:`cv_proba` gives its out-of-fold probabilities,
which :func:`~.queues.suspect_labels` ranks. See ``docs/probes.md``.

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

from napari_hemofm.core.labels import is_unlabelled
from napari_hemofm.core.probe import (
    Metric,
    Probe,
    _as_embeddings,
    _clean_labels,
    _knn_search,
    _one_blas_thread,
    _top,
    _vote,
    linear_probe_c,
)

__all__ = ["KNN_KS", "Split", "cv_proba", "evaluate_probe", "make_probe", "probe_metrics"]

Split = Literal["cv", "batch"]

KNN_KS = (20, 1)
"""Neighbour counts of the kNN probe, as DinoBloom reports them (``knn_k20``, ``knn_k1``)."""


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
    min_batch_cells: int = 10,
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
    min_batch_cells : int
        ``split="batch"``: a batch with fewer labelled cells is not held out, nor is one
        whose other batches hold fewer than k = 20 cells (kNN) or one class (linear);
        each is named in ``"skipped_batches"`` (:func:`~.batch.lobo.lobo_folds`).

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
    keep = np.array([not is_unlabelled(v) for v in y], dtype=bool)
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
    skipped: dict[str, str] = {}
    if split == "batch" and batches is not None:
        # small batches are skipped with their reason: one rule, batch.lobo.lobo_folds
        from napari_hemofm.core.batch.lobo import lobo_folds

        named, skipped = lobo_folds(
            y,
            batches,
            min_test=min_batch_cells,
            min_train=max(KNN_KS) if probe == "knn" else 1,
            min_train_classes=1 if probe == "knn" else 2,
        )
        if not named:
            why = "; ".join(f"{b}: {reason}" for b, reason in skipped.items())
            raise ValueError(f"no batch can be held out ({why})")
        held = [name for name, _, _ in named]
        folds = [(train, test) for _, train, test in named]
    else:
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
        out["skipped_batches"] = skipped
        out["per_batch"] = {
            str(b): {name: per_fold[name][i] for name in names} for i, b in enumerate(held)
        }
    return out


def cv_proba(
    X: np.ndarray,
    labels: Sequence[Any],
    *,
    kind: Probe,
    k: int,
    metric: Metric,
    n_splits: int,
    seed: int,
) -> dict[str, Any]:
    """Out-of-fold class probabilities of the labelled, embedded cells.

    Classes with fewer than ``n_splits`` cells are left out of the folds; when that
    leaves fewer than two classes, fewer folds are used (down to 2, classes of one
    cell left out).
    """
    from collections import Counter

    from sklearn.model_selection import StratifiedKFold

    Xf = _as_embeddings(X, metric)
    y = _clean_labels(labels, len(Xf))
    valid = np.isfinite(Xf).all(axis=1)
    labelled = np.not_equal(y, None)
    notes = []
    if n_missing := int((labelled & ~valid).sum()):
        notes.append(f"{n_missing} labelled cells without an embedding left out")
    counts = Counter(y[labelled & valid].tolist())
    big = sorted(c for c, m in counts.items() if m >= n_splits)
    folds = n_splits
    if len(big) < 2:
        big = sorted(c for c, m in counts.items() if m >= 2)
        folds = min([n_splits, *(counts[c] for c in big)]) if big else 0
    dropped = sorted(set(counts) - set(big))
    if dropped and len(big) >= 2:
        notes.append(
            f"classes with fewer than {folds} labelled cells left out of the "
            f"cross-validation: {', '.join(f'{c} ({counts[c]})' for c in dropped)}"
        )
    if folds < n_splits and len(big) >= 2:
        notes.append(f"{folds}-fold instead of {n_splits}-fold: the smallest class is small")
    out: dict[str, Any] = {
        "classes": big,
        "counts": {c: int(counts[c]) for c in sorted(counts)},
        "n_labelled": int(sum(counts.values())),
        "n_folds": folds,
    }
    if len(big) < 2 or folds < 2:
        notes.append(
            f"need >= 2 classes with >= 2 labelled cells to cross-validate; have {dict(counts)}"
        )
        out.update(rows=np.empty(0, np.int64), y=np.empty(0, np.int32), proba=None)
        out["note"] = "; ".join(notes)
        return out
    lookup = {c: i for i, c in enumerate(big)}
    rows = np.flatnonzero(labelled & valid & np.isin(y, big))
    codes = np.array([lookup[v] for v in y[rows]], dtype=np.int32)
    proba = np.zeros((len(rows), len(big)), dtype=np.float32)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(np.zeros(len(rows)), codes):
        if kind == "knn":
            R = np.ascontiguousarray(Xf[rows[train]])
            sq = np.einsum("ij,ij->i", R, R).astype(np.float32)
            idx, _ = _knn_search(Xf, rows[test], R, sq, k)
            proba[test] = _vote(np.append(codes[train], -1)[idx], len(big))
        elif kind == "linear":
            est = make_probe("linear", dim=Xf.shape[1], n_classes=len(big))
            import warnings

            from sklearn.exceptions import ConvergenceWarning

            with warnings.catch_warnings(), _one_blas_thread():
                warnings.simplefilter("ignore", ConvergenceWarning)
                est.fit(Xf[rows[train]], codes[train])
            p = np.zeros((len(test), len(big)), dtype=np.float32)
            p[:, est.classes_] = est.predict_proba(Xf[rows[test]])
            proba[test] = p
        else:
            raise ValueError(f"kind must be 'knn' or 'linear', got {kind!r}")
    out.update(rows=rows, y=codes, proba=proba, note="; ".join(notes))
    return out


def probe_metrics(
    X: np.ndarray,
    labels: Sequence[str | None],
    *,
    kind: Probe = "knn",
    k: int = 20,
    metric: Metric = "euclidean",
    n_splits: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Cross-validated scores of the probe on the labelled cells.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings (NaN rows: not embedded, left out).
    labels : sequence of str or None, length n_cells
        Curated labels (None / NaN / "" = unlabelled, left out).
    kind : {"knn", "linear"}
    k : int
        Neighbours of the kNN probe.
    metric : {"euclidean", "cosine"}
    n_splits : int
        Folds of the stratified cross-validation (shuffled with ``seed``).
    seed : int

    Returns
    -------
    dict
        ``accuracy``, ``balanced_accuracy`` (mean per-class recall), ``weighted_f1``
        (higher is better; NaN when there is too little to cross-validate);
        ``confusion``: list of lists, rows = label, columns = out-of-fold prediction,
        in ``classes`` order; ``classes``: the classes scored; ``counts``: labelled
        cells per class (all classes); ``n_labelled``; ``n_folds``; ``note``: what was
        left out and why ("" when nothing).

    Notes
    -----
    Classes with fewer than ``n_splits`` labelled cells are left out of the
    cross-validation (named in ``note``); if that leaves fewer than two classes,
    fewer folds are used. The scores are computed once over the pooled out-of-fold
    predictions (not averaged over folds as :func:`evaluate_probe` does).
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
    )

    cv = cv_proba(X, labels, kind=kind, k=k, metric=metric, n_splits=n_splits, seed=seed)
    out = {
        "accuracy": float("nan"),
        "balanced_accuracy": float("nan"),
        "weighted_f1": float("nan"),
        "confusion": [],
        "classes": cv["classes"],
        "counts": cv["counts"],
        "n_labelled": cv["n_labelled"],
        "n_folds": cv["n_folds"],
        "note": cv["note"],
    }
    if cv["proba"] is None:
        out["classes"] = []
        return out
    y, pred = cv["y"], _top(cv["proba"])[0]
    pred = np.where(pred < 0, 0, pred)  # a kNN vote always exists here; guard anyway
    labels_idx = list(range(len(cv["classes"])))
    out.update(
        accuracy=float(accuracy_score(y, pred)),
        balanced_accuracy=float(balanced_accuracy_score(y, pred)),
        weighted_f1=float(f1_score(y, pred, average="weighted", labels=labels_idx)),
        confusion=confusion_matrix(y, pred, labels=labels_idx).tolist(),
    )
    return out

"""Leave-one-batch-out splits that survive small batches, and the report's LOBO probes.

:func:`lobo_folds` is the one rule for which batches can be held out: a batch with
fewer than ``min_test`` labelled cells is not held out (its cells still train the
others' folds), and a fold whose training cells are too few for the probe (fewer than
``k`` for kNN, one class only for the linear probe) is skipped; each skipped batch is
named with its reason. :func:`~napari_hemofm.core.evaluation.evaluate_probe`
(``hemofm eval --split batch``) and :func:`~.report.batch_report` both call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_hemofm.core.batch._data import MIN_CELLS

__all__ = ["LOBO_MAX_CELLS", "lobo_folds", "lobo_sample"]

LOBO_MAX_CELLS = 3000
"""Cells the batch report's leave-one-batch-out probes use at most (a seeded sample)."""


def lobo_folds(
    labels: Sequence[str] | np.ndarray,
    batches: Sequence[str] | np.ndarray,
    *,
    min_test: int = MIN_CELLS,
    min_train: int = 1,
    min_train_classes: int = 1,
) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], dict[str, str]]:
    """Leave-one-batch-out folds of labelled cells, small batches skipped with a reason.

    Parameters
    ----------
    labels : array-like of shape (n_cells,)
        Class of each cell (every cell labelled: filter unlabelled ones first).
    batches : array-like of shape (n_cells,)
        Batch of each cell.
    min_test : int
        Fewest cells a held-out batch must hold.
    min_train : int
        Fewest training cells a fold needs (the kNN probe's ``k``).
    min_train_classes : int
        Fewest classes among the training cells (2 for the linear probe).

    Returns
    -------
    folds : list of (batch, train rows, test rows)
        In order of the batches' first appearance.
    skipped : dict of str to str
        Batch -> why it was not held out.

    Raises
    ------
    ValueError
        Fewer than two batches, or lengths differ.
    """
    y = np.asarray(labels, dtype=object)
    b = np.asarray(batches, dtype=object)
    if len(y) != len(b):
        raise ValueError(f"{len(b)} batches for {len(y)} cells")
    names = list(dict.fromkeys(b.tolist()))
    if len(names) < 2:
        raise ValueError(f"leave-one-batch-out needs >= 2 batches; got {names}")
    folds: list[tuple[str, np.ndarray, np.ndarray]] = []
    skipped: dict[str, str] = {}
    for name in names:
        test = np.flatnonzero(b == name)
        train = np.flatnonzero(b != name)
        n_classes = len(set(y[train].tolist()))
        if len(test) < min_test:
            skipped[str(name)] = f"{len(test)} labelled cell(s), fewer than {min_test}"
        elif len(train) < min_train:
            skipped[str(name)] = (
                f"the other batches hold {len(train)} labelled cell(s), fewer than {min_train}"
            )
        elif n_classes < min_train_classes:
            skipped[str(name)] = (
                f"the other batches hold {n_classes} class(es), fewer than {min_train_classes}"
            )
        else:
            folds.append((str(name), train, test))
    return folds, skipped


def lobo_sample(batches: np.ndarray, max_cells: int | None, seed: int) -> tuple[np.ndarray, bool]:
    """Rows for the probes: every cell, or at most ``max_cells // B`` per batch (seeded).

    Small batches stay whole; only batches above their share are sampled. Returns the
    sorted rows and whether anything was left out.
    """
    n = len(batches)
    if max_cells is None or n <= max_cells:
        return np.arange(n), False
    names = list(dict.fromkeys(batches.tolist()))
    per_batch = max(1, max_cells // len(names))
    rng = np.random.default_rng(seed)
    rows = []
    for name in names:
        members = np.flatnonzero(batches == name)
        if len(members) > per_batch:
            members = rng.choice(members, size=per_batch, replace=False)
        rows.append(members)
    return np.sort(np.concatenate(rows)), True


def lobo_probes(
    X: np.ndarray,
    labels: np.ndarray,
    batches: np.ndarray,
    *,
    max_cells: int | None = LOBO_MAX_CELLS,
    min_cells: int = MIN_CELLS,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, Any], dict[str, str]]:
    """Leave-one-batch-out kNN and linear probes (DinoBloom protocol) on labelled cells.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
    labels, batches : ndarray of object, shape (n_cells,)
        Every cell labelled.
    max_cells : int, optional
        Probe a seeded per-batch sample of at most this many cells (None: all).
    min_cells : int
        Fewest cells of a held-out batch.
    seed : int
        Seed of the sample.

    Returns
    -------
    metrics : dict
        ``lobo_{knn,linear}_{accuracy,balanced_accuracy}`` (means over the held-out
        batches; missing when no batch could be held out).
    detail : dict
        ``{"n_cells", "sampled", "max_cells", "per_batch": {batch: {...}},
        "skipped": {probe: {batch: why}}}``.
    reasons : dict
        Metric -> why it is missing.
    """
    import warnings

    from napari_hemofm.core.evaluation import evaluate_probe

    rows, sampled = lobo_sample(batches, max_cells, seed)
    Xs, ys, bs = X[rows], labels[rows], batches[rows]
    metrics: dict[str, float] = {}
    reasons: dict[str, str] = {}
    detail: dict[str, Any] = {
        "n_cells": len(rows),
        "sampled": sampled,
        "max_cells": max_cells,
        "per_batch": {},
        "skipped": {},
    }
    for probe, key, prefix in (
        ("knn", "knn_k20", "lobo_knn"),
        ("linear", "linear", "lobo_linear"),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # lbfgs convergence on tiny held-out batches
                rep = evaluate_probe(
                    Xs, ys, probe=probe, split="batch", batches=bs, min_batch_cells=min_cells
                )
        except ValueError as exc:
            for m in ("accuracy", "balanced_accuracy"):
                reasons[f"{prefix}_{m}"] = str(exc)
            continue
        for m in ("accuracy", "balanced_accuracy"):
            metrics[f"{prefix}_{m}"] = rep["results"][key][m]
        detail["skipped"][probe] = rep.get("skipped_batches", {})
        for batch, scores in rep["per_batch"].items():
            detail["per_batch"].setdefault(batch, {})[key] = scores[key]
    return metrics, detail, reasons

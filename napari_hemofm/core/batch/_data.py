"""Validated input of the batch metrics: embeddings, batch codes, cell-type codes, groups.

Every metric and the report read their input through :class:`BatchData`, so lengths,
NaN rows, missing batches and unlabelled cells are handled by one rule
(:func:`napari_hemofm.core.labels.clean_labels` decides what is unlabelled), and the
groups a metric is computed in (the cell types, or all cells) and the reasons a group is
left out are decided in one place (:meth:`BatchData.groups`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_CELLS = 10
"""Default minimum cells of a cell type for its mixing metrics (fewer: left out)."""


def as_codes(values: Any, n: int, what: str) -> tuple[np.ndarray, list[str]]:
    """Category codes (-1 = missing) and names in order of first appearance."""
    import pandas as pd

    from napari_hemofm.core.labels import clean_labels

    if isinstance(values, str):
        raise TypeError(f"{what} must be one value per cell, not one string")
    arr = clean_labels(np.asarray(values, dtype=object).ravel())
    if len(arr) != n:
        raise ValueError(f"X has {n} rows (cells) but {what} has {len(arr)} values")
    present = np.array([v is not None for v in arr], dtype=bool)
    names = [str(v) for v in pd.unique(arr[present])]
    lookup = {name: i for i, name in enumerate(names)}
    codes = np.full(n, -1, dtype=np.int64)
    codes[present] = [lookup[v] for v in arr[present]]
    return codes, names


def check_X(X: Any) -> np.ndarray:
    """``X`` as a float 2-D array; NaN / inf rows raise a ValueError naming them."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must have shape (n_cells, dim); got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{len(rows)} of {len(X)} cells have no embedding (NaN or inf rows, e.g. rows "
            f"{rows[:5].tolist()}): embed them first or leave them out"
        )
    return X


def mean_or_nan(values: Sequence[float]) -> float:
    """Mean of the non-NaN values; NaN when there is none."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


@dataclass
class Group:
    """The cells one mixing metric is computed in: a cell type, or all cells.

    Attributes
    ----------
    index : int
        Position among the data's groups (seeds per group derive from it).
    name : str
        The cell type, or ``"all cells"``.
    idx : ndarray of int
        Rows of the group's cells.
    counts : ndarray of int, shape (n_batches,)
        Cells of the group in each batch.
    reason : str
        Why the group is left out of the mixing metrics ("" when it is scored).
    """

    index: int
    name: str
    idx: np.ndarray
    counts: np.ndarray
    reason: str

    @property
    def n_batches(self) -> int:
        """Batches holding at least one cell of the group."""
        return int((self.counts > 0).sum())

    @property
    def mixing(self) -> bool:
        """Whether the mixing metrics score this group."""
        return not self.reason


class BatchData:
    """Validated input: embeddings, batch codes, label codes (-1 = unlabelled).

    Parameters
    ----------
    X : array-like of shape (n_cells, dim)
    batches : array-like of shape (n_cells,)
    labels : array-like of shape (n_cells,), optional
    need_batches : bool
        Raise unless there are >= 2 batches.
    """

    def __init__(
        self, X: Any, batches: Any, labels: Any = None, *, need_batches: bool = True
    ) -> None:
        self.X = check_X(X)
        n = len(self.X)
        self.b, self.batch_names = as_codes(batches, n, "batches")
        if (self.b < 0).any():
            raise ValueError(f"{int((self.b < 0).sum())} of {n} cells have no batch")
        if need_batches and len(self.batch_names) < 2:
            raise ValueError(
                f"batch metrics need >= 2 batches; all {n} cells are in {self.batch_names}"
            )
        if labels is None:
            self.y: np.ndarray | None = None
            self.label_names: list[str] = []
        else:
            self.y, self.label_names = as_codes(labels, n, "labels")
        self._groups: dict[int, list[Group]] = {}

    @property
    def n(self) -> int:
        """Cells."""
        return len(self.X)

    def label_array(self) -> np.ndarray | None:
        """Cell type names per cell (None = unlabelled), or None without labels."""
        if self.y is None:
            return None
        names = np.array([*self.label_names, None], dtype=object)
        return names[self.y]  # code -1 picks the trailing None

    def batch_array(self) -> np.ndarray:
        """Batch name of each cell."""
        return np.asarray(self.batch_names, dtype=object)[self.b]

    def groups(self, min_cells: int) -> list[Group]:
        """One group per cell type (or one for all cells when unlabelled).

        A group is scored by the mixing metrics when it has >= ``min_cells`` cells in
        >= 2 batches; otherwise its ``reason`` says why not.
        """
        if min_cells not in self._groups:
            if self.y is None:
                index_sets = [("all cells", np.arange(self.n))]
            else:
                index_sets = [
                    (name, np.flatnonzero(self.y == i)) for i, name in enumerate(self.label_names)
                ]
            out = []
            for i, (name, idx) in enumerate(index_sets):
                counts = np.bincount(self.b[idx], minlength=len(self.batch_names))
                if int((counts > 0).sum()) < 2:
                    reason = "found in one batch only"
                elif len(idx) < min_cells:
                    reason = f"fewer than {min_cells} cells"
                else:
                    reason = ""
                out.append(Group(i, name, idx, counts, reason))
            self._groups[min_cells] = out
        return self._groups[min_cells]

    def local_codes(self, group: Group) -> np.ndarray:
        """Batch codes of the group's cells renumbered 0 .. (batches present - 1)."""
        _, codes = np.unique(self.b[group.idx], return_inverse=True)
        return codes.astype(np.int64)

"""The neighbour graph that every neighbourhood metric of a batch report reads.

A report searches each cell's nearest neighbours once per group of cells it scores
(a cell type, or all cells without labels) and hands the same :class:`Neighbors` to
iLISI, kBET and graph connectivity, as scib-metrics does with
``scib_metrics.nearest_neighbors``: the first ``k`` columns of one search are the
``k``-nearest neighbours for every ``k`` up to the one searched.

Small groups are searched exactly (brute force, scikit-learn). Above
:data:`EXACT_BELOW` cells each cell's neighbours are searched exactly among a seeded
sample of :data:`REFERENCE_CELLS` cells of its group: every cell still gets its
neighbours (the per-cell colouring needs them all) at ``n x 3000`` instead of ``n^2``
distances, and the neighbourhoods reach as far as in a group of 3,000 cells.
``docs/batch.md`` gives what this moves the metrics by against the exact search
(``benchmarks/bench_batch_scale.py``). Tried and measured there: a search in the first
principal axes does not help (the cost of a brute-force search lies in picking the k
smallest of n distances, not in the dimension); an inverted-file search found half of
the true neighbours at the cost of the exact one on 384-d embeddings. pynndescent (installed with
umap-learn) is offered as ``method="nndescent"``; on our two-core machine it was slower
than the exact search below ~50,000 cells of 384 dimensions and compiles for ~40 s on a
process's first call (``benchmarks/bench_batch_scale.py``), so it is not the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "EXACT_BELOW",
    "REFERENCE_CELLS",
    "NeighborMethod",
    "Neighbors",
    "nearest_neighbors",
    "neighbor_recall",
]

NeighborMethod = Literal["auto", "exact", "sample", "nndescent"]

EXACT_BELOW = 5000
"""Groups of at most this many cells are searched exactly by ``method="auto"``."""

REFERENCE_CELLS = 3000
"""Cells of a group the approximate (``"sample"``) search looks among."""


@dataclass(frozen=True)
class Neighbors:
    """Each cell's nearest other cells, nearest first.

    Attributes
    ----------
    indices : ndarray of shape (n_cells, k), int64
        Row numbers (in the searched array) of each cell's ``k`` nearest other cells.
    distances : ndarray of shape (n_cells, k), float64
        Their Euclidean distances, ascending along each row.
    method : str
        ``"exact"``, ``"sample"`` or ``"nndescent"``: how they were found.
    """

    indices: np.ndarray
    distances: np.ndarray
    method: str

    @property
    def n_cells(self) -> int:
        """Cells searched."""
        return int(self.indices.shape[0])

    @property
    def k(self) -> int:
        """Neighbours per cell."""
        return int(self.indices.shape[1])

    @property
    def exact(self) -> bool:
        """Whether the search was exact."""
        return self.method == "exact"

    def first(self, k: int) -> Neighbors:
        """The ``min(k, self.k)`` nearest neighbours of each cell (a view, no copy)."""
        k = min(int(k), self.k)
        return Neighbors(self.indices[:, :k], self.distances[:, :k], self.method)

    def graph(self, k: int | None = None):
        """The directed kNN graph as a sparse (n_cells, n_cells) 0/1 matrix.

        Parameters
        ----------
        k : int, optional
            Neighbours per cell (default all searched).
        """
        from scipy.sparse import csr_matrix

        nb = self if k is None else self.first(k)
        n = nb.n_cells
        rows = np.repeat(np.arange(n), nb.k)
        return csr_matrix((np.ones(rows.size), (rows, nb.indices.ravel())), shape=(n, n))


def _exact(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="euclidean").fit(X)
    # no query points: sklearn leaves each point out of its own neighbours (duplicates too)
    dist, idx = nn.kneighbors()
    return dist.astype(np.float64, copy=False), idx.astype(np.int64, copy=False)


def principal_axes(
    X: np.ndarray, n_components: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, leading eigenvalues (descending) and axes of the scatter matrix of ``X``.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
    n_components : int, optional
        Leading axes wanted (default all).

    Returns
    -------
    mean : ndarray of shape (dim,)
    eigenvalues : ndarray of shape (m,)
        Of ``(X - mean).T @ (X - mean)`` (sums of squares, not variances), descending.
    axes : ndarray of shape (dim, m)
        Column ``i`` is the axis of eigenvalue ``i``.

    Notes
    -----
    The eigen-decomposition of the ``dim x dim`` scatter matrix costs ``n dim^2``,
    less than an SVD of ``X`` when ``n >> dim``; its axes span the same principal
    subspace as PCA's. Only the ``m`` leading pairs are computed.
    """
    from scipy.linalg import eigh

    X = np.asarray(X)
    mean = X.mean(axis=0, dtype=np.float64)
    Xc = X - mean.astype(X.dtype)
    scatter = (Xc.T @ Xc).astype(np.float64)
    d = scatter.shape[0]
    m = d if n_components is None else max(1, min(int(n_components), d))
    values, axes = eigh(scatter, subset_by_index=[d - m, d - 1])
    order = np.argsort(values)[::-1]
    return mean, np.clip(values[order], 0.0, None), axes[:, order]


def _sampled(X: np.ndarray, k: int, n_reference: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's k nearest cells among a seeded sample of ``n_reference`` cells (exact)."""
    from sklearn.neighbors import NearestNeighbors

    n = len(X)
    ref = np.sort(np.random.default_rng(seed).choice(n, size=n_reference, replace=False))
    nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(X[ref])
    dist, idx = nn.kneighbors(X)
    idx = ref[idx]
    # drop each cell itself (a reference cell finds itself first; others drop the last)
    own = idx == np.arange(n)[:, None]
    own[~own.any(axis=1), -1] = True
    keep = ~own
    return dist[keep].reshape(n, k).astype(np.float64), idx[keep].reshape(n, k)


def _nndescent(X: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import pynndescent

    index = pynndescent.NNDescent(
        np.asarray(X, dtype=np.float32), n_neighbors=k + 1, random_state=seed, n_jobs=-1
    )
    idx, dist = index.neighbor_graph
    # drop each cell itself (or, where a duplicate took its place, the farthest)
    own = idx == np.arange(len(X))[:, None]
    own[~own.any(axis=1), -1] = True
    keep = ~own
    return (
        dist[keep].reshape(len(X), k).astype(np.float64),
        idx[keep].reshape(len(X), k).astype(np.int64),
    )


def nearest_neighbors(
    X: np.ndarray,
    n_neighbors: int,
    *,
    method: NeighborMethod = "auto",
    exact_below: int = EXACT_BELOW,
    reference_cells: int = REFERENCE_CELLS,
    seed: int = 0,
) -> Neighbors:
    """Each cell's ``n_neighbors`` nearest other cells (Euclidean), searched once.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings (no NaN rows).
    n_neighbors : int
        Neighbours wanted; capped at ``n_cells - 1`` (a group of 3 cells gets 2).
    method : {"auto", "exact", "sample", "nndescent"}
        ``"exact"``: brute force. ``"sample"``: every cell's nearest cells among a
        seeded sample of ``reference_cells`` cells (brute force against the sample;
        neighbourhoods reach farther, as in a sparser group). ``"nndescent"``:
        pynndescent's approximate graph. ``"auto"``: exact up to ``exact_below``
        cells, else ``"sample"``.
    exact_below : int
        Size limit of the exact search for ``"auto"``.
    reference_cells : int
        Size of the ``"sample"`` search's reference set.
    seed : int
        Seed of pynndescent.

    Returns
    -------
    Neighbors
        ``indices`` and ``distances`` of shape (n_cells, min(n_neighbors, n_cells - 1)).

    Raises
    ------
    ValueError
        Fewer than two cells, or an unknown method.
    """
    X = np.asarray(X)
    n = len(X)
    if n < 2:
        raise ValueError(f"a neighbour search needs >= 2 cells; got {n}")
    k = max(1, min(int(n_neighbors), n - 1))
    if method == "auto":
        method = "exact" if n <= max(exact_below, reference_cells) else "sample"
    if method == "exact":
        dist, idx = _exact(X, k)
    elif method == "sample":
        dist, idx = _sampled(X, min(k, reference_cells - 1), min(reference_cells, n), seed)
    elif method == "nndescent":
        dist, idx = _nndescent(X, k, seed)
    else:
        raise ValueError(f"method must be auto, exact, sample or nndescent; got {method!r}")
    return Neighbors(idx, dist, method)


def neighbor_recall(approx: Neighbors, exact: Neighbors) -> float:
    """Share of the exact ``k`` nearest neighbours that an approximate search found.

    Parameters
    ----------
    approx, exact : Neighbors
        Searches of the same cells with the same ``k``.

    Returns
    -------
    float
        Mean over cells of ``|approx_i & exact_i| / k``, in [0, 1] (1 = identical sets).
    """
    if approx.indices.shape != exact.indices.shape:
        raise ValueError(
            f"searches differ in shape: {approx.indices.shape} vs {exact.indices.shape}"
        )
    a = np.sort(approx.indices, axis=1)
    e = np.sort(exact.indices, axis=1)
    hits = 0
    for row_a, row_e in zip(a, e, strict=True):
        hits += np.intersect1d(row_a, row_e, assume_unique=True).size
    return hits / e.size

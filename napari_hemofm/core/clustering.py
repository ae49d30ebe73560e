"""Unsupervised groups of cells from their embeddings: k-means and HDBSCAN (scikit-learn).

Not to be confused with :mod:`~napari_hemofm.core.cluster` (embedding on a Dask compute
cluster). The groups are written to an ``obs`` column (:data:`CLUSTER_COLUMN` by default)
as a categorical of names ``"1"``, ``"2"``, ... (by size, largest first) with HDBSCAN's
noise as missing, so the map, the ``cells`` layers and the gallery colour and filter by it
like any other category.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable

ClusterMethod = Literal["kmeans", "hdbscan"]

CLUSTER_COLUMN = "cluster"
"""Default ``obs`` column of :func:`cluster_table`."""

#: Components the embeddings are reduced to before clustering (distances in 384-1536
#: dimensions are dominated by noise; scanpy clusters on 50 PCs for the same reason).
CLUSTER_PCA = 50


def cluster_embeddings(
    X: np.ndarray,
    method: ClusterMethod = "kmeans",
    *,
    n_clusters: int = 8,
    min_cluster_size: int = 15,
    n_pca: int = CLUSTER_PCA,
    seed: int = 0,
) -> np.ndarray:
    """Cluster numbers of the cells, on the first principal components of the embeddings.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings (no NaN).
    method : {"kmeans", "hdbscan"}
        k-means (Lloyd, ``n_clusters`` groups, 10 seeded restarts) or HDBSCAN (density
        based: finds the number of groups itself and leaves outliers as noise).
    n_clusters : int
        k-means: number of groups (at most the number of cells).
    min_cluster_size : int
        HDBSCAN: smallest group.
    n_pca : int
        Principal components kept before clustering (0: the raw embeddings).
    seed : int
        Seed of k-means and of the PCA.

    Returns
    -------
    ndarray of shape (n_cells,), int64
        Group ``0, 1, ...`` by decreasing size; ``-1`` for HDBSCAN's noise.

    Raises
    ------
    ValueError
        On NaN embeddings, fewer than 2 cells, or an unknown method.

    References
    ----------
    Lloyd (1982), Least squares quantization in PCM, doi:10.1109/TIT.1982.1056489.
    Campello, Moulavi & Sander (2013), Density-based clustering based on hierarchical
    density estimates, doi:10.1007/978-3-642-37456-2_14.
    """
    from napari_hemofm.core.reduce import compute_pca

    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or len(X) < 2:
        raise ValueError(f"clustering needs at least 2 embedded cells; got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("some cells have no embedding (NaN): embed them before clustering")
    Z = compute_pca(X, n_pca, seed=seed) if n_pca else X
    if method == "kmeans":
        from sklearn.cluster import KMeans

        k = int(min(max(n_clusters, 1), len(X)))
        raw = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(Z)
    elif method == "hdbscan":
        from sklearn.cluster import HDBSCAN

        size = int(min(max(min_cluster_size, 2), len(X)))
        raw = HDBSCAN(min_cluster_size=size, copy=True).fit_predict(Z)
    else:
        raise ValueError(f"method must be 'kmeans' or 'hdbscan'; got {method!r}")
    return _by_size(np.asarray(raw, dtype=np.int64))


def cluster_names(groups: np.ndarray) -> pd.Categorical:
    """Group numbers as a categorical of names ``"1"``, ``"2"``, ... (noise: missing)."""
    groups = np.asarray(groups, dtype=np.int64)
    n = int(groups.max()) + 1 if len(groups) and groups.max() >= 0 else 0
    names = [str(i + 1) for i in range(n)]
    values = np.array([names[g] if g >= 0 else None for g in groups.tolist()], dtype=object)
    return pd.Categorical(values, categories=names)


def cluster_table(
    table: CellTable,
    method: ClusterMethod = "kmeans",
    *,
    column: str = CLUSTER_COLUMN,
    **params: int,
) -> pd.Categorical:
    """Cluster a table's embeddings and write the groups to ``obs[column]``.

    Parameters
    ----------
    table : CellTable
        A table whose cells are all embedded.
    method : {"kmeans", "hdbscan"}
    column : str
        The ``obs`` column written (fires ``columns_changed``); not ``label``.
    **params :
        ``n_clusters``, ``min_cluster_size``, ``n_pca``, ``seed`` of
        :func:`cluster_embeddings`.

    Returns
    -------
    pandas.Categorical of shape (n_cells,)
        What was written.
    """
    X = table.embeddings
    if X is None:
        raise ValueError("the cell table has no embeddings yet: run the embedding first")
    names = cluster_names(cluster_embeddings(X, method, **params))
    table.set_column(column, names)
    return names


def _by_size(raw: np.ndarray) -> np.ndarray:
    """Renumber groups 0, 1, ... by decreasing size (ties: by old number); keep -1."""
    out = np.full(len(raw), -1, np.int64)
    ok = raw >= 0
    if ok.any():
        ids, counts = np.unique(raw[ok], return_counts=True)
        order = ids[np.lexsort((ids, -counts))]
        remap = {int(old): new for new, old in enumerate(order)}
        out[ok] = [remap[int(v)] for v in raw[ok]]
    return out

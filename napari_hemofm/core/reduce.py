"""Two-dimensional maps of the embeddings: PCA then UMAP, cached by embedding fingerprint.

UMAP of 100k cells takes about a minute on two cores (plus ~30 s of numba
compilation on a process's first call), so the result is stored in
``obsm["X_umap"]`` together with a fingerprint of the embeddings and the parameters
it was computed from (``uns["hemofm"]["umap"]``); :func:`umap_for_table` reuses it
while both are unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable

UMAP_DEFAULTS: dict[str, Any] = {
    "n_pca": 50,
    "n_neighbors": 15,
    "min_dist": 0.1,
    "metric": "euclidean",
    "seed": 0,
}
"""Parameters of :func:`compute_umap` (scanpy's defaults: 50 PCs, 15 neighbours)."""


def embedding_fingerprint(X: np.ndarray) -> str:
    """A short hash of an embedding matrix (shape, dtype and bytes).

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)

    Returns
    -------
    str
        16 hex digits of the BLAKE2b digest; equal matrices give equal fingerprints.
    """
    X = np.ascontiguousarray(X)
    digest = hashlib.blake2b(digest_size=8)
    digest.update(repr((X.shape, X.dtype.str)).encode())
    digest.update(X.data)
    return digest.hexdigest()


def compute_pca(X: np.ndarray, n_components: int = 50, *, seed: int = 0) -> np.ndarray:
    """Principal components of the embeddings (centred, not scaled).

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
    n_components : int
        Kept components; capped at ``min(n_cells, dim)``.
    seed : int
        Seed of the randomized solver.

    Returns
    -------
    ndarray of shape (n_cells, k), float32
    """
    from sklearn.decomposition import PCA

    k = int(min(n_components, X.shape[0], X.shape[1]))
    if k >= X.shape[1]:
        return np.asarray(X - X.mean(axis=0), dtype=np.float32)
    return PCA(n_components=k, random_state=seed).fit_transform(X).astype(np.float32)


def compute_umap(
    X: np.ndarray,
    *,
    n_pca: int = 50,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "euclidean",
    seed: int = 0,
) -> np.ndarray:
    """A seeded 2-D UMAP of the embeddings, after PCA.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings (rows with NaN are not allowed: embed every cell first).
    n_pca : int
        Principal components kept before UMAP (0 to skip PCA).
    n_neighbors, min_dist, metric :
        UMAP parameters (umap-learn).
    seed : int
        Random seed; the same seed and input give the same map.

    Returns
    -------
    ndarray of shape (n_cells, 2), float32

    Raises
    ------
    ValueError
        If ``X`` has NaN rows or fewer than 3 cells.

    Notes
    -----
    McInnes, Healy & Melville (2018), UMAP: Uniform Manifold Approximation and
    Projection for Dimension Reduction, arXiv:1802.03426. With a seed, umap-learn runs
    single-threaded and is reproducible.
    """
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"X must have shape (n_cells, dim); got {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("some cells have no embedding (NaN): embed them before the map")
    n = X.shape[0]
    if n < 3:
        raise ValueError(f"a map needs at least 3 cells; got {n}")
    Z = compute_pca(X, n_pca, seed=seed) if n_pca else X
    import umap

    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=int(min(n_neighbors, n - 1)),
        min_dist=min_dist,
        metric=metric,
        random_state=seed,
        n_jobs=1,  # a seed forces one thread anyway; saying so avoids umap's warning
        init="spectral" if n > n_neighbors + 1 else "random",
    )
    return reducer.fit_transform(Z).astype(np.float32)


def umap_for_table(
    table: CellTable,
    *,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    **params: Any,
) -> np.ndarray:
    """Compute (or reuse) the UMAP of a cell table and store it in ``obsm["X_umap"]``.

    Parameters
    ----------
    table : CellTable
        A table with embeddings.
    force : bool
        Recompute even when the cached map matches.
    progress : callable, optional
        ``progress(done, total)``: called with (0, 1) before and (1, 1) after.
    **params :
        Overrides of :data:`UMAP_DEFAULTS`.

    Returns
    -------
    ndarray of shape (n_cells, 2)
    """
    X = table.embeddings
    if X is None:
        raise ValueError("the cell table has no embeddings yet: run the embedding first")
    settings = {**UMAP_DEFAULTS, **params}
    key = {"fingerprint": embedding_fingerprint(X), **settings}
    cached = table.meta.get("umap")
    if not force and "X_umap" in table.adata.obsm and cached is not None:
        if {k: _plain(v) for k, v in dict(cached).items()} == key:
            return np.asarray(table.adata.obsm["X_umap"])
    if progress:
        progress(0, 1)
    coords = compute_umap(X, **settings)
    table.update_meta(umap=key)
    table.set_obsm("X_umap", coords)
    if progress:
        progress(1, 1)
    return coords


def _plain(value: Any) -> Any:
    """h5ad returns numpy scalars; compare as plain Python values."""
    return value.item() if isinstance(value, np.generic) else value

"""Two-dimensional maps of the embeddings: PCA then UMAP, cached by embedding fingerprint.

UMAP of 100k cells takes about a minute on two cores, so the result is stored in
``obsm["X_umap"]`` together with its cache key (:func:`umap_cache_key`: a fingerprint of
the embeddings and the parameters, in ``uns["hemofm"]["umap"]``); :func:`cached_umap`
reuses a stored map while both are unchanged and :func:`umap_for_table` does so for a cell
table. Views that run UMAP in a worker call :func:`cached_umap` on plain arrays and store
the result on the GUI thread with :func:`store_umap`.

The first UMAP of a process used to wait ~30-80 s for numba to compile umap-learn (longer
than UMAP itself). Three things take that off the first map (``benchmarks/
bench_umap_first_call.py``, docs/performance.md):

- the neighbours come from scikit-learn's exact kNN (:func:`nearest_neighbors`) and are
  handed to UMAP (``precomputed_knn``), so pynndescent's search is neither compiled nor run
  for maps of up to :data:`EXACT_KNN_MAX_CELLS` cells;
- umap-learn's numba functions are compiled with numba's on-disk cache
  (:func:`enable_umap_disk_cache`), so only the first map after installing compiles;
- :func:`warm_up_umap` compiles (or loads) everything on a tiny input; the Cell map runs it
  in a background thread when it opens.
"""

from __future__ import annotations

import hashlib
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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

EXACT_KNN_MAX_CELLS = 50_000
"""Maps of up to this many cells get exact neighbours from scikit-learn; larger ones use
umap-learn's approximate NN-descent (exact search grows with the square of the cells)."""

#: Metrics scikit-learn's exact kNN computes as umap-learn does.
_SKLEARN_METRICS = frozenset({"euclidean", "cosine", "manhattan", "chebyshev", "minkowski"})
#: umap-learn modules whose numba functions get the on-disk cache.
_UMAP_MODULES = ("umap.umap_", "umap.layouts", "umap.spectral", "umap.utils", "umap.distances")
_cache_lock = threading.Lock()
_cache_enabled: bool | None = None


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


def nearest_neighbors(
    X: np.ndarray, k: int, *, metric: str = "euclidean"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest neighbours of every row, itself included (scikit-learn).

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
    k : int
        Neighbours per cell, the cell itself counted (at most ``n_cells``).
    metric : str
        A scikit-learn metric name.

    Returns
    -------
    indices : ndarray of shape (n_cells, k), int32
        Row numbers of the neighbours, nearest first (the row itself first unless it has
        exact duplicates).
    distances : ndarray of shape (n_cells, k), float32
        Their distances, ascending.
    """
    from sklearn.neighbors import NearestNeighbors

    X = np.asarray(X, dtype=np.float32)
    k = int(min(k, len(X)))
    nn = NearestNeighbors(n_neighbors=k, metric=metric).fit(X)
    distances, indices = nn.kneighbors(X)
    return indices.astype(np.int32), distances.astype(np.float32)


def similar_cells(X: np.ndarray, row: int, k: int = 8) -> np.ndarray:
    """The ``k`` cells nearest to cell ``row`` in the embedding (cosine), nearest first.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings; rows with NaN (not embedded) are never returned.
    row : int
        The query cell.
    k : int
        How many to return (fewer when the table has fewer embedded cells).

    Returns
    -------
    ndarray of shape (<= k,), int64
        Row numbers, the query itself excluded.

    Raises
    ------
    ValueError
        If the query cell has no embedding.
    """
    X = np.asarray(X, dtype=np.float32)
    query = X[int(row)]
    if not np.isfinite(query).all():
        raise ValueError("this cell has no embedding yet")
    norms = np.linalg.norm(X, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = (X @ query) / (norms * max(float(np.linalg.norm(query)), 1e-12))
    sim = np.where(np.isfinite(sim), sim, -np.inf)
    sim[int(row)] = -np.inf
    k = int(min(k, int(np.isfinite(sim).sum())))
    if k <= 0:
        return np.zeros(0, np.int64)
    top = np.argpartition(-sim, k - 1)[:k]
    return top[np.argsort(-sim[top], kind="stable")].astype(np.int64)


def enable_umap_disk_cache() -> bool:
    """Compile umap-learn's numba functions with numba's on-disk cache (once per process).

    umap-learn declares its functions without ``cache=True``, so every process compiled
    them again (~30 s on two cores). This switches the cache on for each numba function of
    umap-learn's modules before its first call; the compiled code then lives beside the
    package (or in numba's user cache directory, or ``NUMBA_CACHE_DIR``) and later
    processes load it in about a second. numba checks the source file's time stamp, so an
    upgraded umap-learn compiles afresh.

    Returns
    -------
    bool
        True when at least one function got the cache (False: no writable cache location,
        or numba changed its API; UMAP then compiles in memory as before).
    """
    global _cache_enabled
    with _cache_lock:
        if _cache_enabled is not None:
            return _cache_enabled
        import importlib

        enabled = 0
        try:
            from numba.core.registry import CPUDispatcher
        except ImportError:  # pragma: no cover - numba moved its dispatcher
            _cache_enabled = False
            return False
        for name in _UMAP_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:  # pragma: no cover - an older umap-learn layout
                continue
            for obj in list(vars(module).values()):
                if isinstance(obj, CPUDispatcher):
                    try:
                        obj.enable_caching()
                        enabled += 1
                    except Exception:  # no writable cache directory for this file
                        pass
        _cache_enabled = enabled > 0
        return _cache_enabled


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
    single-threaded and is reproducible. Up to :data:`EXACT_KNN_MAX_CELLS` cells the
    neighbour graph is exact (:func:`nearest_neighbors`) rather than umap-learn's
    approximate one, which also spares compiling pynndescent.
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
    return _fit_umap(Z, n_neighbors=n_neighbors, min_dist=min_dist, metric=metric, seed=seed)


def _fit_umap(
    Z: np.ndarray, *, n_neighbors: int, min_dist: float, metric: str, seed: int
) -> np.ndarray:
    """UMAP of checked, reduced data (the part of :func:`compute_umap` after PCA)."""
    enable_umap_disk_cache()
    import umap

    n = Z.shape[0]
    k = int(min(n_neighbors, n - 1))
    extra: dict[str, Any] = {}
    if n <= EXACT_KNN_MAX_CELLS and metric in _SKLEARN_METRICS:
        indices, distances = nearest_neighbors(Z, k, metric=metric)
        extra["precomputed_knn"] = (indices, distances)
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=k,
        min_dist=min_dist,
        metric=metric,
        random_state=seed,
        n_jobs=1,  # a seed forces one thread anyway; saying so avoids umap's warning
        init="spectral" if n > n_neighbors + 1 else "random",
        **extra,
    )
    with warnings.catch_warnings():
        # "no NNDescent search index": we never call transform on new data
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        return reducer.fit_transform(Z).astype(np.float32)


def warm_up_umap() -> float:
    """Compile (or load from the disk cache) everything a map needs, on 64 random points.

    Returns
    -------
    float
        Seconds it took (about 1 s once the disk cache holds umap-learn's code; the whole
        compilation, ~15-30 s on two cores, the first time).
    """
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(64, 8)).astype(np.float32)
    _fit_umap(Z, n_neighbors=5, min_dist=0.1, metric="euclidean", seed=0)
    return time.perf_counter() - start


def umap_cache_key(X: np.ndarray, **params: Any) -> dict[str, Any]:
    """The cache key of the UMAP of ``X``: its fingerprint and the full parameter set.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
    **params :
        Overrides of :data:`UMAP_DEFAULTS` (unknown names are refused).

    Returns
    -------
    dict
        ``{"fingerprint": ..., "n_pca": ..., "n_neighbors": ..., ...}``, plain Python
        values, as stored in ``uns["hemofm"]["umap"]``.
    """
    unknown = sorted(set(params) - set(UMAP_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown UMAP parameter(s) {unknown}; known: {sorted(UMAP_DEFAULTS)}")
    settings = {k: _plain(v) for k, v in {**UMAP_DEFAULTS, **params}.items()}
    return {"fingerprint": embedding_fingerprint(X), **settings}


def umap_params(key: Mapping[str, Any] | None) -> dict[str, Any]:
    """The UMAP parameters of a stored cache key (the defaults where it has none)."""
    key = {} if key is None else dict(key)
    return {k: _plain(key.get(k, v)) for k, v in UMAP_DEFAULTS.items()}


@dataclass(frozen=True)
class UmapResult:
    """A map and the key it belongs to.

    Attributes
    ----------
    coords : ndarray of shape (n_cells, 2), float32
    key : dict
        Its :func:`umap_cache_key`.
    computed : bool
        True when UMAP ran; False when the stored map was still valid.
    """

    coords: np.ndarray
    key: dict[str, Any]
    computed: bool


def cached_umap(
    X: np.ndarray,
    *,
    stored: np.ndarray | None = None,
    stored_key: Mapping[str, Any] | None = None,
    force: bool = False,
    **params: Any,
) -> UmapResult:
    """The UMAP of ``X``: the stored map while its key matches, else a new one.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
    stored : ndarray of shape (n_cells, 2), optional
        A map computed earlier (``obsm["X_umap"]``).
    stored_key : mapping, optional
        The key stored with it (``uns["hemofm"]["umap"]``).
    force : bool
        Recompute even when the stored map matches.
    **params :
        Overrides of :data:`UMAP_DEFAULTS`.

    Returns
    -------
    UmapResult
    """
    key = umap_cache_key(X, **params)
    if (
        not force
        and stored is not None
        and stored_key is not None
        and np.shape(stored) == (len(X), 2)
        and {k: _plain(v) for k, v in dict(stored_key).items()} == key
    ):
        return UmapResult(np.asarray(stored, dtype=np.float32), key, computed=False)
    settings = {k: v for k, v in key.items() if k != "fingerprint"}
    return UmapResult(compute_umap(X, **settings), key, computed=True)


def stored_umap(table: CellTable) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """The map stored in a table and its key (``(None, None)`` when there is none)."""
    coords = table.adata.obsm.get("X_umap")
    key = table.meta.get("umap")
    if coords is None:
        return None, None
    return np.asarray(coords), (None if key is None else dict(key))


def store_umap(table: CellTable, result: UmapResult | np.ndarray, **params: Any) -> None:
    """Write a map and its key into a table (fires ``embeddings_changed``).

    Parameters
    ----------
    table : CellTable
    result : UmapResult or ndarray of shape (n_cells, 2)
        A result of :func:`cached_umap`, or a map made elsewhere (a script, a test, a
        benchmark): it is stored under the key of the table's current embeddings and
        ``params``, so :func:`umap_for_table` reuses it.
    **params :
        With an array: the parameters it stands for (overrides of :data:`UMAP_DEFAULTS`).
    """
    if not isinstance(result, UmapResult):
        if table.embeddings is None:
            raise ValueError("the cell table has no embeddings: a map needs them first")
        coords = np.asarray(result, dtype=np.float32)
        if coords.shape != (table.n_cells, 2):
            raise ValueError(f"a map needs shape ({table.n_cells}, 2); got {coords.shape}")
        result = UmapResult(coords, umap_cache_key(table.embeddings, **params), computed=True)
    table.update_meta(umap=dict(result.key))
    table.set_obsm("X_umap", np.asarray(result.coords, dtype=np.float32))


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
    stored, stored_key = stored_umap(table)
    if progress:
        progress(0, 1)
    result = cached_umap(X, stored=stored, stored_key=stored_key, force=force, **params)
    if result.computed:
        store_umap(table, result)
    if progress:
        progress(1, 1)
    return result.coords


def _plain(value: Any) -> Any:
    """h5ad returns numpy scalars; compare as plain Python values."""
    return value.item() if isinstance(value, np.generic) else value

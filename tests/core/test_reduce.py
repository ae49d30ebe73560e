"""The map: seeded PCA + UMAP, cached by embedding fingerprint."""

import numpy as np
import pandas as pd
import pytest

from napari_hemofm.core import reduce
from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.reduce import compute_umap, embedding_fingerprint, umap_for_table


def clustered(n_per=60, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=6.0, size=(3, dim))
    X = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centres]).astype(np.float32)
    return X, np.repeat([0, 1, 2], n_per)


def table_with(X):
    n = len(X)
    frame = pd.DataFrame(
        {"source": "s.png", "batch": "lab", "x": 1.0, "y": 1.0}
        | {"x0": 0, "y0": 0, "x1": 2, "y1": 2},
        index=[f"lab/s.png#{k}" for k in range(n)],
    )
    table = CellTable()
    table.add_cells(frame, embeddings=X)
    return table


def test_umap_is_seeded_and_keeps_clusters_apart():
    """Same seed -> same map; three well separated clusters stay separated in 2-D
    (every point's nearest map neighbour is in its own cluster)."""
    X, labels = clustered()
    a = compute_umap(X, seed=0)
    b = compute_umap(X, seed=0)
    assert a.shape == (len(X), 2)
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    d = ((a[:, None] - a[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(1)] == labels).mean() == 1.0


def test_umap_refuses_nan_and_tiny_inputs():
    """NaN rows (cells not embedded) and fewer than 3 cells give clear errors."""
    X, _ = clustered(n_per=5)
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="no embedding"):
        compute_umap(X)
    with pytest.raises(ValueError, match="at least 3"):
        compute_umap(np.zeros((2, 4), np.float32))


def test_fingerprint_changes_with_any_value():
    """Equal matrices share a fingerprint; one changed value gives another."""
    X, _ = clustered(n_per=4)
    Y = X.copy()
    assert embedding_fingerprint(X) == embedding_fingerprint(Y)
    Y[3, 3] += 1e-3
    assert embedding_fingerprint(X) != embedding_fingerprint(Y)


def test_table_umap_is_cached_until_embeddings_change(monkeypatch, tmp_path):
    """umap_for_table stores X_umap; a second call (also after a save/load round trip)
    reuses it; new embeddings or new parameters recompute it."""
    X, _ = clustered(n_per=20)
    table = table_with(X)
    calls = []
    real = reduce.compute_umap

    def counting(X, **kw):
        calls.append(kw)
        return real(X, **kw)

    monkeypatch.setattr(reduce, "compute_umap", counting)
    first = umap_for_table(table)
    assert table.adata.obsm["X_umap"].shape == (len(X), 2)
    umap_for_table(table)
    assert len(calls) == 1
    back = CellTable.load(table.save(tmp_path / "p.h5ad"))
    np.testing.assert_array_equal(umap_for_table(back), first)
    assert len(calls) == 1
    umap_for_table(back, n_neighbors=5)
    assert len(calls) == 2
    back.set_embeddings(X + 1.0)
    umap_for_table(back, n_neighbors=5)
    assert len(calls) == 3


def test_exact_neighbours_match_brute_force():
    """nearest_neighbors returns, for every row, the k rows of smallest distance (an
    independent brute-force oracle), itself first, distances ascending."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(120, 7)).astype(np.float32)
    idx, dist = reduce.nearest_neighbors(X, 6)
    assert idx.shape == dist.shape == (120, 6)
    d = np.sqrt(((X[:, None, :] - X[None]) ** 2).sum(-1))
    oracle = np.argsort(d, axis=1)[:, :6]
    assert (idx[:, 0] == np.arange(120)).all()
    assert all(set(a) == set(b) for a, b in zip(idx.tolist(), oracle.tolist(), strict=True))
    assert (np.diff(dist, axis=1) >= 0).all()
    np.testing.assert_allclose(dist, np.take_along_axis(d, idx.astype(np.int64), 1), atol=1e-4)


def test_cached_umap_reuses_only_a_matching_key():
    """cached_umap returns the stored map (computed=False) while fingerprint and parameters
    match, and runs UMAP when either changes or when forced; the key comes from core."""
    X, _ = clustered(n_per=10)
    stored = np.arange(len(X) * 2, dtype=np.float32).reshape(-1, 2)
    key = reduce.umap_cache_key(X)
    assert key["fingerprint"] == embedding_fingerprint(X)
    hit = reduce.cached_umap(X, stored=stored, stored_key=key)
    assert not hit.computed
    np.testing.assert_array_equal(hit.coords, stored)
    # h5ad gives numpy scalars back: still a hit
    numpy_key = {k: (np.int64(v) if isinstance(v, int) else v) for k, v in key.items()}
    assert not reduce.cached_umap(X, stored=stored, stored_key=numpy_key).computed
    miss = reduce.cached_umap(X, stored=stored, stored_key=key, n_neighbors=5)
    assert miss.computed
    assert miss.key["n_neighbors"] == 5
    assert not np.array_equal(miss.coords, stored)
    assert reduce.cached_umap(X, stored=stored, stored_key=key, force=True).computed
    assert reduce.cached_umap(X + 1, stored=stored, stored_key=key).computed
    with pytest.raises(TypeError, match="unknown UMAP parameter"):
        reduce.umap_cache_key(X, neighbours=5)


def test_store_umap_with_an_array_is_reused_by_the_table(monkeypatch):
    """A map stored with store_umap(table, array) carries the key of the table's
    embeddings, so umap_for_table returns it without running UMAP."""
    X, _ = clustered(n_per=10)
    table = table_with(X)
    xy = X[:, :2].copy()
    reduce.store_umap(table, xy)
    monkeypatch.setattr(reduce, "compute_umap", lambda *a, **k: pytest.fail("UMAP ran"))
    np.testing.assert_array_equal(umap_for_table(table), xy)
    with pytest.raises(ValueError, match="shape"):
        reduce.store_umap(table, xy[:5])


def test_warm_up_compiles_and_the_disk_cache_is_on():
    """warm_up_umap runs UMAP on a tiny input (compiling or loading the numba code) and
    umap-learn's numba functions have the on-disk cache switched on."""
    assert reduce.warm_up_umap() > 0
    assert reduce.enable_umap_disk_cache() is True
    from umap.layouts import _nb_optimize_layout_euclidean_single_epoch as epoch

    assert type(epoch._cache).__name__ == "FunctionCache"

"""k-means and HDBSCAN on the embeddings, written to an obs column."""

import numpy as np
import pandas as pd
import pytest

from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.clustering import cluster_embeddings, cluster_names, cluster_table


def blobs(sizes=(60, 40, 20), dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(len(sizes), dim))
    X = np.concatenate(
        [c + rng.normal(size=(n, dim)) for c, n in zip(centres, sizes, strict=True)]
    )
    return X.astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


def same_partition(a, b) -> bool:
    """Two labelings are the same partition (up to renaming)."""
    return len(set(zip(a.tolist(), b.tolist(), strict=True))) == len(set(a.tolist()))


@pytest.mark.parametrize("method", ["kmeans", "hdbscan"])
def test_recovers_separated_blobs_numbered_by_size(method):
    """Three far-apart blobs of 60, 40 and 20 cells come back as three groups, numbered
    0, 1, 2 from the largest; HDBSCAN marks no blob cell as noise."""
    X, truth = blobs()
    groups = cluster_embeddings(X, method, n_clusters=3, min_cluster_size=10)
    assert groups.shape == (120,)
    assert same_partition(groups, truth)
    assert np.bincount(groups).tolist() == [60, 40, 20]


def test_kmeans_is_seeded():
    """The same seed gives the same groups."""
    X, _ = blobs(dim=8, seed=2)
    a = cluster_embeddings(X, "kmeans", n_clusters=5, seed=1)
    np.testing.assert_array_equal(a, cluster_embeddings(X, "kmeans", n_clusters=5, seed=1))


def test_names_noise_is_missing():
    """Groups become names "1".."k"; noise (-1) becomes missing."""
    names = cluster_names(np.array([0, 1, -1, 0]))
    assert list(names.categories) == ["1", "2"]
    assert names.isna().tolist() == [False, False, True, False]


def test_cluster_table_writes_a_categorical_column():
    """cluster_table writes obs["cluster"] and fires columns_changed; bad input is one
    clear error."""
    X, truth = blobs()
    frame = pd.DataFrame(
        {"source": "s", "batch": "b", "x": 1.0, "y": 1.0, "x0": 0, "y0": 0, "x1": 2, "y1": 2},
        index=[f"b/s#{i}" for i in range(len(X))],
    )
    table = CellTable()
    table.add_cells(frame, embeddings=X)
    seen = []
    table.events.columns_changed.connect(lambda names: seen.append(tuple(names)))
    cluster_table(table, "kmeans", n_clusters=3)
    col = table.obs["cluster"]
    assert isinstance(col.dtype, pd.CategoricalDtype)
    assert same_partition(col.astype(str).to_numpy(), truth)
    assert ("cluster",) in seen
    with pytest.raises(ValueError, match="kmeans"):
        cluster_embeddings(X, "dbscan")  # type: ignore[arg-type]
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cluster_embeddings(X)

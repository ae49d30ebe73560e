"""Batch-effect metrics: each one a per-group kernel plus a public function.

Metrics (scIB conventions, Luecken et al. 2022): iLISI, kBET acceptance, PCR-batch,
batch ASW and graph connectivity measure how well batches (labs, scanners, smears) mix
*within each cell type*; cell-type ASW, NMI and ARI measure how well cell types stay
apart. :data:`METRICS` holds each metric's direction as data
(:attr:`MetricSpec.higher_is_better`) and its one-line meaning.

The kernels (``_ilisi_group``, ``_kbet_group``, ...) take one group's cells and its
:class:`~.neighbors.Neighbors`; the public ``compute_*`` functions loop over the groups
and call them, and so does :func:`~.report.batch_report`, in one loop, with one
neighbour search per group shared by every neighbourhood metric. A test holds the
report's values equal to the separate functions'.

Groups of any size are handled: ``k`` is capped at what a group holds, and a group too
small to score is left out with its reason (see :meth:`~._data.BatchData.groups`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from napari_hemofm.core.batch._data import MIN_CELLS, BatchData, Group, check_X, mean_or_nan
from napari_hemofm.core.batch.neighbors import (
    EXACT_BELOW,
    REFERENCE_CELLS,
    NeighborMethod,
    Neighbors,
    nearest_neighbors,
    principal_axes,
)

__all__ = [
    "METRICS",
    "METRIC_INFO",
    "MetricSpec",
    "batch_asw_per_cell",
    "compute_ari",
    "compute_batch_asw",
    "compute_celltype_asw",
    "compute_graph_connectivity",
    "compute_ilisi",
    "compute_kbet",
    "compute_nmi",
    "compute_pcr_batch",
    "group_neighbors",
    "ilisi_per_cell",
]

Kind = Literal["mixing", "effect", "separation", "transfer"]

_DIRECTION_TEXT: dict[Kind, str] = {
    "mixing": "higher = better mixed",
    "effect": "higher = stronger batch effect",
    "separation": "higher = cell types better separated",
    "transfer": "higher = better transfer across batches",
}


@dataclass(frozen=True)
class MetricSpec:
    """What one metric measures and which way is good.

    Attributes
    ----------
    name : str
        The key in ``batch_report()["metrics"]``.
    kind : {"mixing", "effect", "separation", "transfer"}
        What it measures: batch mixing, batch effect strength, cell-type separation,
        or transfer of a probe across batches.
    higher_is_better : bool
        Whether a higher value means less batch effect / better separation.
    meaning : str
        One line for tables and tooltips.
    """

    name: str
    kind: Kind
    higher_is_better: bool
    meaning: str

    @property
    def direction(self) -> str:
        """The direction in words, e.g. ``"higher = better mixed"``."""
        return _DIRECTION_TEXT[self.kind]


def _spec(name: str, kind: Kind, meaning: str) -> MetricSpec:
    return MetricSpec(name, kind, kind != "effect", meaning)


#: metric name -> :class:`MetricSpec`, in report order.
METRICS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        _spec(
            "ilisi",
            "mixing",
            "effective number of batches near a cell of the same type, scaled 0-1 (1 = ideal)",
        ),
        _spec("ilisi_raw", "mixing", "effective number of batches near a cell (1 .. batches)"),
        _spec(
            "kbet_acceptance",
            "mixing",
            "share of neighbourhoods whose batch mix matches the cell type's overall mix",
        ),
        _spec(
            "pcr_batch",
            "effect",
            "share of the embedding's variance (per type) explained by batch",
        ),
        _spec(
            "batch_asw",
            "mixing",
            "1 - |silhouette of batch| within cell types (known to be insensitive)",
        ),
        _spec("graph_connectivity", "mixing", "share of each cell type in one connected kNN part"),
        _spec("celltype_asw", "separation", "silhouette of the cell types, scaled 0-1"),
        _spec("nmi", "separation", "agreement of k-means clusters with the cell types (NMI)"),
        _spec("ari", "separation", "agreement of k-means clusters with the cell types (ARI)"),
        _spec("lobo_knn_accuracy", "transfer", "kNN (k=20) accuracy on a held-out batch"),
        _spec(
            "lobo_knn_balanced_accuracy",
            "transfer",
            "kNN (k=20) balanced accuracy on a held-out batch",
        ),
        _spec("lobo_linear_accuracy", "transfer", "linear-probe accuracy on a held-out batch"),
        _spec(
            "lobo_linear_balanced_accuracy",
            "transfer",
            "linear-probe balanced accuracy on a held-out batch",
        ),
    )
}

#: metric -> (direction text, meaning): :data:`METRICS` as plain tuples.
METRIC_INFO: dict[str, tuple[str, str]] = {k: (s.direction, s.meaning) for k, s in METRICS.items()}

#: Neighbours of the graph-connectivity graph (scanpy's default).
GRAPH_NEIGHBORS = 15


# --------------------------------------------------------------------------- neighbours
def _kbet_k(group: Group, k: int | None) -> int:
    """The kBET neighbourhood: given, or scIB's median batch size of the type in [10, 100]."""
    if k is None:
        k = int(np.clip(np.median(group.counts[group.counts > 0]), 10, 100))
    return max(1, min(int(k), len(group.idx) - 1))


def group_neighbors(
    X: np.ndarray,
    batches: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray | None = None,
    *,
    n_neighbors: int = 90,
    min_cells: int = MIN_CELLS,
    method: NeighborMethod = "auto",
    exact_below: int = EXACT_BELOW,
    reference_cells: int = REFERENCE_CELLS,
    seed: int = 0,
) -> dict[str, Neighbors]:
    """One neighbour search per scored group (cell type, or all cells), for every metric.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
    batches, labels : array-like of shape (n_cells,)
        As for the metrics; only the groups the mixing metrics score are searched.
    n_neighbors : int
        Neighbours per cell, capped at the group's size - 1.
    min_cells, method, exact_below, reference_cells, seed
        See :meth:`~._data.BatchData.groups` and :func:`~.neighbors.nearest_neighbors`.

    Returns
    -------
    dict of str to Neighbors
        Group name -> neighbours of its cells (row numbers within the group, in the
        group's row order).
    """
    data = BatchData(X, batches, labels)
    return _search(
        data, data.groups(min_cells), n_neighbors, method, exact_below, reference_cells, seed
    )


def _search(
    data: BatchData,
    groups: Sequence[Group],
    n_neighbors: int | Mapping[str, int],
    method: NeighborMethod,
    exact_below: int,
    reference_cells: int,
    seed: int,
) -> dict[str, Neighbors]:
    out = {}
    for g in groups:
        if g.mixing:
            k = n_neighbors[g.name] if isinstance(n_neighbors, Mapping) else n_neighbors
            out[g.name] = nearest_neighbors(
                data.X[g.idx],
                k,
                method=method,
                exact_below=exact_below,
                reference_cells=reference_cells,
                seed=seed + g.index,
            )
    return out


def _neighbors_for(
    data: BatchData,
    group: Group,
    neighbors: Mapping[str, Neighbors] | None,
    k: int,
) -> Neighbors:
    """The group's given neighbours, or an exact-below-a-size search of ``k``."""
    if neighbors is not None and group.name in neighbors:
        nb = neighbors[group.name]
        if nb.n_cells != len(group.idx):
            raise ValueError(
                f"neighbours of {group.name!r} cover {nb.n_cells} cells; the group has "
                f"{len(group.idx)} (searched on other data?)"
            )
        return nb
    return nearest_neighbors(data.X[group.idx], k, seed=group.index)  # as the report's


# --------------------------------------------------------------------------- iLISI
def _simpson_index(
    dist: np.ndarray,
    neighbour_codes: np.ndarray,
    n_categories: int,
    perplexity: float,
    *,
    tol: float = 1e-5,
    max_iter: int = 50,
) -> np.ndarray:
    """Simpson's index of the categories of each cell's neighbours, Gaussian-weighted.

    The Gaussian precision ``beta`` of each cell is found by bisection so that the
    entropy of its neighbour weights equals ``log(perplexity)`` (the t-SNE calibration
    LISI uses). All cells are searched at once; a cell stops when its entropy is within
    ``tol``. Distances are shifted by each row's minimum, which leaves the normalised
    weights and the entropy unchanged and avoids underflow.
    """
    n = dist.shape[0]
    d = dist - dist.min(axis=1, keepdims=True)
    log_u = math.log(perplexity)
    beta = np.ones(n)
    lo = np.full(n, -np.inf)
    hi = np.full(n, np.inf)
    weights = np.zeros_like(d)
    active = np.ones(n, dtype=bool)
    for _ in range(max_iter):
        if not active.any():
            break
        rows = np.flatnonzero(active)
        p = np.exp(-d[rows] * beta[rows, None])
        sum_p = p.sum(axis=1)
        h = np.log(sum_p) + beta[rows] * (d[rows] * p).sum(axis=1) / sum_p
        weights[rows] = p / sum_p[:, None]
        diff = h - log_u
        done = np.abs(diff) < tol
        active[rows[done]] = False
        up = (diff > 0) & ~done  # entropy too high: sharpen (raise beta)
        down = ~(diff > 0) & ~done
        r_up, r_down = rows[up], rows[down]
        lo[r_up] = beta[r_up]
        beta[r_up] = np.where(np.isinf(hi[r_up]), beta[r_up] * 2, (beta[r_up] + hi[r_up]) / 2)
        hi[r_down] = beta[r_down]
        beta[r_down] = np.where(
            np.isinf(lo[r_down]), beta[r_down] / 2, (beta[r_down] + lo[r_down]) / 2
        )
    simpson = np.zeros(n)
    for c in range(n_categories):
        share = (weights * (neighbour_codes == c)).sum(axis=1)
        simpson += share**2
    return simpson


def _lisi(nb: Neighbors, codes: np.ndarray, perplexity: float, n_neighbors: int) -> np.ndarray:
    """Raw LISI (1 .. number of categories) of every searched cell."""
    nb = nb.first(n_neighbors)
    perp = min(perplexity, nb.k / 3.0)  # as harmonypy/scIB: at most a third of the neighbours
    simpson = _simpson_index(nb.distances, codes[nb.indices], int(codes.max()) + 1, perp)
    return 1.0 / simpson


def _ilisi_group(
    data: BatchData, group: Group, nb: Neighbors, perplexity: float, n_neighbors: int
) -> np.ndarray:
    """Raw per-cell LISI of one group's batches."""
    return _lisi(nb, data.local_codes(group), perplexity, n_neighbors)


def _lisi_k(perplexity: float, n_neighbors: int | None) -> int:
    return round(3 * perplexity) if n_neighbors is None else int(n_neighbors)


def ilisi_per_cell(
    X: np.ndarray,
    batches: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray | None = None,
    *,
    perplexity: float = 30.0,
    n_neighbors: int | None = None,
    scaled: bool = True,
    min_cells: int = MIN_CELLS,
    neighbors: Mapping[str, Neighbors] | None = None,
) -> np.ndarray:
    r"""Integration LISI of each cell: the effective number of batches around it.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings (no NaN rows).
    batches : array-like of shape (n_cells,)
        Batch (lab, scanner, smear) of each cell.
    labels : array-like of shape (n_cells,), optional
        Cell type of each cell (None / NaN / "" = unlabelled). When given, LISI is
        computed within each cell type's cells: the batches of cells *of the same type*
        (label-aware, so labs holding different cell mixes are not penalised).
    perplexity : float
        Effective number of neighbours of the Gaussian kernel (30, as harmonypy/scIB).
    n_neighbors : int, optional
        Neighbours used (default ``3 * perplexity`` = 90, as harmonypy). Smaller
        groups use all their other cells and ``perplexity = neighbours / 3``.
    scaled : bool
        False: raw LISI in [1, B]. True: scIB's scaling ``(LISI - 1) / (B - 1)`` in
        [0, 1], B the number of batches in the cell's group (its cell type).
    min_cells : int
        Cell types with fewer cells get NaN.
    neighbors : dict of str to Neighbors, optional
        The groups' neighbour searches (:func:`group_neighbors`); searched here when
        not given.

    Returns
    -------
    ndarray of shape (n_cells,)
        Per-cell iLISI, higher = better mixed. NaN for unlabelled cells (when ``labels``
        is given) and for cells of types with fewer than ``min_cells`` cells or found in
        one batch only.

    Notes
    -----
    For cell *i* with neighbour distances :math:`d_{ij}`, weights
    :math:`p_{ij} \\propto \\exp(-\\beta_i d_{ij})` with :math:`\\beta_i` found by bisection
    so that the entropy of :math:`p_i` is ``log(perplexity)``; then
    :math:`\\mathrm{LISI}_i = 1 / \\sum_b (\\sum_{j: b_j = b} p_{ij})^2`, the inverse Simpson's
    index of the batches. Perfect mixing of batches of unequal size gives
    :math:`1 / \\sum_b f_b^2 < B` (``f_b`` the batch shares): e.g. 100 vs 30 cells give at
    most 1.55 raw, 0.55 scaled.

    References
    ----------
    Korsunsky et al., "Fast, sensitive and accurate integration of single-cell data with
    Harmony", Nat. Methods 16, 1289-1296 (2019). doi:10.1038/s41592-019-0619-0
    Luecken et al., "Benchmarking atlas-level data integration in single-cell genomics",
    Nat. Methods 19, 41-50 (2022). doi:10.1038/s41592-021-01336-8
    """
    data = BatchData(X, batches, labels)
    k = _lisi_k(perplexity, n_neighbors)
    out = np.full(data.n, np.nan)
    for group in data.groups(min_cells):
        if group.mixing:
            raw = _ilisi_group(
                data, group, _neighbors_for(data, group, neighbors, k), perplexity, k
            )
            out[group.idx] = (raw - 1.0) / (group.n_batches - 1.0) if scaled else raw
    return out


def compute_ilisi(
    X: np.ndarray,
    batches: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray | None = None,
    *,
    perplexity: float = 30.0,
    n_neighbors: int | None = None,
    scaled: bool = True,
    min_cells: int = MIN_CELLS,
    neighbors: Mapping[str, Neighbors] | None = None,
) -> float:
    """Median iLISI, averaged over cell types; higher = better mixed.

    Parameters are those of :func:`ilisi_per_cell`. Without ``labels``: the median over
    all cells. With ``labels``: the median within each cell type found in >= 2 batches
    with >= ``min_cells`` cells, then the mean over those types.

    Returns
    -------
    float
        Scaled iLISI in [0, 1] (1 = every neighbourhood as mixed as the batches' sizes
        allow at best) or raw in [1, B]; NaN when no cell type qualifies.

    References
    ----------
    Korsunsky et al. 2019, doi:10.1038/s41592-019-0619-0; Luecken et al. 2022,
    doi:10.1038/s41592-021-01336-8 (scaled iLISI).
    """
    data = BatchData(X, batches, labels)
    per_cell = ilisi_per_cell(
        data.X,
        batches,
        labels,
        perplexity=perplexity,
        n_neighbors=n_neighbors,
        scaled=scaled,
        min_cells=min_cells,
        neighbors=neighbors,
    )
    return mean_or_nan(
        [float(np.median(per_cell[g.idx])) for g in data.groups(min_cells) if g.mixing]
    )


# --------------------------------------------------------------------------- kBET
def _kbet_group(
    data: BatchData,
    group: Group,
    nb: Neighbors,
    *,
    k: int | None,
    alpha: float,
    max_tests: int,
    seed: int,
) -> float:
    """The kBET acceptance of one group (tested cells: a seeded subset, one stream per group)."""
    from scipy.stats import chi2

    codes = data.local_codes(group)
    n = len(codes)
    k = _kbet_k(group, k)
    counts = np.bincount(codes)
    present = counts > 0
    freq = counts[present] / n
    rng = np.random.default_rng(seed + group.index)
    tested = np.sort(rng.choice(n, size=min(n, max_tests), replace=False))
    idx = nb.indices[tested, :k]
    k = idx.shape[1]  # a given search may hold fewer
    observed = np.stack([(codes[idx] == c).sum(axis=1) for c in np.flatnonzero(present)], axis=1)
    expected = k * freq
    stat = ((observed - expected) ** 2 / expected).sum(axis=1)
    p = chi2.sf(stat, df=int(present.sum()) - 1)
    return float(1.0 - np.mean(p < alpha))


def compute_kbet(
    X: np.ndarray,
    batches: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray | None = None,
    *,
    k: int | None = None,
    alpha: float = 0.05,
    max_tests: int = 1000,
    seed: int = 0,
    min_cells: int = MIN_CELLS,
    neighbors: Mapping[str, Neighbors] | None = None,
) -> float:
    """The kBET acceptance rate: share of neighbourhoods with the expected batch mix.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings.
    batches, labels : array-like of shape (n_cells,)
        Batch and (optional) cell type of each cell; with labels the test runs within
        each cell type against that type's batch composition (scIB).
    k : int, optional
        Neighbourhood size; default the median number of cells per batch within the cell
        type, clipped to [10, 100] (scIB's choice), and at most the group size - 1.
    alpha : float
        Significance level of each test.
    max_tests : int
        Cells tested per cell type (a seeded random subset; all when fewer).
    seed : int
        Seed of the subset (cell type ``i`` uses ``seed + i``).
    min_cells : int
        Cell types with fewer cells are left out.
    neighbors : dict of str to Neighbors, optional
        The groups' neighbour searches (:func:`group_neighbors`, with at least ``k``
        neighbours); searched here when not given.

    Returns
    -------
    float
        Acceptance rate ``1 - rejection rate`` in [0, 1], mean over cell types found in
        >= 2 batches; higher = better mixed. NaN when no cell type qualifies.

    Notes
    -----
    For each tested cell, the batch counts :math:`o_b` among its ``k`` nearest other
    cells are compared with :math:`e_b = k f_b` (``f_b`` the batch shares of the cell
    type) by Pearson's chi-square test with ``B - 1`` degrees of freedom; the
    neighbourhood is rejected when ``p < alpha``. Unlike scIB we do not split cell types
    into connected components of the kNN graph first.

    References
    ----------
    Büttner et al., "A test metric for assessing single-cell RNA-seq batch correction",
    Nat. Methods 16, 43-49 (2019). doi:10.1038/s41592-018-0254-1
    """
    data = BatchData(X, batches, labels)
    scores = []
    for group in data.groups(min_cells):
        if group.mixing:
            nb = _neighbors_for(data, group, neighbors, _kbet_k(group, k))
            scores.append(
                _kbet_group(data, group, nb, k=k, alpha=alpha, max_tests=max_tests, seed=seed)
            )
    return mean_or_nan(scores)


# --------------------------------------------------------------------------- PCR
def _pcr_group(X: np.ndarray, codes: np.ndarray, n_components: int) -> float:
    """Variance share of the first principal components explained by the batch codes.

    Regressing principal component ``i`` on the batch one-hot gives
    ``R^2_i = sum_b n_b (v_i . (mu_b - mu))^2 / lambda_i`` (``lambda_i`` the component's
    sum of squares); weighting by ``lambda_i`` and dividing by ``sum_i lambda_i`` leaves
    the ratio of the summed between-batch and total sums of squares in those components.
    """
    m = max(1, min(n_components, X.shape[1], len(X) - 1))
    mean, values, axes = principal_axes(X, m)
    total = float(values.sum())
    if total <= 0:
        return 0.0
    between = 0.0
    for c in np.unique(codes):
        rows = codes == c
        shift = (X[rows].mean(axis=0, dtype=np.float64) - mean) @ axes
        between += rows.sum() * float(shift @ shift)
    return between / total


def compute_pcr_batch(
    X: np.ndarray,
    batches: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray | None = None,
    *,
    n_components: int = 50,
    min_cells: int = MIN_CELLS,
) -> float:
    r"""Principal-component regression on batch: the variance share explained by batch.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings.
    batches, labels : array-like of shape (n_cells,)
        With labels the score is computed within each cell type found in >= 2 batches
        and averaged (so different cell mixes between labs do not count as batch
        effect); without, on all cells as scIB's ``pcr``.
    n_components : int
        Principal components kept (at most dim and n - 1).
    min_cells : int
        Cell types with fewer cells are left out.

    Returns
    -------
    float
        :math:`\\sum_i \\mathrm{Var}(PC_i) R^2_i / \\sum_i \\mathrm{Var}(PC_i)` in [0, 1],
        with :math:`R^2_i` from regressing PC *i* on the batch one-hot;
        higher = stronger batch effect.

    References
    ----------
    Büttner et al. 2019, doi:10.1038/s41592-018-0254-1; Luecken et al. 2022,
    doi:10.1038/s41592-021-01336-8.
    """
    data = BatchData(X, batches, labels)
    return mean_or_nan(
        [
            _pcr_group(data.X[g.idx], data.b[g.idx], n_components)
            for g in data.groups(min_cells)
            if g.mixing
        ]
    )


# --------------------------------------------------------------------------- ASW
def _subsample(idx: np.ndarray, max_cells: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_cells is None or len(idx) <= max_cells:
        return idx
    return np.sort(rng.choice(idx, size=max_cells, replace=False))


def _batch_asw_group(data: BatchData, group: Group, max_cells: int | None, seed: int) -> float:
    """Mean ``1 - |silhouette of batch|`` of one group (a seeded subset when large)."""
    from sklearn.metrics import silhouette_samples

    rng = np.random.default_rng(seed + group.index)
    idx = _subsample(group.idx, max_cells, rng)
    if len(np.unique(data.b[idx])) < 2:
        return math.nan
    return float(np.mean(1.0 - np.abs(silhouette_samples(data.X[idx], data.b[idx]))))


def batch_asw_per_cell(
    X: np.ndarray,
    batches: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray | None = None,
    *,
    min_cells: int = MIN_CELLS,
) -> np.ndarray:
    """Per-cell ``1 - |silhouette of batch|`` within the cell's type.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
    batches, labels : array-like of shape (n_cells,)
    min_cells : int
        Cell types with fewer cells get NaN.

    Returns
    -------
    ndarray of shape (n_cells,)
        In [0, 1], higher = better mixed; NaN where the cell type is skipped (see
        :func:`compute_batch_asw`) or the cell is unlabelled.
    """
    from sklearn.metrics import silhouette_samples

    data = BatchData(X, batches, labels)
    out = np.full(data.n, np.nan)
    for group in data.groups(min_cells):
        if group.mixing:
            idx = group.idx
            out[idx] = 1.0 - np.abs(silhouette_samples(data.X[idx], data.b[idx]))
    return out


def compute_batch_asw(
    X: np.ndarray,
    batches: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray | None = None,
    *,
    max_cells: int | None = 2000,
    seed: int = 0,
    min_cells: int = MIN_CELLS,
) -> float:
    """Batch ASW as in scIB: ``1 - |silhouette of batch|`` within cell types.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings.
    batches, labels : array-like of shape (n_cells,)
        Batch and cell type of each cell (without labels: all cells as one group).
    max_cells : int, optional
        Silhouettes cost O(n^2): larger cell types are scored on a seeded subset.
    seed : int
        Seed of the subset (cell type ``i`` uses ``seed + i``).
    min_cells : int
        Cell types with fewer cells are left out.

    Returns
    -------
    float
        Mean over cells of ``1 - |s(i)|`` (s the silhouette with batch as the cluster),
        averaged over cell types found in >= 2 batches; in [0, 1], higher = better mixed.

    Notes
    -----
    Kept to compare with published numbers, but **known to be insensitive**: it stays
    high for clearly separated batches when the batches' spreads overlap in the
    silhouette's sense, and is blind to nested batch structure (Rautenstrauch & Ohler
    2025). Prefer iLISI and kBET.

    References
    ----------
    Luecken et al. 2022, doi:10.1038/s41592-021-01336-8.
    Rautenstrauch & Ohler, "Shortcomings of silhouette in single-cell integration
    benchmarking", Nat. Biotechnol. (2025). doi:10.1038/s41587-025-02743-4
    """
    data = BatchData(X, batches, labels)
    return mean_or_nan(
        [_batch_asw_group(data, g, max_cells, seed) for g in data.groups(min_cells) if g.mixing]
    )


def compute_celltype_asw(
    X: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    *,
    max_cells: int | None = 4000,
    seed: int = 0,
) -> float:
    """Cell-type ASW: silhouette of the labels, scaled to [0, 1].

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings.
    labels : array-like of shape (n_cells,)
        Cell type of each cell; unlabelled cells are left out.
    max_cells : int, optional
        Score a seeded random subset of at most this many labelled cells (O(n^2)).
    seed : int
        Seed of the subset.

    Returns
    -------
    float
        ``(s + 1) / 2`` with ``s`` the mean silhouette width of the labels (Euclidean);
        higher = cell types better separated. NaN with fewer than 2 labels.

    References
    ----------
    Rousseeuw, "Silhouettes", J. Comput. Appl. Math. 20, 53-65 (1987).
    doi:10.1016/0377-0427(87)90125-7; Luecken et al. 2022 (scaling).
    """
    from sklearn.metrics import silhouette_samples

    from napari_hemofm.core.batch._data import as_codes

    X = check_X(X)
    y, _ = as_codes(labels, len(X), "labels")
    idx = _subsample(np.flatnonzero(y >= 0), max_cells, np.random.default_rng(seed))
    if len(np.unique(y[idx])) < 2 or len(idx) < 3 or len(np.unique(y[idx])) >= len(idx):
        return math.nan
    return float((np.mean(silhouette_samples(X[idx], y[idx])) + 1.0) / 2.0)


# --------------------------------------------------------------------------- graph
def _connectivity_group(nb: Neighbors, n_neighbors: int) -> float:
    """Share of a group's cells in the largest weakly connected part of its kNN graph."""
    from scipy.sparse.csgraph import connected_components

    _, comp = connected_components(nb.graph(n_neighbors), directed=True, connection="weak")
    return float(np.bincount(comp).max() / nb.n_cells)


def compute_graph_connectivity(
    X: np.ndarray,
    batches: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray,
    *,
    n_neighbors: int = GRAPH_NEIGHBORS,
    min_cells: int = MIN_CELLS,
    neighbors: Mapping[str, Neighbors] | None = None,
) -> float:
    """Graph connectivity of each cell type's kNN graph.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings.
    batches, labels : array-like of shape (n_cells,)
        Batch and cell type; only cell types found in >= 2 batches are averaged.
    n_neighbors : int
        Neighbours of the kNN graph (15, as scanpy's default).
    min_cells : int
        Cell types with fewer cells are left out.
    neighbors : dict of str to Neighbors, optional
        The groups' neighbour searches (:func:`group_neighbors`); searched here when
        not given.

    Returns
    -------
    float
        Mean over cell types of the share of the type's cells in the largest connected
        component of the type's kNN graph (edges in either direction); in (0, 1],
        higher = better mixed (a type split by batch falls apart).

    Notes
    -----
    scIB restricts one kNN graph of all cells to each type; here each type's graph
    links its cells to their nearest cells *of that type*, the same neighbour search
    the other mixing metrics read. A type whose batches lie apart falls into one part
    per batch in both; a type spread between other types stays connected here.

    References
    ----------
    Luecken et al. 2022, doi:10.1038/s41592-021-01336-8.
    """
    data = BatchData(X, batches, labels)
    if data.y is None:
        raise ValueError("graph connectivity needs the cell type labels")
    scores = [
        _connectivity_group(_neighbors_for(data, g, neighbors, n_neighbors), n_neighbors)
        for g in data.groups(min_cells)
        if g.mixing
    ]
    return mean_or_nan(scores)


# --------------------------------------------------------------------------- clusters
def _kmeans_agreement(
    X: np.ndarray, labels: Any, *, seed: int, n_init: int, max_cells: int | None
) -> dict[str, float]:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from napari_hemofm.core.batch._data import as_codes

    X = check_X(X)
    y, _ = as_codes(labels, len(X), "labels")
    keep = _subsample(np.flatnonzero(y >= 0), max_cells, np.random.default_rng(seed))
    n_types = len(np.unique(y[keep]))
    if n_types < 2 or len(keep) <= n_types:
        return {"nmi": math.nan, "ari": math.nan}
    km = KMeans(n_clusters=n_types, random_state=seed, n_init=n_init)
    pred = km.fit_predict(X[keep])
    return {
        "nmi": float(normalized_mutual_info_score(y[keep], pred, average_method="arithmetic")),
        "ari": float(adjusted_rand_score(y[keep], pred)),
    }


def compute_nmi(
    X: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    *,
    seed: int = 0,
    n_init: int = 1,
    max_cells: int | None = 10000,
) -> float:
    """NMI between k-means clusters (k = number of labels) and the labels.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings; unlabelled cells are left out.
    labels : array-like of shape (n_cells,)
        Cell type of each cell.
    seed, n_init : int
        k-means seed and restarts.
    max_cells : int, optional
        Cluster a seeded subset of at most this many labelled cells.

    Returns
    -------
    float
        Normalised mutual information (arithmetic mean normalisation) in [0, 1];
        higher = cell types better separated.

    References
    ----------
    Luecken et al. 2022 (who optimise Louvain clustering instead of k-means).
    """
    return _kmeans_agreement(X, labels, seed=seed, n_init=n_init, max_cells=max_cells)["nmi"]


def compute_ari(
    X: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    *,
    seed: int = 0,
    n_init: int = 1,
    max_cells: int | None = 10000,
) -> float:
    """Adjusted Rand index between k-means clusters and the labels.

    Parameters and references as :func:`compute_nmi`.

    Returns
    -------
    float
        ARI (1 = identical partitions, about 0 = chance); higher = better separated.
    """
    return _kmeans_agreement(X, labels, seed=seed, n_init=n_init, max_cells=max_cells)["ari"]

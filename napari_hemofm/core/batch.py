"""Batch-effect metrics and corrections on cell embeddings.

Metrics (scIB conventions, Luecken et al. 2022): iLISI, kBET acceptance, PCR-batch,
batch ASW and graph connectivity measure how well batches (labs, scanners, stains) mix
*within each cell type*; cell-type ASW, NMI and ARI measure how well cell types stay
apart; leave-one-batch-out kNN / linear-probe accuracy measures whether a classifier
fitted on the other batches transfers. :func:`batch_report` computes them all;
:data:`METRIC_INFO` gives each metric's direction and one-line meaning.

Corrections (:func:`correct_embeddings`) return a *new* array, a preview: the cell
table's ``X_embed`` is never rewritten (DESIGN.md: embeddings are a per-cell function
of the crop and the model).

Written here with numpy, scipy and scikit-learn only:

- scib-metrics is not used because it pulls JAX; the metrics are short.
- ComBat is implemented here (parametric empirical Bayes, Johnson et al. 2007)
  because none of the packages on PyPI fits: ``combat`` (pyComBat) is GPL and
  superseded by ``inmoose``, which is GPL and heavy (statsmodels, seaborn, patsy,
  compiled from source); ``scanpy.pp.combat`` pulls scanpy and numba; ``pycombat``
  (CoAxLab) was last released in 2022. None of them handles unlabelled cells when the
  labels are a protected covariate. ``pycombat`` serves as the test oracle where it
  is installed.
- Harmony is *called* through ``harmonypy`` (GPL-3, an optional extra:
  ``pip install "napari-hemofm[harmony]"``), never copied.
- LISI's perplexity calibration follows the published algorithm (Korsunsky et al.
  2019, the t-SNE binary search on the Gaussian precision); it is tested against
  ``harmonypy.compute_lisi``.

Nothing here imports napari or Qt.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable

Correction = Literal["centre", "combat", "harmony"]
CORRECTIONS: tuple[str, ...] = ("centre", "combat", "harmony")

MIXED = "higher = better mixed"
SEPARATED = "higher = cell types better separated"
EFFECT = "higher = stronger batch effect"
TRANSFER = "higher = better transfer across batches"

#: metric -> (direction, one-line meaning). The keys of ``batch_report()["metrics"]``.
METRIC_INFO: dict[str, tuple[str, str]] = {
    "ilisi": (
        MIXED,
        "effective number of batches near a cell of the same type, scaled 0-1 (1 = ideal)",
    ),
    "ilisi_raw": (MIXED, "effective number of batches near a cell (1 .. number of batches)"),
    "kbet_acceptance": (
        MIXED,
        "share of neighbourhoods whose batch mix matches the cell type's overall mix",
    ),
    "pcr_batch": (EFFECT, "share of the embedding's variance (per cell type) explained by batch"),
    "batch_asw": (MIXED, "1 - |silhouette of batch| within cell types (known to be insensitive)"),
    "graph_connectivity": (MIXED, "share of each cell type in one connected kNN component"),
    "celltype_asw": (SEPARATED, "silhouette of the cell types, scaled 0-1"),
    "nmi": (SEPARATED, "agreement of k-means clusters with the cell types (normalised MI)"),
    "ari": (SEPARATED, "agreement of k-means clusters with the cell types (adjusted Rand)"),
    "lobo_knn_accuracy": (TRANSFER, "kNN (k=20) accuracy on a held-out batch"),
    "lobo_knn_balanced_accuracy": (TRANSFER, "kNN (k=20) balanced accuracy on a held-out batch"),
    "lobo_linear_accuracy": (TRANSFER, "linear-probe accuracy on a held-out batch"),
    "lobo_linear_balanced_accuracy": (
        TRANSFER,
        "linear-probe balanced accuracy on a held-out batch",
    ),
}

MIN_CELLS = 10
"""Default minimum cells of a cell type for its mixing metrics (fewer: reported as NaN)."""


# --------------------------------------------------------------------------- input
def _as_codes(values: Any, n: int, what: str) -> tuple[np.ndarray, list[str]]:
    """Category codes (-1 = missing) and names in order of first appearance."""
    import pandas as pd

    arr = np.asarray(values, dtype=object).ravel()
    if len(arr) != n:
        raise ValueError(f"X has {n} rows (cells) but {what} has {len(arr)} values")
    missing = pd.isna(arr) | np.array([isinstance(v, str) and not v.strip() for v in arr])
    names = [str(v) for v in pd.unique(arr[~missing])]
    lookup = {name: i for i, name in enumerate(names)}
    codes = np.full(n, -1, dtype=np.int64)
    codes[~missing] = [lookup[str(v)] for v in arr[~missing]]
    return codes, names


def _check_X(X: Any) -> np.ndarray:
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


class _Data:
    """Validated input: embeddings, batch codes, label codes (-1 = unlabelled)."""

    def __init__(
        self, X: Any, batches: Any, labels: Any = None, *, need_batches: bool = True
    ) -> None:
        self.X = _check_X(X)
        n = len(self.X)
        self.b, self.batch_names = _as_codes(batches, n, "batches")
        if (self.b < 0).any():
            raise ValueError(f"{int((self.b < 0).sum())} of {n} cells have no batch")
        if need_batches and len(self.batch_names) < 2:
            raise ValueError(
                f"batch metrics need >= 2 batches; all {n} cells are in {self.batch_names}"
            )
        if labels is None:
            self.y = None
            self.label_names: list[str] = []
        else:
            self.y, self.label_names = _as_codes(labels, n, "labels")

    @property
    def n(self) -> int:
        return len(self.X)

    def groups(self, min_cells: int) -> list[dict[str, Any]]:
        """One entry per cell type (or one for all cells when unlabelled).

        ``mixing`` is True when the group has >= ``min_cells`` cells in >= 2 batches.
        """
        if self.y is None:
            index_sets = [("all cells", np.arange(self.n))]
        else:
            index_sets = [
                (name, np.flatnonzero(self.y == i)) for i, name in enumerate(self.label_names)
            ]
        out = []
        for name, idx in index_sets:
            counts = np.bincount(self.b[idx], minlength=len(self.batch_names))
            present = int((counts > 0).sum())
            if present < 2:
                reason = "found in one batch only"
            elif len(idx) < min_cells:
                reason = f"fewer than {min_cells} cells"
            else:
                reason = ""
            out.append(
                {
                    "name": name,
                    "idx": idx,
                    "counts": counts,
                    "n_batches": present,
                    "mixing": not reason,
                    "reason": reason,
                }
            )
        return out


def _mean_or_nan(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def _knn(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances and indices of each cell's ``k`` nearest other cells."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, metric="euclidean").fit(X)
    # no query points: sklearn leaves each point out of its own neighbours (duplicates too)
    dist, idx = nn.kneighbors()
    return dist, idx


def _knn_of(X: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` nearest other cells of the cells ``rows`` (only those)."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=min(k + 1, len(X)), metric="euclidean").fit(X)
    idx = nn.kneighbors(X[rows], return_distance=False)
    # drop the query cell itself (or the farthest, where a duplicate took its place)
    own = idx == rows[:, None]
    own[~own.any(axis=1), -1] = True
    return idx[~own].reshape(len(rows), -1)[:, :k]


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


def _lisi(X: np.ndarray, codes: np.ndarray, perplexity: float, n_neighbors: int) -> np.ndarray:
    """Raw LISI (1 .. number of categories) of every row of ``X``."""
    n = len(X)
    k = min(n_neighbors, n - 1)
    perp = min(perplexity, k / 3.0)  # as harmonypy/scIB: at most a third of the neighbours
    dist, idx = _knn(X, k)
    simpson = _simpson_index(dist, codes[idx], int(codes.max()) + 1, perp)
    return 1.0 / simpson


def ilisi_per_cell(
    X: np.ndarray,
    batches: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray | None = None,
    *,
    perplexity: float = 30.0,
    n_neighbors: int | None = None,
    scaled: bool = True,
    min_cells: int = MIN_CELLS,
) -> np.ndarray:
    r"""Integration LISI of each cell: the effective number of batches around it.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings (no NaN rows).
    batches : array-like of shape (n_cells,)
        Batch (lab, scanner, stain) of each cell.
    labels : array-like of shape (n_cells,), optional
        Cell type of each cell (None / NaN / "" = unlabelled). When given, LISI is
        computed within each cell type's cells: the batches of cells *of the same type*
        (label-aware, so labs holding different cell mixes are not penalised).
    perplexity : float
        Effective number of neighbours of the Gaussian kernel (30, as harmonypy/scIB).
    n_neighbors : int, optional
        Neighbours searched (default ``3 * perplexity`` = 90, as harmonypy). Smaller
        groups use all their other cells and ``perplexity = neighbours / 3``.
    scaled : bool
        False: raw LISI in [1, B]. True: scIB's scaling ``(LISI - 1) / (B - 1)`` in
        [0, 1], B the number of batches in the cell's group (its cell type).
    min_cells : int
        Cell types with fewer cells get NaN.

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
    data = _Data(X, batches, labels)
    n_neighbors = round(3 * perplexity) if n_neighbors is None else int(n_neighbors)
    out = np.full(data.n, np.nan)
    for group in data.groups(min_cells):
        if not group["mixing"]:
            continue
        idx = group["idx"]
        _, codes = np.unique(data.b[idx], return_inverse=True)
        raw = _lisi(data.X[idx], codes, perplexity, n_neighbors)
        out[idx] = (raw - 1.0) / (group["n_batches"] - 1.0) if scaled else raw
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
    data = _Data(X, batches, labels)
    per_cell = ilisi_per_cell(
        data.X,
        batches,
        labels,
        perplexity=perplexity,
        n_neighbors=n_neighbors,
        scaled=scaled,
        min_cells=min_cells,
    )
    medians = [float(np.median(per_cell[g["idx"]])) for g in data.groups(min_cells) if g["mixing"]]
    return _mean_or_nan(medians)


# --------------------------------------------------------------------------- kBET
def _kbet_group(
    X: np.ndarray,
    codes: np.ndarray,
    *,
    k: int | None,
    alpha: float,
    max_tests: int,
    rng: np.random.Generator,
) -> float:
    from scipy.stats import chi2

    n = len(X)
    counts = np.bincount(codes)
    present = counts > 0
    if k is None:
        # scIB: the median number of cells per batch within the cell type, in [10, 100]
        k = int(np.clip(np.median(counts[present]), 10, 100))
    k = min(k, n - 1)
    freq = counts[present] / n
    tested = np.sort(rng.choice(n, size=min(n, max_tests), replace=False))
    idx = _knn_of(X, tested, k)
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
        Seed of the subset.
    min_cells : int
        Cell types with fewer cells are left out.

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
    data = _Data(X, batches, labels)
    scores = []
    for i, group in enumerate(data.groups(min_cells)):
        if group["mixing"]:
            idx = group["idx"]
            _, codes = np.unique(data.b[idx], return_inverse=True)
            rng = np.random.default_rng(seed + i)  # as batch_report: one stream per type
            scores.append(
                _kbet_group(data.X[idx], codes, k=k, alpha=alpha, max_tests=max_tests, rng=rng)
            )
    return _mean_or_nan(scores)


# --------------------------------------------------------------------------- PCR
def _pcr_group(X: np.ndarray, codes: np.ndarray, n_components: int) -> float:
    from sklearn.decomposition import PCA

    n_comp = max(1, min(n_components, X.shape[1], len(X) - 1))
    scores = PCA(n_components=n_comp, svd_solver="full").fit_transform(
        X.astype(np.float64, copy=False)
    )
    # R^2 of a PC regressed on the batch one-hot = between-batch / total sum of squares;
    # weighting R^2 by the PC's variance makes the ratio of the summed sums of squares.
    total = (scores**2).sum(axis=0)
    between = np.zeros(n_comp)
    for c in np.unique(codes):
        rows = codes == c
        between += rows.sum() * scores[rows].mean(axis=0) ** 2
    if total.sum() <= 0:
        return 0.0
    return float(between.sum() / total.sum())


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
    data = _Data(X, batches, labels)
    scores = []
    for group in data.groups(min_cells):
        if group["mixing"]:
            idx = group["idx"]
            scores.append(_pcr_group(data.X[idx], data.b[idx], n_components))
    return _mean_or_nan(scores)


# --------------------------------------------------------------------------- ASW
def _subsample(idx: np.ndarray, max_cells: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_cells is None or len(idx) <= max_cells:
        return idx
    return np.sort(rng.choice(idx, size=max_cells, replace=False))


def batch_asw_per_cell(
    X: np.ndarray,
    batches: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray | None = None,
    *,
    min_cells: int = MIN_CELLS,
) -> np.ndarray:
    """Per-cell ``1 - |silhouette of batch|`` within the cell's type.

    Returns
    -------
    ndarray of shape (n_cells,)
        In [0, 1], higher = better mixed; NaN where the cell type is skipped (see
        :func:`compute_batch_asw`) or the cell is unlabelled.
    """
    from sklearn.metrics import silhouette_samples

    data = _Data(X, batches, labels)
    out = np.full(data.n, np.nan)
    for group in data.groups(min_cells):
        if group["mixing"]:
            idx = group["idx"]
            out[idx] = 1.0 - np.abs(silhouette_samples(data.X[idx], data.b[idx]))
    return out


def compute_batch_asw(
    X: np.ndarray,
    batches: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray | None = None,
    *,
    max_cells: int | None = 5000,
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
        Seed of the subset.
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
    from sklearn.metrics import silhouette_samples

    data = _Data(X, batches, labels)
    rng = np.random.default_rng(seed)
    scores = []
    for group in data.groups(min_cells):
        if not group["mixing"]:
            continue
        idx = _subsample(group["idx"], max_cells, rng)
        if len(np.unique(data.b[idx])) < 2:
            continue
        scores.append(float(np.mean(1.0 - np.abs(silhouette_samples(data.X[idx], data.b[idx])))))
    return _mean_or_nan(scores)


def compute_celltype_asw(
    X: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    *,
    max_cells: int | None = 10000,
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

    X = _check_X(X)
    y, _ = _as_codes(labels, len(X), "labels")
    idx = _subsample(np.flatnonzero(y >= 0), max_cells, np.random.default_rng(seed))
    if len(np.unique(y[idx])) < 2 or len(idx) < 3:
        return math.nan
    return float((np.mean(silhouette_samples(X[idx], y[idx])) + 1.0) / 2.0)


# --------------------------------------------------------------------------- graph
def _knn_graph(X: np.ndarray, k: int):
    from scipy.sparse import csr_matrix

    k = min(k, len(X) - 1)
    _, idx = _knn(X, k)
    rows = np.repeat(np.arange(len(X)), k)
    graph = csr_matrix((np.ones(rows.size), (rows, idx.ravel())), shape=(len(X), len(X)))
    return graph


def _largest_component_share(graph, idx: np.ndarray) -> float:
    from scipy.sparse.csgraph import connected_components

    sub = graph[idx][:, idx]
    _, comp = connected_components(sub, directed=True, connection="weak")
    return float(np.bincount(comp).max() / len(idx))


def compute_graph_connectivity(
    X: np.ndarray,
    batches: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray,
    *,
    n_neighbors: int = 15,
    min_cells: int = MIN_CELLS,
) -> float:
    """Graph connectivity (scIB) of each cell type in the kNN graph.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings.
    batches, labels : array-like of shape (n_cells,)
        Batch and cell type; only cell types found in >= 2 batches are averaged.
    n_neighbors : int
        Neighbours of the kNN graph built on all cells (15, as scanpy's default).
    min_cells : int
        Cell types with fewer cells are left out.

    Returns
    -------
    float
        Mean over cell types of the share of the type's cells in the largest connected
        component of the kNN graph restricted to that type (edges in either direction);
        in (0, 1], higher = better mixed (a type split by batch falls apart).

    References
    ----------
    Luecken et al. 2022, doi:10.1038/s41592-021-01336-8.
    """
    data = _Data(X, batches, labels)
    if data.y is None:
        raise ValueError("graph connectivity needs the cell type labels")
    graph = _knn_graph(data.X, n_neighbors)
    scores = [
        _largest_component_share(graph, g["idx"]) for g in data.groups(min_cells) if g["mixing"]
    ]
    return _mean_or_nan(scores)


# --------------------------------------------------------------------------- clusters
def _kmeans_agreement(X: np.ndarray, labels: Any, *, seed: int, n_init: int) -> dict[str, float]:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    X = _check_X(X)
    y, names = _as_codes(labels, len(X), "labels")
    keep = y >= 0
    if len(names) < 2 or keep.sum() <= len(names):
        return {"nmi": math.nan, "ari": math.nan}
    km = KMeans(n_clusters=len(np.unique(y[keep])), random_state=seed, n_init=n_init)
    pred = km.fit_predict(X[keep])
    return {
        "nmi": float(normalized_mutual_info_score(y[keep], pred, average_method="arithmetic")),
        "ari": float(adjusted_rand_score(y[keep], pred)),
    }


def compute_nmi(
    X: np.ndarray, labels: Sequence[str] | np.ndarray, *, seed: int = 0, n_init: int = 10
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

    Returns
    -------
    float
        Normalised mutual information (arithmetic mean normalisation) in [0, 1];
        higher = cell types better separated.

    References
    ----------
    Luecken et al. 2022 (who optimise Louvain clustering instead of k-means).
    """
    return _kmeans_agreement(X, labels, seed=seed, n_init=n_init)["nmi"]


def compute_ari(
    X: np.ndarray, labels: Sequence[str] | np.ndarray, *, seed: int = 0, n_init: int = 10
) -> float:
    """Adjusted Rand index between k-means clusters and the labels.

    Parameters and references as :func:`compute_nmi`.

    Returns
    -------
    float
        ARI (1 = identical partitions, about 0 = chance); higher = better separated.
    """
    return _kmeans_agreement(X, labels, seed=seed, n_init=n_init)["ari"]


# --------------------------------------------------------------------------- report
def _jsonable(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def batch_report(
    X: np.ndarray,
    batches: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray | None = None,
    *,
    perplexity: float = 30.0,
    kbet_k: int | None = None,
    alpha: float = 0.05,
    n_components: int = 50,
    graph_neighbors: int = 15,
    min_cells: int = MIN_CELLS,
    max_silhouette_cells: int | None = 5000,
    lobo: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """All batch-effect metrics of an embedding, overall and per cell type.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings (no NaN rows).
    batches : array-like of shape (n_cells,)
        Batch of each cell (>= 2 batches).
    labels : array-like of shape (n_cells,), optional
        Cell type (None / NaN / "" = unlabelled). Without labels the mixing metrics use
        all cells as one group and the cell-type metrics are None.
    perplexity : float
        iLISI perplexity (90 neighbours).
    kbet_k : int, optional
        kBET neighbourhood size (default: scIB's per-type median batch size in [10, 100]).
    alpha : float
        kBET significance level.
    n_components : int
        PCs for PCR-batch.
    graph_neighbors : int
        k of the kNN graph for graph connectivity.
    min_cells : int
        Cell types with fewer cells are left out of the mixing metrics.
    max_silhouette_cells : int, optional
        Silhouettes cost O(n^2): batch ASW uses a seeded subset of at most this many
        cells per type, cell-type ASW twice as many; None for all cells.
    lobo : bool
        Also score leave-one-batch-out kNN and linear probes (needs >= 2 labels).
    seed : int
        Seed of every subsample and of k-means.

    Returns
    -------
    dict
        JSON-ready (undefined values are None)::

            {"batches": [...], "n_cells": N, "n_labelled": n,
             "mixing_labels": [...],       # types found in >= 2 batches, >= min_cells
             "excluded_labels": {label: why},
             "metrics": {name: value},     # the keys of METRIC_INFO
             "per_label": {label: {"n_cells", "batches": {batch: count}, "mixing",
                                   "ilisi", "ilisi_raw", "ilisi_ideal",
                                   "kbet_acceptance", "pcr_batch", "batch_asw",
                                   "graph_connectivity"}},
             "lobo": {"labels": [...], "per_batch": {...}} or None,
             "directions": {name: direction}, "meanings": {name: meaning},
             "parameters": {...}}

    Notes
    -----
    Mixing metrics (iLISI, kBET, PCR-batch, batch ASW, graph connectivity) are computed
    within each cell type and averaged over the types found in >= 2 batches with >=
    ``min_cells`` cells; other types are listed in ``per_label`` (with ``mixing``
    False) but not averaged. Cell-type ASW, NMI and ARI use all labelled cells. The
    leave-one-batch-out probes (:func:`~.classify.evaluate_probe`, DinoBloom protocol)
    use the cells of the mixing types only, so that a class missing from the held-out
    batch does not count; the mean over held-out batches is reported.

    ``ilisi_ideal`` is the scaled iLISI a type would reach if every neighbourhood held
    its batches in the type's overall shares, ``(1 / sum_b f_b^2 - 1) / (B - 1)``: with
    unequal batch sizes it is below 1 (100 vs 1 basophils: 0.02), so read a type's
    ``ilisi`` against it.
    """
    data = _Data(X, batches, labels)
    groups = data.groups(min_cells)
    rng_seed = seed
    per_label: dict[str, dict[str, Any]] = {}
    per_metric: dict[str, list[float]] = {
        k: [] for k in ("ilisi", "ilisi_raw", "kbet_acceptance", "pcr_batch", "batch_asw")
    }
    graph = _knn_graph(data.X, graph_neighbors) if data.y is not None else None
    from sklearn.metrics import silhouette_samples

    for i, group in enumerate(groups):
        idx = group["idx"]
        entry: dict[str, Any] = {
            "n_cells": len(idx),
            "batches": {
                name: int(c)
                for name, c in zip(data.batch_names, group["counts"], strict=True)
                if c > 0
            },
            "mixing": group["mixing"],
        }
        if not group["mixing"]:
            entry["excluded"] = group["reason"]
            per_label[group["name"]] = entry
            continue
        Xg = data.X[idx]
        _, codes = np.unique(data.b[idx], return_inverse=True)
        raw = _lisi(Xg, codes, perplexity, round(3 * perplexity))
        med = float(np.median(raw))
        entry["ilisi_raw"] = med
        entry["ilisi"] = (med - 1.0) / (group["n_batches"] - 1.0)
        # the best a type can reach: every neighbourhood mixed in the type's batch shares
        shares = group["counts"][group["counts"] > 0] / len(idx)
        entry["ilisi_ideal"] = (1.0 / float((shares**2).sum()) - 1.0) / (group["n_batches"] - 1.0)
        rng = np.random.default_rng(rng_seed + i)
        entry["kbet_acceptance"] = _kbet_group(
            Xg, codes, k=kbet_k, alpha=alpha, max_tests=1000, rng=rng
        )
        entry["pcr_batch"] = _pcr_group(Xg, codes, n_components)
        sub = _subsample(np.arange(len(idx)), max_silhouette_cells, rng)
        if len(np.unique(codes[sub])) >= 2:
            entry["batch_asw"] = float(
                np.mean(1.0 - np.abs(silhouette_samples(Xg[sub], codes[sub])))
            )
        else:
            entry["batch_asw"] = math.nan
        for key in per_metric:
            per_metric[key].append(entry[key])
        if graph is not None:
            entry["graph_connectivity"] = _largest_component_share(graph, idx)
        per_label[group["name"]] = entry

    metrics: dict[str, float] = {key: _mean_or_nan(v) for key, v in per_metric.items()}
    mixing = [g for g in groups if g["mixing"]]
    metrics["graph_connectivity"] = (
        _mean_or_nan([per_label[g["name"]]["graph_connectivity"] for g in mixing])
        if graph is not None
        else math.nan
    )
    lobo_out = None
    if data.y is not None:
        label_arr = np.array(
            [data.label_names[c] if c >= 0 else None for c in data.y], dtype=object
        )
        metrics["celltype_asw"] = compute_celltype_asw(
            data.X,
            label_arr,
            max_cells=None if max_silhouette_cells is None else 2 * max_silhouette_cells,
            seed=seed,
        )
        metrics.update(_kmeans_agreement(data.X, label_arr, seed=seed, n_init=10))
        if lobo:
            metrics_lobo, lobo_out = _lobo(data, label_arr, mixing)
            metrics.update(metrics_lobo)
    for key in METRIC_INFO:
        metrics.setdefault(key, math.nan)
    clean_per_label = {
        name: {k: _jsonable(v) if isinstance(v, float) else v for k, v in entry.items()}
        for name, entry in per_label.items()
    }
    return {
        "batches": list(data.batch_names),
        "n_cells": data.n,
        "n_labelled": None if data.y is None else int((data.y >= 0).sum()),
        "mixing_labels": [g["name"] for g in mixing],
        "excluded_labels": {g["name"]: g["reason"] for g in groups if not g["mixing"]},
        "metrics": {key: _jsonable(float(metrics[key])) for key in METRIC_INFO},
        "per_label": clean_per_label,
        "lobo": lobo_out,
        "directions": {key: info[0] for key, info in METRIC_INFO.items()},
        "meanings": {key: info[1] for key, info in METRIC_INFO.items()},
        "parameters": {
            "perplexity": perplexity,
            "n_neighbors_lisi": round(3 * perplexity),
            "kbet_k": kbet_k if kbet_k is not None else "median batch size per type in [10, 100]",
            "alpha": alpha,
            "n_components": n_components,
            "graph_neighbors": graph_neighbors,
            "min_cells": min_cells,
            "seed": seed,
        },
    }


def _lobo(
    data: _Data, label_arr: np.ndarray, mixing: list[dict[str, Any]]
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Leave-one-batch-out kNN and linear probes on the cells of the mixing types."""
    from napari_hemofm.core.classify import evaluate_probe

    names = [g["name"] for g in mixing]
    if len(names) < 2:
        return {}, None
    keep = np.isin(label_arr.astype(str), names) & (data.y >= 0)
    X, y = data.X[keep], label_arr[keep]
    b = np.asarray(data.batch_names, dtype=object)[data.b[keep]]
    out: dict[str, float] = {}
    detail: dict[str, Any] = {"labels": names, "n_cells": int(keep.sum())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs convergence on tiny held-out batches
        knn = evaluate_probe(X, y, probe="knn", split="batch", batches=b)
        lin = evaluate_probe(X, y, probe="linear", split="batch", batches=b)
    for prefix, rep, key in (("lobo_knn", knn, "knn_k20"), ("lobo_linear", lin, "linear")):
        out[f"{prefix}_accuracy"] = rep["results"][key]["accuracy"]
        out[f"{prefix}_balanced_accuracy"] = rep["results"][key]["balanced_accuracy"]
    detail["per_batch"] = {
        batch: {
            "knn_k20": knn["per_batch"][batch]["knn_k20"],
            "linear": lin["per_batch"][batch]["linear"],
        }
        for batch in knn["per_batch"]
    }
    return out, detail


def table_labels(table: CellTable, label_column: str = "label") -> np.ndarray:
    """Per-cell cell types of a table: ``label_column``, else the probe's prediction.

    Parameters
    ----------
    table : CellTable
        The cell table.
    label_column : str
        An ``obs`` column. For ``"label"`` (the curated label), cells without one take
        their ``prediction`` when there is one.

    Returns
    -------
    ndarray of object, shape (n_cells,)
        Cell type names, None where there is none.
    """
    import pandas as pd

    col = table.column(label_column).astype(object)
    if label_column == "label" and "prediction" in table.obs.columns:
        col = col.where(col.notna(), table.obs["prediction"].astype(object))
    return np.array([None if pd.isna(v) else str(v) for v in col], dtype=object)


def table_batch_report(
    table: CellTable,
    *,
    embedding: str = "X_embed",
    label_column: str = "label",
    correction: Correction | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`batch_report` on a cell table.

    Parameters
    ----------
    table : CellTable
        Cells with ``obs["batch"]`` and ``obsm[embedding]``.
    embedding : str
        ``obsm`` key of the embeddings.
    label_column : str
        Cell types: this column; for ``"label"`` uncurated cells take their prediction
        (see :func:`table_labels`).
    correction : {"centre", "combat", "harmony"}, optional
        Report on a corrected copy of the embeddings (:func:`correct_embeddings`; the
        table is not changed) and add the uncorrected metrics as ``"uncorrected"``.
    **kwargs
        Passed to :func:`batch_report`.

    Returns
    -------
    dict
        :func:`batch_report`'s dict, plus ``"n_not_embedded"`` (cells left out because
        their row is NaN), ``"label_column"`` and ``"correction"`` (None or the method).

    Raises
    ------
    ValueError
        No embeddings, no embedded cell, fewer than two batches, or a correction that
        cannot be fitted.
    ImportError
        ``correction="harmony"`` without harmonypy.
    """
    emb = table.adata.obsm.get(embedding)
    if emb is None:
        raise ValueError(f"no embeddings (obsm[{embedding!r}]): embed the cells first")
    emb = np.asarray(emb)
    done = np.isfinite(emb).all(axis=1)
    if not done.any():
        raise ValueError("no cell is embedded yet: embed the cells first")
    labels = table_labels(table, label_column)[done]
    batches = table.column("batch").astype(object).to_numpy()[done]
    X = emb[done]
    uncorrected = None
    if correction is not None:
        seed = kwargs.get("seed", 0)
        uncorrected = batch_report(X, batches, labels, **kwargs)["metrics"]
        X = correct_embeddings(X, batches, labels, method=correction, seed=seed)
    report = batch_report(X, batches, labels, **kwargs)
    report["n_not_embedded"] = int((~done).sum())
    report["label_column"] = label_column
    report["correction"] = correction
    if uncorrected is not None:
        report["uncorrected"] = uncorrected
    return report


# --------------------------------------------------------------------------- corrections
def _design_check(b: np.ndarray, y: np.ndarray, batch_names: list[str]) -> None:
    """Raise when a batch shares no cell type with the others (offset not estimable)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    B = len(batch_names)
    L = int(y.max()) + 1
    rows = y >= 0
    # bipartite graph batch <-> label: offsets are identifiable iff it is connected
    adj = sp.coo_matrix((np.ones(rows.sum()), (b[rows], B + y[rows])), shape=(B + L, B + L))
    _, comp = connected_components(adj, directed=False)
    batch_comp = comp[:B]
    if len(np.unique(batch_comp)) > 1:
        main = np.bincount(batch_comp).argmax()
        lonely = [name for name, c in zip(batch_names, batch_comp, strict=True) if c != main]
        raise ValueError(
            f"batch(es) {lonely} share no labelled cell type with the others: their offset "
            "cannot be told apart from biology (label some cells of a common type)"
        )


def _centre(X: np.ndarray, b: np.ndarray, y: np.ndarray | None, B: int) -> np.ndarray:
    n = len(X)
    n_b = np.bincount(b, minlength=B).astype(np.float64)
    if y is None or not (y >= 0).any():
        means = np.stack([X[b == i].mean(axis=0) for i in range(B)])
        offsets = means - X.mean(axis=0)
        return X - offsets[b]
    L = int(y.max()) + 1
    combos = []
    means = []
    for i in range(B):
        for j in range(L):
            rows = (b == i) & (y == j)
            if rows.any():
                combos.append((i, j))
                means.append(X[rows].mean(axis=0))
    # additive model  mean(batch i, type j) = mu_j + delta_i, one equation per pair
    # present (each pair weighs the same: "mean over types of batch-type minus type
    # mean"), plus sum_i n_i delta_i = 0 so the global mean stays where it was
    A = np.zeros((len(combos) + 1, L + B))
    for r, (i, j) in enumerate(combos):
        A[r, j] = 1.0
        A[r, L + i] = 1.0
    A[-1, L:] = n_b / n
    rhs = np.vstack([np.stack(means), np.zeros((1, X.shape[1]))])
    theta, *_ = np.linalg.lstsq(A, rhs, rcond=None)
    offsets = theta[L:]
    return X - offsets[b]


def _combat(
    X: np.ndarray,
    b: np.ndarray,
    y: np.ndarray | None,
    B: int,
    *,
    tol: float = 1e-4,
    max_iter: int = 500,
) -> np.ndarray:
    """Parametric empirical-Bayes ComBat with the cell types as protected covariate."""
    n = len(X)
    fit = np.ones(n, dtype=bool) if y is None else (y >= 0)
    batch_1h = np.eye(B)[b]
    if y is None or not fit.any():
        fit = np.ones(n, dtype=bool)
        cov = np.zeros((n, 0))
    else:
        L = int(y.max()) + 1
        cov = np.zeros((n, max(L - 1, 0)))
        rows = np.flatnonzero(y >= 1)
        cov[rows, y[rows] - 1] = 1.0  # type 0 is the reference level
    design = np.hstack([batch_1h, cov])[fit]
    coef, *_ = np.linalg.lstsq(design, X[fit], rcond=None)
    n_fit_b = batch_1h[fit].sum(axis=0)
    grand = (n_fit_b / fit.sum()) @ coef[:B]
    resid = X[fit] - design @ coef
    var_pooled = (resid**2).mean(axis=0)
    flat = var_pooled <= 1e-12 * max(float(var_pooled.max()), 1e-300)
    var_pooled = np.where(flat, 1.0, var_pooled)
    bio = cov @ coef[B:]  # the protected biology of each cell
    if (~fit).any():
        # unlabelled cells: their batch's mean labelled biology
        for i in range(B):
            lab = fit & (b == i)
            mean_bio = bio[lab].mean(axis=0) if lab.any() else bio[fit].mean(axis=0)
            bio[~fit & (b == i)] = mean_bio
    stand_mean = grand + bio
    sd = np.sqrt(var_pooled)
    Z = (X - stand_mean) / sd
    gamma_hat = np.stack([Z[fit & (b == i)].mean(axis=0) for i in range(B)])
    delta_hat = np.stack([Z[fit & (b == i)].var(axis=0, ddof=1) for i in range(B)])
    delta_hat = np.maximum(delta_hat, 1e-8)
    gamma_bar = gamma_hat.mean(axis=1)
    tau2 = gamma_hat.var(axis=1, ddof=1)
    m = delta_hat.mean(axis=1)
    s2 = delta_hat.var(axis=1, ddof=1)
    s2 = np.maximum(s2, 1e-12)
    a_prior = (2 * s2 + m**2) / s2
    b_prior = (m * s2 + m**3) / s2
    gamma_star = np.empty_like(gamma_hat)
    delta_star = np.empty_like(delta_hat)
    for i in range(B):
        Zi = Z[fit & (b == i)]
        n_i = len(Zi)
        g_old, d_old = gamma_hat[i], delta_hat[i]
        for _ in range(max_iter):
            g_new = (tau2[i] * n_i * gamma_hat[i] + d_old * gamma_bar[i]) / (tau2[i] * n_i + d_old)
            ss = ((Zi - g_new) ** 2).sum(axis=0)
            d_new = (b_prior[i] + 0.5 * ss) / (n_i / 2.0 + a_prior[i] - 1.0)
            change = max(
                np.max(np.abs(g_new - g_old) / np.maximum(np.abs(g_old), 1e-12)),
                np.max(np.abs(d_new - d_old) / d_old),
            )
            g_old, d_old = g_new, d_new
            if change < tol:
                break
        gamma_star[i], delta_star[i] = g_old, d_old
    adjusted = (Z - gamma_star[b]) / np.sqrt(delta_star[b]) * sd + stand_mean
    adjusted[:, flat] = X[:, flat]
    return adjusted


def _harmony(X: np.ndarray, batches: np.ndarray, *, n_pcs: int, seed: int, **kwargs: Any):
    try:
        import harmonypy
    except ImportError:
        raise ImportError(
            'Harmony needs the optional package harmonypy: pip install "napari-hemofm[harmony]"'
        ) from None
    from sklearn.decomposition import PCA

    n_comp = max(1, min(n_pcs, X.shape[1], len(X) - 1))
    pca = PCA(n_components=n_comp, svd_solver="full", random_state=seed).fit(X)
    Z = pca.transform(X)
    kwargs.setdefault("verbose", False)
    ho = harmonypy.run_harmony(
        Z, {"batch": [str(v) for v in batches]}, "batch", random_state=seed, **kwargs
    )
    Zc = np.asarray(ho.Z_corr, dtype=np.float64)
    if Zc.shape != Z.shape:  # harmonypy < 2 returned (dim, n)
        Zc = Zc.T
    # move each cell by its correction in PC space; the other directions are untouched
    return X + (Zc - Z) @ pca.components_


def correct_embeddings(
    X: np.ndarray,
    batches: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray | None = None,
    *,
    method: Correction = "centre",
    seed: int = 0,
    n_pcs: int = 50,
    **harmony_kwargs: Any,
) -> np.ndarray:
    """A batch-corrected copy of the embeddings (a preview: ``X`` is not modified).

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings (no NaN rows).
    batches : array-like of shape (n_cells,)
        Batch of each cell (>= 2 batches).
    labels : array-like of shape (n_cells,), optional
        Cell types to protect (None / NaN / "" = unlabelled). Used by ``"centre"`` and
        ``"combat"``; Harmony ignores them.
    method : {"centre", "combat", "harmony"}
        - ``"centre"``: label-aware per-batch centring. Each batch's offset is fitted
          by the additive model ``mean(batch b, type t) = mu_t + delta_b`` over the
          (batch, type) pairs present, each pair weighing the same, and removed from
          all the batch's cells (unlabelled ones too); the offsets are chosen so the
          global mean does not move. With two batches and the same types in both, the
          offset difference is the mean over types of the difference of the
          batch-type means. *Plain* centring (subtract each batch's mean) is what
          happens without labels, and it destroys biology when labs hold different
          cell mixes: a lab with more lymphocytes has a mean nearer the lymphocytes,
          and subtracting it moves every cell of that lab.
        - ``"combat"``: parametric empirical-Bayes ComBat (location and scale per batch
          and dimension, shrunk across dimensions) with the cell types as a protected
          covariate; fitted on the labelled cells. Unlabelled cells get their batch's
          location/scale adjustment around their batch's mean labelled biology.
        - ``"harmony"``: Harmony (harmonypy, an optional extra) on the first ``n_pcs``
          principal components; each cell is moved by its Harmony correction in PC
          space, the other directions are left as they are, so the result keeps the
          shape of ``X``. Harmony is unsupervised: with different cell mixes between
          labs it can pull different cell types onto each other.
    seed : int
        Seed of Harmony (and its PCA).
    n_pcs : int
        Principal components given to Harmony.
    **harmony_kwargs
        Passed to ``harmonypy.run_harmony`` (``theta``, ``max_iter_harmony``, ``ncores``,
        ...).

    Returns
    -------
    ndarray of shape (n_cells, dim)
        A new array, of X's float dtype.

    Raises
    ------
    ValueError
        Lengths differ, NaN rows, one batch only, an unknown method, or (label-aware
        methods) a batch that shares no labelled cell type with the others.
    ImportError
        ``method="harmony"`` without harmonypy installed (names the pip command).
    TypeError
        Harmony options given for another method.

    References
    ----------
    Johnson, Li & Rabinovic, "Adjusting batch effects in microarray expression data
    using empirical Bayes methods", Biostatistics 8, 118-127 (2007).
    doi:10.1093/biostatistics/kxj037
    Korsunsky et al. 2019, doi:10.1038/s41592-019-0619-0 (Harmony).
    """
    if method not in CORRECTIONS:
        raise ValueError(f"method must be one of {CORRECTIONS}, got {method!r}")
    if harmony_kwargs and method != "harmony":
        raise TypeError(f"{sorted(harmony_kwargs)} are Harmony options; method is {method!r}")
    data = _Data(X, batches, labels)
    dtype = data.X.dtype
    X64 = data.X.astype(np.float64)
    B = len(data.batch_names)
    y = data.y if data.y is not None and (data.y >= 0).any() else None
    if method in ("centre", "combat") and y is not None:
        _design_check(data.b, y, data.batch_names)
    if method == "centre":
        out = _centre(X64, data.b, y, B)
    elif method == "combat":
        counts = np.bincount(data.b[y >= 0] if y is not None else data.b, minlength=B)
        if counts.min() < 2:
            raise ValueError(
                f"ComBat needs >= 2 (labelled) cells per batch; counts: "
                f"{dict(zip(data.batch_names, counts.tolist(), strict=True))}"
            )
        out = _combat(X64, data.b, y, B)
    else:
        names = np.asarray(data.batch_names, dtype=object)[data.b]
        out = _harmony(X64, names, n_pcs=n_pcs, seed=seed, **harmony_kwargs)
    return out.astype(dtype, copy=False)


def compare_corrections(
    X: np.ndarray,
    batches: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray | None = None,
    methods: Sequence[Correction] = ("centre", "combat", "harmony"),
    *,
    seed: int = 0,
    **report_kwargs: Any,
) -> dict[str, Any]:
    """Batch metrics before and after each correction.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings.
    batches, labels : array-like of shape (n_cells,)
        Batch and cell type of each cell.
    methods : sequence of {"centre", "combat", "harmony"}
        Corrections to try; one that fails (e.g. harmonypy missing) is listed in
        ``"errors"`` instead of raising.
    seed : int
        Seed of the corrections and of the metrics.
    **report_kwargs
        Passed to :func:`batch_report`.

    Returns
    -------
    dict
        ``{"methods": ["none", *done], "metrics": {metric: {method: value}},
        "reports": {method: batch_report dict}, "errors": {method: message},
        "directions": ..., "meanings": ...}``; ``"none"`` is the uncorrected
        embedding.

    Notes
    -----
    ``"centre"`` and ``"combat"`` use the labels of *every* batch, the held-out one
    included, so their leave-one-batch-out accuracies are optimistic; Harmony's are not.
    """
    reports = {"none": batch_report(X, batches, labels, seed=seed, **report_kwargs)}
    errors: dict[str, str] = {}
    for method in methods:
        try:
            corrected = correct_embeddings(X, batches, labels, method=method, seed=seed)
        except (ImportError, ValueError) as exc:
            errors[method] = str(exc)
            continue
        reports[method] = batch_report(corrected, batches, labels, seed=seed, **report_kwargs)
    return {
        "methods": list(reports),
        "metrics": {
            key: {name: rep["metrics"][key] for name, rep in reports.items()}
            for key in METRIC_INFO
        },
        "reports": reports,
        "errors": errors,
        "directions": {key: info[0] for key, info in METRIC_INFO.items()},
        "meanings": {key: info[1] for key, info in METRIC_INFO.items()},
    }

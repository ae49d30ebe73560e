"""The review queues: which cells to label next, which labels to doubt.

:func:`label_next` picks unlabelled cells where the live probe
(:class:`~.probe.LiveProbe`) is least sure, spread over the map;
:func:`suspect_labels` ranks labelled cells whose cross-validated prediction
disagrees with their label. See ``docs/probes.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from napari_hemofm.core.evaluation import cv_proba
from napari_hemofm.core.probe import (
    Metric,
    Probe,
    _as_embeddings,
    _clean_labels,
    _knn_search,
    _top,
)

if TYPE_CHECKING:
    import pandas as pd

    from napari_hemofm.core.probe import LiveProbe

__all__ = ["label_next", "suspect_labels"]


def suspect_labels(
    X: np.ndarray,
    labels: Sequence[str | None],
    n: int | None = None,
    *,
    kind: Probe = "knn",
    k: int = 20,
    metric: Metric = "euclidean",
    n_splits: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """Labelled cells whose cross-validated prediction disagrees with their label.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
    labels : sequence of str or None, length n_cells
    n : int, optional
        Return at most this many (the most suspect); all by default.
    kind, k, metric, n_splits, seed
        As :func:`probe_metrics`.

    Returns
    -------
    pandas.DataFrame
        Columns ``row`` (int64 position), ``label`` (the curated label),
        ``suggestion`` (the out-of-fold prediction) and ``confidence`` (its
        out-of-fold probability), most suspect first (highest confidence; ties by row).
        Empty when there is too little to cross-validate.

    Notes
    -----
    Each labelled cell is predicted by a probe trained without it (its fold left
    out), so its own label cannot vouch for itself; a confident disagreement is the
    sign of a mislabel (confident learning, Northcutt et al., JAIR 2021,
    doi:10.1613/jair.1.12125, uses the same out-of-fold probabilities).
    """
    import pandas as pd

    cv = cv_proba(X, labels, kind=kind, k=k, metric=metric, n_splits=n_splits, seed=seed)
    columns = {"row": "int64", "label": "object", "suggestion": "object", "confidence": "float32"}
    if cv["proba"] is None:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})
    code, conf = _top(cv["proba"])
    bad = np.flatnonzero((code != cv["y"]) & (code >= 0))
    order = bad[np.lexsort((cv["rows"][bad], -conf[bad]))]
    if n is not None:
        order = order[: max(int(n), 0)]
    names = np.array(cv["classes"], dtype=object)
    return pd.DataFrame(
        {
            "row": cv["rows"][order].astype(np.int64),
            "label": names[cv["y"][order]],
            "suggestion": names[code[order]],
            "confidence": conf[order].astype(np.float32),
        }
    )


def _kmeanspp(
    P: np.ndarray,
    p_sq: np.ndarray,
    d2: np.ndarray,
    m: int,
    rng: np.random.Generator,
    first: int | None = None,
) -> list[int]:
    """``m`` distinct positions in ``P`` drawn by k-means++ seeding.

    Parameters
    ----------
    P : ndarray of shape (p, dim), float32
        The points to draw from.
    p_sq : ndarray of shape (p,)
        Squared norms of ``P``.
    d2 : ndarray of shape (p,), float64
        Squared distance of each point to the nearest point already chosen elsewhere
        (labelled cells); inf when there is none. Not modified.
    m : int
        How many to draw (at most ``p``).
    rng : numpy.random.Generator
    first : int, optional
        Position of the first draw; default a k-means++ draw (at random if every
        ``d2`` is inf).

    Returns
    -------
    list of int
        Positions in ``P``, in draw order: each with probability proportional to its
        squared distance to the nearest labelled or already drawn point.
    """
    d2 = d2.copy()
    picked: list[int] = []
    for _ in range(min(int(m), len(P))):
        if not picked and (first is not None or not np.isfinite(d2).any()):
            # nothing labelled to be far from: start at `first` (or at random)
            i = int(first) if first is not None else int(rng.integers(len(P)))
        else:
            weights = np.where(np.isfinite(d2), d2, 0.0)
            weights[picked] = 0.0
            total = weights.sum()
            if total <= 0:  # every point left coincides with a picked or labelled one
                i = int(rng.choice(np.setdiff1d(np.arange(len(P)), picked)))
            else:
                i = int(rng.choice(len(P), p=weights / total))
        picked.append(i)
        d2 = np.minimum(d2, np.maximum(p_sq + p_sq[i] - 2.0 * (P @ P[i]), 0.0))
        d2[i] = 0.0
    return picked


def label_next(
    probe: LiveProbe | None,
    X: np.ndarray,
    labels: Sequence[str | None],
    n: int = 20,
    *,
    candidates: int | None = None,
    seed: int = 0,
    coords: np.ndarray | None = None,
    strategy: Literal["uncertain", "hybrid", "typical"] = "uncertain",
    scope: np.ndarray | None = None,
    cover: bool | None = None,
) -> np.ndarray:
    """Rows of unlabelled cells to label next: least sure and spread over the map.

    Parameters
    ----------
    probe : LiveProbe or None
        The probe fitted on these cells (its ``proba`` rows match ``X``). None, or a
        probe without predictions for these cells (not fitted, no labels yet), gives
        pure diversity.
    X : ndarray of shape (n_cells, dim)
        Embeddings (NaN rows are never proposed).
    labels : sequence of str or None, length n_cells
        Current labels; only unlabelled cells are proposed.
    n : int
        How many rows to return (fewer if fewer cells are unlabelled).
    candidates : int, optional
        Size of the pool diversity picks from (default ``10 * n``): the
        ``candidates`` unlabelled cells of smallest margin (``"uncertain"``), or half
        of them plus as many novel cells (``"hybrid"``). Without predictions: a random
        sample of the unlabelled cells (default ``max(50 * n, 5000)``).
    seed : int
        Seeds the k-means++ draws (and the samples).
    coords : ndarray of shape (n_cells, n_coords), optional
        Space in which to spread the picks (e.g. the UMAP, ``obsm["X_umap"]``);
        default the embeddings. Rows with NaN are never proposed.
    strategy : {"uncertain", "hybrid", "typical"}
        How the pool is built. ``"typical"`` ignores the probe's margins: the
        candidate cells are split into (labelled + ``n``) k-means clusters and the most
        typical cell (densest neighbourhood) of each cluster holding no label is taken,
        largest cluster first (TypiClust, Hacohen et al., ICML 2022,
        arXiv:2202.02794): at a budget of a few labels per class, typical cells teach
        a probe more than unsure ones, and they estimate a new lab's class means
        (:mod:`~.alignment`) with less noise. ``"uncertain"``: the least sure
        cells. ``"hybrid"``:
        the ``candidates // 2`` least sure cells (rounded up) plus ``candidates // 2``
        cells drawn by k-means++ seeding from all unlabelled cells (a random sample
        of ``max(50 * n, 5000)`` of them), weighted by the squared distance to the
        nearest labelled cell: cells unlike every labelled one, where the probe can
        be confidently wrong (a new lab, a class never labelled).
    scope : ndarray of shape (n_cells,), bool, or of int, optional
        Only cells in scope are proposed (a mask or row positions), e.g. one batch or
        slide: a new lab. Labelled cells outside the scope still count as labelled
        (the picks are spread away from them too).
    cover : bool, optional
        Start with one cell of every class the probe predicts among the unlabelled
        cells in scope (the least sure of each; the most frequent classes first when
        ``n`` is smaller than the number of classes), then fill the rest as above.
        Default: True when ``scope`` is given, so the first labels of a new lab
        include each class the probe sees there and a wrong class shows up at once.

    Returns
    -------
    ndarray of shape (<= n,), int64
        Distinct rows of unlabelled cells, in pick order.

    Notes
    -----
    Uncertainty first, then diversity, as in BADGE (Ash et al., ICLR 2020,
    arXiv:1906.03671): the pool is the least sure cells (smallest top-1 minus top-2
    probability; cells without a prediction count as least sure), and ``n`` are drawn
    from it by k-means++ seeding: each draw with probability proportional to the
    squared distance to the nearest cell already labelled or picked. Picking the ``n``
    smallest margins alone tends to return ``n`` near-copies from one class border.
    Margins cannot find cells the probe is confidently wrong about; the novel half
    of the ``"hybrid"`` pool is a k-means++ (core-set-like, Sener & Savarese, ICLR
    2018, arXiv:1708.00489) sample that can. See ``docs/probes.md`` for measurements.
    """
    if strategy not in ("uncertain", "hybrid", "typical"):
        raise ValueError(f"strategy must be 'uncertain', 'hybrid' or 'typical', got {strategy!r}")
    Xf = _as_embeddings(X, probe.metric if probe is not None else "euclidean")
    y = _clean_labels(labels, len(Xf))
    space = Xf if coords is None else np.asarray(coords, dtype=np.float32)
    if space.ndim != 2 or len(space) != len(Xf):
        raise ValueError(f"coords has shape {space.shape}; need ({len(Xf)}, n_coords)")
    finite = np.isfinite(Xf).all(axis=1) & np.isfinite(space).all(axis=1)
    eligible = finite & np.equal(y, None)
    if scope is not None:
        scope = np.asarray(scope)
        mask = np.zeros(len(Xf), dtype=bool)
        if scope.dtype == bool:
            if scope.shape != (len(Xf),):
                raise ValueError(f"scope mask has shape {scope.shape}; need ({len(Xf)},)")
            mask = scope
        else:
            mask[scope.astype(np.int64)] = True
        eligible &= mask
    unl = np.flatnonzero(eligible)
    n = int(n)
    if n <= 0 or not len(unl):
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    lab = np.flatnonzero(finite & np.not_equal(y, None))
    if len(lab):
        L = np.ascontiguousarray(space[lab], dtype=np.float32)
        l_sq = np.einsum("ij,ij->i", L, L)

    def sq_dist_to_labelled(P: np.ndarray, p_sq: np.ndarray) -> np.ndarray:
        """Squared distance of each row of ``P`` to the nearest labelled cell (inf if none)."""
        if not len(lab):
            return np.full(len(P), np.inf)
        _, rd = _knn_search(P, np.arange(len(P)), L, l_sq, 1)
        return np.maximum(rd[:, 0] + p_sq, 0.0).astype(np.float64)

    has_pred = probe is not None and probe.n_cells == len(Xf) and probe.proba.shape[1] > 0
    covered = np.empty(0, dtype=np.int64)
    if (scope is not None if cover is None else cover) and has_pred:
        covered = _one_per_class(probe, unl, n, space if strategy == "typical" else None)
        if len(covered) >= n or len(covered) == len(unl):
            return covered[:n]
        n -= len(covered)
        unl = np.setdiff1d(unl, covered)
        if len(lab) or len(covered):
            lab = np.union1d(lab, covered)  # spread the other picks away from these too
            L = np.ascontiguousarray(space[lab], dtype=np.float32)
            l_sq = np.einsum("ij,ij->i", L, L)
    if strategy == "typical":
        in_scope = finite if scope is None else finite & mask
        known = np.flatnonzero(in_scope & np.not_equal(y, None))
        picks = _typical(space, unl, np.union1d(known, covered), n, rng)
        return np.concatenate([covered, picks]).astype(np.int64)
    if has_pred and np.isfinite(probe.confidence[unl]).any():
        margin = probe.margin()[unl].astype(np.float64)
        margin[np.isnan(margin)] = -np.inf  # no prediction: least sure of all
        size = max(candidates if candidates is not None else 10 * n, n)
        order = np.argsort(margin, kind="stable")
        if strategy == "hybrid":
            pool = unl[order[: size - size // 2]]
            sample_size = max(50 * n, 5000)
            sample = unl
            if len(unl) > sample_size:
                sample = np.sort(rng.choice(unl, sample_size, replace=False))
            S = np.ascontiguousarray(space[sample], dtype=np.float32)
            s_sq = np.einsum("ij,ij->i", S, S)
            novel = sample[_kmeanspp(S, s_sq, sq_dist_to_labelled(S, s_sq), size // 2, rng)]
            pool = np.union1d(pool, novel)
            if len(pool) < n:  # novel draws hit least-sure cells: top up with the next
                rest = unl[order[np.isin(unl[order], pool, invert=True)]]
                pool = np.union1d(pool, rest[: n - len(pool)])
        else:
            pool = unl[order[:size]]
        first = unl[order[0]]
    else:
        size = candidates if candidates is not None else max(50 * n, 5000)
        pool = unl if len(unl) <= size else np.sort(rng.choice(unl, size, replace=False))
        first = None
    if len(pool) <= n:
        return np.concatenate([covered, pool]).astype(np.int64)
    P = np.ascontiguousarray(space[pool], dtype=np.float32)
    p_sq = np.einsum("ij,ij->i", P, P)
    start = int(np.flatnonzero(pool == first)[0]) if first is not None else None
    if len(covered):
        start = None  # the covering picks come first; the rest spread away from them
    picked = _kmeanspp(P, p_sq, sq_dist_to_labelled(P, p_sq), n, rng, first=start)
    return np.concatenate([covered, pool[np.asarray(picked)]]).astype(np.int64)


def _typical(
    space: np.ndarray,
    rows: np.ndarray,
    known: np.ndarray,
    n: int,
    rng: np.random.Generator,
    sample: int = 20_000,
    k: int = 20,
) -> np.ndarray:
    """TypiClust picks: the most typical unlabelled cell of each unlabelled cluster.

    Parameters
    ----------
    space : ndarray of shape (n_cells, d)
        Where to cluster (embeddings or map coordinates).
    rows : ndarray of int
        Candidate (unlabelled) rows.
    known : ndarray of int
        Rows already labelled (or picked) in the same scope: their clusters are covered.
    n : int
        How many to pick.
    rng : numpy.random.Generator
    sample : int
        At most this many candidates are clustered (a random sample beyond).
    k : int
        Neighbours of the typicality (inverse mean distance to the ``k`` nearest
        candidates of the same cluster).

    Returns
    -------
    ndarray of int64
        Up to ``n`` rows, largest uncovered cluster first.
    """
    from sklearn.cluster import KMeans

    if len(rows) <= n:
        return rows.astype(np.int64)
    if len(rows) > sample:
        rows = np.sort(rng.choice(rows, sample, replace=False))
    pts = np.concatenate([rows, known]).astype(np.int64)
    P = np.ascontiguousarray(space[pts], dtype=np.float64)
    n_clusters = min(len(known) + n, len(pts))
    seed = int(rng.integers(2**31 - 1))
    assign = KMeans(n_clusters, n_init=1, random_state=seed).fit_predict(P)
    covered = set(assign[len(rows) :].tolist())
    sizes = np.bincount(assign[: len(rows)], minlength=n_clusters)
    order = [c for c in np.argsort(-sizes, kind="stable") if c not in covered and sizes[c]]
    out = []
    for c in order[:n]:
        members = np.flatnonzero(assign[: len(rows)] == c)
        Q = P[members]
        sq = np.einsum("ij,ij->i", Q, Q)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (Q @ Q.T), 0.0)
        kk = min(k, len(members) - 1)
        if kk < 1:
            out.append(rows[members[0]])
            continue
        near = np.sqrt(np.partition(d2, kk, axis=1)[:, 1 : kk + 1])
        out.append(rows[members[np.argmin(near.mean(axis=1))]])
    return np.asarray(out, dtype=np.int64)


def _one_per_class(
    probe: LiveProbe, rows: np.ndarray, n: int, space: np.ndarray | None = None
) -> np.ndarray:
    """One of ``rows`` for each class predicted among them (most frequent first).

    The least sure cell of each class, or with ``space`` the cell nearest the mean of
    the class's predicted cells there (a representative one, for ``"typical"``).

    Parameters
    ----------
    probe : LiveProbe
    rows : ndarray of int
        Candidate rows (unlabelled, in scope).
    n : int
        At most this many (the classes predicted most often among ``rows`` first).
    space : ndarray of shape (n_cells, d), optional
        Pick the cell nearest each class's mean in this space instead.

    Returns
    -------
    ndarray of int64
        One row per class, in order of decreasing class frequency.
    """
    pred = probe.prediction[rows]
    has = np.not_equal(pred, None)
    if not has.any():
        return np.empty(0, dtype=np.int64)
    names, counts = np.unique(pred[has].astype(str), return_counts=True)
    order = np.lexsort((names, -counts))
    margin = probe.margin()[rows].astype(np.float64)
    out = []
    for c in names[order][: max(int(n), 0)]:
        cand = np.flatnonzero(has & (pred == c))
        if space is None:
            out.append(rows[cand[np.argmin(margin[cand])]])
            continue
        P = np.asarray(space[rows[cand]], dtype=np.float64)
        d2 = np.einsum("ij,ij->i", P - P.mean(axis=0), P - P.mean(axis=0))
        out.append(rows[cand[np.argmin(d2)]])
    return np.asarray(out, dtype=np.int64)

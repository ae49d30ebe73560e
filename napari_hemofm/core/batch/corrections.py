"""Batch corrections of embeddings, as previews: a new array, never ``X_embed`` rewritten.

DESIGN.md: embeddings are a per-cell function of the crop and the model, so a
correction is a dataset-level step kept apart from them. :func:`correct_embeddings`
is the strict function (it raises when a batch cannot be corrected);
:func:`preview_correction` is what the report, ``hemofm batch --correct`` and the Batch
view call: batches too small or too isolated to correct are left as they are and named
with the reason.

- ComBat is implemented here (parametric empirical Bayes, Johnson et al. 2007)
  because none of the packages on PyPI fits: ``combat`` (pyComBat) is GPL and
  superseded by ``inmoose``, which is GPL and heavy (statsmodels, seaborn, patsy,
  compiled from source); ``scanpy.pp.combat`` pulls scanpy and numba; ``pycombat``
  (CoAxLab) was last released in 2022. None of them handles unlabelled cells when the
  labels are a protected covariate. ``pycombat`` serves as the test oracle where it
  is installed.
- Harmony is *called* through ``harmonypy`` (GPL-3, an optional extra:
  ``pip install "napari-hemofm[harmony]"``), never copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from napari_hemofm.core.batch._data import BatchData

__all__ = [
    "CORRECTIONS",
    "Correction",
    "CorrectionPreview",
    "compare_corrections",
    "correct_embeddings",
    "correctable_batches",
    "preview_correction",
]

Correction = Literal["centre", "combat", "harmony"]
CORRECTIONS: tuple[str, ...] = ("centre", "combat", "harmony")


def _design_check(b: np.ndarray, y: np.ndarray, batch_names: list[str]) -> None:
    """Raise when a batch shares no cell type with the others (offset not estimable)."""
    lonely = _isolated_batches(b, y, batch_names)
    if lonely:
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
    data = BatchData(X, batches, labels)
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


def _isolated_batches(b: np.ndarray, y: np.ndarray, batch_names: list[str]) -> list[str]:
    """Batches that share no labelled cell type with the largest connected set of batches."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    B = len(batch_names)
    L = int(y.max()) + 1
    rows = y >= 0
    adj = sp.coo_matrix((np.ones(rows.sum()), (b[rows], B + y[rows])), shape=(B + L, B + L))
    _, comp = connected_components(adj, directed=False)
    batch_comp = comp[:B]
    sizes = np.bincount(batch_comp, weights=np.bincount(b, minlength=B))
    main = int(np.argmax(sizes))
    return [name for name, c in zip(batch_names, batch_comp, strict=True) if c != main]


def correctable_batches(
    batches: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray | None,
    method: Correction,
) -> dict[str, str]:
    """Batches a correction cannot fit, each with the reason.

    Parameters
    ----------
    batches, labels : array-like of shape (n_cells,)
    method : {"centre", "combat", "harmony"}

    Returns
    -------
    dict of str to str
        Batch -> why it is left uncorrected: for ComBat, fewer than two (labelled)
        cells; for the label-aware methods, no labelled cell type shared with the
        other batches (its offset cannot be told apart from biology). Harmony fits any
        batch.
    """
    if method not in CORRECTIONS:
        raise ValueError(f"method must be one of {CORRECTIONS}, got {method!r}")
    data = BatchData(np.zeros((len(batches), 1)), batches, labels, need_batches=False)
    if method == "harmony":
        return {}
    y = data.y if data.y is not None and (data.y >= 0).any() else None
    skipped: dict[str, str] = {}
    keep = np.ones(data.n, dtype=bool)
    if method == "combat":
        fit = np.ones(data.n, bool) if y is None else y >= 0
        counts = np.bincount(data.b[fit], minlength=len(data.batch_names))
        what = "cell" if y is None else "labelled cell"
        for i, name in enumerate(data.batch_names):
            if counts[i] < 2:
                skipped[name] = f"{counts[i]} {what}(s); ComBat needs >= 2 per batch"
                keep &= data.b != i
    if y is not None and keep.any():
        names = [n for n in data.batch_names if n not in skipped]
        sub_b = np.array([names.index(data.batch_names[c]) for c in data.b[keep]], np.int64)
        for name in _isolated_batches(sub_b, y[keep], names):
            skipped[name] = "shares no labelled cell type with the other batches"
    return skipped


@dataclass
class CorrectionPreview:
    """A corrected copy of the embeddings and what it left out.

    Attributes
    ----------
    X : ndarray of shape (n_cells, dim)
        The corrected embeddings (cells of skipped batches as they were).
    method : str
        The correction.
    skipped : dict of str to str
        Batch -> why its cells were left uncorrected.
    """

    X: np.ndarray
    method: str
    skipped: dict[str, str] = field(default_factory=dict)

    def note(self) -> str:
        """One line naming the skipped batches ("" when none)."""
        if not self.skipped:
            return ""
        parts = "; ".join(f"{b}: {why}" for b, why in self.skipped.items())
        return f"left uncorrected: {parts}"


def preview_correction(
    X: np.ndarray,
    batches: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray | None = None,
    *,
    method: Correction = "centre",
    seed: int = 0,
    **kwargs: Any,
) -> CorrectionPreview:
    """A batch correction that leaves batches it cannot fit as they are, naming them.

    Used by :func:`~.report.table_batch_report` (``hemofm batch --correct``),
    :func:`compare_corrections` and the Batch view's preview.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
    batches, labels : array-like of shape (n_cells,)
    method : {"centre", "combat", "harmony"}
    seed : int
    **kwargs
        Passed to :func:`correct_embeddings`.

    Returns
    -------
    CorrectionPreview

    Raises
    ------
    ValueError
        Fewer than two batches can be corrected (the message names why), or bad input.
    ImportError
        ``method="harmony"`` without harmonypy.
    """
    data = BatchData(X, batches, labels)
    skipped = correctable_batches(batches, labels, method)
    keep = ~np.isin(data.batch_array(), list(skipped))
    if len(set(data.b[keep].tolist())) < 2:
        why = "; ".join(f"{b}: {r}" for b, r in skipped.items())
        raise ValueError(f"'{method}' needs >= 2 batches it can fit ({why})")
    labels_kept = None if labels is None else np.asarray(labels, dtype=object)[keep]
    out = data.X.copy()
    out[keep] = correct_embeddings(
        data.X[keep], data.batch_array()[keep], labels_kept, method=method, seed=seed, **kwargs
    )
    return CorrectionPreview(out, method, skipped)


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
        Corrections to try (each through :func:`preview_correction`); one that fails
        (e.g. harmonypy missing) is listed in ``"errors"`` instead of raising.
    seed : int
        Seed of the corrections and of the metrics.
    **report_kwargs
        Passed to :func:`~.report.batch_report`.

    Returns
    -------
    dict
        ``{"methods": ["none", *done], "metrics": {metric: {method: value}},
        "reports": {method: batch_report dict}, "errors": {method: message},
        "skipped": {method: {batch: why}}, "directions", "higher_is_better",
        "meanings"}``; ``"none"`` is the uncorrected embedding.

    Notes
    -----
    ``"centre"`` and ``"combat"`` use the labels of *every* batch, the held-out one
    included, so their leave-one-batch-out accuracies are optimistic; Harmony's are not.
    """
    from napari_hemofm.core.batch.metrics import METRICS
    from napari_hemofm.core.batch.report import batch_report

    reports = {"none": batch_report(X, batches, labels, seed=seed, **report_kwargs)}
    errors: dict[str, str] = {}
    skipped: dict[str, dict[str, str]] = {}
    for method in methods:
        try:
            preview = preview_correction(X, batches, labels, method=method, seed=seed)
        except (ImportError, ValueError) as exc:
            errors[method] = str(exc)
            continue
        skipped[method] = preview.skipped
        reports[method] = batch_report(preview.X, batches, labels, seed=seed, **report_kwargs)
    return {
        "methods": list(reports),
        "metrics": {
            key: {name: rep["metrics"][key] for name, rep in reports.items()} for key in METRICS
        },
        "reports": reports,
        "errors": errors,
        "skipped": skipped,
        "directions": {key: s.direction for key, s in METRICS.items()},
        "higher_is_better": {key: s.higher_is_better for key, s in METRICS.items()},
        "meanings": {key: s.meaning for key, s in METRICS.items()},
    }

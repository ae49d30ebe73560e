"""The batch report: every metric of an embedding, overall and per cell type, at a level.

:func:`batch_report` walks the groups (cell types) once: per group it searches the
neighbours once (:func:`~.neighbors.nearest_neighbors`, exact below a size) and hands
them to the same kernels the separate ``compute_*`` functions call, so the report and
the functions agree (a test holds them equal). Anything that cannot be computed (a cell
type in one batch, a batch too small to hold out, no labels) is left out with its
reason in ``"reasons"`` / ``"excluded_labels"`` / ``"lobo"["skipped"]``.

Levels: the groups being compared are any ``obs`` column, usually ``batch`` (lab,
scanner) or ``slide`` (one smear / patient); :func:`level_column` picks the column and
falls back to ``batch`` where a table has no slides.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_hemofm.core.batch._data import MIN_CELLS, BatchData, mean_or_nan
from napari_hemofm.core.batch.corrections import Correction, preview_correction
from napari_hemofm.core.batch.lobo import LOBO_MAX_CELLS, lobo_probes
from napari_hemofm.core.batch.metrics import (
    GRAPH_NEIGHBORS,
    METRICS,
    _batch_asw_group,
    _connectivity_group,
    _ilisi_group,
    _kbet_group,
    _kbet_k,
    _kmeans_agreement,
    _lisi_k,
    _pcr_group,
    _search,
    compute_celltype_asw,
)
from napari_hemofm.core.batch.neighbors import EXACT_BELOW, REFERENCE_CELLS, NeighborMethod

if TYPE_CHECKING:
    from collections.abc import Sequence

    from napari_hemofm.core.cells import CellTable

__all__ = [
    "LEVELS",
    "batch_report",
    "default_level",
    "level_column",
    "level_values",
    "table_batch_report",
    "table_labels",
]

#: The two levels a batch effect is looked at, finest first.
LEVELS: tuple[str, ...] = ("slide", "batch")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return None if math.isnan(value) else float(value)
    return value


def batch_report(
    X: np.ndarray,
    batches: Sequence[str] | np.ndarray,
    labels: Sequence[str] | np.ndarray | None = None,
    *,
    perplexity: float = 30.0,
    kbet_k: int | None = None,
    alpha: float = 0.05,
    n_components: int = 50,
    graph_neighbors: int = GRAPH_NEIGHBORS,
    min_cells: int = MIN_CELLS,
    max_silhouette_cells: int | None = 2000,
    max_cluster_cells: int | None = 10000,
    lobo: bool = True,
    lobo_max_cells: int | None = LOBO_MAX_CELLS,
    neighbor_method: NeighborMethod = "auto",
    exact_below: int = EXACT_BELOW,
    reference_cells: int = REFERENCE_CELLS,
    seed: int = 0,
    return_per_cell: bool = False,
) -> dict[str, Any]:
    """All batch-effect metrics of an embedding, overall and per cell type.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings (no NaN rows).
    batches : array-like of shape (n_cells,)
        The group of each cell being compared: batch, slide, ... (>= 2 groups).
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
        Cell types with fewer cells are left out of the mixing metrics; batches with
        fewer labelled cells are not held out by the leave-one-batch-out probes.
    max_silhouette_cells : int, optional
        Silhouettes cost O(n^2): batch ASW uses a seeded subset of at most this many
        cells per type, cell-type ASW twice as many; None for all cells.
    max_cluster_cells : int, optional
        k-means for NMI / ARI runs on a seeded subset of at most this many cells.
    lobo : bool
        Also score leave-one-batch-out kNN and linear probes (needs >= 2 labels).
    lobo_max_cells : int, optional
        The probes use a seeded sample of at most this many cells, at most
        ``lobo_max_cells // B`` per batch (small batches whole); None for all.
    neighbor_method, exact_below, reference_cells
        The neighbour search of each cell type (:func:`~.neighbors.nearest_neighbors`).
    seed : int
        Seed of every subsample and of k-means.
    return_per_cell : bool
        Add ``"ilisi_per_cell"``: scaled per-cell iLISI, an ndarray of shape (n_cells,)
        (not JSON; the Batch view colours by it).

    Returns
    -------
    dict
        JSON-ready (undefined values are None)::

            {"batches": [...], "n_cells": N, "n_labelled": n,
             "mixing_labels": [...],       # types found in >= 2 batches, >= min_cells
             "excluded_labels": {label: why},
             "metrics": {name: value},     # the keys of METRICS
             "reasons": {name: why},       # for each metric that is None
             "per_label": {label: {"n_cells", "batches": {batch: count}, "mixing",
                                   "ilisi", "ilisi_raw", "ilisi_ideal",
                                   "kbet_acceptance", "pcr_batch", "batch_asw",
                                   "graph_connectivity", "neighbors"}},
             "lobo": {"labels", "n_cells", "sampled", "max_cells", "per_batch",
                      "skipped": {probe: {batch: why}}} or None,
             "directions": {name: text}, "higher_is_better": {name: bool},
             "meanings": {name: meaning}, "parameters": {...}}

    Notes
    -----
    Mixing metrics (iLISI, kBET, PCR-batch, batch ASW, graph connectivity) are computed
    within each cell type and averaged over the types found in >= 2 batches with >=
    ``min_cells`` cells; other types are listed in ``per_label`` (with ``mixing``
    False) but not averaged. Cell-type ASW, NMI and ARI use all labelled cells. The
    leave-one-batch-out probes (:func:`~napari_hemofm.core.evaluation.evaluate_probe`,
    DinoBloom protocol) use the cells of the mixing types only, so that a class missing
    from the held-out batch does not count; the mean over held-out batches is reported.

    ``ilisi_ideal`` is the scaled iLISI a type would reach if every neighbourhood held
    its batches in the type's overall shares, ``(1 / sum_b f_b^2 - 1) / (B - 1)``: with
    unequal batch sizes it is below 1 (100 vs 1 basophils: 0.02), so read a type's
    ``ilisi`` against it.
    """
    data = BatchData(X, batches, labels)
    groups = data.groups(min_cells)
    mixing = [g for g in groups if g.mixing]
    lisi_k = _lisi_k(perplexity, None)
    wanted = {g.name: max(lisi_k, _kbet_k(g, kbet_k), graph_neighbors) for g in mixing}
    neighbors = _search(data, mixing, wanted, neighbor_method, exact_below, reference_cells, seed)

    per_label: dict[str, dict[str, Any]] = {}
    per_metric: dict[str, list[float]] = {
        k: [] for k in ("ilisi", "ilisi_raw", "kbet_acceptance", "pcr_batch", "batch_asw")
    }
    if data.y is not None:
        per_metric["graph_connectivity"] = []
    per_cell = np.full(data.n, np.nan) if return_per_cell else None
    for group in groups:
        entry: dict[str, Any] = {
            "n_cells": len(group.idx),
            "batches": {
                name: int(c)
                for name, c in zip(data.batch_names, group.counts, strict=True)
                if c > 0
            },
            "mixing": group.mixing,
        }
        per_label[group.name] = entry
        if not group.mixing:
            entry["excluded"] = group.reason
            continue
        nb = neighbors[group.name]
        raw = _ilisi_group(data, group, nb, perplexity, lisi_k)
        scaled = (raw - 1.0) / (group.n_batches - 1.0)
        if per_cell is not None:
            per_cell[group.idx] = scaled
        entry["ilisi_raw"] = float(np.median(raw))
        entry["ilisi"] = float(np.median(scaled))
        # the best a type can reach: every neighbourhood mixed in the type's batch shares
        shares = group.counts[group.counts > 0] / len(group.idx)
        entry["ilisi_ideal"] = (1.0 / float((shares**2).sum()) - 1.0) / (group.n_batches - 1.0)
        entry["kbet_acceptance"] = _kbet_group(
            data, group, nb, k=kbet_k, alpha=alpha, max_tests=1000, seed=seed
        )
        entry["pcr_batch"] = _pcr_group(data.X[group.idx], data.b[group.idx], n_components)
        entry["batch_asw"] = _batch_asw_group(data, group, max_silhouette_cells, seed)
        if data.y is not None:
            entry["graph_connectivity"] = _connectivity_group(nb, graph_neighbors)
        entry["neighbors"] = {"k": nb.k, "method": nb.method}
        for key in per_metric:
            per_metric[key].append(entry[key])

    metrics: dict[str, float] = {key: mean_or_nan(v) for key, v in per_metric.items()}
    reasons: dict[str, str] = {}
    if not mixing:
        why = (
            f"no cell type has >= {min_cells} cells in >= 2 batches"
            if data.y is not None
            else f"fewer than {min_cells} cells"
        )
        for key in per_metric:
            reasons[key] = why
    lobo_out = None
    label_arr = data.label_array()
    if label_arr is None:
        for key in ("graph_connectivity", "celltype_asw", "nmi", "ari"):
            reasons[key] = "needs cell types (labels or predictions)"
    else:
        metrics["celltype_asw"] = compute_celltype_asw(
            data.X,
            label_arr,
            max_cells=None if max_silhouette_cells is None else 2 * max_silhouette_cells,
            seed=seed,
        )
        metrics.update(
            _kmeans_agreement(data.X, label_arr, seed=seed, n_init=1, max_cells=max_cluster_cells)
        )
        for key in ("celltype_asw", "nmi", "ari"):
            if math.isnan(metrics[key]):
                reasons[key] = "needs >= 2 cell types with enough cells"
    lobo_keys = [k for k, s in METRICS.items() if s.kind == "transfer"]
    if not lobo:
        reasons.update(dict.fromkeys(lobo_keys, "not computed (lobo=False)"))
    elif label_arr is None or len(mixing) < 2:
        reasons.update(dict.fromkeys(lobo_keys, "needs >= 2 cell types found in >= 2 batches"))
    else:
        names = [g.name for g in mixing]
        keep = np.isin(label_arr.astype(str), names) & (data.y >= 0)
        lobo_metrics, lobo_out, lobo_reasons = lobo_probes(
            data.X[keep],
            label_arr[keep].astype(str),
            data.batch_array()[keep],
            max_cells=lobo_max_cells,
            min_cells=min_cells,
            seed=seed,
        )
        lobo_out = {"labels": names, **lobo_out}
        metrics.update(lobo_metrics)
        reasons.update(lobo_reasons)
    for key in METRICS:
        metrics.setdefault(key, math.nan)
        if math.isnan(metrics[key]) and key not in reasons:
            reasons[key] = "could not be computed on these cells"
    clean_per_label = {
        name: {k: _jsonable(v) for k, v in entry.items()} for name, entry in per_label.items()
    }
    out = {
        "batches": list(data.batch_names),
        "n_cells": data.n,
        "n_labelled": None if data.y is None else int((data.y >= 0).sum()),
        "mixing_labels": [g.name for g in mixing],
        "excluded_labels": {g.name: g.reason for g in groups if not g.mixing},
        "metrics": {key: _jsonable(float(metrics[key])) for key in METRICS},
        "reasons": {key: reasons[key] for key in METRICS if key in reasons},
        "per_label": clean_per_label,
        "lobo": lobo_out,
        "directions": {key: s.direction for key, s in METRICS.items()},
        "higher_is_better": {key: s.higher_is_better for key, s in METRICS.items()},
        "meanings": {key: s.meaning for key, s in METRICS.items()},
        "parameters": {
            "perplexity": perplexity,
            "n_neighbors_lisi": lisi_k,
            "kbet_k": kbet_k if kbet_k is not None else "median batch size per type in [10, 100]",
            "alpha": alpha,
            "n_components": n_components,
            "graph_neighbors": graph_neighbors,
            "min_cells": min_cells,
            "neighbor_method": neighbor_method,
            "exact_below": exact_below,
            "reference_cells": reference_cells,
            "lobo_max_cells": lobo_max_cells,
            "max_cluster_cells": max_cluster_cells,
            "seed": seed,
        },
    }
    if per_cell is not None:
        out["ilisi_per_cell"] = per_cell
    return out


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
        Cell type names, None where there is none
        (:func:`~napari_hemofm.core.labels.clean_labels` decides).
    """
    from napari_hemofm.core.labels import clean_labels

    out = clean_labels(table.column(label_column).astype(object).to_numpy())
    if label_column == "label" and "prediction" in table.obs.columns:
        missing = np.array([v is None for v in out], dtype=bool)
        if missing.any():
            pred = clean_labels(table.obs["prediction"].astype(object).to_numpy())
            out[missing] = pred[missing]
    return out


def level_column(table: CellTable, by: str = "batch") -> tuple[str, str]:
    """The ``obs`` column that holds the groups compared at level ``by``, and a note.

    Parameters
    ----------
    table : CellTable
    by : str
        ``"batch"`` (lab, scanner), ``"slide"`` (one smear / patient) or any ``obs``
        column.

    Returns
    -------
    column : str
        ``by``; ``"batch"`` where ``by == "slide"`` and the table has no slide values.
    note : str
        Why the column differs from ``by`` ("" when it does not).

    Raises
    ------
    KeyError
        ``by`` names no column (the message lists the columns).
    """
    obs = table.obs
    if by == "slide" and ("slide" not in obs.columns or obs["slide"].isna().all()):
        return "batch", "the cell table has no slides: comparing batches instead"
    table.column(by)  # raises KeyError listing the columns
    return by, ""


def default_level(table: CellTable) -> str:
    """The level to compare when none is chosen: batches, else slides.

    ``"batch"`` when the table holds two or more batches (labs, scanners: the batch
    effect proper); ``"slide"`` when it holds one batch but two or more slides (one
    folder of smears: each smear is a slide, DESIGN.md), so there is still something
    to compare; ``"batch"`` otherwise.
    """
    if len(table.batches) >= 2:
        return "batch"
    values, column, _ = level_values(table, "slide")
    if column == "slide" and len({v for v in values if v is not None}) >= 2:
        return "slide"
    return "batch"


def level_values(table: CellTable, by: str = "batch") -> tuple[np.ndarray, str, str]:
    """The group of each cell at level ``by``: its batch, its slide, or a column's value.

    Parameters
    ----------
    table : CellTable
    by : str
        ``"batch"``, ``"slide"`` or any ``obs`` column (see :func:`level_column`).

    Returns
    -------
    values : ndarray of object, shape (n_cells,)
        The group names; None where a cell has none. At the slide level a cell without a
        slide takes its batch (DESIGN.md: the batch is a crop's slide).
    column : str
        The column used.
    note : str
        Why the column differs from ``by`` ("" when it does not).
    """
    from napari_hemofm.core.cells import slide_values
    from napari_hemofm.core.labels import clean_labels

    column, note = level_column(table, by)
    if column == "slide":
        return slide_values(table.obs), column, note
    values = clean_labels(table.column(column).astype(object).to_numpy())
    return values, column, note


def table_batch_report(
    table: CellTable,
    *,
    by: str = "batch",
    embedding: str = "X_embed",
    label_column: str = "label",
    correction: Correction | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`batch_report` on a cell table, comparing the groups of column ``by``.

    Parameters
    ----------
    table : CellTable
        Cells with ``obs[by]`` and ``obsm[embedding]``.
    by : str
        The level: ``"batch"``, ``"slide"`` or another ``obs`` column
        (:func:`level_values`: a cell without a slide takes its batch; at another
        column, cells without a value are left out).
    embedding : str
        ``obsm`` key of the embeddings.
    label_column : str
        Cell types: this column; for ``"label"`` uncurated cells take their prediction
        (see :func:`table_labels`).
    correction : {"centre", "combat", "harmony"}, optional
        Report on a corrected copy of the embeddings
        (:func:`~.corrections.preview_correction`; the table is not changed) and add
        the uncorrected metrics as ``"uncorrected"``.
    **kwargs
        Passed to :func:`batch_report`.

    Returns
    -------
    dict
        :func:`batch_report`'s dict, plus ``"n_not_embedded"`` (cells left out because
        their row is NaN), ``"n_no_group"`` (cells without a value in ``by``), ``"by"``
        (the column compared), ``"level_note"``, ``"label_column"``, ``"correction"``
        (None or the method) and ``"correction_skipped"`` (batch -> why it was left
        uncorrected).

    Raises
    ------
    ValueError
        No embeddings, no embedded cell, fewer than two groups, or a correction that
        cannot be fitted to two groups.
    KeyError
        ``by`` or ``label_column`` names no column.
    ImportError
        ``correction="harmony"`` without harmonypy.
    """
    groups, column, note = level_values(table, by)
    emb = table.adata.obsm.get(embedding)
    if emb is None:
        raise ValueError(f"no embeddings (obsm[{embedding!r}]): embed the cells first")
    emb = np.asarray(emb)
    done = np.isfinite(emb).all(axis=1)
    if not done.any():
        raise ValueError("no cell is embedded yet: embed the cells first")
    has_group = np.array([g is not None for g in groups], dtype=bool)
    use = done & has_group
    labels = table_labels(table, label_column)[use]
    batches = groups[use]
    X = emb[use]
    uncorrected = None
    skipped: dict[str, str] = {}
    if correction is not None:
        seed = kwargs.get("seed", 0)
        uncorrected = batch_report(X, batches, labels, **kwargs)["metrics"]
        preview = preview_correction(X, batches, labels, method=correction, seed=seed)
        X, skipped = preview.X, preview.skipped
    report = batch_report(X, batches, labels, **kwargs)
    report["n_not_embedded"] = int((~done).sum())
    report["n_no_group"] = int((done & ~has_group).sum())
    report["by"] = column
    report["level_note"] = note
    report["label_column"] = label_column
    report["correction"] = correction
    report["correction_skipped"] = skipped
    if uncorrected is not None:
        report["uncorrected"] = uncorrected
    return report

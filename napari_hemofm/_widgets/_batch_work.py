"""The Batch view's background work: snapshots of the table and the worker bodies.

Qt-free. The Batch view (``_batch.py``) copies what a computation needs from the cell
table on the GUI thread (:class:`Snapshot`) and runs these functions in workers; they
call core (:mod:`napari_hemofm.core.batch`, :mod:`~napari_hemofm.core.reduce`,
:mod:`~napari_hemofm.core.appearance`) and return plain results. A body never raises
into napari: :func:`never_raises` turns an exception into a :class:`Failure` that the
view shows as one line (:func:`error_line`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "Appearance",
    "Failure",
    "Preview",
    "Snapshot",
    "analyse",
    "correction_preview",
    "error_line",
    "measure_appearance",
    "never_raises",
    "pca_layout",
    "umap_layout",
]


@dataclass
class Snapshot:
    """What a worker needs, copied from the table on the GUI thread.

    ``X`` holds the embedded rows only (boolean indexing copies), so no worker can touch
    ``obsm["X_embed"]``.
    """

    table: Any
    generation: int  # the widget's invalidation count when taken
    X_ref: Any  # the table's embedding array when taken (identity = cache key)
    X: np.ndarray  # (n_embedded, dim)
    done: np.ndarray  # (n_cells,) bool: embedded rows
    batches: np.ndarray  # (n_embedded,) object: the groups compared (batch or slide)
    labels: np.ndarray  # (n_embedded,) object, None = no cell type
    level: str = "batch"  # the obs column of ``batches``

    def full(self, values: np.ndarray) -> np.ndarray:
        """Values of the embedded rows spread to all rows (NaN elsewhere)."""
        values = np.asarray(values)
        out = np.full((len(self.done), *values.shape[1:]), np.nan, dtype=np.float64)
        out[self.done] = values
        return out


def _mixing_and_report(
    X: np.ndarray, snap: Snapshot, want_report: bool
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Per-cell iLISI of all rows and (optionally) the report, from one neighbour search."""
    from napari_hemofm.core import batch

    if not want_report:
        return snap.full(batch.ilisi_per_cell(X, snap.batches, snap.labels)), None
    report = batch.batch_report(X, snap.batches, snap.labels, return_per_cell=True)
    return snap.full(report.pop("ilisi_per_cell")), report


def analyse(snap: Snapshot, want_report: bool) -> dict[str, Any]:
    """Worker: per-cell mixing and (optionally) the batch report of the snapshot."""
    ilisi, report = _mixing_and_report(snap.X, snap, want_report)
    out: dict[str, Any] = {"ilisi": ilisi}
    if report is not None:
        out["report"] = report
    return out


def correction_preview(snap: Snapshot, method: str, want_before: bool) -> dict[str, Any]:
    """Worker: a corrected copy of the embeddings, its UMAP, mixing and report.

    The correction is :func:`~napari_hemofm.core.batch.preview_correction`, as in
    ``hemofm batch --correct``: groups it cannot fit stay as they are, named in
    ``"skipped"``.
    """
    from napari_hemofm.core import batch, reduce

    preview = batch.preview_correction(snap.X, snap.batches, snap.labels, method=method)
    ilisi, report = _mixing_and_report(preview.X, snap, True)
    out: dict[str, Any] = {
        "X": preview.X,
        "coords": snap.full(reduce.compute_umap(preview.X, **reduce.UMAP_DEFAULTS)),
        "ilisi": ilisi,
        "report": report,
        "skipped": preview.note(),
    }
    if want_before:
        out["before"] = analyse(snap, True)
    return out


@dataclass
class Failure:
    """What a worker body returns instead of raising (see :func:`never_raises`)."""

    error: Exception


def never_raises(fn: Callable) -> Callable:
    """``fn`` returning :class:`Failure` instead of raising.

    napari re-raises a worker's exception on the GUI thread and shows it as a
    notification pop-up; the Batch view shows one readable line in its panel instead.
    """

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            return Failure(exc)

    return run


def error_line(exc: BaseException) -> str:
    """One readable line for an error shown in the panel (no traceback)."""
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    else:
        text = str(exc) or type(exc).__name__
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first if isinstance(exc, ValueError | KeyError) else f"{type(exc).__name__}: {first}"


def pca_layout(snap: Snapshot) -> np.ndarray:
    """Worker: the first two principal components (a quick stand-in for the UMAP)."""
    from napari_hemofm.core.reduce import compute_pca

    xy = compute_pca(snap.X, 2) if len(snap.X) >= 2 else np.zeros((len(snap.X), 2))
    if xy.shape[1] < 2:
        xy = np.concatenate([xy, np.zeros((len(xy), 2 - xy.shape[1]))], axis=1)
    return snap.full(xy)


def umap_layout(snap: Snapshot) -> tuple[np.ndarray, dict[str, Any]]:
    """Worker: the UMAP of ``X_embed`` as the Cell map computes it, with its cache key."""
    from napari_hemofm.core import reduce

    coords = reduce.compute_umap(snap.X, **reduce.UMAP_DEFAULTS)
    key = reduce.umap_cache_key(snap.X_ref)
    return snap.full(coords), key


@dataclass
class Appearance:
    """Stain and size statistics of the sampled cells, before and after normalisation.

    Attributes
    ----------
    before : pandas.DataFrame
        :func:`~napari_hemofm.core.appearance.table_appearance` of the crops as they are.
    after : pandas.DataFrame or None
        The same cells after stain normalisation (None when the method is ``"none"``,
        the normaliser could not be built, or the run was cancelled).
    method : str
        The stain normalisation method previewed (``"none"``: no "after").
    note : str
        Why there is no "after" although a method was asked for ("" otherwise).
    """

    before: pd.DataFrame
    after: pd.DataFrame | None = None
    method: str = "none"
    note: str = ""


def measure_appearance(
    obs: pd.DataFrame,
    rows: np.ndarray,
    images: dict[str, Any],
    pixel_size_um: float | None,
    progress: Callable[[int, int], None],
    cancel: Callable[[], bool],
    stain: dict[str, Any] | None = None,
    reference_obs: pd.DataFrame | None = None,
) -> Appearance:
    """Worker: stain and size statistics of the sampled cells, before and after.

    Parameters
    ----------
    obs : pandas.DataFrame
        ``source``, ``batch`` (the group compared) and the crop box, indexed by cell id.
    rows : ndarray of int
        Rows of ``obs`` to measure.
    images : dict of str to array
        In-memory images by source.
    pixel_size_um : float or None
    progress : callable
        ``progress(done, total)``; total counts both passes when there is an "after".
    cancel : callable
        Checked between chunks.
    stain : dict, optional
        The stain setting to preview (``{"method": ..., "reference": ...}``).
    reference_obs : pandas.DataFrame, optional
        The table's ``source`` and real ``batch`` columns, where a reference batch's
        images are found (default: ``obs``).

    Returns
    -------
    Appearance
    """
    from napari_hemofm.core.appearance import table_appearance
    from napari_hemofm.core.embed_job import stain_normaliser

    method = str((stain or {}).get("method", "none"))
    normalise, note = None, ""
    if method != "none":
        try:
            ref = obs if reference_obs is None else reference_obs
            normalise = stain_normaliser(stain, ref, images)
        except ValueError as exc:
            note = str(exc).splitlines()[0]
    n = len(rows)
    total = 2 * n if normalise is not None else n

    def measure(offset: int, fn: Callable[[np.ndarray], np.ndarray] | None) -> pd.DataFrame:
        return table_appearance(
            obs,
            None,
            rows=rows,
            progress=lambda done, _total: progress(offset + done, total),
            images=images,
            pixel_size_um=pixel_size_um,
            cancel=cancel,
            normalise=fn,
        )

    out = Appearance(measure(0, None), method=method, note=note)
    if normalise is not None and not cancel():
        out.after = measure(n, normalise)
    return out


@dataclass
class Preview:
    """A computed correction preview."""

    X: np.ndarray
    coords: np.ndarray
    ilisi: np.ndarray
    report: dict[str, Any]
    done: np.ndarray = field(repr=False)
    skipped: str = ""  # the groups left uncorrected, with why ("" when none)

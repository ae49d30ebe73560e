"""The cell table: one AnnData row per cell, with change signals for the views.

This is the project's single data model (the contract is in DESIGN.md, "The cell
table"). Every view (the ``cells`` Points layer, the map, the gallery) listens to
:attr:`CellTable.events` and never keeps its own copy of labels or predictions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from psygnal import Signal, SignalGroup

from napari_hemofm.core.labels import clean_labels, is_unlabelled

if TYPE_CHECKING:
    import anndata as ad

    from napari_hemofm.core.journal import LabelJournal

SCHEMA_VERSION = 1
"""Version of the saved cell-table layout (``uns["hemofm"]["schema_version"]``)."""

EMBEDDING_KEY = "X_embed"
UMAP_KEY = "X_umap"

#: Contract columns of ``adata.obs`` and their dtypes (DESIGN.md). ``"category"``
#: columns hold NaN for "no value" (an unlabelled cell has ``label`` NaN).
OBS_COLUMNS: dict[str, str] = {
    "source": "object",
    "batch": "category",
    "slide": "category",
    "x": "float64",
    "y": "float64",
    "x0": "int64",
    "y0": "int64",
    "x1": "int64",
    "y1": "int64",
    "label": "category",
    "label_origin": "category",
    "prediction": "category",
    "confidence": "float64",
}

#: Columns a caller must give to :meth:`CellTable.add_cells`; the others get defaults.
REQUIRED_COLUMNS = ("source", "batch", "x", "y", "x0", "y0", "x1", "y1")


class CellTableEvents(SignalGroup):
    """Signals emitted by a :class:`CellTable` after its content changed.

    Each signal fires once per call that changed something, after the change, so a
    listener may read the table in its callback.
    """

    cells_added = Signal(int, int)
    """``(start, stop)``: rows ``start:stop`` were appended."""
    labels_changed = Signal(object, object)
    """``(cell_ids, labels)``: the curated labels of these cells changed (NaN = removed)."""
    columns_changed = Signal(object)
    """``(names,)``: these ``obs`` columns were (re)written for some or all cells."""
    embeddings_changed = Signal(str)
    """``(key,)``: ``obsm[key]`` was written (``"X_embed"``, ``"X_umap"``, ...)."""
    classes_changed = Signal(object)
    """``(classes,)``: the ordered class list (hotkey order) changed."""


def _empty_obs() -> pd.DataFrame:
    obs = pd.DataFrame(
        {name: pd.Series(dtype=dtype) for name, dtype in OBS_COLUMNS.items()},
        index=pd.Index([], dtype=object, name="cell_id"),
    )
    return obs


def _coerce_obs(frame: pd.DataFrame) -> pd.DataFrame:
    """Return ``frame`` with the contract columns present and of the contract dtypes."""
    out = frame.copy()
    for name, dtype in OBS_COLUMNS.items():
        if name not in out.columns:
            if dtype in ("float64",):
                out[name] = np.nan
            elif dtype == "int64":
                raise ValueError(f"cell table is missing the required column {name!r}")
            else:
                out[name] = pd.Series([np.nan] * len(out), index=out.index, dtype=object)
        if dtype == "category":
            col = out[name]
            if not isinstance(col.dtype, pd.CategoricalDtype):
                col = col.astype(object).where(col.notna(), np.nan)
                col = col.map(lambda v: v if (isinstance(v, float) and np.isnan(v)) else str(v))
                out[name] = pd.Categorical(col)
        elif dtype == "object":
            out[name] = out[name].astype(str)
        else:
            out[name] = out[name].astype(dtype)
    return out


class CellTable:
    """AnnData-backed table of cells with change signals.

    Parameters
    ----------
    adata : anndata.AnnData, optional
        An existing table (e.g. read from a project file). Missing contract columns
        are added with empty values. When omitted, the table starts empty.

    Notes
    -----
    ``adata.obs`` is indexed by ``cell_id`` (``"<input name>/<relative path>#<n>"``,
    assigned once, never from the batch) and
    holds the columns in :data:`OBS_COLUMNS`. ``obsm["X_embed"]`` holds the float32
    embeddings of shape ``(n_cells, dim)`` once the cells are embedded; ``adata.X``
    stays ``(n_cells, 0)``. ``uns["hemofm"]`` holds the schema version, model
    name, weights sha256, input size, package version, ordered class list and pixel
    size. Mutate the table through its methods so that the signals fire.

    Examples
    --------
    >>> table = CellTable()
    >>> table.add_cells(
    ...     pd.DataFrame(
    ...         {"source": ["a.png"], "batch": ["lab"], "x": [5.0], "y": [5.0],
    ...          "x0": [0], "y0": [0], "x1": [10], "y1": [10]},
    ...         index=["lab/a.png#0"],
    ...     )
    ... )
    >>> table.set_labels(["lab/a.png#0"], "neutrophil")
    >>> table.column("label").tolist()
    ['neutrophil']
    """

    def __init__(self, adata: ad.AnnData | None = None) -> None:
        import anndata as ad

        self.events = CellTableEvents()
        if adata is None:
            adata = ad.AnnData(obs=_empty_obs())
        else:
            adata = adata.copy() if adata.is_view else adata
            adata.obs = _coerce_obs(adata.obs)
        adata.obs.index = adata.obs.index.astype(str)
        adata.obs.index.name = "cell_id"
        if not adata.obs.index.is_unique:
            dup = adata.obs.index[adata.obs.index.duplicated()].unique()[:5].tolist()
            raise ValueError(f"cell ids must be unique; duplicated: {dup}")
        meta = dict(adata.uns.get("hemofm", {}))
        meta.setdefault("schema_version", SCHEMA_VERSION)
        meta.setdefault("package_version", _package_version())
        classes = meta.get("classes")
        meta["classes"] = [str(c) for c in (classes if classes is not None else [])]
        adata.uns["hemofm"] = meta
        self._adata = adata
        self._position: pd.Series | None = None
        #: Label journal (see :mod:`~.journal`); set by load/save of a project file.
        self.journal: LabelJournal | None = None
        #: Label records of changes made while no journal was attached (see
        #: :func:`~.journal.before_save`): the audit trail of a never-saved session.
        self._unsaved_records: list[dict[str, Any]] = []
        for name in ("label", "prediction"):
            self._register_classes(adata.obs[name].dropna().unique(), emit=False)

    # ------------------------------------------------------------------ reading
    @property
    def adata(self) -> ad.AnnData:
        """The backing :class:`anndata.AnnData` (read it freely; write through methods)."""
        return self._adata

    @property
    def obs(self) -> pd.DataFrame:
        """Per-cell columns (``adata.obs``), indexed by ``cell_id``."""
        return self._adata.obs

    @property
    def n_cells(self) -> int:
        """Number of cells (rows)."""
        return self._adata.n_obs

    def __len__(self) -> int:
        return self.n_cells

    def __repr__(self) -> str:
        emb = self.embeddings
        dim = "none" if emb is None else str(emb.shape[1])
        return (
            f"CellTable(n_cells={self.n_cells}, batches={len(self.batches)}, "
            f"classes={self.classes}, embedding_dim={dim})"
        )

    @property
    def cell_ids(self) -> pd.Index:
        """The cell ids, in row order."""
        return self._adata.obs_names

    @property
    def batches(self) -> list[str]:
        """Batch names present in the table, in order of first appearance."""
        return [str(b) for b in pd.unique(self.obs["batch"].astype(object).dropna())]

    @property
    def classes(self) -> list[str]:
        """Ordered class list (the hotkey order: class ``i`` is key ``i + 1``)."""
        return list(self._adata.uns["hemofm"]["classes"])

    @property
    def meta(self) -> dict[str, Any]:
        """Project metadata, ``uns["hemofm"]`` (model, weights sha256, pixel size, ...)."""
        return self._adata.uns["hemofm"]

    def column(self, name: str) -> pd.Series:
        """Return the ``obs`` column ``name`` (indexed by cell id).

        Raises
        ------
        KeyError
            If there is no such column; the message lists the columns there are.
        """
        if name not in self.obs.columns:
            raise KeyError(
                f"no column {name!r} in the cell table; columns are: {list(self.obs.columns)}"
            )
        return self.obs[name]

    @property
    def embeddings(self) -> np.ndarray | None:
        """Embeddings of shape ``(n_cells, dim)`` (float32), or ``None`` before embedding."""
        return self._adata.obsm.get(EMBEDDING_KEY)

    def positions(self, cell_ids: Iterable[str]) -> np.ndarray:
        """Row positions of ``cell_ids``.

        Raises
        ------
        KeyError
            Naming the first few unknown ids.
        """
        ids = pd.Index(_as_list(cell_ids), dtype=object)
        if self._position is None:
            self._position = pd.Series(np.arange(self.n_cells), index=self.cell_ids)
        pos = self._position.reindex(ids)
        missing = ids[pos.isna().to_numpy()]
        if len(missing):
            raise KeyError(f"{len(missing)} unknown cell id(s), e.g. {missing[:3].tolist()}")
        return pos.to_numpy(dtype=np.int64)

    # ------------------------------------------------------------------ writing
    def add_cells(self, cells: pd.DataFrame, embeddings: np.ndarray | None = None) -> None:
        """Append cells.

        Parameters
        ----------
        cells : pandas.DataFrame
            One row per cell, indexed by cell id (or with a ``cell_id`` column), with
            at least :data:`REQUIRED_COLUMNS`. Other contract columns default to empty;
            extra columns (e.g. ``score``) are kept.
        embeddings : ndarray of shape (n_new, dim), optional
            Embeddings of the new cells. Rows of cells added without embeddings to a
            table that has them are NaN until embedded.

        Raises
        ------
        ValueError
            If a required column is missing, a cell id is already in the table or
            repeats, or ``embeddings`` has the wrong number of rows or columns.
        """
        import anndata as ad

        frame = cells.copy()
        if "cell_id" in frame.columns:
            frame = frame.set_index("cell_id")
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(
                f"cells lack the required column(s) {missing}; got {list(frame.columns)}"
            )
        frame.index = frame.index.astype(str)
        frame.index.name = "cell_id"
        clash = frame.index[frame.index.duplicated() | frame.index.isin(self.cell_ids)]
        if len(clash):
            raise ValueError(
                f"{len(clash)} cell id(s) already in the table or repeated, "
                f"e.g. {clash[:3].tolist()}"
            )
        if "label" in frame.columns and "label_origin" not in frame.columns:
            frame["label_origin"] = np.where(frame["label"].notna(), "imported", None)
        new = _coerce_obs(frame)
        n_old, n_new = self.n_cells, len(new)
        old_emb = self.embeddings
        if embeddings is not None:
            embeddings = np.asarray(embeddings, dtype=np.float32)
            if embeddings.ndim != 2 or embeddings.shape[0] != n_new:
                raise ValueError(
                    f"embeddings must have shape ({n_new}, dim); got {embeddings.shape}"
                )
            if old_emb is not None and old_emb.shape[1] != embeddings.shape[1]:
                raise ValueError(
                    f"embedding dim {embeddings.shape[1]} differs from the table's "
                    f"{old_emb.shape[1]}"
                )
        obs = _concat_obs(self.obs, new)
        obsm: dict[str, np.ndarray] = {}
        for key, value in self._adata.obsm.items():
            pad = np.full((n_new, *value.shape[1:]), np.nan, dtype=value.dtype)
            if key == EMBEDDING_KEY and embeddings is not None:
                pad = embeddings
            obsm[key] = np.concatenate([np.asarray(value), pad])
        if EMBEDDING_KEY not in obsm and embeddings is not None:
            obsm[EMBEDDING_KEY] = np.concatenate(
                [np.full((n_old, embeddings.shape[1]), np.nan, np.float32), embeddings]
            )
        uns = self._adata.uns
        self._adata = ad.AnnData(obs=obs, obsm=obsm, uns=uns)
        self._position = None
        for name in ("label", "prediction"):
            self._register_classes(new[name].dropna().unique())
        self.events.cells_added.emit(n_old, n_old + n_new)

    def set_labels(
        self,
        cell_ids: Iterable[str] | str,
        labels: str | float | Sequence[str | float | None] | None,
        *,
        origin: str = "user",
        record: bool = True,
    ) -> pd.Series:
        """Set the curated label of cells.

        Parameters
        ----------
        cell_ids : str or iterable of str
            Cells to relabel.
        labels : str, None, NaN or sequence of those
            One label for all cells, or one per cell. ``None`` / NaN / ``""``
            removes the label (the cell becomes unlabelled). New labels are appended
            to :attr:`classes`.
        origin : str
            Written to ``label_origin`` for labelled cells (``"user"``, ``"imported"``).
        record : bool
            Record the change (journal, or the unsaved records). False only for
            re-applying changes that are already recorded (a journal replay).

        Notes
        -----
        When the table belongs to a project file (:attr:`journal` is set), the change is
        appended to the label journal and fsynced before it is applied; without one it
        is kept in :attr:`unsaved_records` until the first save.

        Returns
        -------
        pandas.Series
            The previous labels of these cells (for undo), indexed by cell id.
        """
        ids = _as_list(cell_ids)
        if isinstance(labels, str) or np.isscalar(labels) or is_unlabelled(labels):
            values = [labels] * len(ids)
        else:
            values = list(labels)
            if len(values) != len(ids):
                raise ValueError(f"got {len(values)} labels for {len(ids)} cells")
        values = list(clean_labels(values))
        pos = self.positions(ids)
        obs = self.obs
        previous = obs["label"].iloc[pos].astype(object).copy()
        previous.index = pd.Index(ids, name="cell_id")
        if record and self.journal is not None:
            # on disk before the change exists anywhere else: an acknowledged label
            # survives; "old" lets the journal tell who changed what from what
            self.journal.append(ids, values, origin=origin, old=previous.tolist())
        elif record and origin != "imported":  # labels a project is created with are not changes
            from napari_hemofm.core.journal import make_record

            self._unsaved_records.append(
                make_record(ids, values, origin=origin, old=previous.tolist())
            )
        new_classes = [v for v in dict.fromkeys(values) if v is not None]
        self._register_classes(new_classes)
        for name in ("label", "label_origin"):
            if not isinstance(obs[name].dtype, pd.CategoricalDtype):
                obs[name] = pd.Categorical(obs[name])
        label_col = obs["label"]
        missing_cats = [v for v in new_classes if v not in label_col.cat.categories]
        if missing_cats:
            obs["label"] = label_col.cat.add_categories(missing_cats)
        origin_col = obs["label_origin"]
        if origin not in origin_col.cat.categories:
            obs["label_origin"] = origin_col.cat.add_categories([origin])
        lab = obs["label"].to_numpy(copy=True)
        org = obs["label_origin"].to_numpy(copy=True)
        arr = np.array([np.nan if v is None else v for v in values], dtype=object)
        lab[pos] = arr
        org[pos] = np.array([np.nan if v is None else origin for v in values], dtype=object)
        obs["label"] = pd.Categorical(lab, categories=obs["label"].cat.categories)
        obs["label_origin"] = pd.Categorical(org, categories=obs["label_origin"].cat.categories)
        self.events.labels_changed.emit(
            np.asarray(ids, dtype=object), np.asarray(obs["label"].iloc[pos].astype(object))
        )
        return previous

    def set_column(self, name: str, values: Any, cell_ids: Iterable[str] | None = None) -> None:
        """Write an ``obs`` column for all cells or for ``cell_ids``.

        Parameters
        ----------
        name : str
            Column name. ``label`` goes through :meth:`set_labels` instead.
        values : scalar or array-like of shape (n,)
            The values (n = number of cells, or ``len(cell_ids)``).
        cell_ids : iterable of str, optional
            Rows to write; all rows when omitted. A new column written for a subset
            is NaN elsewhere.
        """
        if name == "label":
            raise ValueError("write labels with set_labels(), which keeps the journal and origin")
        obs = self.obs
        if cell_ids is None:
            n = self.n_cells
            if not np.isscalar(values) and len(values) != n:
                raise ValueError(f"{name!r}: got {len(values)} values for {n} cells")
            obs[name] = values
            if OBS_COLUMNS.get(name) == "category":
                obs[name] = pd.Categorical(obs[name])
        else:
            pos = self.positions(cell_ids)
            if name not in obs.columns:
                obs[name] = np.nan
            col = obs[name]
            if isinstance(col.dtype, pd.CategoricalDtype):
                vals = pd.Series(values if not np.isscalar(values) else [values] * len(pos))
                extra = [v for v in vals.dropna().unique() if v not in col.cat.categories]
                if extra:
                    col = col.cat.add_categories(extra)
                arr = col.to_numpy(copy=True)
                arr[pos] = vals.to_numpy(dtype=object)
                obs[name] = pd.Categorical(arr, categories=col.cat.categories)
            else:
                arr = col.to_numpy(copy=True)
                if not np.isscalar(values):
                    values = np.asarray(values)
                    if np.result_type(arr.dtype, values.dtype) != arr.dtype:
                        arr = arr.astype(np.result_type(arr.dtype, values.dtype))
                arr[pos] = values
                obs[name] = arr
        if name == "prediction":
            self._register_classes(obs[name].dropna().unique())
        self.events.columns_changed.emit((name,))

    def set_predictions(
        self,
        rows: np.ndarray | None,
        prediction: Sequence[Any] | np.ndarray,
        confidence: Sequence[float] | np.ndarray,
    ) -> None:
        """Write the probe's ``prediction`` and ``confidence`` of some or all cells at once.

        One ``columns_changed(("prediction", "confidence"))`` signal follows, so views
        refresh once per retraining rather than once per column.

        Parameters
        ----------
        rows : ndarray of int of shape (m,), or None
            Row positions to write; ``None`` writes all ``n_cells`` rows.
        prediction : array-like of shape (m,)
            Class names (``None`` = no prediction).
        confidence : array-like of shape (m,)
            Probability of the prediction (NaN where none).
        """
        obs = self.obs
        n = self.n_cells
        pos = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
        pred = np.asarray(prediction, dtype=object)
        conf = np.asarray(confidence, dtype=np.float32)
        if pred.shape != pos.shape or conf.shape != pos.shape:
            raise ValueError(
                f"got {pred.shape[0]} predictions and {conf.shape[0]} confidences "
                f"for {pos.shape[0]} rows"
            )
        names = [str(v) for v in pd.unique(pred[pd.notna(pred)])]
        self._register_classes(names)
        col = obs["prediction"]
        if not isinstance(col.dtype, pd.CategoricalDtype):
            col = pd.Categorical(col.astype(object))
            col = pd.Series(col, index=obs.index)
        cats = list(col.cat.categories)
        cats += [c for c in names if c not in cats]
        codes = col.cat.codes.to_numpy(copy=True)
        lookup = {c: i for i, c in enumerate(cats)}
        codes[pos] = [lookup[str(v)] if v is not None and pd.notna(v) else -1 for v in pred]
        obs["prediction"] = pd.Categorical.from_codes(codes, categories=cats)
        old = pd.to_numeric(obs["confidence"], errors="coerce").to_numpy(dtype=np.float64)
        old = old.copy()
        old[pos] = conf
        obs["confidence"] = old
        self.events.columns_changed.emit(("prediction", "confidence"))

    def set_obsm(self, key: str, values: np.ndarray) -> None:
        """Store a per-cell matrix (``obsm[key]``, e.g. embeddings or UMAP).

        Parameters
        ----------
        key : str
            ``"X_embed"`` for embeddings (stored as float32), ``"X_umap"``, ...
        values : ndarray of shape (n_cells, k)
        """
        values = np.asarray(values)
        if values.ndim != 2 or values.shape[0] != self.n_cells:
            raise ValueError(
                f"obsm[{key!r}] must have shape ({self.n_cells}, k); got {values.shape}"
            )
        if key == EMBEDDING_KEY:
            values = values.astype(np.float32, copy=False)
        self._adata.obsm[key] = values
        self.events.embeddings_changed.emit(key)

    def set_embeddings(self, embeddings: np.ndarray, **meta: Any) -> None:
        """Store embeddings of shape ``(n_cells, dim)`` and the model facts in ``meta``.

        Keyword arguments (``model``, ``weights_sha256``, ``input_size``) go to
        :attr:`meta`.
        """
        self.update_meta(**meta)
        self.set_obsm(EMBEDDING_KEY, embeddings)

    def update_meta(self, **meta: Any) -> None:
        """Update ``uns["hemofm"]``; ``None`` values are dropped (h5ad cannot store them)."""
        for key, value in meta.items():
            if value is None:
                self.meta.pop(key, None)
            else:
                self.meta[key] = value

    def set_classes(self, classes: Sequence[str]) -> None:
        """Set the ordered class list (hotkey order).

        Every label and prediction in use must stay in the list.
        """
        classes = [str(c) for c in dict.fromkeys(classes)]
        used = set(self.obs["label"].dropna().astype(str)) | set(
            self.obs["prediction"].dropna().astype(str)
        )
        lost = sorted(used - set(classes))
        if lost:
            raise ValueError(f"classes {lost} are in use and cannot be dropped")
        self.meta["classes"] = classes
        self.events.classes_changed.emit(tuple(classes))

    def _register_classes(self, names: Iterable[Any], *, emit: bool = True) -> None:
        classes = self.meta["classes"]
        added = [str(n) for n in names if str(n) not in classes]
        if added:
            classes.extend(dict.fromkeys(added))
            if emit:
                self.events.classes_changed.emit(tuple(classes))

    # -------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write the table to an ``.h5ad`` project file (see :func:`~.io.save_project`)."""
        from napari_hemofm.core.io import save_project

        return save_project(self, path)

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> CellTable:
        """Read a project file written by :meth:`save` (see :func:`~.io.load_project`).

        Keyword arguments (``mode``, ``images_root``, ``wait``) go to ``load_project``.
        """
        from napari_hemofm.core.io import load_project

        return load_project(path, **kwargs)

    @property
    def unsaved_records(self) -> list[dict[str, Any]]:
        """Label records made while no journal was attached, oldest first (a copy)."""
        return list(self._unsaved_records)

    def take_unsaved_records(self) -> list[dict[str, Any]]:
        """Label records made while no journal was attached; the list is emptied.

        Returns
        -------
        list of dict
            Journal-format records (:func:`~.journal.make_record`), oldest first.
        """
        records, self._unsaved_records = self._unsaved_records, []
        return records

    def close(self) -> None:
        """Release the project's write lock (see :func:`~.io.close_project`)."""
        from napari_hemofm.core.io import close_project

        close_project(self)

    def to_frame(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Copy of ``obs`` (all columns, or ``columns``) with ``cell_id`` as a column."""
        frame = self.obs if columns is None else self.obs[list(columns)]
        return frame.reset_index()


def _as_list(cell_ids: Iterable[str] | str) -> list[str]:
    if isinstance(cell_ids, str):
        return [cell_ids]
    return [str(c) for c in cell_ids]


def _concat_obs(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Concatenate two ``obs`` frames, taking the union of categories."""
    if len(old) == 0:
        return new.copy()
    cols = list(dict.fromkeys([*old.columns, *new.columns]))
    parts = {}
    for name in cols:
        a = old[name] if name in old else pd.Series(np.nan, index=old.index)
        b = new[name] if name in new else pd.Series(np.nan, index=new.index)
        cat_a = isinstance(a.dtype, pd.CategoricalDtype)
        cat_b = isinstance(b.dtype, pd.CategoricalDtype)
        if cat_a or cat_b:
            cats_a = list(a.cat.categories) if cat_a else list(a.dropna().unique())
            cats_b = list(b.cat.categories) if cat_b else list(b.dropna().unique())
            cats = list(dict.fromkeys([*cats_a, *cats_b]))
            values = np.concatenate([a.to_numpy(dtype=object), b.to_numpy(dtype=object)])
            parts[name] = pd.Categorical(values, categories=cats)
        else:
            parts[name] = pd.concat([a, b], ignore_index=True).to_numpy()
    index = pd.Index([*old.index, *new.index], dtype=object, name="cell_id")
    return pd.DataFrame(parts, index=index)


def _package_version() -> str:
    from napari_hemofm import __version__

    return __version__


def slide_values(obs: pd.DataFrame) -> np.ndarray:
    """Each cell's slide, or its batch where it has none (DESIGN.md: a crop's slide).

    The one home of that rule: the differential counts and the batch metrics both group
    "per slide" through it.

    Parameters
    ----------
    obs : pandas.DataFrame
        A cell table's ``obs`` (``slide`` and ``batch`` columns, either may be missing).

    Returns
    -------
    ndarray of object, shape (n_cells,)
        Slide names (str), None where a cell has neither a slide nor a batch.
    """
    n = len(obs)
    empty = np.full(n, None, dtype=object)
    values = clean_labels(obs["slide"].astype(object)) if "slide" in obs else empty.copy()
    missing = np.array([v is None for v in values], dtype=bool)
    if missing.any() and "batch" in obs:
        values[missing] = clean_labels(obs["batch"].astype(object))[missing]
    return values


def table_from_frame(frame: pd.DataFrame, meta: Mapping[str, Any] | None = None) -> CellTable:
    """Build a :class:`CellTable` from a frame of cells (see :meth:`CellTable.add_cells`)."""
    table = CellTable()
    if meta:
        table.update_meta(**meta)
    table.add_cells(frame)
    return table

"""The labelling loop: relabel cells, undo / redo, a live probe, queues and counts.

:class:`Review` is the Python API of what the napari Review widget does, and the
widget only calls it. It wraps a :class:`~.cells.CellTable`:

- every :meth:`Review.relabel` is one undoable step, written through
  :meth:`CellTable.set_labels` (so the label journal of a project file records it
  before it is applied);
- the probe (:class:`~.probe.LiveProbe`, kNN or linear) follows every label
  change, whoever made it (the gallery, a key in the viewer, the map's lasso, a
  script): changes are collected and :meth:`Review.retrain` brings predictions up to
  date incrementally. The GUI runs the work part (:meth:`Review.retrain_step`) in a
  background worker and applies the result on the main thread;
- gallery sections, the "Label next" and "Suspect labels" queues and the
  differential count (:mod:`~.report`) are read from the same state.

Examples
--------
>>> review = Review.open("project.h5ad")                      # doctest: +SKIP
>>> review.relabel(["lab/a.png#0", "lab/b.png#0"], "neutrophil")  # doctest: +SKIP
>>> review.retrain()                                          # doctest: +SKIP
>>> review.table.column("prediction")                         # doctest: +SKIP
>>> review.undo()                                             # doctest: +SKIP
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from psygnal import Signal, SignalGroup

from napari_hemofm.core.report import (
    DEFAULT_GROUP_BY,
    DEFAULT_TARGET,
    NOT_CLASSED,
    UNIDENTIFIED,
    UNLABELLED,
    GroupBy,
    counted_cells,
    counted_labels,
    differential_counts,
    differential_summary,
    sign_off,
    store_threshold,
    stored_threshold,
    verify_sign_off,
)

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.probe import LiveProbe, ProbeUpdate

__all__ = [
    "NOT_CLASSED",
    "UNIDENTIFIED",
    "UNLABELLED",
    "Review",
    "ReviewEvents",
    "least_sure_keys",
]

ProbeKind = Literal["knn", "linear"]
Metric = Literal["euclidean", "cosine"]


class ReviewEvents(SignalGroup):
    """Signals of a :class:`Review`."""

    history_changed = Signal(bool, bool)
    """``(can_undo, can_redo)`` after a relabel, undo or redo."""
    predictions_changed = Signal(object)
    """``(rows,)``: int64 row positions whose prediction / confidence changed."""
    metrics_changed = Signal(object)
    """``(metrics,)``: the dict of :func:`~.evaluation.probe_metrics` (``{}`` when none)."""
    settings_changed = Signal()
    """The threshold, the probe kind or the class list changed."""


@dataclass
class _Change:
    """One table write: these cells went from ``before`` to ``after``."""

    ids: list[str]
    before: list[str | None]
    before_origin: list[str | None]
    after: list[str | None]
    origin: str


@dataclass
class _Step:
    """One undoable user action: label writes and, for renames / merges, the class list."""

    changes: list[_Change] = field(default_factory=list)
    classes_before: list[str] | None = None
    classes_after: list[str] | None = None


@dataclass
class _Snapshot:
    """What a retraining worker needs, copied on the main thread."""

    full: bool
    X: np.ndarray | None
    labels: np.ndarray | None
    rows: np.ndarray
    new_labels: list[str | None]
    n_cells: int


class Review:
    """The labelling loop on a cell table.

    Parameters
    ----------
    table : CellTable
        Cells with embeddings (``obsm["X_embed"]``); cells not embedded yet (NaN rows)
        get no prediction.
    probe : {"knn", "linear"}
        kNN (k = 20, uniform votes, as DinoBloom) or logistic regression with
        DinoBloom's C.
    metric : {"euclidean", "cosine"}
        Distance of the kNN probe.
    threshold : float, optional
        Predictions with a confidence below it put the cell in "Unidentified";
        default: the threshold saved with the project, else
        :data:`~.report.DEFAULT_THRESHOLD` (a saved 0 stays 0).
    k : int
        Neighbours of the kNN probe.

    Attributes
    ----------
    table : CellTable
    events : ReviewEvents
    probe : LiveProbe or None
        The probe once trained (read it; write labels through :meth:`relabel`).
    """

    def __init__(
        self,
        table: CellTable,
        *,
        probe: ProbeKind = "knn",
        metric: Metric = "euclidean",
        threshold: float | None = None,
        k: int = 20,
    ) -> None:
        if probe not in ("knn", "linear"):
            raise ValueError(f"probe must be 'knn' or 'linear'; got {probe!r}")
        self.table = table
        self.events = ReviewEvents()
        self._kind: ProbeKind = probe
        self._metric: Metric = metric
        self._k = int(k)
        self._threshold = float(threshold if threshold is not None else stored_threshold(table))
        self.probe: LiveProbe | None = None
        #: Labelled cells from elsewhere (a saved probe's training set) that the probe
        #: learns from besides this table's labels: ``(X, labels, name)`` or None.
        self.reference: tuple[np.ndarray, np.ndarray, str] | None = None
        #: How :meth:`label_next` picks cells (``"uncertain"`` or ``"hybrid"``, see
        #: :func:`~.queues.label_next`).
        self.queue_strategy: Literal["uncertain", "hybrid", "typical"] = "uncertain"
        #: Obs column whose groups the probe aligns by their labelled cells' class
        #: means (:mod:`~.alignment`: a new lab's first labels move its cells onto
        #: the reference frame), or None for raw embeddings. Default: "batch" for the
        #: kNN probe, None for the linear one, which learns a new lab's own class
        #: boundaries from raw embeddings better (measured in ``docs/probes.md``);
        #: setting :attr:`probe_kind` resets it to the kind's default.
        self.align_by: str | None = _default_align(probe)
        #: Default ``scope`` of :meth:`label_next` (e.g. ``{"batch": "lab B"}``), for a
        #: panel that scopes its queue; None = all cells.
        self.queue_scope: dict[str, Any] | None = None
        self._offsets: dict[str, np.ndarray] = {}
        self._offset_counts: dict[str, int] = {}
        self._undo: list[_Step] = []
        self._redo: list[_Step] = []
        self._pending: dict[int, None] = {}
        self._needs_full = True
        self._lock = threading.Lock()
        # the probe is updated in a worker; readers on the main thread (label_next) wait
        self._probe_lock = threading.Lock()
        self._applying = False
        table.events.labels_changed.connect(self._on_labels_changed)
        table.events.cells_added.connect(self._on_structure_changed)
        table.events.embeddings_changed.connect(self._on_embeddings_changed)

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        read_only: bool = False,
        mode: Literal["w", "r"] | None = None,
        images_root: str | Path | None = None,
        wait: float = 0.0,
        **kwargs: Any,
    ) -> Review:
        """Open a project file (its label journal is replayed) for review.

        Opening for writing takes the project's lock (one writer at a time, see
        :mod:`~.lock`); :meth:`close` releases it.

        Parameters
        ----------
        path : str or Path
            An ``.h5ad`` project written by ``hemofm embed`` or the napari plugin.
        read_only : bool
            Open without the lock: labels can be read, not changed (relabel, undo and
            save raise :class:`~.journal.ProjectReadOnlyError`).
        mode : {"w", "r"}, optional
            Same as ``read_only`` (``"r"``), as in :func:`~.io.load_project`.
        images_root : str or Path, optional
            Where the images are when their stored paths do not exist any more.
        wait : float
            Seconds to wait for another process to close the project.
        **kwargs
            Passed to :class:`Review`.

        Raises
        ------
        ProjectLockedError
            When another process has the project open for writing (the message names
            it); open with ``read_only=True`` to look at it meanwhile.
        """
        from napari_hemofm.core.io import close_project, load_project

        mode = mode or ("r" if read_only else "w")
        table = load_project(path, mode=mode, images_root=images_root, wait=wait)
        try:
            review = cls(table, **kwargs)
        except BaseException:
            close_project(table)
            raise
        review._owns_table = True
        return review

    @property
    def read_only(self) -> bool:
        """Whether the project was opened read-only (labels cannot change)."""
        journal = self.table.journal
        return journal is not None and journal.read_only

    def _check_writable(self) -> None:
        journal = self.table.journal
        if journal is not None:
            journal._check_writable()  # ProjectReadOnlyError naming the holder

    def save(self, path: str | Path | None = None) -> Path:
        """Save the project (the journal is emptied once the file holds every label).

        Parameters
        ----------
        path : str or Path, optional
            Target ``.h5ad``; default: the file the project was opened from.
        """
        from napari_hemofm.core.io import save_project

        if path is None:
            self._check_writable()
            if self.table.journal is None:
                raise ValueError("this table was never saved: give a path")
            path = self.table.journal.path.with_name(
                self.table.journal.path.name.replace(".labels.jsonl", ".h5ad")
            )
        return save_project(self.table, path)

    def close(self) -> None:
        """Stop following the table's signals; release the lock :meth:`open` took."""
        if getattr(self, "_owns_table", False):
            from napari_hemofm.core.io import close_project

            close_project(self.table)
        ev = self.table.events
        for sig, slot in (
            (ev.labels_changed, self._on_labels_changed),
            (ev.cells_added, self._on_structure_changed),
            (ev.embeddings_changed, self._on_embeddings_changed),
        ):
            try:
                sig.disconnect(slot)
            except Exception:
                pass

    # ---------------------------------------------------------------- settings
    @property
    def threshold(self) -> float:
        """Confidence below which an unlabelled cell's prediction is "Unidentified"."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = store_threshold(self.table, value)
        self.events.settings_changed.emit()

    @property
    def probe_kind(self) -> ProbeKind:
        """``"knn"`` or ``"linear"``; setting it refits the probe at the next retrain."""
        return self._kind

    @probe_kind.setter
    def probe_kind(self, kind: ProbeKind) -> None:
        if kind not in ("knn", "linear"):
            raise ValueError(f"probe must be 'knn' or 'linear'; got {kind!r}")
        if kind != self._kind:
            self._kind = kind
            self.align_by = _default_align(kind)
            self._needs_full = True
            self.events.settings_changed.emit()

    @property
    def metric(self) -> Metric:
        """Distance of the kNN probe."""
        return self._metric

    @metric.setter
    def metric(self, metric: Metric) -> None:
        if metric not in ("euclidean", "cosine"):
            raise ValueError(f"metric must be 'euclidean' or 'cosine'; got {metric!r}")
        if metric != self._metric:
            self._metric = metric
            self._needs_full = True
            self.events.settings_changed.emit()

    # ----------------------------------------------------------------- classes
    @property
    def classes(self) -> list[str]:
        """Classes in hotkey order (key 1 is ``classes[0]``); :data:`NOT_CLASSED` is not one."""
        return [c for c in self.table.classes if c != NOT_CLASSED]

    def class_for_key(self, key: int) -> str | None:
        """The class a number key assigns: 1-9 by position, 0 for :data:`NOT_CLASSED`."""
        if key == 0:
            return NOT_CLASSED
        classes = self.classes
        return classes[key - 1] if 1 <= key <= min(9, len(classes)) else None

    def add_class(self, name: str, kind: str | None = None) -> None:
        """Append a class to the list (it gets the next number key).

        Parameters
        ----------
        name : str
        kind : {"wbc", "non_wbc", "not_classed"}, optional
            How the differential counts it; default: what the class catalogue says
            (a name it does not know is a white cell).
        """
        from napari_hemofm.core.catalogue import set_custom_class

        name = _check_name(name)
        if name in self.table.classes:
            raise ValueError(f"there is already a class {name!r}")
        if kind is not None:
            set_custom_class(self.table, name, kind)  # type: ignore[arg-type]
        self.table.set_classes([*self.table.classes, name])
        self.events.settings_changed.emit()

    @property
    def preset(self) -> str:
        """The project's class preset (see :mod:`~.catalogue`)."""
        from napari_hemofm.core.catalogue import project_preset

        return project_preset(self.table).name

    def apply_preset(self, name: str) -> list[str]:
        """Fill the class bar from a preset (labels in use keep their spelling).

        Not an undo step: no label changes. See :func:`~.catalogue.apply_preset`.
        """
        from napari_hemofm.core.catalogue import apply_preset

        classes = apply_preset(self.table, name)
        self.events.settings_changed.emit()
        return classes

    def class_kind(self, name: str) -> str:
        """``wbc``, ``non_wbc`` or ``not_classed``: how the differential counts a class."""
        from napari_hemofm.core.catalogue import resolve

        return resolve(self.table, name).kind

    def rename_class(self, old: str, new: str) -> None:
        """Rename a class: its cells are relabelled, it keeps its key. One undo step."""
        new = _check_name(new)
        if old not in self.table.classes:
            raise ValueError(f"no class {old!r}; classes are {self.table.classes}")
        if new in self.table.classes:
            raise ValueError(f"there is already a class {new!r}: merge the two instead")
        before = self.table.classes
        after = [new if c == old else c for c in before]
        self._class_step(before, after, {old: new})

    def merge_classes(self, sources: Sequence[str], target: str) -> None:
        """Relabel every cell of ``sources`` as ``target`` and drop ``sources``. One undo step."""
        target = _check_name(target)
        sources = [s for s in dict.fromkeys(sources) if s != target]
        unknown = [s for s in sources if s not in self.table.classes]
        if unknown:
            raise ValueError(f"no class {unknown}; classes are {self.table.classes}")
        if not sources:
            return
        before = self.table.classes
        after = [c for c in before if c not in sources]
        if target not in after:
            after.insert(before.index(sources[0]), target)
        self._class_step(before, after, dict.fromkeys(sources, target))

    def _class_step(self, before: list[str], after: list[str], mapping: dict[str, str]) -> None:
        self._check_writable()
        label = self.table.obs["label"].astype(object)
        ids = label.index[label.isin(list(mapping))].tolist()
        step = _Step(classes_before=list(before), classes_after=list(after))
        if ids:
            step.changes.append(self._write(ids, [mapping[v] for v in label.loc[ids]], "user"))
        # the probe follows the relabelled cells incrementally (a relabel only recounts
        # kNN votes); until then the predictions carry the new names
        self._rename_predictions(mapping)
        self.table.set_classes(after)
        self._push(step)
        self.events.settings_changed.emit()

    def _rename_predictions(self, mapping: dict[str, str]) -> None:
        pred = self.table.obs["prediction"].astype(object).to_numpy()
        hit = np.flatnonzero(pd.Series(pred).isin(list(mapping)).to_numpy())
        if len(hit):
            conf = self.table.obs["confidence"].to_numpy(dtype=float)[hit]
            self.table.set_predictions(hit, [mapping[p] for p in pred[hit]], conf)

    # ------------------------------------------------------------------ labels
    def relabel(
        self,
        cells: Iterable[str] | Iterable[int] | np.ndarray,
        label: str | None,
        *,
        origin: str = "user",
    ) -> list[str]:
        """Give cells a curated label (``None`` removes it). One undo step.

        Parameters
        ----------
        cells : iterable of str (cell ids) or of int (row positions)
        label : str or None
            A class name (a new one is added to the class list), :data:`NOT_CLASSED`,
            or ``None`` to clear the label.
        origin : str
            ``label_origin`` written for the cells.

        Returns
        -------
        list of str
            Ids of the cells whose label changed (cells that had it already are skipped).
        """
        self._check_writable()
        ids = self._ids(cells)
        if label is not None:
            label = _check_name(label)
        current = self.table.obs["label"].astype(object).reindex(ids)
        changed = [c for c, v in zip(ids, current, strict=True) if _clean(v) != label]
        if not changed:
            return []
        step = _Step(changes=[self._write(changed, [label] * len(changed), origin)])
        self._push(step)
        return changed

    def _write(self, ids: list[str], labels: list[str | None], origin: str) -> _Change:
        obs = self.table.obs
        before = [_clean(v) for v in obs["label"].astype(object).reindex(ids)]
        before_origin = [_clean(v) for v in obs["label_origin"].astype(object).reindex(ids)]
        self.table.set_labels(ids, labels, origin=origin)
        return _Change(ids, before, before_origin, list(labels), origin)

    def _push(self, step: _Step) -> None:
        self._undo.append(step)
        self._redo.clear()
        self.events.history_changed.emit(self.can_undo, self.can_redo)

    @property
    def can_undo(self) -> bool:
        """Whether there is a step to undo."""
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        """Whether there is an undone step to redo."""
        return bool(self._redo)

    def undo(self) -> bool:
        """Undo the last label step (labels, origins and, for renames, the class list).

        The undo is itself written to the journal, so a reopened project shows the
        labels as they are now. Returns ``False`` when there is nothing to undo.
        """
        if not self._undo:
            return False
        self._check_writable()
        step = self._undo.pop()
        if step.classes_before is not None:
            # the old class names must exist before cells take them back
            self.table.set_classes(_union(step.classes_after, step.classes_before))
        for change in reversed(step.changes):
            self._restore(change)
        if step.classes_before is not None:
            self._drop_predictions(step.classes_before)
            self.table.set_classes(step.classes_before)
            self.events.settings_changed.emit()
        self._redo.append(step)
        self.events.history_changed.emit(self.can_undo, self.can_redo)
        return True

    def redo(self) -> bool:
        """Redo the last undone step. Returns ``False`` when there is nothing to redo."""
        if not self._redo:
            return False
        self._check_writable()
        step = self._redo.pop()
        if step.classes_after is not None:
            self.table.set_classes(_union(step.classes_before, step.classes_after))
        for change in step.changes:
            self.table.set_labels(change.ids, change.after, origin=change.origin)
        if step.classes_after is not None:
            self._drop_predictions(step.classes_after)
            self.table.set_classes(step.classes_after)
            self.events.settings_changed.emit()
        self._undo.append(step)
        self.events.history_changed.emit(self.can_undo, self.can_redo)
        return True

    def _drop_predictions(self, classes: Sequence[str]) -> None:
        # predictions naming a class that is going away are blanked until the probe's
        # next step, which re-predicts exactly those cells (their labelled neighbours
        # changed class); the class list cannot drop a name still in use
        pred = self.table.obs["prediction"]
        hit = np.flatnonzero((pred.notna() & ~pred.isin(list(classes))).to_numpy())
        if len(hit):
            self.table.set_predictions(hit, [None] * len(hit), np.full(len(hit), np.nan))
            self.events.predictions_changed.emit(hit.astype(np.int64))

    def _clear_predictions(self) -> None:
        # after an undone rename / merge the probe refits from scratch; until then the
        # old predictions would name classes that no longer exist
        n = self.table.n_cells
        if n and self.table.obs["prediction"].notna().any():
            self.table.set_predictions(None, [None] * n, np.full(n, np.nan))
            if "typicality" in self.table.obs:  # the guard judges predictions only
                self.table.set_column("typicality", np.full(n, np.nan))
                self.table.set_column("atypical", np.zeros(n, dtype=bool))
            self.events.predictions_changed.emit(np.arange(n, dtype=np.int64))

    def _restore(self, change: _Change) -> None:
        # label_origin is per cell: restore it by writing each origin's cells together
        groups: dict[str | None, list[int]] = {}
        for i, (lab, org) in enumerate(zip(change.before, change.before_origin, strict=True)):
            groups.setdefault(None if lab is None else (org or "user"), []).append(i)
        for org, idx in groups.items():
            self.table.set_labels(
                [change.ids[i] for i in idx],
                [change.before[i] for i in idx],
                origin=org or "user",
            )

    # ------------------------------------------------------------------- probe
    def _on_labels_changed(self, cell_ids: Sequence[str], _labels: Sequence[Any]) -> None:
        rows = self.table.positions(list(cell_ids))
        with self._lock:
            self._pending.update(dict.fromkeys(rows.tolist()))

    def _on_structure_changed(self, *_args: Any) -> None:
        self._needs_full = True

    def _on_embeddings_changed(self, key: str) -> None:
        from napari_hemofm.core.cells import EMBEDDING_KEY

        if key == EMBEDDING_KEY:
            self._needs_full = True

    @property
    def pending(self) -> bool:
        """Whether label changes (or settings) wait for the probe."""
        return self._needs_full or bool(self._pending)

    def _labels_array(self) -> np.ndarray:
        return np.array([_clean(v) for v in self.table.obs["label"].astype(object)], dtype=object)

    def retrain_step(self) -> Callable[[], Any]:
        """Take the pending changes and return the work that updates the probe.

        Call on the main thread (it reads the table); run the returned function in a
        worker (it touches only the probe, never the table); hand its result to
        :meth:`apply_result` on the main thread. Only one step may run at a time.
        Label changes made while it runs wait for the next step, so the newest
        labels always win.

        Returns
        -------
        callable
            ``fn() -> ProbeUpdate or None`` (``None`` when there is nothing to learn:
            no embeddings or fewer than two labelled classes).
        """
        X = self.table.embeddings
        with self._lock:
            rows = np.fromiter(self._pending, dtype=np.int64, count=len(self._pending))
            self._pending.clear()
        full = self._needs_full or self.probe is None or X is None
        self._needs_full = False
        if X is None:
            return lambda: None
        X, labels = self._with_reference(X, self._labels_array())
        if self._estimate_offsets(X, labels, full):
            full = True  # the cells moved: every neighbour list / fit changes
        X = self._aligned(X)
        k = self.effective_k(labels)
        probe = self.probe
        if probe is not None and self._kind == "knn" and probe.k != k:
            full = True  # only while few cells are labelled, when a full fit is cheap
        if full or probe is None or len(probe.prediction) != X.shape[0]:
            snap = _Snapshot(True, X, labels, rows, [], X.shape[0])
        else:
            snap = _Snapshot(False, None, None, rows, labels[rows].tolist(), X.shape[0])
        kind, metric = self._kind, self._metric
        lock, model = self._probe_lock, self.table.meta.get("model")

        def work() -> Any:
            from napari_hemofm.core.probe import LiveProbe

            if snap.full:
                named = {v for v in snap.labels if v is not None}
                if len(named) < 2:
                    return _NoProbe(snap.n_cells)
                new = LiveProbe(kind, k=k, metric=metric)
                new.model = model
                update = new.fit(snap.X, snap.labels)
                new.refresh_guard()  # typicality of every cell (out-of-domain guard)
                return (new, update)
            if len(snap.rows) == 0:
                return (probe, None)
            with lock:
                update = probe.update(snap.rows, snap.new_labels)
                probe.refresh_guard()  # only rows whose prediction or class moved
                return (probe, update)

        return work

    def _groups(self) -> np.ndarray:
        """The alignment group of each probe row (table cells, then reference cells)."""
        obs = self.table.obs
        col = self.align_by if self.align_by in obs else None
        g = obs[col].astype(str).to_numpy(dtype=object) if col else np.full(len(obs), "")
        if self.reference is not None:
            g = np.concatenate([g, np.full(self._n_reference, "\0reference", dtype=object)])
        return g

    def _estimate_offsets(self, X: np.ndarray, labels: np.ndarray, full: bool) -> bool:
        """Re-estimate the per-group offsets when due; True when they changed.

        Due on a full refit and whenever a group's labelled count doubles or halves
        since the last estimate (1, 2, 4, 8 ... labels): each estimate moves cells and
        costs a full refit, so a new lab triggers O(log n) of them, not one per label.
        """
        if self.align_by is None:
            changed = bool(self._offsets)
            self._offsets, self._offset_counts = {}, {}
            return changed
        from napari_hemofm.core.alignment import class_mean_offsets

        groups = self._groups()
        named = np.not_equal(labels, None)
        names, counts = np.unique(groups[named].astype(str), return_counts=True)
        now = dict(zip(names.tolist(), counts.tolist(), strict=True))
        due = full or not self._offset_counts
        for g in set(now) | set(self._offset_counts):
            before, after = self._offset_counts.get(g, 0), now.get(g, 0)
            if after != before and (before == 0 or after >= 2 * before or 2 * after <= before):
                due = True
        if not due:
            return False
        new = class_mean_offsets(X, labels, groups)
        self._offset_counts = now
        old, self._offsets = self._offsets, {g: v for g, v in new.items() if np.any(v)}
        return set(old) != set(self._offsets) or any(
            not np.array_equal(old[g], self._offsets[g]) for g in old
        )

    def _aligned(self, X: np.ndarray) -> np.ndarray:
        """``X`` (probe rows) moved by the current group offsets (``X`` itself if none)."""
        if not self._offsets:
            return X
        from napari_hemofm.core.alignment import align

        return align(X, self._groups(), self._offsets)

    def effective_k(self, labels: np.ndarray | None = None) -> int:
        """Neighbours the kNN probe uses now: ``k``, or fewer while few cells are labelled.

        With ``k = 20`` uniform votes and only a handful of labels per class, every cell's
        neighbourhood would hold most of the labelled cells and the vote would follow
        class sizes, not similarity. Until there are ``k`` labels per class on average
        the probe uses ``max(1, n_labelled // n_classes)`` neighbours; from then on it is
        DinoBloom's ``k``.
        """
        if labels is None:
            labels = self._labels_array()
        named = [v for v in labels if v is not None]
        n_classes = len(set(named))
        if n_classes == 0:
            return self._k
        return int(max(1, min(self._k, len(named) // n_classes)))

    def apply_result(self, result: Any) -> None:
        """Write a finished step's predictions into the table (main thread).

        Emits :attr:`ReviewEvents.predictions_changed` with the rows that changed.
        """
        if result is None:
            return
        if isinstance(result, _NoProbe):
            self.probe = None
            self._clear_predictions()
            return
        probe, update = result
        self.probe = probe
        n = self.table.n_cells
        if update is None or n + self._n_reference != len(probe.prediction):
            return  # cells were added meanwhile: the next (full) step covers them
        rows = np.asarray(update.rows, dtype=np.int64)
        if update.full:
            self.table.set_predictions(None, probe.prediction[:n], probe.confidence[:n])
            rows = np.arange(n, dtype=np.int64)
        elif len(rows):
            keep = rows < n
            rows = rows[keep]
            update = type(update)(rows, update.prediction[keep], update.confidence[keep], False)
        if len(rows) and not update.full:
            self.table.set_predictions(rows, update.prediction, update.confidence)
        self._write_guard(probe)
        if len(rows):
            self.events.predictions_changed.emit(rows)

    def _write_guard(self, probe: LiveProbe) -> None:
        """Write the guard's ``typicality`` / ``atypical`` columns (see :mod:`~.guard`)."""
        from napari_hemofm.core.guard import ATYPICAL_COLUMN, TYPICALITY_COLUMN

        n = self.table.n_cells
        if len(probe.typicality) < n:
            return
        p = probe.typicality[:n].astype(np.float64)
        flag = probe.atypical[:n].astype(bool)
        obs = self.table.obs
        if TYPICALITY_COLUMN in obs and ATYPICAL_COLUMN in obs:
            old_p = pd.to_numeric(obs[TYPICALITY_COLUMN], errors="coerce").to_numpy(float)
            same = (old_p == p) | (np.isnan(old_p) & np.isnan(p))
            if same.all() and np.array_equal(obs[ATYPICAL_COLUMN].to_numpy(bool), flag):
                return
        self.table.set_column(TYPICALITY_COLUMN, p)
        self.table.set_column(ATYPICAL_COLUMN, flag)

    def warnings(self, by: str = "batch") -> dict[str, str]:
        """Shift warnings of the groups whose cells differ from the probe's training cells.

        Parameters
        ----------
        by : str
            Any obs column (``"batch"``, ``"slide"``, ``"source"``).

        Returns
        -------
        dict of str to str
            group -> warning, shifted groups only (see
            :func:`~.guard.shift_warnings`; empty before the first retrain).
        """
        from napari_hemofm.core.guard import shift_warnings

        return shift_warnings(self.table, by)

    def _with_reference(self, X: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The probe's rows: the table's cells, then the reference cells (if any).

        Table row ``i`` is probe row ``i``, so pending rows and updates need no mapping.
        """
        if self.reference is None:
            return X, labels
        return (
            np.concatenate([X, self.reference[0]]),
            np.concatenate([labels, self.reference[1]]),
        )

    @property
    def _n_reference(self) -> int:
        return 0 if self.reference is None else len(self.reference[1])

    def use_reference(self, probe: LiveProbe | str | Path | None) -> int:
        """Learn also from the labelled cells of a saved probe (e.g. another lab's).

        The probe file's training cells (embeddings and labels, see
        :meth:`~.probe.LiveProbe.training_data`) join this table's labelled cells
        as voters / training data; they are never shown or counted. This is how a
        probe trained on one project predicts another, and then adapts as cells of
        the new project are labelled. ``None`` drops the reference.

        Parameters
        ----------
        probe : LiveProbe, str, Path or None
            A probe or a ``.npz`` file written by :meth:`LiveProbe.save`.

        Returns
        -------
        int
            Number of reference cells in use.

        Raises
        ------
        ValueError
            If the file is not a probe, its embedding dimension or backbone differs from
            this table's, or it was saved with the cosine metric while this review uses
            Euclidean distances.
        """
        from napari_hemofm.core.probe import LiveProbe

        if probe is None:
            self.reference = None
        else:
            name = "probe"
            if not isinstance(probe, LiveProbe):
                name = Path(probe).name
                probe = LiveProbe.load(probe)
            X_ref, labels = probe.training_data()
            X = self.table.embeddings
            if X is not None and X_ref.shape[1] != X.shape[1]:
                raise ValueError(
                    f"{name} holds {X_ref.shape[1]}-d embeddings; this project's are "
                    f"{X.shape[1]}-d: the probe comes from another backbone"
                )
            ours = self.table.meta.get("model")
            if probe.model and ours and probe.model != ours:
                raise ValueError(
                    f"{name} was trained on {probe.model} embeddings; these are {ours}"
                )
            if probe.metric == "cosine" and self._metric != "cosine":
                raise ValueError(
                    f"{name} stores unit-length (cosine) embeddings: set metric='cosine'"
                )
            self.reference = (X_ref, np.asarray(labels, dtype=object), name)
        self._needs_full = True
        self.events.settings_changed.emit()
        return self._n_reference

    def retrain(self) -> ProbeUpdate | None:
        """Bring the probe and every prediction up to date now (blocking).

        Incremental after the first fit: only the cells whose prediction can change
        are recomputed (see :class:`~.probe.LiveProbe`).
        """
        result = self.retrain_step()()
        self.apply_result(result)
        return None if result is None or isinstance(result, _NoProbe) else result[1]

    def metrics_step(self) -> Callable[[], dict[str, Any]]:
        """Snapshot the labels and return the work computing 5-fold CV metrics (slow)."""
        X = self.table.embeddings
        labels = self._labels_array()
        kind, metric, k = self._kind, self._metric, self.effective_k(labels)

        def work() -> dict[str, Any]:
            from napari_hemofm.core.evaluation import probe_metrics

            if X is None:
                return {"note": "no embeddings yet"}
            keep = np.array([v is not None for v in labels]) & np.isfinite(X).all(axis=1)
            if len({v for v in labels[keep]}) < 2:
                return {
                    "note": "label cells of at least two classes",
                    "n_labelled": int(keep.sum()),
                }
            out = probe_metrics(X[keep], labels[keep], kind=kind, k=k, metric=metric)
            out.setdefault("probe", kind)
            out.setdefault("k", k)
            return out

        return work

    def apply_metrics(self, metrics: dict[str, Any]) -> None:
        """Publish metrics computed by :meth:`metrics_step` (main thread)."""
        self.last_metrics = metrics
        self.events.metrics_changed.emit(metrics)

    def compute_metrics(self) -> dict[str, Any]:
        """5-fold cross-validated metrics of the probe on the labelled cells (blocking).

        Returns
        -------
        dict
            See :func:`~.evaluation.probe_metrics`: accuracy, balanced_accuracy,
            weighted_f1, confusion, classes, counts (higher is better for the scores).
        """
        metrics = self.metrics_step()()
        self.apply_metrics(metrics)
        return metrics

    # ----------------------------------------------------------------- reading
    def section_of(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The gallery section of cells.

        A curated label puts a cell in its class (or :data:`NOT_CLASSED`); otherwise a
        prediction with confidence >= :attr:`threshold` of a cell typical of the
        labelled cells puts it in the predicted class; a prediction below it or an
        atypical cell, :data:`UNIDENTIFIED` (the differential's rule,
        :func:`~.report.counted_cells`); no prediction, :data:`UNLABELLED`.

        Parameters
        ----------
        rows : ndarray of int, optional
            Row positions (default: all cells).

        Returns
        -------
        ndarray of object, shape (n,)
        """
        # the differential's rule (report.counted_labels), so the gallery and the
        # counts always agree; only a cell without any prediction reads differently
        return counted_labels(
            self.table, threshold=self._threshold, rows=rows, unpredicted=UNLABELLED
        )

    def sections(self) -> dict[str, np.ndarray]:
        """Row positions per gallery section, in display order.

        Returns
        -------
        dict of str to ndarray of int64
            Every class (hotkey order), then :data:`UNIDENTIFIED`, :data:`UNLABELLED`
            and :data:`NOT_CLASSED`; empty sections are included.
        """
        section = self.section_of()
        order = [*self.classes, UNIDENTIFIED, UNLABELLED, NOT_CLASSED]
        order += [s for s in pd.unique(section) if s not in order]
        return {name: np.flatnonzero(section == name).astype(np.int64) for name in order}

    def status(self) -> pd.DataFrame:
        """Where each cell is and why: one row per cell.

        Columns ``cell_id``, ``label``, ``prediction``, ``confidence``, ``section`` and
        ``reason``, which says why a cell is :data:`UNIDENTIFIED` (``"low confidence"``,
        ``"unlike the labelled cells"``), ``""`` otherwise.
        """
        frame = self.table.to_frame(["label", "prediction", "confidence"])
        frame["section"] = self.section_of()
        reason = counted_cells(self.table, threshold=self._threshold)["reason"].to_numpy()
        frame["reason"] = np.where(frame["section"].to_numpy() == UNIDENTIFIED, reason, "")
        return frame

    def least_sure_first(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Sort keys of cells, least sure first (the gallery's "Least sure first" order).

        Parameters
        ----------
        rows : ndarray of int, optional
            Row positions (default: all cells).

        Returns
        -------
        ndarray of float64, shape (n,)
            Ascending = shown first; see :func:`least_sure_keys`.
        """
        obs = self.table.obs
        if rows is not None:
            obs = obs.iloc[np.asarray(rows, dtype=np.int64)]
        label = obs["label"].astype(object).to_numpy()
        pred = obs["prediction"].astype(object).to_numpy()
        conf = pd.to_numeric(obs["confidence"], errors="coerce").to_numpy(dtype=np.float64)
        disagree = pd.notna(label) & pd.notna(pred) & (label != pred)
        return least_sure_keys(conf, disagree)

    def _features(self) -> tuple[np.ndarray, np.ndarray]:
        X = self.table.embeddings
        if X is None:
            raise ValueError("the cells have no embeddings yet: embed them first")
        return X, self._labels_array()

    def label_next(
        self,
        n: int = 20,
        *,
        seed: int = 0,
        strategy: Literal["uncertain", "hybrid", "typical"] | None = None,
        scope: dict[str, Any] | None = None,
    ) -> list[str]:
        """Unlabelled cells to label next: where the probe is least sure, spread over the map.

        ``strategy`` (default :attr:`queue_strategy`): ``"uncertain"`` draws from the
        least-sure cells; ``"hybrid"`` also from cells far from every labelled cell,
        which finds cells a probe is confidently wrong about in a new lab (measured in
        ``docs/probes.md``).

        ``scope`` (default :attr:`queue_scope`) limits the picks to some cells, e.g.
        ``{"batch": "lab B"}`` or ``{"slide": ["s1", "s2"]}`` (obs column -> value or
        list of values; all items must match). A scoped queue starts with one cell of
        every class the probe predicts in the scope (see :func:`~.queues.label_next`,
        ``cover``) and, unless ``strategy`` is given, uses ``"hybrid"``: a new lab's
        cells are where the probe is confidently wrong.

        Raises
        ------
        ValueError
            If ``scope`` names a column the cells do not have, or matches no cell.

        Returns
        -------
        list of str
            Up to ``n`` cell ids (see :func:`~.queues.label_next`).
        """
        from napari_hemofm.core.queues import label_next

        X, labels = self._with_reference(*self._features())
        X = self._aligned(X)
        scope = scope if scope is not None else self.queue_scope
        mask = self.scope_mask(scope) if scope else None
        if strategy is None and scope:
            strategy = "hybrid"
        if mask is not None and self.reference is not None:
            mask = np.concatenate([mask, np.zeros(self._n_reference, dtype=bool)])
        coords = self.table.adata.obsm.get("X_umap")
        if coords is not None and self.reference is not None:
            coords = np.concatenate([coords, np.full((self._n_reference, 2), np.nan)])
        with self._probe_lock:
            rows = label_next(
                self.probe,
                X,
                labels,
                n,
                seed=seed,
                coords=coords,
                strategy=strategy or self.queue_strategy,
                scope=mask,
            )
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[rows < self.table.n_cells]  # reference cells are labelled anyway
        return self.table.cell_ids[np.asarray(rows, dtype=np.int64)].tolist()

    def scope_mask(self, scope: dict[str, Any]) -> np.ndarray:
        """Which cells a scope (obs column -> value or list of values) holds.

        Returns
        -------
        ndarray of shape (n_cells,), bool

        Raises
        ------
        ValueError
            If a column is missing or no cell matches.
        """
        obs = self.table.obs
        mask = np.ones(len(obs), dtype=bool)
        for col, value in scope.items():
            if col not in obs:
                raise ValueError(f"no column {col!r} to scope by; columns are {list(obs.columns)}")
            values = [value] if isinstance(value, str) or np.isscalar(value) else list(value)
            mask &= obs[col].astype(str).isin([str(v) for v in values]).to_numpy()
        if not mask.any():
            raise ValueError(f"no cell matches the scope {scope}")
        return mask

    def suspects(self, n: int = 20) -> list[str]:
        """Labelled cells whose cross-validated prediction disagrees with their label.

        Returns
        -------
        list of str
            Up to ``n`` cell ids, most confident disagreement first (see
            :func:`~.queues.suspect_labels`).
        """
        from napari_hemofm.core.queues import suspect_labels

        X, labels = self._features()
        k = self.effective_k(labels)
        found = suspect_labels(X, labels, n, kind=self._kind, k=k, metric=self._metric)
        return self.table.cell_ids[found["row"].to_numpy(dtype=np.int64)].tolist()

    def differential(self, by: GroupBy = DEFAULT_GROUP_BY) -> pd.DataFrame:
        """Long-format differential counts per group (see :func:`~.report.differential_counts`).

        ``by`` is any ``obs`` column (``source``, ``batch``, ``slide``, ...).
        """
        return differential_counts(self.table, by, threshold=self._threshold)

    def differential_summary(
        self, by: GroupBy = DEFAULT_GROUP_BY, target: int = DEFAULT_TARGET
    ) -> pd.DataFrame:
        """Per-group progress, warnings and sign-off state.

        See :func:`~.report.differential_summary`.
        """
        return differential_summary(self.table, by, threshold=self._threshold, target=target)

    def verify_sign_off(
        self, group: str, by: GroupBy = DEFAULT_GROUP_BY, *, user: str | None = None
    ) -> dict[str, Any]:
        """A second reader (another user) verifies a group's sign-off.

        See :func:`~.report.verify_sign_off`.
        """
        record = verify_sign_off(self.table, group, by, user=user, threshold=self._threshold)
        self.events.settings_changed.emit()
        return record

    def export_report(
        self,
        path: str | Path,
        by: GroupBy = DEFAULT_GROUP_BY,
        *,
        target: int = DEFAULT_TARGET,
        **kwargs: Any,
    ) -> Path:
        """Write the printable HTML report (see :func:`~.report_html.write_report_html`)."""
        from napari_hemofm.core.report_html import write_report_html

        return write_report_html(
            self.table, path, by=by, threshold=self._threshold, target=target, **kwargs
        )

    def sign_off(
        self,
        group: str,
        by: GroupBy = DEFAULT_GROUP_BY,
        *,
        user: str | None = None,
        target: int = DEFAULT_TARGET,
        override: str | None = None,
    ) -> dict[str, Any]:
        """Sign off a group's differential (see :func:`~.report.sign_off` for the rules).

        ``override`` is the written reason for signing despite a shift warning.
        """
        record = sign_off(
            self.table,
            group,
            by,
            user=user,
            threshold=self._threshold,
            target=target,
            override=override,
        )
        self.events.settings_changed.emit()
        return record

    # ------------------------------------------------------------------ helpers
    def _ids(self, cells: Iterable[str] | Iterable[int] | np.ndarray) -> list[str]:
        arr = np.asarray(cells if isinstance(cells, np.ndarray) else list(cells))
        if arr.size == 0:
            return []
        if arr.dtype.kind in "iu":
            return self.table.cell_ids[arr.astype(np.int64)].tolist()
        ids = [str(c) for c in arr]
        self.table.positions(ids)  # KeyError naming unknown ids
        return list(dict.fromkeys(ids))


def least_sure_keys(confidence: np.ndarray, disagree: np.ndarray) -> np.ndarray:
    """Sort keys of the "Least sure first" order (ascending = shown first).

    Parameters
    ----------
    confidence : ndarray of float, shape (n,)
        The probe's confidence in its prediction (NaN: no prediction).
    disagree : ndarray of bool, shape (n,)
        The cell has a curated label and the probe predicts another class.

    Returns
    -------
    ndarray of float64, shape (n,)
        The confidence; ``1 - confidence`` for a curated cell the probe puts in another
        class (the surer the probe, the more it needs a look); 2 (last) without a
        prediction.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    key = np.where(np.isfinite(conf), conf, 2.0)
    key = np.where(np.asarray(disagree, dtype=bool), 1.0 - np.nan_to_num(conf, nan=0.0), key)
    return key.astype(np.float64)


class _NoProbe:
    """Result of a retrain with fewer than two labelled classes: no predictions."""

    def __init__(self, n_cells: int) -> None:
        self.n_cells = n_cells


def _default_align(kind: str) -> str | None:
    """The default :attr:`Review.align_by` of a probe kind."""
    return "batch" if kind == "knn" else None


def _clean(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _check_name(name: str) -> str:
    text = _clean(name)
    if text is None:
        raise ValueError("a class name cannot be empty")
    if text in (UNIDENTIFIED, UNLABELLED):
        raise ValueError(f"{text!r} is a gallery section, not a class")
    return text


def _union(first: Sequence[str] | None, second: Sequence[str] | None) -> list[str]:
    return list(dict.fromkeys([*(first or []), *(second or [])]))

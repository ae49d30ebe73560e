"""The labelling loop: relabel cells, undo / redo, a live probe, queues and counts.

:class:`Review` is the Python API of what the napari Review widget does, and the
widget only calls it. It wraps a :class:`~.cells.CellTable`:

- every :meth:`Review.relabel` is one undoable step, written through
  :meth:`CellTable.set_labels` (so the label journal of a project file records it
  before it is applied);
- the probe (:class:`~.classify.LiveProbe`, kNN or linear) follows every label
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
    NOT_CLASSED,
    THRESHOLD_KEY,
    UNIDENTIFIED,
    UNLABELLED,
    GroupBy,
    counted_labels,
    differential_counts,
    differential_summary,
    sign_off,
)

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.classify import LiveProbe, ProbeUpdate

__all__ = ["NOT_CLASSED", "UNIDENTIFIED", "UNLABELLED", "Review", "ReviewEvents"]

ProbeKind = Literal["knn", "linear"]
Metric = Literal["euclidean", "cosine"]


class ReviewEvents(SignalGroup):
    """Signals of a :class:`Review`."""

    history_changed = Signal(bool, bool)
    """``(can_undo, can_redo)`` after a relabel, undo or redo."""
    predictions_changed = Signal(object)
    """``(rows,)``: int64 row positions whose prediction / confidence changed."""
    metrics_changed = Signal(object)
    """``(metrics,)``: the dict of :func:`~.classify.probe_metrics` (``{}`` when none)."""
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
        default: the threshold saved with the project, else 0.5.
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
        stored = table.meta.get(THRESHOLD_KEY)
        self._threshold = float(threshold if threshold is not None else (stored or 0.5))
        self.probe: LiveProbe | None = None
        #: Labelled cells from elsewhere (a saved probe's training set) that the probe
        #: learns from besides this table's labels: ``(X, labels, name)`` or None.
        self.reference: tuple[np.ndarray, np.ndarray, str] | None = None
        #: How :meth:`label_next` picks cells (``"uncertain"`` or ``"hybrid"``, see
        #: :func:`~.classify.label_next`).
        self.queue_strategy: Literal["uncertain", "hybrid"] = "uncertain"
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
    def open(cls, path: str | Path, **kwargs: Any) -> Review:
        """Open a project file (its label journal is replayed) for review.

        Parameters
        ----------
        path : str or Path
            An ``.h5ad`` project written by ``hemofm embed`` or the napari plugin.
        **kwargs
            Passed to :class:`Review`.
        """
        from napari_hemofm.core.io import load_project

        return cls(load_project(path), **kwargs)

    def save(self, path: str | Path | None = None) -> Path:
        """Save the project (the journal is emptied once the file holds every label).

        Parameters
        ----------
        path : str or Path, optional
            Target ``.h5ad``; default: the file the project was opened from.
        """
        from napari_hemofm.core.io import save_project

        if path is None:
            if self.table.journal is None:
                raise ValueError("this table was never saved: give a path")
            path = self.table.journal.path.with_name(
                self.table.journal.path.name.replace(".labels.jsonl", ".h5ad")
            )
        return save_project(self.table, path)

    def close(self) -> None:
        """Stop following the table's signals."""
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
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1]; got {value}")
        self._threshold = value
        self.table.update_meta(**{THRESHOLD_KEY: value})
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

    def add_class(self, name: str) -> None:
        """Append a class to the list (it gets the next number key)."""
        name = _check_name(name)
        if name in self.table.classes:
            raise ValueError(f"there is already a class {name!r}")
        self.table.set_classes([*self.table.classes, name])
        self.events.settings_changed.emit()

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
            from napari_hemofm.core.classify import LiveProbe

            if snap.full:
                named = {v for v in snap.labels if v is not None}
                if len(named) < 2:
                    return _NoProbe(snap.n_cells)
                new = LiveProbe(kind, k=k, metric=metric)
                new.model = model
                return (new, new.fit(snap.X, snap.labels))
            if len(snap.rows) == 0:
                return (probe, None)
            with lock:
                return (probe, probe.update(snap.rows, snap.new_labels))

        return work

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
        if len(rows):
            self.events.predictions_changed.emit(rows)

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
        :meth:`~.classify.LiveProbe.training_data`) join this table's labelled cells
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
        from napari_hemofm.core.classify import LiveProbe

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
        are recomputed (see :class:`~.classify.LiveProbe`).
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
            from napari_hemofm.core.classify import probe_metrics

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
            See :func:`~.classify.probe_metrics`: accuracy, balanced_accuracy,
            weighted_f1, confusion, classes, counts (higher is better for the scores).
        """
        metrics = self.metrics_step()()
        self.apply_metrics(metrics)
        return metrics

    # ----------------------------------------------------------------- reading
    def section_of(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The gallery section of cells.

        A curated label puts a cell in its class (or :data:`NOT_CLASSED`); otherwise a
        prediction with confidence >= :attr:`threshold` puts it in the predicted
        class; a prediction below it, :data:`UNIDENTIFIED`; no prediction,
        :data:`UNLABELLED`.

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
        """Per cell: ``cell_id``, ``label``, ``prediction``, ``confidence``, ``section``."""
        frame = self.table.to_frame(["label", "prediction", "confidence"])
        frame["section"] = self.section_of()
        return frame

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
        strategy: Literal["uncertain", "hybrid"] | None = None,
    ) -> list[str]:
        """Unlabelled cells to label next: where the probe is least sure, spread over the map.

        ``strategy`` (default :attr:`queue_strategy`): ``"uncertain"`` draws from the
        least-sure cells; ``"hybrid"`` also from cells far from every labelled cell,
        which finds cells a probe is confidently wrong about in a new lab (measured in
        ``docs/probes.md``).

        Returns
        -------
        list of str
            Up to ``n`` cell ids (see :func:`~.classify.label_next`).
        """
        from napari_hemofm.core.classify import label_next

        X, labels = self._with_reference(*self._features())
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
            )
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[rows < self.table.n_cells]  # reference cells are labelled anyway
        return self.table.cell_ids[np.asarray(rows, dtype=np.int64)].tolist()

    def suspects(self, n: int = 20) -> list[str]:
        """Labelled cells whose cross-validated prediction disagrees with their label.

        Returns
        -------
        list of str
            Up to ``n`` cell ids, most confident disagreement first (see
            :func:`~.classify.suspect_labels`).
        """
        from napari_hemofm.core.classify import suspect_labels

        X, labels = self._features()
        k = self.effective_k(labels)
        found = suspect_labels(X, labels, n, kind=self._kind, k=k, metric=self._metric)
        return self.table.cell_ids[found["row"].to_numpy(dtype=np.int64)].tolist()

    def differential(self, by: GroupBy = "source") -> pd.DataFrame:
        """Long-format differential counts per group (see :func:`~.report.differential_counts`)."""
        return differential_counts(self.table, by, threshold=self._threshold)

    def differential_summary(self, by: GroupBy = "source", target: int = 100) -> pd.DataFrame:
        """Per-group progress and sign-off state (see :func:`~.report.differential_summary`)."""
        return differential_summary(self.table, by, threshold=self._threshold, target=target)

    def sign_off(
        self, group: str, by: GroupBy = "source", *, user: str | None = None, target: int = 100
    ) -> dict[str, Any]:
        """Sign off a group's differential (refused while it has Unidentified cells)."""
        record = sign_off(
            self.table, group, by, user=user, threshold=self._threshold, target=target
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


class _NoProbe:
    """Result of a retrain with fewer than two labelled classes: no predictions."""

    def __init__(self, n_cells: int) -> None:
        self.n_cells = n_cells


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

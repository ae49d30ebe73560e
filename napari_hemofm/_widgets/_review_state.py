"""One :class:`~napari_hemofm.core.review.Review` per viewer, and the worker that retrains it.

Every way of relabelling (the Review gallery, a number key on a ``cells`` layer, a key
in the Cell map after a lasso) calls :func:`get_review` and ``review.relabel``. The
:class:`Retrainer` follows the table's label changes whoever made them: it waits a
moment (so a burst of key presses is one retraining), snapshots the pending changes on
the main thread, runs the probe update in a worker and writes the predictions back on
the main thread. While a step runs, new changes wait for the next one: the newest
labels always win. Cross-validated metrics follow in a second, slower worker.

What it may touch: the review and its table (on the main thread only) and the
bindings of number keys on the viewer's ``cells`` layers.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QObject, QTimer, Signal

from napari_hemofm._widgets._session import get_session
from napari_hemofm._widgets._workers import start_worker
from napari_hemofm.core.journal import ProjectReadOnlyError
from napari_hemofm.core.review import Review

if TYPE_CHECKING:
    import napari

    from napari_hemofm.core.cells import CellTable

#: Wait after the last label change before retraining (ms): a burst of keys is one step.
RETRAIN_DELAY_MS = 120
#: Wait after the last retraining before recomputing cross-validated metrics (ms).
METRICS_DELAY_MS = 800


class Retrainer(QObject):
    """Keeps one viewer's :class:`Review` and retrains its probe after label changes.

    Parameters
    ----------
    viewer : napari.viewer.Viewer

    Attributes
    ----------
    busy_changed : Signal(bool)
        True while a retraining step runs.
    review_replaced : Signal(object)
        A new :class:`Review` (the session's table was replaced).
    """

    busy_changed = Signal(bool)
    review_replaced = Signal(object)

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer_ref = weakref.ref(viewer)
        self.session = get_session(viewer)
        self.review = Review(self.session.table)
        self._worker: Any = None
        self._metrics_worker: Any = None
        self._again = False
        self.errors: list[str] = []
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(RETRAIN_DELAY_MS)
        self._timer.timeout.connect(self._start)
        self._metrics_timer = QTimer(self)
        self._metrics_timer.setSingleShot(True)
        self._metrics_timer.setInterval(METRICS_DELAY_MS)
        self._metrics_timer.timeout.connect(self._start_metrics)
        self._connect(self.review)
        self.session.events.table_replaced.connect(self._on_table_replaced)
        if self.session.table.embeddings is not None:
            self.schedule()

    # ----------------------------------------------------------------- state
    @property
    def busy(self) -> bool:
        """Whether a retraining or metrics worker runs or is scheduled."""
        return (
            self._worker is not None
            or self._metrics_worker is not None
            or self._timer.isActive()
            or self._metrics_timer.isActive()
        )

    @property
    def retraining(self) -> bool:
        """Whether predictions are being brought up to date (not counting metrics)."""
        return self._worker is not None or self._timer.isActive()

    def schedule(self) -> None:
        """Retrain after :data:`RETRAIN_DELAY_MS` (restarting the wait)."""
        self._timer.start()

    def _connect(self, review: Review) -> None:
        ev = review.table.events
        ev.labels_changed.connect(self._on_change)
        ev.cells_added.connect(self._on_change)
        ev.embeddings_changed.connect(self._on_change)
        review.events.settings_changed.connect(self._on_change)

    def _disconnect(self, review: Review) -> None:
        ev = review.table.events
        for sig in (ev.labels_changed, ev.cells_added, ev.embeddings_changed):
            try:
                sig.disconnect(self._on_change)
            except Exception:
                pass
        try:
            review.events.settings_changed.disconnect(self._on_change)
        except Exception:
            pass
        review.close()

    def _on_table_replaced(self, table: CellTable) -> None:
        self._disconnect(self.review)
        self.review = Review(table)
        self._connect(self.review)
        self.review_replaced.emit(self.review)
        self.schedule()

    def _on_change(self, *_args: Any) -> None:
        if self.review.pending:
            self.schedule()

    # ------------------------------------------------------------- retrain
    def _start(self) -> None:
        if self._worker is not None:
            self._again = True
            return
        review = self.review
        if not review.pending:
            return
        from napari.qt.threading import create_worker

        work = review.retrain_step()
        worker = create_worker(work, _start_thread=False)
        worker.returned.connect(lambda result, r=review: self._on_returned(r, result))
        worker.errored.connect(self._on_errored)
        worker.finished.connect(lambda w=worker: self._on_finished(w))
        self._worker = worker
        self.busy_changed.emit(True)
        start_worker(worker)

    def _on_returned(self, review: Review, result: Any) -> None:
        if review is self.review:
            review.apply_result(result)

    def _on_errored(self, exc: Exception) -> None:
        self.errors.append(f"{type(exc).__name__}: {exc}")
        # the probe state is unknown now: start from scratch next time
        self.review._needs_full = True

    def _on_finished(self, worker: Any) -> None:
        if worker is not self._worker:
            return
        self._worker = None
        if self._again or self.review.pending:
            self._again = False
            if self.review.pending:
                self._timer.start()
        self._metrics_timer.start()
        self.busy_changed.emit(self.busy)

    # ------------------------------------------------------------- metrics
    def _start_metrics(self) -> None:
        if self._metrics_worker is not None or self.retraining:
            self._metrics_timer.start()
            return
        from napari.qt.threading import create_worker

        review = self.review
        worker = create_worker(review.metrics_step(), _start_thread=False)
        worker.returned.connect(lambda m, r=review: r is self.review and r.apply_metrics(m))
        worker.errored.connect(
            lambda exc, r=review: r.apply_metrics({"note": f"metrics failed: {exc}"})
        )
        worker.finished.connect(lambda w=worker: self._on_metrics_finished(w))
        self._metrics_worker = worker
        start_worker(worker)

    def _on_metrics_finished(self, worker: Any) -> None:
        if worker is self._metrics_worker:
            self._metrics_worker = None
        self.busy_changed.emit(self.busy)

    def wait_idle(self, timeout: int = 30_000) -> None:
        """Block until retraining and metrics are done (for tests and scripts).

        Parameters
        ----------
        timeout : int
            Milliseconds to wait before :class:`TimeoutError`.
        """
        from qtpy.QtCore import QCoreApplication, QElapsedTimer, QThread

        clock = QElapsedTimer()
        clock.start()
        while self.busy:
            if clock.elapsed() > timeout:
                raise TimeoutError("the probe did not finish retraining in time")
            QCoreApplication.processEvents()
            QThread.msleep(10)  # let the worker threads run instead of spinning

    # ----------------------------------------------------------- relabelling
    def relabel_selection_key(self, key: int) -> list[str]:
        """Relabel the session's selected cells with the class of number key ``key``."""
        label = self.review.class_for_key(key)
        rows = self.session.selected
        if label is None or len(rows) == 0:
            return []
        return self.review.relabel(rows, label)

    def clear_selection_labels(self) -> list[str]:
        """Remove the curated label of the selected cells."""
        rows = self.session.selected
        return self.review.relabel(rows, None) if len(rows) else []


_STATES: weakref.WeakKeyDictionary[Any, Retrainer] = weakref.WeakKeyDictionary()


def get_retrainer(viewer: napari.viewer.Viewer) -> Retrainer:
    """The :class:`Retrainer` of ``viewer`` (created on first use)."""
    state = _STATES.get(viewer)
    if state is None:
        state = Retrainer(viewer)
        _STATES[viewer] = state
    return state


def get_review(viewer: napari.viewer.Viewer) -> Review:
    """The :class:`Review` of ``viewer``'s cell table (its probe retrains by itself)."""
    return get_retrainer(viewer).review


def say_read_only(viewer: napari.viewer.Viewer, exc: ProjectReadOnlyError) -> None:
    """Show why labels cannot change in the viewer's status bar (not an error pop-up)."""
    viewer.status = str(exc) or "The project is open read-only: labels cannot be changed."


def relabel_quietly(viewer: napari.viewer.Viewer, rows: Any, label: str | None) -> list[str]:
    """``review.relabel(rows, label)``; on a read-only project, a status-bar line instead.

    Keys and tools that relabel (number keys on ``cells`` layers and maps, the map's
    lasso) go through here, so a read-only project never raises into napari.
    Returns the ids whose label changed (none on a read-only project).
    """
    try:
        return get_review(viewer).relabel(rows, label)
    except ProjectReadOnlyError as exc:
        say_read_only(viewer, exc)
        return []


def label_selection_by_key(viewer: napari.viewer.Viewer, key: int) -> list[str]:
    """What a number key does in any view: 1-9 a class, 0 Not classed, -1 clear the label.

    Applies to the session's selected cells; returns the ids whose label changed. On a
    read-only project nothing changes and the status bar says why.
    """
    state = get_retrainer(viewer)
    try:
        if key < 0:
            return state.clear_selection_labels()
        return state.relabel_selection_key(key)
    except ProjectReadOnlyError as exc:
        say_read_only(viewer, exc)
        return []


def undo_or_redo(viewer: napari.viewer.Viewer, redo: bool = False) -> bool:
    """Ctrl+Z (``redo=False``) or Ctrl+Shift+Z in any view; True if something changed.

    On a read-only project nothing changes and the status bar says why.
    """
    review = get_review(viewer)
    try:
        return review.redo() if redo else review.undo()
    except ProjectReadOnlyError as exc:
        say_read_only(viewer, exc)
        return False


def bind_review_keys(viewer: napari.viewer.Viewer, layer: Any) -> None:
    """Bind number keys, Backspace and undo / redo on a ``cells`` Points layer.

    With a ``cells`` layer active, keys 1-9 give the selected cells the class of that
    key, 0 marks them "Not classed", Backspace / Delete clears their label (the
    points themselves are a mirror of the table and are never deleted), Ctrl+Z /
    Ctrl+Shift+Z undo and redo. This replaces the Points layer's own number-key mode
    shortcuts on these layers (P, S and Z still switch modes).
    """
    ref = weakref.ref(viewer)  # the layer's bindings must not keep the viewer alive

    def on_key(key: int):
        def press(_layer: Any) -> None:
            if (v := ref()) is not None:
                label_selection_by_key(v, key)

        return press

    def on_history(redo: bool):
        def press(_layer: Any) -> None:
            if (v := ref()) is not None:
                undo_or_redo(v, redo)

        return press

    for key in range(10):
        layer.bind_key(str(key), on_key(key), overwrite=True)
    for name in ("Backspace", "Delete"):
        layer.bind_key(name, on_key(-1), overwrite=True)
    layer.bind_key("Control-Z", on_history(False), overwrite=True)
    layer.bind_key("Control-Shift-Z", on_history(True), overwrite=True)

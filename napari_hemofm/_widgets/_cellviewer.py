"""The "Cell viewer" dock: one selected cell up close, and the cells most like it.

Follows the viewer's shared selection (the first selected cell) and shows:

- the cell's crop at full resolution and the field of the smear around it (its box
  outlined), cut by :func:`~napari_hemofm.core.cellview.cell_field` in a worker;
- its facts: label and where it came from, prediction and confidence, typicality
  (``obs["typicality"]`` when the guard computed it), batch, slide and source;
- its label history (:func:`napari_hemofm.core.audit.cell_history`: who changed the label
  from what to what, and when);
- "Cells like this": the eight nearest cells in the embedding
  (:func:`~napari_hemofm.core.reduce.similar_cells`); a click selects that cell everywhere
  (origin ``"cellviewer"``).

What it may touch: the session's selection. It never writes the cell table.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from qtpy.QtCore import QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPixmap
from qtpy.QtWidgets import QGridLayout, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from napari_hemofm._widgets._colors import html_escape
from napari_hemofm._widgets._docking import ElidedLabel, setup_dock
from napari_hemofm._widgets._session import get_session
from napari_hemofm._widgets._signals import (
    MainThreadBridge,
    disconnect_all,
    disconnect_groups,
    on_main_thread,
)
from napari_hemofm._widgets._thumbstrip import ThumbnailStrip, placeholder_pixmap, thumbnail_pixmap
from napari_hemofm._widgets._workers import Lifeline, start_worker

if TYPE_CHECKING:
    import napari

    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.cellview import CellField
    from napari_hemofm.core.session import CellSession

#: Cells shown under "Cells like this".
N_SIMILAR = 8
#: Largest side of the crop and field images in the dock, in pixels.
VIEW_SIZE = 200
#: Origin of selections made here.
ORIGIN = "cellviewer"


class CellViewerWidget(QWidget):
    """The selected cell at full resolution, its field, history, and similar cells.

    Parameters
    ----------
    viewer : napari.viewer.Viewer

    Attributes
    ----------
    cell_id : str or None
        The cell on show.
    title : ElidedLabel
        Its id (full text in the tooltip).
    crop_view, field_view : QLabel
        The crop at full resolution (scaled down only when larger than the dock) and the
        field around it with the cell's box outlined.
    facts : QLabel
        Label, prediction, confidence, typicality, batch, slide, source.
    history : QLabel
        The label history, newest last.
    similar : ThumbnailStrip
        "Cells like this": click one to select it.
    similar_rows : ndarray of int
        Their table rows, most similar first.
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self.session: CellSession = get_session(viewer)
        self.cell_id: str | None = None
        self.similar_rows = np.zeros(0, np.int64)
        self.field: CellField | None = None
        self._field_worker = None
        self._slots: dict[str, list[tuple[Any, Callable]]] = {"session": [], "table": []}
        self._bridge = MainThreadBridge(self)
        self._lifeline = Lifeline(self)
        self._build_ui()
        setup_dock(self)
        ev = self.session.events
        self._slots["session"] = [
            (ev.selection_changed, self._on_selection_changed),
            (ev.table_replaced, self._on_table_replaced),
        ]
        for signal, slot in self._slots["session"]:
            signal.connect(slot)
        self.destroyed.connect(functools.partial(disconnect_groups, self._slots))
        self._attach_table(self.session.table)

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        self.title = ElidedLabel("No cell selected", elide=Qt.TextElideMode.ElideMiddle)
        font = self.title.font()
        font.setBold(True)
        self.title.setFont(font)
        self.crop_view = QLabel()
        self.field_view = QLabel()
        for view in (self.crop_view, self.field_view):
            view.setAlignment(Qt.AlignmentFlag.AlignCenter)
            view.setMinimumSize(96, 96)
            view.setPixmap(placeholder_pixmap(96))
        self.crop_view.setToolTip("The cell at full resolution")
        self.field_view.setToolTip("The smear around the cell (its box outlined)")
        images = QHBoxLayout()
        images.addWidget(self.crop_view, 1)
        images.addWidget(self.field_view, 1)
        captions = QGridLayout()
        captions.addWidget(QLabel("Cell"), 0, 0, Qt.AlignmentFlag.AlignCenter)
        captions.addWidget(QLabel("Field"), 0, 1, Qt.AlignmentFlag.AlignCenter)

        self.facts = QLabel("")
        self.facts.setTextFormat(Qt.TextFormat.RichText)
        self.facts.setWordWrap(True)
        self.history = QLabel("")
        self.history.setTextFormat(Qt.TextFormat.RichText)
        self.history.setWordWrap(True)
        self.similar = ThumbnailStrip(lambda: self.session.thumbnails, max_cells=N_SIMILAR)
        self.similar.caption.setText("Cells like this")
        self.similar.cell_clicked.connect(self.select_row)

        layout = QVBoxLayout(self)
        layout.addWidget(self.title)
        layout.addLayout(images)
        layout.addLayout(captions)
        layout.addWidget(self.facts)
        layout.addWidget(QLabel("<b>Label history</b>"))
        layout.addWidget(self.history)
        layout.addWidget(self.similar)
        layout.addStretch(1)

    # -------------------------------------------------------------- public
    @property
    def table(self) -> CellTable:
        """The session's cell table."""
        return self.session.table

    @property
    def busy(self) -> bool:
        """True while the field or the similar cells' thumbnails load."""
        return self._field_worker is not None or self.similar.loading

    def show_cell(self, row: int | None) -> None:
        """Show cell ``row`` of the table (None: nothing)."""
        table = self.table
        if row is None or row < 0 or row >= table.n_cells:
            self.cell_id = None
            self.title.setText("No cell selected")
            self.facts.setText("Select a cell in the map, the gallery or an image.")
            self.history.setText("")
            for view in (self.crop_view, self.field_view):
                view.setPixmap(placeholder_pixmap(96))
            self.similar_rows = np.zeros(0, np.int64)
            self.similar.set_cells(self.similar_rows, [], 0)
            self.similar.caption.setText("Cells like this")
            return
        row = int(row)
        cell_id = str(table.cell_ids[row])
        self.cell_id = cell_id
        self.title.setText(cell_id)
        obs = table.obs.iloc[row]
        self.facts.setText(_facts(obs))
        self.history.setText(_history(table, cell_id, obs))
        self._show_similar(row)
        self._load_field(cell_id, obs)

    def select_row(self, row: int) -> None:
        """Select cell ``row`` in the shared session (a click on a similar cell)."""
        self.session.select([int(row)], origin=ORIGIN)

    # ------------------------------------------------------------- helpers
    def _show_similar(self, row: int) -> None:
        from napari_hemofm.core.reduce import similar_cells

        X = self.table.embeddings
        rows = np.zeros(0, np.int64)
        caption = "Cells like this: embed the cells first"
        if X is not None and len(X) == self.table.n_cells:
            try:
                rows = similar_cells(X, row, N_SIMILAR)
                caption = f"Cells like this ({len(rows)} nearest in the embedding)"
            except ValueError as exc:
                caption = f"Cells like this: {exc}"
        self.similar_rows = rows
        self.similar.set_cells(rows, self.table.cell_ids[rows].tolist(), len(rows))
        self.similar.caption.setText(caption)

    def _load_field(self, cell_id: str, obs: pd.Series) -> None:
        from napari.qt.threading import create_worker

        from napari_hemofm.core.cellview import cell_field

        for view in (self.crop_view, self.field_view):
            view.setPixmap(placeholder_pixmap(96))
        self.field = None
        if self._field_worker is not None:
            self._field_worker.quit()
        box = tuple(int(obs[c]) for c in ("x0", "y0", "x1", "y1"))
        source = str(obs["source"])
        thumbnails = self.session.thumbnails

        def work() -> Any:
            from napari_hemofm.core.io import ImageReadError

            try:
                return cell_field(thumbnails.source_image(source), box)
            except (ImageReadError, OSError, ValueError) as exc:
                return f"cannot show the image: {exc}"  # one clear line, no traceback

        worker = create_worker(work, _start_thread=False)
        wrap = self._lifeline.wrap
        worker.returned.connect(wrap(functools.partial(self._on_field, cell_id)))
        worker.errored.connect(wrap(functools.partial(self._on_field_error, cell_id)))
        worker.finished.connect(wrap(functools.partial(self._on_field_finished, worker)))
        self._lifeline.track(worker)
        self._field_worker = worker
        start_worker(worker)

    def _on_field(self, cell_id: str, field: CellField | str) -> None:
        if cell_id != self.cell_id:
            return
        if isinstance(field, str):
            self._on_field_error(cell_id, field)
            return
        self.field = field
        crop = field.crop
        side = max(crop.shape[:2])
        self.crop_view.setPixmap(thumbnail_pixmap(crop, side if side <= VIEW_SIZE else VIEW_SIZE))
        self.field_view.setPixmap(_outlined(field, VIEW_SIZE))

    def _on_field_error(self, cell_id: str, exc: Exception | str) -> None:
        if cell_id == self.cell_id:
            self.facts.setText(self.facts.text() + f"<br><i>image: {html_escape(exc)}</i>")

    def _on_field_finished(self, worker) -> None:
        if worker is self._field_worker:
            self._field_worker = None

    # --------------------------------------------------------------- events
    def _attach_table(self, table: CellTable) -> None:
        disconnect_all(self._slots["table"])
        ev = table.events
        self._slots["table"] = [
            (ev.labels_changed, self._on_cell_changed),
            (ev.columns_changed, self._on_columns_changed),
        ]
        for signal, slot in self._slots["table"]:
            signal.connect(slot)
        selected = self.session.selected
        self.show_cell(int(selected[0]) if len(selected) else None)

    def _on_table_replaced(self, table: CellTable) -> None:
        if on_main_thread(self._bridge, self._on_table_replaced, table):
            self._attach_table(table)

    def _on_selection_changed(self, rows: np.ndarray, origin: str) -> None:
        if not on_main_thread(self._bridge, self._on_selection_changed, rows, origin):
            return
        rows = np.asarray(rows, np.int64)
        self.show_cell(int(rows[0]) if len(rows) else None)

    def _on_cell_changed(self, cell_ids: Sequence[str], _labels: Sequence[Any]) -> None:
        if not on_main_thread(self._bridge, self._on_cell_changed, cell_ids, _labels):
            return
        if self.cell_id is not None and self.cell_id in set(map(str, cell_ids)):
            self._refresh_text()

    def _on_columns_changed(self, _names: Sequence[str]) -> None:
        if on_main_thread(self._bridge, self._on_columns_changed, _names) and self.cell_id:
            self._refresh_text()

    def _refresh_text(self) -> None:
        row = int(self.table.positions([self.cell_id])[0])
        obs = self.table.obs.iloc[row]
        self.facts.setText(_facts(obs))
        self.history.setText(_history(self.table, str(self.cell_id), obs))

    def closeEvent(self, event) -> None:
        """Stop background work and stop listening to the session."""
        self.similar.stop()
        if self._field_worker is not None:
            self._field_worker.quit()
        disconnect_groups(self._slots)
        self._lifeline.cut()
        super().closeEvent(event)


def _value(obs: pd.Series, name: str) -> str:
    v = obs.get(name)
    if v is None or v is pd.NA or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.2f}" if isinstance(v, float | np.floating) else str(v)


def _facts(obs: pd.Series) -> str:
    """Rich text of a cell's label, prediction, typicality and origin."""
    rows = [
        ("label", f"{_value(obs, 'label')} ({_value(obs, 'label_origin')})"),
        ("prediction", f"{_value(obs, 'prediction')} (confidence {_value(obs, 'confidence')})"),
    ]
    if "typicality" in obs.index:
        atypical = bool(obs.get("atypical")) if "atypical" in obs.index else False
        note = " - atypical" if atypical else ""
        rows.append(("typicality", f"{_value(obs, 'typicality')}{note}"))
    rows += [("batch", _value(obs, "batch")), ("slide", _value(obs, "slide"))]
    rows.append(("source", _value(obs, "source")))
    return "<br>".join(f"{name}: <b>{html_escape(text)}</b>" for name, text in rows)


def _history(table: CellTable, cell_id: str, obs: pd.Series) -> str:
    """Rich text of a cell's label history (oldest first), or its label and origin."""
    try:
        from napari_hemofm.core.audit import cell_history
    except ImportError:  # pragma: no cover - an older core without the audit module
        cell_history = None
    if cell_history is not None:
        try:
            events = cell_history(table, cell_id)
        except (KeyError, ValueError, OSError):
            events = None
        if events is not None and len(events):
            lines = []
            for rec in events.itertuples(index=False):
                when = str(getattr(rec, "time", ""))[:19].replace("T", " ")
                old = _plain(getattr(rec, "old", None))
                new = _plain(getattr(rec, "new", None))
                user = _plain(getattr(rec, "user", None))
                origin = _plain(getattr(rec, "origin", None))
                lines.append(
                    f"{html_escape(when)}: {html_escape(old)} &#8594; <b>{html_escape(new)}</b>"
                    f" <span style='color:gray'>({html_escape(user)}, "
                    f"{html_escape(origin)})</span>"
                )
            return "<br>".join(lines)
    label = _value(obs, "label")
    if label == "-":
        return "never labelled"
    return f"labelled <b>{html_escape(label)}</b> ({html_escape(_value(obs, 'label_origin'))})"


def _plain(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return str(value) if str(value) else "-"


def _outlined(field: CellField, size: int) -> QPixmap:
    """The field scaled to ``size`` with the cell's box drawn on it."""
    image = field.field
    h, w = image.shape[:2]
    scale = min(size / max(h, w), 4.0)
    pixmap = thumbnail_pixmap(image, None).scaled(
        max(round(w * scale), 1),
        max(round(h * scale), 1),
        Qt.AspectRatioMode.KeepAspectRatio,
        Qt.TransformationMode.SmoothTransformation,
    )
    painter = QPainter(pixmap)
    pen = QPen(QColor("#ffd84a"))
    pen.setWidthF(2.0)
    painter.setPen(pen)
    x0, y0, x1, y1 = field.box_in_field
    painter.drawRect(QRectF(x0 * scale, y0 * scale, (x1 - x0) * scale, (y1 - y0) * scale))
    painter.end()
    return pixmap

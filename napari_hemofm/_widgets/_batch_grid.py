"""The Batch view's "Cells by batch" grid: thumbnails of each cell type from each group.

Rows are the groups compared (batches or slides) and columns the cell types, or the
reverse; each grid cell shows a few thumbnails of that group and type, cut in a
background worker (:func:`~napari_hemofm._widgets._thumbstrip.start_thumbnail_worker`)
with a grey placeholder until they arrive. A click on a thumbnail emits its table row;
the Batch view turns that into the session's selection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import QFrame, QGridLayout, QLabel, QScrollArea, QVBoxLayout, QWidget

from napari_hemofm._widgets._colors import MISSING_COLOR
from napari_hemofm._widgets._colors import html_escape as _html
from napari_hemofm._widgets._thumbstrip import (
    placeholder_pixmap,
    start_thumbnail_worker,
    thumbnail_pixmap,
)
from napari_hemofm._widgets._workers import Lifeline

__all__ = ["GRID_ICON", "THUMBS_PER_GROUP", "BatchClassGrid"]

#: Thumbnails per (group, cell type) in the grid.
THUMBS_PER_GROUP = 4
#: Side of a grid thumbnail in pixels.
GRID_ICON = 48


class _Thumb(QLabel):
    """A clickable thumbnail of one cell."""

    clicked = Signal(int)

    def __init__(self, row: int, cell_id: str, size: int) -> None:
        super().__init__()
        self.row = int(row)
        self.cell_id = cell_id
        self.setFixedSize(size + 4, size + 4)
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.setToolTip(cell_id)
        self.setCursor(Qt.CursorShape.PointingHandCursor)
        self.set_selected(False)

    def set_selected(self, selected: bool) -> None:
        color = "#ffd84a" if selected else "transparent"
        self.setStyleSheet(f"border: 2px solid {color};")

    def mousePressEvent(self, event) -> None:
        """A click selects the cell."""
        if event.button() == Qt.MouseButton.LeftButton:
            self.clicked.emit(self.row)
        event.accept()


class BatchClassGrid(QWidget):
    """Thumbnails of each cell type from each batch: rows x columns of small groups.

    Signals
    -------
    cell_clicked(int)
        The table row of a clicked thumbnail.
    """

    cell_clicked = Signal(int)

    def __init__(self, cache: Callable[[], Any], *, icon: int = GRID_ICON) -> None:
        super().__init__()
        self._cache = cache
        self.icon = int(icon)
        self._lifeline = Lifeline(self)
        self._worker = None
        self._thumbs: dict[str, list[_Thumb]] = {}
        self.row_names: list[str] = []
        self.column_names: list[str] = []
        self._shown: dict[tuple[str, str], list[str]] = {}
        self._placeholder = placeholder_pixmap(self.icon)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self._content = QWidget()
        self.scroll.setWidget(self._content)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.scroll)

    @property
    def loading(self) -> bool:
        """True while thumbnails are cut in the background."""
        return self._worker is not None

    def shown(self, row_name: str, column_name: str) -> list[str]:
        """Cell ids shown in one grid cell, in order."""
        return list(self._shown.get((row_name, column_name), []))

    def thumbnails(self) -> list[_Thumb]:
        """Every thumbnail widget of the grid."""
        return [t for group in self._thumbs.values() for t in group]

    def set_groups(
        self,
        row_names: Sequence[str],
        column_names: Sequence[str],
        groups: dict[tuple[str, str], tuple[np.ndarray, list[str], int]],
        row_colors: dict[str, str],
        column_colors: dict[str, str],
        selected: np.ndarray,
    ) -> None:
        """Lay the grid out.

        Parameters
        ----------
        row_names, column_names : sequence of str
        groups : dict
            ``(row name, column name) -> (table rows, cell ids, cells in the group)``.
        row_colors, column_colors : dict of str to str
            Header colours.
        selected : ndarray of int
            Selected table rows (their thumbnails are outlined).
        """
        self.stop()
        self.row_names = list(row_names)
        self.column_names = list(column_names)
        self._thumbs = {}
        self._shown = {}
        content = QWidget()
        grid = QGridLayout(content)
        grid.setSpacing(4)
        grid.setContentsMargins(2, 2, 2, 2)
        for j, name in enumerate(self.column_names):
            head = QLabel(
                f'<span style="color:{column_colors.get(name, MISSING_COLOR)}">&#9632;</span>'
                f"&nbsp;<b>{_html(name)}</b>"
            )
            head.setAlignment(Qt.AlignmentFlag.AlignCenter)
            grid.addWidget(head, 0, j + 1)
        cache = self._cache()
        missing: list[str] = []
        chosen = set(np.asarray(selected, np.int64).tolist())
        per_row = 2
        for i, rname in enumerate(self.row_names):
            head = QLabel(
                f'<span style="color:{row_colors.get(rname, MISSING_COLOR)}">&#9632;</span>'
                f"&nbsp;<b>{_html(rname)}</b>"
            )
            head.setWordWrap(True)
            head.setMaximumWidth(110)
            grid.addWidget(head, i + 1, 0)
            for j, cname in enumerate(self.column_names):
                rows, ids, total = groups.get((rname, cname), (np.zeros(0, np.int64), [], 0))
                box = QFrame()
                box.setFrameShape(QFrame.Shape.StyledPanel)
                inner = QGridLayout(box)
                inner.setContentsMargins(2, 2, 2, 2)
                inner.setSpacing(1)
                for k, (row, cell_id) in enumerate(zip(rows.tolist(), ids, strict=True)):
                    thumb = _Thumb(row, cell_id, self.icon)
                    pix = cache.peek(cell_id)
                    if pix is None:
                        thumb.setPixmap(self._placeholder)
                        missing.append(cell_id)
                    else:
                        thumb.setPixmap(thumbnail_pixmap(pix, self.icon))
                    thumb.set_selected(row in chosen)
                    thumb.clicked.connect(self.cell_clicked.emit)
                    inner.addWidget(thumb, k // per_row, k % per_row)
                    self._thumbs.setdefault(cell_id, []).append(thumb)
                self._shown[(rname, cname)] = list(ids)
                caption = QLabel(f"n={total:,}" if total else "none")
                caption.setStyleSheet("color: gray;")
                caption.setAlignment(Qt.AlignmentFlag.AlignCenter)
                span = max(1, (len(ids) + per_row - 1) // per_row)
                inner.addWidget(caption, span, 0, 1, per_row)
                grid.addWidget(box, i + 1, j + 1)
        grid.setRowStretch(len(self.row_names) + 1, 1)
        grid.setColumnStretch(len(self.column_names) + 1, 1)
        self.scroll.setWidget(content)  # deletes the previous content
        self._content = content
        if missing:
            self._worker = start_thumbnail_worker(
                cache,
                list(dict.fromkeys(missing)),
                self._on_loaded,
                self._on_finished,
                lifeline=self._lifeline,
            )

    def set_selected(self, rows: np.ndarray) -> None:
        """Outline the thumbnails of these table rows."""
        chosen = set(np.asarray(rows, np.int64).tolist())
        for thumb in self.thumbnails():
            thumb.set_selected(thumb.row in chosen)

    def _on_loaded(self, thumbs: dict[str, np.ndarray]) -> None:
        for cell_id, thumb in thumbs.items():
            for label in self._thumbs.get(cell_id, []):
                label.setPixmap(thumbnail_pixmap(thumb, self.icon))

    def _on_finished(self, worker) -> None:
        if worker is self._worker:
            self._worker = None

    def stop(self) -> None:
        """Stop loading thumbnails."""
        if self._worker is not None:
            worker, self._worker = self._worker, None
            worker.quit()

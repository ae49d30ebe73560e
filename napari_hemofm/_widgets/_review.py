"""The "Review" dock widget: a CellaVision-style gallery to check and correct cell labels.

Top to bottom: the class bar (one button per class in hotkey order, "Not classed",
"Clear label", "+ class" and a menu to rename / merge classes), the review tools (undo,
redo, the "Label next" and "Suspect labels" queues, sort order, the "Unidentified"
threshold, the probe, thumbnail zoom), the probe's metrics, the gallery
(:mod:`._gallery`: one section per class, then Unidentified, Unlabelled and Not
classed) and the differential count of one smear or batch with its sign-off.

What it may touch: it calls the viewer's :class:`~napari_hemofm.core.review.Review`
(``relabel``, ``undo``, classes, threshold, queues, counts, sign-off) and changes the
shared selection with ``origin="gallery"``. It never retrains: the viewer's
:class:`~._review_state.Retrainer` does that in a worker, and this widget follows
``predictions_changed`` / ``metrics_changed`` / ``history_changed`` and the table's
``labels_changed``, moving only the cells that changed section. Long reads (the
queues) run in workers; Qt is touched on the main thread only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from qtpy.QtCore import QMimeData, QPoint, Qt, QTimer
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QInputDialog,
    QLabel,
    QMenu,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSlider,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from napari_hemofm._widgets._colors import MISSING_COLOR, class_hex
from napari_hemofm._widgets._docking import ElidedLabel, setup_dock
from napari_hemofm._widgets._flow import FlowLayout
from napari_hemofm._widgets._gallery import (
    DEFAULT_ICON_SIZE,
    HIRES_SIZE,
    MAX_ICON_SIZE,
    MIN_ICON_SIZE,
    NO_DROP,
    Gallery,
    SectionSpec,
    decode_cells,
)
from napari_hemofm._widgets._session import get_session
from napari_hemofm._widgets._signals import (
    MainThreadBridge,
    disconnect_all,
    disconnect_groups,
    on_main_thread,
)
from napari_hemofm._widgets._workers import Lifeline, start_worker
from napari_hemofm.core.catalogue import DEFAULT_PRESET, PRESET_KEY, preset_names
from napari_hemofm.core.journal import ProjectReadOnlyError
from napari_hemofm.core.report import DEFAULT_GROUP_BY
from napari_hemofm.core.review import NOT_CLASSED, UNIDENTIFIED, UNLABELLED

if TYPE_CHECKING:
    import napari

    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.review import Review
    from napari_hemofm.core.session import CellSession
    from napari_hemofm.core.thumbnails import ThumbnailCache

#: ``origin`` of selections made in the gallery.
GALLERY_ORIGIN = "gallery"
#: Cells in a "Label next" / "Suspect labels" queue.
QUEUE_SIZE = 20
#: Groupings of the differential: (combo text, obs column).
# the default is per slide: one smear for detected cells, the batch for crop folders
GROUPINGS = (("per slide", "slide"), ("per image", "source"), ("per batch", "batch"))
#: Targets offered for a differential count.
TARGETS = (100, 200)
#: Sort orders of the gallery: (combo text, Gallery sort mode).
SORTS = (("Least sure first", "confidence"), ("Map position", "map"))
#: Probes: (combo text, Review.probe_kind).
PROBES = (("kNN (k=20)", "knn"), ("Linear", "linear"))
#: Delay before the differential count is recomputed after a change (ms).
COUNT_DELAY_MS = 300
#: Column groups of the differential table (class, n, %) side by side.
COUNT_GROUPS = 2
#: Colour of the "Not classed" section before the class is in use.
NOT_CLASSED_COLOR = "#5a5a5a"


# ------------------------------------------------------------------ helpers
class ClassButton(QPushButton):
    """A class-bar button: click labels the selection; cells can be dropped on it."""

    def __init__(self, text: str, label: str | None, widget: ReviewWidget) -> None:
        super().__init__(text)
        self.label = label
        self._widget = widget
        self.setAcceptDrops(True)
        self.setFocusPolicy(Qt.FocusPolicy.NoFocus)  # keys stay with the gallery

    def dragEnterEvent(self, event: Any) -> None:
        """Accept dragged cells."""
        if decode_cells(event.mimeData()) is not None:
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: Any) -> None:
        """Label the dropped cells with this button's class."""
        ids = decode_cells(event.mimeData())
        if ids is None:
            event.ignore()
            return
        self._widget.relabel(ids, self.label)
        event.acceptProposedAction()


def _swatch_icon(color: str, size: int = 12) -> QIcon:
    pix = QPixmap(size, size)
    pix.fill(QColor(color))
    return QIcon(pix)


def format_metrics(metrics: dict[str, Any] | None, k: int | None = None) -> str:
    """One line for the probe's cross-validated metrics (see ``Review.compute_metrics``).

    Parameters
    ----------
    metrics : dict or None
        From :func:`~napari_hemofm.core.evaluation.probe_metrics` plus ``probe``.
    k : int, optional
        Neighbours of the kNN probe (shown as ``k=20``).

    Examples
    --------
    >>> format_metrics({"probe": "knn", "n_folds": 5, "balanced_accuracy": 0.912,
    ...                 "n_labelled": 140, "note": ""}, k=20)
    'kNN k=20 · 5-fold CV bal. acc 0.91 · 140 labelled'
    """
    if not metrics:
        return "Probe: no metrics yet (label cells of two classes)"
    kind = metrics.get("probe") or metrics.get("kind") or "knn"
    k = metrics.get("k", k)
    parts = [(f"kNN k={k}" if k else "kNN") if kind == "knn" else "Linear"]
    bal = metrics.get("balanced_accuracy")
    has_score = bal is not None and np.isfinite(float(bal))
    if has_score:
        folds = metrics.get("n_folds", metrics.get("n_splits", 5))
        parts.append(f"{folds}-fold CV bal. acc {float(bal):.2f}")
    n = metrics.get("n_labelled")
    if n is None and isinstance(metrics.get("counts"), dict):
        n = sum(int(v) for v in metrics["counts"].values())
    if n is not None:
        parts.append(f"{int(n):,} labelled")
    note = str(metrics.get("note") or "")
    if note and not has_score:
        parts.append(note)
    return " · ".join(parts)


# ------------------------------------------------------------ the review state
def _review_state(viewer: napari.viewer.Viewer) -> tuple[Review, Any]:
    """The viewer's Review and Retrainer (see :mod:`._review_state`)."""
    from napari_hemofm._widgets._review_state import get_retrainer

    retrainer = get_retrainer(viewer)
    return retrainer.review, retrainer


# ------------------------------------------------------------------- the widget
class ReviewWidget(QWidget):
    """Review and correct cell labels in a gallery of thumbnails.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose session (table, selection, thumbnails) and review to show.

    Attributes
    ----------
    gallery : Gallery
        The sections of thumbnails.
    class_buttons : dict of str to QPushButton
        The class bar: class name (and ``"Not classed"``) to its button; the
        "Clear label" button is under the key ``""``.
    undo_button, redo_button, suspects_button : QPushButton
    next_button : QToolButton
    sort_combo, probe_combo, group_by_combo, group_combo, target_combo : QComboBox
    threshold_spin : QDoubleSpinBox
    zoom_slider : QSlider
    metrics_label, status : QLabel
    busy_bar : QProgressBar
        Shown (indeterminate) while the probe retrains.
    count_table : QTableWidget
        Class, count and percent of the chosen group.
    count_progress : QProgressBar
    signoff_button : QPushButton

    Notes
    -----
    Keys (with the gallery focused): 1-9 label the selected cells with the class of
    that number, 0 marks them "Not classed", Delete / Backspace clears their label,
    Ctrl+Z undoes, Ctrl+Shift+Z (or Ctrl+Y) redoes. Click, Shift+click, Ctrl+click and
    a rubber band select; Ctrl+wheel zooms; dragging selected cells onto a section
    header or a class button relabels them.
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self.session: CellSession = get_session(viewer)
        self.review, self.retrainer = _review_state(viewer)
        self._table: CellTable | None = None
        self._slots: dict[str, list[tuple[Any, Callable]]] = {
            "session": [],
            "table": [],
            "review": [],
            "retrainer": [],
        }
        self._bridge = MainThreadBridge(self)
        self._lifeline = Lifeline(self)
        self._hires: ThumbnailCache | None = None
        self._settings_seen: tuple[float, tuple[str, ...]] | None = None
        self._queue_worker = None
        self._all_predictions_dirty = False
        self._busy = False

        self._build_ui()
        setup_dock(self)

        self._rebuild_timer = QTimer(self)
        self._rebuild_timer.setSingleShot(True)
        self._rebuild_timer.setInterval(0)
        self._rebuild_timer.timeout.connect(self.rebuild)
        self._count_timer = QTimer(self)
        self._count_timer.setSingleShot(True)
        self._count_timer.setInterval(COUNT_DELAY_MS)
        self._count_timer.timeout.connect(self.refresh_counts)

        ev = self.session.events
        self._slots["session"] = [
            (ev.selection_changed, self._on_selection_changed),
            (ev.table_replaced, self._on_table_replaced),
        ]
        if self.retrainer is not None:
            self._slots["retrainer"] = [
                (self.retrainer.busy_changed, self._on_busy_changed),
                (self.retrainer.review_replaced, self._on_review_replaced),
            ]
        for group in ("session", "retrainer"):
            for signal, slot in self._slots[group]:
                signal.connect(slot)
        self.destroyed.connect(functools.partial(disconnect_groups, self._slots))
        self._attach(self.review)
        if self.retrainer is not None:
            self._on_busy_changed(self.retrainer.busy)

    # ----------------------------------------------------------------- UI
    def _build_ui(self) -> None:
        self.class_buttons: dict[str, QPushButton] = {}
        self._class_bar = QWidget()
        self._class_flow = FlowLayout(self._class_bar)

        self.undo_button = QPushButton("↶ Undo")
        self.undo_button.setToolTip("Undo the last label change (Ctrl+Z)")
        self.undo_button.clicked.connect(self.undo)
        self.redo_button = QPushButton("↷ Redo")
        self.redo_button.setToolTip("Redo (Ctrl+Shift+Z)")
        self.redo_button.clicked.connect(self.redo)
        self.next_button = QToolButton()
        self.next_button.setText("Label next")
        self.next_button.setToolTip(
            f"Show {QUEUE_SIZE} unlabelled cells the probe is least sure of, spread over "
            "the map, as a queue at the top (the arrow chooses how they are picked)"
        )
        self.next_button.setPopupMode(QToolButton.ToolButtonPopupMode.MenuButtonPopup)
        self.next_button.clicked.connect(lambda: self.show_queue("next"))
        strategy_menu = QMenu(self.next_button)
        self.strategy_actions = {}
        for strategy, text in (
            ("uncertain", "Least sure, spread over the map"),
            ("hybrid", "Least sure + far from every labelled cell (a new lab)"),
        ):
            action = strategy_menu.addAction(text)
            action.setCheckable(True)
            action.triggered.connect(lambda _c=False, st=strategy: self.set_queue_strategy(st))
            self.strategy_actions[strategy] = action
        self.strategy_actions["uncertain"].setChecked(True)
        self.next_button.setMenu(strategy_menu)
        self.scope_combo = QComboBox()
        self.scope_combo.addItem("all cells", None)
        self.scope_combo.setToolTip(
            "Which cells Label next picks from: all, or one batch (lab) or slide. A scoped "
            "queue covers every class the probe predicts there (a new lab in few clicks)."
        )
        self.scope_combo.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.scope_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        self.scope_combo.setMinimumContentsLength(6)
        self.scope_combo.currentIndexChanged.connect(self._on_scope_changed)
        self.suspects_button = QPushButton("Suspect labels")
        self.suspects_button.setToolTip(
            f"Show {QUEUE_SIZE} labelled cells whose label the cross-validated probe "
            "disagrees with (possible mistakes) as a queue at the top"
        )
        self.suspects_button.clicked.connect(lambda: self.show_queue("suspects"))
        for button in (
            self.undo_button,
            self.redo_button,
            self.next_button,
            self.suspects_button,
        ):
            button.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        tools = QHBoxLayout()
        tools.setSpacing(4)
        for button in (self.undo_button, self.redo_button):
            tools.addWidget(button)
        tools.addSpacing(8)
        tools.addWidget(self.suspects_button)
        tools.addStretch(1)
        # the queue on a row of its own: at a 400-px dock the button and its scope were
        # clipped beside undo / redo
        queue_row = QHBoxLayout()
        queue_row.setSpacing(4)
        # room for the text beside the menu arrow (it was drawn over the last letters)
        self.next_button.setMinimumWidth(self.next_button.sizeHint().width() + 16)
        queue_row.addWidget(self.next_button)
        queue_row.addWidget(self.scope_combo, 1)
        self._queue_row = queue_row
        self.preset_combo = QComboBox()  # placed on the settings row
        for name in preset_names():
            self.preset_combo.addItem(name, name)
        self.preset_combo.setToolTip(
            "Class preset: fills the class bar (keys 1-9) and says how each class counts "
            "(white cell, per 100 white cells, not counted). Labels in use are kept."
        )
        self.preset_combo.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.preset_combo.currentIndexChanged.connect(self._on_preset_changed)
        self.preset_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        self.preset_combo.setMinimumContentsLength(8)

        self.sort_combo = QComboBox()
        for text, mode in SORTS:
            self.sort_combo.addItem(text, mode)
        self.sort_combo.setToolTip(
            "Order within a section: the probe's confidence (least sure first), or "
            "position on the cell map (similar cells side by side)"
        )
        self.sort_combo.currentIndexChanged.connect(self._on_sort_changed)
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(0.0, 1.0)
        self.threshold_spin.setSingleStep(0.05)
        self.threshold_spin.setDecimals(2)
        self.threshold_spin.setToolTip(
            "Unlabelled cells predicted with a confidence below this go to 'Unidentified'"
        )
        self.threshold_spin.valueChanged.connect(self._on_threshold_changed)
        self.probe_combo = QComboBox()
        for text, kind in PROBES:
            self.probe_combo.addItem(text, kind)
        self.probe_combo.setToolTip("The probe that predicts unlabelled cells")
        self.probe_combo.currentIndexChanged.connect(self._on_probe_changed)
        self.zoom_slider = QSlider(Qt.Orientation.Horizontal)
        self.zoom_slider.setRange(MIN_ICON_SIZE, MAX_ICON_SIZE)
        self.zoom_slider.setSingleStep(8)
        self.zoom_slider.setPageStep(32)
        self.zoom_slider.setValue(DEFAULT_ICON_SIZE)
        self.zoom_slider.setToolTip("Thumbnail size (Ctrl+wheel over the gallery)")
        self.zoom_slider.setMinimumWidth(60)
        self.zoom_slider.valueChanged.connect(self.set_zoom)
        # two short rows, so that the panel fits a narrow dock without scrolling sideways
        settings = QHBoxLayout()
        settings.setSpacing(4)
        settings.addWidget(QLabel("Sort"))
        settings.addWidget(self.sort_combo)
        settings.addWidget(QLabel("Probe"))
        settings.addWidget(self.probe_combo)
        settings.addStretch(1)
        settings2 = QHBoxLayout()
        settings2.setSpacing(4)
        settings2.addWidget(self.preset_combo)
        settings2.addWidget(QLabel("Unidentified <"))
        settings2.addWidget(self.threshold_spin)
        settings2.addStretch(1)
        # the thumbnail size beside undo / redo: with the preset and the threshold they
        # were clipped at a 400-px dock
        tools.addWidget(QLabel("Zoom"))
        tools.addWidget(self.zoom_slider, 1)

        self.metrics_label = ElidedLabel(format_metrics(None))  # long once k-fold scores show
        self.metrics_label.setToolTip(
            "Cross-validated accuracy of the probe on the labelled cells"
        )
        self.busy_bar = QProgressBar()
        self.busy_bar.setRange(0, 0)
        self.busy_bar.setFixedSize(70, 10)
        self.busy_bar.setTextVisible(False)
        self.busy_bar.setToolTip("Retraining the probe...")
        self.busy_bar.hide()
        self.probe_file_button = QToolButton()
        self.probe_file_button.setText("Probe file ▾")
        self.probe_file_button.setStyleSheet(
            "QToolButton::menu-indicator { image: none; width: 0px; }"
        )
        self.probe_file_button.setToolTip(
            "Save the trained probe (.npz, no pickle), or learn also from the labelled "
            "cells of a probe saved in another project"
        )
        self.probe_file_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        probe_menu = QMenu(self.probe_file_button)
        probe_menu.addAction("Save probe...", self._ask_save_probe)
        probe_menu.addAction("Learn also from a saved probe...", self._ask_use_reference)
        probe_menu.addAction("Forget the saved probe", lambda: self.use_reference(None))
        self.probe_file_button.setMenu(probe_menu)
        metrics = QHBoxLayout()
        metrics.addWidget(self.metrics_label, 1)
        metrics.addWidget(self.busy_bar)
        metrics.addWidget(self.probe_file_button)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setStyleSheet("color: #a0a4ab;")

        self.gallery = Gallery(lambda: self.session.thumbnails, self._hires_cache)
        self.gallery.selection_edited.connect(self._on_gallery_selection)
        self.gallery.key_action.connect(self._on_key_action)
        self.gallery.cells_dropped.connect(self._on_cells_dropped)
        self.gallery.zoom_requested.connect(self.zoom_slider.setValue)
        self.gallery.set_icon_size(DEFAULT_ICON_SIZE)

        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(self.gallery)
        counts = self._build_counts()
        # extra height goes mostly to the gallery (stretch 4:1); the count panel is not
        # capped at its size hint, which misses its wrapped sign-off line
        counts.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
        splitter.addWidget(counts)
        splitter.setStretchFactor(0, 4)
        splitter.setStretchFactor(1, 1)
        splitter.setChildrenCollapsible(True)
        # the gallery is the point of the panel: at least two rows of cells, and the
        # count panel starts at its minimum (it grows when the user drags the handle)
        self.gallery.setMinimumHeight(2 * DEFAULT_ICON_SIZE + 40)
        splitter.setSizes([10_000, 1])
        self.splitter = splitter

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.setSpacing(4)
        # another process has the project open: say who, and relabelling is off
        self.read_only_banner = QLabel("")
        self.read_only_banner.setWordWrap(True)
        self.read_only_banner.setStyleSheet("color: #1e1e1e; background: #e8b04a; padding: 3px;")
        self.read_only_banner.setVisible(False)
        layout.addWidget(self.read_only_banner)
        layout.addWidget(self._class_bar)
        layout.addLayout(tools)
        layout.addLayout(self._queue_row)
        layout.addLayout(settings)
        layout.addLayout(settings2)
        layout.addLayout(metrics)
        layout.addWidget(self.status)
        layout.addWidget(splitter, 1)

    def _build_counts(self) -> QWidget:
        box = QGroupBox("Differential count")
        self.group_by_combo = QComboBox()
        for text, column in GROUPINGS:
            self.group_by_combo.addItem(text, column)
        self.group_by_combo.currentIndexChanged.connect(lambda _i: self.refresh_counts())
        self.group_combo = QComboBox()
        self.group_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        self.group_combo.setMinimumContentsLength(12)
        self.group_combo.currentIndexChanged.connect(lambda _i: self._show_group())
        self.target_combo = QComboBox()
        for t in TARGETS:
            self.target_combo.addItem(f"target {t}", t)
        self.target_combo.currentIndexChanged.connect(lambda _i: self.refresh_counts())
        top = QHBoxLayout()
        top.addWidget(self.group_by_combo)
        top.addWidget(self.group_combo, 1)
        top.addWidget(self.target_combo)

        # two (class, count, %) column groups side by side: ten classes fit in five rows
        self.count_table = QTableWidget(0, 3 * COUNT_GROUPS)
        self.count_table.setHorizontalHeaderLabels(["Class", "n", "%"] * COUNT_GROUPS)
        self.count_table.verticalHeader().hide()
        self.count_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.count_table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.count_table.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.count_table.setShowGrid(False)
        self.count_table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        header = self.count_table.horizontalHeader()
        for g in range(COUNT_GROUPS):
            header.setSectionResizeMode(3 * g, QHeaderView.ResizeMode.Stretch)
            header.setSectionResizeMode(3 * g + 1, QHeaderView.ResizeMode.ResizeToContents)
            header.setSectionResizeMode(3 * g + 2, QHeaderView.ResizeMode.ResizeToContents)
        self.count_table.verticalHeader().setDefaultSectionSize(20)
        self.count_progress = QProgressBar()
        self.count_progress.setFormat("%v / %m white cells counted")
        self.count_progress.setRange(0, TARGETS[0])
        self.signoff_label = QLabel("")
        self.signoff_label.setWordWrap(True)
        self.signoff_button = QPushButton("Sign off")
        self.signoff_button.setToolTip(
            "Record that you checked this differential: needs the target of white cells, "
            "no Unidentified cell and no shift warning (or a written reason to override it)"
        )
        self.signoff_button.clicked.connect(self._ask_sign_off)
        self.verify_button = QPushButton("Verify")
        self.verify_button.setToolTip(
            "Second reader: confirm a sign-off made by another user (any later label "
            "change in the group voids both)"
        )
        self.verify_button.clicked.connect(lambda: self.verify_sign_off())
        self.export_button = QPushButton("Export report...")
        self.export_button.setToolTip(
            "Write the printable report of every group (one self-contained HTML file)"
        )
        self.export_button.clicked.connect(self._ask_export_report)
        for button in (self.signoff_button, self.verify_button, self.export_button):
            button.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        bottom = QHBoxLayout()
        bottom.addWidget(self.signoff_button)
        bottom.addWidget(self.verify_button)
        bottom.addStretch(1)
        bottom.addWidget(self.export_button)
        self.history_label = QLabel("")
        self.history_label.setWordWrap(True)
        self.history_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.history_label.setToolTip("Label history of the selected cell (hemofm audit)")

        layout = QVBoxLayout(box)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addWidget(self.count_table)
        layout.addWidget(self.count_progress)
        layout.addStretch(1)
        layout.addWidget(self.signoff_label)
        layout.addLayout(bottom)
        layout.addWidget(self.history_label)
        self._counts: pd.DataFrame | None = None
        self._summary: pd.DataFrame | None = None
        return box

    def _hires_cache(self) -> ThumbnailCache:
        """Thumbnails cut at :data:`HIRES_SIZE` px for zoomed-in views (made on first use)."""
        if self._hires is None:
            from napari_hemofm.core.thumbnails import ThumbnailCache

            self._hires = ThumbnailCache(
                lambda: self.session.table.obs,
                size=HIRES_SIZE,
                budget_bytes=192 * 2**20,
                source_budget_bytes=256 * 2**20,
            )
            self._hires.images = self.session.images  # one dict: layers added later are seen
        return self._hires

    def _rebuild_class_bar(self) -> None:
        for button in self.class_buttons.values():
            self._class_flow.removeWidget(button)
            button.deleteLater()
        while self._class_flow.count():
            item = self._class_flow.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        self.class_buttons = {}
        review = self.review
        for i, name in enumerate(review.classes):
            key = f"{i + 1} " if i < 9 else ""
            button = ClassButton(f"{key}{name}", name, self)
            button.setIcon(_swatch_icon(self._class_color(name)))
            shortcut = f" (key {i + 1})" if i < 9 else ""
            button.setToolTip(
                f"Label the selected cells {name}{shortcut}; or drop cells here. "
                "Right-click to rename or merge."
            )
            button.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
            button.customContextMenuRequested.connect(
                lambda _pos, n=name, b=button: self._class_menu(n, b)
            )
            button.clicked.connect(lambda _c=False, n=name: self.relabel_selected(n))
            self._class_flow.addWidget(button)
            self.class_buttons[name] = button
        nc = ClassButton(f"0 {NOT_CLASSED}", NOT_CLASSED, self)
        nc.setIcon(_swatch_icon(self._class_color(NOT_CLASSED)))
        nc.setToolTip("Artefact, smudge cell, not a WBC: kept out of the counts (key 0)")
        nc.clicked.connect(lambda: self.relabel_selected(NOT_CLASSED))
        self._class_flow.addWidget(nc)
        self.class_buttons[NOT_CLASSED] = nc
        clear = ClassButton("⌫ Clear label", None, self)
        clear.setToolTip("Remove the curated label of the selected cells (Delete / Backspace)")
        clear.clicked.connect(lambda: self.relabel_selected(None))
        self._class_flow.addWidget(clear)
        self.class_buttons[""] = clear
        add = QToolButton()
        add.setText("+ class")
        add.setToolTip("Add a class (it gets the next number key)")
        add.clicked.connect(self._ask_add_class)
        add.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self._class_flow.addWidget(add)
        more = QToolButton()
        more.setText("Rename / merge ▾")
        more.setStyleSheet("QToolButton::menu-indicator { image: none; width: 0px; }")
        more.setToolTip("Rename a class, or merge classes (also: right-click a class button)")
        more.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        menu = QMenu(more)
        menu.addAction("Rename class...", self._ask_rename_class)
        menu.addAction("Merge classes...", self._ask_merge_classes)
        more.setMenu(menu)
        more.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self._class_flow.addWidget(more)
        self._class_bar.updateGeometry()

    def _class_menu(self, name: str, button: QWidget) -> None:
        menu = QMenu(self)
        menu.addAction(f"Rename {name}...", lambda: self._ask_rename_class(name))
        merge = menu.addMenu(f"Merge {name} into")
        for other in self.review.classes:
            if other != name:
                merge.addAction(other, lambda o=other: self._merge_checked([name], o))
        menu.exec(button.mapToGlobal(QPoint(0, button.height())))

    # --------------------------------------------------------------- public
    @property
    def table(self) -> CellTable:
        """The review's cell table."""
        return self.review.table

    @property
    def busy(self) -> bool:
        """True while the probe retrains, a queue is computed or thumbnails load."""
        retraining = self.retrainer is not None and self.retrainer.busy
        return retraining or self._queue_worker is not None or self.gallery.loading

    def relabel_selected(self, label: str | None) -> list[str]:
        """Give the selected cells ``label`` (None clears it). One undo step.

        Returns the ids of the cells whose label changed.
        """
        rows = self.session.selected
        if len(rows) == 0:
            self._say("Select cells first (click, Shift / Ctrl+click or drag a box).")
            return []
        return self.relabel(rows, label)

    def relabel(self, cells: Sequence[str] | np.ndarray, label: str | None) -> list[str]:
        """Give cells (ids or rows) ``label`` through the review. One undo step."""
        try:
            changed = self.review.relabel(cells, label)
        except (ValueError, KeyError, ProjectReadOnlyError) as exc:
            self._say(str(exc))
            return []
        what = "cleared" if label is None else f"→ {label}"
        n = len(changed)
        self._say(f"{n} cell{'s' if n != 1 else ''} {what} (Ctrl+Z undoes)" if n else "No change.")
        return changed

    def relabel_key(self, key: int) -> list[str]:
        """What number key ``key`` does: label the selection with that key's class."""
        label = self.review.class_for_key(int(key))
        if label is None:
            self._say(f"No class on key {key}: add one with '+ class'.")
            return []
        return self.relabel_selected(label)

    def undo(self) -> bool:
        """Undo the last label step."""
        try:
            done = self.review.undo()
        except ProjectReadOnlyError as exc:  # a read-only project: say so, no pop-up
            self._say(str(exc))
            return False
        self._say("Undone." if done else "Nothing to undo.")
        return done

    def redo(self) -> bool:
        """Redo the last undone step."""
        try:
            done = self.review.redo()
        except ProjectReadOnlyError as exc:  # a read-only project: say so, no pop-up
            self._say(str(exc))
            return False
        self._say("Redone." if done else "Nothing to redo.")
        return done

    def add_class(self, name: str) -> None:
        """Add a class (the next number key)."""
        self.review.add_class(name)

    def rename_class(self, old: str, new: str) -> None:
        """Rename a class (its cells follow; one undo step)."""
        self.review.rename_class(old, new)

    def merge_classes(self, sources: Sequence[str], target: str) -> None:
        """Merge classes into ``target`` (one undo step)."""
        self.review.merge_classes(list(sources), target)

    def drop_cells(self, mime: QMimeData, target: str) -> list[str]:
        """Handle cells dropped on a section or class button named ``target``.

        Parameters
        ----------
        mime : QMimeData
            Made by :func:`~._gallery.encode_cells` (a drag from the gallery).
        target : str
            A section name (a class, ``"Not classed"``) or a class name; ``""`` is
            the "Clear label" button.

        Returns
        -------
        list of str
            Ids of the cells whose label changed.
        """
        ids = decode_cells(mime)
        if not ids:
            return []
        if target == "":
            return self.relabel(ids, None)
        if target in self.gallery.sections:
            label = self.gallery.drop_label(target)
            if label is NO_DROP:
                self._say(f"Cells cannot be dropped on {target}.")
                return []
            return self.relabel(ids, label)
        if target in self.review.classes or target == NOT_CLASSED:
            return self.relabel(ids, target)
        self._say(f"No class or section {target!r}.")
        return []

    def set_zoom(self, size: int) -> None:
        """Show thumbnails at ``size`` px (64-256)."""
        size = int(np.clip(size, MIN_ICON_SIZE, MAX_ICON_SIZE))
        if self.zoom_slider.value() != size:
            self.zoom_slider.setValue(size)  # -> set_zoom again
            return
        self.gallery.set_icon_size(size)

    def set_sort(self, mode: str) -> None:
        """Sort sections by ``"confidence"`` (least sure first) or ``"map"`` position."""
        index = self.sort_combo.findData(mode)
        if index < 0:
            raise ValueError(f"sort must be one of {[m for _, m in SORTS]}; got {mode!r}")
        if index == self.sort_combo.currentIndex():
            self.gallery.set_sort(mode)
        else:
            self.sort_combo.setCurrentIndex(index)

    def set_queue_strategy(self, strategy: str) -> None:
        """How *Label next* picks cells: ``"uncertain"`` or ``"hybrid"`` (see probes.md)."""
        self.review.queue_strategy = strategy
        for name, action in self.strategy_actions.items():
            action.setChecked(name == strategy)

    @property
    def queue_scope(self) -> dict[str, str] | None:
        """The scope of *Label next* chosen in the panel (None: all cells)."""
        return self.scope_combo.currentData()

    def set_queue_scope(self, scope: dict[str, str] | None) -> None:
        """Scope *Label next* to ``{"batch": name}``, ``{"slide": name}`` or all (None).

        Raises
        ------
        KeyError
            If the table has no such batch or slide.
        """
        for i in range(self.scope_combo.count()):
            if self.scope_combo.itemData(i) == scope:
                self.scope_combo.setCurrentIndex(i)  # -> _on_scope_changed
                return
        raise KeyError(f"no scope {scope!r}; choose one of {self._scopes()}")

    def _scopes(self) -> list[dict[str, str] | None]:
        return [self.scope_combo.itemData(i) for i in range(self.scope_combo.count())]

    def _refresh_scopes(self) -> None:
        """One scope per batch and per slide of the table, the choice kept when it stays."""
        obs = self.table.obs
        wanted: list[tuple[str, dict[str, str] | None]] = [("all cells", None)]
        for column in ("batch", "slide"):
            if column not in obs.columns or not len(obs):
                continue
            values = obs[column].dropna().astype(str)
            for name in sorted(values.unique()):
                wanted.append((f"{column}: {name}", {column: name}))
        if [d for _, d in wanted] == self._scopes():
            return
        current = self.queue_scope
        self.scope_combo.blockSignals(True)
        self.scope_combo.clear()
        for text, data in wanted:
            self.scope_combo.addItem(text, data)
            self.scope_combo.setItemData(
                self.scope_combo.count() - 1, text, Qt.ItemDataRole.ToolTipRole
            )
        index = next((i for i, (_, d) in enumerate(wanted) if d == current), 0)
        self.scope_combo.setCurrentIndex(index)
        self.scope_combo.blockSignals(False)
        self._on_scope_changed(index)

    def _on_scope_changed(self, _index: int) -> None:
        self.review.queue_scope = self.queue_scope

    def show_queue(self, which: str, n: int = QUEUE_SIZE) -> None:
        """Compute a queue (``"next"`` or ``"suspects"``) in a worker and show it on top."""
        if which not in ("next", "suspects"):
            raise ValueError(f"queue must be 'next' or 'suspects'; got {which!r}")
        if self._queue_worker is not None:
            return
        from napari.qt.threading import create_worker

        review = self.review
        review.queue_scope = self.queue_scope
        fn = review.label_next if which == "next" else review.suspects
        worker = create_worker(fn, int(n), _start_thread=False)
        wrap = self._lifeline.wrap
        worker.returned.connect(wrap(functools.partial(self._on_queue, review, which)))
        worker.errored.connect(wrap(self._on_queue_error))
        worker.finished.connect(wrap(functools.partial(self._on_queue_finished, worker)))
        self._lifeline.track(worker)
        self._queue_worker = worker
        for button in (self.next_button, self.suspects_button):
            button.setEnabled(False)
        self._say("Computing the queue...")
        start_worker(worker)

    def set_queue(self, which: str, cell_ids: Sequence[str]) -> None:
        """Show cells as the queue section at the top and select them."""
        title = "Label next" if which == "next" else "Suspect labels"
        rows = self.table.positions(list(cell_ids)) if len(cell_ids) else np.zeros(0, np.int64)
        self.gallery.set_queue(f"Queue: {title}", rows)
        self.session.select(rows, origin=GALLERY_ORIGIN)
        self.gallery.set_selected(self.session.selected)
        if which == "next":
            self._say(
                f"{len(rows)} cells to label next: select and press a number key."
                if len(rows)
                else "No unlabelled cell left to suggest."
            )
        else:
            self._say(
                f"{len(rows)} labels the probe disagrees with: check them."
                if len(rows)
                else "No suspect label found."
            )

    def _on_queue(self, review: Review, which: str, ids: Any) -> None:
        if review is self.review:
            self.set_queue(which, list(ids))

    def _on_queue_error(self, exc: Exception) -> None:
        self._say(f"No queue: {exc}" if str(exc) else f"No queue: {type(exc).__name__}")

    def _on_queue_finished(self, worker: Any) -> None:
        if worker is self._queue_worker:
            self._queue_worker = None
        for button in (self.next_button, self.suspects_button):
            button.setEnabled(True)

    # -------------------------------------------------------- differential
    def refresh_counts(self) -> None:
        """Recompute the differential counts and the sign-off state."""
        self._count_timer.stop()
        table = self.table
        if table.n_cells == 0:
            self._counts = self._summary = None
            self.group_combo.clear()
            self._show_group()
            return
        by = self.group_by_combo.currentData()
        try:
            self._counts = self.review.differential(by)
            self._summary = self.review.differential_summary(by, target=self.target)
        except (ValueError, KeyError) as exc:
            self._counts = self._summary = None
            self.signoff_label.setText(str(exc))
            return
        groups = [str(g) for g in self._summary.index]
        current = self.group_combo.currentData()
        if [self.group_combo.itemData(i) for i in range(self.group_combo.count())] != groups:
            self.group_combo.blockSignals(True)
            self.group_combo.clear()
            for g in groups:
                self.group_combo.addItem(_short(g), g)
                self.group_combo.setItemData(
                    self.group_combo.count() - 1, g, Qt.ItemDataRole.ToolTipRole
                )
            index = self.group_combo.findData(current)
            self.group_combo.setCurrentIndex(max(index, 0))
            self.group_combo.blockSignals(False)
        self._show_group()

    @property
    def target(self) -> int:
        """Cells to count per group (100 or 200)."""
        return int(self.target_combo.currentData())

    @property
    def group(self) -> str | None:
        """The group whose differential is shown."""
        return self.group_combo.currentData()

    def set_group(self, by: str, group: str | None = None) -> None:
        """Show the differential of ``group`` (a source or a batch, per ``by``)."""
        index = self.group_by_combo.findData(by)
        if index < 0:
            raise ValueError(f"by must be one of {[c for _, c in GROUPINGS]}; got {by!r}")
        self.group_by_combo.setCurrentIndex(index)
        self.refresh_counts()
        if group is not None:
            g = self.group_combo.findData(group)
            if g < 0:
                raise KeyError(f"no {by} {group!r}")
            self.group_combo.setCurrentIndex(g)

    def counts_frame(self) -> pd.DataFrame:
        """The shown group's count table: ``label``, ``kind``, ``count``, ``percent``.

        ``percent`` of a ``non_wbc`` row is per 100 white cells (:mod:`~.core.report`).
        """
        columns = ["label", "kind", "count", "percent"]
        if self._counts is None or self.group is None:
            return pd.DataFrame(columns=columns)
        part = self._counts[self._counts["group"] == self.group]
        return part[columns].reset_index(drop=True)

    def _show_group(self) -> None:
        frame = self.counts_frame()
        per_column = -(-len(frame) // COUNT_GROUPS) if len(frame) else 0
        self.count_table.clearContents()
        self.count_table.setRowCount(per_column)
        right = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
        for i, r in enumerate(frame.itertuples(index=False)):
            row, col = i % per_column, 3 * (i // per_column)
            name = QTableWidgetItem(str(r.label))
            color = MISSING_COLOR if r.label == UNIDENTIFIED else self._class_color(str(r.label))
            name.setIcon(_swatch_icon(color))
            per_wbc = r.kind == "non_wbc"
            name.setToolTip(f"{r.label}: " + ("per 100 white cells" if per_wbc else str(r.kind)))
            count = QTableWidgetItem(f"{int(r.count):,}")
            count.setTextAlignment(right)
            pct = QTableWidgetItem(f"{float(r.percent):.1f}" + ("/100" if per_wbc else ""))
            pct.setTextAlignment(right)
            if per_wbc:  # not part of the 100 %
                font = name.font()
                font.setItalic(True)
                for item in (name, count, pct):
                    item.setFont(font)
            for j, item in enumerate((name, count, pct)):
                self.count_table.setItem(row, col + j, item)
        header_h = self.count_table.horizontalHeader().sizeHint().height()
        self.count_table.setFixedHeight(header_h + 20 * max(per_column, 1) + 4)
        summary = self._summary
        group = self.group
        if summary is None or group is None or group not in summary.index:
            self.count_progress.setRange(0, self.target)
            self.count_progress.setValue(0)
            self.signoff_button.setEnabled(False)
            self.signoff_label.setText("No cells counted yet.")
            return
        row = summary.loc[group]
        counted = int(row["n_wbc"])
        self.count_progress.setRange(0, max(self.target, counted))
        self.count_progress.setValue(counted)
        self.count_progress.setFormat(f"%v / {self.target} white cells counted")
        blockers = list(row["blockers"])
        signed = bool(row["signed_off_by"]) and not row["signoff_void"]
        # a shift warning alone can be overridden with a written reason
        only_warning = bool(row["warnings"]) and len(blockers) == 1
        self.signoff_button.setEnabled((not signed) and (not blockers or only_warning))
        self.signoff_button.setText("Sign off with reason..." if only_warning else "Sign off")
        self.verify_button.setEnabled(signed)
        text = str(row["status"])  # the one sign-off text (core.report.signoff_text)
        for warning in row["warnings"]:
            text += f"\nWarning: {warning}"
        self.signoff_label.setText(text)
        # a wrapped label's height is not in its size hint: ask for it, so the panel
        # grows (or its dock scrolls) instead of drawing rows over each other
        width = max(self.signoff_label.width(), 240)
        self.signoff_label.setMinimumHeight(self.signoff_label.heightForWidth(width))
        void = bool(row["signoff_void"])
        self.signoff_label.setStyleSheet("color: #e05555; font-weight: bold;" if void else "")

    def sign_off(
        self, user: str | None = None, override: str | None = None
    ) -> dict[str, Any] | None:
        """Sign off the shown group's differential (see ``Review.sign_off``).

        ``override`` is the written reason for signing despite a shift warning.
        """
        group = self.group
        if group is None:
            return None
        try:
            record = self.review.sign_off(
                group,
                self.group_by_combo.currentData(),
                user=user,
                target=self.target,
                override=override,
            )
        except ValueError as exc:
            self._say(str(exc))
            self.refresh_counts()
            return None
        self._say(f"{_short(group)} signed off by {record['user']}.")
        self.refresh_counts()
        return record

    def _ask_sign_off(self) -> None:
        summary, group = self._summary, self.group
        override = None
        if summary is not None and group in summary.index and summary.loc[group, "warnings"]:
            override, ok = QInputDialog.getText(
                self,
                "Sign off despite a warning",
                "Why is this differential right although its cells differ from the cells "
                "the probe learned from?",
            )
            if not ok or not override.strip():
                return
        self.sign_off(override=override)

    def verify_sign_off(self, user: str | None = None) -> dict[str, Any] | None:
        """Verify the shown group's sign-off as a second reader (another user name)."""
        group = self.group
        if group is None:
            return None
        try:
            record = self.review.verify_sign_off(
                group, self.group_by_combo.currentData(), user=user
            )
        except ValueError as exc:
            self._say(str(exc))
            self.refresh_counts()
            return None
        self._say(f"{_short(group)} verified by {record['verified'][-1]['user']}.")
        self.refresh_counts()
        return record

    def export_report(self, path: str) -> str:
        """Write the printable HTML report of every group (grouped as shown) to ``path``."""
        out = self.review.export_report(  # the session's images: layers need no file
            path,
            by=self.group_by_combo.currentData(),
            target=self.target,
            images=self.session.images,
        )
        self._say(f"Report written to {out}.")
        return str(out)

    def _ask_export_report(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Export report", "report.html", "HTML report (*.html)"
        )
        if path:
            try:
                self.export_report(path)
            except OSError as exc:
                self._say(f"Could not write the report: {exc}")

    def show_history(self, cell_id: str | None) -> str:
        """Show the label history of a cell (``None``: clear); returns the text shown."""
        from napari_hemofm.core.audit import cell_history

        text = ""
        if cell_id is not None:
            try:
                history = cell_history(self.table, cell_id)
            except KeyError:
                history = None
            if history is not None and len(history):
                lines = [
                    f"{r.time[:19].replace('T', ' ')} {r.user}: {r.old or '(none)'} -> "
                    f"{r.new or '(none)'}"
                    for r in history.tail(5).itertuples()
                ]
                more = f" ({len(history) - 5} earlier)" if len(history) > 5 else ""
                text = f"History of {cell_id}{more}:\n" + "\n".join(lines)
            elif history is not None:
                text = f"{cell_id}: label never changed."
        self.history_label.setText(text)
        return text

    # -------------------------------------------------------------- attach
    def _attach(self, review: Review) -> None:
        """Follow a review and its table (a new one when the session's table changes)."""
        disconnect_all(self._slots["table"])
        disconnect_all(self._slots["review"])
        self.review = review
        table = review.table
        self._table = table
        self._show_read_only(table)
        if self._hires is not None:
            self._hires.clear()
        tev = table.events
        self._slots["table"] = [
            (tev.labels_changed, self._on_labels_changed),
            (tev.columns_changed, self._on_columns_changed),
            (tev.classes_changed, self._on_classes_changed),
            (tev.cells_added, self._on_cells_added),
            (tev.embeddings_changed, self._on_embeddings_changed),
        ]
        rev = review.events
        self._slots["review"] = [
            (rev.history_changed, self._on_history_changed),
            (rev.predictions_changed, self._on_predictions_changed),
            (rev.metrics_changed, self._on_metrics_changed),
            (rev.settings_changed, self._on_settings_changed),
        ]
        for group in ("table", "review"):
            for signal, slot in self._slots[group]:
                signal.connect(slot)
        if not table.classes and PRESET_KEY not in table.meta:
            review.apply_preset(DEFAULT_PRESET)  # a new project: the class bar is full
        self.gallery.clear_queue()
        self._on_history_changed(review.can_undo, review.can_redo)
        self._on_metrics_changed(getattr(review, "last_metrics", None))
        self._sync_controls()
        self.group_by_combo.blockSignals(True)  # per slide, as `hemofm report`
        self.group_by_combo.setCurrentIndex(self.group_by_combo.findData(DEFAULT_GROUP_BY))
        self.group_by_combo.blockSignals(False)
        self.rebuild()

    def _show_read_only(self, table: CellTable) -> None:
        from napari_hemofm.core.io import read_only_reason

        reason = read_only_reason(table)
        self.read_only_banner.setText(reason or "")
        self.read_only_banner.setVisible(reason is not None)
        self._class_bar.setEnabled(reason is None)

    def _sync_controls(self) -> None:
        review = self.review
        self.preset_combo.blockSignals(True)
        self.preset_combo.setCurrentIndex(max(self.preset_combo.findData(review.preset), 0))
        self.preset_combo.blockSignals(False)
        for widget, value in (
            (self.threshold_spin, review.threshold),
            (self.probe_combo, self.probe_combo.findData(review.probe_kind)),
        ):
            widget.blockSignals(True)
            if isinstance(widget, QDoubleSpinBox):
                widget.setValue(float(value))
            else:
                widget.setCurrentIndex(max(int(value), 0))
            widget.blockSignals(False)

    def rebuild(self) -> None:
        """Rebuild the class bar and every section from the review (not per click)."""
        self._rebuild_timer.stop()
        self._all_predictions_dirty = False
        review = self.review
        table = review.table
        classes = tuple(review.classes)
        self._settings_seen = (review.threshold, tuple(table.classes))
        if getattr(self, "_bar_classes", None) != (classes, tuple(table.classes)):
            self._rebuild_class_bar()
            self._bar_classes = (classes, tuple(table.classes))
        sections = review.sections() if table.n_cells else {}
        names = list(sections) or [*classes, UNIDENTIFIED, UNLABELLED, NOT_CLASSED]
        specs = self._section_specs(names)
        self.gallery.set_content(table, table.classes, specs, sections)
        self.gallery.set_selected(self.session.selected)
        self._refresh_scopes()
        self._schedule_counts()

    def _section_specs(self, names: Sequence[str]) -> list[SectionSpec]:
        classes = self.review.classes
        specs = []
        for name in names:
            if name == UNIDENTIFIED:
                specs.append(
                    SectionSpec(
                        name,
                        f"{UNIDENTIFIED}  (confidence < {self.review.threshold:.2f}, "
                        "or unlike the labelled cells)",
                        MISSING_COLOR,
                        "unidentified",
                        droppable=False,
                    )
                )
            elif name == UNLABELLED:
                specs.append(
                    SectionSpec(
                        name,
                        f"{UNLABELLED}  (no prediction yet)",
                        "#3a3d44",
                        "unlabelled",
                        droppable=False,
                    )
                )
            elif name == NOT_CLASSED:
                specs.append(
                    SectionSpec(
                        name,
                        f"0 · {NOT_CLASSED}",
                        self._class_color(name),
                        "not_classed",
                        drop_label=NOT_CLASSED,
                    )
                )
            else:
                i = classes.index(name) if name in classes else 99
                title = f"{i + 1} · {name}" if i < 9 else name
                specs.append(
                    SectionSpec(name, title, self._class_color(name), "class", drop_label=name)
                )
        return specs

    def _class_color(self, name: str) -> str:
        classes = self.table.classes
        if name in classes:
            return class_hex(classes.index(name))
        return NOT_CLASSED_COLOR if name == NOT_CLASSED else MISSING_COLOR

    def _schedule_rebuild(self) -> None:
        self._rebuild_timer.start()

    def _schedule_counts(self) -> None:
        self._count_timer.start()

    # --------------------------------------------------------- table events
    def _on_table_replaced(self, table: CellTable) -> None:
        if not on_main_thread(self._bridge, self._on_table_replaced, table):
            return
        review, _ = _review_state(self.viewer)
        if review is not self.review:
            self._attach(review)

    def _on_review_replaced(self, review: Review) -> None:
        if not on_main_thread(self._bridge, self._on_review_replaced, review):
            return
        if review is not self.review:
            self._attach(review)

    def _on_labels_changed(self, cell_ids: Sequence[str], _labels: Sequence[Any]) -> None:
        if not on_main_thread(self._bridge, self._on_labels_changed, cell_ids, _labels):
            return
        if self._rebuild_timer.isActive():
            self.rebuild()  # one was due anyway (it reads these labels too)
            return
        rows = self.table.positions(list(cell_ids))
        self._move(rows)
        self._schedule_counts()

    def _move(self, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        if not self.gallery.move_rows(rows, self.review.section_of(rows)):
            self._schedule_rebuild()

    def _on_columns_changed(self, names: Sequence[str]) -> None:
        if not on_main_thread(self._bridge, self._on_columns_changed, names):
            return
        if self.gallery.mark_column in names:
            self.gallery.read_marks()  # e.g. the map clustered the cells
        if {"batch", "slide"} & set(names):
            self._refresh_scopes()
        if {"prediction", "confidence"} & set(names):
            # Review.apply_result follows this with predictions_changed(rows), which moves
            # only those rows; a write by anyone else is caught by this rebuild
            self._all_predictions_dirty = True
            self._schedule_rebuild()

    def _on_predictions_changed(self, rows: np.ndarray) -> None:
        if not on_main_thread(self._bridge, self._on_predictions_changed, rows):
            return
        rows = np.asarray(rows, np.int64)
        n = self.table.n_cells
        if self._all_predictions_dirty and self._rebuild_timer.isActive():
            if len(rows) * 2 >= n:
                return  # most cells changed: the scheduled rebuild does it in one go
            self._rebuild_timer.stop()
            self._all_predictions_dirty = False
        self._move(rows)
        self._schedule_counts()

    def _on_classes_changed(self, _classes: Sequence[str]) -> None:
        if not on_main_thread(self._bridge, self._on_classes_changed, _classes):
            return
        self._schedule_rebuild()

    def _on_cells_added(self, _start: int, _stop: int) -> None:
        if not on_main_thread(self._bridge, self._on_cells_added, _start, _stop):
            return
        self._schedule_rebuild()

    def _on_embeddings_changed(self, key: str) -> None:
        if not on_main_thread(self._bridge, self._on_embeddings_changed, key):
            return
        if key == "X_umap" and self.gallery.sort_mode == "map":
            self.gallery.set_sort("map")

    # -------------------------------------------------------- review events
    def _on_history_changed(self, can_undo: bool, can_redo: bool) -> None:
        if not on_main_thread(self._bridge, self._on_history_changed, can_undo, can_redo):
            return
        self.undo_button.setEnabled(bool(can_undo))
        self.redo_button.setEnabled(bool(can_redo))

    def _on_metrics_changed(self, metrics: Any) -> None:
        if not on_main_thread(self._bridge, self._on_metrics_changed, metrics):
            return
        metrics = metrics if isinstance(metrics, dict) else None
        probe = getattr(self.review, "probe", None)
        k = getattr(probe, "k", None) or getattr(self.review, "_k", None)
        text = format_metrics(metrics, k=k)
        self.metrics_label.setText(text)
        note = str((metrics or {}).get("note") or "")
        self.metrics_label.setToolTip(
            f"{text}\nCross-validated accuracy of the probe on the labelled cells"
            + (f"\n{note}" if note else "")
        )

    def _on_settings_changed(self) -> None:
        if not on_main_thread(self._bridge, self._on_settings_changed):
            return
        self._sync_controls()
        seen = (self.review.threshold, tuple(self.table.classes))
        if seen != self._settings_seen or self._rebuild_timer.isActive():
            self.rebuild()  # threshold or classes: every section may change
        else:
            self._schedule_counts()

    def _on_busy_changed(self, busy: bool) -> None:
        if not on_main_thread(self._bridge, self._on_busy_changed, busy):
            return
        retraining = bool(getattr(self.retrainer, "retraining", busy))
        self._busy = bool(busy)
        self.busy_bar.setVisible(bool(busy))
        self.busy_bar.setToolTip(
            "Retraining the probe..." if retraining else "Computing cross-validated metrics..."
        )

    # ----------------------------------------------------------- selection
    def _on_gallery_selection(self, rows: np.ndarray) -> None:
        self.session.select(rows, origin=GALLERY_ORIGIN)

    def _on_selection_changed(self, rows: np.ndarray, origin: str) -> None:
        if not on_main_thread(self._bridge, self._on_selection_changed, rows, origin):
            return
        if len(rows) and int(np.max(rows)) >= len(self.gallery._section_code):
            self._schedule_rebuild()  # cells arrived that the gallery has not seen yet
            return
        self.gallery.set_selected(rows, scroll=origin != GALLERY_ORIGIN)
        self.show_history(str(self.table.cell_ids[int(rows[0])]) if len(rows) == 1 else None)

    # ---------------------------------------------------------------- keys
    def _on_key_action(self, action: str, arg: Any) -> None:
        if action == "key":
            self.relabel_key(int(arg))
        elif action == "clear":
            self.relabel_selected(None)
        elif action == "undo":
            self.undo()
        elif action == "redo":
            self.redo()

    def keyPressEvent(self, event: Any) -> None:
        """The review keys work anywhere in the widget (not only over the gallery)."""
        if self.gallery.handle_key(event):
            event.accept()
            return
        super().keyPressEvent(event)

    def _on_cells_dropped(self, ids: list[str], section: str) -> None:
        label = self.gallery.drop_label(section)
        if label is not NO_DROP:
            self.relabel(ids, label)

    # ------------------------------------------------------- threshold etc.
    def _on_threshold_changed(self, value: float) -> None:
        if abs(float(value) - self.review.threshold) > 1e-9:
            self.review.threshold = float(value)  # -> settings_changed -> rebuild

    def _on_preset_changed(self, _index: int) -> None:
        name = self.preset_combo.currentData()
        if name and (name != self.review.preset or PRESET_KEY not in self.table.meta):
            self.review.apply_preset(name)  # -> settings_changed -> rebuild

    def _on_probe_changed(self, _index: int) -> None:
        kind = self.probe_combo.currentData()
        if kind != self.review.probe_kind:
            self.review.probe_kind = kind  # the retrainer refits in its worker
            self._say(f"Probe: {self.probe_combo.currentText()} (refitting...)")

    def _on_sort_changed(self, _index: int) -> None:
        self.gallery.set_sort(self.sort_combo.currentData())

    # --------------------------------------------------------- class dialogs
    def _ask_add_class(self) -> None:
        name, ok = QInputDialog.getText(self, "Add a class", "Class name:")
        if ok and name.strip():
            try:
                self.add_class(name)
            except ValueError as exc:
                self._say(str(exc))

    def _ask_rename_class(self, old: str | None = None) -> None:
        classes = self.review.classes
        if not classes:
            self._say("No class to rename.")
            return
        if old is None:
            old, ok = QInputDialog.getItem(self, "Rename a class", "Class:", classes, 0, False)
            if not ok:
                return
        new, ok = QInputDialog.getText(self, "Rename a class", f"New name of {old}:", text=old)
        if ok and new.strip() and new.strip() != old:
            try:
                self.rename_class(old, new)
            except ValueError as exc:
                self._say(str(exc))

    def _ask_merge_classes(self) -> None:
        classes = self.review.classes
        if len(classes) < 2:
            self._say("Merging needs two classes.")
            return
        source, ok = QInputDialog.getItem(self, "Merge classes", "Merge:", classes, 0, False)
        if not ok:
            return
        others = [c for c in classes if c != source]
        target, ok = QInputDialog.getItem(
            self, "Merge classes", f"{source} into:", others, 0, False
        )
        if ok:
            self._merge_checked([source], target)

    def _merge_checked(self, sources: list[str], target: str) -> None:
        try:
            self.merge_classes(sources, target)
        except ValueError as exc:
            self._say(str(exc))

    # ---------------------------------------------------------------- misc
    # ------------------------------------------------------------ probe files
    def save_probe(self, path: str) -> str:
        """Save the trained probe to ``path`` (``.npz``: arrays and JSON, no pickle)."""
        probe = self.review.probe
        if probe is None:
            self._say("No probe yet: label cells of at least two classes first.")
            return ""
        probe.model = self.review.table.meta.get("model")
        written = str(probe.save(path))
        self._say(f"Probe saved to {written}")
        return written

    def use_reference(self, path: str | None) -> int:
        """Learn also from the labelled cells of a saved probe (None forgets it)."""
        try:
            n = self.review.use_reference(path)
        except (OSError, ValueError) as exc:
            self._say(f"Could not use {path}: {exc}")
            return 0
        if path is None:
            self._say("The saved probe's cells no longer vote.")
        else:
            self._say(
                f"{n} labelled cells of {self.review.reference[2]} now train the probe "
                "too (never shown or counted); retraining..."
            )
        return n

    def _ask_save_probe(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save probe", "probe.npz", "Probe (*.npz)")
        if path:
            self.save_probe(path)

    def _ask_use_reference(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Saved probe", "", "Probe (*.npz)")
        if path:
            self.use_reference(path)

    def _say(self, text: str) -> None:
        self.status.setText(text)

    def closeEvent(self, event: Any) -> None:
        """Stop background work and stop listening to the session and the review."""
        self._shutdown()
        super().closeEvent(event)

    def _shutdown(self) -> None:
        self._rebuild_timer.stop()
        self._count_timer.stop()
        self.gallery.stop()
        if self._queue_worker is not None:
            self._queue_worker.quit()
        disconnect_groups(self._slots)
        self._lifeline.cut()


def _short(group: str, width: int = 40) -> str:
    """A long path shortened from the left for a combo box."""
    text = str(group)
    return text if len(text) <= width else "…" + text[-(width - 1) :]

"""The "Embed cells" panel: find the cells in image layers, embed them, fill the session.

The panel turns layers into :class:`~napari_hemofm.core.embed_job.ImageInput` s on the
main thread, runs the core embed job (:func:`~napari_hemofm.core.embed_job.run_embed_job`,
the same call as ``hemofm embed`` and the API) in a ``thread_worker`` generator that
yields progress, and commits the outcome into the viewer's cell table on the main
thread (:func:`~napari_hemofm.core.embed_job.commit_outcome`);
:class:`~._layers.CellsLayerSync` then shows a ``"<image> cells"`` Points layer on
each image. The model / weights / device / batch size / stain normalisation form is a
magicgui ``Container``; the image list is hand-built Qt (checkboxes, editable batch and
slide cells, several rows selected at once).

What a run does to the session (also in ``docs/embed-panel.md``): images that are new
or whose settings (cells from, pixel size, the Labels / Points data) changed are
detected; known images keep their cells, ids, labels and embeddings; a batch or slide
edit only sets those columns. Cell ids are ``"<folder>/<file>#<n>"`` for an image
opened from a file (as the CLI gives) and ``"<layer>/<layer>#<n>"`` otherwise, and never
change. Another model or stain setting is refused unless "Re-embed all cells" is
ticked. Cancel changes nothing.

Errors (no image checked, no cells found, missing weights, CUDA absent) are shown in
the panel and as a napari notification, never as a traceback dialog.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_hemofm._widgets._docking import ElidedLabel, setup_dock
from napari_hemofm._widgets._layers import (
    CELLS_KEY,
    MONTAGE_KEY,
    SOURCE_KEY,
    get_layer_sync,
    source_key,
)
from napari_hemofm._widgets._session import get_session
from napari_hemofm._widgets._workers import start_worker
from napari_hemofm.core.embed_job import (
    EmbedJob,
    EmbedOutcome,
    ImageInput,
    TableState,
    commit_outcome,
    run_embed_job,
)
from napari_hemofm.core.models import MODEL_NAMES

if TYPE_CHECKING:
    import napari

__all__ = ["DETECT", "EmbedWidget", "PanelRun", "build_form"]

log = logging.getLogger(__name__)

#: Text of the "cells from" choice that runs WBC detection.
DETECT = "Detect WBCs"
DEFAULT_MODEL = "handcrafted"
DEFAULT_BATCH_SIZE = 32
#: Columns of the image list.
NAME_COL, BATCH_COL, SLIDE_COL = 0, 1, 2


class PanelRun:
    """One run of the panel: the job, its inputs and a snapshot of the table (plain data).

    Attributes
    ----------
    job : EmbedJob
    inputs : list of ImageInput
    state : TableState
        The session's table as it was when Run was pressed.
    reembed : bool
    images : dict of str to array
        In-memory images of the table's other sources (layers).
    """

    def __init__(
        self,
        job: EmbedJob,
        inputs: list[ImageInput],
        state: TableState,
        *,
        reembed: bool = False,
        images: dict[str, Any] | None = None,
    ) -> None:
        self.job = job
        self.inputs = inputs
        self.state = state
        self.reembed = reembed
        self.images = dict(images or {})


Progress = tuple[str, int, int]
"""``(what, done, total)`` yielded by the worker generators."""


def _in_thread(fn: Callable[..., Any], what: str) -> Generator:
    """Run ``fn(progress, stage)`` in a helper thread; yield its progress; return its result.

    The core reports progress through callbacks; a generator cannot yield from inside
    a callback, so the work runs beside it and the callbacks feed a queue.
    """
    q: queue.Queue = queue.Queue()
    box: dict[str, Any] = {"what": what}

    def progress(done: int, total: int) -> None:
        q.put((box["what"], int(done), int(total)))

    def stage(name: str) -> None:
        box["what"] = name
        q.put((name, 0, 0))

    def target() -> None:
        try:
            box["result"] = fn(progress, stage)
        except BaseException as exc:
            box["error"] = exc
        finally:
            q.put(None)

    thread = threading.Thread(target=target, name=f"hemofm-{what}", daemon=True)
    thread.start()
    while True:
        item = q.get()
        if item is None:
            break
        yield item
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


def run_panel_job(
    run: PanelRun, cancel: threading.Event
) -> Generator[Progress, None, EmbedOutcome]:
    """The panel worker's body: the core job, its progress yielded (no Qt, no napari)."""
    outcome = yield from _in_thread(
        lambda progress, stage: run_embed_job(
            run.state,
            run.job,
            run.inputs,
            reembed=run.reembed,
            images=run.images,
            progress=progress,
            stage=stage,
            cancel=cancel,
        ),
        "load model",
    )
    return outcome


class _DownloadCancelled(Exception):
    """Raised from the download progress callback to stop it."""


def run_download_job(
    model: str, cancel: threading.Event
) -> Generator[Progress, None, tuple[str | None, str]]:
    """Download a model's weights into the cache (the body of the download worker).

    Returns
    -------
    (str or None, str)
        The weights path (None when it failed or was cancelled) and a message.
    """
    from napari_hemofm.core.models import WeightsError
    from napari_hemofm.core.weights import resolve_weights

    def fetch(progress: Callable[[int, int], None], stage: Callable[[str], None]) -> Path:
        def report(done: int, total: int) -> None:
            if cancel.is_set():
                raise _DownloadCancelled
            progress(done, total)

        return resolve_weights(model, None, download=True, progress=report)

    try:
        path = yield from _in_thread(fetch, "download")
    except _DownloadCancelled:
        return None, "Download cancelled."
    except WeightsError as exc:
        return None, str(exc)
    except Exception as exc:
        log.exception("download failed")
        return None, f"Download failed: {type(exc).__name__}: {exc}"
    return str(path), f"Weights ready: {path}"


# ----------------------------------------------------------------------------- panel
def build_form() -> Any:
    """The model / weights / device / batch-size / stain normalisation form (magicgui).

    Returns
    -------
    magicgui.widgets.Container
        Widgets ``model, weights, browse, download, device, batch_size, stain_norm,
        stain_reference, reembed``.
    """
    from magicgui.widgets import CheckBox, ComboBox, Container, LineEdit, PushButton, SpinBox

    from napari_hemofm.core.stain import STAIN_METHODS

    model = ComboBox(name="model", label="Model", choices=list(MODEL_NAMES), value=DEFAULT_MODEL)
    model.tooltip = (
        "handcrafted: colour, texture and shape features, no weights (offline). "
        "dinobloom-s/b/l/g: the DinoBloom ViTs (weights needed)."
    )
    weights = LineEdit(name="weights", label="Weights")
    weights.native.setPlaceholderText("from the cache")
    weights.tooltip = "A DinoBloom .pth or .safetensors file; empty: look in the weights cache."
    browse = PushButton(name="browse", text="Browse…", label="")
    download = PushButton(name="download", text="Download weights", label="")
    device = ComboBox(name="device", label="Device", choices=["cpu"], value="cpu")
    batch_size = SpinBox(
        name="batch_size", label="Batch size", min=1, max=4096, value=DEFAULT_BATCH_SIZE
    )
    batch_size.tooltip = "Cells per forward pass."
    stain = ComboBox(
        name="stain_norm", label="Stain norm.", choices=list(STAIN_METHODS), value="none"
    )
    stain.tooltip = (
        "Map each image's stain colours onto a reference before embedding (Reinhard: "
        "colour statistics; Macenko: stain vectors). One setting per project."
    )
    reference = LineEdit(name="stain_reference", label="Reference")
    reference.native.setPlaceholderText("built in; or a batch name / image file")
    reference.tooltip = "Empty: the built-in reference; a batch name; or an image file."
    reembed = CheckBox(name="reembed", text="Re-embed all cells", value=False)
    reembed.tooltip = (
        "Needed to switch the model, weights or stain setting of cells already embedded: "
        "every cell is embedded again (ids and labels are kept)."
    )
    return Container(
        widgets=[model, weights, browse, download, device, batch_size, stain, reference, reembed],
        labels=True,
    )


def _cuda_available() -> bool:
    """Whether to offer the ``cuda`` device, without importing torch on the GUI thread.

    When torch is already imported it is asked; otherwise an NVIDIA driver is enough (a
    torch without CUDA then fails the run with a clear DeviceError message).
    """
    import shutil
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            return bool(torch.cuda.is_available())
        except Exception:
            return False
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def _set_all(events: list[threading.Event], *_: Any) -> None:
    for event in events:
        event.set()


class EmbedWidget(QWidget):
    """The "Embed cells" dock widget.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer whose image layers are embedded and whose session is filled.

    Notes
    -----
    Scriptable for tests and the demo: check images with :meth:`set_checked`, edit
    batches and slides with :meth:`set_batch` / :meth:`set_slide` (or several at once
    with :meth:`set_batch_of`), pick the source with :meth:`set_cell_source`, then
    :meth:`run` returns the worker (wait for ``worker.finished``); :attr:`status` holds
    the last message. :attr:`form` is the magicgui parameter form.
    """

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.session = get_session(viewer)
        self.sync = get_layer_sync(viewer)
        self._worker: Any = None
        self._download_worker: Any = None
        self._cancel = threading.Event()
        # a closed panel stops its workers (they hold no reference to the panel)
        self._live_events: list[threading.Event] = []
        self.destroyed.connect(functools.partial(_set_all, self._live_events))
        self._pbar: Any = None
        # layer name -> (checked, batch, slide); batch / slide "" = the default
        self._image_state: dict[str, tuple[bool, str, str]] = {}
        self._run: PanelRun | None = None
        self.last_outcome: EmbedOutcome | None = None
        self._build_ui()
        setup_dock(self)
        self._connect_viewer()
        self._refresh_layers()
        self._on_model_changed()
        self._probe_devices()

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)

        images = QGroupBox("Images")
        box = QVBoxLayout(images)
        self.image_table = QTableWidget(0, 3)
        self.image_table.setHorizontalHeaderLabels(["Image layer", "Batch", "Slide"])
        header = self.image_table.horizontalHeader()
        for col in (NAME_COL, BATCH_COL, SLIDE_COL):
            header.setSectionResizeMode(col, QHeaderView.Stretch)
        self.image_table.verticalHeader().setVisible(False)
        self.image_table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.image_table.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.image_table.setToolTip(
            "Tick the images to embed; double-click a batch or slide to edit it. Images "
            "from one folder share its name as batch. Select several rows to set their "
            "batch or slide at once below."
        )
        self.image_table.itemChanged.connect(self._on_image_item_changed)
        box.addWidget(self.image_table)
        many = QHBoxLayout()
        self.group_edit = QLineEdit()
        self.group_edit.setPlaceholderText("name for the selected images")
        self.set_batch_button = QPushButton("Set batch")
        self.set_batch_button.setToolTip(
            "Give the selected images (or the ticked ones) this batch."
        )
        self.set_batch_button.clicked.connect(lambda: self._apply_to_selected(BATCH_COL))
        self.set_slide_button = QPushButton("Set slide")
        self.set_slide_button.setToolTip(
            "Give the selected images (or the ticked ones) this slide."
        )
        self.set_slide_button.clicked.connect(lambda: self._apply_to_selected(SLIDE_COL))
        many.addWidget(self.group_edit, 1)
        many.addWidget(self.set_batch_button)
        many.addWidget(self.set_slide_button)
        box.addLayout(many)
        layout.addWidget(images)

        detect = QFormLayout()
        self.source_combo = QComboBox()
        self.source_combo.setToolTip(
            "Detect white cells in each image, or take one cell per label of a Labels "
            "layer / per point of a Points layer (in the image's pixel grid)."
        )
        detect.addRow("Cells from", self.source_combo)
        self.pixel_size = QDoubleSpinBox()
        self.pixel_size.setRange(0.0, 100.0)
        self.pixel_size.setDecimals(4)
        self.pixel_size.setSingleStep(0.01)
        self.pixel_size.setSuffix(" µm")
        self.pixel_size.setSpecialValueText("auto")
        self.pixel_size.setToolTip(
            "Micrometres per pixel. 'auto': the layer's metadata['pixel_size_um'] when "
            "there is one, else estimated from the red cells."
        )
        detect.addRow("Pixel size", self.pixel_size)
        layout.addLayout(detect)

        self.form = build_form()
        self.form.native.layout().setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.form.native)
        # the form's Qt widgets, by the names scripts and the demo use
        self.model_combo = self.form.model.native
        self.weights_edit = self.form.weights.native
        self.browse_button = self.form.browse.native
        self.download_button = self.form.download.native
        self.device_combo = self.form.device.native
        self.batch_size = self.form.batch_size.native
        self.form.model.changed.connect(self._on_model_changed)
        self.weights_edit.editingFinished.connect(self._update_weights_status)
        self.form.browse.changed.connect(self._browse_weights)
        self.form.download.changed.connect(self.download)
        self.weights_status = QLabel()
        self.weights_status.setWordWrap(True)
        self.weights_status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.weights_status.setMinimumHeight(2 * self.fontMetrics().lineSpacing() + 4)
        layout.addWidget(self.weights_status)
        self.numbers_check = QCheckBox("Show cell numbers")
        self.numbers_check.setToolTip("Write each cell's number (#n of its id) on the image.")
        self.numbers_check.toggled.connect(self._on_numbers_toggled)
        layout.addWidget(self.numbers_check)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress_bar = QProgressBar()
        self.progress_bar.setVisible(False)
        layout.addWidget(self.progress_bar)
        self.status_label = ElidedLabel()  # one line; the full text in its tooltip
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.status_label)
        layout.addStretch(1)

    def _connect_viewer(self) -> None:
        events = self.viewer.layers.events
        events.inserted.connect(self._on_layers_changed)
        events.removed.connect(self._on_layers_changed)
        events.moved.connect(self._on_layers_changed)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._on_layers_changed)

    def _on_layers_changed(self, event: Any = None) -> None:
        layer = getattr(event, "value", None)
        if getattr(event, "type", "") == "inserted" and layer is not None:
            layer.events.name.connect(self._on_layers_changed)
        self._refresh_layers()

    # --------------------------------------------------------------- layers
    def _image_layers(self) -> list[Any]:
        from napari.layers import Image

        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Image) and layer.ndim == 2 and MONTAGE_KEY not in layer.metadata
        ]

    def _identity(self, layer: Any) -> tuple[str, str, str]:
        """``(source, input name, rel)`` of an image layer: its file, else its name."""
        key = source_key(layer)
        if key != layer.name and Path(key).is_file():
            path = Path(os.path.abspath(key))
            return str(path), path.parent.name or "root", path.name
        return key, layer.name, layer.name

    def _defaults(self, layers: list[Any]) -> dict[str, tuple[str, str]]:
        """Default ``(batch, slide)`` per layer.

        The table's when it holds cells of the image; else the file's folder name
        (shared by the images of one folder) and the smear.
        """
        from napari_hemofm.core.inputs import default_batch_names, default_slide

        obs = self.session.table.obs
        first = obs.drop_duplicates("source").set_index("source") if len(obs) else None
        ids = [self._identity(layer) for layer in layers]
        files = [
            src for (src, name, rel), layer in zip(ids, layers, strict=True) if src != layer.name
        ]
        folder_batch = dict(zip(files, default_batch_names(files), strict=True)) if files else {}
        out = {}
        for layer, (src, name, rel) in zip(layers, ids, strict=True):
            if first is not None and src in first.index:
                row = first.loc[src]
                slide = row.get("slide")
                batch = str(row["batch"])
                out[layer.name] = (
                    batch,
                    str(slide) if pd.notna(slide) else batch,
                )
                continue
            batch = folder_batch.get(src, layer.name)
            prefix = f"{name}/{rel}" if name != rel else rel
            out[layer.name] = (batch, default_slide("smear", prefix, batch))
        return out

    def _refresh_layers(self) -> None:
        from napari.layers import Labels, Points

        self._remember_image_state()
        table = self.image_table
        table.blockSignals(True)
        try:
            layers = self._image_layers()
            defaults = self._defaults(layers)
            table.setRowCount(len(layers))
            for row, layer in enumerate(layers):
                checked, batch, slide = self._image_state.get(layer.name, (True, "", ""))
                d_batch, d_slide = defaults[layer.name]
                name_item = QTableWidgetItem(layer.name)
                name_item.setFlags(Qt.ItemIsUserCheckable | Qt.ItemIsEnabled | Qt.ItemIsSelectable)
                name_item.setCheckState(Qt.Checked if checked else Qt.Unchecked)
                name_item.setToolTip(layer.name)
                table.setItem(row, NAME_COL, name_item)
                table.setItem(row, BATCH_COL, QTableWidgetItem(batch or d_batch))
                table.setItem(row, SLIDE_COL, QTableWidgetItem(slide or d_slide))
        finally:
            table.blockSignals(False)
        self._fit_table_height()
        current = self.source_combo.currentText()
        self.source_combo.blockSignals(True)
        try:
            self.source_combo.clear()
            self.source_combo.addItem(DETECT, None)
            for layer in self.viewer.layers:
                if isinstance(layer, Labels) and layer.ndim == 2:
                    self.source_combo.addItem(f"Labels: {layer.name}", layer.name)
                elif isinstance(layer, Points) and CELLS_KEY not in layer.metadata:
                    self.source_combo.addItem(f"Points: {layer.name}", layer.name)
            index = self.source_combo.findText(current)
            self.source_combo.setCurrentIndex(max(index, 0))
        finally:
            self.source_combo.blockSignals(False)

    def showEvent(self, event: Any) -> None:
        """Size the image list once the theme's row height is known."""
        super().showEvent(event)
        self._fit_table_height()

    def _fit_table_height(self) -> None:
        """Show up to six images without scrolling."""
        table = self.image_table
        rows = min(max(table.rowCount(), 2), 6)
        row_height = table.verticalHeader().defaultSectionSize()
        if table.rowCount():
            row_height = max(row_height, table.sizeHintForRow(0), table.rowHeight(0))
        header = table.horizontalHeader().sizeHint().height()
        height = header + rows * row_height + 2 * table.frameWidth() + 4
        table.setMinimumHeight(height)
        table.setMaximumHeight(height if table.rowCount() <= 6 else 16777215)

    def _remember_image_state(self) -> None:
        """Remember ticks and edited names (an unedited default stays a default)."""
        layers = {layer.name: layer for layer in self._image_layers()}
        defaults = self._defaults([layers[n] for n in self._row_names() if n in layers])
        for row in range(self.image_table.rowCount()):
            items = [self.image_table.item(row, c) for c in (NAME_COL, BATCH_COL, SLIDE_COL)]
            if any(item is None for item in items):
                continue
            name = items[0].text()
            d_batch, d_slide = defaults.get(name, ("", ""))
            batch = items[1].text().strip()
            slide = items[2].text().strip()
            self._image_state[name] = (
                items[0].checkState() == Qt.Checked,
                "" if batch == d_batch else batch,
                "" if slide == d_slide else slide,
            )

    def _row_names(self) -> list[str]:
        return [
            self.image_table.item(row, NAME_COL).text()
            for row in range(self.image_table.rowCount())
            if self.image_table.item(row, NAME_COL) is not None
        ]

    def _on_image_item_changed(self, item: QTableWidgetItem) -> None:
        self._remember_image_state()

    def image_choices(self) -> list[tuple[str, bool, str]]:
        """``(layer name, checked, batch)`` for every image layer listed in the panel."""
        return [(n, c, b) for n, c, b, _ in self.image_rows()]

    def image_rows(self) -> list[tuple[str, bool, str, str]]:
        """``(layer name, checked, batch, slide)`` for every image layer in the panel."""
        out = []
        for row in range(self.image_table.rowCount()):
            name = self.image_table.item(row, NAME_COL).text()
            checked = self.image_table.item(row, NAME_COL).checkState() == Qt.Checked
            batch = self.image_table.item(row, BATCH_COL).text().strip() or name
            slide = self.image_table.item(row, SLIDE_COL).text().strip() or batch
            out.append((name, checked, batch, slide))
        return out

    def set_checked(self, name: str, checked: bool) -> None:
        """Tick or untick the image layer ``name``."""
        row = self._row_of(name)
        self.image_table.item(row, NAME_COL).setCheckState(Qt.Checked if checked else Qt.Unchecked)

    def set_batch(self, name: str, batch: str) -> None:
        """Set the batch name of the image layer ``name`` (applied on Run; ids never change)."""
        self.image_table.item(self._row_of(name), BATCH_COL).setText(batch)

    def set_slide(self, name: str, slide: str) -> None:
        """Set the slide of the image layer ``name`` (applied on Run)."""
        self.image_table.item(self._row_of(name), SLIDE_COL).setText(slide)

    def set_batch_of(self, names: list[str], batch: str, *, column: str = "batch") -> None:
        """Set the batch (or, with ``column="slide"``, the slide) of several images."""
        col = BATCH_COL if column == "batch" else SLIDE_COL
        self.image_table.blockSignals(True)
        try:
            for name in names:
                self.image_table.item(self._row_of(name), col).setText(batch)
        finally:
            self.image_table.blockSignals(False)
        self._remember_image_state()

    def _apply_to_selected(self, col: int) -> None:
        text = self.group_edit.text().strip()
        if not text:
            self._show("Type a name first, then press Set batch / Set slide.", error=True)
            return
        rows = sorted({index.row() for index in self.image_table.selectedIndexes()})
        names = [self.image_table.item(r, NAME_COL).text() for r in rows]
        if not names:
            names = [n for n, checked, _ in self.image_choices() if checked]
        self.set_batch_of(names, text, column="batch" if col == BATCH_COL else "slide")
        what = "batch" if col == BATCH_COL else "slide"
        self._show(
            f"{what.capitalize()} of {len(names)} image(s) set to {text!r}; Run applies it."
        )

    def _row_of(self, name: str) -> int:
        for row in range(self.image_table.rowCount()):
            if self.image_table.item(row, NAME_COL).text() == name:
                return row
        raise KeyError(f"no image layer {name!r} in the panel")

    def set_cell_source(self, layer_name: str | None) -> None:
        """Take cells from a Labels / Points layer, or detect them (``None``)."""
        index = 0 if layer_name is None else self.source_combo.findData(layer_name)
        if index < 0:
            raise KeyError(f"no Labels or Points layer {layer_name!r}")
        self.source_combo.setCurrentIndex(index)

    # ---------------------------------------------------------------- model
    def _on_model_changed(self, *_: Any) -> None:
        from napari_hemofm.core.models import get_spec

        spec = get_spec(self.model_combo.currentText())
        needs = spec.needs_weights
        for w in (self.weights_edit, self.browse_button, self.download_button):
            w.setEnabled(needs and self._download_worker is None)
        if needs and os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0"):
            self.download_button.setEnabled(False)
            self.download_button.setToolTip("HF_HUB_OFFLINE is set: downloads are off.")
        else:
            self.download_button.setToolTip(
                f"Download {spec.display_name} from the Hugging Face hub into the cache"
                + (f" ({spec.download_size})" if spec.download_size else "")
                + "."
            )
        self._update_weights_status()

    def _update_weights_status(self) -> None:
        from napari_hemofm.core.models import WeightsError, get_spec
        from napari_hemofm.core.weights import resolve_weights

        spec = get_spec(self.model_combo.currentText())
        if not spec.needs_weights:
            self.weights_status.setText("No weights needed (runs offline).")
            return
        try:
            path = resolve_weights(spec.name, self.weights_edit.text().strip() or None)
        except WeightsError:
            self.weights_status.setText(
                f"No {spec.display_name} weights found: choose a file or download them."
            )
        else:
            self.weights_status.setText(f"Weights: {path}")

    def _browse_weights(self, *_: Any) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(
            self,
            "DinoBloom weights",
            self.weights_edit.text() or str(Path.home()),
            "Weights (*.pth *.safetensors);;All files (*)",
        )
        if path:
            self.weights_edit.setText(path)
            self._update_weights_status()

    def _probe_devices(self) -> None:
        if _cuda_available():
            self.form.device.choices = ("cpu", "cuda")

    def _on_numbers_toggled(self, on: bool) -> None:
        self.sync.show_numbers = on

    # ------------------------------------------------------------------ run
    @property
    def running(self) -> bool:
        """A run or a download is in progress."""
        return self._worker is not None or self._download_worker is not None

    @property
    def status(self) -> str:
        """The last message shown in the panel."""
        return self.status_label.text()

    def build_run(self) -> PanelRun:
        """Collect the panel's choices and the layers' data into a :class:`PanelRun`.

        Raises
        ------
        ValueError
            With a message for the user (nothing to embed, a layer that does not fit).
        """
        layers = {layer.name: layer for layer in self._image_layers()}
        rows = [r for r in self.image_rows() if r[1] and r[0] in layers]
        table = self.session.table
        state = TableState.of(table)
        pending = not state.embedded.all() if table.n_cells else False
        if not rows and not pending:
            raise ValueError("No image selected: tick at least one image layer.")
        px_value = self.pixel_size.value()
        cells_from: Literal["detect", "labels", "points"] = "detect"
        cells_data: dict[str, Any] = {}
        source_name = self.source_combo.currentData()
        if source_name is not None:
            cells_from, cells_data = self._cells_from_layer(
                self.viewer.layers[source_name], [layers[r[0]] for r in rows]
            )
        inputs = []
        used: set[str] = set()
        for name, _, batch, slide in rows:
            layer = layers[name]
            source, input_name, rel = self._identity(layer)
            if source in used:  # the same file opened twice: the second goes by its name
                source, input_name, rel = name, name, name
            used.add(source)
            data = layer.data[0] if layer.multiscale else layer.data
            px = px_value if px_value > 0 else layer.metadata.get("pixel_size_um")
            inputs.append(
                ImageInput(
                    source=source,
                    input_name=input_name,
                    rel=rel,
                    batch=batch,
                    slide=slide,
                    data=data,
                    cells_from=cells_from,
                    cells_data=cells_data.get(name),
                    pixel_size_um=float(px) if px else None,
                    name=name,
                )
            )
        values = self.form.asdict()
        job = EmbedJob(
            model=str(values["model"]),
            weights=str(values["weights"]).strip() or None,
            device=str(values["device"]),
            batch_size=int(values["batch_size"]),
            pixel_size_um=px_value or None,
            stain_norm=str(values["stain_norm"]),
            stain_reference=str(values["stain_reference"]).strip() or None,
        )
        return PanelRun(
            job, inputs, state, reembed=bool(values["reembed"]), images=self.session.images
        )

    def _cells_from_layer(
        self, source_layer: Any, images: list[Any]
    ) -> tuple[Literal["labels", "points"], dict[str, Any]]:
        from napari.layers import Labels

        out: dict[str, Any] = {}
        if isinstance(source_layer, Labels):
            labels = np.asarray(
                source_layer.data[0] if source_layer.multiscale else source_layer.data
            )
            for image in images:
                shape = tuple(
                    image.data.shape[:2] if not image.multiscale else image.data[0].shape[:2]
                )
                if labels.shape != shape:
                    raise ValueError(
                        f"Labels layer {source_layer.name!r} is {labels.shape[0]} x "
                        f"{labels.shape[1]} pixels but image {image.name!r} is "
                        f"{shape[0]} x {shape[1]}: they must match."
                    )
                out[image.name] = labels
            return "labels", out
        points = np.asarray(source_layer.data, dtype=float)
        for image in images:
            if len(points):
                world = np.array([source_layer.data_to_world(p) for p in points])
                yx = np.array([image.world_to_data(w) for w in world])[:, -2:]
            else:
                yx = np.zeros((0, 2))
            h, w = (image.data[0] if image.multiscale else image.data).shape[:2]
            inside = (yx[:, 0] >= 0) & (yx[:, 0] < h) & (yx[:, 1] >= 0) & (yx[:, 1] < w)
            out[image.name] = yx[inside]
        return "points", out

    def run(self) -> Any:
        """Start embedding; returns the worker (None when there is nothing to do).

        The worker is a napari ``GeneratorWorker``: wait for its ``finished`` signal.
        """
        from napari.qt.threading import thread_worker
        from napari.utils import progress

        if self.running:
            self._show("A run is already in progress.", error=True)
            return None
        try:
            run = self.build_run()
        except (ValueError, KeyError) as exc:
            self._show(str(exc).strip("'\""), error=True)
            return None
        # the session keeps the layer data (thumbnails, later runs), keyed by source;
        # the stamp keeps the layer tied to its cells if it is renamed
        for image in run.inputs:
            self.session.add_image(image.source, image.data)
            self.viewer.layers[image.name].metadata[SOURCE_KEY] = image.source
        self._run = run
        self._new_cancel_event()
        self._pbar = progress(total=0, desc="Embed cells")
        self.progress_bar.setRange(0, 0)
        self.progress_bar.setVisible(True)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self._show(f"Running {run.job.model} on {len(run.inputs)} image(s)…")
        worker = thread_worker(run_panel_job, start_thread=False)(run, self._cancel)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.errored.disconnect()  # no traceback dialog; the job returns its errors
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        start_worker(worker)  # a private pool: see _workers.py on Qt's global one
        return worker

    def _new_cancel_event(self) -> None:
        self._live_events[:] = [e for e in self._live_events if not e.is_set()]
        self._cancel = threading.Event()
        self._live_events.append(self._cancel)

    def cancel(self) -> None:
        """Ask the running job (or download) to stop; what is done so far is kept."""
        self._cancel.set()
        self.cancel_button.setEnabled(False)
        self._show("Cancelling…")

    def _on_progress(self, item: Progress) -> None:
        what, done, total = item
        # napari's progress events may process Qt events, so _on_finished can run
        # (and drop the bar) while we are in here: work on a local reference
        pbar = self._pbar
        if pbar is not None:
            if pbar.total != total:
                pbar.total = total
            if pbar.desc != what:
                pbar.set_description(what)
            pbar.update(done - pbar.n)
        if total > 0:
            self.progress_bar.setRange(0, total)
            self.progress_bar.setValue(done)
            self.progress_bar.setFormat(f"{what}: %v / %m")
        else:
            self.progress_bar.setRange(0, 0)
            self.progress_bar.setFormat(what)

    def _on_returned(self, outcome: EmbedOutcome) -> None:
        self.last_outcome = outcome
        run = self._run
        if outcome.error:
            self._show(outcome.error, error=True)
            return
        if outcome.cancelled:
            self._show("Cancelled: nothing changed.")
            return
        summary = commit_outcome(self.session.table, outcome)
        if summary.table is not None:
            self.session.set_table(summary.table)
        # stacked images: bring the top one of this run to the front, hide the others
        names = [layer.name for layer in self.viewer.layers]
        shown = [image for image in (run.inputs if run else []) if image.name in names]
        if len(shown) > 1:
            top = max(shown, key=lambda image: names.index(image.name))
            self.sync.show_only(top.source)
        self._show(summary.text, error=not summary.changed)

    def _on_errored(self, exc: BaseException) -> None:
        log.error("embedding worker failed", exc_info=exc)
        self._show(f"Embedding failed: {type(exc).__name__}: {exc}", error=True)

    def _on_finished(self) -> None:
        self._worker = None
        self._run = None
        self._end_work()

    def _end_work(self, after: Callable[[], None] | None = None) -> None:
        """Close the progress bars and give the controls back after a worker ended."""
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        try:
            self.progress_bar.setVisible(False)
            self.run_button.setEnabled(True)
            self.cancel_button.setEnabled(False)
            if after is not None:
                after()
        except RuntimeError:  # the panel was closed while the worker ran
            pass

    def _show(self, text: str, *, error: bool = False) -> None:
        try:
            self.status_label.setText(text)
            self.status_label.setStyleSheet("color: #e0604a;" if error else "")
        except RuntimeError:
            return
        if error:
            from napari.utils.notifications import show_warning

            show_warning(text.splitlines()[0] if text else text)

    # ------------------------------------------------------------- download
    def download(self) -> Any:
        """Download the chosen DinoBloom weights into the cache; returns the worker."""
        from napari.qt.threading import thread_worker
        from napari.utils import progress

        if self.running:
            self._show("Wait for the current run to finish.", error=True)
            return None
        model = self.model_combo.currentText()
        self._new_cancel_event()
        self._pbar = progress(total=0, desc=f"Download {model}")
        self.progress_bar.setRange(0, 0)
        self.progress_bar.setVisible(True)
        for w in (self.run_button, self.download_button, self.browse_button):
            w.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self._show(f"Downloading {model} weights…")
        worker = thread_worker(run_download_job, start_thread=False)(model, self._cancel)
        worker.yielded.connect(self._on_download_progress)
        worker.returned.connect(self._on_download_returned)
        worker.errored.disconnect()
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_download_finished)
        self._download_worker = worker
        start_worker(worker)  # a private pool: see _workers.py on Qt's global one
        return worker

    def _on_download_progress(self, item: Progress) -> None:
        what, done, total = item
        mb_done, mb_total = done / 2**20, total / 2**20
        self._on_progress((what, int(mb_done), int(mb_total)))
        if total:
            self.progress_bar.setFormat(f"download: {mb_done:.0f} / {mb_total:.0f} MB")

    def _on_download_returned(self, result: tuple[str | None, str]) -> None:
        path, text = result
        if path:
            self.weights_edit.setText(path)
        self._show(text, error=path is None)

    def _on_download_finished(self) -> None:
        self._download_worker = None
        self._end_work(after=self._on_model_changed)

"""The "Embed cells" panel: find the cells in image layers, embed them, fill the session.

The panel turns layers into arrays on the main thread, runs detection and the
embedding pipeline (:mod:`napari_hemofm.core.detect`, :mod:`napari_hemofm.core.embed`)
in a ``thread_worker`` generator that yields progress, and writes the result into the
viewer's cell table on the main thread; :class:`~._layers.CellsLayerSync` then shows
a ``"<image> cells"`` Points layer on each image.

What a run does to the session (also in ``docs/embed-panel.md``):

- the checked images' cells are detected (or taken from a Labels / Points layer) with
  ids ``"<batch>/<layer name>#<n>"``; an image embedded before has its cells
  *replaced* (labels carry over to a new cell with the same id and nearly the same
  centre);
- cells already in the session without an embedding (a crop folder, a project) are
  embedded too;
- when the model differs from the one the session's cells were embedded with, every
  cell of the session is re-embedded, so that all embeddings share one space;
- Cancel keeps what was embedded so far (cells without an embedding are not added),
  except when re-embedding under a new model, where a cancel changes nothing.

Errors (no image checked, no cells found, missing weights, CUDA absent) are shown in
the panel and as a napari notification, never as a traceback dialog.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
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
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_hemofm._widgets._layers import (
    CELLS_KEY,
    MONTAGE_KEY,
    SOURCE_KEY,
    get_layer_sync,
    source_key,
)
from napari_hemofm._widgets._session import get_session
from napari_hemofm._widgets._workers import start_worker
from napari_hemofm.core.models import MODEL_NAMES

if TYPE_CHECKING:
    import napari

    from napari_hemofm.core.cells import CellTable

__all__ = [
    "DETECT",
    "EmbedJob",
    "EmbedOutcome",
    "EmbedWidget",
    "ImageInput",
    "commit_outcome",
    "run_embed_job",
]

log = logging.getLogger(__name__)

#: Text of the "cells from" choice that runs WBC detection.
DETECT = "Detect WBCs"
DEFAULT_MODEL = "handcrafted"
DEFAULT_BATCH_SIZE = 32


# ----------------------------------------------------------------------------- the job
@dataclass
class ImageInput:
    """One image layer to embed.

    Attributes
    ----------
    name : str
        Layer name (the middle of the cell ids ``"<batch>/<name>#<n>"``).
    source : str
        The cells' ``source``: the image file the layer was opened from, else the
        layer name (see :func:`~._layers.source_key`).
    data : array
        The image (level 0 of a multiscale layer).
    batch : str
    pixel_size_um : float or None
    """

    name: str
    source: str
    data: Any
    batch: str
    pixel_size_um: float | None = None


@dataclass
class EmbedJob:
    """Everything a run needs, as plain data (built on the main thread).

    Attributes
    ----------
    images : list of ImageInput
        The checked images.
    source : {"detect", "labels", "points"}
        Where the cells come from.
    source_data : dict of str to array
        Per image name: the Labels array, or the (N, 2) points in that image's pixel
        coordinates (``"labels"`` / ``"points"`` only).
    model, weights, device : str
        Backbone name, weights path ("" = look in the cache), torch device.
    batch_size : int
        Cells per forward pass.
    pending : pandas.DataFrame
        Cells already in the session without an embedding (``source`` and crop box),
        indexed by their table row: embedded in the same run.
    others : pandas.DataFrame
        Every cell of the session not on a checked image, same columns: embedded in
        the same run when the model turns out to differ from ``old_meta``.
    other_images : dict of str to array
        In-memory images of the sources of ``pending`` and ``others``.
    old_meta : dict or None
        ``model`` and ``weights_sha256`` of the session's embeddings (None when no
        cell is embedded yet).
    table_id : int
        ``id()`` of the session's table when the job was built (a run whose table
        was replaced meanwhile is not committed).
    """

    images: list[ImageInput]
    source: Literal["detect", "labels", "points"] = "detect"
    source_data: dict[str, Any] = field(default_factory=dict)
    model: str = DEFAULT_MODEL
    weights: str = ""
    device: str = "cpu"
    batch_size: int = DEFAULT_BATCH_SIZE
    pending: pd.DataFrame = field(default_factory=lambda: _empty_rows())
    others: pd.DataFrame = field(default_factory=lambda: _empty_rows())
    other_images: dict[str, Any] = field(default_factory=dict)
    old_meta: dict[str, Any] | None = None
    table_id: int = 0


_ROW_COLUMNS = ["source", "x0", "y0", "x1", "y1"]


def _empty_rows() -> pd.DataFrame:
    return pd.DataFrame(columns=_ROW_COLUMNS, index=pd.Index([], dtype=np.int64, name="row"))


@dataclass
class EmbedOutcome:
    """What a run produced (returned by :func:`run_embed_job`).

    Attributes
    ----------
    cells : pandas.DataFrame
        New cells of the checked images (index = cell id).
    embeddings : ndarray of shape (len(cells), dim)
        Their embeddings (NaN rows were not embedded).
    extra_rows : ndarray of int
        Table rows of the session's cells embedded in this run (``job.pending``, or
        ``job.others`` when the model changed).
    extra_embeddings : ndarray of shape (len(extra_rows), dim)
        Their embeddings, same order.
    done, extra_done : ndarray of bool
        Which rows were embedded.
    model_changed : bool
        The session's earlier embeddings came from another model or other weights.
    meta : dict
        The backbone's facts (model, weights sha256, input size, ...).
    cancelled : bool
    error : str or None
        A message for the user when nothing could be done.
    skipped : list of (str, str)
        Sources that could not be read.
    seconds : float
    """

    cells: pd.DataFrame = field(default_factory=pd.DataFrame)
    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    extra_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    extra_embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    done: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    extra_done: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    model_changed: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False
    error: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


Progress = tuple[str, int, int]
"""``(what, done, total)`` yielded by the job generators."""


def _in_thread(fn: Callable[[Callable[[int, int], None]], Any], what: str) -> Generator:
    """Run ``fn(progress)`` in a helper thread; yield its progress; return its result.

    The core functions report progress through a callback; a generator cannot yield
    from inside a callback, so the work runs beside it and the callback feeds a queue.
    """
    q: queue.Queue = queue.Queue()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(lambda done, total: q.put((what, int(done), int(total))))
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


def _find_cells(job: EmbedJob, image: ImageInput) -> pd.DataFrame:
    """Cell rows of one image: detected, or one per label / point of the source layer."""
    from napari_hemofm.core.detect import cells_from_labels, cells_from_points
    from napari_hemofm.core.inputs import cells_from_image, detections_to_cells

    px = image.pixel_size_um
    if job.source == "detect":
        cells = cells_from_image(image.data, name=image.name, batch=image.batch, pixel_size_um=px)
        cells["source"] = image.source
        return cells
    if job.source == "labels":
        found = cells_from_labels(job.source_data[image.name], pixel_size_um=px)
    else:
        found = cells_from_points(job.source_data[image.name], pixel_size_um=px)
    return detections_to_cells(found, source=image.source, batch=image.batch, rel=image.name)


def run_embed_job(
    job: EmbedJob, cancel: threading.Event
) -> Generator[Progress, None, EmbedOutcome]:
    """Find and embed cells: the body of the panel's worker (no Qt, no napari).

    Parameters
    ----------
    job : EmbedJob
    cancel : threading.Event
        Set it to stop; checked between images and between batches.

    Yields
    ------
    (str, int, int)
        ``(what, done, total)``: ``"load model"``, ``"find cells"`` (images),
        ``"embed"`` (cells).

    Returns
    -------
    EmbedOutcome
        Expected failures come back in ``error``, not as exceptions.
    """
    from napari_hemofm.core.embed import embed_cells
    from napari_hemofm.core.models import DeviceError, WeightsError, load_backbone

    start = time.perf_counter()
    outcome = EmbedOutcome()
    try:
        yield ("load model", 0, 0)
        backbone = load_backbone(job.model, weights=job.weights or None, device=job.device)
        outcome.meta = dict(backbone.meta())
        outcome.model_changed = _meta_differs(job.old_meta, outcome.meta)
        extra = job.others if outcome.model_changed else job.pending
        outcome.extra_rows = extra.index.to_numpy(dtype=np.int64)
        frames = []
        n_img = len(job.images)
        for k, image in enumerate(job.images):
            if cancel.is_set():
                outcome.cancelled = True
                break
            yield ("find cells", k, n_img)
            frames.append(_find_cells(job, image))
        else:
            yield ("find cells", n_img, n_img)
        cells = pd.concat(frames) if frames else pd.DataFrame()
        outcome.cells = cells
        if outcome.cancelled:
            outcome.embeddings = np.zeros((len(cells), backbone.dim), np.float32)
            outcome.done = np.zeros(len(cells), bool)
            outcome.extra_embeddings = np.zeros((len(extra), backbone.dim), np.float32)
            outcome.extra_done = np.zeros(len(extra), bool)
            return outcome
        if len(cells) == 0 and len(extra) == 0:
            names = ", ".join(image.name for image in job.images)
            how = "detected" if job.source == "detect" else f"in the {job.source} layer"
            outcome.error = f"No cells {how} for {names}: nothing to embed."
            return outcome
        parts = [cells[_ROW_COLUMNS]] if len(cells) else []
        if len(extra):
            parts.append(extra[_ROW_COLUMNS])
        frame = pd.concat(parts, ignore_index=True)
        images = dict(job.other_images)
        images.update({image.source: image.data for image in job.images})
        result = yield from _in_thread(
            lambda progress: embed_cells(
                frame,
                backbone,
                batch_size=job.batch_size,
                images=images,
                progress=progress,
                cancel=cancel,
            ),
            "embed",
        )
        n_new = len(cells)
        outcome.embeddings = result.embeddings[:n_new]
        outcome.done = result.done[:n_new]
        outcome.extra_embeddings = result.embeddings[n_new:]
        outcome.extra_done = result.done[n_new:]
        outcome.meta = dict(result.meta)
        outcome.cancelled = bool(result.cancelled)
        outcome.skipped = list(result.skipped)
    except (WeightsError, DeviceError, ValueError, OSError) as exc:
        outcome.error = str(exc)
    except Exception as exc:  # shown in the panel; the traceback goes to the log
        log.exception("embedding failed")
        outcome.error = f"Embedding failed: {type(exc).__name__}: {exc}"
    finally:
        outcome.seconds = time.perf_counter() - start
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
    from napari_hemofm.core.models import WeightsError, resolve_weights

    def fetch(progress: Callable[[int, int], None]) -> Path:
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


# ---------------------------------------------------------------------------- commit
def _carry_labels(cells: pd.DataFrame, old: pd.DataFrame) -> pd.DataFrame:
    """Keep the curated labels of re-detected cells (same id, centre within half a box)."""
    common = cells.index.intersection(old.index)
    if len(common) == 0 or "label" not in old.columns:
        return cells
    o = old.loc[common]
    n = cells.loc[common]
    near = np.hypot(o["x"] - n["x"], o["y"] - n["y"]) <= (n["x1"] - n["x0"]) / 2
    keep = common[near.to_numpy() & o["label"].notna().to_numpy()]
    if len(keep) == 0:
        return cells
    cells = cells.copy()
    cells["label"] = cells["label"].astype(object)
    cells.loc[keep, "label"] = old.loc[keep, "label"].astype(object)
    cells["label_origin"] = pd.Series(
        np.where(cells["label"].notna(), "imported", None), index=cells.index, dtype=object
    )
    cells.loc[keep, "label_origin"] = old.loc[keep, "label_origin"].astype(object)
    return cells


def commit_outcome(
    table: CellTable,
    job: EmbedJob,
    outcome: EmbedOutcome,
    *,
    pixel_size_um: float | None = None,
) -> tuple[CellTable | None, str]:
    """Write a run's result into the cell table (main thread).

    Parameters
    ----------
    table : CellTable
        The session's table.
    job : EmbedJob
    outcome : EmbedOutcome
    pixel_size_um : float, optional
        Written to the table's metadata.

    Returns
    -------
    (CellTable or None, str)
        A *new* table when images were replaced or the model changed (the caller
        passes it to ``session.set_table``), else None (``table`` was updated in
        place); and a one-line summary for the user.
    """
    from napari_hemofm.core.cells import EMBEDDING_KEY, CellTable

    dim = outcome.embeddings.shape[1] if outcome.embeddings.ndim == 2 else 0
    meta = dict(outcome.meta)
    if pixel_size_um:
        meta["pixel_size_um"] = float(pixel_size_um)
    if job.table_id and id(table) != job.table_id:
        return (
            None,
            "The session's cells were replaced during the run (a project was "
            "opened?): nothing was added; run again.",
        )
    obs = table.obs
    replaced = sorted(set(obs["source"].astype(str)) & {image.source for image in job.images})
    old_x = table.embeddings
    model_changed = outcome.model_changed
    if model_changed and not outcome.extra_done.all():
        return None, "Cancelled: the session's cells were not all re-embedded, nothing changed."
    new_cells = outcome.cells[outcome.done] if len(outcome.cells) else outcome.cells
    new_emb = outcome.embeddings[outcome.done]
    n_new = len(new_cells)
    n_old = int(outcome.extra_done.sum())
    if n_new == 0 and n_old == 0:
        return None, "Cancelled before any cell was embedded: nothing changed."
    need_new_table = (
        bool(replaced) or model_changed or (old_x is not None and dim and old_x.shape[1] != dim)
    )
    extra_rows = outcome.extra_rows
    if need_new_table:
        keep = ~obs["source"].astype(str).isin(replaced).to_numpy()
        adata = table.adata[keep].copy()
        x = np.full((int(keep.sum()), dim), np.nan, np.float32)
        if old_x is not None and not model_changed and old_x.shape[1] == dim:
            x[:] = old_x[keep]
        kept_pos = np.cumsum(keep) - 1  # old row -> row in the kept table
        ok = keep[extra_rows] & outcome.extra_done
        x[kept_pos[extra_rows[ok]]] = outcome.extra_embeddings[ok]
        adata.obsm = {EMBEDDING_KEY: x}  # a UMAP of other embeddings is stale
        new_table = CellTable(adata)
        new_table.update_meta(**meta)
        if n_new:
            new_table.add_cells(_carry_labels(new_cells, obs), embeddings=new_emb)
        target = new_table
    else:
        if len(extra_rows):
            x = (
                np.array(old_x, dtype=np.float32, copy=True)
                if old_x is not None
                else np.full((table.n_cells, dim), np.nan, np.float32)
            )
            ok = outcome.extra_done
            x[extra_rows[ok]] = outcome.extra_embeddings[ok]
            table.set_embeddings(x, **meta)
        else:
            table.update_meta(**meta)
        if n_new:
            table.add_cells(new_cells, embeddings=new_emb)
        new_table = None
        target = table
    parts = [f"{n_new} cell(s) from {len({*new_cells['source']}) if n_new else 0} image(s)"]
    if n_old:
        parts.append(f"{n_old} cell(s) already in the session")
    text = (
        f"Embedded {' and '.join(parts)} with {meta.get('model', '?')} "
        f"(dim {dim}) in {outcome.seconds:.1f} s; the session holds {target.n_cells} cells."
    )
    if replaced:
        text += f" Replaced the earlier cells of {', '.join(replaced)}."
    if model_changed and n_old:
        text += " The model changed: all cells were re-embedded."
    if outcome.cancelled:
        text = "Cancelled. " + text
    if outcome.skipped:
        text += " Skipped: " + "; ".join(f"{s}: {w}" for s, w in outcome.skipped[:3])
    return new_table, text


def _embedding_meta(table: CellTable) -> dict[str, Any] | None:
    """``model`` and ``weights_sha256`` of the table's embeddings; None if none is embedded."""
    x = table.embeddings
    if x is None or table.n_cells == 0 or not np.isfinite(x).all(axis=1).any():
        return None
    return {"model": table.meta.get("model"), "weights_sha256": table.meta.get("weights_sha256")}


def _meta_differs(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Embeddings described by ``old`` and ``new`` live in different spaces."""
    if old is None:
        return False
    return old.get("model") != new.get("model") or (
        old.get("weights_sha256") != new.get("weights_sha256")
    )


# ----------------------------------------------------------------------------- panel
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
    batches with :meth:`set_batch`, pick the source with :meth:`set_cell_source`, then
    :meth:`run` returns the worker (wait for ``worker.finished``); :attr:`status` holds
    the last message.
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
        self._image_state: dict[str, tuple[bool, str]] = {}
        self._job: EmbedJob | None = None
        self.last_outcome: EmbedOutcome | None = None
        self._build_ui()
        self._connect_viewer()
        self._refresh_layers()
        self._on_model_changed()
        self._probe_devices()

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)

        images = QGroupBox("Images (one batch each)")
        box = QVBoxLayout(images)
        self.image_table = QTableWidget(0, 2)
        self.image_table.setHorizontalHeaderLabels(["Image layer", "Batch"])
        header = self.image_table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.Stretch)
        header.setSectionResizeMode(1, QHeaderView.Stretch)
        self.image_table.verticalHeader().setVisible(False)
        self.image_table.setSelectionMode(QAbstractItemView.NoSelection)
        self.image_table.setToolTip(
            "Tick the images to embed; double-click a batch name to edit it "
            "(default: the layer name)."
        )
        self.image_table.itemChanged.connect(self._on_image_item_changed)
        box.addWidget(self.image_table)
        layout.addWidget(images)

        form = QFormLayout()
        self.source_combo = QComboBox()
        self.source_combo.setToolTip(
            "Detect white cells in each image, or take one cell per label of a Labels "
            "layer / per point of a Points layer (in the image's pixel grid)."
        )
        form.addRow("Cells from", self.source_combo)
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
        form.addRow("Pixel size", self.pixel_size)
        self.model_combo = QComboBox()
        self.model_combo.addItems(list(MODEL_NAMES))
        self.model_combo.setCurrentText(DEFAULT_MODEL)
        self.model_combo.setToolTip(
            "handcrafted: colour, texture and shape features, no weights (offline). "
            "dinobloom-s/b/l/g: the DinoBloom ViTs (weights needed)."
        )
        self.model_combo.currentTextChanged.connect(self._on_model_changed)
        form.addRow("Model", self.model_combo)
        weights_row = QHBoxLayout()
        self.weights_edit = QLineEdit()
        self.weights_edit.setPlaceholderText("from the cache")
        self.weights_edit.setToolTip(
            "A DinoBloom .pth or .safetensors file; empty: look in the weights cache."
        )
        self.weights_edit.editingFinished.connect(self._update_weights_status)
        self.browse_button = QPushButton("Browse…")
        self.browse_button.clicked.connect(self._browse_weights)
        weights_row.addWidget(self.weights_edit)
        weights_row.addWidget(self.browse_button)
        form.addRow("Weights", weights_row)
        self.download_button = QPushButton("Download weights")
        self.download_button.clicked.connect(self.download)
        form.addRow("", self.download_button)
        self.weights_status = QLabel()
        self.weights_status.setWordWrap(True)
        self.weights_status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.weights_status.setMinimumHeight(2 * self.fontMetrics().lineSpacing() + 4)
        form.addRow(self.weights_status)
        self.batch_size = QSpinBox()
        self.batch_size.setRange(1, 4096)
        self.batch_size.setValue(DEFAULT_BATCH_SIZE)
        self.batch_size.setToolTip("Cells per forward pass.")
        form.addRow("Batch size", self.batch_size)
        self.device_combo = QComboBox()
        self.device_combo.addItem("cpu")
        form.addRow("Device", self.device_combo)
        self.numbers_check = QCheckBox("Show cell numbers")
        self.numbers_check.setToolTip("Write each cell's number (#n of its id) on the image.")
        self.numbers_check.toggled.connect(self._on_numbers_toggled)
        form.addRow("", self.numbers_check)
        layout.addLayout(form)

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
        self.status_label = QLabel()
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

    def _refresh_layers(self) -> None:
        from napari.layers import Labels, Points

        self._remember_image_state()
        table = self.image_table
        table.blockSignals(True)
        try:
            layers = self._image_layers()
            table.setRowCount(len(layers))
            for row, layer in enumerate(layers):
                checked, batch = self._image_state.get(layer.name, (True, layer.name))
                name_item = QTableWidgetItem(layer.name)
                name_item.setFlags(Qt.ItemIsUserCheckable | Qt.ItemIsEnabled)
                name_item.setCheckState(Qt.Checked if checked else Qt.Unchecked)
                table.setItem(row, 0, name_item)
                table.setItem(row, 1, QTableWidgetItem(batch))
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
        for row in range(self.image_table.rowCount()):
            name_item = self.image_table.item(row, 0)
            batch_item = self.image_table.item(row, 1)
            if name_item is None or batch_item is None:
                continue
            batch = batch_item.text().strip() or name_item.text()
            self._image_state[name_item.text()] = (
                name_item.checkState() == Qt.Checked,
                batch,
            )

    def _on_image_item_changed(self, item: QTableWidgetItem) -> None:
        self._remember_image_state()

    def image_choices(self) -> list[tuple[str, bool, str]]:
        """``(layer name, checked, batch)`` for every image layer listed in the panel."""
        self._remember_image_state()
        out = []
        for row in range(self.image_table.rowCount()):
            name = self.image_table.item(row, 0).text()
            checked, batch = self._image_state[name]
            out.append((name, checked, batch))
        return out

    def set_checked(self, name: str, checked: bool) -> None:
        """Tick or untick the image layer ``name``."""
        row = self._row_of(name)
        self.image_table.item(row, 0).setCheckState(Qt.Checked if checked else Qt.Unchecked)

    def set_batch(self, name: str, batch: str) -> None:
        """Set the batch name of the image layer ``name``."""
        self.image_table.item(self._row_of(name), 1).setText(batch)

    def _row_of(self, name: str) -> int:
        for row in range(self.image_table.rowCount()):
            if self.image_table.item(row, 0).text() == name:
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
        from napari_hemofm.core.models import WeightsError, get_spec, resolve_weights

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

    def _browse_weights(self) -> None:
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
            self.device_combo.addItem("cuda")

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

    def build_job(self) -> EmbedJob:
        """Collect the panel's choices and the layers' data into an :class:`EmbedJob`.

        Raises
        ------
        ValueError
            With a message for the user (nothing to embed, a layer that does not fit).
        """
        from napari_hemofm.core.embed import cells_needing_embedding

        layers = {layer.name: layer for layer in self._image_layers()}
        chosen = [(n, b) for n, checked, b in self.image_choices() if checked and n in layers]
        table = self.session.table
        keys: dict[str, str] = {}
        for n, _ in chosen:
            key = source_key(layers[n])
            # the same file opened twice: the second layer's cells go by its name
            keys[n] = n if key in keys.values() else key
        sources = set(keys.values())
        others = self._cells_not_on(table, sources)
        pending = others.iloc[
            np.flatnonzero(np.isin(others.index, cells_needing_embedding(table)))
        ]
        if not chosen and len(pending) == 0:
            raise ValueError("No image selected: tick at least one image layer.")
        px_value = self.pixel_size.value()
        images = []
        for name, batch in chosen:
            layer = layers[name]
            data = layer.data[0] if layer.multiscale else layer.data
            px = px_value if px_value > 0 else layer.metadata.get("pixel_size_um")
            px = float(px) if px else None
            images.append(ImageInput(name, keys[name], data, batch, px))
        source: Literal["detect", "labels", "points"] = "detect"
        source_data: dict[str, Any] = {}
        source_name = self.source_combo.currentData()
        if source_name is not None:
            source_layer = self.viewer.layers[source_name]
            source, source_data = self._cells_from_layer(
                source_layer, [layers[n] for n, _ in chosen]
            )
        other_sources = others["source"].astype(str).unique()
        return EmbedJob(
            images=images,
            source=source,
            source_data=source_data,
            model=self.model_combo.currentText(),
            weights=self.weights_edit.text().strip(),
            device=self.device_combo.currentText(),
            batch_size=int(self.batch_size.value()),
            pending=pending,
            others=others,
            other_images={
                s: self.session.images[s] for s in other_sources if s in self.session.images
            },
            old_meta=_embedding_meta(table),
            table_id=id(table),
        )

    @staticmethod
    def _cells_not_on(table: CellTable, replaced: set[str]) -> pd.DataFrame:
        """The table's cells whose source is not in ``replaced``, indexed by table row."""
        if table.n_cells == 0:
            return _empty_rows()
        frame = table.obs[_ROW_COLUMNS].copy()
        frame.index = pd.Index(np.arange(table.n_cells), name="row")
        return frame[~frame["source"].astype(str).isin(replaced).to_numpy()]

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
            job = self.build_job()
        except (ValueError, KeyError) as exc:
            self._show(str(exc).strip("'\""), error=True)
            return None
        # the session keeps the layer data (thumbnails, later runs), keyed by source;
        # the stamp keeps the layer tied to its cells if it is renamed
        for image in job.images:
            self.session.add_image(image.source, image.data)
            self.viewer.layers[image.name].metadata[SOURCE_KEY] = image.source
        self._job = job
        self._new_cancel_event()
        self._pbar = progress(total=0, desc="Embed cells")
        self.progress_bar.setRange(0, 0)
        self.progress_bar.setVisible(True)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        n_img = len(job.images)
        self._show(f"Running {job.model} on {n_img} image(s)…")
        worker = thread_worker(run_embed_job, start_thread=False)(job, self._cancel)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.errored.disconnect()  # no traceback dialog; run_embed_job returns errors
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
        job = self._job
        if outcome.error:
            self._show(outcome.error, error=True)
            return
        assert job is not None
        try:
            new_table, text = commit_outcome(
                self.session.table, job, outcome, pixel_size_um=self.pixel_size.value() or None
            )
        except ValueError as exc:
            self._show(f"Could not add the cells: {exc}", error=True)
            return
        if new_table is not None:
            self.session.set_table(new_table)
        # stacked images: bring the top one of this run to the front, hide the others
        names = [layer.name for layer in self.viewer.layers]
        shown = [image for image in job.images if image.name in names]
        if len(shown) > 1:
            top = max(shown, key=lambda image: names.index(image.name))
            self.sync.show_only(top.source)
        self._show(text)

    def _on_errored(self, exc: BaseException) -> None:
        log.error("embedding worker failed", exc_info=exc)
        self._show(f"Embedding failed: {type(exc).__name__}: {exc}", error=True)

    def _on_finished(self) -> None:
        self._worker = None
        self._job = None
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

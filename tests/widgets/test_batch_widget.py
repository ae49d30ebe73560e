"""The Batch view dock widget: linked maps, shared selection, metrics, grid, preview, plots.

The fixture is a 240-cell table in two labs with a planted batch shift: each cell's
embedding is its type's centre plus, for lab_b, a fixed offset, plus noise. Both images
hold drawn cells (a purple disc at each cell's centre, larger and darker in lab_b), so
thumbnails and stain statistics have something real to read. ``obsm["X_umap"]`` is
precomputed (the first two embedding dimensions) so no test compiles UMAP; the
correction preview's UMAP is replaced by a 2-D PCA (``compute_umap`` is monkeypatched).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_hemofm._widgets import _batch
from napari_hemofm._widgets._batch import ORIGIN, BatchViewWidget
from napari_hemofm._widgets._layers import get_layer_sync
from napari_hemofm._widgets._session import get_session
from napari_hemofm.core.cells import CellTable

CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil")
BATCHES = ("lab_a", "lab_b")
PER_IMAGE = 120
GRID = (10, 12)  # cells per image: rows x columns, 30 px apart
SPACING = 30
SHIFT = np.array([5.0, 4.0, 0, 0, 3.0, 0, 0, 0])  # lab_b's planted offset


def make_images() -> dict[str, np.ndarray]:
    """One image per lab: glass with a purple disc at every cell position."""
    h, w = GRID[0] * SPACING + 30, GRID[1] * SPACING + 30
    images = {}
    for b, (radius, colour) in zip(
        BATCHES, [(6, (120, 70, 160)), (8.5, (80, 40, 130))], strict=True
    ):
        img = np.empty((h, w, 3), np.uint8)
        img[:] = (240, 232, 225)
        yy, xx = np.mgrid[:h, :w]
        for cy, cx in _centres():
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = colour
        images[f"{b}_smear"] = img
    return images


def _centres() -> list[tuple[int, int]]:
    return [(30 + i * SPACING, 30 + j * SPACING) for i in range(GRID[0]) for j in range(GRID[1])]


def make_table(*, with_umap: bool = True, seed: int = 0) -> CellTable:
    """240 cells in two labs, four types, a planted lab_b shift; 70 % labelled."""
    rng = np.random.default_rng(seed)
    n = 2 * PER_IMAGE
    batch = np.repeat(BATCHES, PER_IMAGE)
    k = rng.integers(0, len(CLASSES), n)
    centres = rng.normal(scale=8.0, size=(len(CLASSES), 8))
    X = centres[k] + (batch == "lab_b")[:, None] * SHIFT + rng.normal(size=(n, 8))
    labels = np.array(CLASSES, dtype=object)[k]
    labels[rng.random(n) < 0.3] = None
    yx = np.array(_centres() * 2, dtype=float)
    frame = pd.DataFrame(
        {
            "source": [f"{b}_smear" for b in batch],
            "batch": batch,
            "x": yx[:, 1],
            "y": yx[:, 0],
            "x0": (yx[:, 1] - 12).astype(int),
            "y0": (yx[:, 0] - 12).astype(int),
            "x1": (yx[:, 1] + 12).astype(int),
            "y1": (yx[:, 0] + 12).astype(int),
            "label": labels,
            "prediction": np.array(CLASSES, dtype=object)[k],
            "confidence": 0.9,
        },
        index=[f"{b}/smear.png#{i}" for i, b in enumerate(batch)],
    )
    table = CellTable()
    table.add_cells(frame, embeddings=X.astype(np.float32))
    table.set_classes(list(CLASSES))
    if with_umap:
        table.set_obsm("X_umap", X[:, :2].astype(np.float32))
    return table


@pytest.fixture
def viewer_with_cells(make_napari_viewer):
    """A viewer with two lab images, their cells layers and the table in its session."""
    viewer = make_napari_viewer(show=True)
    session = get_session(viewer)
    for name, image in make_images().items():
        session.add_image(name, image)
        layer = viewer.add_image(image, name=name, rgb=True)
        layer.metadata["hemofm_source"] = name
    get_layer_sync(viewer)
    return viewer, session


@pytest.fixture
def batch_widget(viewer_with_cells, qtbot):
    """The Batch view on the two-lab table, idle."""
    viewer, session = viewer_with_cells
    session.set_table(make_table())
    widget = BatchViewWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Batch view")
    widget.resize(900, 800)
    qtbot.waitUntil(lambda: not widget.busy, timeout=20_000)
    return widget


@pytest.fixture
def fast_umap(monkeypatch):
    """compute_umap -> a 2-D PCA (UMAP itself is tested in tests/core/test_reduce.py)."""
    from napari_hemofm.core import reduce

    def fake(X, **_kwargs):
        return reduce.compute_pca(np.asarray(X, np.float32), 2)

    monkeypatch.setattr(reduce, "compute_umap", fake)


def _rows(table: CellTable, **where: str) -> np.ndarray:
    mask = np.ones(table.n_cells, bool)
    for column, value in where.items():
        mask &= table.obs[column].astype(object).to_numpy() == value
    return np.flatnonzero(mask)


def test_maps_share_coordinates_and_colour_by_batch_and_type(batch_widget):
    """Both maps draw every cell at its X_umap position; the batch map has one colour per
    batch, the type map one colour per cell type (labels, else predictions)."""
    w = batch_widget
    table = w.table
    umap = np.asarray(table.adata.obsm["X_umap"], np.float64)
    np.testing.assert_array_equal(w.left.canvas.positions, umap)
    np.testing.assert_array_equal(w.right.canvas.positions, umap)
    assert w.layout_kind == "umap"
    assert w.left.color_by == "batch"
    assert w.right.color_by == "class"
    colors = w.left.canvas.colors
    a, b = _rows(table, batch="lab_a"), _rows(table, batch="lab_b")
    assert len(set(colors[a].tolist())) == 1
    assert len(set(colors[b].tolist())) == 1
    assert colors[a[0]] != colors[b[0]]
    for name in BATCHES:
        assert name in w.left.legend.text()
    # cell type: curated label where there is one, else the prediction
    type_colors = w.right.canvas.colors
    pred = table.obs["prediction"].astype(object).to_numpy()
    for name in CLASSES:
        assert len(set(type_colors[pred == name].tolist())) == 1
    assert len(set(type_colors.tolist())) == len(CLASSES)
    w.right.set_color_by("label")
    unlabelled = np.flatnonzero(table.obs["label"].isna().to_numpy())
    assert len(set(w.right.canvas.colors[unlabelled].tolist())) == 1
    assert "unlabelled" in w.right.legend.text()


def test_selection_is_shared_both_ways(batch_widget):
    """A rectangle on the batch map selects in the session (origin batch_view) and the
    type map shows the same cells; a selection made elsewhere shows on both maps."""
    w = batch_widget
    session = w.session
    seen = []
    session.events.selection_changed.connect(lambda rows, origin: seen.append(origin))
    xy = w.left.canvas.positions
    rows = w.left.canvas.rows_in_rect(-100, -100, float(np.median(xy[:, 0])), 100)
    assert 20 < len(rows) < len(xy)
    w.left.canvas.selection_requested.emit(rows, "replace")
    np.testing.assert_array_equal(session.selected, rows)
    assert seen[-1] == ORIGIN
    np.testing.assert_array_equal(w.right.canvas.selected, rows)
    np.testing.assert_array_equal(w.left.canvas.selected, rows)
    w.right.canvas.selection_requested.emit(rows[:3], "toggle")
    np.testing.assert_array_equal(session.selected, rows[3:])
    session.select([5, 7], origin="api")
    np.testing.assert_array_equal(w.left.canvas.selected, [5, 7])
    np.testing.assert_array_equal(w.right.canvas.selected, [5, 7])
    assert "2 selected" in w.status.text()


def test_metric_table_fills_with_a_row_per_cell_type(batch_widget, qtbot):
    """Compute fills the table in a worker: 'all' plus one row per cell type, one column
    per metric, header tooltips from METRIC_INFO; the planted shift shows as poor mixing."""
    from napari_hemofm.core.batch import METRIC_INFO

    w = batch_widget
    assert w.metrics_table.rowCount() == 0
    w.compute_metrics()
    assert w.metrics_busy.isVisibleTo(w)
    qtbot.waitUntil(lambda: w.report is not None and not w.busy, timeout=60_000)
    assert not w.metrics_busy.isVisibleTo(w)
    rows = w.metric_rows()
    assert rows[0] == "all"
    assert sorted(rows[1:]) == sorted(CLASSES)
    columns = w.metric_columns()
    assert columns[0] == "cells"
    assert {"ilisi", "kbet_acceptance", "pcr_batch", "celltype_asw"} <= set(columns)
    j = columns.index("ilisi")
    assert METRIC_INFO["ilisi"][1] in w.metrics_table.horizontalHeaderItem(j).toolTip()
    assert float(w.metrics_table.item(0, j).text()) < 0.3  # the labs do not mix
    assert "pcr_batch" in w.metrics_legend.text()


def test_mixing_column_reaches_table_layers_and_map(batch_widget, qtbot):
    """Colouring by mixing computes per-cell iLISI, writes obs['ilisi'] (mirrored into the
    cells layers' features) and colours the map with a colormap."""
    w = batch_widget
    viewer = w.viewer
    w.right.set_color_by("ilisi")
    qtbot.waitUntil(lambda: "ilisi" in w.table.obs.columns and not w.busy, timeout=60_000)
    values = w.table.obs["ilisi"].to_numpy()
    assert np.isfinite(values).sum() > 100
    assert np.nanmax(values) <= 1.0
    layer = viewer.layers["lab_a_smear cells"]
    sync = get_layer_sync(viewer)
    rows = sync.rows_of(layer)
    np.testing.assert_allclose(layer.features["ilisi"].to_numpy(), values[rows])
    colors = w.right.canvas.colors
    finite = np.flatnonzero(np.isfinite(values))
    lo, hi = finite[np.argmin(values[finite])], finite[np.argmax(values[finite])]
    assert colors[lo] != colors[hi]
    assert w.right.legend_bar.isVisibleTo(w)
    assert "mixing" in w.right.legend.text()
    # the same values fill the cells layer's points (viridis, absolute 0-1); borders keep
    # the label; switching it off brings back the label fill
    from napari.utils.colormaps import ensure_colormap

    label_face = np.array(layer.face_color, copy=True)
    border = np.array(layer.border_color, copy=True)
    assert w.set_layer_mixing(True)
    v = values[rows]
    ok = np.isfinite(v)
    expected = ensure_colormap("viridis").map(np.clip(v[ok], 0, 1))[:, :3]
    np.testing.assert_allclose(layer.face_color[ok, :3], expected, atol=1e-6)
    assert (layer.face_color[~ok, 3] == 0).all()
    np.testing.assert_allclose(layer.border_color, border)
    w.set_layer_mixing(False)
    np.testing.assert_allclose(layer.face_color, label_face)


def test_grid_has_one_row_per_batch_and_clicks_select(batch_widget, qtbot):
    """The thumbnail grid: a row per batch, a column per cell type, each group's cells of
    that batch and type (selected cells first); a click on a thumbnail selects its cell."""
    w = batch_widget
    grid = w.grid
    table = w.table
    assert grid.row_names == list(BATCHES)
    assert grid.column_names == list(CLASSES)
    pred = table.obs["prediction"].astype(object)
    label = table.obs["label"].astype(object)
    cell_type = label.where(label.notna(), pred)
    for b in BATCHES:
        for c in CLASSES:
            shown = grid.shown(b, c)
            assert 0 < len(shown) <= _batch.THUMBS_PER_GROUP
            assert set(table.obs.loc[shown, "batch"].astype(str)) == {b}
            assert set(cell_type.loc[shown]) == {c}
    qtbot.waitUntil(lambda: not grid.loading, timeout=20_000)
    thumb = grid.thumbnails()[5]
    assert thumb.pixmap() is not None
    thumb.clicked.emit(thumb.row)
    np.testing.assert_array_equal(w.session.selected, [thumb.row])
    # a selection made elsewhere puts those cells first in their groups
    target = _rows(table, batch="lab_b", prediction="monocyte", label="monocyte")[-1]
    w.session.select([target], origin="api")
    qtbot.waitUntil(
        lambda: grid.shown("lab_b", "monocyte")[:1] == [table.cell_ids[target]], timeout=5_000
    )
    w.swap_check.setChecked(True)
    assert grid.row_names == list(CLASSES)
    assert grid.column_names == list(BATCHES)


def test_correction_preview_changes_the_map_not_the_embeddings(batch_widget, qtbot, fast_umap):
    """Previewing 'centre' shows a new layout and before -> after metrics (mixing improves
    once the planted shift is removed) and leaves obsm['X_embed'] byte-identical; keeping
    it adds obsm['X_embed_centre']; 'none' brings the stored UMAP back."""
    w = batch_widget
    table = w.table
    X = table.embeddings
    before = X.tobytes()
    umap = w.positions()
    w.set_correction("centre")
    qtbot.waitUntil(lambda: w.preview("centre") is not None and not w.busy, timeout=60_000)
    assert w.layout_kind == "preview"
    shown = w.positions()
    assert shown.shape == umap.shape
    assert not np.allclose(shown, umap)
    np.testing.assert_array_equal(w.right.canvas.positions, shown)
    assert table.embeddings is X
    assert table.embeddings.tobytes() == before
    j = w.metric_columns().index("ilisi")
    text = w.metrics_table.item(0, j).text()
    assert "\u2192" in text
    old, new = (float(v) for v in text.split("\u2192"))
    assert new > old + 0.3
    assert w.keep_button.isEnabled()
    w.keep_preview()
    kept = table.adata.obsm["X_embed_centre"]
    np.testing.assert_allclose(kept, w.preview("centre").X)
    assert table.embeddings.tobytes() == before
    w.set_correction("none")
    np.testing.assert_array_equal(w.positions(), umap)
    assert "\u2192" not in w.metrics_table.item(0, j).text()


def test_without_umap_a_pca_layout_and_a_button(viewer_with_cells, qtbot, fast_umap):
    """No X_umap: the maps show a PCA layout with a note and a 'Compute UMAP' button,
    which stores obsm['X_umap'] and switches the maps to it."""
    viewer, session = viewer_with_cells
    session.set_table(make_table(with_umap=False))
    w = BatchViewWidget(viewer)
    viewer.window.add_dock_widget(w, name="Batch view")
    qtbot.waitUntil(lambda: w.layout_kind == "pca" and not w.busy, timeout=20_000)
    assert "PCA" in w.status.text()
    assert w.umap_button.isVisibleTo(w)
    assert np.isfinite(w.positions()).all()
    w.umap_button.click()
    qtbot.waitUntil(lambda: w.layout_kind == "umap" and not w.busy, timeout=20_000)
    np.testing.assert_array_equal(w.positions(), session.table.adata.obsm["X_umap"])
    assert not w.umap_button.isVisibleTo(w)


def test_stain_and_size_plots_per_batch(batch_widget, qtbot):
    """Measuring stain and size (in a worker) gives each batch's cells; lab_b's drawn
    cells are larger and darker, and the plot shows both batches."""
    w = batch_widget
    w.compute_appearance(per_batch=12)
    qtbot.waitUntil(lambda: w.appearance is not None and not w.busy, timeout=60_000)
    frame = w.appearance
    assert frame["batch"].astype(str).value_counts().to_dict() == {"lab_a": 12, "lab_b": 12}
    assert frame["segmented"].all()
    med = frame.groupby(frame["batch"].astype(str))[["cell_area_px", "cell_od"]].median()
    assert med.loc["lab_b", "cell_area_px"] > 1.5 * med.loc["lab_a", "cell_area_px"]
    assert med.loc["lab_b", "cell_od"] > med.loc["lab_a", "cell_od"]
    axes = w.plots.figure.axes
    assert len(axes) == 6
    assert [t.get_text() for t in axes[0].get_xticklabels()] == list(BATCHES)
    assert "lab_b" in w.plots.status.text()


def test_harmony_is_disabled_without_harmonypy(viewer_with_cells, monkeypatch):
    """Without harmonypy the 'harmony' entry is disabled and its tooltip says why."""
    viewer, _session = viewer_with_cells
    monkeypatch.setattr(_batch, "harmony_available", lambda: False)
    w = BatchViewWidget(viewer)
    combo = w.correction_combo
    item = combo.model().item(combo.findData("harmony"))
    assert not item.isEnabled()
    assert "harmonypy" in item.toolTip()
    assert combo.model().item(combo.findData("centre")).isEnabled()
    w.close()


def test_closed_widget_stops_listening(batch_widget):
    """After close, a selection elsewhere no longer reaches the widget's maps."""
    w = batch_widget
    w.session.select([1, 2], origin="api")
    np.testing.assert_array_equal(w.left.canvas.selected, [1, 2])
    w.close()
    w.session.select([3], origin="api")
    np.testing.assert_array_equal(w.left.canvas.selected, [1, 2])


def test_one_batch_says_why_there_are_no_metrics(viewer_with_cells, qtbot):
    """With a single batch, Compute explains that batch effects need two or more."""
    viewer, session = viewer_with_cells
    table = make_table()
    table.set_column("batch", ["lab_a"] * table.n_cells)
    session.set_table(table)
    w = BatchViewWidget(viewer)
    qtbot.waitUntil(lambda: not w.busy, timeout=20_000)
    w.compute_metrics()
    assert "Only one batch" in w.metrics_status.text()
    assert not w.busy
    assert w.grid.row_names == ["lab_a"]
    w.close()


def test_widget_deleted_while_workers_run(viewer_with_cells, qtbot):
    """A widget deleted mid-computation ignores its workers' late results (no 'ilisi'
    column is written) and stops listening to the session."""
    from napari_hemofm._widgets._workers import wait_for_workers

    viewer, session = viewer_with_cells
    session.set_table(make_table())
    widget = BatchViewWidget(viewer)
    widget.compute_metrics()
    widget.compute_appearance(per_batch=20)
    assert widget.busy
    with qtbot.waitSignal(widget.destroyed, timeout=5_000):
        widget.deleteLater()
    assert wait_for_workers(60_000)
    qtbot.wait(50)  # late callbacks are delivered here: they must be no-ops
    assert "ilisi" not in session.table.obs.columns
    session.select([1, 2], origin="api")  # no listener left on a deleted widget
    session.table.set_labels([session.table.cell_ids[0]], "neutrophil")


def test_number_keys_on_a_batch_map_label_the_selection(batch_widget, qtbot):
    """Selecting cells on the batch map and pressing 1 gives them the first class, as on
    the Cell map; Ctrl+Z undoes it."""
    from qtpy.QtCore import Qt

    from napari_hemofm._widgets._review_state import get_retrainer, get_review

    w = batch_widget
    table = w.table
    rows = np.arange(5)
    w.session.select(rows)
    before = table.obs["label"].astype(object).copy()
    review = get_review(w.viewer)
    qtbot.keyClick(w.left.canvas, Qt.Key.Key_1)
    assert (table.obs["label"].astype(object).iloc[rows] == review.class_for_key(1)).all()
    qtbot.keyClick(w.left.canvas, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    pd.testing.assert_series_equal(table.obs["label"].astype(object), before)
    get_retrainer(w.viewer).wait_idle()  # no retraining outlives the viewer


@pytest.fixture
def popups(monkeypatch):
    """Every error napari would show as a notification pop-up, recorded."""
    from napari.utils.notifications import notification_manager

    seen = []
    monkeypatch.setattr(
        notification_manager, "receive_error", lambda *args, **kwargs: seen.append(args)
    )
    return seen


def _small_batch_table() -> CellTable:
    """The fixture's 240 cells regrouped: a 221-cell lab, a 16-cell lab, a 3-cell lab."""
    table = make_table()
    batch = np.array(["big"] * 221 + ["lab16"] * 16 + ["lab3"] * 3, dtype=object)
    table.set_column("batch", batch)
    return table


def test_small_batches_compute_and_preview_without_popups(
    viewer_with_cells, qtbot, fast_umap, popups
):
    """A 3-cell and a 16-cell lab beside a big one (issue 14.1): the metrics and every
    correction preview compute; the panel names the lab too small to hold out; napari
    shows no error pop-up."""
    viewer, session = viewer_with_cells
    session.set_table(_small_batch_table())
    w = BatchViewWidget(viewer)
    viewer.window.add_dock_widget(w, name="Batch view")
    qtbot.waitUntil(lambda: not w.busy, timeout=20_000)
    w.compute_metrics()
    qtbot.waitUntil(lambda: w.report is not None and not w.busy, timeout=120_000)
    assert w.report["batches"] == ["big", "lab16", "lab3"]
    assert "lab3" in w.metrics_status.text()
    assert "Not held out by the knn probe" in w.metrics_status.text()
    for method in ("centre", "combat"):
        w.set_correction(method)
        qtbot.waitUntil(lambda m=method: w.preview(m) is not None and not w.busy, timeout=120_000)
        assert w.preview(method).X.shape[0] == w.table.n_cells
    assert popups == []
    w.close()


def test_every_worker_error_is_one_line_in_the_panel(batch_widget, qtbot, monkeypatch, popups):
    """A failing metrics, preview or measuring worker shows one readable line in the
    panel and never reaches napari's notifications (no pop-up, no re-raise)."""
    w = batch_widget

    def boom(*_args):
        raise ValueError("the cells cannot be scored\nsecond line")

    def crash(*_args):
        raise RuntimeError("worker crashed")

    monkeypatch.setattr(_batch, "analyse", boom)
    monkeypatch.setattr(_batch, "correction_preview", crash)
    monkeypatch.setattr(_batch, "measure_appearance", boom)
    w.compute_metrics()
    qtbot.waitUntil(lambda: not w.busy, timeout=20_000)
    assert w.metrics_status.text() == "Could not compute the metrics: the cells cannot be scored"
    w.set_correction("centre")
    qtbot.waitUntil(lambda: not w.busy, timeout=20_000)
    assert "preview failed: RuntimeError: worker crashed" in w.status.text()
    w.compute_appearance(per_batch=5)
    qtbot.waitUntil(lambda: not w.busy, timeout=20_000)
    assert w.plots.status.text() == "Measuring failed: the cells cannot be scored"
    assert w.compute_button.isEnabled()
    assert popups == []


def test_level_chooser_defaults_to_slides_for_one_folder_of_smears(
    viewer_with_cells, qtbot, popups
):
    """One batch holding two smears (slides): the view compares slides by default, the
    grid has a row per slide and the report compares them; choosing batches says there
    is only one."""
    viewer, session = viewer_with_cells
    table = make_table()
    table.set_column("slide", table.obs["source"].astype(object).to_numpy())
    table.set_column("batch", np.full(table.n_cells, "one_lab", dtype=object))
    session.set_table(table)
    w = BatchViewWidget(viewer)
    viewer.window.add_dock_widget(w, name="Batch view")
    qtbot.waitUntil(lambda: not w.busy, timeout=20_000)
    assert w.level == "slide"
    assert w.left.color_by == "slide"
    assert w.grid.row_names == ["lab_a_smear", "lab_b_smear"]
    w.compute_metrics()
    qtbot.waitUntil(lambda: w.report is not None and not w.busy, timeout=120_000)
    assert w.report["batches"] == ["lab_a_smear", "lab_b_smear"]
    assert "slide groups" in w.metrics_status.text()
    w.set_level("batch")
    assert w.report is None
    assert w.grid.row_names == ["one_lab"]
    w.compute_metrics()
    assert "Only one batch (one_lab)" in w.metrics_status.text()
    assert popups == []
    w.close()


def test_legends_of_many_batches_stay_inside_their_panel(viewer_with_cells, qtbot):
    """With 18 batches the batch map's legend shows the largest ones plus "N others" in a
    box of at most LEGEND_MAX_HEIGHT px below its canvas, never over it."""
    from napari_hemofm._widgets._colors import LEGEND_MAX_HEIGHT, MAX_LEGEND_ENTRIES

    viewer, session = viewer_with_cells
    table = make_table()
    table.set_column("batch", [f"laboratory_{i % 18:02d}" for i in range(table.n_cells)])
    session.set_table(table)
    w = BatchViewWidget(viewer)
    viewer.window.add_dock_widget(w, name="Batch view")
    w.resize(900, 800)
    qtbot.waitUntil(lambda: not w.busy, timeout=60_000)
    qtbot.wait(50)
    legend, canvas = w.left.legend, w.left.canvas
    text = legend.text()
    assert text.count("&#9632;") <= MAX_LEGEND_ENTRIES
    assert "others" in text
    assert 0 < legend.height() <= LEGEND_MAX_HEIGHT
    # the legend sits below the canvas, inside the maps' area, and never covers it
    top_left = legend.mapTo(w, legend.rect().topLeft())
    canvas_bottom = canvas.mapTo(w, canvas.rect().bottomLeft()).y()
    assert top_left.y() > canvas_bottom
    assert canvas.height() > legend.height()
    maps = canvas.parentWidget()
    assert legend.parentWidget() is maps
    assert legend.geometry().bottom() <= maps.rect().bottom()


def test_stain_plots_show_before_and_after_the_project_normalisation(viewer_with_cells, qtbot):
    """A project set to Reinhard towards lab_a previews it by default: the worker measures
    the same cells before and after; after, lab_b's stain (cell optical density and hue)
    lies closer to lab_a's than before, and each plot has a before and an after box per
    batch. Choosing "no normalisation" measures again without an after; a reference
    that names no batch leaves the before plots and says why in one line."""
    viewer, session = viewer_with_cells
    table = make_table()
    table.meta["stain_norm"] = {"method": "reinhard", "reference": "lab_a"}
    session.set_table(table)
    w = BatchViewWidget(viewer)
    viewer.window.add_dock_widget(w, name="Batch view")
    qtbot.waitUntil(lambda: not w.busy, timeout=20_000)
    assert w.plots.stain_combo.currentData() == "reinhard"
    assert w.plots.stain_setting() == {"method": "reinhard", "reference": "lab_a"}
    w.compute_appearance(per_batch=12)
    qtbot.waitUntil(lambda: w.appearance is not None and not w.busy, timeout=60_000)
    before, after = w.appearance, w.appearance_after
    assert after is not None
    assert after.index.tolist() == before.index.tolist()

    def gap(frame, column):
        med = frame[frame["segmented"]].groupby(frame["batch"].astype(str))[column].median()
        return abs(med["lab_b"] - med["lab_a"])

    assert gap(after, "cell_od") < 0.5 * gap(before, "cell_od")
    assert gap(after, "cell_hue_deg") <= gap(before, "cell_hue_deg") + 1.0
    axes = w.plots.figure.axes
    assert len(axes) == 6
    assert len(axes[0].patches) == 2 * len(BATCHES)  # before and after per batch
    assert "after" in w.plots.status.text()

    w.plots.stain_combo.setCurrentIndex(w.plots.stain_combo.findData("none"))
    qtbot.waitUntil(lambda: w.appearance is not None and not w.busy, timeout=60_000)
    assert w.appearance_after is None
    assert len(w.plots.figure.axes[0].patches) == len(BATCHES)

    table.meta["stain_norm"] = {"method": "macenko", "reference": "no_such_lab"}
    w.plots.set_project_stain(table.meta["stain_norm"])
    qtbot.waitUntil(lambda: w.appearance is not None and not w.busy, timeout=60_000)
    assert w.appearance_after is None
    text = w.plots.status.text()
    assert text.startswith("No macenko preview:")
    assert "no_such_lab" in text
    assert "\n" not in text

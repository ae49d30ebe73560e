"""The Cell map dock widget: layout, colours, hover, selection both ways, strip, UMAP worker.

Most tests store a precomputed map with ``reduce.store_umap`` (keyed to the table's
embeddings), so the widget only confirms the fingerprint in its worker and UMAP is never
compiled; one test runs the real path (synthetic smears -> detection -> embeddings -> UMAP worker).
"""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
from qtpy.QtCore import QPoint, Qt

from napari_hemofm._widgets._map import MISSING_ARGB, CellMapWidget
from napari_hemofm._widgets._session import get_session
from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.reduce import embedding_fingerprint, store_umap

CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
IMAGE_SHAPE = (300, 400)


def make_table(n: int = 400, seed: int = 0, *, with_umap: bool = True) -> CellTable:
    """Seeded cells in five blobs; the map is the first two embedding dimensions."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, len(CLASSES), n)
    centres = np.array([[-8, -8], [8, -8], [0, 8], [-8, 8], [8, 8]], float)
    xy = centres[k] + rng.normal(size=(n, 2))
    emb = np.concatenate([xy, rng.normal(size=(n, 6))], axis=1).astype(np.float32)
    h, w = IMAGE_SHAPE
    cx, cy = rng.uniform(20, w - 20, n), rng.uniform(20, h - 20, n)
    labels = np.array(CLASSES, dtype=object)[k]
    labels[rng.random(n) < 0.25] = None
    frame = pd.DataFrame(
        {
            "source": np.where(np.arange(n) % 2, "smear_a", "smear_b"),
            "batch": np.where(np.arange(n) % 2, "lab_a", "lab_b"),
            "x": cx,
            "y": cy,
            "x0": (cx - 12).astype(int),
            "y0": (cy - 12).astype(int),
            "x1": (cx + 12).astype(int),
            "y1": (cy + 12).astype(int),
            "label": labels,
            "prediction": np.array(CLASSES, dtype=object)[k],
            "confidence": rng.uniform(0.2, 1.0, n),
        },
        index=[f"lab/smear.png#{i}" for i in range(n)],
    )
    table = CellTable()
    table.add_cells(frame, embeddings=emb)
    if with_umap:
        store_umap(table, xy)
    return table


@pytest.fixture
def map_widget(make_napari_viewer, qtbot):
    """A viewer whose session holds a 400-cell table, and its Cell map, idle."""
    viewer = make_napari_viewer(show=True)
    session = get_session(viewer)
    rng = np.random.default_rng(1)
    for name in ("smear_a", "smear_b"):
        session.add_image(name, rng.integers(0, 255, (*IMAGE_SHAPE, 3), dtype=np.uint8))
    session.set_table(make_table())
    widget = CellMapWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Cell map")
    widget.resize(420, 600)
    qtbot.waitUntil(lambda: not widget.busy, timeout=10_000)
    return widget


def _inside_polygon(points: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Oracle: even-odd ray casting, written independently of the widget's code."""
    x, y = points[:, 0], points[:, 1]
    inside = np.zeros(len(points), bool)
    for (xa, ya), (xb, yb) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        crosses = (ya > y) != (yb > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = xa + (y - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (x < x_cross)
    return inside


def test_builds_and_colours_by_label(map_widget):
    """All cells are on the map; two labels get different colours, unlabelled is grey."""
    w = map_widget
    table = w.table
    assert w.canvas.n_shown == table.n_cells == 400
    assert "400 of 400" in w.status.text()
    assert w.color_columns()[:4] == ["label", "prediction", "batch", "confidence"]
    w.set_color_by("label")
    colors = w.canvas.colors
    labels = table.obs["label"].astype(object)
    a = np.flatnonzero(labels == "neutrophil")
    b = np.flatnonzero(labels == "lymphocyte")
    none = np.flatnonzero(labels.isna())
    assert len(set(colors[a])) == 1
    assert len(set(colors[b])) == 1
    assert colors[a[0]] != colors[b[0]]
    assert (colors[none] == MISSING_ARGB).all()
    assert np.allclose(w.point_colors()[none[0], :3], 128 / 255, atol=0.01)
    assert "unlabelled" in w.legend.text()


def test_label_and_prediction_share_colours_numeric_gets_colormap(map_widget):
    """A class has one colour whether shown as label or prediction; confidence is a ramp."""
    w = map_widget
    labels = w.table.obs["label"].astype(object).to_numpy()
    w.set_color_by("label")
    by_label = w.canvas.colors
    w.set_color_by("prediction")
    by_pred = w.canvas.colors
    same = np.flatnonzero(labels == w.table.obs["prediction"].astype(object).to_numpy())
    assert (by_label[same] == by_pred[same]).all()
    w.set_color_by("confidence")
    conf = w.table.obs["confidence"].to_numpy()
    lo, hi = np.argmin(conf), np.argmax(conf)
    assert w.canvas.colors[lo] != w.canvas.colors[hi]
    assert w.legend.bar.isVisible() or not w.isVisible()
    assert "confidence" in w.legend.text()


def test_rendered_image_shows_point_colours(map_widget):
    """The pixel under an isolated point has that point's colour (what is drawn is right)."""
    w = map_widget
    w.set_color_by("batch")
    image = w.canvas.render_image()
    xy = w.canvas.positions
    px, py = w.canvas.data_to_pixel(xy[:, 0], xy[:, 1])
    dist = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(dist, np.inf)
    ratio = image.devicePixelRatio()
    for row in np.argsort(-dist.min(axis=1))[:5]:  # the five most isolated points
        colour = image.pixel(int(px[row] * ratio), int(py[row] * ratio)) & 0xFFFFFFFF
        assert colour == int(w.canvas.colors[row])


def test_rectangle_and_lasso_select_exactly_the_points_inside(map_widget):
    """Rectangle and lasso select what a numpy oracle says is inside; shift adds."""
    w = map_widget
    session = w.session
    xy = w.table.adata.obsm["X_umap"].astype(np.float64)

    rows = w.select_rect(-10.0, -10.0, 1.0, -4.5)
    oracle = np.flatnonzero(
        (xy[:, 0] >= -10) & (xy[:, 0] <= 1) & (xy[:, 1] >= -10) & (xy[:, 1] <= -4.5)
    )
    assert len(oracle) > 10
    np.testing.assert_array_equal(rows, oracle)
    np.testing.assert_array_equal(session.selected, oracle)
    np.testing.assert_array_equal(w.canvas.selected, oracle)

    theta = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    lasso = np.c_[8 + 3 * np.cos(theta) * (1 + 0.3 * np.sin(3 * theta)), 8 + 3 * np.sin(theta)]
    in_lasso = np.flatnonzero(_inside_polygon(xy, lasso))
    assert len(in_lasso) > 10
    rows = w.select_polygon(lasso, mode="add")
    np.testing.assert_array_equal(rows, np.union1d(oracle, in_lasso))
    np.testing.assert_array_equal(session.selected, np.union1d(oracle, in_lasso))

    w.select_polygon(lasso, mode="toggle")
    np.testing.assert_array_equal(session.selected, oracle)
    w.select_polygon(lasso)
    np.testing.assert_array_equal(session.selected, in_lasso)


def test_mouse_drag_rectangle_and_click_with_shift(map_widget, qtbot):
    """Real mouse events: a rectangle drag selects, a shift-click adds the nearest cell."""
    w = map_widget
    canvas = w.canvas
    w.set_tool("rect")
    xy = canvas.positions
    x0, y0, x1, y1 = -11.0, -11.0, -5.0, -5.0
    (ax, bx), (ay, by) = canvas.data_to_pixel(np.array([x0, x1]), np.array([y0, y1]))
    start, end = QPoint(round(ax), round(ay)), QPoint(round(bx), round(by))
    qtbot.mousePress(canvas, Qt.MouseButton.LeftButton, pos=start)
    qtbot.mouseMove(canvas, pos=(start + end) / 2)
    qtbot.mouseMove(canvas, pos=end)
    qtbot.mouseRelease(canvas, Qt.MouseButton.LeftButton, pos=end)
    # the drag ended on whole pixels: compare with the rectangle the canvas saw
    dx0, dy0 = canvas.pixel_to_data(start.x(), start.y())
    dx1, dy1 = canvas.pixel_to_data(end.x(), end.y())
    expected = np.flatnonzero(
        (xy[:, 0] >= min(dx0, dx1))
        & (xy[:, 0] <= max(dx0, dx1))
        & (xy[:, 1] >= min(dy0, dy1))
        & (xy[:, 1] <= max(dy0, dy1))
    )
    assert len(expected) > 5
    np.testing.assert_array_equal(w.session.selected, expected)

    outside = np.setdiff1d(np.arange(len(xy)), expected)
    target = outside[np.argmax(xy[outside, 0])]  # the right-most point: nothing near it
    px, py = canvas.data_to_pixel(xy[target, 0], xy[target, 1])
    pos = QPoint(round(float(px)), round(float(py)))
    qtbot.mouseClick(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.ShiftModifier, pos)
    np.testing.assert_array_equal(w.session.selected, np.union1d(expected, [target]))

    qtbot.keyClick(canvas, Qt.Key.Key_Escape)
    assert len(w.session.selected) == 0

    qtbot.keyClick(canvas, Qt.Key.Key_L)
    assert canvas.tool == "lasso"
    assert w.tool_buttons["lasso"].isChecked()
    w.tool_buttons["pan"].click()
    assert canvas.tool == "pan"


def test_selection_elsewhere_is_highlighted_and_shown_in_strip(map_widget, qtbot):
    """A selection made in the layer shows on the map and, with thumbnails, in the strip."""
    w = map_widget
    rows = [3, 50, 7, 120]
    w.session.select(rows, origin="layer")
    np.testing.assert_array_equal(w.canvas.selected, sorted(rows))
    ids = w.table.cell_ids[sorted(rows)].tolist()
    assert w.strip.shown_ids() == ids
    assert "4 cells selected" in w.strip.caption.text()
    qtbot.waitUntil(lambda: w.strip.loaded_ids() == ids, timeout=10_000)
    assert all(w.session.thumbnails.peek(c) is not None for c in ids)

    # a click on a thumbnail selects that cell alone (origin "strip"); the strip stays
    seen = []
    w.session.events.selection_changed.connect(lambda r, origin: seen.append(origin))
    w.strip.cell_clicked.emit(50)
    assert w.session.selected.tolist() == [50]
    assert seen == ["strip"]
    assert w.strip.shown_ids() == ids
    np.testing.assert_array_equal(w.canvas.selected, [50])


def test_strip_shows_first_cells_of_a_large_selection(map_widget):
    """A 300-cell selection: the strip holds the first max_cells and says how many."""
    w = map_widget
    w.session.select(np.arange(300), origin="layer")
    assert w.strip.shown_ids() == w.table.cell_ids[: w.strip.max_cells].tolist()
    assert "300 cells selected" in w.strip.caption.text()
    assert "300 selected" in w.status.text()
    w.strip.stop()


def test_hover_shows_the_cell_thumbnail(map_widget, qtbot):
    """Hovering a point shows its id at once and its thumbnail after the background cut."""
    w = map_widget
    row = 17
    x, y = w.table.adata.obsm["X_umap"][row]
    cell_id = w.table.cell_ids[row]
    assert w.session.thumbnails.peek(cell_id) is None
    hovered = w.hover_at(float(x), float(y))
    assert hovered == row
    assert w.preview_cell_id == cell_id
    assert cell_id in w.preview_text.text()
    qtbot.waitUntil(lambda: w.preview_thumbnail_id == cell_id, timeout=10_000)
    assert w.session.thumbnails.peek(cell_id) is not None
    qtbot.waitUntil(lambda: not w.busy, timeout=10_000)
    # neighbours were cut ahead of the cursor: hovering one now is served from the cache
    tree_rows = np.argsort(np.hypot(*(w.canvas.positions - (x, y)).T))[1:4]
    for other in tree_rows:
        w.hover_cell(int(other))
        assert w.preview_thumbnail_id == w.table.cell_ids[other]


def test_relabel_recolours_the_cell(map_widget):
    """table.set_labels recolours the relabelled point when colouring by label."""
    w = map_widget
    w.set_color_by("label")
    labels = w.table.obs["label"].astype(object)
    cell = labels.index[labels.isna()][0]
    eos = labels.index[labels == "eosinophil"][0]
    row = int(w.table.positions([cell])[0])
    row_eos = int(w.table.positions([eos])[0])
    assert w.canvas.colors[row] == MISSING_ARGB
    w.table.set_labels([cell], "eosinophil")
    assert w.canvas.colors[row] == w.canvas.colors[row_eos]
    w.table.set_labels([cell], None)
    assert w.canvas.colors[row] == MISSING_ARGB
    w.table.set_labels([cell], "a new class")
    assert w.canvas.colors[row] not in (MISSING_ARGB, *w.canvas.colors[labels.notna()])
    assert "a new class" in w.legend.text()


def test_column_written_from_a_thread_recolours_on_the_gui_thread(map_widget, qtbot):
    """Table signals from a worker thread are handled on the GUI thread."""
    w = map_widget
    w.set_color_by("confidence")
    before = w.canvas.colors
    calls = []
    original = w.canvas.set_colors

    def spy(*args, **kwargs):
        calls.append(threading.current_thread() is threading.main_thread())
        original(*args, **kwargs)

    w.canvas.set_colors = spy
    thread = threading.Thread(
        target=w.table.set_column, args=("confidence", np.linspace(0, 1, w.table.n_cells))
    )
    thread.start()
    thread.join()
    qtbot.waitUntil(lambda: bool(calls), timeout=5_000)
    assert all(calls)
    assert (w.canvas.colors != before).any()


def test_new_table_and_new_columns(map_widget, qtbot):
    """A replaced table rebuilds the map; a new obs column can colour the points."""
    w = map_widget
    session = w.session
    session.set_table(make_table(150, seed=3))
    qtbot.waitUntil(lambda: not w.busy, timeout=10_000)
    assert w.canvas.n_shown == 150
    session.table.set_column("cluster", np.arange(150) % 3)
    assert "cluster" in w.color_columns()
    w.set_color_by("cluster")
    assert len(set(w.canvas.colors.tolist())) == 3


def test_pan_zoom_and_reset(map_widget):
    """Zoom, pan and reset change the visible range and bring all points back."""
    w = map_widget
    canvas = w.canvas
    full = canvas.view_rect()
    canvas.zoom(4.0)
    zoomed = canvas.view_rect()
    assert (zoomed[2] - zoomed[0]) == pytest.approx((full[2] - full[0]) / 4)
    canvas.pan(50, 0)
    assert canvas.view_rect()[0] < zoomed[0]
    w.reset_view()
    assert canvas.view_rect() == pytest.approx(full)


@pytest.mark.slow
def test_background_umap_on_the_synthetic_sample(make_napari_viewer, qtbot):
    """Synthetic smears -> detected cells -> embeddings -> the map is computed in a worker
    (UI responsive, "computing map" shown), cached in the table, and recomputed when the
    embeddings change."""
    from napari_hemofm.core.detect import crop_cell
    from napari_hemofm.core.inputs import cells_from_image
    from napari_hemofm.core.synthetic import make_sample

    viewer = make_napari_viewer()
    session = get_session(viewer)
    table = CellTable()
    crops = []
    for smear in make_sample(0, n_per_batch=1, shape=(512, 640), n_wbc=10):
        name = f"{smear.batch}_0"
        viewer.add_image(smear.image, name=name, rgb=True)
        session.add_image(name, smear.image)
        cells = cells_from_image(smear.image, name=name)
        crops += [crop_cell(smear.image, tuple(r)) for r in cells[["x0", "y0", "x1", "y1"]].values]
        table.add_cells(cells)
    try:
        from napari_hemofm.core.models import load_backbone

        emb = load_backbone("handcrafted").embed_crops(crops)
    except ImportError:  # core.features not there yet: mean colour and its spread
        emb = np.array([np.r_[c.reshape(-1, 3).mean(0), c.reshape(-1, 3).std(0)] for c in crops])
    assert table.n_cells >= 15
    session.set_table(table)
    widget = CellMapWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Cell map")
    assert "No embeddings yet" in widget.status.text()

    table.set_embeddings(emb, model="handcrafted")
    assert widget.is_computing
    qtbot.waitUntil(lambda: widget._umap_worker is not None, timeout=5_000)
    assert "computing map" in widget.status.text()
    qtbot.waitUntil(lambda: not widget.is_computing, timeout=180_000)
    assert "X_umap" in table.adata.obsm
    assert table.meta["umap"]["fingerprint"] == embedding_fingerprint(table.embeddings)
    assert widget.canvas.n_shown == table.n_cells
    first = table.adata.obsm["X_umap"].copy()

    # hovering shows a real thumbnail cut from the smear
    row = 0
    widget.hover_at(*map(float, first[row]))
    assert widget.preview_cell_id == table.cell_ids[row]
    qtbot.waitUntil(lambda: widget.preview_thumbnail_id == table.cell_ids[row], timeout=10_000)

    table.set_embeddings(emb[:, ::-1] * 2.0)
    assert widget.is_computing
    qtbot.waitUntil(lambda: not widget.is_computing, timeout=60_000)
    assert table.meta["umap"]["fingerprint"] == embedding_fingerprint(table.embeddings)
    assert not np.array_equal(table.adata.obsm["X_umap"], first)
    qtbot.waitUntil(lambda: not widget.busy, timeout=10_000)


def test_widget_deleted_while_workers_run(make_napari_viewer, qtbot):
    """A widget deleted mid-load ignores its workers' late results and stops listening."""
    from napari_hemofm._widgets._workers import wait_for_workers

    viewer = make_napari_viewer()
    session = get_session(viewer)
    rng = np.random.default_rng(1)
    for name in ("smear_a", "smear_b"):
        session.add_image(name, rng.integers(0, 255, (*IMAGE_SHAPE, 3), dtype=np.uint8))
    session.set_table(make_table(200))
    widget = CellMapWidget(viewer)
    session.select(np.arange(60), origin="layer")  # the strip starts cutting thumbnails
    widget.hover_cell(70)  # and the hover preview too
    assert widget.busy
    with qtbot.waitSignal(widget.destroyed, timeout=5_000):
        widget.deleteLater()
    assert wait_for_workers(10_000)
    qtbot.wait(50)  # late callbacks are delivered here: they must be no-ops
    session.select([1, 2], origin="layer")  # no listener left on a deleted widget
    session.table.set_labels([session.table.cell_ids[0]], "neutrophil")


def test_large_layouts_build_the_kdtree_in_a_worker(map_widget, qtbot, monkeypatch):
    """Above ASYNC_TREE_POINTS the pick tree is built in the background; hover works after."""
    from napari_hemofm._widgets import _scatter

    monkeypatch.setattr(_scatter, "ASYNC_TREE_POINTS", 100)
    w = map_widget
    w.canvas.set_positions(w.table.adata.obsm["X_umap"])  # a new layout: a new tree
    qtbot.waitUntil(lambda: w.canvas.tree_ready, timeout=10_000)
    x, y = w.table.adata.obsm["X_umap"][42]
    assert w.hover_at(float(x), float(y)) == 42


# ------------------------------------------------------------------ issue 13: the map's tools
def test_axes_are_labelled_for_each_plot_kind(map_widget, qtbot):
    """UMAP, PCA and two columns each get their axis titles and tick values inside the
    visible range; the PCA layout is the embeddings' first two principal components."""
    w = map_widget
    assert w.canvas.axis_labels == ("UMAP 1", "UMAP 2")
    xs, ys = w.canvas.axis_ticks()
    x0, y0, x1, y1 = w.canvas.view_rect()
    assert 3 <= len(xs) <= 12
    assert ((xs >= x0) & (xs <= x1)).all()
    assert ((ys >= y0) & (ys <= y1)).all()
    w.set_plot("pca")
    assert w.shown_layout == "pca"
    assert w.canvas.axis_labels == ("PC 1", "PC 2")
    from napari_hemofm.core.reduce import compute_pca

    np.testing.assert_allclose(w.canvas.positions, compute_pca(w.table.embeddings, 2), atol=1e-4)
    w.set_plot("columns", "confidence", "x")
    assert w.canvas.axis_labels == ("confidence", "x")
    expected = w.table.obs[["confidence", "x"]].to_numpy(float)
    # each column is drawn on [0, 1] of its range (its own unit); ticks are in its units
    np.testing.assert_allclose(w.canvas.axis_values(w.canvas.positions), expected)
    assert w.canvas.positions.min(axis=0) == pytest.approx([0, 0])
    assert w.canvas.positions.max(axis=0) == pytest.approx([1, 1])
    xs, ys = w.canvas.axis_ticks()
    assert ys.max() > 10  # the image x coordinate: tens to hundreds of pixels
    assert xs.max() <= 1.0
    assert "confidence" in w.axis_columns()
    assert "batch" not in w.axis_columns()  # categories never go on an axis
    with pytest.raises(KeyError, match="no numeric column"):
        w.set_plot("columns", "batch", "x")


def test_columns_with_missing_values_are_left_out(map_widget):
    """Cells without a value in a plotted column are not drawn; the status says so."""
    w = map_widget
    values = np.linspace(0, 1, w.table.n_cells)
    values[:10] = np.nan
    w.table.set_column("hue", values)
    w.set_plot("columns", "hue", "confidence")
    assert w.canvas.n_shown == w.table.n_cells - 10
    assert f"{w.table.n_cells - 10:,} of {w.table.n_cells:,}" in w.status.text()


def test_umap_form_parameters_recompute_the_map(map_widget, qtbot, monkeypatch):
    """The magicgui form holds the stored map's parameters; changing neighbours and
    pressing Recompute runs UMAP with them and stores the new key."""
    from napari_hemofm.core import reduce

    w = map_widget
    assert w.umap_params == {"n_neighbors": 15, "min_dist": 0.1}
    calls = []

    def fake(X, **kw):
        calls.append(kw)
        return np.asarray(X[:, :2] * 2.0, np.float32)

    monkeypatch.setattr(reduce, "compute_umap", fake)
    w.set_umap_params(n_neighbors=7, min_dist=0.3)
    w.set_color_by("batch")  # a redraw before Recompute keeps the map on show
    assert w.shown_layout == "umap"
    assert not w.is_computing
    w.umap_form()  # the "Recompute UMAP" button
    qtbot.waitUntil(lambda: not w.is_computing, timeout=10_000)
    assert calls[-1]["n_neighbors"] == 7
    assert calls[-1]["min_dist"] == pytest.approx(0.3)
    assert w.table.meta["umap"]["n_neighbors"] == 7
    np.testing.assert_allclose(w.canvas.positions, w.table.embeddings[:, :2] * 2.0)


def test_pca_is_shown_while_umap_computes(map_widget, qtbot, monkeypatch):
    """New embeddings: the PCA is on the canvas before the (slow) UMAP returns, then the
    UMAP replaces it."""
    from napari_hemofm.core import reduce

    w = map_widget
    release = threading.Event()

    def slow(X, **kw):
        release.wait(10)
        return np.asarray(X[:, :2] + 100.0, np.float32)

    monkeypatch.setattr(reduce, "compute_umap", slow)
    w.table.set_embeddings(w.table.embeddings * 1.5)
    qtbot.waitUntil(lambda: w.shown_layout == "pca", timeout=10_000)
    assert w.canvas.axis_labels == ("PC 1", "PC 2")
    assert "PCA is shown meanwhile" in w.status.text()
    release.set()
    qtbot.waitUntil(lambda: w.shown_layout == "umap" and not w.is_computing, timeout=10_000)
    np.testing.assert_allclose(w.canvas.positions, w.table.embeddings[:, :2] + 100.0)


def test_clustering_writes_a_column_that_colours_the_map(map_widget, qtbot):
    """k-means with k=5 on the five blobs writes obs["cluster"] (5 groups, each one
    blob), colours the map by it and lists it in "Colour by"; HDBSCAN also runs."""
    w = map_widget
    w.cluster_form.method.value = "kmeans"
    w.cluster_form.n_clusters.value = 5
    w.cluster_form()
    qtbot.waitUntil(lambda: "cluster" in w.table.obs.columns, timeout=20_000)
    qtbot.waitUntil(lambda: w.color_by == "cluster", timeout=5_000)
    groups = w.table.obs["cluster"].astype(str).to_numpy()
    truth = w.table.obs["prediction"].astype(str).to_numpy()  # the blob of each cell
    assert len(set(groups)) == 5
    assert len(set(zip(groups, truth, strict=True))) == 5
    assert len(set(w.canvas.colors.tolist())) == 5
    assert "cluster" in w.color_columns()
    w.cluster("hdbscan", min_cluster_size=20)
    qtbot.waitUntil(lambda: w._cluster_worker is None, timeout=20_000)
    assert w.table.obs["cluster"].nunique() >= 2


def test_legend_never_overflows(map_widget):
    """A column with 40 categories shows at most MAX_LEGEND_ENTRIES legend entries (the
    largest, then "N others") in a box of bounded height."""
    from napari_hemofm._widgets._colors import LEGEND_MAX_HEIGHT, MAX_LEGEND_ENTRIES

    w = map_widget
    n = w.table.n_cells
    w.table.set_column("donor", [f"donor {i % 40}" for i in range(n)])
    w.set_color_by("donor")
    text = w.legend.text()
    assert text.count("&#9632;") <= MAX_LEGEND_ENTRIES
    assert "others" in text
    assert w.legend.height() <= LEGEND_MAX_HEIGHT
    assert len(set(w.canvas.colors.tolist())) == 40  # every category keeps its colour


def test_density_view_for_heavy_overlap(map_widget, qtbot):
    """All cells on a few spots switch the map to the density view; the density image
    counts points per pixel; the user's choice sticks."""
    w = map_widget
    assert not w.canvas.density  # 400 spread points
    n = w.table.n_cells
    crowded = np.repeat(np.array([[0.0, 0.0], [1.0, 1.0]]), n // 2, axis=0)
    crowded += np.random.default_rng(0).normal(scale=1e-3, size=crowded.shape)
    from napari_hemofm.core.reduce import store_umap

    store_umap(w.table, crowded)
    assert w.canvas.overlap() > 6
    assert w.canvas.density
    assert w.density_button.isChecked()
    assert w.canvas.density_counts().sum() == n
    assert "cells per spot" in w.legend.text()
    image_density = w.canvas.render_image()
    w.set_density(False)
    assert not w.canvas.density
    assert w.canvas.render_image() != image_density
    store_umap(w.table, crowded * 2)
    assert not w.canvas.density  # chosen by the user: kept


def test_export_png_and_svg(map_widget, tmp_path):
    """The plot exports as a PNG of the canvas size and as an SVG with one marker per
    drawn cell, the axis titles and the legend entries; other suffixes are refused."""
    from PIL import Image

    w = map_widget
    w.set_color_by("label")
    png = w.export_plot(tmp_path / "map.png")
    with Image.open(png) as image:
        assert image.size[0] >= w.canvas.width() > 0
    svg = w.export_plot(tmp_path / "map.svg").read_text()
    assert svg.lstrip().startswith("<?xml")
    assert "UMAP 1" in svg
    assert "neutrophil" in svg
    assert svg.count("<use ") >= w.canvas.n_shown
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        w.export_plot(tmp_path / "map.pdf")


def test_clusters_colour_the_cells_layers_and_the_gallery(map_widget, qtbot):
    """With "image points too" ticked, the cells layers' points are filled with the map's
    colour of their cluster (categories in one shared order); the Review gallery names
    the cluster in the tooltip and marks the thumbnail's corner in that colour; unticking
    gives the layers back their label fill."""
    from napari_hemofm._widgets._colors import argb_to_hex
    from napari_hemofm._widgets._gallery import Gallery
    from napari_hemofm._widgets._layers import get_layer_sync
    from napari_hemofm.core.clustering import cluster_names

    w = map_widget
    viewer = w.viewer
    for name in ("smear_a", "smear_b"):
        viewer.add_image(np.zeros((*IMAGE_SHAPE, 3), np.uint8), name=name, rgb=True)
    sync = get_layer_sync(viewer)
    assert set(sync.layers) == {"smear_a", "smear_b"}
    blobs = w.table.obs["prediction"].astype(str).to_numpy()
    groups = np.array([CLASSES.index(b) for b in blobs])
    w.table.set_column("cluster", cluster_names(groups))
    qtbot.waitUntil(lambda: "cluster" in w.color_columns(), timeout=5_000)
    w.set_color_by("cluster")
    label_faces = {k: np.array(p.face_color) for k, p in sync.layers.items()}
    w.set_layers_colored(True)
    assert sync.face_column == "cluster"
    map_hex = np.array([argb_to_hex(c) for c in w.canvas.colors])
    assert len(set(map_hex)) == 5
    for points in sync.layers.values():
        rows = sync.rows_of(points)
        rgb = np.rint(np.asarray(points.face_color)[:, :3] * 255).astype(int)
        hexes = np.array([f"#{r:02x}{g:02x}{b:02x}" for r, g, b in rgb])
        np.testing.assert_array_equal(hexes, map_hex[rows])
        assert np.all(np.asarray(points.face_color)[:, 3] > 0.5)
    # another column follows the combo; unticking restores the label fill
    w.set_color_by("batch")
    assert sync.face_column == "batch"
    w.set_layers_colored(False)
    assert sync.face_column is None
    for key, points in sync.layers.items():
        np.testing.assert_allclose(points.face_color, label_faces[key])

    gallery = Gallery(lambda: w.session.thumbnails)
    qtbot.addWidget(gallery)
    gallery.set_content(w.table, w.table.classes, [], {})
    row = 7
    assert f"cluster: {w.table.obs['cluster'].iat[row]}" in gallery.describe(row)
    w.set_color_by("cluster")
    assert gallery.cell_look(row).mark == map_hex[row]


def test_read_only_project_keys_say_so_in_the_status_bar(map_widget, tmp_path, qtbot):
    """On a read-only project a number key on the map, on a cells layer, the lasso's
    relabel and undo change no label, raise nothing, and put the read-only reason in
    the viewer's status bar."""
    from napari_hemofm._widgets._layers import get_layer_sync
    from napari_hemofm._widgets._review_state import label_selection_by_key, undo_or_redo
    from napari_hemofm.core.journal import LabelJournal

    w = map_widget
    viewer = w.viewer
    viewer.add_image(np.zeros((*IMAGE_SHAPE, 3), np.uint8), name="smear_a", rgb=True)
    layer = get_layer_sync(viewer).layers["smear_a"]
    w.table.journal = LabelJournal(tmp_path / "study.labels.jsonl", read_only=True)
    before = w.table.column("label").copy()
    w.session.select(np.array([1, 3, 5]))
    viewer.status = ""
    w._on_number_key(2)  # what the canvas's key press does
    assert "read-only" in viewer.status
    viewer.status = ""
    press = layer.keymap  # the cells layer's own binding of "1"
    binding = next(fn for key, fn in press.items() if str(key) == "1")
    binding(layer)
    assert "read-only" in viewer.status
    viewer.status = ""
    assert w.relabel_selection(CLASSES[0]) == []
    assert "read-only" in viewer.status
    assert label_selection_by_key(viewer, -1) == []
    assert undo_or_redo(viewer) is False
    pd.testing.assert_series_equal(w.table.column("label"), before)
    assert not (tmp_path / "study.labels.jsonl").exists()

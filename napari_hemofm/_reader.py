"""npe2 reader: HemoFM projects (``.h5ad``) and crop folders.

A napari reader can only return layers, but a project is more than layers: it is the
cell table that the Embed panel, the Cell map and the ``cells`` layers share. So the
reader does two things, and ``docs/reading-writing.md`` says so to users:

1. it puts the cells into the session of the viewer it reads into
   (``napari.current_viewer()``: the window whose File > Open was used): a project
   *replaces* the session's table, a crop folder's cells are *added* to it;
2. it returns image layers to look at the cells: each smear of a project (up to
   :data:`MAX_SMEARS`, read from the paths stored in the table) and one *crop
   montage* for crops (up to :data:`MAX_MONTAGE` tiles, class by class). The
   ``cells`` Points layers on them are made by :class:`~._widgets._layers.CellsLayerSync`
   as the images arrive, so they stay in step with the table like any other.

Without a viewer (``npe2.read`` in a script) step 1 is skipped and the reader returns
the ``cells`` Points layers itself, with the same ``features``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable

__all__ = [
    "MAX_MONTAGE",
    "MAX_SMEARS",
    "MONTAGE_TILE",
    "get_reader",
    "make_montage",
    "read_crop_folder",
    "read_project",
]

log = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]

#: Smear images a project opens at most (the others stay in the table and the map).
MAX_SMEARS = 16
#: Crops shown in a montage at most (shared evenly between classes).
MAX_MONTAGE = 1024
#: Side of one montage tile in pixels.
MONTAGE_TILE = 64


def get_reader(path: str | Sequence[str]) -> Callable[[str], list[LayerData]] | None:
    """Return a reader for a HemoFM project or a crop folder, else None (npe2 contract).

    Parameters
    ----------
    path : str or list of str
        One path (a list must hold exactly one).

    Returns
    -------
    callable or None
        :func:`read_project` for an existing ``.h5ad`` file, :func:`read_crop_folder`
        for a folder whose subfolders hold images; None for anything else.
    """
    if not isinstance(path, str):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".h5ad":
        return read_project
    if p.is_dir():
        from napari_hemofm.core.inputs import classify_folder

        try:
            if classify_folder(p) == "crops":
                return read_crop_folder
        except OSError:
            return None
    return None


def _current_viewer() -> Any:
    import napari

    return napari.current_viewer()


def _notify(text: str) -> None:
    from napari_hemofm._widgets._project import notify

    notify(text)


# ------------------------------------------------------------------------- montage
def make_montage(
    cells: pd.DataFrame,
    *,
    tile: int = MONTAGE_TILE,
    max_cells: int = MAX_MONTAGE,
    images: dict[str, Any] | None = None,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Lay crops out in a grid, class by class.

    Parameters
    ----------
    cells : pandas.DataFrame
        Crop cells (index = cell id) with ``source``, the crop box ``x0, y0, x1, y1``
        and optionally ``label`` (the grid is ordered by it).
    tile : int
        Side of a tile in pixels (crops are squashed to it).
    max_cells : int
        At most this many crops, shared evenly between labels.
    images : dict of str to array, optional
        In-memory sources; others are read from disk.

    Returns
    -------
    montage : ndarray of shape (rows * tile, cols * tile, 3), uint8
    cell_ids : list of str
        The crops shown, in tile order (row-major).
    yx : ndarray of shape (n, 2), float
        Tile centres in montage pixels, napari (y, x) order.
    """
    from napari_hemofm.core.detect import crop_cell
    from napari_hemofm.core.io import ImageReadError, read_image, to_rgb8
    from napari_hemofm.core.thumbnails import make_thumbnail

    chosen = _even_sample(cells, max_cells)
    n = len(chosen)
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    montage = np.full((rows * tile, cols * tile, 3), 255, dtype=np.uint8)
    ids: list[str] = []
    k = 0
    for cell_id, row in chosen.iterrows():
        src = str(row["source"])
        try:
            image = images[src] if images and src in images else read_image(src)
            crop = crop_cell(image, (row["x0"], row["y0"], row["x1"], row["y1"]))
            thumb = make_thumbnail(to_rgb8(crop), tile)
        except (ImageReadError, OSError, ValueError) as exc:
            log.warning("montage: %s skipped (%s)", src, exc)
            continue
        r, c = divmod(k, cols)
        montage[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = thumb
        ids.append(str(cell_id))
        k += 1
    pos = np.arange(len(ids))
    yx = np.stack([(pos // cols + 0.5) * tile, (pos % cols + 0.5) * tile], axis=1).astype(float)
    return montage, ids, yx.reshape(-1, 2)


def _even_sample(cells: pd.DataFrame, max_cells: int) -> pd.DataFrame:
    """At most ``max_cells`` rows, the same number per label, in label order."""
    if len(cells) <= max_cells:
        return cells.sort_values("label", kind="stable") if "label" in cells else cells
    if "label" not in cells:
        return cells.iloc[:max_cells]
    groups = list(cells.groupby(cells["label"].astype(str), sort=True, observed=True))
    share = max(1, max_cells // max(1, len(groups)))
    parts = [g.iloc[:share] for _, g in groups]
    return pd.concat(parts).iloc[:max_cells]


def _montage_layer(
    cells: pd.DataFrame, name: str, images: dict[str, Any] | None = None
) -> LayerData | None:
    from napari_hemofm._widgets._layers import MONTAGE_KEY, SOURCE_KEY

    if len(cells) == 0:
        return None
    montage, ids, yx = make_montage(cells, images=images)
    if len(cells) > len(ids):
        _notify(
            f"{name}: the montage shows {len(ids)} of {len(cells)} crops; all are in the "
            "cell table and the map."
        )
    meta = {
        SOURCE_KEY: f"montage:{name}",
        MONTAGE_KEY: {"cell_ids": ids, "yx": yx, "tile": MONTAGE_TILE},
    }
    return (montage, {"name": name, "rgb": True, "metadata": meta}, "image")


def _is_crop(obs: pd.DataFrame) -> pd.Series:
    """Per cell: it is a whole crop file (one cell per source, box from the origin)."""
    per_source = obs.groupby("source", observed=True)["source"].transform("size")
    return (per_source == 1) & (obs["x0"] == 0) & (obs["y0"] == 0)


# ------------------------------------------------------------------------ readers
def read_project(path: str) -> list[LayerData]:
    """Open a HemoFM project (``.h5ad``): its cells, smears and crops.

    Parameters
    ----------
    path : str
        A project file written by ``hemofm embed`` or the writer.

    Returns
    -------
    list of LayerData
        One image layer per smear found on disk (at most :data:`MAX_SMEARS`), one crop
        montage for the crops; without a viewer also the ``cells`` Points layers.

    Raises
    ------
    ValueError
        When the file is not a readable project (the message says why).
    """
    from napari_hemofm._widgets._project import open_project

    viewer = _current_viewer()
    # with a viewer: the lock (else read-only) and "locate images"; without: read-only
    table = open_project(path, interactive=viewer is not None)
    name = Path(path).stem
    obs = table.obs
    crop = _is_crop(obs).to_numpy()
    smear_sources = list(dict.fromkeys(obs["source"].astype(str)[~crop]))
    layers: list[LayerData] = []
    images: dict[str, np.ndarray] = {}
    missing = []
    for src in smear_sources:
        if len(images) >= MAX_SMEARS:
            break
        data = _read_smear(src)
        if data is None:
            missing.append(src)
            continue
        images[src] = data
    if len(smear_sources) > len(images) + len(missing):
        _notify(
            f"{name}: opened {len(images)} of {len(smear_sources)} smears; the others' "
            "cells are in the cell table and the map."
        )
    if missing:
        _notify(f"{name}: {len(missing)} smear file(s) not found, e.g. {missing[0]}")
    layers.extend(_smear_layer(src, data) for src, data in images.items())
    montage = _montage_layer(obs[crop], f"{name} crops")
    if montage is not None:
        layers.append(montage)
    if viewer is None:
        return layers + _points_layers(table, layers)
    from napari_hemofm._widgets._layers import get_layer_sync
    from napari_hemofm._widgets._session import get_session

    session = get_session(viewer)
    if session.table.n_cells:
        _notify(f"{name}: replaced the session's {session.table.n_cells} cells")
    for src, data in images.items():
        session.add_image(src, data)
    get_layer_sync(viewer)  # makes the cells layers as the images arrive
    old = session.table
    session.set_table(table)
    if old is not table:
        old.close()  # the replaced project's lock goes back
    return layers


def _read_smear(source: str) -> np.ndarray | None:
    from napari_hemofm.core.io import ImageReadError, LazyRGBImage, read_image

    try:
        image = read_image(source)
    except (ImageReadError, OSError, ValueError):
        return None
    if isinstance(image, LazyRGBImage):
        return None  # napari cannot page a window-by-window TIFF; the map still works
    return np.asarray(image)


def _smear_layer(source: str, data: np.ndarray) -> LayerData:
    from napari_hemofm._widgets._layers import SOURCE_KEY

    meta = {SOURCE_KEY: source}
    return (data, {"name": Path(source).name, "rgb": data.ndim == 3, "metadata": meta}, "image")


def read_crop_folder(path: str) -> list[LayerData]:
    """Open a crop folder ``<root>/<class>/<file>``: its crops as cells and a montage.

    Each crop is one cell labelled with its folder name (``label_origin`` ``imported``),
    batch = the folder's name, id ``"<folder>/<class>/<file>#0"`` (DESIGN.md). The cells
    are added to the viewer's session (not embedded yet: the Embed panel's Run embeds
    them); crops already in the session are not added twice.

    Returns
    -------
    list of LayerData
        The crop montage (and, without a viewer, its ``cells`` Points layer).
    """
    from napari_hemofm.core.cells import table_from_frame
    from napari_hemofm.core.inputs import collect_cells
    from napari_hemofm.core.io import format_skipped

    root = Path(path)
    found = collect_cells([root])
    if found.skipped:
        _notify(format_skipped(found.skipped))
    cells = found.cells
    if len(cells) == 0:
        return []
    montage = _montage_layer(cells, f"{root.name} crops")
    layers = [montage] if montage is not None else []
    viewer = _current_viewer()
    if viewer is None:
        return layers + _points_layers(table_from_frame(cells), layers)
    from napari_hemofm._widgets._layers import get_layer_sync
    from napari_hemofm._widgets._session import get_session

    session = get_session(viewer)
    get_layer_sync(viewer)
    known = cells.index.isin(session.table.cell_ids)
    if known.all():
        _notify(f"{root.name}: its {len(cells)} crops are already in the session")
    else:
        if known.any():
            _notify(f"{root.name}: {int(known.sum())} crops already in the session were kept")
        session.table.add_cells(cells[~known])
    return layers


def _points_layers(table: CellTable, layers: list[LayerData]) -> list[LayerData]:
    """``cells`` Points layers for the image layers read (used when there is no viewer)."""
    from napari_hemofm._widgets._layers import (
        CELLS_KEY,
        LAYER_SUFFIX,
        MONTAGE_KEY,
        SOURCE_KEY,
        cell_colors,
        cell_features,
    )

    out: list[LayerData] = []
    ids = pd.Index(table.cell_ids)
    sources = table.obs["source"].astype(str).to_numpy()
    obs = table.obs
    for _, kwargs, _kind in layers:
        meta = kwargs["metadata"]
        montage = meta.get(MONTAGE_KEY)
        if montage is not None:
            rows = ids.get_indexer(pd.Index(montage["cell_ids"]))
            yx = np.asarray(montage["yx"], dtype=float)[rows >= 0]
            rows = rows[rows >= 0]
            size = np.full(len(rows), montage["tile"] * 0.8)
        else:
            rows = np.flatnonzero(sources == meta[SOURCE_KEY])
            yx = obs[["y", "x"]].to_numpy(dtype=float)[rows]
            size = (obs["x1"].to_numpy() - obs["x0"].to_numpy())[rows] * 0.8
        face, border = cell_colors(table, rows)
        out.append(
            (
                yx,
                {
                    "name": f"{kwargs['name']}{LAYER_SUFFIX}",
                    "features": cell_features(table, rows),
                    "size": size,
                    "face_color": face,
                    "border_color": border,
                    "metadata": {CELLS_KEY: meta[SOURCE_KEY]},
                },
                "points",
            )
        )
    return out

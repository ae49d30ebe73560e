"""npe2 writers: the cells of ``cells`` Points layers as a project (``.h5ad``) or a CSV.

A ``cells`` layer carries each point's ``cell_id`` in its features; the writers look
those ids up in the napari-hemofm session that holds them (the viewer's cell table)
and write *those cells'* rows, in table order, with everything the table knows about
them: File > Save Selected Layer(s) with every ``cells`` layer selected saves the
whole project. ``.h5ad`` keeps embeddings, UMAP and metadata (``core.io.save_project``:
written to a temporary file, then renamed); ``.csv`` holds ``cell_id`` and the
``obs`` columns, no embeddings. Points that are no session's cells (a hand-made
Points layer with a ``cell_id`` feature) can still be written as CSV from their
features and coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable

__all__ = ["cells_of_layers", "write_csv", "write_h5ad"]

FullLayerData = tuple[Any, dict[str, Any], str]


def _cell_ids(layer_data: Sequence[FullLayerData]) -> list[str]:
    ids: list[str] = []
    for _data, meta, kind in layer_data:
        features = meta.get("features")
        if kind != "points" or features is None or "cell_id" not in features:
            name = meta.get("name", "?")
            raise ValueError(
                f"layer {name!r} has no cell_id feature: save a 'cells' layer made by "
                "napari-hemofm (Embed cells panel, or an opened project)"
            )
        ids.extend(pd.Series(features["cell_id"]).astype(str).tolist())
    return ids


def _session_tables() -> list[CellTable]:
    """Tables of the sessions that have ``cells`` layers, the current viewer's first."""
    from napari_hemofm._widgets._layers import open_sessions

    return [session.table for session in open_sessions()]


def cells_of_layers(layer_data: Sequence[FullLayerData]) -> tuple[CellTable, np.ndarray] | None:
    """The session table holding the layers' cells and their rows (sorted).

    Returns
    -------
    (CellTable, ndarray of int) or None
        None when no open session holds all the cells.

    Raises
    ------
    ValueError
        When a layer has no ``cell_id`` feature.
    """
    ids = _cell_ids(layer_data)
    for table in _session_tables():
        try:
            rows = table.positions(ids)
        except KeyError:
            continue
        return table, np.unique(rows)
    return None


def _subset(table: CellTable, rows: np.ndarray) -> CellTable:
    from napari_hemofm.core.cells import CellTable

    if len(rows) == table.n_cells:
        return table
    return CellTable(table.adata[rows].copy())


def write_h5ad(path: str, layer_data: list[FullLayerData]) -> list[str]:
    """Write the cells of ``cells`` Points layers as a HemoFM project (``.h5ad``).

    Parameters
    ----------
    path : str
        Target file (``.h5ad`` is appended when missing).
    layer_data : list of (data, metadata, layer type)
        napari's full layer data of the layers to save.

    Returns
    -------
    list of str
        The file written.

    Raises
    ------
    ValueError
        When the points are not cells of an open napari-hemofm session.
    """
    from napari_hemofm.core.io import save_project

    found = cells_of_layers(layer_data)
    if found is None:
        raise ValueError(
            "these points are not cells of an open napari-hemofm session, so there are no "
            "embeddings to save; save them as .csv instead"
        )
    table, rows = found
    return [str(save_project(_subset(table, rows), path))]


def write_csv(path: str, layer_data: list[FullLayerData]) -> list[str]:
    """Write the cells of ``cells`` Points layers as a CSV (``cell_id`` + ``obs`` columns).

    Parameters
    ----------
    path : str
        Target file (``.csv`` is appended when missing).
    layer_data : list of (data, metadata, layer type)

    Returns
    -------
    list of str
        The file written.

    Notes
    -----
    Embeddings are not written (they belong in the ``.h5ad``). Points of no open
    session are written from their features, with ``y, x`` from the point data.
    """
    out = Path(path)
    if out.suffix.lower() != ".csv":
        out = out.with_name(out.name + ".csv")
    found = cells_of_layers(layer_data)
    if found is not None:
        table, rows = found
        frame = table.obs.iloc[rows].reset_index()
    else:
        parts = []
        for data, meta, _kind in layer_data:
            part = pd.DataFrame(meta["features"]).reset_index(drop=True)
            coords = np.asarray(data, dtype=float).reshape(len(part), -1)
            part["y"], part["x"] = coords[:, -2], coords[:, -1]
            parts.append(part)
        frame = pd.concat(parts, ignore_index=True)
    from napari_hemofm.core.io import write_csv as write_csv_file

    return [str(write_csv_file(frame, out))]

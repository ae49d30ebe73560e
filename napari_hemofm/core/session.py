"""A review session: the cell table, its in-memory images, thumbnails and one shared selection.

Every view of the app (the ``cells`` Points layers, the cell map, the thumbnail strip,
the Review gallery, the Batch view) holds a reference to one :class:`CellSession` and
listens to its signals; none keeps a selection of its own. A view that changes the selection passes
its own name as ``origin`` so that it can ignore the echo of its own change.
The session is GUI-free: the napari side (``_widgets``) keeps one per viewer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np
from psygnal import Signal, SignalGroup

from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.thumbnails import ThumbnailCache

SelectMode = Literal["replace", "add", "remove", "toggle"]


class SessionEvents(SignalGroup):
    """Signals of a :class:`CellSession`."""

    selection_changed = Signal(object, str)
    """``(rows, origin)``: the selected row positions (sorted int array) and who changed them."""
    table_replaced = Signal(object)
    """``(table,)``: a new cell table (e.g. a project was opened); views rebuild."""


class CellSession:
    """The shared state of one review session.

    Parameters
    ----------
    table : CellTable, optional
        The cell table (a new empty one by default).
    images : mapping of str to array, optional
        In-memory images by source name (napari image layers by layer name), used for
        thumbnails and embedding; sources not named here are read from disk.
    thumbnail_size : int
        Side of thumbnails in pixels.

    Attributes
    ----------
    events : SessionEvents
    thumbnails : ThumbnailCache
    """

    def __init__(
        self,
        table: CellTable | None = None,
        *,
        images: Mapping[str, Any] | None = None,
        thumbnail_size: int = 96,
    ) -> None:
        self.events = SessionEvents()
        self._table = table if table is not None else CellTable()
        self.images: dict[str, Any] = dict(images or {})
        self.thumbnails = ThumbnailCache(lambda: self._table.obs, size=thumbnail_size)
        self.thumbnails.images = self.images  # one dict: layers added later are seen
        self._selected = np.zeros(0, dtype=np.int64)

    # ---------------------------------------------------------------- table
    @property
    def table(self) -> CellTable:
        """The cell table."""
        return self._table

    def set_table(self, table: CellTable) -> None:
        """Replace the cell table (clears the selection and the thumbnail cache)."""
        self._table = table
        self.thumbnails.clear()
        self._selected = np.zeros(0, dtype=np.int64)
        self.events.table_replaced.emit(table)
        self.events.selection_changed.emit(self._selected.copy(), "session")

    def add_image(self, name: str, data: Any) -> None:
        """Register an in-memory image under a source name."""
        self.images[name] = data

    # ------------------------------------------------------------ selection
    @property
    def selected(self) -> np.ndarray:
        """Selected row positions, sorted, as an int64 array (a copy)."""
        return self._selected.copy()

    def selected_ids(self) -> list[str]:
        """Cell ids of the selection, in row order."""
        return self._table.cell_ids[self._selected].tolist()

    def select(
        self,
        cells: Iterable[int] | Iterable[str] | np.ndarray,
        *,
        origin: str = "api",
        mode: SelectMode = "replace",
    ) -> np.ndarray:
        """Change the shared selection and tell every view.

        Parameters
        ----------
        cells : iterable of int (row positions), of str (cell ids), or a bool mask
            of shape (n_cells,)
            Cells to select.
        origin : str
            Name of the view making the change (listeners skip their own echo).
        mode : {"replace", "add", "remove", "toggle"}
            How ``cells`` combine with the current selection.

        Returns
        -------
        ndarray of int64
            The new selection (sorted row positions).

        Raises
        ------
        IndexError
            If a row position is out of range.
        KeyError
            If a cell id is unknown.
        """
        rows = self._rows(cells)
        current = self._selected
        if mode == "replace":
            new = rows
        elif mode == "add":
            new = np.union1d(current, rows)
        elif mode == "remove":
            new = np.setdiff1d(current, rows)
        elif mode == "toggle":
            new = np.setxor1d(current, rows)
        else:
            raise ValueError(f"mode must be replace, add, remove or toggle; got {mode!r}")
        new = np.asarray(new, dtype=np.int64)
        if not np.array_equal(new, current):
            self._selected = new
            self.events.selection_changed.emit(new.copy(), origin)
        return new.copy()

    def clear_selection(self, *, origin: str = "api") -> None:
        """Select nothing."""
        self.select(np.zeros(0, dtype=np.int64), origin=origin)

    def _rows(self, cells: Iterable[int] | Iterable[str] | np.ndarray) -> np.ndarray:
        n = self._table.n_cells
        arr = np.asarray(cells if isinstance(cells, np.ndarray) else list(cells))
        if arr.dtype == bool:
            if arr.shape != (n,):
                raise IndexError(f"a selection mask needs shape ({n},); got {arr.shape}")
            return np.flatnonzero(arr).astype(np.int64)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if arr.dtype.kind in "iu":
            rows = np.unique(arr.astype(np.int64))
            if rows[0] < 0 or rows[-1] >= n:
                raise IndexError(f"row positions must lie in [0, {n}); got {rows[[0, -1]]}")
            return rows
        return np.unique(self._table.positions(arr.astype(str)))

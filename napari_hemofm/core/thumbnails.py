"""Cell thumbnails cut on demand from their sources, cached within a memory budget.

Holding a thumbnail of every cell does not scale (100k cells x 96 x 96 x 3 bytes is
2.7 GB), so thumbnails are cut when a view asks for them and kept in a
least-recently-used cache with a byte budget. Decoded source images (a smear serves
many cells) have a small LRU cache of their own. Everything here is thread-safe:
widgets call :meth:`ThumbnailCache.load` from a worker thread and
:meth:`ThumbnailCache.peek` from the GUI thread, which never blocks on I/O.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd


class _ByteLRU:
    """A thread-safe LRU mapping bounded by the total ``nbytes`` of its values."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = int(budget_bytes)
        self.nbytes = 0
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        size = int(getattr(value, "nbytes", 0))
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= int(getattr(old, "nbytes", 0))
            if size > self.budget:
                return
            self._items[key] = value
            self.nbytes += size
            while self.nbytes > self.budget and self._items:
                _, dropped = self._items.popitem(last=False)
                self.nbytes -= int(getattr(dropped, "nbytes", 0))

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Any) -> bool:
        return key in self._items

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0


def make_thumbnail(crop: np.ndarray, size: int) -> np.ndarray:
    """Resize a crop to ``(size, size, 3)`` uint8 (squash, bilinear, antialiased).

    Parameters
    ----------
    crop : ndarray of shape (H, W, 3), uint8
    size : int
        Side of the thumbnail in pixels.
    """
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(crop))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img)


class ThumbnailCache:
    """Thumbnails of cells by cell id, cut from their source images on demand.

    Parameters
    ----------
    cells : pandas.DataFrame or callable returning one
        Per-cell ``source`` and crop box ``x0, y0, x1, y1``, indexed by cell id (a
        cell table's ``obs``; a callable is re-read on each miss, so cells added later
        are found).
    images : mapping of str to array, optional
        In-memory images by source name (napari layers); other sources are read
        from disk with :func:`~.io.read_image`.
    size : int
        Thumbnail side in pixels.
    budget_bytes : int
        Memory budget of the thumbnail cache (default 256 MiB: ~9,000 thumbnails of
        96 px).
    source_budget_bytes : int
        Memory budget of the decoded-source cache (default 512 MiB).
    """

    def __init__(
        self,
        cells: pd.DataFrame | Callable[[], pd.DataFrame],
        *,
        images: Mapping[str, Any] | None = None,
        size: int = 96,
        budget_bytes: int = 256 * 2**20,
        source_budget_bytes: int = 512 * 2**20,
    ) -> None:
        self._cells = cells
        self.images = dict(images or {})
        self.size = int(size)
        self._thumbs = _ByteLRU(budget_bytes)
        self._sources = _ByteLRU(source_budget_bytes)
        self.failed: dict[str, str] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held by cached thumbnails (never above the budget)."""
        return self._thumbs.nbytes

    def __len__(self) -> int:
        return len(self._thumbs)

    def _frame(self) -> pd.DataFrame:
        return self._cells() if callable(self._cells) else self._cells

    def peek(self, cell_id: str) -> np.ndarray | None:
        """The cached thumbnail of a cell, or ``None`` (never reads anything)."""
        return self._thumbs.get(cell_id)

    def source_image(self, source: str) -> Any:
        """A cell's whole source image, as thumbnails are cut from it (cached; may block)."""
        return self._source(source)

    def _source(self, source: str) -> Any:
        from napari_hemofm.core.io import LazyRGBImage, read_image, to_rgb8

        if source in self.images:
            image = self.images[source]
            return image if isinstance(image, LazyRGBImage) else to_rgb8(image)
        image = self._sources.get(source)
        if image is None:
            image = read_image(source)
            self._sources.put(source, image)
        return image

    def load(
        self,
        cell_ids: Iterable[str],
        *,
        cancel: Callable[[], bool] | None = None,
    ) -> dict[str, np.ndarray]:
        """Return thumbnails of ``cell_ids``, cutting the missing ones (blocking).

        Cells whose source cannot be read are left out and recorded in
        :attr:`failed` (cell id -> reason). ``cancel()`` is checked between cells.

        Returns
        -------
        dict of str to ndarray of shape (size, size, 3), uint8
        """
        from napari_hemofm.core.detect import crop_cell
        from napari_hemofm.core.io import ImageReadError

        out: dict[str, np.ndarray] = {}
        frame = None
        for cell_id in cell_ids:
            if cancel is not None and cancel():
                break
            thumb = self._thumbs.get(cell_id)
            if thumb is None and cell_id not in self.failed:
                if frame is None:
                    frame = self._frame()
                try:
                    row = frame.loc[cell_id]
                except KeyError:
                    self.failed[cell_id] = "unknown cell id"
                    continue
                box = tuple(int(row[c]) for c in ("x0", "y0", "x1", "y1"))
                try:
                    image = self._source(str(row["source"]))
                except (ImageReadError, OSError) as exc:
                    self.failed[cell_id] = str(exc)
                    continue
                thumb = make_thumbnail(crop_cell(image, box), self.size)
                self._thumbs.put(cell_id, thumb)
            if thumb is not None:
                out[cell_id] = thumb
        return out

    def clear(self) -> None:
        """Drop all cached thumbnails and sources (e.g. after the images changed)."""
        self._thumbs.clear()
        self._sources.clear()
        self.failed.clear()

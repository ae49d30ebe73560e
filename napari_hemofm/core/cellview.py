"""One cell up close: its crop at full resolution and the field of the smear around it.

Used by the Cell viewer dock (``_widgets/_cellviewer.py``) and open to scripts: everything
here is numpy on an image that is already read (see
:meth:`~napari_hemofm.core.thumbnails.ThumbnailCache.source_image`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The field shows this many box sizes around the cell (3: one box on each side).
FIELD_SCALE = 3.0


@dataclass(frozen=True)
class CellField:
    """A cell's crop and its surroundings.

    Attributes
    ----------
    crop : ndarray of shape (h, w, 3), uint8
        The cell's box at full resolution.
    field : ndarray of shape (H, W, 3), uint8
        The region around it (``FIELD_SCALE`` times the box, clipped to the image).
    box_in_field : tuple of 4 int
        The cell's box ``(x0, y0, x1, y1)`` in field coordinates.
    """

    crop: np.ndarray
    field: np.ndarray
    box_in_field: tuple[int, int, int, int]


def cell_field(image: Any, box: Sequence[int], *, scale: float = FIELD_SCALE) -> CellField:
    """Cut a cell's crop and the field around it out of its source image.

    Parameters
    ----------
    image : array-like of shape (H, W, 3)
        The source image (RGB uint8, or a lazily read image).
    box : sequence of 4 int
        The cell's crop box ``(x0, y0, x1, y1)`` in image pixels.
    scale : float
        Side of the field in box sizes (>= 1).

    Returns
    -------
    CellField

    Raises
    ------
    ValueError
        On an empty box or an image without pixels.
    """
    from napari_hemofm.core.detect import crop_cell

    x0, y0, x1, y1 = (int(v) for v in box)
    crop = np.asarray(crop_cell(image, (x0, y0, x1, y1)))
    h, w = np.shape(image)[:2]
    bw, bh = x1 - x0, y1 - y0
    pad_x = round(bw * (max(scale, 1.0) - 1) / 2)
    pad_y = round(bh * (max(scale, 1.0) - 1) / 2)
    fx0, fy0 = max(x0 - pad_x, 0), max(y0 - pad_y, 0)
    fx1, fy1 = min(x1 + pad_x, w), min(y1 + pad_y, h)
    if fx1 <= fx0 or fy1 <= fy0:  # the box lies outside the image: the crop is all there is
        return CellField(crop, crop, (0, 0, bw, bh))
    field = np.asarray(crop_cell(image, (fx0, fy0, fx1, fy1)))
    return CellField(crop, field, (x0 - fx0, y0 - fy0, x1 - fx0, y1 - fy0))

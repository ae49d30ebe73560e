"""Class colours shared by every view, so a class has one colour in the map and the image.

Tableau 20 (saturated colours first) in class (hotkey) order; classes beyond it get
golden-angle hues. Grey is never a class colour: it means "no value".
"""

from __future__ import annotations

import colorsys
from typing import Any

PALETTE: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
    "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79", "#637939",
)  # fmt: skip

MISSING_COLOR = "#808080"
"""Colour of cells with no value (unlabelled, no prediction, NaN)."""

_GOLDEN = 0.618033988749895


def class_rgb(index: int) -> tuple[float, float, float]:
    """RGB colour (0-1) of category number ``index``."""
    if index < len(PALETTE):
        h = PALETTE[index].lstrip("#")
        return tuple(int(h[i : i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]
    return colorsys.hsv_to_rgb((index * _GOLDEN) % 1.0, 0.65, 0.95)


def class_hex(index: int) -> str:
    """``#rrggbb`` colour of category number ``index``."""
    if index < len(PALETTE):
        return PALETTE[index]
    return "#" + "".join(f"{round(c * 255):02x}" for c in class_rgb(index))


def theme_background(viewer: Any) -> str:
    """Background colour (hex) of the viewer's napari theme, for canvases drawn by hand."""
    from napari.utils.theme import get_theme

    try:
        return get_theme(viewer.theme).background.as_hex()
    except Exception:  # an unknown theme id must not break a widget
        return "#262930"

"""Colours and legends shared by every view, so a value has one colour everywhere.

Class colours: Tableau 20 (saturated colours first) in class (hotkey) order; classes
beyond it get golden-angle hues. Grey is never a class colour: it means "no value".
:func:`categorical_scheme` and :func:`numeric_scheme` turn a column into per-cell
``0xAARRGGBB`` colours plus legend entries; :class:`LegendView` shows them in a box of
bounded height (the first :data:`MAX_LEGEND_ENTRIES` categories by count, the rest summed up
as "others", scrolling when the dock is small). :func:`category_order` keeps one palette
order per table and column, so the Cell map, the ``cells`` layers and the Review gallery
give a category (a cluster, a batch) the same colour.
"""

from __future__ import annotations

import colorsys
import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import QFrame, QLabel, QScrollArea, QSizePolicy, QVBoxLayout, QWidget

PALETTE: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
    "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79", "#637939",
)  # fmt: skip

MISSING_COLOR = "#808080"
"""Colour of cells with no value (unlabelled, no prediction, NaN)."""

#: Colormap of numeric columns.
COLORMAP = "viridis"
#: Integer columns with at most this many distinct values are coloured as categories.
MAX_INT_CATEGORIES = 20
#: Legend entries shown at most; the rest become one "others" entry.
MAX_LEGEND_ENTRIES = 12
#: Height of a legend box in pixels before it scrolls.
LEGEND_MAX_HEIGHT = 96

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


def hex_to_argb(color: str) -> int:
    """``#rrggbb`` -> opaque ``0xAARRGGBB`` (QImage's ``Format_RGB32``)."""
    return 0xFF000000 | int(color.lstrip("#")[:6], 16)


MISSING_ARGB = hex_to_argb(MISSING_COLOR)
"""``0xAARRGGBB`` of :data:`MISSING_COLOR`."""


def argb_to_hex(argb: int) -> str:
    """``0xAARRGGBB`` -> ``#rrggbb``."""
    return f"#{int(argb) & 0xFFFFFF:06x}"


@functools.lru_cache(maxsize=8)
def colormap_lut(name: str = COLORMAP) -> np.ndarray:
    """256 ``0xAARRGGBB`` colours of a vispy colormap, shape (256,), uint32."""
    from vispy.color import get_colormap

    rgba = np.asarray(get_colormap(name).map(np.linspace(0.0, 1.0, 256)[:, None]))
    c = np.clip(np.rint(rgba * 255.0), 0, 255).astype(np.uint32)
    return (0xFF << 24 | (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]).astype(np.uint32)


def colormap_bar(lut: np.ndarray, width: int = 160, height: int = 10) -> QPixmap:
    """A horizontal bar of a colormap LUT (low values left)."""
    bar = np.ascontiguousarray(np.repeat(np.asarray(lut, np.uint32)[None, :], height, axis=0))
    image = QImage(bar.data, bar.shape[1], bar.shape[0], 4 * bar.shape[1],
                   QImage.Format.Format_RGB32).copy()  # fmt: skip
    return QPixmap.fromImage(image).scaled(width, height)


def html_escape(text: Any) -> str:
    """Text made safe for Qt rich text."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def theme_background(viewer: Any) -> str:
    """Background colour (hex) of the viewer's napari theme, for canvases drawn by hand."""
    from napari.utils.theme import get_theme

    try:
        return get_theme(viewer.theme).background.as_hex()
    except Exception:  # an unknown theme id must not break a widget
        return "#262930"


_ORDERS: weakref.WeakKeyDictionary[Any, dict[str, dict[str, int]]] = weakref.WeakKeyDictionary()


def category_order(table: Any, column: str) -> dict[str, int]:
    """Palette index per category of ``table``'s ``column``, shared by every view.

    Label and prediction follow the class list (class ``i``, hotkey order, gets palette
    colour ``i``). Any other column gets one dict per table, filled by
    :func:`categorical_scheme` as categories are first seen, so new categories never
    shift the old colours and every view that asks here agrees.

    Parameters
    ----------
    table : CellTable
        The cell table (held weakly: a new table starts afresh).
    column : str
        An ``obs`` column.

    Returns
    -------
    dict of str to int
        The live dict (a fresh one for label / prediction).
    """
    if column in ("label", "prediction"):
        return {name: i for i, name in enumerate(table.classes)}
    return _ORDERS.setdefault(table, {}).setdefault(column, {})


def forget_category_order(table: Any, column: str) -> None:
    """Drop the palette order of ``column`` (its categories were rewritten, e.g. reclustered).

    The dict is emptied in place, so views holding it see the new order.
    """
    orders = _ORDERS.get(table)
    if orders is not None and column in orders:
        orders[column].clear()


def is_categorical(values: pd.Series) -> bool:
    """Whether a column is coloured by category (else by a colormap).

    Categorical, string, object and boolean columns are; so are integer columns with at
    most :data:`MAX_INT_CATEGORIES` distinct values (cluster numbers).
    """
    dtype = values.dtype
    if isinstance(dtype, pd.CategoricalDtype) or dtype.kind in "OSUb":
        return True
    if pd.api.types.is_string_dtype(dtype):
        return True
    if pd.api.types.is_integer_dtype(dtype):
        return values.nunique(dropna=True) <= MAX_INT_CATEGORIES
    return not pd.api.types.is_numeric_dtype(dtype)


@dataclass
class ColorScheme:
    """How one column maps to colours, and what its legend shows.

    Attributes
    ----------
    kind : {"categorical", "numeric"}
    colors : ndarray of shape (n_cells,), uint32
        ``0xAARRGGBB`` per cell.
    entries : list of (str, str, int)
        Categorical legend: (name, hex colour, count) in palette order, the missing entry
        last.
    vmin, vmax : float
        Numeric range of the colormap (NaN for categories).
    n_missing : int
        Cells with no value (grey).
    missing_name : str
        What the grey entry is called ("unlabelled", "no value").
    colormap : str
        Colormap of a numeric scheme.
    """

    kind: Literal["categorical", "numeric"] = "categorical"
    colors: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    entries: list[tuple[str, str, int]] = field(default_factory=list)
    vmin: float = float("nan")
    vmax: float = float("nan")
    n_missing: int = 0
    missing_name: str = "no value"
    colormap: str = COLORMAP


def categorical_scheme(
    values: Sequence[Any] | pd.Series,
    order: dict[str, int],
    missing_name: str = "no value",
) -> ColorScheme:
    """Colours of a categorical column: category ``c`` gets palette colour ``order[c]``.

    Parameters
    ----------
    values : sequence of shape (n_cells,)
        Any values; None / NaN / ``pd.NA`` are missing (grey).
    order : dict of str to int
        Palette index per category, updated in place: categories not in it get the next
        free index, so colours never shift when new categories appear.
    missing_name : str
        Legend name of the grey entry.

    Returns
    -------
    ColorScheme
    """
    series = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=object)
    if not isinstance(series.dtype, pd.CategoricalDtype):
        as_obj = series.astype(object)
        as_str = [None if pd.isna(v) else str(v) for v in as_obj.to_numpy()]
        series = pd.Series(pd.Categorical(as_str))
    categories = [str(c) for c in series.cat.categories]
    for name in categories:
        order.setdefault(name, len(order))
    lut = np.array(
        [hex_to_argb(class_hex(order[c])) for c in categories] + [MISSING_ARGB], dtype=np.uint32
    )
    codes = np.asarray(series.cat.codes, dtype=np.int64)  # -1 = missing -> last entry
    counts = np.bincount(codes + 1, minlength=len(categories) + 1)
    ranked = sorted(range(len(categories)), key=lambda i: order[categories[i]])
    scheme = ColorScheme(
        kind="categorical", colors=lut[codes], n_missing=int(counts[0]), missing_name=missing_name
    )
    scheme.entries = [
        (categories[i], class_hex(order[categories[i]]), int(counts[i + 1]))
        for i in ranked
        if counts[i + 1] > 0
    ]
    if scheme.n_missing:
        scheme.entries.append((missing_name, MISSING_COLOR, scheme.n_missing))
    return scheme


def numeric_scheme(
    values: Sequence[float] | np.ndarray,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    colormap: str = COLORMAP,
    lut: np.ndarray | None = None,
    missing_name: str = "no value",
) -> ColorScheme:
    """Colours of a numeric column on a colormap (NaN / inf grey).

    Parameters
    ----------
    values : array-like of shape (n_cells,)
    vmin, vmax : float, optional
        Ends of the colour range (default: the finite minimum and maximum).
    colormap : str
        vispy colormap name.
    lut : ndarray of shape (256,), uint32, optional
        A ready LUT instead of ``colormap`` (e.g. a trimmed one).
    missing_name : str
        Legend name of the grey entry.

    Returns
    -------
    ColorScheme
    """
    v = pd.to_numeric(pd.Series(np.asarray(values).ravel()), errors="coerce").to_numpy(np.float64)
    finite = np.isfinite(v)
    colors = np.full(len(v), MISSING_ARGB, np.uint32)
    scheme = ColorScheme(kind="numeric", n_missing=int((~finite).sum()), colormap=colormap)
    scheme.missing_name = missing_name
    if finite.any():
        lo = float(v[finite].min()) if vmin is None else float(vmin)
        hi = float(v[finite].max()) if vmax is None else float(vmax)
        scheme.vmin, scheme.vmax = lo, hi
        t = (v[finite] - lo) / (hi - lo) if hi > lo else np.zeros(int(finite.sum()))
        idx = np.clip(np.rint(t * 255), 0, 255).astype(np.int64)
        colors[finite] = (colormap_lut(colormap) if lut is None else lut)[idx]
    scheme.colors = colors
    return scheme


def top_entries(
    entries: Sequence[tuple[str, str, int]], limit: int = MAX_LEGEND_ENTRIES
) -> list[tuple[str, str, int]]:
    """At most ``limit`` legend entries: the largest categories, then one "others" entry.

    The missing (grey) entry is kept whenever it is there. Entries keep their order (the
    palette order), so a category stays where the eye expects it.
    """
    entries = list(entries)
    if len(entries) <= limit:
        return entries
    missing = [e for e in entries if e[1] == MISSING_COLOR]
    rest = [e for e in entries if e[1] != MISSING_COLOR]
    keep_n = max(limit - 1 - len(missing), 1)
    keep = set(sorted(range(len(rest)), key=lambda i: -rest[i][2])[:keep_n])
    shown = [e for i, e in enumerate(rest) if i in keep]
    dropped = [e for i, e in enumerate(rest) if i not in keep]
    others = (f"{len(dropped)} others", "#b0b0b0", sum(e[2] for e in dropped))
    return [*shown, others, *missing]


def legend_html(entries: Sequence[tuple[str, str, int]], *, separator: str = " &nbsp; ") -> str:
    """Rich text of legend entries: a coloured square, the name and the count."""
    return separator.join(
        f'<span style="color:{color}">&#9632;</span>&nbsp;{html_escape(name)}'
        f'&nbsp;<span style="color:gray">({count:,})</span>'
        for name, color, count in entries
    )


class LegendView(QScrollArea):
    """A legend that never overflows: bounded height, top entries + "others", scrolls.

    Shows a :class:`ColorScheme`: categories as one wrapped line of coloured squares with
    counts (at most :data:`MAX_LEGEND_ENTRIES`, the rest summed up), numbers as a colormap
    bar with its range.

    Attributes
    ----------
    label : QLabel
        The legend text (rich text).
    bar : QLabel
        The colormap bar (hidden for categories).
    """

    def __init__(self, parent: QWidget | None = None, *, max_height: int = LEGEND_MAX_HEIGHT):
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.max_height = int(max_height)
        self.setMaximumHeight(self.max_height)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)
        inner = QWidget()
        box = QVBoxLayout(inner)
        box.setContentsMargins(0, 0, 0, 0)
        box.setSpacing(2)
        self.bar = QLabel()
        self.bar.hide()
        self.label = QLabel("")
        self.label.setTextFormat(Qt.TextFormat.RichText)
        self.label.setWordWrap(True)
        self.label.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        box.addWidget(self.bar)
        box.addWidget(self.label)
        box.addStretch(1)
        self.setWidget(inner)

    def text(self) -> str:
        """The legend's rich text."""
        return self.label.text()

    def setText(self, text: str) -> None:
        """QLabel's name for :meth:`set_text` (a drop-in for a legend QLabel)."""
        self.set_text(text)

    def set_text(self, text: str, *, bar: QPixmap | None = None) -> None:
        """Show free rich text (and a colormap bar above it when given)."""
        self.label.setText(text)
        if bar is None:
            self.bar.hide()
        else:
            self.bar.setPixmap(bar)
            self.bar.show()
        self._fit_height()

    def _fit_height(self) -> None:
        """As tall as the legend needs, at most ``max_height`` (then it scrolls)."""
        width = max(self.viewport().width(), 100)
        need = self.label.heightForWidth(width) if self.label.text() else 0
        if self.bar.isVisibleTo(self):
            need += self.bar.sizeHint().height() + 2
        self.setFixedHeight(int(min(max(need + 4, 8), self.max_height)))

    def resizeEvent(self, event) -> None:
        """Refit the height to the new width."""
        super().resizeEvent(event)
        self._fit_height()

    def show_scheme(self, scheme: ColorScheme, title: str = "") -> None:
        """Show a scheme's legend; ``title`` names the column of a numeric scheme."""
        if scheme.kind == "categorical":
            self.set_text(legend_html(top_entries(scheme.entries)))
            return
        if np.isfinite(scheme.vmin):
            text = f"{html_escape(title)}: {scheme.vmin:.3g} &#8594; {scheme.vmax:.3g}"
        else:
            text = f"{html_escape(title)}: no values"
        if scheme.n_missing:
            text += " &nbsp; " + legend_html(
                [(scheme.missing_name, MISSING_COLOR, scheme.n_missing)]
            )
        self.set_text(text, bar=colormap_bar(colormap_lut(scheme.colormap)))

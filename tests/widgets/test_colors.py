"""One colour and legend scheme for every view (``_widgets/_colors.py``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from napari_hemofm._widgets._colors import (
    MISSING_ARGB,
    MISSING_COLOR,
    categorical_scheme,
    class_hex,
    colormap_lut,
    hex_to_argb,
    numeric_scheme,
    top_entries,
)


def test_categorical_colours_are_stable_and_missing_is_grey():
    """A category keeps its palette colour when new categories appear; None, NaN and
    pd.NA are grey and counted under the missing name."""
    order: dict[str, int] = {}
    first = categorical_scheme(["b", "a", None, "b"], order, "unlabelled")
    assert order == {"a": 0, "b": 1}
    assert first.colors.tolist() == [
        hex_to_argb(class_hex(1)),
        hex_to_argb(class_hex(0)),
        MISSING_ARGB,
        hex_to_argb(class_hex(1)),
    ]
    assert first.entries == [
        ("a", class_hex(0), 1),
        ("b", class_hex(1), 2),
        ("unlabelled", MISSING_COLOR, 1),
    ]
    later = categorical_scheme(pd.Series(["c", "a", np.nan, pd.NA], dtype=object), order)
    assert order["c"] == 2
    assert later.colors[1] == first.colors[1]  # "a" kept its colour
    assert later.n_missing == 2


def test_numeric_scheme_maps_the_range_and_greys_nan():
    """The minimum gets the colormap's first colour, the maximum its last; NaN is grey."""
    scheme = numeric_scheme([1.0, np.nan, 3.0, 2.0])
    lut = colormap_lut()
    assert scheme.kind == "numeric"
    assert (scheme.vmin, scheme.vmax) == (1.0, 3.0)
    assert scheme.colors.tolist() == [lut[0], MISSING_ARGB, lut[255], lut[128]]
    fixed = numeric_scheme([0.5], vmin=0.0, vmax=1.0)
    assert fixed.colors[0] == lut[128]


def test_top_entries_keep_the_largest_and_sum_the_rest():
    """More entries than the limit: the largest ones in palette order, one "others"
    entry with the summed count, and the missing entry kept; cell counts add up."""
    entries = [(f"c{i}", class_hex(i), i + 1) for i in range(30)]
    entries.append(("no value", MISSING_COLOR, 7))
    shown = top_entries(entries, limit=12)
    assert len(shown) == 12
    assert shown[-1] == ("no value", MISSING_COLOR, 7)
    assert shown[-2][0] == "20 others"
    kept = [e for e in shown[:-2]]
    assert [e[0] for e in kept] == [f"c{i}" for i in range(20, 30)]
    assert sum(e[2] for e in shown) == sum(e[2] for e in entries)
    assert top_entries(entries[:5]) == entries[:5]


def test_category_order_is_shared_per_table_and_forgotten_in_place():
    """Two views asking for one table's column get the same live dict (so a category has
    one colour in both); another table starts afresh; label follows the class list;
    forgetting empties the dict in place (holders see the new order)."""
    from napari_hemofm._widgets._colors import category_order, forget_category_order
    from napari_hemofm.core.cells import CellTable

    a, b = CellTable(), CellTable()
    a.set_classes(["x", "y"])
    first = category_order(a, "cluster")
    categorical_scheme(pd.Series(["3", "1", None]), first)
    assert category_order(a, "cluster") is first
    assert first == {"1": 0, "3": 1}
    assert category_order(b, "cluster") == {}
    assert category_order(a, "label") == {"x": 0, "y": 1}
    forget_category_order(a, "cluster")
    assert first == {}
    assert category_order(a, "cluster") is first

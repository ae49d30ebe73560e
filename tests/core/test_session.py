"""The shared selection: one state, every change announced once with its origin."""

import numpy as np
import pandas as pd
import pytest

from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.session import CellSession


def session_with(n=10):
    frame = pd.DataFrame(
        {"source": "s", "batch": "b", "x": 1.0, "y": 1.0, "x0": 0, "y0": 0, "x1": 4, "y1": 4},
        index=[f"b/s#{k}" for k in range(n)],
    )
    table = CellTable()
    table.add_cells(frame)
    return CellSession(table, images={"s": np.zeros((8, 8, 3), np.uint8)})


def test_select_by_rows_ids_or_mask_gives_the_same_selection():
    """Rows, cell ids and a boolean mask select the same cells (sorted, unique)."""
    s = session_with()
    assert s.select([3, 1, 3]).tolist() == [1, 3]
    assert s.select(["b/s#3", "b/s#1"]).tolist() == [1, 3]
    mask = np.zeros(10, bool)
    mask[[1, 3]] = True
    assert s.select(mask).tolist() == [1, 3]
    assert s.selected_ids() == ["b/s#1", "b/s#3"]


def test_modes_combine_with_the_current_selection():
    """add / remove / toggle combine with the current selection as sets do."""
    s = session_with()
    s.select([1, 2])
    assert s.select([2, 5], mode="add").tolist() == [1, 2, 5]
    assert s.select([1], mode="remove").tolist() == [2, 5]
    assert s.select([5, 7], mode="toggle").tolist() == [2, 7]


def test_each_change_is_announced_once_with_its_origin_and_no_change_is_silent():
    """selection_changed fires once per real change, carrying the origin."""
    s = session_with()
    seen = []
    s.events.selection_changed.connect(lambda rows, origin: seen.append((rows.tolist(), origin)))
    s.select([4], origin="map")
    s.select([4], origin="layer")
    s.clear_selection(origin="layer")
    assert seen == [([4], "map"), ([], "layer")]


def test_bad_rows_and_ids_raise():
    """Out-of-range rows and unknown ids raise; the selection stays as it was."""
    s = session_with()
    s.select([2])
    with pytest.raises(IndexError):
        s.select([10])
    with pytest.raises(KeyError):
        s.select(["nope"])
    assert s.selected.tolist() == [2]


def test_replacing_the_table_clears_selection_and_announces_it():
    """set_table empties the selection and emits table_replaced."""
    s = session_with()
    s.select([1])
    got = []
    s.events.table_replaced.connect(got.append)
    new = CellTable()
    s.set_table(new)
    assert got == [new]
    assert s.selected.size == 0
    assert s.table is new


def test_thumbnails_read_in_memory_images_added_later():
    """An image registered after the session started is used for thumbnails."""
    s = session_with(2)
    s.add_image("s", np.full((8, 8), 200, np.uint8))
    thumb = s.thumbnails.load(["b/s#0"])["b/s#0"]
    assert thumb.min() == 200

"""The Cell viewer dock: the selected cell at full resolution, its field, its history and
the cells most like it (clickable)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hemofm._widgets._cellviewer import N_SIMILAR, CellViewerWidget
from napari_hemofm._widgets._session import get_session
from napari_hemofm.core.cellview import cell_field
from napari_hemofm.core.reduce import similar_cells
from tests.widgets.test_map import IMAGE_SHAPE, make_table


@pytest.fixture
def cell_viewer(make_napari_viewer, qtbot):
    """A viewer with a 200-cell table on two in-memory smears, and its Cell viewer."""
    viewer = make_napari_viewer(show=True)
    session = get_session(viewer)
    rng = np.random.default_rng(1)
    for name in ("smear_a", "smear_b"):
        session.add_image(name, rng.integers(0, 255, (*IMAGE_SHAPE, 3), dtype=np.uint8))
    session.set_table(make_table(200))
    widget = CellViewerWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Cell viewer")
    return widget


def test_shows_the_selected_cell_its_field_and_facts(cell_viewer, qtbot):
    """Selecting a cell elsewhere shows its id, label, prediction and batch, its crop at
    full resolution (the box's size) and a larger field with the box inside."""
    w = cell_viewer
    session, table = w.session, w.table
    assert w.cell_id is None
    session.select([7], origin="map")
    assert w.cell_id == table.cell_ids[7]
    assert w.title.text() == table.cell_ids[7]
    obs = table.obs.iloc[7]
    assert str(obs["prediction"]) in w.facts.text()
    assert str(obs["batch"]) in w.facts.text()
    qtbot.waitUntil(lambda: w.field is not None, timeout=10_000)
    box = [int(obs[c]) for c in ("x0", "y0", "x1", "y1")]
    assert w.field.crop.shape[:2] == (box[3] - box[1], box[2] - box[0])
    fh, fw = w.field.field.shape[:2]
    assert fh > w.field.crop.shape[0]
    assert fw > w.field.crop.shape[1]
    bx0, by0, bx1, by1 = w.field.box_in_field
    assert 0 <= bx0 < bx1 <= fw
    assert 0 <= by0 < by1 <= fh
    image = session.images[str(obs["source"])]
    np.testing.assert_array_equal(w.field.crop, image[box[1] : box[3], box[0] : box[2]])
    session.clear_selection(origin="map")
    assert w.cell_id is None


def test_cells_like_this_are_the_nearest_and_clickable(cell_viewer, qtbot):
    """The eight similar cells are the nearest by cosine similarity (an independent
    oracle), the cell itself excluded; clicking one selects it in the session."""
    w = cell_viewer
    w.session.select([3], origin="map")
    X = w.table.embeddings.astype(np.float64)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    sim = Xn @ Xn[3]
    sim[3] = -np.inf
    oracle = np.argsort(-sim)[:N_SIMILAR]
    assert w.similar_rows.tolist() == oracle.tolist()
    assert w.similar.shown_ids() == w.table.cell_ids[oracle].tolist()
    w.similar.cell_clicked.emit(int(oracle[2]))
    assert w.session.selected.tolist() == [int(oracle[2])]
    assert w.cell_id == w.table.cell_ids[oracle[2]]
    qtbot.waitUntil(lambda: not w.busy, timeout=10_000)


def test_history_lists_relabels(cell_viewer):
    """A relabel of the shown cell appears in its history (old -> new, origin)."""
    w = cell_viewer
    w.session.select([0], origin="map")
    cell_id = w.table.cell_ids[0]
    w.table.set_labels([cell_id], ["basophil"], origin="user")
    text = w.history.text()
    assert "basophil" in text


def test_similar_cells_skips_unembedded_rows():
    """similar_cells never returns rows without an embedding, nor the cell itself, and
    refuses a query cell without one."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 5)).astype(np.float32)
    X[4] = np.nan
    rows = similar_cells(X, 0, 40)
    assert 0 not in rows
    assert 4 not in rows
    assert len(rows) == 28
    with pytest.raises(ValueError, match="no embedding"):
        similar_cells(X, 4)


def test_field_is_clipped_at_the_image_border():
    """A cell at the image corner gets a field clipped to the image, its box inside."""
    image = np.arange(100 * 120 * 3, dtype=np.uint8).reshape(100, 120, 3)
    field = cell_field(image, (0, 0, 20, 10))
    assert field.crop.shape == (10, 20, 3)
    assert field.field.shape == (20, 40, 3)
    assert field.box_in_field == (0, 0, 20, 10)
    np.testing.assert_array_equal(field.field[:10, :20], field.crop)

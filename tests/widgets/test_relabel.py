"""Relabelling outside the gallery: number keys on a cells layer, lasso + key on the map,
undo / redo, and the probe retraining live after each correction (issue 5)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from qtpy.QtCore import Qt

from napari_hemofm._widgets._layers import get_layer_sync
from napari_hemofm._widgets._map import CellMapWidget
from napari_hemofm._widgets._review_state import get_retrainer, get_review
from napari_hemofm._widgets._session import get_session
from tests.widgets.test_map import make_table


def labels_of(table):
    return np.array([None if pd.isna(v) else v for v in table.obs["label"].astype(object)])


@pytest.fixture
def viewer_with_cells(make_napari_viewer, qtbot):
    """A viewer with two smears, their cells layers and a 400-cell labelled table."""
    viewer = make_napari_viewer(show=True)
    rng = np.random.default_rng(2)
    for name in ("smear_a", "smear_b"):
        viewer.add_image(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8), name=name, rgb=True)
    get_layer_sync(viewer)
    session = get_session(viewer)
    session.set_table(make_table())
    state = get_retrainer(viewer)
    state.wait_idle()
    yield viewer, session, state
    state.wait_idle()  # no retraining outlives the viewer


def test_number_key_on_a_cells_layer_relabels_the_selected_cells_and_undo_restores(
    viewer_with_cells, qtbot
):
    """With a cells layer active, key 3 gives the selected cells class 3, Ctrl+Z undoes it,
    Ctrl+Shift+Z redoes it, Backspace clears the labels; the layer's features follow."""
    viewer, session, _state = viewer_with_cells
    layer = viewer.layers["smear_a cells"]
    viewer.layers.selection.active = layer
    rows = get_layer_sync(viewer).rows_of(layer)[:4]
    before = labels_of(session.table)
    session.select(rows)
    review = get_review(viewer)
    target = review.class_for_key(3)
    bindings = {str(k): v for k, v in layer.keymap.items()}
    assert "3" in bindings
    assert "Backspace" in bindings
    bindings["3"](layer)
    after = labels_of(session.table)
    assert (after[rows] == target).all()
    assert layer.features["label"].iloc[:4].tolist() == [target] * 4
    ctrl_z = next(v for k, v in bindings.items() if k.lower() in ("ctrl+z", "control+z"))
    ctrl_z(layer)
    np.testing.assert_array_equal(labels_of(session.table), before)
    redo = next(v for k, v in bindings.items() if "shift" in k.lower() and k.lower()[-1] == "z")
    redo(layer)
    assert (labels_of(session.table)[rows] == target).all()
    bindings["Backspace"](layer)
    assert all(v is None for v in labels_of(session.table)[rows])
    assert len(viewer.layers["smear_a cells"].data) == len(get_layer_sync(viewer).rows_of(layer))


def test_lasso_on_the_map_then_a_number_key_relabels_the_lassoed_cells(viewer_with_cells, qtbot):
    """A lasso on the map selects a blob; pressing 2 on the map labels all of it classes[1];
    Ctrl+Z on the map undoes that."""
    viewer, session, _state = viewer_with_cells
    widget = CellMapWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Cell map")
    qtbot.waitUntil(lambda: not widget.busy, timeout=10_000)
    theta = np.linspace(0, 2 * np.pi, 40)
    lasso = np.c_[8 + 4 * np.cos(theta), -8 + 4 * np.sin(theta)]  # the lymphocyte blob
    rows = widget.select_polygon(lasso)
    assert len(rows) > 20
    before = labels_of(session.table)
    widget.canvas.setFocus()
    qtbot.keyClick(widget.canvas, Qt.Key.Key_2)
    review = get_review(viewer)
    assert (labels_of(session.table)[rows] == review.class_for_key(2)).all()
    qtbot.keyClick(widget.canvas, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    np.testing.assert_array_equal(labels_of(session.table), before)
    assert widget.relabel_selection("basophil")
    assert review.can_undo


def test_a_correction_retrains_the_probe_and_updates_predictions_everywhere(
    viewer_with_cells, qtbot
):
    """Relabelling most of one blob as a new class makes the retrained probe predict that
    class for the rest of the blob; the cells layer's features show the new predictions."""
    viewer, session, state = viewer_with_cells
    table = session.table
    review = get_review(viewer)
    assert review.probe is not None  # trained when the table arrived
    xy = table.adata.obsm["X_umap"]
    blob = np.flatnonzero(np.hypot(xy[:, 0] - 8, xy[:, 1] + 8) < 3.5)
    chosen = blob[: int(len(blob) * 0.7)]
    rest = np.setdiff1d(blob, chosen)
    rest = rest[pd.isna(table.obs["label"].iloc[rest]).to_numpy()]
    assert len(rest) >= 3
    review.relabel(chosen, "large granular lymphocyte")
    qtbot.waitUntil(lambda: not state.retraining, timeout=20_000)
    pred = table.obs["prediction"].astype(object).to_numpy()
    assert (pred[rest] == "large granular lymphocyte").mean() > 0.8
    layer = viewer.layers["smear_a cells"]
    sync_rows = get_layer_sync(viewer).rows_of(layer)
    shown = layer.features["prediction"].astype(object).to_numpy()
    np.testing.assert_array_equal(shown, pred[sync_rows])
    assert not state.errors
    state.wait_idle()
    assert review.last_metrics.get("balanced_accuracy", 0) > 0.5


def test_key_presses_reach_the_cells_layer_before_napari_s_mode_shortcuts(viewer_with_cells):
    """Through napari's own key dispatch (the canvas keymap handler), 3 on an active cells
    layer labels the selected cells instead of switching the layer to select mode, and
    Ctrl+Z undoes it."""
    viewer, session, _state = viewer_with_cells
    layer = viewer.layers["smear_b cells"]
    viewer.layers.selection.active = layer
    target = get_review(viewer).class_for_key(3)
    rows = get_layer_sync(viewer).rows_of(layer)
    rows = rows[labels_of(session.table)[rows] != target][:3]
    session.select(rows)
    before = labels_of(session.table)
    mode = layer.mode
    handler = viewer.window._qt_viewer.canvas._key_map_handler
    handler.press_key("3")
    handler.release_key("3")
    assert (labels_of(session.table)[rows] == target).all()
    assert layer.mode == mode
    handler.press_key("Control-Z")
    handler.release_key("Control-Z")
    np.testing.assert_array_equal(labels_of(session.table), before)

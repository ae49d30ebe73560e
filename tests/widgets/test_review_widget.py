"""The Review dock widget: sections, shared selection, keys, undo, drag and drop, classes,
zoom, threshold, differential counts and sign-off, and live retraining.

The session holds 186 synthetic cells: 180 whose 8-d embeddings form three well separated
Gaussian clusters (one per class) and 6 halfway between the first two clusters (the
probe is unsure of those). Eight cells per class carry a curated label, so the
viewer's retrainer (``_review_state``) fits a kNN probe that predicts the rest.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from qtpy.QtCore import QItemSelection, QItemSelectionModel, QPointF, Qt
from qtpy.QtGui import QDropEvent

from napari_hemofm._widgets._gallery import (
    CELLS_MIME,
    Gallery,
    decode_cells,
    encode_cells,
    hilbert_keys,
)
from napari_hemofm._widgets._review import ReviewWidget, format_metrics
from napari_hemofm._widgets._review_state import get_retrainer
from napari_hemofm._widgets._session import get_session
from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.review import NOT_CLASSED, UNIDENTIFIED, UNLABELLED

CLASSES = ("Neutrophil", "Lymphocyte", "Monocyte")
N_PER_CLASS = 60
N_LABELLED = 8
N_AMBIGUOUS = 6
AMBIGUOUS = "ambiguous"
SHAPE = (240, 320)


def make_table(seed: int = 0) -> CellTable:
    """Three separable clusters in 8-d (the first N_LABELLED cells of each labelled) and
    N_AMBIGUOUS unlabelled cells halfway between clusters 0 and 1, at the end."""
    rng = np.random.default_rng(seed)
    n_clear = N_PER_CLASS * len(CLASSES)
    n = n_clear + N_AMBIGUOUS
    k = np.repeat(np.arange(len(CLASSES)), N_PER_CLASS)
    centres = rng.normal(scale=6.0, size=(len(CLASSES), 8))
    emb = np.concatenate(
        [
            centres[k] + rng.normal(size=(n_clear, 8)),
            (centres[0] + centres[1]) / 2 + 0.3 * rng.normal(size=(N_AMBIGUOUS, 8)),
        ]
    ).astype(np.float32)
    labels = np.full(n, None, dtype=object)
    for c in range(len(CLASSES)):
        labels[np.flatnonzero(k == c)[:N_LABELLED]] = CLASSES[c]
    h, w = SHAPE
    cx, cy = rng.uniform(20, w - 20, n), rng.uniform(20, h - 20, n)
    frame = pd.DataFrame(
        {
            "source": np.where(np.arange(n) % 2, "smear_a", "smear_b"),
            "batch": np.where(np.arange(n) % 2, "lab_a", "lab_b"),
            "x": cx,
            "y": cy,
            "x0": (cx - 16).astype(int),
            "y0": (cy - 16).astype(int),
            "x1": (cx + 16).astype(int),
            "y1": (cy + 16).astype(int),
            "label": labels,
        },
        index=[f"lab/smear.png#{i}" for i in range(n)],
    )
    table = CellTable()
    table.set_classes(list(CLASSES))
    table.add_cells(frame, embeddings=emb)
    table.set_obsm("X_umap", emb[:, :2].astype(np.float32))
    return table


def truth(table: CellTable) -> np.ndarray:
    """The cluster (true class) of each cell, from its place in the table."""
    t = np.repeat(np.array(CLASSES, dtype=object), N_PER_CLASS)
    return np.concatenate([t, [AMBIGUOUS] * N_AMBIGUOUS])[: table.n_cells]


@pytest.fixture
def review_widget(make_napari_viewer, qtbot):
    """A viewer whose session holds the 186-cell table, its Review widget, probe trained."""
    viewer = make_napari_viewer(show=True)
    session = get_session(viewer)
    rng = np.random.default_rng(1)
    for name in ("smear_a", "smear_b"):
        session.add_image(name, rng.integers(0, 255, (*SHAPE, 3), dtype=np.uint8))
    session.set_table(make_table())
    widget = ReviewWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Review")
    widget.resize(560, 900)
    retrainer = get_retrainer(viewer)
    qtbot.waitUntil(lambda: not retrainer.busy, timeout=30_000)
    qtbot.waitUntil(lambda: widget.table.obs["prediction"].notna().all(), timeout=10_000)
    qtbot.waitUntil(lambda: not widget.busy, timeout=10_000)
    return widget


def settle(qtbot, widget):
    """Let the retrainer and the widget finish (predictions, timers, thumbnails)."""
    retrainer = get_retrainer(widget.viewer)
    qtbot.waitUntil(lambda: not retrainer.busy, timeout=30_000)
    qtbot.wait(20)
    qtbot.waitUntil(lambda: not widget.busy, timeout=10_000)


def gallery_sections(widget) -> dict[str, set[int]]:
    g = widget.gallery
    return {name: set(g.section_rows(name).tolist()) for name in g.section_names()}


def select_in_view(view, positions, flag=QItemSelectionModel.SelectionFlag.ClearAndSelect):
    """Select items of a section view as a click or a rubber band does."""
    sel = QItemSelection()
    for p in positions:
        sel.select(view.model().index(int(p)), view.model().index(int(p)))
    view.selectionModel().select(sel, flag)


# ------------------------------------------------------------------ sections
def test_sections_follow_labels_and_predictions(review_widget):
    """Every cell is in exactly one non-queue section, the one Review.section_of names;
    sections come in class order then Unidentified, Unlabelled, Not classed; curated
    cells sit in their label's section and the probe sorts the clusters right."""
    w = review_widget
    table = w.table
    names = w.gallery.section_names()
    assert names == [*CLASSES, UNIDENTIFIED, UNLABELLED, NOT_CLASSED]
    sections = gallery_sections(w)
    expected = w.review.section_of()
    seen = set()
    for name, rows in sections.items():
        assert not rows & seen
        seen |= rows
        assert all(expected[r] == name for r in rows), name
    assert seen == set(range(table.n_cells))
    labels = table.obs["label"].astype(object).to_numpy()
    for c in CLASSES:
        curated = set(np.flatnonzero(labels == c).tolist())
        assert curated <= sections[c]
    # well separated clusters: the kNN probe predicts every clear unlabelled cell right
    t = truth(table)
    for c in CLASSES:
        assert all(t[r] in (c, AMBIGUOUS) for r in sections[c])
    header = w.gallery.sections["Neutrophil"].header.full_text
    assert f"({len(sections['Neutrophil'])})" in header
    assert f"{N_LABELLED} curated" in header


def test_curated_and_predicted_cells_look_different(review_widget):
    """A curated cell has a solid border and no badge; a predicted one a '?' confidence
    badge; both in the class colour (the map's palette)."""
    w = review_widget
    g = w.gallery
    labels = w.table.obs["label"].astype(object).to_numpy()
    curated = int(np.flatnonzero(labels == "Lymphocyte")[0])
    predicted = int(next(r for r in g.section_rows("Lymphocyte") if pd.isna(labels[r])))
    a, b = g.cell_look(curated), g.cell_look(predicted)
    assert a.curated
    assert not a.badge
    assert not b.curated
    assert b.badge.startswith("?")
    conf = w.table.obs["confidence"].to_numpy()[predicted]
    assert f"{conf:.2f}" in b.badge
    assert a.color == b.color == g.class_color("Lymphocyte")
    assert a.color != g.class_color("Neutrophil")


def test_sorted_least_sure_first_and_by_map(review_widget):
    """Confidence sort puts the least sure cells first; map sort follows the Hilbert
    order of the UMAP positions."""
    w = review_widget
    g = w.gallery
    rows = g.section_rows("Monocyte")
    keys = g.sort_keys(rows)
    assert np.all(np.diff(keys) >= 0)
    w.set_sort("map")
    rows = g.section_rows("Monocyte")
    xy = w.table.adata.obsm["X_umap"]
    h = hilbert_keys(np.asarray(xy))[rows]
    assert np.all(np.diff(h) >= 0)


def test_hilbert_keys_keep_neighbours_close():
    """Points of a 32 x 32 grid: consecutive curve positions are grid neighbours."""
    yy, xx = np.mgrid[0:32, 0:32]
    xy = np.column_stack([xx.ravel(), yy.ravel()]).astype(float)
    keys = hilbert_keys(xy, bits=5)
    order = np.argsort(keys)
    assert len(np.unique(keys)) == len(xy)
    steps = np.abs(np.diff(xy[order], axis=0)).sum(axis=1)
    assert np.all(steps == 1)


# ----------------------------------------------------------------- selection
def test_selecting_thumbnails_selects_in_the_session(review_widget, qtbot):
    """Items selected in a section view become the session's selection (origin
    'gallery'); Ctrl-style additions in another section add to it."""
    w = review_widget
    session = w.session
    seen = []
    session.events.selection_changed.connect(lambda rows, origin: seen.append(origin))
    view = w.gallery.sections["Neutrophil"].view
    select_in_view(view, [0, 2])
    rows = w.gallery.section_rows("Neutrophil")[[0, 2]]
    np.testing.assert_array_equal(session.selected, np.sort(rows))
    assert seen[-1] == "gallery"
    other = w.gallery.sections["Monocyte"].view
    select_in_view(other, [1], QItemSelectionModel.SelectionFlag.Select)
    more = w.gallery.section_rows("Monocyte")[1]
    np.testing.assert_array_equal(session.selected, np.sort([*rows, more]))


def test_plain_click_replaces_selection_across_sections(review_widget, qtbot):
    """A click without modifiers in one section drops the selection of the others."""
    w = review_widget
    first = w.gallery.sections["Neutrophil"].view
    select_in_view(first, [0, 1])
    second = w.gallery.sections["Lymphocyte"].view
    second.scrollTo = lambda *a, **k: None  # keep the test independent of scrolling
    w.gallery.ensure_item_visible(second, second.model().index(3))
    qtbot.wait(10)
    rect = second.visualRect(second.model().index(3))
    qtbot.mouseClick(second.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    row = w.gallery.section_rows("Lymphocyte")[3]
    np.testing.assert_array_equal(w.session.selected, [row])
    assert not first.selectionModel().hasSelection()


def test_arrow_key_moves_the_selection(review_widget, qtbot):
    """With one cell selected, the Right key selects the next cell of its section only."""
    w = review_widget
    view = w.gallery.sections["Lymphocyte"].view
    rows = w.gallery.section_rows("Lymphocyte")
    other = w.gallery.section_rows("Monocyte")[0]
    w.session.select([rows[2], other], origin="test")
    view.setCurrentIndex(view.model().index(2))
    w.session.select([rows[2], other], origin="test")
    qtbot.keyClick(view, Qt.Key.Key_Right)
    np.testing.assert_array_equal(w.session.selected, [rows[3]])


def test_selection_elsewhere_highlights_and_scrolls(review_widget, qtbot):
    """A selection from the map selects those thumbnails and scrolls to the first."""
    w = review_widget
    g = w.gallery
    rows = g.section_rows("Monocyte")[-3:]
    g.sections["Monocyte"].set_expanded(False)
    g.verticalScrollBar().setValue(0)
    w.session.select(rows, origin="map")
    view = g.sections["Monocyte"].view
    assert g.sections["Monocyte"].expanded
    picked = view.model().rows[view.selected_positions()]
    np.testing.assert_array_equal(np.sort(picked), np.sort(rows))
    qtbot.waitUntil(lambda: g.verticalScrollBar().value() > 0, timeout=3000)
    pos = int(view.selected_positions()[0])
    rect = view.visualRect(view.model().index(pos))
    top = view.viewport().mapTo(g.viewport(), rect.topLeft())
    assert 0 <= top.y() < g.viewport().height()


# ------------------------------------------------------------- keys and undo
def test_number_key_relabels_and_moves_cells(review_widget, qtbot):
    """Key '2' labels the selected cells classes[1] (one undo step) and moves them to
    that section; Ctrl+Z puts them back, Ctrl+Shift+Z redoes."""
    w = review_widget
    table = w.table
    labels_before = table.obs["label"].astype(object).to_numpy().copy()
    rows = [int(r) for r in w.gallery.section_rows("Neutrophil") if pd.isna(labels_before[r])][:3]
    w.session.select(rows, origin="test")
    view = w.gallery.sections["Neutrophil"].view
    qtbot.keyClick(view, Qt.Key.Key_2)
    labels = table.obs["label"].astype(object).to_numpy()
    assert all(labels[r] == CLASSES[1] for r in rows)
    sections = gallery_sections(w)
    assert set(rows) <= sections[CLASSES[1]]
    assert not set(rows) & sections["Neutrophil"]
    assert w.undo_button.isEnabled()
    assert not w.redo_button.isEnabled()
    # the moved cells stay selected in their new section
    moved_view = w.gallery.sections[CLASSES[1]].view
    picked = moved_view.model().rows[moved_view.selected_positions()]
    assert set(picked.tolist()) == set(rows)

    qtbot.keyClick(moved_view, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    labels = table.obs["label"].astype(object).to_numpy()
    assert all(pd.isna(labels[r]) for r in rows)
    assert set(rows) <= gallery_sections(w)["Neutrophil"]
    assert w.redo_button.isEnabled()

    qtbot.keyClick(
        view,
        Qt.Key.Key_Z,
        Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier,
    )
    labels = table.obs["label"].astype(object).to_numpy()
    assert all(labels[r] == CLASSES[1] for r in rows)
    assert set(rows) <= gallery_sections(w)[CLASSES[1]]


def test_zero_marks_not_classed_and_delete_clears(review_widget, qtbot):
    """Key 0 files cells under Not classed; Delete removes their label again."""
    w = review_widget
    rows = w.gallery.section_rows("Monocyte")[:2].tolist()
    w.session.select(rows, origin="test")
    view = w.gallery.sections["Monocyte"].view
    qtbot.keyClick(view, Qt.Key.Key_0)
    assert set(rows) <= gallery_sections(w)[NOT_CLASSED]
    assert "2" in w.gallery.sections[NOT_CLASSED].header.full_text
    qtbot.keyClick(view, Qt.Key.Key_Delete)
    labels = w.table.obs["label"].astype(object)
    assert labels.iloc[rows].isna().all()
    assert not set(rows) & gallery_sections(w)[NOT_CLASSED]


def test_class_buttons_label_the_selection(review_widget):
    """The class bar has '1 Neutrophil' ... in key order, Not classed and Clear label;
    a button labels the selected cells."""
    w = review_widget
    texts = [w.class_buttons[c].text() for c in CLASSES]
    assert texts == [f"{i + 1} {c}" for i, c in enumerate(CLASSES)]
    assert w.class_buttons[NOT_CLASSED].text().startswith("0 ")
    rows = w.gallery.section_rows("Lymphocyte")[-2:].tolist()
    w.session.select(rows, origin="test")
    w.class_buttons["Monocyte"].click()
    assert set(rows) <= gallery_sections(w)["Monocyte"]
    w.class_buttons[""].click()
    assert w.table.obs["label"].astype(object).iloc[rows].isna().all()


# ---------------------------------------------------------------- drag & drop
def test_drop_on_section_and_button_relabels(review_widget, qtbot):
    """Cells dropped (mime data) on a section header or a class button take its class;
    Unidentified takes no drop; the mime data round-trips the ids."""
    w = review_widget
    ids = w.table.cell_ids[w.gallery.section_rows("Neutrophil")[:2]].tolist()
    mime = encode_cells(ids)
    assert mime.hasFormat(CELLS_MIME)
    assert decode_cells(mime) == ids
    changed = w.drop_cells(mime, "Monocyte")
    assert changed == ids
    rows = w.table.positions(ids)
    assert set(rows.tolist()) <= gallery_sections(w)["Monocyte"]
    assert w.drop_cells(mime, UNIDENTIFIED) == []
    # the Qt drop paths: a section header, a section's grid, a class button
    header = w.gallery.sections["Lymphocyte"].header
    header.dropEvent(drop_event(mime))
    assert set(rows.tolist()) <= gallery_sections(w)["Lymphocyte"]
    w.gallery.sections["Monocyte"].view.dropEvent(drop_event(mime))
    assert set(rows.tolist()) <= gallery_sections(w)["Monocyte"]
    w.class_buttons[NOT_CLASSED].dropEvent(drop_event(mime))
    assert set(rows.tolist()) <= gallery_sections(w)[NOT_CLASSED]
    # one undo step per drop
    w.undo()
    assert set(rows.tolist()) <= gallery_sections(w)["Monocyte"]
    w.undo()
    assert set(rows.tolist()) <= gallery_sections(w)["Lymphocyte"]


def drop_event(mime):
    """A drop of ``mime`` at (5, 5), as Qt delivers it at the end of a drag."""
    return QDropEvent(
        QPointF(5, 5),
        Qt.DropAction.MoveAction,
        mime,
        Qt.MouseButton.LeftButton,
        Qt.KeyboardModifier.NoModifier,
    )


def test_drag_carries_the_shared_selection(review_widget):
    """A drag from a view carries every selected cell, also those in other sections."""
    w = review_widget
    a = w.gallery.section_rows("Neutrophil")[:2]
    b = w.gallery.section_rows("Monocyte")[:1]
    w.session.select(np.concatenate([a, b]), origin="test")
    ids = w.gallery.drag_ids(w.gallery.sections["Neutrophil"].view)
    assert set(ids) == set(w.table.cell_ids[np.concatenate([a, b])])


# ------------------------------------------------------------------- classes
def test_add_rename_merge_classes(review_widget, qtbot):
    """A new class gets a button and a section; a rename carries its cells and key;
    a merge moves cells to the target; each rename / merge undoes in one step."""
    w = review_widget
    w.add_class("Eosinophil")
    assert w.class_buttons["Eosinophil"].text() == "4 Eosinophil"
    assert "Eosinophil" in w.gallery.section_names()
    lymph = gallery_sections(w)["Lymphocyte"]
    curated = {r for r in lymph if w.gallery.cell_look(r).curated}
    w.rename_class("Lymphocyte", "Small lymphocyte")
    settle(qtbot, w)
    assert "Lymphocyte" not in w.gallery.section_names()
    assert w.class_buttons["Small lymphocyte"].text() == "2 Small lymphocyte"
    assert curated <= gallery_sections(w)["Small lymphocyte"]
    w.merge_classes(["Small lymphocyte"], "Monocyte")
    settle(qtbot, w)
    assert "Small lymphocyte" not in w.gallery.section_names()
    assert curated <= gallery_sections(w)["Monocyte"]
    w.undo()
    settle(qtbot, w)
    assert curated <= gallery_sections(w)["Small lymphocyte"]
    w.undo()
    settle(qtbot, w)
    assert curated <= gallery_sections(w)["Lymphocyte"]


# ---------------------------------------------------------- zoom & threshold
def test_zoom_changes_thumbnail_size(review_widget, qtbot):
    """The zoom slider sets the grid cell size of every section (64-256 px)."""
    w = review_widget
    view = w.gallery.sections["Neutrophil"].view
    small = view.visualRect(view.model().index(0)).width()
    w.zoom_slider.setValue(200)
    qtbot.wait(10)
    big = view.visualRect(view.model().index(0)).width()
    assert big > small
    assert w.gallery.icon_size == 200
    w.set_zoom(10)
    assert w.gallery.icon_size == 64
    assert w.zoom_slider.value() == 64


def test_threshold_moves_unsure_cells_to_unidentified(review_widget):
    """Raising the threshold above some predicted cells' confidence moves exactly those
    (unlabelled) cells into Unidentified; curated cells never move."""
    w = review_widget
    obs = w.table.obs
    conf = obs["confidence"].to_numpy()
    unlabelled = obs["label"].isna().to_numpy()
    ambiguous = truth(w.table) == AMBIGUOUS
    # the clear cells are predicted surely, the ambiguous ones not
    t = float(np.round(conf[ambiguous].max() + 0.01, 2))
    assert t < float(conf[unlabelled & ~ambiguous].min())
    w.threshold_spin.setValue(t)
    assert w.review.threshold == pytest.approx(t)
    expected = set(np.flatnonzero(unlabelled & (conf < t)).tolist())
    assert expected == set(np.flatnonzero(ambiguous).tolist())
    assert gallery_sections(w)[UNIDENTIFIED] == expected
    assert str(f"{t:.2f}") in w.gallery.sections[UNIDENTIFIED].header.full_text
    look = w.gallery.cell_look(next(iter(expected)))
    assert look.badge.startswith("?")
    assert look.color == "#808080"
    assert "Unidentified: low confidence" in w.gallery.describe(next(iter(expected)))
    w.threshold_spin.setValue(0.0)
    # every prediction is trusted now, except those of cells the out-of-domain guard
    # finds unlike the labelled cells (obs["atypical"]; none without the guard)
    obs = w.table.obs
    atypical = (
        obs["atypical"].astype("boolean").fillna(False).to_numpy(dtype=bool)
        if "atypical" in obs.columns
        else np.zeros(len(obs), dtype=bool)
    )
    left = gallery_sections(w)[UNIDENTIFIED]
    assert left == set(np.flatnonzero(unlabelled & atypical).tolist())
    assert left <= expected  # only the ambiguous cells can look unlike every class
    for row in left:
        assert "Unidentified: unlike the labelled cells" in w.gallery.describe(row)


# ----------------------------------------------------------------- counts
def test_differential_counts_and_sign_off(review_widget, qtbot, monkeypatch):
    """The count table of a smear matches the cells' sections (Not classed left out);
    Sign off needs the target of white cells and no Unidentified cell; the status line
    is the core's sign-off text; a second reader verifies; a later label change voids."""
    import napari_hemofm.core.report as report
    from napari_hemofm.core.report import differential_summary, signoff_text

    monkeypatch.setattr(report, "shift_warnings", lambda t, by: {})  # see the next test
    w = review_widget
    w.threshold_spin.setValue(0.0)  # every prediction counts
    w.set_group("source", "smear_a")
    frame = w.counts_frame()
    obs = w.table.obs
    section = w.review.section_of()
    mine = (obs["source"] == "smear_a").to_numpy()
    for c in CLASSES:
        n = int(frame.loc[frame["label"] == c, "count"].iloc[0])
        assert n == int((mine & (section == c)).sum())
    shown = [w.count_table.item(r, c) for c in (0, 3) for r in range(w.count_table.rowCount())]
    assert [i.text() for i in shown if i is not None] == frame["label"].tolist()
    identified = int((mine & np.isin(section, CLASSES)).sum())
    assert w.count_progress.value() == identified
    assert identified <= int(mine.sum()) < 100
    assert not w.signoff_button.isEnabled()  # fewer white cells than the target 100
    row = differential_summary(w.table, "source", threshold=0.0).loc["smear_a"]
    assert w.signoff_label.text() == signoff_text(row)

    # one slide holding every cell reaches the target
    w.table.set_column("slide", ["patient 1"] * w.table.n_cells)
    w.set_group("slide", "patient 1")
    before = w.count_progress.value()
    assert before >= 100
    # one (labelled) cell marked Not classed drops out of the count
    w.relabel([0], NOT_CLASSED)
    w.refresh_counts()
    assert w.count_progress.value() == before - 1

    # an Unidentified cell blocks the sign-off
    w.threshold_spin.setValue(1.0)
    w.refresh_counts()
    assert not w.signoff_button.isEnabled()
    assert "Unidentified" in w.signoff_label.text()
    # labelling every Unidentified cell unblocks it
    unident = np.flatnonzero(w.review.section_of() == UNIDENTIFIED)
    w.relabel(unident, "Neutrophil")
    w.refresh_counts()
    assert w.signoff_button.isEnabled()
    assert not w.verify_button.isEnabled()
    record = w.sign_off(user="dr_test")
    assert record is not None
    assert record["user"] == "dr_test"
    assert "Signed off by dr_test" in w.signoff_label.text()
    assert w.verify_button.isEnabled()
    assert w.verify_sign_off(user="dr_test") is None  # the signer cannot verify
    assert w.verify_sign_off(user="dr_second") is not None
    assert "verified by dr_second" in w.signoff_label.text()
    qtbot.wait(5)
    w.relabel([1], "Monocyte")
    w.refresh_counts()
    assert "VOID" in w.signoff_label.text()
    assert not w.verify_button.isEnabled()
    w.target_combo.setCurrentIndex(1)
    assert w.count_progress.maximum() == 200


def test_a_shift_warning_needs_a_written_reason(review_widget, monkeypatch):
    """With a shift warning the button asks for a reason; without one nothing is signed."""
    import napari_hemofm.core.report as report

    w = review_widget
    w.threshold_spin.setValue(0.0)
    w.table.set_column("slide", ["patient 1"] * w.table.n_cells)
    unident = np.flatnonzero(w.review.section_of() == UNIDENTIFIED)
    w.relabel(unident, "Neutrophil")  # atypical cells, if the guard flags any
    monkeypatch.setattr(report, "shift_warnings", lambda t, by: {"patient 1": "cells differ"})
    w.set_group("slide", "patient 1")
    assert "Warning: cells differ" in w.signoff_label.text()
    assert w.signoff_button.text().startswith("Sign off with reason")
    answers = iter([("", False), ("stain checked by hand", True)])
    monkeypatch.setattr(
        "napari_hemofm._widgets._review.QInputDialog.getText", lambda *a, **k: next(answers)
    )
    w.signoff_button.click()  # cancelled
    assert "Signed off" not in w.signoff_label.text()
    w.signoff_button.click()
    assert "warning overridden: stain checked by hand" in w.signoff_label.text()


def test_gallery_and_hemofm_report_count_the_same_cells(review_widget, tmp_path):
    """The gallery's sections, as shown, hold per slide (the default grouping of both)
    exactly the cells `hemofm report` counts on the saved project (same rule, same
    stored threshold)."""
    from napari_hemofm.cli import main
    from napari_hemofm.core.report import DEFAULT_GROUP_BY, group_values

    w = review_widget
    assert w.group_by_combo.currentData() == DEFAULT_GROUP_BY  # what the panel opens with
    w.threshold_spin.setValue(0.9)
    path = w.table.save(tmp_path / "p.h5ad")
    out = tmp_path / "c.csv"
    assert main(["report", str(path), "--out", str(out)]) == 0
    counts = pd.read_csv(out)
    sections = gallery_sections(w)
    assert sections[UNIDENTIFIED]
    source = group_values(w.table, "slide")
    for r in counts.itertuples():
        rows = sections.get(r.label, set())
        assert r.count == sum(1 for i in rows if source[i] == r.group), (r.group, r.label)


def test_export_report_and_cell_history(review_widget, tmp_path):
    """Export report writes the HTML of every group; selecting one cell shows its history."""
    w = review_widget
    path = w.export_report(str(tmp_path / "r.html"))
    text = open(path, encoding="utf-8").read()
    assert text.count('<section class="group">') == 2
    assert "data:image/png;base64," in text  # thumbnails from the napari layers
    w.table.save(tmp_path / "p.h5ad")  # a project file: its journal records changes
    w.relabel([5], "Monocyte")
    w.session.select(np.array([5]), origin="test")
    assert "-> Monocyte" in w.history_label.text()
    w.session.select(np.array([5, 6]), origin="test")
    assert w.history_label.text() == ""


def test_a_new_project_starts_with_the_preset_classes(make_napari_viewer, qtbot):
    """On an empty session the class bar holds the Peripheral blood preset from the
    first cell (keys 1-9); choosing Bone marrow refills it, labels in use kept."""
    from napari_hemofm.core.catalogue import get_preset

    viewer = make_napari_viewer()
    widget = ReviewWidget(viewer)
    pb = get_preset("Peripheral blood").names
    assert widget.table.classes == pb
    assert widget.class_buttons[pb[0]].text() == f"1 {pb[0]}"
    assert widget.preset_combo.currentText() == "Peripheral blood"
    widget.preset_combo.setCurrentIndex(widget.preset_combo.findData("Bone marrow"))
    assert widget.table.classes == get_preset("Bone marrow").names
    assert widget.review.preset == "Bone marrow"


# ------------------------------------------------------------ live retraining
def test_relabel_updates_predictions_live(review_widget, qtbot):
    """Relabelling a whole cluster's curated cells retrains the probe in the background;
    the gallery moves that cluster's predicted cells to the new class."""
    w = review_widget
    t = truth(w.table)
    labels = w.table.obs["label"].astype(object).to_numpy()
    mono_curated = np.flatnonzero(labels == "Monocyte")
    mono_pred = np.flatnonzero((t == "Monocyte") & pd.isna(labels))
    assert set(mono_pred.tolist()) <= gallery_sections(w)["Monocyte"]
    w.add_class("Basophil")
    w.relabel(mono_curated, "Basophil")
    retrainer = get_retrainer(w.viewer)
    qtbot.waitUntil(lambda: retrainer.busy, timeout=5000)
    settle(qtbot, w)
    sections = gallery_sections(w)
    assert set(mono_pred.tolist()) <= sections["Basophil"]
    assert not sections["Monocyte"]
    assert "Basophil" in w.metrics_label.text() or "labelled" in w.metrics_label.text()


def test_metrics_line_and_busy_indicator(review_widget, qtbot):
    """The metrics line reads like 'kNN k=8 · 5-fold CV bal. acc 1.00 · 24 labelled' (k is
    the probe's, shrunk to the few labels); a busy bar shows while the probe retrains."""
    w = review_widget
    retrainer = get_retrainer(w.viewer)
    qtbot.waitUntil(lambda: "bal. acc" in w.metrics_label.text(), timeout=20_000)
    text = w.metrics_label.text()
    assert text.startswith(f"kNN k={w.review.effective_k()} · 5-fold CV bal. acc ")
    assert f"{N_LABELLED * len(CLASSES)} labelled" in text
    rows = w.gallery.section_rows("Neutrophil")[-2:]
    w.relabel(rows, "Lymphocyte")
    qtbot.waitUntil(lambda: w.busy_bar.isVisible(), timeout=5000)
    qtbot.waitUntil(lambda: not retrainer.busy, timeout=30_000)
    assert not w.busy_bar.isVisible()


def test_format_metrics():
    """Metrics dicts (with or without scores) give one readable line."""
    line = format_metrics(
        {"probe": "knn", "n_folds": 5, "balanced_accuracy": 0.914, "n_labelled": 140}, k=20
    )
    assert line == "kNN k=20 · 5-fold CV bal. acc 0.91 · 140 labelled"
    line = format_metrics(
        {"probe": "linear", "balanced_accuracy": float("nan"), "n_labelled": 3, "note": "few"}
    )
    assert line == "Linear · 3 labelled · few"
    assert "no metrics" in format_metrics({})


# ------------------------------------------------------------- queues & life
def test_label_next_and_suspects_show_a_queue(review_widget, qtbot):
    """'Label next' shows unlabelled cells as a queue at the top and selects them;
    'Suspect labels' shows labelled cells (here a deliberately wrong one is found)."""
    w = review_widget
    w.show_queue("next", 10)
    qtbot.waitUntil(lambda: "Queue" in w.gallery.section_names(), timeout=20_000)
    assert w.gallery.section_names()[0] == "Queue"
    rows = w.gallery.section_rows("Queue")
    assert 0 < len(rows) <= 10
    assert w.table.obs["label"].iloc[rows].isna().all()
    np.testing.assert_array_equal(w.session.selected, np.sort(rows))
    qtbot.waitUntil(lambda: w._queue_worker is None, timeout=5000)
    # the arrow menu switches the queue to the hybrid strategy (still unlabelled cells)
    w.strategy_actions["hybrid"].trigger()
    assert w.review.queue_strategy == "hybrid"
    assert not w.strategy_actions["uncertain"].isChecked()
    w.show_queue("next", 10)
    qtbot.waitUntil(lambda: w._queue_worker is None, timeout=20_000)
    rows = w.gallery.section_rows("Queue")
    assert 0 < len(rows) <= 10
    assert w.table.obs["label"].iloc[rows].isna().all()

    labels = w.table.obs["label"].astype(object).to_numpy()
    wrong = int(np.flatnonzero(labels == "Neutrophil")[0])
    w.relabel([wrong], "Monocyte")
    settle(qtbot, w)
    w.show_queue("suspects", 5)
    qtbot.waitUntil(lambda: w._queue_worker is None, timeout=30_000)
    assert wrong in w.gallery.section_rows("Queue").tolist()
    w.gallery.clear_queue()
    assert "Queue" not in w.gallery.section_names()


def test_thumbnails_load_lazily(review_widget, qtbot):
    """Only painted cells get thumbnails: after showing the widget, the cache holds the
    visible ones, not all 186; scrolling to the end loads the last section's."""
    w = review_widget
    cache = w.session.thumbnails
    qtbot.waitUntil(lambda: len(cache) > 0, timeout=10_000)
    qtbot.waitUntil(lambda: not w.gallery.loading, timeout=10_000)
    assert 0 < len(cache) < w.table.n_cells
    last = w.gallery.section_rows("Monocyte")[-1]
    w.session.select([last], origin="map")
    qtbot.waitUntil(lambda: cache.peek(w.table.cell_ids[last]) is not None, timeout=10_000)


def test_table_replaced_and_close_disconnects(review_widget, qtbot):
    """A new table rebuilds the gallery; after close the widget no longer listens."""
    w = review_widget
    session = w.session
    table = make_table(seed=3).adata[:30].copy()
    session.set_table(CellTable(table))
    settle(qtbot, w)
    assert w.table is session.table
    assert sum(len(r) for r in gallery_sections(w).values()) == 30
    w.close()
    calls = []
    w.gallery.set_selected = lambda *a, **k: calls.append("selection")
    w._move = lambda *a, **k: calls.append("move")
    w.rebuild = lambda *a, **k: calls.append("rebuild")
    session.select([0, 1], origin="test")
    w.review.relabel([0], CLASSES[2])
    w.review.threshold = 0.9
    qtbot.wait(20)
    assert calls == []


def test_opened_before_the_cells_arrive(make_napari_viewer, qtbot):
    """Opened on an empty session, the widget shows empty sections, then fills in when
    cells with embeddings are added (and the probe has predicted them)."""
    viewer = make_napari_viewer()
    session = get_session(viewer)
    widget = ReviewWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Review")
    assert all(len(widget.gallery.section_rows(n)) == 0 for n in widget.gallery.section_names())
    table = make_table()
    session.table.set_classes(list(CLASSES))
    session.table.add_cells(table.obs.drop(columns=["prediction", "confidence"]),
                            embeddings=table.embeddings)  # fmt: skip
    qtbot.waitUntil(lambda: session.table.obs["prediction"].notna().all(), timeout=30_000)
    settle(qtbot, widget)
    sections = gallery_sections(widget)
    assert sum(len(r) for r in sections.values()) == table.n_cells
    assert not sections[UNLABELLED]
    assert [widget.class_buttons[c].text() for c in CLASSES] == [
        "1 Neutrophil",
        "2 Lymphocyte",
        "3 Monocyte",
    ]


def test_gallery_is_reusable_without_a_viewer(qtbot):
    """The Gallery alone: content, moves between sections and the key signal."""
    from napari_hemofm._widgets._gallery import SectionSpec
    from napari_hemofm.core.session import CellSession

    session = CellSession(make_table())
    g = Gallery(lambda: session.thumbnails)
    qtbot.addWidget(g)
    specs = [SectionSpec(c, c, "#ff0000", "class", drop_label=c) for c in CLASSES]
    sections = {c: np.arange(i * 60, i * 60 + 60) for i, c in enumerate(CLASSES)}
    g.set_content(session.table, list(CLASSES), specs, sections)
    assert g.move_rows(np.array([0, 1]), ["Monocyte", "Monocyte"])
    assert {0, 1} <= set(g.section_rows("Monocyte").tolist())
    assert not g.move_rows(np.array([2]), ["Nowhere"])
    keys = []
    g.key_action.connect(lambda a, arg: keys.append((a, arg)))
    qtbot.keyClick(g.sections["Neutrophil"].view, Qt.Key.Key_3)
    qtbot.keyClick(g.sections["Neutrophil"].view, Qt.Key.Key_Backspace)
    assert keys == [("key", 3), ("clear", None)]


def test_a_saved_probe_file_trains_the_probe_of_another_session(review_widget, qtbot, tmp_path):
    """Save probe writes an .npz; in a session whose labels are all removed, using that file
    makes the probe predict again (its cells vote, they are not shown); forgetting it and
    a broken file leave a clear message."""
    w = review_widget
    path = w.save_probe(str(tmp_path / "probe.npz"))
    assert path.endswith(".npz")
    table = w.table
    labelled = np.flatnonzero(table.obs["label"].notna().to_numpy())
    w.review.relabel(labelled, None)
    settle(qtbot, w)
    assert table.obs["prediction"].isna().all()  # nothing labelled: no probe
    assert w.use_reference(path) == len(labelled)
    settle(qtbot, w)
    assert table.obs["prediction"].notna().all()
    assert sum(len(rows) for rows in gallery_sections(w).values()) == table.n_cells
    (tmp_path / "junk.npz").write_bytes(b"not a probe")
    assert w.use_reference(str(tmp_path / "junk.npz")) == 0
    assert "Could not use" in w.status.text()
    w.use_reference(None)
    settle(qtbot, w)
    assert table.obs["prediction"].isna().all()


def test_label_next_scoped_to_a_batch(review_widget, qtbot):
    """The scope combo lists all cells, each batch and each slide; with "batch: lab_b"
    chosen the Label next queue holds only unlabelled cells of lab_b, and back on "all
    cells" the review's scope is cleared."""
    w = review_widget
    texts = [w.scope_combo.itemText(i) for i in range(w.scope_combo.count())]
    assert texts == ["all cells", "batch: lab_a", "batch: lab_b"]
    w.set_queue_scope({"batch": "lab_b"})
    assert w.review.queue_scope == {"batch": "lab_b"}
    w.show_queue("next", 12)
    qtbot.waitUntil(lambda: "Queue" in w.gallery.section_names(), timeout=20_000)
    qtbot.waitUntil(lambda: w._queue_worker is None, timeout=20_000)
    rows = w.gallery.section_rows("Queue")
    assert 0 < len(rows) <= 12
    obs = w.table.obs
    assert set(obs["batch"].astype(str).iloc[rows]) == {"lab_b"}
    assert obs["label"].iloc[rows].isna().all()
    # a slide column adds its slides; the chosen scope is kept
    w.table.set_column("slide", np.where(np.arange(w.table.n_cells) < 90, "s1", "s2"))
    qtbot.waitUntil(lambda: w.scope_combo.count() == 5, timeout=5_000)
    assert w.queue_scope == {"batch": "lab_b"}
    w.set_queue_scope({"slide": "s2"})
    assert w.review.queue_scope == {"slide": "s2"}
    w.set_queue_scope(None)
    assert w.review.queue_scope is None
    with pytest.raises(KeyError):
        w.set_queue_scope({"batch": "nowhere"})

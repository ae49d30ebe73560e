"""The labelling loop (core.review): relabel, undo / redo, classes, sections, live probe."""

import numpy as np
import pandas as pd
import pytest

from napari_hemofm._testing import table_of
from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.review import NOT_CLASSED, UNIDENTIFIED, UNLABELLED, Review

CLASSES = ("neutrophil", "lymphocyte", "monocyte")


def blob_table(n_per=40, seed=0, dim=8, labelled_per=6, sources=("a.png", "b.png")):
    """Three well-separated Gaussian blobs; the first ``labelled_per`` of each are labelled."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, size=(len(CLASSES), dim))
    X, truth = [], []
    for c, name in enumerate(CLASSES):
        X.append(centres[c] + rng.normal(0, 0.5, size=(n_per, dim)))
        truth += [name] * n_per
    X = np.concatenate(X).astype(np.float32)
    n = len(truth)
    table = table_of(
        [f"lab/cell{i:03d}#0" for i in range(n)],
        source=[sources[i % len(sources)] for i in range(n)],
        batch=["lab" if i % 2 else "lab2" for i in range(n)],
        embeddings=X,
    )
    ids = [table.cell_ids[c * n_per + j] for c in range(len(CLASSES)) for j in range(labelled_per)]
    labels = [CLASSES[c] for c in range(len(CLASSES)) for _ in range(labelled_per)]
    table.set_labels(ids, labels, origin="imported")
    return table, np.array(truth, dtype=object)


def labels_of(table):
    return [None if pd.isna(v) else v for v in table.obs["label"].astype(object)]


def test_relabel_is_one_undo_step_and_undo_redo_restore_labels_and_origins():
    """Undo brings back every label and origin a relabel replaced; redo re-applies it."""
    table, _ = blob_table()
    review = Review(table)
    before = labels_of(table)
    origins = table.obs["label_origin"].astype(object).tolist()
    rows = [0, 1, 50]  # two imported neutrophils and one unlabelled cell
    changed = review.relabel(rows, "monocyte")
    assert len(changed) == 3
    after = labels_of(table)
    assert all(after[r] == "monocyte" for r in rows)
    assert review.can_undo
    assert not review.can_redo
    assert review.undo()
    assert labels_of(table) == before
    assert table.obs["label_origin"].astype(object).tolist()[:2] == origins[:2]
    assert pd.isna(table.obs["label_origin"].iloc[50])
    assert review.can_redo
    assert review.redo()
    assert labels_of(table) == after
    assert not review.redo()


def test_relabel_skips_cells_that_already_have_the_label_and_new_step_clears_redo():
    """Relabelling to the current label is no step; a new step after undo drops the redo."""
    table, _ = blob_table()
    review = Review(table)
    assert review.relabel([0], "neutrophil") == []
    assert not review.can_undo
    review.relabel([0], "lymphocyte")
    review.undo()
    review.relabel([1], "monocyte")
    assert not review.can_redo


def test_history_changed_reports_undo_and_redo_availability():
    """history_changed carries (can_undo, can_redo) after each action."""
    table, _ = blob_table()
    review = Review(table)
    seen = []
    review.events.history_changed.connect(lambda u, r: seen.append((u, r)))
    review.relabel([0], "monocyte")
    review.undo()
    review.redo()
    assert seen == [(True, False), (False, True), (True, False)]


def test_keys_follow_the_class_order_and_zero_is_not_classed():
    """Key i gives classes[i-1]; 0 marks Not classed, which never takes a number key."""
    table, _ = blob_table()
    review = Review(table)
    review.relabel([5], NOT_CLASSED)
    assert review.classes == list(CLASSES)
    assert [review.class_for_key(k) for k in (1, 2, 3)] == list(CLASSES)
    assert review.class_for_key(0) == NOT_CLASSED
    assert review.class_for_key(4) is None


def test_rename_and_merge_relabel_cells_keep_keys_and_undo():
    """Rename keeps the key position; merge moves every source cell to the target; undo reverts."""
    table, _ = blob_table()
    review = Review(table)
    before = labels_of(table)
    review.rename_class("lymphocyte", "small lymphocyte")
    assert review.classes == ["neutrophil", "small lymphocyte", "monocyte"]
    assert labels_of(table).count("small lymphocyte") == 6
    review.merge_classes(["small lymphocyte", "monocyte"], "mononuclear")
    assert review.classes == ["neutrophil", "mononuclear"]
    assert labels_of(table).count("mononuclear") == 12
    review.undo()
    assert review.classes == ["neutrophil", "small lymphocyte", "monocyte"]
    review.undo()
    assert review.classes == list(CLASSES)
    assert labels_of(table) == before
    with pytest.raises(ValueError, match="merge"):
        review.rename_class("neutrophil", "monocyte")
    with pytest.raises(ValueError, match="section"):
        review.add_class(UNIDENTIFIED)
    review.add_class("basophil")
    assert review.class_for_key(4) == "basophil"


def test_sections_follow_label_then_confident_prediction_then_unidentified():
    """Curated label wins; a prediction below the threshold is Unidentified; none is Unlabelled."""
    table, _ = blob_table(n_per=4, labelled_per=1)
    review = Review(table, threshold=0.6)
    rows = np.arange(table.n_cells)
    pred = np.array(["monocyte"] * len(rows), dtype=object)
    conf = np.full(len(rows), 0.9)
    conf[1] = 0.3
    pred[2] = None
    conf[2] = np.nan
    table.set_predictions(rows, pred, conf)
    review.relabel([3], NOT_CLASSED)
    section = review.section_of()
    assert section[0] == "neutrophil"  # curated
    assert section[1] == UNIDENTIFIED
    assert section[2] == UNLABELLED
    assert section[3] == NOT_CLASSED
    assert section[5] == "monocyte"  # predicted, confident
    sections = review.sections()
    assert list(sections)[: len(CLASSES)] == list(CLASSES)
    assert sum(len(v) for v in sections.values()) == table.n_cells
    review.threshold = 0.95
    assert review.section_of([5])[0] == UNIDENTIFIED
    assert table.meta["unidentified_below"] == 0.95


def test_saved_project_journals_relabels_and_undo(tmp_path):
    """A relabel and its undo both reach the journal: reopening shows the current labels."""
    table, _ = blob_table()
    path = tmp_path / "p.h5ad"
    table.save(path)
    review = Review.open(path)
    review.relabel([60, 61], "monocyte")
    review.relabel([62], "neutrophil")
    review.undo()
    reopened = Review.open(path)
    assert labels_of(reopened.table) == labels_of(review.table)
    assert labels_of(reopened.table)[60] == "monocyte"
    assert labels_of(reopened.table)[62] is None


def test_retrain_predicts_every_cell_and_follows_corrections():
    """After retrain every cell has a prediction; labelling a blob's cells as a new class
    makes the probe predict that class for the rest of that blob."""
    table, truth = blob_table()
    review = Review(table)
    review.retrain()
    pred = table.obs["prediction"].astype(object).to_numpy()
    assert (pred == truth).mean() > 0.95
    assert np.isfinite(table.obs["confidence"].to_numpy(dtype=float)).all()
    blob = np.flatnonzero(truth == "monocyte")
    seen = []
    review.events.predictions_changed.connect(lambda rows: seen.append(rows))
    review.relabel(blob[:20], "promonocyte")  # more than k/2 of each cell's neighbours
    assert review.pending
    review.retrain()
    assert not review.pending
    assert seen
    assert set(blob[20:]) <= set(np.concatenate(seen).tolist())
    pred = table.obs["prediction"].astype(object).to_numpy()
    assert (pred[blob[20:]] == "promonocyte").mean() > 0.9
    review.undo()
    review.retrain()
    pred = table.obs["prediction"].astype(object).to_numpy()
    assert (pred[blob[20:]] == "monocyte").mean() > 0.9


def test_retrain_without_two_classes_leaves_no_prediction():
    """With fewer than two labelled classes there is no probe and no prediction."""
    table, _ = blob_table(labelled_per=0)
    review = Review(table)
    review.retrain()
    assert review.probe is None
    assert table.obs["prediction"].isna().all()


@pytest.mark.parametrize("kind", ["knn", "linear"])
def test_incremental_retrain_matches_a_fresh_review(kind):
    """Predictions after a series of incremental updates equal those of a fresh full fit."""
    table, _ = blob_table(seed=3)
    review = Review(table, probe=kind)
    review.retrain()
    rng = np.random.default_rng(0)
    for _ in range(5):
        rows = rng.choice(table.n_cells, size=3, replace=False)
        review.relabel(rows, str(rng.choice([*CLASSES, "basophil"])))
        review.retrain()
    fresh_table = CellTable(table.adata.copy())
    fresh = Review(fresh_table, probe=kind)
    fresh.retrain()
    a = table.obs["prediction"].astype(object).to_numpy()
    b = fresh_table.obs["prediction"].astype(object).to_numpy()
    assert (a == b).mean() >= 0.98


def test_rename_merge_and_their_undo_keep_predictions_equal_to_a_fresh_fit():
    """After a rename, a merge and undoing both, the incrementally updated predictions equal
    those of a probe fitted from scratch on the same labels (no stale class names)."""
    table, _ = blob_table(labelled_per=12)
    review = Review(table)
    review.retrain()

    def fresh():
        other = CellTable(table.adata.copy())
        r = Review(other)
        r.retrain()
        return other.obs["prediction"].astype(object).to_numpy()

    for action in (
        lambda: review.rename_class("monocyte", "promonocyte"),
        lambda: review.merge_classes(["promonocyte", "lymphocyte"], "mononuclear"),
        review.undo,
        review.undo,
    ):
        action()
        review.retrain()
        now = table.obs["prediction"].astype(object).to_numpy()
        np.testing.assert_array_equal(now, fresh())
        assert set(now) <= set(review.classes)


def test_a_saved_probe_predicts_another_project_and_adapts_to_its_labels(tmp_path):
    """A probe saved from one project, used as reference on an unlabelled project of the same
    cell types, predicts its cells; labels added there then count too (equal to a fresh fit
    with the same reference); a probe of another dimension is refused."""
    source, _ = blob_table(seed=0, labelled_per=12)
    r1 = Review(source)
    r1.retrain()
    path = r1.probe.save(tmp_path / "probe.npz")

    target, truth = blob_table(seed=0, labelled_per=0)
    r2 = Review(target)
    assert r2.use_reference(path) == 36
    r2.retrain()
    pred = target.obs["prediction"].astype(object).to_numpy()
    assert (pred == truth).mean() > 0.95
    assert len(pred) == target.n_cells  # reference cells are never shown
    blob = np.flatnonzero(truth == "monocyte")
    r2.relabel(blob[:25], "promonocyte")
    r2.retrain()
    assert (target.obs["prediction"].astype(object).to_numpy()[blob[25:]] == "promonocyte").all()
    assert set(r2.label_next(5)) <= set(target.cell_ids[target.obs["label"].isna().to_numpy()])

    fresh = Review(CellTable(target.adata.copy()))
    fresh.use_reference(path)
    fresh.retrain()
    np.testing.assert_array_equal(
        fresh.table.obs["prediction"].astype(object).to_numpy(),
        target.obs["prediction"].astype(object).to_numpy(),
    )
    other, _ = blob_table(seed=0, dim=5)
    with pytest.raises(ValueError, match="-d"):
        Review(other).use_reference(path)
    r2.use_reference(None)
    assert r2.reference is None


def test_least_sure_first_orders_by_confidence_with_disagreeing_labels_as_unsure():
    """Keys: the confidence; 1 - confidence for a curated cell the probe puts in another
    class; 2 (last) without a prediction. Review.least_sure_first reads them from the table."""
    from napari_hemofm.core.review import least_sure_keys

    conf = np.array([0.9, 0.4, np.nan, 0.95, 0.6])
    disagree = np.array([False, False, False, True, False])
    keys = least_sure_keys(conf, disagree)
    assert keys.tolist() == pytest.approx([0.9, 0.4, 2.0, 0.05, 0.6])
    assert np.argsort(keys, kind="stable").tolist() == [3, 1, 4, 0, 2]
    table, _ = blob_table(n_per=10, labelled_per=3)
    review = Review(table)
    review.retrain()
    review.relabel([0], "monocyte")  # the probe still says neutrophil: unsure
    keys = review.least_sure_first()
    conf = table.obs["confidence"].to_numpy(dtype=float)
    assert keys[0] == pytest.approx(1.0 - conf[0])
    assert keys[5] == pytest.approx(conf[5])
    assert review.least_sure_first(np.array([5, 0])).tolist() == [keys[5], keys[0]]


def test_add_class_with_a_kind_and_presets_through_the_review():
    """A class added with a kind counts that way; apply_preset fills the class list and
    keeps the labels in use (undo history untouched)."""
    table, _ = blob_table(n_per=5, labelled_per=2)
    review = Review(table)
    review.add_class("megakaryocyte fragment", kind="non_wbc")
    assert review.class_kind("megakaryocyte fragment") == "non_wbc"
    assert review.class_kind("NRBC") == "non_wbc"
    assert review.class_kind("neutrophils") == "wbc"
    review.apply_preset("Bone marrow")
    assert review.preset == "Bone marrow"
    assert review.classes[0] == "segmented neutrophil"
    assert {"neutrophil", "lymphocyte", "monocyte"} <= set(review.classes)
    assert review.classes.index("lymphocyte") == 2  # LYT's key
    assert not review.can_undo

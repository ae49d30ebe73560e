"""Label-aware per-batch alignment and the scoped "Label next" of a new lab."""

import numpy as np
import pytest

from napari_hemofm._testing import table_of
from napari_hemofm.core.alignment import align, class_mean_offsets
from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.probe import LiveProbe
from napari_hemofm.core.queues import label_next
from napari_hemofm.core.review import Review

CLASSES = np.array(["eosinophil", "lymphocyte", "monocyte", "neutrophil"], dtype=object)


def two_labs(n_a=(60, 60, 60, 60), n_b=(120, 20, 20, 20), shift=None, seed=0, dim=12):
    """Lab A and lab B with other class mixes; B moved by ``shift`` (default 0)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(100).normal(0, 3, size=(len(CLASSES), dim))
    shift = np.zeros(dim) if shift is None else np.asarray(shift)
    X, y, g = [], [], []
    for lab, counts, move in (("A", n_a, 0.0), ("B", n_b, shift)):
        for c, m in enumerate(counts):
            X.append(centres[c] + move + rng.normal(size=(m, dim)))
            y += [CLASSES[c]] * m
            g += [lab] * m
    return np.concatenate(X).astype(np.float32), np.array(y, dtype=object), np.array(g)


def test_offset_recovers_a_shift_from_a_few_labels_per_class():
    """Three labels per class of lab B give its shift to within 25 %."""
    shift = np.random.default_rng(1).normal(0, 2, size=12)
    X, y, g = two_labs(shift=shift)
    labels = np.where(g == "A", y, None).astype(object)
    b = np.flatnonzero(g == "B")
    for c in CLASSES:
        labels[b[y[b] == c][:3]] = c
    off = class_mean_offsets(X, labels, g)
    assert not off["A"].any()  # the reference: more labels
    assert np.linalg.norm(off["B"] - shift) < 0.25 * np.linalg.norm(shift)
    moved = align(X, g, off)
    assert np.array_equal(moved[g == "A"], X[g == "A"])
    np.testing.assert_allclose(moved[g == "B"], X[g == "B"] - off["B"], rtol=1e-6)


def test_class_means_ignore_a_different_class_mix():
    """Lab B is not shifted but holds mostly neutrophils: its batch mean is far from
    lab A's, its class-mean offset is (nearly) zero."""
    X, y, g = two_labs(n_b=(5, 5, 5, 200))
    labels = y.copy()
    off = class_mean_offsets(X, labels, g)
    batch_mean_gap = np.linalg.norm(X[g == "B"].mean(0) - X[g == "A"].mean(0))
    assert np.linalg.norm(off["B"]) < 0.1 * batch_mean_gap


def test_shrinkage_reduces_the_error_of_an_unshifted_lab():
    """With no shift and 2 labels per class, the James-Stein offset is closer to the
    truth (0) than the raw class-mean difference, over 20 draws."""
    shrunk, raw = [], []
    for seed in range(20):
        X, y, g = two_labs(seed=seed)
        labels = np.where(g == "A", y, None).astype(object)
        b = np.flatnonzero(g == "B")
        for c in CLASSES:
            labels[b[y[b] == c][:2]] = c
        shrunk.append(np.linalg.norm(class_mean_offsets(X, labels, g)["B"]))
        d = [X[b[y[b] == c][:2]].mean(0) - X[(g == "A") & (y == c)].mean(0) for c in CLASSES]
        raw.append(np.linalg.norm(np.mean(d, axis=0)))
    assert np.mean(np.square(shrunk)) < 0.5 * np.mean(np.square(raw))


def test_no_shared_class_no_offset():
    X, y, g = two_labs(shift=np.full(12, 5.0))
    labels = np.where(g == "A", y, None).astype(object)
    labels[(g == "A") & (y == "monocyte")] = None
    labels[np.flatnonzero((g == "B") & (y == "monocyte"))[:3]] = "monocyte"
    off = class_mean_offsets(X, labels, g)
    assert not off["B"].any()
    with pytest.raises(ValueError, match="no group"):
        class_mean_offsets(X, labels, g, reference="C")


def lab_table(shift=3.0, seed=0):
    """Lab A labelled; lab B moved by ``shift`` times the gap between two class centres
    (far enough that all of B lands beside one class of A)."""
    centres = np.random.default_rng(100).normal(0, 3, size=(len(CLASSES), 12))
    X, y, g = two_labs(shift=shift * (centres[1] - centres[0]), seed=seed)
    n = len(X)
    table = table_of(
        [f"c{i:04d}" for i in range(n)],
        source=[f"{g[i]}/{i}.png" for i in range(n)],
        batch=g,
        slide=[f"{g[i]}{i % 3}" for i in range(n)],
        embeddings=X,
    )
    a = np.flatnonzero(g == "A")
    table.set_labels(table.cell_ids[a].tolist(), y[a].tolist(), origin="imported")
    return table, y, g


def accuracy_b(table, y, g):
    pred = table.obs["prediction"].astype(object).to_numpy()
    b = (g == "B") & table.obs["label"].isna().to_numpy()
    return np.mean([np.mean(pred[b & (y == c)] == c) for c in CLASSES])


def test_review_learns_a_shifted_lab_from_a_few_labels_with_alignment():
    """kNN probe: 2 labels per class of the shifted lab B lift its balanced accuracy
    from chance to >= 0.9 with the alignment, not without it."""
    scores = {}
    for align_by in ("batch", None):
        table, y, g = lab_table()
        review = Review(table, probe="knn")
        review.align_by = align_by
        review.retrain()
        before = accuracy_b(table, y, g)
        b = np.flatnonzero(g == "B")
        for c in CLASSES:
            review.relabel(b[y[b] == c][:2], c)
        review.retrain()
        scores[align_by] = (before, accuracy_b(table, y, g))
    assert scores["batch"][0] <= 0.5
    assert scores["batch"][1] >= 0.9
    assert scores[None][1] < scores["batch"][1] - 0.2


def test_offsets_are_re_estimated_when_a_labs_labels_double_and_then_equal_a_fresh_review():
    """Offsets move at 1, 2, 4, 8 ... labels of a group (a full refit each); at such a
    point the incremental review equals a fresh one on the same labels."""
    table, y, g = lab_table(seed=2)
    review = Review(table, probe="knn")
    review.retrain()
    b = np.flatnonzero(g == "B")
    order = np.concatenate([b[y[b] == c][:2] for c in CLASSES])  # 8 cells
    history = []
    for i, row in enumerate(order, 1):
        review.relabel([row], y[row])
        review.retrain()
        history.append((i, review._offset_counts.get("B", 0)))
    assert [c for _, c in history] == [1, 2, 2, 4, 4, 4, 4, 8]
    fresh_table = CellTable(table.adata.copy())
    fresh = Review(fresh_table, probe="knn")
    fresh.retrain()
    for key in ("prediction", "confidence"):
        a = table.obs[key].astype(object).to_numpy()
        f = fresh_table.obs[key].astype(object).to_numpy()
        assert (a == f).all()


def test_scoped_label_next_stays_in_scope_and_covers_the_predicted_classes():
    """Only cells of the scope are proposed; the first picks hold one cell of every class
    the probe predicts there."""
    table, _y, g = lab_table(shift=0.0)
    review = Review(table, probe="knn")
    review.retrain()
    ids = review.label_next(6, scope={"batch": "B"})
    rows = table.positions(ids)
    assert len(rows) == 6
    assert (g[rows] == "B").all()
    pred = table.obs["prediction"].astype(object).to_numpy()
    in_b = (g == "B") & table.obs["label"].isna().to_numpy()
    assert set(pred[rows[:4]]) == set(pred[in_b])
    ids = review.label_next(3, scope={"slide": ["B0", "B1"]})
    assert set(table.obs.loc[ids, "slide"].astype(str)) <= {"B0", "B1"}
    with pytest.raises(ValueError, match="no column"):
        review.label_next(3, scope={"patient": "x"})
    with pytest.raises(ValueError, match="no cell matches"):
        review.label_next(3, scope={"batch": "nowhere"})


def test_typical_picks_are_cluster_centres_not_outliers():
    """``strategy="typical"`` picks the centre of each blob holding no label, not one of
    the scattered outliers (which k-means++ diversity favours)."""
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=float)
    X = np.concatenate([c + rng.normal(size=(100, 2)) for c in centres])
    X = np.concatenate([X, rng.uniform(-8, 18, size=(40, 2))]).astype(np.float32)
    truth = np.repeat(CLASSES, 100)
    labels = np.full(len(X), None, dtype=object)
    labels[[0, 100]] = truth[[0, 100]]
    probe = LiveProbe("knn", k=1)
    probe.fit(X, labels)
    rows = label_next(probe, X, labels, 2, strategy="typical", seed=0)
    near = np.linalg.norm(X[rows, None, :] - centres[None], axis=2)
    # the two blobs without a label, each at its centre
    assert sorted(np.argmin(near, axis=1).tolist()) == [2, 3]
    assert (near.min(axis=1) < 1.0).all()


def test_alignment_defaults_follow_the_probe_kind_and_the_queue_scope_is_a_default():
    """kNN aligns by batch, linear does not (switching the kind resets it); a panel's
    ``queue_scope`` scopes ``label_next`` when no scope is passed."""
    table, _, g = lab_table(shift=0.0)
    review = Review(table, probe="knn")
    assert review.align_by == "batch"
    review.probe_kind = "linear"
    assert review.align_by is None
    assert Review(table, probe="linear").align_by is None
    review.retrain()
    review.queue_scope = {"batch": "B"}
    rows = table.positions(review.label_next(5))
    assert (g[rows] == "B").all()

"""The live probe of the review loop: incremental updates, files, metrics, queues."""

import json

import numpy as np
import pytest

from napari_hemofm.core.evaluation import probe_metrics
from napari_hemofm.core.probe import PROBE_FORMAT, LiveProbe, ProbeUpdate
from napari_hemofm.core.queues import label_next, suspect_labels

NAMES = np.array(["blast", "eosinophil", "lymphocyte", "monocyte", "neutrophil"], dtype=object)


def blobs(n=400, n_classes=4, dim=12, spread=1.0, scale=2.0, seed=0):
    """Gaussian clusters: embeddings (n, dim) float32 and true class names (n,) object."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=scale, size=(n_classes, dim))
    truth = rng.integers(n_classes, size=n)
    X = centres[truth] + spread * rng.normal(size=(n, dim))
    return X.astype(np.float32), NAMES[truth]


def some_labels(truth, n_labelled, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.full(len(truth), None, dtype=object)
    rows = rng.choice(len(truth), n_labelled, replace=False)
    labels[rows] = truth[rows]
    return labels


def random_changes(rng, labels, n_steps, classes):
    """Yield (rows, new labels): relabels, new labels, removals, batches, a new class."""
    n = len(labels)
    for step in range(n_steps):
        m = int(rng.choice([1, 1, 1, 3, 12]))
        rows = rng.choice(n, m, replace=False)
        new = [None if rng.random() < 0.3 else str(rng.choice(classes)) for _ in rows]
        if step == n_steps // 3:
            new = ["basophil"] * m  # a class appears ...
        yield rows, new
    gone = np.flatnonzero(np.equal(labels, "basophil"))
    yield gone, [None] * len(gone)  # ... and (maybe) disappears again


def snapshot(probe):
    return probe.prediction.copy(), probe.confidence.copy()


def changed_rows(before, after):
    (p0, c0), (p1, c1) = before, after
    same_c = (c0 == c1) | (np.isnan(c0) & np.isnan(c1))
    return np.flatnonzero((p0 != p1) | ~same_c)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_updates_equal_a_fresh_fit_and_report_every_changed_row(metric):
    """After random label / relabel / unlabel sequences, kNN equals a fresh fit exactly,
    and each ProbeUpdate lists exactly the rows whose prediction or confidence changed."""
    X, truth = blobs(spread=1.6, seed=1)
    X[[3, 50]] = np.nan
    labels = some_labels(truth, 80, seed=1)
    probe = LiveProbe("knn", k=7, metric=metric)
    probe.fit(X, labels)
    rng = np.random.default_rng(2)
    for rows, new in random_changes(rng, labels, 30, NAMES[:4]):
        before = snapshot(probe)
        upd = probe.update(rows, new)
        labels[rows] = new
        assert isinstance(upd, ProbeUpdate)
        np.testing.assert_array_equal(upd.rows, changed_rows(before, snapshot(probe)))
        np.testing.assert_array_equal(upd.prediction, probe.prediction[upd.rows])
    fresh = LiveProbe("knn", k=7, metric=metric)
    fresh.fit(X, labels)
    assert probe.classes_ == fresh.classes_
    np.testing.assert_array_equal(probe.prediction, fresh.prediction)
    np.testing.assert_array_equal(probe.confidence, fresh.confidence)
    np.testing.assert_array_equal(probe.proba, fresh.proba)


def test_knn_large_batch_falls_back_to_a_full_refit():
    """A change touching most neighbour lists refits (full=True) and still equals a fit."""
    X, truth = blobs(n=200, seed=4)
    labels = some_labels(truth, 40, seed=4)
    probe = LiveProbe("knn", k=5)
    probe.fit(X, labels)
    rows = np.flatnonzero(np.equal(labels, None))[:150]
    upd = probe.update(rows, truth[rows])
    labels[rows] = truth[rows]
    assert upd.full
    assert len(upd.rows) == len(X)
    fresh = LiveProbe("knn", k=5)
    fresh.fit(X, labels)
    np.testing.assert_array_equal(probe.proba, fresh.proba)


def test_linear_updates_match_a_fresh_fit():
    """Warm-started linear updates give the argmax of a fresh fit for nearly all cells
    and probabilities within the solver's tolerance, also as classes come and go."""
    X, truth = blobs(n=500, spread=1.8, seed=5)
    labels = some_labels(truth, 120, seed=5)
    probe = LiveProbe("linear")
    probe.fit(X, labels)
    rng = np.random.default_rng(6)
    seen_classes = set()
    for rows, new in random_changes(rng, labels, 12, NAMES[:4]):
        upd = probe.update(rows, new)
        labels[rows] = new
        seen_classes.add(tuple(probe.classes_))
        assert not upd.full
    assert len(seen_classes) >= 2  # the class list did change along the way
    fresh = LiveProbe("linear")
    fresh.fit(X, labels)
    assert probe.classes_ == fresh.classes_
    assert np.mean(probe.prediction == fresh.prediction) >= 0.99
    np.testing.assert_allclose(probe.proba, fresh.proba, atol=0.05)


def test_nan_rows_are_never_predicted_nor_neighbours():
    """Cells without an embedding get no prediction, and removing them changes nothing
    for the others (so they never voted)."""
    X, truth = blobs(n=200, seed=7)
    labels = some_labels(truth, 60, seed=7)
    nan_rows = np.flatnonzero(np.not_equal(labels, None))[:5]  # labelled, not embedded
    X[nan_rows] = np.nan
    X[[0, 1]] = np.nan
    for kind in ("knn", "linear"):
        probe = LiveProbe(kind, k=5)
        probe.fit(X, labels)
        gone = np.r_[nan_rows, 0, 1]
        assert all(p is None for p in probe.prediction[gone])
        assert np.isnan(probe.confidence[gone]).all()
        assert np.isnan(probe.margin()[gone]).all()
        keep = np.setdiff1d(np.arange(len(X)), gone)
        sub = LiveProbe(kind, k=5)
        sub.fit(X[keep], labels[keep])
        np.testing.assert_array_equal(probe.prediction[keep], sub.prediction)
        if kind == "knn":
            assert not np.isin(probe._nbr, gone).any()


def test_labelled_cells_are_predicted_leave_one_out():
    """A kNN label contradicted by all its neighbours shows as a different prediction."""
    X, truth = blobs(n=120, n_classes=2, seed=8)
    labels = truth.copy()
    wrong = 10
    labels[wrong] = NAMES[1] if truth[wrong] == NAMES[0] else NAMES[0]
    probe = LiveProbe("knn", k=5)
    probe.fit(X, labels)
    assert probe.prediction[wrong] == truth[wrong]
    assert probe.confidence[wrong] == pytest.approx(1.0)


def test_cosine_equals_euclidean_on_unit_rows_and_differs_on_scaled_rows():
    """metric='cosine' ranks by angle: it equals Euclidean on unit-length rows and ignores
    a per-cell scale that changes Euclidean neighbours."""
    X, truth = blobs(n=300, spread=1.5, seed=9)
    labels = some_labels(truth, 90, seed=9)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    scaled = X * np.random.default_rng(9).uniform(0.2, 5.0, size=(len(X), 1)).astype(np.float32)
    cos = LiveProbe("knn", k=7, metric="cosine")
    euc = LiveProbe("knn", k=7, metric="euclidean")
    cos.fit(scaled, labels)
    euc.fit(unit, labels)
    np.testing.assert_array_equal(cos.prediction, euc.prediction)
    euc.fit(scaled, labels)
    assert np.mean(cos.prediction != euc.prediction) > 0.05


def test_margin_is_top1_minus_top2():
    """margin() is the gap between the two largest probabilities, NaN without prediction."""
    X, truth = blobs(n=150, spread=2.0, seed=10)
    X[0] = np.nan
    probe = LiveProbe("knn", k=6)
    probe.fit(X, some_labels(truth, 50, seed=10))
    m = probe.margin()
    top = np.sort(probe.proba[1:], axis=1)
    np.testing.assert_allclose(m[1:], top[:, -1] - top[:, -2], atol=1e-6)
    assert np.isnan(m[0])
    assert (m[1:] >= 0).all()
    assert (m[1:] <= 1).all()
    assert (m[1:] < 1).any()  # some cells are unsure: the check is not vacuous


def test_one_class_and_no_labels():
    """No labels: no predictions; one class: every embedded cell gets it with confidence 1."""
    X, _ = blobs(n=60, seed=11)
    for kind in ("knn", "linear"):
        probe = LiveProbe(kind, k=5)
        upd = probe.fit(X, [None] * len(X))
        assert upd.full
        assert all(p is None for p in probe.prediction)
        probe.update([3, 4], ["monocyte", "monocyte"])
        assert probe.classes_ == ["monocyte"]
        assert set(probe.prediction.tolist()) == {"monocyte"}
        assert np.allclose(probe.confidence[np.r_[0:3, 5:60]], 1.0)


def test_add_cells_equals_a_fit_on_all_cells():
    """Appending unlabelled cells predicts them as a fit on the whole set would."""
    X, truth = blobs(n=300, seed=12)
    labels = some_labels(truth, 100, seed=12)
    labels[250:] = None
    for kind in ("knn", "linear"):
        probe = LiveProbe(kind, k=5)
        probe.fit(X[:250], labels[:250])
        upd = probe.add_cells(X[250:])
        assert set(upd.rows.tolist()) <= set(range(250, 300))
        full = LiveProbe(kind, k=5)
        full.fit(X, labels)
        np.testing.assert_array_equal(probe.prediction, full.prediction)


def test_update_checks_its_input():
    """Updating before fit, out-of-range rows and a length mismatch are refused."""
    X, truth = blobs(n=50, seed=13)
    probe = LiveProbe()
    with pytest.raises(RuntimeError, match="fit"):
        probe.update([0], ["a"])
    probe.fit(X, truth)
    with pytest.raises(IndexError, match="rows must lie"):
        probe.update([50], ["a"])
    with pytest.raises(ValueError, match="2 labels for 1 cells"):
        probe.update([0], ["a", "b"])
    with pytest.raises(ValueError, match="kind"):
        LiveProbe("svm")


@pytest.mark.parametrize("kind", ["knn", "linear"])
def test_save_load_round_trip_and_apply(tmp_path, kind):
    """A saved probe reloads with identical predictions and applies identically to new
    cells; apply() predicts shifted copies of the clusters as their class."""
    X, truth = blobs(n=300, seed=14)
    labels = some_labels(truth, 120, seed=14)
    probe = LiveProbe(kind, k=9, metric="cosine" if kind == "knn" else "euclidean")
    probe.fit(X, labels)
    probe.model = "dinobloom-s"
    path = probe.save(tmp_path / "probe")
    assert path.suffix == ".npz"
    back = LiveProbe.load(path)
    assert (back.kind, back.k, back.metric, back.classes_, back.model) == (
        probe.kind,
        probe.k,
        probe.metric,
        probe.classes_,
        "dinobloom-s",
    )
    np.testing.assert_array_equal(back.prediction, probe.prediction)
    np.testing.assert_array_equal(back.confidence, probe.confidence)
    np.testing.assert_array_equal(back.margin(), probe.margin())
    other, other_truth = blobs(n=80, seed=14)  # same centres: the same "model"
    other[5] = np.nan
    pred, conf = probe.apply(other)
    pred2, conf2 = back.apply(other)
    np.testing.assert_array_equal(pred, pred2)
    np.testing.assert_array_equal(conf, conf2)
    assert pred[5] is None
    assert np.isnan(conf[5])
    ok = np.arange(80) != 5
    assert np.mean(pred[ok] == other_truth[ok]) > 0.9
    with pytest.raises(RuntimeError, match="fit"):
        back.update([0], ["lymphocyte"])


def test_load_refuses_pickles_and_unknown_versions(tmp_path):
    """Files with a pickled object, another format or a newer version raise ValueError."""
    X, truth = blobs(n=60, seed=15)
    probe = LiveProbe("knn", k=3)
    probe.fit(X, truth)
    good = dict(np.load(probe.save(tmp_path / "good.npz")))
    meta = json.loads(str(good["meta"]))
    assert meta["format"] == PROBE_FORMAT

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{**good, "train_y": np.array([{"evil": 1}], dtype=object)})
    with pytest.raises(ValueError, match="not a napari-hemofm probe"):
        LiveProbe.load(pickled)
    newer = tmp_path / "newer.npz"
    np.savez(newer, **{**good, "meta": np.array(json.dumps({**meta, "version": 99}))})
    with pytest.raises(ValueError, match="version 99"):
        LiveProbe.load(newer)
    other = tmp_path / "other.npz"
    np.savez(other, **{**good, "meta": np.array(json.dumps({**meta, "format": "x"}))})
    with pytest.raises(ValueError, match="format"):
        LiveProbe.load(other)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a napari-hemofm probe"):
        LiveProbe.load(junk)


def test_probe_metrics_reports_and_handles_small_classes():
    """Keys and confusion shape; a class below n_splits cells is left out with a note;
    separable blobs score 1; too few labels give NaN scores, not an exception."""
    X, truth = blobs(n=300, n_classes=3, spread=0.3, seed=16)
    labels = truth.copy()
    labels[:40] = None
    tiny = np.flatnonzero(np.equal(labels, None))[:3]
    labels[tiny] = "basophil"  # 3 cells < 5 folds
    for kind in ("knn", "linear"):
        m = probe_metrics(X, labels, kind=kind, k=10)
        assert set(m) >= {
            "accuracy",
            "balanced_accuracy",
            "weighted_f1",
            "confusion",
            "classes",
            "counts",
            "n_labelled",
            "note",
        }
        assert m["classes"] == sorted(set(truth.tolist()))
        assert np.asarray(m["confusion"]).shape == (3, 3)
        assert np.asarray(m["confusion"]).sum() == 263 - 3 + 3 - 3  # basophils left out
        assert m["counts"]["basophil"] == 3
        assert m["n_labelled"] == 263
        assert "basophil (3)" in m["note"]
        assert m["balanced_accuracy"] == pytest.approx(1.0)
    few = np.full(len(X), None, dtype=object)
    few[:3] = ["a", "b", "a"]
    m = probe_metrics(X, few)
    assert np.isnan(m["accuracy"])
    assert m["confusion"] == []
    assert "need" in m["note"]
    few[:6] = ["a", "b", "a", "b", "a", "b"]  # 3 per class: 3-fold instead of 5
    m = probe_metrics(X, few, k=2)
    assert m["n_folds"] == 3
    assert "3-fold" in m["note"]


def test_suspect_labels_finds_planted_flips():
    """In separable blobs, the top suspects are the labels flipped on purpose."""
    X, truth = blobs(n=400, spread=0.5, seed=17)
    labels = truth.copy()
    rng = np.random.default_rng(17)
    flipped = rng.choice(len(X), 20, replace=False)
    for r in flipped:
        labels[r] = rng.choice([c for c in NAMES[:4] if c != truth[r]])
    for kind in ("knn", "linear"):
        table = suspect_labels(X, labels, n=20, kind=kind, k=10)
        assert list(table.columns) == ["row", "label", "suggestion", "confidence"]
        precision = np.isin(table["row"], flipped).mean()
        assert precision >= 0.9, kind
        hit = table[table["row"].isin(flipped)]
        assert (hit["suggestion"].to_numpy() == truth[hit["row"]]).all()
        assert (np.diff(table["confidence"].to_numpy()) <= 0).all()  # ranked
    assert len(suspect_labels(X, truth, k=10)) == 0  # clean labels: nothing to suspect


def mean_nn_distance(P):
    d = np.sqrt(((P[:, None] - P[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return d.min(axis=1).mean()


def test_label_next_picks_unsure_distinct_unlabelled_cells():
    """label_next returns n distinct unlabelled rows, all from the least-sure pool."""
    X, truth = blobs(n=800, n_classes=4, spread=1.8, seed=18)
    labels = some_labels(truth, 80, seed=18)
    probe = LiveProbe("knn", k=10)
    probe.fit(X, labels)
    n = 12
    rows = label_next(probe, X, labels, n, seed=0)
    assert len(rows) == n
    assert len(set(rows.tolist())) == n
    assert all(labels[r] is None for r in rows)
    unl = np.flatnonzero(np.equal(labels, None))
    margin = probe.margin()
    pool = unl[np.argsort(margin[unl], kind="stable")[: 10 * n]]
    assert set(rows.tolist()) <= set(pool.tolist())
    assert np.median(margin[rows]) < np.median(margin[unl])


def crowded_probe(seed=20):
    """A probe whose 10 least-sure cells sit in one tight clump of the 2-D map.

    Cells 0-49: a clump at the origin, margins 0-0.05; cells 50-149: spread over the map,
    margins 0.06-0.2; cells 150-159: labelled, far away. Returns probe, X, coords, labels.
    """
    rng = np.random.default_rng(seed)
    coords = np.concatenate(
        [
            rng.normal(scale=0.05, size=(50, 2)),
            rng.uniform(-10, 10, size=(100, 2)),
            rng.normal(loc=30.0, size=(10, 2)),
        ]
    ).astype(np.float32)
    margin = np.concatenate([np.linspace(0, 0.05, 50), np.linspace(0.06, 0.2, 100), [1.0] * 10])
    labels = np.full(160, None, dtype=object)
    labels[150:] = "neutrophil"
    probe = LiveProbe("knn")
    probe.classes_ = ["lymphocyte", "neutrophil"]
    probe.proba = np.stack([(1 + margin) / 2, (1 - margin) / 2], axis=1).astype(np.float32)
    probe.confidence = probe.proba.max(axis=1)
    probe.prediction = np.array(["lymphocyte"] * 160, dtype=object)
    X = rng.normal(size=(160, 8)).astype(np.float32)
    return probe, X, coords, labels


def test_label_next_spreads_picks_more_than_the_lowest_margins():
    """When the least-sure cells crowd one spot, the picks are spread further apart than
    the n lowest margins (mean distance to the nearest other pick, in `coords` space)."""
    probe, X, coords, labels = crowded_probe()
    n = 10
    lowest = np.argsort(probe.margin()[:150], kind="stable")[:n]
    assert lowest.max() < 50  # the premise: all in the clump
    for seed in range(3):
        rows = label_next(probe, X, labels, n, candidates=100, seed=seed, coords=coords)
        assert len(set(rows.tolist())) == n
        assert rows.max() < 150  # never a labelled cell
        assert mean_nn_distance(coords[rows]) > 5 * mean_nn_distance(coords[lowest])
        assert (rows < 50).sum() <= 2  # the clump is sampled, not exhausted
    # with coords=None the spread is measured in X, where the clump is not a clump
    rows = label_next(probe, X, labels, n, candidates=100, seed=0)
    assert len(set(rows.tolist())) == n


def novel_cluster_probe(seed=21):
    """A probe that is sure, and wrong, about a cluster far from every labelled cell.

    2-D embeddings. Cells 0-99: labelled, two clusters (a at (-5, 0), b at (5, 0));
    cells 100-199: unlabelled, on the a-b border, margins 0-0.3; cells 200-239:
    unlabelled, a cluster at (0, 40), far from every labelled cell, margin 1.0
    (predicted "a" with certainty). Returns probe, X, labels.
    """
    rng = np.random.default_rng(seed)
    X = np.concatenate(
        [
            rng.normal(loc=(-5, 0), size=(50, 2)),
            rng.normal(loc=(5, 0), size=(50, 2)),
            rng.normal(loc=(0, 0), scale=(0.5, 3), size=(100, 2)),
            rng.normal(loc=(0, 40), size=(40, 2)),
        ]
    ).astype(np.float32)
    margin = np.concatenate([[1.0] * 100, np.linspace(0, 0.3, 100), [1.0] * 40])
    labels = np.full(240, None, dtype=object)
    labels[:50], labels[50:100] = "a", "b"
    probe = LiveProbe("knn")
    probe.classes_ = ["a", "b"]
    probe.proba = np.stack([(1 + margin) / 2, (1 - margin) / 2], axis=1).astype(np.float32)
    probe.confidence = probe.proba.max(axis=1)
    probe.prediction = np.array(["a"] * 240, dtype=object)
    return probe, X, labels


def test_label_next_hybrid_finds_a_novel_cluster_the_probe_is_sure_about():
    """strategy="hybrid": a cluster far from every labelled cell gets picks although the
    probe is certain there (margin 1.0); the default least-sure pool never reaches it."""
    probe, X, labels = novel_cluster_probe()
    n = 10
    for seed in range(5):
        default = label_next(probe, X, labels, n, candidates=40, seed=seed)
        assert (default >= 200).sum() == 0  # the premise: margins alone miss the cluster
        rows = label_next(probe, X, labels, n, candidates=40, seed=seed, strategy="hybrid")
        assert len(set(rows.tolist())) == n
        assert rows.min() >= 100  # never a labelled cell
        assert (rows >= 200).sum() >= 2  # the novel cluster is sampled ...
        assert (rows < 200).sum() >= n // 2  # ... and the border still is too
        assert rows[0] == 100 + np.argmin(probe.margin()[100:200])  # least sure first
    with pytest.raises(ValueError, match="strategy"):
        label_next(probe, X, labels, n, strategy="novel")


def test_label_next_without_predictions_is_pure_diversity():
    """With no probe yet, picks cover the clusters (every cluster is hit) and skip NaN rows."""
    X, truth = blobs(n=400, n_classes=4, spread=0.3, scale=5.0, seed=19)
    X[:10] = np.nan
    labels = np.full(len(X), None, dtype=object)
    rows = label_next(LiveProbe(), X, labels, 8, seed=1)
    assert len(set(rows.tolist())) == 8
    assert rows.min() >= 10
    assert set(truth[rows].tolist()) == set(NAMES[:4].tolist())
    np.testing.assert_array_equal(label_next(None, X, labels, 8, seed=1), rows)  # no probe
    assert len(label_next(LiveProbe(), X, truth, 5)) == 0  # nothing unlabelled


@pytest.mark.parametrize("kind", ["knn", "linear"])
def test_sklearn_style_predict_and_predict_proba(kind):
    """``predict_proba`` columns follow ``classes_``, rows sum to 1, ``predict`` is their
    argmax; kNN matches scikit-learn's KNeighborsClassifier on new cells; a NaN row
    gets NaN / None; an unfitted probe says so."""
    from sklearn.neighbors import KNeighborsClassifier

    X, truth = blobs(n=300, seed=4)
    labels = np.where(np.arange(len(X)) % 3 == 0, truth, None).astype(object)
    probe = LiveProbe(kind, k=5)
    with pytest.raises(ValueError, match="fit it first"):
        probe.predict_proba(X[:3])
    probe.fit(X, labels)
    assert probe.classes_ == sorted(set(truth[labels != None]))  # noqa: E711
    Xq, _ = blobs(n=60, seed=5)
    Xq[0] = np.nan
    proba = probe.predict_proba(Xq)
    pred = probe.predict(Xq)
    assert proba.shape == (60, len(probe.classes_))
    assert np.isnan(proba[0]).all()
    assert pred[0] is None
    np.testing.assert_allclose(proba[1:].sum(axis=1), 1.0, rtol=1e-5)
    names = np.array(probe.classes_, dtype=object)
    assert (pred[1:] == names[np.argmax(proba[1:], axis=1)]).all()
    np.testing.assert_array_equal(pred, probe.apply(Xq)[0])
    if kind == "knn":
        lab = labels != None  # noqa: E711
        ref = KNeighborsClassifier(n_neighbors=5).fit(X[lab], labels[lab].astype(str))
        np.testing.assert_allclose(proba[1:], ref.predict_proba(Xq[1:]), atol=1e-6)
        assert (pred[1:] == ref.predict(Xq[1:])).all()

"""The DinoBloom evaluation protocol: kNN (k=20, k=1) and the linear probe."""

import numpy as np
import pytest

from napari_hemofm.core.evaluation import evaluate_probe, make_probe
from napari_hemofm.core.probe import linear_probe_c


def blobs(n_per_class=30, n_classes=3, dim=16, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(n_classes, dim))
    X = np.concatenate([c + spread * rng.normal(size=(n_per_class, dim)) for c in centres])
    y = np.repeat([f"class_{k}" for k in range(n_classes)], n_per_class).astype(object)
    return X.astype(np.float32), y


def test_linear_probe_c_is_dim_times_classes_over_100():
    """C = M * n_classes / 100 (DinoBloom: 384 * 21 / 100 = 80.64)."""
    assert linear_probe_c(384, 21) == pytest.approx(80.64)
    est = make_probe("linear", dim=384, n_classes=21)
    assert est.C == pytest.approx(80.64)
    assert est.max_iter == 1000
    assert est.solver == "lbfgs"


def test_knn_probe_is_uniform_euclidean():
    """The kNN probe uses uniform weights and Minkowski p=2 (Euclidean)."""
    est = make_probe("knn", dim=8, n_classes=3, k=20)
    assert (est.n_neighbors, est.weights, est.metric, est.p) == (20, "uniform", "minkowski", 2)


def test_separable_classes_score_perfectly_and_random_labels_near_chance():
    """Well separated blobs give accuracy 1; shuffled labels fall to about chance."""
    X, y = blobs()
    good = evaluate_probe(X, y, probe="knn")
    assert good["results"]["knn_k20"]["balanced_accuracy"] == pytest.approx(1.0)
    assert good["results"]["knn_k1"]["accuracy"] == pytest.approx(1.0)
    shuffled = np.random.default_rng(1).permutation(y)
    bad = evaluate_probe(X, shuffled, probe="knn")
    assert bad["results"]["knn_k20"]["balanced_accuracy"] < 0.6


def test_matches_a_direct_scikit_learn_computation():
    """The fold-averaged scores equal an independent StratifiedKFold loop (oracle)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    X, y = blobs(spread=2.5, seed=3)
    y = y.astype(str)
    for probe, make in [
        ("knn", lambda: KNeighborsClassifier(20)),
        ("linear", lambda: LogisticRegression(C=16 * 3 / 100, max_iter=1000)),
    ]:
        bal, f1 = [], []
        for tr, te in StratifiedKFold(5).split(X, y):
            pred = make().fit(X[tr], y[tr]).predict(X[te])
            bal.append(balanced_accuracy_score(y[te], pred))
            f1.append(f1_score(y[te], pred, average="weighted"))
        got = evaluate_probe(X, y, probe=probe)["results"]
        name = "knn_k20" if probe == "knn" else "linear"
        assert got[name]["balanced_accuracy"] == pytest.approx(np.mean(bal))
        assert got[name]["weighted_f1"] == pytest.approx(np.mean(f1))


def test_unlabelled_cells_are_left_out_and_nan_embeddings_refused():
    """Missing labels are excluded from n_cells; NaN rows among labelled cells raise."""
    X, y = blobs()
    y = y.copy()
    y[:5] = None
    y[5] = np.nan
    y[6] = ""
    report = evaluate_probe(X, y)
    assert report["n_cells"] == len(y) - 7
    assert report["classes"] == ["class_0", "class_1", "class_2"]
    X[10] = np.nan
    with pytest.raises(ValueError, match="no embedding"):
        evaluate_probe(X, y)


def test_too_few_classes_or_cells_give_clear_errors():
    """One class, or a class smaller than the fold count, is refused with the numbers."""
    X, y = blobs()
    with pytest.raises(ValueError, match=">= 2 labelled classes"):
        evaluate_probe(X, np.array(["a"] * len(y), dtype=object))
    y2 = y.copy()
    y2[:28] = None
    with pytest.raises(ValueError, match="smallest class has 2"):
        evaluate_probe(X, y2)


def test_leave_one_batch_out_reports_each_held_out_batch():
    """split='batch' trains on the other batches and scores each batch once."""
    X, y = blobs(n_per_class=40)
    batches = np.tile(["lab_a", "lab_b"], len(y) // 2)
    shifted = X.copy()
    shifted[batches == "lab_b"] += 100.0  # a batch effect so large kNN fails across labs
    same = evaluate_probe(X, y, probe="knn", split="batch", batches=batches)
    assert set(same["per_batch"]) == {"lab_a", "lab_b"}
    assert same["results"]["knn_k20"]["accuracy"] == pytest.approx(1.0)
    far = evaluate_probe(shifted, y, probe="knn", split="batch", batches=batches)
    assert far["results"]["knn_k20"]["balanced_accuracy"] < 0.5
    with pytest.raises(ValueError, match=">= 2 batches"):
        evaluate_probe(X, y, split="batch", batches=["one"] * len(y))


def test_live_knn_probe_matches_scikit_learn_oracle():
    """LiveProbe('knn') votes like KNeighborsClassifier (k=20, uniform, Euclidean): on
    unlabelled cells from all labelled cells, on labelled cells leave-one-out."""
    from sklearn.neighbors import KNeighborsClassifier

    from napari_hemofm.core.probe import LiveProbe

    X, y = blobs(n_per_class=60, n_classes=3, spread=2.5, seed=4)
    labels = y.copy()
    rng = np.random.default_rng(4)
    unl = rng.choice(len(y), 80, replace=False)
    labels[unl] = None
    lab = np.setdiff1d(np.arange(len(y)), unl)
    probe = LiveProbe("knn", k=20)
    probe.fit(X, labels)
    oracle = KNeighborsClassifier(n_neighbors=20).fit(X[lab], labels[lab].astype(str))
    np.testing.assert_allclose(probe.proba[unl], oracle.predict_proba(X[unl]), atol=1e-6)
    assert list(oracle.classes_) == probe.classes_
    for i in lab[:15]:
        others = lab[lab != i]
        loo = KNeighborsClassifier(n_neighbors=20).fit(X[others], labels[others].astype(str))
        np.testing.assert_allclose(probe.proba[i], loo.predict_proba(X[i : i + 1])[0], atol=1e-6)
        assert probe.prediction[i] == loo.predict(X[i : i + 1])[0]

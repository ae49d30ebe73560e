"""The out-of-domain guard: conformal typicality per cell, shift test per group."""

import numpy as np
import pytest

from napari_hemofm._testing import table_of
from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.guard import (
    ALPHA,
    SHIFT_WARNING,
    Guard,
    shift_table,
    shift_test,
    shift_warnings,
)
from napari_hemofm.core.probe import LiveProbe
from napari_hemofm.core.report import UNIDENTIFIED
from napari_hemofm.core.review import Review

CLASSES = np.array(["eosinophil", "lymphocyte", "neutrophil"], dtype=object)


def gaussian_classes(n_per, seed, dim=16, shift=0.0, centres_seed=0):
    """Three Gaussian classes (fixed centres), optionally all moved by ``shift`` sd."""
    centres = np.random.default_rng(centres_seed).normal(0, 4, size=(3, dim))
    rng = np.random.default_rng(seed)
    X = np.concatenate([c + shift + rng.normal(size=(n_per, dim)) for c in centres])
    return X.astype(np.float32), np.repeat(CLASSES, n_per)


def test_cells_like_the_labelled_ones_are_flagged_at_about_alpha():
    """Exchangeable cells: the share flagged is about ALPHA (conformal validity), and
    the p-values are about uniform."""
    X, y = gaussian_classes(300, seed=1)
    guard = Guard.fit(X, y)
    Xq, yq = gaussian_classes(2000, seed=2)
    p, atypical = guard.score(Xq, yq)
    assert atypical.mean() <= 2.5 * ALPHA
    assert 0.4 < np.nanmean(p) < 0.6
    assert abs(np.mean(p < 0.2) - 0.2) < 0.05


def test_cells_from_another_lab_are_flagged():
    """Cells moved 3 sd along every axis are atypical for the class they are given."""
    X, y = gaussian_classes(300, seed=1)
    guard = Guard.fit(X, y)
    Xq, yq = gaussian_classes(200, seed=3, shift=3.0)
    _, atypical = guard.score(Xq, yq)
    assert atypical.mean() > 0.95


def test_reference_cells_are_scored_leave_one_out_like_the_calibration():
    """With ``same_rows`` a labelled cell is scored without itself: its statistic is its
    calibration value (so labelled cells are not all "perfectly typical")."""
    X, y = gaussian_classes(40, seed=4)
    guard = Guard.fit(X, y)
    stat = guard.statistic(X, y, same_rows=True)
    np.testing.assert_allclose(np.sort(stat), guard.calibration, rtol=1e-5)
    outside = guard.statistic(X, y)  # as new cells: their own copy is the nearest
    assert (outside < stat).mean() > 0.9


def test_reference_is_capped_per_class_and_stable_under_new_labels():
    """At most ``max_per_class`` references; a new label outside the chosen ones
    leaves a class's reference unchanged or swaps in exactly that cell."""
    X, y = gaussian_classes(100, seed=5)
    g1 = Guard.fit(X, y, max_per_class=30)
    assert all(len(g1.reference[c]) == 30 for c in CLASSES)
    y2 = y.copy()
    y2[0] = None  # one label removed
    g2 = Guard.fit(X, y2, max_per_class=30)
    for c in CLASSES[1:]:
        np.testing.assert_array_equal(g1.reference_rows[c], g2.reference_rows[c])
    diff = set(g1.reference_rows[CLASSES[0]]) ^ set(g2.reference_rows[CLASSES[0]])
    assert diff in (set(), {0} | (diff - {0}))
    assert len(diff) in (0, 2)


def test_small_classes_are_not_judged_or_use_what_they_have():
    """One labelled cell: no calibration from it, its predictions are not judged
    (NaN, never atypical); two cells: the nearest other one (m = 1)."""
    X, y = gaussian_classes(30, seed=6)
    y = y.astype(object)
    keep = np.r_[0:30, 30:32, 60]  # 30 eosinophils, 2 lymphocytes, 1 neutrophil
    guard = Guard.fit(X[keep], y[keep])
    assert guard._m("lymphocyte") == 1
    assert guard._m("neutrophil") == 0
    p, atypical = guard.score(X[60:], y[60:])
    assert np.isnan(p).all()
    assert not atypical.any()
    p, _ = guard.score(X[30:60], y[30:60])
    assert np.isfinite(p).all()
    p, _ = guard.score(X[:3], np.array([None, "basophil", "eosinophil"], dtype=object))
    assert np.isnan(p[:2]).all()
    assert np.isfinite(p[2])


def test_arrays_round_trip_without_pickle(tmp_path):
    """The guard's arrays rebuild the same guard; a probe file carries them."""
    X, y = gaussian_classes(50, seed=7)
    probe = LiveProbe("knn")
    probe.fit(X, y)
    path = probe.save(tmp_path / "probe.npz")
    with np.load(path, allow_pickle=False) as data:
        assert {"guard_meta", "guard_reference", "guard_calibration"} <= set(data.files)
        rebuilt = Guard.from_arrays(data)
        np.testing.assert_allclose(rebuilt.calibration, data["guard_calibration"])
    loaded = LiveProbe.load(path)
    Xq, _ = gaussian_classes(20, seed=8, shift=1.5)
    np.testing.assert_allclose(
        loaded.typicality_of(Xq)[0], probe.typicality_of(Xq)[0], equal_nan=True
    )
    arrays = probe.guard().to_arrays()
    arrays["guard_meta"] = np.array('{"version": 99}')
    with pytest.raises(ValueError, match="version"):
        Guard.from_arrays(arrays)


@pytest.mark.parametrize("kind", ["knn", "linear"])
def test_refresh_guard_incremental_equals_fresh(kind):
    """After label changes, the incrementally refreshed typicality equals that of a
    fresh probe on the same labels, and the rows reported are exactly those changed."""
    X, truth = gaussian_classes(80, seed=9)
    rng = np.random.default_rng(0)
    labels = np.where(rng.random(len(X)) < 0.4, truth, None).astype(object)
    probe = LiveProbe(kind)
    probe.fit(X, labels)
    probe.refresh_guard()
    for _ in range(6):
        rows = rng.choice(len(X), 4, replace=False)
        new = [rng.choice([*CLASSES, None]) for _ in rows]
        labels[rows] = new
        before = probe.typicality.copy()
        probe.update(rows, new)
        changed = probe.refresh_guard()
        fresh = LiveProbe(kind)
        fresh.fit(X, labels)
        fresh.refresh_guard()
        np.testing.assert_allclose(probe.typicality, fresh.typicality, rtol=1e-6, equal_nan=True)
        moved = ~((before == probe.typicality) | (np.isnan(before) & np.isnan(probe.typicality)))
        np.testing.assert_array_equal(changed, np.flatnonzero(moved))


def test_shift_test_is_a_binomial_test_with_an_effect_floor():
    assert not shift_test(np.zeros(100, bool))["shifted"]
    one = np.zeros(100, bool)
    one[0] = True
    assert not shift_test(one)["shifted"]  # 1 % is what ALPHA allows
    many = np.zeros(100, bool)
    many[:10] = True
    res = shift_test(many)
    assert res["shifted"]
    assert res["p_value"] < 1e-5
    assert res["share"] == 0.1
    # a large group just over ALPHA is significant but under the effect floor
    big = np.zeros(100_000, bool)
    big[:1300] = True
    assert shift_test(big)["p_value"] < 0.01
    assert not shift_test(big)["shifted"]
    assert not shift_test(np.zeros(0, bool))["shifted"]


def two_lab_table(seed=0):
    """Lab A (labelled half) and lab B (same classes, moved 3 sd, unlabelled)."""
    Xa, ya = gaussian_classes(60, seed=seed)
    Xb, yb = gaussian_classes(30, seed=seed + 1, shift=3.0)
    X = np.concatenate([Xa, Xb])
    n = len(X)
    table = table_of(
        [f"c{i:04d}" for i in range(n)],
        source=[f"s{i % 6}.png" for i in range(n)],
        batch=["A"] * len(Xa) + ["B"] * len(Xb),
        embeddings=X,
    )
    lab = np.flatnonzero(np.arange(n) < len(Xa))[::2]
    table.set_labels(table.cell_ids[lab].tolist(), ya[lab].tolist(), origin="imported")
    return table, np.concatenate([ya, yb])


def test_review_writes_typicality_and_warns_about_the_shifted_lab():
    """Retrain writes obs typicality / atypical; lab B's cells are atypical, counted
    Unidentified, and only batch B carries the shift warning."""
    table, _ = two_lab_table()
    review = Review(table, threshold=0.5)
    review.align_by = None
    review.retrain()
    obs = table.obs
    assert obs["typicality"].dtype.kind == "f"
    assert obs["atypical"].dtype == bool
    b = (obs["batch"] == "B").to_numpy()
    unl_a = ~b & obs["label"].isna().to_numpy()
    assert obs["atypical"][b].mean() > 0.9
    assert obs["atypical"][unl_a].mean() <= 0.05
    assert (review.section_of()[b] == UNIDENTIFIED).mean() > 0.9
    warnings = review.warnings("batch")
    assert list(warnings) == ["B"]
    assert warnings["B"].startswith(SHIFT_WARNING)
    assert shift_warnings(table, "batch") == warnings
    frame = shift_table(table, "batch").set_index("group")
    assert frame.loc["A", "n"] == unl_a.sum()
    assert not frame.loc["A", "shifted"]
    with pytest.raises(ValueError, match="no column"):
        shift_table(table, "patient")


def test_review_labels_of_the_new_lab_lift_the_warning():
    """Labelling a few cells of lab B per class makes its cells typical again."""
    table, truth = two_lab_table()
    review = Review(table, threshold=0.5)
    review.align_by = None
    review.retrain()
    assert "B" in review.warnings("batch")
    b = np.flatnonzero((table.obs["batch"] == "B").to_numpy())
    for c in CLASSES:
        rows = b[truth[b] == c][:8]
        review.relabel(rows, c)
    review.retrain()
    assert "B" not in review.warnings("batch")


def test_report_with_another_labs_probe_file_flags_the_cells_and_warns(tmp_path, capsys):
    """``hemofm report --probe-file`` (a probe of lab A applied to lab B): the guard
    sends B's cells to Unidentified and the group carries the shift warning."""
    import json

    from napari_hemofm.cli import main

    table, _ = two_lab_table()
    obs = table.obs
    a = (obs["batch"] == "A").to_numpy()
    probe = LiveProbe("knn")
    probe.fit(table.embeddings[a], obs["label"].astype(object).to_numpy()[a])
    probe_path = probe.save(tmp_path / "lab_a.npz")
    lab_b = CellTable(table.adata[~a].copy())
    project = lab_b.save(tmp_path / "lab_b.h5ad")
    code = main(
        [
            "report",
            str(project),
            "--by",
            "batch",
            "--json",
            "--probe-file",
            str(probe_path),
            "--out",
            str(tmp_path / "counts.csv"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{") :])
    (group,) = summary["groups"]
    assert group["n_unidentified"] >= 0.9 * (~a).sum()
    assert any(w.startswith(SHIFT_WARNING) for w in group["warnings"])

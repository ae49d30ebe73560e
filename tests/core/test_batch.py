"""Batch-effect metrics and corrections: properties on seeded blobs, oracles, errors."""

import itertools
import json
import sys

import numpy as np
import pandas as pd
import pytest

from napari_hemofm.core import batch as bm
from napari_hemofm.core.cells import table_from_frame


def blobs(
    shift=0.0,
    *,
    n_per=60,
    n_labels=3,
    n_batches=2,
    dim=8,
    sep=8.0,
    mixes=None,
    seed=0,
):
    """Gaussian cell types (sd 1, centres ``sep`` apart) in batches moved by ``shift``.

    ``mixes[b][t]`` overrides the number of cells of type t in batch b. The noise and
    centres depend only on ``seed``, so two calls differing in ``shift`` differ only by
    the batch offsets.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_labels, dim))
    centres *= sep / np.linalg.norm(centres, axis=1, keepdims=True)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    X, b, y = [], [], []
    for i in range(n_batches):
        for t in range(n_labels):
            n = n_per if mixes is None else mixes[i][t]
            X.append(centres[t] + rng.normal(size=(n, dim)))
            b += [f"lab{i}"] * n
            y += [f"type{t}"] * n
    X = np.concatenate(X)
    b = np.array(b, dtype=object)
    offsets = {f"lab{i}": i * shift * direction for i in range(n_batches)}
    X = X + np.stack([offsets[v] for v in b])
    return X, b, np.array(y, dtype=object)


# ------------------------------------------------------------------ properties
def test_metrics_follow_a_growing_batch_shift():
    """As the batch shift grows, iLISI, kBET acceptance and graph connectivity fall (or
    stay) and PCR-batch rises; the largest shift leaves the batches unmixed."""
    shifts = [0.0, 1.0, 2.5, 12.0]  # graph connectivity only drops once batches part
    rows = []
    for s in shifts:
        X, b, y = blobs(s)
        rows.append(
            {
                "ilisi": bm.compute_ilisi(X, b, y),
                "kbet": bm.compute_kbet(X, b, y),
                "gc": bm.compute_graph_connectivity(X, b, y),
                "pcr": bm.compute_pcr_batch(X, b, y),
            }
        )
    for before, after in itertools.pairwise(rows):
        assert after["ilisi"] < before["ilisi"]
        assert after["kbet"] <= before["kbet"] + 0.02
        assert after["gc"] <= before["gc"] + 1e-9
        assert after["pcr"] > before["pcr"]
    assert rows[-1]["ilisi"] < 0.1
    assert rows[-1]["kbet"] < 0.1
    assert rows[-1]["gc"] < 0.6
    assert rows[-1]["pcr"] > 0.8


def test_no_shift_mixes_well_and_separated_types_score_high():
    """Without a shift, scaled iLISI is near 1, kBET accepts most neighbourhoods and
    PCR-batch is near 0; well separated cell types give high ASW, NMI and ARI."""
    X, b, y = blobs(0.0)
    report = bm.batch_report(X, b, y, lobo=False)
    m = report["metrics"]
    assert m["ilisi"] > 0.85
    assert 1.85 < m["ilisi_raw"] <= 2.0
    assert m["kbet_acceptance"] > 0.8
    assert m["pcr_batch"] < 0.05
    assert m["graph_connectivity"] == pytest.approx(1.0)
    assert m["batch_asw"] > 0.9
    assert m["celltype_asw"] > 0.75
    assert m["nmi"] > 0.95
    assert m["ari"] > 0.95


def test_mixing_is_measured_within_cell_types():
    """Labs holding different cell mixes but no shift pass kBET and show no PCR batch
    effect when measured within cell types; ignoring the labels makes the composition
    look like a batch effect. Per-type iLISI reaches most of the best value the type's
    batch sizes allow (``ilisi_ideal``)."""
    X, b, y = blobs(0.0, mixes=[[90, 20, 20], [20, 20, 90]], seed=3)
    assert bm.compute_kbet(X, b, y) > 0.9
    assert bm.compute_kbet(X, b) < 0.3
    assert bm.compute_pcr_batch(X, b, y) < 0.05
    assert bm.compute_pcr_batch(X, b) > 0.1
    per_label = bm.batch_report(X, b, y, lobo=False)["per_label"]
    assert per_label["type0"]["ilisi_ideal"] == pytest.approx(
        (1 / ((9 / 11) ** 2 + (2 / 11) ** 2)) - 1
    )
    assert per_label["type1"]["ilisi_ideal"] == pytest.approx(1.0)
    for entry in per_label.values():
        assert 0.75 * entry["ilisi_ideal"] < entry["ilisi"] <= entry["ilisi_ideal"] + 1e-9


def test_per_cell_ilisi_is_nan_where_undefined_and_scaled_by_batches_present():
    """Per-cell iLISI is NaN for unlabelled cells and for types in one batch or with too
    few cells; scaled = (raw - 1) / (B - 1) with B the batches holding the type."""
    X, b, y = blobs(0.5, n_batches=3, mixes=[[40, 40, 40], [40, 40, 0], [40, 5, 0]])
    y = y.copy()
    y[:3] = None
    raw = bm.ilisi_per_cell(X, b, y, scaled=False)
    scaled = bm.ilisi_per_cell(X, b, y)
    assert np.isnan(raw[:3]).all()
    assert np.isnan(raw[y == "type2"]).all()  # one batch only
    t0 = np.flatnonzero(y == "type0")
    t1 = np.flatnonzero(y == "type1")
    assert np.isfinite(raw[t0]).all()
    assert np.allclose(scaled[t0], (raw[t0] - 1) / 2)  # 3 batches
    assert np.allclose(scaled[t1], (raw[t1] - 1) / 2)  # 3 batches (5 cells in lab2)
    assert np.all((raw[t0] >= 1 - 1e-9) & (raw[t0] <= 3 + 1e-9))
    few = bm.ilisi_per_cell(X, b, y, min_cells=1000)
    assert np.isnan(few).all()


def test_batch_report_lists_excluded_types_and_is_json():
    """The report holds every METRIC_INFO key, names the types left out of the mixing
    averages and why, and serialises as strict JSON (undefined values are None)."""
    X, b, y = blobs(1.0, mixes=[[40, 40, 40], [40, 40, 0]])
    report = bm.batch_report(X, b, y)
    assert set(report["metrics"]) == set(bm.METRIC_INFO)
    assert report["batches"] == ["lab0", "lab1"]
    assert report["n_cells"] == len(X)
    assert report["mixing_labels"] == ["type0", "type1"]
    assert report["excluded_labels"] == {"type2": "found in one batch only"}
    assert report["per_label"]["type2"]["mixing"] is False
    assert report["per_label"]["type2"]["batches"] == {"lab0": 40}
    assert report["per_label"]["type0"]["ilisi"] is not None
    assert report["directions"]["pcr_batch"] == "higher = stronger batch effect"
    assert report["directions"]["ilisi"] == "higher = better mixed"
    assert set(report["lobo"]["per_batch"]) == {"lab0", "lab1"}
    assert report["lobo"]["labels"] == ["type0", "type1"]
    json.dumps(report, allow_nan=False)
    for name, (direction, meaning) in bm.METRIC_INFO.items():
        assert direction.startswith("higher = "), name
        assert meaning


def test_report_without_labels_leaves_cell_type_metrics_empty():
    """Without labels the mixing metrics use all cells as one group; cell-type and
    leave-one-batch-out metrics are None."""
    X, b, _ = blobs(0.0)
    report = bm.batch_report(X, b)
    m = report["metrics"]
    assert m["ilisi"] > 0.8
    for key in ("celltype_asw", "nmi", "ari", "graph_connectivity", "lobo_knn_accuracy"):
        assert m[key] is None
    assert report["lobo"] is None


def test_leave_one_batch_out_falls_with_the_shift():
    """A kNN probe fitted on one lab transfers to a lab shifted by little, not by a lot;
    the numbers are evaluation.evaluate_probe's on the mixing types."""
    from napari_hemofm.core.evaluation import evaluate_probe

    small = bm.batch_report(*blobs(0.5), lobo=True)["metrics"]
    X, b, y = blobs(12.0)
    large = bm.batch_report(X, b, y)["metrics"]
    assert small["lobo_knn_balanced_accuracy"] > 0.95
    assert large["lobo_knn_balanced_accuracy"] < small["lobo_knn_balanced_accuracy"] - 0.2
    direct = evaluate_probe(X, y, probe="knn", split="batch", batches=b)
    assert large["lobo_knn_accuracy"] == pytest.approx(direct["results"]["knn_k20"]["accuracy"])


# ------------------------------------------------------------------ oracles
def test_celltype_asw_matches_sklearn_silhouette():
    """Cell-type ASW = (mean sklearn silhouette of the labels + 1) / 2; unlabelled cells
    are left out."""
    from sklearn.metrics import silhouette_samples

    X, _, y = blobs(1.0, sep=3.0, seed=5)
    y = y.copy()
    y[::7] = np.nan
    keep = np.array([isinstance(v, str) for v in y])
    expected = (silhouette_samples(X[keep], y[keep].astype(str)).mean() + 1) / 2
    assert bm.compute_celltype_asw(X, y) == pytest.approx(expected, rel=1e-6)


def test_batch_asw_matches_a_hand_computation():
    """Batch ASW = mean over mixing types of mean(1 - |silhouette of batch|) within the
    type (scIB), computed here with sklearn directly."""
    from sklearn.metrics import silhouette_samples

    X, b, y = blobs(1.5, mixes=[[50, 40, 30], [30, 40, 0]], seed=2)
    per_type = []
    for t in ("type0", "type1"):
        rows = y == t
        per_type.append(np.mean(1 - np.abs(silhouette_samples(X[rows], b[rows]))))
    assert bm.compute_batch_asw(X, b, y) == pytest.approx(np.mean(per_type), rel=1e-9)
    per_cell = bm.batch_asw_per_cell(X, b, y)
    assert np.isnan(per_cell[y == "type2"]).all()
    assert np.nanmean(per_cell[y == "type0"]) == pytest.approx(per_type[0])


def test_pcr_batch_matches_regression_on_principal_components():
    """PCR-batch = sum_i Var(PC_i) R^2_i / sum_i Var(PC_i), R^2 of each PC regressed on
    the batch one-hot with scikit-learn's LinearRegression."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LinearRegression

    X, b, _ = blobs(1.0, n_batches=3, dim=12, seed=4)
    pca = PCA(n_components=5).fit(X)
    scores = pca.transform(X)
    onehot = pd.get_dummies(b).to_numpy(dtype=float)
    r2 = np.array([LinearRegression().fit(onehot, pc).score(onehot, pc) for pc in scores.T])
    expected = (pca.explained_variance_ * r2).sum() / pca.explained_variance_.sum()
    assert bm.compute_pcr_batch(X, b, n_components=5) == pytest.approx(expected, rel=1e-9)


def test_ilisi_matches_harmonypy():
    """Raw per-cell iLISI equals harmonypy.compute_lisi (perplexity 30, 90 neighbours),
    on all cells and within one cell type."""
    harmonypy = pytest.importorskip("harmonypy", reason="harmonypy is the iLISI oracle")
    X, b, y = blobs(1.0, n_batches=3, n_per=50, seed=6)
    ref = harmonypy.compute_lisi(X, pd.DataFrame({"batch": b}), ["batch"], perplexity=30)[:, 0]
    mine = bm.ilisi_per_cell(X, b, scaled=False)
    np.testing.assert_allclose(mine, ref, rtol=1e-6, atol=1e-8)
    rows = y == "type1"
    ref1 = harmonypy.compute_lisi(
        X[rows], pd.DataFrame({"batch": b[rows]}), ["batch"], perplexity=30
    )[:, 0]
    np.testing.assert_allclose(bm.ilisi_per_cell(X, b, y, scaled=False)[rows], ref1, rtol=1e-6)


def test_kbet_rejects_at_about_alpha_without_batch_effect():
    """With batches drawn from the same distribution, kBET rejects roughly an alpha share
    of neighbourhoods (the chi-square test's false positives) and none stay when the
    neighbourhood size covers whole types."""
    X, b, y = blobs(0.0, n_per=150, seed=7)
    acc = bm.compute_kbet(X, b, y, alpha=0.05)
    assert 0.85 < acc <= 1.0
    assert bm.compute_kbet(X, b, y, k=299) == 1.0


# ------------------------------------------------------------------ corrections
def test_centre_removes_a_pure_batch_shift():
    """Label-aware centring of a pure shift brings the metrics back to the no-shift
    values and the cells back to their unshifted places up to one global offset."""
    X0, b, y = blobs(0.0)
    X, _, _ = blobs(5.0)
    before = X.copy()
    Xc = bm.correct_embeddings(X, b, y, method="centre")
    assert np.array_equal(X, before)  # the input is untouched
    assert Xc is not X
    diff = Xc - X0
    assert np.abs(diff - diff.mean(axis=0)).max() < 0.5
    assert bm.compute_ilisi(Xc, b, y) > bm.compute_ilisi(X0, b, y) - 0.05
    assert bm.compute_pcr_batch(Xc, b, y) < 0.05


def _type_gap(Z, b, y):
    """Largest distance between a type's mean in lab0 and in lab1."""
    return max(
        np.linalg.norm(Z[(y == t) & (b == "lab0")].mean(0) - Z[(y == t) & (b == "lab1")].mean(0))
        for t in np.unique(y)
    )


def test_label_aware_centring_keeps_biology_when_mixes_differ():
    """Labs with different cell mixes: label-aware centring removes the true lab offset
    (each type's batch means come together); plain centring (no labels) removes the
    composition difference too and moves the types apart."""
    mixes = [[200, 30, 30], [30, 30, 200]]
    X0, b, y = blobs(0.0, mixes=mixes, seed=8)
    X, _, _ = blobs(3.0, mixes=mixes, seed=8)
    true = (X - X0)[b == "lab1"][0]  # lab1's offset relative to lab0

    def removed(Z):
        gone = X - Z
        return gone[b == "lab1"][0] - gone[b == "lab0"][0]

    aware = bm.correct_embeddings(X, b, y, method="centre")
    plain = bm.correct_embeddings(X, b, None, method="centre")
    assert np.linalg.norm(true) == pytest.approx(3.0)
    assert np.linalg.norm(removed(aware) - true) < 0.6
    assert np.linalg.norm(removed(plain) - true) > 3.0
    assert _type_gap(aware, b, y) < _type_gap(plain, b, y) / 3
    # unlabelled cells get their batch's offset removed too
    y_part = y.copy()
    y_part[::3] = None
    partial = bm.correct_embeddings(X, b, y_part, method="centre")
    shift = partial - X
    for lab in ("lab0", "lab1"):
        rows = b == lab
        assert np.allclose(shift[rows], shift[rows][0])


def test_combat_with_labels_equalises_batches_and_keeps_types():
    """ComBat with the labels as covariate: per-type batch means move together, the
    spread of lab1 (1.5x) matches lab0's again and the types stay apart; without a
    covariate, batch means and variances equalise."""
    mixes = [[300, 80, 60], [60, 80, 300]]
    X, b, y = blobs(3.0, mixes=mixes, seed=9, dim=16)
    for t in np.unique(y):  # lab1 is noisier: its cells spread 1.5x around their type
        rows = (b == "lab1") & (y == t)
        X[rows] = X[rows].mean(0) + 1.5 * (X[rows] - X[rows].mean(0))
    Xc = bm.correct_embeddings(X, b, y, method="combat")
    assert _type_gap(X, b, y) > 2.5
    # what is left is the noise of the type means (about 0.6 in 16 dimensions)
    assert _type_gap(Xc, b, y) < 0.3 * _type_gap(X, b, y)
    rows0 = (b == "lab0") & (y == "type0")
    rows1 = (b == "lab1") & (y == "type2")
    ratio_before = X[rows1].var(0).mean() / X[rows0].var(0).mean()
    ratio_after = Xc[rows1].var(0).mean() / Xc[rows0].var(0).mean()
    assert ratio_before > 2.0
    assert 0.8 < ratio_after < 1.25
    cents = np.stack([Xc[y == t].mean(0) for t in ("type0", "type1", "type2")])
    assert min(np.linalg.norm(cents[i] - cents[j]) for i, j in ((0, 1), (0, 2), (1, 2))) > 6
    Xn, bn, _ = blobs(3.0, seed=10, dim=16, n_labels=1, n_per=200)
    Xn[bn == "lab1"] *= 2.0
    Cn = bm.correct_embeddings(Xn, bn, method="combat")
    m0, m1 = Cn[bn == "lab0"].mean(0), Cn[bn == "lab1"].mean(0)
    v0, v1 = Cn[bn == "lab0"].var(0), Cn[bn == "lab1"].var(0)
    raw_gap = np.abs(Xn[bn == "lab0"].mean(0) - Xn[bn == "lab1"].mean(0)).max()
    assert np.abs(m0 - m1).max() < 0.05 * raw_gap
    # from 4x to about 1x; empirical Bayes shrinks each dimension's scale a little
    assert np.all(np.abs(v1 / v0 - 1) < 0.25)
    assert abs(np.mean(v1 / v0) - 1) < 0.1


def test_combat_matches_pycombat():
    """Our ComBat equals pycombat (Johnson et al. 2007, parametric) with the one-hot
    labels (reference level dropped) as the effects to keep, and without covariates."""
    pycombat = pytest.importorskip("pycombat", reason="pycombat is the ComBat oracle")
    X, b, y = blobs(2.0, mixes=[[50, 30, 20], [20, 30, 50]], seed=11, dim=12)
    X[b == "lab1"] *= 1.3
    codes = pd.factorize(y)[0]
    cov = np.eye(3)[codes][:, 1:]
    ref = pycombat.Combat().fit_transform(X.copy(), b.astype(str), X=cov)
    np.testing.assert_allclose(bm.correct_embeddings(X, b, y, method="combat"), ref, atol=1e-8)
    ref0 = pycombat.Combat().fit_transform(X.copy(), b.astype(str))
    np.testing.assert_allclose(bm.correct_embeddings(X, b, method="combat"), ref0, atol=1e-8)


def test_harmony_mixes_a_shifted_batch():
    """Harmony (optional) keeps the shape, leaves the input alone and raises iLISI."""
    pytest.importorskip("harmonypy", reason="Harmony is an optional extra")
    X, b, y = blobs(4.0, seed=12, n_per=80)
    before = X.copy()
    Xh = bm.correct_embeddings(X, b, y, method="harmony", ncores=1)
    assert Xh.shape == X.shape
    assert np.array_equal(X, before)
    assert bm.compute_ilisi(Xh, b, y) > bm.compute_ilisi(X, b, y) + 0.2


def test_harmony_missing_names_the_extra(monkeypatch):
    """Without harmonypy, Harmony raises an ImportError naming the pip extra, and
    compare_corrections lists it under errors instead of failing."""
    monkeypatch.setitem(sys.modules, "harmonypy", None)
    X, b, y = blobs(1.0, n_per=20)
    with pytest.raises(ImportError, match=r'pip install "napari-hemofm\[harmony\]"'):
        bm.correct_embeddings(X, b, y, method="harmony")
    out = bm.compare_corrections(X, b, y, methods=("centre", "harmony"), lobo=False)
    assert out["methods"] == ["none", "centre"]
    assert "harmony" in out["errors"]
    assert set(out["metrics"]) == set(bm.METRIC_INFO)
    assert out["metrics"]["ilisi"]["centre"] >= out["metrics"]["ilisi"]["none"]


def test_corrections_keep_float32():
    """Corrections return a new array of the input's float dtype."""
    X, b, y = blobs(1.0, n_per=20)
    X32 = X.astype(np.float32)
    for method in ("centre", "combat"):
        out = bm.correct_embeddings(X32, b, y, method=method)
        assert out.dtype == np.float32
        assert not np.shares_memory(out, X32)


# ------------------------------------------------------------------ errors
def test_validation_errors_name_the_numbers():
    """Length mismatch, one batch, NaN rows, a batch sharing no type, an unknown method:
    ValueError with a message that says what is wrong."""
    X, b, y = blobs(1.0, n_per=15)
    with pytest.raises(ValueError, match=r"X has 90 rows .* batches has 89"):
        bm.compute_ilisi(X, b[:-1], y)
    with pytest.raises(ValueError, match=r"X has 90 rows .* labels has 3"):
        bm.batch_report(X, b, y[:3])
    with pytest.raises(ValueError, match=r">= 2 batches; all 90 cells are in \['lab0'\]"):
        bm.compute_kbet(X, np.full(len(X), "lab0"), y)
    Xn = X.copy()
    Xn[[3, 7]] = np.nan
    with pytest.raises(ValueError, match=r"2 of 90 cells have no embedding"):
        bm.batch_report(Xn, b, y)
    with pytest.raises(ValueError, match=r"2 of 90 cells have no embedding"):
        bm.correct_embeddings(Xn, b, y, method="centre")
    y_apart = np.where(b == "lab0", y, "other")
    with pytest.raises(ValueError, match=r"share no labelled cell type"):
        bm.correct_embeddings(X, b, y_apart, method="combat")
    with pytest.raises(ValueError, match=r"method must be one of"):
        bm.correct_embeddings(X, b, y, method="scale")
    with pytest.raises(TypeError, match=r"\['theta'\] are Harmony options"):
        bm.correct_embeddings(X, b, y, method="centre", theta=2)
    with pytest.raises(ValueError, match=r"shape \(n_cells, dim\)"):
        bm.compute_ilisi(X[0], b[:1])


# ------------------------------------------------------------------ cell table
def _table(X, b, y, predictions=None):
    n = len(X)
    frame = pd.DataFrame(
        {
            "source": [f"{lab}/c{i}.png" for i, lab in enumerate(b)],
            "batch": b,
            "x": 5.0,
            "y": 5.0,
            "x0": 0,
            "y0": 0,
            "x1": 10,
            "y1": 10,
            "label": y,
        },
        index=[f"{lab}/c{i}.png#0" for i, lab in enumerate(b)],
    )
    table = table_from_frame(frame)
    if predictions is not None:
        table.set_column("prediction", predictions)
    table.set_embeddings(X.astype(np.float32), model="test")
    assert table.n_cells == n
    return table


def test_table_report_uses_label_else_prediction_and_skips_unembedded():
    """table_batch_report takes the curated label, else the prediction, leaves cells
    without embedding out (and counts them), and can report after a correction."""
    X, b, y = blobs(2.0, n_per=20)
    y_cur = y.copy()
    y_cur[::2] = None
    X = X.copy()
    table = _table(X, b, y_cur, predictions=y)
    emb = table.embeddings.copy()
    emb[:4] = np.nan
    table.set_obsm("X_embed", emb)
    report = bm.table_batch_report(table, lobo=False)
    assert report["n_not_embedded"] == 4
    assert report["n_cells"] == len(X) - 4
    assert report["n_labelled"] == len(X) - 4  # predictions fill the gaps
    assert report["correction"] is None
    labels = bm.table_labels(table)
    assert list(labels) == list(y)
    assert bm.table_labels(table, "prediction").tolist() == list(y)
    fixed = bm.table_batch_report(table, correction="centre", lobo=False)
    assert fixed["correction"] == "centre"
    assert fixed["uncorrected"] == report["metrics"]
    assert fixed["metrics"]["ilisi"] > report["metrics"]["ilisi"]
    np.testing.assert_array_equal(table.embeddings[4:], emb[4:])  # table untouched


def test_table_report_errors():
    """No embeddings or one batch: ValueError naming the problem."""
    X, b, y = blobs(1.0, n_per=10)
    table = _table(X, b, y)
    table.adata.obsm.pop("X_embed")
    with pytest.raises(ValueError, match="no embeddings"):
        bm.table_batch_report(table)
    one = _table(X, np.full(len(X), "only", dtype=object), y)
    with pytest.raises(ValueError, match=">= 2 batches"):
        bm.table_batch_report(one)


def test_metric_info_directions_match_the_report_keys():
    """METRIC_INFO lists DESIGN.md's keys with directions; NaN-free means are floats."""
    for key in ("ilisi", "ilisi_raw", "kbet_acceptance", "pcr_batch", "batch_asw",
                "celltype_asw", "graph_connectivity", "nmi", "ari",
                "lobo_knn_balanced_accuracy", "lobo_knn_accuracy",
                "lobo_linear_balanced_accuracy"):  # fmt: skip
        assert key in bm.METRIC_INFO
    assert bm.METRIC_INFO["pcr_batch"][0] == "higher = stronger batch effect"
    assert bm.METRIC_INFO["kbet_acceptance"][0] == "higher = better mixed"


def test_each_metric_direction_is_data():
    """Every metric's direction is a field (higher_is_better), not found in its text:
    only PCR-batch (an effect size) is better low; the report carries the same flags."""
    assert {k for k, spec in bm.METRICS.items() if not spec.higher_is_better} == {"pcr_batch"}
    for key, spec in bm.METRICS.items():
        assert spec.name == key
        assert bm.METRIC_INFO[key] == (spec.direction, spec.meaning)
    report = bm.batch_report(*blobs(1.0, n_per=20), lobo=False)
    assert report["higher_is_better"] == {k: s.higher_is_better for k, s in bm.METRICS.items()}


# ------------------------------------------------------------------ one graph, one loop
@pytest.mark.parametrize("method", ["exact", "sample"])
def test_report_equals_the_separate_metric_functions(method):
    """batch_report's values (overall and per type) equal the separate compute_*
    functions' given the same neighbour search, exact or approximate; the per-cell iLISI
    it returns equals ilisi_per_cell's."""
    X, b, y = blobs(1.5, n_per=45, n_labels=3, n_batches=3, dim=12, seed=5)
    y = y.copy()
    y[::7] = None
    kw = {"exact_below": 0, "reference_cells": 30}
    report = bm.batch_report(
        X, b, y, lobo=False, return_per_cell=True, neighbor_method=method, **kw
    )
    nbrs = bm.group_neighbors(X, b, y, n_neighbors=90, method=method, **kw)
    m = report["metrics"]
    assert m["ilisi"] == pytest.approx(bm.compute_ilisi(X, b, y, neighbors=nbrs), abs=1e-12)
    assert m["ilisi_raw"] == pytest.approx(
        bm.compute_ilisi(X, b, y, scaled=False, neighbors=nbrs), abs=1e-12
    )
    assert m["kbet_acceptance"] == pytest.approx(bm.compute_kbet(X, b, y, neighbors=nbrs))
    assert m["pcr_batch"] == pytest.approx(bm.compute_pcr_batch(X, b, y), abs=1e-12)
    assert m["batch_asw"] == pytest.approx(bm.compute_batch_asw(X, b, y), abs=1e-12)
    assert m["graph_connectivity"] == pytest.approx(
        bm.compute_graph_connectivity(X, b, y, neighbors=nbrs)
    )
    assert m["celltype_asw"] == pytest.approx(bm.compute_celltype_asw(X, y))
    assert m["nmi"] == pytest.approx(bm.compute_nmi(X, y))
    assert m["ari"] == pytest.approx(bm.compute_ari(X, y))
    per_cell = bm.ilisi_per_cell(X, b, y, neighbors=nbrs)
    np.testing.assert_allclose(report["ilisi_per_cell"], per_cell, equal_nan=True)
    for name in report["mixing_labels"]:
        rows = np.flatnonzero(y == name)
        assert report["per_label"][name]["ilisi"] == pytest.approx(np.median(per_cell[rows]))
        assert report["per_label"][name]["neighbors"]["method"] == method
    if method == "exact":  # without a given search the functions search exactly
        assert m["kbet_acceptance"] == pytest.approx(bm.compute_kbet(X, b, y))
        assert m["ilisi"] == pytest.approx(bm.compute_ilisi(X, b, y), abs=1e-12)


def test_nearest_neighbors_exact_sampled_and_recall():
    """The exact search equals a numpy brute force; the sampled search with every cell
    as reference is exact (recall 1); with 60 reference cells it returns true distances
    to cells other than the query, ascending, and finds fewer of the true neighbours;
    k is capped at n - 1 and fewer than two cells is refused."""
    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 10)) * np.linspace(3, 0.2, 10)
    d2 = ((X[:, None] - X[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    truth = np.argsort(d2, axis=1)[:, :15]
    exact = bm.nearest_neighbors(X, 15, method="exact")
    np.testing.assert_array_equal(exact.indices, truth)
    np.testing.assert_allclose(exact.distances, np.sqrt(np.sort(d2, axis=1)[:, :15]))
    full = bm.nearest_neighbors(X, 15, method="sample", reference_cells=300)
    assert bm.neighbor_recall(full, exact) == pytest.approx(1.0)
    few = bm.nearest_neighbors(X, 15, method="sample", reference_cells=60)
    assert 0.05 < bm.neighbor_recall(few, exact) < 0.5
    assert (few.indices != np.arange(300)[:, None]).all()
    assert len(np.unique(few.indices)) <= 60
    np.testing.assert_allclose(
        few.distances, np.sqrt(np.take_along_axis(d2, few.indices, axis=1)), rtol=1e-6
    )
    assert (np.diff(few.distances, axis=1) >= 0).all()
    assert bm.nearest_neighbors(X[:3], 90).k == 2
    assert bm.nearest_neighbors(X, 15).method == "exact"  # auto: small -> exact
    auto = bm.nearest_neighbors(X, 15, exact_below=100, reference_cells=60)
    assert auto.method == "sample"
    with pytest.raises(ValueError, match=">= 2 cells"):
        bm.nearest_neighbors(X[:1], 5)


# ------------------------------------------------------------------ small batches
def small_batches(seed=0):
    """A 200-cell lab, a 16-cell lab and a 3-cell lab (one labelled cell), 4 types."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=6.0, size=(4, 8))
    parts = []
    for lab, n in (("big", 200), ("lab16", 16), ("lab3", 3)):
        t = np.arange(n) % 4
        Xb = centres[t] + rng.normal(size=(n, 8)) + (lab != "big") * 1.5
        yb = np.array([f"type{i}" for i in t], dtype=object)
        if lab == "lab3":
            yb[1:] = None
        parts.append((Xb, np.full(n, lab, dtype=object), yb))
    X, b, y = (np.concatenate(v) for v in zip(*parts, strict=True))
    return X, b, y


def test_small_batches_never_break_the_report():
    """A 16-cell and a 3-cell lab beside a big one: every metric is computed or left
    out with its reason, k is capped at what each type holds, the 3-cell lab is named
    as too small to hold out, and the report is strict JSON."""
    X, b, y = small_batches()
    report = bm.batch_report(X, b, y)
    json.dumps(report, allow_nan=False)
    m = report["metrics"]
    for key in ("ilisi", "kbet_acceptance", "pcr_batch", "graph_connectivity", "nmi"):
        assert m[key] is not None, key
    for key, value in m.items():
        assert value is not None or report["reasons"][key], key
    for name in report["mixing_labels"]:
        entry = report["per_label"][name]
        assert entry["neighbors"]["k"] == min(90, entry["n_cells"] - 1)
    skipped = report["lobo"]["skipped"]
    assert "lab3" in skipped["knn"]
    assert "fewer than 10" in skipped["knn"]["lab3"]
    assert set(report["lobo"]["per_batch"]) <= {"big", "lab16"}
    assert m["lobo_knn_accuracy"] is not None
    # a type with 11 cells in two batches: k capped at 10 for every metric
    X2, b2, y2 = blobs(1.0, n_per=6, mixes=[[6, 30], [5, 30]], n_labels=2)
    rep2 = bm.batch_report(X2, b2, y2, lobo=False)
    assert rep2["per_label"]["type0"]["neighbors"]["k"] == 10
    assert rep2["per_label"]["type0"]["ilisi"] is not None


def test_small_batches_tiny_types_and_one_lab_per_type_give_reasons():
    """When no type is mixed, every mixing metric is None with the reason, and the
    leave-one-batch-out probes say why they did not run."""
    X, b, y = blobs(1.0, mixes=[[30, 0], [0, 30]], n_labels=2)
    report = bm.batch_report(X, b, y)
    assert report["metrics"]["ilisi"] is None
    assert "no cell type" in report["reasons"]["ilisi"]
    assert "needs >= 2 cell types" in report["reasons"]["lobo_knn_accuracy"]
    assert report["lobo"] is None


def test_lobo_folds_name_small_batches():
    """Held-out batches need >= min_test cells and a big enough training set; each
    skipped batch is named with its reason; the other folds keep every cell."""
    y = np.array(["a", "b"] * 15 + ["a", "b", "a"] + ["a"] * 12, dtype=object)
    b = np.array(["big"] * 30 + ["tiny"] * 3 + ["mono"] * 12, dtype=object)
    folds, skipped = bm.lobo_folds(y, b, min_test=10, min_train=20, min_train_classes=2)
    assert [name for name, _, _ in folds] == ["mono"]
    assert "3 labelled cell(s), fewer than 10" in skipped["tiny"]
    assert "fewer than 20" in skipped["big"]
    _name, train, test = folds[0]
    assert len(train) == 33
    assert len(test) == 12
    with pytest.raises(ValueError, match=">= 2 batches"):
        bm.lobo_folds(y[:30], b[:30])


def test_evaluate_probe_skips_small_batches_with_reasons():
    """hemofm eval's leave-one-batch-out names the batches it could not hold out instead
    of failing (kNN k=20 on a 16-cell lab used to raise)."""
    from napari_hemofm.core.evaluation import evaluate_probe

    X, b, y = small_batches()
    keep = np.array([v is not None for v in y])
    for probe, key in (("knn", "knn_k20"), ("linear", "linear")):
        rep = evaluate_probe(X[keep], y[keep], probe=probe, split="batch", batches=b[keep])
        assert "lab3" in rep["skipped_batches"]
        assert "lab16" in rep["per_batch"]
        assert 0.0 <= rep["results"][key]["balanced_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="no batch can be held out"):
        evaluate_probe(X[:20], y[:20], split="batch", batches=np.repeat(["p", "q"], 10))


@pytest.mark.parametrize("method", ["centre", "combat", "harmony"])
def test_preview_correction_leaves_uncorrectable_batches_with_a_reason(method):
    """A batch with one labelled cell cannot be fitted by ComBat; a batch sharing no
    labelled type cannot be told from biology: both stay as they were, named; the rest
    is corrected. Two uncorrectable batches out of three leave nothing: ValueError."""
    if method == "harmony":
        pytest.importorskip("harmonypy")  # optional extra, not a package module
    X, b, y = small_batches()
    preview = bm.preview_correction(X, b, y, method=method)
    assert preview.X.shape == X.shape
    if method == "combat":
        assert "ComBat needs >= 2" in preview.skipped["lab3"]
        np.testing.assert_array_equal(preview.X[b == "lab3"], X[b == "lab3"])
        assert "lab3" in preview.note()
    else:
        assert preview.skipped == {}
    assert not np.allclose(preview.X[b == "lab16"], X[b == "lab16"])
    lonely = y.copy()
    lonely[b == "lab16"] = "type_only_here"
    if method != "harmony":
        p2 = bm.preview_correction(X, b, lonely, method="centre")
        assert "shares no labelled cell type" in p2.skipped["lab16"]
        np.testing.assert_array_equal(p2.X[b == "lab16"], X[b == "lab16"])
    if method == "combat":
        with pytest.raises(ValueError, match="needs >= 2 batches it can fit"):
            bm.preview_correction(X, b, lonely, method="combat")


def test_table_report_at_the_slide_level_and_its_fallback():
    """by="slide" compares the slides of the table; a table without slide values falls
    back to its batches with a note; an unknown column is a KeyError naming it."""
    X, b, y = blobs(1.0, n_per=20)
    table = _table(X, b, y)
    slides = np.array([f"{lab}-s{i % 2}" for i, lab in enumerate(b)], dtype=object)
    table.set_column("slide", slides)
    report = bm.table_batch_report(table, by="slide", lobo=False)
    assert report["by"] == "slide"
    assert report["level_note"] == ""
    assert sorted(report["batches"]) == sorted(set(slides))
    table.set_column("slide", np.full(len(X), None, dtype=object))
    back = bm.table_batch_report(table, by="slide", lobo=False)
    assert back["by"] == "batch"
    assert "no slides" in back["level_note"]
    assert back["batches"] == ["lab0", "lab1"]
    with pytest.raises(KeyError, match="no column 'scanner'"):
        bm.table_batch_report(table, by="scanner")


def test_default_level_and_slide_values():
    """Two batches: compare batches. One batch of several smears: compare slides. A cell
    without a slide counts as its batch (a crop's slide is its batch)."""
    X, b, y = blobs(1.0, n_per=10)
    table = _table(X, b, y)
    assert bm.default_level(table) == "batch"
    table.set_column("batch", np.full(len(X), "one_lab", dtype=object))
    assert bm.default_level(table) == "batch"  # no slides: nothing else to compare
    slides = np.array([f"smear{i % 3}" for i in range(len(X))], dtype=object)
    slides[:2] = None
    table.set_column("slide", slides)
    assert bm.default_level(table) == "slide"
    values, column, note = bm.level_values(table, "slide")
    assert column == "slide"
    assert note == ""
    assert values[:2].tolist() == ["one_lab", "one_lab"]
    assert values[2:].tolist() == slides[2:].tolist()


def test_docs_metric_table_is_the_registry():
    """docs/batch-view.md's metric table lists METRICS in order, each with its direction
    and meaning as the code has them (the view shows the same strings)."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "batch-view.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    table = [line for line in rows if line.split("`")[1] in bm.METRICS]
    assert [line.split("`")[1] for line in table] == list(bm.METRICS)
    for line, spec in zip(table, bm.METRICS.values(), strict=True):
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert cells[1] == spec.direction
        assert cells[2].replace("\\|", "|") == spec.meaning

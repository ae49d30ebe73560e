"""Differential counts (core.report): what a cell counts as, kinds, threshold, sign-off."""

import json
import time

import numpy as np
import pytest

from napari_hemofm._testing import table_of
from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.report import (
    ATYPICAL,
    DEFAULT_THRESHOLD,
    LOW_CONFIDENCE,
    NO_PREDICTION,
    NOT_CLASSED,
    UNIDENTIFIED,
    counted_cells,
    counted_labels,
    differential_counts,
    differential_summary,
    report_json,
    sign_off,
    signoff_text,
    signoffs,
    store_threshold,
    stored_threshold,
    verify_sign_off,
)


def small_table():
    """Six cells on two smears: labels, predictions (one unsure) and an artefact."""
    table = table_of([f"c{i}" for i in range(6)], source=["s1"] * 4 + ["s2"] * 2, batch="lab")
    table.set_labels(["c0", "c4"], ["neutrophil", "lymphocyte"])
    table.set_labels(["c3"], NOT_CLASSED)
    pred = ["lymphocyte", "neutrophil", "lymphocyte", "neutrophil", None, None]
    conf = [0.9, 0.95, 0.3, 0.9, np.nan, np.nan]
    table.set_predictions(None, pred, conf)
    return table


def mixed_table(n_white=100, n_nrbc=7, n_platelet=3, n_unsure=0, seed=0):
    """One smear: ``n_white`` labelled white cells of three classes, NRBC and platelet
    clumps labelled with public-set folder names, ``n_unsure`` unsure predictions."""
    rng = np.random.default_rng(seed)
    white = rng.choice(["NEUTROPHIL", "lymphocytes", "Monocyte"], size=n_white).tolist()
    labels = white + ["erythroblast"] * n_nrbc + ["platelet"] * n_platelet
    n = len(labels) + n_unsure
    table = table_of([f"c{i:04d}" for i in range(n)], source="smear", slide="smear", batch="lab")
    table.set_labels(list(table.cell_ids[: len(labels)]), labels)
    if n_unsure:
        pred = [None] * len(labels) + ["Monocyte"] * n_unsure
        conf = [np.nan] * len(labels) + [0.2] * n_unsure
        table.set_predictions(None, pred, conf)
    return table, white


def test_a_cell_counts_as_label_else_confident_prediction_else_unidentified():
    """Curated label beats prediction; low confidence and no prediction are Unidentified,
    each with its reason."""
    table = small_table()
    out = counted_labels(table, threshold=0.5)
    assert out.tolist() == [
        "neutrophil",
        "neutrophil",
        UNIDENTIFIED,
        NOT_CLASSED,
        "lymphocyte",
        UNIDENTIFIED,
    ]
    cells = counted_cells(table, threshold=0.5)
    assert cells["reason"].tolist() == ["", "", LOW_CONFIDENCE, "", "", NO_PREDICTION]
    assert cells["kind"].tolist() == [
        "wbc",
        "wbc",
        "unidentified",
        "not_classed",
        "wbc",
        "unidentified",
    ]
    assert cells["predicted"].tolist() == [False, True, False, False, False, False]
    # a threshold of 0 trusts every prediction
    assert counted_labels(table, threshold=0.0)[2] == "lymphocyte"


def test_atypical_cells_are_unidentified_whatever_their_confidence():
    """A confident prediction of a cell the guard flags (obs["atypical"]) is Unidentified
    with the reason "unlike the labelled cells"; a missing flag means typical."""
    table = small_table()
    assert counted_labels(table, threshold=0.5)[1] == "neutrophil"  # no column: typical
    table.set_column("atypical", [False, True, False, False, False, np.nan])
    cells = counted_cells(table, threshold=0.5)
    assert cells["counted"].iat[1] == UNIDENTIFIED
    assert cells["reason"].iat[1] == ATYPICAL
    assert cells["counted"].iat[0] == "neutrophil"  # a curated label stays, flag or not
    summary = differential_summary(table, "source", threshold=0.5)
    assert summary.loc["s1", "n_atypical"] == 1
    assert summary.loc["s1", "n_low_confidence"] == 1


def test_white_percents_sum_to_100_and_non_white_are_per_100_white_cells():
    """NRBC (folder name "erythroblast") and platelets are not in the white-cell 100 %:
    they are given per 100 white cells; wbc + Unidentified percents sum to 100."""
    table, white = mixed_table(n_white=80, n_nrbc=8, n_platelet=4, n_unsure=20)
    counts = differential_counts(table, "source", threshold=0.5).set_index("label")
    assert counts.loc["erythroblast", "kind"] == "non_wbc"
    assert counts.loc["platelet", "kind"] == "non_wbc"
    white_rows = counts[counts["kind"].isin(["wbc", "unidentified"])]
    assert white_rows["percent"].sum() == pytest.approx(100.0)
    assert white_rows["count"].sum() == 100  # 80 labelled + 20 Unidentified
    assert counts.loc["erythroblast", "percent"] == pytest.approx(8.0)  # 8 per 100 WBC
    assert counts.loc["platelet", "percent"] == pytest.approx(4.0)
    assert counts.loc["NEUTROPHIL", "count"] == white.count("NEUTROPHIL")
    assert list(differential_counts(table).columns) == [
        "group",
        "label",
        "kind",
        "count",
        "percent",
    ]


def test_counts_leave_out_not_classed_and_group_by_any_column():
    """Not classed never appears; --by takes any obs column; an unknown one is refused."""
    table = small_table()
    counts = differential_counts(table, "source", threshold=0.5)
    assert NOT_CLASSED not in set(counts["label"])
    s1 = counts[counts["group"] == "s1"].set_index("label")
    assert s1.loc["neutrophil", "count"] == 2
    assert s1.loc[UNIDENTIFIED, "count"] == 1
    assert s1["count"].sum() == 3
    for _, part in counts.groupby("group"):
        assert part["percent"].sum() == pytest.approx(100.0)
    assert set(differential_counts(table, "batch", threshold=0.5)["group"]) == {"lab"}
    assert len(differential_counts(table, "slide", threshold=0.5))  # a contract column
    table.set_column("patient", ["p1", "p1", "p2", "p2", "p2", "p2"])
    assert set(differential_counts(table, "patient")["group"]) == {"p1", "p2"}
    with pytest.raises(ValueError, match="no column 'ward'"):
        differential_counts(table, "ward")


def test_one_threshold_default_and_a_saved_zero_stays_zero(tmp_path):
    """No stored threshold means 0.5 everywhere; a stored 0 reopens as 0, not 0.5."""
    from napari_hemofm.core.review import Review

    table = small_table()
    assert stored_threshold(table) == DEFAULT_THRESHOLD == 0.5
    assert Review(table).threshold == 0.5
    assert counted_labels(table)[2] == UNIDENTIFIED  # conf 0.3 < 0.5 by default
    store_threshold(table, 0.0)
    again = CellTable.load(table.save(tmp_path / "p.h5ad"))
    assert stored_threshold(again) == 0.0
    assert Review(again).threshold == 0.0
    assert counted_labels(again)[2] == "lymphocyte"
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        store_threshold(table, 1.5)


def test_sign_off_needs_the_target_no_unidentified_and_no_warning(monkeypatch):
    """Below the target, with an Unidentified cell, or with a shift warning (unless
    overridden with a reason) a group cannot be signed off; the record keeps the counts."""
    table, _ = mixed_table(n_white=99, n_nrbc=2, n_platelet=0, n_unsure=1)
    summary = differential_summary(table, target=100)
    assert not summary.loc["smear", "can_sign_off"]
    assert "99 / 100 white cells" in summary.loc["smear", "status"]
    assert "1 Unidentified cell" in summary.loc["smear", "status"]
    with pytest.raises(ValueError, match="99 / 100"):
        sign_off(table, "smear", target=100)
    # the unsure cell is a monocyte after all: 100 white cells, nothing Unidentified
    table.set_labels([table.cell_ids[-1]], "Monocyte")
    assert differential_summary(table, target=100).loc["smear", "can_sign_off"]
    assert not differential_summary(table, target=200).loc["smear", "can_sign_off"]

    import napari_hemofm.core.report as report

    monkeypatch.setattr(report, "shift_warnings", lambda t, by: {"smear": "cells differ"})
    summary = differential_summary(table, target=100)
    assert summary.loc["smear", "warnings"] == ["cells differ"]
    assert not summary.loc["smear", "can_sign_off"]
    with pytest.raises(ValueError, match="shift warning"):
        sign_off(table, "smear", user="dr_a")
    record = sign_off(table, "smear", user="dr_a", override="checked 20 cells by hand")
    assert record["override"] == "checked 20 cells by hand"
    assert record["n_wbc"] == 100
    assert record["n_non_wbc"] == 2
    assert record["counts"]["erythroblast"] == 2
    assert sum(v for k, v in record["counts"].items() if k != "erythroblast") == 100
    assert "warning overridden" in differential_summary(table).loc["smear", "status"]


def test_a_second_reader_verifies_and_a_later_label_change_voids(tmp_path):
    """The signer cannot verify their own sign-off; another user can; a label change in
    the group afterwards voids it (also after a save and reload), and it says so."""
    table, _ = mixed_table(n_white=100, n_nrbc=0, n_platelet=0)
    path = table.save(tmp_path / "p.h5ad")
    table = CellTable.load(path)
    sign_off(table, "smear", user="dr_a")
    with pytest.raises(ValueError, match="another reader"):
        verify_sign_off(table, "smear", user="dr_a")
    verify_sign_off(table, "smear", user="dr_b")
    row = differential_summary(table).loc["smear"]
    assert row["signed_off_by"] == "dr_a"
    assert row["verified_by"] == "dr_b"
    assert row["signoff_void"] == ""
    table.save(path)
    time.sleep(0.01)
    again = CellTable.load(path)
    cell = again.cell_ids[0]
    old = again.obs.loc[cell, "label"]
    again.set_labels([cell], "basophil")
    again.set_labels([cell], old)  # and back: still a change after the sign-off
    row = differential_summary(again).loc["smear"]
    assert "changed since" in row["signoff_void"]
    assert "VOID" in row["status"]
    with pytest.raises(ValueError, match="void"):
        verify_sign_off(again, "smear", user="dr_c")
    third = CellTable.load(again.save(path))
    assert "VOID" in differential_summary(third).loc["smear", "status"]
    assert [r["user"] for r in signoffs(third)] == ["dr_a"]


def test_without_a_journal_a_changed_count_still_voids():
    """A table never saved has no journal: the fingerprint of labels and counts voids."""
    table, _ = mixed_table(n_white=100, n_nrbc=0, n_platelet=0)
    sign_off(table, "smear", user="dr_a")
    assert differential_summary(table).loc["smear", "signoff_void"] == ""
    table.set_labels([table.cell_ids[3]], "basophil")
    assert differential_summary(table).loc["smear", "signoff_void"] != ""


def test_report_json_and_signoff_text_agree_with_the_summary():
    """The --json summary has DESIGN.md's keys and the summary's numbers and words."""
    table, _ = mixed_table(n_white=40, n_nrbc=3, n_platelet=0, n_unsure=2)
    out = report_json(table, "source", target=100)
    json.dumps(out, allow_nan=False)
    (group,) = out["groups"]
    assert set(group) >= {"group", "n_wbc", "n_unidentified", "n_non_wbc", "can_sign_off"}
    assert (group["n_wbc"], group["n_unidentified"], group["n_non_wbc"]) == (40, 2, 3)
    assert group["warnings"] == []
    assert group["can_sign_off"] is False
    row = differential_summary(table, target=100).loc["smear"]
    assert group["status"] == row["status"] == signoff_text(row)
    assert out["threshold"] == 0.5

"""Differential counts (core.report): what a cell counts as, per group, and sign-off."""

import numpy as np
import pandas as pd
import pytest

from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.report import (
    NOT_CLASSED,
    UNIDENTIFIED,
    counted_labels,
    differential_counts,
    differential_summary,
    sign_off,
    signoffs,
)


def small_table():
    """Six cells on two smears: labels, predictions (one unsure) and an artefact."""
    frame = pd.DataFrame(
        {
            "source": ["s1", "s1", "s1", "s1", "s2", "s2"],
            "batch": ["lab", "lab", "lab", "lab", "lab", "lab"],
            "x": 1.0,
            "y": 1.0,
            "x0": 0,
            "y0": 0,
            "x1": 4,
            "y1": 4,
        },
        index=[f"c{i}" for i in range(6)],
    )
    table = CellTable()
    table.add_cells(frame)
    table.set_labels(["c0", "c4"], ["neutrophil", "lymphocyte"])
    table.set_labels(["c3"], NOT_CLASSED)
    pred = ["lymphocyte", "neutrophil", "lymphocyte", "neutrophil", None, None]
    conf = [0.9, 0.95, 0.3, 0.9, np.nan, np.nan]
    table.set_predictions(None, pred, conf)
    return table


def test_a_cell_counts_as_label_else_confident_prediction_else_unidentified():
    """Curated label beats prediction; low confidence and no prediction are Unidentified."""
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
    # without a threshold every prediction counts (DESIGN.md's rule)
    assert counted_labels(table, threshold=0.0)[2] == "lymphocyte"


def test_counts_leave_out_not_classed_and_percentages_sum_to_100():
    """Per group the percentages add to 100 over counted cells; Not classed never appears."""
    table = small_table()
    counts = differential_counts(table, "source", threshold=0.5)
    assert NOT_CLASSED not in set(counts["label"])
    s1 = counts[counts["group"] == "s1"].set_index("label")
    assert s1.loc["neutrophil", "count"] == 2
    assert s1.loc[UNIDENTIFIED, "count"] == 1
    assert s1["count"].sum() == 3
    for _, part in counts.groupby("group"):
        assert part["percent"].sum() == pytest.approx(100.0)
    assert list(counts.columns) == ["group", "label", "count", "percent"]
    by_batch = differential_counts(table, "batch", threshold=0.5)
    assert set(by_batch["group"]) == {"lab"}
    with pytest.raises(ValueError, match="source"):
        differential_counts(table, "slide")


def test_sign_off_only_without_unidentified_and_recorded_with_the_project(tmp_path):
    """A group with Unidentified cells cannot be signed off; once resolved it can, and the
    record survives saving."""
    table = small_table()
    summary = differential_summary(table, "source", threshold=0.5, target=100)
    assert not summary.loc["s1", "can_sign_off"]
    assert summary.loc["s1", "n_counted"] == 3
    assert summary.loc["s1", "n_not_classed"] == 1
    assert summary.loc["s1", "progress"] == pytest.approx(0.03)
    with pytest.raises(ValueError, match="Unidentified"):
        sign_off(table, "s1", threshold=0.5)
    table.set_labels(["c2"], "monocyte")
    record = sign_off(table, "s1", threshold=0.5, user="dr_a")
    assert record["counts"] == {"neutrophil": 2, "monocyte": 1}
    path = table.save(tmp_path / "p.h5ad")
    again = CellTable.load(path)
    assert [r["user"] for r in signoffs(again)] == ["dr_a"]
    summary = differential_summary(again, "source", threshold=0.5)
    assert summary.loc["s1", "signed_off_by"] == "dr_a"

"""`hemofm report`: the long differential-count CSV of DESIGN.md, exit codes, --predict."""

import pandas as pd
import pytest

from napari_hemofm.cli import main
from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.report import NOT_CLASSED, UNIDENTIFIED
from tests.core.test_review import blob_table


@pytest.fixture
def project(tmp_path):
    table, _ = blob_table(n_per=10, labelled_per=3)
    table.set_labels([table.cell_ids[29]], NOT_CLASSED)
    return table.save(tmp_path / "p.h5ad"), table


def test_report_writes_group_label_count_percent_by_source_and_batch(project, tmp_path):
    """Columns are group, label, count, percent; unlabelled cells without predictions are
    Unidentified; Not classed is left out; percentages add to 100 per group."""
    path, table = project
    out = tmp_path / "counts.csv"
    assert main(["report", str(path), "--out", str(out)]) == 0
    counts = pd.read_csv(out)
    assert list(counts.columns) == ["group", "label", "count", "percent"]
    assert set(counts["group"]) == {"a.png", "b.png"}
    assert NOT_CLASSED not in set(counts["label"])
    assert counts["count"].sum() == table.n_cells - 1
    labelled = counts[counts["label"] != UNIDENTIFIED]["count"].sum()
    assert labelled == 9
    for _, part in counts.groupby("group"):
        assert part["percent"].sum() == pytest.approx(100.0)
    assert main(["report", str(path), "--by", "batch", "--out", str(out)]) == 0
    assert set(pd.read_csv(out)["group"]) == {"lab", "lab2"}


def test_report_predict_counts_predictions_for_unlabelled_cells(project, tmp_path):
    """With --predict knn every unlabelled cell of a separable blob counts as its class."""
    path, _ = project
    out = tmp_path / "counts.csv"
    assert main(["report", str(path), "--predict", "knn", "--out", str(out)]) == 0
    counts = pd.read_csv(out)
    totals = counts.groupby("label")["count"].sum()
    assert totals.get(UNIDENTIFIED, 0) == 0
    assert totals["neutrophil"] == 10
    assert totals["lymphocyte"] == 10
    # the monocyte marked Not classed (and any cell the probe puts with it) is not counted
    assert 1 <= 30 - totals.sum() <= 10
    assert totals["monocyte"] == totals.sum() - 20


def test_report_fails_cleanly_on_a_missing_or_empty_project(tmp_path, capsys):
    """Exit 1 with one line naming the file; exit 2 without --out."""
    out = tmp_path / "c.csv"
    assert main(["report", str(tmp_path / "nope.h5ad"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "nope.h5ad" in err
    assert "Traceback" not in err
    empty = CellTable().save(tmp_path / "empty.h5ad")
    assert main(["report", str(empty), "--out", str(out)]) == 1
    assert "no cells" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["report", str(empty)])
    assert exc.value.code == 2
    assert not out.exists()

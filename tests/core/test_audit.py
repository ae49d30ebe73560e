"""The audit trail (core.audit): label history from the journal and the project file."""

import pandas as pd
import pytest

from napari_hemofm.core.audit import (
    AUDIT_KEY,
    absorb_records,
    audit_trail,
    cell_history,
    label_events,
)
from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.report import sign_off, verify_sign_off


def project(tmp_path, n=4):
    frame = pd.DataFrame(
        {"source": "s", "batch": "b", "x": 1.0, "y": 1.0, "x0": 0, "y0": 0, "x1": 4, "y1": 4},
        index=[f"c{i}" for i in range(n)],
    )
    table = CellTable()
    table.add_cells(frame)
    table.set_labels(["c0"], "neutrophil", origin="imported")
    path = table.save(tmp_path / "p.h5ad")
    return CellTable.load(path), path


def test_history_survives_saves_that_empty_the_journal(tmp_path):
    """Changes journalled, saved (journal emptied), changed again, saved again: the
    history holds every change, oldest first, with user, old and new label."""
    table, path = project(tmp_path)
    table.journal.user = "dr_a"
    table.set_labels(["c0", "c1"], "lymphocyte")
    table.save(path)
    assert table.journal.records() == []
    table = CellTable.load(path)
    table.journal.user = "dr_b"
    table.set_labels(["c0"], None)
    pending = label_events(table)  # one saved change pair + one in the journal
    assert len(pending) == 3
    table.save(path)
    again = CellTable.load(path)
    history = cell_history(again, "c0")
    assert history[["user", "old", "new"]].values.tolist() == [
        ["dr_a", "neutrophil", "lymphocyte"],
        ["dr_b", "lymphocyte", ""],
    ]
    assert pd.to_datetime(history["time"], format="ISO8601").is_monotonic_increasing
    assert cell_history(again, "c1")["old"].tolist() == [""]
    assert cell_history(again, "c3").empty
    with pytest.raises(KeyError):
        cell_history(again, "nope")


def test_absorbing_the_same_records_twice_adds_nothing(tmp_path):
    """A save that failed after folding the journal in, then a retry, keeps one copy."""
    table, _ = project(tmp_path)
    table.set_labels(["c2"], "monocyte")
    records = table.journal.records()
    assert absorb_records(table, records) == 1
    assert absorb_records(table, records) == 1
    assert len(table.meta[AUDIT_KEY]["cell_id"]) == 1


def test_audit_trail_lists_relabels_sign_offs_and_verifications_in_time_order(tmp_path):
    """Sign-offs and their verification join the label changes, ordered by time."""
    table, path = project(tmp_path, n=3)
    table.set_labels(["c1", "c2"], ["lymphocyte", "monocyte"])
    sign_off(table, "s", by="source", user="dr_a", target=3)
    verify_sign_off(table, "s", by="source", user="dr_b")
    table.save(path)
    trail = audit_trail(CellTable.load(path))
    assert trail["event"].tolist() == ["relabel", "relabel", "sign-off", "verify"]
    assert trail["user"].tolist()[2:] == ["dr_a", "dr_b"]
    assert "3 white cells" in trail["detail"].iat[2]
    assert trail["group"].iat[2] == "source=s"


def test_changes_before_the_first_save_reach_the_audit_trail(tmp_path):
    """A new session relabels cells before it has a project file (no journal): the
    cell's history shows the change at once, and the first save keeps it in the
    project's audit trail, so reopening still tells who changed what from what."""
    from napari_hemofm._testing import make_cell_table
    from napari_hemofm.core.audit import audit_trail, cell_history
    from napari_hemofm.core.cells import CellTable

    table = make_cell_table(20, seed=3, labelled=0.0)
    cid = table.cell_ids[0]
    table.set_labels([cid], "monocyte", origin="user")
    table.set_labels([cid], "lymphocyte", origin="user")
    history = cell_history(table, cid)
    assert list(history["new"]) == ["monocyte", "lymphocyte"]
    assert list(history["old"]) == ["", "monocyte"]
    path = table.save(tmp_path / "p.h5ad")
    table.close()
    reopened = CellTable.load(path, mode="r")
    trail = audit_trail(reopened)
    mine = trail[trail["cell_id"] == cid] if "cell_id" in trail else trail
    assert len(mine) >= 2
    assert list(cell_history(reopened, cid)["new"]) == ["monocyte", "lymphocyte"]

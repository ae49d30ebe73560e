"""The label journal: acknowledged labels survive a crash, SIGKILL included."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.journal import LabelJournal, journal_path, rejected_path


def make_project(path, n=40):
    frame = pd.DataFrame(
        {"source": "s.png", "batch": "lab", "x": 1.0, "y": 1.0}
        | {"x0": 0, "y0": 0, "x1": 8, "y1": 8},
        index=[f"lab/s.png#{k}" for k in range(n)],
    )
    table = CellTable()
    table.add_cells(frame)
    table.save(path)
    return table


def test_journal_sits_beside_the_project():
    """name.h5ad -> name.labels.jsonl (DESIGN.md)."""
    assert journal_path("/a/p.h5ad").name == "p.labels.jsonl"


def test_labels_after_a_save_come_back_on_load_with_time_and_user(tmp_path):
    """Changes made after the last save are replayed on load; each line has the time,
    the user, the origin, the cells, their labels and their labels before."""
    path = tmp_path / "p.h5ad"
    table = make_project(path)
    table.set_labels(["lab/s.png#1", "lab/s.png#2"], "monocyte")
    table.set_labels(["lab/s.png#2"], None)
    lines = journal_path(path).read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert set(first) == {"time", "user", "origin", "cell_ids", "labels", "old"}
    assert first["labels"] == ["monocyte", "monocyte"]
    assert first["old"] == [None, None]
    assert json.loads(lines[1])["old"] == ["monocyte"]  # what the cell was before
    back = CellTable.load(path)  # the .h5ad itself has no labels
    labels = back.column("label")
    assert labels.loc["lab/s.png#1"] == "monocyte"
    assert pd.isna(labels.loc["lab/s.png#2"])
    assert back.column("label_origin").loc["lab/s.png#1"] == "user"


def test_saving_empties_the_journal_and_keeps_the_labels(tmp_path):
    """After a save the labels live in the file; the journal restarts empty."""
    path = tmp_path / "p.h5ad"
    table = make_project(path)
    table.set_labels(["lab/s.png#3"], "basophil")
    table.save(path)
    assert journal_path(path).read_text() == ""
    assert CellTable.load(path).column("label").loc["lab/s.png#3"] == "basophil"


def test_a_torn_last_line_is_ignored(tmp_path):
    """A line cut by a crash mid-write was never acknowledged: replay skips it."""
    path = tmp_path / "p.h5ad"
    table = make_project(path)
    table.set_labels(["lab/s.png#4"], "eosinophil")
    with open(journal_path(path), "a") as fh:
        fh.write('{"time": "x", "cell_ids": ["lab/s.png#5"], "lab')
    with pytest.warns(UserWarning, match="torn"):
        back = CellTable.load(path)
    assert back.column("label").loc["lab/s.png#4"] == "eosinophil"
    assert pd.isna(back.column("label").loc["lab/s.png#5"])
    assert len(LabelJournal(journal_path(path)).records()) == 1


LABELLER = """
import sys
from napari_hemofm.core.cells import CellTable
table = CellTable.load(sys.argv[1])
classes = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
k = 0
while True:
    cid = f"lab/s.png#{k % 40}"
    label = classes[k % 5] + str(k)
    table.set_labels([cid], label)
    print(cid, label, flush=True)   # acknowledged only after set_labels returned
    k += 1
"""


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_acknowledged_label_survives_sigkill(tmp_path, seed):
    """A labelling process killed with SIGKILL at a random moment loses no label it had
    acknowledged: after reopening, each cell's label is its last acknowledged one (or one
    written just before the kill whose acknowledgement never got out)."""
    rng = np.random.default_rng(seed)
    path = tmp_path / "p.h5ad"
    make_project(path)
    proc = subprocess.Popen(
        [sys.executable, "-c", LABELLER, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    first = proc.stdout.readline()  # the process is up and labelling
    assert first
    time.sleep(float(rng.uniform(0.05, 0.6)))
    os.kill(proc.pid, signal.SIGKILL)
    rest = proc.stdout.read()
    proc.wait()
    acked = [line.split() for line in (first + rest).splitlines() if len(line.split()) == 2]
    assert len(acked) >= 1
    last = dict(acked)  # each cell's last acknowledged label
    back = CellTable.load(path).column("label")
    n_acked = len(acked)
    for cid, label in last.items():
        got = back.loc[cid]
        assert isinstance(got, str), f"{cid}: acknowledged {label!r} lost"
        # the label is the acknowledged one, or a later one written in the same instant
        got_k = int(got[len(got.rstrip("0123456789")) :])  # the write number in the label
        assert got == label or got_k >= n_acked, (cid, label, got)


# ----------------------------------------------------------- torn and bad lines
def _record(cell_ids, labels, origin="user"):
    return {"time": "t", "user": "u", "origin": origin, "cell_ids": cell_ids, "labels": labels}


def _line(record) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def test_a_torn_tail_is_cut_before_the_next_record_is_appended(tmp_path):
    """Bytes after the last newline (a crash mid-write) are cut off on open, so a label
    written afterwards is not glued to the fragment and survives the next open."""
    path = tmp_path / "p.h5ad"
    table = make_project(path)
    table.set_labels(["lab/s.png#4"], "eosinophil")
    with open(journal_path(path), "ab") as fh:
        fh.write(b'{"time": "x", "cell_ids": ["lab/s.png#5"], "lab')
    with pytest.warns(UserWarning, match="torn"):
        again = CellTable.load(path)
    assert journal_path(path).read_bytes().endswith(b"\n")
    again.set_labels(["lab/s.png#6"], "basophil")  # appended after the cut
    again.close()
    back = CellTable.load(path, mode="r").column("label")
    assert back.loc["lab/s.png#4"] == "eosinophil"
    assert back.loc["lab/s.png#6"] == "basophil"
    assert pd.isna(back.loc["lab/s.png#5"])


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_a_tail_cut_inside_a_multibyte_character_still_opens(tmp_path, cut):
    """A record torn inside a multi-byte UTF-8 character (a 4-byte emoji, a 2-byte umlaut)
    neither makes the project unopenable nor loses the records before it or after it."""
    path = tmp_path / "p.h5ad"
    table = make_project(path)
    table.set_labels(["lab/s.png#1"], "Lymphozyt ä")
    whole = _line(_record(["lab/s.png#2"], ["Zelle 🩸 groß"]))
    at = whole.index("🩸".encode()) + cut  # inside the 4-byte character
    with open(journal_path(path), "ab") as fh:
        fh.write(whole[:at])
    with pytest.raises(UnicodeDecodeError):
        whole[:at].decode("utf-8")
    with pytest.warns(UserWarning, match="torn"):
        again = CellTable.load(path)
    again.set_labels(["lab/s.png#3"], "Monozyt ö")
    again.close()
    back = CellTable.load(path, mode="r").column("label")
    assert back.loc["lab/s.png#1"] == "Lymphozyt ä"
    assert back.loc["lab/s.png#3"] == "Monozyt ö"
    assert pd.isna(back.loc["lab/s.png#2"])


BAD_LINES = {
    "not JSON": b'{"cell_ids": ["lab/s.png#1"], labels: oops}\n',
    "not UTF-8": b'{"cell_ids": ["lab/s.png#1"], "labels": ["\xff\xfe"]}\n',
    "JSON, not a record": b"[1, 2, 3]\n",
    "a number": b"42\n",
    "wrong types": _line({"cell_ids": "lab/s.png#1", "labels": ["monocyte"]}),
    "labels not strings": _line({"cell_ids": ["lab/s.png#1"], "labels": [7]}),
    "lengths differ": _line({"cell_ids": ["lab/s.png#1"], "labels": ["a", "b"]}),
    "origin not a string": _line(_record(["lab/s.png#1"], ["a"], origin=3)),
    "unknown cell": _line(_record(["lab/zzz.png#0"], ["monocyte"])),
}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_an_invalid_line_is_moved_aside_and_replay_goes_on(tmp_path, kind):
    """A complete line that is not a valid record is moved to <name>.labels.rejected.jsonl
    (with the reason), a warning says so, and the records after it are still applied."""
    path = tmp_path / "p.h5ad"
    make_project(path)
    journal = journal_path(path)
    journal.write_bytes(
        _line(_record(["lab/s.png#1"], ["neutrophil"]))
        + BAD_LINES[kind]
        + _line(_record(["lab/s.png#2"], ["lymphocyte"]))
    )
    with pytest.warns(UserWarning, match="labels.rejected.jsonl"):
        table = CellTable.load(path)
    labels = table.column("label")
    assert labels.loc["lab/s.png#1"] == "neutrophil"
    assert labels.loc["lab/s.png#2"] == "lymphocyte"
    rejected = rejected_path(path).read_text(encoding="utf-8").splitlines()
    assert len(rejected) == 1
    entry = json.loads(rejected[0])
    assert set(entry) == {"time", "reason", "line"}
    raw = BAD_LINES[kind].rstrip(b"\n")
    assert entry["line"] == raw.decode("utf-8", "backslashreplace")
    kept = journal.read_bytes().splitlines()
    assert len(kept) == 2
    assert all(json.loads(line)["cell_ids"] for line in kept)
    table.set_labels(["lab/s.png#3"], "basophil")
    table.close()
    back = CellTable.load(path, mode="r").column("label")  # no warning: the file is clean
    assert back.loc["lab/s.png#3"] == "basophil"


def test_a_record_with_some_unknown_cells_keeps_its_known_ones(tmp_path):
    """Cells the project does not hold go to the rejected file; the record's other cells
    keep their labels, in memory and in the journal."""
    path = tmp_path / "p.h5ad"
    make_project(path)
    journal_path(path).write_bytes(
        _line(_record(["lab/s.png#1", "gone#0", "lab/s.png#2"], ["a", "b", "c"]))
    )
    with pytest.warns(UserWarning, match="cells the project does not hold"):
        table = CellTable.load(path)
    assert table.column("label").loc[["lab/s.png#1", "lab/s.png#2"]].tolist() == ["a", "c"]
    (kept,) = LabelJournal(journal_path(path)).records()
    assert kept["cell_ids"] == ["lab/s.png#1", "lab/s.png#2"]
    assert "gone#0" in rejected_path(path).read_text()
    table.close()


def test_a_read_only_open_skips_bad_lines_and_changes_no_file(tmp_path):
    """mode="r" replays the valid records and leaves the journal's bytes as they are."""
    path = tmp_path / "p.h5ad"
    make_project(path)
    data = _line(_record(["lab/s.png#1"], ["a"])) + b"junk\n" + b'{"torn'
    journal_path(path).write_bytes(data)
    with pytest.warns(UserWarning, match="read-only"):
        table = CellTable.load(path, mode="r")
    assert table.column("label").loc["lab/s.png#1"] == "a"
    assert journal_path(path).read_bytes() == data
    assert not rejected_path(path).exists()


def test_a_replay_records_nothing_again(tmp_path):
    """Replaying the journal on load is not a new change: the journal does not grow on a
    writable open, and a read-only open keeps no unsaved records (their twins would
    show twice in the audit trail and be written again at the next save)."""
    path = tmp_path / "p.h5ad"
    table = make_project(path)
    table.set_labels(["lab/s.png#1", "lab/s.png#2"], "monocyte")
    table.set_labels(["lab/s.png#3"], "lymphocyte")
    table.close()
    before = journal_path(path).read_bytes()
    again = CellTable.load(path)
    assert again.column("label").loc["lab/s.png#3"] == "lymphocyte"
    assert journal_path(path).read_bytes() == before
    assert again.unsaved_records == []
    again.close()
    read_only = CellTable.load(path, mode="r")
    assert read_only.column("label").loc["lab/s.png#1"] == "monocyte"
    assert read_only.unsaved_records == []


def test_vectorised_replay_equals_applying_records_in_order(tmp_path):
    """Property: replay gives every cell the label (and origin) of the last record that
    names it, and the class list the order in which labels first appeared, exactly as
    applying the records one by one does (seeded random journals)."""
    rng = np.random.default_rng(7)
    for trial in range(5):
        path = tmp_path / f"p{trial}.h5ad"
        make_project(path, n=30)
        names = ["neutrophil", "lymphocyte", "monocyte", "blast", None]
        records = []
        for _ in range(60):
            k = int(rng.integers(1, 5))
            cells = [f"lab/s.png#{i}" for i in rng.choice(30, size=k, replace=False)]
            labels = [names[i] for i in rng.integers(0, len(names), size=k)]
            records.append(_record(cells, labels, origin=str(rng.choice(["user", "imported"]))))
        journal_path(path).write_bytes(b"".join(_line(r) for r in records))
        expected = CellTable.load(path, mode="r")  # vectorised
        slow = CellTable(expected.adata.copy())
        slow.set_labels(slow.cell_ids, None)  # start over, one record at a time
        slow.set_classes([])
        for r in records:
            slow.set_labels(r["cell_ids"], r["labels"], origin=r["origin"])
        pd.testing.assert_series_equal(
            expected.column("label").astype(object), slow.column("label").astype(object)
        )
        labelled = slow.column("label").notna()
        pd.testing.assert_series_equal(
            expected.column("label_origin").astype(object)[labelled],
            slow.column("label_origin").astype(object)[labelled],
        )
        assert expected.classes == slow.classes


# ------------------------------------------------------------------ temp files
def test_stale_temp_files_of_dead_processes_are_removed_on_open(tmp_path):
    """Opening for writing removes .<name>.*.tmp-<host>-<pid> left by dead processes
    on this host; a live process's, another host's and other files stay."""
    import socket

    from napari_hemofm.core.io import temp_path

    path = tmp_path / "p.h5ad"
    make_project(path)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host = socket.gethostname().replace("-", "_")
    dead = [
        tmp_path / f".p.h5ad.tmp-{host}-{proc.pid}",
        tmp_path / f".p.labels.jsonl.tmp-{host}-{proc.pid}",
        tmp_path / f".p.h5ad.tmp-{proc.pid}",  # the name 0.1 used
    ]
    live = temp_path(path)  # this process's
    kept = [live, tmp_path / f".p.h5ad.tmp-otherhost-{proc.pid}", tmp_path / ".q.h5ad.tmp-1"]
    for f in dead + kept:
        f.write_bytes(b"partial")
    CellTable.load(path).close()
    assert not any(f.exists() for f in dead)
    assert all(f.exists() for f in kept)


KILLED_SAVER = """
import os, signal, sys
from napari_hemofm.core.cells import CellTable
table = CellTable.load(sys.argv[1])
table.set_labels(["lab/s.png#9"], "monocyte")
os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)   # die before the rename
table.save(sys.argv[1])
"""


def test_a_save_killed_midway_leaves_the_project_and_no_temp_file(tmp_path):
    """SIGKILL between writing the temporary file and renaming it: the previous project
    opens with every acknowledged label, and the next open removes the temp file."""
    path = tmp_path / "p.h5ad"
    make_project(path)
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVER, str(path)], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(left) == 1  # the kill left it
    table = CellTable.load(path)  # also takes over the dead process's lock
    assert table.column("label").loc["lab/s.png#9"] == "monocyte"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    table.close()

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
from napari_hemofm.core.journal import LabelJournal, journal_path


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
    the user, the origin, the cells and their labels."""
    path = tmp_path / "p.h5ad"
    table = make_project(path)
    table.set_labels(["lab/s.png#1", "lab/s.png#2"], "monocyte")
    table.set_labels(["lab/s.png#2"], None)
    lines = journal_path(path).read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert set(first) == {"time", "user", "origin", "cell_ids", "labels"}
    assert first["labels"] == ["monocyte", "monocyte"]
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

"""Opening a project in napari: locate moved images once; read-only while another has it."""

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
from PIL import Image

from napari_hemofm._widgets import _project
from napari_hemofm._widgets._review import ReviewWidget
from napari_hemofm._widgets._session import get_session
from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.io import read_only_reason
from napari_hemofm.core.sources import IMAGES_ROOT_KEY, missing_sources


def crop_project(root, n=6):
    """``root/crops/<class>/<k>.png`` and a project ``root/p.h5ad`` of them, embedded."""
    rng = np.random.default_rng(3)
    rows = []
    for k in range(n):
        cls = ("neutrophil", "monocyte")[k % 2]
        (root / "crops" / cls).mkdir(parents=True, exist_ok=True)
        f = root / "crops" / cls / f"{k}.png"
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(f)
        rows.append(
            {"cell_id": f"crops/{cls}/{k}.png#0", "source": str(f), "batch": "crops"}
            | {"x": 12.0, "y": 12.0, "x0": 0, "y0": 0, "x1": 24, "y1": 24, "label": cls}
        )
    table = CellTable()
    table.add_cells(pd.DataFrame(rows), embeddings=rng.normal(size=(n, 4)))
    return table.save(root / "p.h5ad")


def test_moved_images_are_asked_for_once_and_remembered(make_napari_viewer, tmp_path, monkeypatch):
    """Opening a project whose images moved asks once for their folder; the cells' sources
    then resolve, and the folder is saved in the project so the next open does not ask."""
    path = crop_project(tmp_path / "study")
    shutil.move(str(tmp_path / "study" / "crops"), str(tmp_path / "moved"))
    asked = []

    def ask(project, missing):
        asked.append(len(missing))
        return str(tmp_path / "moved")

    monkeypatch.setattr(_project, "ask_images_root", ask)
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-hemofm")
    table = get_session(viewer).table
    assert asked == [6]
    assert missing_sources(table) == []
    assert table.meta[IMAGES_ROOT_KEY] == str(tmp_path / "moved")
    thumbs = get_session(viewer).thumbnails.load(table.cell_ids)
    assert len(thumbs) == 6
    viewer2 = make_napari_viewer()
    viewer2.open(str(path), plugin="napari-hemofm")
    assert asked == [6]  # remembered
    assert missing_sources(get_session(viewer2).table) == []


def test_a_cancelled_question_opens_the_project_anyway(make_napari_viewer, tmp_path, monkeypatch):
    """Cancelling the folder dialog opens the project with its images missing."""
    path = crop_project(tmp_path / "study")
    shutil.rmtree(tmp_path / "study" / "crops")
    monkeypatch.setattr(_project, "ask_images_root", lambda project, missing: None)
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-hemofm")
    assert get_session(viewer).table.n_cells == 6


HOLDER = """
import sys
from napari_hemofm.core.io import load_project
table = load_project(sys.argv[1])
print("open", flush=True)
sys.stdin.readline()
"""


def test_a_project_open_elsewhere_opens_read_only_with_a_banner(make_napari_viewer, tmp_path):
    """While another process holds the project, napari opens it read-only: the Review
    panel says who has it open, its class buttons are disabled, and a number key
    changes no label."""
    path = crop_project(tmp_path / "study")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        viewer = make_napari_viewer()
        viewer.open(str(path), plugin="napari-hemofm")
        session = get_session(viewer)
        table = session.table
        reason = read_only_reason(table)
        assert reason is not None
        assert f"(pid {holder.pid}) has this project open" in reason
        widget = ReviewWidget(viewer)
        assert widget.read_only_banner.text() == reason
        assert not widget.read_only_banner.isHidden()
        assert not widget._class_bar.isEnabled()
        before = table.column("label").copy()
        session.select(np.array([0, 1]))
        assert widget.relabel_key(2) == []
        pd.testing.assert_series_equal(table.column("label"), before)
        assert "read-only" in widget.status.text()
    finally:
        holder.stdin.close()
        holder.wait(30)


def test_a_writable_project_shows_no_banner(make_napari_viewer, tmp_path):
    """A project nobody else holds opens for writing: no banner, class bar enabled."""
    path = crop_project(tmp_path / "study")
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-hemofm")
    widget = ReviewWidget(viewer)
    assert read_only_reason(get_session(viewer).table) is None
    assert widget.read_only_banner.isHidden()
    assert widget._class_bar.isEnabled()

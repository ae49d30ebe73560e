"""`hemofm demo`: napari with the synthetic sample, embedded offline, and the cell map."""

import os
import subprocess
import sys

import numpy as np
import pytest
from napari.layers import Image

from napari_hemofm import cli
from napari_hemofm._widgets import _demo
from napari_hemofm._widgets._docking import hemofm_docks
from napari_hemofm._widgets._embed import EmbedWidget
from napari_hemofm._widgets._session import get_session


@pytest.mark.slow
def test_demo_builds_the_viewer_headless(qapp, tmp_path):
    """run_demo(run=False) returns after the embedding and the map are done: three sample
    images, a cells layer on each (one point per cell of the table), the Embed panel, the
    Cell map and the Review docked, every cell embedded, one cell per class labelled from
    the ground truth and every cell predicted; the screenshot is written. The docks are
    tabbed together and the image canvas keeps >= 40 % of the window's width."""
    shot = tmp_path / "demo.png"
    viewer = _demo.run_demo(run=False, screenshot=shot, close=False, timeout=300)
    try:
        images = [layer.name for layer in viewer.layers if isinstance(layer, Image)]
        assert len(images) == 3
        table = get_session(viewer).table
        assert table.n_cells > 0
        assert np.isfinite(table.embeddings).all()
        assert table.meta["model"] == "handcrafted"
        for name in images:
            points = viewer.layers[f"{name} cells"]
            assert len(points.data) == (table.obs["source"] == name).sum() > 0
        docked = list(viewer.window.dock_widgets.values())
        assert any(isinstance(w, EmbedWidget) for w in docked)
        assert any(type(w).__name__ == "CellMapWidget" for w in docked)
        assert any(type(w).__name__ == "ReviewWidget" for w in docked)
        # one cell per class got its ground-truth label; the probe predicted every cell
        labelled = table.obs["label"].dropna().astype(str)
        assert len(labelled) >= 3
        assert labelled.is_unique
        assert table.obs["prediction"].notna().all()
        assert shot.stat().st_size > 10_000
        window = viewer.window._qt_window
        docks = hemofm_docks(window)
        assert len(docks) == 3
        assert set(window.tabifiedDockWidgets(docks[0])) == set(docks[1:])
        canvas = viewer.window._qt_viewer.canvas.native
        assert canvas.width() >= 0.40 * window.width()
    finally:
        viewer.close()


def test_demo_command_exits_zero_with_the_testing_flag(qapp, capsys):
    """`hemofm demo --no-run` does the whole demo without an event loop and exits 0."""
    assert cli.main(["demo", "--no-run"]) == 0
    assert "Embedded" in capsys.readouterr().err


def test_demo_help_lists_screenshot():
    """`hemofm demo --help` documents --screenshot and exits 0."""
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["demo", "--help"])
    assert exc.value.code == 0


@pytest.mark.parametrize(
    ("env", "platform", "problem"),
    [
        ({}, "linux", True),
        ({"DISPLAY": ":0"}, "linux", False),
        ({"WAYLAND_DISPLAY": "wayland-0"}, "linux", False),
        ({"QT_QPA_PLATFORM": "offscreen"}, "linux", False),
        ({"QT_QPA_PLATFORM": "xcb"}, "linux", True),
        ({"QT_QPA_PLATFORM": "xcb", "WAYLAND_DISPLAY": "w"}, "linux", True),
        ({}, "darwin", False),
        ({}, "win32", False),
    ],
)
def test_display_problem(env, platform, problem):
    """No DISPLAY / WAYLAND_DISPLAY on Linux (and no display-less Qt platform) is a
    problem; macOS and Windows always have a display."""
    assert bool(_demo.display_problem(env, platform)) is problem


def test_demo_without_a_display_says_how_in_one_line():
    """`hemofm demo` with no display exits 1 with one line naming xvfb-run and
    --screenshot, without a traceback or a Qt abort (checked before Qt is imported)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.pop("QT_QPA_PLATFORM", None)
    code = "import sys; from napari_hemofm import cli; sys.exit(cli.main(['demo']))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "xvfb-run" in lines[0]
    assert "--screenshot" in lines[0]


def test_closing_a_viewer_with_every_widget_open(make_napari_viewer, qtbot):
    """A viewer with all HemoFM docks open (and cells with a selection) closes cleanly:
    no exception, and events after the close reach no deleted widget."""
    from napari_hemofm._widgets._workers import wait_for_workers
    from tests.widgets.test_map import IMAGE_SHAPE, make_table

    viewer = make_napari_viewer(show=True)
    session = get_session(viewer)
    rng = np.random.default_rng(1)
    for name in ("smear_a", "smear_b"):
        session.add_image(name, rng.integers(0, 255, (*IMAGE_SHAPE, 3), dtype=np.uint8))
    session.set_table(make_table(120))
    names = ["Embed cells", "Cell map", "Review", "Batch view", "Cell viewer"]
    for name in names:
        viewer.window.add_plugin_dock_widget("napari-hemofm", name)
    qtbot.wait(200)
    session.select([0, 1, 2], origin="layer")
    qtbot.wait(200)
    viewer.close()
    assert wait_for_workers(20_000)
    qtbot.wait(100)
    session.select([3], origin="layer")
    session.table.set_column("confidence", np.linspace(0, 1, 120))

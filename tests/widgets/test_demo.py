"""`hemofm demo`: napari with the synthetic sample, embedded offline, and the cell map."""

import numpy as np
import pytest
from napari.layers import Image

from napari_hemofm import cli
from napari_hemofm._widgets._embed import EmbedWidget
from napari_hemofm._widgets._session import get_session


@pytest.mark.slow
def test_demo_builds_the_viewer_headless(qapp, tmp_path):
    """run_demo(run=False) returns after the embedding and the map are done: three sample
    images, a cells layer on each (one point per cell of the table), the Embed panel, the
    Cell map and the Review docked, every cell embedded, one cell per class labelled from
    the ground truth and every cell predicted; the screenshot is written."""
    shot = tmp_path / "demo.png"
    viewer = cli.run_demo(run=False, screenshot=shot, close=False, timeout=300)
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

"""Screenshots for docs/batch-view.md on real data: two labs (PBC and BCCD crops).

Run from the repository root (the project stores crop paths relative to it):

    xvfb-run -a -s "-screen 0 1600x1050x24" python docs/scripts/shots_batch.py docs/images \
        [--project twolab.h5ad]

Without ``--project`` the project is built first, as the CLI does:
``hemofm embed ../shared/data/pbc_dev ../shared/data/bccd_crops --model handcrafted``
(a minute or two). The UMAP is computed when the project has none (~30 s). Reads
../shared/data (not shipped); writes ``batchview_*.png`` into the output folder.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from napari_hemofm._widgets._batch import BatchViewWidget
from napari_hemofm._widgets._session import get_session
from napari_hemofm._widgets._workers import wait_for_workers
from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.reduce import umap_for_table

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"


def wait(app, cond, timeout=300.0):
    """Process events until ``cond()`` or ``timeout`` seconds."""
    t0 = time.time()
    while not cond() and time.time() - t0 < timeout:
        app.processEvents()
        time.sleep(0.02)
    app.processEvents()


def pause(app, seconds):
    """Process events for ``seconds``."""
    wait(app, lambda: False, seconds)


def project_with_umap(path: str | None) -> str:
    """Path of the two-lab project with a UMAP.

    ``path`` (copied when the UMAP is added), or built with ``hemofm embed`` into a temp
    folder.
    """
    tmp = Path(tempfile.mkdtemp())
    if path is None:
        from napari_hemofm.cli import main as hemofm

        path = str(tmp / "twolab.h5ad")
        pbc, bccd = (os.path.relpath(DATA / name, REPO) for name in ("pbc_dev", "bccd_crops"))
        code = hemofm(["embed", pbc, bccd, "--model", "handcrafted", "--out", path])
        if code:
            raise SystemExit(f"hemofm embed failed ({code})")
    table = CellTable.load(path)
    if "X_umap" not in table.adata.obsm:
        umap_for_table(table)
        path = str(table.save(tmp / "twolab_umap.h5ad"))
    return path


def main() -> None:
    """Open the project, drive the Batch view and save the screenshots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="docs/images")
    parser.add_argument("--project", default=None, help="a ready two-lab project (.h5ad)")
    args = parser.parse_args()
    os.chdir(REPO)  # crop sources are relative to the repository root
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = project_with_umap(args.project)

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1600, 1040)
    app = QApplication.instance()
    session = get_session(viewer)
    viewer.open(path, plugin="napari-hemofm")  # crop montage, cells layer, session table
    table = session.table
    widget = BatchViewWidget(viewer)
    dock = viewer.window.add_dock_widget(widget, name="Batch view", area="right")
    dock.setMinimumWidth(980)
    pause(app, 1.0)
    wait(app, lambda: not widget.busy)

    # 1. metrics of the embeddings as they are
    widget.compute_metrics()
    wait(app, lambda: widget.report is not None and not widget.busy)
    pause(app, 0.5)
    widget.grab().save(str(out / "batchview_metrics.png"))

    # 2. per-cell mixing on the left map
    widget.left.set_color_by("ilisi")
    pause(app, 0.5)
    widget.grab().save(str(out / "batchview_mixing.png"))
    widget.left.set_color_by("batch")

    # 3. select the BCCD neutrophils on the batch map; the grid puts them first
    obs = table.obs
    rows = np.flatnonzero(
        (obs["batch"].astype(str) == "bccd_crops").to_numpy()
        & (obs["label"].astype(object) == "neutrophil").to_numpy()
    )
    xy = widget.positions()[rows]
    lo, hi = np.percentile(xy, 10, axis=0), np.percentile(xy, 90, axis=0)
    picked = widget.left.canvas.rows_in_rect(lo[0], lo[1], hi[0], hi[1])
    widget.left.canvas.selection_requested.emit(picked, "replace")
    widget.tabs.setCurrentIndex(1)
    pause(app, 0.5)
    wait(app, lambda: not widget.busy)
    pause(app, 0.5)
    widget.grab().save(str(out / "batchview_grid.png"))
    viewer.screenshot(str(out / "batchview_window.png"), canvas_only=False)

    # 4. stain and size per batch
    session.clear_selection()
    widget.tabs.setCurrentIndex(2)  # starts the measurement
    wait(app, lambda: widget.appearance is not None and not widget.busy, 600)
    pause(app, 0.5)
    widget.grab().save(str(out / "batchview_stain.png"))

    # 5. correction preview: ComBat, before -> after
    widget.tabs.setCurrentIndex(0)
    widget.set_correction("combat")
    wait(app, lambda: widget.preview("combat") is not None and not widget.busy, 600)
    pause(app, 0.5)
    widget.grab().save(str(out / "batchview_combat.png"))
    widget.left.set_color_by("ilisi")  # mixing after the correction
    pause(app, 0.5)
    widget.grab().save(str(out / "batchview_combat_mixing.png"))

    report = widget.report
    after = widget.preview("combat").report
    layers = [layer for layer in viewer.layers if layer.name.endswith(" cells")]
    print(
        f"{table.n_cells} cells; ilisi {report['metrics']['ilisi']:.3f} -> "
        f"{after['metrics']['ilisi']:.3f}; appearance of {len(widget.appearance)} cells; "
        f"cells layer features: {[list(layer.features.columns) for layer in layers]}"
    )
    wait_for_workers()
    viewer.close()


if __name__ == "__main__":
    main()

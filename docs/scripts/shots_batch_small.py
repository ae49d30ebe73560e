"""Screenshot for docs/batch-view.md: the Batch view with small batches beside a big one.

Run from the repository root:

    xvfb-run -a -s "-screen 0 1280x800x24" python docs/scripts/shots_batch_small.py docs/images

Builds a three-lab project from ../shared/data (not shipped) with ``hemofm embed
--model handcrafted``: 40 PBC crops of each of five cell types (lab ``pbc``), 16 BCCD
crops (``bccd16``) and 3 BCCD crops (``bccd3``), each lab a folder of class folders
(symbolic links in a temporary folder). Computes the metrics (no UMAP: the view's PCA
layout) and writes ``batchview_small.png`` (metrics) and ``batchview_small_grid.png``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
TYPES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")


def wait(app, cond, timeout=600.0):
    """Process events until ``cond()`` or ``timeout`` seconds."""
    t0 = time.time()
    while not cond() and time.time() - t0 < timeout:
        app.processEvents()
        time.sleep(0.02)
    app.processEvents()


def link_crops(root: Path, lab: str, source: Path, per_type: dict[str, int]) -> Path:
    """``root/lab/<type>/`` holding links to the first crops of each type."""
    for cell_type, n in per_type.items():
        folder = root / lab / cell_type
        folder.mkdir(parents=True, exist_ok=True)
        files = sorted(p for p in (source / cell_type).iterdir() if p.is_file())[:n]
        for f in files:
            (folder / f.name).symlink_to(f)
    return root / lab


def main() -> None:
    """Build the project, open the Batch view, compute the metrics, save the shot."""
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_hemofm._widgets._batch import BatchViewWidget
    from napari_hemofm._widgets._session import get_session

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="docs/images")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    labs = [
        link_crops(tmp, "pbc", DATA / "pbc_dev", dict.fromkeys(TYPES, 40)),
        link_crops(tmp, "bccd16", DATA / "bccd_crops", {"neutrophil": 8, "lymphocyte": 8}),
        link_crops(tmp, "bccd3", DATA / "bccd_crops", {"neutrophil": 2, "monocyte": 1}),
    ]
    from napari_hemofm.cli import main as hemofm

    project = tmp / "small.h5ad"
    os.chdir(tmp)
    code = hemofm(["embed", *map(str, labs), "--model", "handcrafted", "--out", str(project)])
    if code:
        raise SystemExit(f"hemofm embed failed ({code})")

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1280, 800)
    app = QApplication.instance()
    get_session(viewer)
    viewer.open(str(project), plugin="napari-hemofm")
    widget = BatchViewWidget(viewer)
    dock = viewer.window.add_dock_widget(widget, name="Batch view", area="right")
    dock.setMinimumWidth(900)
    wait(app, lambda: not widget.busy)
    widget.compute_metrics()
    wait(app, lambda: widget.report is not None and not widget.busy)
    wait(app, lambda: False, 1.0)
    print(widget.metrics_status.text())
    widget.tabs.setCurrentIndex(1)  # the grid: the 3-cell lab's row beside the others
    wait(app, lambda: not widget.busy)
    wait(app, lambda: False, 1.0)
    widget.grab().save(str(out / "batchview_small_grid.png"))
    widget.tabs.setCurrentIndex(0)
    wait(app, lambda: False, 0.5)
    widget.grab().save(str(out / "batchview_small.png"))
    viewer.close()


if __name__ == "__main__":
    main()

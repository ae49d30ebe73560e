"""Screenshots of the Review widget for docs/review.md, on real crops from two labs.

Run under a virtual display (images land in docs/images/review_*.png):

    xvfb-run -a -s "-screen 0 1600x1050x24" python docs/scripts/shots_review.py \
        [--project PATH] [--out DIR]

Reads ../shared/data/pbc_dev (800 crops, 8 classes) and ../shared/data/bccd_crops (283
crops of another lab); not shipped. Without ``--project`` it first embeds them with the
offline ``handcrafted`` backend (``hemofm embed``, about a minute); ``--project`` reuses
such a project (it is only read: the script works on a copy in a temporary folder).

The review starts the way a new project does: only 12 cells per class of pbc_dev keep
their curated label, three of them deliberately wrong (neutrophils labelled Monocyte,
so that "Suspect labels" has something to find); everything else is predicted by the
probe.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
INPUTS = (DATA / "pbc_dev", DATA / "bccd_crops")
NAMES = {
    "neutrophil": "Neutrophil",
    "lymphocyte": "Lymphocyte",
    "monocyte": "Monocyte",
    "eosinophil": "Eosinophil",
    "basophil": "Basophil",
    "ig": "Immature granulocyte",
    "erythroblast": "Erythroblast",
    "platelet": "Platelet",
}
KEEP_PER_CLASS = 12
N_WRONG = 3


def wait(condition, timeout=300.0):
    """Process Qt events until ``condition()`` holds."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("timed out")
        app.processEvents()
        time.sleep(0.02)
    app.processEvents()


def pause(seconds):
    """Process Qt events for ``seconds``."""
    end = time.monotonic() + seconds
    wait(lambda: time.monotonic() > end)


def build_project(workdir: Path, project: Path | None) -> Path:
    """A review-ready copy of the two-lab project: few labels, nice class names."""
    import anndata as ad

    from napari_hemofm.cli import main as hemofm
    from napari_hemofm.core.cells import CellTable

    if project is None:
        project = workdir / "embedded.h5ad"
        out = str(project)
        code = hemofm(["embed", *map(str, INPUTS), "--model", "handcrafted", "--out", out])
        if code != 0:
            raise SystemExit(f"hemofm embed failed ({code})")
    adata = ad.read_h5ad(project)  # read only: no journal is attached or written
    obs = adata.obs
    label = obs["label"].astype(object).map(lambda v: NAMES.get(v, v))
    rng = np.random.default_rng(0)
    keep = np.zeros(len(obs), bool)
    pbc = (obs["batch"].astype(str) == "pbc_dev").to_numpy()
    for name in NAMES.values():
        rows = np.flatnonzero(pbc & (label == name).to_numpy())
        keep[rng.choice(rows, min(KEEP_PER_CLASS, len(rows)), replace=False)] = True
    label = label.where(keep, None)
    wrong = np.flatnonzero(keep & (label == "Neutrophil").to_numpy())[:N_WRONG]
    label.iloc[wrong] = "Monocyte"
    obs["label"] = label.astype("category")
    obs["label_origin"] = np.where(keep, "imported", None)
    obs["label_origin"] = obs["label_origin"].astype("category")
    obs["prediction"] = np.nan
    obs["confidence"] = np.nan
    adata.uns["hemofm"] = dict(adata.uns["hemofm"], classes=list(NAMES.values()))
    for key in ("X_umap",):
        adata.obsm.pop(key, None)
    table = CellTable(adata)
    out = workdir / "review_demo.h5ad"
    table.save(out)
    return out


def main() -> None:
    """Build the project, open it in napari with the Review widget, take the shots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import napari
    from qtpy.QtCore import Qt

    from napari_hemofm._widgets._review import ReviewWidget
    from napari_hemofm._widgets._review_state import get_retrainer
    from napari_hemofm._widgets._session import get_session
    from napari_hemofm._widgets._workers import wait_for_workers

    with tempfile.TemporaryDirectory() as tmp:
        path = build_project(Path(tmp), args.project)
        viewer = napari.Viewer(show=True)
        viewer.window.resize(1600, 1020)
        viewer.open(str(path), plugin="napari-hemofm")
        session = get_session(viewer)
        widget = ReviewWidget(viewer)
        dock = viewer.window.add_dock_widget(widget, name="Review", area="right")
        viewer.window._qt_window.resizeDocks([dock], [760], Qt.Orientation.Horizontal)
        retrainer = get_retrainer(viewer)
        pause(1)
        wait(lambda: not retrainer.busy, 300)
        wait(lambda: "bal. acc" in widget.metrics_label.text() or not retrainer.busy, 120)
        widget.splitter.setSizes([560, 400])
        widget.set_group("batch", "pbc_dev")
        pause(0.5)
        wait(lambda: not widget.busy, 120)
        pause(0.5)

        # 1. the whole window: montage of crops on the left, Review on the right
        viewer.screenshot(str(args.out / "review_window.png"), canvas_only=False)

        # 2. the gallery with a few predicted lymphocytes selected
        g = widget.gallery
        rows = g.section_rows("Lymphocyte")
        labelled = widget.table.obs["label"].notna().to_numpy()
        predicted = [int(r) for r in rows if not labelled[r]][:3]
        session.select(predicted, origin="map")
        pause(0.3)
        wait(lambda: not widget.busy, 60)
        pause(0.3)
        widget.grab().save(str(args.out / "review_gallery.png"))

        # 3. "Label next": a queue at the top, selected
        widget.show_queue("next")
        wait(lambda: widget._queue_worker is None and "Queue" in g.section_names(), 120)
        wait(lambda: not widget.busy, 60)
        pause(0.5)
        g.grab().save(str(args.out / "review_queue.png"))

        # 4. "Suspect labels": the planted mistakes
        widget.show_queue("suspects")
        wait(lambda: widget._queue_worker is None, 120)
        wait(lambda: not widget.busy, 60)
        pause(0.5)
        g.grab().save(str(args.out / "review_suspects.png"))
        found = set(g.section_rows("Queue").tolist())
        g.clear_queue()

        # 5. zoomed in: 200 px thumbnails cut at high resolution
        session.select([int(g.section_rows("Monocyte")[0])], origin="map")
        widget.set_zoom(200)
        pause(0.5)
        wait(lambda: not widget.busy, 60)
        pause(0.5)
        g.grab().save(str(args.out / "review_zoom.png"))
        widget.set_zoom(112)

        # 6. a differential: Unidentified cells block the sign-off
        widget.set_group("batch", "pbc_dev")
        pause(0.3)
        widget.splitter.widget(1).grab().save(str(args.out / "review_counts.png"))
        n_unidentified = len(g.section_rows("Unidentified"))
        print(
            f"{widget.table.n_cells} cells, {int(labelled.sum())} labelled, "
            f"{n_unidentified} unidentified at 0.50, suspects found {len(found)}; "
            f"metrics: {widget.metrics_label.text()}"
        )
        wait_for_workers()
        viewer.close()


if __name__ == "__main__":
    main()

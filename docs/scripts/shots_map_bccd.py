"""Screenshots for docs/map.md on real smears: BCCD fields -> WBCs -> embeddings -> Cell map.

Run: xvfb-run -a -s "-screen 0 1600x1050x24" python docs/scripts/shots_map_bccd.py OUT_DIR
Reads ../shared/data/bccd (not shipped). Labels are the BCCD image-level WBC types of
`wbc_boxes.csv` (images with one unambiguous WBC), put on the detection inside each box.
"""

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from qtpy.QtCore import QPoint, Qt
from qtpy.QtTest import QTest
from qtpy.QtWidgets import QApplication

import napari
from napari_hemofm._widgets._layers import get_layer_sync
from napari_hemofm._widgets._map import CellMapWidget
from napari_hemofm._widgets._session import get_session
from napari_hemofm._widgets._workers import wait_for_workers
from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.embed import embed_cells
from napari_hemofm.core.inputs import cells_from_image
from napari_hemofm.core.io import read_image
from napari_hemofm.core.models import load_backbone

BCCD = Path(__file__).resolve().parents[3] / "shared" / "data" / "bccd"
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
N_IMAGES = 120


def wait(app, cond, timeout=180):
    t0 = time.time()
    while not cond() and time.time() - t0 < timeout:
        app.processEvents()
        time.sleep(0.02)
    app.processEvents()


def main():
    boxes = pd.read_csv(BCCD / "wbc_boxes.csv")
    boxes = boxes[boxes["unambiguous"] == "yes"]
    names = sorted(boxes["image"].unique())[:N_IMAGES]
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1600, 1000)
    app = QApplication.instance()
    session = get_session(viewer)
    table = CellTable()
    for name in names:
        image = read_image(BCCD / "JPEGImages" / name)
        layer = Path(name).stem
        viewer.add_image(image, name=layer, rgb=True)
        session.add_image(layer, image)
        cells = cells_from_image(image, name=layer, batch="bccd")
        labels = []
        for _, c in cells.iterrows():
            inside = boxes[(boxes["image"] == name) & (boxes.xmin <= c.x) & (c.x <= boxes.xmax)
                           & (boxes.ymin <= c.y) & (c.y <= boxes.ymax)]
            labels.append(inside["wbc_class_if_unambiguous"].iloc[0] if len(inside) else None)
        cells["label"] = labels
        table.add_cells(cells)
    result = embed_cells(table, load_backbone("handcrafted"), images=session.images)
    table.set_embeddings(result.embeddings, **result.meta)
    session.set_table(table)
    get_layer_sync(viewer)
    widget = CellMapWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Cell map", area="right")
    widget.setMinimumWidth(560)
    wait(app, lambda: False, 1)
    wait(app, lambda: not widget.is_computing)
    widget.set_color_by("label")
    wait(app, lambda: False, 0.5)

    # lasso around the densest part of the neutrophils
    canvas = widget.canvas
    xy = canvas.positions
    lab = table.obs["label"].astype(object).to_numpy()
    target = np.flatnonzero(lab == "neutrophil")
    c = np.median(xy[target], axis=0)
    r = np.percentile(np.hypot(*(xy[target] - c).T), 50)
    t = np.linspace(0, 2 * np.pi, 40)
    poly = c + r * np.c_[np.cos(t) * (1 + 0.15 * np.sin(2 * t)), np.sin(t)]
    widget.set_tool("lasso")
    px, py = canvas.data_to_pixel(poly[:, 0], poly[:, 1])
    pts = [QPoint(round(a), round(b)) for a, b in zip(px, py, strict=True)]
    QTest.mousePress(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, pts[0])
    for p in pts[1:]:
        QTest.mouseMove(canvas, p)
    app.processEvents()
    widget.grab().save(str(OUT / "map_lasso.png"))
    QTest.mouseRelease(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, pts[-1])
    wait(app, lambda: not widget.busy, 30)
    wait(app, lambda: False, 1)
    row = int(session.selected[len(session.selected) // 2])
    widget.hover_at(*map(float, xy[row]))
    wait(app, lambda: widget.preview_thumbnail_id == widget.preview_cell_id, 30)
    wait(app, lambda: False, 0.5)
    widget.grab().save(str(OUT / "map_selection.png"))
    viewer.screenshot(str(OUT / "map_window.png"), canvas_only=False)
    widget.set_color_by("score")
    session.clear_selection()
    wait(app, lambda: False, 0.5)
    widget.grab().save(str(OUT / "map_numeric.png"))
    print(f"{table.n_cells} cells, {int(table.obs['label'].notna().sum())} labelled, "
          f"{len(session.selected)} selected")
    wait_for_workers()
    viewer.close()


if __name__ == "__main__":
    main()

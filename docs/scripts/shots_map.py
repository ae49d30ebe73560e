"""Screenshots for docs/map.md: synthetic smears -> cells -> embeddings -> Cell map."""
import sys, time, warnings
warnings.filterwarnings("ignore", message=".*PyQt5 backend is deprecated.*")
warnings.filterwarnings("ignore", message=".*System theme detection.*")
import numpy as np, pandas as pd
import napari
import napari._qt.qt_main_window as _qmw
_qmw.SHOW_QT_WARNING = False  # keep the deprecation toast out of the screenshot
from qtpy.QtCore import QPoint, Qt
from qtpy.QtWidgets import QApplication
from qtpy.QtTest import QTest
from napari_hemofm._widgets._session import get_session
from napari_hemofm._widgets._map import CellMapWidget
from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.detect import crop_cell
from napari_hemofm.core.inputs import cells_from_image
from napari_hemofm.core.models import load_backbone
from napari_hemofm.core.synthetic import make_sample

OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/mapw/shots"
app = QApplication.instance() or QApplication([])

def wait(cond, timeout=120):
    t0 = time.time()
    while not cond() and time.time() - t0 < timeout:
        app.processEvents(); time.sleep(0.02)
    app.processEvents()

viewer = napari.Viewer(show=True)
viewer.window._qt_window.resize(1400, 900)
session = get_session(viewer)
table = CellTable()
crops = []
rng = np.random.default_rng(0)
for k, smear in enumerate(make_sample(0, n_per_batch=4, n_wbc=24)):
    name = f"{smear.batch}_{k}"
    viewer.add_image(smear.image, name=name, rgb=True, metadata={"batch": smear.batch})
    session.add_image(name, smear.image)
    cells = cells_from_image(smear.image, name=name, batch=smear.batch)
    gt = smear.cells
    d = np.hypot(cells["x"].to_numpy()[:, None] - gt["x"].to_numpy()[None], cells["y"].to_numpy()[:, None] - gt["y"].to_numpy()[None])
    labels = gt["label"].to_numpy(dtype=object)[d.argmin(1)]
    labels[rng.random(len(labels)) < 0.3] = None  # not yet reviewed
    cells["label"] = labels
    crops += [crop_cell(smear.image, tuple(int(v) for v in r)) for r in cells[["x0", "y0", "x1", "y1"]].values]
    table.add_cells(cells)
print("cells", table.n_cells, flush=True)
emb = load_backbone("handcrafted").embed_crops(crops)
table.set_embeddings(emb, model="handcrafted")
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
Z = StandardScaler().fit_transform(emb)
lab_all = table.obs["label"].astype(object)
known = lab_all.notna().to_numpy()
knn = KNeighborsClassifier(10).fit(Z[known], lab_all[known].astype(str))
proba = knn.predict_proba(Z)
table.set_column("prediction", knn.classes_[proba.argmax(1)].astype(object))
table.set_column("confidence", proba.max(1))
session.set_table(table)
try:
    from napari_hemofm._widgets._layers import get_layer_sync
    get_layer_sync(viewer)
except Exception as exc:
    print("no layer sync:", exc)
widget = CellMapWidget(viewer)
viewer.window.add_dock_widget(widget, name="Cell map", area="right")
dock = widget.parentWidget()
widget.setMinimumWidth(520)
wait(lambda: False, 1)
wait(lambda: not widget.is_computing, 180)
print("map ready", widget.status.text(), flush=True)
widget.set_color_by("label")
wait(lambda: False, 0.5)

# 1. the lasso being drawn around one cluster
canvas = widget.canvas
xy = canvas.positions
lab = table.obs["label"].astype(object).to_numpy()
target = np.flatnonzero(lab == "lymphocyte")
c = np.median(xy[target], axis=0)
r = np.percentile(np.hypot(*(xy[target] - c).T), 80) * 1.3
t = np.linspace(0, 2 * np.pi, 40)
poly = c + r * np.c_[np.cos(t) * (1 + 0.15 * np.sin(2 * t)), np.sin(t)]
widget.set_tool("lasso")
px, py = canvas.data_to_pixel(poly[:, 0], poly[:, 1])
pts = [QPoint(round(a), round(b)) for a, b in zip(px, py)]
QTest.mousePress(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, pts[0])
for p in pts[1:]:
    QTest.mouseMove(canvas, p)
app.processEvents()
widget.grab().save(f"{OUT}/map_lasso.png")
QTest.mouseRelease(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, pts[-1])
print("selected", len(session.selected), flush=True)
wait(lambda: not widget.busy, 20)
wait(lambda: False, 1)

# 2. hover a point of the selection
row = int(session.selected[len(session.selected) // 2])
widget.hover_at(*map(float, xy[row]))
wait(lambda: widget.preview_thumbnail_id == widget.preview_cell_id, 20)
wait(lambda: not widget.busy, 20)
wait(lambda: False, 0.5)
widget.grab().save(f"{OUT}/map_selection.png")
viewer.screenshot(f"{OUT}/map_window_raw.png", canvas_only=False)

# 3. colour by confidence-like column: prediction absent, so batch and a numeric column
widget.set_color_by("batch")
session.clear_selection()
wait(lambda: False, 0.5)
widget.grab().save(f"{OUT}/map_batch.png")
widget.set_color_by("score" if "score" in table.obs.columns else "confidence")
wait(lambda: False, 0.5)
widget.grab().save(f"{OUT}/map_numeric.png")
print("numeric by", widget.color_by)
from napari_hemofm._widgets._workers import wait_for_workers
wait_for_workers()
viewer.close()

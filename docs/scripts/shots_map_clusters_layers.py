"""Screenshot for docs/map.md: the Cell map and the cells layers coloured by cluster.

Run: xvfb-run -a -s "-screen 0 1280x800x24" python docs/scripts/shots_map_clusters_layers.py OUT_DIR
Synthetic smears (``core.synthetic.make_sample``: three labs), their white cells detected
and embedded with the offline ``handcrafted`` model, k-means into 4 clusters on the map,
"image points too" ticked; one smear shown beside the map in a 1280x800 window.
"""

import sys
import time
from pathlib import Path

from qtpy.QtWidgets import QApplication

import napari
from napari_hemofm._widgets._layers import get_layer_sync
from napari_hemofm._widgets._session import get_session
from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.detect import crop_cell
from napari_hemofm.core.inputs import cells_from_image
from napari_hemofm.core.models import load_backbone
from napari_hemofm.core.synthetic import make_sample

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else ".")


def wait(app, cond, timeout=300):
    t0 = time.time()
    while not cond() and time.time() - t0 < timeout:
        app.processEvents()
        time.sleep(0.02)
    app.processEvents()


def main():
    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 800)
    session = get_session(viewer)
    get_layer_sync(viewer)
    table = CellTable()
    crops = []
    for i, smear in enumerate(make_sample(0, n_per_batch=1, shape=(640, 800), n_wbc=30)):
        name = f"{smear.batch}_{i}"
        layer = viewer.add_image(smear.image, name=name, rgb=True)
        layer.metadata["hemofm_source"] = name
        session.add_image(name, smear.image)
        cells = cells_from_image(smear.image, name=name)
        cells["batch"] = smear.batch
        crops += [crop_cell(smear.image, tuple(r)) for r in cells[["x0", "y0", "x1", "y1"]].values]
        table.add_cells(cells)
    table.set_embeddings(load_backbone("handcrafted").embed_crops(crops), model="handcrafted")
    session.set_table(table)
    _, cell_map = viewer.window.add_plugin_dock_widget("napari-hemofm", "Cell map")
    wait(app, lambda: not cell_map.is_computing)
    cell_map.cluster("kmeans", n_clusters=4)
    wait(app, lambda: cell_map._cluster_worker is None)
    cell_map.set_layers_colored(True)
    for layer in list(viewer.layers)[2:]:
        if layer.metadata.get("hemofm_source"):
            layer.visible = False  # one smear shown: hiding an image hides its cells
    viewer.layers.selection.active = viewer.layers[f"{viewer.layers[0].name} cells"]
    viewer.reset_view()
    wait(app, lambda: False, 1.5)
    print(f"{table.n_cells} cells, clusters:", table.obs["cluster"].value_counts().to_dict())
    viewer.screenshot(str(OUT / "map_clusters_layers.png"), canvas_only=False)
    viewer.close()


if __name__ == "__main__":
    main()

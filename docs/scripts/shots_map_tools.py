"""Screenshots for docs/map.md (plot choice, clusters, density, cell viewer, layout).

Run: xvfb-run -a -s "-screen 0 1280x800x24" python docs/scripts/shots_map_tools.py OUT_DIR
Reads the 800 PBC crops of ../shared/data/pbc_dev (not shipped), embeds them with the
offline ``handcrafted`` model, measures their stain and size statistics, and opens every
HemoFM dock in a 1280x800 window.
"""

import sys
import time
from pathlib import Path

import numpy as np
from qtpy.QtWidgets import QApplication

import napari
from napari_hemofm._widgets._docking import hemofm_docks
from napari_hemofm._widgets._session import get_session
from napari_hemofm._widgets._workers import wait_for_workers
from napari_hemofm.core.appearance import table_appearance
from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.embed import embed_cells
from napari_hemofm.core.inputs import collect_cells
from napari_hemofm.core.models import load_backbone

PBC = Path(__file__).resolve().parents[3] / "shared" / "data" / "pbc_dev"
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else ".")


def wait(app, cond, timeout=300):
    t0 = time.time()
    while not cond() and time.time() - t0 < timeout:
        app.processEvents()
        time.sleep(0.02)
    app.processEvents()


def dock_of(widget):
    return widget.parentWidget()


def main():
    app = QApplication.instance() or QApplication([])
    collected = collect_cells([PBC], batch="pbc")
    table = CellTable()
    table.add_cells(collected.cells)
    result = embed_cells(table, load_backbone("handcrafted"))
    table.set_embeddings(result.embeddings, **result.meta)
    stats = table_appearance(table)
    for name in ("cell_hue_deg", "nucleus_fraction", "cell_area_px"):
        if name in stats.columns:
            table.set_column(name, stats[name].to_numpy())

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 800)
    session = get_session(viewer)
    session.set_table(table)
    widgets = {}
    for name in ("Embed cells", "Review", "Batch view", "Cell viewer", "Cell map"):
        _, widgets[name] = viewer.window.add_plugin_dock_widget("napari-hemofm", name)
        wait(app, lambda: False, 0.3)
    cell_map = widgets["Cell map"]
    wait(app, lambda: not cell_map.is_computing)
    cell_map.set_color_by("label")
    wait(app, lambda: False, 1)
    viewer.screenshot(str(OUT / "layout_1280x800.png"), canvas_only=False)

    cell_map.cluster("kmeans", n_clusters=8)
    wait(app, lambda: cell_map._cluster_worker is None)
    wait(app, lambda: False, 0.5)
    cell_map.tabs.setCurrentIndex(2)  # the Clusters form
    wait(app, lambda: False, 0.5)
    cell_map.grab().save(str(OUT / "map_clusters.png"))

    cell_map.tabs.setCurrentIndex(0)
    columns = cell_map.axis_columns()
    x, y = ("cell_area_px", "nucleus_fraction")
    assert {x, y} <= set(columns), columns
    cell_map.set_plot("columns", x, y)
    cell_map.set_color_by("label")
    wait(app, lambda: False, 0.5)
    cell_map.grab().save(str(OUT / "map_columns.png"))

    cell_map.set_plot("umap")
    cell_map.set_density(True)
    wait(app, lambda: False, 0.5)
    cell_map.grab().save(str(OUT / "map_density.png"))
    cell_map.set_density(False)

    row = int(np.flatnonzero(table.obs["label"].astype(str) == "monocyte")[0])
    viewer_widget = widgets["Cell viewer"]
    dock_of(viewer_widget).raise_()
    session.select([row], origin="map")
    wait(app, lambda: not viewer_widget.busy and viewer_widget.field is not None, 60)
    wait(app, lambda: False, 1)
    viewer_widget.grab().save(str(OUT / "cellviewer.png"))
    window = viewer.window._qt_window
    canvas = viewer.window._qt_viewer.canvas.native
    print(
        f"{table.n_cells} cells; window {window.width()}x{window.height()}, canvas "
        f"{canvas.width()}x{canvas.height()} ({canvas.width() / window.width():.0%} x "
        f"{canvas.height() / window.height():.0%}); {len(hemofm_docks(window))} docks tabbed"
    )
    wait_for_workers()
    viewer.close()


if __name__ == "__main__":
    main()

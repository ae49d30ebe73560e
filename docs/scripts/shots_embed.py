"""Screenshots of the Embed cells panel for docs/embed-panel.md, on two BCCD smears.

Run under a virtual display (images land in docs/images/embed_*.png):

    xvfb-run -a -s "-screen 0 1920x1080x24" python docs/scripts/shots_embed.py

Reads ../shared/data/bccd/JPEGImages (BCCD, MIT licence); uses the offline
``handcrafted`` backend, so nothing is downloaded.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BCCD = ROOT.parent / "shared" / "data" / "bccd" / "JPEGImages"
OUT = ROOT / "docs" / "images"
SMEARS = (
    "BloodImage_00023.jpg",
    "BloodImage_00030.jpg",
    "BloodImage_00034.jpg",
    "BloodImage_00040.jpg",
    "BloodImage_00193.jpg",
    "BloodImage_00313.jpg",
)


def wait(condition, timeout=300.0):
    """Process Qt events until ``condition()`` holds."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("timed out")
        QApplication.processEvents()
        time.sleep(0.02)


def settle(seconds=0.5):
    """Process Qt events for a while (let the canvas draw)."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def close_toasts(viewer) -> None:
    """Close napari's notification pop-ups (docs script: private Qt access is fine)."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    settle(0.3)


def save_png(image: np.ndarray | None, path: Path, widget=None) -> None:
    """Save a screenshot as an 8-bit palette PNG (small files, UI colours survive)."""
    from PIL import Image

    if widget is not None:
        tmp = Path(tempfile.mkdtemp()) / "grab.png"
        widget.grab().save(str(tmp))
        img = Image.open(tmp).convert("RGB")
    else:
        img = Image.fromarray(np.asarray(image)[..., :3])
    img = img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    img.save(path, optimize=True)
    size = path.stat().st_size // 1024
    print(f"{path.relative_to(ROOT)}: {img.size[0]}x{img.size[1]}, {size} kB")


def main() -> int:
    """Take the four screenshots."""
    import warnings

    # keep napari's "PyQt5 is deprecated" toast out of the pictures
    warnings.filterwarnings("ignore", message="napari support for the PyQt5")
    import napari

    from napari_hemofm._widgets._session import get_session

    if not BCCD.is_dir():
        print(f"BCCD not found at {BCCD}", file=sys.stderr)
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(title="napari-hemofm")
    viewer.window._qt_window.resize(1700, 980)  # docs script only: a roomy window
    for name in SMEARS:
        viewer.open(str(BCCD / name))
    _, panel = viewer.window.add_plugin_dock_widget("napari-hemofm", "Embed cells")
    _, cell_map = viewer.window.add_plugin_dock_widget("napari-hemofm", "Cell map")
    settle()

    # 1. the panel as it opens
    save_png(None, OUT / "embed_panel.png", widget=panel)

    # 2. a DinoBloom model without weights: what the panel says
    panel.model_combo.setCurrentText("dinobloom-s")
    settle(0.2)
    save_png(None, OUT / "embed_weights_missing.png", widget=panel)
    panel.model_combo.setCurrentText("handcrafted")

    # 3. after Run: cells layers on the smears, the map beside them
    panel.numbers_check.setChecked(True)
    panel.run()
    wait(lambda: not panel.running and not cell_map.is_computing)
    viewer.reset_view()
    settle(1.0)
    close_toasts(viewer)
    print(panel.status)
    save_png(viewer.screenshot(canvas_only=False, flash=False), OUT / "embed_result.png")

    # 4. a cell picked on the map (here: by the script, as a click on the map does):
    # the viewer switches to the first smear, which lay underneath, and centres the cell
    session = get_session(viewer)
    obs = session.table.obs
    row = int(np.flatnonzero(obs["source"].str.endswith(SMEARS[0]))[0])
    session.select([row], origin="map")
    settle(1.0)
    close_toasts(viewer)
    save_png(viewer.screenshot(canvas_only=False, flash=False), OUT / "embed_selection.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

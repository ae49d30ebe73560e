"""``hemofm demo``: napari with the synthetic sample, embedded offline, and the HemoFM docks.

The demo opens the three synthetic smears (three "labs"), docks the Embed panel, the
Review gallery and the Cell map (tabbed together on the right by :mod:`._docking`),
embeds the cells with the offline ``handcrafted`` backend, labels one cell per class from
the smears' ground truth so the probe predicts the rest, and shows the map coloured by
batch.

Qt is imported only inside functions: :func:`display_problem` runs before anything
touches Qt, so ``hemofm demo`` on a machine without a display says how to run it instead
of dying in Qt's platform plugin (a core dump).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEMO_TIMEOUT_S = 600.0
"""How long ``hemofm demo --no-run`` / ``--screenshot`` waits for the embedding and map."""

#: The demo's window size (a laptop screen), shrunk to the screen when it is smaller.
DEMO_WINDOW = (1280, 800)

#: Qt platforms that need no display server.
_HEADLESS_PLATFORMS = ("offscreen", "minimal", "vnc", "eglfs", "linuxfb")

NO_DISPLAY_HINT = (
    "no display to open napari on: run `xvfb-run -a hemofm demo`, or save a picture with "
    "`xvfb-run -a hemofm demo --screenshot demo.png`"
)
"""The one line ``hemofm demo`` prints when there is no display."""


class DemoError(RuntimeError):
    """The demo could not run (no napari / Qt, no window, or the work did not finish)."""


def display_problem(environ: dict[str, str] | None = None, platform: str | None = None) -> str:
    """Why napari cannot open a window here ("" when it can); never imports Qt.

    On Linux (and other X11 / Wayland systems) Qt needs ``DISPLAY`` or
    ``WAYLAND_DISPLAY`` unless ``QT_QPA_PLATFORM`` names a platform without a display
    server (``offscreen``, ...). macOS and Windows always have a display.

    Parameters
    ----------
    environ : dict, optional
        The environment (default ``os.environ``).
    platform : str, optional
        ``sys.platform`` (default: this machine's).

    Returns
    -------
    str
        "" or :data:`NO_DISPLAY_HINT`.
    """
    env = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if platform.startswith(("win", "darwin", "cygwin")):
        return ""
    qpa = env.get("QT_QPA_PLATFORM", "").split(":")[0].strip().lower()
    if qpa in _HEADLESS_PLATFORMS:
        return ""
    if qpa in ("xcb", "") and env.get("DISPLAY"):
        return ""
    if qpa in ("wayland", "wayland-egl", "") and env.get("WAYLAND_DISPLAY"):
        return ""
    return NO_DISPLAY_HINT


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Run the Qt event loop until ``condition()`` holds; False on timeout."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        app.processEvents()
        time.sleep(0.02)
    return True


def run_demo(
    *,
    run: bool = True,
    screenshot: str | Path | None = None,
    close: bool = True,
    timeout: float = DEMO_TIMEOUT_S,
) -> Any:
    """Open napari with the synthetic sample, embed it offline and show the cell map.

    Parameters
    ----------
    run : bool
        Enter napari's event loop (``napari.run()``) and return when the window closes.
        False: wait until the embedding and the map are done, then return.
    screenshot : str or Path, optional
        With ``run=False``: save a screenshot of the whole window there.
    close : bool
        With ``run=False``: close the viewer before returning.
    timeout : float
        With ``run=False``: seconds to wait for the embedding and the map.

    Returns
    -------
    napari.Viewer
        The demo's viewer (closed when ``close`` and ``run=False``).

    Raises
    ------
    DemoError
        When there is no display, napari or a Qt binding is missing, or the work did not
        finish in time.
    """
    problem = display_problem()
    if problem:
        raise DemoError(problem)
    try:
        import napari
    except ImportError as exc:  # pragma: no cover - napari is a dependency
        raise DemoError(f"napari is not installed ({exc})") from None
    try:
        viewer = napari.Viewer(title="HemoFM demo", show=run or screenshot is not None)
    except Exception as exc:
        raise DemoError(
            f"napari could not open a window ({type(exc).__name__}: {exc}); install a Qt "
            "binding (pip install 'napari-hemofm[qt]') and run it on a display"
        ) from None
    _fit_window(viewer)
    viewer.open_sample("napari-hemofm", "synthetic_smears")
    # the docks tab together on the right by themselves (_docking.setup_dock)
    _, embed = viewer.window.add_plugin_dock_widget("napari-hemofm", "Embed cells")
    viewer.window.add_plugin_dock_widget("napari-hemofm", "Review")
    map_dock, cell_map = viewer.window.add_plugin_dock_widget("napari-hemofm", "Cell map")
    cell_map.set_color_by("batch")  # nothing is labelled yet: show the three labs
    embed.model_combo.setCurrentText("handcrafted")
    seeded = seed_when_embedded(viewer, embed, map_dock)
    embed.run()
    if run:
        napari.run()
        return viewer

    from napari_hemofm._widgets._review_state import get_retrainer

    retrainer = get_retrainer(viewer)

    def settled() -> bool:
        return (
            not embed.running
            and not getattr(cell_map, "is_computing", False)
            and seeded()
            and not retrainer.busy
        )

    done = wait_until(settled, timeout)
    status = embed.status
    try:
        if not done:
            raise DemoError(f"the demo did not finish within {timeout:.0f} s")
        if screenshot is not None:
            wait_until(lambda: False, 0.5)  # let the canvas draw the last frame
            viewer.screenshot(str(screenshot), canvas_only=False)
    finally:
        if close:
            viewer.close()
    print(f"demo: {status}", file=sys.stderr)
    return viewer


def _fit_window(viewer: Any) -> None:
    """Size the window as a laptop screen (or the screen, when smaller)."""
    window = viewer.window._qt_window
    width, height = DEMO_WINDOW
    screen = window.screen() if hasattr(window, "screen") else None
    if screen is not None:
        avail = screen.availableGeometry()
        width, height = min(width, avail.width()), min(height, avail.height())
    window.resize(width, height)


def seed_demo_labels(viewer: Any) -> dict[str, str]:
    """Label one cell per class from the synthetic smears' ground truth (origin "imported").

    The demo's smears come with the class of every WBC they hold
    (``layer.metadata["ground_truth"]``); one detected cell per class gets that label so
    the probe has something to learn from and the Review gallery shows predictions.

    Returns
    -------
    dict of str to str
        Class name -> cell id of the labelled cell.
    """
    import numpy as np

    from napari_hemofm._widgets._layers import source_key
    from napari_hemofm._widgets._session import get_session

    table = get_session(viewer).table
    obs = table.obs
    sources = obs["source"].astype(str).to_numpy()
    chosen: dict[str, str] = {}
    for layer in viewer.layers:
        truth = getattr(layer, "metadata", {}).get("ground_truth")
        if truth is None or not len(truth):
            continue
        for row in np.flatnonzero(sources == source_key(layer)):
            x, y = float(obs["x"].iat[row]), float(obs["y"].iat[row])
            inside = truth[
                (truth["x0"] <= x) & (x <= truth["x1"]) & (truth["y0"] <= y) & (y <= truth["y1"])
            ]
            if len(inside):
                chosen.setdefault(str(inside["label"].iat[0]), str(table.cell_ids[row]))
    if chosen:
        table.set_labels(list(chosen.values()), list(chosen), origin="imported")
    return chosen


def seed_when_embedded(viewer: Any, embed: Any, raise_dock: Any = None) -> Callable[[], bool]:
    """Seed the demo's labels once the Embed panel is done; returns ``done()``.

    ``raise_dock`` (a dock widget) is brought to the front of its tab group then.
    """
    from qtpy.QtCore import QTimer

    state = {"done": False}
    timer = QTimer(embed)
    timer.setInterval(300)

    def check() -> None:
        from napari_hemofm._widgets._session import get_session

        table = get_session(viewer).table
        if embed.running or table.n_cells == 0 or table.embeddings is None:
            return
        timer.stop()
        seed_demo_labels(viewer)
        if raise_dock is not None:
            raise_dock.raise_()
        state["done"] = True

    timer.timeout.connect(check)
    timer.start()
    return lambda: state["done"]

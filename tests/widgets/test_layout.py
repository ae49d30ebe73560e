"""The HemoFM docks on a laptop screen: tabbed together, scrolling inside, canvas kept.

Runs under pytest-xvfb with a 1280x800 screen (``pyproject.toml``: ``xvfb_width``,
``xvfb_height``), the size issue 13 was reported on.
"""

from __future__ import annotations

import pytest
from qtpy.QtWidgets import QApplication, QDockWidget, QLabel, QVBoxLayout, QWidget

from napari_hemofm._widgets._docking import (
    DOCK_PROPERTY,
    ElidedLabel,
    hemofm_docks,
    setup_dock,
)

WIDGETS = ("Embed cells", "Cell map", "Review", "Batch view", "Cell viewer")


def _settle(qtbot, ms: int = 400) -> None:
    QApplication.processEvents()
    qtbot.wait(ms)


def _open_all(viewer, qtbot, names=WIDGETS) -> list:
    window = viewer.window._qt_window
    window.resize(1280, 800)
    _settle(qtbot, 100)
    widgets = []
    for name in names:
        _, widget = viewer.window.add_plugin_dock_widget("napari-hemofm", name)
        widgets.append(widget)
        _settle(qtbot, 50)
    _settle(qtbot)
    return widgets


def test_four_widgets_tab_together_and_leave_the_canvas(make_napari_viewer, qtbot):
    """At 1280x800 with Embed, Cell map, Review, Batch view and Cell viewer opened from
    the plugin menu, the docks form one tab group, the window stays within the screen, and
    the image canvas keeps >= 40 % of the window's width and >= 50 % of its height."""
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    screen = window.screen().availableGeometry()
    assert (screen.width(), screen.height()) == (1280, 800)
    widgets = _open_all(viewer, qtbot)
    docks = hemofm_docks(window)
    assert len(docks) == len(WIDGETS)
    first = docks[0]
    assert set(window.tabifiedDockWidgets(first)) == set(docks[1:])
    assert window.width() <= screen.width()
    assert window.height() <= screen.height()
    canvas = viewer.window._qt_viewer.canvas.native
    assert canvas.width() >= 0.40 * window.width(), (canvas.width(), window.width())
    assert canvas.height() >= 0.50 * window.height(), (canvas.height(), window.height())
    for widget in widgets:
        assert widget.property(DOCK_PROPERTY)
        assert widget.minimumWidth() <= 320


def test_docks_added_by_the_api_join_the_group(make_napari_viewer, qtbot):
    """A HemoFM widget added with add_dock_widget (the API) after one from the plugin
    menu is tabbed with it, whichever came first."""
    from napari_hemofm._widgets._map import CellMapWidget

    viewer = make_napari_viewer(show=True)
    _open_all(viewer, qtbot, names=("Batch view",))
    viewer.window.add_dock_widget(CellMapWidget(viewer), name="my map", area="right")
    _settle(qtbot)
    window = viewer.window._qt_window
    docks = hemofm_docks(window)
    assert len(docks) == 2
    assert docks[1] in window.tabifiedDockWidgets(docks[0])


def test_tall_content_scrolls_instead_of_growing_the_dock(make_napari_viewer, qtbot):
    """A dock whose content is taller than the dock shows a scroll bar; the dock's
    minimum height stays the modest one setup_dock gave it."""
    viewer = make_napari_viewer(show=True)
    widget = QWidget()
    layout = QVBoxLayout(widget)
    for i in range(60):
        layout.addWidget(QLabel(f"row {i}"))
    setup_dock(widget, min_height=200)
    viewer.window.add_dock_widget(widget, name="tall", area="right")
    _settle(qtbot)
    dock = widget.parentWidget()
    assert isinstance(dock, QDockWidget)
    assert widget.minimumSizeHint().height() < 300
    bar = widget.scroll_area.verticalScrollBar()
    assert bar.maximum() > 0


def test_elided_label_keeps_one_line_and_shows_all_in_the_tooltip(qtbot):
    """A long status text is elided to the label's width, never widens it, and the full
    text is in the tooltip and in text()."""
    label = ElidedLabel()
    qtbot.addWidget(label)
    label.resize(120, 20)
    long = "Embedded 12,345 cells of BloodImage_00001.jpg with dinobloom-s " * 3
    hint_before = label.sizeHint().width()
    label.setText(long)
    label.show()
    qtbot.waitExposed(label)
    assert label.text() == long
    assert label.toolTip() == long
    assert label.is_elided()
    assert label.shown_text().endswith("…")
    assert label.sizeHint().width() <= max(hint_before, 160)
    assert label.minimumSizeHint().width() <= 20
    label.setText("short")
    assert not label.is_elided()


@pytest.mark.parametrize("name", WIDGETS)
def test_each_widget_fits_a_small_dock(make_napari_viewer, qtbot, name):
    """Each HemoFM widget alone can be shrunk to 320x260 (it scrolls inside)."""
    viewer = make_napari_viewer(show=True)
    (widget,) = _open_all(viewer, qtbot, names=(name,))
    assert widget.minimumSizeHint().width() <= 320
    assert widget.minimumSizeHint().height() <= 340


@pytest.mark.parametrize("name", WIDGETS)
def test_no_button_or_label_is_clipped_at_the_docks_default_width(make_napari_viewer, qtbot, name):
    """In the dock as it opens on a 1280x800 screen, every visible button, tool button and
    one-line label gets the width its text needs (the Batch view's "Keep as separate
    embedding" and the Review's preset were drawn cut before)."""
    from qtpy.QtWidgets import QAbstractButton

    viewer = make_napari_viewer(show=True)
    (widget,) = _open_all(viewer, qtbot, names=(name,))
    _settle(qtbot)
    clipped = []
    for child in widget.findChildren(QWidget):
        if not child.isVisibleTo(widget) or child.width() == 0:
            continue
        if isinstance(child, ElidedLabel):
            continue  # elides on purpose, with the whole text in its tooltip
        if isinstance(child, QLabel) and (child.wordWrap() or not child.text()):
            continue
        if not isinstance(child, QAbstractButton | QLabel):
            continue
        if child.width() + 2 < child.minimumSizeHint().width():
            clipped.append((type(child).__name__, child.text(), child.width()))
        elif isinstance(child, QAbstractButton) and child.width() + 2 < child.sizeHint().width():
            clipped.append((type(child).__name__, child.text(), child.width()))
    assert not clipped, clipped

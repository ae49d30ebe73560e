"""How HemoFM's dock widgets sit in napari's window: tabbed together, scrolling, on screen.

Every HemoFM dock widget calls :func:`setup_dock` once, at the end of its ``__init__``:

- its content moves into a :class:`QScrollArea`, so a dock smaller than the content scrolls
  instead of pushing the window taller (napari stacks right-hand docks in one column, and
  their minimum heights add up: the window grew to ~2,000 px and the canvas lost its width);
- it gets a modest minimum size (:data:`MIN_WIDTH` x :data:`MIN_HEIGHT`);
- whenever it lands in a viewer's dock (the Plugins menu, ``add_plugin_dock_widget``,
  ``add_dock_widget``, the demo: whoever adds it), it is tabbed with the HemoFM docks already
  there, whichever came first, and the right-hand dock area is kept to at most
  :data:`MAX_DOCK_FRACTION` of the window's width; the window is kept within its screen.

:class:`ElidedLabel` is the one label for long names and status lines: it shows one line,
elided with "...", the full text in its tooltip, so a long message never reflows a form.
"""

from __future__ import annotations

from qtpy.QtCore import QEvent, QObject, Qt, QTimer
from qtpy.QtGui import QFontMetrics
from qtpy.QtWidgets import (
    QDockWidget,
    QFrame,
    QLabel,
    QMainWindow,
    QScrollArea,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

#: Qt property that marks a widget as a HemoFM dock (found by the other docks).
DOCK_PROPERTY = "hemofm_dock"
#: Minimum size of a HemoFM dock's content, in pixels (it scrolls below that).
MIN_WIDTH = 300
MIN_HEIGHT = 220
#: Largest share of the window's width the HemoFM dock area is given when a dock arrives.
MAX_DOCK_FRACTION = 0.32
#: Width the HemoFM dock area gets when a dock arrives (capped by MAX_DOCK_FRACTION).
PREFERRED_WIDTH = 400


class ElidedLabel(QLabel):
    """A one-line label that elides long text ("...") and shows all of it in its tooltip.

    Its size hint never grows with the text, so a long status message or file name cannot
    widen or reflow the form it sits in.

    Parameters
    ----------
    text : str
    parent : QWidget, optional
    elide : Qt.TextElideMode
        Where the dots go (default: at the end; ``ElideMiddle`` suits paths).
    """

    def __init__(
        self,
        text: str = "",
        parent: QWidget | None = None,
        *,
        elide: Qt.TextElideMode = Qt.TextElideMode.ElideRight,
    ) -> None:
        super().__init__(parent)
        self._full = ""
        self._mode = elide
        self.setTextFormat(Qt.TextFormat.PlainText)
        self.setWordWrap(False)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.setMinimumWidth(20)
        self.setText(text)

    def setText(self, text: str) -> None:
        """Set the full text; what fits is shown, the rest elided."""
        self._full = "" if text is None else str(text)
        self.setToolTip(self._full if self._full else "")
        self._elide()

    def setWordWrap(self, on: bool) -> None:
        """Ignored: the label stays one line (a drop-in for a word-wrapped QLabel)."""
        super().setWordWrap(False)

    def text(self) -> str:
        """The full (not elided) text."""
        return self._full

    def shown_text(self) -> str:
        """The text as displayed (elided to the current width)."""
        return super().text()

    def is_elided(self) -> bool:
        """True when the text does not fit and is shown shortened."""
        return super().text() != self._full

    def _elide(self) -> None:
        width = max(self.width() - 2, 10)
        one_line = " ".join(self._full.split())
        shown = QFontMetrics(self.font()).elidedText(one_line, self._mode, width)
        super().setText(shown)

    def resizeEvent(self, event) -> None:
        """Re-elide for the new width."""
        super().resizeEvent(event)
        self._elide()

    def minimumSizeHint(self):
        """As small as one short word: the text never sets the form's width."""
        hint = super().minimumSizeHint()
        hint.setWidth(20)
        return hint

    def sizeHint(self):
        """One line high, a modest width whatever the text."""
        hint = super().sizeHint()
        hint.setWidth(min(hint.width(), 160))
        return hint


def setup_dock(
    widget: QWidget, *, min_width: int = MIN_WIDTH, min_height: int = MIN_HEIGHT
) -> None:
    """Make ``widget`` a well-behaved HemoFM dock (call once, after its layout is built).

    Moves the widget's layout into a scroll area inside it, sets its minimum size, marks it
    as a HemoFM dock and tabs it with the other HemoFM docks of its viewer as soon as it is
    docked (see the module's docstring).

    Parameters
    ----------
    widget : QWidget
        A dock widget whose ``layout()`` holds its content.
    min_width, min_height : int
        The dock's minimum size in pixels; the content scrolls when it needs more.
    """
    if widget.property(DOCK_PROPERTY):
        return
    widget.setProperty(DOCK_PROPERTY, True)
    layout = widget.layout()
    if layout is not None:
        inner = QWidget()
        inner.setObjectName("hemofm_dock_content")
        inner.setLayout(layout)  # moves the layout and its widgets into `inner`
        scroll = QScrollArea(widget)
        scroll.setObjectName("hemofm_dock_scroll")
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        # vertical scrolling only: the content always takes the dock's width (a wider
        # minimum would put the right-hand part of a gallery off screen, never painted)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        inner.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        scroll.setWidget(inner)
        outer = QVBoxLayout(widget)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        widget.scroll_area = scroll  # type: ignore[attr-defined]
    widget.setMinimumSize(min_width, min_height)
    widget.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
    _Arranger(widget)


def dock_of(widget: QWidget) -> QDockWidget | None:
    """The QDockWidget holding ``widget`` (None while it is not docked)."""
    parent = widget.parentWidget()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parentWidget()
    return parent


def hemofm_docks(window: QMainWindow) -> list[QDockWidget]:
    """The window's docked (not floating) HemoFM docks, in the order they were added."""
    return [
        d
        for d in window.findChildren(QDockWidget)
        if d.widget() is not None
        and d.widget().property(DOCK_PROPERTY)
        and not d.isFloating()
        and window.dockWidgetArea(d) != Qt.DockWidgetArea.NoDockWidgetArea
    ]


def arrange(dock: QDockWidget) -> None:
    """Tab ``dock`` with the other HemoFM docks of its window, show it, keep it on screen.

    Does nothing for a floating dock or one outside a main window; calling it again once
    arranged changes nothing.
    """
    window = dock.parentWidget()
    if not isinstance(window, QMainWindow) or dock.isFloating():
        return
    others = [d for d in hemofm_docks(window) if d is not dock and not d.isHidden()]
    if others:
        first = others[0]
        if dock not in window.tabifiedDockWidgets(first):
            window.tabifyDockWidget(first, dock)
            dock.show()
            dock.raise_()
    fit_window(window, [dock, *others])


def fit_window(window: QMainWindow, docks: list[QDockWidget] | None = None) -> None:
    """Keep ``window`` within its screen and the HemoFM dock area a share of its width."""
    screen = window.screen() if hasattr(window, "screen") else None
    if screen is not None:
        avail = screen.availableGeometry()
        w, h = min(window.width(), avail.width()), min(window.height(), avail.height())
        if (w, h) != (window.width(), window.height()):
            window.resize(w, h)
    if docks:
        width = int(min(PREFERRED_WIDTH, MAX_DOCK_FRACTION * window.width()))
        width = max(width, MIN_WIDTH)
        window.resizeDocks(docks[:1], [width], Qt.Orientation.Horizontal)


class _Arranger(QObject):
    """Watches a HemoFM widget; arranges its dock once it is docked and shown."""

    def __init__(self, widget: QWidget) -> None:
        super().__init__(widget)
        self._widget = widget
        self._dock: QDockWidget | None = None
        widget.installEventFilter(self)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        """On a new parent or on show: arrange the dock after napari has placed it."""
        if event.type() in (QEvent.Type.ParentChange, QEvent.Type.Show):
            QTimer.singleShot(0, self._arrange)
        return False

    def _arrange(self) -> None:
        try:
            dock = dock_of(self._widget)
        except RuntimeError:  # the widget was deleted meanwhile
            return
        if dock is None or dock is self._dock:
            return
        window = dock.parentWidget()
        if (
            not isinstance(window, QMainWindow)
            or window.dockWidgetArea(dock) == Qt.DockWidgetArea.NoDockWidgetArea
        ):
            return  # not added to the window yet: the next Show event arranges it
        self._dock = dock
        arrange(dock)

"""Signal plumbing shared by the widgets: back to the GUI thread, and disconnecting.

The cell table's and the session's signals fire on the thread that changed them (a
worker filling the table, a probe writing predictions). Qt objects and napari layers may
only be touched on the GUI thread, so every view starts its slots with
:func:`on_main_thread`, which re-queues the call there when needed. Views keep their
``(signal, slot)`` pairs and drop them with :func:`disconnect_all` when the table is
replaced or the widget dies.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QObject, Signal


class MainThreadBridge(QObject):
    """Re-runs a call on the GUI thread (a queued Qt signal) when it came from another.

    Parameters
    ----------
    parent : QObject, optional
        Owner (the bridge dies with it).
    """

    call = Signal(object)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.call.connect(self._run)

    def _run(self, fn: Callable[[], None]) -> None:
        fn()


def on_main_thread(bridge: MainThreadBridge, method: Callable, *args: Any) -> bool:
    """True when on the GUI thread (go on); else queue ``method(*args)`` there and say False.

    Use as the first line of a slot::

        if not on_main_thread(self._bridge, self._on_cells_added, start, stop):
            return
    """
    if threading.current_thread() is threading.main_thread():
        return True
    bridge.call.emit(functools.partial(method, *args))
    return False


def disconnect_all(slots: list[tuple[Any, Callable]]) -> None:
    """Disconnect every ``(signal, slot)`` pair (already gone ones are skipped) and forget them."""
    for signal, slot in slots:
        try:
            signal.disconnect(slot)
        except (ValueError, RuntimeError, TypeError):
            pass
    slots.clear()


def _is_qt_signal(signal: Any) -> bool:
    return type(signal).__module__.split(".")[0] in ("PyQt5", "PyQt6", "PySide2", "PySide6")


def disconnect_groups(groups: dict[str, list[tuple[Any, Callable]]], *_args: Any) -> None:
    """:func:`disconnect_all` for each group (e.g. ``{"session": [...], "table": [...]}``).

    Connected to a widget's ``destroyed``: only the psygnal connections (session, table,
    review) are dropped by hand. Qt drops a dead receiver's Qt connections itself, and
    touching the Qt signal of another object that is being torn down (at interpreter
    exit, Qt deletes objects in no fixed order) crashed the process.
    """
    if sys.is_finalizing():
        for slots in groups.values():
            slots.clear()
        return
    for slots in groups.values():
        slots[:] = [(signal, slot) for signal, slot in slots if not _is_qt_signal(signal)]
        disconnect_all(slots)

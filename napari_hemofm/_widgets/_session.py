"""One :class:`~napari_hemofm.core.session.CellSession` per napari viewer.

Every dock widget of the plugin asks :func:`get_session` for its viewer's session, so
the Embed panel, the Cell map and the ``cells`` layers share one cell table and one
selection.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from napari_hemofm.core.session import CellSession

if TYPE_CHECKING:
    import napari

_SESSIONS: weakref.WeakKeyDictionary[napari.viewer.Viewer, CellSession] = (
    weakref.WeakKeyDictionary()
)


def get_session(viewer: napari.viewer.Viewer) -> CellSession:
    """The session of ``viewer`` (created on first use)."""
    session = _SESSIONS.get(viewer)
    if session is None:
        session = CellSession()
        _SESSIONS[viewer] = session
    return session

"""Opening a project in napari: the lock, a read-only fallback, and "locate images".

The reader (:func:`napari_hemofm._reader.read_project`) calls :func:`open_project`.
The rules are core's (:func:`~napari_hemofm.core.io.load_project`,
:mod:`~napari_hemofm.core.sources`); this module adds only what needs a person: a
project another process holds opens read-only with a notification (the Review panel
shows the banner), and images whose stored paths no longer exist are looked for in a
folder the user points at once (a ``QFileDialog``), which is remembered in the project.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable

log = logging.getLogger(__name__)

#: Called with (project path, missing sources); returns the folder chosen, or None.
AskRoot = Callable[[Path, list[str]], "str | None"]


def notify(text: str) -> None:
    """Show ``text`` as a napari notification (logged when there is no GUI)."""
    try:
        from napari.utils.notifications import show_info

        show_info(text)
    except Exception:  # no napari GUI: the log is enough
        log.info(text)


def ask_images_root(project: Path, missing: list[str]) -> str | None:
    """Ask, in a folder dialog, where the images of ``project`` are now.

    Returns
    -------
    str or None
        The folder chosen; None when the dialog was cancelled.
    """
    from qtpy.QtWidgets import QApplication, QFileDialog

    parent = QApplication.activeWindow()
    example = Path(missing[0]).name
    folder = QFileDialog.getExistingDirectory(
        parent,
        f"{project.name}: {len(missing)} image(s) not found (e.g. {example}); "
        "choose the folder that now holds them",
        str(project.parent),
    )
    return folder or None


def open_project(
    path: str | Path,
    *,
    interactive: bool = True,
    ask: AskRoot | None = None,
) -> CellTable:
    """Open a project for a napari session: for writing if free, else read-only.

    Parameters
    ----------
    path : str or Path
        The ``.h5ad`` file.
    interactive : bool
        There is a viewer (a person): take the lock, and ask once for the images'
        folder when some are missing. Without one the project opens read-only and
        nobody is asked.
    ask : callable, optional
        ``ask(project, missing) -> folder or None``; default :func:`ask_images_root`.

    Returns
    -------
    CellTable
        Its journal is read-only when another process holds the project
        (:func:`~napari_hemofm.core.io.read_only_reason` says who).
    """
    from napari_hemofm.core.io import load_project, read_only_reason, save_project
    from napari_hemofm.core.lock import ProjectLockedError
    from napari_hemofm.core.sources import missing_sources, relocate_sources

    path = Path(path)
    if not interactive:
        return load_project(path, mode="r")
    try:
        table = load_project(path, mode="w")
    except ProjectLockedError as exc:
        table = load_project(path, mode="r")
        notify(f"{exc}. Opened read-only: labels cannot be changed in this window.")
    except PermissionError as exc:  # a read-only folder: no lock can be written there
        table = load_project(path, mode="r")
        notify(f"{path.name}: opened read-only, its folder cannot be written ({exc})")
    missing = missing_sources(table)
    if not missing:
        return table
    root = (ask or ask_images_root)(path, missing)
    if not root:
        notify(f"{path.name}: {len(missing)} image(s) not found, e.g. {missing[0]}")
        return table
    try:
        still = relocate_sources(table, root)
    except ValueError as exc:
        notify(str(exc))
        return table
    if read_only_reason(table) is None:
        save_project(table, path)  # remember the folder (uns) for the next open
    found = len(missing) - len(still)
    text = f"{path.name}: {found} of {len(missing)} missing image(s) found under {root}"
    if still:
        text += f"; still missing, e.g. {still[0]}"
    notify(text)
    return table

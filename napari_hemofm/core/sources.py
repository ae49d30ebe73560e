"""Where a project's images are: stored twice, found again after a move.

Each cell's ``source`` (the smear or crop file it was cut from) is stored in the project
file twice (DESIGN.md, "The cell table"): absolute in ``obs["source"]`` and relative to
the project file's folder in the file-only column ``source_relative`` (POSIX style).
Loading resolves each source to whichever exists, so a folder holding a project and its
images can be moved, opened from any working directory, or copied to another machine.
When neither exists, an *images root* (``images_root=`` / ``--images-root`` / napari's
"locate images" question, remembered in ``uns["hemofm"]["images_root"]``) is searched
for the file's trailing path components, longest first.

Sources are resolved per folder, not per file: a folder is found where a folder holds
any of its files, and every file of it moves with it. Each folder is listed once
(``os.scandir``), so opening a 200k-crop project costs one listing per crop folder, not
one ``stat`` per crop. Sources that are not image paths (napari layer names
of in-memory images) are left as they are and never count as missing.
"""

from __future__ import annotations

import ntpath
import os
import posixpath
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable

__all__ = [
    "IMAGES_ROOT_KEY",
    "RELATIVE_COLUMN",
    "missing_sources",
    "relocate_sources",
    "resolve_sources",
    "sources_for_save",
]

RELATIVE_COLUMN = "source_relative"
"""File-only ``obs`` column: each source relative to the project's folder ("" if none)."""

IMAGES_ROOT_KEY = "images_root"
"""``uns["hemofm"]`` key of the folder last named as holding the images."""


def _split(source: str) -> tuple[str, str]:
    """``(folder, file name)`` of a POSIX or Windows path."""
    if "\\" in source and "/" not in source:
        return ntpath.split(source)
    return posixpath.split(source.replace("\\", "/"))


def _parts(folder: str) -> list[str]:
    """Path components of a folder, POSIX or Windows, without the root / drive."""
    text = folder.replace("\\", "/")
    _drive, text = ntpath.splitdrive(text) if ":" in text[:3] else ("", text)
    return [p for p in text.split("/") if p and p != "."]


def _groups(sources: pd.Series) -> pd.DataFrame:
    """One row per unique image source: ``source``, ``folder``, ``name`` (others dropped).

    Plain string methods in one pass (a 200k-crop project has 200k unique sources; the
    pandas ``.str`` accessor is several times slower here).
    """
    from napari_hemofm.core.io import IMAGE_EXTENSIONS

    exts = tuple(IMAGE_EXTENSIONS)
    rows = []
    for src in pd.unique(sources.astype(str).to_numpy(dtype=object)):
        if not src.lower().endswith(exts):
            continue
        # a Windows path (backslashes only) is split at its backslashes
        norm = src.replace("\\", "/") if "/" not in src else src
        folder, sep, name = norm.rpartition("/")
        rows.append((src, folder or sep, name))
    return pd.DataFrame(rows, columns=["source", "folder", "name"], dtype=object)


# ---------------------------------------------------------------------- saving
def sources_for_save(sources: pd.Series, project: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's source as an absolute path and relative to the project's folder.

    Parameters
    ----------
    sources : pandas.Series of str, shape (n_cells,)
        ``obs["source"]``: paths (absolute, or relative to the working directory) or
        napari layer names.
    project : str or Path
        The project file being written.

    Returns
    -------
    absolute : ndarray of object, shape (n_cells,)
        Image paths made absolute (a relative one that exists from the working
        directory, as it was when the cells were found); other sources unchanged.
    relative : ndarray of object, shape (n_cells,)
        The absolute path relative to the project's folder, POSIX style; ``""`` for
        layer names and paths on another drive.
    """
    values = sources.astype(str).to_numpy(dtype=object)
    folder_of = Path(os.path.abspath(project)).parent
    absolute: dict[str, str] = {}
    relative: dict[str, str] = {}
    rel_folder: dict[str, str] = {}
    groups = _groups(sources)
    for source, folder, name in groups.itertuples(index=False):
        if "\\" in source and not os.path.isabs(source) and ntpath.isabs(source):
            # a Windows path seen on another system: keep it, it cannot be made relative
            absolute[source], relative[source] = source, ""
            continue
        abs_folder = os.path.abspath(folder) if folder else os.getcwd()
        if not os.path.isabs(folder) and not os.path.isfile(os.path.join(abs_folder, name)):
            # relative to no folder we know of: keep it as it is
            absolute[source], relative[source] = source, ""
            continue
        if abs_folder not in rel_folder:
            try:
                rel_folder[abs_folder] = Path(os.path.relpath(abs_folder, folder_of)).as_posix()
            except ValueError:  # another drive (Windows)
                rel_folder[abs_folder] = ""
        absolute[source] = os.path.join(abs_folder, name)
        rel = rel_folder[abs_folder]
        relative[source] = "" if not rel else (name if rel == "." else f"{rel}/{name}")
    abs_out = np.array([absolute.get(s, s) for s in values], dtype=object)
    rel_out = np.array([relative.get(s, "") for s in values], dtype=object)
    return abs_out, rel_out


# --------------------------------------------------------------------- loading
class _Listings:
    """The file names of folders, read once per folder (``os.scandir``)."""

    def __init__(self) -> None:
        self._names: dict[str, frozenset[str]] = {}

    def names(self, folder: str) -> frozenset[str]:
        if folder not in self._names:
            try:
                with os.scandir(folder or ".") as it:
                    self._names[folder] = frozenset(e.name for e in it if e.is_file())
            except OSError:  # not a folder (any more), or unreadable
                self._names[folder] = frozenset()
        return self._names[folder]

    def holds(self, folder: str, names: list[str]) -> bool:
        """Whether ``folder`` holds any of ``names``."""
        have = self.names(folder)
        return any(n in have for n in names)


def _under_root(
    parts: list[str], names: list[str], root: str, cache: dict[str, str], seen: _Listings
) -> str | None:
    """The folder under ``root`` holding ``names``, by the longest matching tail of ``parts``."""
    key = "/".join(parts)
    for old, new in cache.items():  # a folder beside one found before
        if not old or key == old or key.startswith(old + "/"):
            candidate = os.path.join(new, *[p for p in key[len(old) :].split("/") if p])
            if seen.holds(candidate, names):
                return candidate
    for k in range(len(parts) + 1):
        candidate = os.path.join(root, *parts[k:])
        if seen.holds(candidate, names):
            cache["/".join(parts[:k])] = root
            return candidate
    return None


def resolve_sources(
    table: CellTable,
    project: str | Path,
    *,
    images_root: str | Path | None = None,
    relative: Iterable[str] | None = None,
) -> list[str]:
    """Point each cell's ``source`` at a file that exists; return the sources still missing.

    For each folder of sources, the first of these that holds any of its files: the
    stored absolute folder; the stored relative one from the project's folder (for
    projects without one, a relative ``source`` from the project's folder and from the
    working directory); ``images_root`` (else the root remembered in
    ``uns["hemofm"]["images_root"]``) joined with the folder's trailing components,
    longest first. Each folder is listed once.

    Parameters
    ----------
    table : CellTable
        Its ``source`` column is rewritten to the absolute paths found.
    project : str or Path
        The project file the table was read from.
    images_root : str or Path, optional
        A folder that now holds the images (as the folder they were in, or a parent).
    relative : iterable of str, optional
        The stored relative paths (``obs["source_relative"]``), one per cell.

    Returns
    -------
    list of str
        Image sources whose file exists nowhere (unique, in table order, as they are
        in ``obs["source"]`` afterwards).
    """
    sources = table.obs["source"].astype(str)
    groups = _groups(sources)
    if groups.empty:
        return []
    firsts = groups.drop_duplicates("folder")
    rel_of: dict[str, str] = {}
    if relative is not None:
        # the stored relative path of each folder's first source
        values = sources.to_numpy(dtype=object)
        at = np.flatnonzero(~pd.Index(values).duplicated())
        pos = pd.Series(at, index=values[at]).reindex(firsts["source"].to_numpy())
        rel_values = np.asarray(relative, dtype=object)[pos.to_numpy(dtype=np.int64)]
        rel_of = {
            str(src): str(rel)
            for src, rel in zip(firsts["source"], rel_values, strict=True)
            if isinstance(rel, str) and rel
        }
    base = Path(os.path.abspath(project)).parent
    root = images_root if images_root is not None else table.meta.get(IMAGES_ROOT_KEY)
    root = str(root) if root else None
    seen = _Listings()
    cache: dict[str, str] = {}
    found_of: dict[str, str] = {}  # old folder -> folder found
    for _, group in groups.groupby("folder", sort=False):
        source, folder, _name = group.iloc[0]
        names = group["name"].tolist()
        rel = rel_of.get(source)
        candidates = []
        if os.path.isabs(folder):
            candidates.append(folder)
        if rel is not None:
            candidates.append(os.path.normpath(os.path.join(base, _split(rel)[0])))
        elif not os.path.isabs(folder) and not ntpath.isabs(folder):
            candidates += [os.path.join(base, folder), os.path.abspath(folder or ".")]
        found = next((c for c in candidates if seen.holds(c, names)), None)
        if found is None and root is not None:
            parts = [p for p in _parts(_split(rel)[0]) if p != ".."] if rel else []
            found = _under_root(_parts(folder), names, root, cache, seen) or (
                _under_root(parts, names, root, cache, seen)
            )
        if found is not None:
            found_of[folder] = os.path.abspath(found)
    new_folder = groups["folder"].map(found_of)
    located = new_folder.notna().to_numpy()
    target = groups["source"].to_numpy(dtype=object).copy()
    target[located] = [
        os.path.join(f, n)
        for f, n in zip(new_folder[located], groups["name"][located], strict=True)
    ]
    have = [
        n in seen.names(f)
        for f, n in zip(new_folder[located], groups["name"][located], strict=True)
    ]
    present = np.zeros(len(groups), dtype=bool)
    present[located] = have
    changed = target != groups["source"].to_numpy(dtype=object)
    if changed.any():
        mapping = pd.Series(target[changed], index=groups["source"].to_numpy()[changed])
        renamed = sources.map(mapping)
        table.set_column("source", renamed.fillna(sources).to_numpy(dtype=object))
    return target[~present].tolist()


def missing_sources(table: CellTable) -> list[str]:
    """Image sources of the table whose file does not exist (each folder listed once).

    Returns
    -------
    list of str
        Unique sources, in table order; napari layer names never count.
    """
    groups = _groups(table.obs["source"])
    seen = _Listings()
    missing: list[str] = []
    for folder, group in groups.groupby("folder", sort=False):
        have = seen.names(folder)
        missing.extend(
            s for s, n in zip(group["source"], group["name"], strict=True) if n not in have
        )
    return missing


def relocate_sources(table: CellTable, images_root: str | Path) -> list[str]:
    """Look for the missing images under ``images_root`` and remember it in the project.

    The root is stored in ``uns["hemofm"]["images_root"]`` (saved with the project), so
    the next open looks there without asking.

    Parameters
    ----------
    table : CellTable
    images_root : str or Path
        The folder that now holds the images (or their folders).

    Returns
    -------
    list of str
        Sources still missing.

    Raises
    ------
    ValueError
        If ``images_root`` is not a folder.
    """
    root = os.path.abspath(images_root)
    if not os.path.isdir(root):
        raise ValueError(f"{images_root}: not a folder")
    still = []
    if missing_sources(table):
        # the root stands in for the project's folder: relative sources are tried there
        still = resolve_sources(table, Path(root) / "project.h5ad", images_root=root)
    table.update_meta(**{IMAGES_ROOT_KEY: root})
    return still

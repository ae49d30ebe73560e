"""What the user points at: smear files, folders of smears, crop folders, arrays.

Turns command-line inputs (or napari layers) into cell rows for the cell table,
following DESIGN.md ("Command line", "The cell table"):

- a file is a smear (its WBCs are detected);
- a folder whose subfolders hold images is a crop folder: each image in
  ``<root>/<class>/`` is one cell labelled ``<class>`` verbatim, except in a subfolder
  named ``unlabelled`` (or ``unlabeled``, any case): those crops come in without a label
  (a new lab's cells, to be labelled in the app); other files at its root (README,
  LICENSE) are ignored;
- a folder with images directly inside is a folder of smears.

Default batch: the base name of the input for a folder, of the file's folder for a
file; two different folders with the same base name get a numeric suffix
(``lab``, ``lab_2``). Cell ids are ``"<batch>/<path relative to its input>#<n>"``.
Unreadable files are collected in ``skipped`` (path, reason) so that the caller
issues one warning naming all of them (:func:`~.io.format_skipped`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from napari_hemofm.core.io import ImageReadError, image_size, is_image_file, read_image

SourceKind = Literal["smear", "crop"]

#: Columns of the frame returned by :func:`collect_cells`, beyond the cell id index.
CELL_COLUMNS = ["source", "batch", "slide", "x", "y", "x0", "y0", "x1", "y1", "score", "label"]


@dataclass(frozen=True)
class Source:
    """One image file to take cells from.

    Attributes
    ----------
    kind : {"smear", "crop"}
        A smear has its WBCs detected; a crop is one cell.
    path : Path
        The image file (absolute).
    batch : str
        Batch (lab / scanner / slide group) of its cells.
    rel : str
        Path relative to its input, POSIX style (the middle part of the cell id).
    label : str or None
        Class of a crop (its folder name); ``None`` for smears.
    input_name : str
        Name of its input (the first part of the cell id); defaults to ``batch``.
    """

    kind: SourceKind
    path: Path
    batch: str
    rel: str
    label: str | None = None
    input_name: str = ""

    @property
    def id_prefix(self) -> str:
        """``"<input name>/<rel>"``: the cell ids of this source are ``id_prefix#<n>``."""
        return f"{self.input_name or self.batch}/{self.rel}"


@dataclass
class Scan:
    """Result of :func:`scan_inputs`.

    Attributes
    ----------
    sources : list of Source
        Image files to read, in a deterministic order.
    skipped : list of (str, str)
        Files passed over, with the reason (named in one warning).
    empty_inputs : list of (str, str)
        Inputs that gave no image at all, with the reason.
    """

    sources: list[Source] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    empty_inputs: list[tuple[str, str]] = field(default_factory=list)


UNLABELLED_FOLDERS = ("unlabelled", "unlabeled")
"""Crop subfolders whose crops come in without a label (compared case-insensitively)."""


def folder_label(name: str) -> str | None:
    """The label a crop folder's subfolder ``name`` gives its crops (None: unlabelled)."""
    return None if name.strip().lower() in UNLABELLED_FOLDERS else name


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _dangling(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def _images_in(folder: Path) -> list[Path]:
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if p.is_file() and _visible(p) and is_image_file(p))


def _dangling_in(folder: Path) -> list[Path]:
    """Symbolic links in ``folder`` whose target is gone (named in the skipped warning)."""
    try:
        return sorted(p for p in folder.iterdir() if _visible(p) and _dangling(p))
    except OSError:
        return []


def classify_folder(folder: Path) -> Literal["crops", "smears", "empty"]:
    """Say what a folder is: a crop folder, a folder of smears, or neither.

    A folder whose subfolders hold images is a crop folder (even if images lie at
    its root too); otherwise a folder with images directly inside is a folder of
    smears; otherwise it is ``"empty"`` (also when it cannot be listed).
    """
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return "empty"
    for sub in entries:
        if sub.is_dir() and _visible(sub) and _images_in(sub):
            return "crops"
    return "smears" if _images_in(folder) else "empty"


def default_batch_names(inputs: Sequence[str | Path]) -> list[str]:
    """Default input name (and batch) of each input (DESIGN.md).

    The base name of the input for a folder, of the file's folder for a file. Inputs
    in the same folder share a name; two different folders with the same base name
    get ``_2``, ``_3``... in order of appearance.
    """
    names: list[str] = []
    by_folder: dict[Path, str] = {}
    used: set[str] = set()
    for item in inputs:
        path = Path(item)
        folder = path if path.is_dir() else path.parent
        key = folder.resolve()
        if key not in by_folder:
            base = key.name or "root"
            name, k = base, 1
            while name in used:
                k += 1
                name = f"{base}_{k}"
            used.add(name)
            by_folder[key] = name
        names.append(by_folder[key])
    return names


def _absolute(path: Path) -> Path:
    """``path`` made absolute without resolving symbolic links (the name the user gave)."""
    return Path(os.path.abspath(path))


def scan_inputs(inputs: Sequence[str | Path], *, batch: str | None = None) -> Scan:
    """List the image files behind command-line inputs.

    Parameters
    ----------
    inputs : sequence of str or Path
        Smear files, folders of smears and crop folders.
    batch : str, optional
        One batch name for all inputs (``--batch``); defaults per input (see
        :func:`default_batch_names`). It never enters the cell ids: those start with
        the input name (:func:`default_batch_names`).

    Returns
    -------
    Scan
        Sources with absolute paths, each file once. A folder that cannot be listed
        (no permission), a dangling symbolic link and a non-image file are in
        ``skipped``, not errors.
    """
    scan = Scan()
    seen: set[Path] = set()
    names = default_batch_names(inputs)
    batches = [batch] * len(inputs) if batch else names
    for item, name, bname in zip(inputs, names, batches, strict=True):
        path = _absolute(Path(item))
        if _dangling(path):
            scan.skipped.append((str(path), "dangling symbolic link (its target is gone)"))
            continue
        if not path.exists():
            scan.skipped.append((str(path), "no such file or folder"))
            continue
        if path.is_file():
            if not is_image_file(path):
                scan.skipped.append((str(path), "not an image file (by its extension)"))
                continue
            scan.sources.append(Source("smear", path, bname, path.name, input_name=name))
            continue
        if not os.access(path, os.R_OK | os.X_OK):
            scan.skipped.append((str(path), "folder cannot be read (permission denied)"))
            continue
        for link in _dangling_in(path):
            scan.skipped.append((str(link), "dangling symbolic link (its target is gone)"))
        kind = classify_folder(path)
        if kind == "empty":
            scan.empty_inputs.append((str(path), "folder holds no images"))
        elif kind == "smears":
            for img in _images_in(path):
                scan.sources.append(Source("smear", img, bname, img.name, input_name=name))
        else:
            for img in _images_in(path):
                scan.skipped.append(
                    (str(img), "image at the root of a crop folder, not in a class folder")
                )
            for sub in sorted(p for p in path.iterdir() if p.is_dir() and _visible(p)):
                try:
                    entries = sorted(p for p in sub.iterdir() if _visible(p))
                except OSError as exc:
                    scan.skipped.append((str(sub), f"folder cannot be read ({exc.strerror})"))
                    continue
                for img in entries:
                    if _dangling(img):
                        scan.skipped.append(
                            (str(img), "dangling symbolic link (its target is gone)")
                        )
                    elif not img.is_file():
                        continue
                    elif is_image_file(img):
                        rel = f"{sub.name}/{img.name}"
                        scan.sources.append(
                            Source(
                                "crop",
                                img,
                                bname,
                                rel,
                                label=folder_label(sub.name),
                                input_name=name,
                            )
                        )
                    else:
                        scan.skipped.append((str(img), "not an image file (by its extension)"))
    unique = []
    for src in scan.sources:  # an input given twice (or a file inside a folder given too)
        if src.path not in seen:
            seen.add(src.path)
            unique.append(src)
    scan.sources = unique
    return scan


def make_cell_id(input_name: str, rel: str, n: int) -> str:
    """Cell id ``"<input name>/<rel>#<n>"`` (DESIGN.md): assigned once, never recomputed."""
    return f"{input_name}/{rel}#{n}"


def id_prefix(cell_ids: Sequence[str] | pd.Index) -> np.ndarray:
    """The ``"<input name>/<rel>"`` part of cell ids (everything before the last ``#``)."""
    return np.array([str(c).rpartition("#")[0] or str(c) for c in cell_ids], dtype=object)


def id_number(cell_ids: Sequence[str] | pd.Index) -> np.ndarray:
    """The ``<n>`` of cell ids as int64 (-1 where an id has no ``#<n>`` tail)."""
    tails = [str(c).rpartition("#")[2] for c in cell_ids]
    return np.array([int(t) if t.isdigit() else -1 for t in tails], dtype=np.int64)


def default_slide(kind: SourceKind, prefix: str, batch: str) -> str:
    """Default ``slide`` of a cell (DESIGN.md): its smear (id prefix), or the batch for crops."""
    return batch if kind == "crop" else prefix


def crop_cell(
    input_name: str,
    rel: str,
    source: str,
    *,
    size: tuple[int, int],
    batch: str,
    slide: str,
    label: str | None,
) -> dict[str, Any]:
    """The one cell of a single-cell crop, as a cell-table row: the whole image.

    Parameters
    ----------
    input_name, rel : str
        Its input's name and its path relative to the input (the id's parts).
    source : str
        The image file.
    size : tuple of int
        ``(height, width)`` of the image.
    batch, slide : str
    label : str or None
        The crop folder's class.

    Returns
    -------
    dict
        ``cell_id`` (number 0), ``source``, ``batch``, ``slide``, the centre, the box
        ``0, 0, width, height``, ``score`` 1 and ``label``.
    """
    height, width = size
    return {
        "cell_id": make_cell_id(input_name, rel, 0),
        "source": source,
        "batch": batch,
        "slide": slide,
        "x": width / 2.0,
        "y": height / 2.0,
        "x0": 0,
        "y0": 0,
        "x1": width,
        "y1": height,
        "score": 1.0,
        "label": label,
    }


def _crop_row(source: Source) -> dict:
    return crop_cell(
        source.input_name or source.batch,
        source.rel,
        str(source.path),
        size=image_size(source.path),
        batch=source.batch,
        slide=default_slide("crop", source.id_prefix, source.batch),
        label=source.label,
    )


def detections_to_cells(
    detections: pd.DataFrame,
    *,
    source: str,
    batch: str,
    rel: str,
    input_name: str | None = None,
    slide: str | None = None,
) -> pd.DataFrame:
    """Turn a frame of detections into cell rows (index = cell id).

    Parameters
    ----------
    detections : pandas.DataFrame
        Columns ``x, y, x0, y0, x1, y1`` and optionally ``score``
        (see :func:`~.detect.detect_wbcs`), in cell order.
    source : str
        Image path or napari layer name.
    batch : str
        Batch of the cells.
    rel : str
        Path of the image relative to its input (the middle of the cell ids).
    input_name : str, optional
        First part of the cell ids; defaults to ``batch``.
    slide : str, optional
        Slide of the cells; defaults to :func:`default_slide` (the id prefix).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`CELL_COLUMNS`, indexed by ``cell_id``
        ``"<input name>/<rel>#<n>"`` with n = 0, 1, ... in detection order.
    """
    n = len(detections)
    name = input_name or batch
    prefix = f"{name}/{rel}"
    frame = pd.DataFrame(
        {
            "source": [source] * n,
            "batch": [batch] * n,
            "slide": [slide or default_slide("smear", prefix, batch)] * n,
            "x": detections["x"].to_numpy(dtype=float),
            "y": detections["y"].to_numpy(dtype=float),
            "x0": detections["x0"].to_numpy(dtype=np.int64),
            "y0": detections["y0"].to_numpy(dtype=np.int64),
            "x1": detections["x1"].to_numpy(dtype=np.int64),
            "y1": detections["y1"].to_numpy(dtype=np.int64),
            "score": (detections["score"].to_numpy(dtype=float) if "score" in detections else 1.0),
            "label": [None] * n,
        },
        index=pd.Index([make_cell_id(name, rel, k) for k in range(n)], name="cell_id"),
    )
    return frame


#: Why detection found nothing in a greyscale image (the detector reads nucleus colour).
GREY_NO_CELLS = (
    "no WBCs found: detection needs a Romanowsky-stained colour image (this one is grey)"
)
#: Why detection found nothing in a colour image.
NO_CELLS = "no WBCs found"


def is_greyscale(image: Any) -> bool:
    """Whether an ``(H, W, 3)`` image has (nearly) equal channels, on a sparse grid of pixels."""
    h, w = image.shape[:2]
    step = max(1, int(max(h, w) // 256))
    sample = np.asarray(image[::step, ::step], dtype=np.int16)
    if sample.ndim < 3 or sample.shape[-1] < 3:
        return True
    return (
        int(np.abs(sample[..., 0] - sample[..., 1]).max()) <= 2
        and int(np.abs(sample[..., 1] - sample[..., 2]).max()) <= 2
    )


def no_cells_reason(image: Any) -> str:
    """The message for an image in which detection found no WBC."""
    return GREY_NO_CELLS if is_greyscale(image) else NO_CELLS


@dataclass
class Collected:
    """Cells gathered from inputs by :func:`collect_cells`.

    Attributes
    ----------
    cells : pandas.DataFrame
        One row per cell, indexed by cell id, columns :data:`CELL_COLUMNS`.
    skipped : list of (str, str)
        Files that could not be read, with the reason.
    empty_inputs : list of (str, str)
        Inputs that held no image.
    n_sources : int
        Number of image files read.
    no_cells : list of (str, str)
        Smears read in which detection found no WBC, with the reason.
    """

    cells: pd.DataFrame
    skipped: list[tuple[str, str]]
    empty_inputs: list[tuple[str, str]]
    n_sources: int
    no_cells: list[tuple[str, str]] = field(default_factory=list)


def collect_cells(
    inputs: Sequence[str | Path] | Scan,
    *,
    batch: str | None = None,
    pixel_size_um: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Collected:
    """Find every cell behind command-line inputs.

    Smears are read and their WBCs detected (:func:`~.detect.detect_wbcs`); each
    crop in a crop folder is one cell labelled with its folder name (only its
    header is read here).

    Parameters
    ----------
    inputs : sequence of str or Path, or Scan
        Files and folders (see module docstring), or a :func:`scan_inputs` result.
    batch : str, optional
        One batch name for all inputs.
    pixel_size_um : float, optional
        Pixel size of the smears (um per pixel); sets detection sizes and crop size.
    progress : callable, optional
        ``progress(done, total)`` after each image file.

    Returns
    -------
    Collected

    Raises
    ------
    ValueError
        If two inputs give the same cell id (same input name and relative path).
    """
    scan = inputs if isinstance(inputs, Scan) else scan_inputs(inputs, batch=batch)
    skipped = list(scan.skipped)
    no_cells: list[tuple[str, str]] = []
    rows: list[pd.DataFrame] = []
    crop_rows: list[dict] = []
    total = len(scan.sources)
    n_read = 0
    for done, source in enumerate(scan.sources, start=1):
        try:
            if source.kind == "crop":
                crop_rows.append(_crop_row(source))
                if len(crop_rows) >= 4096:
                    rows.append(_crop_frame(crop_rows))
                    crop_rows = []
            else:
                if crop_rows:  # keep the cells in source order
                    rows.append(_crop_frame(crop_rows))
                    crop_rows = []
                cells, why = smear_cells(source, pixel_size_um=pixel_size_um)
                if why:
                    no_cells.append((str(source.path), why))
                rows.append(cells)
            n_read += 1
        except ImageReadError as exc:
            skipped.append((str(source.path), _reason(exc, source.path)))
        if progress is not None:
            progress(done, total)
    if crop_rows:
        rows.append(_crop_frame(crop_rows))
    rows = [r for r in rows if len(r)]
    if rows:
        cells = pd.concat(rows)
    else:
        cells = pd.DataFrame(columns=CELL_COLUMNS, index=pd.Index([], name="cell_id"))
    dup = cells.index[cells.index.duplicated()]
    if len(dup):
        raise ValueError(
            f"two inputs give the same cell id {dup[0]!r}; give them different folder names"
        )
    return Collected(cells, skipped, list(scan.empty_inputs), n_read, no_cells)


def smear_cells(
    source: Source, *, pixel_size_um: float | None = None, image: Any = None
) -> tuple[pd.DataFrame, str | None]:
    """Read a smear file (unless ``image`` is given) and detect its WBCs.

    Returns
    -------
    (pandas.DataFrame, str or None)
        The cells (columns :data:`CELL_COLUMNS`) and, when none was found, why.

    Raises
    ------
    ImageReadError
        If the file cannot be read.
    """
    from napari_hemofm.core.detect import detect_wbcs

    if image is None:
        image = read_image(source.path)
    found = detect_wbcs(image, pixel_size_um=pixel_size_um)
    cells = detections_to_cells(
        found,
        source=str(source.path),
        batch=source.batch,
        rel=source.rel,
        input_name=source.input_name or source.batch,
    )
    return cells, (no_cells_reason(image) if len(cells) == 0 else None)


def _crop_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows).set_index("cell_id")


def _reason(exc: Exception, path: Path) -> str:
    text = str(exc)
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def cells_from_image(
    image: np.ndarray,
    *,
    name: str,
    batch: str | None = None,
    pixel_size_um: float | None = None,
    input_name: str | None = None,
    rel: str | None = None,
) -> pd.DataFrame:
    """Detect the WBCs in an image array (e.g. a napari Image layer's data).

    Parameters
    ----------
    image : ndarray
        Any image :func:`~.io.to_rgb8` accepts (grey, RGB, RGBA, 8/16 bit).
    name : str
        The layer name: cells get ``source = name``.
    batch : str, optional
        Defaults to ``input_name``.
    pixel_size_um : float, optional
        Pixel size in um.
    input_name, rel : str, optional
        The cell ids are ``"<input_name>/<rel>#<n>"``; both default to ``name`` (a
        layer without a file). For a layer opened from a file, pass the file's folder
        name and file name, so that napari and the CLI give the same ids.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`CELL_COLUMNS`, indexed by cell id.
    """
    from napari_hemofm.core.detect import detect_wbcs
    from napari_hemofm.core.io import LazyRGBImage, to_rgb8

    rgb = image if isinstance(image, LazyRGBImage) else to_rgb8(image)
    found = detect_wbcs(rgb, pixel_size_um=pixel_size_um)
    input_name = input_name or name
    return detections_to_cells(
        found, source=name, batch=batch or input_name, rel=rel or name, input_name=input_name
    )

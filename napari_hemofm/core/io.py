"""Reading images (smears and crops) and saving / loading project files.

Every image enters the project through :func:`read_image` (a file) or
:func:`to_rgb8` (an array, e.g. from a napari layer), so the rest of the code only
ever sees ``(H, W, 3)`` uint8 RGB: 16-bit, float, greyscale and RGBA images are
normalised here. Large TIFFs are opened lazily (memory-mapped, or tile-wise through
Zarr for compressed / tiled files) and normalised per window.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
"""File extensions read as images (lower case)."""

TIFF_EXTENSIONS = frozenset({".tif", ".tiff"})

LAZY_TIFF_BYTES = 256 * 2**20
"""TIFFs whose decoded RGB size exceeds this are opened lazily instead of read whole."""

MEMORY_FRACTION = 0.5
"""A non-TIFF image is refused when its decoded size exceeds this share of free memory."""


class ImageReadError(ValueError):
    """An image file could not be read (corrupt, empty, not an image, too large)."""


def is_image_file(path: str | Path) -> bool:
    """Whether ``path`` has an image extension (see :data:`IMAGE_EXTENSIONS`)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------- normalising
def _effective_max(arr: np.ndarray) -> float:
    """Full-scale value of an integer image: the smallest ``2**bits - 1`` holding its max.

    A 12-bit camera image stored as uint16 is scaled by 4095, not 65535, so that it
    is not rendered almost black; an 8-bit image stays as it is.
    """
    info = np.iinfo(arr.dtype)
    peak = int(arr.max()) if arr.size else 0
    if peak <= 255:
        return 255.0 if info.bits > 8 else float(info.max)
    bits = max(8, int(np.ceil(np.log2(peak + 1))))
    return float(min(2**bits - 1, info.max))


def to_rgb8(
    image: np.ndarray, *, scale_max: float | None = None, background: int = 255
) -> np.ndarray:
    """Normalise an image array to ``(H, W, 3)`` uint8 RGB.

    Parameters
    ----------
    image : ndarray
        ``(H, W)`` or ``(H, W, 1)`` greyscale, ``(H, W, 2)`` greyscale + alpha,
        ``(H, W, 3)`` RGB, ``(H, W, 4)`` RGBA, or channel-first ``(3|4, H, W)``;
        integer (8 to 64 bit) or float (``[0, 1]``) or bool.
    scale_max : float, optional
        Value mapped to 255 for non-uint8 input. By default the full scale of the
        data's effective bit depth (see Notes), or 1.0 for float images with a
        maximum <= 1.
    background : int
        Grey level that transparent pixels are composited over (white, like an
        empty slide).

    Returns
    -------
    ndarray of shape (H, W, 3), dtype uint8

    Raises
    ------
    ImageReadError
        If the array has no image shape (e.g. a 3-D stack or 5 channels).

    Notes
    -----
    Integer images wider than 8 bit are divided by ``2**b - 1`` where ``b`` is the
    smallest bit depth (>= 8) that holds the image's maximum: a 12-bit camera image
    stored in uint16 keeps its contrast.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise ImageReadError(
            f"not a 2-D image: shape {arr.shape} (expected (H, W), (H, W, 3) or (H, W, 4))"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(f"empty image: shape {arr.shape}")
    if arr.dtype == np.uint8:
        scaled = arr.astype(np.float32) if arr.shape[-1] in (2, 4) else arr
    elif arr.dtype == bool:
        scaled = arr.astype(np.float32) * 255.0
    else:
        if scale_max is None:
            if np.issubdtype(arr.dtype, np.integer):
                scale_max = _effective_max(arr)
            else:
                finite_max = float(np.nanmax(arr)) if arr.size else 1.0
                scale_max = 1.0 if finite_max <= 1.0 else 255.0
        scaled = arr.astype(np.float32) * (255.0 / float(scale_max))
    channels = scaled.shape[-1]
    if channels in (2, 4):
        colour, alpha = scaled[..., :-1], np.clip(scaled[..., -1:], 0, 255) / 255.0
        scaled = colour * alpha + background * (1.0 - alpha)
        channels -= 1
    if channels == 1:
        scaled = np.repeat(scaled, 3, axis=-1)
    if scaled.dtype != np.uint8:
        scaled = np.clip(np.nan_to_num(scaled), 0, 255)
        scaled = np.rint(scaled).astype(np.uint8)
    return np.ascontiguousarray(scaled)


class LazyRGBImage:
    """A large image read window by window and normalised to uint8 RGB on access.

    Behaves like a read-only ``(H, W, 3)`` uint8 array for slicing: ``img[y0:y1,
    x0:x1]`` reads only that window from the memory map (or Zarr store) and returns a
    NumPy array. ``np.asarray(img)`` reads everything: avoid it for huge files.

    Parameters
    ----------
    raw : array-like
        ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` raw pixels (memmap or Zarr array).
    scale_max : float, optional
        Full-scale value for non-uint8 data, fixed for the whole image so that
        windows are normalised alike (estimated from a strided sample when omitted).
    """

    def __init__(self, raw: Any, scale_max: float | None = None) -> None:
        self._raw = raw
        shape = tuple(raw.shape)
        self._channel_first = len(shape) == 3 and shape[0] in (3, 4) and shape[-1] > 4
        hw = shape[1:] if self._channel_first else shape[:2]
        self.shape = (int(hw[0]), int(hw[1]), 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        if scale_max is None and np.dtype(raw.dtype) != np.uint8:
            step = max(1, int(np.sqrt(hw[0] * hw[1] / 4e6)))
            sample = self._window(slice(None, None, step), slice(None, None, step))
            if np.issubdtype(sample.dtype, np.integer):
                scale_max = _effective_max(sample)
            else:
                scale_max = 1.0 if float(np.nanmax(sample)) <= 1.0 else 255.0
        self.scale_max = scale_max

    def _window(self, rows: slice, cols: slice) -> np.ndarray:
        if self._channel_first:
            return np.asarray(self._raw[:, rows, cols])
        return np.asarray(self._raw[rows, cols])

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        rows = key[0] if len(key) > 0 else slice(None)
        cols = key[1] if len(key) > 1 else slice(None)
        if not (isinstance(rows, slice) and isinstance(cols, slice)):
            raise TypeError("LazyRGBImage supports slicing rows and columns only")
        out = to_rgb8(self._window(rows, cols), scale_max=self.scale_max)
        return out[(slice(None), slice(None), *key[2:])] if len(key) > 2 else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyRGBImage(shape={self.shape}, raw={type(self._raw).__name__})"


def _free_memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with napari
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _open_tiff(path: Path) -> np.ndarray | LazyRGBImage:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ImageReadError(f"{path}: TIFF has no image data")
            series = tif.series[0]
            shape = series.shape
            ndim_ok = len(shape) == 2 or (len(shape) == 3 and min(shape[0], shape[-1]) <= 4)
            if not ndim_ok:
                raise ImageReadError(
                    f"{path}: TIFF of shape {shape} is not a 2-D image "
                    "(stacks and multi-channel fluorescence are not supported)"
                )
            n_pixels = int(np.prod(shape[:2] if shape[-1] <= 4 else shape[1:]))
            lazy = n_pixels * 3 > LAZY_TIFF_BYTES
            if not lazy:
                return to_rgb8(series.asarray())
        try:
            raw = tifffile.memmap(path, mode="r")
        except ValueError:
            # compressed or tiled: read tile-wise through a Zarr store
            import zarr

            store = tifffile.imread(path, aszarr=True)
            raw = zarr.open(store, mode="r")
            if not hasattr(raw, "shape"):  # a multiscale group: take level 0
                raw = raw["0"]
        return LazyRGBImage(raw)
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot read TIFF ({type(exc).__name__}: {exc})") from exc


def read_image(path: str | Path) -> np.ndarray | LazyRGBImage:
    """Read a smear or crop image as ``(H, W, 3)`` uint8 RGB.

    Parameters
    ----------
    path : str or Path
        A JPEG, PNG, BMP or TIFF file: 8 or 16 bit, RGB, RGBA or greyscale.

    Returns
    -------
    ndarray of shape (H, W, 3), dtype uint8, or LazyRGBImage
        TIFFs larger than :data:`LAZY_TIFF_BYTES` come back as a
        :class:`LazyRGBImage` that reads windows on demand (memory-mapped).

    Raises
    ------
    ImageReadError
        With a one-line reason: missing, empty (0 bytes), not an image, truncated or
        corrupt, or (JPEG / PNG / BMP) too large to decode into free memory.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    if path.suffix.lower() in TIFF_EXTENSIONS:
        return _open_tiff(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None  # we check memory ourselves below
            with Image.open(path) as img:
                width, height = img.size
                bands = len(img.getbands())
                bytes_per = 2 if img.mode.startswith("I;16") or img.mode == "I" else 1
                needed = width * height * max(bands, 3) * bytes_per
                free = _free_memory_bytes()
                if needed > MEMORY_FRACTION * free:
                    raise ImageReadError(
                        f"{path}: {width}x{height} image needs {needed / 2**30:.1f} GiB to "
                        f"decode, more than half the free memory ({free / 2**30:.1f} GiB); "
                        "save it as a tiled TIFF, which is read window by window"
                    )
                img.load()
                if img.mode == "P":
                    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                    img = img.convert("RGB")
                elif img.mode == "1":
                    img = img.convert("L")
                arr = np.asarray(img)
    except ImageReadError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{path}: not an image file") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: corrupt or truncated image ({exc})") from exc
    return to_rgb8(arr)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file, from its header only.

    Raises
    ------
    ImageReadError
        If the header cannot be read.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_EXTENSIONS:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.series[0].shape
            hw = shape[1:3] if len(shape) == 3 and shape[0] in (3, 4) else shape[:2]
            return int(hw[0]), int(hw[1])
        from PIL import Image

        with Image.open(path) as img:
            return int(img.size[1]), int(img.size[0])
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot read image header ({exc})") from exc


def format_skipped(skipped: Sequence[tuple[str, str]]) -> str:
    """One message naming every skipped file and why (empty string when none)."""
    if not skipped:
        return ""
    lines = "\n".join(f"  {path}: {why}" for path, why in skipped)
    return f"skipped {len(skipped)} file(s) that could not be read:\n{lines}"


def warn_skipped(skipped: Sequence[tuple[str, str]]) -> str | None:
    """Issue one :class:`SkippedFilesWarning` naming every skipped file; return its text."""
    if not skipped:
        return None
    text = format_skipped(skipped)
    warnings.warn(text, SkippedFilesWarning, stacklevel=2)
    return text


class SkippedFilesWarning(UserWarning):
    """Some input files were skipped (corrupt, empty or not images)."""


# ------------------------------------------------------------------- projects
def write_csv(frame: Any, path: str | Path) -> Path:
    """Write a pandas DataFrame as CSV (no index) atomically.

    The text goes to a temporary name beside ``path`` and is then renamed over it, so an
    interrupted write never leaves half a file under ``path``.

    Returns
    -------
    Path
        The file written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_project(table: CellTable, path: str | Path) -> Path:
    """Write a cell table to an ``.h5ad`` project file.

    The file is written to a temporary name beside ``path`` and then renamed over it,
    so a crash while saving leaves the previous project intact. Afterwards the table
    keeps its label journal beside the file (``<name>.labels.jsonl``, emptied now that
    the file holds every label): later label changes are appended there.

    Parameters
    ----------
    table : CellTable
    path : str or Path
        Target file; ``.h5ad`` is appended when missing.

    Returns
    -------
    Path
        The file written.
    """
    from napari_hemofm.core.cells import OBS_COLUMNS

    path = Path(path)
    if path.suffix != ".h5ad":
        path = path.with_name(path.name + ".h5ad")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    adata = table.adata
    try:
        adata.write_h5ad(tmp)
        # write_h5ad turns string columns into categoricals in place; keep the
        # in-memory contract (``source`` is str)
        for name, dtype in OBS_COLUMNS.items():
            if dtype == "object" and not isinstance(adata.obs[name].dtype, np.dtypes.ObjectDType):
                adata.obs[name] = adata.obs[name].astype(str)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    from napari_hemofm.core.journal import LabelJournal, journal_path

    # the saved file now holds every label: start this project's journal empty
    table.journal = LabelJournal(journal_path(path))
    table.journal.clear()
    return path


def load_project(path: str | Path) -> CellTable:
    """Read a project file written by :func:`save_project`, replaying its label journal.

    Label changes appended to ``<name>.labels.jsonl`` since the last save are applied,
    and the table keeps appending to that journal.

    Parameters
    ----------
    path : str or Path
        An ``.h5ad`` file; any AnnData file with the contract columns loads (missing
        optional columns are added empty).

    Returns
    -------
    CellTable

    Raises
    ------
    ValueError
        If the file is not a readable AnnData file or lacks the required columns.
    """
    import anndata as ad

    from napari_hemofm.core.cells import REQUIRED_COLUMNS, CellTable

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such project file")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable .h5ad file ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in adata.obs.columns]
    if missing:
        raise ValueError(f"{path}: not a napari-hemofm project, obs lacks {missing}")
    from napari_hemofm.core.journal import LabelJournal, journal_path

    table = CellTable(adata)
    journal = LabelJournal(journal_path(path))
    journal.replay(table)  # label changes made after the last save
    table.journal = journal
    return table


ProgressCallback = Callable[[int, int], None]

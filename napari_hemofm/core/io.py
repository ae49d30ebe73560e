"""Reading images (smears and crops) and saving / loading project files.

Every image enters the project through :func:`read_image` (a file) or
:func:`to_rgb8` (an array, e.g. from a napari layer), so the rest of the code only
ever sees ``(H, W, 3)`` uint8 RGB: 16-bit, float, greyscale and RGBA images are
normalised here. Large TIFFs are opened lazily (memory-mapped, or tile-wise through
Zarr for compressed / tiled files) and normalised per window.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
"""File extensions read as images (lower case)."""

TIFF_EXTENSIONS = frozenset({".tif", ".tiff"})

LAZY_TIFF_BYTES = 256 * 2**20
"""TIFFs whose decoded RGB size exceeds this are opened lazily instead of read whole."""

MEMORY_FRACTION = 0.5
"""A JPEG / PNG / BMP is refused when the peak memory of reading it (see
:func:`decode_peak_bytes`) exceeds this share of the memory the process may still use
(:func:`available_memory_bytes`): the rest is left to what else the process holds."""


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
    """Memory the system has available (free + reclaimable), whatever the cgroup says."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with napari
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2): no limit


def _read_stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def cgroup_memory_room(
    root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup"
) -> int | None:
    """Bytes this process may still allocate under its cgroup's memory limit.

    Containers (Docker, Kubernetes, SLURM jobs) cap memory with a cgroup; the kernel kills
    a process that passes the cap however much physical memory the machine has free. Both
    cgroup v2 (``memory.max``, ``memory.current``) and v1 (``memory.limit_in_bytes``,
    ``memory.usage_in_bytes``) are read, at the process's own cgroup path and at the root
    of the mount (what a container sees); the tightest limit wins.

    Parameters
    ----------
    root : str or Path
        Where the cgroup file system is mounted.
    proc_cgroup : str or Path
        The process's cgroup membership file.

    Returns
    -------
    int or None
        ``limit - (usage - inactive file cache)`` (the page cache is given back under
        pressure, as ``docker stats`` counts it), never negative; None when no limit is
        set or the files cannot be read (not Linux, no cgroup mounted).
    """
    root = Path(root)
    own: dict[str, str] = {}  # controller ("" for v2) -> path
    try:
        for line in Path(proc_cgroup).read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3:
                for controller in parts[1].split(","):
                    own[controller] = parts[2].lstrip("/")
    except OSError:
        pass
    v2_dirs = [root / own[""], root] if own.get("") else [root]
    v1_dirs = [root / "memory" / own["memory"], root / "memory"] if own.get("memory") else []
    v1_dirs.append(root / "memory")
    rooms = []
    for folder in v2_dirs:
        limit = _read_int(folder / "memory.max")
        usage = _read_int(folder / "memory.current")
        if limit is not None and usage is not None:
            cache = _read_stat(folder / "memory.stat", "inactive_file")
            rooms.append(limit - max(0, usage - cache))
    for folder in v1_dirs:
        limit = _read_int(folder / "memory.limit_in_bytes")
        usage = _read_int(folder / "memory.usage_in_bytes")
        if limit is not None and usage is not None and limit < 2**62:  # 2**63-ish: none
            cache = _read_stat(folder / "memory.stat", "total_inactive_file")
            rooms.append(limit - max(0, usage - cache))
    return max(0, min(rooms)) if rooms else None


def available_memory_bytes() -> int:
    """Memory this process may still use, in bytes.

    The system's available memory, capped by the room left under the process's cgroup
    limit (:func:`cgroup_memory_room`).
    """
    free = _free_memory_bytes()
    room = cgroup_memory_room()
    return free if room is None else min(free, room)


#: Bytes per pixel that :func:`to_rgb8` needs on top of its input array: uint8 RGB
#: none, uint8 grey the RGB copy (and what the decoder leaves behind), float32 work arrays
#: for alpha compositing or for rescaling other bit depths. Set from peak RSS measured
#: by benchmarks/bench_decode_memory.py (docs/performance.md).
_NORMALISE_BYTES_PER_PIXEL = {"rgb8": 0, "grey8": 5, "alpha": 63, "scaled": 42}


def _mode_after_read(mode: str, has_transparency: bool) -> str:
    """The Pillow mode :func:`read_image` converts ``mode`` to before making an array."""
    if mode == "P":
        return "RGBA" if has_transparency else "RGB"
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return "RGB"
    if mode == "1":
        return "L"
    return mode


def decode_peak_bytes(
    width: int, height: int, mode: str, *, has_transparency: bool = False
) -> int:
    """Peak memory of reading a JPEG / PNG / BMP with :func:`read_image`, from its header.

    Parameters
    ----------
    width, height : int
        Image size in pixels (``PIL.Image.size``).
    mode : str
        Pillow mode of the file (``"RGB"``, ``"RGBA"``, ``"L"``, ``"I;16"``, ``"P"``, ...).
    has_transparency : bool
        A palette image with a transparency entry (decoded as RGBA).

    Returns
    -------
    int
        Bytes: the larger of the decoding phase (Pillow's decoded buffer, its mode
        conversion, and the 2x of ``tobytes`` building the NumPy array) and the
        normalising phase (the array plus :func:`to_rgb8`'s work arrays).
    """
    from PIL import ImageMode

    def size_of(m: str) -> tuple[int, int, int, str]:
        """(bytes per pixel in Pillow, in the NumPy array; bands; typestr)."""
        desc = ImageMode.getmode(m)
        per_sample, bands = int(desc.typestr[-1]), len(desc.bands)
        # Pillow keeps multi-band 8-bit images (RGB, LA, YCbCr, ...) at 4 bytes per pixel
        pillow = 4 if per_sample == 1 and bands > 1 else bands * per_sample
        return pillow, bands * per_sample, bands, desc.typestr

    n = int(width) * int(height)
    raw, _, _, _ = size_of(mode)
    after = _mode_after_read(mode, has_transparency)
    conv_pillow, conv, bands, typestr = size_of(after)
    decoding = n * raw + (n * conv_pillow if after != mode else 0) + 2 * n * conv
    is_u8 = typestr.endswith(("u1", "b1"))
    if bands in (2, 4):
        key = "alpha"
    elif is_u8:
        key = "rgb8" if bands == 3 else "grey8"
    else:
        key = "scaled"
    normalising = n * conv + n * _NORMALISE_BYTES_PER_PIXEL[key]
    return max(decoding, normalising)


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


_PILLOW_OPEN_LOCK = threading.Lock()


@contextmanager
def _open_pillow(path: Path) -> Iterator[Any]:
    """``PIL.Image.open`` without Pillow's decompression-bomb size limit, for this call.

    Pillow refuses images above ~179 Mpx (``Image.MAX_IMAGE_PIXELS``) in ``open``, before
    anyone can look at the header; :func:`read_image` checks the memory itself, from the
    header. The limit is lifted only around this ``open`` (under a lock, since it is a
    module global) and put back, so Pillow's protection stays for everyone else.
    """
    from PIL import Image

    with _PILLOW_OPEN_LOCK:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            img = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    with img:
        yield img


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
        corrupt, or (JPEG / PNG / BMP) too large: the peak memory of reading it
        (:func:`decode_peak_bytes`, from the header) exceeds :data:`MEMORY_FRACTION` of
        what the process may use (:func:`available_memory_bytes`, cgroup limit included).
    """
    from PIL import UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    if path.suffix.lower() in TIFF_EXTENSIONS:
        return _open_tiff(path)
    try:
        with _open_pillow(path) as img:  # reads the header only
            width, height = img.size
            needed = decode_peak_bytes(
                width, height, img.mode, has_transparency="transparency" in img.info
            )
            free = available_memory_bytes()
            if needed > MEMORY_FRACTION * free:
                raise ImageReadError(
                    f"{path}: {width}x{height} {img.format or ''} image needs about "
                    f"{needed / 2**30:.2f} GiB to read, more than "
                    f"{MEMORY_FRACTION:.0%} of the memory this process may use "
                    f"({free / 2**30:.2f} GiB); save it as a tiled TIFF, which is read "
                    "window by window"
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
    except MemoryError:  # the estimate above keeps this rare; never a traceback
        raise ImageReadError(f"{path}: ran out of memory while decoding") from None
    try:
        return to_rgb8(arr)
    except MemoryError:
        raise ImageReadError(f"{path}: ran out of memory while converting to RGB") from None


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
        with _open_pillow(path) as img:
            return int(img.size[1]), int(img.size[0])
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot read image header ({exc})") from exc


def format_skipped(skipped: Sequence[tuple[str, str]]) -> str:
    """One message naming every skipped file and why (empty string when none)."""
    if not skipped:
        return ""
    lines = "\n".join(f"  {path}: {why}" for path, why in skipped)
    return f"skipped {len(skipped)} file(s) that could not be read:\n{lines}"


# ------------------------------------------------------------------- outputs
class OutputPathError(ValueError):
    """An output path cannot be written as a file (a folder, a FIFO, a device, ...)."""


def resolve_output(path: str | Path) -> tuple[Path, int | None]:
    """The file that writing ``path`` really replaces, and the mode to give it.

    Every output of napari-hemofm is written to a temporary file beside its target and
    renamed over it. Renaming over a symbolic link would replace the link itself, and a
    new file would get the default mode; so writers ask here first: a link is followed to
    its target (the link stays, the file it points to is replaced) and an existing file's
    permission bits are kept.

    Parameters
    ----------
    path : str or Path
        The output path as the user named it.

    Returns
    -------
    target : Path
        ``path`` with every symbolic link resolved (a dangling link resolves to the file it
        names, which is then created).
    mode : int or None
        Permission bits of the existing target (``stat.S_IMODE``), to apply to the new
        file; None when the target does not exist yet (the umask decides).

    Raises
    ------
    OutputPathError
        If the target exists and is not a regular file (a folder, a FIFO, a socket, a
        character or block device): writing there would block, fail, or destroy it.
    """
    import stat

    path = Path(path).expanduser()
    target = Path(os.path.realpath(path))
    try:
        st = target.stat()
    except (FileNotFoundError, NotADirectoryError):  # new (a parent may be missing too)
        return target, None
    if stat.S_ISREG(st.st_mode):
        return target, stat.S_IMODE(st.st_mode)
    kind = (
        "a folder"
        if stat.S_ISDIR(st.st_mode)
        else "a named pipe (FIFO)"
        if stat.S_ISFIFO(st.st_mode)
        else "a device"
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        else "a socket"
        if stat.S_ISSOCK(st.st_mode)
        else "not a regular file"
    )
    via = f" (through the link {path})" if target != path.absolute() else ""
    raise OutputPathError(f"{target}{via} is {kind}, not a file that can be written")


def _replace_with(tmp: Path, target: Path, mode: int | None) -> None:
    """Give ``tmp`` the kept ``mode`` and rename it over ``target`` (atomic)."""
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, target)


# ------------------------------------------------------------------- projects
TEMP_MARK = ".tmp-"
"""Temporary files are ``.<name>.tmp-<host>-<pid>`` beside their target."""


def temp_path(target: str | Path) -> Path:
    """The temporary name a file is written under before it is renamed to ``target``.

    ``.<name>.tmp-<host>-<pid>``: hidden, and naming the writing process, so that a
    temporary file left by a process that died can be told from one being written
    (:func:`clean_stale_temp_files`).
    """
    import socket

    target = Path(target)
    host = (socket.gethostname() or "localhost").replace("-", "_")
    return target.with_name(f".{target.name}{TEMP_MARK}{host}-{os.getpid()}")


def clean_stale_temp_files(project: str | Path) -> list[Path]:
    """Remove temporary files of ``project`` that a dead process left behind.

    Looks beside the project for ``.<stem>.*.tmp-<host>-<pid>`` (and the older
    ``.<stem>.*.tmp-<pid>``) written on this host by a process that no longer runs
    (an interrupted save, a killed journal repair). Files of live processes and of
    other hosts are kept.

    Returns
    -------
    list of Path
        The files removed.
    """
    import socket

    from napari_hemofm.core.lock import pid_alive

    project = Path(project)
    stem = project.name[: -len(".h5ad")] if project.name.endswith(".h5ad") else project.name
    host = (socket.gethostname() or "localhost").replace("-", "_")
    removed = []
    try:
        candidates = list(project.parent.glob(f".{stem}.*{TEMP_MARK}*"))
    except OSError:
        return removed
    for tmp in candidates:
        tail = tmp.name.rsplit(TEMP_MARK, 1)[-1]
        who, _, pid = tail.rpartition("-")
        if not pid.isdigit() or (who and who != host):
            continue
        if pid_alive(int(pid)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            continue
    return removed


def replace_atomically(target: str | Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a fsynced temporary file and a rename."""
    target = Path(target)
    tmp = temp_path(target)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_csv(frame: Any, path: str | Path) -> Path:
    """Write a pandas DataFrame as CSV (no index) atomically.

    The text goes to a temporary name beside ``path`` and is then renamed over it, so an
    interrupted write never leaves half a file under ``path``. A symbolic link is written
    through and an existing file keeps its mode (:func:`resolve_output`).

    Returns
    -------
    Path
        The file written (``path`` as given).

    Raises
    ------
    OutputPathError
        If ``path`` is a folder or a special file.
    """
    path = Path(path)
    target, mode = resolve_output(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    try:
        frame.to_csv(tmp, index=False)
        _replace_with(tmp, target, mode)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class ProjectChangedError(RuntimeError):
    """The project file was saved by another session since this table read it."""


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _same_file(a: Path, b: Path) -> bool:
    """Whether two names are one project file (links resolved, as for its journal)."""
    return os.path.realpath(a) == os.path.realpath(b)


def save_project(table: CellTable, path: str | Path) -> Path:
    """Write a cell table to an ``.h5ad`` project file.

    The file is written to a temporary name beside ``path`` (``.<name>.tmp-<host>-<pid>``,
    fsynced) and then renamed over it, so a crash while saving leaves the previous project
    intact and no temporary file that the next open would not clean. Sources are stored
    absolute in ``obs["source"]`` and relative to the project's folder in the file-only
    column ``source_relative`` (:mod:`~.sources`). Afterwards the table keeps its label
    journal beside the file (``<name>.labels.jsonl``, emptied now that the file holds
    every label): later label changes are appended there.

    The save holds the project's lock (:mod:`~.lock`): this session's when it opened the
    project for writing, else one taken for the save. Before writing, the journal's
    records since the last save are handed to :func:`~.journal.before_save` (the hook
    that keeps their history).

    Parameters
    ----------
    table : CellTable
    path : str or Path
        Target file; ``.h5ad`` is appended when missing.

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    ProjectLockedError
        When another process has the project open.
    ProjectReadOnlyError
        When the table was opened read-only from this same file.
    ProjectChangedError
        When another session saved the file since this table read or wrote it (its
        labels are safe in the journal: reopen the project).
    """
    from napari_hemofm.core.cells import OBS_COLUMNS
    from napari_hemofm.core.journal import LabelJournal, before_save, journal_path
    from napari_hemofm.core.lock import ProjectLock
    from napari_hemofm.core.sources import RELATIVE_COLUMN, sources_for_save

    path = Path(path)
    if path.suffix != ".h5ad":
        path = path.with_name(path.name + ".h5ad")
    target, mode = resolve_output(path)  # a link is written through, the mode kept
    old = table.journal
    same = old is not None and _same_file(old.project, path)
    if same:
        old._check_writable()  # a read-only session cannot overwrite the file it reads
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = ProjectLock.acquire(path)  # this session's (counted) or one for this save
    keep_lock = False
    try:
        if same and old.seen is not None and _signature(path) not in (None, old.seen):
            raise ProjectChangedError(
                f"{path.name} was saved by another session since this one read it; "
                "reopen it (the labels written here are in its journal)"
            )
        from napari_hemofm.core.audit import absorb_records

        absorb_records(table, before_save(table))  # the journal's history, kept in uns
        tmp = temp_path(target)
        adata = table.adata
        obs = adata.obs
        kept_source = obs["source"]
        absolute, relative = sources_for_save(kept_source, path)
        try:
            obs["source"] = absolute
            obs[RELATIVE_COLUMN] = relative
            adata.write_h5ad(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            _replace_with(tmp, target, mode)
        finally:
            obs["source"] = kept_source.astype(str)
            if RELATIVE_COLUMN in obs.columns:
                del obs[RELATIVE_COLUMN]
            # write_h5ad turns string columns into categoricals in place; keep the
            # in-memory contract (``source`` is str)
            for name, dtype in OBS_COLUMNS.items():
                if dtype == "object" and not isinstance(obs[name].dtype, np.dtypes.ObjectDType):
                    obs[name] = obs[name].astype(str)
            if tmp.exists():
                tmp.unlink()
        # the saved file now holds every label: start this project's journal empty. A
        # session that opened a project for writing keeps holding the lock of the file
        # it saves to (its own, or the new one of a "save as")
        session_lock = old.lock if old is not None else None
        journal = LabelJournal(journal_path(path))
        if session_lock is not None:
            if same:
                journal.lock = session_lock
            else:
                journal.lock, keep_lock = lock, True
                session_lock.release()
            old.lock = None
        journal.clear()
        journal.seen = _signature(path)
        table.journal = journal
    finally:
        if not keep_lock:
            lock.release()
    return path


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float | np.floating)


def _is_text(value: Any) -> bool:
    return isinstance(value, str | np.str_)


def _is_mapping(value: Any) -> bool:
    from collections.abc import Mapping

    return isinstance(value, Mapping)


def _is_name_list(value: Any) -> bool:
    if _is_text(value) or _is_mapping(value):
        return False
    arr = np.asarray(value, dtype=object) if isinstance(value, list | tuple) else value
    return (
        isinstance(arr, np.ndarray)
        and arr.ndim == 1
        and all(_is_text(v) or _is_number(v) for v in arr)
    )


def _in_unit(value: Any) -> bool:
    return _is_number(value) and 0.0 <= float(value) <= 1.0


def _positive(value: Any) -> bool:
    return _is_number(value) and bool(np.isfinite(value)) and float(value) > 0


PROJECT_META_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "schema_version": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "package_version": (_is_text, "text"),
    "classes": (_is_name_list, "a list of class names"),
    "model": (_is_text, "text"),
    "weights_sha256": (_is_text, "text"),
    "input_size": (lambda v: _is_int(v) and v > 0, "an integer > 0"),
    "embedding_dim": (lambda v: _is_int(v) and v > 0, "an integer > 0"),
    "precision": (lambda v: _is_text(v) and str(v) in ("fp32", "bf16"), "fp32 or bf16"),
    "pixel_size_um": (_positive, "a finite number > 0"),
    "unidentified_below": (_in_unit, "a number between 0 and 1"),
    "signoffs": (_is_text, "text (a JSON list)"),
    "stain_norm": (_is_mapping, "a mapping"),
    "umap": (_is_mapping, "a mapping"),
    "class_preset": (_is_text, "text"),
    "images_root": (_is_text, "text"),
    "skipped": (_is_text, "text (a JSON list)"),
}
"""What each known ``uns["hemofm"]`` entry must be: (test, description). Keys not
listed here are kept as they are (files from newer versions stay readable)."""


def check_project_meta(meta: Any, path: str | Path = "project") -> None:
    """Refuse project metadata (``uns["hemofm"]``) whose known entries have wrong types.

    A file edited by hand or written by another tool could hold, say, a number where the
    class list belongs; later code would fail far from the cause. This names every bad
    entry at once, at load time.

    Parameters
    ----------
    meta : Any
        ``adata.uns["hemofm"]`` as read (absent is fine: pass ``{}``).
    path : str or Path
        The project file, for the message.

    Raises
    ------
    ValueError
        One line naming each wrong entry, its value's type and what it must be.
    """
    if not _is_mapping(meta):
        raise ValueError(
            f"{path}: uns['hemofm'] must be a mapping of project settings, "
            f"not {type(meta).__name__}"
        )
    bad = []
    for key, (ok, what) in PROJECT_META_RULES.items():
        if key not in meta:
            continue
        value = meta[key]
        try:
            good = bool(ok(value))
        except (TypeError, ValueError):
            good = False
        if not good:
            shown = repr(value) if len(repr(value)) <= 40 else type(value).__name__
            bad.append(f"{key} = {shown} (must be {what})")
    if bad:
        raise ValueError(
            f"{path}: project settings in uns['hemofm'] are damaged: " + "; ".join(bad)
        )


def load_project(
    path: str | Path,
    *,
    mode: Literal["w", "r"] = "w",
    images_root: str | Path | None = None,
    wait: float = 0.0,
) -> CellTable:
    """Read a project file written by :func:`save_project`, replaying its label journal.

    Opening for writing (``mode="w"``) takes the project's lock (``<name>.lock``, see
    :mod:`~.lock`), removes temporary files that dead processes left beside it, repairs
    the journal (a torn tail is cut, invalid lines are moved to
    ``<name>.labels.rejected.jsonl``; :mod:`~.journal`) and replays it: label changes
    appended since the last save are applied, and the table keeps appending there.
    ``mode="r"`` takes no lock and changes no file; its table refuses label changes.
    Each source is pointed at the image file that exists (:func:`~.sources.resolve_sources`);
    :func:`~.sources.missing_sources` lists those found nowhere.

    Parameters
    ----------
    path : str or Path
        An ``.h5ad`` file; any AnnData file with the contract columns loads (missing
        optional columns are added empty).
    mode : {"w", "r"}
        Open for writing (one process at a time) or read-only.
    images_root : str or Path, optional
        A folder holding the images when neither their absolute nor their relative
        path exists any more (remembered in ``uns["hemofm"]["images_root"]``).
    wait : float
        With ``mode="w"``: seconds to wait for another process to close the project.

    Returns
    -------
    CellTable
        Close it with :func:`close_project` (or exit) to release the lock.

    Raises
    ------
    ValueError
        If the file is not a readable AnnData file or lacks the required columns.
    ProjectLockedError
        With ``mode="w"``, when another process has the project open (the message
        names it): open it with ``mode="r"``, or wait.
    """
    import anndata as ad

    from napari_hemofm.core.cells import REQUIRED_COLUMNS, CellTable
    from napari_hemofm.core.journal import LabelJournal, journal_path
    from napari_hemofm.core.lock import ProjectLock, read_lock
    from napari_hemofm.core.sources import IMAGES_ROOT_KEY, RELATIVE_COLUMN, resolve_sources

    if mode not in ("w", "r"):
        raise ValueError(f"mode must be 'w' or 'r'; got {mode!r}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such project file")
    lock = ProjectLock.acquire(path, wait=wait) if mode == "w" else None
    try:
        if lock is not None:
            clean_stale_temp_files(path)
        seen = _signature(path)
        try:
            adata = ad.read_h5ad(path)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable .h5ad file ({exc})") from exc
        missing = [c for c in REQUIRED_COLUMNS if c not in adata.obs.columns]
        if missing:
            raise ValueError(f"{path}: not a napari-hemofm project, obs lacks {missing}")
        check_project_meta(adata.uns.get("hemofm", {}), path)
        relative = None
        if RELATIVE_COLUMN in adata.obs.columns:
            relative = adata.obs.pop(RELATIVE_COLUMN).astype(object).to_numpy()
        table = CellTable(adata)
        resolve_sources(table, path, images_root=images_root, relative=relative)
        if images_root is not None:
            table.update_meta(**{IMAGES_ROOT_KEY: os.path.abspath(images_root)})
        journal = LabelJournal(
            journal_path(path),
            read_only=lock is None,
            lock=lock,
            holder=None if lock is not None else read_lock(path),
        )
        journal.replay(table)  # label changes made after the last save
        journal.seen = seen
        table.journal = journal
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return table


def close_project(table: CellTable) -> None:
    """Release the project lock a table holds (the session ends; the table stays usable).

    Later label changes take the lock for their own duration (and fail while another
    process has the project open).
    """
    if table.journal is not None:
        table.journal.close()


def read_only_reason(table: CellTable) -> str | None:
    """Why a table's labels cannot be changed, as one line for a banner; None if they can.

    ``"read-only: user@host (pid N) has this project open"`` for a project opened
    read-only, naming the lock's holder when known.
    """
    journal = table.journal
    if journal is None or not journal.read_only:
        return None
    if journal.holder is None:
        return "read-only: opened without the project's lock"
    h = journal.holder
    return f"read-only: {h.user}@{h.host} (pid {h.pid}) has this project open"


ProgressCallback = Callable[[int, int], None]

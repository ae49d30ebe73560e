"""Stain colour, density and size of each white cell: what differs between labs and scanners.

For the Batch view (and anyone comparing batches): each crop is segmented into nucleus
and whole cell with :func:`~napari_hemofm.core.features.segment_cell` (the segmentation
the ``handcrafted`` backbone uses: purple-channel Otsu for the nucleus, a marker
watershed for the cytoplasm, the component nearest the crop centre), then measured in
plain, batch-comparable units: HSV hue and saturation, Beer-Lambert optical density
against a fixed white of 255 (not the crop's own glass, so a dimmer lamp or a darker
stain shows up), cell and nucleus area, and the colour of the glass around the cell.
Colour and density are read inside a rim of one segmentation pixel (the mask edge is
that uncertain, and glass there would dilute the stain). :data:`APPEARANCE_COLUMNS`
lists every column with its unit.

numpy, pandas, scipy and Pillow only (through ``features`` and ``io``); reads image files
only in :func:`table_appearance` when no reader is given; writes nothing.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable

__all__ = [
    "APPEARANCE_COLUMNS",
    "appearance_stats",
    "crop_appearance",
    "table_appearance",
]

#: Every column of :func:`appearance_stats`: name -> "unit: meaning".
APPEARANCE_COLUMNS: dict[str, str] = {
    "cell_area_px": "source pixels: area of the segmented cell (nucleus included)",
    "nucleus_area_px": "source pixels: area of the nucleus",
    "cell_diameter_px": "source pixels: diameter of a disc of the cell's area",
    "cell_area_um2": "um^2: cell area (NaN without a pixel size)",
    "nucleus_area_um2": "um^2: nucleus area (NaN without a pixel size)",
    "cell_diameter_um": "um: equivalent diameter of the cell (NaN without a pixel size)",
    "nucleus_fraction": "0-1: nucleus area / cell area",
    "cell_hue_deg": (
        "degrees in (-180, 180]: HSV hue of the cell's mean colour; 0 = red, -60 = magenta, "
        "-120 = blue, +60 = yellow (stains stay clear of the +-180 cyan wrap); NaN if grey"
    ),
    "cell_saturation": "0-1: mean HSV saturation of the cell's pixels",
    "cell_brightness": "0-1: mean HSV value (max of R, G, B) of the cell's pixels",
    "cell_od": "OD (log10, summed over R+G+B, 0-7.2): mean optical density of the cell",
    "cell_od_r": "OD (log10): mean optical density of the cell in the red channel",
    "cell_od_g": "OD (log10): mean optical density of the cell in the green channel",
    "cell_od_b": "OD (log10): mean optical density of the cell in the blue channel",
    "nucleus_od": "OD (log10, summed over R+G+B): mean optical density of the nucleus",
    "nucleus_hue_deg": "degrees in (-180, 180]: HSV hue of the nucleus' mean colour",
    "cytoplasm_od": "OD (log10, summed over R+G+B): mean optical density of the cytoplasm",
    "background_r": "0-255: red of the glass (median of the brightest 10 % outside the cell)",
    "background_g": "0-255: green of the glass",
    "background_b": "0-255: blue of the glass",
    "segmented": "bool: a cell was found (False: every other column is NaN)",
}

#: Hue of a colour with HSV saturation below this is undefined (NaN).
GREY_SATURATION = 0.02
#: Share of the pixels outside the cell that is taken as glass (the brightest ones).
GLASS_QUANTILE = 0.9
#: Pixels of margin between the cell and what counts as glass.
GLASS_MARGIN_PX = 3

# optical density of each 8-bit level: OD = -log10((I + 1) / 256), 0 for white
_OD_LUT = -np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)


def _empty_row() -> dict[str, Any]:
    row: dict[str, Any] = {name: np.nan for name in APPEARANCE_COLUMNS}
    row["segmented"] = False
    return row


def _hue_deg(rgb: np.ndarray) -> float:
    """HSV hue in (-180, 180] of one colour (0-255 floats); NaN for a grey."""
    r, g, b = (float(v) / 255.0 for v in rgb)
    h, s, _ = colorsys.rgb_to_hsv(r, g, b)
    if s < GREY_SATURATION:
        return float("nan")
    deg = h * 360.0
    return deg - 360.0 if deg > 180.0 else deg


def _shrink(mask: np.ndarray, rim: int) -> np.ndarray:
    """``mask`` eroded by ``rim`` pixels, or ``mask`` itself when that leaves nothing."""
    from scipy import ndimage as ndi

    core = ndi.binary_erosion(mask, iterations=rim)
    return core if core.any() else mask


def crop_appearance(
    crop: np.ndarray,
    *,
    area_scale: float = 1.0,
    pixel_size_um: float | None = None,
) -> dict[str, Any]:
    """Stain and size statistics of the white cell at the centre of one crop.

    Parameters
    ----------
    crop : ndarray of shape (h, w, 3), uint8
        RGB crop with the cell near its centre. Greyscale ``(h, w)``, RGBA, channel-first
        and non-uint8 arrays are converted with :func:`~napari_hemofm.core.io.to_rgb8`
        (RGBA is composited over white).
    area_scale : float
        Source pixels per crop pixel (area ratio): ``(box_h * box_w) / (h * w)`` when the
        crop was resized (a thumbnail), so that areas are in source pixels. 1 for a crop
        at its native resolution.
    pixel_size_um : float, optional
        Side of a source pixel in um; fills the ``*_um2`` / ``*_um`` columns.

    Returns
    -------
    dict
        One value per :data:`APPEARANCE_COLUMNS` name (NaN where undefined: no nucleus,
        no glass, no cell).

    Raises
    ------
    ValueError
        If ``crop`` is not an image (empty, or not 2-D with 1-4 channels).
    """
    from scipy import ndimage as ndi

    from napari_hemofm.core.features import WORK_SIZE, segment_cell
    from napari_hemofm.core.io import to_rgb8

    rgb = to_rgb8(np.asarray(crop))
    nucleus, cell = segment_cell(rgb)
    row = _empty_row()
    n_cell = int(cell.sum())
    if n_cell == 0:
        return row
    row["segmented"] = True
    area_scale = float(area_scale)
    n_nuc = int(nucleus.sum())
    row["cell_area_px"] = n_cell * area_scale
    row["nucleus_area_px"] = n_nuc * area_scale
    row["cell_diameter_px"] = 2.0 * np.sqrt(row["cell_area_px"] / np.pi)
    row["nucleus_fraction"] = n_nuc / n_cell
    if pixel_size_um is not None and np.isfinite(pixel_size_um) and pixel_size_um > 0:
        um2 = float(pixel_size_um) ** 2
        row["cell_area_um2"] = row["cell_area_px"] * um2
        row["nucleus_area_um2"] = row["nucleus_area_px"] * um2
        row["cell_diameter_um"] = row["cell_diameter_px"] * float(pixel_size_um)

    # colour is read inside a rim of one segmentation pixel: the mask edge is uncertain
    # by about that much, and glass pixels there would dilute the stain
    rim = max(1, round(max(rgb.shape[:2]) / WORK_SIZE))
    core = _shrink(cell, rim)
    core_nucleus = _shrink(nucleus, rim)
    pixels = rgb[core].astype(np.float64)  # (n_core, 3)
    mx, mn = pixels.max(axis=1), pixels.min(axis=1)
    saturation = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-9), 0.0)
    row["cell_saturation"] = float(saturation.mean())
    row["cell_brightness"] = float(mx.mean() / 255.0)
    row["cell_hue_deg"] = _hue_deg(pixels.mean(axis=0))

    od = _OD_LUT[rgb]  # (h, w, 3)
    od_cell = od[core]
    row["cell_od_r"], row["cell_od_g"], row["cell_od_b"] = (float(v) for v in od_cell.mean(0))
    row["cell_od"] = row["cell_od_r"] + row["cell_od_g"] + row["cell_od_b"]
    if n_nuc:
        row["nucleus_od"] = float(od[core_nucleus].sum(axis=1).mean())
        row["nucleus_hue_deg"] = _hue_deg(rgb[core_nucleus].astype(np.float64).mean(axis=0))
    cytoplasm = core & ~ndi.binary_dilation(nucleus, iterations=rim)
    if cytoplasm.any():
        row["cytoplasm_od"] = float(od[cytoplasm].sum(axis=1).mean())

    outside = ~ndi.binary_dilation(cell, iterations=GLASS_MARGIN_PX)
    if outside.any():
        rest = rgb[outside].astype(np.float64)
        brightness = rest.sum(axis=1)
        glass = rest[brightness >= np.quantile(brightness, GLASS_QUANTILE)]
        row["background_r"], row["background_g"], row["background_b"] = (
            float(v) for v in np.median(glass, axis=0)
        )
    return row


def appearance_stats(
    crops: Sequence[np.ndarray] | Mapping[str, np.ndarray],
    *,
    area_scale: float | Sequence[float] = 1.0,
    pixel_size_um: float | None = None,
    normalise: Callable[[np.ndarray], np.ndarray] | None = None,
) -> pd.DataFrame:
    """Stain and size statistics of many crops, one row each.

    Parameters
    ----------
    crops : sequence of ndarray, or mapping of str to ndarray
        Crops of shape (h, w, 3) uint8 (any image shape :func:`crop_appearance` takes);
        a mapping's keys become the index (``cell_id``).
    area_scale : float or sequence of float
        Source pixels per crop pixel, one for all crops or one per crop (see
        :func:`crop_appearance`).
    pixel_size_um : float, optional
        Side of a source pixel in um.
    normalise : callable, optional
        Stain normalisation applied to each crop first
        (:func:`napari_hemofm.core.stain.build_normaliser`): the statistics *after*
        normalisation, for a before / after comparison.

    Returns
    -------
    pandas.DataFrame
        One row per crop, in input order, columns :data:`APPEARANCE_COLUMNS`. Each row
        depends on its own crop only (order-independent).
    """
    if isinstance(crops, Mapping):
        index = pd.Index([str(k) for k in crops], name="cell_id")
        arrays = list(crops.values())
    else:
        arrays = list(crops)
        index = pd.RangeIndex(len(arrays))
    scales = (
        np.full(len(arrays), float(area_scale))
        if np.isscalar(area_scale)
        else np.asarray(area_scale, dtype=np.float64)
    )
    if len(scales) != len(arrays):
        raise ValueError(f"got {len(scales)} area scales for {len(arrays)} crops")
    rows = [
        crop_appearance(_normalised(crop, normalise), area_scale=s, pixel_size_um=pixel_size_um)
        for crop, s in zip(arrays, scales.tolist(), strict=True)
    ]
    return _frame(rows, index)


def _normalised(
    crop: np.ndarray, normalise: Callable[[np.ndarray], np.ndarray] | None
) -> np.ndarray:
    """The crop after stain normalisation (as 8-bit RGB), or as it is."""
    if normalise is None:
        return crop
    from napari_hemofm.core.io import to_rgb8

    return normalise(to_rgb8(np.asarray(crop)))


def _frame(rows: list[dict[str, Any]], index: pd.Index) -> pd.DataFrame:
    frame = pd.DataFrame(rows, index=index, columns=list(APPEARANCE_COLUMNS))
    numeric = [c for c in APPEARANCE_COLUMNS if c != "segmented"]
    frame[numeric] = frame[numeric].astype(np.float64)
    frame["segmented"] = frame["segmented"].astype(bool)
    return frame


class _NativeCrops:
    """Reads full-resolution crops from a cell frame's sources (one decoded source kept)."""

    def __init__(self, obs: pd.DataFrame, images: Mapping[str, Any] | None) -> None:
        self.obs = obs
        self.images = images or {}
        self._source: tuple[str, Any] | None = None

    def _image(self, source: str) -> Any:
        from napari_hemofm.core.io import LazyRGBImage, read_image

        if source in self.images:
            image = self.images[source]
            return image if isinstance(image, LazyRGBImage) else np.asarray(image)
        if self._source is None or self._source[0] != source:
            self._source = (source, read_image(source))
        return self._source[1]

    def __call__(self, cell_ids: Sequence[str]) -> dict[str, np.ndarray]:
        from napari_hemofm.core.detect import crop_cell
        from napari_hemofm.core.io import ImageReadError

        out: dict[str, np.ndarray] = {}
        for cell_id in cell_ids:
            row = self.obs.loc[cell_id]
            box = tuple(int(row[c]) for c in ("x0", "y0", "x1", "y1"))
            try:
                out[cell_id] = crop_cell(self._image(str(row["source"])), box)
            except (ImageReadError, OSError, ValueError):
                continue  # unreadable source: the cell gets a NaN row
        return out


def table_appearance(
    table: CellTable | pd.DataFrame,
    thumbnails_or_reader: Any = None,
    rows: Sequence[int] | np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    images: Mapping[str, Any] | None = None,
    pixel_size_um: float | None = None,
    cancel: Callable[[], bool] | None = None,
    chunk: int = 32,
    normalise: Callable[[np.ndarray], np.ndarray] | None = None,
) -> pd.DataFrame:
    """Stain and size statistics of the cells of a table.

    Parameters
    ----------
    table : CellTable or pandas.DataFrame
        The cells (a table, or its ``obs``: ``source``, ``batch`` and the crop box
        ``x0, y0, x1, y1`` indexed by cell id).
    thumbnails_or_reader : ThumbnailCache or callable, optional
        Where crops come from: an object with ``load(cell_ids) -> {cell_id: crop}``
        (the session's :class:`~napari_hemofm.core.thumbnails.ThumbnailCache`), or a
        callable with that signature. By default the crops are cut at full resolution
        from ``images`` or the source files (sorted by source, so each file is decoded
        once). Resized crops (thumbnails) are fine: areas are scaled back to source
        pixels from the crop box.
    rows : sequence of int, optional
        Table rows to measure (all by default).
    progress : callable, optional
        ``progress(done, total)`` after each chunk of cells.
    images : mapping of str to array, optional
        In-memory images by source name (napari layers), read before the files.
    pixel_size_um : float, optional
        Source pixel size; by default ``table.meta["pixel_size_um"]`` when there is one.
    cancel : callable, optional
        Checked between chunks; when it returns True the cells measured so far are
        returned (the rest are left out).
    chunk : int
        Cells per progress step.
    normalise : callable, optional
        Stain normalisation applied to each crop before it is measured (the Batch
        view's "after" plots): :func:`napari_hemofm.core.stain.build_normaliser` of the
        project's setting. Crops are normalised one by one, whereas embedding
        normalises each source image whole; for single-cell crops that is the same.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``cell_id`` in the order of ``rows``: ``batch``, then
        :data:`APPEARANCE_COLUMNS`. Cells whose crop cannot be read get NaN and
        ``segmented`` False.
    """
    obs = table.obs if hasattr(table, "obs") else table
    if pixel_size_um is None and hasattr(table, "meta"):
        value = table.meta.get("pixel_size_um")
        pixel_size_um = float(value) if value is not None else None
    positions = np.arange(len(obs)) if rows is None else np.asarray(rows, dtype=np.int64)
    sub = obs.iloc[positions]
    ids = [str(c) for c in sub.index]
    if thumbnails_or_reader is None:
        reader: Callable[[Sequence[str]], Mapping[str, np.ndarray]] = _NativeCrops(obs, images)
        # decode each source once: measure in source order, report in the caller's order
        order = np.argsort(sub["source"].astype(str).to_numpy(), kind="stable")
    else:
        load = getattr(thumbnails_or_reader, "load", None)
        reader = load if callable(load) else thumbnails_or_reader
        order = np.arange(len(ids))
    box_area = ((sub["x1"] - sub["x0"]) * (sub["y1"] - sub["y0"])).to_numpy(dtype=np.float64)
    results: dict[str, dict[str, Any]] = {}
    total = len(ids)
    step = max(int(chunk), 1)
    for start in range(0, total, step):
        if cancel is not None and cancel():
            break
        idx = order[start : start + step]
        crops = reader([ids[i] for i in idx])
        for i in idx.tolist():
            crop = crops.get(ids[i])
            if crop is None:
                results[ids[i]] = _empty_row()
                continue
            h, w = np.shape(crop)[:2]
            scale = box_area[i] / float(h * w) if h * w else 1.0
            results[ids[i]] = crop_appearance(
                _normalised(crop, normalise), area_scale=scale, pixel_size_um=pixel_size_um
            )
        if progress is not None:
            progress(min(start + step, total), total)
    done = [c for c in ids if c in results]
    frame = _frame([results[c] for c in done], pd.Index(done, name="cell_id"))
    batch = sub["batch"].astype(object).reindex(done) if "batch" in sub else np.nan
    frame.insert(0, "batch", pd.Categorical(batch))
    return frame

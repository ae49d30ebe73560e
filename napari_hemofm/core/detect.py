"""White blood cell (WBC) detection in Wright / May-Gruenwald-Giemsa smears, and cell boxes.

Finds WBCs by their nucleus colour (blue minus green), groups the lobes of one nucleus, splits
touching cells, and rejects red cells (RBCs) and platelets by colour and size. Sizes are set by
the RBC diameter, measured in the image itself unless a pixel size is given, so the same code
runs on any magnification. Large images (memory-mapped) are processed in overlapping tiles.
Also builds the same cell table from a Labels or Points layer and cuts square crops.

Pure numpy / scipy / scikit-image / pandas: no napari, no files. ``docs/detection.md`` holds the
method, the measured BCCD figures and the failure modes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.measure import regionprops
from skimage.segmentation import watershed

__all__ = [
    "CROP_FACTOR",
    "CROP_FIELD_UM",
    "DEFAULT_DIAMETER_PX",
    "DETECTION_COLUMNS",
    "MIN_CROP_PX",
    "RBC_DIAMETER_UM",
    "WBC_DIAMETER_UM",
    "box_around",
    "cells_from_labels",
    "cells_from_points",
    "crop_cell",
    "crop_side",
    "detect_wbcs",
    "estimate_rbc_diameter",
]

#: Columns of every cell table returned here (x = column, y = row, boxes half-open).
DETECTION_COLUMNS = ["x", "y", "x0", "y0", "x1", "y1", "score", "diameter"]

#: Mean diameter of a normal red cell, um: the physical yardstick of all sizes below.
RBC_DIAMETER_UM = 7.5
#: Typical WBC diameter, um (neutrophil 12-14, lymphocyte 7-10, monocyte 14-18).
WBC_DIAMETER_UM = 12.0
#: Side of the square crop around a cell when the pixel size is known, um: two typical WBC
#: diameters, so a large monocyte fits with some context and crops match across scanners.
CROP_FIELD_UM = 24.0
#: Crop side over the cell diameter when the pixel size is unknown.
CROP_FACTOR = 1.5
#: Smallest crop side, px (a DinoBloom patch is 14 px; below this a crop carries no detail).
MIN_CROP_PX = 32
#: Cell diameter for `cells_from_points` when neither a diameter nor a pixel size is given,
#: px: a 12 um WBC at 0.12 um/px, a common 100x oil-objective field.
DEFAULT_DIAMETER_PX = 100.0

# ---- Detection parameters. Lengths are in RBC diameters (D), areas in D**2. ----------------
# Work resolution: images are block-averaged so that an RBC spans about this many pixels.
_WORK_RBC_PX = 24.0
# Gaussian smoothing of the nucleus map, in D: removes JPEG blocks and camera noise.
_SMOOTH_D = 0.03
# Nucleus map threshold: above Otsu's, and at least this many robust spreads (p75 - p50) and
# this many 8-bit levels of blue-minus-green above the median pixel (RBCs and background).
_FLOOR_SPREADS = 3.0
_MIN_CONTRAST = 12.0
# Specks smaller than this are noise or granules.
_SPECK_AREA_D2 = 0.01
# Lobes closer than twice this gap are one nucleus (segmented neutrophils, band cells).
_GROUP_GAP_D = 0.12
# A WBC: grouped nucleus region at least this large. A platelet (2-3 um, 0.3-0.4 D) grown by
# the grouping gap covers ~0.2-0.4 D**2; a small lymphocyte nucleus (5-6 um) alone ~0.4 D**2.
_MIN_EXTENT_D2 = 0.50
# ... at least this much of it nucleus-coloured ...
_MIN_NUCLEUS_D2 = 0.30
# ... and a nucleus at least this thick (largest inscribed radius): platelet clumps and the
# granules of an eosinophil form thin chains.
_MIN_THICKNESS_D = 0.18
# Touching WBCs: a grouped region larger than any single WBC (a disc of ~24 um) is cut by a
# watershed at nucleus distance peaks half this far apart and this deep; pieces with less
# nucleus than a small lymphocyte are lobes and are merged back.
_SPLIT_MIN_EXTENT_D2 = 8.0
_SPLIT_DISTANCE_D = 1.0
_SPLIT_MIN_RADIUS_D = 0.3
_MIN_PIECE_NUCLEUS_D2 = 0.6
# WBC diameter from the nucleus region: cytoplasm adds a rim around the grouped nucleus.
_DIAMETER_OVER_EXTENT = 1.25
# Tiles overlap by this much on each side, in D: a whole WBC (<= ~2.4 D) plus grouping.
_MARGIN_D = 2.0
# Quantile of the area-weighted inscribed-disc radii taken as the RBC radius.
_RBC_AREA_QUANTILE = 0.4
# Light varying by less than this fraction over the image is left alone.
_EVEN_LIGHT = 0.05
# Pallor holes are not filled when filling would make this much of the field "cells".
_MAX_FILLED_COVER = 0.9
# RBC diameters below this (px), or cells covering more than this fraction of the field,
# measured at half resolution are measured again at full resolution.
_FULL_RES_BELOW_PX = 24.0
_FULL_RES_ABOVE_COVER = 0.7
# Side of the windows read to measure the image-wide scale and colour statistics.
_WINDOW_PX = 1024
_MAX_WINDOWS_PER_SIDE = 3
# Pixels per window used for the threshold statistics (a regular subsample beyond this).
_MAX_SAMPLES_PER_WINDOW = 2**16


def crop_side(diameter_px: float, pixel_size_um: float | None = None) -> int:
    """Side of the square crop around a cell, in pixels.

    Parameters
    ----------
    diameter_px : float
        Estimated cell diameter in pixels (used when ``pixel_size_um`` is None).
    pixel_size_um : float, optional
        Pixel size in um. When given, the crop is a fixed physical field of `CROP_FIELD_UM`
        (24 um), so crops from different scanners show the same area.

    Returns
    -------
    int
        ``round(CROP_FIELD_UM / pixel_size_um)`` when the pixel size is known, else
        ``round(CROP_FACTOR * diameter_px)`` (1.5 diameters); never below `MIN_CROP_PX` (32).

    Raises
    ------
    ValueError
        When ``pixel_size_um`` is not positive, or ``diameter_px`` is not finite and no pixel
        size is given.
    """
    if pixel_size_um is not None:
        if not (pixel_size_um > 0 and math.isfinite(pixel_size_um)):
            raise ValueError(f"pixel_size_um must be a positive number, got {pixel_size_um!r}")
        side = round(CROP_FIELD_UM / pixel_size_um)
    else:
        if not math.isfinite(diameter_px):
            raise ValueError(f"diameter_px must be finite, got {diameter_px!r}")
        side = round(CROP_FACTOR * diameter_px)
    return int(max(MIN_CROP_PX, side))


def box_around(x: float, y: float, side: int) -> tuple[int, int, int, int]:
    """Square box of ``side`` pixels centred on a point.

    Parameters
    ----------
    x, y : float
        Centre in pixels (x = column, y = row).
    side : int
        Box side in pixels.

    Returns
    -------
    tuple of int
        ``(x0, y0, x1, y1)`` with ``x1 - x0 == y1 - y0 == side`` (half-open: ``x1``, ``y1``
        excluded). The box may extend beyond the image; `crop_cell` pads it.

    Notes
    -----
    With pixel centres at integer coordinates the box's centre is ``(x0 + x1 - 1) / 2``;
    ``x0 = floor(x - (side - 1) / 2 + 0.5)`` puts it within half a pixel of ``x``.
    """
    side = int(side)
    if side < 1:
        raise ValueError(f"side must be >= 1, got {side}")
    x0 = math.floor(x - (side - 1) / 2 + 0.5)
    y0 = math.floor(y - (side - 1) / 2 + 0.5)
    return x0, y0, x0 + side, y0 + side


def crop_cell(image: ArrayLike, box: Sequence[int]) -> np.ndarray:
    """Cut a box out of an image, replicating edge pixels where the box leaves the image.

    Parameters
    ----------
    image : array-like of shape (H, W) or (H, W, C)
        Source image; only the box is read (a memory map stays on disk).
    box : sequence of 4 int
        ``(x0, y0, x1, y1)``, half-open, as from `box_around`.

    Returns
    -------
    ndarray of shape (y1 - y0, x1 - x0) or (y1 - y0, x1 - x0, C)
        The crop, same dtype as ``image``.

    Raises
    ------
    ValueError
        When the box is empty or the image has no pixels.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty box {(x0, y0, x1, y1)}")
    h, w = np.shape(image)[:2]
    if h == 0 or w == 0:
        raise ValueError("image has no pixels")
    # Clipping the row / column indices into the image is edge replication; only the part of
    # the image under the box is read.
    ys = np.clip(np.arange(y0, y1), 0, h - 1)
    xs = np.clip(np.arange(x0, x1), 0, w - 1)
    inner = np.asarray(image[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1])
    return inner[np.ix_(ys - ys[0], xs - xs[0])]


def _empty_table() -> pd.DataFrame:
    """An empty cell table with `DETECTION_COLUMNS` and their dtypes."""
    dtypes = {"x": float, "y": float, "x0": int, "y0": int, "x1": int, "y1": int}
    dtypes.update(score=float, diameter=float)
    return pd.DataFrame({c: pd.Series(dtype=dtypes[c]) for c in DETECTION_COLUMNS})


def _table(
    x: np.ndarray,
    y: np.ndarray,
    diameter: np.ndarray,
    score: np.ndarray,
    pixel_size_um: float | None,
) -> pd.DataFrame:
    """Cell table with crop boxes, in the given row order."""
    if len(x) == 0:
        return _empty_table()
    boxes = np.array(
        [
            box_around(xi, yi, crop_side(di, pixel_size_um))
            for xi, yi, di in zip(x, y, diameter, strict=True)
        ],
        dtype=np.int64,
    ).reshape(-1, 4)
    return pd.DataFrame(
        {
            "x": np.asarray(x, dtype=float),
            "y": np.asarray(y, dtype=float),
            "x0": boxes[:, 0],
            "y0": boxes[:, 1],
            "x1": boxes[:, 2],
            "y1": boxes[:, 3],
            "score": np.asarray(score, dtype=float),
            "diameter": np.asarray(diameter, dtype=float),
        },
        columns=DETECTION_COLUMNS,
    )


def check_pixel_size_fits(shape: tuple[int, int], pixel_size_um: float | None) -> None:
    """Refuse a pixel size at which not even one white cell fits in the image.

    Detection scales its windows to the cell size in pixels (``RBC_DIAMETER_UM /
    pixel_size_um``); with a pixel size off by orders of magnitude (nm typed as um) those
    windows would be larger than the image, and padding them would need petabytes.

    Parameters
    ----------
    shape : (int, int)
        The image's ``(height, width)`` in pixels.
    pixel_size_um : float or None
        Micrometres per pixel; None (estimated from the image) always passes.

    Raises
    ------
    ValueError
        When a WBC (``WBC_DIAMETER_UM``) would be wider than the image's longer side.
    """
    if pixel_size_um is None:
        return
    _check_pixel_size(pixel_size_um)
    cell_px = WBC_DIAMETER_UM / pixel_size_um
    h, w = int(shape[0]), int(shape[1])
    if cell_px > max(h, w):
        raise ValueError(
            f"pixel size {pixel_size_um:g} um is too small for a {w}x{h} image: a white "
            f"cell ({WBC_DIAMETER_UM:g} um) would be {cell_px:.3g} px wide, more than the "
            "whole image (smears are usually 0.1 to 1 um per pixel)"
        )


def _check_pixel_size(pixel_size_um: float | None) -> None:
    if pixel_size_um is not None and not (pixel_size_um > 0 and math.isfinite(pixel_size_um)):
        raise ValueError(f"pixel_size_um must be a positive number, got {pixel_size_um!r}")


def cells_from_labels(labels: ArrayLike, *, pixel_size_um: float | None = None) -> pd.DataFrame:
    """One cell per nonzero label of a label image (e.g. a napari Labels layer).

    Parameters
    ----------
    labels : array-like of shape (H, W), int
        Label image; 0 is background, each other value one cell.
    pixel_size_um : float, optional
        Pixel size in um; sets the crop side (see `crop_side`).

    Returns
    -------
    pandas.DataFrame
        `DETECTION_COLUMNS`, one row per label value in increasing order (index 0..n-1):
        ``x``, ``y`` the region centroid, ``diameter`` the larger of the equivalent-circle
        diameter and the bounding-box side, the crop box centred on the centroid, score 1.0.

    Raises
    ------
    ValueError
        When ``labels`` is not 2-D or not integer.
    """
    _check_pixel_size(pixel_size_um)
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be 2-D (H, W), got shape {lab.shape}")
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        raise ValueError(f"labels must be an integer array, got dtype {lab.dtype}")
    if lab.dtype == bool or (lab.size and lab.min() < 0):
        lab = lab.astype(np.int64)
    props = sorted(regionprops(np.where(lab > 0, lab, 0)), key=lambda p: p.label)
    if not props:
        return _empty_table()
    cy, cx = np.array([p.centroid for p in props]).T
    diam = np.array(
        [
            max(p.equivalent_diameter_area, p.bbox[2] - p.bbox[0], p.bbox[3] - p.bbox[1])
            for p in props
        ]
    )
    return _table(cx, cy, diam, np.ones(len(props)), pixel_size_um)


def cells_from_points(
    points: ArrayLike,
    *,
    diameter_px: float | None = None,
    pixel_size_um: float | None = None,
) -> pd.DataFrame:
    """One cell per point (e.g. a napari Points layer), in the points' order.

    Parameters
    ----------
    points : array-like of shape (N, 2)
        Cell centres in napari order ``(row, col)`` = ``(y, x)``. Extra leading coordinates
        (N, D > 2) are ignored: the last two are used.
    diameter_px : float, optional
        Cell diameter in pixels for every point. Default: ``WBC_DIAMETER_UM / pixel_size_um``
        (12 um) when the pixel size is known, else `DEFAULT_DIAMETER_PX` (100 px).
    pixel_size_um : float, optional
        Pixel size in um; also sets the crop side (see `crop_side`).

    Returns
    -------
    pandas.DataFrame
        `DETECTION_COLUMNS`, row ``i`` for point ``i`` (index 0..N-1), score 1.0.

    Raises
    ------
    ValueError
        When ``points`` is not (N, >= 2), or a diameter / pixel size is not positive.
    """
    _check_pixel_size(pixel_size_um)
    pts = np.asarray(points, dtype=float)
    if pts.size == 0:
        return _empty_table()
    if pts.ndim != 2 or pts.shape[1] < 2:
        raise ValueError(f"points must have shape (N, 2) in (y, x) order, got {pts.shape}")
    if diameter_px is None:
        diameter_px = (
            WBC_DIAMETER_UM / pixel_size_um if pixel_size_um is not None else DEFAULT_DIAMETER_PX
        )
    if not (diameter_px > 0 and math.isfinite(diameter_px)):
        raise ValueError(f"diameter_px must be a positive number, got {diameter_px!r}")
    n = len(pts)
    return _table(
        pts[:, -1], pts[:, -2], np.full(n, float(diameter_px)), np.ones(n), pixel_size_um
    )


# ---- Detection ------------------------------------------------------------------------------


def _block_mean(channel: np.ndarray, k: int) -> np.ndarray:
    """Means of k x k blocks of a 2-D array (any real dtype), as float32 on its own scale.

    Returns
    -------
    ndarray of shape (ceil(h / k), ceil(w / k)), float32
        A partial last block row / column repeats the edge pixels.
    """
    if k == 1:
        return channel.astype(np.float32)
    h, w = channel.shape
    hh, ww = -(-h // k), -(-w // k)
    if (hh * k, ww * k) != (h, w):
        channel = np.pad(channel, ((0, hh * k - h), (0, ww * k - w)), mode="edge")
    # Sum the k rows of each block (exact in the accumulator), then the k columns: far faster
    # than a mean over two strided axes.
    acc = np.uint32 if np.issubdtype(channel.dtype, np.integer) else np.float32
    rows = channel.reshape(hh, k, ww * k).sum(axis=1, dtype=acc).reshape(hh, ww, k)
    out = rows[:, :, 0].astype(np.float32)
    for j in range(1, k):
        out += rows[:, :, j]
    out *= np.float32(1.0 / (k * k))
    return out


def _read_channels(
    image: ArrayLike, y0: int, y1: int, x0: int, x1: int, k: int, channels: Sequence[int]
) -> list[np.ndarray]:
    """Block means of some channels of ``image[y0:y1, x0:x1]``, float32 on the 0-255 scale.

    uint8 is taken as is, other integer dtypes are scaled by their maximum, floats and bools
    are read as 0-1.
    """
    a = np.asarray(image[y0:y1, x0:x1])
    if a.dtype == np.uint8:
        scale = 1.0
    elif np.issubdtype(a.dtype, np.integer):
        scale = 255.0 / np.iinfo(a.dtype).max
    else:
        scale = 255.0
        a = np.clip(a[..., :3].astype(np.float32), 0.0, 1.0)
    out = []
    for c in channels:
        m = _block_mean(a[..., c], k)
        if scale != 1.0:
            m *= np.float32(scale)
        out.append(m)
    return out


def _windows(shape: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Windows ``(y0, y1, x0, x1)`` read to measure image-wide statistics.

    The whole image when it is small, else an evenly spread grid of up to 3 x 3 windows of
    `_WINDOW_PX`. They depend on the image shape only, never on the tiling.
    """
    h, w = shape

    def starts(n: int) -> list[int]:
        if n <= 2 * _WINDOW_PX:
            return [0]
        k = min(_MAX_WINDOWS_PER_SIDE, n // _WINDOW_PX)
        return [round((i + 0.5) * n / k - _WINDOW_PX / 2) for i in range(k)]

    out = []
    for y0 in starts(h):
        for x0 in starts(w):
            y1 = h if h <= 2 * _WINDOW_PX else y0 + _WINDOW_PX
            x1 = w if w <= 2 * _WINDOW_PX else x0 + _WINDOW_PX
            out.append((y0, y1, x0, x1))
    return out


def _inscribed_radii(mask: np.ndarray) -> np.ndarray:
    """Radii of greedily chosen maximal inscribed discs covering a binary mask, px.

    Local maxima of the distance transform are taken from the largest down; each chosen disc
    suppresses candidates within 1.5 of its radius, so a clump of overlapping RBCs yields about
    one disc per cell, each of about the RBC radius.
    """
    dist = ndi.distance_transform_edt(mask).astype(np.float32)
    peaks = (dist == ndi.maximum_filter(dist, size=3)) & (dist >= 2.0)
    ys, xs = np.nonzero(peaks)
    r = dist[ys, xs]
    order = np.argsort(-r, kind="stable")
    taken = np.zeros(mask.shape, dtype=bool)
    h, w = mask.shape
    chosen = []
    for y, x, rad in zip(ys[order], xs[order], r[order], strict=True):
        if taken[y, x]:
            continue
        chosen.append(rad)
        s = int(1.5 * rad)
        y0, y1, x0, x1 = max(0, y - s), min(h, y + s + 1), max(0, x - s), min(w, x + s + 1)
        yy, xx = np.ogrid[y0 - y : y1 - y, x0 - x : x1 - x]
        taken[y0:y1, x0:x1] |= yy * yy + xx * xx <= s * s
    return np.asarray(chosen, dtype=np.float64)


def _fit_illumination(
    image: ArrayLike, windows: list[tuple[int, int, int, int]]
) -> np.ndarray | None:
    """Fit the illumination of the glass as a quadratic surface over the whole image.

    The green channel is cut into about 32 x 32 blocks per window; each block's 90th
    percentile is a sample of the light there (the glass is the brightest thing in a smear).
    A quadratic in the image's normalised coordinates is fitted to them four times, each time
    keeping the samples at or above the median residual, so it settles on the bright envelope
    (glass) rather than on areas covered by cells.

    Returns
    -------
    ndarray of shape (7,) or None
        Six polynomial coefficients (1, x, y, x**2, xy, y**2) and the reference level (the
        median of the fitted surface); None when the light is even to within
        `_EVEN_LIGHT` or cannot be measured.
    """
    h, w = np.shape(image)[:2]
    xs, ys, vs = [], [], []
    for y0, y1, x0, x1 in windows:
        (green,) = _read_channels(image, y0, y1, x0, x1, 2, (1,))
        gh, gw = green.shape
        b = max(4, min(gh, gw) // 32)
        nh, nw = gh // b, gw // b
        if nh < 2 or nw < 2:
            continue
        blocks = green[: nh * b, : nw * b].reshape(nh, b, nw, b).transpose(0, 2, 1, 3)
        vs.append(np.percentile(blocks.reshape(nh, nw, -1), 90, axis=2).ravel())
        cy, cx = np.mgrid[0:nh, 0:nw]
        ys.append(((y0 + (cy.ravel() + 0.5) * 2 * b) / h) * 2 - 1)
        xs.append(((x0 + (cx.ravel() + 0.5) * 2 * b) / w) * 2 - 1)
    if not vs:
        return None
    v, x, y = np.concatenate(vs), np.concatenate(xs), np.concatenate(ys)
    if len(v) < 12 or v.max() <= 0:
        return None
    a = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
    keep = np.ones(len(v), dtype=bool)
    for _ in range(4):
        coef = np.linalg.lstsq(a[keep], v[keep], rcond=None)[0]
        resid = v - a @ coef
        keep = resid >= np.median(resid[keep])
    field = a @ coef
    ref = float(np.median(field))
    if ref <= 0 or field.min() < 0.3 * ref or field.max() / field.min() < 1 + _EVEN_LIGHT:
        return None
    return np.append(coef, ref)


def _flatten(
    img: np.ndarray, illum: np.ndarray | None, y0: int, x0: int, k: int, shape: tuple[int, int]
) -> np.ndarray:
    """Divide a block-averaged read (h', w'[, c]) by the fitted illumination, in place."""
    if illum is None:
        return img
    h, w = shape
    gy = ((y0 + (np.arange(img.shape[0]) + 0.5) * k) / h * 2 - 1).astype(np.float32)[:, None]
    gx = ((x0 + (np.arange(img.shape[1]) + 0.5) * k) / w * 2 - 1).astype(np.float32)[None, :]
    c = illum.astype(np.float32)
    field = c[0] + c[1] * gx + c[2] * gy + c[3] * gx * gx + c[4] * gx * gy + c[5] * gy * gy
    gain = np.clip(c[6] / np.maximum(field, np.float32(1e-3)), 0.5, 3.0)
    img *= gain[..., None] if img.ndim == 3 else gain
    return img


def _read_nucleus_map(
    image: ArrayLike,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    k: int,
    illum: np.ndarray | None,
    sigma: float,
) -> np.ndarray:
    """Nucleus map of ``image[y0:y1, x0:x1]`` at block size k: (h', w') float32.

    Blue minus green, light-corrected and smoothed: high on Giemsa-stained nuclei (violet),
    about 0 on RBCs (pink) and glass (grey). Only two float planes are held.
    """
    blue, green = _read_channels(image, y0, y1, x0, x1, k, (2, 1))
    blue -= green
    del green
    _flatten(blue, illum, y0, x0, k, np.shape(image)[:2])
    return ndi.gaussian_filter(blue, sigma, mode="nearest")


def _rbc_diameter_px(green: np.ndarray) -> tuple[float | None, float]:
    """RBC diameter in one green-channel window (px at its resolution, or None), cell cover."""
    green = ndi.uniform_filter(green, 3)
    if float(green.max() - green.min()) < 8.0:
        return None, 0.0
    # Cells (RBCs, WBCs) are darker than the glass in green; pallor holes are filled, except
    # in a packed field, where filling would also close the gaps between cells.
    dark = green < threshold_otsu(green)
    cells = ndi.binary_fill_holes(dark)
    cover = float(cells.mean())
    if cover > _MAX_FILLED_COVER:
        cells = dark
    radii = _inscribed_radii(cells)
    if radii.size == 0:
        return None, cover
    # Area-weighted 40th percentile: the radius below which the discs cover 40 % of the cell
    # area. Weighting by area makes small debris count little; taking 40 % rather than 50 %
    # keeps large clumps of overlapping RBCs (rouleaux) from inflating it.
    order = np.sort(radii)
    cum = np.cumsum(order**2)
    return float(2.0 * order[np.searchsorted(cum, _RBC_AREA_QUANTILE * cum[-1])]), cover


def _estimate_rbc_diameter(
    image: ArrayLike, windows: list[tuple[int, int, int, int]], illum: np.ndarray | None
) -> float | None:
    shape = np.shape(image)[:2]

    def green(y0: int, y1: int, x0: int, x1: int, k: int) -> np.ndarray:
        (g,) = _read_channels(image, y0, y1, x0, x1, k, (1,))
        return _flatten(g, illum, y0, x0, k, shape)

    values = []
    for y0, y1, x0, x1 in windows:
        d, cover = _rbc_diameter_px(green(y0, y1, x0, x1, 2))
        d = None if d is None else 2.0 * d
        # Small or packed RBCs lose the gaps between them at half resolution: measure at full.
        if d is None or d < _FULL_RES_BELOW_PX or cover > _FULL_RES_ABOVE_COVER:
            d, _ = _rbc_diameter_px(green(y0, y1, x0, x1, 1))
        if d is not None:
            values.append(d)
    return float(np.median(values)) if values else None


def estimate_rbc_diameter(image: ArrayLike) -> float | None:
    """Estimate the red-cell diameter of a smear image from its pale discs, in pixels.

    Parameters
    ----------
    image : array-like of shape (H, W, 3)
        RGB smear (uint8, or any dtype accepted by `detect_wbcs`); may be a memory map.

    Returns
    -------
    float or None
        Typical RBC diameter in pixels; None when the image shows no cells (blank, or too
        small to measure).

    Notes
    -----
    Uneven light is divided out first (a quadratic fitted to the bright glass). Cells are the
    pixels darker in green than Otsu's threshold, holes (RBC pallor) filled unless that covers
    more than 90 % of the field (packed cells). Maximal inscribed discs are picked greedily
    from the distance transform, largest first, and the diameter is twice their area-weighted
    40th-percentile radius. Measured at half resolution, and again at full resolution when
    that gives under 24 px or cells cover over 70 % of the field. Large images are sampled in
    up to 3 x 3 windows of 1024 px and the median taken. Figures on BCCD and the synthetic
    smears are in ``docs/detection.md``.
    """
    shape = np.shape(image)
    if len(shape) != 3 or shape[2] < 3:
        raise ValueError(f"image must have shape (H, W, 3), got {shape}")
    if min(shape[:2]) < 16:
        return None
    windows = _windows(shape[:2])
    return _estimate_rbc_diameter(image, windows, _fit_illumination(image, windows))


def _threshold(values: np.ndarray) -> tuple[float, float]:
    """Nucleus threshold and the median (the RBC / glass level) of nucleus-map values."""
    p50, p75 = np.percentile(values, [50, 75])
    floor = p50 + max(_FLOOR_SPREADS * (p75 - p50), _MIN_CONTRAST)
    t = float(threshold_otsu(values)) if values.max() > values.min() else float(p50)
    return max(t, float(floor)), float(p50)


def _disk(radius: float) -> np.ndarray:
    """Digital disc: offsets within Euclidean distance ``radius``, (2r+1, 2r+1) bool."""
    r = int(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return yy * yy + xx * xx <= radius * radius


def _candidates(f: np.ndarray, d: float, t: float) -> pd.DataFrame:
    """WBC candidates of one work-resolution nucleus map and their features.

    Parameters
    ----------
    f : ndarray of shape (h, w), float32
        Nucleus map (`_read_nucleus_map`).
    d : float
        RBC diameter at work resolution, px.
    t : float
        Nucleus-map threshold.

    Returns
    -------
    pandas.DataFrame
        One row per grouped region that is large enough for a WBC (`_MIN_EXTENT_D2`,
        `_MIN_NUCLEUS_D2`): ``y``, ``x`` (nucleus centroid, block px), ``extent`` (area of the
        grouped region, D**2), ``nucleus`` (nucleus pixels, D**2), ``thickness`` (largest
        inscribed radius of the nucleus, D), ``mean_f`` (mean nucleus-map value).
    """
    cols = ["y", "x", "extent", "nucleus", "thickness", "mean_f"]
    empty = pd.DataFrame(columns=cols, dtype=float)
    mask = f > t
    lab, n = ndi.label(mask)
    if n == 0:
        return empty
    keep = np.bincount(lab.ravel(), minlength=n + 1) >= _SPECK_AREA_D2 * d * d
    keep[0] = False
    mask = keep[lab]
    del lab
    # Group lobes: grow by the gap (dilation by a disc = distance <= gap); each connected grown
    # region is one candidate cell.
    region = ndi.binary_dilation(mask, _disk(_GROUP_GAP_D * d))
    groups, ng = ndi.label(region)
    if ng == 0:
        return empty
    groups = _split_touching(groups, ng, region, mask, d)
    ng = int(groups.max())
    extent = np.bincount(groups.ravel(), minlength=ng + 1)
    ys, xs = np.nonzero(mask)
    g = groups[ys, xs]
    nucleus = np.bincount(g, minlength=ng + 1)
    ok = (extent >= _MIN_EXTENT_D2 * d * d) & (nucleus >= _MIN_NUCLEUS_D2 * d * d)
    ok[0] = False
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        return empty
    cy = np.bincount(g, weights=ys, minlength=ng + 1)[idx] / nucleus[idx]
    cx = np.bincount(g, weights=xs, minlength=ng + 1)[idx] / nucleus[idx]
    mean_f = np.bincount(g, weights=f[ys, xs], minlength=ng + 1)[idx] / nucleus[idx]
    # Thickness (largest inscribed radius) of each remaining nucleus, in its own bounding box.
    objects = ndi.find_objects(groups)
    thickness = np.empty(len(idx))
    for j, i in enumerate(idx):
        sl = objects[i - 1]
        nuc = np.pad(mask[sl] & (groups[sl] == i), 1)
        thickness[j] = ndi.distance_transform_edt(nuc).max()
    return pd.DataFrame(
        {
            "y": cy,
            "x": cx,
            "extent": extent[idx] / (d * d),
            "nucleus": nucleus[idx] / (d * d),
            "thickness": thickness / d,
            "mean_f": mean_f,
        }
    )


def _detect_block(
    f: np.ndarray, d: float, t: float, base: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """WBCs of one work-resolution nucleus map: centres y, x, diameters (px) and scores."""
    c = _candidates(f, d, t)
    c = c[c["thickness"] >= _MIN_THICKNESS_D]
    extent = c["extent"].to_numpy(float)
    diameter = _DIAMETER_OVER_EXTENT * np.sqrt(4.0 / np.pi * extent) * d
    size_term = np.clip(np.log(extent / _MIN_EXTENT_D2) / np.log(4.0), 0.0, 1.0)
    contrast_term = np.clip((c["mean_f"].to_numpy(float) - t) / max(t - base, 1e-6), 0.0, 1.0)
    score = 0.5 * (size_term + contrast_term)
    return c["y"].to_numpy(float), c["x"].to_numpy(float), diameter, score


def _split_touching(
    groups: np.ndarray, ng: int, region: np.ndarray, mask: np.ndarray, d: float
) -> np.ndarray:
    """Split grouped regions too large to be one WBC into cells, by a watershed.

    Only regions of at least `_SPLIT_MIN_EXTENT_D2` are cut: on BCCD the far lobes of one
    eosinophil or band cell look the same to a shape cue as two touching nuclei, so smaller
    pairs are left whole. The cut is a watershed on the distance transform of the nucleus
    pixels, seeded at peaks at least `_SPLIT_DISTANCE_D` / 2 apart and `_SPLIT_MIN_RADIUS_D`
    deep; pieces with less nucleus than `_MIN_PIECE_NUCLEUS_D2` (a lobe) are merged back into
    the neighbour they share most border with.

    Parameters
    ----------
    groups : ndarray of shape (h, w), int
        Grouped regions, labels 1..ng.
    ng : int
        Number of regions.
    region : ndarray of shape (h, w), bool
        Grouped (dilated) nucleus regions.
    mask : ndarray of shape (h, w), bool
        Nucleus pixels.
    d : float
        RBC diameter, px.

    Returns
    -------
    ndarray of shape (h, w), int
        Labels; new pieces get labels above ``ng``.
    """
    # Rarely needed, and skimage.feature pulls scipy.spatial: imported here.
    from skimage.feature import peak_local_max

    extent = ndi.sum_labels(region, groups, np.arange(1, ng + 1))
    out = groups
    next_label = ng + 1
    big = np.flatnonzero(extent >= _SPLIT_MIN_EXTENT_D2 * d * d) + 1
    objects = ndi.find_objects(groups) if len(big) else []
    for g in big:
        sl = objects[g - 1]
        reg = np.pad(groups[sl] == g, 1)
        nuc = np.pad(mask[sl], 1) & reg
        dist = ndi.gaussian_filter(ndi.distance_transform_edt(nuc), 0.05 * d)
        peaks = peak_local_max(
            dist,
            min_distance=max(1, round(_SPLIT_DISTANCE_D * d / 2)),
            threshold_abs=_SPLIT_MIN_RADIUS_D * d,
            labels=nuc.astype(np.int32),
            exclude_border=False,
        )
        if len(peaks) < 2:
            continue
        markers = np.zeros(reg.shape, dtype=np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        pieces = watershed(-dist, markers, mask=reg)[1:-1, 1:-1]
        pieces = _merge_small_pieces(pieces, nuc[1:-1, 1:-1], d)
        if pieces.max() < 2:
            continue
        if out is groups:
            out = groups.copy()
        view = out[sl]
        for p in range(2, int(pieces.max()) + 1):
            view[pieces == p] = next_label
            next_label += 1
    return out


def _merge_small_pieces(pieces: np.ndarray, nuc: np.ndarray, d: float) -> np.ndarray:
    """Merge watershed pieces with too little nucleus into their main neighbour.

    Returns labels renumbered 1..n (0 outside).
    """
    pieces = pieces.copy()
    cross = ndi.generate_binary_structure(2, 2)
    while True:
        labels = np.unique(pieces[pieces > 0])
        area = ndi.sum_labels(nuc, pieces, labels)
        weak = area < _MIN_PIECE_NUCLEUS_D2 * d * d
        if len(labels) < 2 or not weak.any():
            new = np.zeros(int(pieces.max()) + 1, dtype=np.int32)
            new[labels] = np.arange(1, len(labels) + 1)
            return new[pieces]
        p = labels[np.argmin(np.where(weak, area, np.inf))]
        ring = ndi.binary_dilation(pieces == p, cross) & (pieces != p) & (pieces > 0)
        # Pieces of one connected region touch; the fallback (largest piece) is a safeguard.
        target = np.bincount(pieces[ring]).argmax() if ring.any() else labels[np.argmax(area)]
        pieces[pieces == p] = target


def _tiles(h: int, w: int, step: int) -> Iterator[tuple[int, int, int, int]]:
    for y0 in range(0, h, step):
        for x0 in range(0, w, step):
            yield y0, min(y0 + step, h), x0, min(x0 + step, w)


def _image_scale(
    image: ArrayLike, pixel_size_um: float | None
) -> tuple[int, float, float, float, np.ndarray | None] | None:
    """Image-wide settings, measured on the same windows whatever the tiling.

    Returns
    -------
    tuple or None
        Block size k, RBC diameter at work resolution (px), nucleus threshold, median level,
        illumination fit; None when the image shows no cells to measure the scale from.
    """
    h, w = np.shape(image)[:2]
    windows = _windows((h, w))
    illum = _fit_illumination(image, windows)
    if pixel_size_um is not None:
        d_full = RBC_DIAMETER_UM / pixel_size_um
    else:
        est = _estimate_rbc_diameter(image, windows, illum)
        if est is None:
            return None
        d_full = est
    k = max(1, round(d_full / _WORK_RBC_PX))
    d = d_full / k
    sigma = max(0.7, _SMOOTH_D * d)
    samples = []
    for y0, y1, x0, x1 in windows:
        f = _read_nucleus_map(image, y0, y1, x0, x1, k, illum, sigma)
        # Every s-th pixel keeps the statistics and bounds the memory of huge windows.
        s = max(1, math.ceil(math.sqrt(f.size / _MAX_SAMPLES_PER_WINDOW)))
        samples.append(f[::s, ::s].ravel())
    t, base = _threshold(np.concatenate(samples))
    return k, d, t, base, illum


def detect_wbcs(
    image: ArrayLike,
    *,
    pixel_size_um: float | None = None,
    tile_size: int = 2048,
    progress: Callable[[int, int], object] | None = None,
) -> pd.DataFrame:
    """Find white blood cells in an RGB smear image.

    Parameters
    ----------
    image : array-like of shape (H, W, 3)
        RGB smear, uint8 (other integer dtypes are scaled by their maximum, floats are read as
        0-1; a 4th channel is ignored). May be a numpy memory map of a huge image: it is read
        in tiles, so memory stays bounded by the tile size.
    pixel_size_um : float, optional
        Pixel size in um. When given, sizes follow from an RBC of 7.5 um and crops are a fixed
        24 um field; otherwise the RBC diameter is measured in the image
        (`estimate_rbc_diameter`).
    tile_size : int
        Side of the tiles, px. Tiles overlap by two RBC diameters on each side; a cell belongs
        to the tile whose core holds its centre, so none is reported twice.
    progress : callable, optional
        Called as ``progress(done, total)`` after each tile.

    Returns
    -------
    pandas.DataFrame
        One row per WBC with `DETECTION_COLUMNS`: ``x``, ``y`` centre (float px, x = column,
        y = row), ``x0, y0, x1, y1`` square crop box (int, half-open, may extend beyond the
        image), ``score`` in [0, 1] (nucleus size and colour contrast, higher = surer),
        ``diameter`` the estimated cell diameter in px. Sorted by ``y`` then ``x``, index
        0..n-1. Empty (with these columns) when no cell is found.

    Raises
    ------
    ValueError
        When the image is not (H, W, >=3), or ``tile_size`` or ``pixel_size_um`` is not
        positive.

    Notes
    -----
    All sizes are in units of the RBC diameter D (7.5 um), so the same parameters serve every
    magnification. Image-wide settings (light, D, threshold) come from the same windows of
    the image whatever the tiling, so tiled and untiled runs find the same cells.

    1. Light: a quadratic fitted to the bright glass is divided out.
    2. Scale: D from the pixel size or `estimate_rbc_diameter`; the image is block-averaged so
       that D spans about 24 px.
    3. Nucleus map ``f = B - G`` (Giemsa nuclei are violet, RBCs pink, glass grey), smoothed by
       0.03 D. Threshold: the largest of Otsu's, ``median + 3 (p75 - median)`` and
       ``median + 12`` grey levels (most pixels are RBCs and glass, so the median is their
       level and the spread their noise).
    4. Specks under 0.01 D**2 are dropped; nucleus pieces less than 0.24 D apart are grouped
       (lobes of a segmented neutrophil); a group too large for one cell (> 8 D**2) is cut by
       a watershed on its distance transform.
    5. A group is a WBC when it covers >= 0.5 D**2, holds >= 0.3 D**2 of nucleus pixels and
       its nucleus is >= 0.18 D thick: platelets (2-3 um, ~0.3 D), platelet clumps and
       eosinophil granules (thin chains) fail.
    6. Score = mean of a size term (``log(extent / 0.5 D**2) / log 4``, clipped to [0, 1]) and
       a contrast term (``(mean f - threshold) / (threshold - median)``, clipped); diameter =
       1.25 x the equivalent diameter of the grouped region.
    """
    _check_pixel_size(pixel_size_um)
    if not hasattr(image, "shape"):
        image = np.asarray(image)
    shape = np.shape(image)
    if len(shape) != 3 or shape[2] < 3:
        raise ValueError(f"image must have shape (H, W, 3) RGB, got {shape}")
    if int(tile_size) < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    h, w = shape[:2]
    check_pixel_size_fits((h, w), pixel_size_um)  # before any window is allocated
    if min(h, w) < 16:
        return _empty_table()
    scale = _image_scale(image, pixel_size_um)
    if scale is None:
        return _empty_table()
    k, d, t, base, illum = scale
    sigma = max(0.7, _SMOOTH_D * d)
    margin = k * math.ceil(_MARGIN_D * d)
    step = max(k, (int(tile_size) // k) * k)
    tiles = list(_tiles(h, w, step))
    ys, xs, ds, ss = [], [], [], []
    for i, (ty0, ty1, tx0, tx1) in enumerate(tiles):
        oy0, ox0 = max(0, ty0 - margin), max(0, tx0 - margin)
        oy1, ox1 = min(h, ty1 + margin), min(w, tx1 + margin)
        f = _read_nucleus_map(image, oy0, oy1, ox0, ox1, k, illum, sigma)
        cy, cx, diam, score = _detect_block(f, d, t, base)
        del f
        # Block i covers full-resolution pixels i*k .. i*k + k - 1, centred at i*k + (k-1)/2;
        # a partial last block (edge-padded) may put a centre past the edge: clip it back.
        cy = np.clip(oy0 + (cy + 0.5) * k - 0.5, 0, h - 1)
        cx = np.clip(ox0 + (cx + 0.5) * k - 0.5, 0, w - 1)
        own = (cy >= ty0) & (cy < ty1) & (cx >= tx0) & (cx < tx1)
        ys.append(cy[own])
        xs.append(cx[own])
        ds.append(diam[own] * k)
        ss.append(score[own])
        if progress is not None:
            progress(i + 1, len(tiles))
    y, x = np.concatenate(ys), np.concatenate(xs)
    order = np.lexsort((x, y))
    table = _table(
        x[order], y[order], np.concatenate(ds)[order], np.concatenate(ss)[order], pixel_size_um
    )
    return table.reset_index(drop=True)


def match_detections(centres: ArrayLike, boxes: ArrayLike) -> int:
    """Number of one-to-one matches between detected centres and ground-truth boxes.

    Parameters
    ----------
    centres : array-like of shape (n, 2)
        Detected centres ``(x, y)``.
    boxes : array-like of shape (m, 4)
        Ground-truth boxes ``(x0, y0, x1, y1)``, inclusive bounds (Pascal VOC).

    Returns
    -------
    int
        Size of a maximum bipartite matching in which a centre may match a box that contains
        it (higher is better; recall = matches / m, precision = matches / n).
    """
    # Evaluation helper only: keep scipy.optimize out of the import of this module.
    from scipy.optimize import linear_sum_assignment

    c = np.asarray(centres, dtype=float).reshape(-1, 2)
    b = np.asarray(boxes, dtype=float).reshape(-1, 4)
    if len(c) == 0 or len(b) == 0:
        return 0
    inside = (
        (b[None, :, 0] <= c[:, None, 0])
        & (c[:, None, 0] <= b[None, :, 2])
        & (b[None, :, 1] <= c[:, None, 1])
        & (c[:, None, 1] <= b[None, :, 3])
    )
    rows, cols = linear_sum_assignment(inside, maximize=True)
    return int(inside[rows, cols].sum())

"""The ``handcrafted`` backbone: colour, texture and shape features of one WBC crop.

The offline default embedding: no weights, CPU only, a pure function of the crop.
A crop is resized to :data:`INPUT_SIZE` px (texture is read there) and pooled to half
that side for everything else; it is converted to optical density (Beer-Lambert, with
the crop's own glass as the white point) and its central white cell is segmented into
nucleus and cytoplasm (:func:`segment_cell`). The vector (:data:`FEATURE_NAMES`)
describes size and nucleus shape, the stain colour of nucleus and cytoplasm, and the
texture of chromatin and granules; ``docs/handcrafted.md`` explains each group and its
measured accuracy, in one lab and across labs.

Version 2 measures nothing in pixels, crop fractions or absolute optical density, so
that another lab's stain, lamp, magnification and crop framing move it little: sizes
are in red-cell diameters (:func:`red_cells`), colours are OD relative to the nucleus'
OD per channel (:func:`stain_reference`; a per-channel stain strength cancels), the
nucleus is measured against the red cells, and texture is read at scales that are
fractions of the cell's radius. Thresholds (nucleus, glass) are Otsu levels of each
crop (a fixed floor only keeps a blank crop from reading noise as stain).

Nothing here is fitted to data: every scale is a fixed constant from the feature's
natural range, so a plain Euclidean kNN on the raw vectors is meaningful and a crop's
vector never depends on which other crops are embedded with it.
numpy, scipy, Pillow and scikit-image only; reads and writes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

__all__ = [
    "FEATURE_NAMES",
    "FEATURE_VERSION",
    "INPUT_SIZE",
    "HandcraftedBackbone",
    "handcrafted_features",
    "segment_cell",
]

#: Side in px that every crop is squash-resized to; texture is measured at this size.
INPUT_SIZE: int = 256
#: Side of the pooled image used for segmentation, shape and colour.
WORK_SIZE: int = INPUT_SIZE // 2
#: Bumped whenever the vector changes meaning (saved with the embeddings).
FEATURE_VERSION: int = 3

# ---------------------------------------------------------------- fixed constants
# Lengths are px of the WORK_SIZE image; OD is optical density (natural log).
_OD_MAX = 3.0  # OD is clipped here: ln(256) ~ 5.5 is JPEG noise in the black
_WHITE_PERCENTILE = 99.0  # per-channel white point: the brightest glass in the crop
_MIN_WHITE = 32.0  # a crop darker than this everywhere has no glass to refer to
_SMOOTH_SIGMA = 1.0  # before thresholding (JPEG blocks, granules)
_NUCLEUS_MIN_CONTRAST = 0.15  # OD red - blue; below it no nucleus (blank or grey crop)
_GLASS_MAX_OD = 0.10  # summed OD; glass is never darker than this floor
_NUCLEUS_JOIN_PX = 3  # nucleus pieces this close to the central one belong to it
_REACH_FRACTION = 0.6  # cytoplasm ends within this x nucleus-hull radius of the hull
_REACH_MIN_PX = 5
_SEED_GROW_PX = 3  # the nucleus seed grows past the nucleus rim's own edge
_EDGE_OD_CLIP = 0.4  # OD per channel, about the cytoplasm's: nucleus rims are no edge
_EDGE_NUCLEUS_FRACTION = 0.5  # ... or half the nucleus' median OD per channel if lower
_LOBE_DEPTH = 0.4  # a lobe's core is deeper than this x the nucleus' equivalent radius
_MAX_LOBES = 4
_QUANTILES = (0.1, 0.5, 0.9)
_MIN_CELL_RADIUS = 4.0  # px of WORK_SIZE
_MIN_RBC_PX = 20  # stained blobs smaller than this are no red cell (platelets, dirt)
_TYPICAL_CELL_RBC = 1.6  # white / red cell diameter assumed when no red cell is seen
_MAX_CELL_RBC = 4.0
# nucleus / red cell OD per channel assumed when no red cell is seen (PBC's median)
_TYPICAL_NUC_RBC = (4.4, 4.8, 1.9)
_MIN_REF_PX = 16  # the nucleus must have this many px to be the colour reference
_MIN_REF_OD = 0.05  # no reference OD below this (a blank crop)
_MIN_REF_SHARE = 0.25  # ... nor below this share of the reference's strongest channel
_CHROMA_BINS = 5
_CHROMA_RANGE = (-1.5, 1.5)  # ln(OD_r / OD_g), ln(OD_b / OD_g) relative to the nucleus'
_DENSITY_BINS = 8
_DENSITY_RANGE = (0.0, 2.0)  # mean OD per channel relative to the nucleus' median
# Band edges of the texture, as fractions of the cell's equivalent radius (0 = the
# image itself): granules, chromatin grain, clumps and lobe gaps, lobes.
_DOG_FRACTIONS = (0.0, 1 / 24, 1 / 12, 1 / 6, 1 / 3)
_DOG_NAMES = ("0", "r/24", "r/12", "r/6", "r/3")
_GLCM_LEVELS = 16
_GLCM_MAX = 2.0  # summed OD relative to the nucleus' mapped onto the top grey level
_GLCM_DISTANCE = 1 / 32  # co-occurrence step as a fraction of the cell radius
_GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation")

# Group weights. Values are in natural units (fractions, OD relative to the nucleus',
# log ratios, square roots of normalised histograms); these factors give the groups
# comparable spread in a Euclidean distance (docs/handcrafted.md, "Scaling").
_W_SIZE = 1.0  # white / red cell diameter: ~0.3 (platelet) to ~2.5 (monocyte)
_W_SHAPE = 2.0  # fractions in [0, 1]
_W_NUCLEUS_RBC = 1.0  # ln(OD / red cell OD): ~-1 to 2
_W_NUCLEUS_OD = 4.0  # nucleus OD quantiles relative to its median: ~0.5-1.5
_W_OD = 0.5  # cytoplasm OD relative to the nucleus': ~0.1-0.6
_W_OD_SPREAD = 4.0  # cytoplasm OD spread (granularity), relative: ~0.05-0.3
_W_DENSITY = 2.0  # how much of the cell is pale, mid or as dark as the nucleus
_W_CHROMA = 2.0  # log hue ratios differ by a few tenths between stains
_W_CHROMA_HIST = 2.0  # the mixture of hues in the cytoplasm (granules on a base)
_W_TEXTURE = 12.0  # band energies relative to the nucleus' OD: ~0.02-0.2
_W_GLCM = 2.0


def _names() -> tuple[str, ...]:
    names = [
        "cell_diameter_rbc",
        "nucleus_diameter_rbc",
        "nucleus_cell_area_ratio",
        "nucleus_solidity",
        "nucleus_circularity",
        "nucleus_thickness",
        "nucleus_lobes",
    ]
    names += [f"nucleus_od_rbc_log_{c}" for c in "rgb"]
    names += [f"cytoplasm_od_rbc_log_{c}" for c in "rgb"]
    names += [f"nucleus_relod_{c}_q{q}" for q in (10, 90) for c in "rgb"]
    names += [f"cytoplasm_relod_{c}_q{round(q * 100)}" for q in _QUANTILES for c in "rgb"]
    names += [f"cytoplasm_relod_{c}_std" for c in "rgb"]
    names += ["cytoplasm_logchroma_rg", "cytoplasm_logchroma_bg"]
    names += [
        f"cytoplasm_chroma_hist_r{i}_b{j}"
        for i in range(_CHROMA_BINS)
        for j in range(_CHROMA_BINS)
    ]
    names += [f"cell_density_hist_{i}" for i in range(_DENSITY_BINS)]
    for lo, hi in pairwise(_DOG_NAMES):
        names += [f"nucleus_dog_{lo}-{hi}", f"cytoplasm_dog_{lo}-{hi}"]
    names += [f"nucleus_glcm_{p}" for p in _GLCM_PROPS]
    return tuple(names)


#: One name per output dimension of :func:`handcrafted_features`.
FEATURE_NAMES: tuple[str, ...] = _names()


# ---------------------------------------------------------------------- the image
def _as_rgb8(crop: np.ndarray) -> np.ndarray:
    """Any image array -> ``(H, W, 3)`` uint8; uint8 RGB passes through untouched."""
    arr = np.asarray(crop)
    if arr.ndim == 3 and arr.shape[-1] == 3 and arr.dtype == np.uint8:
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"empty crop: shape {arr.shape}")
        return arr
    from napari_hemofm.core.io import to_rgb8

    return to_rgb8(arr)


def _resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """Squash-resize to ``(size, size, 3)``; PIL's bilinear filter antialiases when shrinking."""
    if rgb.shape[:2] == (size, size):
        return np.ascontiguousarray(rgb)
    image = Image.fromarray(np.ascontiguousarray(rgb))
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


def _optical_density(rgb: np.ndarray, white: np.ndarray) -> np.ndarray:
    """``ln(white / I)`` per channel, float32 in ``[0, _OD_MAX]``."""
    return np.clip(np.log(white / (rgb.astype(np.float32) + 1.0)), 0.0, _OD_MAX)


def _densities(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optical density of a crop at ``INPUT_SIZE`` and, 2x2-pooled, at ``WORK_SIZE``.

    The white point ``I0`` is the crop's own (the 99th percentile of each channel, the
    glass between the cells), so the colour and brightness of the lamp cancel out.
    """
    hi = _resize(_as_rgb8(crop), INPUT_SIZE)
    f = hi.astype(np.float32)
    lo = 0.25 * (f[0::2, 0::2] + f[1::2, 0::2] + f[0::2, 1::2] + f[1::2, 1::2])
    white = np.percentile(lo.reshape(-1, 3), _WHITE_PERCENTILE, axis=0) + 1.0
    white = np.maximum(white, _MIN_WHITE).astype(np.float32)
    # uint8 in, so the large image's OD is a table lookup per channel
    table = _optical_density(np.arange(256, dtype=np.float32)[:, None], white)
    od_hi = np.stack([table[hi[..., c], c] for c in range(3)], axis=-1)
    return od_hi, _optical_density(lo, white)


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold, or +inf for (nearly) constant values."""
    from skimage.filters import threshold_otsu

    if values.size == 0 or float(np.ptp(values)) < 1e-6:
        return float("inf")
    return float(threshold_otsu(values))


def _glass_threshold(density: np.ndarray) -> float:
    """Summed-OD level between glass and anything stained (lowest of three Otsu classes)."""
    from skimage.filters import threshold_multiotsu

    if float(np.ptp(density)) < 1e-3:
        return _GLASS_MAX_OD
    try:
        low = float(threshold_multiotsu(density, classes=3)[0])
    except ValueError:  # too few distinct levels for three classes
        low = _otsu(density)
    return max(low, _GLASS_MAX_OD)


def _glass_seed_threshold(density: np.ndarray, stained_level: float) -> float:
    """Summed-OD level below which a pixel is surely glass.

    The pixels below ``stained_level`` hold the glass and, in thinly stained smears
    (Wright), pale cytoplasm too; Otsu's threshold among them parts the two.
    """
    low = density[density < stained_level]
    if low.size < 16:
        return stained_level
    return float(min(stained_level, max(_otsu(low), _GLASS_MAX_OD)))


def _sum3(image: np.ndarray) -> np.ndarray:
    """Sum over the last (colour) axis; numpy's reduction over 3 is slow."""
    return image[..., 0] + image[..., 1] + image[..., 2]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_fill_holes`` by labelling the background (many times faster)."""
    lab, n = ndi.label(~mask)
    if n == 0:
        return mask
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    return mask | ((lab > 0) & ~np.isin(lab, border))


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius**2


def _central_component(mask: np.ndarray) -> np.ndarray:
    """The component of ``mask`` nearest the image centre, with those close to it."""
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    h, w = mask.shape
    yy, xx = np.ogrid[:h, :w]
    dist = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2)
    nearest = int(np.argmin(ndi.minimum(dist, lab, np.arange(1, n + 1)))) + 1
    near = ndi.binary_dilation(lab == nearest, iterations=_NUCLEUS_JOIN_PX)
    return np.isin(lab, np.unique(lab[near & (lab > 0)]))


def _segment(od: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Masks of the central WBC in ``od``: nucleus, cell, nucleus convex hull.

    The fourth mask is every pixel above the glass level (where :func:`red_cells`
    looks for the red cells), so that it is thresholded once.
    """
    from skimage.filters import sobel
    from skimage.morphology import convex_hull_image
    from skimage.segmentation import watershed

    smooth = ndi.gaussian_filter(od, (_SMOOTH_SIGMA, _SMOOTH_SIGMA, 0))
    # Nucleus: azure-eosin purple absorbs red light far more than blue; red cells and
    # eosinophil granules absorb blue and so drop out of (red - blue).
    purple = smooth[..., 0] - smooth[..., 2]
    nucleus = purple > max(_otsu(purple), _NUCLEUS_MIN_CONTRAST)
    nucleus = _fill_holes(_central_component(ndi.binary_opening(nucleus)))

    density = _sum3(smooth)
    stained_level = _glass_threshold(density)
    above_glass = density > stained_level
    stained = ndi.binary_opening(_fill_holes(above_glass), _disk(2))
    if not nucleus.any():  # blank crop, bare platelet...: the stained blob at the centre
        return nucleus, _central_component(stained), nucleus, above_glass

    # Cell: marker watershed on colour edges. Seeds: the nucleus, the glass, and every
    # stained pixel farther from the nucleus than cytoplasm reaches (red cells,
    # neighbours). Only a window around the nucleus can change, so only it is flooded.
    rows, cols = np.flatnonzero(nucleus.any(axis=1)), np.flatnonzero(nucleus.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    hull = np.zeros_like(nucleus)
    hull[box] = convex_hull_image(nucleus[box])
    reach = max(_REACH_MIN_PX, _REACH_FRACTION * np.sqrt(hull.sum() / np.pi))
    margin = int(np.ceil(reach)) + 3
    win = (
        slice(max(rows[0] - margin, 0), rows[-1] + margin + 1),
        slice(max(cols[0] - margin, 0), cols[-1] + margin + 1),
    )
    inside, seed = stained[win], nucleus[win]
    glass = density[win] < _glass_seed_threshold(density, stained_level)
    markers = np.where(glass & ~inside, 1, 0).astype(np.int32)
    markers[inside & (ndi.distance_transform_edt(~hull[win]) > reach)] = 3
    markers[ndi.binary_dilation(seed, iterations=_SEED_GROW_PX) & inside] = 2
    markers[seed] = 2
    # Clip below the nucleus (at half its median OD per channel, if under
    # _EDGE_OD_CLIP) so the nucleus rim is no edge even where the stain is thin.
    clip = np.minimum(_EDGE_OD_CLIP, _EDGE_NUCLEUS_FRACTION * np.median(smooth[nucleus], axis=0))
    clipped = np.minimum(smooth[win], clip)
    edges = sobel(clipped[..., 0]) + sobel(clipped[..., 1]) + sobel(clipped[..., 2])
    cell = np.zeros_like(nucleus)
    cell[win] = watershed(edges, markers) == 2
    cell = _fill_holes(ndi.binary_opening(cell) | nucleus)
    lab, n = ndi.label(cell)
    if n > 1:
        cell = lab == int(np.argmax(ndi.sum(nucleus, lab, np.arange(1, n + 1)))) + 1
    return nucleus, cell | nucleus, hull, above_glass


def segment_cell(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment the central white cell of a crop into nucleus and whole cell.

    Parameters
    ----------
    crop : ndarray of shape (H, W, 3), uint8
        RGB crop with the cell near its centre. Greyscale, RGBA and other dtypes are
        normalised with :func:`napari_hemofm.core.io.to_rgb8`.

    Returns
    -------
    nucleus : ndarray of shape (H, W), bool
        The nucleus (pieces within a few px of the central one joined, holes filled);
        all False when nothing nucleus-coloured is found.
    cell : ndarray of shape (H, W), bool
        The whole cell, nucleus included.

    Notes
    -----
    Runs at ``WORK_SIZE`` px, as the features do, and scales the masks back to the
    crop (nearest neighbour). The nucleus is the Otsu-thresholded purple channel
    ``OD_red - OD_blue`` component nearest the centre; the cell is a marker watershed
    on colour edges between that nucleus, the glass, and stained pixels too far from
    the nucleus to be its cytoplasm.
    """
    rgb = _as_rgb8(crop)
    h, w = rgb.shape[:2]
    nucleus, cell, _, _ = _segment(_densities(rgb)[1])
    rows = np.minimum((np.arange(h) + 0.5) * WORK_SIZE / h, WORK_SIZE - 1).astype(int)
    cols = np.minimum((np.arange(w) + 0.5) * WORK_SIZE / w, WORK_SIZE - 1).astype(int)
    return nucleus[np.ix_(rows, cols)], cell[np.ix_(rows, cols)]


# ------------------------------------------------------------------- the features
def _cell_radius(cell: np.ndarray) -> float:
    """Equivalent radius of the cell mask in px (at least 4: a blank crop has none)."""
    return max(float(np.sqrt(cell.sum() / np.pi)), _MIN_CELL_RADIUS)


def red_cells(
    od: np.ndarray, cell: np.ndarray, *, stained: np.ndarray | None = None
) -> tuple[float | None, np.ndarray | None]:
    """Typical radius and colour of the red cells around the white cell: the crop's rulers.

    Parameters
    ----------
    od : ndarray of shape (H, W, 3)
        Optical density of the crop.
    cell : ndarray of shape (H, W), bool
        The white cell (excluded, with a 2 px margin).
    stained : ndarray of shape (H, W), bool, optional
        The pixels above the glass level, when the segmentation has them already
        (``_segment`` computes the same mask); found here otherwise.

    Returns
    -------
    radius : float or None
        The 75th percentile, over the stained blobs outside the cell of at least 20 px,
        of each blob's largest inscribed radius (pallor holes filled; the crop edge
        counts as a boundary, so cut red cells count smaller); None when there are none.
    od : ndarray of shape (3,) or None
        Median OD of those blobs per channel (the lab's eosin on haemoglobin).

    Notes
    -----
    A red cell is about 7.5 um across in every lab, so a white cell's size divided by
    it is a size in red-cell units: free of the magnification, the camera and the crop
    framing. Overlapping red cells make a blob wider than one cell but not much
    thicker, which the inscribed radius ignores; the upper quartile favours the whole
    red cells over those the crop edge cuts. Their colour is the same kind of ruler for
    stain: every lab's red cells take the same eosin.
    """
    if stained is None:
        density = _sum3(ndi.gaussian_filter(od, (_SMOOTH_SIGMA, _SMOOTH_SIGMA, 0)))
        stained = density > _glass_threshold(density)
    others = stained & ~ndi.binary_dilation(cell, iterations=2)
    others = ndi.binary_opening(_fill_holes(others))
    lab, n = ndi.label(others)
    if n == 0:
        return None, None
    depth = ndi.distance_transform_edt(np.pad(others, 1))[1:-1, 1:-1]
    ids = np.arange(1, n + 1)
    big = ids[np.asarray(ndi.sum(others, lab, ids)) >= _MIN_RBC_PX]
    if len(big) == 0:
        return None, None
    radii = np.asarray(ndi.maximum(depth, lab, big))
    colour = np.maximum(np.median(od[np.isin(lab, big)], axis=0), _MIN_REF_OD)
    return float(np.percentile(radii, 75)), colour


def _shape_features(
    nucleus: np.ndarray, cell: np.ndarray, hull: np.ndarray, rbc_radius: float | None
) -> np.ndarray:
    """Sizes in red-cell units, N/C area ratio and nucleus shape: 7 values, free of px."""
    from skimage.measure import perimeter

    n_area, c_area = float(nucleus.sum()), float(cell.sum())
    out = np.zeros(7)
    if rbc_radius is None:  # no red cell to measure by: a typical white cell
        cell_units = _TYPICAL_CELL_RBC
    else:
        cell_units = min(np.sqrt(c_area / np.pi) / max(rbc_radius, 1.0), _MAX_CELL_RBC)
    out[0] = _W_SIZE * cell_units
    out[1] = _W_SIZE * cell_units * np.sqrt(n_area / c_area if c_area else 0.0)
    out[2] = _W_SHAPE * (n_area / c_area if c_area else 0.0)
    if n_area >= 4:
        radius = np.sqrt(n_area / np.pi)
        depth = ndi.distance_transform_edt(nucleus)
        _, lobes = ndi.label(depth > _LOBE_DEPTH * radius)
        out[3] = n_area / max(float(hull.sum()), n_area)  # solidity
        out[4] = min(1.0, 4 * np.pi * n_area / max(perimeter(nucleus), 1.0) ** 2)
        out[5] = float(depth.max()) / radius  # 1 for a disc, low for a thin band
        out[6] = min(lobes, _MAX_LOBES) / _MAX_LOBES
        out[3:] *= _W_SHAPE
    return out


def _quantiles(values: np.ndarray, qs: tuple[float, ...] = _QUANTILES) -> np.ndarray:
    """Quantiles of each channel, ``(3 * len(qs),)``, quantile-major."""
    if len(values) < 3:
        return np.zeros(3 * len(qs))
    return np.quantile(values, qs, axis=0).ravel()


def _sqrt_hist(hist: np.ndarray) -> np.ndarray:
    """Square root of an L1-normalised histogram (Euclidean distance becomes Hellinger)."""
    hist = hist.ravel().astype(np.float64)
    total = hist.sum()
    return np.sqrt(hist / total) if total > 0 else hist


def stain_reference(od: np.ndarray, nucleus: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Per-channel OD that the crop's colours are measured against: the nucleus' median.

    Parameters
    ----------
    od : ndarray of shape (H, W, 3)
        Optical density of the crop.
    nucleus, cell : ndarray of shape (H, W), bool
        Masks from the segmentation.

    Returns
    -------
    ndarray of shape (3,), float
        The nucleus' median OD per channel; the cell's (or every pixel's) when the
        nucleus has fewer than 16 px; at least 0.05, and at least a quarter of its
        strongest channel.

    Notes
    -----
    A stain that is weaker, stronger or of another hue scales each channel's OD by
    its own factor (to first order: Beer-Lambert with the same dyes in other amounts
    and a different light); dividing by a reference region's per-channel OD cancels
    that factor. The nucleus is in every white cell and takes the azure in every lab.
    Its own darkness is kept apart, in red-cell units (:func:`red_cells`): dividing
    everything by the red cells' OD instead was measured noisier (red cells overlap
    and vary in thickness), 0.85 against 0.89 on pbc_dev.

    A channel that the nucleus hardly absorbs is no ruler: Wright-stained nuclei seen
    by some cameras absorb almost no blue (OD ~0.05 against ~0.5 in green), and
    dividing by that amplifies a few grey levels of JPEG or white-point error many
    times over. The floor (a quarter of the strongest channel) took PBC -> BCCD from
    0.51 to 0.61 kNN balanced accuracy and kept PBC in-domain at 0.90
    (docs/handcrafted.md).
    """
    for region in (nucleus, cell):
        if region.sum() >= _MIN_REF_PX:
            ref = np.median(od[region], axis=0)
            break
    else:
        ref = np.median(od.reshape(-1, 3), axis=0)
    return np.maximum(ref, max(_MIN_REF_OD, _MIN_REF_SHARE * float(ref.max())))


def _log_chroma(rel: np.ndarray) -> np.ndarray:
    """``(ln(r / g), ln(b / g))`` of relative OD ``(n, 3)``: hue free of amount."""
    safe = np.maximum(rel, _MIN_REF_OD)
    return np.log(safe[:, [0, 2]] / safe[:, [1]])


def _colour_features(
    od: np.ndarray, nucleus: np.ndarray, cell: np.ndarray, rbc_od: np.ndarray | None
) -> np.ndarray:
    """Colours relative to the nucleus' and the red cells' OD: 59 values."""
    ref = stain_reference(od, nucleus, cell)
    rel = od / ref
    cyto = rel[cell & ~nucleus]
    # nucleus and cytoplasm in red-cell units: how dark the azure is against the eosin
    if rbc_od is not None:
        nuc_rbc = np.log(ref / rbc_od)
        cyto_od = od[cell & ~nucleus]
        cyto_rbc = (
            np.log(np.maximum(np.median(cyto_od, axis=0), _MIN_REF_OD) / rbc_od)
            if len(cyto_od) >= 3
            else np.zeros(3)
        )
    else:
        nuc_rbc, cyto_rbc = np.log(np.asarray(_TYPICAL_NUC_RBC)), np.zeros(3)
    parts = [
        _W_NUCLEUS_RBC * nuc_rbc,
        _W_NUCLEUS_RBC * cyto_rbc,
        _W_NUCLEUS_OD * _quantiles(rel[nucleus], (0.1, 0.9)),
        _W_OD * _quantiles(cyto),
    ]
    if len(cyto) >= 3:
        chroma = _log_chroma(cyto)
        hist, _, _ = np.histogram2d(
            chroma[:, 0], chroma[:, 1], bins=_CHROMA_BINS, range=[_CHROMA_RANGE, _CHROMA_RANGE]
        )
        mean = cyto.mean(axis=0, keepdims=True)
        parts += [
            _W_OD_SPREAD * cyto.std(axis=0),
            _W_CHROMA * _log_chroma(mean)[0],
            _W_CHROMA_HIST * _sqrt_hist(hist),
        ]
    else:
        parts.append(np.zeros(5 + _CHROMA_BINS**2))
    hist, _ = np.histogram(_sum3(rel[cell]) / 3.0, bins=_DENSITY_BINS, range=_DENSITY_RANGE)
    parts.append(_W_DENSITY * _sqrt_hist(hist))
    return np.concatenate(parts)


def _band_rms(bands: list[np.ndarray], regions: tuple[np.ndarray, ...]) -> list[float]:
    return [
        float(np.sqrt(np.mean(band[region] ** 2))) if region.sum() >= 3 else 0.0
        for band in bands
        for region in regions
    ]


def _texture_features(
    od_hi: np.ndarray, nucleus: np.ndarray, cell: np.ndarray, ref: np.ndarray
) -> np.ndarray:
    """Band energies of nucleus and cytoplasm at scales relative to the cell; GLCM: 12."""
    from skimage.feature import graycomatrix, graycoprops

    nucleus_hi = nucleus.repeat(2, axis=0).repeat(2, axis=1)
    cyto_hi = (cell & ~nucleus).repeat(2, axis=0).repeat(2, axis=1)
    # Summed OD relative to the nucleus' (1 = as dark as the median nucleus pixel), read
    # at INPUT_SIZE where the cell's radius is 2x its WORK_SIZE radius.
    hi = _sum3(od_hi) / float(ref.sum())
    radius_hi = 2.0 * _cell_radius(cell)
    blurred = [hi] + [
        ndi.gaussian_filter(hi, f * radius_hi, truncate=3.0) for f in _DOG_FRACTIONS[1:]
    ]
    bands = [a - b for a, b in pairwise(blurred)]
    out = [_W_TEXTURE * v for v in _band_rms(bands, (nucleus_hi, cyto_hi))]
    if nucleus.sum() < 4:
        return np.asarray([*out, 0.0, 0.0, 0.0, 0.0])
    # Grey-level co-occurrence inside the nucleus at distances relative to the cell;
    # level 0 marks outside and is dropped.
    fine = ndi.gaussian_filter(hi, _DOG_FRACTIONS[1] * radius_hi, truncate=3.0)
    levels = np.clip(fine / _GLCM_MAX * (_GLCM_LEVELS - 1), 0, _GLCM_LEVELS - 1).astype(np.uint8)
    image = np.where(nucleus_hi, levels + 1, 0).astype(np.uint8)
    step = max(1, round(_GLCM_DISTANCE * radius_hi))
    glcm = graycomatrix(
        image,
        distances=[step, 2 * step],
        angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4],
        levels=_GLCM_LEVELS + 1,
        symmetric=True,
    )[1:, 1:].astype(np.float64)
    glcm /= np.maximum(glcm.sum(axis=(0, 1), keepdims=True), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        props = [float(np.nan_to_num(graycoprops(glcm, p).mean())) for p in _GLCM_PROPS]
    props[0] = np.sqrt(props[0]) / 4.0  # contrast is in squared grey levels
    return np.asarray(out + [_W_GLCM * p for p in props])


def handcrafted_features(crop: np.ndarray) -> np.ndarray:
    """Describe one white-cell crop by lab-independent colour, texture and shape features.

    Parameters
    ----------
    crop : ndarray of shape (H, W, 3), uint8
        RGB crop of any size with the cell near its centre. Greyscale, RGBA and other
        dtypes are normalised with :func:`napari_hemofm.core.io.to_rgb8`.

    Returns
    -------
    ndarray of shape (78,), float32
        Finite feature vector; dimension ``i`` is ``FEATURE_NAMES[i]``.

    Raises
    ------
    ValueError
        If the crop is empty or not an image (see ``to_rgb8``).

    Notes
    -----
    The crop is squash-resized to ``INPUT_SIZE`` px. Groups (``docs/handcrafted.md``):
    cell and nucleus diameter in red-cell diameters (2); N/C ratio and nucleus shape
    (5); ln of nucleus and cytoplasm OD over the red cells' (6); OD quantiles of the
    nucleus and the cytoplasm and the cytoplasm's spread, relative to the nucleus'
    median OD (18); cytoplasm hue as log OD ratios (2) and their histogram (25); cell
    density histogram (8); difference-of-Gaussian band energy of nucleus and cytoplasm
    between r/24 and r/3 of the cell radius (8); nucleus grey-level co-occurrence at
    distances relative to the cell (4). A pure function of the crop: no statistic of any
    data set enters it (PBC's median nucleus / red cell OD ratio stands in only for a
    crop without red cells).
    """
    od_hi, od_lo = _densities(crop)
    nucleus, cell, hull, above_glass = _segment(od_lo)
    rbc_radius, rbc_od = red_cells(od_lo, cell, stained=above_glass)
    ref = stain_reference(od_lo, nucleus, cell)
    vec = np.concatenate(
        [
            _shape_features(nucleus, cell, hull, rbc_radius),
            _colour_features(od_lo, nucleus, cell, rbc_od),
            _texture_features(od_hi, nucleus, cell, ref),
        ]
    ).astype(np.float32)
    return np.nan_to_num(vec, nan=0.0, posinf=0.0, neginf=0.0)


# ---------------------------------------------------------------------- backbone
class HandcraftedBackbone:
    """The ``handcrafted`` model: :func:`handcrafted_features` behind the backbone API.

    ``prepare`` does all the work (thread-safe, called in the embedding pipeline's
    worker threads); ``forward`` only stacks. No weights, CPU only.

    Attributes
    ----------
    name : str
        ``"handcrafted"``.
    dim : int
        Embedding dimension, ``len(FEATURE_NAMES)``.
    input_size : int
        Side crops are resized to (:data:`INPUT_SIZE`).
    weights_sha256 : None
        No weights.
    device : str
        ``"cpu"``.
    """

    name: str = "handcrafted"
    dim: int = len(FEATURE_NAMES)
    input_size: int = INPUT_SIZE
    weights_sha256: str | None = None
    device: str = "cpu"

    def prepare(self, crop: np.ndarray) -> np.ndarray:
        """Feature vector of one crop.

        Parameters
        ----------
        crop : ndarray of shape (H, W, 3), uint8
            RGB crop, any size.

        Returns
        -------
        ndarray of shape (dim,), float32
        """
        return handcrafted_features(crop)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Stack prepared vectors (identity).

        Parameters
        ----------
        batch : ndarray of shape (B, dim)
            Outputs of :meth:`prepare`.

        Returns
        -------
        ndarray of shape (B, dim), float32

        Raises
        ------
        ValueError
            If the batch is not ``(B, dim)``.
        """
        arr = np.asarray(batch, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"expected a batch of shape (B, {self.dim}), got {arr.shape}")
        return arr

    def embed_crops(self, crops: Iterable[np.ndarray], *, n_threads: int = 1) -> np.ndarray:
        """Feature vectors of many crops, in order.

        Parameters
        ----------
        crops : iterable of ndarray of shape (H, W, 3), uint8
            RGB crops, sizes may differ.
        n_threads : int, default 1
            Threads to extract with (the heavy steps release the GIL).

        Returns
        -------
        ndarray of shape (n_crops, dim), float32
        """
        if n_threads > 1:
            with ThreadPoolExecutor(n_threads) as pool:
                rows = list(pool.map(handcrafted_features, crops))
        else:
            rows = [handcrafted_features(c) for c in crops]
        if not rows:
            return np.zeros((0, self.dim), np.float32)
        return self.forward(np.stack(rows))

    def meta(self) -> dict[str, Any]:
        """Provenance for ``adata.uns["hemofm"]``.

        Returns
        -------
        dict
            ``model``, ``input_size``, ``embedding_dim``, ``feature_version`` (no
            ``weights_sha256``: there are no weights).
        """
        return {
            "model": self.name,
            "input_size": int(self.input_size),
            "embedding_dim": int(self.dim),
            "feature_version": FEATURE_VERSION,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, input_size={self.input_size})"

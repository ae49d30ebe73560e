"""Seeded synthetic Wright-Giemsa blood smears: sample data, demo and test fixtures.

Draws a light pinkish-grey field with pale pink red cells (RBCs), a few purple platelets and
white cells (WBCs) of five classes with the morphology a hematologist recognises, then applies
optional batch effects (stain hue and saturation, illumination, blur, magnification, noise).
Pure numpy / scipy: no napari, no files read. Same seed, same arguments: byte-identical image.

The picture is built in optical density (Beer-Lambert): every stained object adds absorbance,
so overlapping RBCs darken where they overlap as in a real smear; the transmitted light is
``background_rgb * exp(-OD)``. Colour constants were derived from public Wright-Giemsa (BCCD)
and May-Gruenwald-Giemsa (PBC) images; no image data is stored here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.special import expit

__all__ = [
    "DEFAULT_BATCHES",
    "DEFAULT_PIXEL_SIZE_UM",
    "DEFAULT_RBC_DENSITY",
    "WBC_CLASSES",
    "BatchEffect",
    "SyntheticSmear",
    "make_crop",
    "make_sample",
    "make_smear",
    "write_crop_folder",
    "write_smears",
]

WBC_CLASSES: tuple[str, ...] = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")

#: Default pixel size: an RBC (7.5 um) is about 37 px across, as in a 100x oil field.
DEFAULT_PIXEL_SIZE_UM: float = 0.2
#: Default fraction of the field covered by RBCs (a monolayer region with some touching cells).
DEFAULT_RBC_DENSITY: float = 0.5

# Cell diameters in um (uniform between the bounds), from hematology textbooks.
_WBC_DIAMETER_UM: dict[str, tuple[float, float]] = {
    "neutrophil": (12.0, 14.0),
    "lymphocyte": (8.0, 10.0),
    "monocyte": (14.0, 18.0),
    "eosinophil": (12.0, 14.0),
    "basophil": (10.0, 12.0),
}
_RBC_DIAMETER_UM = (7.5, 0.35)  # mean, sd
_PLATELET_DIAMETER_UM = (2.0, 3.0)
_PLATELETS_PER_UM2 = 4e-4  # about 12 in a 768 x 1024 field at 0.2 um/px
_WBC_GAP_UM = 2.0  # minimum free space between two WBC outlines
_OUTLINE_AMP = 0.07  # largest relative bump of any WBC outline: reach = radius * (1 + this)

# Glass + plasma seen through the microscope (RGB, 0-255): light pinkish grey.
_BACKGROUND_RGB = np.array([222.0, 214.0, 212.0], dtype=np.float32)


def _od(transmittance: tuple[float, float, float]) -> np.ndarray:
    """Optical density of a stain whose full-strength transmittance (0-1 per RGB) is given."""
    return -np.log(np.asarray(transmittance, dtype=np.float32))


# Transmittance per RGB channel of each stained structure at unit concentration. Apparent colour
# on the background = _BACKGROUND_RGB * transmittance ** concentration.
_OD_RBC = _od((0.87, 0.70, 0.72))  # salmon pink (BCCD RBC median ~ (178, 149, 150) on grey)
_OD_PLASMA = _od((0.99, 0.985, 0.99))
_OD_NUCLEUS = _od((0.52, 0.35, 0.78))  # purple, between BCCD (light) and PBC (dark) nuclei
_OD_NEUT_CYTO = _od((0.95, 0.87, 0.93))  # pale lilac-pink
_OD_NEUT_GRANULE = _od((0.93, 0.84, 0.92))
_OD_LYMPH_CYTO = _od((0.80, 0.88, 0.99))  # sky blue
_OD_MONO_CYTO = _od((0.80, 0.82, 0.92))  # grey blue
_OD_EOS_CYTO = _od((0.95, 0.85, 0.87))
_OD_EOS_GRANULE = _od((0.93, 0.56, 0.54))  # orange red
_OD_BASO_CYTO = _od((0.90, 0.84, 0.92))
_OD_BASO_GRANULE = _od((0.32, 0.20, 0.50))  # blue-black purple
_OD_PLATELET = _od((0.84, 0.76, 0.92))
_OD_PLATELET_GRANULE = _od((0.55, 0.40, 0.76))

_BASE_BLUR_PX = 0.5  # optics: soft edges even without a blur batch effect
_BASE_NOISE_DN = 1.5  # camera read noise, 8-bit grey levels
_N_RBC_TEMPLATES = 24


@dataclass(frozen=True)
class BatchEffect:
    """A lab / scanner / stain difference applied to a synthetic smear.

    The default instance is the identity: it changes nothing.

    Parameters
    ----------
    hue_shift_deg : float
        Rotation of the stain colours around the grey axis, in degrees (HSV hue moves by about
        this much; positive turns purple towards magenta and pink towards orange). The glass
        stays the same colour.
    saturation : float
        Factor on the stain colour saturation (1 = unchanged, > 1 = more intense stain).
    brightness : float
        Factor on the illumination (1 = unchanged, < 1 = dimmer).
    illumination_gradient : float
        Depth of uneven illumination in [0, 1): a linear gradient in a seeded direction plus a
        vignette; the darkest corner gets about ``1 - illumination_gradient`` of the light.
    blur_sigma : float
        Extra Gaussian blur (defocus), sigma in pixels.
    scale : float
        Magnification factor: cells are drawn ``scale`` times bigger, so the effective pixel
        size is ``pixel_size_um / scale``.
    noise : float
        Extra Gaussian camera noise, standard deviation in 8-bit grey levels.
    """

    hue_shift_deg: float = 0.0
    saturation: float = 1.0
    brightness: float = 1.0
    illumination_gradient: float = 0.0
    blur_sigma: float = 0.0
    scale: float = 1.0
    noise: float = 0.0

    def __post_init__(self) -> None:
        checks = {
            "saturation": self.saturation >= 0,
            "brightness": self.brightness > 0,
            "illumination_gradient": 0 <= self.illumination_gradient < 1,
            "blur_sigma": self.blur_sigma >= 0,
            "scale": self.scale > 0,
            "noise": self.noise >= 0,
        }
        for name, ok in checks.items():
            if not (ok and math.isfinite(getattr(self, name))):
                raise ValueError(f"BatchEffect.{name}={getattr(self, name)!r} is out of range")
        if not math.isfinite(self.hue_shift_deg):
            raise ValueError(f"BatchEffect.hue_shift_deg={self.hue_shift_deg!r} is not finite")


#: Three named batches with clearly different looks, for the napari sample data and the demo.
DEFAULT_BATCHES: dict[str, BatchEffect] = {
    "lab_a": BatchEffect(),
    "lab_b": BatchEffect(hue_shift_deg=12.0, saturation=1.35, brightness=0.85),
    "lab_c": BatchEffect(blur_sigma=1.5, illumination_gradient=0.35, scale=1.15, noise=2.0),
}


@dataclass
class SyntheticSmear:
    """One synthetic smear field and its ground truth.

    Attributes
    ----------
    image : ndarray of shape (H, W, 3), uint8
        RGB image.
    cells : pandas.DataFrame
        One row per WBC: ``x``, ``y`` (centre, float px, x = column), ``x0``, ``y0``, ``x1``,
        ``y1`` (int box around the whole cell, half-open and clipped to the image, so
        ``image[y0:y1, x0:x1]`` is the cell), ``label`` (str, one of `WBC_CLASSES`),
        ``diameter`` (float, nominal cell diameter in px).
    batch : str
        Batch name (lab / scanner / stain group).
    pixel_size_um : float
        True pixel size of ``image`` in um, i.e. the requested pixel size divided by the batch
        effect's ``scale``.
    seed : int
        Seed that reproduces this smear with `make_smear` and the same arguments.
    batch_effect : BatchEffect
        The batch effect that was applied.
    masks : dict of str to ndarray, optional
        With ``return_masks=True`` only: ``"wbc"`` and ``"nucleus"`` (H, W) int32 instance
        labels (row ``i`` of ``cells`` is label ``i + 1``, 0 elsewhere), ``"rbc"`` and
        ``"platelet"`` (H, W) bool. Drawn geometry before blur.
    """

    image: np.ndarray
    cells: pd.DataFrame
    batch: str
    pixel_size_um: float
    seed: int
    batch_effect: BatchEffect = field(default_factory=BatchEffect)
    masks: dict[str, np.ndarray] | None = None


# --------------------------------------------------------------------------------------------
# Small drawing helpers. Patches use float32 coordinates relative to the object's centre.


@dataclass
class _Patch:
    """A drawn object: OD (h, w, 3), cell and nucleus coverage (h, w) in [0, 1], origin."""

    y0: int
    x0: int
    od: np.ndarray
    alpha: np.ndarray
    nucleus: np.ndarray | None = None


def _frame(cy: float, cx: float, reach: float) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Integer origin and centred coordinate grids (h, 1), (1, w) of a patch around a centre."""
    y0, x0 = math.floor(cy - reach - 2), math.floor(cx - reach - 2)
    y1, x1 = math.ceil(cy + reach + 2) + 1, math.ceil(cx + reach + 2) + 1
    yy = (np.arange(y0, y1, dtype=np.float32) - np.float32(cy))[:, None]
    xx = (np.arange(x0, x1, dtype=np.float32) - np.float32(cx))[None, :]
    return y0, x0, yy, xx


def _soft(d: np.ndarray, width: float = 0.7) -> np.ndarray:
    """Coverage from a signed distance in px (negative inside), with a soft edge."""
    return expit(-d / np.float32(width)).astype(np.float32, copy=False)


def _harmonics(rng: np.random.Generator, amp: float, kmax: int) -> list[tuple[int, float, float]]:
    """Random outline harmonics (k, amplitude, phase) whose amplitudes sum to at most ``amp``."""
    ks = list(range(2, kmax + 1))
    weights = rng.uniform(0.2, 1.0, size=len(ks)) / np.arange(2, kmax + 1)
    weights *= amp / weights.sum()
    return [
        (k, float(a), float(p))
        for k, a, p in zip(ks, weights, rng.uniform(0, 2 * np.pi, len(ks)), strict=True)
    ]


def _bumpy(theta: np.ndarray, harmonics: list[tuple[int, float, float]]) -> np.ndarray:
    """Relative radius ``1 + sum a_k cos(k theta + phi_k)`` of a wobbly outline."""
    out = np.ones_like(theta)
    for k, a, p in harmonics:
        out += np.float32(a) * np.cos(k * theta + np.float32(p))
    return out


def _disc_distance(
    yy: np.ndarray, xx: np.ndarray, radius: float, harmonics: list[tuple[int, float, float]]
) -> np.ndarray:
    """Signed distance (px, negative inside) to a wobbly disc centred at the patch origin."""
    r = np.hypot(yy, xx)
    theta = np.arctan2(yy, xx)
    return r - np.float32(radius) * _bumpy(theta, harmonics)


def _ellipse_distance(
    yy: np.ndarray,
    xx: np.ndarray,
    cy: float,
    cx: float,
    a: float,
    b: float,
    phi: float,
    harmonics: list[tuple[int, float, float]] | None = None,
) -> np.ndarray:
    """Approximate signed distance (px) to an ellipse (semi-axes a, b, angle phi)."""
    c, s = np.float32(math.cos(phi)), np.float32(math.sin(phi))
    u = (xx - np.float32(cx)) * c + (yy - np.float32(cy)) * s
    v = (yy - np.float32(cy)) * c - (xx - np.float32(cx)) * s
    q = np.hypot(u / np.float32(a), v / np.float32(b))
    if harmonics:
        q = q / _bumpy(np.arctan2(v, u), harmonics)
    return (q - 1) * np.float32(min(a, b))


def _segment_distance(
    yy: np.ndarray, xx: np.ndarray, p: tuple[float, float], q: tuple[float, float]
) -> np.ndarray:
    """Distance (px) from every pixel to the segment p-q, points given as (y, x)."""
    dy, dx = q[0] - p[0], q[1] - p[1]
    length2 = max(dy * dy + dx * dx, 1e-6)
    t = np.clip(((yy - np.float32(p[0])) * dy + (xx - np.float32(p[1])) * dx) / length2, 0, 1)
    return np.hypot(yy - np.float32(p[0]) - t * dy, xx - np.float32(p[1]) - t * dx)


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth Gaussian noise of unit standard deviation and correlation length ``sigma`` px."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), max(sigma, 0.3))
    return n / np.float32(max(float(n.std()), 1e-6))


def _granules(
    rng: np.random.Generator, shape: tuple[int, int], per_px: float, sigma: float
) -> np.ndarray:
    """Field of round granules (peak ~1, saturating where they pile up) in [0, 1).

    ``per_px`` is the expected number of granules per pixel, ``sigma`` their Gaussian radius.
    """
    seeds = (rng.random(shape, dtype=np.float32) < per_px).astype(np.float32)
    seeds *= rng.uniform(0.6, 1.4, size=shape).astype(np.float32)
    sigma = max(sigma, 0.4)
    g = ndimage.gaussian_filter(seeds, sigma) * np.float32(2 * np.pi * sigma * sigma)
    return 1 - np.exp(-1.3 * g)


def _stain(*terms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Sum of concentration (h, w) x stain OD (3,) terms into an (h, w, 3) OD patch."""
    out = None
    for conc, od in terms:
        t = conc[..., None] * od
        out = t if out is None else out + t
    return out.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# White cells. Each drawer gets the cell centre, its radius in px, pixels per um and a private
# generator, and returns the OD patch with cell and nucleus coverage.


def _cell_body(
    rng: np.random.Generator, cy: float, cx: float, radius: float, amp: float, kmax: int
) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """Frame and wobbly round outline of a cell: origin, yy, xx and coverage."""
    y0, x0, yy, xx = _frame(cy, cx, radius * (1 + _OUTLINE_AMP))
    alpha = _soft(_disc_distance(yy, xx, radius, _harmonics(rng, amp, kmax)))
    return y0, x0, yy, xx, alpha


def _lobe_chain(
    rng: np.random.Generator,
    yy: np.ndarray,
    xx: np.ndarray,
    radius: float,
    n_lobes: int,
    lobe_size: tuple[float, float],
    strand_px: float,
) -> np.ndarray:
    """Signed distance of a segmented nucleus: a chain of lobes joined by thin strands.

    The lobes follow a random walk kept inside the cell, so chains come out C-, S- or
    ring-shaped as in real neutrophils; the chain is then centred in the cell.
    """
    sizes = radius * rng.uniform(*lobe_size, size=n_lobes)
    pts = [np.zeros(2)]
    heading = rng.uniform(0, 2 * np.pi)
    for k in range(1, n_lobes):
        step = sizes[k - 1] + sizes[k] + radius * rng.uniform(0.04, 0.12)
        for _try in range(12):
            turn = rng.normal(0, 0.9) if _try < 6 else rng.uniform(-np.pi, np.pi)
            h = heading + turn
            p = pts[-1] + step * np.array([math.sin(h), math.cos(h)])
            centroid = np.mean([*pts, p], axis=0)
            far = max(np.hypot(*(q - centroid)) + sizes[i] for i, q in enumerate([*pts, p]))
            clash = min(np.hypot(*(q - p)) for q in pts[:-1]) if k > 1 else np.inf
            if far < 0.85 * radius and clash > 1.6 * sizes[k]:
                break
        heading = h + rng.normal(0, 0.5)
        pts.append(p)
    pts_arr = np.array(pts) - np.mean(pts, axis=0) + rng.normal(0, 0.04 * radius, size=2)
    # Lobes that would stick out of the cell are pulled in (they then touch or overlap).
    reach = np.hypot(pts_arr[:, 0], pts_arr[:, 1]) + sizes
    pts_arr *= min(1.0, float(np.min((0.86 * radius - sizes) / np.maximum(reach - sizes, 1e-6))))
    d = None
    # Lobes are oval, long axis along the chain: a segmented nucleus is a pinched band.
    for k, ((ly, lx), a) in enumerate(zip(pts_arr, sizes, strict=True)):
        if n_lobes > 1:
            ty, tx = pts_arr[min(k + 1, n_lobes - 1)] - pts_arr[max(k - 1, 0)]
            phi = math.atan2(ty, tx) + rng.normal(0, 0.3)
        else:
            phi = rng.uniform(0, np.pi)
        dk = _ellipse_distance(
            yy,
            xx,
            ly,
            lx,
            a * rng.uniform(1.0, 1.2),
            a * rng.uniform(0.7, 0.85),
            phi,
            _harmonics(rng, 0.08, 4),
        )
        d = dk if d is None else np.minimum(d, dk)
    for p, q in itertools.pairwise(pts_arr):
        d = np.minimum(d, _segment_distance(yy, xx, tuple(p), tuple(q)) - np.float32(strand_px))
    return d


def _chromatin(
    rng: np.random.Generator, shape: tuple[int, int], ppu: float, clump: float, fine: float
) -> np.ndarray:
    """Chromatin density around 1: coarse clumps plus fine grain, clipped to stay positive."""
    tex = 1 + clump * _noise(rng, shape, 0.45 * ppu) + fine * _noise(rng, shape, 0.15 * ppu)
    return np.clip(tex, 0.3, 2.0)


def _draw_neutrophil(
    rng: np.random.Generator, cy: float, cx: float, radius: float, ppu: float
) -> _Patch:
    y0, x0, yy, xx, alpha = _cell_body(rng, cy, cx, radius, 0.03, 4)
    n_lobes = int(rng.choice([2, 3, 4, 5], p=[0.15, 0.45, 0.3, 0.1]))
    size = (0.3, 0.36) if n_lobes <= 3 else (0.25, 0.3)
    d = _lobe_chain(rng, yy, xx, radius, n_lobes, size, max(0.7, 0.2 * ppu))
    nuc = _soft(d) * alpha
    tex = 1.1 * _chromatin(rng, nuc.shape, ppu, 0.22, 0.12)
    gran = _granules(rng, nuc.shape, 0.12, 0.12 * ppu)
    od = _stain((alpha, _OD_NEUT_CYTO), (alpha * gran, _OD_NEUT_GRANULE), (nuc * tex, _OD_NUCLEUS))
    return _Patch(y0, x0, od, alpha, nuc)


def _draw_lymphocyte(
    rng: np.random.Generator, cy: float, cx: float, radius: float, ppu: float
) -> _Patch:
    y0, x0, yy, xx, alpha = _cell_body(rng, cy, cx, radius, 0.03, 4)
    nr = radius * rng.uniform(0.74, 0.84)
    ang = rng.uniform(0, 2 * np.pi)
    off = radius - nr - rng.uniform(0.02, 0.08) * radius  # eccentric, cytoplasm on one side
    ny, nx = off * math.sin(ang), off * math.cos(ang)
    d = _disc_distance(yy - np.float32(ny), xx - np.float32(nx), nr, _harmonics(rng, 0.05, 4))
    if rng.random() < 0.3:  # a shallow notch, common in lymphocytes
        ang2 = rng.uniform(0, 2 * np.pi)
        notch = _disc_distance(
            yy - np.float32(ny + nr * math.sin(ang2)),
            xx - np.float32(nx + nr * math.cos(ang2)),
            0.25 * nr,
            [],
        )
        d = np.maximum(d, -notch)
    nuc = _soft(d) * alpha
    tex = 1.3 * _chromatin(rng, nuc.shape, ppu, 0.25, 0.12)
    # The cytoplasm is more basophilic (bluer) towards the membrane.
    r = np.hypot(yy, xx) / np.float32(radius)
    rim = 1 + 0.5 * np.clip((r - 0.7) / 0.3, 0, 1)
    od = _stain((alpha * rim, _OD_LYMPH_CYTO), (nuc * tex, _OD_NUCLEUS))
    return _Patch(y0, x0, od, alpha, nuc)


def _draw_monocyte(
    rng: np.random.Generator, cy: float, cx: float, radius: float, ppu: float
) -> _Patch:
    y0, x0, yy, xx, alpha = _cell_body(rng, cy, cx, radius, 0.06, 6)
    a, b = radius * rng.uniform(0.64, 0.74), radius * rng.uniform(0.5, 0.58)
    phi = rng.uniform(0, 2 * np.pi)
    shift = rng.uniform(0.06, 0.14) * radius
    ny, nx = shift * math.sin(phi + np.pi / 2), shift * math.cos(phi + np.pi / 2)
    d = _ellipse_distance(yy, xx, ny, nx, a, b, phi, _harmonics(rng, 0.1, 5))
    # Kidney shape: carve a bite out of one long side (the hof side, towards the cell centre).
    c = radius * rng.uniform(0.22, 0.32)
    by = ny - (b + 0.35 * c) * math.cos(phi) + rng.normal(0, 0.05 * a)
    bx = nx + (b + 0.35 * c) * math.sin(phi)
    bite = np.hypot(yy - np.float32(by), xx - np.float32(bx)) - np.float32(c)
    d = np.maximum(d, -bite)
    nuc = _soft(d) * alpha
    # Lacy chromatin: a network of thin dense strands (near the zero set of band-passed noise)
    # on a lighter ground, plus faint folds.
    n = _noise(rng, nuc.shape, 0.3 * ppu)
    lace = np.exp(-((n / 0.45) ** 2))
    tex = 0.6 + 0.55 * lace + 0.12 * _noise(rng, nuc.shape, 0.12 * ppu)
    cyto = alpha * (1 + 0.06 * _noise(rng, nuc.shape, 0.1 * ppu))
    # A few vacuoles: small clear holes in the cytoplasm, outside the nucleus.
    for _ in range(int(rng.poisson(2.0))):
        vr = rng.uniform(0.4, 0.9) * ppu
        for _try in range(10):
            rr, aa = rng.uniform(0.2, 0.85) * radius, rng.uniform(0, 2 * np.pi)
            vy, vx = rr * math.sin(aa), rr * math.cos(aa)
            inside_nucleus = (
                _ellipse_distance(
                    np.float32([[vy]]), np.float32([[vx]]), ny, nx, a + vr, b + vr, phi
                )[0, 0]
                < 0
            )
            if not inside_nucleus and rr + vr < 0.92 * radius:
                hole = _soft(np.hypot(yy - np.float32(vy), xx - np.float32(vx)) - np.float32(vr))
                cyto = cyto * (1 - 0.95 * hole)
                break
    od = _stain((cyto, _OD_MONO_CYTO), (nuc * tex, _OD_NUCLEUS))
    return _Patch(y0, x0, od, alpha, nuc)


def _draw_eosinophil(
    rng: np.random.Generator, cy: float, cx: float, radius: float, ppu: float
) -> _Patch:
    y0, x0, yy, xx, alpha = _cell_body(rng, cy, cx, radius, 0.03, 4)
    n_lobes = 2 if rng.random() < 0.85 else 3
    d = _lobe_chain(rng, yy, xx, radius, n_lobes, (0.3, 0.36), max(0.7, 0.22 * ppu))
    nuc = _soft(d) * alpha
    tex = 1.0 * _chromatin(rng, nuc.shape, ppu, 0.2, 0.1)
    # Coarse granules packed in the cytoplasm; fewer lie over the nucleus.
    gran = _granules(rng, nuc.shape, 2.2 / ppu**2, 0.24 * ppu) * alpha * (1 - 0.85 * nuc)
    od = _stain((alpha, _OD_EOS_CYTO), (gran * 1.4, _OD_EOS_GRANULE), (nuc * tex, _OD_NUCLEUS))
    return _Patch(y0, x0, od, alpha, nuc)


def _draw_basophil(
    rng: np.random.Generator, cy: float, cx: float, radius: float, ppu: float
) -> _Patch:
    y0, x0, yy, xx, alpha = _cell_body(rng, cy, cx, radius, 0.04, 5)
    n_lobes = 2 if rng.random() < 0.6 else 1
    if n_lobes == 1:
        d = _disc_distance(yy, xx, 0.55 * radius, _harmonics(rng, 0.15, 5))
    else:
        d = _lobe_chain(rng, yy, xx, radius, 2, (0.3, 0.36), 0.3 * ppu)
    nuc = _soft(d) * alpha
    tex = 0.9 * _chromatin(rng, nuc.shape, ppu, 0.15, 0.1)
    # Large, uneven dark granules over nucleus and cytoplasm alike.
    gran = _granules(rng, nuc.shape, 0.9 / ppu**2, 0.3 * ppu)
    gran = np.maximum(gran, _granules(rng, nuc.shape, 0.5 / ppu**2, 0.45 * ppu)) * alpha
    od = _stain((alpha, _OD_BASO_CYTO), (nuc * tex, _OD_NUCLEUS), (gran * 1.1, _OD_BASO_GRANULE))
    return _Patch(y0, x0, od, alpha, nuc)


_DRAWERS: dict[str, Callable[[np.random.Generator, float, float, float, float], _Patch]] = {
    "neutrophil": _draw_neutrophil,
    "lymphocyte": _draw_lymphocyte,
    "monocyte": _draw_monocyte,
    "eosinophil": _draw_eosinophil,
    "basophil": _draw_basophil,
}


# --------------------------------------------------------------------------------------------
# RBCs and platelets.


def _rbc_templates(
    rng: np.random.Generator, ppu: float
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """A few RBC drawings (OD (h, w, 3), coverage (h, w), radius px), centred in odd patches."""
    out = []
    for _ in range(_N_RBC_TEMPLATES):
        diam = np.clip(rng.normal(*_RBC_DIAMETER_UM), 6.6, 8.4)
        radius = 0.5 * diam * ppu
        _, _, yy, xx = _frame(0.0, 0.0, radius * 1.2)
        elong = rng.uniform(1.0, 1.12)
        phi = rng.uniform(0, np.pi)
        d = _ellipse_distance(
            yy,
            xx,
            0.0,
            0.0,
            radius * elong**0.5,
            radius / elong**0.5,
            phi,
            _harmonics(rng, 0.03, 3),
        )
        alpha = _soft(d, 0.6)
        rho = np.clip(1 + d / np.float32(radius), 0, None)  # ~ relative radius, 1 at the edge
        # Biconcave disc: thick rim (slightly darker ring), thin pale centre (central pallor).
        p_r, p_depth = rng.uniform(0.45, 0.6), rng.uniform(0.65, 0.9)
        thick = 1 - p_depth * np.exp(-((rho / np.float32(p_r)) ** 4))
        thick = thick + 0.18 * np.exp(-(((rho - 0.86) / 0.09) ** 2))
        out.append((_stain((alpha * thick, _OD_RBC)), alpha, float(radius)))
    return out


def _place_rbcs(
    rng: np.random.Generator,
    shape: tuple[int, int],
    radii: np.ndarray,
    density: float,
    obstacles: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Random RBC centres (n, 2) and template indices, touching and sometimes overlapping.

    ``obstacles`` is (m, 3): y, x, reach of the WBCs, which RBCs may only just tuck under.
    """
    h, w = shape
    r_mean = float(radii.mean())
    n_target = int(density * (h + r_mean) * (w + r_mean) / (np.pi * r_mean**2))
    ys = np.empty(n_target)
    xs = np.empty(n_target)
    rs = np.empty(n_target)
    ts = np.empty(n_target, dtype=np.intp)
    n = 0
    lo = -0.5 * r_mean
    for _ in range(8 * n_target):
        if n == n_target:
            break
        t = int(rng.integers(len(radii)))
        r = radii[t]
        if n and rng.random() < 0.45:
            # Next to an accepted RBC: a touching or slightly overlapping pair, as in BCCD.
            j = int(rng.integers(n))
            f = rng.uniform(0.8, 0.98)
            dist = (r + rs[j]) * rng.uniform(f, 1.02)
            ang = rng.uniform(0, 2 * np.pi)
            y, x = ys[j] + dist * math.sin(ang), xs[j] + dist * math.cos(ang)
            if not (lo <= y <= h - 1 - lo and lo <= x <= w - 1 - lo):
                continue
        else:
            f = 0.97
            y, x = rng.uniform(lo, h - 1 - lo), rng.uniform(lo, w - 1 - lo)
        if n and np.any(np.hypot(ys[:n] - y, xs[:n] - x) < f * (rs[:n] + r) - 1e-9):
            continue
        if len(obstacles) and np.any(
            np.hypot(obstacles[:, 0] - y, obstacles[:, 1] - x) < obstacles[:, 2] + 0.45 * r
        ):
            continue
        ys[n], xs[n], rs[n], ts[n] = y, x, r, t
        n += 1
    return np.stack([ys[:n], xs[:n]], axis=1), ts[:n]


def _draw_platelet(rng: np.random.Generator, cy: float, cx: float, ppu: float) -> _Patch:
    radius = 0.5 * rng.uniform(*_PLATELET_DIAMETER_UM) * ppu
    y0, x0, yy, xx = _frame(cy, cx, radius * 1.3)
    elong = rng.uniform(1.0, 1.4)
    d = _ellipse_distance(
        yy,
        xx,
        0.0,
        0.0,
        radius * elong**0.5,
        radius / elong**0.5,
        rng.uniform(0, np.pi),
        _harmonics(rng, 0.2, 5),
    )
    alpha = _soft(d, 0.6)
    # Granulomere: a purple granular centre in the pale hyalomere.
    gran = _granules(rng, alpha.shape, 0.25, 0.12 * ppu) * _soft(d + np.float32(0.35 * radius))
    od = _stain((alpha, _OD_PLATELET), (gran * 1.2, _OD_PLATELET_GRANULE))
    return _Patch(y0, x0, od, alpha)


# --------------------------------------------------------------------------------------------
# Canvas and optics.


def _slices(
    shape: tuple[int, int], patch: _Patch
) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Image and patch slices of the overlap of a patch with the image, or None."""
    h, w = patch.alpha.shape
    iy0, ix0 = max(patch.y0, 0), max(patch.x0, 0)
    iy1, ix1 = min(patch.y0 + h, shape[0]), min(patch.x0 + w, shape[1])
    if iy0 >= iy1 or ix0 >= ix1:
        return None
    img = (slice(iy0, iy1), slice(ix0, ix1))
    pat = (slice(iy0 - patch.y0, iy1 - patch.y0), slice(ix0 - patch.x0, ix1 - patch.x0))
    return img, pat


def _stain_matrix(hue_shift_deg: float, saturation: float) -> np.ndarray:
    """3 x 3 matrix rotating colours about the grey axis and scaling their saturation.

    Grey (r = g = b) is a fixed point, so the glass keeps its colour; a rotation by +theta about
    (1, 1, 1) takes red towards green, i.e. increases HSV hue by about theta.
    """
    theta = math.radians(hue_shift_deg)
    axis = np.full(3, 1 / math.sqrt(3))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + math.sin(theta) * k + (1 - math.cos(theta)) * (k @ k)
    grey = np.full((3, 3), 1 / 3)
    return rot @ (grey + saturation * (np.eye(3) - grey))


def _illumination(
    rng: np.random.Generator, shape: tuple[int, int], effect: BatchEffect
) -> np.ndarray | None:
    """Light field (H, W) or None when flat: brightness times gradient and vignette."""
    angle = rng.uniform(0, 2 * np.pi)  # drawn always, so the stream does not depend on effect
    g = effect.illumination_gradient
    if g == 0:
        return None if effect.brightness == 1 else np.full(shape, effect.brightness, np.float32)
    h, w = shape
    v = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    u = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    ramp = (1 - (u * math.cos(angle) + v * math.sin(angle)) / math.sqrt(2)) / 2  # 0 ... 1
    vignette = (u * u + v * v) / 2  # 0 at the centre, 1 in the corners
    return (effect.brightness * (1 - g * (0.6 * ramp + 0.4 * vignette))).astype(np.float32)


def _render(
    shape: tuple[int, int],
    labels: Sequence[str],
    centres: np.ndarray,
    radii_px: np.ndarray,
    ppu: float,
    rbc_density: float,
    effect: BatchEffect,
    seed_seq: np.random.SeedSequence,
    return_masks: bool,
) -> tuple[np.ndarray, pd.DataFrame, dict[str, np.ndarray] | None]:
    """Draw the field: plasma, RBCs, platelets, WBCs, then stain, optics and camera."""
    h, w = shape
    ss_rbc, ss_plt, ss_wbc, ss_light, ss_noise, ss_plasma = seed_seq.spawn(6)
    od = np.zeros((h, w, 3), dtype=np.float32)
    masks: dict[str, np.ndarray] | None = None
    if return_masks:
        masks = {
            "wbc": np.zeros(shape, np.int32),
            "nucleus": np.zeros(shape, np.int32),
            "rbc": np.zeros(shape, bool),
            "platelet": np.zeros(shape, bool),
        }
    # Plasma: a faint, very smooth unevenness of the background.
    rp = np.random.default_rng(ss_plasma)
    coarse = rp.standard_normal((max(2, h // 64 + 2), max(2, w // 64 + 2))).astype(np.float32)
    plasma = (
        1 + 0.5 * ndimage.zoom(coarse, (h / coarse.shape[0], w / coarse.shape[1]), order=1)[:h, :w]
    )
    od += plasma[..., None] * _OD_PLASMA

    reach = radii_px * (1 + _OUTLINE_AMP)
    obstacles = np.column_stack([centres, reach]) if len(labels) else np.zeros((0, 3))

    # RBCs: pasted from a few templates with flips and a per-cell stain strength.
    rr = np.random.default_rng(ss_rbc)
    templates = _rbc_templates(rr, ppu)
    t_radii = np.array([t[2] for t in templates])
    pos, which = _place_rbcs(rr, shape, t_radii, rbc_density, obstacles)
    for (y, x), t in zip(pos, which, strict=True):
        t_od, t_alpha, _ = templates[t]
        flip = int(rr.integers(8))
        if flip & 1:
            t_od, t_alpha = t_od[::-1], t_alpha[::-1]
        if flip & 2:
            t_od, t_alpha = t_od[:, ::-1], t_alpha[:, ::-1]
        if flip & 4:
            t_od, t_alpha = t_od.transpose(1, 0, 2), t_alpha.T
        half = t_alpha.shape[0] // 2
        patch = _Patch(round(y) - half, round(x) - half, t_od, t_alpha)
        sl = _slices(shape, patch)
        if sl is None:
            continue
        od[sl[0]] += np.float32(rr.uniform(0.85, 1.15)) * t_od[sl[1]]
        if masks is not None:
            masks["rbc"][sl[0]] |= t_alpha[sl[1]] > 0.5

    # Platelets: a few, anywhere but under a WBC.
    rpl = np.random.default_rng(ss_plt)
    area_um2 = h * w / ppu**2
    for _ in range(int(rpl.poisson(_PLATELETS_PER_UM2 * area_um2))):
        y, x = rpl.uniform(0, h - 1), rpl.uniform(0, w - 1)
        if len(obstacles) and np.any(
            np.hypot(obstacles[:, 0] - y, obstacles[:, 1] - x) < obstacles[:, 2] + 2 * ppu
        ):
            continue
        patch = _draw_platelet(rpl, y, x, ppu)
        sl = _slices(shape, patch)
        if sl is None:
            continue
        od[sl[0]] += patch.od[sl[1]]
        if masks is not None:
            masks["platelet"][sl[0]] |= patch.alpha[sl[1]] > 0.5

    # WBCs lie on top: they hide what is under them.
    rows = []
    for i, (label, (y, x), radius, ss) in enumerate(
        zip(labels, centres, radii_px, ss_wbc.spawn(len(labels)), strict=True)
    ):
        patch = _DRAWERS[label](np.random.default_rng(ss), float(y), float(x), float(radius), ppu)
        sl = _slices(shape, patch)
        if sl is None:  # a centre off the image; the placers never produce one
            rows.append((x, y, 0, 0, 0, 0, label, 2 * radius))
            continue
        a = patch.alpha[sl[1]]
        od[sl[0]] *= (1 - a)[..., None]
        od[sl[0]] += patch.od[sl[1]]
        inside = a > 0.5
        ys_in, xs_in = np.nonzero(inside)
        iy, ix = sl[0][0].start, sl[0][1].start
        if len(ys_in):
            box = (ix + xs_in.min(), iy + ys_in.min(), ix + xs_in.max() + 1, iy + ys_in.max() + 1)
        else:
            box = (ix, iy, ix, iy)
        rows.append((x, y, *box, label, 2 * radius))
        if masks is not None:
            masks["wbc"][sl[0]][inside] = i + 1
            masks["nucleus"][sl[0]][inside & (patch.nucleus[sl[1]] > 0.5)] = i + 1
            for key in ("rbc", "platelet"):
                masks[key][sl[0]] &= ~inside

    # Stain (hue, saturation) acts on the transmittance, so the glass (T = 1) is unchanged.
    trans = np.exp(-od)
    if effect.hue_shift_deg != 0 or effect.saturation != 1:
        m = _stain_matrix(effect.hue_shift_deg, effect.saturation).astype(np.float32)
        trans = np.clip(trans @ m.T, 0, 1.05)
    sigma = math.hypot(_BASE_BLUR_PX, effect.blur_sigma)
    trans = ndimage.gaussian_filter(trans, (sigma, sigma, 0), mode="nearest")
    img = trans * _BACKGROUND_RGB
    light = _illumination(np.random.default_rng(ss_light), shape, effect)
    if light is not None:
        img *= light[..., None]
    noise_sd = math.hypot(_BASE_NOISE_DN, effect.noise)
    img += np.float32(noise_sd) * np.random.default_rng(ss_noise).standard_normal(
        img.shape, dtype=np.float32
    )
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    cells = pd.DataFrame(rows, columns=["x", "y", "x0", "y0", "x1", "y1", "label", "diameter"])
    cells = cells.astype(
        {
            "x": float,
            "y": float,
            "x0": int,
            "y0": int,
            "x1": int,
            "y1": int,
            "label": object,
            "diameter": float,
        }
    )
    return image, cells, masks


# --------------------------------------------------------------------------------------------
# Public API.


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    classes = tuple(classes)
    if not classes:
        raise ValueError("classes is empty: give at least one of " + ", ".join(WBC_CLASSES))
    unknown = [c for c in classes if c not in WBC_CLASSES]
    if unknown:
        raise ValueError(f"unknown WBC classes {unknown}; known: {list(WBC_CLASSES)}")
    return classes


def _draw_labels(
    rng: np.random.Generator,
    n: int,
    classes: tuple[str, ...],
    class_weights: Sequence[float] | None,
) -> list[str]:
    """Class of each WBC: cycle through ``classes`` (shuffled), or sample with the weights."""
    if class_weights is None:
        labels = [classes[i % len(classes)] for i in range(n)]
        return [labels[i] for i in rng.permutation(n)]
    p = np.asarray(class_weights, dtype=float)
    if p.shape != (len(classes),):
        raise ValueError(
            f"class_weights has {p.size} values but classes has {len(classes)} entries"
        )
    if np.any(p < 0) or not np.isfinite(p).all() or p.sum() <= 0:
        raise ValueError(
            f"class_weights must be non-negative with a positive sum, got {p.tolist()}"
        )
    return [classes[i] for i in rng.choice(len(classes), size=n, p=p / p.sum())]


def _place_wbcs(
    rng: np.random.Generator,
    shape: tuple[int, int],
    reach: np.ndarray,
    gap: float,
    pixel_size_um: float,
) -> np.ndarray:
    """Non-overlapping WBC centres (n, 2) inside the image; ValueError when they do not fit."""
    h, w = shape
    n = len(reach)
    if n == 0:
        return np.zeros((0, 2))
    too_big = reach.max() + 2 > min(h, w) / 2
    need = float(np.sum(np.pi * (reach + gap / 2) ** 2))
    if too_big or need > 0.5 * h * w:
        raise ValueError(
            f"cannot place n_wbc={n} white cells without overlap in a {h}x{w} image at "
            f"pixel_size_um={pixel_size_um:g}: they need about {need:.0f} px^2 of {h * w} px^2 "
            f"(largest cell {2 * reach.max():.0f} px across); use a larger shape, fewer cells "
            "or a larger pixel_size_um"
        )
    order = np.argsort(-reach, kind="stable")
    placed = 0
    for _restart in range(30):
        centres = np.full((n, 2), np.nan)
        done: list[int] = []
        for i in order:
            m = reach[i] + 2
            cand = rng.uniform((m, m), (h - 1 - m, w - 1 - m), size=(256, 2))
            if done:
                dist = np.hypot(
                    cand[:, None, 0] - centres[done, 0], cand[:, None, 1] - centres[done, 1]
                )
                ok = np.flatnonzero(np.all(dist >= reach[i] + reach[done] + gap, axis=1))
                if not len(ok):
                    break
                cand = cand[ok]
            centres[i] = cand[0]
            done.append(int(i))
        placed = max(placed, len(done))
        if len(done) == n:
            return centres
    raise ValueError(
        f"could not place n_wbc={n} white cells without overlap in a {h}x{w} image at "
        f"pixel_size_um={pixel_size_um:g} (at most {placed} fit in 30 tries); use a larger "
        "shape or fewer cells"
    )


def _check_common(pixel_size_um: float, rbc_density: float) -> None:
    if not (pixel_size_um > 0 and math.isfinite(pixel_size_um)):
        raise ValueError(f"pixel_size_um must be positive, got {pixel_size_um}")
    if not 0 <= rbc_density <= 0.9:
        raise ValueError(f"rbc_density must be in [0, 0.9], got {rbc_density}")


def make_smear(
    seed: int,
    *,
    shape: tuple[int, int] = (768, 1024),
    n_wbc: int = 6,
    classes: Sequence[str] = WBC_CLASSES,
    class_weights: Sequence[float] | None = None,
    batch_effect: BatchEffect | None = None,
    pixel_size_um: float = DEFAULT_PIXEL_SIZE_UM,
    rbc_density: float = DEFAULT_RBC_DENSITY,
    batch: str = "synthetic",
    return_masks: bool = False,
) -> SyntheticSmear:
    """Draw a synthetic Wright-Giemsa smear field with ground-truth WBC positions and classes.

    Parameters
    ----------
    seed : int
        Seed of all randomness; the same seed and arguments give a byte-identical image.
        The layout does not depend on stain, light, blur or noise, so the same seed under two
        batch effects (same ``scale``) shows the same cells.
    shape : tuple of int
        Image size (H, W) in pixels.
    n_wbc : int
        Number of white cells. They never overlap each other and lie fully inside the image.
    classes : sequence of str
        WBC classes to draw, a subset of `WBC_CLASSES`.
    class_weights : sequence of float, optional
        Relative frequency of each entry of ``classes``. By default the classes are cycled, so
        with ``n_wbc >= len(classes)`` every class appears; order and positions are random.
    batch_effect : BatchEffect, optional
        Stain, light, optics and magnification differences; None is the identity.
    pixel_size_um : float
        Nominal pixel size in um (default 0.2: an RBC is about 37 px across).
    rbc_density : float
        Target fraction of the field covered by RBCs, in [0, 0.9].
    batch : str
        Batch name stored with the smear.
    return_masks : bool
        Also return instance masks of WBCs and nuclei and masks of RBCs and platelets.

    Returns
    -------
    SyntheticSmear
        ``image`` of shape (H, W, 3) uint8 and ``cells``, one row per WBC.

    Raises
    ------
    ValueError
        When the WBCs do not fit, or an argument is out of range.
    """
    effect = BatchEffect() if batch_effect is None else batch_effect
    _check_common(pixel_size_um, rbc_density)
    if n_wbc < 0:
        raise ValueError(f"n_wbc must be >= 0, got {n_wbc}")
    h, w = (int(s) for s in shape)
    if h < 8 or w < 8:
        raise ValueError(f"shape must be at least 8x8, got {h}x{w}")
    classes = _check_classes(classes)
    ss_layout, ss_draw = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(ss_layout)
    ppu = effect.scale / pixel_size_um
    labels = _draw_labels(rng, n_wbc, classes, class_weights)
    diam_um = np.array([rng.uniform(*_WBC_DIAMETER_UM[c]) for c in labels])
    radii = 0.5 * diam_um * ppu
    centres = _place_wbcs(
        rng, (h, w), radii * (1 + _OUTLINE_AMP), _WBC_GAP_UM * ppu, pixel_size_um
    )
    image, cells, masks = _render(
        (h, w), labels, centres, radii, ppu, rbc_density, effect, ss_draw, return_masks
    )
    return SyntheticSmear(
        image=image,
        cells=cells,
        batch=batch,
        pixel_size_um=pixel_size_um / effect.scale,
        seed=int(seed),
        batch_effect=effect,
        masks=masks,
    )


def make_crop(
    seed: int,
    label: str,
    *,
    size: int = 224,
    batch_effect: BatchEffect | None = None,
    pixel_size_um: float = DEFAULT_PIXEL_SIZE_UM,
    rbc_density: float = DEFAULT_RBC_DENSITY,
) -> np.ndarray:
    """Draw one centred WBC with RBCs around it, like a CellaVision single-cell crop.

    Parameters
    ----------
    seed : int
        Seed of all randomness (same seed and arguments: identical crop).
    label : str
        WBC class, one of `WBC_CLASSES`.
    size : int
        Side of the square crop in px; a cell larger than the crop is cut at its edges.
    batch_effect : BatchEffect, optional
        Stain, light, optics and magnification differences; None is the identity.
    pixel_size_um : float
        Nominal pixel size in um.
    rbc_density : float
        Target fraction of the crop covered by RBCs.

    Returns
    -------
    ndarray of shape (size, size, 3), uint8
        RGB crop with the cell at its centre.
    """
    (label,) = _check_classes([label])
    _check_common(pixel_size_um, rbc_density)
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    effect = BatchEffect() if batch_effect is None else batch_effect
    ss_layout, ss_draw = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(ss_layout)
    ppu = effect.scale / pixel_size_um
    radius = 0.5 * rng.uniform(*_WBC_DIAMETER_UM[label]) * ppu
    centre = np.full((1, 2), (size - 1) / 2)
    image, _, _ = _render(
        (size, size),
        [label],
        centre,
        np.array([radius]),
        ppu,
        rbc_density,
        effect,
        ss_draw,
        False,
    )
    return image


def _child_seed(*key: int) -> int:
    """A well-mixed 32-bit seed for sub-item ``key`` of a parent seed."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def make_sample(
    seed: int = 0,
    *,
    n_per_batch: int = 2,
    batches: Mapping[str, BatchEffect] | None = None,
    shape: tuple[int, int] = (768, 1024),
    n_wbc: int = 6,
) -> list[SyntheticSmear]:
    """The sample data set: a few smears from each of several batches.

    Parameters
    ----------
    seed : int
        Parent seed; each smear gets its own derived seed (stored in ``SyntheticSmear.seed``).
    n_per_batch : int
        Smears per batch.
    batches : mapping of str to BatchEffect, optional
        Batch names and effects; `DEFAULT_BATCHES` (three labs) by default.
    shape : tuple of int
        Image size (H, W).
    n_wbc : int
        White cells per smear.

    Returns
    -------
    list of SyntheticSmear
        Batch by batch, ``len(batches) * n_per_batch`` smears.
    """
    batches = DEFAULT_BATCHES if batches is None else batches
    if n_per_batch < 0:
        raise ValueError(f"n_per_batch must be >= 0, got {n_per_batch}")
    out = []
    for b, (name, effect) in enumerate(batches.items()):
        for k in range(n_per_batch):
            out.append(
                make_smear(
                    _child_seed(seed, b, k),
                    shape=shape,
                    n_wbc=n_wbc,
                    batch_effect=effect,
                    batch=name,
                )
            )
    return out


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, compress_level=3)


def write_smears(smears: Sequence[SyntheticSmear], out_dir: str | Path) -> list[Path]:
    """Write smears as PNGs and their WBCs as one ground-truth CSV.

    Files: ``<out_dir>/<batch>/<batch>_<k>.png`` (k counts within each batch, from 0) and
    ``<out_dir>/ground_truth.csv`` with columns ``image`` (path relative to ``out_dir``, with
    ``/``), ``x, y, x0, y0, x1, y1, label, batch``.

    Parameters
    ----------
    smears : sequence of SyntheticSmear
        Smears, e.g. from `make_sample`.
    out_dir : str or Path
        Output folder (created).

    Returns
    -------
    list of Path
        The image paths, in the order of ``smears``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    paths, tables = [], []
    for smear in smears:
        k = counts.get(smear.batch, 0)
        counts[smear.batch] = k + 1
        rel = f"{smear.batch}/{smear.batch}_{k}.png"
        path = out_dir / rel
        _save_png(smear.image, path)
        paths.append(path)
        t = smear.cells[["x", "y", "x0", "y0", "x1", "y1", "label"]].copy()
        t.insert(0, "image", rel)
        t["batch"] = smear.batch
        tables.append(t)
    columns = ["image", "x", "y", "x0", "y0", "x1", "y1", "label", "batch"]
    gt = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=columns)
    gt.to_csv(out_dir / "ground_truth.csv", index=False)
    return paths


def write_crop_folder(
    root: str | Path,
    *,
    n_per_class: int = 4,
    seed: int = 0,
    size: int = 128,
    classes: Sequence[str] = WBC_CLASSES,
    batch_effect: BatchEffect | None = None,
) -> list[Path]:
    """Write a crop folder ``<root>/<class>/<class>_<k>.png`` of synthetic single-cell crops.

    Parameters
    ----------
    root : str or Path
        Output folder (created).
    n_per_class : int
        Crops per class.
    seed : int
        Parent seed; crop ``k`` of class ``c`` gets its own derived seed.
    size : int
        Crop side in px.
    classes : sequence of str
        Classes to write, a subset of `WBC_CLASSES`.
    batch_effect : BatchEffect, optional
        Applied to every crop; None is the identity.

    Returns
    -------
    list of Path
        The crop paths, class by class.
    """
    root = Path(root)
    classes = _check_classes(classes)
    paths = []
    for c in classes:
        ci = WBC_CLASSES.index(c)
        for k in range(n_per_class):
            crop = make_crop(_child_seed(seed, ci, k), c, size=size, batch_effect=batch_effect)
            path = root / c / f"{c}_{k}.png"
            _save_png(crop, path)
            paths.append(path)
    return paths

"""Stain normalisation of Romanowsky-stained blood images (Reinhard, Macenko), per image.

A project's stain normalisation (:class:`StainNorm`, stored in
``uns["hemofm"]["stain_norm"]``) is preprocessing: :func:`build_normaliser` turns it
into a function that maps one ``(H, W, 3)`` uint8 RGB image to another, and the
embedding pipeline (:func:`napari_hemofm.core.embed.embed_cells`, ``normalise=``)
applies it to each source image before its cells are cut, so every backend sees
normalised pixels.

Two methods, both estimated per image and mapped onto a reference:

``reinhard``
    Reinhard et al. (2001): match the mean and standard deviation of each CIE Lab
    channel. The statistics are taken on the *stained* pixels only (optical density
    above a floor, relative to the image's own glass): a blood smear or a WBC crop is
    mostly glass and red cells, and statistics over all pixels would mostly measure
    how much glass the crop holds.
``macenko``
    Macenko et al. (2009), adapted to Romanowsky stains (May-Gruenwald-Giemsa,
    Wright-Giemsa): optical density relative to the image's own glass (so a yellow
    lamp or a tinted mounting medium cancels), the plane of the two largest singular
    vectors of the stained pixels' OD, and the two extreme angles in that plane (robust
    1st / 99th percentiles) as the two stain vectors: the azure / methylene-blue-like
    one (absorbs red most: nuclei, basophilic cytoplasm) and the eosin-like one
    (absorbs green: red cells, eosinophil granules). Concentrations are scaled so
    their 99th percentiles match the reference's, then re-rendered with the
    reference's stain vectors and glass.

Limits, seen on real crops: a single-cell crop's stain angles depend on the cell (a
lymphocyte's blue cytoplasm is the "azure" extreme of its crop, a neutrophil crop's is
its nucleus), and a stain of another chemistry does not map linearly: Wright-stained
BCCD nuclei, purple from one extreme vector, come out teal after Macenko to PBC's
reference, whose nuclei are an azure + eosin mixture. Reinhard is the safer choice for
crops from another stain; Macenko suits whole smears of the same stain family.

Images with too little stain to estimate from (a blank field, a crop of glass, a
nearly uniform image) fall back with a :class:`StainNormWarning`: Macenko keeps the
reference stain vectors as the image's own (only glass and amount are matched), and
Reinhard leaves a channel's spread unscaled. Nothing ever returns NaN.

The reference is either the built-in one, a batch of images chosen by the caller, or
an image file. The built-in reference is numbers, not pixels: the stain vectors, stain
amounts, glass colour and Lab statistics of the public PBC data set (Acevedo et al.
2020, CellaVision DM96, May-Gruenwald-Giemsa; the data DinoBloom was trained on),
measured with this module on every 4th crop (200) of its 800-crop development subset
and rounded (``benchmarks/bench_stain.py --reference`` prints them for all 800). When
a reference image holds too little stain to estimate vectors, the Giemsa vectors of
Ruifrok & Johnston's colour deconvolution as published in ImageJ's Colour
Deconvolution plugin (G. Landini) and shipped by scikit-image as
``skimage.color.rgb_from_bex`` (methylene blue, eosin) are used instead.

Written here rather than taken from ``torchstain`` or ``staintools``: neither is
installable in this project's environment (not on its package index; ``staintools``
also needs ``spams``), both hard-code H&E assumptions (stain order by the first OD
component, a fixed white ``Io = 240``, Reinhard over all pixels) that are wrong for a
smear whose glass may be yellow, and both are a few dozen lines of numpy.

numpy and scikit-image only (``skimage.color`` is imported where used); reads an image
file only for a file reference. ``docs/batch.md`` has the measurement.

References
----------
E. Reinhard et al., "Color transfer between images", IEEE CG&A 21(5):34-41 (2001),
doi:10.1109/38.946629. M. Macenko et al., "A method for normalizing histology slides for
quantitative analysis", ISBI 2009, doi:10.1109/ISBI.2009.5193250. A. C. Ruifrok,
D. A. Johnston, "Quantification of histochemical staining by color deconvolution",
Anal. Quant. Cytol. Histol. 23(4):291-299 (2001).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "STAIN_METHODS",
    "MacenkoStats",
    "ReinhardStats",
    "StainNorm",
    "StainNormWarning",
    "build_normaliser",
    "giemsa_stains",
    "glass_level",
    "macenko_stats",
    "reinhard_stats",
    "stained_mask",
]

#: The methods :class:`StainNorm` accepts; ``"none"`` leaves the pixels as they are.
STAIN_METHODS: tuple[str, ...] = ("none", "reinhard", "macenko")

# ---------------------------------------------------------------- fixed constants
_GLASS_PERCENTILE = 90.0  # brightness percentile above which pixels are glass
_MIN_GLASS = 32.0  # a darker "glass" is no glass (a black or unlit image)
_STAINED_OD = 0.15  # OD norm above which a pixel is stained (Macenko's beta)
_MIN_STAINED_PIXELS = 64  # fewer stained pixels: not enough to estimate stains from
_MIN_STAINED_FRACTION = 0.005
_ANGLE_PERCENTILE = 1.0  # Macenko's alpha: robust extremes of the stain angle
_CONC_PERCENTILE = 99.0  # robust maximum stain amount
_MIN_STAIN_ANGLE = np.deg2rad(3.0)  # two stain vectors closer than this: one stain
_MAX_SAMPLE = 200_000  # pixels used for the estimates (a smear has millions)
_MIN_LAB_STD = 1.0  # Lab units; a flatter channel is not rescaled
_MAX_STD_RATIO = 5.0  # the Reinhard scale is clipped to [1/5, 5]
_MAX_CONC_RATIO = 4.0  # the Macenko amount scale is clipped to [1/4, 4]

# ------------------------------------------------------------- built-in reference
# Giemsa stain vectors (optical density of unit stain in R, G, B), Ruifrok & Johnston
# colour deconvolution / ImageJ "Giemsa": methylene blue (azure-like), eosin.
_GIEMSA_BLUE = (0.834750233, 0.513556283, 0.196330403)
_GIEMSA_EOSIN = (0.092789, 0.954111, 0.283111)
# The built-in reference: PBC (pbc_dev, every 4th of its 800 crops), measured with
# this module and rounded; benchmarks/bench_stain.py --reference prints them for all 800.
# Stain vectors azure-like, eosin-like; their robust (99th percentile) amounts; the glass
# (CellaVision's is cream, not white); Lab mean / std of the stained pixels.
_BUILTIN_STAINS = ((0.737, 0.578, 0.352), (0.444, 0.890, 0.107))
_BUILTIN_MAX_CONC = (0.76, 2.64)
_BUILTIN_GLASS = (255.0, 229.0, 203.0)
_BUILTIN_LAB_MEAN = (67.4, 16.9, -1.3)
_BUILTIN_LAB_STD = (15.0, 10.0, 16.9)


class StainNormWarning(UserWarning):
    """An image had too little stain to estimate from; a fallback was used."""


@dataclass(frozen=True)
class StainNorm:
    """A project's stain normalisation setting (``uns["hemofm"]["stain_norm"]``).

    Parameters
    ----------
    method : {"none", "reinhard", "macenko"}
        How images are normalised before embedding.
    reference : str or None
        What they are normalised to: ``None`` for the built-in reference, a batch name
        (the caller supplies that batch's images to :func:`build_normaliser`), or an
        image file path.

    Raises
    ------
    ValueError
        For an unknown method, or a reference that is not a string.
    """

    method: str = "none"
    reference: str | None = None

    def __post_init__(self) -> None:
        if self.method not in STAIN_METHODS:
            raise ValueError(
                f"unknown stain normalisation {self.method!r}; choose one of "
                + ", ".join(STAIN_METHODS)
            )
        if self.reference is not None and not isinstance(self.reference, str):
            raise ValueError(
                f"stain reference must be a batch name or a file path, got {self.reference!r}"
            )
        if self.reference == "":
            object.__setattr__(self, "reference", None)

    def to_dict(self) -> dict[str, Any]:
        """``{"method": ..., "reference": ...}`` for ``uns`` (reference may be None)."""
        return {"method": self.method, "reference": self.reference}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> StainNorm:
        """Read a setting written by :meth:`to_dict`; ``None`` / ``{}`` is ``"none"``.

        Parameters
        ----------
        data : mapping or None
            With ``method`` and optionally ``reference`` (None, or an empty string,
            for the built-in reference).

        Returns
        -------
        StainNorm

        Raises
        ------
        ValueError
            For an unknown method.
        """
        if not data:
            return cls()
        ref = data.get("reference")
        ref = None if ref is None or (isinstance(ref, float) and np.isnan(ref)) else str(ref)
        return cls(method=str(data.get("method", "none")), reference=ref)

    @property
    def active(self) -> bool:
        """Whether images are changed at all (``method != "none"``)."""
        return self.method != "none"


# ------------------------------------------------------------------ estimation
def _check_rgb8(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(
            f"stain normalisation needs an (H, W, 3) uint8 RGB image, got shape "
            f"{arr.shape} dtype {arr.dtype}"
        )
    return arr


def _pixels(image: np.ndarray, rng_seed: int = 0) -> np.ndarray:
    """``(n, 3)`` float64 pixels, a fixed-seed sample of at most ``_MAX_SAMPLE``."""
    flat = image.reshape(-1, 3)
    if len(flat) > _MAX_SAMPLE:
        idx = np.random.default_rng(rng_seed).choice(len(flat), _MAX_SAMPLE, replace=False)
        flat = flat[np.sort(idx)]
    return flat.astype(np.float64)


def glass_level(pixels: np.ndarray) -> np.ndarray:
    """Per-channel brightness of the glass (background) of an image.

    Parameters
    ----------
    pixels : ndarray of shape (n, 3) or (H, W, 3)
        RGB values in 0-255.

    Returns
    -------
    ndarray of shape (3,), float64
        The median colour of the pixels brighter (summed over channels) than the
        90th percentile, each channel at least 32. A yellowed background gives a
        yellow glass level, which optical density then divides out.
    """
    flat = np.asarray(pixels, dtype=np.float64).reshape(-1, 3)
    if len(flat) == 0:
        return np.full(3, 255.0)
    brightness = flat.sum(axis=1)
    bright = flat[brightness >= np.percentile(brightness, _GLASS_PERCENTILE)]
    return np.maximum(np.median(bright, axis=0), _MIN_GLASS)


def _optical_density(pixels: np.ndarray, glass: np.ndarray) -> np.ndarray:
    """``ln((glass + 1) / (I + 1))`` per channel, clipped at 0 (float64)."""
    return np.maximum(np.log((glass + 1.0) / (pixels + 1.0)), 0.0)


def stained_mask(pixels: np.ndarray, glass: np.ndarray | None = None) -> np.ndarray:
    """Which pixels carry stain: optical density norm above 0.15 (relative to the glass).

    Parameters
    ----------
    pixels : ndarray of shape (n, 3) or (H, W, 3)
        RGB values in 0-255.
    glass : ndarray of shape (3,), optional
        The glass level (:func:`glass_level` of the pixels when omitted).

    Returns
    -------
    ndarray of shape (n,) or (H, W), bool
    """
    arr = np.asarray(pixels, dtype=np.float64)
    if glass is None:
        glass = glass_level(arr)
    return _stained(arr, _optical_density(arr, glass))


def _stained(pixels: np.ndarray, od: np.ndarray) -> np.ndarray:
    """OD norm above the floor; nothing in an unlit image (no pixel as bright as glass)."""
    if pixels.size == 0 or float(pixels.max()) < _MIN_GLASS:
        return np.zeros(od.shape[:-1], dtype=bool)
    return np.sqrt((od**2).sum(axis=-1)) > _STAINED_OD


def _enough(n_stained: int, n_total: int) -> bool:
    return n_stained >= max(_MIN_STAINED_PIXELS, _MIN_STAINED_FRACTION * n_total)


@dataclass(frozen=True)
class ReinhardStats:
    """Lab statistics of an image's stained pixels.

    Attributes
    ----------
    mean, std : tuple of 3 float
        Mean and standard deviation of L*, a*, b* over the stained pixels.
    fallback : bool
        Too few stained pixels: the statistics are over all pixels.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fallback: bool = False


def reinhard_stats(images: Sequence[np.ndarray] | np.ndarray) -> ReinhardStats:
    """Lab mean and standard deviation of the stained pixels of one or more images.

    Parameters
    ----------
    images : ndarray of shape (H, W, 3) uint8, or a sequence of them
        Pooled when several (a reference batch).

    Returns
    -------
    ReinhardStats
        Over all pixels, with ``fallback=True``, when fewer than 64 (or 0.5 %) of
        them are stained.
    """
    stack = [images] if isinstance(images, np.ndarray) else list(images)
    if not stack:
        raise ValueError("no reference images to take stain statistics from")
    labs, stained = [], []
    for i, image in enumerate(stack):
        px = _pixels(_check_rgb8(image), i)
        stained.append(stained_mask(px))
        labs.append(_rgb_to_lab(px))
    return _lab_stats(np.concatenate(labs), np.concatenate(stained))


def _rgb_to_lab(pixels: np.ndarray) -> np.ndarray:
    """CIE Lab (D65) of RGB values in 0-255, any leading shape."""
    from skimage.color import rgb2lab

    shape = pixels.shape
    flat = np.asarray(pixels, dtype=np.float64).reshape(1, -1, 3) / 255.0
    return rgb2lab(flat).reshape(shape)


def _lab_stats(lab_all: np.ndarray, mask_all: np.ndarray) -> ReinhardStats:
    """Mean / std of ``lab_all`` ``(n, 3)`` over ``mask_all`` (all pixels if too few)."""
    total = len(lab_all)
    fallback = not _enough(int(mask_all.sum()), total)
    values = lab_all if fallback else lab_all[mask_all]
    return ReinhardStats(
        tuple(float(v) for v in values.mean(axis=0)),  # type: ignore[arg-type]
        tuple(float(v) for v in values.std(axis=0)),  # type: ignore[arg-type]
        fallback,
    )


@dataclass(frozen=True)
class MacenkoStats:
    """Stain vectors, stain amounts and glass of an image (Macenko, Romanowsky order).

    Attributes
    ----------
    stains : ndarray of shape (2, 3)
        Unit optical density vectors: row 0 the azure / methylene-blue-like stain (the
        larger red share), row 1 the eosin-like stain.
    max_conc : ndarray of shape (2,)
        99th percentile of each stain's amount over the stained pixels.
    glass : ndarray of shape (3,)
        Glass brightness per channel (0-255).
    fallback : bool
        Too little stain (or a single stain) to estimate vectors: the built-in
        reference vectors were used.
    """

    stains: np.ndarray
    max_conc: np.ndarray
    glass: np.ndarray
    fallback: bool = False


def _unit_rows(rows: Sequence[Sequence[float]]) -> np.ndarray:
    m = np.array(rows, dtype=np.float64)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def giemsa_stains() -> np.ndarray:
    """ImageJ's / scikit-image's Giemsa vectors (methylene blue, eosin), ``(2, 3)`` unit OD."""
    return _unit_rows([_GIEMSA_BLUE, _GIEMSA_EOSIN])


def _order_stains(v1: np.ndarray, v2: np.ndarray) -> np.ndarray:
    """Azure-like first: the vector with the larger red-to-green OD ratio."""
    ratio1 = v1[0] / max(v1[1], 1e-6)
    ratio2 = v2[0] / max(v2[1], 1e-6)
    return np.stack([v1, v2] if ratio1 >= ratio2 else [v2, v1])


def _estimate_stains(od: np.ndarray) -> np.ndarray | None:
    """Two unit stain vectors from stained pixels' OD ``(n, 3)``, or None if degenerate."""
    cov = np.cov(od, rowvar=False)
    if not np.all(np.isfinite(cov)):
        return None
    _, vecs = np.linalg.eigh(cov)
    plane = vecs[:, [2, 1]]  # the two largest
    # OD is non-negative: orient both axes towards positive stain
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
    proj = od @ plane
    angle = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(angle, [_ANGLE_PERCENTILE, 100.0 - _ANGLE_PERCENTILE])
    if hi - lo < _MIN_STAIN_ANGLE:
        return None
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    v1, v2 = np.maximum(v1, 1e-6), np.maximum(v2, 1e-6)  # a stain absorbs, never emits
    v1, v2 = v1 / np.linalg.norm(v1), v2 / np.linalg.norm(v2)
    return _order_stains(v1, v2)


def _concentrations(od: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """Least-squares stain amounts ``(n, 2)`` of OD ``(n, 3)`` for ``stains`` ``(2, 3)``."""
    conc, *_ = np.linalg.lstsq(stains.T, od.T, rcond=None)
    return conc.T


def _macenko_one(
    image: np.ndarray, seed: int, fallback_stains: np.ndarray
) -> tuple[MacenkoStats, np.ndarray]:
    """Estimate of one image, with its stained pixels' OD ``(n, 3)``."""
    px = _pixels(_check_rgb8(image), seed)
    glass = glass_level(px)
    od_all = _optical_density(px, glass)
    od = od_all[_stained(px, od_all)]
    stains = _estimate_stains(od) if _enough(len(od), len(px)) else None
    fallback = stains is None
    if stains is None:
        stains = fallback_stains
    if len(od):
        max_conc = np.percentile(_concentrations(od, stains), _CONC_PERCENTILE, axis=0)
    else:
        max_conc = np.zeros(2)
    return MacenkoStats(stains, np.asarray(max_conc, np.float64), glass, fallback), od


def macenko_stats(
    images: Sequence[np.ndarray] | np.ndarray, fallback_stains: np.ndarray | None = None
) -> MacenkoStats:
    """Estimate Romanowsky stain vectors, amounts and glass of one or more images.

    Parameters
    ----------
    images : ndarray of shape (H, W, 3) uint8, or a sequence of them
        One image, or a reference batch: each image is estimated on its own (OD
        relative to its own glass) and the batch's reference is the median over the
        images that gave stain vectors (vectors re-normalised), so that it describes a
        typical image of the batch, which is what each image is later mapped from.
    fallback_stains : ndarray of shape (2, 3), optional
        Stain vectors assumed when they cannot be estimated (default: the Giemsa
        vectors, :func:`giemsa_stains`).

    Returns
    -------
    MacenkoStats
        With ``fallback_stains`` and ``fallback=True`` when no image has enough stained
        pixels spanning two stains.

    Notes
    -----
    Pooling all pixels of a batch instead would take the stain angles' extremes over
    the whole batch, more extreme than any one image's, and shift every image's hue
    when it is mapped onto them.
    """
    stack = [images] if isinstance(images, np.ndarray) else list(images)
    if not stack:
        raise ValueError("no reference images to take stain statistics from")
    default = giemsa_stains() if fallback_stains is None else np.asarray(fallback_stains)
    ests = [_macenko_one(image, i, default)[0] for i, image in enumerate(stack)]
    if len(ests) == 1:
        return ests[0]
    good = [e for e in ests if not e.fallback]
    glass = np.median(np.stack([e.glass for e in ests]), axis=0)
    if not good:
        return MacenkoStats(default, np.median([e.max_conc for e in ests], axis=0), glass, True)
    stains = _unit_rows(np.median(np.stack([e.stains for e in good]), axis=0))
    max_conc = np.median(np.stack([e.max_conc for e in good]), axis=0)
    return MacenkoStats(stains, max_conc, glass, False)


def builtin_reinhard() -> ReinhardStats:
    """The built-in Reinhard reference: Lab statistics of PBC's stained pixels."""
    return ReinhardStats(_BUILTIN_LAB_MEAN, _BUILTIN_LAB_STD)


def builtin_macenko() -> MacenkoStats:
    """The built-in Macenko reference: PBC's stain vectors, amounts and glass."""
    return MacenkoStats(
        _unit_rows(_BUILTIN_STAINS),
        np.asarray(_BUILTIN_MAX_CONC, np.float64),
        np.asarray(_BUILTIN_GLASS, np.float64),
    )


# ---------------------------------------------------------------- normalisers
def _warn(method: str, what: str) -> None:
    warnings.warn(
        f"{method} stain normalisation: {what}; a fallback was used", StainNormWarning, 3
    )


@dataclass(frozen=True)
class ReinhardNormaliser:
    """Map an image's stained-pixel Lab statistics onto a target's (Reinhard 2001).

    Parameters
    ----------
    target : ReinhardStats
        The reference statistics.
    """

    target: ReinhardStats

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Normalise one image.

        Parameters
        ----------
        image : ndarray of shape (H, W, 3), uint8

        Returns
        -------
        ndarray of shape (H, W, 3), uint8
        """
        from skimage.color import lab2rgb

        rgb = _check_rgb8(image)
        if rgb.size == 0:
            return rgb.copy()
        lab = _rgb_to_lab(rgb)
        src = _lab_stats(lab.reshape(-1, 3), stained_mask(rgb).ravel())
        if src.fallback:
            _warn("reinhard", "too few stained pixels, statistics over all pixels")
        mean_s, std_s = np.asarray(src.mean), np.asarray(src.std)
        mean_t, std_t = np.asarray(self.target.mean), np.asarray(self.target.std)
        scale = np.where(std_s < _MIN_LAB_STD, 1.0, std_t / np.maximum(std_s, 1e-9))
        scale = np.clip(scale, 1.0 / _MAX_STD_RATIO, _MAX_STD_RATIO)
        lab = (lab - mean_s) * scale + mean_t
        lab[..., 0] = np.clip(lab[..., 0], 0.0, 100.0)
        out = lab2rgb(lab)
        return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


@dataclass(frozen=True, eq=False)
class MacenkoNormaliser:
    """Re-render an image with a target's stain vectors, amounts and glass (Macenko 2009).

    Parameters
    ----------
    target : MacenkoStats
        The reference.
    """

    target: MacenkoStats

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Normalise one image.

        Parameters
        ----------
        image : ndarray of shape (H, W, 3), uint8

        Returns
        -------
        ndarray of shape (H, W, 3), uint8
        """
        rgb = _check_rgb8(image)
        if rgb.size == 0:
            return rgb.copy()
        src = macenko_stats(rgb, fallback_stains=self.target.stains)
        if src.fallback:
            _warn("macenko", "too little stain (or one stain only), reference vectors kept")
        h, w = rgb.shape[:2]
        od = _optical_density(rgb.reshape(-1, 3).astype(np.float64), src.glass)
        # A stain absorbs, never emits: negative amounts (least-squares noise) are cut.
        conc = np.maximum(_concentrations(od, src.stains), 0.0)
        # What two stains do not explain (noise, a third absorber, the cut negatives) is
        # carried over as it is, so an image normalised to itself comes back unchanged.
        residual = od - conc @ src.stains
        # Amounts scaled so the robust maxima agree (at most 4x either way: a crop with
        # hardly any of one stain must not have it blown up); an absent stain stays absent.
        ratio = np.where(
            src.max_conc > 1e-3, self.target.max_conc / np.maximum(src.max_conc, 1e-3), 1.0
        )
        ratio = np.clip(ratio, 1.0 / _MAX_CONC_RATIO, _MAX_CONC_RATIO)
        od_out = (conc * ratio) @ self.target.stains + residual
        out = (self.target.glass + 1.0) * np.exp(-od_out) - 1.0
        return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(h, w, 3)


def _read_reference(path: str) -> np.ndarray:
    from napari_hemofm.core.io import ImageReadError, read_image, to_rgb8

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(
            f"stain reference {path!r} is not an image file (for a batch name, the "
            "caller passes that batch's images)"
        )
    try:
        return to_rgb8(np.asarray(read_image(p)))
    except (ImageReadError, OSError) as exc:
        raise ValueError(f"stain reference {path!r} could not be read: {exc}") from exc


def build_normaliser(
    setting: StainNorm,
    reference_images: Sequence[np.ndarray] | None = None,
) -> Callable[[np.ndarray], np.ndarray] | None:
    """Turn a stain normalisation setting into a per-image function.

    Parameters
    ----------
    setting : StainNorm
        Method and reference.
    reference_images : sequence of ndarray of shape (H, W, 3), uint8, optional
        The reference batch's images, when ``setting.reference`` names a batch (the
        caller knows which images that is). When omitted, a non-None reference is read
        as an image file, and None means the built-in reference.

    Returns
    -------
    callable or None
        ``f(image) -> image``: ``(H, W, 3)`` uint8 RGB to the same shape and dtype;
        thread-safe and picklable. ``None`` for ``method="none"``.

    Raises
    ------
    ValueError
        When the reference file cannot be read or the reference batch is empty.
    """
    if not setting.active:
        return None
    if reference_images is not None:
        refs = [_check_rgb8(np.asarray(im)) for im in reference_images]
        if not refs:
            raise ValueError(f"stain reference batch {setting.reference!r} holds no images")
    elif setting.reference is not None:
        refs = [_read_reference(setting.reference)]
    else:
        refs = None
    if setting.method == "reinhard":
        target = builtin_reinhard() if refs is None else reinhard_stats(refs)
        if target.fallback:
            _warn("reinhard", "the reference has too few stained pixels")
        return ReinhardNormaliser(target)
    mtarget = builtin_macenko() if refs is None else macenko_stats(refs)
    if mtarget.fallback:
        _warn("macenko", "the reference has too little stain to estimate vectors")
    return MacenkoNormaliser(mtarget)

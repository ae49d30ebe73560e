"""Real crops and simulated labs for the robustness and stain benchmarks (not a test fixture).

Loads ``../shared/data/{pbc_dev,bccd_crops}`` (never copied into the repository) and
derives, in memory, the looks another lab would give the same cells:

``tinted``
    another stain batch: the optical density of each channel scaled by (0.75, 1.0,
    1.35), i.e. ``I' = 255 (I / 255) ** k`` (redder purple, bluer cytoplasm);
``yellowed``
    a yellow lamp / aged mounting medium: intensities times (1.0, 0.93, 0.72), glass
    included;
``blurred``
    defocus: a Gaussian of sigma = 1/150 of the crop side (2.4 px at 360 px);
``120px``
    a lower magnification or camera: resized (antialiased) to 120 px on the long side.

``embed_variant`` caches feature vectors under ``/tmp/hemofm_bench_cache`` keyed by a
hash of the feature code, the variant and the stain normalisation, so repeated runs
on the shared 2-core machine only embed what changed.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CACHE = Path("/tmp/hemofm_bench_cache")
LABS = ("pbc_dev", "bccd_crops")
VARIANTS = ("original", "tinted", "yellowed", "blurred", "120px")
SHARED = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
MIN_SCORED = 5  # classes with fewer test cells are not scored (BCCD has 1 basophil)


def load_lab(name: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Every crop of ``../shared/data/<name>/<class>/``, labelled by folder, sorted."""
    from napari_hemofm.core.io import is_image_file, read_image, to_rgb8

    folder = DATA / name
    if not folder.is_dir():
        sys.exit(f"{folder} not found: this benchmark needs ../shared/data")
    crops, labels = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(class_dir.iterdir()):
            if is_image_file(path):
                crops.append(to_rgb8(np.asarray(read_image(path))))
                labels.append(class_dir.name)
    return crops, np.asarray(labels)


def two_lab_project(path: Path | None = None) -> Path:
    """The two-lab project (``pbc_dev`` + ``bccd_crops``, handcrafted features).

    ``path`` is reused when it exists, else written by ``hemofm embed`` (default: a
    new temporary folder). Exits with a message when ``../shared/data`` is missing.
    """
    import tempfile

    from napari_hemofm.cli import main as hemofm

    if path is not None and Path(path).exists():
        return Path(path)
    for name in LABS:
        if not (DATA / name).is_dir():
            sys.exit(f"{DATA / name} not found: this benchmark needs ../shared/data")
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="hemofm_twolab_")) / "twolab.h5ad"
    inputs = [str(DATA / name) for name in LABS]
    print(f"building {path}: hemofm embed {' '.join(inputs)} --model handcrafted", file=sys.stderr)
    if hemofm(["embed", *inputs, "--model", "handcrafted", "--out", str(path)]) != 0:
        sys.exit("embedding failed")
    return Path(path)


def _tint(crop: np.ndarray) -> np.ndarray:
    f = crop.astype(np.float64) / 255.0
    out = f ** np.array([0.75, 1.0, 1.35])
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _yellow(crop: np.ndarray) -> np.ndarray:
    out = crop.astype(np.float64) * np.array([1.0, 0.93, 0.72])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _blur(crop: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    sigma = max(crop.shape[:2]) / 150.0
    out = ndi.gaussian_filter(crop.astype(np.float64), (sigma, sigma, 0))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _downscale(crop: np.ndarray, side: int = 120) -> np.ndarray:
    from PIL import Image

    h, w = crop.shape[:2]
    f = side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS))


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "original": lambda c: c,
    "tinted": _tint,
    "yellowed": _yellow,
    "blurred": _blur,
    "120px": _downscale,
}


def _code_hash(stain_norm: str = "none") -> str:
    h = hashlib.sha256()
    for name in ("features.py", "stain.py") if stain_norm != "none" else ("features.py",):
        h.update((ROOT / "napari_hemofm" / "core" / name).read_bytes())
    return h.hexdigest()[:12]


def embed_variant(
    lab: str,
    variant: str,
    crops: list[np.ndarray],
    stain_norm: str = "none",
    threads: int = 2,
) -> np.ndarray:
    """Handcrafted vectors of ``crops`` seen through ``variant``, optionally stain-normalised.

    Normalisation (:func:`napari_hemofm.core.stain.build_normaliser`, built-in reference)
    is applied to each crop after the simulated lab effect, as the embedding pipeline
    applies it to each source image.
    """
    from concurrent.futures import ThreadPoolExecutor

    from napari_hemofm.core.features import HandcraftedBackbone, handcrafted_features
    from napari_hemofm.core.stain import StainNorm, StainNormWarning, build_normaliser

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{_code_hash(stain_norm)}_{lab}_{variant}_{stain_norm}.npy"
    if path.exists():
        return np.load(path)
    transform = TRANSFORMS[variant]
    normalise = build_normaliser(StainNorm(stain_norm))
    # glass-only crops fall back with a warning; counted, not printed 1000 times
    warnings.filterwarnings("ignore", category=StainNormWarning)

    def one(crop: np.ndarray) -> np.ndarray:
        img = transform(crop)
        if normalise is not None:
            img = normalise(img)
        return handcrafted_features(img)

    with ThreadPoolExecutor(threads) as pool:
        X = np.stack(list(pool.map(one, crops))).astype(np.float32)
    assert X.shape[1] == HandcraftedBackbone.dim
    np.save(path, X)
    return X

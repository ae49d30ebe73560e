"""Stain normalisation: settings, Reinhard and Macenko properties, fallbacks, the pipeline hook."""

import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from napari_hemofm.core import stain
from napari_hemofm.core.embed import embed_cells
from napari_hemofm.core.stain import (
    STAIN_METHODS,
    StainNorm,
    StainNormWarning,
    build_normaliser,
    giemsa_stains,
    macenko_stats,
)
from napari_hemofm.core.synthetic import BatchEffect, make_crop


def _crop(seed=0, label="neutrophil", effect=None):
    return make_crop(seed, label, size=160, batch_effect=effect)


def _real_crop(request):
    """The first PBC neutrophil (skips where ../shared/data is absent)."""
    pbc = request.getfixturevalue("shared_data") / "pbc_dev"
    files = sorted((pbc / "neutrophil").glob("*.jpg"))
    assert files, f"no neutrophil crops in {pbc}"
    return np.asarray(Image.open(files[0]).convert("RGB"))


def _lab(image):
    from skimage.color import rgb2lab

    return rgb2lab(image)


def _delta_e(a, b):
    """Mean CIE76 colour difference between two RGB images (Lab units)."""
    return float(np.linalg.norm(_lab(a) - _lab(b), axis=-1).mean())


def _tint(image):
    """Another lab: a yellow lamp and a weaker, bluer stain (per-channel gamma and gain)."""
    f = image.astype(np.float64) / 255.0
    out = np.stack([f[..., 0] ** 0.8, f[..., 1] ** 0.9 * 0.93, f[..., 2] ** 1.2 * 0.8], -1)
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------ setting
def test_setting_round_trips_and_rejects_unknown_methods():
    """to_dict / from_dict round-trip; None means no normalisation; a typo is one clear error."""
    for method in STAIN_METHODS:
        for ref in (None, "lab_a", "/x/ref.png"):
            s = StainNorm(method, ref)
            assert StainNorm.from_dict(s.to_dict()) == s
    assert StainNorm.from_dict(None) == StainNorm()
    assert StainNorm.from_dict({}) == StainNorm("none")
    assert StainNorm("reinhard", "").reference is None
    with pytest.raises(ValueError, match="macenko"):
        StainNorm("macenco")


def test_none_builds_no_normaliser():
    """``method="none"`` is no function at all, so the pipeline skips the step."""
    assert build_normaliser(StainNorm()) is None


# ---------------------------------------------------------------------- properties
@pytest.mark.parametrize("method", ["reinhard", "macenko"])
@pytest.mark.parametrize("source", ["synthetic", "real"])
def test_image_normalised_to_itself_is_nearly_unchanged(method, source, request):
    """With the image as its own reference, the output differs by under 3 Lab units."""
    image = _crop(3) if source == "synthetic" else _real_crop(request)
    f = build_normaliser(StainNorm(method, "self"), reference_images=[image])
    out = f(image)
    assert out.shape == image.shape
    assert out.dtype == np.uint8
    assert _delta_e(out, image) < 3.0


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
@pytest.mark.parametrize("source", ["synthetic", "real"])
def test_tinted_copy_is_brought_back_close_to_the_original(method, source, request):
    """A re-tinted copy normalised to the original is over 2x closer to it in Lab."""
    image = _crop(5, "eosinophil") if source == "synthetic" else _real_crop(request)
    tinted = _tint(image)
    f = build_normaliser(StainNorm(method, "orig"), reference_images=[image])
    before = _delta_e(tinted, image)
    after = _delta_e(f(tinted), image)
    assert before > 8.0  # the tint is a real change
    assert after < before / 2


def test_reinhard_moves_another_stain_to_the_reference_lab_mean():
    """Reinhard's objective: another lab's stained-pixel Lab mean ends near the reference's.

    (Macenko matches stain vectors, not Lab means; the synthetic renderer's stains are not
    a two-stain Beer-Lambert mixture, so it is tested on tints and on rendered stains.)
    """
    method = "reinhard"
    ref = [_crop(s, lab) for s, lab in enumerate(["neutrophil", "lymphocyte", "monocyte"])]
    effect = BatchEffect(hue_shift_deg=15.0, saturation=1.4, brightness=0.85)
    other = _crop(11, "lymphocyte", effect)
    f = build_normaliser(StainNorm(method, "lab_a"), reference_images=ref)
    target = np.asarray(stain.reinhard_stats(ref).mean)
    before = np.linalg.norm(np.asarray(stain.reinhard_stats(other).mean) - target)
    after = np.linalg.norm(np.asarray(stain.reinhard_stats(f(other)).mean) - target)
    assert after < 0.2 * before


def test_macenko_recovers_known_stain_vectors_in_romanowsky_order():
    """Pixels rendered from two known stains give those stains back (azure first), within 5 deg."""
    rng = np.random.default_rng(0)
    true = giemsa_stains()
    conc = np.zeros((200, 200, 2))
    conc[:100, :, 0] = rng.gamma(2.0, 0.4, (100, 200))  # "nuclei"
    conc[100:, :, 1] = rng.gamma(2.0, 0.3, (100, 200))  # "red cells"
    conc[40:60] = 0.0  # some glass
    image = np.clip(255.0 * np.exp(-conc @ true), 0, 255).astype(np.uint8)
    stats = macenko_stats(image)
    assert not stats.fallback
    cos = np.sum(stats.stains * true, axis=1)
    assert np.degrees(np.arccos(np.clip(cos, -1, 1))).max() < 5.0


def test_a_reference_batch_gives_the_median_image_stains():
    """A batch reference is the median of its images' own estimates: 250 small images of
    two known stains give those stains back (within 5 deg), not a fallback."""
    rng = np.random.default_rng(1)
    true = giemsa_stains()
    images = []
    for _ in range(250):
        conc = np.zeros((12, 12, 2))
        conc[:6, :, 0] = rng.gamma(2.0, 0.4, (6, 12))
        conc[6:, :, 1] = rng.gamma(2.0, 0.3, (6, 12))
        conc[0, :] = 0.0  # a row of glass
        images.append(np.clip(255.0 * np.exp(-conc @ true), 0, 255).astype(np.uint8))
    stats = macenko_stats(images)
    assert not stats.fallback
    cos = np.sum(stats.stains * true, axis=1)
    assert np.degrees(np.arccos(np.clip(cos, -1, 1))).max() < 5.0


def test_builtin_reference_maps_any_lab_to_one_look():
    """With the built-in reference, two labs' copies of one crop end closer than they started."""
    image = _crop(7, "monocyte")
    tinted = _tint(image)
    for method in ("reinhard", "macenko"):
        f = build_normaliser(StainNorm(method))
        assert _delta_e(f(image), f(tinted)) < _delta_e(image, tinted) / 2


# ----------------------------------------------------------------------- fallbacks
@pytest.mark.parametrize("method", ["reinhard", "macenko"])
@pytest.mark.parametrize("value", [0, 128, 255])
def test_uniform_images_warn_and_stay_finite(method, value):
    """A blank field has no stain: a StainNormWarning, a uint8 image of the same shape, no NaN."""
    blank = np.full((40, 50, 3), value, np.uint8)
    f = build_normaliser(StainNorm(method))
    with pytest.warns(StainNormWarning):
        out = f(blank)
    assert out.shape == blank.shape
    assert out.dtype == np.uint8


def test_blank_reference_falls_back_to_giemsa_vectors():
    """A reference of glass only gives no stain vectors: the Giemsa ones, with a warning."""
    with pytest.warns(StainNormWarning):
        f = build_normaliser(StainNorm("macenko", "glass"), [np.full((30, 30, 3), 240, np.uint8)])
    np.testing.assert_allclose(f.target.stains, giemsa_stains())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StainNormWarning)
        out = f(_crop(1))
    assert out.dtype == np.uint8


def test_single_stain_image_keeps_reference_vectors():
    """An image of one stain (one angle) falls back to the reference's vectors, not NaN."""
    od = np.linspace(0.2, 1.5, 64 * 64)[:, None] * giemsa_stains()[0]
    image = np.clip(255 * np.exp(-od), 0, 255).astype(np.uint8).reshape(64, 64, 3)
    f = build_normaliser(StainNorm("macenko"))
    with pytest.warns(StainNormWarning):
        out = f(image)
    assert np.isfinite(out).all()


def test_wrong_input_is_one_clear_error():
    """Not (H, W, 3) uint8: a ValueError naming shape and dtype."""
    f = build_normaliser(StainNorm("reinhard"))
    with pytest.raises(ValueError, match="uint8"):
        f(np.zeros((10, 10), np.float32))


# ---------------------------------------------------------------------- references
def test_file_reference_is_read_and_missing_file_is_named(tmp_path):
    """A reference path is read by build_normaliser; a missing one is a ValueError naming it."""
    ref = _crop(2)
    path = tmp_path / "ref.png"
    Image.fromarray(ref).save(path)
    from_file = build_normaliser(StainNorm("reinhard", str(path)))
    from_array = build_normaliser(StainNorm("reinhard", "x"), reference_images=[ref])
    assert from_file.target == from_array.target
    with pytest.raises(ValueError, match=r"nope\.png"):
        build_normaliser(StainNorm("macenko", str(tmp_path / "nope.png")))
    with pytest.raises(ValueError, match="no images"):
        build_normaliser(StainNorm("macenko", "empty"), reference_images=[])


# ----------------------------------------------------------------------- pipeline
class MeanColour:
    """Embeds a crop as its mean RGB, so the test sees the pixels the backbone got."""

    name = "mean-colour"
    dim = 3

    def prepare(self, crop):
        return crop.reshape(-1, 3).mean(0).astype(np.float32)

    def forward(self, batch):
        return np.asarray(batch, np.float32)

    def meta(self):
        return {"model": self.name}


def _invert(image):
    assert image.dtype == np.uint8
    assert image.ndim == 3
    return 255 - image


def test_embed_cells_normalises_each_source_before_cropping(tmp_path):
    """Every backbone sees normalised pixels: on disk, in memory, and lazily read (per crop)."""
    from napari_hemofm.core.io import LazyRGBImage

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    frame = pd.DataFrame(
        {
            "source": [str(tmp_path / "a.png"), "mem", "lazy"],
            "x0": [0, 10, 5],
            "y0": [0, 5, 20],
            "x1": [80, 30, 45],
            "y1": [60, 25, 50],
        }
    )
    images = {"mem": img, "lazy": LazyRGBImage(img)}
    plain = embed_cells(frame, MeanColour(), images=images).embeddings
    normed = embed_cells(frame, MeanColour(), images=images, normalise=_invert).embeddings
    np.testing.assert_allclose(normed, 255.0 - plain, atol=1e-3)

"""Property tests of the ``handcrafted`` backbone (napari_hemofm.core.features).

Drawn cells (discs on a pink-beige field) for the properties, the synthetic generator
where it is there, and the real PBC crops in ../shared/data for the accuracy target.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_hemofm.core.features import (
    FEATURE_NAMES,
    FEATURE_VERSION,
    INPUT_SIZE,
    HandcraftedBackbone,
    handcrafted_features,
    segment_cell,
)

DIM = len(FEATURE_NAMES)

GLASS = (250, 228, 204)  # mean colours of PBC neutrophil crops (glass, red cells, ...)
RBC = (204, 165, 167)
CYTOPLASM = (199, 158, 180)
NUCLEUS = (88, 48, 138)


def _disc(shape, cy, cx, r):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def draw_cell(seed: int = 0, size: int = 200, lobes: int = 1, cell_r: int = 44):
    """A WBC at the centre (purple nucleus in a lilac cytoplasm), red cells around.

    ``lobes`` > 1 draws that many small nucleus discs on an arc, joined by thin strands.
    Returns the RGB crop and the drawn nucleus and cell masks.
    """
    rng = np.random.default_rng(seed)
    shape = (size, size)
    img = np.empty((*shape, 3), np.float64)
    img[:] = GLASS
    c = (size - 1) / 2
    for cy, cx in ((c - 66, c - 10), (c + 20, c + 68), (c + 70, c - 40), (c - 30, c - 75)):
        img[_disc(shape, cy, cx, 20)] = RBC
    cell = _disc(shape, c, c, cell_r)
    img[cell] = CYTOPLASM
    if lobes == 1:
        nucleus = _disc(shape, c, c, 27)
    else:
        nucleus = np.zeros(shape, bool)
        angles = np.linspace(-0.9 * np.pi / 2, 0.9 * np.pi / 2, lobes) + np.pi / 2
        centres = [(c + 22 * np.cos(a) - 8, c + 22 * np.sin(a) - 22) for a in angles]
        for cy, cx in centres:
            nucleus |= _disc(shape, cy, cx, 11)
        for (y0, x0), (y1, x1) in pairwise(centres):  # 3 px strands
            for t in np.linspace(0, 1, 40):
                nucleus |= _disc(shape, y0 + t * (y1 - y0), x0 + t * (x1 - x0), 1.5)
    img[nucleus] = NUCLEUS
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), nucleus, cell


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def random_crop(seed: int, size: int = 120) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------- the vector
def test_names_match_the_vector():
    """One unique name per dimension; the backbone's dim and meta agree with it."""
    vec = handcrafted_features(draw_cell()[0])
    assert vec.shape == (DIM,) == (HandcraftedBackbone.dim,)
    assert len(set(FEATURE_NAMES)) == DIM
    meta = HandcraftedBackbone().meta()
    assert meta == {
        "model": "handcrafted",
        "input_size": INPUT_SIZE,
        "embedding_dim": DIM,
        "feature_version": FEATURE_VERSION,
    }
    assert "weights_sha256" not in meta


def test_deterministic():
    """The same crop gives the bit-identical vector, also after other crops were seen."""
    crop = draw_cell(seed=3)[0]
    first = handcrafted_features(crop)
    handcrafted_features(random_crop(1))
    np.testing.assert_array_equal(handcrafted_features(crop.copy()), first)


def test_a_crops_vector_does_not_depend_on_its_batch():
    """embed_crops row i == handcrafted_features(crop i), whatever the batch, order, threads."""
    crops = [draw_cell(seed=s, lobes=1 + s % 3)[0] for s in range(4)] + [random_crop(9)]
    alone = np.stack([handcrafted_features(c) for c in crops])
    bb = HandcraftedBackbone()
    np.testing.assert_array_equal(bb.embed_crops(crops), alone)
    order = [4, 2, 0, 3, 1]
    np.testing.assert_array_equal(bb.embed_crops([crops[i] for i in order]), alone[order])
    np.testing.assert_array_equal(bb.embed_crops(crops, n_threads=3), alone)
    np.testing.assert_array_equal(bb.embed_crops(crops[:1]), alone[:1])
    assert bb.embed_crops([]).shape == (0, DIM)


def test_forward_stacks_prepared_vectors():
    """prepare() is the feature function, forward() the identity on a (B, dim) batch."""
    bb = HandcraftedBackbone()
    batch = np.stack([bb.prepare(draw_cell(seed=s)[0]) for s in range(2)])
    out = bb.forward(batch)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, batch)
    with pytest.raises(ValueError, match=rf"\(B, {DIM}\)"):
        bb.forward(batch[:, :-1])


ODD = {
    "grey": np.clip(
        np.random.default_rng(0).normal(128, 10, (90, 90, 1)).repeat(3, -1), 0, 255
    ).astype(np.uint8),
    "tiny 20x20": draw_cell(size=200)[0][::10, ::10],
    "one pixel": np.full((1, 1, 3), 90, np.uint8),
    "blank white": np.full((64, 64, 3), 255, np.uint8),
    "all black": np.zeros((64, 64, 3), np.uint8),
    "noise": random_crop(5, size=33),
    "not square": draw_cell()[0][20:180, :],
    "greyscale 2-D": np.random.default_rng(1).integers(0, 256, (50, 40), dtype=np.uint8),
    "RGBA": np.dstack([draw_cell()[0], np.full((200, 200), 255, np.uint8)]),
    "float in [0, 1]": draw_cell()[0] / 255.0,
}


@pytest.mark.parametrize("name", list(ODD))
def test_odd_crops_give_finite_vectors(name):
    """Grey, tiny, blank, black, noisy, non-square or non-uint8 crops: no crash, finite."""
    vec = handcrafted_features(ODD[name])
    assert vec.shape == (DIM,)
    assert vec.dtype == np.float32
    assert np.isfinite(vec).all()
    nucleus, cell = segment_cell(ODD[name])
    assert nucleus.shape == cell.shape == np.asarray(ODD[name]).shape[:2]
    assert nucleus.dtype == cell.dtype == bool
    assert not (nucleus & ~cell).any()


def test_blank_crop_has_no_cell():
    """A crop of bare glass has no nucleus and no cell, and a vector of zeros for them."""
    nucleus, cell = segment_cell(ODD["blank white"])
    assert not nucleus.any()
    assert not cell.any()
    vec = handcrafted_features(ODD["blank white"])
    assert vec[FEATURE_NAMES.index("nucleus_cell_area_ratio")] == 0
    assert vec[FEATURE_NAMES.index("nucleus_lobes")] == 0


def test_empty_crop_is_refused():
    with pytest.raises(ValueError, match="empty"):
        handcrafted_features(np.zeros((0, 10, 3), np.uint8))


# ------------------------------------------------------------------- segmentation
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segment_cell_finds_a_drawn_cell(seed):
    """On a drawn WBC with red cells around, nucleus and cell masks match the drawing
    (IoU >= 0.85) and no red cell is taken into the cell."""
    crop, nucleus, cell = draw_cell(seed)
    found_nucleus, found_cell = segment_cell(crop)
    assert iou(found_nucleus, nucleus) >= 0.85
    assert iou(found_cell, cell) >= 0.85
    rbc = (np.abs(crop.astype(int) - RBC).sum(-1) < 40) & ~cell
    assert (found_cell & rbc).sum() < 0.02 * cell.sum()


def test_off_centre_cells_are_ignored():
    """With a second WBC in a corner, only the central one is segmented."""
    crop, nucleus, _ = draw_cell(4, size=260)
    small = draw_cell(5, size=200)[0]
    crop[:70, :70] = small[65:135, 65:135]  # another nucleus in the corner
    found_nucleus, found_cell = segment_cell(crop)
    assert iou(found_nucleus, nucleus) >= 0.85
    assert not found_cell[:70, :70].any()


def test_segment_cell_on_synthetic_crops():
    """The synthetic generator's lymphocytes and monocytes: a nucleus at the centre
    inside a larger cell; the monocyte's cytoplasm is wider than the lymphocyte's."""
    from napari_hemofm.core import synthetic

    ratio = {}
    for label in ("lymphocyte", "monocyte"):
        ratios = []
        for seed in range(3):
            crop = synthetic.make_crop(seed, label, size=160)
            nucleus, cell = segment_cell(crop)
            assert nucleus[80, 80], (label, seed)
            assert cell[80, 80], (label, seed)
            assert not (nucleus & ~cell).any()
            ratios.append(nucleus.sum() / cell.sum())
        ratio[label] = np.mean(ratios)
    assert ratio["lymphocyte"] > ratio["monocyte"] + 0.2


# ------------------------------------------------------------------ what they mean
def feature(vec: np.ndarray, name: str) -> float:
    return float(vec[FEATURE_NAMES.index(name)])


def test_lobed_nucleus_reads_as_lobed():
    """A three-lobed nucleus (thin strands) has more lobes, lower solidity and a thinner
    body than a round one."""
    round_ = handcrafted_features(draw_cell(0, lobes=1)[0])
    lobed = handcrafted_features(draw_cell(0, lobes=3)[0])
    assert feature(lobed, "nucleus_lobes") > feature(round_, "nucleus_lobes")
    assert feature(lobed, "nucleus_solidity") < feature(round_, "nucleus_solidity") - 0.1
    assert feature(lobed, "nucleus_thickness") < feature(round_, "nucleus_thickness") - 0.2


def test_sizes_are_in_red_cell_units():
    """A bigger cell among the same red cells reads bigger, with a smaller N/C ratio; the
    same crop at twice the pixel size gives nearly the same shape and colour, and framed
    with more glass around it the same sizes: red-cell diameters, not pixels or crop
    fractions."""
    small = handcrafted_features(draw_cell(0, cell_r=32)[0])
    big = handcrafted_features(draw_cell(0, cell_r=42)[0])
    # red cells of radius 20: (42 - 32) / 20 = 0.5 red-cell radii apart
    assert feature(big, "cell_diameter_rbc") > feature(small, "cell_diameter_rbc") + 0.3
    assert feature(big, "nucleus_cell_area_ratio") < feature(small, "nucleus_cell_area_ratio")
    crop = draw_cell(0)[0]
    a = handcrafted_features(crop)
    double = np.asarray(Image.fromarray(crop).resize((400, 400), Image.Resampling.BILINEAR))
    framed = np.pad(crop, ((60, 60), (60, 60), (0, 0)), mode="constant")
    framed[:60] = framed[-60:] = GLASS
    framed[:, :60] = framed[:, -60:] = GLASS
    # texture is left out: resampling a drawn cell's pixel noise changes its grain
    keep = [i for i, n in enumerate(FEATURE_NAMES) if "dog" not in n and "glcm" not in n]
    spread = np.linalg.norm((small - big)[keep])
    b = handcrafted_features(double)
    assert np.linalg.norm((a - b)[keep]) < 0.5 * spread
    for other in (double, framed):
        b = handcrafted_features(other)
        for name in ("cell_diameter_rbc", "nucleus_diameter_rbc", "nucleus_cell_area_ratio"):
            assert abs(feature(a, name) - feature(b, name)) < 0.15, name


def _colour_groups() -> list[int]:
    return [
        i
        for i, n in enumerate(FEATURE_NAMES)
        if "relod" in n or "chroma" in n or "od_rbc" in n or "density" in n
    ]


def test_another_stain_strength_or_lamp_barely_moves_the_colour_features():
    """Per-channel stain strength (OD x (0.75, 1, 1.35), another stain batch) and a yellow
    lamp (intensity x (1, 0.93, 0.72)) cancel in OD relative to the glass and the
    nucleus: the colour features move less than a third of the way to another cell."""
    crop = draw_cell(0)[0]
    lobed = draw_cell(0, lobes=3)[0]
    tinted = np.clip(255 * (crop / 255.0) ** np.array([0.75, 1.0, 1.35]), 0, 255)
    yellow = np.clip(crop * np.array([1.0, 0.93, 0.72]), 0, 255)
    cols = _colour_groups()
    a = handcrafted_features(crop)
    between = np.linalg.norm((a - handcrafted_features(lobed))[cols])
    for other in (tinted, yellow):
        b = handcrafted_features(np.rint(other).astype(np.uint8))
        assert np.linalg.norm((a - b)[cols]) < between / 3


def test_fixed_pixel_thresholds_are_not_needed_for_a_pale_stain():
    """A much paler stain (all OD halved): the nucleus is still found by its own
    threshold, with nearly the same N/C ratio."""
    crop, nucleus, _ = draw_cell(1)
    pale = np.rint(255 * (crop / 255.0) ** 0.5).astype(np.uint8)
    found, _ = segment_cell(pale)
    assert iou(found, nucleus) >= 0.8
    a, b = handcrafted_features(crop), handcrafted_features(pale)
    ratio = "nucleus_cell_area_ratio"
    assert abs(feature(a, ratio) - feature(b, ratio)) < 0.1


def test_a_channel_the_nucleus_hardly_absorbs_is_no_colour_ruler():
    """A nucleus that absorbs almost no blue (Wright stains, some cameras: OD 0.02 in
    blue against 0.7 in green) is no ruler for blue: the reference is floored at a
    quarter of its strongest channel, so a few grey levels of blue cannot multiply the
    colours read relative to it."""
    from napari_hemofm.core.features import stain_reference

    od = np.zeros((20, 20, 3), np.float32)
    od[:] = (0.45, 0.70, 0.02)
    nucleus = np.ones((20, 20), bool)
    ref = stain_reference(od, nucleus, nucleus)
    np.testing.assert_allclose(ref[:2], (0.45, 0.70), rtol=1e-6)
    assert ref[2] == pytest.approx(0.25 * 0.70)
    od[..., 2] = 0.5  # a channel it does absorb is read as it is
    assert stain_reference(od, nucleus, nucleus)[2] == pytest.approx(0.5)


# ---------------------------------------------------------------------- real data
def _read_crops(folder: Path) -> tuple[list[np.ndarray], np.ndarray]:
    crops, labels = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(class_dir.glob("*.jpg")):
            with Image.open(path) as im:
                crops.append(np.asarray(im.convert("RGB")))
            labels.append(class_dir.name)
    return crops, np.asarray(labels)


@pytest.mark.data
@pytest.mark.slow
def test_knn_balanced_accuracy_on_pbc_dev(shared_data):
    """DinoBloom protocol on pbc_dev (800 crops, 8 classes): kNN k=20 on the raw
    vectors, 5-fold StratifiedKFold without shuffle, balanced accuracy >= 0.90."""
    pbc = shared_data / "pbc_dev"
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    crops, y = _read_crops(pbc)
    assert len(y) == 800
    assert len(set(y)) == 8
    X = HandcraftedBackbone().embed_crops(crops, n_threads=2)
    assert np.isfinite(X).all()
    scores = []
    for train, test in StratifiedKFold(n_splits=5).split(X, y):
        knn = KNeighborsClassifier(n_neighbors=20).fit(X[train], y[train])
        scores.append(balanced_accuracy_score(y[test], knn.predict(X[test])))
    assert np.mean(scores) >= 0.90, scores

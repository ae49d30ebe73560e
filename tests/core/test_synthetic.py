"""Property tests of the synthetic smear generator (napari_hemofm.core.synthetic)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from skimage.color import rgb2hsv

from napari_hemofm.core.synthetic import (
    DEFAULT_BATCHES,
    DEFAULT_PIXEL_SIZE_UM,
    WBC_CLASSES,
    BatchEffect,
    SyntheticSmear,
    make_crop,
    make_sample,
    make_smear,
    write_crop_folder,
    write_smears,
)

SMALL = (384, 512)


@pytest.fixture(scope="module")
def rich() -> SyntheticSmear:
    """A full-size smear with two cells of every class and its masks."""
    return make_smear(11, n_wbc=10, return_masks=True)


def _hue_deg(rgb: np.ndarray) -> np.ndarray:
    return rgb2hsv(rgb.reshape(-1, 1, 3))[:, 0, 0] * 360.0


def _circular_mean_deg(deg: np.ndarray) -> float:
    rad = np.deg2rad(deg)
    return float(np.rad2deg(np.arctan2(np.sin(rad).mean(), np.cos(rad).mean())) % 360)


def _per_cell(smear: SyntheticSmear, fn) -> pd.DataFrame:
    """Apply fn(cell_mask, nucleus_mask) to every WBC; returns label and value per row."""
    assert smear.masks is not None
    values = [
        fn(smear.masks["wbc"] == i + 1, smear.masks["nucleus"] == i + 1)
        for i in range(len(smear.cells))
    ]
    return pd.DataFrame({"label": smear.cells["label"], "value": values})


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_image_and_table():
    """The same seed and arguments give a byte-identical image and an equal table."""
    a = make_smear(3, shape=SMALL, n_wbc=4, batch_effect=DEFAULT_BATCHES["lab_c"])
    b = make_smear(3, shape=SMALL, n_wbc=4, batch_effect=DEFAULT_BATCHES["lab_c"])
    assert a.image.tobytes() == b.image.tobytes()
    pd.testing.assert_frame_equal(a.cells, b.cells)


def test_different_seed_gives_different_smear():
    """Two seeds give different images and different WBC positions."""
    a = make_smear(1, shape=SMALL, n_wbc=4)
    b = make_smear(2, shape=SMALL, n_wbc=4)
    assert not np.array_equal(a.image, b.image)
    assert not np.allclose(a.cells[["x", "y"]].to_numpy(), b.cells[["x", "y"]].to_numpy())


def test_make_crop_is_deterministic():
    """make_crop: same seed, same crop; another seed, another crop."""
    a = make_crop(5, "monocyte", size=96)
    assert np.array_equal(a, make_crop(5, "monocyte", size=96))
    assert not np.array_equal(a, make_crop(6, "monocyte", size=96))


# ----------------------------------------------------------------------------- shapes, table


def test_shapes_dtypes_and_columns():
    """Image is (H, W, 3) uint8; the table has one typed row per WBC; metadata is kept."""
    s = make_smear(0, shape=(300, 410), n_wbc=3, batch="lab_x")
    assert s.image.shape == (300, 410, 3)
    assert s.image.dtype == np.uint8
    assert list(s.cells.columns) == ["x", "y", "x0", "y0", "x1", "y1", "label", "diameter"]
    assert len(s.cells) == 3
    for col in ("x", "y", "diameter"):
        assert s.cells[col].dtype == np.float64
    for col in ("x0", "y0", "x1", "y1"):
        assert np.issubdtype(s.cells[col].dtype, np.integer)
    assert all(isinstance(v, str) for v in s.cells["label"])
    assert (s.batch, s.seed, s.pixel_size_um) == ("lab_x", 0, DEFAULT_PIXEL_SIZE_UM)
    assert s.masks is None


def test_zero_wbcs_gives_empty_table():
    """n_wbc=0 draws a field without WBCs and an empty table with the same columns."""
    s = make_smear(0, shape=(64, 64), n_wbc=0)
    assert len(s.cells) == 0
    assert list(s.cells.columns) == ["x", "y", "x0", "y0", "x1", "y1", "label", "diameter"]


def test_boxes_inside_image_and_contain_centre(rich):
    """Every box lies in the image, is non-empty and contains its cell's centre."""
    h, w = rich.image.shape[:2]
    c = rich.cells
    assert (c["x0"] >= 0).all()
    assert (c["y0"] >= 0).all()
    assert (c["x1"] <= w).all()
    assert (c["y1"] <= h).all()
    assert (c["x1"] > c["x0"]).all()
    assert (c["y1"] > c["y0"]).all()
    assert ((c["x0"] <= c["x"]) & (c["x"] < c["x1"])).all()
    assert ((c["y0"] <= c["y"]) & (c["y"] < c["y1"])).all()


def test_boxes_are_tight_around_the_cell_mask(rich):
    """Each box is the bounding box of its WBC mask: tight, and the whole cell is inside."""
    for i, row in rich.cells.iterrows():
        ys, xs = np.nonzero(rich.masks["wbc"] == i + 1)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (
            row.x0,
            row.y0,
            row.x1,
            row.y1,
        )
        side = max(row.x1 - row.x0, row.y1 - row.y0)
        assert 0.9 * row.diameter <= side <= 1.2 * row.diameter


def test_wbcs_do_not_overlap(rich):
    """WBC centres are further apart than the sum of their radii, and each mask is whole."""
    xy = rich.cells[["x", "y"]].to_numpy()
    r = rich.cells["diameter"].to_numpy() / 2
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    i, j = np.triu_indices(len(xy), 1)
    assert np.all(d[i, j] > r[i] + r[j])
    areas = np.bincount(rich.masks["wbc"].ravel(), minlength=len(xy) + 1)[1:]
    assert np.all(areas > 0.85 * np.pi * r**2)


@pytest.mark.parametrize("seed", range(5))
def test_every_class_appears(seed):
    """With n_wbc >= 5 and no weights, every class appears; counts differ by at most one."""
    labels = make_smear(seed, shape=SMALL, n_wbc=7, rbc_density=0.2).cells["label"]
    counts = labels.value_counts()
    assert set(counts.index) == set(WBC_CLASSES)
    assert counts.max() - counts.min() <= 1


def test_class_subset_and_weights():
    """classes restricts the labels; zero weight removes a class; bad weights raise."""
    s = make_smear(0, shape=SMALL, n_wbc=4, classes=("lymphocyte", "basophil"))
    assert set(s.cells["label"]) == {"lymphocyte", "basophil"}
    s = make_smear(
        0, shape=SMALL, n_wbc=5, classes=("lymphocyte", "basophil"), class_weights=(1, 0)
    )
    assert set(s.cells["label"]) == {"lymphocyte"}
    with pytest.raises(ValueError, match="2 entries"):
        make_smear(0, shape=SMALL, n_wbc=2, classes=("lymphocyte", "basophil"), class_weights=[1])
    with pytest.raises(ValueError, match="platelet"):
        make_smear(0, shape=SMALL, n_wbc=2, classes=("platelet",))


def test_too_many_wbcs_raise_with_numbers():
    """Asking for more WBCs than fit raises ValueError naming the count and the image size."""
    with pytest.raises(ValueError, match=r"n_wbc=60.*200x300"):
        make_smear(0, shape=(200, 300), n_wbc=60)


def test_bad_arguments_raise():
    """Out-of-range arguments and batch effects raise ValueError."""
    with pytest.raises(ValueError, match="scale"):
        BatchEffect(scale=0)
    with pytest.raises(ValueError, match="illumination_gradient"):
        BatchEffect(illumination_gradient=1.5)
    with pytest.raises(ValueError, match="pixel_size_um"):
        make_smear(0, shape=SMALL, pixel_size_um=-1)
    with pytest.raises(ValueError, match="neutrophils"):
        make_crop(0, "neutrophils")


# ----------------------------------------------------------------------------- batch effects


def test_identity_batch_effect_changes_nothing():
    """BatchEffect() with defaults is the identity: same image as no batch effect."""
    a = make_smear(4, shape=SMALL, n_wbc=3)
    b = make_smear(4, shape=SMALL, n_wbc=3, batch_effect=BatchEffect())
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(
        make_crop(4, "eosinophil", size=64),
        make_crop(4, "eosinophil", size=64, batch_effect=BatchEffect()),
    )


def test_layout_does_not_depend_on_stain_or_optics():
    """Stain, light, blur and noise keep the cells where they are (same seed, scale 1)."""
    a = make_smear(8, shape=SMALL, n_wbc=4)
    effect = BatchEffect(hue_shift_deg=30, saturation=0.5, brightness=0.7, blur_sigma=2, noise=5)
    b = make_smear(8, shape=SMALL, n_wbc=4, batch_effect=effect)
    pd.testing.assert_frame_equal(a.cells, b.cells)


def test_hue_shift_moves_nucleus_hue():
    """A +20 degree hue shift moves the mean hue of nucleus pixels up by 10-30 degrees."""
    base = make_smear(2, shape=SMALL, n_wbc=5, return_masks=True)
    shifted = make_smear(
        2, shape=SMALL, n_wbc=5, return_masks=True, batch_effect=BatchEffect(hue_shift_deg=20)
    )
    nuc = base.masks["nucleus"] > 0
    delta = _circular_mean_deg(_hue_deg(shifted.image[nuc])) - _circular_mean_deg(
        _hue_deg(base.image[nuc])
    )
    assert 10 < (delta + 180) % 360 - 180 < 30


def test_saturation_factor_moves_saturation():
    """saturation > 1 raises, < 1 lowers the mean HSV saturation of the stained cells."""
    kw = dict(shape=SMALL, n_wbc=5, return_masks=True)
    base = make_smear(2, **kw)
    cells = base.masks["wbc"] > 0

    def sat(s):
        return rgb2hsv(s.image)[..., 1][cells].mean()

    assert sat(make_smear(2, batch_effect=BatchEffect(saturation=1.4), **kw)) > sat(base) + 0.05
    assert sat(make_smear(2, batch_effect=BatchEffect(saturation=0.6), **kw)) < sat(base) - 0.05


def test_blur_lowers_laplacian_variance():
    """Blur lowers high-frequency energy: the variance of the Laplacian (of Gaussian, 1 px,
    so that camera noise does not dominate) falls with blur_sigma, several-fold at 2 px."""

    def sharpness(sigma):
        effect = BatchEffect(blur_sigma=sigma)
        grey = make_smear(5, shape=SMALL, n_wbc=3, batch_effect=effect).image.mean(-1)
        return ndimage.gaussian_laplace(grey, 1.0).var()

    v0, v1, v2 = sharpness(0), sharpness(1), sharpness(2)
    assert v0 > v1 > v2
    assert v2 < v0 / 3


def test_scale_enlarges_drawn_cells():
    """scale=1.15 draws 15 % larger WBCs (diameters and mask areas) at a smaller pixel size."""
    kw = dict(shape=(512, 640), n_wbc=4, return_masks=True)
    a = make_smear(6, **kw)
    b = make_smear(6, batch_effect=BatchEffect(scale=1.15), **kw)
    np.testing.assert_allclose(b.cells["diameter"] / a.cells["diameter"], 1.15)
    assert b.pixel_size_um == pytest.approx(DEFAULT_PIXEL_SIZE_UM / 1.15)
    area_a = np.count_nonzero(a.masks["wbc"])
    area_b = np.count_nonzero(b.masks["wbc"])
    assert 1.2 < area_b / area_a < 1.45  # 1.15 ** 2 = 1.32
    # RBCs are drawn bigger too: fewer of them cover the same fraction of the field.
    n_a = ndimage.label(a.masks["rbc"])[1]
    n_b = ndimage.label(b.masks["rbc"])[1]
    assert n_b < n_a


@pytest.mark.parametrize("factor", [0.7, 1.2])
def test_brightness_scales_mean_intensity(factor):
    """brightness multiplies the mean intensity (away from saturation)."""
    a = make_smear(7, shape=SMALL, n_wbc=3).image.astype(float)
    b = make_smear(7, shape=SMALL, n_wbc=3, batch_effect=BatchEffect(brightness=factor)).image
    ratio = b.astype(float).mean() / a.mean()
    if factor < 1:
        assert ratio == pytest.approx(factor, rel=0.02)
    else:
        assert 1.05 < ratio <= factor + 0.01  # bright glass clips at 255


def test_illumination_gradient_darkens_part_of_the_field():
    """An uneven illumination makes the background differ across the field; flat one does not."""

    def corner_spread(smear):
        bg = smear.masks["wbc"] + smear.masks["rbc"] + smear.masks["platelet"] == 0
        grey = smear.image.mean(-1)
        h, w = grey.shape
        means = []
        for ys in (slice(0, h // 3), slice(2 * h // 3, h)):
            for xs in (slice(0, w // 3), slice(2 * w // 3, w)):
                means.append(grey[ys, xs][bg[ys, xs]].mean())
        return max(means) - min(means)

    kw = dict(shape=SMALL, n_wbc=2, return_masks=True)
    flat = corner_spread(make_smear(9, **kw))
    uneven = corner_spread(
        make_smear(9, batch_effect=BatchEffect(illumination_gradient=0.4), **kw)
    )
    assert flat < 5
    assert uneven > 25


def test_extra_noise_raises_pixel_noise():
    """noise adds camera noise: the residual after a median filter grows."""

    def residual(img):
        g = img.astype(float).mean(-1)
        return (g - ndimage.median_filter(g, 3)).std()

    a = make_smear(10, shape=SMALL, n_wbc=2).image
    b = make_smear(10, shape=SMALL, n_wbc=2, batch_effect=BatchEffect(noise=6)).image
    assert residual(b) > 2 * residual(a)


def test_default_batches_differ():
    """DEFAULT_BATCHES has three named batches; lab_a is the identity, the others are not."""
    assert list(DEFAULT_BATCHES) == ["lab_a", "lab_b", "lab_c"]
    assert DEFAULT_BATCHES["lab_a"] == BatchEffect()
    assert len(set(DEFAULT_BATCHES.values())) == 3


# ----------------------------------------------------------------------------- morphology


def test_nuclei_are_purple(rich):
    """Nuclei of every class are clearly purple: hue 240-320 degrees, saturation > 0.35."""
    hsv = rgb2hsv(rich.image)
    for i, label in enumerate(rich.cells["label"]):
        nuc = rich.masks["nucleus"] == i + 1
        assert nuc.sum() > 50, label
        hue = _circular_mean_deg(hsv[..., 0][nuc] * 360)
        assert 240 < hue < 320, (label, hue)
        assert np.median(hsv[..., 1][nuc]) > 0.35, label


def test_rbcs_pale_pink_and_background_light(rich):
    """RBCs are pale pink (red highest, hue near red, light) and the background lighter still."""
    m = rich.masks
    rbc = rich.image[m["rbc"]].astype(float)
    bg = rich.image[(m["wbc"] == 0) & ~m["rbc"] & ~m["platelet"]].astype(float)
    r, g, b = np.median(rbc, axis=0)
    assert r > b >= g - 5
    assert r > 150
    hue = _circular_mean_deg(_hue_deg(rbc.astype(np.uint8)))
    assert hue > 320 or hue < 20
    assert np.median(bg.mean(-1)) > np.median(rbc.mean(-1)) + 20
    assert 0.3 < m["rbc"].mean() < 0.75


def test_platelets_are_small(rich):
    """Platelets are small: a typical blob has the area of a 2-3 um disc (a few touch and
    merge), tiny next to the smallest WBC."""
    lab, n = ndimage.label(rich.masks["platelet"])
    assert n >= 1
    areas = np.bincount(lab.ravel())[1:] * rich.pixel_size_um**2  # um^2
    assert np.pi * 0.9**2 < np.median(areas) < np.pi * 1.6**2
    smallest_wbc = np.pi * (rich.cells["diameter"].min() * rich.pixel_size_um / 2) ** 2
    assert np.median(areas) < 0.15 * smallest_wbc


def test_eosinophils_have_more_red_orange_pixels(rich):
    """Eosinophils hold far more saturated red-orange pixels than neutrophils."""
    hsv = rgb2hsv(rich.image)
    red_orange = ((hsv[..., 0] < 40 / 360) | (hsv[..., 0] > 340 / 360)) & (hsv[..., 1] > 0.35)
    frac = _per_cell(rich, lambda cell, nuc: red_orange[cell].mean()).groupby("label")["value"]
    assert frac.min()["eosinophil"] > 0.3
    assert frac.max()["neutrophil"] < 0.05


def test_basophils_are_darkest(rich):
    """Basophils, covered in dark granules, are the darkest cells on average."""
    grey = rich.image.astype(float).mean(-1)
    mean = _per_cell(rich, lambda cell, nuc: grey[cell].mean()).groupby("label")["value"].mean()
    assert mean.idxmin() == "basophil"


def test_lymphocyte_nucleus_fills_more_than_monocyte(rich):
    """Nucleus-to-cell area: lymphocyte > 0.5 > monocyte; lymphocytes are the smallest WBCs."""
    nc = _per_cell(rich, lambda cell, nuc: nuc.sum() / cell.sum()).groupby("label")["value"]
    assert nc.min()["lymphocyte"] > 0.5
    assert nc.max()["monocyte"] < 0.5
    assert nc.min()["lymphocyte"] > nc.max()["monocyte"]
    diam = rich.cells.groupby("label")["diameter"].mean()
    assert diam.idxmin() == "lymphocyte"
    assert diam.idxmax() == "monocyte"


def test_neutrophil_nucleus_is_lobed(rich):
    """Neutrophil and eosinophil nuclei are lobed: less convex (solidity < 0.9) than the
    round lymphocyte nuclei (solidity > 0.93)."""
    from skimage.morphology import convex_hull_image

    solidity = _per_cell(
        rich, lambda cell, nuc: nuc.sum() / max(convex_hull_image(nuc).sum(), 1)
    ).groupby("label")["value"]
    assert solidity.max()["neutrophil"] < 0.9
    assert solidity.max()["eosinophil"] < 0.9
    assert solidity.min()["lymphocyte"] > 0.93


@pytest.mark.parametrize("label", WBC_CLASSES)
def test_crop_is_centred_cell(label):
    """A crop has the requested size and a purple-stained cell at its centre."""
    crop = make_crop(3, label, size=128)
    assert crop.shape == (128, 128, 3)
    assert crop.dtype == np.uint8
    centre = crop[40:88, 40:88].astype(int)
    purple = (centre[..., 2] - centre[..., 1] > 40) & (centre[..., 0] - centre[..., 1] > 15)
    assert purple.mean() > 0.05
    border = np.concatenate([crop[:8].reshape(-1, 3), crop[-8:].reshape(-1, 3)]).astype(int)
    assert ((border[:, 2] - border[:, 1] > 40) & (border[:, 0] - border[:, 1] > 15)).mean() < 0.02


# ----------------------------------------------------------------------------- sample, files


def test_make_sample_has_three_batches_and_reproducible_seeds():
    """make_sample: n_per_batch smears per default batch, each reproducible from its seed."""
    sample = make_sample(1, n_per_batch=2, shape=(256, 320), n_wbc=2)
    assert [s.batch for s in sample] == ["lab_a"] * 2 + ["lab_b"] * 2 + ["lab_c"] * 2
    assert len({s.seed for s in sample}) == 6
    again = make_smear(
        sample[3].seed, shape=(256, 320), n_wbc=2, batch_effect=sample[3].batch_effect
    )
    assert np.array_equal(again.image, sample[3].image)


def test_write_smears_layout_and_csv(tmp_path):
    """write_smears writes <batch>/<batch>_<k>.png and one ground_truth.csv of every WBC."""
    from PIL import Image

    sample = make_sample(0, n_per_batch=2, shape=(200, 260), n_wbc=2)
    paths = write_smears(sample, tmp_path / "out")
    rel = [p.relative_to(tmp_path / "out").as_posix() for p in paths]
    assert rel == [f"{b}/{b}_{k}.png" for b in DEFAULT_BATCHES for k in range(2)]
    assert np.array_equal(np.asarray(Image.open(paths[2])), sample[2].image)
    gt = pd.read_csv(tmp_path / "out" / "ground_truth.csv")
    assert list(gt.columns) == ["image", "x", "y", "x0", "y0", "x1", "y1", "label", "batch"]
    assert len(gt) == sum(len(s.cells) for s in sample)
    assert set(gt["image"]) == set(rel)
    assert (gt.loc[gt["image"] == rel[0], "batch"] == "lab_a").all()
    first = gt[gt["image"] == rel[0]].reset_index(drop=True)
    np.testing.assert_allclose(first[["x", "y"]], sample[0].cells[["x", "y"]])


def test_write_crop_folder_layout(tmp_path):
    """write_crop_folder writes <root>/<class>/<class>_<k>.png crops of the requested size."""
    from PIL import Image

    paths = write_crop_folder(tmp_path / "crops", n_per_class=2, size=64)
    assert len(paths) == 2 * len(WBC_CLASSES)
    assert sorted(p.name for p in (tmp_path / "crops").iterdir()) == sorted(WBC_CLASSES)
    for c in WBC_CLASSES:
        files = sorted(p.name for p in (tmp_path / "crops" / c).iterdir())
        assert files == [f"{c}_0.png", f"{c}_1.png"]
    img = np.asarray(Image.open(paths[0]))
    assert img.shape == (64, 64, 3)
    assert img.dtype == np.uint8
    # Crops within a folder differ.
    assert not np.array_equal(img, np.asarray(Image.open(paths[1])))


# ----------------------------------------------------------------------------- real data


@pytest.mark.data
def test_colours_close_to_real_wright_giemsa_smears(rich, shared_data):
    """Nucleus and RBC hues of the synthetic smear are within 25 degrees of the BCCD smears'."""
    from PIL import Image

    folder = shared_data / "bccd" / "JPEGImages"
    files = sorted(folder.glob("*.jpg"))[:40:4]
    assert files, f"no smears in {folder}"
    nuc_px, rbc_px = [], []
    for f in files:
        a = np.asarray(Image.open(f).convert("RGB")).astype(int)
        r, g, b = a[..., 0], a[..., 1], a[..., 2]
        nuc_px.append(a[(b - r > 25) & (b - g > 40)])
        rbc_px.append(a[(r - b > 15) & (r - g > 25)])
    real_nuc = _circular_mean_deg(_hue_deg(np.concatenate(nuc_px).astype(np.uint8)))
    real_rbc = _circular_mean_deg(_hue_deg(np.concatenate(rbc_px).astype(np.uint8)))
    syn_nuc = _circular_mean_deg(_hue_deg(rich.image[rich.masks["nucleus"] > 0]))
    syn_rbc = _circular_mean_deg(_hue_deg(rich.image[rich.masks["rbc"]]))
    for syn, real in ((syn_nuc, real_nuc), (syn_rbc, real_rbc)):
        assert abs((syn - real + 180) % 360 - 180) < 25, (syn, real)

"""Property tests of per-cell stain and size statistics (napari_hemofm.core.appearance).

Drawn discs with a known colour and radius for the properties, the synthetic generator
with a stain batch effect, and the two real datasets in ../shared/data for the
difference between labs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_hemofm.core.appearance import (
    APPEARANCE_COLUMNS,
    appearance_stats,
    crop_appearance,
    table_appearance,
)
from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.synthetic import BatchEffect, make_crop

GLASS = (245, 235, 225)
PURPLE = (110, 60, 150)  # a stained nucleus
CYTO = (205, 170, 195)


def draw_disc(
    radius: float,
    colour=PURPLE,
    *,
    size: int = 160,
    inner: float = 0.0,
    inner_colour=PURPLE,
    glass=GLASS,
    seed: int = 0,
) -> np.ndarray:
    """A disc of ``colour`` (with an optional inner disc) at the centre of a glass crop."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    d = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2)
    img = np.empty((size, size, 3), np.float64)
    img[:] = glass
    img[d <= radius] = colour
    if inner:
        img[d <= inner] = inner_colour
    img += rng.normal(0, 1.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def test_columns_are_documented_and_complete():
    """Every column of the result is in APPEARANCE_COLUMNS, in that order, with a unit."""
    frame = appearance_stats([draw_disc(30)])
    assert list(frame.columns) == list(APPEARANCE_COLUMNS)
    for name, doc in APPEARANCE_COLUMNS.items():
        assert ":" in doc, name  # "unit: meaning"


@pytest.mark.parametrize("radius", [20, 40])
def test_area_matches_the_drawn_disc(radius):
    """A drawn disc's equivalent diameter is 2 r within one segmentation pixel per side.

    Segmentation runs at 128 px: one of its pixels is 160 / 128 = 1.25 crop pixels here.
    """
    row = crop_appearance(draw_disc(radius))
    assert row["segmented"]
    assert row["cell_diameter_px"] == pytest.approx(2 * radius, abs=2 * 1.25)
    assert row["cell_area_px"] == pytest.approx(np.pi * row["cell_diameter_px"] ** 2 / 4)


def test_area_scales_with_radius_squared_and_pixel_size():
    """Doubling the radius quadruples the area; um^2 = px * pixel_size^2."""
    small = crop_appearance(draw_disc(18), pixel_size_um=0.5)
    large = crop_appearance(draw_disc(36), pixel_size_um=0.5)
    assert large["cell_area_px"] / small["cell_area_px"] == pytest.approx(4.0, rel=0.1)
    assert small["cell_area_um2"] == pytest.approx(small["cell_area_px"] * 0.25)
    assert small["cell_diameter_um"] == pytest.approx(small["cell_diameter_px"] * 0.5)
    assert np.isnan(crop_appearance(draw_disc(18))["cell_area_um2"])


def test_resized_crop_reports_source_pixels():
    """A crop shrunk 2x with area_scale=4 reports the same area as the full crop."""
    from PIL import Image

    full = draw_disc(40, size=192)
    half = np.asarray(Image.fromarray(full).resize((96, 96), Image.Resampling.BILINEAR))
    a = crop_appearance(full)["cell_area_px"]
    b = crop_appearance(half, area_scale=4.0)["cell_area_px"]
    assert b == pytest.approx(a, rel=0.08)


def test_hue_follows_the_colour():
    """Purple, magenta-pink and blue discs give hues near their drawn HSV hue."""
    import colorsys

    for colour in [(110, 60, 150), (190, 90, 150), (80, 90, 170)]:
        h = colorsys.rgb_to_hsv(*(c / 255 for c in colour))[0] * 360
        expected = h - 360 if h > 180 else h
        got = crop_appearance(draw_disc(30, colour))["cell_hue_deg"]
        assert got == pytest.approx(expected, abs=3.0), colour


def test_darker_stain_has_higher_od_and_saturation_follows():
    """A darker disc has a higher OD; a more saturated one a higher saturation."""
    pale = crop_appearance(draw_disc(30, (170, 130, 200)))
    dark = crop_appearance(draw_disc(30, (90, 40, 130)))
    assert dark["cell_od"] > pale["cell_od"] + 0.3
    assert dark["nucleus_od"] > pale["nucleus_od"]
    # OD of one channel: -log10((I + 1) / 256) of its level
    assert dark["cell_od_r"] == pytest.approx(-np.log10(91 / 256), abs=0.02)
    grey = crop_appearance(draw_disc(30, (140, 140, 140)))
    assert grey["cell_saturation"] < 0.05 < dark["cell_saturation"]
    assert np.isnan(grey["cell_hue_deg"])  # a grey has no hue


def test_nucleus_and_cytoplasm_are_told_apart():
    """A purple nucleus in a pale pink cytoplasm: nucleus fraction ~ (r_n / r_c)^2, darker."""
    row = crop_appearance(draw_disc(40, CYTO, inner=26, inner_colour=PURPLE))
    assert row["nucleus_fraction"] == pytest.approx((26 / 40) ** 2, abs=0.1)
    assert row["nucleus_od"] > row["cytoplasm_od"] + 0.3


def test_background_is_the_glass_colour():
    """The background columns give the drawn glass colour."""
    row = crop_appearance(draw_disc(30, glass=(230, 220, 180)))
    got = (row["background_r"], row["background_g"], row["background_b"])
    assert np.allclose(got, (230, 220, 180), atol=2)


def test_odd_inputs():
    """Grey, RGBA, float and tiny crops are handled; a blank crop is 'not segmented'."""
    rgb = draw_disc(30)
    grey = rgb.mean(axis=2).astype(np.uint8)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    as_float = rgb.astype(np.float32) / 255.0
    frame = appearance_stats([grey, rgba, as_float, draw_disc(3, size=8)])
    assert frame["segmented"].all()
    ref = crop_appearance(rgb)
    assert frame.loc[1, "cell_area_px"] == pytest.approx(ref["cell_area_px"])
    assert frame.loc[2, "cell_od"] == pytest.approx(ref["cell_od"], abs=0.01)
    blank = crop_appearance(np.full((64, 64, 3), 240, np.uint8))
    assert not blank["segmented"]
    assert np.isnan(blank["cell_area_px"])
    assert np.isnan(blank["cell_od"])
    with pytest.raises(ValueError, match="empty image"):
        crop_appearance(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="2 area scales for 1 crops"):
        appearance_stats([rgb], area_scale=[1.0, 2.0])


def test_order_independence_and_mapping_index():
    """Permuting the crops permutes the rows; a mapping's keys index the frame."""
    crops = {f"c{i}": draw_disc(15 + 6 * i, seed=i) for i in range(4)}
    frame = appearance_stats(crops)
    assert list(frame.index) == ["c0", "c1", "c2", "c3"]
    reverse = appearance_stats(dict(reversed(list(crops.items()))))
    pd.testing.assert_frame_equal(frame, reverse.loc[frame.index])
    assert frame["cell_area_px"].is_monotonic_increasing


def test_synthetic_stain_shift_moves_hue_and_saturation():
    """make_crop with a hue shift / stronger stain moves mean hue and saturation that way."""
    base = BatchEffect()
    shifted = BatchEffect(hue_shift_deg=25.0, saturation=1.5)
    seeds = range(6)
    a = appearance_stats([make_crop(s, "lymphocyte", batch_effect=base) for s in seeds])
    b = appearance_stats([make_crop(s, "lymphocyte", batch_effect=shifted) for s in seeds])
    assert a["segmented"].all()
    assert b["segmented"].all()
    # positive hue shift turns purple towards magenta: the hue angle rises
    assert (b["nucleus_hue_deg"] - a["nucleus_hue_deg"]).median() > 5
    assert (b["cell_saturation"] > a["cell_saturation"]).all()


def test_stain_normalisation_brings_two_labs_stats_together():
    """After Reinhard normalisation to one reference, a stain-shifted lab's nucleus hue and
    cell saturation close at least a quarter of their gap to the reference lab;
    ``normalise=None`` changes nothing."""
    from napari_hemofm.core.stain import StainNorm, build_normaliser

    seeds = range(4)
    ref = [make_crop(s, "lymphocyte") for s in seeds]
    other = [
        make_crop(s, "lymphocyte", batch_effect=BatchEffect(hue_shift_deg=25.0, saturation=1.5))
        for s in seeds
    ]
    normalise = build_normaliser(StainNorm("reinhard", "lab_a"), reference_images=ref)
    a = appearance_stats(ref)
    before = appearance_stats(other)
    after = appearance_stats(other, normalise=normalise)
    for col in ("nucleus_hue_deg", "cell_saturation"):
        gap_before = abs(before[col].median() - a[col].median())
        gap_after = abs(after[col].median() - a[col].median())
        assert gap_after < 0.75 * gap_before, col
    pd.testing.assert_frame_equal(appearance_stats(other, normalise=None), before)
    crops = {f"img{i}": other[i] for i in range(2)}
    table, images = _table(crops, dict.fromkeys(crops, other[0].shape[0]))
    normed = table_appearance(table, images=images, normalise=normalise)
    assert normed["cell_saturation"].to_numpy() == pytest.approx(
        after["cell_saturation"].to_numpy()[:2]
    )


def _table(crops: dict[str, np.ndarray], boxes: dict[str, int]) -> tuple[CellTable, dict]:
    frame = pd.DataFrame(
        {
            "source": list(crops),
            "batch": ["lab_a", "lab_b"] * (len(crops) // 2),
            "x": 0.0,
            "y": 0.0,
            "x0": 0,
            "y0": 0,
            "x1": [boxes[k] for k in crops],
            "y1": [boxes[k] for k in crops],
        },
        index=[f"cell{i}" for i in range(len(crops))],
    )
    table = CellTable()
    table.add_cells(frame)
    return table, {s: crops[s] for s in crops}


def test_table_appearance_from_images_and_from_a_reader():
    """Native crops from in-memory images and resized crops from a reader agree on area;
    rows select and order the cells; batch comes along; unreadable cells get NaN."""
    from PIL import Image

    crops = {f"img{i}": draw_disc(20 + 5 * i, size=160, seed=i) for i in range(4)}
    table, images = _table(crops, dict.fromkeys(crops, 160))
    table.update_meta(pixel_size_um=0.25)
    calls = []
    full = table_appearance(table, images=images, progress=lambda d, t: calls.append((d, t)))
    assert list(full.index) == list(table.cell_ids)
    assert calls[-1] == (4, 4)
    assert list(full["batch"].astype(str)) == ["lab_a", "lab_b", "lab_a", "lab_b"]
    assert full["cell_area_um2"].to_numpy() == pytest.approx(full["cell_area_px"] * 0.0625)

    def reader(ids):
        out = {}
        for cell_id in ids:
            if cell_id == "cell3":
                continue  # unreadable
            src = table.obs.loc[cell_id, "source"]
            out[cell_id] = np.asarray(Image.fromarray(images[src]).resize((80, 80)))
        return out

    part = table_appearance(table, reader, rows=[2, 0, 3])
    assert list(part.index) == ["cell2", "cell0", "cell3"]
    assert part.loc[["cell2", "cell0"], "cell_area_px"].to_numpy() == pytest.approx(
        full.loc[["cell2", "cell0"], "cell_area_px"].to_numpy(), rel=0.08
    )
    assert not part.loc["cell3", "segmented"]
    assert np.isnan(part.loc["cell3", "cell_od"])


def test_table_appearance_cancel_returns_what_was_measured():
    """cancel() stops between chunks: only the first chunk is measured."""
    crops = {f"img{i}": draw_disc(20, seed=i) for i in range(4)}
    table, images = _table(crops, dict.fromkeys(crops, 160))
    seen = []
    out = table_appearance(
        table, images=images, chunk=2, cancel=lambda: len(seen) > 0,
        progress=lambda d, t: seen.append(d),
    )  # fmt: skip
    assert len(out) == 2


def test_real_labs_differ_in_stain(shared_data):
    """PBC (CellaVision) neutrophils are stained darker than BCCD's (higher nucleus OD)."""
    from napari_hemofm.core.io import read_image

    def stats(folder: Path) -> pd.DataFrame:
        files = sorted(folder.glob("*.jp*g"))[:12]
        return appearance_stats([read_image(f) for f in files])

    pbc = stats(shared_data / "pbc_dev" / "neutrophil")
    bccd = stats(shared_data / "bccd_crops" / "neutrophil")
    assert pbc["segmented"].mean() > 0.9
    assert bccd["segmented"].mean() > 0.9
    assert pbc["nucleus_od"].median() > bccd["nucleus_od"].median() + 0.2

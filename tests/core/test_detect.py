"""Tests of WBC detection and cell boxes (napari_hemofm.core.detect)."""

from __future__ import annotations

import time
import tracemalloc
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from skimage.measure import regionprops

from napari_hemofm.core.detect import (
    CROP_FACTOR,
    CROP_FIELD_UM,
    DEFAULT_DIAMETER_PX,
    DETECTION_COLUMNS,
    MIN_CROP_PX,
    WBC_DIAMETER_UM,
    box_around,
    cells_from_labels,
    cells_from_points,
    crop_cell,
    crop_side,
    detect_wbcs,
    estimate_rbc_diameter,
    match_detections,
)

# Colours of a toy Wright-Giemsa field (RGB 0-255): glass, RBC, nucleus.
GLASS = (222, 214, 212)
RBC = (190, 150, 152)
NUCLEUS = (110, 80, 180)


def toy_smear(
    rng: np.random.Generator,
    shape: tuple[int, int],
    rbc_d: float,
    nuclei: list[tuple[float, float, float]],
    n_rbc: int = 60,
) -> np.ndarray:
    """Grey glass, non-overlapping pink RBC discs of diameter rbc_d, violet discs (y, x, r)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.float32)
    img[:] = GLASS
    busy = np.zeros((h, w), bool)
    for y, x, r in nuclei:
        busy |= (yy - y) ** 2 + (xx - x) ** 2 <= (r + rbc_d) ** 2
    placed = 0
    for _ in range(20 * n_rbc):
        if placed == n_rbc:
            break
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        disc = (yy - y) ** 2 + (xx - x) ** 2 <= (rbc_d / 2) ** 2
        if (disc & busy).any():
            continue
        busy |= (yy - y) ** 2 + (xx - x) ** 2 <= (rbc_d / 2 + 2) ** 2
        img[disc] = RBC
        placed += 1
    for y, x, r in nuclei:
        img[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = NUCLEUS
    img = ndimage.gaussian_filter(img, (1, 1, 0)) + rng.normal(0, 1.5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def voc_wbc_boxes(xml_path: Path) -> np.ndarray:
    """WBC boxes (x0, y0, x1, y1) of a Pascal VOC file, inclusive bounds: (m, 4)."""
    out = []
    for obj in ET.parse(xml_path).getroot().iter("object"):
        if obj.findtext("name", "").strip() == "WBC":
            bb = obj.find("bndbox")
            out.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
    return np.asarray(out, dtype=float).reshape(-1, 4)


class Progress:
    """Records the ``progress(done, total)`` calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))


def assert_table(df: pd.DataFrame) -> None:
    """The cell-table contract: columns, dtypes, square boxes, index 0..n-1."""
    assert list(df.columns) == DETECTION_COLUMNS
    assert (df.index == np.arange(len(df))).all()
    for c in ("x0", "y0", "x1", "y1"):
        assert pd.api.types.is_integer_dtype(df[c]), c
    for c in ("x", "y", "score", "diameter"):
        assert pd.api.types.is_float_dtype(df[c]), c
    assert ((df.x1 - df.x0) == (df.y1 - df.y0)).all()
    assert ((df.x1 - df.x0) >= MIN_CROP_PX).all()
    assert df.score.between(0, 1).all()


# ---- crop_side, box_around, crop_cell ---------------------------------------------------------


def test_crop_side_rules():
    """Crop side is round(1.5 x diameter), never below 32 px; a pixel size fixes 24 um."""
    assert crop_side(100.0) == round(CROP_FACTOR * 100)
    assert crop_side(101.3) == 152
    assert crop_side(5.0) == MIN_CROP_PX
    assert crop_side(100.0, pixel_size_um=0.1) == round(CROP_FIELD_UM / 0.1) == 240
    # The pixel size wins over the diameter, so crops match across scanners.
    assert crop_side(10.0, pixel_size_um=0.2) == crop_side(500.0, pixel_size_um=0.2) == 120
    assert crop_side(1.0, pixel_size_um=10.0) == MIN_CROP_PX
    with pytest.raises(ValueError, match="pixel_size_um"):
        crop_side(50.0, pixel_size_um=0.0)
    with pytest.raises(ValueError, match="diameter_px"):
        crop_side(float("nan"))


def test_box_around_is_square_and_centred():
    """box_around gives a side x side box whose centre is within half a pixel of the point."""
    rng = np.random.default_rng(0)
    xs, ys, sides = (
        rng.uniform(-50, 500, 200),
        rng.uniform(-50, 500, 200),
        rng.integers(1, 300, 200),
    )
    for x, y, side in zip(xs, ys, sides, strict=True):
        x0, y0, x1, y1 = box_around(x, y, int(side))
        assert x1 - x0 == y1 - y0 == side
        assert abs((x0 + x1 - 1) / 2 - x) <= 0.5 + 1e-9
        assert abs((y0 + y1 - 1) / 2 - y) <= 0.5 + 1e-9
        assert all(isinstance(v, int) for v in (x0, y0, x1, y1))
    with pytest.raises(ValueError, match="side"):
        box_around(1.0, 1.0, 0)


def test_crop_cell_inside_equals_slice():
    """A box inside the image is cut exactly, for colour and grey images."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    np.testing.assert_array_equal(crop_cell(img, (10, 5, 30, 25)), img[5:25, 10:30])
    grey = img[..., 0]
    np.testing.assert_array_equal(crop_cell(grey, (0, 0, 80, 60)), grey)


def test_crop_cell_pads_by_edge_replication():
    """Parts of the box beyond the image repeat the edge pixels; shape is always the box's."""
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    ref = np.pad(img, ((30, 30), (30, 30), (0, 0)), mode="edge")
    for box in [(-10, -5, 20, 25), (35, 30, 65, 60), (-30, -30, 80, 70), (45, -20, 55, -10)]:
        x0, y0, x1, y1 = box
        crop = crop_cell(img, box)
        assert crop.shape == (y1 - y0, x1 - x0, 3)
        assert crop.dtype == img.dtype
        np.testing.assert_array_equal(crop, ref[y0 + 30 : y1 + 30, x0 + 30 : x1 + 30])
    with pytest.raises(ValueError, match="empty box"):
        crop_cell(img, (5, 5, 5, 10))


def test_crop_cell_reads_a_memmap(tmp_path):
    """crop_cell works on a memory map and matches the in-memory crop."""
    img = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mm = np.lib.format.open_memmap(tmp_path / "img.npy", "w+", np.uint8, img.shape)
    mm[:] = img
    mm.flush()
    mm = np.load(tmp_path / "img.npy", mmap_mode="r")
    np.testing.assert_array_equal(
        crop_cell(mm, (50, 50, 90, 90)), crop_cell(img, (50, 50, 90, 90))
    )


# ---- cells_from_labels / cells_from_points ----------------------------------------------------


def test_cells_from_labels_centres_order_and_boxes():
    """One row per label in increasing label order; centre = centroid; box centred on it."""
    rng = np.random.default_rng(4)
    labels = np.zeros((200, 300), np.int32)
    yy, xx = np.mgrid[0:200, 0:300]
    values = [7, 2, 30, 5]  # drawn out of order, not consecutive
    for v in values:
        cy, cx, r = rng.uniform(30, 170), rng.uniform(30, 270), rng.uniform(8, 20)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = v
    df = cells_from_labels(labels)
    assert_table(df)
    props = sorted(regionprops(labels), key=lambda p: p.label)
    assert len(df) == len(props)
    for row, p in zip(df.itertuples(), props, strict=True):
        assert row.y == pytest.approx(p.centroid[0])
        assert row.x == pytest.approx(p.centroid[1])
        assert row.diameter >= p.equivalent_diameter_area - 1e-9
        side = crop_side(row.diameter)
        assert (row.x1 - row.x0, row.y1 - row.y0) == (side, side)
        assert (row.x0, row.y0, row.x1, row.y1) == box_around(row.x, row.y, side)
    assert (df.score == 1.0).all()


def test_cells_from_labels_pixel_size_and_empty():
    """A pixel size sets a 24 um crop; an all-zero label image gives an empty table."""
    labels = np.zeros((50, 60), np.uint16)
    labels[10:20, 10:25] = 3
    df = cells_from_labels(labels, pixel_size_um=0.25)
    assert df.x1.iloc[0] - df.x0.iloc[0] == round(CROP_FIELD_UM / 0.25)
    empty = cells_from_labels(np.zeros((50, 60), np.int32))
    assert_table(empty)
    assert len(empty) == 0
    with pytest.raises(ValueError, match="2-D"):
        cells_from_labels(np.zeros((5, 5, 3), np.int32))
    with pytest.raises(ValueError, match="integer"):
        cells_from_labels(np.zeros((5, 5), np.float32))


def test_cells_from_points_keeps_order_and_swaps_axes():
    """Points in napari (y, x) order give x = column, y = row, in the points' order."""
    pts = np.array([[10.0, 200.5], [150.0, 3.0], [75.25, 75.75]])
    df = cells_from_points(pts)
    assert_table(df)
    np.testing.assert_allclose(df[["y", "x"]].to_numpy(), pts)
    assert (df.diameter == DEFAULT_DIAMETER_PX).all()
    assert (df.x1 - df.x0 == crop_side(DEFAULT_DIAMETER_PX)).all()
    # napari 3-D points (plane, y, x): the last two coordinates are used.
    df3 = cells_from_points(np.c_[np.zeros(3), pts])
    pd.testing.assert_frame_equal(df3, df)


def test_cells_from_points_diameter_rules():
    """Diameter: explicit value, else 12 um at the pixel size, else the default in px."""
    pts = np.array([[50.0, 60.0]])
    assert cells_from_points(pts, diameter_px=40.0).diameter.iloc[0] == 40.0
    df = cells_from_points(pts, pixel_size_um=0.2)
    assert df.diameter.iloc[0] == pytest.approx(WBC_DIAMETER_UM / 0.2)
    assert df.x1.iloc[0] - df.x0.iloc[0] == round(CROP_FIELD_UM / 0.2)
    assert len(cells_from_points(np.empty((0, 2)))) == 0
    with pytest.raises(ValueError, match="diameter_px"):
        cells_from_points(pts, diameter_px=-1.0)
    with pytest.raises(ValueError, match="shape"):
        cells_from_points(np.array([1.0, 2.0, 3.0]))


# ---- matching helper ---------------------------------------------------------------------------


def test_match_detections_is_one_to_one():
    """Two centres in one box match once; one centre in two boxes matches once."""
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20]], float)
    assert match_detections([[2, 2], [3, 3]], boxes[:1]) == 1
    assert match_detections([[7, 7]], boxes) == 1
    assert match_detections([[7, 7], [15, 15]], boxes) == 2
    assert match_detections([[7, 7], [2, 2]], boxes) == 2  # needs the assignment, not greed
    assert match_detections(np.empty((0, 2)), boxes) == 0
    assert match_detections([[50, 50]], boxes) == 0


# ---- detection on toy and degenerate images ----------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((300, 400, 3), np.uint8),
        np.full((300, 400, 3), 255, np.uint8),
        np.full((300, 400, 3), 128, np.uint8),
        np.full((8, 8, 3), 200, np.uint8),
        np.zeros((1, 1, 3), np.uint8),
        np.zeros((0, 0, 3), np.uint8),
        np.ones((200, 200, 4), np.float32),
    ],
    ids=["black", "white", "grey", "tiny", "one-pixel", "empty", "rgba-float"],
)
def test_detect_on_blank_images_is_empty(image):
    """Blank, tiny or empty images give an empty table with the right columns, no error."""
    df = detect_wbcs(image, progress=Progress())
    assert_table(df)
    assert len(df) == 0


def test_detect_rejects_bad_input():
    """Wrong shapes and non-positive parameters raise ValueError naming the problem."""
    with pytest.raises(ValueError, match="shape"):
        detect_wbcs(np.zeros((50, 50), np.uint8))
    with pytest.raises(ValueError, match="tile_size"):
        detect_wbcs(np.zeros((50, 50, 3), np.uint8), tile_size=0)
    with pytest.raises(ValueError, match="pixel_size_um"):
        detect_wbcs(np.zeros((50, 50, 3), np.uint8), pixel_size_um=-1.0)


def test_toy_smear_nuclei_lobes_platelets():
    """Round nuclei and a lobed nucleus are one WBC each; platelets and RBCs are not WBCs."""
    rng = np.random.default_rng(5)
    d = 36.0
    lymphocytes = [(150, 150, 0.45 * d), (420, 650, 0.5 * d)]
    # A segmented neutrophil: four lobes in an arc, 0.1 D apart.
    angles = np.deg2rad([200, 250, 300, 350])
    lobes = [(400 + 0.45 * d * np.sin(a), 200 + 0.45 * d * np.cos(a), 0.2 * d) for a in angles]
    platelets = [(100, 500, 0.15 * d), (300, 400, 0.15 * d), (520, 80, 0.2 * d)]
    img = toy_smear(rng, (600, 800), d, lymphocytes + lobes + platelets)
    df = detect_wbcs(img)
    assert_table(df)
    expected = np.array([[150, 150], [420, 650], [400 + 0.2 * d, 200 + 0.1 * d]])
    assert len(df) == 3
    dist = np.hypot(*(df[["y", "x"]].to_numpy()[:, None] - expected[None]).transpose(2, 0, 1))
    assert (dist.min(axis=0) < 0.5 * d).all()


def test_touching_clump_is_split():
    """A clump of nine touching round nuclei, too large for one cell, is split into nine."""
    rng = np.random.default_rng(6)
    d = 36.0
    clump = [(200 + i * 0.95 * d, 300 + j * 0.95 * d, 0.5 * d) for i in range(3) for j in range(3)]
    img = toy_smear(rng, (500, 700), d, clump)
    df = detect_wbcs(img, pixel_size_um=7.5 / d)
    centres = np.array([(y, x) for y, x, _ in clump])
    assert len(df) == 9
    dist = np.hypot(*(df[["y", "x"]].to_numpy()[:, None] - centres[None]).transpose(2, 0, 1))
    assert (dist.min(axis=0) < 0.25 * d).all()


def test_detect_is_deterministic_and_sorted():
    """Same image, same table; rows sorted by y then x."""
    rng = np.random.default_rng(7)
    d = 30.0
    nuclei = [(float(y), float(x), 0.5 * d) for y, x in rng.uniform(60, 440, (6, 2))]
    img = toy_smear(rng, (500, 500), d, nuclei)
    a, b = detect_wbcs(img), detect_wbcs(img.copy())
    pd.testing.assert_frame_equal(a, b)
    assert a.equals(a.sort_values(["y", "x"]).reset_index(drop=True))


# ---- synthetic smears --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic():
    import napari_hemofm.core.synthetic as synthetic

    return synthetic


def test_detect_on_synthetic_smears(synthetic):
    """On seeded synthetic smears of every default batch, recall and precision are >= 0.9."""
    n_boxes = n_dets = n_matched = 0
    for seed, (name, effect) in enumerate(synthetic.DEFAULT_BATCHES.items()):
        for k in range(2):
            smear = synthetic.make_smear(100 + 10 * seed + k, batch_effect=effect, batch=name)
            df = detect_wbcs(smear.image)
            assert_table(df)
            boxes = smear.cells[["x0", "y0", "x1", "y1"]].to_numpy(float)
            n_boxes += len(boxes)
            n_dets += len(df)
            n_matched += match_detections(df[["x", "y"]].to_numpy(), boxes)
    assert n_matched / n_boxes >= 0.9
    assert n_matched / n_dets >= 0.9


def test_rbc_diameter_estimate_on_synthetic(synthetic):
    """The RBC diameter measured in the image is within 10 % of the drawn one at any zoom."""
    for scale in (0.7, 1.0, 1.6):
        smear = synthetic.make_smear(3, batch_effect=synthetic.BatchEffect(scale=scale))
        true = 7.5 / smear.pixel_size_um
        assert estimate_rbc_diameter(smear.image) == pytest.approx(true, rel=0.1)


def test_pixel_size_gives_same_cells_and_physical_crops(synthetic):
    """With the true pixel size, detection finds the same cells; crops are 24 um wide."""
    smear = synthetic.make_smear(21)
    auto = detect_wbcs(smear.image)
    fixed = detect_wbcs(smear.image, pixel_size_um=smear.pixel_size_um)
    boxes = smear.cells[["x0", "y0", "x1", "y1"]].to_numpy(float)
    assert match_detections(fixed[["x", "y"]].to_numpy(), boxes) == len(boxes) == len(fixed)
    assert len(auto) == len(fixed)
    assert (fixed.x1 - fixed.x0 == round(CROP_FIELD_UM / smear.pixel_size_um)).all()


def test_tiled_detection_matches_untiled(synthetic):
    """Tiles of any size find the same cells as one pass: none lost or doubled at seams."""
    smear = synthetic.make_smear(8, shape=(1100, 1500), n_wbc=14)
    whole = detect_wbcs(smear.image, tile_size=4096)
    assert len(whole) >= 13
    for tile_size in (256, 500, 777):
        progress = Progress()
        tiled = detect_wbcs(smear.image, tile_size=tile_size, progress=progress)
        pd.testing.assert_frame_equal(tiled, whole)
        n = len(progress.calls)
        assert n > 1
        assert progress.calls == [(i + 1, n) for i in range(n)]


@pytest.mark.slow
def test_memmap_mosaic_bounded_memory(synthetic, tmp_path):
    """A memory-mapped mosaic of one smear is read tile by tile: every copy's cells are found
    once, and the peak memory stays far below the image size."""
    smear = synthetic.make_smear(9, n_wbc=6)
    h, w = smear.image.shape[:2]
    rows, cols = 6, 5
    path = tmp_path / "mosaic.npy"
    mm = np.lib.format.open_memmap(path, "w+", np.uint8, (rows * h, cols * w, 3))
    for i in range(rows):
        for j in range(cols):
            mm[i * h : (i + 1) * h, j * w : (j + 1) * w] = smear.image
    mm.flush()
    del mm
    mosaic = np.load(path, mmap_mode="r")
    one = detect_wbcs(smear.image)
    tracemalloc.start()
    t0 = time.perf_counter()
    df = detect_wbcs(mosaic, tile_size=512)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.25 * mosaic.nbytes, (peak, mosaic.nbytes)
    assert len(df) == rows * cols * len(one)
    xy = one[["x", "y"]].to_numpy()
    expected = np.concatenate(
        [xy + np.array([j * w, i * h]) for i in range(rows) for j in range(cols)]
    )
    dist = np.hypot(*(df[["x", "y"]].to_numpy()[:, None] - expected[None]).transpose(2, 0, 1))
    assert dist.min(axis=1).max() < 2.0
    assert seconds < 60


# ---- real data: BCCD ---------------------------------------------------------------------------


@pytest.mark.data
def test_bccd_recall_precision(shared_data):
    """On all 292 BCCD smears, pooled recall >= 0.95 and precision >= 0.90 against the WBC boxes
    (a detection matches a box holding its centre, one to one)."""
    bccd = shared_data / "bccd"
    from PIL import Image

    jpgs = sorted((bccd / "JPEGImages").glob("*.jpg"))
    assert len(jpgs) == 292
    n_boxes = n_dets = n_matched = 0
    for jpg in jpgs:
        image = np.asarray(Image.open(jpg).convert("RGB"))
        boxes = voc_wbc_boxes(bccd / "Annotations" / f"{jpg.stem}.xml")
        df = detect_wbcs(image)
        n_boxes += len(boxes)
        n_dets += len(df)
        n_matched += match_detections(df[["x", "y"]].to_numpy(), boxes)
    recall, precision = n_matched / n_boxes, n_matched / n_dets
    assert n_boxes == 301
    assert recall >= 0.95, (recall, precision)
    assert precision >= 0.90, (recall, precision)

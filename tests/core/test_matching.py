"""Box matching and id carrying (core/matching.py), without images or a model."""

import numpy as np
import pandas as pd

from napari_hemofm.core.matching import MIN_IOU, box_iou, carry_ids, match_boxes


def test_box_iou_of_known_boxes():
    """Same box 1, half-overlapping 1/3, disjoint 0, an empty box 0 (no division by 0)."""
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    np.testing.assert_allclose(iou[0], [1.0, 1 / 3, 0.0])
    np.testing.assert_array_equal(iou[1], [0.0, 0.0, 0.0])


def test_match_boxes_recovers_a_shuffled_jittered_set():
    """Shuffled boxes moved by a few pixels are paired with their originals; a box that
    overlaps nothing above the floor stays unmatched."""
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, (20, 2)) + np.arange(20)[:, None] * 120
    old = np.column_stack([xy, xy + 60]).astype(int)
    perm = rng.permutation(20)
    new = old[perm] + rng.integers(-5, 6, (20, 4))
    new = np.vstack([new, [[5000, 5000, 5060, 5060]]])
    pairs = match_boxes(old, new)
    assert len(pairs) == 20
    assert all(perm[j] == i for i, j in pairs)


def _cells(ids, boxes, source="s.png", labels=None, origins=None):
    n = len(ids)
    boxes = np.asarray(boxes)
    return pd.DataFrame(
        {
            "source": [source] * n,
            "x0": boxes[:, 0],
            "y0": boxes[:, 1],
            "x1": boxes[:, 2],
            "y1": boxes[:, 3],
            "label": labels if labels is not None else [None] * n,
            "label_origin": origins if origins is not None else [None] * n,
            "kind": ["smear"] * n,
        },
        index=pd.Index(ids, name="cell_id"),
    )


def test_carry_ids_keeps_matched_ids_and_curated_labels():
    """Re-detected: the moved cell keeps its id and curated label, a new cell gets a number
    above every old one, and a curated cell found nowhere is kept (not dropped)."""
    obs = _cells(
        ["lab/s.png#0", "lab/s.png#1", "lab/s.png#4"],
        [[0, 0, 40, 40], [100, 100, 140, 140], [300, 300, 340, 340]],
        labels=["monocyte", None, "basophil"],
        origins=["user", None, "user"],
    )
    found = _cells(
        ["lab/s.png#0", "lab/s.png#1"],  # provisional ids
        [[200, 200, 240, 240], [2, 1, 42, 41]],  # a new cell, then cell 0 moved 2 px
    )
    cells, drop, kept = carry_ids(obs, found, ["s.png"])
    assert cells.index.tolist() == ["lab/s.png#5", "lab/s.png#0"]
    assert cells.loc["lab/s.png#0", "label"] == "monocyte"
    assert cells.loc["lab/s.png#0", "label_origin"] == "user"
    assert pd.isna(cells.loc["lab/s.png#5", "label"])
    assert drop.tolist() == [True, True, False]  # the curated unmatched cell stays
    assert kept.tolist() == [False, False, True]
    assert MIN_IOU > box_iou([[0, 0, 40, 40]], [[100, 100, 140, 140]])[0, 0]


def test_carry_ids_of_a_new_image_keeps_provisional_ids():
    """An image not in the table: its cells keep the ids the job gave them."""
    obs = _cells(["lab/a.png#0"], [[0, 0, 10, 10]], source="a.png")
    found = _cells(["lab/b.png#0", "lab/b.png#1"], [[0, 0, 10, 10], [20, 20, 30, 30]], "b.png")
    cells, drop, kept = carry_ids(obs, found, [])
    assert cells.index.tolist() == ["lab/b.png#0", "lab/b.png#1"]
    assert not drop.any()
    assert not kept.any()

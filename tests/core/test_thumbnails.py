"""Thumbnails: cut on demand from their source, bounded cache, never blocking peek."""

import numpy as np
import pandas as pd
from PIL import Image

from napari_hemofm.core.thumbnails import ThumbnailCache


def smear_and_cells(tmp_path, n=30):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    path = tmp_path / "s.png"
    Image.fromarray(img).save(path)
    x0 = rng.integers(-10, 260, n)
    y0 = rng.integers(-10, 160, n)
    frame = pd.DataFrame(
        {"source": str(path), "x0": x0, "y0": y0, "x1": x0 + 40, "y1": y0 + 40},
        index=[f"b/s.png#{k}" for k in range(n)],
    )
    return img, frame


def test_thumbnail_is_the_resized_crop_of_its_box(tmp_path):
    """A thumbnail equals its box's crop (edge-padded) resized to size x size."""
    from napari_hemofm.core.detect import crop_cell
    from napari_hemofm.core.thumbnails import make_thumbnail

    img, frame = smear_and_cells(tmp_path, n=3)
    cache = ThumbnailCache(frame, size=32)
    got = cache.load(frame.index)
    for cid, row in frame.iterrows():
        crop = crop_cell(img, (row.x0, row.y0, row.x1, row.y1))
        np.testing.assert_array_equal(got[cid], make_thumbnail(crop, 32))
        assert got[cid].shape == (32, 32, 3)


def test_peek_never_reads_and_load_fills_the_cache(tmp_path):
    """peek() returns None for a cell not yet loaded and the thumbnail after load()."""
    _, frame = smear_and_cells(tmp_path, n=2)
    cache = ThumbnailCache(frame, size=16)
    cid = frame.index[0]
    assert cache.peek(cid) is None
    cache.load([cid])
    assert cache.peek(cid).shape == (16, 16, 3)


def test_memory_stays_within_the_budget(tmp_path):
    """With a budget of 10 thumbnails, loading 30 keeps at most 10 (the newest)."""
    _, frame = smear_and_cells(tmp_path, n=30)
    one = 24 * 24 * 3
    cache = ThumbnailCache(frame, size=24, budget_bytes=10 * one)
    cache.load(frame.index)
    assert cache.nbytes <= 10 * one
    assert len(cache) == 10
    assert cache.peek(frame.index[-1]) is not None
    assert cache.peek(frame.index[0]) is None


def test_unreadable_source_and_unknown_ids_are_recorded_not_raised(tmp_path):
    """A broken source or an unknown id is left out and listed in `failed`."""
    _, frame = smear_and_cells(tmp_path, n=2)
    frame.loc["b/bad#0"] = [str(tmp_path / "missing.png"), 0, 0, 10, 10]
    cache = ThumbnailCache(frame, size=16)
    got = cache.load([*frame.index, "nope"])
    assert set(got) == set(frame.index[:2])
    assert "no such file" in cache.failed["b/bad#0"]
    assert cache.failed["nope"] == "unknown cell id"


def test_in_memory_images_and_cancel(tmp_path):
    """Sources named in `images` come from memory; cancel stops between cells."""
    img = np.zeros((50, 50), np.uint8)
    frame = pd.DataFrame(
        {"source": "layer", "x0": [0, 10, 20], "y0": 0, "x1": [10, 20, 30], "y1": 10},
        index=["a", "b", "c"],
    )
    cache = ThumbnailCache(frame, images={"layer": img}, size=8)
    calls = iter([False, True])
    got = cache.load(frame.index, cancel=lambda: next(calls, True))
    assert list(got) == ["a"]
    assert got["a"].max() == 0

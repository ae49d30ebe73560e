"""The embedding pipeline: row order, crops, batching, progress, cancel, bad sources."""

import threading

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.embed import embed_cells, embed_table


class MeanColour:
    """A transparent embedder: the mean RGB of the crop and its side length.

    Lets the tests check that each row received its own crop, whatever the batching
    and thread timing.
    """

    name = "mean-colour"
    dim = 4

    def __init__(self):
        self.batch_sizes = []

    def prepare(self, crop):
        return np.array([*crop.reshape(-1, 3).mean(0), crop.shape[0]], dtype=np.float32)

    def forward(self, batch):
        self.batch_sizes.append(len(batch))
        return np.asarray(batch, dtype=np.float32)

    def meta(self):
        return {"model": self.name, "embedding_dim": self.dim}


def crop_folder(tmp_path, n=13, seed=0):
    """n single-colour crops of varied sizes; returns the cell frame and the colours."""
    rng = np.random.default_rng(seed)
    rows, colours = [], []
    for k in range(n):
        colour = rng.integers(0, 256, 3)
        side = int(rng.integers(20, 60))
        path = tmp_path / f"c{k}.png"
        Image.fromarray(np.broadcast_to(colour, (side, side, 3)).astype(np.uint8)).save(path)
        rows.append({"source": str(path), "x0": 0, "y0": 0, "x1": side, "y1": side})
        colours.append([*colour, side])
    frame = pd.DataFrame(rows, index=[f"b/c{k}.png#0" for k in range(n)])
    return frame, np.array(colours, dtype=np.float32)


@pytest.mark.parametrize(("batch_size", "workers"), [(1, 1), (4, 2), (5, 3), (64, 2)])
def test_each_row_gets_its_own_crop_whatever_the_batching(tmp_path, batch_size, workers):
    """Embeddings come back in input order for any batch size and worker count."""
    frame, colours = crop_folder(tmp_path)
    model = MeanColour()
    result = embed_cells(frame, model, batch_size=batch_size, num_workers=workers)
    np.testing.assert_allclose(result.embeddings, colours)
    assert result.done.all()
    assert not result.cancelled
    assert max(model.batch_sizes) <= batch_size
    assert sum(model.batch_sizes) == len(frame)


def test_smear_cells_are_cut_from_their_boxes_with_edge_padding(tmp_path):
    """Cells of one smear get the crop of their box; a box past the edge is edge-padded."""
    img = np.zeros((100, 120, 3), np.uint8)
    img[:50, :60] = (255, 0, 0)
    img[50:, 60:] = (0, 0, 255)
    path = tmp_path / "smear.png"
    Image.fromarray(img).save(path)
    frame = pd.DataFrame(
        {
            "source": [str(path)] * 3,
            "x0": [10, 70, -10],
            "y0": [10, 60, -10],
            "x1": [30, 90, 10],
            "y1": [30, 80, 10],
        }
    )
    out = embed_cells(frame, MeanColour(), batch_size=2).embeddings
    np.testing.assert_allclose(out[0], [255, 0, 0, 20])
    np.testing.assert_allclose(out[1], [0, 0, 255, 20])
    np.testing.assert_allclose(out[2], [255, 0, 0, 20])  # padded with the red corner


def test_progress_reaches_the_total_and_never_goes_back(tmp_path):
    """progress(done, total) starts at 0, rises monotonically and ends at n."""
    frame, _ = crop_folder(tmp_path, n=10)
    seen = []
    embed_cells(frame, MeanColour(), batch_size=3, progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (0, 10)
    assert seen[-1] == (10, 10)
    done = [d for d, _ in seen]
    assert done == sorted(done)


def test_cancel_returns_the_partial_result(tmp_path):
    """Setting the cancel event after the first batch stops the run; the rows embedded
    so far are correct and marked done, the others are NaN."""
    frame, colours = crop_folder(tmp_path, n=20)
    stop = threading.Event()

    def progress(done, total):
        if done >= 4:  # after the first forward pass
            stop.set()

    result = embed_cells(frame, MeanColour(), batch_size=4, cancel=stop, progress=progress)
    assert result.cancelled
    assert result.done.sum() == 4
    np.testing.assert_allclose(result.embeddings[result.done], colours[result.done])
    assert np.isnan(result.embeddings[~result.done]).all()


def test_unreadable_source_is_skipped_and_the_rest_embedded(tmp_path):
    """A corrupt file gives NaN rows and one skipped entry; other cells are embedded."""
    frame, colours = crop_folder(tmp_path, n=6)
    bad = tmp_path / "c2.png"
    bad.write_bytes(b"broken")
    result = embed_cells(frame, MeanColour(), batch_size=4)
    assert result.skipped == [(str(bad), "not an image file")]
    assert not result.done[2]
    assert result.done.sum() == 5
    np.testing.assert_allclose(result.embeddings[result.done], colours[result.done])


def test_in_memory_images_are_used_by_source_name():
    """Sources found in `images` (napari layers) are read from memory, not disk."""
    img = np.full((40, 40), 7, np.uint16)  # a 16-bit grey layer
    frame = pd.DataFrame({"source": ["layer one"], "x0": [0], "y0": [0], "x1": [10], "y1": [10]})
    out = embed_cells(frame, MeanColour(), images={"layer one": img}).embeddings
    np.testing.assert_allclose(out[0], [7, 7, 7, 10])


def test_embed_table_stores_embeddings_and_model_facts(tmp_path):
    """embed_table fills obsm['X_embed'] and uns['hemofm'] with the backbone's meta."""
    frame, colours = crop_folder(tmp_path, n=5)
    frame = frame.assign(batch="b", x=1.0, y=1.0)
    table = CellTable()
    table.add_cells(frame)
    embed_table(table, MeanColour())
    np.testing.assert_allclose(table.embeddings, colours)
    assert table.meta["model"] == "mean-colour"


def test_missing_box_columns_are_named(tmp_path):
    """A frame without crop boxes is refused with the missing column names."""
    with pytest.raises(ValueError, match="x1"):
        embed_cells(pd.DataFrame({"source": ["a"], "x0": [0], "y0": [0]}), MeanColour())

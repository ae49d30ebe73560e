"""Seeded cell tables for tests and benchmarks (not part of the public API).

One builder, :func:`make_cell_table`, replaces the copies that tests and benchmark
scripts kept of "blobs in embedding space with sources, batches and some labels".
``tests/conftest.py`` wraps it in fixtures; benchmarks import it directly so their
tables are built the same way as the tests'.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from napari_hemofm.core.cells import CellTable

__all__ = [
    "DEFAULT_CLASSES",
    "make_cell_frame",
    "make_cell_table",
    "shared_data_dir",
    "table_of",
]

DEFAULT_CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")


def make_cell_frame(
    n: int,
    *,
    classes: Sequence[str] = DEFAULT_CLASSES,
    batches: Sequence[str] = ("lab_a", "lab_b"),
    dim: int = 8,
    labelled: float = 0.5,
    spread: float = 6.0,
    batch_shift: float = 0.0,
    image_shape: tuple[int, int] = (300, 400),
    box: int = 12,
    predictions: bool = False,
    seed: int = 0,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Cells in Gaussian blobs, one blob per class, as a cell-table frame.

    Parameters
    ----------
    n : int
        Number of cells.
    classes : sequence of str
        Class names; cell ``i`` belongs to a class drawn uniformly at random.
    batches : sequence of str
        Batch names; cells alternate between them (cell ``i`` in ``batches[i % b]``).
        Each batch has its own source image ``"<batch>_smear"``.
    dim : int
        Embedding dimension.
    labelled : float
        Share of cells that carry their class as a curated label (the others are
        unlabelled, ``None``).
    spread : float
        Standard deviation of the class centres (the noise around a centre is 1).
    batch_shift : float
        Size of a planted offset added to every cell of batch ``k`` times ``k``
        (a batch effect along the first axis).
    image_shape : tuple of int
        ``(height, width)`` of the source images the cell centres fall in.
    box : int
        Half-width of each cell's crop box in pixels.
    predictions : bool
        Also fill ``prediction`` (the true class) and ``confidence`` (uniform 0.2-1).
    seed : int
        Seed of the local random generator.

    Returns
    -------
    frame : pandas.DataFrame
        Cell rows indexed by ``cell_id`` (``"<batch>/smear.png#<i>"``).
    embeddings : ndarray of shape (n, dim), float32
    truth : ndarray of shape (n,), object
        The class of each cell (also for unlabelled cells).
    """
    rng = np.random.default_rng(seed)
    k = rng.integers(0, len(classes), n)
    centres = rng.normal(scale=spread, size=(len(classes), dim))
    b = np.arange(n) % len(batches)
    X = centres[k] + rng.normal(size=(n, dim))
    X[:, 0] += batch_shift * b
    truth = np.array(classes, dtype=object)[k]
    labels = truth.copy()
    labels[rng.random(n) >= labelled] = None
    h, w = image_shape
    cx = rng.uniform(box + 2, w - box - 2, n)
    cy = rng.uniform(box + 2, h - box - 2, n)
    batch_names = np.array(batches, dtype=object)[b]
    data = {
        "source": [f"{name}_smear" for name in batch_names],
        "batch": batch_names,
        "x": cx,
        "y": cy,
        "x0": (cx - box).astype(np.int64),
        "y0": (cy - box).astype(np.int64),
        "x1": (cx + box).astype(np.int64),
        "y1": (cy + box).astype(np.int64),
        "label": labels,
    }
    if predictions:
        data["prediction"] = truth
        data["confidence"] = rng.uniform(0.2, 1.0, n)
    index = pd.Index(
        [f"{name}/smear.png#{i}" for i, name in enumerate(batch_names)], name="cell_id"
    )
    return pd.DataFrame(data, index=index), X.astype(np.float32), truth


def make_cell_table(n: int = 400, **kwargs) -> CellTable:
    """A :class:`CellTable` from :func:`make_cell_frame` (same parameters).

    The class list is set to ``classes`` in order, so number keys map to them.
    """
    classes = kwargs.get("classes", DEFAULT_CLASSES)
    frame, X, _ = make_cell_frame(n, **kwargs)
    table = CellTable()
    table.add_cells(frame, embeddings=X)
    table.set_classes(list(classes))
    return table


def table_of(
    index: Sequence[str],
    *,
    source: str | Sequence[str],
    batch: str | Sequence[str],
    embeddings: np.ndarray | None = None,
    **columns,
) -> CellTable:
    """A :class:`CellTable` of given cells, each with the same small box.

    For tests whose cells need only ids, sources, batches (and embeddings): the box
    columns every cell table requires are filled with one 4-pixel box at (1, 1).

    Parameters
    ----------
    index : sequence of str
        Cell ids, one per cell.
    source, batch : str or sequence of str
        One value for every cell, or one per cell.
    embeddings : ndarray of shape (n_cells, dim), optional
    **columns
        Further ``obs`` columns (``slide=...``), one value or one per cell.
    """
    frame = pd.DataFrame(
        {"source": source, "batch": batch, **columns}
        | {"x": 1.0, "y": 1.0, "x0": 0, "y0": 0, "x1": 4, "y1": 4},
        index=list(index),
    )
    table = CellTable()
    table.add_cells(frame, embeddings=embeddings)
    return table


def shared_data_dir() -> Path:
    """``../shared/data`` beside the repository (it may not exist)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"

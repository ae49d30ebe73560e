"""The batched embedding pipeline: read, crop, prepare in threads; run the model in batches.

Decoding the images, cutting the crops and the backbone's per-crop ``prepare``
(resize + normalise for DinoBloom, all features for ``handcrafted``) run in a
prefetching thread pool that keeps ahead of the model, so the model's forward pass
(which releases the GIL) is the only thing the pipeline waits for. The work unit is
one source image: a smear is decoded once for all its cells; a large lazy TIFF is
read window by window. Results land in their cell's row, so the output order is the
table's order whatever the thread timing. Cancel is cooperative: it is checked
between batches and the rows embedded so far are returned.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable

BOX_COLUMNS = ["x0", "y0", "x1", "y1"]


class Embedder(Protocol):
    """What the pipeline needs of a backbone (see :mod:`napari_hemofm.core.models`)."""

    name: str
    dim: int

    def prepare(self, crop: np.ndarray) -> np.ndarray:
        """One ``(H, W, 3)`` uint8 crop -> the model's input for it (thread-safe)."""

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """A stack of prepared inputs -> ``(B, dim)`` float32 embeddings."""

    def meta(self) -> dict[str, Any]:
        """Facts for ``uns["hemofm"]``."""


@dataclass
class EmbedResult:
    """Output of :func:`embed_cells`.

    Attributes
    ----------
    embeddings : ndarray of shape (n_cells, dim), float32
        One row per input cell, in input order; NaN rows were not embedded (cancelled
        before them, or their source could not be read).
    done : ndarray of shape (n_cells,), bool
        Which rows hold an embedding.
    cancelled : bool
        The run stopped early on request.
    skipped : list of (str, str)
        Sources that could not be read, with the reason.
    meta : dict
        The backbone's facts (model, weights sha256, input size).
    """

    embeddings: np.ndarray
    done: np.ndarray
    cancelled: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def _read_source(source: str, images: Mapping[str, Any] | None) -> Any:
    from napari_hemofm.core.io import read_image, to_rgb8

    if images is not None and source in images:
        image = images[source]
        from napari_hemofm.core.io import LazyRGBImage

        return image if isinstance(image, LazyRGBImage) else to_rgb8(image)
    return read_image(source)


def _prepare_source(
    backbone: Embedder,
    source: str,
    boxes: np.ndarray,
    images: Mapping[str, Any] | None,
    normalise: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Read one source and prepare all its cells: ``(n_cells_of_source, *input_shape)``.

    ``normalise`` (stain normalisation, :mod:`napari_hemofm.core.stain`) maps the whole
    decoded image before cropping; a lazily read image is normalised crop by crop.
    """
    from napari_hemofm.core.detect import crop_cell
    from napari_hemofm.core.io import LazyRGBImage

    image = _read_source(source, images)
    per_crop = normalise is not None and isinstance(image, LazyRGBImage)
    if normalise is not None and not per_crop:
        image = normalise(np.asarray(image))
    height, width = image.shape[:2]
    prepared = []
    for x0, y0, x1, y1 in boxes:
        if x0 == 0 and y0 == 0 and x1 == width and y1 == height:
            crop = np.asarray(image[:, :])
        else:
            crop = crop_cell(image, (int(x0), int(y0), int(x1), int(y1)))
        if per_crop:
            crop = normalise(np.ascontiguousarray(crop))  # type: ignore[misc]
        prepared.append(backbone.prepare(crop))
    return np.stack(prepared)


def _group_by_source(cells: pd.DataFrame) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(source, row positions, boxes)`` per source, in order of first appearance."""
    sources = cells["source"].astype(str).to_numpy()
    boxes = cells[BOX_COLUMNS].to_numpy(dtype=np.int64)
    order: dict[str, list[int]] = {}
    for pos, src in enumerate(sources):
        order.setdefault(src, []).append(pos)
    return [(src, np.asarray(rows), boxes[rows]) for src, rows in order.items()]


def iter_prepared(
    backbone: Embedder,
    cells: pd.DataFrame,
    *,
    images: Mapping[str, Any] | None = None,
    num_workers: int = 2,
    prefetch: int = 4,
    normalise: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray | None, str | None]]:
    """Prepared inputs per source, in source order, computed ahead in a thread pool.

    Yields
    ------
    rows : ndarray of int
        Row positions (in ``cells``) of this source's cells.
    prepared : ndarray or None
        ``(len(rows), *input_shape)``; ``None`` when the source could not be read.
    error : str or None
        Why the source was skipped.
    """
    from napari_hemofm.core.io import ImageReadError

    groups = _group_by_source(cells)
    pending: deque[tuple[np.ndarray, str, Future]] = deque()
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        it = iter(groups)
        try:
            while True:
                while len(pending) < max(1, prefetch):
                    try:
                        src, rows, boxes = next(it)
                    except StopIteration:
                        break
                    fut = pool.submit(_prepare_source, backbone, src, boxes, images, normalise)
                    pending.append((rows, src, fut))
                if not pending:
                    return
                rows, src, fut = pending.popleft()
                try:
                    yield rows, fut.result(), None
                except (ImageReadError, OSError, ValueError) as exc:
                    text = str(exc)
                    yield rows, None, text.removeprefix(f"{src}: ")
        finally:
            for _, _, fut in pending:
                fut.cancel()


def embed_cells(
    cells: pd.DataFrame | CellTable,
    backbone: Embedder,
    *,
    batch_size: int = 32,
    images: Mapping[str, Any] | None = None,
    num_workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    normalise: Callable[[np.ndarray], np.ndarray] | None = None,
) -> EmbedResult:
    """Embed every cell with a backbone.

    Parameters
    ----------
    cells : pandas.DataFrame or CellTable
        One row per cell with ``source`` (image path, or a key of ``images``) and the
        crop box ``x0, y0, x1, y1`` in source pixels.
    backbone : Embedder
        From :func:`napari_hemofm.core.models.load_backbone`.
    batch_size : int
        Cells per forward pass.
    images : mapping of str to array, optional
        In-memory images (e.g. napari layers) by source name; other sources are read
        from disk.
    num_workers : int
        Threads that decode, crop and prepare ahead of the model.
    progress : callable, optional
        ``progress(done, total)`` after each batch (cells handled, skipped included).
    cancel : threading.Event or callable, optional
        Checked between batches; when set, the partial result is returned.
    normalise : callable, optional
        Stain normalisation, ``(H, W, 3)`` uint8 -> same
        (:func:`napari_hemofm.core.stain.build_normaliser`), applied to each source
        image before its cells are cut (to each crop of a lazily read image), so every
        backbone sees normalised pixels.

    Returns
    -------
    EmbedResult

    Notes
    -----
    The embedding of a cell depends only on its crop and the model (nothing
    dataset-level is folded in), so batch composition and worker timing do not
    change it beyond float rounding.
    """
    frame = cells.obs if hasattr(cells, "obs") else cells
    n = len(frame)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    missing = [c for c in ["source", *BOX_COLUMNS] if c not in frame.columns]
    if missing:
        raise ValueError(f"cells lack the column(s) {missing} needed to cut crops")
    is_cancelled = _cancel_check(cancel)
    out = np.full((n, backbone.dim), np.nan, dtype=np.float32)
    done = np.zeros(n, dtype=bool)
    skipped: list[tuple[str, str]] = []
    handled = 0
    buf_rows: list[np.ndarray] = []
    buf_inputs: list[np.ndarray] = []
    buffered = 0
    cancelled = False
    sources = frame["source"].astype(str).to_numpy()

    def flush(final: bool) -> None:
        """Run every full batch in the buffer (and the remainder when ``final``)."""
        nonlocal buf_rows, buf_inputs, buffered, handled, cancelled
        rows = np.concatenate(buf_rows)
        inputs = np.concatenate(buf_inputs)
        n_run = len(rows) if final else len(rows) // batch_size * batch_size
        for start in range(0, n_run, batch_size):
            if start and is_cancelled():
                cancelled = True
                return
            r = rows[start : min(start + batch_size, n_run)]
            emb = np.asarray(backbone.forward(inputs[start : start + len(r)]), np.float32)
            out[r] = emb
            done[r] = True
            handled += len(r)
            if progress is not None:
                progress(handled, n)
        buf_rows, buf_inputs = [rows[n_run:]], [inputs[n_run:]]
        buffered = len(rows) - n_run

    if progress is not None:
        progress(0, n)
    if n:
        for rows, prepared, error in iter_prepared(
            backbone, frame, images=images, num_workers=num_workers, normalise=normalise
        ):
            if is_cancelled():
                cancelled = True
                break
            if prepared is None:
                skipped.append((sources[rows[0]], error or "could not be read"))
                handled += len(rows)
                if progress is not None:
                    progress(handled, n)
                continue
            buf_rows.append(rows)
            buf_inputs.append(prepared)
            buffered += len(rows)
            if buffered >= batch_size:
                flush(final=False)
                if cancelled or is_cancelled():
                    cancelled = True
                    break
        if buffered and not cancelled:
            flush(final=True)
    return EmbedResult(out, done, cancelled, skipped, dict(backbone.meta()))


def _cancel_check(cancel: threading.Event | Callable[[], bool] | None) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    return cancel


def embed_table(
    table: CellTable,
    backbone: Embedder,
    *,
    batch_size: int = 32,
    images: Mapping[str, Any] | None = None,
    num_workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    normalise: Callable[[np.ndarray], np.ndarray] | None = None,
) -> EmbedResult:
    """Embed a cell table's cells and store them in ``obsm["X_embed"]`` and ``uns``.

    Cells that could not be embedded (cancelled, unreadable source) keep NaN rows.
    Parameters are those of :func:`embed_cells`.
    """
    result = embed_cells(
        table,
        backbone,
        batch_size=batch_size,
        images=images,
        num_workers=num_workers,
        progress=progress,
        cancel=cancel,
        normalise=normalise,
    )
    table.set_embeddings(result.embeddings, **result.meta)
    return result


def cells_needing_embedding(table: CellTable) -> Sequence[int]:
    """Row positions of cells without an embedding (NaN rows, or all before embedding)."""
    X = table.embeddings
    if X is None:
        return np.arange(table.n_cells)
    return np.flatnonzero(~np.isfinite(X).all(axis=1))

"""Which new cell is which old one: box matching and cell-id carrying.

When an image is detected again (other detection settings), its new cells are matched to
its old ones by box overlap (:func:`match_boxes`: Hungarian assignment on the
intersection over union, :func:`box_iou`, at least :data:`MIN_IOU`). A matched cell keeps
its id and curated label; unmatched new cells get ids above every number the image had;
an old cell with a curated label that nothing matches is kept (:func:`carry_ids`). Used
by the embed job (:mod:`~.embed_job`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from napari_hemofm.core.inputs import id_number, id_prefix

__all__ = ["MIN_IOU", "box_iou", "carry_ids", "match_boxes"]

#: Smallest box overlap (intersection over union) for a re-detected cell to be the same
#: cell as an old one. Two detections of one WBC overlap by 0.7-1.0; neighbours rarely
#: by more than 0.1.
MIN_IOU = 0.3


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of two sets of boxes.

    Parameters
    ----------
    a : ndarray of shape (n, 4)
    b : ndarray of shape (m, 4)
        Boxes ``x0, y0, x1, y1`` (half-open, pixels).

    Returns
    -------
    ndarray of shape (n, m)
        IoU in [0, 1]; 0 for empty boxes.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix = np.clip(
        np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]),
        0,
        None,
    )
    iy = np.clip(
        np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]),
        0,
        None,
    )
    inter = ix * iy
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def match_boxes(
    old: np.ndarray, new: np.ndarray, *, min_iou: float = MIN_IOU
) -> list[tuple[int, int]]:
    """Pair old and new boxes of one image, one to one, by largest total overlap.

    Parameters
    ----------
    old : ndarray of shape (n, 4)
    new : ndarray of shape (m, 4)
        Boxes ``x0, y0, x1, y1``.
    min_iou : float
        Pairs overlapping less are not matched.

    Returns
    -------
    list of (int, int)
        ``(old index, new index)`` pairs, sorted by new index.

    Notes
    -----
    The Hungarian assignment (:func:`scipy.optimize.linear_sum_assignment`) maximises
    the summed IoU, so two close cells are never both given the same old id.
    """
    from scipy.optimize import linear_sum_assignment

    if len(old) == 0 or len(new) == 0:
        return []
    iou = box_iou(old, new)
    rows, cols = linear_sum_assignment(-iou)
    pairs = [(int(i), int(j)) for i, j in zip(rows, cols, strict=True) if iou[i, j] >= min_iou]
    return sorted(pairs, key=lambda p: p[1])


# ------------------------------------------------------------------------------ ids
def _fresh_prefix(prefix: str, source: str, owner: dict[str, str]) -> str:
    """``prefix``, or ``input_2/rel``, ``input_3/rel``... when another source owns it."""
    if owner.get(prefix, source) == source:
        return prefix
    head, _, rel = prefix.partition("/")
    k = 2
    while owner.get(f"{head}_{k}/{rel}", source) != source:
        k += 1
    return f"{head}_{k}/{rel}"


def carry_ids(
    obs: pd.DataFrame, found: pd.DataFrame, redetected: Iterable[str]
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Final ids and carried labels of newly found cells.

    Parameters
    ----------
    obs : pandas.DataFrame
        The table's cells (``CellTable.obs``): ``source``, boxes, ``label``,
        ``label_origin``, indexed by cell id.
    found : pandas.DataFrame
        The job's new cells (provisional ids), same columns plus ``kind``.
    redetected : iterable of str
        Sources whose old cells the new ones replace.

    Returns
    -------
    (cells, drop, keep_unmatched)
        ``cells`` re-indexed by final id with ``label`` / ``label_origin``; boolean masks
        over the table's rows: cells to drop (old cells of re-detected images), and
        which of those are curated cells kept because nothing matched them.
    """
    sources = obs["source"].astype(str).to_numpy()
    prefixes = id_prefix(obs.index)
    numbers = id_number(obs.index)
    first = pd.DataFrame({"p": prefixes, "s": sources}).drop_duplicates("p")
    owner: dict[str, str] = dict(zip(first["p"], first["s"], strict=True))
    redetected = set(redetected)
    drop = np.isin(sources, list(redetected))
    keep_unmatched = np.zeros(len(obs), bool)
    cells = found.copy()
    cells["label"] = cells["label"].astype(object)
    cells["label_origin"] = pd.Series(
        np.where(cells["label"].notna(), "imported", None), index=cells.index, dtype=object
    )
    new_ids = np.empty(len(cells), dtype=object)
    cell_sources = cells["source"].astype(str).to_numpy()
    old_boxes = obs[["x0", "y0", "x1", "y1"]].to_numpy(np.int64)
    old_label = obs["label"].astype(object).to_numpy()
    old_origin = obs["label_origin"].astype(object).to_numpy()
    new_label = cells["label"].to_numpy(dtype=object)
    new_origin = cells["label_origin"].to_numpy(dtype=object)
    new_boxes = cells[["x0", "y0", "x1", "y1"]].to_numpy(np.int64)
    provisional = id_number(cells.index)
    prov_prefix = id_prefix(cells.index)
    prov_ids = cells.index.to_numpy(dtype=object)
    curated = (old_origin == "user") & pd.notna(old_label)
    # row positions per source, in one pass each (O(n), not one scan per source)
    new_groups = pd.Series(np.arange(len(cells))).groupby(cell_sources, sort=False).indices
    old_groups = pd.Series(np.arange(len(obs))).groupby(sources, sort=False).indices
    no_rows = np.zeros(0, np.int64)
    for src, mine in new_groups.items():
        mine = np.sort(mine)
        olds = np.sort(old_groups.get(src, no_rows))
        if len(olds):
            prefix = prefixes[olds[0]]
            next_n = int(numbers[olds].max()) + 1
        else:
            prefix = _fresh_prefix(prov_prefix[mine[0]], src, owner)
            owner[prefix] = src
            next_n = 0
            if prefix == prov_prefix[mine[0]]:  # the common case: ids as provisionally given
                new_ids[mine] = prov_ids[mine]
                continue
        matched_new: set[int] = set()
        matched_old: set[int] = set()
        for i, j in match_boxes(old_boxes[olds], new_boxes[mine]):
            o, n = olds[i], mine[j]
            matched_old.add(o)
            new_ids[n] = obs.index[o]
            matched_new.add(n)
            if pd.notna(old_label[o]) and (curated[o] or pd.isna(new_label[n])):
                new_label[n], new_origin[n] = old_label[o], old_origin[o]
        for n in mine:
            if n in matched_new:
                continue
            if len(olds):  # above every number the image had: never an old id
                new_ids[n] = f"{prefix}#{next_n}"
                next_n += 1
            else:  # a new image: numbered in detection order, as the CLI does
                new_ids[n] = f"{prefix}#{provisional[n]}"
        for o in olds:
            if o not in matched_old and curated[o]:
                keep_unmatched[o] = True
    # a crop folder's class never overwrites a curated label (kept when matched)
    cells["label"] = new_label
    cells["label_origin"] = new_origin
    cells.index = pd.Index(new_ids, name="cell_id")
    # slide defaults follow the final prefix
    if "slide" in cells.columns:
        smear = (cells["kind"] == "smear").to_numpy()
        final_prefix = id_prefix(cells.index)
        orig_prefix = prov_prefix
        auto = cells["slide"].astype(object).to_numpy() == orig_prefix
        slide = cells["slide"].astype(object).to_numpy()
        slide[smear & auto] = final_prefix[smear & auto]
        cells["slide"] = slide
    return cells, drop & ~keep_unmatched, keep_unmatched

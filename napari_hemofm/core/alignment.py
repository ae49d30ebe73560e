"""Label-aware per-batch alignment: let a probe learn from a new lab's first labels.

A probe trained on one lab sees another lab's cells shifted as a whole in embedding
space (stain, camera, crop size): every cell of the new lab lands near the same few
training cells and gets their class. A handful of labels from the new lab show the
shift: the mean of the new lab's labelled cells of class ``c`` minus the mean of the
other labelled cells of class ``c`` estimates it once per class. Their average,
weighted by the number of new-lab labels per class, is the batch's *offset*; all
cells of the batch (labelled or not) are moved by minus the offset before the probe
sees them, so the new lab's labelled cells land on their classes in the reference
frame and the other cells follow.

Why class means and not the batch mean: the two labs hold different class mixes (a
smear of neutrophils, a CellaVision set of 8 balanced classes), so centring each
batch on its own mean would move cells by the difference in composition. Matching
class means removes that: only labels of classes known to both sides count, and a
batch without such labels is left where it is (offset 0). The reference frame is the
group with the most labelled cells; its offset is 0.

This is the translation part of the "class-conditional" alignments used for domain
adaptation with few target labels (e.g. Saenko et al., ECCV 2010; Motiian et al.,
ICCV 2017, classify target samples after matching class-conditional source and target
statistics). With ~4 labels per class, a per-feature scale is too noisy to estimate
(measured in ``docs/probes.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_hemofm.core.labels import clean_labels

__all__ = ["align", "class_mean_offsets"]


def class_mean_offsets(
    X: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    *,
    reference: Any = None,
) -> dict[str, np.ndarray]:
    """The offset of each group (batch) from the reference frame, from its labels.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
        Embeddings (rows with NaN are ignored).
    labels : sequence of shape (n_cells,)
        Class names; None / NaN / "" = unlabelled.
    groups : sequence of shape (n_cells,)
        The batch (or slide) of each cell.
    reference : str, optional
        The group that defines the frame (offset 0); default the group with the most
        labelled cells (ties: the first in sorted order).

    Returns
    -------
    dict of str to ndarray of shape (dim,), float32
        Offset of every group; zero for the reference and for groups without a
        labelled cell of a class that the other groups also have.

    Notes
    -----
    For group ``b`` with labelled cells of classes ``C_b`` shared with the other groups,
    ``offset_b = sum_c n_bc (mean_bc - mean_oc) / sum_c n_bc``, where ``mean_oc`` is
    the mean of the labelled cells of ``c`` outside ``b`` *in the reference frame*
    (other non-reference groups are first moved by their own offsets, estimated
    against the reference group alone). The estimate is then shrunk towards 0 by the
    positive-part James-Stein factor ``max(0, 1 - E / |offset|^2)``, where ``E`` is the
    expected squared error of the estimate (from the class spreads and counts): a
    group that is not shifted gets (close to) no offset instead of a noisy one, and a
    real shift, much larger than the noise, is kept almost whole (James & Stein 1961;
    the estimate is a mean in ``dim`` >= 3 dimensions).
    """
    X = np.asarray(X, dtype=np.float32)
    y = clean_labels(labels, X.shape[0])
    g = np.asarray(groups, dtype=object).astype(str)
    if len(g) != X.shape[0]:
        raise ValueError(f"got {len(g)} groups for {X.shape[0]} cells")
    ok = np.isfinite(X).all(axis=1) & np.not_equal(y, None)
    names = sorted(set(g.tolist()))
    out = {b: np.zeros(X.shape[1], dtype=np.float32) for b in names}
    if not ok.any():
        return out
    counts = {b: int((ok & (g == b)).sum()) for b in names}
    ref = str(reference) if reference is not None else max(names, key=lambda b: counts[b])
    if ref not in out:
        raise ValueError(f"no group {reference!r}; groups are {names}")

    def offset(b: str, other: np.ndarray, Xo: np.ndarray) -> np.ndarray:
        own = ok & (g == b)
        total = np.zeros(X.shape[1], dtype=np.float64)
        noise = 0.0  # expected squared norm of the estimate's error (sum over dims)
        weight = 0
        for c in sorted(set(y[own].tolist()) & set(y[other].tolist())):
            mine = own & (y == c)
            theirs = other & (y == c)
            m, o = int(mine.sum()), int(theirs.sum())
            total += m * (X[mine].mean(axis=0, dtype=np.float64) - Xo[theirs].mean(axis=0))
            weight += m
            if o >= 2:  # the class's spread, from the side with more cells
                spread = float(Xo[theirs].var(axis=0, ddof=1, dtype=np.float64).sum())
                noise += m * m * spread * (1.0 / m + 1.0 / o)
        if not weight:
            return out[b]
        delta = total / weight
        noise /= weight * weight
        # positive-part James-Stein: an offset within its own noise is no offset
        size = float(delta @ delta)
        shrink = max(0.0, 1.0 - noise / size) if size > 0 else 0.0
        return (shrink * delta).astype(np.float32)

    # first pass: each group against the reference alone; second: against all others
    # already moved into the reference frame (more classes, more cells)
    in_ref = ok & (g == ref)
    for b in names:
        if b != ref:
            out[b] = offset(b, in_ref, X)
    moved = X - np.stack([out[b] for b in names])[np.searchsorted(names, g)]
    for b in names:
        if b != ref:
            out[b] = offset(b, ok & (g != b), moved)
    return out


def align(
    X: np.ndarray, groups: Sequence[Any] | np.ndarray, offsets: dict[str, np.ndarray]
) -> np.ndarray:
    """Move each cell by minus its group's offset.

    Parameters
    ----------
    X : ndarray of shape (n_cells, dim)
    groups : sequence of shape (n_cells,)
    offsets : dict of str to ndarray of shape (dim,)
        From :func:`class_mean_offsets`; groups not in it are not moved.

    Returns
    -------
    ndarray of shape (n_cells, dim), float32
        A new array (``X`` is not modified).
    """
    X = np.asarray(X, dtype=np.float32)
    g = np.asarray(groups, dtype=object).astype(str)
    out = X.copy()
    for b, off in offsets.items():
        if np.any(off):
            out[g == b] -= np.asarray(off, dtype=np.float32)
    return out

"""Differential counts: how many cells of each class per smear (source) or per batch.

A hematologist's differential is the share of each white-cell type among the cells
counted on a slide, usually to a target of 100 or 200 cells. Here a cell counts as
its curated label, else the probe's prediction (when its confidence reaches the
"Unidentified" threshold), else :data:`UNIDENTIFIED`. Cells labelled (or predicted)
:data:`NOT_CLASSED` (artefacts, smudge cells) are kept out of the counts. A group can
be signed off only when it has no Unidentified cell left.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable

NOT_CLASSED = "Not classed"
"""Label for artefacts and smudge cells: a real label, kept out of differential counts."""
UNIDENTIFIED = "Unidentified"
"""A cell with no curated label whose prediction is missing or below the threshold."""
UNLABELLED = "Unlabelled"
"""Gallery section of cells with no curated label and no prediction yet."""

GroupBy = Literal["source", "batch"]

THRESHOLD_KEY = "unidentified_below"
"""``uns["hemofm"]`` key of the confidence below which a prediction is not trusted."""
SIGNOFF_KEY = "signoffs"
"""``uns["hemofm"]`` key of the sign-off records (a JSON list, see :func:`sign_off`)."""


def stored_threshold(table: CellTable, default: float = 0.0) -> float:
    """The "Unidentified" threshold saved with the project (``default`` when none)."""
    value = table.meta.get(THRESHOLD_KEY)
    return default if value is None else float(value)


def counted_labels(
    table: CellTable,
    *,
    threshold: float | None = None,
    rows: np.ndarray | None = None,
    unpredicted: str = UNIDENTIFIED,
) -> np.ndarray:
    """The class each cell counts as in a differential (and shows under in the gallery).

    Parameters
    ----------
    table : CellTable
    threshold : float, optional
        Predictions with a confidence below this count as :data:`UNIDENTIFIED`
        (default: the threshold stored with the project, else 0: every prediction
        counts).
    rows : ndarray of int, optional
        Row positions (default: all cells).
    unpredicted : str
        What a cell with neither label nor prediction is: :data:`UNIDENTIFIED` in a
        count, :data:`UNLABELLED` as a gallery section.

    Returns
    -------
    ndarray of object, shape (n,)
        The curated label, else the prediction (confidence >= threshold), else
        :data:`UNIDENTIFIED` (``unpredicted`` without a prediction).
        :data:`NOT_CLASSED` cells keep that name (the counts leave them out).
    """
    if threshold is None:
        threshold = stored_threshold(table)
    obs = table.obs
    if rows is not None:
        obs = obs.iloc[np.asarray(rows, dtype=np.int64)]
    label = obs["label"].astype(object).to_numpy()
    pred = obs["prediction"].astype(object).to_numpy()
    conf = pd.to_numeric(obs["confidence"], errors="coerce").to_numpy(dtype=float)
    has_label = pd.notna(label)
    # a missing confidence with a prediction (e.g. imported) is trusted
    has_pred = pd.notna(pred)
    trusted = has_pred & ~(np.nan_to_num(conf, nan=1.0) < threshold)
    out = np.full(len(label), UNIDENTIFIED, dtype=object)
    out[~has_pred] = unpredicted
    out[trusted] = pred[trusted]
    out[has_label] = label[has_label]
    return out


def _groups(table: CellTable, by: GroupBy) -> np.ndarray:
    if by not in ("source", "batch"):
        raise ValueError(f"by must be 'source' or 'batch'; got {by!r}")
    return table.obs[by].astype(str).to_numpy()


def differential_counts(
    table: CellTable,
    by: GroupBy = "source",
    *,
    threshold: float | None = None,
    classes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Counts and percentages of each class per source image or per batch.

    Parameters
    ----------
    table : CellTable
    by : {"source", "batch"}
        Group cells by their smear / crop file (``source``) or by ``batch``.
    threshold : float, optional
        See :func:`counted_labels`.
    classes : sequence of str, optional
        Classes to report even when a group has none of them (count 0); default: the
        table's class list. Other classes found in the data are added after them.

    Returns
    -------
    pandas.DataFrame
        Long format, one row per (group, label): ``group``, ``label``, ``count``,
        ``percent`` (of the group's counted cells, 0-100). Groups are in order of
        first appearance; labels follow ``classes`` with :data:`UNIDENTIFIED` last.
        :data:`NOT_CLASSED` is left out.
    """
    groups = _groups(table, by)
    labels = counted_labels(table, threshold=threshold)
    keep = labels != NOT_CLASSED
    frame = pd.DataFrame({"group": groups[keep], "label": labels[keep]})
    order = [c for c in (classes if classes is not None else table.classes) if c != NOT_CLASSED]
    order += [c for c in pd.unique(frame["label"]) if c not in order and c != UNIDENTIFIED]
    order.append(UNIDENTIFIED)
    group_order = [g for g in pd.unique(groups)]
    if not len(frame):
        return pd.DataFrame(
            {
                "group": pd.Series(dtype=str),
                "label": pd.Series(dtype=str),
                "count": [],
                "percent": [],
            }
        )
    counts = frame.groupby(["group", "label"]).size()
    totals = frame.groupby("group").size()
    rows = []
    for g in group_order:
        total = int(totals.get(g, 0))
        for lab in order:
            n = int(counts.get((g, lab), 0))
            rows.append((g, lab, n, 100.0 * n / total if total else 0.0))
    out = pd.DataFrame(rows, columns=["group", "label", "count", "percent"])
    return out


def differential_summary(
    table: CellTable,
    by: GroupBy = "source",
    *,
    threshold: float | None = None,
    target: int = 100,
) -> pd.DataFrame:
    """Per-group progress of a differential: counted cells, target and sign-off state.

    Parameters
    ----------
    table : CellTable
    by : {"source", "batch"}
    threshold : float, optional
        See :func:`counted_labels`.
    target : int
        Cells to count per group (100 or 200 by convention).

    Returns
    -------
    pandas.DataFrame
        Indexed by group: ``n_counted`` (cells in the count, Unidentified included),
        ``n_identified``, ``n_unidentified``, ``n_not_classed``, ``target``,
        ``progress`` (n_counted / target, capped at 1), ``can_sign_off`` (no
        Unidentified cell left and at least one counted cell), ``signed_off_by``.
    """
    if target <= 0:
        raise ValueError(f"target must be positive; got {target}")
    groups = _groups(table, by)
    labels = counted_labels(table, threshold=threshold)
    frame = pd.DataFrame({"group": groups, "label": labels})
    signed = {(r["by"], r["group"]): r["user"] for r in signoffs(table)}
    rows = {}
    for g, part in frame.groupby("group", sort=False):
        not_classed = int((part["label"] == NOT_CLASSED).sum())
        unidentified = int((part["label"] == UNIDENTIFIED).sum())
        counted = len(part) - not_classed
        rows[g] = {
            "n_counted": counted,
            "n_identified": counted - unidentified,
            "n_unidentified": unidentified,
            "n_not_classed": not_classed,
            "target": int(target),
            "progress": min(1.0, counted / target),
            "can_sign_off": unidentified == 0 and counted > 0,
            "signed_off_by": signed.get((by, g), ""),
        }
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "group"
    return out


def signoffs(table: CellTable) -> list[dict[str, Any]]:
    """Sign-off records stored with the project (``by``, ``group``, ``user``, ``time``, counts)."""
    raw = table.meta.get(SIGNOFF_KEY)
    if not raw:
        return []
    return list(json.loads(raw))


def sign_off(
    table: CellTable,
    group: str,
    by: GroupBy = "source",
    *,
    user: str | None = None,
    threshold: float | None = None,
    target: int = 100,
) -> dict[str, Any]:
    """Record that ``user`` signed off the differential of ``group``.

    The record (a JSON list in ``uns["hemofm"]["signoffs"]``, since group names such
    as paths cannot be HDF5 keys) is saved with the project.

    Raises
    ------
    ValueError
        If the group is unknown, or still has Unidentified cells (they must be
        labelled or marked Not classed first).
    """
    from napari_hemofm.core.journal import _user

    summary = differential_summary(table, by, threshold=threshold, target=target)
    if group not in summary.index:
        raise ValueError(f"no {by} named {group!r}; there are {len(summary)}")
    row = summary.loc[group]
    if not row["can_sign_off"]:
        raise ValueError(
            f"{group}: {int(row['n_unidentified'])} cell(s) are still Unidentified; "
            "label them (or mark them Not classed) before signing off"
        )
    counts = differential_counts(table, by, threshold=threshold)
    counts = counts[counts["group"] == group]
    record = {
        "by": by,
        "group": group,
        "user": user or _user(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_counted": int(row["n_counted"]),
        "counts": {r.label: int(r.count) for r in counts.itertuples() if r.count},
    }
    records = [r for r in signoffs(table) if (r["by"], r["group"]) != (by, group)]
    records.append(record)
    table.update_meta(**{SIGNOFF_KEY: json.dumps(records)})
    return record

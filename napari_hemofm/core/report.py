"""Differential counts, their sign-off and its text: the one home of the counting rules.

A hematologist's differential is the share of each white-cell type among the white
cells counted on a slide, to a target of 100 or 200. Every view reads the rule from
here: the gallery's sections (:meth:`~.review.Review.section_of`), the Python API,
``hemofm report`` (CSV, ``--json``, ``--html``) and the printed report.

What a cell counts as (:func:`counted_cells`): its curated label; else its prediction
when the probe is confident (confidence >= the project's Unidentified threshold,
:func:`stored_threshold`, default :data:`DEFAULT_THRESHOLD`) and the cell is typical of
the labelled cells (``obs["atypical"]`` from :mod:`~.guard`, missing = typical); else
:data:`UNIDENTIFIED`, with the reason. The class catalogue (:mod:`~.catalogue`) gives
each label its kind:

- ``wbc`` classes and Unidentified cells make the differential: their percents sum to
  100 per group;
- ``non_wbc`` classes (NRBC, platelets, smudge cells, artefacts) are given per 100 of
  those white cells, as hematologists report NRBC;
- ``not_classed`` (:data:`NOT_CLASSED`) is left out.

A group can be signed off (:func:`sign_off`) when its counted white cells reach the
target, none is Unidentified and no shift warning stands (or the signer overrides it
with a written reason). Any later label change in the group voids the sign-off.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from napari_hemofm.core.catalogue import NOT_CLASSED, kinds_of, resolve
from napari_hemofm.core.cells import slide_values

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable

__all__ = [
    "DEFAULT_THRESHOLD",
    "NOT_CLASSED",
    "UNIDENTIFIED",
    "UNLABELLED",
    "counted_cells",
    "counted_labels",
    "differential_counts",
    "differential_summary",
    "report_json",
    "shift_warnings",
    "sign_off",
    "signoff_text",
    "signoffs",
    "stored_threshold",
    "verify_sign_off",
]

UNIDENTIFIED = "Unidentified"
"""A cell without a curated label whose prediction is missing, unsure or atypical."""
UNLABELLED = "Unlabelled"
"""Gallery section of cells with no curated label and no prediction yet."""

GroupBy = str
"""Any ``obs`` column: ``source``, ``batch``, ``slide``, ..."""

DEFAULT_GROUP_BY: GroupBy = "slide"
"""What a differential is counted per when nobody says (API, CLI, HTML report, Review
panel): the slide, i.e. one smear for detected cells and the batch for a folder of crops
(a cell without a slide counts as its batch, :func:`~.cells.slide_values`)."""

DEFAULT_THRESHOLD = 0.5
"""The Unidentified threshold of a project that stores none (gallery, API, CLI, report)."""
THRESHOLD_KEY = "unidentified_below"
"""``uns["hemofm"]`` key of the confidence below which a prediction is not trusted."""
SIGNOFF_KEY = "signoffs"
"""``uns["hemofm"]`` key of the sign-off records (a JSON list, see :func:`sign_off`)."""
DEFAULT_TARGET = 100
"""White cells to count per group unless told otherwise (100 or 200 by convention)."""

LOW_CONFIDENCE = "low confidence"
"""Reason of an Unidentified cell whose prediction is below the threshold."""
ATYPICAL = "unlike the labelled cells"
"""Reason of an Unidentified cell the out-of-domain guard flags (``obs["atypical"]``)."""
NO_PREDICTION = "no prediction"
"""Reason of an Unidentified cell the probe has not predicted (yet)."""


def stored_threshold(table: CellTable) -> float:
    """The Unidentified threshold saved with the project, else :data:`DEFAULT_THRESHOLD`.

    A saved 0 stays 0 (every prediction counts).
    """
    value = table.meta.get(THRESHOLD_KEY)
    if value is None:
        return DEFAULT_THRESHOLD
    value = float(np.asarray(value).item())
    return DEFAULT_THRESHOLD if not np.isfinite(value) else value


def store_threshold(table: CellTable, value: float) -> float:
    """Save the Unidentified threshold with the project (``uns["hemofm"]``).

    Raises
    ------
    ValueError
        If ``value`` is outside [0, 1].
    """
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1]; got {value}")
    table.update_meta(**{THRESHOLD_KEY: value})
    return value


def counted_cells(
    table: CellTable,
    *,
    threshold: float | None = None,
    rows: np.ndarray | None = None,
) -> pd.DataFrame:
    """What each cell counts as in a differential, its kind, and why it is Unidentified.

    Parameters
    ----------
    table : CellTable
    threshold : float, optional
        Predictions with a confidence below it do not count (default: the project's,
        :func:`stored_threshold`). A missing confidence beside a prediction (imported)
        is trusted.
    rows : ndarray of int, optional
        Row positions (default: all cells).

    Returns
    -------
    pandas.DataFrame
        Indexed by cell id, one row per cell:

        - ``counted``: the curated label, else the prediction (confident and typical),
          else :data:`UNIDENTIFIED`;
        - ``kind``: ``wbc``, ``non_wbc``, ``not_classed`` (of the counted class) or
          ``unidentified``;
        - ``reason``: for Unidentified cells :data:`LOW_CONFIDENCE`, :data:`ATYPICAL` or
          :data:`NO_PREDICTION`; ``""`` otherwise;
        - ``predicted``: True where the count comes from the probe, not a label.
    """
    if threshold is None:
        threshold = stored_threshold(table)
    obs = table.obs
    if rows is not None:
        obs = obs.iloc[np.asarray(rows, dtype=np.int64)]
    label = obs["label"].astype(object).to_numpy()
    pred = obs["prediction"].astype(object).to_numpy()
    conf = pd.to_numeric(obs["confidence"], errors="coerce").to_numpy(dtype=float)
    n = len(label)
    if "atypical" in obs.columns:
        atypical = obs["atypical"].astype("boolean").fillna(False).to_numpy(dtype=bool)
    else:
        atypical = np.zeros(n, dtype=bool)
    has_label = pd.notna(label)
    has_pred = pd.notna(pred) & ~has_label
    confident = has_pred & ~(np.nan_to_num(conf, nan=1.0) < float(threshold))
    trusted = confident & ~atypical
    counted = np.full(n, UNIDENTIFIED, dtype=object)
    counted[trusted] = pred[trusted]
    counted[has_label] = label[has_label]
    reason = np.full(n, "", dtype=object)
    reason[~has_label & ~has_pred] = NO_PREDICTION
    reason[has_pred & ~confident] = LOW_CONFIDENCE
    reason[confident & atypical] = ATYPICAL
    kind = np.full(n, "unidentified", dtype=object)
    known = counted != UNIDENTIFIED
    names = pd.unique(counted[known])  # one catalogue lookup per class, not per cell
    lookup = dict(zip(names, kinds_of(table, names), strict=True))
    kind[known] = pd.Series(counted[known]).map(lookup).to_numpy(dtype=object)
    return pd.DataFrame(
        {"counted": counted, "kind": kind, "reason": reason, "predicted": trusted},
        index=obs.index,
    )


def counted_labels(
    table: CellTable,
    *,
    threshold: float | None = None,
    rows: np.ndarray | None = None,
    unpredicted: str = UNIDENTIFIED,
) -> np.ndarray:
    """The class each cell counts as (and shows under in the gallery).

    Parameters
    ----------
    table : CellTable
    threshold : float, optional
        See :func:`counted_cells`.
    rows : ndarray of int, optional
        Row positions (default: all cells).
    unpredicted : str
        What a cell with neither label nor prediction is: :data:`UNIDENTIFIED` in a
        count, :data:`UNLABELLED` as a gallery section.

    Returns
    -------
    ndarray of object, shape (n,)
        :func:`counted_cells`'s ``counted``; cells without a prediction read
        ``unpredicted``.
    """
    cells = counted_cells(table, threshold=threshold, rows=rows)
    out = cells["counted"].to_numpy(dtype=object).copy()
    out[(cells["reason"] == NO_PREDICTION).to_numpy()] = unpredicted
    return out


def group_values(table: CellTable, by: GroupBy) -> np.ndarray:
    """Each cell's group: the string value of the ``obs`` column ``by`` (missing: ``"(none)"``).

    Raises
    ------
    ValueError
        If ``by`` is not a column of the cell table; the message lists the columns.
    """
    obs = table.obs
    if by not in obs.columns and by != "slide":  # "slide" falls back to the batch
        raise ValueError(f"no column {by!r} to group by; columns are {list(obs.columns)}")
    if by == "slide":  # a cell without a slide (crops, 0.1 projects) counts as its batch
        values = pd.Series(slide_values(obs), index=obs.index, dtype=object)
    else:
        values = obs[by].astype(object)
    return values.where(values.notna(), "(none)").astype(str).to_numpy()


def shift_warnings(table: CellTable, by: GroupBy) -> dict[str, str]:
    """Groups whose cells differ from the probe's training cells: group -> warning text.

    Asks the out-of-domain guard (:func:`napari_hemofm.core.guard.shift_warnings`);
    without the guard there is no warning.
    """
    try:
        from napari_hemofm.core.guard import shift_warnings as guard_warnings
    except ImportError:
        return {}
    return {str(k): str(v) for k, v in (guard_warnings(table, by) or {}).items()}


def _class_order(
    table: CellTable, classes: Sequence[str] | None, seen: Sequence[str]
) -> list[str]:
    order = [str(c) for c in (classes if classes is not None else table.classes)]
    order += [c for c in seen if c not in order]
    return [c for c in order if c != UNIDENTIFIED]


def differential_counts(
    table: CellTable,
    by: GroupBy = DEFAULT_GROUP_BY,
    *,
    threshold: float | None = None,
    classes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Counts and percents of each class per group (smear, batch, slide, ...).

    Parameters
    ----------
    table : CellTable
    by : str
        The ``obs`` column that makes the groups (``source``, ``batch``, ``slide``...).
    threshold : float, optional
        See :func:`counted_cells`.
    classes : sequence of str, optional
        Classes to report even when a group has none (count 0); default: the table's
        class list. Other classes found are added after them.

    Returns
    -------
    pandas.DataFrame
        Long format, one row per (group, label): ``group``, ``label``, ``kind``
        (``wbc``, ``unidentified``, ``non_wbc``), ``count``, ``percent``. ``wbc`` and
        ``unidentified`` percents are of the group's counted white cells (they sum to
        100); a ``non_wbc`` percent is its count per 100 of those white cells. Groups
        in order of first appearance; white classes (class order), then
        :data:`UNIDENTIFIED`, then the non-white ones. ``not_classed`` is left out.

    Notes
    -----
    ``percent = 100 * count / (n_wbc + n_unidentified)`` for every row; 0 when the
    group has no white cell.
    """
    groups = group_values(table, by)
    cells = counted_cells(table, threshold=threshold)
    keep = (cells["kind"] != "not_classed").to_numpy()
    frame = pd.DataFrame(
        {
            "group": groups[keep],
            "label": cells["counted"].to_numpy()[keep],
            "kind": cells["kind"].to_numpy()[keep],
        }
    )
    columns = ["group", "label", "kind", "count", "percent"]
    if not len(frame):
        return pd.DataFrame(
            {c: pd.Series(dtype=float if c == "percent" else object) for c in columns}
        )
    order = _class_order(table, classes, pd.unique(frame["label"]))
    kinds = dict(zip(order, kinds_of(table, order), strict=True))
    white = [c for c in order if kinds[c] == "wbc"]
    other = [c for c in order if kinds[c] == "non_wbc"]
    listed = [(c, "wbc") for c in white] + [(UNIDENTIFIED, "unidentified")]
    listed += [(c, "non_wbc") for c in other]
    counts = frame.groupby(["group", "label"]).size()
    denom = frame[frame["kind"].isin(["wbc", "unidentified"])].groupby("group").size()
    rows = []
    for g in pd.unique(groups):
        total = int(denom.get(g, 0))
        for lab, kind in listed:
            n = int(counts.get((g, lab), 0))
            rows.append((g, lab, kind, n, 100.0 * n / total if total else 0.0))
    return pd.DataFrame(rows, columns=columns)


def differential_summary(
    table: CellTable,
    by: GroupBy = DEFAULT_GROUP_BY,
    *,
    threshold: float | None = None,
    target: int = DEFAULT_TARGET,
) -> pd.DataFrame:
    """Per-group progress of a differential, its warnings and its sign-off state.

    Parameters
    ----------
    table : CellTable
    by : str
        The ``obs`` column that makes the groups.
    threshold : float, optional
        See :func:`counted_cells`.
    target : int
        White cells to count per group (100 or 200 by convention).

    Returns
    -------
    pandas.DataFrame
        Indexed by group (first appearance order):

        - ``n_wbc`` (identified white cells), ``n_unidentified`` (of which
          ``n_low_confidence``, ``n_atypical``, ``n_unpredicted``), ``n_counted``
          (``n_wbc + n_unidentified``), ``n_non_wbc``, ``n_not_classed``;
        - ``target``, ``progress`` (``n_wbc / target``, at most 1);
        - ``warnings`` (list of str: the shift check's);
        - ``can_sign_off`` (target reached, nothing Unidentified, no warning),
          ``blockers`` (list of str: why not);
        - ``signed_off_by``, ``verified_by`` (comma-separated), ``signoff_void``
          (the reason the last sign-off no longer holds, ``""`` when it holds or
          there is none), ``status`` (:func:`signoff_text`).
    """
    if target <= 0:
        raise ValueError(f"target must be positive; got {target}")
    groups = group_values(table, by)
    cells = counted_cells(table, threshold=threshold)
    cells["group"] = groups
    warnings = shift_warnings(table, by)
    latest = {r["group"]: r for r in signoffs(table) if r.get("by") == by}
    events = None
    if latest:
        from napari_hemofm.core.audit import label_events

        events = label_events(table)
    # one pass over the cells: counts of each kind and reason per group
    order = pd.unique(groups)
    kinds = pd.crosstab(cells["group"], cells["kind"]).reindex(order, fill_value=0)
    reasons = pd.crosstab(cells["group"], cells["reason"]).reindex(order, fill_value=0)

    def n(frame: pd.DataFrame, g: str, column: str) -> int:
        return int(frame.at[g, column]) if column in frame.columns else 0

    out = {}
    for g in order:
        n_wbc, n_unid = n(kinds, g, "wbc"), n(kinds, g, "unidentified")
        row: dict[str, Any] = {
            "n_wbc": n_wbc,
            "n_unidentified": n_unid,
            "n_low_confidence": n(reasons, g, LOW_CONFIDENCE),
            "n_atypical": n(reasons, g, ATYPICAL),
            "n_unpredicted": n(reasons, g, NO_PREDICTION),
            "n_counted": n_wbc + n_unid,
            "n_non_wbc": n(kinds, g, "non_wbc"),
            "n_not_classed": n(kinds, g, "not_classed"),
            "target": int(target),
            "progress": min(1.0, n_wbc / target),
            "warnings": [warnings[g]] if g in warnings else [],
        }
        row["blockers"] = _blockers(row)
        row["can_sign_off"] = not row["blockers"]
        record = latest.get(g)
        void = ""
        if record is not None:
            void = _void_reason(table, record, cells[groups == g], events)
        row["signed_off_by"] = "" if record is None else str(record["user"])
        row["verified_by"] = (
            "" if record is None else ", ".join(v["user"] for v in record.get("verified", []))
        )
        row["signoff_void"] = void
        row["status"] = signoff_text(row, record)
        out[g] = row
    frame = pd.DataFrame.from_dict(out, orient="index")
    frame.index.name = "group"
    return frame


def _blockers(row: dict[str, Any], *, override: bool = False) -> list[str]:
    """Why a group cannot be signed off (empty: it can)."""
    out = []
    if row["n_wbc"] < row["target"]:
        out.append(f"{row['n_wbc']} / {row['target']} white cells counted")
    n = row["n_unidentified"]
    if n:
        out.append(
            f"{n} Unidentified cell{'s' if n != 1 else ''}: label them (or mark them Not classed)"
        )
    if row["warnings"] and not override:
        out.append("a shift warning stands: label some cells first, or override it with a reason")
    return out


def signoff_text(row: dict[str, Any] | pd.Series, record: dict[str, Any] | None = None) -> str:
    """The one sentence that says where a group's sign-off stands (widget, CLI, report).

    Parameters
    ----------
    row : dict or Series
        A :func:`differential_summary` row (needs ``blockers``; ``signoff_void`` and
        ``signed_off_by`` when read from a summary).
    record : dict, optional
        The group's current sign-off record (default: none, or what ``row`` says).
    """
    void = str(row.get("signoff_void", "") or "")
    if record is not None:
        who = f"{record['user']} at {_short_time(record['time'])}"
        if void:
            return f"Sign-off by {who} VOID: {void}. Sign off again."
        text = f"Signed off by {who}"
        if record.get("override"):
            text += f" (warning overridden: {record['override']})"
        verified = record.get("verified", [])
        if verified:
            text += "; verified by " + ", ".join(
                f"{v['user']} at {_short_time(v['time'])}" for v in verified
            )
        return text + "."
    blockers = list(row.get("blockers", []))
    if not blockers:
        return "Ready to sign off."
    return "Not ready to sign off: " + "; ".join(blockers) + "."


def _short_time(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso


# ------------------------------------------------------------------- sign-off
def signoffs(table: CellTable) -> list[dict[str, Any]]:
    """Every sign-off record stored with the project, oldest first.

    Each record: ``by``, ``group``, ``user``, ``time`` (ISO, UTC), ``target``,
    ``threshold``, ``n_wbc``, ``n_non_wbc``, ``counts`` (label -> count),
    ``override`` (the written reason, ``""`` when none), ``warnings``,
    ``fingerprint`` (of the group's labels and counts) and ``verified`` (a list of
    ``{"user", "time"}``).
    """
    raw = table.meta.get(SIGNOFF_KEY)
    if raw is None or (isinstance(raw, str) and not raw):
        return []
    return list(json.loads(str(raw)))


def current_signoff(table: CellTable, by: GroupBy, group: str) -> dict[str, Any] | None:
    """The last sign-off record of ``group`` (grouped ``by``), or ``None``."""
    found = None
    for record in signoffs(table):
        if record.get("by") == by and record.get("group") == group:
            found = record
    return found


def _fingerprint(part: pd.DataFrame, table: CellTable) -> str:
    """Order-free hash of a group's cells, curated labels and counted classes."""
    labels = table.obs["label"].astype(object).reindex(part.index)
    frame = pd.DataFrame(
        {
            "cell": part.index.astype(str),
            "label": labels.fillna("").astype(str).to_numpy(),
            "counted": part["counted"].astype(str).to_numpy(),
        }
    )
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy(dtype=np.uint64)
    return f"{int(hashed.sum(dtype=np.uint64)):016x}-{len(frame)}"


def _void_reason(
    table: CellTable,
    record: dict[str, Any],
    part: pd.DataFrame,
    events: pd.DataFrame | None = None,
) -> str:
    """Why a sign-off no longer holds (``""``: it holds).

    Any label change of one of the group's cells after the sign-off voids it (the
    audit trail says so, also for a change undone later); so does any change of the
    group's cells or counted classes (a fingerprint, for tables without a journal).
    """
    if events is None:
        from napari_hemofm.core.audit import label_events

        events = label_events(table)
    if len(events):
        mine = events[events["cell_id"].isin(part.index)]
        if len(mine):
            when = pd.to_datetime(mine["time"], utc=True, format="ISO8601", errors="coerce")
            after = mine[(when > pd.Timestamp(record["time"])).to_numpy()]
            if len(after):
                n = after["cell_id"].nunique()
                return f"{n} cell label{'s' if n != 1 else ''} changed since"
    if record.get("fingerprint") and record["fingerprint"] != _fingerprint(part, table):
        return "the group's cells or counts changed since"
    return ""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _group_part(table: CellTable, by: GroupBy, group: str, threshold: float | None):
    cells = counted_cells(table, threshold=threshold)
    part = cells[group_values(table, by) == group]
    return part


def sign_off(
    table: CellTable,
    group: str,
    by: GroupBy = DEFAULT_GROUP_BY,
    *,
    user: str | None = None,
    threshold: float | None = None,
    target: int = DEFAULT_TARGET,
    override: str | None = None,
) -> dict[str, Any]:
    """Record that ``user`` signed off the differential of ``group``.

    Allowed when the group's identified white cells reach ``target``, no cell is
    Unidentified and no shift warning stands; a warning can be overridden by giving
    a written reason (``override``), the other rules cannot. The record (see
    :func:`signoffs`) is saved with the project (``uns["hemofm"]["signoffs"]``, a
    JSON list, since group names such as paths cannot be HDF5 keys) and shows in
    ``hemofm audit``.

    Parameters
    ----------
    table : CellTable
    group : str
    by : str
        The ``obs`` column of the groups.
    user : str, optional
        Default: the login name.
    threshold : float, optional
        See :func:`counted_cells`.
    target : int
        White cells the count needs.
    override : str, optional
        Written reason for signing despite a shift warning.

    Returns
    -------
    dict
        The record.

    Raises
    ------
    ValueError
        If the group is unknown or a rule is not met (the message says which).
    """
    from napari_hemofm.core.journal import _user

    summary = differential_summary(table, by, threshold=threshold, target=target)
    if group not in summary.index:
        raise ValueError(f"no {by} named {group!r}; there are {len(summary)}")
    row = summary.loc[group].to_dict()
    reason = (override or "").strip()
    blockers = _blockers(row, override=bool(reason))
    if blockers:
        raise ValueError(f"{group}: cannot sign off: " + "; ".join(blockers))
    counts = differential_counts(table, by, threshold=threshold)
    counts = counts[(counts["group"] == group) & (counts["count"] > 0)]
    record = {
        "by": by,
        "group": group,
        "user": user or _user(),
        "time": _now(),
        "target": int(target),
        "threshold": float(threshold if threshold is not None else stored_threshold(table)),
        "n_wbc": int(row["n_wbc"]),
        "n_non_wbc": int(row["n_non_wbc"]),
        "counts": {str(r.label): int(r.count) for r in counts.itertuples()},
        "override": reason if row["warnings"] else "",
        "warnings": list(row["warnings"]),
        "fingerprint": _fingerprint(_group_part(table, by, group, threshold), table),
        "verified": [],
    }
    table.update_meta(**{SIGNOFF_KEY: json.dumps([*signoffs(table), record])})
    return record


def verify_sign_off(
    table: CellTable,
    group: str,
    by: GroupBy = DEFAULT_GROUP_BY,
    *,
    user: str | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """A second reader confirms a group's sign-off (the four-eyes check).

    Raises
    ------
    ValueError
        If the group has no sign-off, it is void, or ``user`` is the signer.
    """
    from napari_hemofm.core.journal import _user

    user = user or _user()
    records = signoffs(table)
    at = [i for i, r in enumerate(records) if r.get("by") == by and r.get("group") == group]
    if not at:
        raise ValueError(f"{group}: there is no sign-off to verify")
    record = records[at[-1]]
    if user == record["user"]:
        raise ValueError(f"{group}: {user} signed it off; another reader must verify it")
    void = _void_reason(table, record, _group_part(table, by, group, threshold))
    if void:
        raise ValueError(f"{group}: the sign-off is void ({void}): sign off again first")
    record.setdefault("verified", []).append({"user": user, "time": _now()})
    table.update_meta(**{SIGNOFF_KEY: json.dumps(records)})
    return record


def report_json(
    table: CellTable,
    by: GroupBy = DEFAULT_GROUP_BY,
    *,
    threshold: float | None = None,
    target: int = DEFAULT_TARGET,
) -> dict[str, Any]:
    """The summary ``hemofm report --json`` prints (DESIGN.md).

    Returns
    -------
    dict
        ``{"by", "threshold", "target", "groups": [{"group", "n_wbc", "n_unidentified",
        "n_non_wbc", "can_sign_off", "warnings", "status"}, ...]}``.
    """
    summary = differential_summary(table, by, threshold=threshold, target=target)
    groups = [
        {
            "group": str(g),
            "n_wbc": int(r["n_wbc"]),
            "n_unidentified": int(r["n_unidentified"]),
            "n_non_wbc": int(r["n_non_wbc"]),
            "can_sign_off": bool(r["can_sign_off"]),
            "warnings": list(r["warnings"]),
            "status": str(r["status"]),
        }
        for g, r in summary.iterrows()
    ]
    used = float(threshold if threshold is not None else stored_threshold(table))
    return {"by": by, "threshold": used, "target": int(target), "groups": groups}


def display_name(table: CellTable, label: str) -> str:
    """How a label reads in a report: as written, with the catalogue's name when it differs."""
    if label == UNIDENTIFIED:
        return label
    name = resolve(table, label).name
    return label if name.casefold() == str(label).casefold() else f"{label} ({name})"

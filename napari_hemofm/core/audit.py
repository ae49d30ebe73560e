"""The audit trail: who changed which cell's label from what to what and when, and sign-offs.

Two sources make the whole history of a project:

- the label journal beside the project (:mod:`~.journal`): the changes made since the
  last save, one record per change with time, user, origin, cells, new labels and
  (from journals that carry it) the previous labels ``"old"``;
- ``uns["hemofm"]["audit"]`` inside the project: every earlier change, one row per
  cell, as column arrays (``time``, ``user``, ``origin``, ``cell_id``, ``old``,
  ``new``; ``""`` means no label). :func:`~.io.save_project` moves the journal's
  records there (:func:`absorb_records`) before it writes the file and empties the
  journal, so no change drops out of the history;

plus the sign-off records (:func:`~.report.signoffs`). ``hemofm audit PROJECT`` prints
:func:`audit_trail`; the Review panel and the cell viewer show :func:`cell_history`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable

AUDIT_KEY = "audit"
"""``uns["hemofm"]`` key of the saved label history (column arrays)."""
COLUMNS = ("time", "user", "origin", "cell_id", "old", "new")
"""Columns of a label event."""


def _empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def journal_events(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Label events of journal records, one row per cell.

    Parameters
    ----------
    records : iterable of dict
        :meth:`~.journal.LabelJournal.records` (``time``, ``user``, ``origin``,
        ``cell_ids``, ``labels`` and optionally ``old``).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`COLUMNS`; ``old`` is ``None`` where the record does not carry it.
    """
    rows = []
    for record in records:
        ids = record.get("cell_ids", [])
        new = record.get("labels", [])
        old = record.get("old")
        for i, (cell, label) in enumerate(zip(ids, new, strict=False)):
            rows.append(
                (
                    str(record.get("time", "")),
                    str(record.get("user", "")),
                    str(record.get("origin", "")),
                    str(cell),
                    None if old is None or i >= len(old) else _text(old[i]),
                    _text(label),
                )
            )
    return pd.DataFrame(rows, columns=list(COLUMNS)) if rows else _empty()


def saved_events(table: CellTable) -> pd.DataFrame:
    """The label history saved inside the project (``uns["hemofm"]["audit"]``)."""
    raw = table.meta.get(AUDIT_KEY)
    if raw is None or not len(raw.get("cell_id", [])):
        return _empty()
    return pd.DataFrame({c: np.asarray(raw[c]).astype(str).astype(object) for c in COLUMNS})


def _pending(table: CellTable) -> pd.DataFrame:
    """Changes not yet saved into the project: kept in memory, then in the journal."""
    records = table.unsaved_records
    journal = getattr(table, "journal", None)
    if journal is not None:
        records += journal.records()
    return journal_events(records) if records else _empty()


def _fill_old(events: pd.DataFrame) -> pd.DataFrame:
    """Where a record did not carry the previous label, take the cell's last known one."""
    missing = events["old"].isna()
    if missing.any():
        previous = events.groupby("cell_id", sort=False)["new"].shift(1)
        events.loc[missing, "old"] = previous[missing].fillna("")
    return events


def label_events(table: CellTable) -> pd.DataFrame:
    """Every label change of a project, oldest first: saved history, then the journal.

    Returns
    -------
    pandas.DataFrame
        Columns ``time`` (ISO 8601, UTC), ``user``, ``origin``, ``cell_id``, ``old``,
        ``new`` (``""`` = no label). Labels a project was created with (crop folders)
        are not changes and are not listed.
    """
    parts = [p for p in (saved_events(table), _pending(table)) if len(p)]
    if not parts:
        return _empty()
    events = pd.concat(parts, ignore_index=True)
    return _fill_old(events).reset_index(drop=True)


def cell_history(table: CellTable, cell_id: str) -> pd.DataFrame:
    """The label history of one cell, oldest first.

    Parameters
    ----------
    table : CellTable
    cell_id : str

    Returns
    -------
    pandas.DataFrame
        Columns ``time``, ``user``, ``origin``, ``old``, ``new``; empty when the cell
        was never relabelled.

    Raises
    ------
    KeyError
        If the table has no such cell.
    """
    table.positions([cell_id])  # KeyError naming an unknown id
    events = label_events(table)
    mine = events[events["cell_id"] == str(cell_id)]
    return mine.drop(columns="cell_id").reset_index(drop=True)


def audit_trail(table: CellTable) -> pd.DataFrame:
    """Label changes and sign-off events of a project, in time order.

    Returns
    -------
    pandas.DataFrame
        Columns ``time``, ``user``, ``event`` (``relabel``, ``sign-off``,
        ``verify``), ``cell_id`` (relabels), ``old``, ``new`` (relabels), ``group``
        (``by=value`` for sign-offs) and ``detail`` (counts, override reason).
    """
    from napari_hemofm.core.report import signoffs

    events = label_events(table)
    frame = events.assign(event="relabel", group="", detail=events["origin"])
    rows = []
    for record in signoffs(table):
        group = f"{record.get('by', '')}={record.get('group', '')}"
        counts = ", ".join(f"{k} {v}" for k, v in record.get("counts", {}).items())
        detail = f"{record.get('n_wbc', '?')} white cells: {counts}"
        if record.get("override"):
            detail += f"; warning overridden: {record['override']}"
        rows.append((record["time"], record["user"], "sign-off", group, detail))
        for check in record.get("verified", []):
            rows.append((check["time"], check["user"], "verify", group, f"of {record['user']}"))
    signs = pd.DataFrame(rows, columns=["time", "user", "event", "group", "detail"])
    cols = ["time", "user", "event", "cell_id", "old", "new", "group", "detail"]
    out = pd.concat([frame.reindex(columns=cols), signs.reindex(columns=cols)], ignore_index=True)
    if not len(out):
        return pd.DataFrame(columns=cols)
    out = out.fillna("")
    when = pd.to_datetime(out["time"], utc=True, format="ISO8601", errors="coerce")
    order = np.lexsort((np.arange(len(out)), when.to_numpy(dtype="datetime64[ns]")))
    return out.iloc[order].reset_index(drop=True)


def absorb_records(table: CellTable, records: list[dict[str, Any]] | None = None) -> int:
    """Fold journal records into ``uns["hemofm"]["audit"]`` (right before a save).

    :func:`~.io.save_project` calls this with the records its save is about to empty
    from the journal, so the saved file carries the whole history. Folding the same
    records twice (a save that failed after this step, then a retry) adds nothing:
    events equal in every column are kept once.

    Parameters
    ----------
    table : CellTable
    records : list of dict, optional
        Journal records (default: the table's journal's).

    Returns
    -------
    int
        Events in the saved history afterwards.
    """
    new = _pending(table) if records is None else journal_events(records)
    if not len(new):
        return len(saved_events(table))
    events = pd.concat([saved_events(table), new], ignore_index=True)
    events = _fill_old(events).fillna("").astype(str).drop_duplicates(ignore_index=True)
    table.update_meta(**{AUDIT_KEY: {c: events[c].to_numpy(dtype=str) for c in COLUMNS}})
    return len(events)

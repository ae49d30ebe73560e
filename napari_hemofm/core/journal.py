"""The label journal: every label change appended, flushed and fsynced before it counts.

A project ``name.h5ad`` has a journal ``name.labels.jsonl`` beside it (DESIGN.md): one
JSON object per label change,
``{"time", "user", "origin", "cell_ids", "labels", "old"}`` (``null`` label = removed;
``old`` holds each cell's label before the change, for the audit trail).
:meth:`LabelJournal.append` returns only after the line is on disk (``flush`` +
``os.fsync``), so a change the UI shows as saved survives a crash or a power cut;
:func:`~.io.load_project` replays the journal over the saved table, and
:func:`~.io.save_project` empties it once the table itself is safely written.

What a crash can leave behind, and what opening for writing does about it
(:meth:`LabelJournal.repair`, before anything is appended):

- a *torn tail*: bytes after the last newline, from a write the process never
  finished (broken UTF-8 included). Its change was never acknowledged: it is cut off,
  so the next record does not get glued to it;
- a line that is not a valid record (not JSON, JSON that is not a record, wrong
  types, or cells the table does not hold): it is moved to
  ``name.labels.rejected.jsonl`` (with the reason, as one JSON line) and replay goes
  on past it. A record naming some unknown cells keeps its known cells in the journal.

A read-only session (another process holds the project's lock) skips the same lines
in memory and changes no file. Replay is vectorised: the last label of each cell is
found with one pass over the records, then written with one
:meth:`~.cells.CellTable.set_labels` per origin, so N records on M cells cost
O(N + M).
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.lock import LockInfo, ProjectLock

JOURNAL_SUFFIX = ".labels.jsonl"
REJECTED_SUFFIX = ".labels.rejected.jsonl"


class ProjectReadOnlyError(RuntimeError):
    """The project was opened read-only (another process holds its lock)."""


class JournalWarning(UserWarning):
    """Lines of a label journal were cut off or moved to the rejected file."""


def _stem(project: Path) -> str:
    return project.name[: -len(".h5ad")] if project.name.endswith(".h5ad") else project.name


def journal_path(project: str | Path) -> Path:
    """``<name>.labels.jsonl`` beside the project file ``<name>.h5ad``.

    Symbolic links are resolved first: a project opened through a link keeps its journal
    beside the real file, where its data is written (and where the lock is, see
    :func:`~.lock.lock_path`), whichever name opened it.
    """
    project = Path(os.path.realpath(Path(project).expanduser()))
    return project.with_name(_stem(project) + JOURNAL_SUFFIX)


def rejected_path(project_or_journal: str | Path) -> Path:
    """``<name>.labels.rejected.jsonl`` beside the project (or its journal)."""
    path = Path(project_or_journal)
    if path.name.endswith(JOURNAL_SUFFIX):
        return path.with_name(path.name[: -len(JOURNAL_SUFFIX)] + REJECTED_SUFFIX)
    return path.with_name(_stem(path) + REJECTED_SUFFIX)


def project_of(journal: str | Path) -> Path:
    """The ``.h5ad`` project a journal file belongs to."""
    journal = Path(journal)
    name = journal.name
    stem = name[: -len(JOURNAL_SUFFIX)] if name.endswith(JOURNAL_SUFFIX) else name
    return journal.with_name(stem + ".h5ad")


def current_user() -> str:
    """The login name written with every change and into locks ("unknown" when none)."""
    try:
        return getpass.getuser()
    except Exception:  # no login name (e.g. some containers)
        return "unknown"


_user = current_user  # the name other modules imported before


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def validate_record(obj: Any) -> dict[str, Any]:
    """Check that a parsed JSON line is a label record; return it.

    A record is an object with ``cell_ids`` (list of str) and ``labels`` (list of str
    or null, as long); optional ``time``, ``user``, ``origin`` (str) and ``old`` (list
    of str or null, as long as ``cell_ids``).

    Raises
    ------
    ValueError
        Naming what is wrong.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"a {type(obj).__name__}, not a record (JSON object)")
    ids, labels = obj.get("cell_ids"), obj.get("labels")
    if not isinstance(ids, list) or not all(isinstance(c, str) for c in ids):
        raise ValueError("'cell_ids' is not a list of strings")
    if not isinstance(labels, list) or not all(v is None or isinstance(v, str) for v in labels):
        raise ValueError("'labels' is not a list of strings or nulls")
    if len(ids) != len(labels):
        raise ValueError(f"{len(ids)} cell_ids but {len(labels)} labels")
    for key in ("time", "user", "origin"):
        if key in obj and not isinstance(obj[key], str):
            raise ValueError(f"{key!r} is not a string")
    old = obj.get("old")
    if old is not None and (
        not isinstance(old, list)
        or len(old) != len(ids)
        or not all(v is None or isinstance(v, str) for v in old)
    ):
        raise ValueError("'old' is not a list of strings or nulls as long as 'cell_ids'")
    return obj


@dataclass
class JournalRead:
    """What :meth:`LabelJournal.read` found in a journal file.

    Attributes
    ----------
    records : list of dict
        Valid records, oldest first.
    lines : list of bytes
        The raw line (with its newline) of each record in ``records``.
    rejected : list of (bytes, str)
        Complete lines that are not records, with the reason.
    torn : bytes
        Bytes after the last newline (a write that never finished), else ``b""``.
    size : int
        Size of the file when read.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    rejected: list[tuple[bytes, str]] = field(default_factory=list)
    torn: bytes = b""
    size: int = 0


def parse_journal(data: bytes) -> JournalRead:
    """Split a journal's bytes into valid records, rejected lines and a torn tail.

    Parameters
    ----------
    data : bytes
        The whole file.

    Returns
    -------
    JournalRead
    """
    out = JournalRead(size=len(data))
    end = data.rfind(b"\n") + 1
    out.torn = data[end:]
    for raw in data[:end].splitlines(keepends=True):
        if not raw.strip():
            continue  # an empty line is harmless
        try:
            record = validate_record(json.loads(raw.decode("utf-8")))
        except UnicodeDecodeError as exc:
            out.rejected.append((raw, f"not UTF-8 ({exc.reason} at byte {exc.start})"))
            continue
        except json.JSONDecodeError as exc:
            out.rejected.append((raw, f"not JSON ({exc.msg})"))
            continue
        except ValueError as exc:
            out.rejected.append((raw, str(exc)))
            continue
        out.records.append(record)
        out.lines.append(raw)
    return out


class LabelJournal:
    """Append-only, crash-safe log of label changes for one project.

    Parameters
    ----------
    path : str or Path
        The ``.labels.jsonl`` file (created on first append).
    user : str, optional
        Name written with each change (default: the login name).
    read_only : bool
        A read-only session's journal: :meth:`append` and :meth:`clear` raise
        :class:`ProjectReadOnlyError`, :meth:`replay` changes no file.
    lock : ProjectLock, optional
        The project lock this session holds (released by :meth:`close`). Without one,
        each append takes the lock for its own duration, so that nothing is appended
        while another process has the project open.
    holder : LockInfo, optional
        Who holds the project when this journal is read-only.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        user: str | None = None,
        read_only: bool = False,
        lock: ProjectLock | None = None,
        holder: LockInfo | None = None,
    ) -> None:
        self.path = Path(path)
        self.user = user or current_user()
        self.read_only = bool(read_only)
        self.lock = lock
        self.holder = holder
        #: ``(st_ino, st_size, st_mtime_ns)`` of the project file when this session
        #: last read or wrote it (see :func:`~.io.save_project`).
        self.seen: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    @property
    def project(self) -> Path:
        """The ``.h5ad`` file this journal belongs to."""
        return project_of(self.path)

    def _check_writable(self) -> None:
        if self.read_only:
            who = f": {self.holder.describe()} has it open" if self.holder else ""
            raise ProjectReadOnlyError(
                f"{self.project.name} is open read-only{who}; labels cannot be changed"
            )

    # ------------------------------------------------------------------ writing
    def append(
        self,
        cell_ids: Sequence[str],
        labels: Sequence[str | None],
        *,
        origin: str = "user",
        old: Sequence[str | None] | None = None,
    ) -> None:
        """Write one change and return once it is on disk.

        Parameters
        ----------
        cell_ids : sequence of str
        labels : sequence of str or None
            New label per cell (``None`` removes it).
        origin : str
            ``label_origin`` of the change.
        old : sequence of str or None, optional
            Each cell's label before the change (``None`` = unlabelled).

        Raises
        ------
        ProjectReadOnlyError
            When the journal is read-only.
        ProjectLockedError
            When this session holds no lock and another process has the project open.
        """
        self._check_writable()
        record = make_record(cell_ids, labels, origin=origin, old=old, user=self.user)
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock, self._write_lock():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as fh:
                _cut_torn_tail(fh)
                start = fh.seek(0, os.SEEK_END)
                try:
                    fh.write(line)
                    fh.flush()
                    os.fsync(fh.fileno())
                except BaseException:
                    # a failed write (disk full) must not leave half a line for the
                    # next record to be glued to
                    fh.truncate(start)
                    raise

    def _write_lock(self) -> Any:
        """The lock held around one write: this session's, or one taken for it."""
        import contextlib

        from napari_hemofm.core.lock import ProjectLock

        if self.lock is not None:
            return contextlib.nullcontext()
        return ProjectLock.acquire(self.project)

    def clear(self) -> None:
        """Empty the journal (after the table it describes was saved)."""
        self._check_writable()
        with self._lock:
            if self.path.exists():
                with open(self.path, "w", encoding="utf-8") as fh:
                    fh.flush()
                    os.fsync(fh.fileno())

    def close(self) -> None:
        """Release this session's project lock (if it holds one)."""
        lock, self.lock = self.lock, None
        if lock is not None:
            lock.release()

    # ------------------------------------------------------------------ reading
    def read(self) -> JournalRead:
        """Parse the journal file (no file is changed); empty when there is none."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return JournalRead()
        return parse_journal(data)

    def records(self) -> list[dict[str, Any]]:
        """The valid records in the journal, oldest first (torn and invalid lines skipped)."""
        return self.read().records

    def replay(self, table: CellTable) -> int:
        """Apply the journal's changes to ``table``; return how many records were applied.

        Each cell gets the label of the last record naming it (one
        :meth:`~.cells.CellTable.set_labels` per origin; new class names join the class
        list in the order they first appear). A writable journal is repaired first
        (:meth:`repair`): torn tail cut, invalid records and unknown cells moved to the
        rejected file, with a :class:`JournalWarning`. A read-only one skips them.

        Parameters
        ----------
        table : CellTable
            The table read from the project file, before this journal is attached.

        Returns
        -------
        int
            Records with at least one cell of ``table``.
        """
        import pandas as pd

        found = self.read()
        known = table.cell_ids
        n_per = np.array([len(r["cell_ids"]) for r in found.records], dtype=np.int64)
        ids = [c for r in found.records for c in r["cell_ids"]]
        labels = [v for r in found.records for v in r["labels"]]
        origins = np.repeat(
            np.array([r.get("origin", "user") for r in found.records], dtype=object), n_per
        )
        rec_of = np.repeat(np.arange(len(found.records)), n_per)
        is_known = pd.Index(ids, dtype=object).isin(known) if ids else np.zeros(0, bool)
        unknown_recs = np.unique(rec_of[~is_known]) if len(ids) else np.zeros(0, np.int64)
        if not self.read_only:
            self.repair(found, rec_of, is_known, unknown_recs)
        elif found.torn or found.rejected or len(unknown_recs):
            _warn(self, found, len(unknown_recs), moved=False)
        if not is_known.any():
            return 0
        frame = pd.DataFrame(
            {
                "cell_id": np.asarray(ids, dtype=object)[is_known],
                "label": np.asarray(labels, dtype=object)[is_known],
                "origin": origins[is_known],
            }
        )
        new_classes = [
            str(v) for v in pd.unique(frame["label"].dropna()) if str(v) not in table.classes
        ]
        if new_classes:
            table.set_classes([*table.classes, *new_classes])
        last = frame.drop_duplicates("cell_id", keep="last")
        origin_of = last["origin"].where(last["label"].notna(), "user")
        # a replay is not a new change: recorded again, it would twin the journal's own
        # records (as unsaved records of a read-only open, or appended to the journal)
        for origin, group in last.groupby(origin_of.to_numpy(), sort=False):
            table.set_labels(
                group["cell_id"].tolist(),
                group["label"].tolist(),
                origin=str(origin),
                record=False,
            )
        return len(np.unique(rec_of[is_known]))

    def repair(
        self,
        found: JournalRead | None = None,
        rec_of: np.ndarray | None = None,
        is_known: np.ndarray | None = None,
        unknown_recs: np.ndarray | None = None,
    ) -> int:
        """Cut a torn tail and move invalid lines out of the journal file.

        Called on opening for writing, before anything is appended. Invalid lines
        (and the unknown cells of a record, when ``is_known`` is given) go to
        :func:`rejected_path` as ``{"time", "reason", "line"}`` records, fsynced before
        the journal is rewritten (atomically, through a temporary file); a torn tail is
        cut in place and kept in the rejected file too (it was never acknowledged).

        Returns
        -------
        int
            Lines cut or moved.
        """
        from napari_hemofm.core.io import replace_atomically

        self._check_writable()
        if found is None:
            found = self.read()
        if unknown_recs is None:
            unknown_recs = np.zeros(0, dtype=np.int64)
        if not (found.torn or found.rejected or len(unknown_recs)):
            return 0
        moved: list[dict[str, Any]] = []
        for raw, reason in found.rejected:
            moved.append(_rejected_entry(raw, reason))
        kept = list(found.lines)
        for r in unknown_recs.tolist():
            record = found.records[r]
            mask = is_known[rec_of == r]
            gone = [c for c, k in zip(record["cell_ids"], mask, strict=True) if not k]
            moved.append(
                _rejected_entry(found.lines[r], f"unknown cell(s) {gone[:5]} ({len(gone)} in all)")
            )
            if mask.any():
                rest = dict(record)
                for key in ("cell_ids", "labels", "old"):
                    if key in rest:
                        rest[key] = [v for v, k in zip(record[key], mask, strict=True) if k]
                kept[r] = (json.dumps(rest, ensure_ascii=False) + "\n").encode("utf-8")
            else:
                kept[r] = b""
        if found.torn:
            moved.append(_rejected_entry(found.torn, "torn tail (a write that never finished)"))
        with self._lock:
            if moved:
                rejected = rejected_path(self.path)
                with open(rejected, "ab") as fh:
                    for entry in moved:
                        fh.write((json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
                    fh.flush()
                    os.fsync(fh.fileno())
            if found.rejected or len(unknown_recs):
                replace_atomically(self.path, b"".join(kept))
            else:
                with open(self.path, "r+b") as fh:
                    fh.truncate(found.size - len(found.torn))
                    fh.flush()
                    os.fsync(fh.fileno())
        _warn(self, found, len(unknown_recs), moved=True)
        return len(moved)


def make_record(
    cell_ids: Sequence[str],
    labels: Sequence[str | None],
    *,
    origin: str = "user",
    old: Sequence[Any] | None = None,
    user: str | None = None,
) -> dict[str, Any]:
    """One label record, as the journal writes it and the audit trail reads it.

    Parameters
    ----------
    cell_ids : sequence of str, length n
    labels : sequence of str or None, length n
        The new labels (None = removed).
    origin : str
        ``label_origin`` of the change.
    old : sequence, length n, optional
        The labels before the change.
    user : str, optional
        Who made it (default: :func:`current_user`).

    Returns
    -------
    dict
        ``{"time", "user", "origin", "cell_ids", "labels"[, "old"]}``.
    """
    record: dict[str, Any] = {
        "time": _now(),
        "user": user or current_user(),
        "origin": origin,
        "cell_ids": [str(c) for c in cell_ids],
        "labels": [None if v is None else str(v) for v in labels],
    }
    if old is not None:
        record["old"] = [_text_or_none(v) for v in old]
    return record


def _text_or_none(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return str(value)


def _rejected_entry(raw: bytes, reason: str) -> dict[str, Any]:
    return {
        "time": _now(),
        "reason": reason,
        "line": raw.rstrip(b"\n").decode("utf-8", errors="backslashreplace"),
    }


def _warn(journal: LabelJournal, found: JournalRead, n_unknown: int, *, moved: bool) -> None:
    parts = []
    if found.torn:
        parts.append(f"a torn last line ({len(found.torn)} bytes, never acknowledged)")
    if found.rejected:
        parts.append(f"{len(found.rejected)} line(s) that are not label records")
    if n_unknown:
        parts.append(f"{n_unknown} record(s) naming cells the project does not hold")
    where = (
        f"cut out and kept in {rejected_path(journal.path).name}"
        if moved
        else "skipped (read-only: the file is left as it is)"
    )
    warnings.warn(
        f"{journal.path.name}: {'; '.join(parts)}; {where}", JournalWarning, stacklevel=3
    )


def _cut_torn_tail(fh: Any) -> None:
    """Truncate an open ``a+b`` file after its last newline (no-op when it ends with one)."""
    size = fh.seek(0, os.SEEK_END)
    if size == 0:
        return
    fh.seek(size - 1)
    if fh.read(1) == b"\n":
        return
    # read back in blocks until the last newline
    pos, block = size, 1 << 16
    while pos > 0:
        start = max(0, pos - block)
        fh.seek(start)
        chunk = fh.read(pos - start)
        idx = chunk.rfind(b"\n")
        if idx >= 0:
            fh.truncate(start + idx + 1)
            return
        pos = start
    fh.truncate(0)


# ------------------------------------------------------------- history hook
#: Functions called by :func:`~.io.save_project` right before it writes the project
#: file, with the table and the journal's valid records since the last save (which the
#: save then empties). This is where the records' history is folded into the table
#: (e.g. an audit trail in ``uns``) so that it survives the journal being emptied.
SAVE_HOOKS: list[Callable[[CellTable, list[dict[str, Any]]], None]] = []


def before_save(table: CellTable) -> list[dict[str, Any]]:
    """Fold the records the coming save will empty into the table; return them.

    Called by :func:`~.io.save_project` before it writes the file: the audit trail
    (:func:`~.audit.absorb_records`) keeps them in ``uns["hemofm"]["audit"]``, then
    :data:`SAVE_HOOKS` run. A table without a journal (never saved) has no records.
    """
    from napari_hemofm.core.audit import absorb_records

    journal = table.journal
    records = [] if journal is None else journal.records()
    # changes made before the table had a project file (a new napari session): kept in
    # memory by the table, so the first save puts them in the audit trail too
    records = [*table.take_unsaved_records(), *records]
    if records:
        absorb_records(table, records)  # the audit trail keeps them in uns["hemofm"]
    for hook in list(SAVE_HOOKS):
        hook(table, records)
    return records

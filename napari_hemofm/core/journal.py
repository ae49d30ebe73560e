"""The label journal: every label change appended, flushed and fsynced before it counts.

A project ``name.h5ad`` has a journal ``name.labels.jsonl`` beside it (DESIGN.md): one
JSON object per label change, ``{"time", "user", "origin", "cell_ids", "labels"}``
(``null`` label = removed). :meth:`LabelJournal.append` returns only after the line is
on disk (``flush`` + ``os.fsync``), so a change the UI shows as saved survives a crash
or a power cut; :func:`~.io.load_project` replays the journal over the saved table, and
:func:`~.io.save_project` empties it once the table itself is safely written. A torn
last line (the process died mid-write) is ignored on replay: its change was never
acknowledged.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable

JOURNAL_SUFFIX = ".labels.jsonl"


def journal_path(project: str | Path) -> Path:
    """``<name>.labels.jsonl`` beside the project file ``<name>.h5ad``."""
    project = Path(project)
    stem = project.name[: -len(".h5ad")] if project.name.endswith(".h5ad") else project.name
    return project.with_name(stem + JOURNAL_SUFFIX)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (e.g. some containers)
        return "unknown"


class LabelJournal:
    """Append-only, crash-safe log of label changes for one project.

    Parameters
    ----------
    path : str or Path
        The ``.labels.jsonl`` file (created on first append).
    user : str, optional
        Name written with each change (default: the login name).
    """

    def __init__(self, path: str | Path, *, user: str | None = None) -> None:
        self.path = Path(path)
        self.user = user or _user()
        self._lock = threading.Lock()

    def append(
        self,
        cell_ids: Sequence[str],
        labels: Sequence[str | None],
        *,
        origin: str = "user",
    ) -> None:
        """Write one change and return once it is on disk.

        Parameters
        ----------
        cell_ids : sequence of str
        labels : sequence of str or None
            New label per cell (``None`` removes it).
        origin : str
            ``label_origin`` of the change.
        """
        record = {
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
            "user": self.user,
            "origin": origin,
            "cell_ids": [str(c) for c in cell_ids],
            "labels": [None if v is None else str(v) for v in labels],
        }
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())

    def records(self) -> list[dict[str, Any]]:
        """The complete records in the journal, oldest first (a torn last line is skipped)."""
        if not self.path.is_file():
            return []
        out = []
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # torn write: never acknowledged
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break
        return out

    def replay(self, table: CellTable) -> int:
        """Apply the journal's changes to ``table`` in order; return how many were applied.

        Changes that name cells the table does not hold are skipped.
        """
        applied = 0
        known = set(table.cell_ids)
        for record in self.records():
            pairs = [
                (c, v)
                for c, v in zip(record["cell_ids"], record["labels"], strict=False)
                if c in known
            ]
            if not pairs:
                continue
            ids, labels = zip(*pairs, strict=True)
            table.set_labels(list(ids), list(labels), origin=record.get("origin", "user"))
            applied += 1
        return applied

    def clear(self) -> None:
        """Empty the journal (after the table it describes was saved)."""
        with self._lock:
            if self.path.exists():
                with open(self.path, "w", encoding="utf-8") as fh:
                    fh.flush()
                    os.fsync(fh.fileno())

"""Reopening a project whose label journal holds records: vectorised replay vs a plain open.

A project saved with 200k cells, then labelled for a while without saving, reopens by
reading the ``.h5ad`` and replaying its journal (``<name>.labels.jsonl``). Issue 11
asks that 2,000 records on 200k cells reopen in well under 3x a plain open: the replay
must cost O(N + M) (one pass over the records, one ``set_labels`` per origin), not
O(N x M) (one ``set_labels``, itself O(M), per record), which is what 0.1 did.

Data: 200k crop cells (one source file each, 8 class folders; the files need not
exist: every open resolves the sources alike), 384-d float32 embeddings (DinoBloom-S),
20k labelled. The journal: ``--records`` records of 1 to 20 random cells each, random
classes (10 % removals), origins "user".

Rows (median seconds over ``--repeats`` opens, each of a fresh copy of the journal):

- ``plain open``: ``load_project`` with an empty journal (the baseline, ratio 1);
- ``open + N records``: ``load_project`` replaying the journal (vectorised);
- ``0.1 replay (per record)``: the same records applied one ``set_labels`` at a time
  after a plain open, as 0.1's replay did (for comparison; the ratio adds the open).

Run::

    python benchmarks/bench_project_reopen.py [--n 200000] [--records 2000] [--dim 384]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

CLASSES = [
    "neutrophil",
    "lymphocyte",
    "monocyte",
    "eosinophil",
    "basophil",
    "ig",
    "erythroblast",
    "platelet",
]


def make_project(path: Path, n: int, dim: int, seed: int = 0) -> list[str]:
    """Save a project of ``n`` crop cells; return the cell ids."""
    from napari_hemofm.core.cells import CellTable

    rng = np.random.default_rng(seed)
    cls = np.asarray(CLASSES, dtype=object)[rng.integers(0, len(CLASSES), n)]
    names = np.char.add(np.arange(n).astype(str), ".jpg").astype(object)
    rel = cls + "/" + names
    root = str(path.parent / "crops") + "/"
    labels = np.where(rng.random(n) < 0.1, cls, None)
    frame = pd.DataFrame(
        {
            "source": root + rel,
            "batch": "crops",
            "x": 32.0,
            "y": 32.0,
            "x0": 0,
            "y0": 0,
            "x1": 64,
            "y1": 64,
            "label": labels,
        },
        index=pd.Index("crops/" + rel + "#0", dtype=object),
    )
    table = CellTable()
    table.add_cells(frame, embeddings=rng.normal(size=(n, dim)).astype(np.float32))
    table.save(path)
    return table.cell_ids.tolist()


def make_journal(ids: list[str], n_records: int, seed: int = 1) -> bytes:
    """``n_records`` JSON lines of 1 to 20 random cells each."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_records):
        k = int(rng.integers(1, 21))
        cells = [ids[i] for i in rng.choice(len(ids), size=k, replace=False)]
        label = None if rng.random() < 0.1 else CLASSES[int(rng.integers(len(CLASSES)))]
        record = {
            "time": "2026-01-01T00:00:00.000+00:00",
            "user": "bench",
            "origin": "user",
            "cell_ids": cells,
            "labels": [label] * k,
            "old": [None] * k,
        }
        lines.append(json.dumps(record) + "\n")
    return "".join(lines).encode()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--records", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-old", action="store_true", help="skip the 0.1 replay row")
    args = parser.parse_args()

    from napari_hemofm.core.io import load_project
    from napari_hemofm.core.journal import journal_path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.h5ad"
        ids = make_project(path, args.n, args.dim)
        journal = make_journal(ids, args.records)
        empty = Path(tmp) / "empty.jsonl"
        empty.write_bytes(b"")
        full = Path(tmp) / "full.jsonl"
        full.write_bytes(journal)

        def reopen(source: Path):
            shutil.copy(source, journal_path(path))
            table = load_project(path)
            table.close()
            return table

        def old_replay():
            table = reopen(empty)
            table.journal = None  # apply only; 0.1 did not journal its replay
            for line in journal.splitlines():
                r = json.loads(line)
                table.set_labels(r["cell_ids"], r["labels"], origin=r["origin"])
            return table

        # the two ways agree
        new = reopen(full).column("label").astype(object)
        old = old_replay().column("label").astype(object)
        assert new.equals(old), "vectorised replay differs from record-by-record replay"

        rows = {
            "plain open": [timed(lambda: reopen(empty)) for _ in range(args.repeats)],
            f"open + {args.records:,} records": [
                timed(lambda: reopen(full)) for _ in range(args.repeats)
            ],
        }
        if not args.skip_old:
            rows["0.1 replay (per record)"] = [timed(old_replay) for _ in range(args.repeats)]

    base = statistics.median(rows["plain open"])
    print(
        f"{args.n:,} cells x {args.dim}-d, {args.records:,} journal records; "
        f"{platform.processor() or platform.machine()}, median of {args.repeats}"
    )
    print(f"{'':<28} {'seconds':>8} {'ratio':>7}")
    for name, times in rows.items():
        t = statistics.median(times)
        print(f"{name:<28} {t:>8.2f} {t / base:>7.2f}")


if __name__ == "__main__":
    main()

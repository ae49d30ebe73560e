"""The Review gallery at scale: how long its updates take with 100k cells.

A table of ``N`` cells (8 classes, 5 % curated, predictions preset and no embeddings, so
no retraining runs and only the widget is timed) in 50 in-memory smears; the Review
widget docked in a napari viewer. Each row is the median (and max) wall time of an
action plus the Qt events it triggers (``processEvents``):

- rebuild every section; relabel 1 / 20 cells (the cell moves to its section);
- the table write alone, for comparison;
- 2,000 / 20,000 new predictions arriving (``predictions_changed``);
- a 10k-cell / 1-cell selection made on the map (the gallery highlights and scrolls);
- a threshold change (every section rebuilt); one repaint; a zoom step.

Run under a display (``xvfb-run -a -s "-screen 0 1600x1050x24"`` on a server)::

    python benchmarks/bench_review_widget.py [N]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd

CLASSES = [
    "Neutrophil",
    "Lymphocyte",
    "Monocyte",
    "Eosinophil",
    "Basophil",
    "IG",
    "Erythroblast",
    "Platelet",
]


def make_table(n: int, rng: np.random.Generator):
    """``n`` cells in 50 smears, 5 % labelled, every cell predicted."""
    from napari_hemofm.core.cells import CellTable

    k = rng.integers(0, len(CLASSES), n)
    cx, cy = rng.uniform(20, 980, n), rng.uniform(20, 980, n)
    labels = np.array(CLASSES, dtype=object)[k]
    labels[rng.random(n) > 0.05] = None
    frame = pd.DataFrame(
        {
            "source": [f"s{i % 50}" for i in range(n)],
            "batch": np.where(np.arange(n) % 2, "a", "b"),
            "x": cx,
            "y": cy,
            "x0": (cx - 16).astype(int),
            "y0": (cy - 16).astype(int),
            "x1": (cx + 16).astype(int),
            "y1": (cy + 16).astype(int),
            "label": labels,
        },
        index=[f"b/s#{i}" for i in range(n)],
    )
    table = CellTable()
    table.set_classes(CLASSES)
    table.add_cells(frame)
    pred = np.array(CLASSES, dtype=object)[k]
    table.set_predictions(None, pred, rng.uniform(0.3, 1.0, n).astype(np.float32))
    return table, labels


def main() -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_hemofm._widgets._review import ReviewWidget
    from napari_hemofm._widgets._session import get_session

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    table, labels = make_table(n, rng)
    print(f"# {n} cells; table built in {time.perf_counter() - t0:.1f} s")
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    session = get_session(viewer)
    for i in range(50):
        session.add_image(f"s{i}", rng.integers(0, 255, (1000, 1000, 3), dtype=np.uint8))
    session.set_table(table)
    widget = ReviewWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Review")
    widget.resize(700, 1000)
    for _ in range(50):
        app.processEvents()
        time.sleep(0.01)

    rows = []

    def timed(name, fn, reps=5):
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            app.processEvents()
            times.append((time.perf_counter() - t) * 1000)
        rows.append((name, float(np.median(times)), max(times)))

    unlabelled = iter(np.flatnonzero(pd.isna(labels)).tolist())
    pool = np.flatnonzero(pd.isna(labels))

    def new_predictions(m):
        r = np.sort(rng.choice(n, m, replace=False))
        pred = np.array(CLASSES, dtype=object)[rng.integers(0, 8, m)]
        table.set_predictions(r, pred, rng.uniform(0.3, 1, m).astype(np.float32))
        widget.review.events.predictions_changed.emit(r)

    selection = np.sort(rng.choice(n, 10_000, replace=False))
    timed("rebuild every section", widget.rebuild, 3)
    timed("relabel 1 cell", lambda: widget.review.relabel([next(unlabelled)], "Monocyte"), 10)
    timed(
        "  (table write alone)",
        lambda: table.set_labels([table.cell_ids[next(unlabelled)]], "Monocyte"),
        10,
    )
    timed(
        "relabel 20 cells",
        lambda: widget.review.relabel(pool[rng.choice(len(pool), 20, replace=False)], "Basophil"),
    )
    timed("2,000 new predictions", lambda: new_predictions(2_000), 3)
    timed("20,000 new predictions", lambda: new_predictions(20_000), 2)
    timed(
        "select 10k cells on the map",
        lambda: session.select(selection[rng.permutation(10_000)[:9_999]], origin="map"),
        3,
    )
    timed("select 1 cell on the map", lambda: session.select([int(rng.integers(n))], origin="map"))
    timed(
        "threshold change (rebuild)",
        lambda: setattr(widget.review, "threshold", float(rng.uniform(0.4, 0.6))),
        2,
    )
    timed("repaint the visible gallery", widget.gallery.grab, 3)
    timed("zoom step", lambda: widget.set_zoom(int(rng.integers(100, 200))), 3)
    widget.close()
    viewer.close()
    print(f"{'action':32} {'median ms':>10} {'max ms':>9}")
    for name, med, mx in rows:
        print(f"{name:32} {med:10.1f} {mx:9.1f}")


if __name__ == "__main__":
    main()

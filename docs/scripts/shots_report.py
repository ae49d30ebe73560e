"""Screenshot of the printable report (docs/images/report_html.png) on real PBC crops.

Run (needs Chromium: ``apt-get install -y chromium``)::

    python docs/scripts/shots_report.py [--out docs/images/report_html.png]

Reads ../shared/data/pbc_dev (not shipped): 24 crops per class, embedded with the
offline ``handcrafted`` backend, split into two "patients". Half the cells of each class
keep their folder label (``neutrophil``, ``ig``, ``erythroblast``, ``platelet``: the
catalogue resolves them, so NRBC and platelets are counted per 100 white cells), the
probe predicts the rest; patient A's Unidentified cells are then labelled and patient A
is signed off and verified, patient B is left open. The project is written to a
temporary folder; ``hemofm report --html`` writes the report and Chromium takes the
screenshot.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "pbc_dev"
PER_CLASS = 24


def build(folder: Path) -> Path:
    """Copy, embed, label, predict and sign off the crops in ``folder``; return the project."""
    from napari_hemofm.core.catalogue import apply_preset
    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.embed import embed_table
    from napari_hemofm.core.inputs import collect_cells
    from napari_hemofm.core.models import load_backbone
    from napari_hemofm.core.review import Review

    crops = folder / "pbc"
    for cls in sorted(p.name for p in DATA.iterdir() if p.is_dir()):
        (crops / cls).mkdir(parents=True)
        for f in sorted((DATA / cls).iterdir())[:PER_CLASS]:
            shutil.copy(f, crops / cls / f.name)
    found = collect_cells([crops])
    table = CellTable()
    table.add_cells(found.cells)
    embed_table(table, load_backbone("handcrafted"))
    apply_preset(table, "Peripheral blood")
    n = table.n_cells
    table.set_column("slide", np.where(np.arange(n) % 2, "patient A", "patient B"))
    truth = table.obs["label"].astype(object).copy()
    rng = np.random.default_rng(0)
    hide = rng.permutation(n)[: n // 2]
    path = table.save(folder / "project.h5ad")
    review = Review.open(path)
    review.relabel(hide, None)
    review.retrain()
    a = (review.table.obs["slide"] == "patient A").to_numpy()
    section = review.section_of()
    unsure = np.flatnonzero(a & (section == "Unidentified"))
    for label in truth.iloc[unsure].unique():
        rows = unsure[(truth.iloc[unsure] == label).to_numpy()]
        review.relabel(rows, label, origin="user")
    review.sign_off("patient A", by="slide", user="dr_lee", target=50)
    review.verify_sign_off("patient A", by="slide", user="dr_okafor")
    review.save()
    review.close()
    return path


def main() -> int:
    """Build the project, write its report and screenshot it; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "report_html.png")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None or not DATA.is_dir():
        print("needs chromium and ../shared/data/pbc_dev", file=sys.stderr)
        return 1
    from napari_hemofm.cli import main as hemofm

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = build(tmp)
        html = tmp / "report.html"
        argv = ["report", str(path), "--by", "slide", "--target", "50", "--html", str(html)]
        if hemofm(argv) != 0:
            return 1
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp / 'profile'}",
                f"--screenshot={args.out}",
                "--window-size=1100,1500",
                html.as_uri(),
            ],
            check=True,
            capture_output=True,
        )
    print(f"screenshot -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

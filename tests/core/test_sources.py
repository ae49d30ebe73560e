"""Projects that move: sources stored absolute and relative, resolved on load."""

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_hemofm.cli import main
from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.io import load_project
from napari_hemofm.core.sources import (
    IMAGES_ROOT_KEY,
    RELATIVE_COLUMN,
    missing_sources,
    relocate_sources,
)
from napari_hemofm.core.thumbnails import ThumbnailCache

CLASSES = ("basophil", "monocyte", "neutrophil")


@pytest.fixture
def study(tmp_path, monkeypatch, shared_data):
    """A folder holding a crop folder (real PBC crops, 4 per class) and a project built
    from inside it with relative paths, as the README shows."""
    pbc = shared_data / "pbc_dev"
    root = tmp_path / "study"
    for name in CLASSES:
        (root / "crops" / name).mkdir(parents=True)
        for f in sorted((pbc / name).glob("*.jpg"))[:4]:
            shutil.copy(f, root / "crops" / name / f.name)
    monkeypatch.chdir(root)
    assert main(["embed", "crops", "--model", "handcrafted", "--out", "p.h5ad"]) == 0
    return root


def _thumbnails_read(table: CellTable) -> int:
    cache = ThumbnailCache(table.obs, size=32)
    got = cache.load(table.cell_ids)
    assert not cache.failed, next(iter(cache.failed.values()))
    return len(got)


def test_a_moved_folder_opens_from_anywhere_with_every_image(study, tmp_path, monkeypatch):
    """Move the folder holding the project and its crops, open it from another working
    directory: every source resolves to the moved file and every thumbnail reads."""
    moved = tmp_path / "elsewhere" / "study moved"
    moved.parent.mkdir()
    shutil.move(str(study), str(moved))
    somewhere = tmp_path / "cwd"
    somewhere.mkdir()
    monkeypatch.chdir(somewhere)
    table = load_project(moved / "p.h5ad", mode="r")
    assert table.n_cells == 4 * len(CLASSES)
    assert missing_sources(table) == []
    sources = table.obs["source"].astype(str)
    assert all(Path(s).is_absolute() and Path(s).is_relative_to(moved) for s in sources)
    assert _thumbnails_read(table) == table.n_cells
    assert RELATIVE_COLUMN not in table.obs.columns  # stored in the file only


def test_the_file_stores_sources_absolute_and_relative(study):
    """obs["source"] is absolute in the file; source_relative is relative to the project."""
    obs = ad.read_h5ad(study / "p.h5ad").obs
    assert all(Path(s).is_absolute() for s in obs["source"].astype(str))
    rel = obs[RELATIVE_COLUMN].astype(str)
    assert all(r.startswith("crops/") for r in rel)
    assert all((study / r).is_file() for r in rel)


def test_images_moved_apart_are_found_under_images_root_and_remembered(study, tmp_path):
    """When neither path exists, images_root= finds the crops by their trailing folders;
    the root is remembered in uns and used by the next open without asking."""
    store = tmp_path / "archive" / "2026"
    store.parent.mkdir()
    shutil.move(str(study / "crops"), str(store))
    lost = load_project(study / "p.h5ad", mode="r")
    assert len(missing_sources(lost)) == lost.n_cells
    table = load_project(study / "p.h5ad", images_root=store)
    assert missing_sources(table) == []
    assert table.meta[IMAGES_ROOT_KEY] == str(store)
    assert _thumbnails_read(table) == table.n_cells
    table.save(study / "p.h5ad")
    table.close()
    again = load_project(study / "p.h5ad", mode="r")
    assert missing_sources(again) == []


def test_relocate_sources_reports_what_is_still_missing(study, tmp_path):
    """relocate_sources looks under a folder, remembers it, and lists the files it did
    not find there; a path that is not a folder is refused."""
    shutil.move(str(study / "crops"), str(tmp_path / "new"))
    (
        tmp_path
        / "new"
        / "monocyte"
        / sorted(p.name for p in (tmp_path / "new" / "monocyte").iterdir())[0]
    ).unlink()
    table = load_project(study / "p.h5ad", mode="r")
    assert len(missing_sources(table)) == table.n_cells
    still = relocate_sources(table, tmp_path / "new")
    assert len(still) == 1
    assert "monocyte" in still[0]
    assert table.meta[IMAGES_ROOT_KEY] == str(tmp_path / "new")
    with pytest.raises(ValueError, match="not a folder"):
        relocate_sources(table, tmp_path / "nope")


def test_a_project_from_another_system_opens_by_its_relative_paths(tmp_path):
    """A project written on Windows (C:\\... sources) opens here from its relative
    paths; without them, an images root finds the files by their trailing folders."""
    from PIL import Image

    (tmp_path / "crops" / "mono").mkdir(parents=True)
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(tmp_path / "crops/mono/a.png")
    obs = pd.DataFrame(
        {
            "source": [r"C:\Users\lab\study\crops\mono\a.png"],
            "batch": ["crops"],
            "x": [10.0],
            "y": [10.0],
            "x0": [0],
            "y0": [0],
            "x1": [20],
            "y1": [20],
            RELATIVE_COLUMN: ["crops/mono/a.png"],
        },
        index=["crops/mono/a.png#0"],
    )
    ad.AnnData(obs=obs).write_h5ad(tmp_path / "win.h5ad")
    table = load_project(tmp_path / "win.h5ad", mode="r")
    assert table.obs["source"].iat[0] == str(tmp_path / "crops" / "mono" / "a.png")
    obs[RELATIVE_COLUMN] = [""]
    ad.AnnData(obs=obs).write_h5ad(tmp_path / "win2.h5ad")
    lost = load_project(tmp_path / "win2.h5ad", mode="r")
    assert missing_sources(lost) == [r"C:\Users\lab\study\crops\mono\a.png"]
    found = load_project(tmp_path / "win2.h5ad", mode="r", images_root=tmp_path)
    assert found.obs["source"].iat[0] == str(tmp_path / "crops" / "mono" / "a.png")


def test_layer_name_sources_are_never_missing(tmp_path):
    """Cells of in-memory napari layers (source = layer name) are kept as they are."""
    table = CellTable()
    table.add_cells(
        pd.DataFrame(
            {"source": "smear A", "batch": "lab", "x": 1.0, "y": 1.0}
            | {"x0": 0, "y0": 0, "x1": 8, "y1": 8},
            index=["smear A/smear A#0"],
        )
    )
    table.save(tmp_path / "p.h5ad")
    back = load_project(tmp_path / "p.h5ad", mode="r")
    assert back.obs["source"].iat[0] == "smear A"
    assert missing_sources(back) == []


def test_cli_images_root_resolves_sources(study, tmp_path, capsys):
    """`hemofm report --images-root DIR` reads the project with its images under DIR:
    the per-source groups name the files where they are now."""
    store = tmp_path / "store"
    shutil.move(str(study / "crops"), str(store))
    out = tmp_path / "counts.csv"
    assert (
        main(
            [
                "report",
                str(study / "p.h5ad"),
                "--by",
                "source",
                "--out",
                str(out),
                "--images-root",
                str(store),
            ]
        )
        == 0
    )
    groups = pd.read_csv(out)["group"].astype(str).unique()
    assert len(groups) == 4 * len(CLASSES)
    assert all(g.startswith(str(store)) for g in groups)

"""Inputs: which folders are crop folders, default batch names, cell ids, skipped files."""

import numpy as np
from PIL import Image

from napari_hemofm.core.inputs import (
    classify_folder,
    collect_cells,
    default_batch_names,
    make_cell_id,
    scan_inputs,
)


def write_png(path, seed=0, size=(48, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def make_crop_folder(root, classes=("neutrophil", "lymphocyte"), n=2):
    for c in classes:
        for k in range(n):
            write_png(root / c / f"{c}_{k}.png", seed=k)
    (root / "README.md").write_text("about these crops")
    (root / "LICENSE").write_text("CC BY 4.0")
    return root


def test_folder_kinds(tmp_path):
    """Subfolders with images make a crop folder; images at the root make a smear folder."""
    crops = make_crop_folder(tmp_path / "crops")
    smears = tmp_path / "smears"
    write_png(smears / "s1.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    assert classify_folder(crops) == "crops"
    assert classify_folder(smears) == "smears"
    assert classify_folder(empty) == "empty"


def test_default_batches_follow_folder_names_with_suffix_for_clashes(tmp_path):
    """Folder input -> its name; file -> its folder's name; same name elsewhere -> _2."""
    a = write_png(tmp_path / "x" / "lab" / "s1.png")
    b = write_png(tmp_path / "x" / "lab" / "s2.png")
    c = write_png(tmp_path / "y" / "lab" / "s3.png")
    d = tmp_path / "y" / "lab"
    names = default_batch_names([a, b, c, tmp_path / "x" / "lab", d])
    assert names == ["lab", "lab", "lab_2", "lab", "lab_2"]


def test_crop_folder_gives_one_labelled_cell_per_crop(tmp_path):
    """Each crop is one cell labelled with its folder name; root files are ignored."""
    root = make_crop_folder(tmp_path / "zheng_d1", classes=("monocyte", "basophil"), n=2)
    result = collect_cells([root])
    cells = result.cells
    assert result.skipped == []
    assert list(cells.index) == [
        "zheng_d1/basophil/basophil_0.png#0",
        "zheng_d1/basophil/basophil_1.png#0",
        "zheng_d1/monocyte/monocyte_0.png#0",
        "zheng_d1/monocyte/monocyte_1.png#0",
    ]
    assert set(cells["batch"]) == {"zheng_d1"}
    assert cells["label"].tolist() == ["basophil", "basophil", "monocyte", "monocyte"]
    row = cells.iloc[0]
    assert (row.x0, row.y0, row.x1, row.y1) == (0, 0, 40, 48)
    assert (row.x, row.y) == (20.0, 24.0)


def test_crops_in_an_unlabelled_subfolder_come_in_without_a_label(tmp_path):
    """A new lab's crops go in ``<root>/unlabelled/`` (any case, or "unlabeled"): they
    are crops, one cell each, with no label; their ids keep the folder name."""
    root = make_crop_folder(tmp_path / "lab_b", classes=("Unlabelled", "monocyte"), n=2)
    write_png(root / "unlabeled" / "x.png")
    cells = collect_cells([root]).cells
    assert cells.loc["lab_b/monocyte/monocyte_0.png#0", "label"] == "monocyte"
    new = cells[~cells.index.str.contains("/monocyte/")]
    assert sorted(new.index) == [
        "lab_b/Unlabelled/Unlabelled_0.png#0",
        "lab_b/Unlabelled/Unlabelled_1.png#0",
        "lab_b/unlabeled/x.png#0",
    ]
    assert new["label"].isna().all()
    assert (new["x0"] == 0).all()  # crops (the whole file), not detections on smears
    assert (new["score"] == 1).all()


def test_batch_override_sets_the_batch_but_not_the_ids(tmp_path):
    """--batch NAME puts every cell in batch NAME; the ids keep the input's name."""
    root = make_crop_folder(tmp_path / "crops", classes=("eosinophil",), n=1)
    cells = collect_cells([root], batch="scanner_2").cells
    assert cells.index.tolist() == ["crops/eosinophil/eosinophil_0.png#0"]
    assert cells["batch"].tolist() == ["scanner_2"]
    assert cells["slide"].tolist() == ["scanner_2"]  # crops: the slide is the batch


def test_bad_files_are_skipped_and_named_while_the_rest_goes_through(tmp_path):
    """0-byte, non-image and stray files are listed in `skipped`; good crops are kept."""
    root = make_crop_folder(tmp_path / "crops", classes=("lymphocyte",), n=2)
    (root / "lymphocyte" / "empty.png").write_bytes(b"")
    (root / "lymphocyte" / "notes.txt").write_text("not an image")
    write_png(root / "stray.png")
    result = collect_cells([root, tmp_path / "missing.png"])
    skipped = dict(result.skipped)
    assert len(result.cells) == 2
    assert str(root / "lymphocyte" / "empty.png") in skipped
    assert str(root / "lymphocyte" / "notes.txt") in skipped
    assert "class folder" in skipped[str(root / "stray.png")]
    assert "no such file" in skipped[str(tmp_path / "missing.png")]


def test_empty_folder_and_folder_of_non_images_give_no_sources(tmp_path):
    """Folders without images are reported as empty inputs, not crashes."""
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    for k in range(3):
        (texts / f"{k}.txt").write_text("x")
    scan = scan_inputs([empty, texts])
    assert scan.sources == []
    assert [p for p, _ in scan.empty_inputs] == [str(empty), str(texts)]


def test_cell_id_format():
    """Cell ids are '<input name>/<relative path>#<n>'."""
    assert make_cell_id("bccd", "BloodImage_00001.jpg", 2) == "bccd/BloodImage_00001.jpg#2"


def test_same_names_in_two_folders_never_clash_and_a_repeated_input_counts_once(tmp_path):
    """Two folders with one base name get name and name_2 in their ids, whatever the
    batch; the same folder given twice gives each cell once."""
    a = make_crop_folder(tmp_path / "x" / "lab", classes=("monocyte",), n=1)
    b = make_crop_folder(tmp_path / "y" / "lab", classes=("monocyte",), n=1)
    cells = collect_cells([a, b], batch="same").cells
    assert cells.index.tolist() == [
        "lab/monocyte/monocyte_0.png#0",
        "lab_2/monocyte/monocyte_0.png#0",
    ]
    assert set(cells["batch"]) == {"same"}
    assert len(collect_cells([a, a]).cells) == 1


def test_a_dangling_link_is_named_and_sources_are_absolute(tmp_path, monkeypatch):
    """A symbolic link to nothing inside a folder is named in skipped; relative inputs
    give absolute source paths."""
    smears = tmp_path / "smears"
    write_png(smears / "s1.png")
    (smears / "s2.png").symlink_to(tmp_path / "nowhere.png")
    monkeypatch.chdir(tmp_path)
    scan = scan_inputs(["smears"])
    assert [str(s.path) for s in scan.sources] == [str(smears / "s1.png")]
    assert any(p.endswith("s2.png") and "dangling" in why for p, why in scan.skipped)


def test_cells_keep_source_order_when_crops_and_smears_mix(tmp_path, monkeypatch):
    """Cells come out in the order of their sources, crops and smears interleaved."""
    import pandas as pd

    from napari_hemofm.core import detect

    def one_cell(image, **kw):
        return pd.DataFrame(
            {"x": [5.0], "y": [5.0], "x0": [0], "y0": [0], "x1": [10], "y1": [10], "score": [1.0]}
        )

    monkeypatch.setattr(detect, "detect_wbcs", one_cell)
    crops = make_crop_folder(tmp_path / "crops", classes=("monocyte",), n=2)
    smear = write_png(tmp_path / "smears" / "s.png")
    more = make_crop_folder(tmp_path / "more", classes=("basophil",), n=1)
    cells = collect_cells([crops, smear, more]).cells
    assert [c.split("/")[0] for c in cells.index] == ["crops", "crops", "smears", "more"]

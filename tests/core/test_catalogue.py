"""The class catalogue (core.catalogue): presets, kinds, synonyms, a project's preset."""

import re

import pandas as pd
import pytest

from napari_hemofm.core import catalogue
from napari_hemofm.core.catalogue import (
    KINDS,
    NOT_CLASSED,
    apply_preset,
    get_preset,
    preset_classes,
    presets,
    resolve,
    set_custom_class,
)
from napari_hemofm.core.cells import CellTable

BONE_MARROW_CODES = {
    "ABE", "ART", "BAS", "BLA", "EBO", "EOS", "FGC", "HAC", "KSC", "LYI", "LYT",
    "MMZ", "MON", "MYB", "NGB", "NGS", "NIF", "OTH", "PEB", "PLM", "PMO",
}  # fmt: skip


def empty_table(labels=()):
    n = max(1, len(labels))
    frame = pd.DataFrame(
        {"source": "s", "batch": "b", "x": 1.0, "y": 1.0, "x0": 0, "y0": 0, "x1": 4, "y1": 4},
        index=[f"c{i}" for i in range(n)],
    )
    table = CellTable()
    table.add_cells(frame)
    if labels:
        table.set_labels(list(frame.index), list(labels))
    return table


def test_presets_ship_with_the_package_and_every_class_is_complete():
    """Both presets load from the package data; every class has a kind, a #rrggbb colour,
    and the first nine have keys 1-9 in order; no spelling names two classes."""
    found = presets()
    assert list(found) == ["Peripheral blood", "Bone marrow"]
    for preset in found.values():
        for i, cls in enumerate(preset.classes):
            assert cls.kind in KINDS
            assert re.fullmatch(r"#[0-9a-f]{6}", cls.color)
            assert cls.key == (i + 1 if i < 9 else None)
        assert len(set(preset.names)) == len(preset.names)


def test_peripheral_blood_holds_the_issue_list_with_non_white_kinds():
    """16 classes; NRBC, smudge cells, platelet clumps and artefacts are non_wbc."""
    pb = get_preset("peripheral BLOOD")
    assert len(pb.classes) == 16
    kinds = {c.name: c.kind for c in pb.classes}
    for name in ("NRBC", "smudge cell", "giant platelet / platelet clump", "artefact"):
        assert kinds[name] == "non_wbc"
    white = [n for n, k in kinds.items() if k == "wbc"]
    assert set(white) == {
        "segmented neutrophil", "band neutrophil", "lymphocyte", "variant lymphocyte",
        "monocyte", "eosinophil", "basophil", "metamyelocyte", "myelocyte",
        "promyelocyte", "blast", "plasma cell",
    }  # fmt: skip


def test_bone_marrow_holds_the_21_classes_with_their_codes():
    """The Matek et al. 2021 bone-marrow set: 21 classes, each with its three-letter code."""
    bm = get_preset("Bone marrow")
    assert len(bm.classes) == 21
    assert {c.code for c in bm.classes} == BONE_MARROW_CODES
    assert bm.resolve("NIF").kind == "not_classed"
    assert bm.resolve("ART").kind == "non_wbc"
    assert bm.resolve("EBO").kind == "wbc"  # erythroid precursors are in a myelogram


@pytest.mark.parametrize(
    ("label", "name", "kind"),
    [
        ("NEUTROPHIL", "neutrophil", "wbc"),  # BCCD folder
        ("neutrophils", "neutrophil", "wbc"),
        ("ig", "immature granulocyte", "wbc"),  # PBC folder
        ("erythroblast", "NRBC", "non_wbc"),  # PBC folder, in blood: NRBC
        ("platelet", "giant platelet / platelet clump", "non_wbc"),
        ("SNE", "segmented neutrophil", "wbc"),  # PBC file prefix
        ("BNE", "band neutrophil", "wbc"),
        ("Segmented_Neutrophil", "segmented neutrophil", "wbc"),
        ("Smudge Cells", "smudge cell", "non_wbc"),
        ("NGS", "segmented neutrophil", "wbc"),
        ("Eosinophils", "eosinophil", "wbc"),
        ("not classed", NOT_CLASSED, "not_classed"),
    ],
)
def test_labels_resolve_by_name_code_synonym_case_and_plural(label, name, kind):
    """Case, separators, plurals, abbreviations and public-set folder names resolve."""
    found = resolve(empty_table(), label)
    assert (found.name, found.kind) == (name, kind)


def test_the_project_preset_decides_and_custom_classes_win():
    """ "erythroblast" is NRBC (non_wbc) in blood but a counted cell in marrow; an unknown
    label is a custom white cell; a custom kind overrides the catalogue."""
    table = empty_table()
    assert resolve(table, "erythroblast").kind == "non_wbc"
    apply_preset(table, "Bone marrow")
    assert resolve(table, "erythroblast").kind == "wbc"
    assert resolve(table, "Reed-Sternberg cell").kind == "wbc"
    set_custom_class(table, "Reed-Sternberg cell", "not_classed", "#123456")
    found = resolve(table, "Reed-Sternberg cell")
    assert (found.kind, found.color) == ("not_classed", "#123456")
    with pytest.raises(ValueError, match="kind"):
        set_custom_class(table, "x", "platelet")


def test_apply_preset_fills_the_class_bar_and_keeps_labels_as_written(tmp_path):
    """A new project gets the preset's classes in key order; labels in use that name a
    preset class take its place spelled as written; others follow; it survives saving."""
    table = empty_table()
    assert table.classes == []
    classes = apply_preset(table, "Peripheral blood")
    assert classes == get_preset("Peripheral blood").names
    assert table.meta[catalogue.PRESET_KEY] == "Peripheral blood"
    labelled = empty_table(["SNE", "lymphocytes", "ig", NOT_CLASSED])
    classes = apply_preset(labelled, "Peripheral blood")
    assert classes[:2] == ["SNE", "lymphocytes"]  # keys 1 and 2, spelled as written
    assert classes[-2:] == ["ig", NOT_CLASSED]
    assert labelled.obs["label"].astype(str).tolist() == ["SNE", "lymphocytes", "ig", NOT_CLASSED]
    again = CellTable.load(labelled.save(tmp_path / "p.h5ad"))
    assert again.classes == classes
    assert catalogue.project_preset(again).name == "Peripheral blood"
    assert preset_classes("Bone marrow", ["NGS"])[0] == "NGS"
    with pytest.raises(ValueError, match="presets are"):
        apply_preset(table, "cerebrospinal fluid")

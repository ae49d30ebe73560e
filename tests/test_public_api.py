"""The package's public names (``napari_hemofm.__all__``) resolve to the core objects."""

import pytest

import napari_hemofm


def test_every_public_name_is_the_core_object():
    """Each exported name is the object its core module defines (no copies, no wrappers)."""
    import importlib

    for name, module in napari_hemofm._EXPORTS.items():
        assert getattr(napari_hemofm, name) is getattr(importlib.import_module(module), name)
    assert set(napari_hemofm._EXPORTS) <= set(napari_hemofm.__all__)
    assert set(napari_hemofm._EXPORTS) <= set(dir(napari_hemofm))


def test_unknown_name_raises_attribute_error():
    """A misspelt name fails as a missing attribute, as for any module."""
    with pytest.raises(AttributeError, match="load_backbon"):
        getattr(napari_hemofm, "load_backbon")  # noqa: B009


def test_saving_is_one_implementation(tmp_path, monkeypatch):
    """``CellTable.save/load`` and ``Review.open/save`` go through ``io.save_project`` /
    ``io.load_project`` (the one way to save and load a project)."""
    from napari_hemofm import CellTable, Review
    from napari_hemofm._testing import make_cell_table
    from napari_hemofm.core import io

    calls = []
    save, load = io.save_project, io.load_project

    def spy_save(table, path):
        calls.append("save")
        return save(table, path)

    def spy_load(path, **kwargs):
        calls.append("load")
        return load(path, **kwargs)

    monkeypatch.setattr(io, "save_project", spy_save)
    monkeypatch.setattr(io, "load_project", spy_load)
    path = make_cell_table(20, seed=1).save(tmp_path / "p.h5ad")
    table = CellTable.load(path, mode="r")
    review = Review.open(path)
    review.relabel([0], "monocyte")
    review.save()
    review.close()
    assert calls == ["save", "load", "load", "save"]
    assert table.n_cells == 20

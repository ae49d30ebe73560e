"""The cell table: contract columns, change signals, and the .h5ad round trip."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_hemofm.core.cells import OBS_COLUMNS, CellTable


def make_cells(n: int, *, batch: str = "lab", image: str = "a.png", seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 500, n)
    y = rng.uniform(0, 400, n)
    return pd.DataFrame(
        {
            "source": [image] * n,
            "batch": [batch] * n,
            "x": x,
            "y": y,
            "x0": (x - 20).astype(int),
            "y0": (y - 20).astype(int),
            "x1": (x + 20).astype(int),
            "y1": (y + 20).astype(int),
        },
        index=[f"{batch}/{image}#{k}" for k in range(n)],
    )


def test_new_table_has_every_contract_column_with_its_dtype():
    """An empty table and a filled one both carry the contract columns and dtypes."""
    for table in (CellTable(), CellTable()):
        if len(table.obs.columns):
            table.add_cells(make_cells(3))
        for name, dtype in OBS_COLUMNS.items():
            assert name in table.obs.columns
            if dtype == "category":
                assert isinstance(table.obs[name].dtype, pd.CategoricalDtype), name
            elif dtype != "object":
                assert table.obs[name].dtype == np.dtype(dtype), name
        assert table.obs.index.name == "cell_id"


def test_add_cells_appends_rows_and_signals_the_range():
    """add_cells appends in order and emits (start, stop) of the new rows."""
    table = CellTable()
    seen = []
    table.events.cells_added.connect(lambda a, b: seen.append((a, b)))
    table.add_cells(make_cells(4))
    table.add_cells(make_cells(2, image="b.png"))
    assert seen == [(0, 4), (4, 6)]
    assert table.n_cells == 6
    assert list(table.cell_ids[-2:]) == ["lab/b.png#0", "lab/b.png#1"]
    assert table.obs["label"].isna().all()


def test_add_cells_rejects_duplicate_ids_and_missing_columns():
    """Cell ids stay unique, and a frame without a required column is refused by name."""
    table = CellTable()
    table.add_cells(make_cells(2))
    with pytest.raises(ValueError, match="already in the table"):
        table.add_cells(make_cells(1))
    with pytest.raises(ValueError, match="'x0'"):
        table.add_cells(make_cells(1, image="c.png").drop(columns="x0"))
    assert table.n_cells == 2


def test_set_labels_changes_only_the_named_cells_and_returns_the_old_labels():
    """set_labels writes label + origin for those cells, signals once, and returns previous."""
    table = CellTable()
    table.add_cells(make_cells(5))
    events = []
    table.events.labels_changed.connect(lambda ids, labels: events.append((ids, labels)))
    ids = ["lab/a.png#1", "lab/a.png#3"]
    previous = table.set_labels(ids, "monocyte")
    assert previous.isna().all()
    assert table.column("label").tolist()[1] == "monocyte"
    assert table.column("label").notna().sum() == 2
    assert table.column("label_origin").loc[ids].tolist() == ["user", "user"]
    assert len(events) == 1
    assert list(events[0][0]) == ids
    assert list(events[0][1]) == ["monocyte", "monocyte"]
    previous = table.set_labels(ids, [None, "lymphocyte"])
    assert previous.tolist() == ["monocyte", "monocyte"]
    assert pd.isna(table.column("label").loc["lab/a.png#1"])
    assert pd.isna(table.column("label_origin").loc["lab/a.png#1"])
    assert table.classes == ["monocyte", "lymphocyte"]


def test_set_labels_on_unknown_cell_raises_and_changes_nothing():
    """An unknown id raises KeyError naming it; no label changes."""
    table = CellTable()
    table.add_cells(make_cells(2))
    with pytest.raises(KeyError, match="nope"):
        table.set_labels(["lab/a.png#0", "nope"], "basophil")
    assert table.column("label").isna().all()


def test_classes_keep_first_seen_order_and_cannot_drop_used_ones():
    """The class list (hotkey order) grows in order of first use; used classes stay."""
    table = CellTable()
    table.add_cells(make_cells(3).assign(label=["eosinophil", None, "basophil"]))
    assert table.classes == ["eosinophil", "basophil"]
    assert table.column("label_origin").tolist()[0] == "imported"
    table.set_classes(["basophil", "eosinophil", "neutrophil"])
    assert table.classes == ["basophil", "eosinophil", "neutrophil"]
    with pytest.raises(ValueError, match="in use"):
        table.set_classes(["basophil"])


def test_column_access_names_the_available_columns():
    """Asking for a missing column says which columns exist."""
    table = CellTable()
    table.add_cells(make_cells(1))
    with pytest.raises(KeyError, match="columns are"):
        table.column("nucleus_area")


def test_set_column_for_subset_fills_others_with_nan_and_signals():
    """A new column written for some cells is NaN for the rest."""
    table = CellTable()
    table.add_cells(make_cells(4))
    names = []
    table.events.columns_changed.connect(names.append)
    table.set_column("confidence", [0.9, 0.4], cell_ids=["lab/a.png#0", "lab/a.png#2"])
    table.set_column("prediction", ["neutrophil", "lymphocyte", "neutrophil", "monocyte"])
    conf = table.column("confidence").to_numpy()
    assert conf[0] == 0.9
    assert conf[2] == 0.4
    assert np.isnan(conf[[1, 3]]).all()
    assert names == [("confidence",), ("prediction",)]
    assert set(table.classes) == {"neutrophil", "lymphocyte", "monocyte"}
    with pytest.raises(ValueError, match="set_labels"):
        table.set_column("label", "x")


def test_embeddings_are_float32_and_padded_for_cells_added_later():
    """X_embed is float32 (n, dim); cells added without embeddings get NaN rows."""
    table = CellTable()
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(3, 8))
    table.add_cells(make_cells(3), embeddings=emb)
    table.add_cells(make_cells(2, image="b.png"))
    assert table.embeddings.dtype == np.float32
    assert table.embeddings.shape == (5, 8)
    np.testing.assert_allclose(table.embeddings[:3], emb, rtol=1e-6)
    assert np.isnan(table.embeddings[3:]).all()
    with pytest.raises(ValueError, match="embedding dim"):
        table.add_cells(make_cells(1, image="c.png"), embeddings=np.zeros((1, 4)))


def test_h5ad_round_trip_keeps_every_contract_column(tmp_path):
    """save() writes a file plain anndata.read_h5ad opens with all contract columns,
    and load() gives back the same cells, labels, embeddings and metadata."""
    rng = np.random.default_rng(2)
    table = CellTable()
    table.add_cells(make_cells(6, batch="lab_a"), embeddings=rng.normal(size=(6, 4)))
    table.add_cells(make_cells(4, batch="lab_b"), embeddings=rng.normal(size=(4, 4)))
    table.set_labels(["lab_a/a.png#0", "lab_b/a.png#3"], ["neutrophil", "basophil"])
    table.set_column("prediction", ["neutrophil"] * 10)
    table.set_column("confidence", rng.uniform(size=10))
    table.update_meta(model="handcrafted", pixel_size_um=0.2, weights_sha256=None)
    path = table.save(tmp_path / "proj")
    assert path.name == "proj.h5ad"

    plain = ad.read_h5ad(path)
    for name in OBS_COLUMNS:
        assert name in plain.obs.columns, name
    assert plain.obs.index.tolist() == table.cell_ids.tolist()
    assert plain.obsm["X_embed"].dtype == np.float32
    assert plain.uns["hemofm"]["model"] == "handcrafted"
    assert list(plain.uns["hemofm"]["classes"]) == table.classes

    back = CellTable.load(path)
    pd.testing.assert_frame_equal(back.obs, table.obs, check_categorical=False)
    np.testing.assert_array_equal(back.embeddings, table.embeddings)
    assert back.classes == table.classes
    assert back.meta["pixel_size_um"] == 0.2
    assert back.batches == ["lab_a", "lab_b"]


def test_load_refuses_files_that_are_not_projects(tmp_path):
    """A non-h5ad file and an AnnData without the contract columns give clear errors."""
    junk = tmp_path / "junk.h5ad"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="not a readable"):
        CellTable.load(junk)
    other = tmp_path / "other.h5ad"
    ad.AnnData(obs=pd.DataFrame(index=["a", "b"])).write_h5ad(other)
    with pytest.raises(ValueError, match="not a napari-hemofm project"):
        CellTable.load(other)


def test_save_replaces_the_file_atomically(tmp_path):
    """Saving over a project leaves exactly the new content and no temporary file."""
    table = CellTable()
    table.add_cells(make_cells(2))
    path = table.save(tmp_path / "p.h5ad")
    table.set_labels(["lab/a.png#0"], "lymphocyte")
    table.save(path)
    assert CellTable.load(path, mode="r").column("label").tolist()[0] == "lymphocyte"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.h5ad", "p.labels.jsonl"]


def test_slide_values_fall_back_to_the_batch_in_one_place():
    """A cell without a slide (a crop, a 0.1 project) counts as its batch, for the
    differential counts and the batch metrics alike."""
    from napari_hemofm._testing import make_cell_table
    from napari_hemofm.core.batch.report import level_values
    from napari_hemofm.core.cells import slide_values
    from napari_hemofm.core.report import group_values

    table = make_cell_table(12, seed=2)
    table.set_column("slide", ["s1"] * 4 + [None] * 8)
    expected = ["s1"] * 4 + list(table.obs["batch"].astype(str).iloc[4:])
    assert list(slide_values(table.obs)) == expected
    assert list(group_values(table, "slide")) == expected
    assert list(level_values(table, "slide")[0]) == expected

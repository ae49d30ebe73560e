"""Reader (projects, crop folders) and writers (.h5ad, .csv) of the plugin."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from napari_hemofm import _reader
from napari_hemofm._reader import get_reader, read_crop_folder, read_project
from napari_hemofm._widgets._embed import EmbedWidget
from napari_hemofm._widgets._layers import MONTAGE_KEY, get_layer_sync
from napari_hemofm._widgets._session import get_session
from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.inputs import collect_cells
from napari_hemofm.core.io import load_project
from napari_hemofm.core.synthetic import make_sample, write_crop_folder, write_smears


@pytest.fixture
def smear_project(tmp_path):
    """Two synthetic smears on disk and a project of their detected cells with seeded
    embeddings and one label."""
    smears = make_sample(seed=1, n_per_batch=1, shape=(320, 448), n_wbc=3)[:2]
    paths = write_smears(smears, tmp_path / "smears")
    found = collect_cells([p.parent for p in paths])
    table = CellTable()
    rng = np.random.default_rng(0)
    table.add_cells(found.cells, embeddings=rng.normal(size=(len(found.cells), 6)))
    table.update_meta(model="handcrafted")
    table.set_labels(table.cell_ids[:1], "monocyte")
    path = table.save(tmp_path / "project.h5ad")
    return path, table, paths


def test_get_reader_declines_what_it_cannot_read(tmp_path):
    """get_reader returns None for other files, a folder of smears, a missing path and
    several paths (npe2 contract); a reader for a .h5ad file and a crop folder."""
    (tmp_path / "notes.txt").write_text("x")
    smears = tmp_path / "smears"
    smears.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(smears / "s.png")
    crops = tmp_path / "crops"
    write_crop_folder(crops, n_per_class=1, size=32, classes=["neutrophil"])
    (tmp_path / "p.h5ad").write_bytes(b"")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(smears)) is None
    assert get_reader(str(tmp_path / "missing.h5ad")) is None
    assert get_reader([str(crops), str(crops)]) is None
    assert get_reader(str(tmp_path / "p.h5ad")) is read_project
    assert get_reader([str(crops)]) is read_crop_folder


def test_open_a_project_fills_the_session_and_shows_its_smears(make_napari_viewer, smear_project):
    """Opening a .h5ad project replaces the session table with it, opens each smear
    (named by file) with a cells layer carrying the project's labels, and a map
    selection jumps to the right smear."""
    path, table, paths = smear_project
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-hemofm")
    assert [layer.name for layer in layers] == [p.name for p in paths]
    session = get_session(viewer)
    assert session.table.cell_ids.tolist() == table.cell_ids.tolist()
    np.testing.assert_allclose(session.table.embeddings, table.embeddings)
    first = viewer.layers[f"{paths[0].name} cells"]
    assert first.features["label"].iloc[0] == "monocyte"
    assert len(first.data) + len(viewer.layers[f"{paths[1].name} cells"].data) == table.n_cells
    last = table.n_cells - 1
    session.select([last], origin="map")
    assert viewer.layers[paths[1].name].visible
    assert not viewer.layers[paths[0].name].visible
    np.testing.assert_allclose(
        viewer.scene.camera.center[-2:], table.obs[["y", "x"]].to_numpy()[last]
    )


def test_open_a_crop_folder_adds_its_crops_and_a_montage(make_napari_viewer, qtbot, tmp_path):
    """A crop folder adds one cell per crop (label = its folder, batch = the root name)
    and shows a montage with a cells layer; Run in the Embed panel embeds those cells."""
    root = tmp_path / "pbc_like"
    write_crop_folder(root, n_per_class=2, size=48, classes=["neutrophil", "lymphocyte"])
    viewer = make_napari_viewer()
    (montage,) = viewer.open(str(root), plugin="napari-hemofm")
    assert montage.name == "pbc_like crops"
    assert MONTAGE_KEY in montage.metadata
    table = get_session(viewer).table
    assert table.n_cells == 4
    assert set(table.batches) == {"pbc_like"}
    assert sorted(table.obs["label"].astype(str)) == ["lymphocyte"] * 2 + ["neutrophil"] * 2
    points = viewer.layers["pbc_like crops cells"]
    assert len(points.data) == 4
    assert set(points.features["label"]) == {"neutrophil", "lymphocyte"}
    # opening it again adds nothing twice
    viewer.open(str(root), plugin="napari-hemofm")
    assert get_session(viewer).table.n_cells == 4

    widget = EmbedWidget(viewer)
    assert widget.image_choices() == []  # the montage is not an image to detect in
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    table = get_session(viewer).table
    assert table.embeddings is not None
    assert np.isfinite(table.embeddings).all(), widget.status
    assert table.n_cells == 4


def test_reader_without_a_viewer_returns_the_cells_layers(monkeypatch, smear_project):
    """Without a current viewer the reader returns the cells Points layers itself, with
    the same features."""
    monkeypatch.setattr(_reader, "_current_viewer", lambda: None)
    path, table, paths = smear_project
    layers = read_project(str(path))
    kinds = [kind for _, _, kind in layers]
    assert kinds == ["image", "image", "points", "points"]
    data, kwargs, _ = layers[2]
    assert kwargs["name"] == f"{paths[0].name} cells"
    ids = kwargs["features"]["cell_id"].tolist()
    np.testing.assert_allclose(data, table.obs.loc[ids, ["y", "x"]].to_numpy())


def _embedded_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    for name in ("a", "b"):
        viewer.add_image(np.zeros((100, 100, 3), np.uint8), name=name, rgb=True)
    get_layer_sync(viewer)
    rng = np.random.default_rng(1)
    frames = []
    for name in ("a", "b"):
        x, y = rng.uniform(20, 80, 3), rng.uniform(20, 80, 3)
        frames.append(
            pd.DataFrame(
                {
                    "source": name,
                    "batch": name,
                    "x": x,
                    "y": y,
                    "x0": (x - 10).astype(int),
                    "y0": (y - 10).astype(int),
                    "x1": (x + 10).astype(int),
                    "y1": (y + 10).astype(int),
                },
                index=[f"{name}/{name}#{k}" for k in range(3)],
            )
        )
    table = get_session(viewer).table
    table.add_cells(pd.concat(frames), embeddings=rng.normal(size=(6, 5)))
    table.set_labels(["a/a#1"], "basophil")
    return viewer, table


def test_writer_round_trips_the_project(make_napari_viewer, tmp_path):
    """Saving every cells layer as .h5ad writes the whole session table; reading it back
    gives the same ids, labels and embeddings. One layer saves only its cells."""
    viewer, table = _embedded_viewer(make_napari_viewer)
    viewer.layers.selection = {viewer.layers["a cells"], viewer.layers["b cells"]}
    out = tmp_path / "all.h5ad"
    written = viewer.layers.save(str(out), selected=True, plugin="napari-hemofm")
    assert written == [str(out)]
    back = load_project(out)
    assert back.cell_ids.tolist() == table.cell_ids.tolist()
    np.testing.assert_allclose(back.embeddings, table.embeddings, rtol=1e-6)
    assert back.obs.loc["a/a#1", "label"] == "basophil"

    viewer.layers.selection = {viewer.layers["b cells"]}
    viewer.layers.save(str(tmp_path / "b.h5ad"), selected=True, plugin="napari-hemofm")
    assert load_project(tmp_path / "b.h5ad").cell_ids.tolist() == [f"b/b#{k}" for k in range(3)]


def test_writer_csv_has_cell_id_and_no_embeddings(make_napari_viewer, tmp_path):
    """The CSV holds cell_id and the obs columns of the layers' cells, no embeddings."""
    viewer, table = _embedded_viewer(make_napari_viewer)
    viewer.layers.selection = {viewer.layers["a cells"]}
    out = tmp_path / "cells.csv"
    viewer.layers.save(str(out), selected=True, plugin="napari-hemofm")
    frame = pd.read_csv(out)
    assert frame.columns[0] == "cell_id"
    assert frame["cell_id"].tolist() == [f"a/a#{k}" for k in range(3)]
    for column in ("source", "batch", "x", "y", "x0", "y0", "x1", "y1", "label"):
        assert column in frame.columns
    assert frame.shape[1] == table.obs.shape[1] + 1
    assert frame.loc[1, "label"] == "basophil"


def test_writer_refuses_points_without_cell_ids(make_napari_viewer, tmp_path):
    """A plain Points layer has no cells to save: the writer says so."""
    from napari_hemofm._writer import write_h5ad

    with pytest.raises(ValueError, match="no cell_id feature"):
        write_h5ad(str(tmp_path / "x.h5ad"), [(np.zeros((1, 2)), {"name": "p"}, "points")])


def test_embedded_file_images_reopen_from_a_saved_project(make_napari_viewer, qtbot, tmp_path):
    """An image opened from a file is embedded with its path as source, so the saved
    project, opened in a fresh viewer, brings the smear back with its cells layer."""
    smear = make_sample(seed=2, n_per_batch=1, shape=(320, 448), n_wbc=3)[0]
    (path,) = write_smears([smear], tmp_path / "smears")
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(path))
    widget = EmbedWidget(viewer)
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    table = get_session(viewer).table
    assert table.n_cells > 0, widget.status
    assert set(table.obs["source"]) == {str(path)}
    # "<folder>/<file>#<n>": the id `hemofm embed` gives the same file
    assert table.cell_ids[0].startswith(f"{path.parent.name}/{path.name}#")
    viewer.layers.selection = {viewer.layers[f"{image.name} cells"]}
    viewer.layers.save(str(tmp_path / "p.h5ad"), selected=True, plugin="napari-hemofm")

    other = make_napari_viewer()
    (reopened,) = other.open(str(tmp_path / "p.h5ad"), plugin="napari-hemofm")
    assert reopened.name == path.name
    np.testing.assert_array_equal(reopened.data, image.data)
    assert len(other.layers[f"{path.name} cells"].data) == table.n_cells

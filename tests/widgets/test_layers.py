"""The cells Points layers mirror the session's table, and the selection goes both ways."""

import numpy as np
import pandas as pd
import pytest

from napari_hemofm._widgets._layers import (
    FEATURE_COLUMNS,
    LAYER_ORIGIN,
    UNLABELLED_COLOR,
    class_color,
    get_layer_sync,
)
from napari_hemofm._widgets._session import get_session


def cells_frame(source, n, seed, batch=None, shape=(200, 300)):
    """n cells at random centres in an image of ``shape``, ids '<batch>/<source>#k'."""
    rng = np.random.default_rng(seed)
    y = rng.uniform(20, shape[0] - 20, n)
    x = rng.uniform(20, shape[1] - 20, n)
    batch = batch or source
    return pd.DataFrame(
        {
            "source": source,
            "batch": batch,
            "x": x,
            "y": y,
            "x0": (x - 16).astype(int),
            "y0": (y - 16).astype(int),
            "x1": (x + 16).astype(int),
            "y1": (y + 16).astype(int),
            "score": rng.uniform(0.5, 1, n),
        },
        index=[f"{batch}/{source}#{k}" for k in range(n)],
    )


@pytest.fixture
def two_images(make_napari_viewer):
    """A viewer with images 'a' (5 cells) and 'b' (4 cells) in its session."""
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((200, 300, 3), np.uint8), name="a", rgb=True)
    viewer.add_image(np.zeros((200, 300, 3), np.uint8), name="b", rgb=True)
    sync = get_layer_sync(viewer)
    session = get_session(viewer)
    session.table.add_cells(
        pd.concat([cells_frame("a", 5, seed=1), cells_frame("b", 4, seed=2)]),
        embeddings=np.random.default_rng(0).normal(size=(9, 4)),
    )
    return viewer, session, sync


def test_one_cells_layer_per_image_with_features(two_images):
    """cells_added gives each image a '<name> cells' layer: points at (y, x) of its cells
    in table order, features with the contract columns (label categorical), score kept."""
    viewer, session, _ = two_images
    names = [layer.name for layer in viewer.layers]
    assert names == ["a", "a cells", "b", "b cells"]
    obs = session.table.obs
    for name, rows in (("a", slice(0, 5)), ("b", slice(5, 9))):
        points = viewer.layers[f"{name} cells"]
        np.testing.assert_allclose(points.data, obs[["y", "x"]].to_numpy()[rows])
        assert list(points.features.columns) == [*FEATURE_COLUMNS, "score"]
        assert points.features["cell_id"].tolist() == obs.index[rows].tolist()
        assert isinstance(points.features["label"].dtype, pd.CategoricalDtype)
        np.testing.assert_allclose(points.border_color, [UNLABELLED_COLOR] * len(points.data))


def test_selecting_points_selects_cells_in_the_session(two_images):
    """Points selected in a cells layer become the session selection (origin 'layer'),
    and the other cells layer loses its selection."""
    viewer, session, _ = two_images
    seen = []
    session.events.selection_changed.connect(lambda rows, origin: seen.append(origin))
    viewer.layers["a cells"].selected_data = {1, 3}
    np.testing.assert_array_equal(session.selected, [1, 3])
    assert seen[-1] == LAYER_ORIGIN
    viewer.layers["b cells"].selected_data = {0}
    np.testing.assert_array_equal(session.selected, [5])
    assert set(viewer.layers["a cells"].selected_data) == set()
    viewer.layers["b cells"].selected_data = set()
    assert len(session.selected) == 0


def test_map_selection_selects_points_switches_image_and_centres(two_images):
    """session.select(origin='map') selects those points, shows their image (hiding the
    other), makes its cells layer active and centres the camera on the first cell."""
    viewer, session, _ = two_images
    obs = session.table.obs
    session.select([6, 7], origin="map")
    b_cells = viewer.layers["b cells"]
    assert set(b_cells.selected_data) == {1, 2}
    assert set(viewer.layers["a cells"].selected_data) == set()
    assert viewer.layers["b"].visible
    assert b_cells.visible
    assert not viewer.layers["a"].visible
    assert not viewer.layers["a cells"].visible
    assert viewer.layers.selection.active is b_cells
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], obs[["y", "x"]].to_numpy()[6])

    session.select([2], origin="map")
    assert viewer.layers["a"].visible
    assert not viewer.layers["b"].visible
    assert viewer.layers.selection.active is viewer.layers["a cells"]
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], obs[["y", "x"]].to_numpy()[2])
    assert set(b_cells.selected_data) == set()


def test_camera_jump_respects_the_image_transform(make_napari_viewer):
    """With a scaled and translated image the points overlay it and the camera centres
    on the cell in world coordinates; a far zoom is brought to a useful one."""
    viewer = make_napari_viewer()
    viewer.add_image(
        np.zeros((200, 300, 3), np.uint8), name="s", rgb=True, scale=(0.5, 0.5), translate=(10, 20)
    )
    sync = get_layer_sync(viewer)
    session = get_session(viewer)
    session.table.add_cells(cells_frame("s", 3, seed=3))
    viewer.scene.camera.zoom = 0.001
    session.select([1], origin="map")
    y, x = session.table.obs[["y", "x"]].to_numpy()[1]
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], (10 + 0.5 * y, 20 + 0.5 * x))
    assert viewer.scene.camera.zoom > 0.01
    np.testing.assert_allclose(sync.layer_for("s").scale, (0.5, 0.5))


def test_label_change_updates_only_that_point(two_images):
    """labels_changed writes that point's features['label'] and colours; every other
    point's label and colours stay as they were."""
    viewer, session, _ = two_images
    points = viewer.layers["a cells"]
    other = viewer.layers["b cells"]
    before_face = points.face_color.copy()
    before_other = other.border_color.copy()
    cid = session.table.cell_ids[2]
    session.table.set_labels([cid], "neutrophil")
    assert points.features["label"].iloc[2] == "neutrophil"
    assert points.features["label"].isna().sum() == 4
    colour = class_color(session.table.classes.index("neutrophil"))
    np.testing.assert_allclose(points.border_color[2, :3], colour)
    unchanged = np.arange(5) != 2
    np.testing.assert_allclose(points.face_color[unchanged], before_face[unchanged])
    np.testing.assert_allclose(other.border_color, before_other)
    assert points.face_color[2, 3] > 0  # labelled cells get a tinted face
    session.table.set_labels([cid], None)
    assert pd.isna(points.features["label"].iloc[2])
    np.testing.assert_allclose(points.border_color[2], UNLABELLED_COLOR)


def test_prediction_and_confidence_columns_follow_the_table(two_images):
    """columns_changed on prediction / confidence rewrites those feature columns."""
    viewer, session, _ = two_images
    table = session.table
    table.set_column("prediction", ["lymphocyte"] * 9)
    table.set_column("confidence", np.linspace(0, 1, 9))
    features = viewer.layers["b cells"].features
    assert (features["prediction"] == "lymphocyte").all()
    np.testing.assert_allclose(features["confidence"], np.linspace(0, 1, 9)[5:])


def test_new_table_and_new_cells_rebuild_the_layers(two_images):
    """A replaced table rebuilds the cells layers (and drops those without cells); cells
    added later for an image update its layer."""
    from napari_hemofm.core.cells import CellTable

    viewer, session, _ = two_images
    table = CellTable()
    table.add_cells(cells_frame("b", 2, seed=5))
    session.set_table(table)
    assert "a cells" not in [layer.name for layer in viewer.layers]
    assert len(viewer.layers["b cells"].data) == 2
    table.add_cells(cells_frame("a", 3, seed=6, batch="other"))
    assert len(viewer.layers["a cells"].data) == 3
    session.select([3], origin="map")
    assert set(viewer.layers["a cells"].selected_data) == {1}


def test_removing_an_image_removes_its_cells_layer(two_images):
    """Deleting an image layer deletes its cells layer; an image added later with that
    name gets a cells layer again."""
    viewer, _, sync = two_images
    viewer.layers.remove("a")
    assert "a cells" not in [layer.name for layer in viewer.layers]
    assert sync.layer_for("a") is None
    viewer.add_image(np.zeros((200, 300, 3), np.uint8), name="a", rgb=True)
    assert len(viewer.layers["a cells"].data) == 5


def test_points_added_by_hand_are_put_back(two_images, qtbot):
    """A cells layer mirrors the table: a point added by hand is removed again."""
    viewer, _, sync = two_images
    points = viewer.layers["a cells"]
    points.add([[10.0, 10.0]])
    qtbot.waitUntil(lambda: len(sync.layer_for("a").data) == 5, timeout=5000)


def test_cell_numbers_can_be_shown(two_images):
    """show_numbers writes each cell's '#n' next to its point."""
    viewer, _, sync = two_images
    sync.show_numbers = True
    text = viewer.layers["b cells"].text
    assert text.visible
    assert list(text.string.array) == ["0", "1", "2", "3"]
    sync.show_numbers = False
    assert not viewer.layers["b cells"].text.visible


def test_label_update_stays_cheap_at_100k_cells(make_napari_viewer):
    """Relabelling 10 cells of a 100k-cell layer touches only those rows: it costs far
    less than rebuilding the layer (measured, generous bound for shared CPUs)."""
    import time

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4000, 4000, 3), np.uint8), name="big", rgb=True)
    session = get_session(viewer)
    sync = get_layer_sync(viewer)
    session.table.add_cells(cells_frame("big", 100_000, seed=0, shape=(4000, 4000)))
    ids = session.table.cell_ids[:10]
    start = time.perf_counter()
    session.table.set_labels(ids, "eosinophil")
    update = time.perf_counter() - start
    start = time.perf_counter()
    sync.refresh()
    sync._build_view(viewer.layers["big"], "big", np.arange(100_000))
    rebuild = time.perf_counter() - start
    assert (sync.layer_for("big").features["label"].iloc[:10] == "eosinophil").all()
    assert update < 1.0
    assert update < rebuild


def test_table_changes_from_a_worker_thread_reach_the_layer(two_images, qtbot):
    """A label written from another thread updates the layer on the main thread."""
    import threading

    viewer, session, _ = two_images
    cid = session.table.cell_ids[0]
    thread = threading.Thread(target=lambda: session.table.set_labels([cid], "monocyte"))
    thread.start()
    thread.join()
    points = viewer.layers["a cells"]
    qtbot.waitUntil(lambda: points.features["label"].iloc[0] == "monocyte", timeout=5000)

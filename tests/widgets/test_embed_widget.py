"""The Embed cells panel: runs on image layers, fills the session and the cells layers."""

import numpy as np
import pytest

from napari_hemofm._widgets._embed import EmbedWidget
from napari_hemofm._widgets._layers import FEATURE_COLUMNS, get_layer_sync
from napari_hemofm._widgets._session import get_session
from napari_hemofm.core.inputs import cells_from_image
from napari_hemofm.core.synthetic import make_smear

TIMEOUT_MS = 120_000


def finish(qtbot, widget):
    """Wait until the panel's worker is done (its finished signal has run)."""
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)


def small_smear(seed, n_wbc=3, **kw):
    return make_smear(seed, shape=(320, 448), n_wbc=n_wbc, **kw)


def add_smear(viewer, name, seed, **kw):
    smear = small_smear(seed, **kw)
    meta = {"pixel_size_um": smear.pixel_size_um}
    return viewer.add_image(smear.image, name=name, rgb=True, metadata=meta), smear


def test_run_on_the_synthetic_sample(make_napari_viewer, qtbot):
    """Run on the three sample smears: each image gets a '<name> cells' Points layer with
    one point per detected cell and the contract feature columns, and the session table
    holds (n, dim) finite embeddings whose batches are the layer names."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-hemofm", "synthetic_smears")
    images = [layer.name for layer in viewer.layers]
    widget = EmbedWidget(viewer)
    widget.batch_size.setValue(4)
    assert [name for name, _, _ in widget.image_choices()] == images
    assert widget.run() is not None
    finish(qtbot, widget)

    table = get_session(viewer).table
    assert table.n_cells > 0, widget.status
    emb = table.embeddings
    assert emb.shape[0] == table.n_cells
    assert emb.shape[1] > 0
    assert np.isfinite(emb).all()
    assert sorted(table.batches) == sorted(images)
    for name in images:
        image = viewer.layers[name]
        expected = cells_from_image(
            image.data, name=name, pixel_size_um=image.metadata["pixel_size_um"]
        )
        points = viewer.layers[f"{name} cells"]
        assert len(points.data) == len(expected) == (table.obs["source"] == name).sum()
        for column in FEATURE_COLUMNS:
            assert column in points.features.columns
        assert points.features["label"].dtype == "category"
        assert set(points.features["batch"]) == {name}
        assert points.features["cell_id"].str.startswith(f"{name}/{name}#").all()
        # (y, x) order: the points sit on the cells' centres
        rows = table.positions(points.features["cell_id"])
        np.testing.assert_allclose(points.data, table.obs[["y", "x"]].to_numpy()[rows])
    assert "Embedded" in widget.status


def test_cancel_changes_nothing(make_napari_viewer, qtbot):
    """Cancel right after Run: the worker ends, the table stays empty, the panel is free
    again (the deterministic cancel test of the job itself is in test_embed_job.py)."""
    viewer = make_napari_viewer()
    add_smear(viewer, "img0", seed=10, n_wbc=4)
    widget = EmbedWidget(viewer)
    widget.batch_size.setValue(1)
    widget.run()
    widget.cancel()
    finish(qtbot, widget)
    table = get_session(viewer).table
    if widget.last_outcome is not None and widget.last_outcome.cancelled:
        assert table.n_cells == 0
        assert "nothing changed" in widget.status
    assert not widget.running
    assert widget.run_button.isEnabled()


def test_cells_from_a_labels_layer(make_napari_viewer, qtbot):
    """With a Labels layer as the cell source there is one cell per label, at the label's
    centroid."""
    viewer = make_napari_viewer()
    _, smear = add_smear(viewer, "smear", seed=3, n_wbc=4, return_masks=True)
    labels = smear.masks["wbc"]
    viewer.add_labels(labels, name="wbc masks")
    widget = EmbedWidget(viewer)
    widget.set_cell_source("wbc masks")
    widget.run()
    finish(qtbot, widget)
    table = get_session(viewer).table
    n_labels = len(np.unique(labels[labels > 0]))
    assert table.n_cells == n_labels == len(viewer.layers["smear cells"].data)
    ys, xs = np.nonzero(labels == 1)
    assert table.obs["y"].iloc[0] == pytest.approx(ys.mean())
    assert table.obs["x"].iloc[0] == pytest.approx(xs.mean())


def test_cells_from_a_points_layer(make_napari_viewer, qtbot):
    """With a Points layer as the cell source there is one cell per point, at the point;
    a point outside the image gives no cell."""
    viewer = make_napari_viewer()
    add_smear(viewer, "smear", seed=4)
    pts = np.array([[50.0, 60.0], [200.0, 300.0], [150.0, 100.0], [900.0, 900.0]])
    viewer.add_points(pts, name="clicks")
    widget = EmbedWidget(viewer)
    widget.set_cell_source("clicks")
    widget.run()
    finish(qtbot, widget)
    table = get_session(viewer).table
    assert table.n_cells == 3
    np.testing.assert_allclose(table.obs[["y", "x"]].to_numpy(), pts[:3])
    np.testing.assert_allclose(viewer.layers["smear cells"].data, pts[:3])


def test_batch_names_are_editable_and_unchecked_images_skipped(make_napari_viewer, qtbot):
    """An edited batch name reaches the table but not the ids; an unticked image gets no
    cells."""
    viewer = make_napari_viewer()
    add_smear(viewer, "a", seed=5)
    add_smear(viewer, "b", seed=6)
    widget = EmbedWidget(viewer)
    widget.set_batch("a", "scanner-1")
    widget.set_checked("b", False)
    widget.run()
    finish(qtbot, widget)
    table = get_session(viewer).table
    assert table.batches == ["scanner-1"]
    assert set(table.obs["source"]) == {"a"}
    assert table.cell_ids[0].startswith("a/a#")
    assert get_layer_sync(viewer).layer_for("b") is None


def test_batch_edit_and_rerun_keep_ids_labels_and_embeddings(make_napari_viewer, qtbot):
    """Editing an image's batch and pressing Run again changes only the batch: same ids,
    the curated label stays, nothing is detected or embedded again. A new pixel size
    detects the image again and carries the curated label to the same cell id."""
    viewer = make_napari_viewer()
    add_smear(viewer, "a", seed=7)
    add_smear(viewer, "b", seed=8)
    widget = EmbedWidget(viewer)
    widget.run()
    finish(qtbot, widget)
    session = get_session(viewer)
    ids = session.table.cell_ids.tolist()
    emb = session.table.embeddings.copy()
    first = ids[0]
    session.table.set_labels([first], "monocyte")
    widget.set_batch("a", "lab-2")
    widget.run()
    finish(qtbot, widget)
    table = session.table
    assert table.cell_ids.tolist() == ids
    assert table.obs.loc[first, "label"] == "monocyte"
    assert set(table.obs.loc[table.obs["source"] == "a", "batch"]) == {"lab-2"}
    np.testing.assert_array_equal(table.embeddings, emb)
    assert widget.last_outcome.n_embedded == 0
    assert widget.last_outcome.redetected == []

    widget.pixel_size.setValue(0.12)  # a detection setting changed: a detects again
    widget.set_checked("b", False)
    widget.run()
    finish(qtbot, widget)
    table = session.table
    assert widget.last_outcome.redetected == ["a"]
    assert table.cell_ids.is_unique
    assert first in table.cell_ids
    assert table.obs.loc[first, "label"] == "monocyte"
    assert "Detected again" in widget.status
    points = get_layer_sync(viewer).layer_for("a")
    assert len(points.data) == (table.obs["source"] == "a").sum()


def test_images_of_one_folder_share_a_batch_and_ids_match_the_cli(
    make_napari_viewer, qtbot, tmp_path
):
    """Smears opened from one folder default to that folder's name as batch; several
    selected images get one batch at once; the ids equal those of `hemofm embed` on the
    same files."""
    from PIL import Image

    from napari_hemofm.cli import main
    from napari_hemofm.core.cells import CellTable

    folder = tmp_path / "ward7"
    folder.mkdir()
    for k in range(2):
        Image.fromarray(small_smear(20 + k, n_wbc=3).image).save(folder / f"s{k}.png")
    viewer = make_napari_viewer()
    for k in range(2):
        viewer.open(str(folder / f"s{k}.png"))
    widget = EmbedWidget(viewer)
    assert [b for _, _, b in widget.image_choices()] == ["ward7", "ward7"]
    widget.set_batch_of(["s0", "s1"], "morning")
    assert [b for _, _, b in widget.image_choices()] == ["morning", "morning"]
    widget.run()
    finish(qtbot, widget)
    table = get_session(viewer).table
    assert set(table.batches) == {"morning"}, widget.status
    out = tmp_path / "cli.h5ad"
    assert main(["embed", str(folder), "--out", str(out)]) == 0
    cli = CellTable.load(out)
    assert sorted(cli.cell_ids) == sorted(table.cell_ids)
    assert cli.cell_ids[0].startswith("ward7/s0.png#")


def test_clear_errors_without_traceback(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    """Nothing ticked, or DinoBloom without weights: the panel says why and starts no
    worker, or the worker ends with the WeightsError message; the table stays empty."""
    monkeypatch.setenv("HEMOFM_WEIGHTS_DIR", str(tmp_path))
    viewer = make_napari_viewer()
    add_smear(viewer, "a", seed=9)
    widget = EmbedWidget(viewer)
    widget.set_checked("a", False)
    assert widget.run() is None
    assert "No image selected" in widget.status

    widget.set_checked("a", True)
    widget.model_combo.setCurrentText("dinobloom-s")
    assert "No DinoBloom-S weights found" in widget.weights_status.text()
    assert widget.download_button.isEnabled() or "HF_HUB_OFFLINE" in (
        widget.download_button.toolTip()
    )
    widget.run()
    finish(qtbot, widget)
    assert "No weights found for dinobloom-s" in widget.status
    assert get_session(viewer).table.n_cells == 0
    assert widget.run_button.isEnabled()


def test_no_cells_found_is_reported(make_napari_viewer, qtbot):
    """An image without white cells gives a 'No cells' message, not an empty layer."""
    viewer = make_napari_viewer()
    viewer.add_image(np.full((200, 300, 3), 230, np.uint8), name="blank", rgb=True)
    widget = EmbedWidget(viewer)
    widget.run()
    finish(qtbot, widget)
    assert "No cells" in widget.status
    assert get_session(viewer).table.n_cells == 0
    assert "blank cells" not in [layer.name for layer in viewer.layers]


def test_image_list_follows_the_layer_list(make_napari_viewer):
    """Image layers added, renamed or removed appear in the panel; cells layers and
    Labels / Points layers do not appear as images but Labels / Points are cell sources."""
    viewer = make_napari_viewer()
    widget = EmbedWidget(viewer)
    assert widget.image_choices() == []
    add_smear(viewer, "a", seed=1)
    viewer.add_labels(np.zeros((10, 10), int), name="lab")
    viewer.add_points(np.zeros((1, 2)), name="pts")
    assert [n for n, _, _ in widget.image_choices()] == ["a"]
    assert widget.source_combo.findData("lab") > 0
    assert widget.source_combo.findData("pts") > 0
    viewer.layers["a"].name = "renamed"
    assert [n for n, _, _ in widget.image_choices()] == ["renamed"]
    viewer.layers.remove("renamed")
    assert widget.image_choices() == []


def test_download_weights_shows_progress_and_fills_the_path(
    make_napari_viewer, qtbot, monkeypatch, tmp_path
):
    """Download weights runs in a worker: byte progress reaches the panel and napari's
    progress bar, and the downloaded file becomes the weights path. A failed download
    ends with the WeightsError message, not a traceback."""
    import huggingface_hub

    monkeypatch.setenv("HEMOFM_WEIGHTS_DIR", str(tmp_path))
    total = 4 * 2**20

    def fake_download(repo, filename, *, local_dir, tqdm_class=None, **kwargs):
        path = tmp_path / "dl" / filename
        path.parent.mkdir(exist_ok=True)
        if tqdm_class is not None:
            bar = tqdm_class(total=total, disable=True)
            for _ in range(4):
                bar.update(2**20)
            bar.close()
        path.write_bytes(b"{}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    viewer = make_napari_viewer()
    widget = EmbedWidget(viewer)
    widget.model_combo.setCurrentText("dinobloom-s")
    seen = []
    show_progress = widget._on_download_progress
    monkeypatch.setattr(
        widget, "_on_download_progress", lambda item: (seen.append(item), show_progress(item))
    )
    widget.download()
    finish(qtbot, widget)
    assert widget.weights_edit.text().endswith("model.safetensors")
    assert "Weights ready" in widget.status
    assert seen
    assert seen[-1] == ("download", total, total)

    def failing(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)
    widget.weights_edit.setText("")
    widget.download()
    finish(qtbot, widget)
    assert "Downloading DinoBloom-S weights" in widget.status
    assert "network is unreachable" in widget.status
    assert widget.run_button.isEnabled()


def test_another_model_is_refused_unless_re_embed_is_ticked(make_napari_viewer, qtbot):
    """When the session's cells came from another model, Run says so and changes
    nothing; with "Re-embed all cells" every cell is embedded again with the same ids."""
    viewer = make_napari_viewer()
    add_smear(viewer, "a", seed=11)
    add_smear(viewer, "b", seed=12)
    widget = EmbedWidget(viewer)
    widget.run()
    finish(qtbot, widget)
    table = get_session(viewer).table
    n = table.n_cells
    ids = table.cell_ids.tolist()
    # pretend the session was embedded with another model (other dimension)
    table.set_embeddings(np.zeros((n, 3), np.float32), model="dinobloom-s")
    widget.set_checked("b", False)
    widget.run()
    finish(qtbot, widget)
    assert "embedded with dinobloom-s" in widget.status
    assert get_session(viewer).table.embeddings.shape[1] == 3
    widget.form.reembed.value = True
    widget.run()
    finish(qtbot, widget)
    table = get_session(viewer).table
    assert table.cell_ids.tolist() == ids
    assert table.meta["model"] == "handcrafted"
    assert table.embeddings.shape[1] != 3
    assert np.isfinite(table.embeddings).all()
    assert "Every cell was re-embedded" in widget.status


def test_the_form_is_a_magicgui_container(make_napari_viewer):
    """Model, weights, device, batch size and stain normalisation live in one magicgui
    form, and the Qt names scripts use point into it."""
    from magicgui.widgets import Container

    widget = EmbedWidget(make_napari_viewer())
    assert isinstance(widget.form, Container)
    assert {"model", "weights", "device", "batch_size", "stain_norm", "reembed"} <= set(
        widget.form.asdict()
    )
    widget.batch_size.setValue(7)
    assert widget.form.batch_size.value == 7
    widget.model_combo.setCurrentText("dinobloom-s")
    assert widget.form.model.value == "dinobloom-s"

"""The core embed job: stable ids, adding to a table, carried labels, cancel, skipped files."""

import threading

import anndata as ad
import numpy as np
import pandas as pd
from PIL import Image

from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.embed_job import (
    EmbedJob,
    EmbedOutcome,
    ImageInput,
    commit_outcome,
    embed_into,
    inputs_from_scan,
    run_embed_job,
)
from napari_hemofm.core.inputs import scan_inputs
from napari_hemofm.core.io import close_project, load_project, save_project
from napari_hemofm.core.matching import match_boxes
from napari_hemofm.core.synthetic import make_smear, write_crop_folder


def write_smears(folder, seeds=(1, 2), n_wbc=3):
    folder.mkdir(parents=True, exist_ok=True)
    for k, seed in enumerate(seeds):
        smear = make_smear(seed, shape=(320, 448), n_wbc=n_wbc)
        Image.fromarray(smear.image).save(folder / f"s{k}.png")
    return folder


def embed(table, inputs, **kw):
    table, summary, outcome = embed_into(table, EmbedJob(batch_size=4), inputs, **kw)
    assert outcome.error is None, outcome.error
    return table, summary, outcome


def test_ids_do_not_depend_on_the_batch_and_batch_edits_change_nothing_else(tmp_path):
    """The same files give the same ids whatever --batch says; a second run with another
    batch keeps ids, labels and embeddings, embeds nothing, and only sets the batch."""
    folder = write_smears(tmp_path / "ward")
    a, _, _ = embed(CellTable(), inputs_from_scan(scan_inputs([folder], batch="x"), batch="x"))
    b, _, _ = embed(CellTable(), inputs_from_scan(scan_inputs([folder])))
    assert a.cell_ids.tolist() == b.cell_ids.tolist()
    assert a.cell_ids[0] == "ward/s0.png#0"
    assert set(a.batches) == {"x"}
    assert set(b.batches) == {"ward"}
    assert set(b.obs["slide"]) == {"ward/s0.png", "ward/s1.png"}
    b.set_labels([b.cell_ids[0]], "monocyte")
    emb = b.embeddings.copy()
    c, summary, outcome = embed(b, inputs_from_scan(scan_inputs([folder], batch="y"), batch="y"))
    assert c is b
    assert outcome.n_embedded == 0
    assert summary.n_reused == b.n_cells
    assert c.cell_ids.tolist() == a.cell_ids.tolist()
    assert set(c.batches) == {"y"}
    assert c.obs["label"].iloc[0] == "monocyte"
    np.testing.assert_array_equal(c.embeddings, emb)


def test_adding_embeds_only_new_images(tmp_path):
    """A second folder added to a table: the first folder's cells are reused (same
    embeddings), only the new cells are embedded, and ids never collide even when two
    folders share a base name."""
    first = write_smears(tmp_path / "x" / "lab", seeds=(1,))
    second = write_smears(tmp_path / "y" / "lab", seeds=(2,))
    table, _, _ = embed(CellTable(), inputs_from_scan(scan_inputs([first])))
    emb = table.embeddings.copy()
    n = table.n_cells
    table, summary, outcome = embed(table, inputs_from_scan(scan_inputs([first, second])))
    assert summary.n_reused == n
    assert len(outcome.cells) == table.n_cells - n
    np.testing.assert_array_equal(table.embeddings[:n], emb)
    assert table.cell_ids.is_unique
    assert any(c.startswith("lab_2/s0.png#") for c in table.cell_ids)


def test_redetection_carries_ids_and_curated_labels_by_overlap(tmp_path):
    """Detecting an image again (another pixel size) keeps the ids and curated labels of
    the cells found again; new cells get ids above the old numbers."""
    folder = write_smears(tmp_path / "ward", seeds=(3,), n_wbc=4)
    table, _, _ = embed(CellTable(), inputs_from_scan(scan_inputs([folder])))
    first = table.cell_ids[0]
    table.set_labels([first], "eosinophil")
    old_box = table.obs.loc[first, ["x0", "y0", "x1", "y1"]].to_numpy(int)
    inputs = inputs_from_scan(scan_inputs([folder]))
    for image in inputs:
        image.pixel_size_um = 0.2
    table, _summary, outcome = embed(table, inputs)
    assert outcome.redetected == [str(folder / "s0.png")]
    assert first in table.cell_ids
    assert table.obs.loc[first, "label"] == "eosinophil"
    new_box = table.obs.loc[first, ["x0", "y0", "x1", "y1"]].to_numpy(int)
    assert match_boxes(old_box[None], new_box[None]) == [(0, 0)]
    assert table.cell_ids.is_unique
    assert np.isfinite(table.embeddings).all()


def test_a_curated_label_wins_over_a_crop_folder_name(tmp_path):
    """When a crop is found again, a user's label stays and an imported one follows the
    folder."""
    root = tmp_path / "lab"
    write_crop_folder(root, n_per_class=1, seed=0, size=64)
    table, _, _ = embed(CellTable(), inputs_from_scan(scan_inputs([root])))
    ids = table.cell_ids[:2].tolist()
    table.set_labels([ids[0]], "smudge")  # user
    table.set_labels([ids[1]], "old-name", origin="imported")
    rows = table.obs.loc[ids]
    cells = rows[["source", "batch", "slide", "x", "y", "x0", "y0", "x1", "y1"]].copy()
    cells["score"] = 1.0
    cells["label"] = ["basophil", "monocyte"]
    cells["kind"] = "crop"
    outcome = EmbedOutcome(
        cells=cells,
        embeddings=table.embeddings[:2].copy(),
        redetected=rows["source"].tolist(),
        meta={"model": "handcrafted"},
        table_id=id(table),
    )
    summary = commit_outcome(table, outcome)
    new = summary.table
    assert new.obs.loc[ids[0], "label"] == "smudge"
    assert new.obs.loc[ids[0], "label_origin"] == "user"
    assert new.obs.loc[ids[1], "label"] == "monocyte"


def test_cancel_from_the_progress_callback_commits_nothing(tmp_path):
    """Cancel set by the progress callback at the first embedding step: the outcome is
    cancelled and committing it leaves the table exactly as it was."""
    folder = write_smears(tmp_path / "ward", seeds=(4, 5))
    table, _, _ = embed(CellTable(), inputs_from_scan(scan_inputs([folder]))[:1])
    before = table.obs.copy()
    emb = table.embeddings.copy()
    cancel = threading.Event()
    calls = []

    def progress(done, total):
        calls.append((done, total))
        if len(calls) > 3 and done >= 1:  # past "find cells": inside the embedding
            cancel.set()

    outcome = run_embed_job(
        table,
        EmbedJob(batch_size=1),
        inputs_from_scan(scan_inputs([folder])),
        reembed=True,
        progress=progress,
        cancel=cancel,
    )
    assert outcome.cancelled
    summary = commit_outcome(table, outcome)
    assert not summary.changed
    pd.testing.assert_frame_equal(table.obs, before)
    np.testing.assert_array_equal(table.embeddings, emb)


def test_another_model_is_refused_unless_reembed(tmp_path):
    """A table embedded with one model refuses another (one line); with reembed every
    cell is embedded again and keeps its id and label."""
    folder = write_smears(tmp_path / "ward", seeds=(6,))
    table, _, _ = embed(CellTable(), inputs_from_scan(scan_inputs([folder])))
    table.set_labels([table.cell_ids[0]], "basophil")
    table.set_embeddings(np.zeros((table.n_cells, 3), np.float32), model="dinobloom-s")
    ids = table.cell_ids.tolist()
    _, summary, outcome = embed_into(table, EmbedJob(), inputs_from_scan(scan_inputs([folder])))
    assert "embedded with dinobloom-s" in outcome.error
    assert "\n" not in outcome.error
    assert not summary.changed
    new, summary, outcome = embed(table, inputs_from_scan(scan_inputs([folder])), reembed=True)
    assert new.cell_ids.tolist() == ids
    assert new.obs["label"].iloc[0] == "basophil"
    assert new.embeddings.shape[1] > 3
    assert summary.n_reembedded == len(ids)


def test_another_stain_setting_is_refused(tmp_path):
    """Stain normalisation is a project setting: adding with another one is refused."""
    folder = write_smears(tmp_path / "ward", seeds=(6, 7))
    inputs = inputs_from_scan(scan_inputs([folder]))
    table, _, _ = embed(CellTable(), inputs[:1])
    assert table.meta["stain_norm"] == {"method": "none"}
    job = EmbedJob(stain_norm="reinhard")
    _, _, outcome = embed_into(table, job, inputs)
    assert "stain normalisation" in outcome.error
    new, _, outcome = embed_into(table, job, inputs, reembed=True)
    assert outcome.error is None
    assert new.meta["stain_norm"] == {"method": "reinhard"}


def test_a_feature_version_bump_is_a_model_change(tmp_path):
    """Handcrafted features of another version (same model name, same dimension) do not
    mix with the current ones: adding is refused until every cell is re-embedded; the
    same version read back from a saved project is accepted."""
    from napari_hemofm.core.features import FEATURE_VERSION

    root = tmp_path / "lab"
    write_crop_folder(root, n_per_class=2, seed=0, size=64)
    inputs = inputs_from_scan(scan_inputs([root]))
    table, _, _ = embed(CellTable(), inputs[:4])
    assert table.meta["feature_version"] == FEATURE_VERSION
    path = save_project(table, tmp_path / "p.h5ad")
    table.close()
    reopened = load_project(path)
    grown, _, outcome = embed_into(reopened, EmbedJob(batch_size=4), inputs[:6])
    assert outcome.error is None, outcome.error  # same version (a numpy int once saved)
    assert grown.n_cells == 6
    grown.update_meta(feature_version=FEATURE_VERSION - 1)
    before = grown.embeddings.copy()
    _, _, outcome = embed_into(grown, EmbedJob(batch_size=4), inputs)
    assert outcome.error is not None
    assert f"version {FEATURE_VERSION - 1}" in outcome.error
    assert f"not version {FEATURE_VERSION}" in outcome.error
    assert grown.n_cells == 6
    np.testing.assert_array_equal(grown.embeddings, before)
    new, _, outcome = embed_into(grown, EmbedJob(batch_size=4), inputs, reembed=True)
    assert outcome.error is None
    assert new.meta["feature_version"] == FEATURE_VERSION
    assert new.n_cells == len(inputs)
    close_project(reopened)


def test_unreadable_files_are_skipped_not_added(tmp_path):
    """A truncated crop, a dangling link and a grey smear: none enters the table, each is
    named, and no embedding is NaN."""
    root = tmp_path / "lab"
    write_crop_folder(root, n_per_class=2, seed=0, size=64)
    victim = sorted((root / "basophil").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:60])  # header kept, pixels gone
    (root / "basophil" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    grey = tmp_path / "grey"
    grey.mkdir()
    img = make_smear(8, shape=(320, 448), n_wbc=3).image.mean(axis=2).astype(np.uint8)
    Image.fromarray(img).save(grey / "g.png")
    scan = scan_inputs([root, grey])
    assert any(p.endswith("gone.png") and "dangling" in w for p, w in scan.skipped)
    table, _summary, outcome = embed(CellTable(), inputs_from_scan(scan))
    assert str(victim) not in set(table.obs["source"])
    assert any(p == str(victim) for p, _ in outcome.skipped)
    assert np.isfinite(table.embeddings).all()
    assert any("Romanowsky" in w for _, w in outcome.no_cells)


def test_an_unreadable_folder_among_good_ones_is_skipped(tmp_path, monkeypatch):
    """A folder that cannot be listed is named in skipped; the other inputs still scan."""
    import os

    good = write_smears(tmp_path / "good", seeds=(1,))
    bad = tmp_path / "bad"
    bad.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(bad) else real(p, m))
    scan = scan_inputs([good, bad])
    assert [s.path.name for s in scan.sources] == ["s0.png"]
    assert any(p == str(bad) and "cannot be read" in w for p, w in scan.skipped)


def test_a_0_1_project_opens_unchanged_and_takes_new_cells(tmp_path):
    """A project in the 0.1 layout (ids "<batch>/<rel>#<n>", no slide column) opens with
    its ids and labels as they were; adding its image again reuses its cells, and a new
    image gets ids of the new kind."""
    folder = write_smears(tmp_path / "ward", seeds=(1, 2))
    src0 = str(folder / "s0.png")
    image = np.asarray(Image.open(src0))
    from napari_hemofm.core.inputs import cells_from_image

    cells = cells_from_image(image, name=src0)
    n = len(cells)
    obs = pd.DataFrame(
        {
            "source": [src0] * n,
            "batch": pd.Categorical(["oldlab"] * n),
            "x": cells["x"].to_numpy(),
            "y": cells["y"].to_numpy(),
            "x0": cells["x0"].to_numpy(),
            "y0": cells["y0"].to_numpy(),
            "x1": cells["x1"].to_numpy(),
            "y1": cells["y1"].to_numpy(),
            "label": pd.Categorical(["neutrophil"] + [np.nan] * (n - 1)),
            "label_origin": pd.Categorical(["user"] + [np.nan] * (n - 1)),
            "prediction": pd.Categorical([np.nan] * n),
            "confidence": np.full(n, np.nan),
        },
        index=pd.Index([f"oldlab/s0.png#{k}" for k in range(n)], name="cell_id"),
    )
    from napari_hemofm.core.models import load_backbone

    dim = load_backbone("handcrafted").dim
    x = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    adata = ad.AnnData(obs=obs, obsm={"X_embed": x})
    from napari_hemofm.core.features import FEATURE_VERSION

    # handcrafted projects record their feature version (0.1 did too); another version
    # is a model change (test_a_feature_version_bump_is_a_model_change)
    adata.uns["hemofm"] = {
        "schema_version": 1,
        "model": "handcrafted",
        "feature_version": FEATURE_VERSION,
        "classes": ["neutrophil"],
    }
    path = tmp_path / "old.h5ad"
    adata.write_h5ad(path)

    table = load_project(path)
    assert table.cell_ids.tolist() == obs.index.tolist()
    assert table.obs["label"].iloc[0] == "neutrophil"
    table.update_meta(weights_sha256=None)
    new, summary, _ = embed(table, inputs_from_scan(scan_inputs([folder])))
    assert new.cell_ids[:n].tolist() == obs.index.tolist()
    assert summary.n_reused == n
    np.testing.assert_array_equal(new.embeddings[:n], x)
    assert any(c.startswith("ward/s1.png#") for c in new.cell_ids)
    assert new.obs["slide"].notna().all()
    save_project(new, path)
    assert load_project(path).obs["label"].iloc[0] == "neutrophil"


def test_cells_of_an_in_memory_image_input():
    """An ImageInput with data (a napari layer) needs no file: ids are name/name#n."""
    smear = make_smear(9, shape=(320, 448), n_wbc=3)
    image = ImageInput(source="lay", input_name="lay", rel="lay", data=smear.image)
    table, _, _ = embed(CellTable(), [image])
    assert table.n_cells > 0
    assert table.cell_ids[0] == "lay/lay#0"
    assert set(table.batches) == {"lay"}


def test_a_stain_reference_batch_is_taken_from_the_images_of_that_batch(tmp_path):
    """A batch name as stain reference normalises onto that batch's images (recorded in
    uns); a reference that is neither a batch nor a file is refused in one line."""
    folder = write_smears(tmp_path / "ward", seeds=(6, 7))
    inputs = inputs_from_scan(scan_inputs([folder]))
    table, _, _ = embed_into(
        CellTable(), EmbedJob(stain_norm="macenko", stain_reference="ward"), inputs
    )
    assert table.meta["stain_norm"] == {"method": "macenko", "reference": "ward"}
    assert np.isfinite(table.embeddings).all()
    plain, _, _ = embed(CellTable(), inputs)
    assert not np.allclose(plain.embeddings, table.embeddings)
    _, summary, outcome = embed_into(
        CellTable(), EmbedJob(stain_norm="reinhard", stain_reference="nope"), inputs
    )
    assert "neither a batch" in outcome.error
    assert not summary.changed

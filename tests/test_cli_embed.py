"""`hemofm embed / eval / umap`: a project from crops and smears, the JSON contract, errors."""

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
from PIL import Image

from napari_hemofm.cli import main
from napari_hemofm.core.synthetic import make_smear, write_crop_folder


def run(*args: str):
    return subprocess.run(
        [sys.executable, "-m", "napari_hemofm.cli", *args], capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory):
    """Random DinoBloom-S weights in the timm safetensors layout (no download)."""
    import torch
    from safetensors.torch import save_file

    from napari_hemofm.core.models import build_model, get_spec

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    net = build_model(get_spec("dinobloom-s"))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """Two labs of synthetic crops, 5 classes x 5 crops each."""
    root = tmp_path_factory.mktemp("crops")
    write_crop_folder(root / "lab_a", n_per_class=5, seed=0, size=96)
    write_crop_folder(root / "lab_b", n_per_class=5, seed=1, size=96)
    return root


def test_embed_crop_folders_with_dinobloom_then_eval_and_umap(crops, fake_weights, tmp_path):
    """embed -> a project with float32 (n, 384) embeddings, folder labels and batches;
    eval --json prints DESIGN.md's object; umap adds obsm['X_umap']."""
    out = tmp_path / "p.h5ad"
    code = main(
        [
            "embed",
            str(crops / "lab_a"),
            str(crops / "lab_b"),
            "--model",
            "dinobloom-s",
            "--weights",
            str(fake_weights),
            "--batch-size",
            "16",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    adata = ad.read_h5ad(out)
    assert adata.n_obs == 50
    assert adata.obsm["X_embed"].shape == (50, 384)
    assert adata.obsm["X_embed"].dtype == np.float32
    assert np.isfinite(adata.obsm["X_embed"]).all()
    assert set(adata.obs["batch"]) == {"lab_a", "lab_b"}
    assert adata.obs_names[0] == "lab_a/basophil/basophil_0.png#0"
    assert adata.obs["label"].iloc[0] == "basophil"
    meta = adata.uns["hemofm"]
    assert meta["model"] == "dinobloom-s"
    assert len(meta["weights_sha256"]) == 64

    proc = run("eval", str(out), "--probe", "knn", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["probe"] == "knn"
    assert report["split"] == "cv"
    assert report["n_cells"] == 50
    assert len(report["classes"]) == 5
    assert set(report["results"]) == {"knn_k20", "knn_k1"}
    assert set(report["results"]["knn_k20"]) == {"accuracy", "balanced_accuracy", "weighted_f1"}

    proc = run("eval", str(out), "--probe", "linear", "--split", "batch", "--json")
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)["results"]) == {"linear"}

    assert main(["umap", str(out)]) == 0
    assert ad.read_h5ad(out).obsm["X_umap"].shape == (50, 2)


def test_embed_smears_detects_first(fake_weights, tmp_path):
    """Smear images have their WBCs detected, then each WBC is embedded."""
    folder = tmp_path / "smears"
    folder.mkdir()
    Image.fromarray(make_smear(3, shape=(384, 512), n_wbc=3).image).save(folder / "s.png")
    out = tmp_path / "s.h5ad"
    assert (
        main(
            [
                "embed",
                str(folder),
                "--model",
                "dinobloom-s",
                "--weights",
                str(fake_weights),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    adata = ad.read_h5ad(out)
    assert adata.n_obs >= 3
    assert adata.obs_names[0] == "smears/s.png#0"
    assert adata.obs["label"].isna().all()


def test_missing_weights_give_one_line_that_says_where_to_get_them(crops, tmp_path):
    """Without weights (and no --download): exit 1, one error naming Zenodo and the hub."""
    env_dir = tmp_path / "empty-cache"
    env_dir.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_hemofm.cli",
            "embed",
            str(crops / "lab_a"),
            "--model",
            "dinobloom-s",
            "--out",
            str(tmp_path / "x.h5ad"),
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HEMOFM_WEIGHTS_DIR": str(env_dir)},
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "10908163" in proc.stderr
    assert "1aurent/vit_small_patch14_224.dinobloom" in proc.stderr
    assert not (tmp_path / "x.h5ad").exists()


def test_eval_errors_are_one_line(tmp_path, crops, fake_weights):
    """eval on a non-project or a project without labels exits 1 with a clear line."""
    junk = tmp_path / "junk.h5ad"
    junk.write_text("nope")
    proc = run("eval", str(junk))
    assert proc.returncode == 1
    assert proc.stderr.startswith("hemofm: error:")
    assert "Traceback" not in proc.stderr


def test_embed_adds_to_an_existing_project(tmp_path, capsys):
    """A second `hemofm embed --out EXISTING` keeps known cells (ids, labels, embeddings),
    embeds only the new ones and says how many were reused; --batch on a re-run sets the
    batch without touching ids; another --model is refused in one line (exit 1) unless
    --reembed, which keeps ids and labels."""
    from napari_hemofm.core.io import load_project, save_project

    smears = tmp_path / "ward"
    smears.mkdir()
    Image.fromarray(make_smear(3, shape=(384, 512), n_wbc=3).image).save(smears / "s.png")
    crops = tmp_path / "lab"
    write_crop_folder(crops, n_per_class=2, seed=0, size=64)
    out = tmp_path / "p.h5ad"
    assert main(["embed", str(smears), "--out", str(out)]) == 0
    table = load_project(out)
    ids = table.cell_ids.tolist()
    emb = table.embeddings.copy()
    table.set_labels([ids[0]], "monocyte")
    save_project(table, out)
    table.close()
    capsys.readouterr()

    assert main(["embed", str(smears), str(crops), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"reused {len(ids)} cell(s)" in err
    table = load_project(out)
    assert table.cell_ids[: len(ids)].tolist() == ids
    np.testing.assert_array_equal(table.embeddings[: len(ids)], emb)
    assert table.obs.loc[ids[0], "label"] == "monocyte"
    n_all = table.n_cells
    assert n_all == len(ids) + 10
    table.close()

    assert main(["embed", str(smears), "--batch", "scanner-2", "--out", str(out)]) == 0
    table = load_project(out)
    assert table.cell_ids.tolist()[: len(ids)] == ids
    assert set(table.obs.loc[ids, "batch"]) == {"scanner-2"}
    assert set(table.obs["batch"]) == {"scanner-2", "lab"}
    assert table.obs.loc[ids[0], "label"] == "monocyte"
    table.close()

    proc = run("embed", str(smears), "--model", "dinobloom-s", "--out", str(out))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    proc = run("embed", str(smears), "--stain-norm", "reinhard", "--out", str(out))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("hemofm: error:")
    assert "--reembed" in proc.stderr

    assert (
        main(["embed", str(smears), "--stain-norm", "reinhard", "--reembed", "--out", str(out)])
        == 0
    )
    table = load_project(out)
    assert table.n_cells == n_all
    assert table.cell_ids[: len(ids)].tolist() == ids
    assert table.obs.loc[ids[0], "label"] == "monocyte"
    assert table.meta["stain_norm"]["method"] == "reinhard"
    assert np.isfinite(table.embeddings).all()


def test_a_corrupt_crop_is_named_and_left_out(tmp_path, capsys):
    """A crop whose pixels are cut off is named in the warning and is not in the project
    (no NaN embedding); the run still succeeds."""
    crops = tmp_path / "lab"
    write_crop_folder(crops, n_per_class=2, seed=0, size=64)
    victim = sorted((crops / "basophil").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:60])
    out = tmp_path / "p.h5ad"
    assert main(["embed", str(crops), "--out", str(out)]) == 0
    assert str(victim) in capsys.readouterr().err
    adata = ad.read_h5ad(out)
    assert adata.n_obs == 9
    assert str(victim) not in set(adata.obs["source"])
    assert np.isfinite(adata.obsm["X_embed"]).all()

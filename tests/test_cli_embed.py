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
    from safetensors.torch import save_file

    from napari_hemofm.core.models import build_model, get_spec

    torch = pytest.importorskip("torch")
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

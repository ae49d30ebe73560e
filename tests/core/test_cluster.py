"""Scale-out on Dask: the same project as one machine, and resumable."""

import distributed  # noqa: F401  (the cluster extra: installed by the test extra)
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from napari_hemofm.core.cluster import (
    EmbedJob,
    chunk_dir,
    chunk_key,
    chunk_sources,
    embed_on_cluster,
    parse_cluster,
    with_weights_sha256,
)
from napari_hemofm.core.inputs import scan_inputs
from napari_hemofm.core.synthetic import make_smear, write_crop_folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A crop folder (2 labs) and a folder of two smears: mixed sources."""
    root = tmp_path_factory.mktemp("cohort")
    write_crop_folder(root / "lab_a", n_per_class=3, seed=0, size=80)
    smears = root / "smears"
    smears.mkdir()
    for seed in (5, 6):
        Image.fromarray(make_smear(seed, shape=(320, 420), n_wbc=3).image).save(
            smears / f"s{seed}.png"
        )
    write_crop_folder(root / "lab_b", n_per_class=2, seed=1, size=64)
    return [root / "lab_a", smears, root / "lab_b"]


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory):
    """The single-process `hemofm embed` result to compare against."""
    import anndata as ad

    from napari_hemofm.cli import main

    out = tmp_path_factory.mktemp("single") / "p.h5ad"
    assert main(["embed", *map(str, inputs), "--model", "handcrafted", "--out", str(out)]) == 0
    return ad.read_h5ad(out)


def test_parse_cluster_accepts_the_documented_forms():
    """local, local:N and tcp://HOST:PORT parse; other strings are refused."""
    assert parse_cluster("local") == ("local", None)
    assert parse_cluster("local:3") == ("local", 3)
    assert parse_cluster("tcp://10.0.0.1:8786") == ("tcp://10.0.0.1:8786", None)
    for bad in ("local:0", "local:x", "http://a:1", "tcp://nohost"):
        with pytest.raises(ValueError, match="--cluster"):
            parse_cluster(bad)


def test_chunks_are_consecutive_and_cover_everything(inputs):
    """Chunks keep source order and cover each source once."""
    sources = scan_inputs(inputs).sources
    chunks = chunk_sources(sources, 4)
    assert [s for c in chunks for s in c] == sources
    assert all(len(c) <= 4 for c in chunks)


def test_chunk_key_follows_the_weights_content_not_only_their_path(inputs, tmp_path):
    """Same path, other bytes (same size, mtime set back): another key; same bytes: same."""
    import os
    import time

    sources = scan_inputs(inputs).sources[:3]
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"A" * 1000)
    stamp = weights.stat().st_mtime_ns
    job = EmbedJob(model="dinobloom-s", weights=str(weights))
    first = chunk_key(sources, job)
    assert chunk_key(sources, job) == first  # stable
    time.sleep(0.05)  # past the kernel's coarse ctime tick (a rewrite is never this quick)
    weights.write_bytes(b"B" * 1000)  # a retrained checkpoint copied over the old one
    os.utime(weights, ns=(stamp, stamp))  # even with the old time (cp -p, rsync -t)
    second = chunk_key(sources, job)
    assert second != first
    filled = with_weights_sha256(job)
    assert filled.weights_sha256 is not None
    assert len(filled.weights_sha256) == 64
    assert chunk_key(sources, filled) == second  # a job that carries the hash: same key
    time.sleep(0.05)
    weights.write_bytes(b"A" * 1000)
    assert chunk_key(sources, job) == first  # the old content again: the old chunks count
    # without weights nothing is hashed and the key is the path-free job's
    assert with_weights_sha256(EmbedJob(model="handcrafted")).weights_sha256 is None


def test_chunk_key_follows_the_handcrafted_feature_version(inputs, monkeypatch):
    """A bump of the handcrafted features' version (same name, same dimension) gives
    other chunk keys, so a resumed run does not reuse chunks of the old features;
    DinoBloom's keys do not depend on it."""
    from napari_hemofm.core import features

    sources = scan_inputs(inputs).sources[:3]
    handcrafted, dino = EmbedJob(model="handcrafted"), EmbedJob(model="dinobloom-s")
    first, first_dino = chunk_key(sources, handcrafted), chunk_key(sources, dino)
    monkeypatch.setattr(features, "FEATURE_VERSION", features.FEATURE_VERSION + 1)
    assert chunk_key(sources, handcrafted) != first
    assert chunk_key(sources, dino) == first_dino
    monkeypatch.undo()
    assert chunk_key(sources, handcrafted) == first


def test_two_worker_cluster_gives_the_single_process_project(inputs, single, tmp_path):
    """A LocalCluster of two worker processes: same cell ids and order, same labels and
    batches, embeddings allclose to the single-process run."""
    out = tmp_path / "c.h5ad"
    table, summary = embed_on_cluster(
        scan_inputs(inputs), EmbedJob("handcrafted"), out, cluster="local:2", chunk_size=3
    )
    assert summary["computed"] == summary["chunks"] > 2
    assert table.cell_ids.tolist() == single.obs_names.tolist()
    for col in ("batch", "label", "source", "x0", "y1"):
        assert table.obs[col].astype(str).tolist() == single.obs[col].astype(str).tolist()
    np.testing.assert_allclose(table.embeddings, single.obsm["X_embed"], rtol=1e-5, atol=1e-6)
    assert table.meta["model"] == "handcrafted"


def test_interrupted_run_resumes_to_the_same_file(inputs, single, tmp_path):
    """Stop after 2 chunks, rerun: finished chunks are reused, the result is identical;
    a third run computes nothing."""
    out = tmp_path / "r.h5ad"
    scan = scan_inputs(inputs)
    job = EmbedJob("handcrafted")
    table, summary = embed_on_cluster(
        scan, job, out, cluster="local:2", chunk_size=2, _max_chunks=2
    )
    assert table is None
    n_files = len(list(chunk_dir(out).glob("chunk-*.h5ad")))
    assert 2 <= n_files < summary["chunks"]
    table, summary = embed_on_cluster(scan, job, out, cluster="local:2", chunk_size=2)
    assert summary["reused"] == n_files
    assert summary["computed"] == summary["chunks"] - n_files
    assert table.cell_ids.tolist() == single.obs_names.tolist()
    np.testing.assert_allclose(table.embeddings, single.obsm["X_embed"], rtol=1e-5, atol=1e-6)
    again, summary = embed_on_cluster(scan, job, out, cluster="local:1", chunk_size=2)
    assert summary["computed"] == 0
    pd.testing.assert_frame_equal(again.obs, table.obs)

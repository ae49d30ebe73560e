"""Every bad input to `hemofm` gets one clear line, never a traceback (issue 11.8).

Usage errors (a value argparse refuses) exit 2 with argparse's usage and one error line;
bad files (weights, probes, projects) and an impossible pixel size exit 1 with one
``hemofm: error:`` line. Each case runs through ``cli.main`` with stderr captured; one
case runs the real command in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from napari_hemofm.cli import main
from napari_hemofm.core.io import load_project, save_project
from napari_hemofm.core.synthetic import make_smear


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


def assert_one_line(err: str, *needles: str) -> str:
    """Exactly one error line, no traceback; it contains every needle."""
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def smear(tmp_path_factory):
    path = tmp_path_factory.mktemp("smear") / "smear.png"
    Image.fromarray(make_smear(3, shape=(300, 400), n_wbc=3).image).save(path)
    return path


@pytest.fixture
def project(tmp_path, cell_table):
    """A saved 400-cell project with embeddings."""
    path = tmp_path / "p.h5ad"
    save_project(cell_table, path)
    return path


# ----------------------------------------------------------------- usage errors: exit 2
@pytest.mark.parametrize(
    "args",
    [
        ["report", "{p}", "--out", "{t}/c.csv", "--target", "0"],
        ["report", "{p}", "--out", "{t}/c.csv", "--target", "-5"],
        ["sample", "{t}/s", "--per-batch", "-2"],
        ["sample", "{t}/s", "--per-batch", "0"],
        ["report", "{p}", "--out", "{t}/c.csv", "--threshold", "1.5"],
        ["report", "{p}", "--out", "{t}/c.csv", "--threshold", "-0.1"],
        ["report", "{p}", "--out", "{t}/c.csv", "--threshold", "nan"],
        ["umap", "{p}", "--seed", "-1"],
        ["batch", "{p}", "--seed", "-1"],
        ["sample", "{t}/s", "--seed", "-1"],
        ["sample", "{t}/s", "--seed", str(2**32)],
        ["detect", "{t}", "--out", "{t}/c.csv", "--pixel-size", "inf"],
        ["detect", "{t}", "--out", "{t}/c.csv", "--pixel-size", "nan"],
        ["embed", "{t}", "--out", "{t}/q.h5ad", "--pixel-size", "inf"],
    ],
    ids=lambda a: " ".join(a[:1] + a[-2:]),
)
def test_bad_option_values_are_usage_errors(args, project, tmp_path, capsys):
    """Each value is refused by argparse: exit 2, one error line naming the option."""
    argv = [a.format(p=project, t=tmp_path) for a in args]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    line = assert_one_line(capsys.readouterr().err, "argument " + args[-2])
    assert "must be" in line


@pytest.mark.parametrize("value", ["0", "1", "0.5"])
def test_threshold_bounds_are_accepted(value, project, tmp_path):
    """0 and 1 themselves are valid thresholds."""
    assert (
        main(["report", str(project), "--out", str(tmp_path / "c.csv"), "--threshold", value]) == 0
    )


# ----------------------------------------------------------------- bad files: exit 1
def _weights_text(path):
    path.write_text("these are not weights\n")


def _weights_truncated_pth(path):
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 384)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _weights_truncated_safetensors(path):
    from safetensors.torch import save_file

    save_file({"cls_token": torch.zeros(1, 1, 384)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _weights_garbage_pickle(path):
    path.write_bytes(b"\x80\x02" + bytes(range(256)) * 4)


@pytest.mark.parametrize(
    ("name", "make", "needle"),
    [
        ("w.txt", _weights_text, "neither a PyTorch checkpoint nor a safetensors"),
        ("w.pth", _weights_text, "neither a PyTorch checkpoint nor a safetensors"),
        ("cut.pth", _weights_truncated_pth, "truncated or corrupt"),
        ("cut.safetensors", _weights_truncated_safetensors, "truncated or corrupt"),
        # random bytes after a pickle header: refused by the safe unpickler or as corrupt
        ("bad.pth", _weights_garbage_pickle, "Weights file"),
    ],
)
def test_bad_weights_file_is_one_line(name, make, needle, smear, tmp_path, capsys):
    """A text file, a cut checkpoint or random bytes as --weights: exit 1, one line."""
    weights = tmp_path / name
    make(weights)
    out = tmp_path / "q.h5ad"
    code = main(["embed", str(smear), "--model", "dinobloom-s", "--weights", str(weights),
                 "--out", str(out)])  # fmt: skip
    assert code == 1
    assert_one_line(capsys.readouterr().err, needle, str(weights))
    assert not out.exists()


def _probe_file(path, cut: int | None):
    from napari_hemofm.core.probe import LiveProbe

    rng = np.random.default_rng(0)
    probe = LiveProbe("knn")
    probe.fit(rng.normal(size=(40, 8)).astype(np.float32), np.array(["a", "b"] * 20, object))
    probe.save(path)
    if cut is not None:
        data = path.read_bytes()
        path.write_bytes(data[:cut])


@pytest.mark.parametrize("cut", [100, -30, 0], ids=["first 100 bytes", "last 30 cut", "empty"])
def test_truncated_probe_file_is_one_line(cut, project, tmp_path, capsys):
    """A cut probe .npz: exit 1, one line naming the file once."""
    probe = tmp_path / "probe.npz"
    _probe_file(probe, cut)
    code = main(["report", str(project), "--out", str(tmp_path / "c.csv"),
                 "--probe-file", str(probe)])  # fmt: skip
    assert code == 1
    line = assert_one_line(capsys.readouterr().err, "not a napari-hemofm probe file")
    assert line.count(str(probe)) == 1


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("classes", 5),
        ("unidentified_below", "high"),
        ("unidentified_below", 3.0),
        ("pixel_size_um", -1.0),
        ("signoffs", 7),
        ("umap", "x"),
        ("schema_version", "one"),
        (None, "not a mapping"),
    ],
)
@pytest.mark.parametrize("command", ["report", "umap", "eval"])
def test_project_with_wrongly_typed_settings_is_one_line(
    key, value, command, project, tmp_path, capsys
):
    """uns['hemofm'] entries of the wrong type: every reading command says which, exit 1."""
    import anndata as ad

    adata = ad.read_h5ad(project)
    if key is None:
        adata.uns["hemofm"] = value
    else:
        adata.uns["hemofm"][key] = value
    adata.write_h5ad(project)
    argv = [command, str(project)]
    if command == "report":
        argv += ["--out", str(tmp_path / "c.csv")]
    assert main(argv) == 1
    line = assert_one_line(capsys.readouterr().err, str(project), "uns['hemofm']")
    if key is not None:
        assert key in line


def test_well_typed_settings_still_load(project):
    """The check passes what the package itself writes (h5ad's numpy types included)."""
    table = load_project(project, mode="r")
    table.update_meta(pixel_size_um=0.25, unidentified_below=0.0, umap={"n": 1})
    save_project(table, project.with_name("q.h5ad"))
    load_project(project.with_name("q.h5ad"), mode="r")


@pytest.mark.parametrize("pixel_size", ["1e-9", "0.005"])
def test_pixel_size_that_fits_no_cell_is_one_line(pixel_size, smear, tmp_path, capsys):
    """A pixel size at which one WBC is wider than the image: exit 1 at once, one line
    (before it tried to allocate windows of petabytes)."""
    code = main(["detect", str(smear), "--out", str(tmp_path / "c.csv"),
                 "--pixel-size", pixel_size])  # fmt: skip
    assert code == 1
    assert_one_line(capsys.readouterr().err, "too small for a 400x300 image")


def test_bad_weights_in_a_real_process(smear, tmp_path):
    """The installed command, not only main(): one line on stderr, exit 1."""
    weights = tmp_path / "w.txt"
    _weights_text(weights)
    proc = subprocess.run(
        [sys.executable, "-m", "napari_hemofm.cli", "embed", str(smear), "--model",
         "dinobloom-s", "--weights", str(weights), "--out", str(tmp_path / "q.h5ad")],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 1
    assert_one_line(proc.stderr, "neither a PyTorch checkpoint")

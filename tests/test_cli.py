"""The `hemofm` command: CSV contract, exit codes, skipped-file warning, --help."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from napari_hemofm.cli import DETECT_CSV_COLUMNS, main
from napari_hemofm.core.synthetic import make_smear


def run(*args: str, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "napari_hemofm.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def smear_dir(tmp_path_factory):
    """A folder of two synthetic smears with a space and non-ASCII in its name."""
    root = tmp_path_factory.mktemp("cli") / "Labor Ärzte 1"
    root.mkdir()
    for seed in (1, 2):
        Image.fromarray(make_smear(seed, shape=(480, 640), n_wbc=5).image).save(
            root / f"smear {seed}.png"
        )
    return root


def test_help_lists_the_subcommands():
    """`hemofm --help` and `hemofm detect --help` exit 0 and describe the options."""
    top = run("--help")
    assert top.returncode == 0
    assert "detect" in top.stdout
    assert "sample" in top.stdout
    sub = run("detect", "--help")
    assert sub.returncode == 0
    assert "--out" in sub.stdout
    assert "--pixel-size" in sub.stdout


def test_detect_writes_the_contract_csv(smear_dir, tmp_path):
    """One row per WBC with exactly the contract columns, ids '<batch>/<file>#<n>'."""
    out = tmp_path / "cells.csv"
    assert main(["detect", str(smear_dir), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == DETECT_CSV_COLUMNS
    assert len(table) >= 8
    assert table["cell_id"].is_unique
    first = table.iloc[0]
    assert first.cell_id.startswith("Labor Ärzte 1/smear 1.png#")
    assert (table.x0 < table.x).all()
    assert (table.x < table.x1).all()
    assert (table.y0 < table.y).all()
    assert (table.y < table.y1).all()
    assert table["score"].between(0, 1).all()


def test_skipped_files_give_one_warning_and_exit_zero(smear_dir, tmp_path):
    """A corrupt, an empty and a non-image file are named in one warning; exit code 0."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = np.asarray(Image.open(next(smear_dir.glob("*.png"))))
    Image.fromarray(good).save(folder / "good.jpg", quality=92)
    data = (folder / "good.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 3])
    (folder / "empty.png").write_bytes(b"")
    (folder / "readme.txt").write_text("not an image")
    out = tmp_path / "cells.csv"
    proc = run("detect", str(folder), str(folder / "readme.txt"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning: skipped" in line]
    assert len(warnings) == 1
    assert "skipped 3 file(s)" in warnings[0]
    for name in ("cut.jpg", "empty.png", "readme.txt"):
        assert name in proc.stderr
    table = pd.read_csv(out)
    assert set(table["image"]) == {str(folder / "good.jpg")}
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("kind", ["empty_folder", "non_images", "missing", "all_corrupt"])
def test_nothing_readable_exits_1_with_one_line(tmp_path, kind):
    """When no input can be read: exit 1, one 'hemofm: error:' line, no traceback, no CSV."""
    target = tmp_path / "in"
    if kind != "missing":
        target.mkdir()
    if kind == "non_images":
        (target / "a.txt").write_text("x")
    if kind == "all_corrupt":
        (target / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "cells.csv"
    proc = run("detect", str(target), "--out", str(out))
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hemofm: error:")]
    assert len(errors) == 1
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_usage_errors_exit_2(tmp_path):
    """A missing --out or a bad --pixel-size is a usage error (exit 2)."""
    assert run("detect", str(tmp_path)).returncode == 2
    assert run("detect", str(tmp_path), "--out", "x.csv", "--pixel-size", "-1").returncode == 2
    assert run("frobnicate").returncode == 2


def test_sample_then_detect_round_trip(tmp_path):
    """`hemofm sample` writes three batches; detecting them finds most ground-truth WBCs."""
    assert main(["sample", str(tmp_path / "s"), "--per-batch", "1"]) == 0
    truth = pd.read_csv(tmp_path / "s" / "ground_truth.csv")
    batches = sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir())
    assert len(batches) == 3
    out = tmp_path / "cells.csv"
    assert main(["detect", *[str(tmp_path / "s" / b) for b in batches], "--out", str(out)]) == 0
    cells = pd.read_csv(out)
    assert set(cells["cell_id"].str.split("/").str[0]) == set(batches)
    assert len(cells) >= 0.9 * len(truth)

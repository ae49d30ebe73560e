"""`hemofm batch`: DESIGN.md's JSON keys, the readable table, exit codes."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from napari_hemofm.cli import main
from napari_hemofm.core.batch import METRIC_INFO
from napari_hemofm.core.cells import table_from_frame


def save_cells(path, cells, X, *, embed=True):
    """Save labelled cells (dicts of ``cell_id``, ``source``, ``batch``, ``label``, ...)
    as a project, each with the same 10-pixel box; embeddings ``X`` unless ``embed`` is
    False."""
    box = {"x": 5.0, "y": 5.0, "x0": 0, "y0": 0, "x1": 10, "y1": 10}
    table = table_from_frame(pd.DataFrame([cell | box for cell in cells]))
    if embed:
        table.set_embeddings(np.asarray(X, dtype=np.float32), model="handcrafted")
    return table.save(path)


def make_project(path, *, n_batches=2, embed=True, shift=3.0, seed=0):
    """A project of 3 cell types x 25 cells per batch, lab1 shifted by ``shift``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 6)) * 4
    rows, X = [], []
    for i in range(n_batches):
        for t in range(3):
            for k in range(25):
                rows.append(
                    {
                        "cell_id": f"lab{i}/type{t}/{k}.png#0",
                        "source": f"lab{i}/type{t}/{k}.png",
                        "batch": f"lab{i}",
                        "label": f"type{t}",
                    }
                )
                X.append(centres[t] + rng.normal(size=6) + i * shift)
    return save_cells(path, rows, X, embed=embed)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("batch") / "p.h5ad")


def test_json_prints_the_design_keys(project, capsys):
    """--json prints one object with batches, metrics (DESIGN.md's keys), per_label,
    directions; exit code 0; the project file is not changed."""
    before = project.read_bytes()
    assert main(["batch", str(project), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["batches"] == ["lab0", "lab1"]
    for key in (
        "ilisi",
        "ilisi_raw",
        "kbet_acceptance",
        "pcr_batch",
        "batch_asw",
        "celltype_asw",
        "graph_connectivity",
        "nmi",
        "ari",
        "lobo_knn_balanced_accuracy",
    ):
        assert key in out["metrics"]
    assert set(out["per_label"]) == {"type0", "type1", "type2"}
    assert out["directions"]["pcr_batch"] == "higher = stronger batch effect"
    assert out["directions"]["ilisi"] == "higher = better mixed"
    assert 0 <= out["metrics"]["ilisi"] <= 1
    assert out["correction"] is None
    assert project.read_bytes() == before


def test_correct_reports_before_and_after(project, capsys):
    """--correct centre reports on a corrected copy with the uncorrected values beside;
    the shift is removed, so iLISI rises and PCR-batch falls."""
    assert main(["batch", str(project), "--json", "--correct", "centre"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["correction"] == "centre"
    assert out["metrics"]["ilisi"] > out["uncorrected"]["ilisi"] + 0.3
    assert out["metrics"]["pcr_batch"] < out["uncorrected"]["pcr_batch"]


def test_readable_table(project, capsys):
    """Without --json: one row per metric with its value, direction and meaning, and a
    per-cell-type table."""
    assert main(["batch", str(project)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    for name, (direction, meaning) in METRIC_INFO.items():
        row = next(line for line in lines if line.startswith(name + " "))
        assert direction in row
        assert meaning in row
    assert "cell type" in text
    assert any(line.startswith("type0 ") for line in lines)


def test_no_embeddings_or_one_batch_exit_1_with_one_line(tmp_path, capsys):
    """A project without embeddings, or with one batch: exit 1, one clear error line."""
    bare = make_project(tmp_path / "bare.h5ad", embed=False)
    assert main(["batch", str(bare)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1
    assert "no embeddings" in err[0]
    one = make_project(tmp_path / "one.h5ad", n_batches=1)
    assert main(["batch", str(one), "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = [line for line in captured.err.splitlines() if "error" in line]
    assert len(err) == 1
    assert ">= 2 batches" in err[0]


def test_unknown_label_column_and_usage_errors(project):
    """An unknown --label-column is exit 1 without a traceback; a bad --correct is a
    usage error (2)."""
    proc = subprocess.run(
        [sys.executable, "-m", "napari_hemofm.cli", "batch", str(project), "--label-column", "x9"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "no column 'x9'" in proc.stderr
    with pytest.raises(SystemExit) as exc:
        main(["batch", str(project), "--correct", "scale"])
    assert exc.value.code == 2


def make_small_batch_project(path, *, seed=0):
    """A 150-cell lab (3 types x 50), a 16-cell lab and a 3-cell lab, all labelled; each
    cell on its own smear image (slide) of two per lab."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 6)) * 4
    rows, X = [], []
    for lab, n, shift in (("big", 150, 0.0), ("lab16", 16, 1.0), ("lab3", 3, 1.0)):
        for k in range(n):
            t = k % 3
            rows.append(
                {
                    "cell_id": f"{lab}/s{k % 2}.png#{k}",
                    "source": f"{lab}/s{k % 2}.png",
                    "batch": lab,
                    "slide": f"{lab}/s{k % 2}.png",
                    "label": f"type{t}",
                }
            )
            X.append(centres[t] + rng.normal(size=6) + shift)
    return save_cells(path, rows, X)


@pytest.fixture(scope="module")
def small_project(tmp_path_factory):
    return make_small_batch_project(tmp_path_factory.mktemp("small") / "small.h5ad")


def test_small_batches_exit_0_with_reasons(small_project, capsys):
    """`hemofm batch` on a 3-cell and a 16-cell lab beside a big one: exit 0; the JSON
    names the batches the probes could not hold out and why; the readable form prints
    the same reasons; every correction runs (ComBat leaves nothing out here: each lab
    has >= 2 labelled cells)."""
    assert main(["batch", str(small_project), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["batches"] == ["big", "lab16", "lab3"]
    assert "fewer than 10" in out["lobo"]["skipped"]["knn"]["lab3"]
    assert out["metrics"]["ilisi"] is not None
    assert out["metrics"]["lobo_knn_balanced_accuracy"] is not None
    for name, value in out["metrics"].items():
        assert value is not None or out["reasons"][name]
    assert main(["batch", str(small_project)]) == 0
    text = capsys.readouterr().out
    assert "lab3 not held out" in text
    for method in ("centre", "combat"):
        assert main(["batch", str(small_project), "--json", "--correct", method]) == 0
        assert json.loads(capsys.readouterr().out)["correction"] == method


def test_eval_split_batch_skips_small_batches(small_project, capsys):
    """`hemofm eval --split batch` (kNN k=20 used to fail on the 16-cell lab): exit 0,
    the skipped batches named in JSON and in the readable output."""
    for probe in ("knn", "linear"):
        assert main(["eval", str(small_project), "--probe", probe, "--split", "batch",
                     "--json"]) == 0  # fmt: skip
        out = json.loads(capsys.readouterr().out)
        assert "lab3" in out["skipped_batches"]
        assert "lab16" in out["per_batch"]
    assert main(["eval", str(small_project), "--split", "batch"]) == 0
    assert "batch lab3 not held out" in capsys.readouterr().out


def test_by_slide_compares_smears_and_falls_back(small_project, tmp_path, capsys):
    """--by slide compares the smears (two per lab here); on a project without slides it
    falls back to the batches and says so; an unknown column is exit 1 with one line."""
    assert main(["batch", str(small_project), "--json", "--by", "slide"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["by"] == "slide"
    assert len(out["batches"]) == 6
    no_slides = make_project(tmp_path / "noslide.h5ad")  # its slide column is empty
    assert main(["batch", str(no_slides), "--by", "slide"]) == 0
    assert "no slides" in capsys.readouterr().out
    assert main(["batch", str(small_project), "--by", "scanner"]) == 1
    assert "no column 'scanner'" in capsys.readouterr().err

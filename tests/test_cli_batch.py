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
                        "x": 5.0,
                        "y": 5.0,
                        "x0": 0,
                        "y0": 0,
                        "x1": 10,
                        "y1": 10,
                        "label": f"type{t}",
                    }
                )
                X.append(centres[t] + rng.normal(size=6) + i * shift)
    table = table_from_frame(pd.DataFrame(rows))
    if embed:
        table.set_embeddings(np.asarray(X, dtype=np.float32), model="handcrafted")
    return table.save(path)


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

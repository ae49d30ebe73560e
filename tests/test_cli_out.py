"""`--out` is safe (issue 11.7): it never destroys an input and is checked before work.

An output naming an input (a smear, a crop, an image inside an input folder, the project
a command only reads, its journal) is refused with exit 2 and one line, and the input is
left byte for byte; a symbolic link is written through (the link stays); a folder, FIFO
or device is refused; an existing output keeps its mode; an output folder that cannot
be written is reported (exit 1) before any input is looked at.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from napari_hemofm.cli import main
from napari_hemofm.core.io import (
    OutputPathError,
    load_project,
    resolve_output,
    save_project,
    write_csv,
)
from napari_hemofm.core.synthetic import make_smear


@pytest.fixture
def smears(tmp_path):
    """A folder of two small synthetic smears."""
    folder = tmp_path / "smears"
    folder.mkdir()
    for seed in (1, 2):
        Image.fromarray(make_smear(seed, shape=(300, 400), n_wbc=3).image).save(
            folder / f"s{seed}.png"
        )
    return folder


@pytest.fixture
def project(tmp_path, cell_table):
    path = tmp_path / "p.h5ad"
    save_project(cell_table, path)
    return path


def refused(argv, capsys, code=2, *needles):
    """Run main(argv): it returns ``code`` with exactly one error line holding the needles."""
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ names an input
@pytest.mark.parametrize("command", ["detect", "embed"])
def test_out_naming_an_input_smear_is_refused_and_the_smear_kept(command, smears, capsys):
    smear = smears / "s1.png"
    before = smear.read_bytes()
    refused([command, smears, "--out", smear], capsys, 2, "inside the input folder", str(smear))
    refused([command, smear, "--out", smear], capsys, 2, "is the input")
    assert smear.read_bytes() == before


def test_out_as_new_image_inside_an_input_folder_is_refused(smears, tmp_path, capsys):
    """A new image file there would be read as an input next time."""
    out = smears / "cells.png"
    refused(["detect", smears, "--out", out], capsys, 2, "inside the input folder")
    assert not out.exists()
    # a CSV beside the smears is no input: allowed
    assert main(["detect", str(smears), "--out", str(smears / "cells.csv")]) == 0


def test_out_as_crop_of_a_crop_folder_is_refused(tmp_path, capsys):
    crops = tmp_path / "crops"
    (crops / "neutrophil").mkdir(parents=True)
    crop = crops / "neutrophil" / "a.png"
    Image.fromarray(make_smear(1, shape=(64, 64), n_wbc=0).image).save(crop)
    before = crop.read_bytes()
    refused(["detect", crops, "--out", crop], capsys, 2, "inside the input folder")
    assert crop.read_bytes() == before


def test_links_to_an_input_are_refused(smears, tmp_path, capsys):
    """A symbolic or a hard link to an input is the input."""
    smear = smears / "s1.png"
    soft = tmp_path / "soft.csv"
    soft.symlink_to(smear)
    hard = tmp_path / "hard.csv"
    os.link(smear, hard)
    before = smear.read_bytes()
    refused(["detect", smear, "--out", soft], capsys, 2, "the input")
    refused(["detect", smear, "--out", hard], capsys, 2, "the input")
    assert smear.read_bytes() == before
    assert soft.is_symlink()


def test_out_naming_the_read_project_or_its_files_is_refused(project, tmp_path, capsys):
    """`report` only reads the project: --out may not be it, its journal or the probe."""
    before = project.read_bytes()
    refused(["report", project, "--out", project], capsys, 2, "is the input")
    journal = project.with_name("p.labels.jsonl")
    refused(["report", project, "--out", journal], capsys, 2, "part of")
    probe = tmp_path / "probe.npz"
    probe.write_bytes(b"PK")
    refused(["report", project, "--out", probe, "--probe-file", probe], capsys, 2, "the input")
    assert project.read_bytes() == before
    load_project(project, mode="r")  # still a project


def test_out_naming_the_weights_is_refused(smears, tmp_path, capsys):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"PK\x03\x04")
    refused(["embed", smears, "--model", "dinobloom-s", "--weights", weights, "--out", weights],
            capsys, 2, "the input")  # fmt: skip
    assert weights.read_bytes() == b"PK\x03\x04"


# ------------------------------------------------------------------ special files
@pytest.mark.parametrize("kind", ["folder", "fifo", "device"])
def test_special_files_are_refused(kind, smears, tmp_path, capsys):
    """A folder, a FIFO (which would block) or a device: exit 2, nothing written."""
    if kind == "folder":
        out = tmp_path / "adir"
        out.mkdir()
    elif kind == "fifo":
        out = tmp_path / "fifo"
        os.mkfifo(out)
    else:
        out = "/dev/null"
    refused(["detect", smears, "--out", out], capsys, 2, "not a file that can be written")


def test_link_to_a_fifo_is_refused(smears, tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link.csv"
    link.symlink_to(fifo)
    refused(["detect", smears, "--out", link], capsys, 2, "named pipe", "through the link")


# ------------------------------------------------------------------ links and modes
def test_symlink_out_is_written_through(smears, tmp_path):
    """The file the link points to gets the CSV; the link stays a link."""
    real = tmp_path / "results" / "cells.csv"
    real.parent.mkdir()
    real.write_text("old\n")
    link = tmp_path / "cells.csv"
    link.symlink_to(real)
    assert main(["detect", str(smears), "--out", str(link)]) == 0
    assert link.is_symlink()
    assert os.readlink(link) == str(real)
    table = pd.read_csv(real)
    assert "cell_id" in table.columns
    assert not list(real.parent.glob(".*tmp*"))  # no temp file left


def test_dangling_symlink_creates_its_target(smears, tmp_path):
    real = tmp_path / "later" / "cells.csv"
    link = tmp_path / "cells.csv"
    link.symlink_to(real)
    assert main(["detect", str(smears), "--out", str(link)]) == 0
    assert link.is_symlink()
    assert real.is_file()


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o664])
def test_existing_output_keeps_its_mode(mode, smears, tmp_path):
    out = tmp_path / "cells.csv"
    out.write_text("old\n")
    out.chmod(mode)
    assert main(["detect", str(smears), "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == mode
    assert "cell_id" in out.read_text()


def test_saved_project_keeps_its_mode_and_link(cell_table, tmp_path):
    """save_project writes through a link and keeps the existing file's mode."""
    real = tmp_path / "store" / "p.h5ad"
    real.parent.mkdir()
    save_project(cell_table, real)
    real.chmod(0o600)
    link = tmp_path / "p.h5ad"
    link.symlink_to(real)
    table = load_project(link)
    table.update_meta(pixel_size_um=0.5)
    save_project(table, link)
    assert link.is_symlink()
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    assert float(load_project(real, mode="r").meta["pixel_size_um"]) == 0.5


def test_resolve_output_follows_chains_and_reports_the_mode(tmp_path):
    real = tmp_path / "real.csv"
    real.write_text("x")
    real.chmod(0o640)
    one = tmp_path / "one.csv"
    one.symlink_to(real)
    two = tmp_path / "two.csv"
    two.symlink_to(one)
    assert resolve_output(two) == (real, 0o640)
    assert resolve_output(tmp_path / "new.csv") == (tmp_path / "new.csv", None)
    with pytest.raises(OutputPathError, match="a folder"):
        resolve_output(tmp_path)
    write_csv(pd.DataFrame({"a": [1]}), two)
    assert two.is_symlink()
    assert one.is_symlink()
    assert real.read_text().startswith("a")
    assert stat.S_IMODE(real.stat().st_mode) == 0o640


# ------------------------------------------------------------------ unwritable folders
def test_out_under_a_file_is_reported_before_any_work(tmp_path, capsys):
    """The input does not even exist: the --out problem is what is reported (exit 1)."""
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    line = refused(
        ["detect", tmp_path / "missing-input", "--out", blocker / "sub" / "c.csv"],
        capsys,
        1,
        "is not a folder",
    )
    assert "missing-input" not in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_reported_before_any_work(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        refused(["detect", tmp_path / "missing", "--out", folder / "c.csv"], capsys, 1,
                "cannot write to folder")  # fmt: skip
    finally:
        folder.chmod(0o700)


def test_unwritable_folder_is_found_by_trying(tmp_path, capsys, monkeypatch):
    """The check creates (and removes) a probe file: whatever refuses it is reported."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    refused(["detect", tmp_path / "missing", "--out", tmp_path / "c.csv"], capsys, 1,
            "cannot write to folder", "Permission denied")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_sample_out_dir_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    refused(["sample", target], capsys, 2, "is not a folder")
    assert target.read_text() == "x"


def test_refusal_in_a_real_process(smears):
    """The installed command: exit 2, one line, the smear untouched."""
    smear = smears / "s1.png"
    before = smear.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "napari_hemofm.cli", "detect", str(smears), "--out", str(smear)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
    assert smear.read_bytes() == before

"""The npe2 manifest validates, imports, and the root napari.yaml points at it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_root_manifest_is_a_link_to_the_package_manifest():
    """napari.yaml at the repository root is a symlink to napari_hemofm/napari.yaml."""
    root = ROOT / "napari.yaml"
    assert root.is_symlink()
    assert root.resolve() == (ROOT / "napari_hemofm" / "napari.yaml").resolve()


def test_npe2_validate_passes_with_imports():
    """`npe2 validate napari-hemofm --imports` accepts the installed plugin: every command
    points at an importable callable (no placeholder entries)."""
    beside = Path(sys.executable).with_name("npe2")
    npe2 = str(beside) if beside.exists() else shutil.which("npe2")
    if npe2 is None:
        pytest.skip("npe2's command line is not on PATH")
    proc = subprocess.run(
        [npe2, "validate", "napari-hemofm", "--imports"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "valid" in proc.stdout

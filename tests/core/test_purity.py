"""The headless core never imports the GUI stack (DESIGN.md, STYLE.md 1)."""

import pkgutil
import subprocess
import sys

import napari_hemofm.core

GUI_MODULES = ("napari", "qtpy", "magicgui", "PyQt5", "PyQt6", "PySide2", "PySide6", "vispy")


def test_core_modules_import_no_gui_package():
    """Importing every module of napari_hemofm.core (and the CLI) in a fresh interpreter
    loads none of napari, qtpy, magicgui, a Qt binding or vispy."""
    names = [
        m.name for m in pkgutil.iter_modules(napari_hemofm.core.__path__, "napari_hemofm.core.")
    ]
    assert len(names) >= 5, names
    code = (
        "import sys, importlib\n"
        f"for name in {[*names, 'napari_hemofm.cli']!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {GUI_MODULES!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"core imported GUI modules: {out}"


def test_package_import_stays_light():
    """`import napari_hemofm` (what napari's plugin menu does) loads no torch, timm or umap,
    nor does importing the public names of a script's first line (they load lazily)."""
    code = (
        "import sys, napari_hemofm\n"
        "from napari_hemofm import CellTable, Review, collect_cells, load_project\n"
        "heavy = ('torch', 'timm', 'umap', 'sklearn')\n"
        "print(','.join(sorted(m for m in heavy if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"heavy modules imported at package import: {out}"

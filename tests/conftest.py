"""Fixtures shared by the whole test suite.

- ``cell_table``: a seeded 400-cell table in five classes and two batches
  (:func:`napari_hemofm._testing.make_cell_table`); tests that need another shape call
  the builder themselves.
- ``shared_data``: the real data folder ``../shared/data``; a test that takes it is
  skipped, with the reason, where the folder (or the sub-folder it asks for through
  ``shared_data / name``) is absent, e.g. on a user's machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_hemofm._testing import make_cell_table, shared_data_dir


@pytest.fixture
def cell_table():
    """400 seeded cells: five classes, two batches, half of them labelled."""
    return make_cell_table(400, seed=0)


class SharedData:
    """``../shared/data``: ``shared_data / "pbc_dev"`` skips the test when it is missing."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __truediv__(self, name: str) -> Path:
        path = self.root / name
        if not path.exists():
            pytest.skip(f"real data not found at {path} (see ../shared/data/README.md)")
        return path


@pytest.fixture(scope="session")
def shared_data() -> SharedData:
    """The real data beside the repository; skips where it is absent."""
    root = shared_data_dir()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (see ../shared/data/README.md)")
    return SharedData(root)

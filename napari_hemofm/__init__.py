"""napari-hemofm: review white blood cells in napari with a hematology foundation model.

The public Python API lives in :mod:`napari_hemofm.core` (GUI-free); the napari
widgets live in ``napari_hemofm._widgets`` and only call core. The names below are
the supported entry points (see ``docs/python-api.md``).
"""

__version__ = "0.1.0"

from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.review import NOT_CLASSED, UNIDENTIFIED, UNLABELLED, Review

__all__ = ["NOT_CLASSED", "UNIDENTIFIED", "UNLABELLED", "CellTable", "Review", "__version__"]

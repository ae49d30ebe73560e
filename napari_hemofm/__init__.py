"""napari-hemofm: review white blood cells in napari with a hematology foundation model.

The public Python API lives in :mod:`napari_hemofm.core` (GUI-free); the napari
widgets live in ``napari_hemofm._widgets`` and only call core.
"""

__version__ = "0.1.0"

from napari_hemofm.core.cells import CellTable

__all__ = ["CellTable", "__version__"]

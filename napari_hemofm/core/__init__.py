"""Headless core of napari-hemofm.

Pure Python on numpy, scikit-image, scikit-learn, torch and anndata. Nothing in this
package imports napari, qtpy or magicgui (``tests/core/test_purity.py`` checks it):
every widget calls a function here first, and the ``hemofm`` command line calls the
same functions without a screen.
"""

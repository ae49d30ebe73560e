"""napari-hemofm: review white blood cells in napari with a hematology foundation model.

The names below are the supported entry points of a script (see ``docs/python-api.md``);
they come from the GUI-free :mod:`napari_hemofm.core` and one import line reaches them::

    from napari_hemofm import CellTable, Review, collect_cells, embed_table, load_backbone

They are loaded on first use (module-level ``__getattr__``), so ``import napari_hemofm``,
which napari's plugin menu does, stays light: no torch, timm, umap or scikit-learn until a
name that needs them is used. The napari widgets live in ``napari_hemofm._widgets`` and
only call core.

A project is saved and loaded one way: :func:`save_project` / :func:`load_project`
(``CellTable.save`` / ``CellTable.load`` and ``Review.save`` / ``Review.open`` call them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the core module that defines it.
_EXPORTS: dict[str, str] = {
    # the cell table and a project file
    "CellTable": "napari_hemofm.core.cells",
    "save_project": "napari_hemofm.core.io",
    "load_project": "napari_hemofm.core.io",
    "close_project": "napari_hemofm.core.io",
    "ProjectLockedError": "napari_hemofm.core.lock",
    "ProjectReadOnlyError": "napari_hemofm.core.journal",
    # cells from images and their embeddings
    "collect_cells": "napari_hemofm.core.inputs",
    "scan_inputs": "napari_hemofm.core.inputs",
    "load_backbone": "napari_hemofm.core.models",
    "embed_table": "napari_hemofm.core.embed",
    "EmbedJob": "napari_hemofm.core.embed_job",
    "ImageInput": "napari_hemofm.core.embed_job",
    "inputs_from_scan": "napari_hemofm.core.embed_job",
    "embed_into": "napari_hemofm.core.embed_job",
    # the map
    "cached_umap": "napari_hemofm.core.reduce",
    "umap_for_table": "napari_hemofm.core.reduce",
    # review, probe, counts
    "Review": "napari_hemofm.core.review",
    "LiveProbe": "napari_hemofm.core.probe",
    "apply_preset": "napari_hemofm.core.catalogue",
    "preset_names": "napari_hemofm.core.catalogue",
    "counted_cells": "napari_hemofm.core.report",
    "differential_counts": "napari_hemofm.core.report",
    "differential_summary": "napari_hemofm.core.report",
    "report_json": "napari_hemofm.core.report",
    "NOT_CLASSED": "napari_hemofm.core.review",
    "UNIDENTIFIED": "napari_hemofm.core.review",
    "UNLABELLED": "napari_hemofm.core.review",
    # batch effects
    "batch_report": "napari_hemofm.core.batch",
}

__all__ = [
    "NOT_CLASSED",
    "UNIDENTIFIED",
    "UNLABELLED",
    "CellTable",
    "EmbedJob",
    "ImageInput",
    "LiveProbe",
    "ProjectLockedError",
    "ProjectReadOnlyError",
    "Review",
    "__version__",
    "apply_preset",
    "batch_report",
    "cached_umap",
    "close_project",
    "collect_cells",
    "counted_cells",
    "differential_counts",
    "differential_summary",
    "embed_into",
    "embed_table",
    "inputs_from_scan",
    "load_backbone",
    "load_project",
    "preset_names",
    "report_json",
    "save_project",
    "scan_inputs",
    "umap_for_table",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its core module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_hemofm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from napari_hemofm.core.batch import batch_report
    from napari_hemofm.core.catalogue import apply_preset, preset_names
    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.embed import embed_table
    from napari_hemofm.core.embed_job import EmbedJob, ImageInput, embed_into, inputs_from_scan
    from napari_hemofm.core.inputs import collect_cells, scan_inputs
    from napari_hemofm.core.io import close_project, load_project, save_project
    from napari_hemofm.core.journal import ProjectReadOnlyError
    from napari_hemofm.core.lock import ProjectLockedError
    from napari_hemofm.core.models import load_backbone
    from napari_hemofm.core.probe import LiveProbe
    from napari_hemofm.core.reduce import cached_umap, umap_for_table
    from napari_hemofm.core.report import (
        counted_cells,
        differential_counts,
        differential_summary,
        report_json,
    )
    from napari_hemofm.core.review import NOT_CLASSED, UNIDENTIFIED, UNLABELLED, Review

"""Batch-effect metrics and corrections on cell embeddings.

How far cells of the same type from different labs, scanners or smears mix in the
embedding, and what a correction would change. By concern:

- :mod:`.neighbors`: the neighbour search every neighbourhood metric shares (exact
  below a size, in principal axes above it).
- :mod:`.metrics`: iLISI, kBET, PCR-batch, ASW, graph connectivity, NMI / ARI, each a
  per-group kernel and a public ``compute_*`` (``*_per_cell`` where a view colours by
  it); :data:`METRICS` holds each metric's direction as data.
- :mod:`.lobo`: leave-one-batch-out folds that skip batches too small to hold out.
- :mod:`.report`: :func:`batch_report` (one pass over the cell types) and its
  cell-table form at a level (``batch`` or ``slide``).
- :mod:`.corrections`: centring, ComBat, Harmony; :func:`preview_correction` is what
  the report, the CLI and the Batch view call.

Written with numpy, scipy and scikit-learn: scib-metrics is not used because it pulls
JAX; the metrics are short, and LISI's perplexity calibration (Korsunsky et al. 2019)
is tested against ``harmonypy.compute_lisi``. Nothing here imports napari or Qt.
"""

from napari_hemofm.core.batch._data import MIN_CELLS
from napari_hemofm.core.batch.corrections import (
    CORRECTIONS,
    Correction,
    CorrectionPreview,
    compare_corrections,
    correct_embeddings,
    correctable_batches,
    preview_correction,
)
from napari_hemofm.core.batch.lobo import LOBO_MAX_CELLS, lobo_folds
from napari_hemofm.core.batch.metrics import (
    METRIC_INFO,
    METRICS,
    MetricSpec,
    batch_asw_per_cell,
    compute_ari,
    compute_batch_asw,
    compute_celltype_asw,
    compute_graph_connectivity,
    compute_ilisi,
    compute_kbet,
    compute_nmi,
    compute_pcr_batch,
    group_neighbors,
    ilisi_per_cell,
)
from napari_hemofm.core.batch.neighbors import (
    EXACT_BELOW,
    Neighbors,
    nearest_neighbors,
    neighbor_recall,
)
from napari_hemofm.core.batch.report import (
    LEVELS,
    batch_report,
    default_level,
    level_column,
    level_values,
    table_batch_report,
    table_labels,
)

__all__ = [
    "CORRECTIONS",
    "EXACT_BELOW",
    "LEVELS",
    "LOBO_MAX_CELLS",
    "METRICS",
    "METRIC_INFO",
    "MIN_CELLS",
    "Correction",
    "CorrectionPreview",
    "MetricSpec",
    "Neighbors",
    "batch_asw_per_cell",
    "batch_report",
    "compare_corrections",
    "compute_ari",
    "compute_batch_asw",
    "compute_celltype_asw",
    "compute_graph_connectivity",
    "compute_ilisi",
    "compute_kbet",
    "compute_nmi",
    "compute_pcr_batch",
    "correct_embeddings",
    "correctable_batches",
    "default_level",
    "group_neighbors",
    "ilisi_per_cell",
    "level_column",
    "level_values",
    "lobo_folds",
    "nearest_neighbors",
    "neighbor_recall",
    "preview_correction",
    "table_batch_report",
    "table_labels",
]

"""Probes on embeddings: the names of the former single module, re-exported.

The code lives in three modules, one per concern:

- :mod:`~.evaluation`: the DinoBloom evaluation protocol (:func:`evaluate_probe`,
  :func:`make_probe`) and cross-validated scores of the review probe
  (:func:`probe_metrics`);
- :mod:`~.probe`: the review loop's live probe (:class:`LiveProbe`,
  :class:`ProbeUpdate`, probe files);
- :mod:`~.queues`: the review queues (:func:`label_next`, :func:`suspect_labels`).

``from napari_hemofm.core.classify import LiveProbe`` keeps working; new code imports
from those modules.
"""

from __future__ import annotations

from napari_hemofm.core.evaluation import (
    KNN_KS,
    Split,
    evaluate_probe,
    make_probe,
    probe_metrics,
)
from napari_hemofm.core.probe import (
    PROBE_FORMAT,
    PROBE_FORMAT_VERSION,
    LiveProbe,
    Metric,
    Probe,
    ProbeUpdate,
    linear_probe_c,
)
from napari_hemofm.core.queues import label_next, suspect_labels

__all__ = [
    "KNN_KS",
    "PROBE_FORMAT",
    "PROBE_FORMAT_VERSION",
    "LiveProbe",
    "Metric",
    "Probe",
    "ProbeUpdate",
    "Split",
    "evaluate_probe",
    "label_next",
    "linear_probe_c",
    "make_probe",
    "probe_metrics",
    "suspect_labels",
]

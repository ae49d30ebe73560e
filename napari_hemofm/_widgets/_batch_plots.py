"""The Batch view's "Stain and size" tab: per-group box plots of stain and cell size.

The statistics come from :func:`~napari_hemofm.core.appearance.table_appearance`
(measured by the Batch view in a worker on a seeded sample of cells per group); this
widget only draws them, with matplotlib's Qt canvas created on first use.
"""

from __future__ import annotations

import pandas as pd
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from napari_hemofm._widgets._colors import MISSING_COLOR

__all__ = ["APPEARANCE_PER_BATCH", "APPEARANCE_PLOTS", "AppearancePlots"]

#: Cells per group measured for the stain and size plots (seeded sample).
APPEARANCE_PER_BATCH = 300
#: Plotted appearance statistics: (column, axis title).
APPEARANCE_PLOTS: tuple[tuple[str, str], ...] = (
    ("cell_hue_deg", "cell hue (deg; -60 magenta, -120 blue)"),
    ("cell_saturation", "cell saturation (0-1)"),
    ("cell_od", "cell optical density (R+G+B)"),
    ("nucleus_od", "nucleus optical density (R+G+B)"),
    ("cell_area", "cell area"),
    ("background", "glass brightness (0-255)"),
)


class AppearancePlots(QWidget):
    """Per-batch distributions of stain colour, density and cell size (box plots)."""

    def __init__(self, background: str) -> None:
        super().__init__()
        self._background = background
        self.measure_button = QPushButton("Measure stain and size")
        self.measure_button.setToolTip(
            f"Segment up to {APPEARANCE_PER_BATCH} cells per batch (seeded sample) and "
            "measure their colour, optical density and area"
        )
        self.progress = QProgressBar()
        self.progress.setMaximumHeight(14)
        self.progress.hide()
        self.status = QLabel("Not measured yet.")
        self.status.setWordWrap(True)
        top = QHBoxLayout()
        top.addWidget(self.measure_button)
        top.addWidget(self.progress, 1)
        self._layout = QVBoxLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._layout.addLayout(top)
        self._layout.addWidget(self.status)
        self.figure = None
        self.canvas = None

    def _ensure_canvas(self) -> None:
        if self.canvas is not None:
            return
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(6, 3.6), facecolor=self._background, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.canvas.setMinimumHeight(220)
        self._layout.addWidget(self.canvas, 1)

    def plot(self, frame: pd.DataFrame, batches: list[str], colors: dict[str, str]) -> None:
        """Box plots of :data:`APPEARANCE_PLOTS` per batch."""
        self._ensure_canvas()
        fig = self.figure
        fig.clear()
        light = QColor(self._background).lightnessF() > 0.5
        fg = "#222222" if light else "#d0d0d0"
        data = frame[frame["segmented"]]
        has_um = data["cell_area_um2"].notna().any()
        axes = fig.subplots(2, 3)
        for ax, (column, title) in zip(axes.ravel(), APPEARANCE_PLOTS, strict=True):
            if column == "cell_area":
                column = "cell_area_um2" if has_um else "cell_area_px"
                title = "cell area (um$^2$)" if has_um else "cell area (source px)"
            if column == "background":
                values = data[["background_r", "background_g", "background_b"]].mean(axis=1)
            else:
                values = data[column]
            groups = [values[data["batch"].astype(str) == b].dropna().to_numpy() for b in batches]
            keep = [i for i, g in enumerate(groups) if len(g)]
            ax.set_facecolor(self._background)
            for spine in ax.spines.values():
                spine.set_color(fg)
            ax.tick_params(colors=fg, labelsize=7)
            ax.set_title(title, color=fg, fontsize=8)
            if not keep:
                continue
            parts = ax.boxplot(
                [groups[i] for i in keep],
                patch_artist=True,
                widths=0.6,
                showfliers=True,
                flierprops={"markersize": 2, "markeredgecolor": fg, "alpha": 0.5},
                medianprops={"color": fg},
                whiskerprops={"color": fg},
                capprops={"color": fg},
            )
            for patch, i in zip(parts["boxes"], keep, strict=True):
                patch.set_facecolor(colors.get(batches[i], MISSING_COLOR))
                patch.set_edgecolor(fg)
            ax.set_xticks(range(1, len(keep) + 1))
            ax.set_xticklabels([batches[i] for i in keep], rotation=20, ha="right")
        self.canvas.draw_idle()

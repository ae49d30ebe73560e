"""The Batch view's "Stain and size" tab: per-group box plots of stain and cell size.

The statistics come from :func:`~napari_hemofm.core.appearance.table_appearance`
(measured by the Batch view in a worker on a seeded sample of cells per group); this
widget only draws them, with matplotlib's Qt canvas created on first use. With a stain
normalisation chosen ("After", by default the project's setting) each group gets two
boxes: before (pale, hatched) and after normalisation (solid).
"""

from __future__ import annotations

import pandas as pd
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from napari_hemofm._widgets._colors import MISSING_COLOR

__all__ = ["APPEARANCE_PER_BATCH", "APPEARANCE_PLOTS", "STAIN_CHOICES", "AppearancePlots"]

#: Stain normalisations the plots can preview: method -> combo text.
STAIN_CHOICES: dict[str, str] = {
    "none": "no normalisation",
    "reinhard": "Reinhard",
    "macenko": "Macenko",
}

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
    """Per-batch distributions of stain colour, density and cell size (box plots).

    Attributes
    ----------
    stain_combo : QComboBox
        "After": the stain normalisation previewed (:data:`STAIN_CHOICES`).
    """

    def __init__(self, background: str) -> None:
        super().__init__()
        self._background = background
        self._project_stain: dict[str, str] = {"method": "none"}
        self.stain_combo = QComboBox()
        for key, text in STAIN_CHOICES.items():
            self.stain_combo.addItem(text, key)
        self.stain_combo.setToolTip(
            "Stain normalisation shown beside the crops as they are (before / after); "
            "the project's setting by default"
        )
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
        top.addWidget(QLabel("After"))
        top.addWidget(self.stain_combo)
        top.addWidget(self.progress, 1)
        self._layout = QVBoxLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._layout.addLayout(top)
        self._layout.addWidget(self.status)
        self.figure = None
        self.canvas = None

    def set_project_stain(self, setting: dict[str, str] | None) -> None:
        """The project's stain setting: the default "After" (and its reference)."""
        method = str((setting or {}).get("method", "none"))
        self._project_stain = dict(setting or {"method": "none"})
        index = self.stain_combo.findData(method)
        self.stain_combo.setCurrentIndex(max(index, 0))

    def stain_setting(self) -> dict[str, str]:
        """The stain setting to preview (a dict like ``uns["hemofm"]["stain_norm"]``).

        The chosen method, with the project's reference when the method is the
        project's (else the built-in reference).
        """
        method = str(self.stain_combo.currentData())
        if method == self._project_stain.get("method"):
            return dict(self._project_stain)
        return {"method": method}

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

    def plot(
        self,
        frame: pd.DataFrame,
        batches: list[str],
        colors: dict[str, str],
        after: pd.DataFrame | None = None,
        method: str = "",
    ) -> None:
        """Box plots of :data:`APPEARANCE_PLOTS` per batch.

        Parameters
        ----------
        frame : pandas.DataFrame
            Statistics of the crops as they are (``batch``, ``segmented`` and the
            :data:`APPEARANCE_PLOTS` columns), one row per sampled cell.
        batches : list of str
            Groups in plot order.
        colors : dict of str to str
            Colour of each group (as on the batch map).
        after : pandas.DataFrame, optional
            The same cells after stain normalisation: each group then gets a pale,
            hatched "before" box and a solid "after" box.
        method : str
            The normalisation's name, for the figure's title.
        """
        self._ensure_canvas()
        fig = self.figure
        fig.clear()
        light = QColor(self._background).lightnessF() > 0.5
        fg = "#222222" if light else "#d0d0d0"
        passes = [frame] if after is None else [frame, after]
        datas = [p[p["segmented"]] for p in passes]
        has_um = any(d["cell_area_um2"].notna().any() for d in datas)
        axes = fig.subplots(2, 3)
        if after is not None:
            fig.suptitle(
                f"each group: before (pale, hatched) | after {method} normalisation (solid)",
                color=fg,
                fontsize=8,
            )
        width = 0.6 if after is None else 0.36
        for ax, (column, title) in zip(axes.ravel(), APPEARANCE_PLOTS, strict=True):
            if column == "cell_area":
                column = "cell_area_um2" if has_um else "cell_area_px"
                title = "cell area (um$^2$)" if has_um else "cell area (source px)"
            ax.set_facecolor(self._background)
            for spine in ax.spines.values():
                spine.set_color(fg)
            ax.tick_params(colors=fg, labelsize=7)
            ax.set_title(title, color=fg, fontsize=8)
            shown: set[int] = set()
            for k, data in enumerate(datas):
                if column == "background":
                    values = data[["background_r", "background_g", "background_b"]].mean(axis=1)
                else:
                    values = data[column]
                names = data["batch"].astype(str)
                groups = [values[names == b].dropna().to_numpy() for b in batches]
                keep = [i for i, g in enumerate(groups) if len(g)]
                if not keep:
                    continue
                shown.update(keep)
                offset = 0.0 if after is None else (k - 0.5) * 0.4
                parts = ax.boxplot(
                    [groups[i] for i in keep],
                    positions=[i + 1 + offset for i in keep],
                    patch_artist=True,
                    widths=width,
                    showfliers=True,
                    flierprops={"markersize": 2, "markeredgecolor": fg, "alpha": 0.5},
                    medianprops={"color": fg},
                    whiskerprops={"color": fg},
                    capprops={"color": fg},
                    manage_ticks=False,
                )
                for patch, i in zip(parts["boxes"], keep, strict=True):
                    patch.set_facecolor(colors.get(batches[i], MISSING_COLOR))
                    patch.set_edgecolor(fg)
                    if after is not None and k == 0:
                        patch.set_alpha(0.45)
                        patch.set_hatch("///")
            ticks = sorted(shown)
            ax.set_xticks([i + 1 for i in ticks])
            ax.set_xticklabels([batches[i] for i in ticks], rotation=20, ha="right")
            if ticks:
                ax.set_xlim(0.4, len(batches) + 0.6)
        self.canvas.draw_idle()

"""The printable report: one self-contained HTML file with every group's differential.

Per group (smear, batch, slide...): the differential table of :mod:`~.report` (white
cells in percent, non-white cells per 100 white cells), the sign-off state in the same
words as everywhere else (:func:`~.report.signoff_text`), the shift warnings, the
Unidentified cells with their reasons, the sign-off records, and a strip of thumbnails
per class, least sure first (the cells worth a second look). Thumbnails are embedded
as base64 PNG and a print stylesheet puts each group on its own page, so the file can
be mailed, archived or printed as it is.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from napari_hemofm.core.report import (
    DEFAULT_GROUP_BY,
    DEFAULT_TARGET,
    UNIDENTIFIED,
    GroupBy,
    counted_cells,
    differential_counts,
    differential_summary,
    display_name,
    group_values,
    signoffs,
    stored_threshold,
)

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable

THUMBS_PER_CLASS = 12
"""Thumbnails shown per class and group (least sure first)."""
THUMB_SIZE = 72
"""Side of an embedded thumbnail in pixels."""

_CSS = """
body { font: 13px/1.4 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: #111; margin: 24px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 0 0 6px; }
h3 { font-size: 13px; margin: 12px 0 4px; }
.meta { color: #555; margin-bottom: 16px; }
section.group { border-top: 2px solid #333; padding-top: 10px; margin-top: 18px; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border-bottom: 1px solid #ddd; padding: 2px 10px 2px 4px; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.unidentified td { color: #a00; } tr.non_wbc td { color: #555; font-style: italic; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 5px;
          border: 1px solid #0003; vertical-align: middle; }
.status { padding: 6px 8px; margin: 6px 0; border-left: 4px solid #2a7; background: #eef8f1; }
.status.open { border-color: #c80; background: #fdf6e8; }
.status.void { border-color: #c00; background: #fdecec; font-weight: bold; }
.warning { padding: 6px 8px; margin: 6px 0; border-left: 4px solid #c00; background: #fdecec; }
.strip { display: flex; flex-wrap: wrap; gap: 3px; margin: 2px 0 8px; }
.strip figure { margin: 0; width: %(px)dpx; font-size: 9px; color: #555; text-align: center; }
.strip img { width: %(px)dpx; height: %(px)dpx; display: block; image-rendering: auto; }
.small { color: #555; font-size: 11px; }
@media print {
  body { margin: 10mm; font-size: 11px; }
  section.group { page-break-before: always; break-before: page; border-top: none; }
  section.group:first-of-type { page-break-before: auto; break-before: auto; }
  .strip figure, tr { break-inside: avoid; }
  a { color: inherit; text-decoration: none; }
}
"""


def _png_data_uri(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _class_colors(table: CellTable, names: Any) -> dict[str, str]:
    """The catalogue's colour of each class (custom classes: grey)."""
    from napari_hemofm.core.catalogue import resolve

    return {str(n): resolve(table, str(n)).color for n in names}


def report_html(
    table: CellTable,
    *,
    by: GroupBy = DEFAULT_GROUP_BY,
    threshold: float | None = None,
    target: int = DEFAULT_TARGET,
    thumbs_per_class: int = THUMBS_PER_CLASS,
    images: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> str:
    """The printable report as one HTML document (a string).

    Parameters
    ----------
    table : CellTable
    by : str
        The ``obs`` column that makes the groups.
    threshold : float, optional
        The Unidentified threshold (default: the project's).
    target : int
        White cells to count per group.
    thumbs_per_class : int
        Thumbnails per class and group (0: no thumbnails).
    images : mapping of str to array, optional
        In-memory images by source (napari layers); other sources are read from disk.
    title : str, optional
        Heading (default: "Differential report").

    Returns
    -------
    str
        A self-contained HTML5 document: no external file, script or font.
    """
    from napari_hemofm.core.thumbnails import ThumbnailCache

    used = float(threshold if threshold is not None else stored_threshold(table))
    counts = differential_counts(table, by, threshold=used)
    summary = differential_summary(table, by, threshold=used, target=target)
    cells = counted_cells(table, threshold=used)
    groups = group_values(table, by)
    conf = pd.to_numeric(table.obs["confidence"], errors="coerce").to_numpy(dtype=float)
    colors = _class_colors(table, [*table.classes, *pd.unique(cells["counted"])])
    cache = ThumbnailCache(table.obs, images=images, size=THUMB_SIZE) if thumbs_per_class else None
    records = [r for r in signoffs(table) if r.get("by") == by]
    meta = table.meta
    from napari_hemofm.core.catalogue import project_preset

    facts = [
        f"{table.n_cells} cells",
        f"grouped by {by}",
        f"model {meta.get('model', '-')}",
        f"class preset {project_preset(table).name}",
        f"Unidentified below confidence {used:g}",
        f"target {target} white cells",
        "written " + datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    ]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title or 'Differential report')}</title>",
        f"<style>{_CSS % {'px': THUMB_SIZE}}</style></head><body>",
        f"<h1>{_e(title or 'Differential report')}</h1>",
        f'<div class="meta">{_e(" · ".join(facts))}</div>',
    ]
    for group, row in summary.iterrows():
        mine = counts[counts["group"] == group]
        state = "void" if row["signoff_void"] else ("" if row["signed_off_by"] else "open")
        out.append('<section class="group">')
        out.append(f"<h2>{_e(group)}</h2>")
        out.append(
            f'<div class="small">{int(row["n_wbc"])} white cells identified, '
            f"{int(row['n_unidentified'])} Unidentified, {int(row['n_non_wbc'])} non-white, "
            f"{int(row['n_not_classed'])} not classed</div>"
        )
        out.append(f'<div class="status {state}">{_e(row["status"])}</div>')
        for text in row["warnings"]:
            out.append(f'<div class="warning">Warning: {_e(text)}</div>')
        out.append(
            '<table><thead><tr><th>class</th><th>kind</th><th class="num">count</th>'
            '<th class="num">%</th></tr></thead><tbody>'
        )
        for r in mine.itertuples():
            if r.count == 0 and r.kind != "unidentified":
                continue
            unit = "per 100 WBC" if r.kind == "non_wbc" else "%"
            swatch = colors.get(str(r.label), "#808080")
            out.append(
                f'<tr class="{_e(r.kind)}"><td><span class="swatch" '
                f'style="background:{_e(swatch)}"></span>{_e(display_name(table, str(r.label)))}'
                f'</td><td>{_e(r.kind)}</td><td class="num">{int(r.count)}</td>'
                f'<td class="num">{r.percent:.1f} <span class="small">{unit}</span></td></tr>'
            )
        out.append("</tbody></table>")
        in_group = groups == group
        unid = cells[in_group & (cells["kind"] == "unidentified").to_numpy()]
        if len(unid):
            reasons = unid["reason"].value_counts()
            out.append(
                '<div class="small">Unidentified: '
                + _e(", ".join(f"{n} {why}" for why, n in reasons.items()))
                + "</div>"
            )
        for record in [r for r in records if r.get("group") == group]:
            line = f"Signed off by {record['user']} at {record['time']}"
            if record.get("override"):
                line += f"; warning overridden: {record['override']}"
            for check in record.get("verified", []):
                line += f"; verified by {check['user']} at {check['time']}"
            out.append(f'<div class="small">{_e(line)}</div>')
        if cache is not None:
            out.extend(_strips(table, cells, in_group, conf, cache, thumbs_per_class, colors))
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def _strips(
    table: CellTable,
    cells: pd.DataFrame,
    in_group: np.ndarray,
    conf: np.ndarray,
    cache: Any,
    n: int,
    colors: Mapping[str, str],
) -> list[str]:
    """One strip of thumbnails per counted class of a group, least sure first."""
    from napari_hemofm.core.review import least_sure_keys

    out = []
    counted = cells["counted"].to_numpy(dtype=object)
    kind = cells["kind"].to_numpy(dtype=object)
    predicted = cells["predicted"].to_numpy(dtype=bool)
    ids = table.cell_ids
    names = [c for c in pd.unique(counted[in_group]) if c != UNIDENTIFIED]
    place = {c: i for i, c in enumerate(table.classes)}
    names = sorted(names, key=lambda c: place.get(c, len(place)))
    if (counted[in_group] == UNIDENTIFIED).any():
        names.append(UNIDENTIFIED)
    for name in names:
        rows = np.flatnonzero(in_group & (counted == name) & (kind != "not_classed"))
        if not len(rows):
            continue
        keys = least_sure_keys(conf[rows], np.zeros(len(rows), dtype=bool))
        keys = np.where(predicted[rows], keys, keys + 3.0)  # curated cells after predicted
        rows = rows[np.lexsort((rows, keys))][:n]
        thumbs = cache.load([str(ids[r]) for r in rows])
        figures = []
        for r in rows:
            thumb = thumbs.get(str(ids[r]))
            if thumb is None:
                continue
            note = "label" if not predicted[r] and name != UNIDENTIFIED else f"{conf[r]:.2f}"
            figures.append(
                f'<figure><img alt="{_e(ids[r])}" title="{_e(ids[r])}" '
                f'src="{_png_data_uri(thumb)}"><figcaption>{_e(note)}</figcaption></figure>'
            )
        if figures:
            color = colors.get(name, "#808080")
            out.append(
                f'<h3><span class="swatch" style="background:{_e(color)}"></span>'
                f"{_e(display_name(table, name))} "
                f'<span class="small">({int(((counted == name) & in_group).sum())})</span></h3>'
            )
            out.append('<div class="strip">' + "".join(figures) + "</div>")
    return out


def write_report_html(table: CellTable, path: str | Path, **kwargs: Any) -> Path:
    """Write :func:`report_html` to ``path`` atomically (a temp file renamed over it).

    Returns
    -------
    Path
        The file written.
    """
    path = Path(path)
    text = report_html(table, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path

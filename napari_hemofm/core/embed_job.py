"""The embed job: find cells, embed them, and add them to a cell table without losing any.

One job for the Embed panel, ``hemofm embed`` and the Python API. It runs in two
steps, so that a GUI can do the long part in a worker and the short part on its main
thread:

1. :func:`run_embed_job` (long, no side effect on the table): loads the backbone,
   finds the cells of the images that are new or whose detection settings changed
   (known images keep their cells), and embeds what needs it. It reports
   ``progress(done, total)`` and stops when ``cancel`` is set; a cancelled run changes
   nothing.
2. :func:`commit_outcome` (short): writes the outcome into the table.

The rules (DESIGN.md, "The cell table"):

- A cell id ``"<input name>/<path relative to its input>#<n>"`` is assigned once and
  never recomputed: the batch and slide are ordinary columns, and setting them (here,
  ``--batch``, the panel) changes no id, no label, no embedding.
- An image already in the table with the same settings keeps its cells, ids, labels
  and embeddings ("reused"). An image detected again (new settings) has its new cells
  matched to the old ones by box overlap (:func:`~.matching.match_boxes`, Hungarian
  assignment, IoU >= :data:`~.matching.MIN_IOU`): a matched cell keeps its id and
  curated label; unmatched new cells get fresh ids; an old cell with a curated label
  (``label_origin == "user"``) that is not found again is kept, so no clinician's
  label is lost (:func:`~.matching.carry_ids`).
- A curated label always wins over a crop folder's name.
- Embeddings of one table come from one model, weights and stain normalisation: a job
  with another one is refused (:class:`EmbedRefused` text in ``outcome.error``)
  unless ``reembed`` is set, which re-embeds every cell (ids and labels kept).
- A file that cannot be read or embedded is not added; it is named in ``skipped``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from napari_hemofm.core.inputs import (
    CELL_COLUMNS,
    crop_cell,
    default_slide,
    id_prefix,
)
from napari_hemofm.core.matching import carry_ids

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.inputs import Scan, Source
    from napari_hemofm.core.stain import StainNorm

__all__ = [
    "CommitSummary",
    "EmbedJob",
    "EmbedOutcome",
    "ImageInput",
    "TableState",
    "commit_outcome",
    "embed_into",
    "inputs_from_scan",
    "run_embed_job",
    "stain_normaliser",
]

#: ``uns["hemofm"]`` key of the per-image detection settings (a JSON object string:
#: h5ad group names cannot hold the ``/`` of a path).
SETTINGS_KEY = "detection_settings"

#: Number of images of a reference batch given to the stain normaliser.
N_REFERENCE_IMAGES = 8

CellsFrom = Literal["detect", "labels", "points"]
Progress = Callable[[int, int], None]


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class EmbedJob:
    """How cells are embedded: the model and the preprocessing, shared by every cell.

    Also what every chunk of a cluster run shares (:mod:`~.cluster`).

    Attributes
    ----------
    model : str
        Backbone name (:data:`~.models.MODEL_NAMES`).
    weights : str or None
        Weights file (None: the cache).
    device : {"cpu", "cuda"}
    precision : {"fp32", "bf16"}
    batch_size : int
        Cells per forward pass.
    pixel_size_um : float or None
        Micrometres per pixel of the smears (None: estimated from the red cells).
    stain_norm : str
        Stain normalisation method (``"none"``, ``"reinhard"``, ``"macenko"``).
    stain_reference : str or None
        Its reference: None (built in), a batch name, or an image file.
    weights_sha256 : str or None
        The weights file's sha256, filled in by :func:`~.cluster.with_weights_sha256`
        (cluster chunk keys and the workers' checks use the file's content).
    """

    model: str = "handcrafted"
    weights: str | None = None
    device: str = "cpu"
    precision: str = "fp32"
    batch_size: int = 32
    pixel_size_um: float | None = None
    stain_norm: str = "none"
    stain_reference: str | None = None
    weights_sha256: str | None = None

    def stain_setting(self) -> dict[str, str]:
        """``uns["hemofm"]["stain_norm"]`` of this job (``reference`` left out when None)."""
        out = {"method": self.stain_norm}
        if self.stain_reference:
            out["reference"] = str(self.stain_reference)
        return out


@dataclass
class ImageInput:
    """One image whose cells a job finds: a smear (file or napari layer) or a crop file.

    Attributes
    ----------
    source : str
        The cells' ``source``: an absolute file path, or a layer name.
    input_name : str
        First part of the cell ids: the input folder's base name, or the layer name.
    rel : str
        Path relative to the input (second part of the cell ids).
    batch : str or None
        Batch to give its cells; None keeps the batch of cells already in the table
        (new cells then get ``input_name``).
    slide : str or None
        Slide to give its cells; None keeps it (new cells get :func:`~.inputs.default_slide`).
    kind : {"smear", "crop"}
    label : str or None
        A crop's class (its folder name).
    data : array or None
        The image in memory (a napari layer); None reads ``source`` from disk.
    cells_from : {"detect", "labels", "points"}
        Detect the WBCs, or take one cell per label / point of ``cells_data``.
    cells_data : array or None
        The Labels array, or ``(N, 2)`` points in the image's pixels (y, x).
    pixel_size_um : float or None
        Overrides the job's pixel size for this image.
    name : str
        What the user calls it (a layer name), for messages.
    """

    source: str
    input_name: str
    rel: str
    batch: str | None = None
    slide: str | None = None
    kind: Literal["smear", "crop"] = "smear"
    label: str | None = None
    data: Any = None
    cells_from: CellsFrom = "detect"
    cells_data: Any = None
    pixel_size_um: float | None = None
    name: str = ""

    @property
    def prefix(self) -> str:
        """``"<input name>/<rel>"``, the id prefix of a new image's cells."""
        return f"{self.input_name}/{self.rel}"

    def settings(self, job: EmbedJob) -> str:
        """What decides this image's cells: a change means they are detected again."""
        if self.kind == "crop":
            return "crop"
        px = self.pixel_size_um if self.pixel_size_um is not None else job.pixel_size_um
        text = f"{self.cells_from}|px={px if px else 'auto'}"
        if self.cells_from != "detect" and self.cells_data is not None:
            arr = np.ascontiguousarray(np.asarray(self.cells_data))
            text += "|" + hashlib.blake2b(arr.tobytes(), digest_size=8).hexdigest()
        return text


def inputs_from_scan(scan: Scan, *, batch: str | None = None) -> list[ImageInput]:
    """The image inputs of a command-line scan (:func:`~.inputs.scan_inputs`).

    Parameters
    ----------
    scan : Scan
    batch : str, optional
        ``--batch``: set as the batch of every listed image's cells, old ones too.
        Without it, new cells get the scan's default batch and old ones keep theirs.
    """
    return [_input_from_source(src, explicit=batch is not None) for src in scan.sources]


def _input_from_source(src: Source, *, explicit: bool) -> ImageInput:
    return ImageInput(
        source=str(src.path),
        input_name=src.input_name or src.batch,
        rel=src.rel,
        batch=src.batch if explicit else None,
        kind=src.kind,
        label=src.label,
        name=str(src.path),
    )


@dataclass
class TableState:
    """What a job needs of the table, copied on the caller's thread (see :meth:`of`).

    Attributes
    ----------
    obs : pandas.DataFrame
        ``source, batch, x0, y0, x1, y1, label, label_origin`` of every cell, by id.
    embedded : ndarray of bool, shape (n_cells,)
        Which cells hold a finite embedding.
    meta : dict
        A copy of ``uns["hemofm"]``.
    table_id : int
        ``id()`` of the table (a commit into another table is refused).
    """

    obs: pd.DataFrame
    embedded: np.ndarray
    meta: dict[str, Any]
    table_id: int = 0
    dim: int = 0

    @classmethod
    def of(cls, table: CellTable) -> TableState:
        """Snapshot ``table`` (cheap: a few columns)."""
        cols = ["source", "batch", "x0", "y0", "x1", "y1", "label", "label_origin"]
        obs = table.obs[cols].copy()
        x = table.embeddings
        if x is None:
            embedded = np.zeros(table.n_cells, bool)
        else:
            embedded = np.isfinite(x).all(axis=1) if x.shape[1] else np.zeros(len(x), bool)
        dim = 0 if x is None else int(x.shape[1])
        return cls(obs, embedded, dict(table.meta), id(table), dim)

    def embedding_meta(self) -> dict[str, Any] | None:
        """Model, weights and stain setting of the embeddings; None when none is embedded."""
        if not self.embedded.any():
            return None
        return {
            "model": self.meta.get("model"),
            "weights_sha256": self.meta.get("weights_sha256"),
            "feature_version": _plain_int(self.meta.get("feature_version")),
            "stain_norm": _stain_of(self.meta),
            "dim": self.dim,
        }

    def settings(self) -> dict[str, str]:
        """Detection settings per image source, as recorded by earlier runs."""
        return _settings_of(self.meta)


def _plain_int(value: Any) -> int | None:
    """An integer read back from ``uns`` (h5ad returns numpy scalars), or None."""
    return None if value is None else int(value)


def _stain_of(meta: Mapping[str, Any]) -> dict[str, str]:
    value = meta.get("stain_norm")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = {"method": value}
    if not isinstance(value, Mapping):
        return {"method": "none"}
    out = {"method": str(value.get("method", "none"))}
    if value.get("reference"):
        out["reference"] = str(value["reference"])
    return out


def _settings_of(meta: Mapping[str, Any]) -> dict[str, str]:
    text = meta.get(SETTINGS_KEY)
    if not text:
        return {}
    try:
        value = json.loads(str(text))
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


@dataclass
class EmbedOutcome:
    """What :func:`run_embed_job` found and computed (nothing is written yet).

    Attributes
    ----------
    cells : pandas.DataFrame
        New cells of the images found (again), columns :data:`~.inputs.CELL_COLUMNS`
        plus ``kind``; the index holds provisional ids (final ids are given on commit).
    embeddings : ndarray of shape (len(cells), dim), float32
    extra_ids : ndarray of str
        Cells already in the table embedded in this run (without an embedding before,
        or all of them when re-embedding).
    extra_embeddings : ndarray of shape (len(extra_ids), dim), float32
    redetected : list of str
        Sources whose cells were found again (their old cells are replaced).
    settings : dict of str to str
        Detection settings of the images found in this run.
    batch, slide : dict of str to str
        Batch / slide to set per source (the images' explicit choices).
    n_reused : int
        Cells of known images kept as they were.
    meta : dict
        The backbone's facts (model, weights sha256, ...).
    stain_norm : dict
        The stain setting of the embeddings.
    reembed : bool
        Every cell's embedding was computed anew (another model or stain setting).
    cancelled : bool
        Stopped on request: commit changes nothing.
    error : str or None
        One line for the user when nothing can be done.
    skipped : list of (str, str)
        Files that could not be read or embedded (not added).
    no_cells : list of (str, str)
        Images read in which no cell was found, with the reason.
    seconds : float
    table_id : int
    """

    cells: pd.DataFrame = field(default_factory=lambda: _empty_cells())
    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    extra_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    extra_embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    redetected: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    batch: dict[str, str] = field(default_factory=dict)
    slide: dict[str, str] = field(default_factory=dict)
    n_reused: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    stain_norm: dict[str, str] = field(default_factory=lambda: {"method": "none"})
    reembed: bool = False
    cancelled: bool = False
    error: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    no_cells: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    table_id: int = 0

    @property
    def n_embedded(self) -> int:
        """Cells embedded in this run (new and already known)."""
        return len(self.cells) + len(self.extra_ids)


def _empty_cells() -> pd.DataFrame:
    return pd.DataFrame(
        {c: pd.Series(dtype=object) for c in [*CELL_COLUMNS, "kind"]},
        index=pd.Index([], dtype=object, name="cell_id"),
    )


# ------------------------------------------------------------------------------ run
def _crop_row(image: ImageInput) -> dict[str, Any]:
    """The one cell of a crop (its file's header gives the size), as a row dict."""
    from napari_hemofm.core.io import image_size

    if image.data is not None:
        height, width = np.asarray(image.data).shape[:2]
    else:
        height, width = image_size(image.source)
    batch = image.batch or image.input_name
    row = crop_cell(
        image.input_name,
        image.rel,
        image.source,
        size=(height, width),
        batch=batch,
        slide=image.slide or default_slide("crop", image.prefix, batch),
        label=image.label,
    )
    return row | {"kind": "crop"}


def _cells_of(image: ImageInput, job: EmbedJob) -> tuple[pd.DataFrame, str | None]:
    """New cells of one smear (provisional ids ``prefix#n``) and why none was found."""
    from napari_hemofm.core.detect import cells_from_labels, cells_from_points, detect_wbcs
    from napari_hemofm.core.inputs import detections_to_cells, no_cells_reason
    from napari_hemofm.core.io import LazyRGBImage, read_image, to_rgb8

    batch = image.batch or image.input_name
    px = image.pixel_size_um if image.pixel_size_um is not None else job.pixel_size_um
    rgb = None
    if image.cells_from == "labels":
        found = cells_from_labels(image.cells_data, pixel_size_um=px)
    elif image.cells_from == "points":
        found = cells_from_points(np.asarray(image.cells_data, float), pixel_size_um=px)
    else:
        if image.data is not None:
            data = image.data
            rgb = data if isinstance(data, LazyRGBImage) else to_rgb8(data)
        else:
            rgb = read_image(image.source)
        found = detect_wbcs(rgb, pixel_size_um=px)
    cells = detections_to_cells(
        found,
        source=image.source,
        batch=batch,
        rel=image.rel,
        input_name=image.input_name,
        slide=image.slide,
    )
    why = None
    if len(cells) == 0:
        if rgb is not None:
            why = no_cells_reason(rgb)
        else:
            why = f"no cells in the {image.cells_from} layer over this image"
    return cells, why


def _read_for_reference(source: str, images: Mapping[str, Any]) -> np.ndarray | None:
    from napari_hemofm.core.io import ImageReadError, LazyRGBImage, read_image, to_rgb8

    try:
        if source in images:
            data = images[source]
        else:
            data = read_image(source)
    except (ImageReadError, OSError):
        return None
    if isinstance(data, LazyRGBImage):
        h, w = data.shape[:2]
        side = min(h, w, 2048)
        return np.asarray(
            data[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2]
        )
    return to_rgb8(data)


def stain_normaliser(
    setting: StainNorm | Mapping[str, Any] | None,
    obs: pd.DataFrame,
    images: Mapping[str, Any] | None = None,
    inputs: Sequence[ImageInput] = (),
) -> Callable[[np.ndarray], np.ndarray] | None:
    """The stain normaliser of a setting, its reference batch read from the cells' images.

    The one place a setting's ``reference`` is resolved: the embedding job and the Batch
    view's before / after stain plots both call it.

    Parameters
    ----------
    setting : StainNorm or mapping or str or None
        The setting, or ``uns["hemofm"]["stain_norm"]`` as stored (a dict, or a JSON
        string); None is ``"none"``.
    obs : pandas.DataFrame
        Cells with ``batch`` and ``source`` columns (a table's ``obs``): the images of
        a reference batch are the sources of its cells.
    images : mapping of str to array, optional
        In-memory images by source name (napari layers), read before the files.
    inputs : sequence of ImageInput, optional
        Images of a run not in ``obs`` yet; they come first for their batch.

    Returns
    -------
    callable or None
        ``normalise(rgb8 image (h, w, 3)) -> rgb8 image (h, w, 3)``; None for
        ``"none"``. A reference that names a batch takes up to
        :data:`N_REFERENCE_IMAGES` images of that batch.

    Raises
    ------
    ValueError
        Unknown method, or a reference that is neither a batch nor a readable file.
    """
    from pathlib import Path

    from napari_hemofm.core.stain import StainNorm, build_normaliser

    if not isinstance(setting, StainNorm):  # a dict, or uns' value as read back
        setting = StainNorm.from_dict(_stain_of({"stain_norm": setting}))
    if not setting.active:
        return None
    images = {} if images is None else images
    ref = setting.reference
    if not ref:
        return build_normaliser(setting)
    batch_col = obs["batch"].astype(str) if "batch" in obs.columns else pd.Series(dtype=str)
    batches = {im.batch or im.input_name for im in inputs} | set(batch_col.unique())
    if ref in batches:
        sources = [im.source for im in inputs if (im.batch or im.input_name) == ref]
        known = obs.loc[batch_col == ref, "source"].astype(str)
        sources += [s for s in pd.unique(known) if s not in sources]
        chosen = []
        for src in sources:
            arr = _read_for_reference(src, images)
            if arr is not None:
                chosen.append(arr)
            if len(chosen) >= N_REFERENCE_IMAGES:
                break
        if not chosen:
            raise ValueError(f"stain reference batch {ref!r}: none of its images can be read")
        return build_normaliser(setting, chosen)
    if Path(ref).is_file():
        return build_normaliser(setting)
    raise ValueError(
        f"stain reference {ref!r} is neither a batch ({', '.join(sorted(batches)) or 'none'}) "
        "nor an image file"
    )


def _differs(old: Mapping[str, Any] | None, meta: Mapping[str, Any], stain: dict) -> str | None:
    """Why embeddings made with ``old`` and with ``meta``/``stain`` do not mix, or None."""
    if old is None:
        return None
    if old.get("model") != meta.get("model"):
        return f"were embedded with {old.get('model')}, not {meta.get('model')}"
    if old.get("weights_sha256") != meta.get("weights_sha256"):
        return f"were embedded with other {meta.get('model')} weights"
    new_version = _plain_int(meta.get("feature_version"))
    if old.get("feature_version") != new_version:
        return (
            f"were embedded with version {old.get('feature_version') or 'unknown'} of "
            f"{meta.get('model')}'s features, not version {new_version}"
        )
    if old.get("dim") and meta.get("embedding_dim") and old["dim"] != meta["embedding_dim"]:
        return (
            f"have {old['dim']}-dimensional embeddings, {meta.get('model')} now gives "
            f"{meta['embedding_dim']}"
        )
    if old.get("stain_norm") != stain:
        return (
            f"were embedded with stain normalisation {_stain_text(old.get('stain_norm'))}, "
            f"not {_stain_text(stain)}"
        )
    return None


def _stain_text(setting: Mapping[str, Any] | None) -> str:
    if not setting:
        return "none"
    ref = setting.get("reference")
    return str(setting.get("method", "none")) + (f" (reference {ref})" if ref else "")


def run_embed_job(
    table: CellTable | TableState,
    job: EmbedJob,
    inputs: Sequence[ImageInput],
    *,
    reembed: bool = False,
    images: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    stage: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
    backbone: Any = None,
    num_workers: int = 2,
) -> EmbedOutcome:
    """Find and embed the cells of ``inputs`` for ``table`` (the table is not changed).

    Parameters
    ----------
    table : CellTable or TableState
        The table the cells go to (a GUI passes a :meth:`TableState.of` snapshot taken
        on its main thread).
    job : EmbedJob
        Model and preprocessing.
    inputs : sequence of ImageInput
        Images to take cells from. Known images (their ``source`` is in the table) with
        unchanged settings keep their cells; the others are detected.
    reembed : bool
        Re-embed every cell of the table, needed when the model, weights or stain
        setting differ from the table's.
    images : mapping of str to array, optional
        In-memory images of sources already in the table (napari layers).
    progress : callable, optional
        ``progress(done, total)``: images while finding cells, then cells while embedding.
    stage : callable, optional
        ``stage(name)`` when a step starts: ``"load model"``, ``"find cells"``, ``"embed"``.
    cancel : threading.Event, optional
        Set it to stop (checked between images and between batches); nothing is
        committed from a cancelled run.
    backbone : Embedder, optional
        An already loaded backbone (else loaded from ``job``).
    num_workers : int
        Threads that read and prepare crops ahead of the model.

    Returns
    -------
    EmbedOutcome
        Expected failures (missing weights, another model, no cells) come back in
        ``error`` as one line, not as exceptions.
    """
    from napari_hemofm.core.embed import embed_cells
    from napari_hemofm.core.io import ImageReadError
    from napari_hemofm.core.models import DeviceError, WeightsError, load_backbone

    start = time.perf_counter()
    state = table if isinstance(table, TableState) else TableState.of(table)
    outcome = EmbedOutcome(table_id=state.table_id, stain_norm=job.stain_setting())
    event = cancel or threading.Event()
    say = stage or (lambda name: None)
    images = dict(images or {})
    try:
        say("load model")
        if backbone is None:
            backbone = load_backbone(
                job.model,
                weights=job.weights or None,
                device=job.device,
                precision=job.precision,
            )
        outcome.meta = dict(backbone.meta())
        why = _differs(state.embedding_meta(), outcome.meta, outcome.stain_norm)
        if why and not reembed:
            outcome.error = (
                f"the cells already there {why}: re-embed every cell (--reembed, or "
                "'Re-embed all cells' in the panel) to switch, or keep the earlier setting"
            )
            return outcome
        outcome.reembed = bool(reembed and len(state.obs))
        # ---------------------------------------------------------- find cells
        say("find cells")
        known = set(state.obs["source"].astype(str))
        old_settings = state.settings()
        frames: list[pd.DataFrame] = []
        crop_rows: list[dict[str, Any]] = []
        n_img = len(inputs)
        seen: set[str] = set()
        for k, image in enumerate(inputs):
            if event.is_set():
                outcome.cancelled = True
                return outcome
            if progress is not None:
                progress(k, n_img)
            if image.source in seen:
                continue
            seen.add(image.source)
            if image.batch:
                outcome.batch[image.source] = image.batch
            if image.slide:
                outcome.slide[image.source] = image.slide
            settings = image.settings(job)
            if image.source in known and old_settings.get(image.source, settings) == settings:
                continue  # reused: its cells, ids, labels and embeddings stay
            if image.data is not None:
                images[image.source] = image.data
            try:
                if image.kind == "crop":  # rows gathered, one frame per 4096 (fast at 100k)
                    crop_rows.append(_crop_row(image))
                    if image.source in known:
                        outcome.redetected.append(image.source)
                    if len(crop_rows) >= 4096:
                        frames.append(pd.DataFrame(crop_rows).set_index("cell_id"))
                        crop_rows = []
                    continue
                cells, why_none = _cells_of(image, job)
            except (ImageReadError, OSError, ValueError) as exc:
                outcome.skipped.append((image.source, str(exc).removeprefix(f"{image.source}: ")))
                continue
            if crop_rows:  # keep the cells in input order
                frames.append(pd.DataFrame(crop_rows).set_index("cell_id"))
                crop_rows = []
            outcome.settings[image.source] = settings
            if image.source in known:
                outcome.redetected.append(image.source)
            if why_none:
                outcome.no_cells.append((image.name or image.source, why_none))
            if len(cells):
                cells["kind"] = image.kind
                frames.append(cells)
        if crop_rows:
            frames.append(pd.DataFrame(crop_rows).set_index("cell_id"))
        if progress is not None:
            progress(n_img, n_img)
        cells = pd.concat(frames) if frames else _empty_cells()
        # --------------------------------------------------- what gets embedded
        obs = state.obs
        on_redetected = obs["source"].astype(str).isin(outcome.redetected).to_numpy()
        curated = (obs["label_origin"].astype(object) == "user").to_numpy() & obs[
            "label"
        ].notna().to_numpy()
        may_stay = ~on_redetected | curated
        need = may_stay & (~state.embedded | outcome.reembed)
        extra = obs.loc[need, ["source", "x0", "y0", "x1", "y1"]]
        outcome.n_reused = int((~on_redetected & ~need).sum())
        if len(cells) == 0 and len(extra) == 0:
            if not outcome.redetected and not (seen & known):
                if outcome.no_cells or outcome.skipped:
                    names = "; ".join(
                        f"{s}: {w}" for s, w in [*outcome.no_cells, *outcome.skipped][:3]
                    )
                    outcome.error = f"No cells found: nothing to embed ({names})."
                elif not inputs and not len(obs):
                    outcome.error = "No image given: nothing to embed."
            outcome.embeddings = np.zeros((0, backbone.dim), np.float32)
            outcome.extra_embeddings = np.zeros((0, backbone.dim), np.float32)
            return outcome
        # ---------------------------------------------------------------- embed
        say("embed")
        normalise = stain_normaliser(job.stain_setting(), state.obs, images, inputs)
        cols = ["source", "x0", "y0", "x1", "y1"]
        frame = pd.concat([cells[cols], extra[cols]], ignore_index=True)
        result = embed_cells(
            frame,
            backbone,
            batch_size=job.batch_size,
            images=images,
            num_workers=num_workers,
            progress=progress,
            cancel=event,
            normalise=normalise,
        )
        if result.cancelled or event.is_set():
            outcome.cancelled = True
            return outcome
        outcome.meta = dict(result.meta)
        n_new = len(cells)
        done = result.done
        outcome.skipped.extend(result.skipped)
        outcome.cells = cells[done[:n_new]]
        outcome.embeddings = result.embeddings[:n_new][done[:n_new]]
        extra_done = done[n_new:]
        outcome.extra_ids = extra.index.to_numpy(dtype=object)[extra_done]
        outcome.extra_embeddings = result.embeddings[n_new:][extra_done]
        if outcome.reembed and not extra_done.all():
            bad = extra.loc[~extra_done, "source"].astype(str).unique()
            outcome.error = (
                f"{int((~extra_done).sum())} cell(s) could not be re-embedded (their images "
                f"cannot be read, e.g. {bad[0]}): nothing changed"
            )
    except (WeightsError, DeviceError, ValueError, OSError) as exc:
        outcome.error = str(exc)
    finally:
        outcome.seconds = time.perf_counter() - start
    return outcome


# ---------------------------------------------------------------------------- commit
@dataclass
class CommitSummary:
    """What :func:`commit_outcome` did.

    Attributes
    ----------
    table : CellTable or None
        A new table when cells were removed or re-embedded (pass it to
        ``session.set_table``), else None (the table was updated in place).
    text : str
        A one-paragraph summary for the user.
    n_new, n_reused, n_reembedded, n_kept_unmatched : int
    changed : bool
        Anything was written.
    """

    table: CellTable | None
    text: str
    n_new: int = 0
    n_reused: int = 0
    n_reembedded: int = 0
    n_kept_unmatched: int = 0
    changed: bool = False


def commit_outcome(table: CellTable, outcome: EmbedOutcome) -> CommitSummary:
    """Write a run's outcome into the table (call on the thread that owns the table).

    Parameters
    ----------
    table : CellTable
        The table the job was run for.
    outcome : EmbedOutcome
        From :func:`run_embed_job`.

    Returns
    -------
    CommitSummary
        ``table`` is a new CellTable when rows were removed or every cell re-embedded
        (it keeps the old table's journal); otherwise ``table`` was changed in place.
        A cancelled or failed outcome changes nothing.
    """
    from napari_hemofm.core.cells import EMBEDDING_KEY, CellTable

    if outcome.cancelled:
        return CommitSummary(None, "Cancelled: nothing changed.")
    if outcome.error:
        return CommitSummary(None, outcome.error)
    if outcome.table_id and outcome.table_id != id(table):
        return CommitSummary(
            None,
            "The cells were replaced during the run (a project was opened?): nothing was "
            "added; run again.",
        )
    dim = outcome.embeddings.shape[1] if outcome.embeddings.ndim == 2 else 0
    cells, drop, kept = carry_ids(table.obs, outcome.cells, outcome.redetected)
    # cells whose id is also an unmatched-but-kept old id cannot happen: matched ids
    # come from dropped rows, fresh ones are above every old number of the prefix
    new_emb = outcome.embeddings
    obs = table.obs
    old_x = table.embeddings
    extra_pos = table.positions(outcome.extra_ids) if len(outcome.extra_ids) else np.zeros(0, int)
    meta = {k: v for k, v in outcome.meta.items() if v is not None}
    settings = _settings_of(table.meta)
    settings.update(outcome.settings)
    meta[SETTINGS_KEY] = json.dumps(settings, sort_keys=True)
    meta["stain_norm"] = dict(outcome.stain_norm)
    rebuild = (
        bool(drop.any())
        or outcome.reembed
        or (old_x is not None and dim and old_x.shape[1] != dim and len(extra_pos))
    )
    n_new = int(len(cells) - np.isin(cells.index, obs.index[drop]).sum())
    if rebuild:
        keep = ~drop
        adata = table.adata[keep].copy()
        x = np.full((int(keep.sum()), dim), np.nan, np.float32)
        if old_x is not None and not outcome.reembed and old_x.shape[1] == dim:
            x[:] = old_x[keep]
        kept_pos = np.cumsum(keep) - 1  # old row -> row of the kept table
        if len(extra_pos):
            ok = keep[extra_pos]  # a re-embedded curated cell may have been matched (dropped)
            x[kept_pos[extra_pos[ok]]] = outcome.extra_embeddings[ok]
        adata.obsm = {EMBEDDING_KEY: x}  # a UMAP of other embeddings is stale
        target = CellTable(adata)
        for name, value in vars(table).items():  # the journal, lock and the like stay
            if name not in ("events", "_adata", "_position"):
                setattr(target, name, value)
        target.update_meta(**meta)
        if len(cells):
            target.add_cells(cells.drop(columns=["kind"]), embeddings=new_emb)
        new_table: CellTable | None = target
    else:
        target = table
        if len(extra_pos):
            x = (
                np.array(old_x, dtype=np.float32, copy=True)
                if old_x is not None and old_x.shape[1] == dim
                else np.full((table.n_cells, dim), np.nan, np.float32)
            )
            x[extra_pos] = outcome.extra_embeddings
            table.set_embeddings(x, **meta)
        else:
            table.update_meta(**meta)
        if len(cells):
            table.add_cells(cells.drop(columns=["kind"]), embeddings=new_emb)
        new_table = None
    batch_changed = _set_per_source(target, "batch", outcome.batch)
    slide_changed = _set_per_source(target, "slide", outcome.slide)
    _fill_slides(target)
    n_reembedded = len(extra_pos)
    parts = []
    if len(cells):
        n_img = cells["source"].nunique()
        parts.append(f"embedded {len(cells)} cell(s) of {n_img} image(s) ({n_new} new)")
    if n_reembedded:
        parts.append(f"embedded {n_reembedded} cell(s) already in the table")
    parts.append(f"reused {outcome.n_reused} cell(s)")
    text = "; ".join(parts)
    text = text[0].upper() + text[1:]
    text += (
        f" with {meta.get('model', '?')} (dim {dim}) in {outcome.seconds:.1f} s; "
        f"the table holds {target.n_cells} cells."
    )
    if outcome.redetected:
        names = ", ".join(_short(s) for s in outcome.redetected)
        text += f" Detected again: {names} (ids and curated labels carried over)."
    if kept.any():
        text += f" Kept {int(kept.sum())} curated cell(s) not found again."
    if outcome.reembed and n_reembedded:
        text += " Every cell was re-embedded."
    if batch_changed or slide_changed:
        text += f" Batch / slide set for {batch_changed + slide_changed} cell(s) (ids unchanged)."
    notes = [*outcome.skipped, *outcome.no_cells]
    if notes:
        text += " Skipped: " + "; ".join(f"{_short(s)}: {w}" for s, w in notes[:3])
        if len(notes) > 3:
            text += f"; and {len(notes) - 3} more"
    return CommitSummary(
        new_table,
        text,
        n_new=n_new,
        n_reused=outcome.n_reused,
        n_reembedded=n_reembedded,
        n_kept_unmatched=int(kept.sum()),
        changed=True,
    )


def _short(source: str) -> str:
    from pathlib import Path

    return Path(source).name or source


def _set_per_source(table: CellTable, column: str, values: Mapping[str, str]) -> int:
    """Set ``column`` of every cell of each source in ``values``; return cells changed."""
    if not values:
        return 0
    obs = table.obs
    src = obs["source"].astype(str)
    new = src.map(dict(values))
    has = new.notna().to_numpy()
    if column in obs.columns:
        old = obs[column].astype(object).to_numpy()
        has &= old != new.to_numpy(dtype=object)
    if not has.any():
        return 0
    table.set_column(column, new.to_numpy(dtype=object)[has], cell_ids=obs.index[has])
    return int(has.sum())


def _fill_slides(table: CellTable) -> None:
    """Give cells without a slide the default one (projects made before the column)."""
    obs = table.obs
    if "slide" not in obs.columns:
        return
    missing = obs["slide"].isna().to_numpy()
    if not missing.any():
        return
    ids = obs.index[missing]
    prefix = id_prefix(ids)
    batch = obs["batch"].astype(object).to_numpy()[missing]
    # a crop is one cell covering its whole file (box from 0, 0)
    box0 = (obs["x0"].to_numpy()[missing] == 0) & (obs["y0"].to_numpy()[missing] == 0)
    per_source = obs["source"].astype(str).map(obs["source"].astype(str).value_counts())
    single = per_source.to_numpy()[missing] == 1
    crop = box0 & single
    values = np.where(crop, batch, prefix)
    table.set_column("slide", values.astype(object), cell_ids=ids)


# --------------------------------------------------------------------------- one call
def embed_into(
    table: CellTable,
    job: EmbedJob,
    inputs: Sequence[ImageInput],
    *,
    reembed: bool = False,
    images: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> tuple[CellTable, CommitSummary, EmbedOutcome]:
    """Run a job and commit it: the API's (and the CLI's) one call.

    Returns
    -------
    (CellTable, CommitSummary, EmbedOutcome)
        The table holding the result (``table`` itself or a new one), the summary and
        the outcome (``outcome.error`` set: nothing changed).
    """
    outcome = run_embed_job(
        table, job, inputs, reembed=reembed, images=images, progress=progress, cancel=cancel
    )
    summary = commit_outcome(table, outcome)
    return (summary.table or table), summary, outcome

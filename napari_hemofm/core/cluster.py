"""Embed whole cohorts on a Dask cluster: chunked, identical to one machine, resumable.

The inputs are scanned on the client exactly as in a single-process run
(:func:`~.inputs.scan_inputs`), then their image files are cut into chunks of
consecutive sources. Each chunk is one Dask task: on a worker it finds the chunk's
cells (:func:`~.inputs.collect_cells`: detection for smears, one cell per crop),
embeds them with a backbone that the worker loads once and keeps, and writes a chunk
file ``<out>.chunks/chunk-<k>-<key>.h5ad`` (to a temporary name, then renamed, so a
chunk file is either complete or absent). The client merges the chunk files in chunk
order into the project file. Because cells are numbered per source and embeddings are
a per-cell function, the merged project has the same cell ids, order and embeddings as
:func:`single-process <napari_hemofm.cli.cmd_embed>` ``hemofm embed``.

Running the same command again skips every chunk whose file exists (the key in its
name covers the chunk's sources, their sizes and times, the model, the weights' path
and sha256, and the options), so an interrupted run resumes, and weights replaced under
the same path are never mixed with chunks embedded by the old ones; a task whose worker
dies is retried by Dask.

``dask.distributed`` is an optional dependency (``pip install "napari-hemofm[cluster]"``);
it is imported only here, inside functions.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

# one job class for every run (panel, CLI, API, cluster)
from napari_hemofm.core.embed_job import EmbedJob

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.inputs import Scan, Source

CHUNK_PREFIX = "chunk-"

#: obs columns a chunk carries into the merged project (as a single run writes them)
_CARRIED = ("source", "batch", "x", "y", "x0", "y0", "x1", "y1", "label", "score")


def with_weights_sha256(job: EmbedJob) -> EmbedJob:
    """``job`` with the sha256 of its weights file filled in (unchanged without weights)."""
    if job.weights is None or job.weights_sha256 is not None:
        return job
    from napari_hemofm.core.weights import sha256_file

    return replace(job, weights_sha256=sha256_file(job.weights))


# one backbone per worker process, loaded on its first chunk
_BACKBONES: dict[tuple, Any] = {}


def _worker_backbone(job: EmbedJob) -> Any:
    from napari_hemofm.core.models import load_backbone

    key = (job.model, job.weights, job.weights_sha256, job.device, job.precision)
    backbone = _BACKBONES.get(key)
    if backbone is None:
        backbone = load_backbone(
            job.model, weights=job.weights, device=job.device, precision=job.precision
        )
        if job.weights_sha256 is not None and backbone.weights_sha256 != job.weights_sha256:
            raise RuntimeError(
                f"the weights file {job.weights} changed during the run (sha256 "
                f"{str(backbone.weights_sha256)[:12]}... instead of "
                f"{job.weights_sha256[:12]}...); run the command again"
            )
        _BACKBONES[key] = backbone
    return backbone


def parse_cluster(spec: str) -> tuple[str, int | None]:
    """Parse ``local``, ``local:N`` or ``tcp://HOST:PORT``.

    Returns
    -------
    (kind, n_workers) or (address, None)

    Raises
    ------
    ValueError
        For anything else.
    """
    if spec == "local":
        return "local", None
    if spec.startswith("local:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"--cluster local:N needs N >= 1; got {spec!r}")
        return "local", n
    if spec.startswith("tcp://") and ":" in spec[len("tcp://") :]:
        return spec, None
    raise ValueError(f"--cluster must be local, local:N or tcp://HOST:PORT; got {spec!r}")


def chunk_sources(sources: Sequence[Source], chunk_size: int) -> list[list[Source]]:
    """Consecutive groups of at most ``chunk_size`` sources (order kept)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [list(sources[i : i + chunk_size]) for i in range(0, len(sources), chunk_size)]


def chunk_key(sources: Sequence[Source], job: EmbedJob) -> str:
    """A hash of a chunk's sources (path, size, mtime, batch, id part) and the job.

    The job's weights count by content: their sha256 is part of the key (computed here
    when the job does not carry it yet), so the same path holding other weights gives
    other keys. So does the backbone's feature version
    (:attr:`~.models.ModelSpec.feature_version`): chunks of handcrafted features of an
    older version are not reused.
    """
    from napari_hemofm.core.models import get_spec

    digest = hashlib.blake2b(digest_size=8)
    settings = asdict(with_weights_sha256(job))
    settings["feature_version"] = get_spec(job.model).feature_version
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for src in sources:
        try:
            stat = os.stat(src.path)
            fingerprint = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            fingerprint = (-1, -1)
        digest.update(
            json.dumps(
                [str(src.path), src.kind, src.batch, src.rel, src.label, fingerprint]
            ).encode()
        )
    return digest.hexdigest()


def run_chunk(sources: Sequence[Source], job: EmbedJob, path: str) -> dict[str, Any]:
    """Find, embed and write the cells of one chunk (runs on a worker).

    Parameters
    ----------
    sources : sequence of Source
        Consecutive image files of the scan.
    job : EmbedJob
    path : str
        The chunk file to write (``.h5ad``).

    Returns
    -------
    dict
        ``{"path", "n_cells", "n_embedded", "skipped": [(path, reason), ...], "meta"}``.
    """
    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.embed import embed_table
    from napari_hemofm.core.inputs import Scan, collect_cells
    from napari_hemofm.core.io import save_project

    backbone = _worker_backbone(job)
    found = collect_cells(Scan(sources=list(sources)), pixel_size_um=job.pixel_size_um)
    table = CellTable()
    table.update_meta(pixel_size_um=job.pixel_size_um)
    table.update_meta(**backbone.meta())
    skipped = list(found.skipped)
    n_embedded = 0
    if not found.cells.empty:
        table.add_cells(found.cells)
        result = embed_table(table, backbone, batch_size=job.batch_size, num_workers=1)
        skipped.extend(result.skipped)
        n_embedded = int(result.done.sum())
    table.update_meta(skipped=json.dumps(skipped))
    save_project(table, path)  # temporary name + fsync + rename: complete or absent
    return {
        "path": path,
        "n_cells": table.n_cells,
        "n_embedded": n_embedded,
        "skipped": skipped,
        "meta": backbone.meta(),
    }


def chunk_dir(out: str | Path) -> Path:
    """Folder of the chunk files of the project ``out``: ``<out>.chunks``."""
    out = Path(out)
    return out.with_name(out.name + ".chunks")


def merge_chunks(paths: Sequence[str | Path]) -> tuple[CellTable, list[tuple[str, str]]]:
    """Concatenate chunk files (in the given order) into one cell table.

    Returns
    -------
    (CellTable, skipped)
        The merged table, and the files skipped inside the chunks.
    """
    import numpy as np

    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.io import load_project

    merged = CellTable()
    skipped: list[tuple[str, str]] = []
    meta: dict[str, Any] = {}
    for path in paths:
        part = load_project(path, mode="r")  # read only: no lock on the chunk files
        skipped.extend(tuple(s) for s in json.loads(str(part.meta.get("skipped", "[]"))))
        for key in ("model", "weights_sha256", "input_size", "embedding_dim", "precision"):
            if key in part.meta:
                meta[key] = part.meta[key]
        if "pixel_size_um" in part.meta:
            meta["pixel_size_um"] = float(part.meta["pixel_size_um"])
        if part.n_cells:
            extra = [c for c in part.obs.columns if c in ("score", "slide")]
            frame = part.obs[
                ["source", "batch", "x", "y", "x0", "y0", "x1", "y1", "label", *extra]
            ]
            emb = part.embeddings
            if emb is not None:  # skipped means skipped: a cell not embedded stays out
                ok = np.isfinite(np.asarray(emb)).all(axis=1)
                frame, emb = frame[ok], np.asarray(emb)[ok]
            merged.add_cells(frame, embeddings=emb)
    merged.update_meta(**{k: (v.item() if hasattr(v, "item") else v) for k, v in meta.items()})
    return merged, skipped


def _check_pixel_size(sources: Sequence[Source], pixel_size_um: float | None) -> None:
    """Refuse a pixel size that fits none of the smears, from their headers only.

    Raises
    ------
    ValueError
        From :func:`~.detect.check_pixel_size_fits`, naming the first smear it fails.
    """
    if pixel_size_um is None:
        return
    from napari_hemofm.core.detect import check_pixel_size_fits
    from napari_hemofm.core.io import ImageReadError, image_size

    for src in sources:
        if src.kind == "crop":
            continue
        try:
            shape = image_size(src.path)
        except ImageReadError:
            continue  # skipped later, with the other unreadable files
        try:
            check_pixel_size_fits(shape, pixel_size_um)
        except ValueError as exc:
            raise ValueError(f"{src.path}: {exc}") from None


def embed_on_cluster(
    scan: Scan,
    job: EmbedJob,
    out: str | Path,
    *,
    cluster: str = "local",
    chunk_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    retries: int = 2,
    _max_chunks: int | None = None,
) -> tuple[CellTable | None, dict[str, Any]]:
    """Embed a scan's cells on a Dask cluster and merge them into one project.

    Parameters
    ----------
    scan : Scan
        From :func:`~.inputs.scan_inputs` (the client only lists files).
    job : EmbedJob
        Model and options, the same for every chunk.
    out : str or Path
        Project file to write; chunk files go to ``<out>.chunks/``.
    cluster : str
        ``local`` (a :class:`distributed.LocalCluster` with one single-threaded
        worker process per core), ``local:N`` (N worker processes) or
        ``tcp://HOST:PORT`` (an existing scheduler).
    chunk_size : int
        Image files per task.
    progress : callable, optional
        ``progress(chunks_done, chunks_total)``; finished chunks from an earlier run
        count as done at once.
    retries : int
        Times a chunk is retried after its worker died or it failed.
    _max_chunks : int, optional
        Test hook: stop after this many chunks were computed in this run (an
        interrupted run), without merging.

    Returns
    -------
    (CellTable or None, dict)
        The merged table (``None`` when stopped early) and a summary:
        ``{"chunks", "reused", "computed", "skipped", "chunk_dir"}``.
    """
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "--cluster needs dask.distributed: pip install 'napari-hemofm[cluster]'"
        ) from exc

    kind, n_workers = parse_cluster(cluster)
    _check_pixel_size(scan.sources, job.pixel_size_um)  # on the client, before any task
    job = with_weights_sha256(job)  # hashed once here, not per chunk
    folder = chunk_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    chunks = chunk_sources(scan.sources, chunk_size)
    paths = [
        folder / f"{CHUNK_PREFIX}{k:06d}-{chunk_key(srcs, job)}.h5ad"
        for k, srcs in enumerate(chunks)
    ]
    todo = [k for k, p in enumerate(paths) if not p.exists()]
    reused = len(chunks) - len(todo)
    done = reused
    if progress:
        progress(done, len(chunks))
    computed = 0
    if todo:
        local = None
        if kind == "local":
            n = n_workers or max(1, os.cpu_count() or 1)
            local = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=40,
            )
            client = Client(local)
        else:
            client = Client(kind, timeout="30s")
        try:
            futures = [
                client.submit(
                    run_chunk,
                    chunks[k],
                    job,
                    str(paths[k]),
                    key=f"hemofm-chunk-{paths[k].stem}",
                    retries=retries,
                    pure=False,
                )
                for k in todo
            ]
            for future in as_completed(futures):
                future.result()  # re-raises a chunk's error after its retries
                computed += 1
                done += 1
                if progress:
                    progress(done, len(chunks))
                if _max_chunks is not None and computed >= _max_chunks:
                    for other in futures:
                        other.cancel()
                    break
        finally:
            client.close()
            if local is not None:
                local.close()
    summary = {
        "chunks": len(chunks),
        "reused": reused,
        "computed": computed,
        "chunk_dir": str(folder),
    }
    if _max_chunks is not None and done < len(chunks):
        return None, {**summary, "skipped": []}
    stale = {p.name for p in folder.glob(f"{CHUNK_PREFIX}*.h5ad")} - {p.name for p in paths}
    for name in stale:  # chunks of an older version of the inputs or options
        (folder / name).unlink()
    table, skipped = merge_chunks(paths)
    return table, {**summary, "skipped": skipped}

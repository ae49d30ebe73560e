"""The ``hemofm`` command line: the headless core's work without a screen.

Exit codes (DESIGN.md): 0 when the work was done, also when some input files were
skipped (one warning names every skipped file); 1 when nothing could be done (one
clear line says why, no traceback); 2 for usage errors (argparse).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from napari_hemofm import __version__
from napari_hemofm._cli_checks import OutputCheckError, check_outputs

DETECT_CSV_COLUMNS = ["image", "cell_id", "x", "y", "x0", "y0", "x1", "y1", "score"]
"""Columns of ``hemofm detect --out`` (contract)."""


class CommandError(Exception):
    """Nothing could be done: printed as one line, exit code 1."""


def _project_errors() -> tuple[type[Exception], ...]:
    from napari_hemofm.core.io import ProjectChangedError
    from napari_hemofm.core.journal import ProjectReadOnlyError
    from napari_hemofm.core.lock import ProjectLockedError

    return (ProjectLockedError, ProjectReadOnlyError, ProjectChangedError)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):  # nan and inf are refused too
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _probability(text: str) -> float:
    """Parse a number in [0, 1] (argparse type; ``nan`` is refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:  # False for nan too
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _seed(text: str) -> int:
    """Parse a random seed: an integer in [0, 2**32 - 1], what NumPy accepts (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be between 0 and 4294967295, got {text}")
    return value


def _progress_bar(desc: str, unit: str):
    """A tqdm-backed ``progress(done, total)`` callback and a closer."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True)

    def progress(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    return progress, bar.close


def _warn(text: str) -> None:
    print(f"hemofm: warning: {text}", file=sys.stderr)


def _scan(args: argparse.Namespace):
    """List the inputs' image files; warn about empty inputs; fail when there is none."""
    from napari_hemofm.core.inputs import scan_inputs

    scan = scan_inputs(args.inputs, batch=args.batch)
    for path, why in scan.empty_inputs:
        _warn(f"{path}: {why}")
    if not scan.sources:
        reasons = [*scan.empty_inputs, *scan.skipped]
        why = "; ".join(f"{p}: {w}" for p, w in reasons[:3]) or "no inputs"
        raise CommandError(f"no readable image in the inputs ({why})")
    return scan


def _collect(scan, args: argparse.Namespace, desc: str):
    """Find the scan's cells (detection for smears) with a progress bar."""
    from napari_hemofm.core.inputs import collect_cells

    progress, close = _progress_bar(desc, "image")
    try:
        found = collect_cells(scan, pixel_size_um=args.pixel_size, progress=progress)
    except ValueError as exc:  # two inputs give the same cell id
        raise CommandError(str(exc)) from None
    finally:
        close()
    if found.no_cells:
        _warn(_format_no_cells(found.no_cells))
    return found


def cmd_detect(args: argparse.Namespace) -> int:
    """Detect WBCs in smears (and list crops) and write one CSV row per cell."""
    from napari_hemofm.core.io import format_skipped, write_csv

    result = _collect(_scan(args), args, "detect")
    if result.skipped:
        _warn(format_skipped(result.skipped))
    if result.n_sources == 0:
        raise CommandError("none of the input images could be read (see the warning above)")
    table = result.cells.reset_index().rename(columns={"source": "image"})
    write_csv(table[DETECT_CSV_COLUMNS], args.out)
    n_images = table["image"].nunique()
    print(
        f"{len(table)} cell(s) from {result.n_sources} image(s) "
        f"({n_images} with cells) -> {args.out}",
        file=sys.stderr,
    )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Write the synthetic sample (three batches of smears) with its ground truth."""
    from napari_hemofm.core.synthetic import make_sample, write_smears

    smears = make_sample(seed=args.seed, n_per_batch=args.per_batch)
    paths = write_smears(smears, args.out_dir)
    batches = sorted({s.batch for s in smears})
    n_cells = sum(len(s.cells) for s in smears)
    print(
        f"{len(paths)} synthetic smear(s), {n_cells} WBCs, batches {', '.join(batches)} "
        f"-> {args.out_dir} (ground truth: {Path(args.out_dir) / 'ground_truth.csv'})",
        file=sys.stderr,
    )
    return 0


def _stage_bars(model: str):
    """``stage(name)`` and ``progress(done, total)`` callbacks: one tqdm bar per stage."""
    units = {"find cells": "image", "embed": "cell"}
    current: dict[str, Callable] = {}

    def stage(name: str) -> None:
        if "close" in current:
            current.pop("close")()
        current.pop("progress", None)
        if name in units:
            desc = f"embed ({model})" if name == "embed" else name
            current["progress"], current["close"] = _progress_bar(desc, units[name])

    def progress(done: int, total: int) -> None:
        if "progress" in current:
            current["progress"](done, total)

    def close() -> None:
        stage("")

    return stage, progress, close


def cmd_embed(args: argparse.Namespace) -> int:
    """Find the cells behind the inputs, embed them, and write (or add to) a project file.

    An existing ``--out`` project is updated through the core embed job
    (:func:`napari_hemofm.core.embed_job.run_embed_job`): known images keep their
    cells, ids, labels and embeddings; ``--batch`` sets the batch of the listed
    inputs' cells; another model or stain setting is refused (exit 1) unless
    ``--reembed``.
    """
    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.embed_job import EmbedJob

    scan = _scan(args)
    out = Path(args.out)
    if out.suffix != ".h5ad":
        out = out.with_name(out.name + ".h5ad")
    if args.cluster:
        if out.exists():
            raise CommandError(
                f"{out} exists: --cluster writes a new project; add to it without --cluster"
            )
        if args.stain_norm != "none":
            raise CommandError("--stain-norm is not available with --cluster")
        return _embed_on_cluster(args, scan)
    job = EmbedJob(
        model=args.model,
        weights=str(args.weights) if args.weights else None,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        pixel_size_um=args.pixel_size,
        stain_norm=args.stain_norm,
        stain_reference=args.stain_reference,
    )
    table = _load_project(out, args, write=True) if out.exists() else CellTable()
    try:
        return _embed_into_project(args, scan, job, table, out)
    finally:
        table.close()  # the project's lock (a committed new table shares its journal)


def _embed_into_project(args: argparse.Namespace, scan, job, table, out: Path) -> int:
    """The body of `hemofm embed` once the (new or existing) project is open."""
    from napari_hemofm.core.embed_job import commit_outcome, inputs_from_scan, run_embed_job
    from napari_hemofm.core.io import format_skipped, save_project
    from napari_hemofm.core.models import WeightsError, load_backbone

    try:
        backbone = load_backbone(
            args.model,
            weights=args.weights,
            download=args.download,
            device=args.device,
            precision=args.precision,
        )
    except (WeightsError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    stage, progress, close = _stage_bars(args.model)
    try:
        outcome = run_embed_job(
            table,
            job,
            inputs_from_scan(scan, batch=args.batch),
            reembed=args.reembed,
            backbone=backbone,
            progress=progress,
            stage=stage,
        )
    finally:
        close()
    skipped = [*scan.skipped, *outcome.skipped]
    if skipped:
        _warn(format_skipped(skipped))
    if outcome.no_cells:
        _warn(_format_no_cells(outcome.no_cells))
    if outcome.error:
        raise CommandError(outcome.error)
    if args.pixel_size:
        table.update_meta(pixel_size_um=args.pixel_size)
    summary = commit_outcome(table, outcome)
    result = summary.table or table
    if result.n_cells == 0:
        raise CommandError("no cell could be embedded (see the warning above)")
    if args.preset is not None or not out.exists():  # a new project starts from a preset
        from napari_hemofm.core.catalogue import DEFAULT_PRESET, apply_preset

        apply_preset(result, args.preset or DEFAULT_PRESET)
    path = save_project(result, out)
    print(f"{summary.text} {len(result.batches)} batch(es) -> {path}", file=sys.stderr)
    return 0


def _format_no_cells(no_cells: Sequence[tuple[str, str]]) -> str:
    lines = "\n".join(f"  {path}: {why}" for path, why in no_cells)
    return f"no cells in {len(no_cells)} image(s):\n{lines}"


def _embed_on_cluster(args: argparse.Namespace, scan) -> int:
    """`hemofm embed --cluster`: chunks on Dask workers, merged into the same project."""
    from napari_hemofm.core.cluster import EmbedJob, embed_on_cluster, parse_cluster
    from napari_hemofm.core.io import format_skipped
    from napari_hemofm.core.models import WeightsError, get_spec
    from napari_hemofm.core.weights import resolve_weights

    try:
        parse_cluster(args.cluster)
        weights = None
        if get_spec(args.model).needs_weights:  # fail (or download) here, not on every worker
            weights = str(resolve_weights(args.model, args.weights, download=args.download))
    except (WeightsError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    job = EmbedJob(
        model=args.model,
        weights=weights,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        pixel_size_um=args.pixel_size,
    )
    progress, close = _progress_bar(f"embed on {args.cluster}", "chunk")
    try:
        table, summary = embed_on_cluster(
            scan,
            job,
            args.out,
            cluster=args.cluster,
            chunk_size=args.chunk_size,
            progress=progress,
        )
    except ValueError as exc:  # e.g. a pixel size that fits no image (checked first)
        raise CommandError(str(exc)) from None
    except (OSError, TimeoutError) as exc:
        raise CommandError(f"cluster {args.cluster}: {exc}") from None
    finally:
        close()
    skipped = [*scan.skipped, *summary["skipped"]]
    if skipped:
        _warn(format_skipped(skipped))
    if table is None or table.n_cells == 0:
        raise CommandError("no cells found in the inputs: nothing to embed")
    import numpy as np

    emb = table.embeddings
    n_done = 0 if emb is None else int(np.isfinite(emb).all(axis=1).sum())
    if n_done == 0:
        raise CommandError("no cell could be embedded (see the warning above)")
    path = table.save(args.out)
    print(
        f"{n_done} of {table.n_cells} cell(s) embedded with {args.model} on {args.cluster} "
        f"({summary['computed']} chunk(s) computed, {summary['reused']} reused from "
        f"{summary['chunk_dir']}) -> {path}",
        file=sys.stderr,
    )
    return 0


def _preset(text: str) -> str:
    """Parse a class preset name, case-insensitive (argparse type)."""
    from napari_hemofm.core.catalogue import get_preset

    try:
        return get_preset(text).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_OPENED: list = []
"""Tables opened by :func:`_load_project` in this command; :func:`main` closes them."""


def _load_project(path: Path, args: argparse.Namespace | None = None, *, write: bool = False):
    """Open a project for a command: one helper, so every command treats locks alike.

    ``write=True`` (commands that save the project) takes the project's lock, waiting up
    to ``--wait`` seconds for another process to close it, else fails with one line
    naming the holder. Read-only commands take no lock and run beside a writer.
    ``--images-root`` is where the images are when their stored paths do not resolve.
    """
    from napari_hemofm.core.io import load_project
    from napari_hemofm.core.lock import ProjectLockedError

    images_root = getattr(args, "images_root", None)
    wait = getattr(args, "wait", 0.0) or 0.0
    try:
        table = load_project(path, mode="w" if write else "r", images_root=images_root, wait=wait)
    except (ValueError, ProjectLockedError) as exc:
        raise CommandError(str(exc)) from None
    _OPENED.append(table)
    return table


def _close_opened() -> None:
    """Release the locks of the projects this command opened."""
    while _OPENED:
        _OPENED.pop().close()


def _add_project_options(parser: argparse.ArgumentParser, *, write: bool = False) -> None:
    """``--images-root`` for commands that open a project, ``--wait`` for those that save one."""
    parser.add_argument(
        "--images-root",
        type=Path,
        metavar="DIR",
        help="folder now holding the project's images, when their stored paths "
        "(absolute, and relative to the project) no longer exist",
    )
    if write:
        parser.add_argument(
            "--wait",
            type=_non_negative_float,
            default=0.0,
            metavar="SECONDS",
            help="wait up to this long for another process (napari) to close the project "
            "(default 0: refuse at once)",
        )


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a kNN or linear probe on the labelled cells (DinoBloom protocol)."""
    import json

    from napari_hemofm.core.evaluation import evaluate_probe

    table = _load_project(args.project, args)
    if table.embeddings is None:
        raise CommandError(f"{args.project}: no embeddings; run `hemofm embed` first")
    labels = table.column("label").astype(object).to_numpy()
    try:
        report = evaluate_probe(
            table.embeddings,
            labels,
            probe=args.probe,
            split=args.split,
            batches=table.column("batch").astype(object).to_numpy(),
        )
    except ValueError as exc:
        raise CommandError(f"{args.project}: {exc}") from None
    if args.json:
        print(json.dumps(report))
        return 0
    split = "5-fold stratified CV" if args.split == "cv" else "leave-one-batch-out"
    print(f"{report['n_cells']} labelled cells, {len(report['classes'])} classes, {split}")
    for name, why in (report.get("skipped_batches") or {}).items():
        print(f"batch {name} not held out: {why}")
    print(f"{'probe':<10} {'accuracy':>9} {'bal. acc.':>9} {'w. F1':>9}")
    for name, scores in report["results"].items():
        print(
            f"{name:<10} {scores['accuracy']:>9.4f} {scores['balanced_accuracy']:>9.4f} "
            f"{scores['weighted_f1']:>9.4f}"
        )
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """Batch-effect metrics of a project's embeddings (optionally after a correction)."""
    import json

    from napari_hemofm.core.batch import default_level, table_batch_report

    table = _load_project(args.project, args)
    if table.embeddings is None:
        raise CommandError(f"{args.project}: no embeddings; run `hemofm embed` first")
    correction = None if args.correct == "none" else args.correct
    what = f" after {correction}" if correction else ""
    by = args.by or default_level(table)
    print(f"batch metrics of {table.n_cells} cells by {by}{what} ...", file=sys.stderr)
    try:
        report = table_batch_report(
            table,
            by=by,
            label_column=args.label_column,
            correction=correction,
            seed=args.seed,
        )
    except (ValueError, KeyError, ImportError) as exc:
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise CommandError(f"{args.project}: {text}") from None
    if args.json:
        print(json.dumps(report, allow_nan=False))
        return 0
    _print_batch_report(report)
    return 0


def _print_batch_report(report: dict) -> None:
    counts: dict[str, int] = {}
    for entry in report["per_label"].values():
        for name, n in entry["batches"].items():
            counts[name] = counts.get(name, 0) + n
    batches = ", ".join(f"{b} ({counts.get(b, 0)})" for b in report["batches"])
    labelled = report["n_labelled"]
    level = report.get("by", "batch")
    if report.get("level_note"):
        print(f"note: {report['level_note']}")
    print(f"{report['n_cells']} cells ({labelled} with a cell type), {level} groups: {batches}")
    if report["n_not_embedded"]:
        print(f"{report['n_not_embedded']} cell(s) without embedding left out")
    if report.get("n_no_group"):
        print(f"{report['n_no_group']} cell(s) without a {level} left out")
    print(
        f"mixing metrics over the {len(report['mixing_labels'])} cell type(s) found in >= 2 "
        f"batches: {', '.join(report['mixing_labels']) or 'none'}"
    )
    if report["excluded_labels"]:
        left = ", ".join(f"{k} ({v})" for k, v in report["excluded_labels"].items())
        print(f"left out of the mixing averages: {left}")
    if report["correction"]:
        print(f"after {report['correction']} (a preview: the project is not changed)")
        for name, why in (report.get("correction_skipped") or {}).items():
            print(f"  left uncorrected: {name} ({why})")
    lobo = report.get("lobo")
    if lobo:
        if lobo.get("sampled"):
            print(f"leave-one-{level}-out probes on a seeded sample of {lobo['n_cells']} cells")
        for probe, skipped in (lobo.get("skipped") or {}).items():
            for name, why in skipped.items():
                print(f"leave-one-{level}-out ({probe}): {name} not held out: {why}")

    def fmt(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    before = report.get("uncorrected")
    head = f"{'metric':<30} {'value':>7}"
    if before is not None:
        head = f"{'metric':<30} {'before':>7} {'after':>7}"
    print(f"{head}  {'direction':<40} meaning")
    for name, value in report["metrics"].items():
        cols = f"{name:<30} {fmt(value):>7}"
        if before is not None:
            cols = f"{name:<30} {fmt(before[name]):>7} {fmt(value):>7}"
        print(f"{cols}  {report['directions'][name]:<40} {report['meanings'][name]}")
    reasons = report.get("reasons") or {}
    missing = [name for name, value in report["metrics"].items() if value is None]
    for name in missing:
        print(f"  {name}: {reasons.get(name, 'not computed')}")
    print()
    columns = {
        "ilisi": "iLISI",
        "kbet_acceptance": "kBET acc.",
        "pcr_batch": "PCR batch",
        "batch_asw": "batch ASW",
        "graph_connectivity": "graph conn.",
    }
    print(f"{'cell type':<20} {'cells':>6} " + " ".join(f"{c:>11}" for c in columns.values()))
    for label, entry in report["per_label"].items():
        values = " ".join(f"{fmt(entry.get(k)):>11}" for k in columns)
        print(f"{label[:20]:<20} {entry['n_cells']:>6} {values}")


def cmd_umap(args: argparse.Namespace) -> int:
    """Add a 2-D UMAP of the embeddings to a project (obsm["X_umap"])."""
    from napari_hemofm.core.reduce import umap_for_table

    table = _load_project(args.project, args, write=True)
    if table.embeddings is None:
        raise CommandError(f"{args.project}: no embeddings; run `hemofm embed` first")
    print(f"UMAP of {table.n_cells} cells (PCA 50, seed {args.seed}) ...", file=sys.stderr)
    try:
        umap_for_table(table, seed=args.seed, force=args.force)
    except ValueError as exc:
        raise CommandError(f"{args.project}: {exc}") from None
    table.save(args.project)
    print(f"obsm['X_umap'] written to {args.project}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Differential counts per group: long CSV (--out), summary (--json), printable HTML.

    The counting rule, the threshold default and the sign-off text are
    :mod:`napari_hemofm.core.report`'s, the same as the Review gallery's.
    """
    import json

    from napari_hemofm.core.io import write_csv
    from napari_hemofm.core.report import differential_counts, report_json

    if args.out is None and not args.json and args.html is None:
        print("hemofm report: error: give --out COUNTS.csv, --json or --html", file=sys.stderr)
        raise SystemExit(2)
    table = _load_project(args.project, args)
    if table.n_cells == 0:
        raise CommandError(f"{args.project}: the project holds no cells")
    if args.probe_file is not None:
        from napari_hemofm.core.probe import LiveProbe

        if table.embeddings is None:
            raise CommandError(f"{args.project}: no embeddings to apply {args.probe_file} to")
        try:
            probe = LiveProbe.load(args.probe_file)
            pred, conf = probe.apply(table.embeddings)
            typicality, atypical = probe.typicality_of(table.embeddings, pred)  # the guard
        except (OSError, ValueError) as exc:
            text = str(exc)  # the loader's messages name the file already
            named = text.startswith(str(args.probe_file))
            raise CommandError(text if named else f"{args.probe_file}: {text}") from None
        table.set_predictions(None, pred, conf)
        table.set_column("typicality", typicality.astype(float))
        table.set_column("atypical", atypical)
        print(f"predictions from {args.probe_file} ({probe.kind})", file=sys.stderr)
    elif args.predict is not None:
        from napari_hemofm.core.review import Review

        if table.embeddings is None:
            raise CommandError(f"{args.project}: no embeddings; run `hemofm embed` first")
        review = Review(table, probe=args.predict)
        review.retrain()
        if review.probe is None:
            raise CommandError(f"{args.project}: --predict needs labelled cells of >= 2 classes")
        print(f"predictions from a {args.predict} probe on the labelled cells", file=sys.stderr)
    try:
        counts = differential_counts(table, args.by, threshold=args.threshold)
        summary = report_json(table, args.by, threshold=args.threshold, target=args.target)
    except ValueError as exc:  # --by names no column
        raise CommandError(f"{args.project}: {exc}") from None
    if args.out is not None:
        write_csv(counts, args.out)
    for group in summary["groups"]:
        print(f"{group['group']}: {group['status']}", file=sys.stderr)
        for text in group["warnings"]:
            _warn(f"{group['group']}: {text}")
    if args.html is not None:
        from napari_hemofm.core.report_html import write_report_html

        write_report_html(
            table, args.html, by=args.by, threshold=args.threshold, target=args.target
        )
        print(f"printable report -> {args.html}", file=sys.stderr)
    if args.out is not None:
        n = len(summary["groups"])
        print(f"{len(counts)} rows ({n} {args.by} groups) -> {args.out}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, allow_nan=False))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Print the audit trail: label changes and sign-offs, oldest first.

    Who changed which cell from what to what and when, from the project's saved history
    and its label journal (:mod:`napari_hemofm.core.audit`).
    """
    from napari_hemofm.core.audit import audit_trail, cell_history
    from napari_hemofm.core.io import write_csv

    table = _load_project(args.project, args)
    if args.cell is not None:
        try:
            trail = cell_history(table, args.cell)
        except KeyError:
            raise CommandError(f"{args.project}: no cell {args.cell!r}") from None
        trail.insert(2, "event", "relabel")
    else:
        trail = audit_trail(table)
    if args.out is not None:
        write_csv(trail, args.out)
        print(f"{len(trail)} event(s) -> {args.out}", file=sys.stderr)
        return 0
    if not len(trail):
        print("no label change and no sign-off recorded", file=sys.stderr)
        return 0
    for r in trail.itertuples():
        if r.event == "relabel":
            cell = "" if args.cell is not None else f"{r.cell_id}: "
            what = f"{cell}{r.old or '(none)'} -> {r.new or '(none)'}"
        else:
            what = f"{r.group}: {r.detail}"
        print(f"{r.time}  {r.user:<12} {r.event:<8} {what}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Open napari with the synthetic sample, the Embed panel and the Cell map."""
    # checked before anything imports Qt: without a display Qt aborts with a core dump
    from napari_hemofm._widgets._demo import DemoError, display_problem, run_demo

    problem = display_problem()
    if problem:
        raise CommandError(problem)
    run = not (args.no_run or args.screenshot is not None)
    try:
        run_demo(run=run, screenshot=args.screenshot)
    except DemoError as exc:
        raise CommandError(str(exc)) from None
    if args.screenshot is not None:
        print(f"screenshot -> {args.screenshot}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``hemofm`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="hemofm",
        description="Find, embed and review white blood cells (napari-hemofm, headless).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    detect = sub.add_parser(
        "detect",
        help="detect WBCs in smear images and write their boxes to a CSV",
        description=(
            "Detect white blood cells in smear images. INPUT is a smear image (JPEG, PNG, "
            "BMP, TIFF), a folder of smears, or a crop folder <root>/<class>/<file> (each "
            "crop is one cell). Writes one CSV row per cell with the columns "
            + ", ".join(DETECT_CSV_COLUMNS)
            + ". Unreadable files are skipped with one warning."
        ),
    )
    detect.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", type=Path)
    detect.add_argument("--out", required=True, type=Path, help="CSV file to write")
    detect.add_argument("--batch", help="batch name for all inputs (default: folder name)")
    detect.add_argument(
        "--pixel-size",
        type=_positive_float,
        metavar="UM",
        help="pixel size in micrometres per pixel (default: estimated from the RBCs)",
    )
    detect.set_defaults(func=cmd_detect)

    from napari_hemofm.core.models import MODEL_NAMES
    from napari_hemofm.core.stain import STAIN_METHODS

    embed = sub.add_parser(
        "embed",
        help="find and embed cells, write a project (.h5ad)",
        description=(
            "Embed every cell behind the inputs and write a project file (AnnData .h5ad). "
            "Smear images have their WBCs detected first; crop folders <root>/<class>/<file> "
            "keep their class (as the label) and batch."
        ),
    )
    embed.add_argument("inputs", nargs="+", metavar="INPUT", type=Path)
    embed.add_argument(
        "--model",
        choices=MODEL_NAMES,
        default="handcrafted",
        help="backbone (default: handcrafted, which needs no weights)",
    )
    embed.add_argument(
        "--weights",
        type=Path,
        metavar="PATH",
        help="DinoBloom weights: a .pth, a .safetensors, or a folder holding model.safetensors",
    )
    embed.add_argument(
        "--download",
        action="store_true",
        help="download missing DinoBloom weights from the Hugging Face hub into the cache",
    )
    embed.add_argument(
        "--batch",
        help=(
            "batch of the listed inputs' cells, also of cells already in --out "
            "(default: the folder name for new cells; ids never change)"
        ),
    )
    embed.add_argument(
        "--reembed",
        action="store_true",
        help=(
            "re-embed every cell of an existing --out project (needed to switch --model, "
            "weights or --stain-norm; ids and labels are kept)"
        ),
    )
    embed.add_argument(
        "--stain-norm",
        choices=STAIN_METHODS,
        default="none",
        help="stain normalisation of each image before its cells are embedded (default none)",
    )
    embed.add_argument(
        "--stain-reference",
        metavar="BATCH|FILE",
        help="reference of --stain-norm: a batch name or an image file (default: built in)",
    )
    embed.add_argument(
        "--batch-size", type=_positive_int, default=32, metavar="N", help="default 32"
    )
    embed.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    embed.add_argument(
        "--preset",
        type=_preset,
        default=None,
        metavar="NAME",
        help="class list a new project starts from: 'Peripheral blood' (default) or "
        "'Bone marrow' (see docs/review.md)",
    )
    embed.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16 autocast: about 2x faster on CPUs with AMX, embeddings move slightly",
    )
    embed.add_argument(
        "--pixel-size", type=_positive_float, metavar="UM", help="micrometres per pixel"
    )
    embed.add_argument(
        "--cluster",
        metavar="local[:N]|tcp://HOST:PORT",
        help=(
            "embed on a Dask cluster: a local one with N worker processes, or an existing "
            "scheduler; finished chunks are kept in OUT.chunks/ and reused on a rerun"
        ),
    )
    embed.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=64,
        metavar="N",
        help="image files per cluster task (default 64)",
    )
    embed.add_argument(
        "--out",
        required=True,
        type=Path,
        help="project file (.h5ad); an existing project is added to",
    )
    _add_project_options(embed, write=True)
    embed.set_defaults(func=cmd_embed)

    evaluate = sub.add_parser(
        "eval",
        help="score a kNN or linear probe on the labelled cells (DinoBloom protocol)",
        description=(
            "DinoBloom's protocol on raw embeddings: kNN k=20 and k=1 (uniform, Euclidean) "
            "or logistic regression (lbfgs, C = dim * n_classes / 100, max_iter 1000); "
            "5-fold stratified CV without shuffle, or leave-one-batch-out; accuracy, "
            "balanced accuracy, weighted F1 averaged over folds."
        ),
    )
    evaluate.add_argument("project", type=Path, metavar="PROJECT.h5ad")
    evaluate.add_argument("--probe", choices=("knn", "linear"), default="knn")
    evaluate.add_argument("--split", choices=("cv", "batch"), default="cv")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    _add_project_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    batch = sub.add_parser(
        "batch",
        help="batch-effect metrics (iLISI, kBET, PCR, ASW, ...) of a project's embeddings",
        description=(
            "Batch-effect metrics of the embeddings, computed within each cell type "
            "(the curated label, else the prediction) and averaged over the types found "
            "in >= 2 batches: iLISI, kBET acceptance, PCR-batch, batch ASW, graph "
            "connectivity; cell-type ASW, NMI, ARI; leave-one-batch-out kNN and linear "
            "probe accuracy. --correct reports on a corrected copy; the project is not "
            "changed. See docs/batch.md."
        ),
    )
    batch.add_argument("project", type=Path, metavar="PROJECT.h5ad")
    batch.add_argument("--json", action="store_true", help="print one JSON object")
    batch.add_argument(
        "--label-column",
        default="label",
        metavar="COLUMN",
        help="obs column of the cell types (default: label, else prediction)",
    )
    batch.add_argument(
        "--correct",
        choices=("none", "centre", "combat", "harmony"),
        default="none",
        help="report after this correction, with the uncorrected values beside (default none)",
    )
    batch.add_argument(
        "--by",
        default=None,
        metavar="slide|batch|COLUMN",
        help=(
            "the groups compared: batch (lab, scanner), slide (one smear / patient; "
            "falls back to batch where the project has no slides) or any column; "
            "default batch, or slide when the project holds one batch of several smears"
        ),
    )
    batch.add_argument("--seed", type=_seed, default=0, help="seed of subsamples and k-means")
    _add_project_options(batch)
    batch.set_defaults(func=cmd_batch)

    umap = sub.add_parser(
        "umap",
        help="add a 2-D UMAP of the embeddings to a project",
        description="PCA to 50 components, then a seeded UMAP; stored in obsm['X_umap'].",
    )
    umap.add_argument("project", type=Path, metavar="PROJECT.h5ad")
    umap.add_argument("--seed", type=_seed, default=0)
    umap.add_argument("--force", action="store_true", help="recompute even if cached")
    _add_project_options(umap, write=True)
    umap.set_defaults(func=cmd_umap)

    report = sub.add_parser(
        "report",
        help="differential counts per smear, batch or slide (CSV, JSON summary, HTML)",
        description=(
            "Count each class per group (--by any cell-table column: source, batch, "
            "slide, ...). A cell counts as its curated label, else its prediction when "
            "confident and typical of the labelled cells, else 'Unidentified'; 'Not "
            "classed' cells are left out. White-cell (and Unidentified) percents sum to "
            "100; non-white classes (NRBC, platelets, smudge cells, artefacts) are given "
            "per 100 white cells. CSV columns: group, label, kind, count, percent."
        ),
    )
    report.add_argument("project", type=Path, metavar="PROJECT.h5ad")
    report.add_argument(
        "--by",
        default="slide",  # napari_hemofm.core.report.DEFAULT_GROUP_BY (not imported here)
        metavar="COLUMN",
        help=(
            "cell-table column that makes the groups (default slide: one smear for "
            "detected cells, the batch for a folder of crops)"
        ),
    )
    report.add_argument("--out", type=Path, default=None, metavar="COUNTS.csv")
    report.add_argument(
        "--json", action="store_true", help="print the per-group summary as one JSON object"
    )
    report.add_argument(
        "--html",
        type=Path,
        default=None,
        metavar="REPORT.html",
        help="write the printable report (one self-contained HTML file)",
    )
    report.add_argument(
        "--threshold",
        type=_probability,
        default=None,
        help="predictions below this confidence count as Unidentified "
        "(default: the threshold saved with the project, else 0.5)",
    )
    report.add_argument(
        "--target",
        type=_positive_int,
        default=100,
        help="white cells to count per group (default 100)",
    )
    predict = report.add_mutually_exclusive_group()
    predict.add_argument(
        "--predict",
        choices=("knn", "linear"),
        help="first predict unlabelled cells with a probe trained on the labelled ones",
    )
    predict.add_argument(
        "--probe-file",
        type=Path,
        metavar="PROBE.npz",
        help="first predict every cell with a probe saved from another project",
    )
    _add_project_options(report)
    report.set_defaults(func=cmd_report)

    audit = sub.add_parser(
        "audit",
        help="print who changed which label when, and every sign-off",
        description=(
            "The audit trail of a project: every label change (time, user, cell, old -> "
            "new label) saved in the project or waiting in its label journal, and every "
            "sign-off and verification."
        ),
    )
    audit.add_argument("project", type=Path, metavar="PROJECT.h5ad")
    audit.add_argument("--cell", metavar="CELL_ID", help="only the history of this cell")
    audit.add_argument("--out", type=Path, default=None, metavar="AUDIT.csv", help="write CSV")
    _add_project_options(audit)
    audit.set_defaults(func=cmd_audit)

    sample = sub.add_parser(
        "sample",
        help="write the synthetic sample smears (three batches) to a folder",
        description=(
            "Write seeded synthetic Wright-Giemsa smears in three batches to "
            "OUT_DIR/<batch>/, with their WBC boxes and classes in OUT_DIR/ground_truth.csv."
        ),
    )
    sample.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    sample.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    sample.add_argument(
        "--per-batch", type=_positive_int, default=2, help="smears per batch (default 2)"
    )
    sample.set_defaults(func=cmd_sample)

    demo = sub.add_parser(
        "demo",
        help="open napari with the synthetic sample embedded and the cell map",
        description=(
            "Open napari with the synthetic sample smears (three batches), dock the "
            "Embed cells panel and the Cell map, embed the cells with the offline "
            "handcrafted backend and show the map."
        ),
    )
    demo.add_argument(
        "--screenshot",
        type=Path,
        metavar="PNG",
        help="save a screenshot of the window once the map is drawn, then exit",
    )
    # testing: build everything, wait for the work, close, exit (no event loop)
    demo.add_argument("--no-run", action="store_true", help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hemofm`` command; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_outputs(args)  # before any work: --out never destroys an input
        return int(args.func(args))
    except CommandError as exc:
        print(f"hemofm: error: {exc}", file=sys.stderr)
        return 1
    except OutputCheckError as exc:
        print(f"hemofm {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        # e.g. the output folder is read-only or the disk is full
        print(f"hemofm: error: {exc}", file=sys.stderr)
        return 1
    except _project_errors() as exc:  # another process has the project (lock, newer save)
        print(f"hemofm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hemofm: interrupted", file=sys.stderr)
        return 130
    finally:
        _close_opened()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

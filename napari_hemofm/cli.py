"""The ``hemofm`` command line: the headless core's work without a screen.

Exit codes (DESIGN.md): 0 when the work was done, also when some input files were
skipped (one warning names every skipped file); 1 when nothing could be done (one
clear line says why, no traceback); 2 for usage errors (argparse).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from napari_hemofm import __version__

DETECT_CSV_COLUMNS = ["image", "cell_id", "x", "y", "x0", "y0", "x1", "y1", "score"]
"""Columns of ``hemofm detect --out`` (contract)."""


class CommandError(Exception):
    """Nothing could be done: printed as one line, exit code 1."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
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
        return collect_cells(scan, pixel_size_um=args.pixel_size, progress=progress)
    except ValueError as exc:  # two inputs give the same cell id
        raise CommandError(str(exc)) from None
    finally:
        close()


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


def cmd_embed(args: argparse.Namespace) -> int:
    """Find the cells behind the inputs, embed them, and write a project file."""
    from napari_hemofm.core.cells import CellTable
    from napari_hemofm.core.embed import embed_table
    from napari_hemofm.core.io import format_skipped
    from napari_hemofm.core.models import WeightsError, load_backbone

    scan = _scan(args)
    if args.cluster:
        return _embed_on_cluster(args, scan)
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
    found = _collect(scan, args, "find cells")
    if found.cells.empty:
        if found.skipped:
            _warn(format_skipped(found.skipped))
        raise CommandError("no cells found in the inputs: nothing to embed")
    table = CellTable()
    table.update_meta(pixel_size_um=args.pixel_size)
    table.add_cells(found.cells)
    progress, close = _progress_bar(f"embed ({args.model})", "cell")
    try:
        result = embed_table(table, backbone, batch_size=args.batch_size, progress=progress)
    finally:
        close()
    skipped = [*found.skipped, *result.skipped]
    if skipped:
        _warn(format_skipped(skipped))
    n_done = int(result.done.sum())
    if n_done == 0:
        raise CommandError("no cell could be embedded (see the warning above)")
    path = table.save(args.out)
    print(
        f"{n_done} of {table.n_cells} cell(s) embedded with {args.model} "
        f"(dim {backbone.dim}), {len(table.batches)} batch(es) -> {path}",
        file=sys.stderr,
    )
    return 0


def _embed_on_cluster(args: argparse.Namespace, scan) -> int:
    """`hemofm embed --cluster`: chunks on Dask workers, merged into the same project."""
    from napari_hemofm.core.cluster import EmbedJob, embed_on_cluster, parse_cluster
    from napari_hemofm.core.io import format_skipped
    from napari_hemofm.core.models import WeightsError, get_spec, resolve_weights

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


def _load_project(path: Path):
    from napari_hemofm.core.io import load_project

    try:
        return load_project(path)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a kNN or linear probe on the labelled cells (DinoBloom protocol)."""
    import json

    from napari_hemofm.core.classify import evaluate_probe

    table = _load_project(args.project)
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

    from napari_hemofm.core.batch import table_batch_report

    table = _load_project(args.project)
    if table.embeddings is None:
        raise CommandError(f"{args.project}: no embeddings; run `hemofm embed` first")
    correction = None if args.correct == "none" else args.correct
    what = f" after {correction}" if correction else ""
    print(
        f"batch metrics of {table.n_cells} cells in {len(table.batches)} batch(es){what} ...",
        file=sys.stderr,
    )
    try:
        report = table_batch_report(
            table, label_column=args.label_column, correction=correction, seed=args.seed
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
    print(f"{report['n_cells']} cells ({labelled} with a cell type), batches: {batches}")
    if report["n_not_embedded"]:
        print(f"{report['n_not_embedded']} cell(s) without embedding left out")
    print(
        f"mixing metrics over the {len(report['mixing_labels'])} cell type(s) found in >= 2 "
        f"batches: {', '.join(report['mixing_labels']) or 'none'}"
    )
    if report["excluded_labels"]:
        left = ", ".join(f"{k} ({v})" for k, v in report["excluded_labels"].items())
        print(f"left out of the mixing averages: {left}")
    if report["correction"]:
        print(f"after {report['correction']} (a preview: the project is not changed)")

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

    table = _load_project(args.project)
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
    """Write differential counts per source image or batch as a long CSV."""
    from napari_hemofm.core.io import write_csv
    from napari_hemofm.core.report import differential_counts, differential_summary

    table = _load_project(args.project)
    if table.n_cells == 0:
        raise CommandError(f"{args.project}: the project holds no cells")
    if args.probe_file is not None:
        from napari_hemofm.core.classify import LiveProbe

        if table.embeddings is None:
            raise CommandError(f"{args.project}: no embeddings to apply {args.probe_file} to")
        try:
            probe = LiveProbe.load(args.probe_file)
            pred, conf = probe.apply(table.embeddings)
        except (OSError, ValueError) as exc:
            raise CommandError(f"{args.probe_file}: {exc}") from None
        table.set_predictions(None, pred, conf)
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
    counts = differential_counts(table, args.by, threshold=args.threshold)
    write_csv(counts, args.out)
    summary = differential_summary(table, args.by, threshold=args.threshold, target=args.target)
    for group, row in summary.iterrows():
        state = (
            "signed off by " + row["signed_off_by"]
            if row["signed_off_by"]
            else (
                "ready to sign off"
                if row["can_sign_off"]
                else f"{row['n_unidentified']} unidentified"
            )
        )
        print(
            f"{group}: {row['n_counted']} / {row['target']} cells counted "
            f"({row['n_not_classed']} not classed), {state}",
            file=sys.stderr,
        )
    print(f"{len(counts)} rows ({len(summary)} {args.by} groups) -> {args.out}", file=sys.stderr)
    return 0


DEMO_TIMEOUT_S = 600.0
"""How long ``hemofm demo --no-run`` / ``--screenshot`` waits for the embedding and map."""


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Run the Qt event loop until ``condition()`` holds; False on timeout."""
    import time

    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        app.processEvents()
        time.sleep(0.02)
    return True


def run_demo(
    *,
    run: bool = True,
    screenshot: str | Path | None = None,
    close: bool = True,
    timeout: float = DEMO_TIMEOUT_S,
):
    """Open napari with the synthetic sample, embed it offline and show the cell map.

    Parameters
    ----------
    run : bool
        Enter napari's event loop (``napari.run()``) and return when the window closes.
        False: wait until the embedding and the map are done, then return.
    screenshot : str or Path, optional
        With ``run=False``: save a screenshot of the whole window there.
    close : bool
        With ``run=False``: close the viewer before returning.
    timeout : float
        With ``run=False``: seconds to wait for the embedding and the map.

    Returns
    -------
    napari.Viewer
        The demo's viewer (closed when ``close`` and ``run=False``).

    Raises
    ------
    CommandError
        When napari or a Qt binding is missing, or the work did not finish in time.
    """
    try:
        import napari
    except ImportError as exc:  # pragma: no cover - napari is a dependency
        raise CommandError(f"napari is not installed ({exc})") from None
    try:
        viewer = napari.Viewer(title="HemoFM demo", show=run or screenshot is not None)
    except Exception as exc:
        raise CommandError(
            f"napari could not open a window ({type(exc).__name__}: {exc}); install a Qt "
            "binding (pip install 'napari-hemofm[qt]') and run it on a display"
        ) from None
    viewer.window.resize(1600, 1000)  # room for the image beside the two panels
    viewer.open_sample("napari-hemofm", "synthetic_smears")
    _, embed = viewer.window.add_plugin_dock_widget("napari-hemofm", "Embed cells")
    # the Review shares the Embed panel's place (a tab), raised once the cells are in
    review_dock, _ = viewer.window.add_plugin_dock_widget("napari-hemofm", "Review", tabify=True)
    _, cell_map = viewer.window.add_plugin_dock_widget("napari-hemofm", "Cell map")
    cell_map.set_color_by("batch")  # nothing is labelled yet: show the three labs
    embed.model_combo.setCurrentText("handcrafted")
    seeded = _seed_when_embedded(viewer, embed, review_dock)
    embed.run()
    if run:
        napari.run()
        return viewer

    from napari_hemofm._widgets._review_state import get_retrainer

    retrainer = get_retrainer(viewer)

    def settled() -> bool:
        return (
            not embed.running
            and not getattr(cell_map, "is_computing", False)
            and seeded()
            and not retrainer.busy
        )

    done = _wait_until(settled, timeout)
    status = embed.status
    try:
        if not done:
            raise CommandError(f"the demo did not finish within {timeout:.0f} s")
        if screenshot is not None:
            _wait_until(lambda: False, 0.5)  # let the canvas draw the last frame
            viewer.screenshot(str(screenshot), canvas_only=False)
    finally:
        if close:
            viewer.close()
    print(f"demo: {status}", file=sys.stderr)
    return viewer


def seed_demo_labels(viewer) -> dict[str, str]:
    """Label one cell per class from the synthetic smears' ground truth (origin "imported").

    The demo's smears come with the class of every WBC they hold
    (``layer.metadata["ground_truth"]``); one detected cell per class gets that label so
    the probe has something to learn from and the Review gallery shows predictions.

    Returns
    -------
    dict of str to str
        Class name -> cell id of the labelled cell.
    """
    import numpy as np

    from napari_hemofm._widgets._layers import source_key
    from napari_hemofm._widgets._session import get_session

    table = get_session(viewer).table
    obs = table.obs
    sources = obs["source"].astype(str).to_numpy()
    chosen: dict[str, str] = {}
    for layer in viewer.layers:
        truth = getattr(layer, "metadata", {}).get("ground_truth")
        if truth is None or not len(truth):
            continue
        for row in np.flatnonzero(sources == source_key(layer)):
            x, y = float(obs["x"].iat[row]), float(obs["y"].iat[row])
            inside = truth[
                (truth["x0"] <= x) & (x <= truth["x1"]) & (truth["y0"] <= y) & (y <= truth["y1"])
            ]
            if len(inside):
                chosen.setdefault(str(inside["label"].iat[0]), str(table.cell_ids[row]))
    if chosen:
        table.set_labels(list(chosen.values()), list(chosen), origin="imported")
    return chosen


def _seed_when_embedded(viewer, embed, review_dock=None) -> Callable[[], bool]:
    """Seed the demo's labels once the Embed panel is done; returns ``done()``."""
    from qtpy.QtCore import QTimer

    state = {"done": False}
    timer = QTimer(embed)
    timer.setInterval(300)

    def check() -> None:
        from napari_hemofm._widgets._session import get_session

        table = get_session(viewer).table
        if embed.running or table.n_cells == 0 or table.embeddings is None:
            return
        timer.stop()
        seed_demo_labels(viewer)
        if review_dock is not None:
            review_dock.raise_()
        state["done"] = True

    timer.timeout.connect(check)
    timer.start()
    return lambda: state["done"]


def cmd_demo(args: argparse.Namespace) -> int:
    """Open napari with the synthetic sample, the Embed panel and the Cell map."""
    run = not (args.no_run or args.screenshot is not None)
    run_demo(run=run, screenshot=args.screenshot)
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
    embed.add_argument("--batch", help="batch name for all inputs (default: folder name)")
    embed.add_argument(
        "--batch-size", type=_positive_int, default=32, metavar="N", help="default 32"
    )
    embed.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
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
    embed.add_argument("--out", required=True, type=Path, help="project file (.h5ad)")
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
    batch.add_argument("--seed", type=int, default=0, help="seed of subsamples and k-means")
    batch.set_defaults(func=cmd_batch)

    umap = sub.add_parser(
        "umap",
        help="add a 2-D UMAP of the embeddings to a project",
        description="PCA to 50 components, then a seeded UMAP; stored in obsm['X_umap'].",
    )
    umap.add_argument("project", type=Path, metavar="PROJECT.h5ad")
    umap.add_argument("--seed", type=int, default=0)
    umap.add_argument("--force", action="store_true", help="recompute even if cached")
    umap.set_defaults(func=cmd_umap)

    report = sub.add_parser(
        "report",
        help="differential counts per source image or batch (long CSV)",
        description=(
            "Count each class per smear (--by source) or per batch. A cell counts as its "
            "curated label, else its prediction (when its confidence reaches the "
            "Unidentified threshold), else 'Unidentified'; 'Not classed' cells are left "
            "out. CSV columns: group, label, count, percent."
        ),
    )
    report.add_argument("project", type=Path, metavar="PROJECT.h5ad")
    report.add_argument("--by", choices=("source", "batch"), default="source")
    report.add_argument("--out", type=Path, required=True, metavar="COUNTS.csv")
    report.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="predictions below this confidence count as Unidentified "
        "(default: the threshold saved with the project, else 0)",
    )
    report.add_argument(
        "--target", type=int, default=100, help="cells to count per group (default 100)"
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
    report.set_defaults(func=cmd_report)

    sample = sub.add_parser(
        "sample",
        help="write the synthetic sample smears (three batches) to a folder",
        description=(
            "Write seeded synthetic Wright-Giemsa smears in three batches to "
            "OUT_DIR/<batch>/, with their WBC boxes and classes in OUT_DIR/ground_truth.csv."
        ),
    )
    sample.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sample.add_argument("--per-batch", type=int, default=2, help="smears per batch (default 2)")
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
        return int(args.func(args))
    except CommandError as exc:
        print(f"hemofm: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # e.g. the output folder is read-only or the disk is full
        print(f"hemofm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hemofm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

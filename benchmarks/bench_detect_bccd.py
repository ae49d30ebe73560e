"""Detection figures on the BCCD smears: recall, precision and F1 of `detect_wbcs`.

A detection matches a WBC box when its centre lies inside the box, one to one (maximum
bipartite matching); recall = matched boxes / boxes, precision = matched detections /
detections, pooled over images. Prints one table (all images, and the two halves of a fixed
split by image number: ``tune`` = number % 3 != 2, ``check`` = number % 3 == 2) and, with
``--failures``, every image where detections and boxes disagree; ``--synthetic`` adds a table
on seeded synthetic smears under batch effects.

Usage::

    python benchmarks/bench_detect_bccd.py [--data ../shared/data/bccd] [--jobs 2]
        [--failures] [--overlays DIR] [--zoom 0.5] [--synthetic]
        [--look original|tinted|yellowed|blurred]

``--look`` applies one of another lab's simulated looks (``labs.py``: another stain batch,
a yellow lamp, defocus) to every smear before detection.
"""

from __future__ import annotations

import argparse
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from napari_hemofm.core.detect import detect_wbcs, estimate_rbc_diameter, match_detections

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"


def wbc_boxes(xml_path: Path) -> np.ndarray:
    """WBC boxes (x0, y0, x1, y1), inclusive, of one Pascal VOC annotation: (m, 4)."""
    out = []
    for obj in ET.parse(xml_path).getroot().iter("object"):
        if obj.findtext("name", "").strip() != "WBC":
            continue
        bb = obj.find("bndbox")
        out.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
    return np.asarray(out, dtype=float).reshape(-1, 4)


def split_of(name: str) -> str:
    """``check`` for a third of the images (number % 3 == 2), else ``tune``."""
    return "check" if int(name.rsplit("_", 1)[-1]) % 3 == 2 else "tune"


# labs.TRANSFORMS' looks, but "120px" (a whole smear shrunk to a crop's size)
LOOKS = ("original", "tinted", "yellowed", "blurred")


def apply_look(image: np.ndarray, look: str) -> np.ndarray:
    """``image`` as another lab would show it (:data:`labs.TRANSFORMS`)."""
    from labs import TRANSFORMS

    return TRANSFORMS[look](image)


def run_one(args: tuple[Path, Path, float, float, str]) -> dict:
    jpg, xml, zoom, rbc_factor, look = args
    pil = Image.open(jpg).convert("RGB")
    if zoom != 1.0:
        size = (round(pil.width * zoom), round(pil.height * zoom))
        pil = pil.resize(size, Image.Resampling.LANCZOS)
    image = apply_look(np.asarray(pil), look)
    t0 = time.perf_counter()
    if rbc_factor == 1.0:
        cells = detect_wbcs(image)
        rbc = float("nan")
    else:
        # Simulate an error of the scale estimate: detect at a wrong RBC diameter.
        rbc = estimate_rbc_diameter(image) * rbc_factor
        cells = detect_wbcs(image, pixel_size_um=7.5 / rbc)
    seconds = time.perf_counter() - t0
    if rbc_factor == 1.0:
        rbc = estimate_rbc_diameter(image)
    boxes = wbc_boxes(xml) * zoom
    centres = cells[["x", "y"]].to_numpy()
    return {
        "name": jpg.stem,
        "boxes": boxes,
        "centres": centres,
        "crops": cells[["x0", "y0", "x1", "y1"]].to_numpy(),
        "matched": match_detections(centres, boxes),
        "seconds": seconds,
        "zoom": zoom,
        "look": look,
        "rbc": rbc,
    }


def figures(results: list[dict]) -> dict:
    nb = sum(len(r["boxes"]) for r in results)
    nd = sum(len(r["centres"]) for r in results)
    m = sum(r["matched"] for r in results)
    recall = m / nb if nb else float("nan")
    precision = m / nd if nd else float("nan")
    f1 = 2 * recall * precision / (recall + precision) if m else 0.0
    sec = np.array([r["seconds"] for r in results])
    return {
        "images": len(results),
        "boxes": nb,
        "detections": nd,
        "matched": m,
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "ms_per_image": 1000 * sec.mean(),
    }


def overlay(result: dict, data: Path, out: Path) -> None:
    image = Image.open(data / "JPEGImages" / f"{result['name']}.jpg").convert("RGB")
    if result["zoom"] != 1.0:
        size = (round(image.width * result["zoom"]), round(image.height * result["zoom"]))
        image = image.resize(size, Image.Resampling.LANCZOS)
    image = Image.fromarray(apply_look(np.asarray(image), result["look"]))
    draw = ImageDraw.Draw(image)
    for x0, y0, x1, y1 in result["boxes"]:
        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 255), width=3)
    for (x, y), (x0, y0, x1, y1) in zip(result["centres"], result["crops"], strict=True):
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 160, 0), width=1)
        draw.ellipse([x - 6, y - 6, x + 6, y + 6], fill=(0, 200, 0))
    draw.text((4, 4), result["name"], fill=(0, 0, 0))
    image.save(out / f"{result['name']}.png")


def synthetic_table(seeds: int = 3) -> None:
    """Recall / precision on synthetic smears under batch effects and RBC densities."""
    from napari_hemofm.core.synthetic import DEFAULT_BATCHES, BatchEffect, make_smear

    effects = dict(DEFAULT_BATCHES)
    effects.update(
        {
            "zoom 0.6": BatchEffect(scale=0.6),
            "zoom 2": BatchEffect(scale=2.0),
            "hue +20": BatchEffect(hue_shift_deg=20.0),
            "hue -20": BatchEffect(hue_shift_deg=-20.0),
            "sat 0.6": BatchEffect(saturation=0.6),
            "sat 1.5": BatchEffect(saturation=1.5),
            "blur 2": BatchEffect(blur_sigma=2.0),
            "noise 5": BatchEffect(noise=5.0),
            "dim+uneven": BatchEffect(brightness=0.7, illumination_gradient=0.5),
        }
    )
    print(f"\nsynthetic smears (768 x 1024, 8 WBCs, seeds 0-{seeds - 1}), per RBC density")
    print(
        f"{'batch effect':<12} {'density':>7} {'cells':>6} {'dets':>5} {'matched':>7} {'D err':>6}"
    )
    totals = np.zeros(3, dtype=int)
    for name, effect in effects.items():
        for density in (0.3, 0.5, 0.8):
            nb = nd = m = 0
            errs = []
            for seed in range(seeds):
                smear = make_smear(seed, batch_effect=effect, rbc_density=density, n_wbc=8)
                cells = detect_wbcs(smear.image)
                boxes = smear.cells[["x0", "y0", "x1", "y1"]].to_numpy(float)
                nb, nd = nb + len(boxes), nd + len(cells)
                m += match_detections(cells[["x", "y"]].to_numpy(), boxes)
                est = estimate_rbc_diameter(smear.image)
                errs.append(abs(est * smear.pixel_size_um / 7.5 - 1.0))
            totals += (nb, nd, m)
            print(f"{name:<12} {density:>7} {nb:>6} {nd:>5} {m:>7} {max(errs):>6.1%}")
    nb, nd, m = totals
    print(f"total: recall {m / nb:.3f}, precision {m / nd:.3f} ({nb} cells, {nd} detections)")
    print("D err: largest relative error of the estimated RBC diameter over the seeds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--failures", action="store_true")
    parser.add_argument("--overlays", type=Path, default=None)
    parser.add_argument(
        "--zoom", type=float, default=1.0, help="resize the images (and boxes) by this factor"
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="also print figures on synthetic smears"
    )
    parser.add_argument(
        "--rbc-factor",
        type=float,
        default=1.0,
        help="detect with the estimated RBC diameter times this (robustness to scale errors)",
    )
    parser.add_argument(
        "--look", choices=LOOKS, default="original", help="another lab's simulated look"
    )
    args = parser.parse_args()
    jpgs = sorted((args.data / "JPEGImages").glob("*.jpg"))
    work = [
        (j, args.data / "Annotations" / f"{j.stem}.xml", args.zoom, args.rbc_factor, args.look)
        for j in jpgs
    ]
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(run_one, work, chunksize=8))
    else:
        results = [run_one(w) for w in work]
    wall = time.perf_counter() - t0
    rows = {
        "all": results,
        "tune": [r for r in results if split_of(r["name"]) == "tune"],
        "check": [r for r in results if split_of(r["name"]) == "check"],
    }
    head = f"{'set':<6} {'images':>6} {'boxes':>6} {'dets':>6} {'matched':>7} "
    print(head + f"{'recall':>7} {'precis.':>7} {'F1':>6} {'ms/img':>7}")
    for key, res in rows.items():
        f = figures(res)
        print(
            f"{key:<6} {f['images']:>6} {f['boxes']:>6} {f['detections']:>6} {f['matched']:>7} "
            f"{f['recall']:>7.3f} {f['precision']:>7.3f} {f['f1']:>6.3f} {f['ms_per_image']:>7.1f}"
        )
    print(
        f"wall time {wall:.1f} s with {args.jobs} job(s), zoom {args.zoom:g}, "
        f"RBC diameter factor {args.rbc_factor:g}, look {args.look}"
    )
    rbc = np.array([r["rbc"] for r in results])
    q = np.percentile(rbc, [0, 1, 5, 50, 95, 99, 100])
    print(
        "estimated RBC diameter, px: median {3:.1f}; min, 1, 5, 95, 99 %, max = "
        "{0:.1f}, {1:.1f}, {2:.1f}, {4:.1f}, {5:.1f}, {6:.1f}".format(*q)
    )
    bad = [
        r for r in results if r["matched"] < len(r["boxes"]) or r["matched"] < len(r["centres"])
    ]
    if args.failures:
        for r in bad:
            print(
                f"  {r['name']} ({split_of(r['name'])}): boxes {len(r['boxes'])}, "
                f"detections {len(r['centres'])}, matched {r['matched']}"
            )
    if args.overlays is not None:
        args.overlays.mkdir(parents=True, exist_ok=True)
        for r in bad:
            overlay(r, args.data, args.overlays)
    if args.synthetic:
        synthetic_table()


if __name__ == "__main__":
    main()

"""Embedding throughput: bare model forward vs the whole pipeline from files, and peak RSS.

Prints, from one run (so the ratio is fair even on a noisy machine):

- images/s of the bare forward of a backbone on ready (prepared) tensors;
- images/s of the whole pipeline (`embed_cells`: decode JPEG from disk, crop,
  squash-resize, normalise in the prefetch threads, forward in batches);
- their ratio (goal for dinobloom-s: >= 0.9);
- peak RSS of a separate process embedding N crops (default 10,000) with the pipeline.

DinoBloom weights are random (written in the timm safetensors layout to a temp dir):
speed does not depend on the values. Crops are synthetic 360x360 JPEGs, like PBC's
CellaVision crops.

Usage::

    python benchmarks/bench_embed.py                       # dinobloom-s, 256 crops, RSS at 10k
    python benchmarks/bench_embed.py --model handcrafted --n 1000
    python benchmarks/bench_embed.py --precision bf16 --rss-n 0   # skip the RSS run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_crops(folder: Path, n: int, size: int = 360, seed: int = 0) -> list[Path]:
    """n synthetic single-cell JPEG crops (a few distinct drawings, re-encoded per file)."""
    from PIL import Image

    from napari_hemofm.core.synthetic import WBC_CLASSES, make_crop

    folder.mkdir(parents=True, exist_ok=True)
    bases = [make_crop(seed + k, WBC_CLASSES[k % 5], size=size) for k in range(10)]
    paths = []
    for k in range(n):
        path = folder / f"crop_{k:06d}.jpg"
        if not path.exists():
            img = np.roll(bases[k % len(bases)], k % 7, axis=1)
            Image.fromarray(img).save(path, quality=90)
        paths.append(path)
    return paths


def random_weights(model: str, folder: Path) -> Path | None:
    """A timm-layout model.safetensors with random weights for a DinoBloom size."""
    if model == "handcrafted":
        return None
    from safetensors.torch import save_file

    from napari_hemofm.core.models import build_model, get_spec

    path = folder / model / "ls1" / "model.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        net = build_model(get_spec(model))
        state = net.state_dict()
        for key, value in state.items():
            if key.endswith(".gamma"):
                # timm initialises LayerScale at 1e-5, which makes a random ViT almost an
                # identity; DINOv2's hub init is 1.0, closer to a trained network's scale
                value.fill_(1.0)
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def cell_frame(paths: list[Path], size: int):
    import pandas as pd

    return pd.DataFrame(
        {"source": [str(p) for p in paths], "x0": 0, "y0": 0, "x1": size, "y1": size}
    )


def peak_rss_run(args: argparse.Namespace, crops: list[Path], weights: Path | None) -> dict:
    """Embed len(crops) files in a fresh process; report its peak RSS and throughput."""
    listing = args.workdir / f"rss_paths_{len(crops)}.json"
    listing.write_text(json.dumps([str(p) for p in crops]))
    code = f"""
import json, resource, sys, time
import pandas as pd
from napari_hemofm.core.embed import embed_cells
from napari_hemofm.core.models import load_backbone
paths = json.loads(open({str(listing)!r}).read())
frame = pd.DataFrame({{"source": paths, "x0": 0, "y0": 0, "x1": {args.size}, "y1": {args.size}}})
bb = load_backbone({args.model!r}, weights={None if weights is None else str(weights)!r},
                   precision={args.precision!r})
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
res = embed_cells(frame, bb, batch_size={args.batch_size})
dt = time.perf_counter() - t
print(json.dumps({{"n": len(paths), "seconds": dt, "done": int(res.done.sum()),
                  "rss_before_mb": rss0 / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dinobloom-s")
    parser.add_argument("--n", type=int, default=256, help="crops for the throughput runs")
    parser.add_argument("--rss-n", type=int, default=10_000, help="crops for the RSS run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=360)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hemofm-bench"
    )
    args = parser.parse_args()

    import torch

    from napari_hemofm.core.embed import embed_cells
    from napari_hemofm.core.models import load_backbone

    crops = write_crops(args.workdir / "crops", max(args.n, args.rss_n), size=args.size)
    weights = random_weights(args.model, args.workdir / "weights")
    backbone = load_backbone(args.model, weights=weights, precision=args.precision)
    frame = cell_frame(crops[: args.n], args.size)

    # ready tensors: prepared once, outside the timing
    from PIL import Image

    ready = np.stack(
        [backbone.prepare(np.asarray(Image.open(p).convert("RGB"))) for p in crops[: args.n]]
    )
    backbone.forward(ready[: args.batch_size])  # warm-up (allocations, first-call paths)

    forward_s, pipeline_s = [], []
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both
        t = time.perf_counter()
        for start in range(0, args.n, args.batch_size):
            backbone.forward(ready[start : start + args.batch_size])
        forward_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        result = embed_cells(frame, backbone, batch_size=args.batch_size)
        pipeline_s.append(time.perf_counter() - t)
        assert result.done.all()
    fwd = args.n / np.median(forward_s)
    pipe = args.n / np.median(pipeline_s)

    rss = peak_rss_run(args, crops[: args.rss_n], weights) if args.rss_n else None
    print(
        f"\nmodel {args.model} ({args.precision}), batch {args.batch_size}, {args.n} crops "
        f"{args.size}x{args.size} JPEG, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'measure':<44} {'value':>12}")
    print(f"{'bare forward on ready tensors (img/s)':<44} {fwd:>12.2f}")
    print(f"{'pipeline, files on disk -> embeddings (img/s)':<44} {pipe:>12.2f}")
    print(f"{'ratio pipeline / forward':<44} {pipe / fwd:>12.3f}")
    if rss:
        print(f"{'peak RSS, ' + str(rss['n']) + ' crops (MB)':<44} {rss['peak_rss_mb']:>12.0f}")
        print(f"{'  RSS after loading the model (MB)':<44} {rss['rss_before_mb']:>12.0f}")
        print(f"{'  throughput of that run (img/s)':<44} {rss['n'] / rss['seconds']:>12.2f}")
    print(
        f"{'this process peak RSS (MB)':<44} "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:>12.0f}"
    )


if __name__ == "__main__":
    main()

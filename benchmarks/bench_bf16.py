"""How far bf16 autocast moves DinoBloom embeddings, and whether kNN accuracy changes.

Embeds the real crops of ../shared/data/pbc_dev (800 cells, 8 classes) with a DinoBloom
backbone twice, in fp32 and under bf16 autocast, and prints one table: throughput of
each, the per-cell cosine similarity and relative L2 difference between the two
embeddings (median and worst), how often a cell's 20 nearest neighbours change, and
kNN k=20 / k=1 balanced accuracy (DinoBloom protocol, 5-fold CV) for both.

Without real weights (they cannot be downloaded here) the backbone has random weights
written in the timm safetensors layout: the numerical effect of bf16 on the forward
pass is what is measured; the accuracies are those of a random ViT, not of DinoBloom.
Pass --weights to measure the real model.

Usage::

    python benchmarks/bench_bf16.py [--model dinobloom-s] [--weights PATH] [--n 800]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_embed import random_weights

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pbc_dev"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dinobloom-s")
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--n", type=int, default=800, help="crops (stratified subset)")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no data at {args.data}")

    from sklearn.neighbors import NearestNeighbors

    from napari_hemofm.core.embed import embed_cells
    from napari_hemofm.core.evaluation import evaluate_probe
    from napari_hemofm.core.inputs import collect_cells
    from napari_hemofm.core.models import load_backbone

    cells = collect_cells([args.data]).cells
    if args.n < len(cells):
        cells = cells.groupby("label", group_keys=False).head(args.n // cells["label"].nunique())
    weights = args.weights or random_weights(
        args.model, Path(tempfile.gettempdir()) / "hemofm-bench" / "weights"
    )
    labels = cells["label"].to_numpy(dtype=object)
    rows, emb = {}, {}
    for precision in ("fp32", "bf16"):
        bb = load_backbone(args.model, weights=weights, precision=precision)
        t = time.perf_counter()
        emb[precision] = embed_cells(cells, bb, batch_size=32).embeddings
        rate = len(cells) / (time.perf_counter() - t)
        res = evaluate_probe(emb[precision], labels, probe="knn")["results"]
        rows[precision] = (
            rate,
            res["knn_k20"]["balanced_accuracy"],
            res["knn_k1"]["balanced_accuracy"],
        )
    a, b = emb["fp32"], emb["bf16"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    nn_a = NearestNeighbors(n_neighbors=21).fit(a).kneighbors(a, return_distance=False)[:, 1:]
    nn_b = NearestNeighbors(n_neighbors=21).fit(b).kneighbors(b, return_distance=False)[:, 1:]
    overlap = np.mean([len(set(x) & set(y)) / 20 for x, y in zip(nn_a, nn_b, strict=True)])

    what = "real weights" if args.weights else "random weights (numerics only)"
    print(f"\n{args.model}, {what}, {len(cells)} pbc_dev crops, batch 32")
    print(f"{'measure':<46} {'fp32':>9} {'bf16':>9}")
    print(
        f"{'throughput, files -> embeddings (img/s)':<46} {rows['fp32'][0]:>9.2f} "
        f"{rows['bf16'][0]:>9.2f}"
    )
    print(
        f"{'kNN k=20 balanced accuracy (5-fold CV)':<46} {rows['fp32'][1]:>9.4f} "
        f"{rows['bf16'][1]:>9.4f}"
    )
    print(
        f"{'kNN k=1 balanced accuracy (5-fold CV)':<46} {rows['fp32'][2]:>9.4f} "
        f"{rows['bf16'][2]:>9.4f}"
    )
    print(
        f"{'1 - cosine(fp32, bf16): median / worst':<46} {1 - np.median(cos):>9.2e} "
        f"{1 - cos.min():>9.2e}"
    )
    print(
        f"{'relative L2 difference: median / worst':<46} {np.median(rel):>9.2e} {rel.max():>9.2e}"
    )
    print(f"{'20 nearest neighbours kept (mean share)':<46} {overlap:>9.3f}")


if __name__ == "__main__":
    main()

"""Stain normalisation against a real batch effect: pbc_dev vs bccd_crops, handcrafted.

For each method of :mod:`napari_hemofm.core.stain` (none, reinhard, macenko; built-in
reference, i.e. PBC's statistics) every crop of ``../shared/data/pbc_dev`` and
``../shared/data/bccd_crops`` is normalised, embedded with the ``handcrafted``
backbone (the one that runs offline here; DinoBloom weights were not available), and
scored with :func:`napari_hemofm.core.batch.batch_report` (lab = batch, folder =
label): iLISI (scaled, 1 = ideal mixing), PCR-batch (share of variance explained by
the lab, lower is better) and the leave-one-batch-out kNN / linear balanced accuracy
(mean over the two held-out labs, and each direction), on the 5 shared cell types.

``--reference`` prints the built-in reference's numbers measured on all of pbc_dev
(how the constants in ``core/stain.py`` were obtained). Embeddings are cached in /tmp
(``labs.py``). Run from the repository root:

    python benchmarks/bench_stain.py [--reference]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from labs import LABS, embed_variant, load_lab

METHODS = ("none", "reinhard", "macenko")


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_reference(crops: list[np.ndarray]) -> None:
    from napari_hemofm.core.stain import macenko_stats, reinhard_stats

    r = reinhard_stats(crops)
    m = macenko_stats(crops)
    print(f"built-in reference from pbc_dev ({len(crops)} crops):")
    print("  Lab mean", np.round(r.mean, 1), "std", np.round(r.std, 1), "fallback", r.fallback)
    print("  stains (azure, eosin)", np.round(m.stains, 3).tolist())
    print("  max_conc", np.round(m.max_conc, 2), "glass", np.round(m.glass, 0), m.fallback)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from napari_hemofm.core.batch import batch_report

    data = {lab: load_lab(lab) for lab in LABS}
    if args.reference:
        print_reference(data["pbc_dev"][0])
    batches = np.concatenate([[lab] * len(data[lab][1]) for lab in LABS])
    labels = np.concatenate([data[lab][1] for lab in LABS])
    rows = []
    for method in METHODS:
        t = time.perf_counter()
        X = np.concatenate(
            [
                embed_variant(
                    lab, "original", data[lab][0], stain_norm=method, threads=args.threads
                )
                for lab in LABS
            ]
        )
        took = time.perf_counter() - t
        rep = batch_report(X, batches, labels, lobo=True, seed=0)
        m, lobo = rep["metrics"], rep["lobo"] or {}
        per = lobo.get("per_batch", {})

        def held(b: str, probe: str, per=per) -> str:
            return fmt(per.get(b, {}).get(probe, {}).get("balanced_accuracy"))

        rows.append(
            f"| {method} | {fmt(m.get('ilisi'))} | {fmt(m.get('pcr_batch'))} | "
            f"{fmt(m.get('lobo_knn_balanced_accuracy'))} | "
            f"{fmt(m.get('lobo_linear_balanced_accuracy'))} | "
            f"{held('bccd_crops', 'knn_k20')} | {held('pbc_dev', 'knn_k20')} |"
        )
        print(f"{method}: embedded / loaded in {took:.0f} s", file=sys.stderr)
    print("mixing types:", ", ".join(rep["mixing_labels"]))
    print()
    print(
        "| stain normalisation | iLISI (1 = mixed) | PCR-batch (lower better) | "
        "LOBO kNN bal. acc. | LOBO linear bal. acc. | kNN, bccd held out | "
        "kNN, pbc held out |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

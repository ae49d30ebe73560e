"""napari sample data: seeded synthetic Wright-Giemsa smears in three batches.

A thin npe2 contribution: the drawing is :mod:`napari_hemofm.core.synthetic`.
"""

from __future__ import annotations

from typing import Any


def make_sample_data() -> list[tuple[Any, dict[str, Any], str]]:
    """One synthetic smear per batch, as napari image layers.

    Returns
    -------
    list of (ndarray of shape (H, W, 3), dict, str)
        napari ``LayerDataTuple``s: the RGB image, its layer keyword arguments
        (name = ``<batch>_<k>``; ``metadata`` holds the batch, the pixel size in um
        and the ground-truth WBC table) and ``"image"``.
    """
    from napari_hemofm.core.synthetic import make_sample

    layers = []
    for k, smear in enumerate(make_sample(seed=0, n_per_batch=1)):
        name = f"{smear.batch}_{k}"
        meta = {
            "batch": smear.batch,
            "pixel_size_um": smear.pixel_size_um,
            "ground_truth": smear.cells,
        }
        layers.append((smear.image, {"name": name, "rgb": True, "metadata": meta}, "image"))
    return layers

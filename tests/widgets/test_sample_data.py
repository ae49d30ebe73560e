"""napari opens the plugin's sample data: three batches of synthetic smears."""

import numpy as np


def test_open_sample_gives_one_rgb_layer_per_batch(make_napari_viewer):
    """File > Open Sample > HemoFM adds three RGB uint8 image layers, one per batch,
    each carrying its batch name, pixel size and ground-truth WBC table."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-hemofm", "synthetic_smears")
    layers = list(viewer.layers)
    assert len(layers) == 3
    batches = [layer.metadata["batch"] for layer in layers]
    assert len(set(batches)) == 3
    for layer in layers:
        assert layer.rgb
        assert layer.data.dtype == np.uint8
        assert layer.data.ndim == 3
        truth = layer.metadata["ground_truth"]
        assert len(truth) >= 5
        assert layer.metadata["pixel_size_um"] > 0

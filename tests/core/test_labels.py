"""The one label cleaner: which values mean "unlabelled", everywhere."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_hemofm._testing import make_cell_table
from napari_hemofm.core.labels import clean_label, clean_labels, is_unlabelled

MISSING = [None, float("nan"), np.float32("nan"), pd.NA, pd.NaT, "", "   "]


@pytest.mark.parametrize("value", MISSING, ids=repr)
def test_missing_values_mean_unlabelled(value):
    """None, NaN (any float), pandas.NA / NaT and blank strings are all "no label"."""
    assert is_unlabelled(value)
    assert clean_label(value) is None


def test_labels_are_kept_as_written_apart_from_outer_space():
    """A label keeps its case and inner spaces; numbers become their text."""
    assert clean_label("  Band neutrophil ") == "Band neutrophil"
    assert clean_label("NEUTROPHIL") == "NEUTROPHIL"
    assert clean_label(3) == "3"


def test_clean_labels_checks_length_and_refuses_one_string():
    """The vector form raises on a length mismatch and on a bare string."""
    out = clean_labels(pd.Series(["a", pd.NA, None, " b"]))
    assert out.dtype == object
    assert list(out) == ["a", None, None, "b"]
    with pytest.raises(ValueError, match="got 2 labels for 3 cells"):
        clean_labels(["a", "b"], n=3)
    with pytest.raises(TypeError):
        clean_labels("abc")


@pytest.mark.parametrize("value", MISSING, ids=repr)
def test_set_labels_with_missing_values_creates_no_class(value):
    """Regression: ``set_labels(ids, pd.NA)`` made a class named "<NA>"; now every
    missing value clears the label and adds no category."""
    table = make_cell_table(30, seed=1, labelled=1.0)
    before = list(table.obs["label"].cat.categories)
    ids = list(table.cell_ids[:3])
    table.set_labels(ids, value)
    table.set_labels(ids[:2], [value, value])
    assert table.obs.loc[ids, "label"].isna().all()
    assert list(table.obs["label"].cat.categories) == before
    assert "<NA>" not in table.classes
    assert "nan" not in table.classes

"""The one rule for what a label value means.

Every part of napari-hemofm that reads a label (the cell table, the probes, the review
loop, the batch metrics, the gallery, the map) asks this module whether a value is a
label at all. ``None``, ``NaN``, ``pandas.NA`` / ``NaT`` and empty or blank strings all
mean *unlabelled*; anything else is a label, kept as written apart from surrounding
white space (DESIGN.md: labels stay as written; the class catalogue resolves synonyms).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["clean_label", "clean_labels", "is_unlabelled"]


def is_unlabelled(value: Any) -> bool:
    """Whether ``value`` means "no label".

    Parameters
    ----------
    value : object
        One label value as found in a table, a journal record or a widget.

    Returns
    -------
    bool
        True for ``None``, float NaN (Python or numpy), ``pandas.NA``, ``pandas.NaT``
        and strings that are empty after stripping white space.
    """
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, float | np.floating):
        return bool(np.isnan(value))
    # pandas.NA / NaT without importing pandas here (their truth value raises)
    return type(value).__name__ in ("NAType", "NaTType")


def clean_label(value: Any) -> str | None:
    """One label as a stripped ``str``, or ``None`` when it means unlabelled.

    Parameters
    ----------
    value : object
        A label value (see :func:`is_unlabelled` for the values that mean none).

    Returns
    -------
    str or None
        ``str(value).strip()``, or ``None``.

    Examples
    --------
    >>> import pandas as pd
    >>> [clean_label(v) for v in ["  blast ", "", None, float("nan"), pd.NA, 3]]
    ['blast', None, None, None, None, '3']
    """
    if is_unlabelled(value):
        return None
    return str(value).strip()


def clean_labels(labels: Sequence[Any] | np.ndarray, n: int | None = None) -> np.ndarray:
    """Many labels as an object array of ``str`` / ``None``.

    Parameters
    ----------
    labels : sequence of object, length n
        Label values (a pandas Series or Categorical works too).
    n : int, optional
        The number of values expected; a different length raises ``ValueError``.

    Returns
    -------
    ndarray of shape (n,), dtype object
        :func:`clean_label` of each value.

    Raises
    ------
    TypeError
        When ``labels`` is one string (a common slip for ``[label]``).
    ValueError
        When ``n`` is given and the lengths differ.
    """
    if isinstance(labels, str):
        raise TypeError("labels must be a sequence of labels, not one string")
    values = list(labels)
    if n is not None and len(values) != n:
        raise ValueError(f"got {len(values)} labels for {n} cells")
    out = np.empty(len(values), dtype=object)
    out[:] = [clean_label(v) for v in values]
    return out

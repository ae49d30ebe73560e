"""Out-of-domain guard: how much a cell resembles the labelled cells of its class.

A probe always answers: a cell unlike any cell it learned from still gets a class,
often with high confidence (a PBC probe called 94.8 % of another lab's cells
"monocyte" at confidence 0.55-1.0). The guard adds two checks that do not depend on
the probe's confidence:

**Per cell, a typicality score** (a conformal p-value). The nonconformity of a cell
``x`` predicted as class ``c`` is its distance to the ``m``-th nearest labelled cell of
``c`` (``m = 5``), divided by the class's scale (the median of the same statistic over
``c``'s labelled cells). It is calibrated on the labelled cells themselves: each
labelled cell's statistic is computed leave-one-out (its own distance to the ``m``-th
nearest *other* labelled cell of its class), the scaled values of all classes are
pooled, and a cell's typicality is

    p(x) = (1 + #{calibration scores >= score(x)}) / (n_calibration + 1).

Beyond the largest calibration value the rank alone stops at ``1 / (n_cal + 1)``,
which cannot fall below ``ALPHA`` while fewer than ``1 / ALPHA - 1`` = 99 cells are
labelled (a new project); there ``p`` is ``1 / (n_cal + 1)`` times the tail ratio
``S(score) / S(max calibration)`` of a log-normal fitted to the calibration values, so
it keeps falling with the distance. Only cells beyond every labelled cell's own
statistic are affected, which a cell exchangeable with the labelled ones is with
probability ``1 / (n_cal + 1)``.

If the cells are exchangeable with the labelled ones, ``p`` is (super-)uniform, so
``P(p <= alpha) <= alpha``: at the level :data:`ALPHA` = 0.01 about 1 in 100 cells
like the labelled ones is flagged, whatever the data. The leave-one-out statistic of
a labelled cell uses ``n_c - 1`` references and a new cell's uses ``n_c``, so the
calibration scores are slightly larger than an exchangeable cell's: the test errs on
the side of flagging too little. A cell with ``p < ALPHA`` is *atypical*: it counts
as Unidentified, with the reason (:func:`reason`). The threshold is a property of
the method (the rate of false alarms accepted), not tuned to any data set.

**Per group** (slide, batch), a shift check: under the same exchangeability each
predicted cell is atypical with probability at most ``ALPHA``, so the number of
atypical cells among a group's ``n`` unlabelled, predicted cells is at most
Binomial(n, ALPHA). A group is *shifted* when the one-sided binomial test rejects at
:data:`SHIFT_LEVEL` (0.01) and its atypical share is at least twice ``ALPHA`` (an
effect-size floor, so that a 10,000-cell slide is not flagged for a 1.2 % share).
A shifted group carries :data:`SHIFT_WARNING`.

The reference cells of each class are its labelled cells, at most
:data:`MAX_REFERENCE` per class (a fixed pseudo-random subset chosen by row hash,
so the set only changes where a label changes it): the cost of scoring is then
``n_cells x MAX_REFERENCE x dim`` at worst, and a label change in a class that holds
more labels than that changes nothing.

Output columns (written by :meth:`~.review.Review.apply_result` and read by the
counting rule of :mod:`~.report`):

- ``obs["typicality"]``: float, the p-value above (higher = more typical); NaN where
  a cell has no prediction or its class has fewer than 2 labelled cells;
- ``obs["atypical"]``: bool, ``typicality < ALPHA``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable

__all__ = [
    "ALPHA",
    "ATYPICAL_COLUMN",
    "MAX_REFERENCE",
    "NEIGHBOUR",
    "SHIFT_LEVEL",
    "SHIFT_WARNING",
    "TYPICALITY_COLUMN",
    "Guard",
    "reason",
    "shift_table",
    "shift_test",
    "shift_warnings",
]

ALPHA = 0.01
"""Level of the per-cell test: a cell with typicality below it is atypical."""
SHIFT_LEVEL = 0.01
"""Level of the per-group binomial test of the atypical share."""
SHIFT_MIN_RATIO = 2.0
"""A shifted group's atypical share is at least this many times :data:`ALPHA`."""
NEIGHBOUR = 5
"""``m``: the statistic is the distance to the m-th nearest labelled cell of the class."""
MAX_REFERENCE = 500
"""At most this many labelled cells per class serve as the guard's reference."""
TYPICALITY_COLUMN = "typicality"
ATYPICAL_COLUMN = "atypical"
SHIFT_WARNING = (
    "these cells differ from the cells the probe learned from: label some of them first"
)
GUARD_FORMAT_VERSION = 1


def _row_key(rows: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random order of row positions (Knuth's multiplicative hash)."""
    return (rows.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)


def _distances(
    X: np.ndarray, query_rows: np.ndarray, R: np.ndarray, m: int, self_pos: np.ndarray | None
) -> np.ndarray:
    """Euclidean distance from each query to its ``m``-th nearest row of ``R``.

    Parameters
    ----------
    X : ndarray of shape (n, dim), float32
    query_rows : ndarray of shape (q,), int
    R : ndarray of shape (r, dim), float32
    m : int
        1-based neighbour rank.
    self_pos : ndarray of shape (q,), int, optional
        Position of each query in ``R`` (-1 if absent): skipped (leave-one-out).

    Returns
    -------
    ndarray of shape (q,), float64
        NaN where fewer than ``m`` references are available.
    """
    from napari_hemofm.core.probe import _knn_search

    r_sq = np.einsum("ij,ij->i", R, R, dtype=np.float32)
    idx, rd = _knn_search(X, query_rows, R, r_sq, m, self_pos=self_pos)
    q = X[query_rows]
    q_sq = np.einsum("ij,ij->i", q, q, dtype=np.float64)
    last = rd[:, m - 1].astype(np.float64) + q_sq
    last[idx[:, m - 1] < 0] = np.nan
    return np.sqrt(np.maximum(last, 0.0))


class Guard:
    """Typicality of cells against the labelled cells of their predicted class.

    Build it with :meth:`fit` from the probe's embeddings and labels (the same space
    as the probe: unit-length rows for the cosine metric), then :meth:`score` cells
    with their predictions. See the module docstring for the method.

    Attributes
    ----------
    classes : list of str
        Classes with at least one reference cell.
    reference : dict of str to ndarray of shape (r_c, dim)
        The reference (labelled) cells of each class, float32.
    reference_rows : dict of str to ndarray of int
        Their rows in the matrix given to :meth:`fit` (for leave-one-out scoring of
        those same rows).
    scale : dict of str to float
        Median leave-one-out statistic of each class (the unit of its scores).
    calibration : ndarray of shape (n_cal,), float64
        Sorted scaled leave-one-out statistics of all reference cells.
    m : int
    alpha : float
    """

    def __init__(
        self,
        reference: dict[str, np.ndarray],
        reference_rows: dict[str, np.ndarray] | None = None,
        *,
        m: int = NEIGHBOUR,
        alpha: float = ALPHA,
        previous: Guard | None = None,
    ) -> None:
        if m < 1:
            raise ValueError(f"m must be at least 1; got {m}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1); got {alpha}")
        self.m = int(m)
        self.alpha = float(alpha)
        self.reference = {
            str(c): np.ascontiguousarray(v, dtype=np.float32) for c, v in reference.items()
        }
        self.classes = sorted(c for c, v in self.reference.items() if len(v))
        self.reference_rows = {
            c: np.asarray(
                (reference_rows or {}).get(c, np.full(len(self.reference[c]), -1)),
                dtype=np.int64,
            )
            for c in self.classes
        }
        self.scale: dict[str, float] = {}
        #: leave-one-out statistic of each class's reference cells (unscaled)
        self.loo: dict[str, np.ndarray] = {}
        cal: list[np.ndarray] = []
        for c in self.classes:
            R = self.reference[c]
            m_c = self._m(c)
            if m_c == 0:
                continue
            if previous is not None and previous.same_reference(self, c):
                loo = previous.loo[c]  # the same cells: the same statistic
            else:
                loo = _distances(R, np.arange(len(R)), R, m_c, np.arange(len(R)))
            self.loo[c] = loo
            pos = loo[np.isfinite(loo) & (loo > 0)]
            self.scale[c] = float(np.median(pos)) if len(pos) else 1.0
            cal.append(loo / self.scale[c])
        if self.classes and not self.scale:
            fallback = 1.0
        else:
            fallback = float(np.median(list(self.scale.values()))) if self.scale else 1.0
        for c in self.classes:  # a single-cell class: the other classes' scale
            self.scale.setdefault(c, fallback)
        self.calibration = np.sort(np.concatenate(cal)) if cal else np.zeros(0)

    def same_reference(self, other: Guard, c: str) -> bool:
        """Whether class ``c`` has the same reference rows here and in ``other``.

        Only meaningful for guards fitted on the same matrix (row numbers compared).
        """
        mine, theirs = self.reference_rows.get(c), other.reference_rows.get(c)
        return (
            mine is not None
            and theirs is not None
            and (mine >= 0).all()
            and self.m == other.m
            and np.array_equal(mine, theirs)
        )

    def _m(self, c: str) -> int:
        """The neighbour rank of class ``c``: ``m``, or ``n_c - 1`` for a small class."""
        return min(self.m, len(self.reference[c]) - 1)

    @classmethod
    def fit(
        cls,
        X: np.ndarray,
        labels: Sequence[Any] | np.ndarray,
        *,
        m: int = NEIGHBOUR,
        alpha: float = ALPHA,
        max_per_class: int = MAX_REFERENCE,
        previous: Guard | None = None,
        clean: bool = True,
    ) -> Guard:
        """Take the labelled, embedded rows of ``X`` as the reference.

        Parameters
        ----------
        X : ndarray of shape (n_cells, dim)
            Embeddings in the probe's space; rows with a NaN are ignored.
        labels : sequence of shape (n_cells,)
            Class names; None / NaN = unlabelled.
        m, alpha : see the class.
        max_per_class : int
            At most this many reference cells per class (the rows with the smallest
            hash key, a fixed pseudo-random choice).
        previous : Guard, optional
            A guard fitted earlier on the same ``X``: classes whose reference rows did
            not change reuse its leave-one-out statistics (the incremental path).
        clean : bool
            Clean the labels first (False: they are already str / None, e.g. a
            probe's ``labels_``; saves a pass over every cell).

        Returns
        -------
        Guard
        """
        from napari_hemofm.core.probe import _clean_labels

        X = np.ascontiguousarray(X, dtype=np.float32)
        if clean:
            labels = _clean_labels(labels, X.shape[0])
        labels = np.asarray(labels, dtype=object)
        rows = np.flatnonzero(np.not_equal(labels, None))
        rows = rows[np.isfinite(X[rows]).all(axis=1)]
        ref: dict[str, np.ndarray] = {}
        ref_rows: dict[str, np.ndarray] = {}
        for c in sorted({str(v) for v in labels[rows]}):
            r = rows[labels[rows] == c]
            if len(r) > max_per_class:
                r = np.sort(r[np.argsort(_row_key(r), kind="stable")[:max_per_class]])
            ref[c] = X[r]
            ref_rows[c] = r
        return cls(ref, ref_rows, m=m, alpha=alpha, previous=previous)

    def statistic(
        self,
        X: np.ndarray,
        prediction: Sequence[Any] | np.ndarray,
        rows: np.ndarray | None = None,
        *,
        same_rows: bool = False,
    ) -> np.ndarray:
        """Scaled nonconformity of cells: m-th neighbour distance / class scale.

        Parameters
        ----------
        X : ndarray of shape (n, dim)
        prediction : sequence of shape (n,)
            Predicted class per row (None = no prediction).
        rows : ndarray of int, optional
            Rows to score (default all).
        same_rows : bool
            ``X`` is the matrix given to :meth:`fit` (row numbers match): a reference
            cell is scored leave-one-out, without itself.

        Returns
        -------
        ndarray of shape (len(rows),), float64
            NaN where a row has no prediction, a NaN embedding or a class without a
            reference.
        """
        X = np.ascontiguousarray(X, dtype=np.float32)
        rows = np.arange(X.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
        pred = np.asarray(prediction, dtype=object)
        out = np.full(len(rows), np.nan)
        finite = np.isfinite(X[rows]).all(axis=1) if len(rows) else np.zeros(0, bool)
        pr = pred[rows] if len(pred) == X.shape[0] else pred
        for c in self.classes:
            sel = np.flatnonzero((pr == c) & finite)
            if not len(sel):
                continue
            R = self.reference[c]
            if len(R) < 2:
                continue  # a single labelled cell: nothing to calibrate its class with
            q = rows[sel]
            self_pos = np.full(len(q), -1, dtype=np.int64)
            if same_rows:  # reference_rows is sorted (fit takes rows in order)
                ref_rows = self.reference_rows[c]
                at = np.minimum(np.searchsorted(ref_rows, q), len(ref_rows) - 1)
                self_pos = np.where(ref_rows[at] == q, at, -1).astype(np.int64)
            inside = self_pos >= 0
            # a reference cell is scored without itself, exactly like the calibration
            for part, m_c in ((inside, self._m(c)), (~inside, min(self.m, len(R)))):
                if m_c > 0 and part.any():
                    d = _distances(X, q[part], R, m_c, self_pos[part] if same_rows else None)
                    out[sel[part]] = d / self.scale[c]
        return out

    def pvalue(self, statistic: np.ndarray) -> np.ndarray:
        """Conformal p-values of scaled statistics against the pooled calibration.

        Parameters
        ----------
        statistic : ndarray of shape (n,)

        Returns
        -------
        ndarray of shape (n,), float32
            ``(1 + #{calibration >= s}) / (n_cal + 1)``; beyond the largest
            calibration value, ``1 / (n_cal + 1)`` times the ratio of a log-normal
            tail fitted to the calibration values (see the module docstring); NaN
            where ``s`` is NaN or there is no calibration (every class has a single
            labelled cell).
        """
        s = np.asarray(statistic, dtype=np.float64)
        out = np.full(s.shape, np.nan, dtype=np.float32)
        n_cal = len(self.calibration)
        ok = np.isfinite(s)
        if n_cal == 0 or not ok.any():
            return out
        # calibration values >= s: n_cal - (number strictly below s)
        below = np.searchsorted(self.calibration, s[ok], side="left")
        p = (1.0 + n_cal - below) / (n_cal + 1.0)
        # beyond the largest calibration value the rank p-value stops at 1 / (n + 1),
        # which cannot reach alpha with fewer than 1 / alpha - 1 labelled cells: there,
        # a log-normal tail fitted to the calibration values carries it on
        beyond = s[ok] > self.calibration[-1]
        if beyond.any() and n_cal >= 3:
            p[beyond] *= self._tail_ratio(s[ok][beyond])
        out[ok] = p
        return out

    def _tail_ratio(self, s: np.ndarray) -> np.ndarray:
        """``S(s) / S(max calibration)`` of a log-normal fitted to the calibration values.

        ``S`` is the fitted survival function; the ratio is <= 1 for ``s`` above the
        largest calibration value, so p-values keep falling with the distance.
        """
        # scipy.special, not scipy.stats: importing scipy.stats in a worker while the
        # main thread imports it too broke with "partially initialized module"
        from scipy.special import log_ndtr

        cal = self.calibration[self.calibration > 0]
        if len(cal) < 3:
            return np.ones(len(s))
        logs = np.log(cal)
        mu, sd = float(logs.mean()), float(logs.std(ddof=1))
        if not sd > 0:
            return np.zeros(len(s))
        top = log_ndtr(-(np.log(cal[-1]) - mu) / sd)  # log survival of N(0, 1)
        return np.exp(np.minimum(log_ndtr(-(np.log(s) - mu) / sd) - top, 0.0))

    def score(
        self,
        X: np.ndarray,
        prediction: Sequence[Any] | np.ndarray,
        rows: np.ndarray | None = None,
        *,
        same_rows: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Typicality and the atypical flag of cells (see :meth:`statistic`).

        Returns
        -------
        typicality : ndarray of shape (len(rows),), float32
            Conformal p-value; NaN where not judged.
        atypical : ndarray of shape (len(rows),), bool
            ``typicality < alpha`` (False where NaN).
        """
        p = self.pvalue(self.statistic(X, prediction, rows, same_rows=same_rows))
        return p, atypical_of(p, self.alpha)

    # ------------------------------------------------------------- probe files
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for a probe file (no pickle): the reference cells and settings.

        Returns
        -------
        dict
            ``guard_meta`` (a JSON string: format version, m, alpha, classes,
            reference sizes), ``guard_reference`` (sum r_c, dim) float32 in ``classes``
            order and ``guard_calibration`` (n_cal,) float64 (stored so a reader can
            check a rebuilt guard).
        """
        dim = next((v.shape[1] for v in self.reference.values()), 0)
        meta = {
            "version": GUARD_FORMAT_VERSION,
            "m": self.m,
            "alpha": self.alpha,
            "classes": self.classes,
            "sizes": [len(self.reference[c]) for c in self.classes],
        }
        ref = (
            np.concatenate([self.reference[c] for c in self.classes])
            if self.classes
            else np.zeros((0, dim), np.float32)
        )
        return {
            "guard_meta": np.array(json.dumps(meta)),
            "guard_reference": ref.astype(np.float32),
            "guard_calibration": self.calibration.astype(np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: Any) -> Guard:
        """Rebuild a guard from :meth:`to_arrays`'s output (e.g. an open ``.npz``).

        Raises
        ------
        ValueError
            If the arrays are missing, of another version or inconsistent.
        """
        try:
            meta = json.loads(str(arrays["guard_meta"]))
            ref = np.asarray(arrays["guard_reference"], dtype=np.float32)
        except KeyError as exc:
            raise ValueError("the probe file holds no guard") from exc
        if meta.get("version") != GUARD_FORMAT_VERSION:
            raise ValueError(f"guard format version {meta.get('version')} is not supported")
        sizes = [int(s) for s in meta["sizes"]]
        if sum(sizes) != len(ref) or len(sizes) != len(meta["classes"]):
            raise ValueError("the probe file's guard arrays do not match its description")
        bounds = np.cumsum([0, *sizes])
        reference = {c: ref[bounds[i] : bounds[i + 1]] for i, c in enumerate(meta["classes"])}
        return cls(reference, m=int(meta["m"]), alpha=float(meta["alpha"]))


def atypical_of(typicality: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """``typicality < alpha``, False where typicality is NaN (not judged)."""
    p = np.asarray(typicality, dtype=np.float64)
    return np.nan_to_num(p, nan=1.0) < alpha


def reason(typicality: float, prediction: Any, alpha: float = ALPHA) -> str:
    """Why an atypical cell is Unidentified, in one line for the gallery and report.

    Examples
    --------
    >>> reason(0.004, "monocyte")
    'unlike the labelled monocyte cells (typicality 0.004 < 0.01)'
    """
    return f"unlike the labelled {prediction} cells (typicality {typicality:.3g} < {alpha:g})"


def shift_test(atypical: np.ndarray, alpha: float = ALPHA) -> dict[str, float | bool | int]:
    """One group's shift test: whether its atypical share exceeds what ``alpha`` allows.

    Parameters
    ----------
    atypical : ndarray of bool, shape (n,)
        Flags of the group's judged cells (unlabelled cells with a typicality).
    alpha : float
        The per-cell level (expected share under no shift is at most ``alpha``).

    Returns
    -------
    dict
        ``n``, ``n_atypical``, ``share``, ``expected`` (= alpha), ``p_value`` (one-
        sided binomial, P[Binomial(n, alpha) >= n_atypical]) and ``shifted``
        (``p_value < SHIFT_LEVEL`` and ``share >= SHIFT_MIN_RATIO * alpha``).
    """
    from scipy.special import bdtrc  # see _tail_ratio: not scipy.stats, from threads

    a = np.asarray(atypical, dtype=bool)
    n, k = int(a.size), int(a.sum())
    # P[Binomial(n, alpha) >= k] = P[X > k - 1]; every count is >= 0
    p_value = (float(bdtrc(k - 1, n, alpha)) if k > 0 else 1.0) if n else 1.0
    share = k / n if n else 0.0
    return {
        "n": n,
        "n_atypical": k,
        "share": share,
        "expected": alpha,
        "p_value": p_value,
        "shifted": bool(n and p_value < SHIFT_LEVEL and share >= SHIFT_MIN_RATIO * alpha),
    }


def _judged(table: CellTable) -> tuple[np.ndarray, np.ndarray]:
    obs = table.obs
    if TYPICALITY_COLUMN not in obs:
        return np.zeros(len(obs), bool), np.zeros(len(obs), bool)
    p = pd.to_numeric(obs[TYPICALITY_COLUMN], errors="coerce").to_numpy(dtype=float)
    unlabelled = obs["label"].isna().to_numpy()
    judged = unlabelled & np.isfinite(p)
    if ATYPICAL_COLUMN in obs:
        flag = obs[ATYPICAL_COLUMN].fillna(False).to_numpy(dtype=bool)
    else:
        flag = atypical_of(p)
    return judged, flag


def shift_table(table: CellTable, by: str = "batch") -> pd.DataFrame:
    """The shift test (:func:`shift_test`) of every group of cells.

    Parameters
    ----------
    table : CellTable
        With ``obs["typicality"]`` / ``obs["atypical"]`` (written by the Review's
        retrain); without them every group is unjudged (n = 0, not shifted).
    by : str
        Any obs column (``"source"``, ``"batch"``, ``"slide"`` ...).

    Returns
    -------
    DataFrame
        One row per group (sorted): ``group``, ``n``, ``n_atypical``, ``share``,
        ``expected``, ``p_value``, ``shifted``. Only unlabelled cells with a
        prediction are judged: labelled cells are the probe's own training data.

    Raises
    ------
    ValueError
        If ``by`` is not an obs column.
    """
    obs = table.obs
    if by not in obs:
        raise ValueError(f"no column {by!r} to group by; columns are {list(obs.columns)}")
    groups = obs[by].astype(str).to_numpy()
    judged, flag = _judged(table)
    rows = []
    for g in sorted(pd.unique(groups)):
        sel = (groups == g) & judged
        rows.append({"group": g, **shift_test(flag[sel])})
    return pd.DataFrame(
        rows, columns=["group", "n", "n_atypical", "share", "expected", "p_value", "shifted"]
    )


def shift_warnings(table: CellTable, by: str = "batch") -> dict[str, str]:
    """Warning text of each shifted group (only shifted groups appear).

    Parameters
    ----------
    table : CellTable
    by : str
        Any obs column.

    Returns
    -------
    dict of str to str
        group -> ``"these cells differ from the cells the probe learned from: label
        some of them first (N of M cells atypical, X % against 1 % expected)"``.
    """
    out: dict[str, str] = {}
    for rec in shift_table(table, by).itertuples(index=False):
        if rec.shifted:
            out[str(rec.group)] = (
                f"{SHIFT_WARNING} ({rec.n_atypical} of {rec.n} cells atypical, "
                f"{100 * rec.share:.0f} % against {100 * rec.expected:g} % expected)"
            )
    return out

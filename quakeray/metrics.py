"""Every metric and every metric name: magnitude predictions scored exactly on full arrays.

:func:`regression_metrics` returns unprefixed names (``MAE``, ``RMSE``, ...);
:func:`split_metrics` adds the split prefix (``val_MAE``, ``test_MAE``), torchgeo's naming.
:data:`EPOCH_METRICS` names what a training epoch reports (to Ray, Tune and MLflow), and
:data:`SCORE_METRIC` the one checkpoints are ranked by. A value that is undefined
for the given data (a correlation of a constant, the MAE of no positives) is
``float("nan")``, never an exception: an epoch that predicts a constant is a result to
record, not a crash.

The rank correlations are computed here with NumPy, not with ``scipy.stats``, whose import
(0.7 s) would land on the critical path of every fresh Ray Train worker, i.e. of every
search trial; they are tested against scipy.

Example:
    >>> m = regression_metrics(np.array([0.0, 5.0, 6.5]), np.array([0.0, 5.5, 6.0]))
    >>> m["MAE"], m["rank_acc"], m["detection_acc"]
    (0.3333333333333333, 1.0, 1.0)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "AFFECTED_THRESHOLD",
    "BASELINE_METRICS",
    "DEFAULT_BIN_EDGES",
    "EPOCH_METRICS",
    "REGRESSION_METRICS",
    "SCORE_METRIC",
    "ConstantBaseline",
    "pairwise_ranking_accuracy",
    "per_bin_errors",
    "regression_metrics",
    "split_metrics",
]

NAN = float("nan")

AFFECTED_THRESHOLD = 1.0
"""A predicted magnitude at or above this means "affected by an earthquake" (the paper's code)."""

DEFAULT_BIN_EDGES: tuple[float, ...] = (0, 0.5, 4.5, 5, 5.5, 6, 6.5, 7, 10)
"""Magnitude bins for :func:`per_bin_errors`: negatives (0), then half-magnitude steps."""

REGRESSION_METRICS: tuple[str, ...] = (
    "MAE",
    "RMSE",
    "spearman",
    "kendall",
    "rank_acc",
    "detection_acc",
    "MAE_pos",
)
"""The keys of :func:`regression_metrics`, in order."""

BASELINE_METRICS: tuple[str, ...] = ("MAE_const_median", "MAE_const_mean", "skill")
"""The keys :func:`split_metrics` adds given a :class:`ConstantBaseline`: the MAE of
predicting the train median (and mean) for every sample, and the model's skill
``1 - MAE / MAE_const_median`` (0: no better than that constant; 1: perfect)."""

EPOCH_METRICS: tuple[str, ...] = (
    "epoch",
    "train_loss",
    "train_mse",
    "train_rank",
    "val_loss",
    *(f"val_{name}" for name in REGRESSION_METRICS),
    *(f"val_{name}" for name in BASELINE_METRICS),
    "lr",
    "samples_per_s",
)
"""Reported to Ray (and Tune) and logged to MLflow each epoch (step = epoch)."""

SCORE_METRIC = "val_MAE"
"""Checkpoints are ranked by this metric (lower is better)."""

# Pairs are compared in row blocks so memory stays ~BLOCK * n booleans for any n.
_BLOCK = 1024


def regression_metrics(
    pred: ArrayLike, target: ArrayLike, labels: ArrayLike | None = None
) -> dict[str, float]:
    """Error, rank and detection metrics of magnitude predictions.

    Args:
        pred: Predicted magnitudes, shape ``(N,)``.
        target: True magnitudes (0 for negatives), shape ``(N,)``.
        labels: 1 = affected (positive pair), 0 = not; None derives them as ``target > 0``.

    Returns:
        ``MAE``, ``RMSE``; ``spearman`` and ``kendall`` (tau-b) correlations; ``rank_acc``,
        the pairwise ranking accuracy (:func:`pairwise_ranking_accuracy`); ``detection_acc``,
        the accuracy of ``pred >= 1`` as "affected" against the labels; ``MAE_pos``, the MAE
        over the positives alone. NaN where undefined.

    Raises:
        ValueError: The arrays are not 1-D of one common length.
    """
    p, t = _as_1d(pred, "pred"), _as_1d(target, "target")
    _same_length(p, t, "target")
    if labels is None:
        positive = t > 0
    else:
        lab = _as_1d(labels, "labels")
        _same_length(p, lab, "labels")
        positive = lab == 1
    err = p - t
    pairs = _PairCounts.of(p, t)
    return {
        "MAE": _mean(np.abs(err)),
        "RMSE": math.sqrt(_mean(err**2)) if err.size else NAN,
        "spearman": _spearman(p, t),
        "kendall": pairs.kendall_tau_b(),
        "rank_acc": pairs.ranking_accuracy(),
        "detection_acc": _mean((p >= AFFECTED_THRESHOLD) == positive),
        "MAE_pos": _mean(np.abs(err[positive])),
    }


@dataclass(frozen=True)
class ConstantBaseline:
    """The constant predictors every model is judged against: the train split's median and mean.

    The target is bimodal (negatives at 0, positives at 4 to 7.5): the median is the
    constant with the lowest MAE on the train split, the mean the one with the lowest MSE.
    """

    median: float
    mean: float

    @classmethod
    def of(cls, train_target: ArrayLike) -> ConstantBaseline:
        """The baseline of a train split's targets."""
        t = _as_1d(train_target, "train_target")
        if t.size == 0:
            raise ValueError("a constant baseline needs at least one train target")
        return cls(median=float(np.median(t)), mean=float(np.mean(t)))

    def metrics(self, pred: ArrayLike, target: ArrayLike) -> dict[str, float]:
        """:data:`BASELINE_METRICS` of ``pred`` on ``target`` (unprefixed)."""
        p, t = _as_1d(pred, "pred"), _as_1d(target, "target")
        _same_length(p, t, "target")
        const_median = _mean(np.abs(t - self.median))
        mae = _mean(np.abs(p - t))
        skill = 1.0 - mae / const_median if const_median > 0 else NAN
        return {
            "MAE_const_median": const_median,
            "MAE_const_mean": _mean(np.abs(t - self.mean)),
            "skill": skill,
        }


def split_metrics(
    pred: ArrayLike,
    target: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    prefix: str,
    baseline: ConstantBaseline | None = None,
) -> dict[str, float]:
    """:func:`regression_metrics` named for a split: ``prefix`` ``val_`` gives ``val_MAE``.

    With a ``baseline``, the :data:`BASELINE_METRICS` too (``val_MAE_const_median``, ...).
    """
    values = regression_metrics(pred, target, labels)
    if baseline is not None:
        values |= baseline.metrics(pred, target)
    return {f"{prefix}{k}": float(v) for k, v in values.items()}


def pairwise_ranking_accuracy(pred: ArrayLike, target: ArrayLike) -> float:
    """Fraction of pairs with different targets whose predictions are in the same order.

    A pair whose predictions tie counts one half (neither order is claimed), so a constant
    predictor scores 0.5, the chance level; this is the concordance index (C-index).

    Returns:
        The accuracy, or NaN when no pair has different targets.
    """
    p, t = _as_1d(pred, "pred"), _as_1d(target, "target")
    _same_length(p, t, "target")
    return _PairCounts.of(p, t).ranking_accuracy()


@dataclass
class _PairCounts:
    """Counts over all pairs i < j, taken in one blocked pass (memory ~BLOCK * n)."""

    n: int = 0
    ordered: int = 0  # pairs with different targets
    agree: int = 0  # ... whose predictions are in the same order
    pred_tied: int = 0  # ... whose predictions tie
    sign_sum: float = 0.0  # sum of sign(dp) * sign(dt): concordant minus discordant (NaN: NaNs)
    ties_pred: int = 0  # pairs with tied predictions
    ties_target: int = 0  # pairs with tied targets

    @classmethod
    def of(cls, p: NDArray[np.float64], t: NDArray[np.float64]) -> _PairCounts:
        c = cls(n=p.size)
        for start in range(0, p.size, _BLOCK):
            rows = slice(start, start + _BLOCK)
            # Only pairs (i, j) with j > i: block rows against all later columns.
            later = (
                np.arange(p.size)[None, :] > np.arange(start, min(start + _BLOCK, p.size))[:, None]
            )
            dt = np.sign(t[rows, None] - t[None, :])
            dp = np.sign(p[rows, None] - p[None, :])
            ordered = later & (dt != 0)
            c.ordered += int(ordered.sum())
            c.agree += int((ordered & (dp == dt)).sum())
            c.pred_tied += int((ordered & (dp == 0)).sum())
            c.sign_sum += float((dp * dt)[later].sum())
            c.ties_pred += int((later & (dp == 0)).sum())
            c.ties_target += int((later & (dt == 0)).sum())
        return c

    def ranking_accuracy(self) -> float:
        return (self.agree + 0.5 * self.pred_tied) / self.ordered if self.ordered else NAN

    def kendall_tau_b(self) -> float:
        """Kendall's tau-b (ties in either variable corrected), as ``scipy.stats.kendalltau``."""
        total = self.n * (self.n - 1) // 2
        denominator = math.sqrt(float(total - self.ties_pred) * float(total - self.ties_target))
        if denominator == 0 or not math.isfinite(self.sign_sum):
            return NAN
        return self.sign_sum / denominator


def per_bin_errors(
    pred: ArrayLike, target: ArrayLike, edges: Sequence[float] = DEFAULT_BIN_EDGES
) -> list[dict[str, float]]:
    """Error per magnitude bin of the targets.

    Bins are ``[lo, hi)``, the last one ``[lo, hi]``; targets outside all bins are left out.

    Args:
        pred: Predicted magnitudes, shape ``(N,)``.
        target: True magnitudes, shape ``(N,)``.
        edges: Increasing bin edges (at least two).

    Returns:
        One dict per bin: ``lo``, ``hi``, ``count``, ``MAE`` and ``bias`` (mean of
        ``pred - target``; positive = overestimates); ``MAE``/``bias`` NaN for an empty bin.

    Raises:
        ValueError: Bad edges, or arrays of different lengths.
    """
    p, t = _as_1d(pred, "pred"), _as_1d(target, "target")
    _same_length(p, t, "target")
    e = [float(x) for x in edges]
    if len(e) < 2 or any(not lo < hi for lo, hi in itertools.pairwise(e)):
        raise ValueError(f"bin edges must be at least two strictly increasing values, got {e}")
    rows: list[dict[str, float]] = []
    for i, (lo, hi) in enumerate(itertools.pairwise(e)):
        last = i == len(e) - 2
        inside = (t >= lo) & ((t <= hi) if last else (t < hi))
        err = p[inside] - t[inside]
        rows.append(
            {
                "lo": lo,
                "hi": hi,
                "count": int(inside.sum()),
                "MAE": _mean(np.abs(err)),
                "bias": _mean(err),
            }
        )
    return rows


# --------------------------------------------------------------------------- helpers


def _as_1d(values: ArrayLike, name: str) -> NDArray[np.float64]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:  # (N, 1) model outputs
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {arr.shape}")
    return arr


def _same_length(a: NDArray[np.float64], b: NDArray[np.float64], name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"pred has {a.size} values but {name} has {b.size}; they must match")


def _mean(values: NDArray[Any]) -> float:
    return float(np.mean(values)) if values.size else NAN


def _spearman(p: NDArray[np.float64], t: NDArray[np.float64]) -> float:
    """Spearman's rho (Pearson's r of average ranks), as ``scipy.stats.spearmanr``."""
    if p.size < 2 or not (np.isfinite(p).all() and np.isfinite(t).all()):
        return NAN
    rp, rt = _average_ranks(p), _average_ranks(t)
    rp, rt = rp - rp.mean(), rt - rt.mean()
    denominator = math.sqrt(float((rp**2).sum()) * float((rt**2).sum()))
    return float((rp * rt).sum()) / denominator if denominator > 0 else NAN


def _average_ranks(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """1-based ranks, ties given the mean of their ranks (``scipy.stats.rankdata``)."""
    order = np.argsort(x, kind="mergesort")
    inverse = np.empty(order.size, dtype=np.intp)
    inverse[order] = np.arange(order.size)
    sorted_x = x[order]
    starts = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    dense = np.cumsum(starts)[inverse]  # 1-based index of each value's tie group
    bounds = np.r_[np.flatnonzero(starts), order.size]  # group g spans bounds[g-1]..bounds[g]
    ranks: NDArray[np.float64] = 0.5 * (bounds[dense] + bounds[dense - 1] + 1)
    return ranks

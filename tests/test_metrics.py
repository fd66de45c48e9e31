"""Metrics against hand-computed cases; undefined values are NaN, never an exception."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from quakeray.metrics import (
    BASELINE_METRICS,
    REGRESSION_METRICS,
    ConstantBaseline,
    pairwise_ranking_accuracy,
    per_bin_errors,
    regression_metrics,
    split_metrics,
)

A = np.array


def test_hand_computed_case() -> None:
    pred = A([0.5, 4.0, 6.0, 5.0])
    target = A([0.0, 4.5, 5.5, 6.0])
    m = regression_metrics(pred, target, labels=A([0, 1, 1, 1]))
    assert list(m) == list(REGRESSION_METRICS)
    assert m["MAE"] == pytest.approx((0.5 + 0.5 + 0.5 + 1.0) / 4)
    assert m["RMSE"] == pytest.approx(math.sqrt((0.25 * 3 + 1.0) / 4))
    # Ranks pred (1, 2, 4, 3) vs target (1, 2, 3, 4): sum d^2 = 2 -> 1 - 6 * 2 / (4 * 15).
    assert m["spearman"] == pytest.approx(0.8)
    # 6 pairs, one discordant (items 2 and 3): (5 - 1) / 6; ranking accuracy 5 / 6.
    assert m["kendall"] == pytest.approx(4 / 6)
    assert m["rank_acc"] == pytest.approx(5 / 6)
    assert m["detection_acc"] == 1.0
    assert m["MAE_pos"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def test_labels_default_to_positive_targets_and_threshold_is_inclusive() -> None:
    pred, target = A([1.0, 0.99, 0.2, 3.0]), A([5.0, 4.8, 0.0, 0.0])
    # pred >= 1 -> affected: [T, F, F, T] vs target > 0: [T, T, F, F] -> 2 of 4 right.
    derived = regression_metrics(pred, target)
    assert derived["detection_acc"] == pytest.approx(0.5)
    assert derived["MAE_pos"] == pytest.approx((4.0 + 3.81) / 2)
    explicit = regression_metrics(pred, target, labels=A([1, 1, 0, 0]))
    assert explicit == derived
    # Labels decide, not magnitudes: call item 3 a positive with magnitude 0.
    relabelled = regression_metrics(pred, target, labels=A([1, 1, 0, 1]))
    assert relabelled["detection_acc"] == pytest.approx(0.75)
    assert relabelled["MAE_pos"] == pytest.approx((4.0 + 3.81 + 3.0) / 3)


def test_rank_acc_excludes_target_ties_and_halves_prediction_ties() -> None:
    # (0, 1) tied predictions -> 0.5; (0, 2) and (1, 2) right -> 2.5 / 3.
    assert pairwise_ranking_accuracy(A([1.0, 1.0, 2.0]), A([0.0, 1.0, 2.0])) == pytest.approx(
        2.5 / 3
    )
    # (0, 1) tied targets: not a pair. (0, 2) wrong, (1, 2) right -> 1 / 2.
    assert pairwise_ranking_accuracy(A([3.0, 1.0, 2.0]), A([0.0, 0.0, 5.0])) == 0.5
    assert math.isnan(pairwise_ranking_accuracy(A([1.0, 2.0]), A([0.0, 0.0])))


def test_rank_acc_on_many_samples_equals_kendall_relation() -> None:
    # Without ties, concordant fraction = (1 + tau) / 2. 2,500 samples cross the row blocks.
    rng = np.random.default_rng(0)
    target = rng.uniform(4, 7.5, 2500)
    pred = target + rng.normal(0, 0.8, 2500)
    tau = stats.kendalltau(pred, target).statistic
    assert pairwise_ranking_accuracy(pred, target) == pytest.approx((1 + tau) / 2, rel=1e-9)


@pytest.mark.parametrize("n", [2, 3, 17, 2500])
@pytest.mark.parametrize("ties", [False, True])
def test_rank_correlations_equal_scipys(n: int, ties: bool) -> None:
    # quakeray computes them with NumPy (scipy.stats costs every fresh worker 0.7 s of
    # imports); scipy is the oracle. Ties: QuakeSet's negatives all have magnitude 0 and
    # clamped predictions tie at 0; 2,500 samples cross the row blocks.
    rng = np.random.default_rng(n)
    target = rng.uniform(4, 7.5, n)
    target[: n // 3] = 0.0
    pred = target + rng.normal(0, 0.8, n)
    if ties:
        target, pred = np.round(target, 1), np.clip(np.round(pred, 1), 0.0, 10.0)
    m = regression_metrics(pred, target)
    assert m["spearman"] == pytest.approx(stats.spearmanr(pred, target).statistic, abs=1e-12)
    assert m["kendall"] == pytest.approx(stats.kendalltau(pred, target).statistic, abs=1e-12)


def test_rank_correlations_of_non_finite_predictions_are_nan() -> None:
    m = regression_metrics(A([1.0, np.nan, 3.0, 2.0]), A([1.0, 2.0, 3.0, 4.0]))
    assert math.isnan(m["spearman"]) and math.isnan(m["kendall"]) and math.isnan(m["MAE"])


def test_undefined_values_are_nan_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        constant = regression_metrics(np.full(4, 5.0), A([0.0, 4.5, 5.0, 6.0]))
        no_positives = regression_metrics(A([0.2, 0.1]), A([0.0, 0.0]), labels=A([0, 0]))
        single = regression_metrics(A([5.0]), A([6.0]))
        empty = regression_metrics(A([]), A([]))
    assert math.isnan(constant["spearman"]) and math.isnan(constant["kendall"])
    assert constant["rank_acc"] == 0.5  # a constant ranks nothing: chance level
    assert constant["MAE"] == pytest.approx((5.0 + 0.5 + 0.0 + 1.0) / 4)  # the rest still works
    assert math.isnan(no_positives["MAE_pos"])
    assert no_positives["detection_acc"] == 1.0
    assert math.isnan(no_positives["rank_acc"])  # all targets tie
    assert math.isnan(single["spearman"]) and single["MAE"] == 1.0
    assert all(math.isnan(v) for v in empty.values())


def test_column_vectors_accepted_and_mismatches_rejected() -> None:
    m = regression_metrics(A([[1.0], [2.0]]), A([1.0, 2.0]))
    assert m["MAE"] == 0.0
    with pytest.raises(ValueError, match="target has 3"):
        regression_metrics(A([1.0, 2.0]), A([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="labels has 1"):
        regression_metrics(A([1.0, 2.0]), A([1.0, 2.0]), labels=A([1]))
    with pytest.raises(ValueError, match="1-D"):
        regression_metrics(np.zeros((2, 2)), np.zeros((2, 2)))


def test_per_bin_errors_hand_computed() -> None:
    pred = A([0.2, 0.0, 5.0, 9.0, 1.0])
    target = A([0.0, 0.0, 4.6, 10.0, 12.0])  # 12 is outside every bin
    rows = per_bin_errors(pred, target, edges=(0, 0.5, 4.5, 10))
    assert [(r["lo"], r["hi"], r["count"]) for r in rows] == [
        (0.0, 0.5, 2),
        (0.5, 4.5, 0),
        (4.5, 10.0, 2),  # the last bin includes its upper edge
    ]
    assert rows[0]["MAE"] == pytest.approx(0.1) and rows[0]["bias"] == pytest.approx(0.1)
    assert math.isnan(rows[1]["MAE"]) and math.isnan(rows[1]["bias"])
    assert rows[2]["MAE"] == pytest.approx(0.7) and rows[2]["bias"] == pytest.approx(-0.3)


def test_per_bin_errors_default_bins_cover_negatives_and_magnitudes() -> None:
    target = A([0.0, 4.7, 5.2, 5.7, 6.2, 6.7, 7.4])
    rows = per_bin_errors(target + 0.1, target)
    assert len(rows) == 8
    assert sum(r["count"] for r in rows) == 7
    assert rows[0]["count"] == 1 and rows[1]["count"] == 0  # nothing between 0.5 and 4.5
    with pytest.raises(ValueError, match="strictly increasing"):
        per_bin_errors(target, target, edges=(0, 5, 5))


def test_constant_baseline_scores_the_train_median_and_mean() -> None:
    # Train targets: two negatives and three positives; the median is a positive's.
    baseline = ConstantBaseline.of([0.0, 0.0, 5.0, 6.0, 7.0])
    assert (baseline.median, baseline.mean) == (5.0, 3.6)
    target = np.array([0.0, 5.0, 7.0])
    pred = np.array([1.0, 5.0, 6.0])  # MAE 2/3
    m = split_metrics(pred, target, prefix="test_", baseline=baseline)
    assert m["test_MAE_const_median"] == pytest.approx((5 + 0 + 2) / 3)
    assert m["test_MAE_const_mean"] == pytest.approx((3.6 + 1.4 + 3.4) / 3)
    assert m["test_skill"] == pytest.approx(1 - (2 / 3) / (7 / 3))
    # A constant scores skill 0 against itself; without a baseline no such keys.
    same = split_metrics(np.full(3, 5.0), target, prefix="val_", baseline=baseline)
    assert same["val_skill"] == pytest.approx(0.0)
    assert set(split_metrics(pred, target, prefix="val_")) == {
        f"val_{k}" for k in REGRESSION_METRICS
    }
    assert set(BASELINE_METRICS) <= {k.removeprefix("test_") for k in m}
    with pytest.raises(ValueError, match="at least one"):
        ConstantBaseline.of([])

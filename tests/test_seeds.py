"""Seed noise on constructed scores with a known answer: a clear gain, no gain, one seed."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from quakeray.seeds import SeedScores, paired_difference


def test_a_clear_gain_is_beyond_seed_noise() -> None:
    mse = {1: 1.00, 2: 1.20, 3: 0.90, 4: 1.10}  # seeds differ a lot...
    joint = {s: v - 0.10 + 0.01 * (s % 2) for s, v in mse.items()}  # ...the gain hardly
    d = paired_difference(joint, mse)
    diffs = [joint[s] - mse[s] for s in sorted(mse)]
    half = stats.t.ppf(0.975, 3) * stats.tstd(diffs) / 2
    assert (d.n, d.mean) == (4, pytest.approx(sum(diffs) / 4))
    assert (d.low, d.high) == (pytest.approx(d.mean - half), pytest.approx(d.mean + half))
    assert d.beyond_noise and d.high < 0
    text = d.verdict("paper", "MSE only", "test_MAE")
    assert "lowers test_MAE by 0.095" in text and "beyond seed noise" in text


def test_no_gain_is_within_seed_noise_and_unpaired_seeds_are_left_out() -> None:
    mse = {1: 1.00, 2: 1.20, 3: 0.90}
    joint = {1: 0.95, 2: 1.26, 3: 0.88, 9: 0.10}  # seed 9 has no partner
    d = paired_difference(joint, mse)
    assert d.n == 3 and d.low < 0 < d.high and not d.beyond_noise
    assert "within seed noise" in d.verdict("best", "MSE only", "test_MAE")


def test_one_seed_has_no_interval_and_says_so() -> None:
    d = paired_difference({1: 0.5}, {1: 0.7})
    assert d.n == 1 and math.isnan(d.low) and not d.beyond_noise
    assert "confirm on more seeds" in d.verdict("paper", "MSE only", "test_MAE")
    assert paired_difference({1: 0.5}, {2: 0.7}).n == 0


def test_seed_scores_text() -> None:
    assert SeedScores({1: 1.0, 2: 3.0}).text() == "2.0000 +- 1.4142 (n=2)"
    assert SeedScores({1: 1.0}).text() == "1.0000 (n=1)"

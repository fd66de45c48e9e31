"""Seed noise: a configuration's score over seeds, and whether a difference is beyond it.

Two configurations trained on the same seeds share their initialisation, shuffling and
flips per seed, so their difference is taken seed by seed (a paired comparison) and
summarised by its mean and a 95% Student-t interval. The verdict is one sentence: a gain
(or a loss) beyond seed noise when the interval excludes 0, within seed noise otherwise.

Example:
    >>> d = paired_difference({1: 0.80, 2: 0.82, 3: 0.79}, {1: 0.90, 2: 0.93, 3: 0.88})
    >>> round(d.mean, 3), d.n, d.beyond_noise
    (-0.1, 3, True)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["PairedDifference", "SeedScores", "paired_difference"]


@dataclass(frozen=True)
class SeedScores:
    """One configuration's score on each seed."""

    values: dict[int, float]  # seed -> score

    @property
    def n(self) -> int:
        """Seeds scored."""
        return len(self.values)

    @property
    def mean(self) -> float:
        """Mean over seeds."""
        return statistics.fmean(self.values.values())

    @property
    def sd(self) -> float | None:
        """Sample standard deviation over seeds (None with one seed)."""
        return statistics.stdev(self.values.values()) if self.n > 1 else None

    def text(self, digits: int = 4) -> str:
        """``0.8123 +- 0.0211 (n=3)``."""
        spread = f" +- {self.sd:.{digits}f}" if self.sd is not None else ""
        return f"{self.mean:.{digits}f}{spread} (n={self.n})"


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` over the seeds both were scored on: mean and 95% interval."""

    n: int
    mean: float
    low: float  # 95% interval; nan with fewer than two seeds
    high: float

    @property
    def beyond_noise(self) -> bool:
        """Whether the interval excludes 0 (two seeds at least)."""
        return self.n >= 2 and (self.high < 0 or self.low > 0)

    def verdict(self, a: str, b: str, metric: str) -> str:
        """One sentence: does ``a`` lower (improve, for an error) ``metric`` against ``b``?"""
        if self.n < 2:
            return (
                f"{a} against {b}: {metric} {self.mean:+.3f} on {self.n} seed; "
                "no interval with one seed: confirm on more seeds (search.confirm_seeds)"
            )
        way = "lowers" if self.mean < 0 else "raises"
        where = (
            "beyond seed noise"
            if self.beyond_noise
            else "within seed noise: no evidence of a difference"
        )
        return (
            f"{a} {way} {metric} by {abs(self.mean):.3f} against {b} "
            f"(95% CI {self.low:+.3f} to {self.high:+.3f}, {self.n} paired seeds): {where}"
        )


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> PairedDifference:
    """``a - b`` seed by seed over the seeds both have, with a 95% Student-t interval."""
    from scipy import stats

    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    n = len(diffs)
    if n == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan)
    mean = statistics.fmean(diffs)
    if n < 2:
        return PairedDifference(n, mean, math.nan, math.nan)
    half = float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
    return PairedDifference(n, mean, mean - half, mean + half)

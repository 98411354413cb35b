"""Means with 95% t intervals, and the difference of a variant from its baseline.

With n values x_i the interval is mean ± t_{0.975, n-1} · s / sqrt(n) (s the sample
standard deviation). A variant and its baseline are compared on the seeds both have
(the paired interval of the per-seed differences) when they share at least two seeds,
otherwise with Welch's unequal-variance interval (Welch-Satterthwaite degrees of
freedom) when each side has at least two seeds. With fewer seeds there is no interval
and no verdict beyond "inconclusive (1 seed)".
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

from scipy import stats as sps

LEVEL = 0.95
BETTER, WORSE, INCONCLUSIVE, ONE_SEED = "better", "worse", "inconclusive", "inconclusive (1 seed)"


@dataclass(frozen=True)
class Estimate:
    """A mean and the half width of its 95% interval (None from a single value)."""

    mean: float
    half_width: float | None
    n: int

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.half_width is None:
            return None
        return (self.mean - self.half_width, self.mean + self.half_width)

    def text(self, signed: bool = False, suffix: str = "") -> str:
        """"1.063 ± 0.0041": the mean to the last digit of the interval's half width (two
        significant digits), or to 4 significant digits without an interval."""
        sign = "+" if signed else ""
        hw = self.half_width
        if hw is None or hw == 0 or not math.isfinite(hw):
            text = f"{self.mean:{sign}.4g}{suffix}"
            return text if hw is None else f"{text} ± 0{suffix}"
        decimals = max(0, 1 - math.floor(math.log10(hw)))
        return f"{self.mean:{sign}.{decimals}f}{suffix} ± {hw:.{decimals}f}{suffix}"

    def to_json(self) -> dict[str, float | int | None]:
        lo, hi = self.interval or (None, None)
        return {"mean": self.mean, "half_width": self.half_width, "low": lo, "high": hi, "n": self.n}


def _t(df: float) -> float:
    return float(sps.t.ppf(0.5 + LEVEL / 2, df))


def estimate(values: Sequence[float]) -> Estimate:
    """Mean ± 95% t interval of one or more values (no interval from a single value)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n == 1:
        return Estimate(mean, None, 1)
    return Estimate(mean, _t(n - 1) * statistics.stdev(values) / math.sqrt(n), n)


def mean_interval(values: Sequence[float]) -> Estimate | None:
    """Mean ± 95% t interval of ``values``; None when there are none."""
    return estimate(values) if values else None


@dataclass(frozen=True)
class Difference:
    """variant - baseline, with how its interval was obtained."""

    estimate: Estimate
    method: str  # "paired" (on shared seeds), "welch", or "point" (too few seeds for an interval)


def _welch(a: Sequence[float], b: Sequence[float]) -> Estimate:
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    mean = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Estimate(mean, 0.0, len(a) + len(b))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return Estimate(mean, _t(df) * se, len(a) + len(b))


def difference(variant: Mapping[int, float], baseline: Mapping[int, float]) -> Difference:
    """variant - baseline from per-seed values (one value per seed on each side)."""
    shared = sorted(set(variant) & set(baseline))
    if len(shared) >= 2:
        return Difference(estimate([variant[s] - baseline[s] for s in shared]), "paired")
    a, b = list(variant.values()), list(baseline.values())
    if len(a) >= 2 and len(b) >= 2:
        return Difference(_welch(a, b), "welch")
    return Difference(Estimate(statistics.fmean(a) - statistics.fmean(b), None, len(a) + len(b)), "point")


def verdict(diff: Difference, mode: str = "min") -> str:
    """better / worse when the interval of the difference excludes 0 (lower is better for
    ``mode`` "min"), inconclusive when it holds 0, "inconclusive (1 seed)" without an interval."""
    interval = diff.estimate.interval
    if interval is None:
        return ONE_SEED
    lo, hi = interval if mode == "min" else (-interval[1], -interval[0])
    if hi < 0:
        return BETTER
    if lo > 0:
        return WORSE
    return INCONCLUSIVE

"""Means with 95% t intervals, and the difference of a variant from its baseline with its
standard error, interval and test (the verdicts read them: ``pact_ray.verdicts``).

With n values x_i the interval is mean ± t_{0.975, n-1} · s / sqrt(n) (s the sample
standard deviation). A variant and its baseline are compared on the seeds both have: the
paired t interval and test of the per-seed differences, when they share at least two seeds
(each seed's runs saw the same data order and initialisation, and validation uses the same
draws for every run, so pairing removes what the seed alone explains). Otherwise Welch's
unequal-variance interval and test (Welch-Satterthwaite degrees of freedom), when each side
has at least two seeds. With fewer seeds there is no interval and no verdict beyond
"inconclusive (1 seed)".

:func:`verdict` is the plain per-comparison reading of the 95% interval (better / worse when
it excludes 0), kept beside the verdicts for reference. The verdicts themselves, corrected
for the number of variants and for the looks of an adaptive sweep and read against a margin
of practical difference, are :mod:`pact_ray.verdicts`'. Dunnett's many-to-one procedure
would be sharper than their Bonferroni split, but it assumes independent groups, and the
design is paired by seed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Mapping, Sequence

from scipy import stats as sps

from pact_ray.verdicts import BETTER, INCONCLUSIVE, ONE_SEED, WORSE  # noqa: F401  (the verdicts' words, defined once)

LEVEL = 0.95
ALPHA = 1 - LEVEL


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


@lru_cache(maxsize=4096)
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
    """variant - baseline, with how its interval and test were obtained."""

    estimate: Estimate
    method: str  # "paired" (on shared seeds), "welch", or "point" (too few seeds for an interval)
    se: float | None = None  # the standard error of the mean difference (None without an interval)
    df: float | None = None  # its t degrees of freedom

    @cached_property
    def p_value(self) -> float | None:
        """The two-sided t test of "no difference"; None without an interval (computed when
        asked: an adaptive sweep's decisions read intervals, not p-values)."""
        return None if self.se is None else _two_sided_p(self.estimate.mean, self.se, self.df)

    @property
    def identical(self) -> bool:
        """Paired runs that equal the baseline's exactly, seed by seed."""
        return self.method == "paired" and self.se == 0.0 and self.estimate.mean == 0.0


def _two_sided_p(mean: float, se: float, df: float) -> float:
    if se == 0.0:  # every seed gave the same difference: certain, unless it is none
        return 1.0 if mean == 0.0 else 0.0
    return float(2 * sps.t.sf(abs(mean / se), df))


def _paired(diffs: Sequence[float]) -> Difference:
    # Plain sums rather than the statistics module: an adaptive sweep's simulation calls this
    # hundreds of thousands of times (tests/test_verdicts.py), and statistics' exact
    # fractions cost 20x more for no accuracy that matters at 2-10 values.
    n = len(diffs)
    mean = math.fsum(diffs) / n
    se = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    return Difference(Estimate(mean, _t(n - 1) * se, n), "paired", se, n - 1)


def _welch(a: Sequence[float], b: Sequence[float]) -> Difference:
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    mean = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        df = len(a) + len(b) - 2
        return Difference(Estimate(mean, 0.0, len(a) + len(b)), "welch", 0.0, df)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return Difference(Estimate(mean, _t(df) * se, len(a) + len(b)), "welch", se, df)


def difference(variant: Mapping[int, float], baseline: Mapping[int, float]) -> Difference:
    """variant - baseline from per-seed values (one value per seed on each side)."""
    shared = sorted(set(variant) & set(baseline))
    if len(shared) >= 2:
        return _paired([variant[s] - baseline[s] for s in shared])
    a, b = list(variant.values()), list(baseline.values())
    if len(a) >= 2 and len(b) >= 2:
        return _welch(a, b)
    return Difference(Estimate(statistics.fmean(a) - statistics.fmean(b), None, len(a) + len(b)), "point")


def _direction(mean: float, mode: str) -> str:
    improved = mean < 0 if mode == "min" else mean > 0
    return BETTER if improved else WORSE


def verdict(diff: Difference, mode: str = "min") -> str:
    """better / worse when the 95% interval of the difference excludes 0 (lower is better for
    ``mode`` "min"), inconclusive when it holds 0, "inconclusive (1 seed)" without an interval."""
    interval = diff.estimate.interval
    if interval is None:
        return ONE_SEED
    lo, hi = interval
    if lo > 0 or hi < 0:
        return _direction(diff.estimate.mean, mode)
    return INCONCLUSIVE

"""Verdicts that keep their error rate: simultaneous intervals, alpha spent over the looks of
an adaptive sweep, and a margin of practical difference.

**The rule.** Every verdict is read off one interval per comparison (variant minus baseline,
paired by seed, the t interval of the per-seed differences):

- *better* / *worse*: the interval excludes 0 on that side; the verdict also says whether the
  whole interval lies beyond the margin ±δ ("beyond ±δ"), inside it ("within ±δ": real but
  too small to matter) or neither ("size unclear");
- *equivalent*: the interval contains 0 and lies inside ±δ (two one-sided tests at the
  interval's level, Schuirmann 1987);
- *inconclusive*: neither;
- *identical*: the variant's runs equal the baseline's exactly, seed by seed (e.g. a variant
  that only logs diagnostics). It needs no test and leaves the family.

**Why one interval, and Bonferroni rather than Holm.** Holm's step-down test (Holm 1979) is
more powerful for "is there a difference", but it gives no intervals, and a verdict here also
claims a size (equivalent, beyond ±δ), which only an interval can back. Intervals that hold
simultaneously for the m comparisons of a family come from Bonferroni's split (each at level
1 - a/m): then the probability that *any* verdict of the family is wrong (a false better or
worse, a false equivalent, a false "beyond ±δ") is at most a, with no assumption about how the
comparisons depend on each other (they share the baseline).

**Why alpha spending with a union bound over the looks.** ``--until-conclusive MAX_SEEDS``
looks at the verdicts after every round of seeds and adds seeds where they are open: testing
at 5 % at every look makes a false verdict far likelier than 5 % (18.6 % measured for one
variant and 10 seeds). The design spends the family-wise alpha over the planned looks
n = n0 .. MAX_SEEDS with the Lan-DeMets O'Brien-Fleming-type spending function
alpha(t) = 2 - 2 Phi(z_{1 - alpha/2} / sqrt(t)), t = n / MAX_SEEDS (Lan & DeMets,
"Discrete sequential boundaries for clinical trials", Biometrika 70(3), 1983); the look at n
seeds gets the increment a_n = alpha(t_n) - alpha(t_{n-1}). The increments are used as a
Bonferroni split over the looks (each look's intervals at level 1 - a_n / m): the union
bound then gives a family-wise error of at most sum_n a_n = alpha over all the looks and all
the variants, for any stopping rule, and with the exact t distribution at every look. The
usual group-sequential boundaries (Jennison & Turnbull, *Group Sequential Methods*, 2000)
spend less conservatively by using the correlation of the looks, but they assume a known
variance, which is false at 2 to 10 seeds, where the t quantiles are far from normal. The
O'Brien-Fleming shape spends almost nothing at 2-3 seeds (where a t test with 1-2 degrees of
freedom has no power anyway) and keeps most of alpha for the last looks. The intervals shown
after an adaptive sweep are these repeated confidence intervals (Jennison & Turnbull ch. 9),
valid whatever the stopping rule did. A fixed design (no ``--until-conclusive``) has one look
with the whole alpha. tests/test_verdicts.py checks the calibration by simulation
(A/A sweeps and planted effects, through the searcher's own code).

**The margin.** δ defaults to 1 % of the baseline's value of the metric (``--margin``
changes it, relative "2%" or absolute "0.005"). 1 % because a variant that moves a
validation loss or an articulation error by less than that does not change which model a
researcher picks, and because it is about the spread of the metric over seeds of one
configuration in the short profiles (what re-running the baseline moves it by), so a
difference below it is not one the next sweep would reproduce. With common random numbers
the paired differences are very precise, so a difference can be significant and still far
inside ±δ: the verdict says so ("worse, within ±1 %") instead of calling it worse.

**Minimum detectable effect.** Each comparison also reports the difference it could have
detected with 80 % power at its own level and paired variance: k * se, with k the
noncentrality at which the two-sided t test of the interval's level rejects with probability
0.8 (the noncentral t distribution, solved exactly: the usual t_{1-L/2} + t_{0.8} shortcut
is off by up to 10 points of power at 3-5 seeds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from pact_ray.errors import ConfigError

ALPHA = 0.05
POWER = 0.8
BETTER, WORSE, EQUIVALENT, INCONCLUSIVE = "better", "worse", "equivalent", "inconclusive"
IDENTICAL = "identical"
ONE_SEED = "inconclusive (1 seed)"
NOT_FOR_CONCLUSIONS = "not for conclusions"
BEYOND, WITHIN, UNCLEAR = "beyond", "within", "size unclear"
# The verdicts whose question is still open: an adaptive sweep adds a seed to these.
OPEN = (INCONCLUSIVE, ONE_SEED)
# The fewest optimizer steps at which a comparison gets a verdict: the shortest comparison the
# design calls for (the first-third variants of the quick profile); fewer compares
# initialisations, not training.
MIN_VERDICT_STEPS = 3


@dataclass(frozen=True)
class Margin:
    """The margin of practical difference δ: relative to the baseline's value, or absolute."""

    value: float
    relative: bool = True

    @classmethod
    def parse(cls, text: str) -> "Margin":
        """"1%" (relative to the baseline) or "0.005" (in the metric's units)."""
        raw = text.strip()
        relative = raw.endswith("%")
        try:
            value = float(raw[:-1] if relative else raw)
        except ValueError:
            raise ConfigError(f"--margin {text!r} is not a number or a percentage (e.g. 1% or 0.005)") from None
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"--margin must be positive and finite, got {text!r}")
        return cls(value / 100 if relative else value, relative)

    def absolute(self, baseline_mean: float) -> float:
        return self.value * abs(baseline_mean) if self.relative else self.value

    def text(self) -> str:
        return f"±{self.value * 100:g} %" if self.relative else f"±{self.value:g}"


DEFAULT_MARGIN = Margin(0.01)


class _Mean(Protocol):
    @property
    def mean(self) -> float: ...


class Comparison(Protocol):
    """What a verdict reads of one comparison (variant minus baseline): its mean, the standard
    error and t degrees of freedom of that mean (None without an interval), and whether the
    runs equal the baseline's seed by seed. :class:`pact_ray.report.ablation.stats.Difference`
    is one; this module, below the report, does not import it."""

    @property
    def estimate(self) -> _Mean: ...

    @property
    def se(self) -> float | None: ...

    @property
    def df(self) -> float | None: ...

    @property
    def identical(self) -> bool: ...


def obrien_fleming_spent(t: float, alpha: float = ALPHA) -> float:
    """Lan-DeMets O'Brien-Fleming-type spending: the alpha spent by information fraction t."""
    from scipy import stats as sps

    if t <= 0:
        return 0.0
    return float(2 - 2 * sps.norm.cdf(sps.norm.ppf(1 - alpha / 2) / math.sqrt(min(t, 1.0))))


@dataclass(frozen=True)
class Design:
    """When and at what level verdicts are taken.

    ``max_seeds`` None: a fixed design, one look at whatever seeds ran, with the whole alpha.
    Otherwise an adaptive one: looks at ``first_look`` .. ``max_seeds`` seeds, alpha spent
    over them (the module's docstring)."""

    alpha: float = ALPHA
    margin: Margin = DEFAULT_MARGIN
    max_seeds: int | None = None
    first_look: int = 2

    def __post_init__(self) -> None:
        if self.max_seeds is not None and self.max_seeds < max(2, self.first_look):
            raise ConfigError(f"an adaptive design needs at least {max(2, self.first_look)} seeds, got {self.max_seeds}")

    @property
    def adaptive(self) -> bool:
        return self.max_seeds is not None

    def level(self, n: int) -> float:
        """The family-wise alpha of the look at ``n`` seeds (0 where the design takes none)."""
        return _look_level(self.alpha, self.max_seeds, max(2, self.first_look), n)

    def describe(self) -> str:
        if not self.adaptive:
            return f"fixed seeds, family-wise {self.alpha:.0%}"
        return (f"adaptive seeds {max(2, self.first_look)}..{self.max_seeds}, family-wise {self.alpha:.0%} "
                "spent over the looks (O'Brien-Fleming)")

    def to_json(self) -> dict:
        return {"alpha": self.alpha, "margin": self.margin.value, "margin_relative": self.margin.relative,
                "max_seeds": self.max_seeds, "first_look": max(2, self.first_look)}


@lru_cache(maxsize=None)
def _look_level(alpha: float, max_seeds: int | None, first: int, n: int) -> float:
    if max_seeds is None:
        return alpha if n >= 2 else 0.0
    if n < first or n > max_seeds:
        return 0.0
    before = obrien_fleming_spent((n - 1) / max_seeds, alpha) if n > first else 0.0
    return obrien_fleming_spent(n / max_seeds, alpha) - before


@lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    from scipy import stats as sps

    return float(sps.t.ppf(p, df))


def t_power(q: float, df: float, nc: float) -> float:
    """P(|T| > q) for T noncentral t with ``df`` degrees of freedom and noncentrality ``nc``:
    the power of a two-sided t test with critical value q. By hand as one integral over the
    chi-square variable, T = (Z + nc) / sqrt(V / df): scipy's ``nct`` returns NaN or values off
    by 0.1 at 2-4 degrees of freedom and the quantiles of small family-wise levels."""
    from scipy import integrate

    half = df / 2
    log_norm = -half * math.log(2) - math.lgamma(half)

    def density(v: float) -> float:  # P(reject | V = v) times the chi-square density of V (math, not scipy: 100x faster)
        if v <= 0:
            return 0.0
        s = q * math.sqrt(v / df)
        reject = 0.5 * math.erfc((s - nc) / math.sqrt(2)) + 0.5 * math.erfc((s + nc) / math.sqrt(2))
        return reject * math.exp(log_norm + (half - 1) * math.log(v) - v / 2)

    value, _ = integrate.quad(density, 0.0, math.inf, limit=200)
    return float(value)


@lru_cache(maxsize=4096)
def detectable_multiple(level: float, df: float, power: float = POWER) -> float:
    """The true difference, in standard errors, that a two-sided t test at ``level`` with
    ``df`` degrees of freedom detects with probability ``power``."""
    from scipy import optimize

    q = t_quantile(1 - level / 2, df)
    high = 2 * q + 10
    while t_power(q, df, high) < power:
        high *= 2
    return float(optimize.brentq(lambda nc: t_power(q, df, nc) - power, 0.0, high, xtol=1e-10))


@dataclass(frozen=True)
class Decision:
    """One comparison's verdict, read off its simultaneous interval."""

    verdict: str
    magnitude: str  # BEYOND, WITHIN or UNCLEAR for better/worse; "" otherwise
    interval: tuple[float, float] | None  # variant - baseline at level 1 - ``level``
    level: float  # the interval's two-sided miscoverage (the look's alpha / family size)
    margin: float | None  # δ in the metric's units
    mde: float | None  # the |difference| detectable with 80 % power at this level

    @property
    def text(self) -> str:
        """"worse, within" / "equivalent" / "better, beyond": :meth:`describe` without the margin."""
        return f"{self.verdict}, {self.magnitude}" if self.magnitude else self.verdict

    def describe(self, margin: str) -> str:
        """The verdict as the route status prints it, with the margin's text (e.g. "±1 %"):
        "worse, within ±1 %", "equivalent within ±1 %", "better, size unclear"."""
        if not margin or self.verdict not in (BETTER, WORSE, EQUIVALENT):
            return self.text
        if self.verdict == EQUIVALENT:
            return f"{EQUIVALENT} within {margin}"
        return f"{self.verdict}, {self.magnitude} {margin}" if self.magnitude in (BEYOND, WITHIN) else self.text


def is_identical(diff: Comparison | None) -> bool:
    return diff is not None and diff.identical


def decide(diff: Comparison, level: float, margin: float | None, mode: str = "min") -> Decision:
    """The verdict of one comparison whose interval has two-sided miscoverage ``level``."""
    if diff.identical:
        return Decision(IDENTICAL, "", (0.0, 0.0), 0.0, margin, None)
    if diff.se is None or diff.df is None:
        return Decision(ONE_SEED, "", None, level, margin, None)
    if level <= 0:  # not a look of this design (e.g. fewer seeds than its first look)
        return Decision(INCONCLUSIVE, "", None, level, margin, None)
    q = t_quantile(1 - level / 2, diff.df)
    mean, half = diff.estimate.mean, q * diff.se
    lo, hi = mean - half, mean + half
    mde = detectable_multiple(level, diff.df) * diff.se
    delta = margin if margin is not None else 0.0
    if lo > 0 or hi < 0:
        improved = hi < 0 if mode == "min" else lo > 0
        verdict = BETTER if improved else WORSE
        if margin is None:
            magnitude = ""
        elif lo > delta or hi < -delta:
            magnitude = BEYOND
        elif -delta <= lo and hi <= delta:
            magnitude = WITHIN
        else:
            magnitude = UNCLEAR
        return Decision(verdict, magnitude, (lo, hi), level, margin, mde)
    if margin is not None and -delta <= lo and hi <= delta:
        return Decision(EQUIVALENT, "", (lo, hi), level, margin, mde)
    return Decision(INCONCLUSIVE, "", (lo, hi), level, margin, mde)


def decide_family(diffs: list[Comparison | None], seeds: list[int], baselines: list[float | None], design: Design,
                  mode: str = "min") -> list[Decision | None]:
    """The verdicts of one family (the variants compared with one baseline on one metric), in
    order: comparison i has ``seeds[i]`` seeds and baseline mean ``baselines[i]`` (for a
    relative margin). Identical comparisons and those without a test leave the family; the
    others share the look's alpha equally (Bonferroni)."""
    tested = [d is not None and not d.identical and d.se is not None for d in diffs]
    m = max(sum(tested), 1)
    out: list[Decision | None] = []
    for d, n, base in zip(diffs, seeds, baselines):
        if d is None:
            out.append(None)
            continue
        margin = design.margin.absolute(base) if base is not None else None
        out.append(decide(d, design.level(n) / m, margin, mode))
    return out

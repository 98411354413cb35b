"""The verdicts' decision rules are calibrated: shown by simulation through the real code.

Every simulated sweep drives :class:`AdaptiveSeedSearcher` through Ray Tune's public Searcher
API (``suggest``, ``on_trial_result``, ``on_trial_complete``), with no Ray cluster: each
suggested (variant, seed) trial "trains" to a validation value drawn from the model below,
and the searcher decides which seeds run next and what the verdicts are.

The model is this project's situation: each seed has an offset shared by every variant (the
seed fixes the data order, the initialisation and the validation draws: common random
numbers), which dominates the run noise of each trial (sd 1 against 0.1), and a variant's
true effect is added to its runs. The metric's level (5) puts the default 1 % margin at 0.05,
inside the paired noise (0.14), so that A/A variants stay open and the rule takes every look
it can: the hardest case for its error rate.

A false verdict in an A/A sweep is any "better" or "worse" (every variant equals the
baseline). The family-wise rate must be at most 5 % plus 3 Monte-Carlo standard errors
(sqrt(0.05 * 0.95 / N)). The same rule without the spending (5 % at every look) fails that
bound, which shows the test can fail.

Measured (N = 10,000 each; 2026-12-06), false-verdict rate of the adaptive rule from 1 seed:
1 variant, MAX_SEEDS 5: 4.2 %; 1 variant, 10: 2.8 %; 7 variants, 5: 3.6 %; 7 variants, 10:
3.0 %; the fixed 3-seed design: 4.6 % (7 variants). The naive rule (5 % at every look): 13 %
(1 variant, 5), 19 % (1, 10), 22 % (7, 10). Power and trials for a planted effect: see
:func:`test_planted_effects_power_and_cost`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from pact_ray.metrics import names as M
from pact_ray.tune.adaptive import BASELINE, AdaptiveSeedSearcher
from pact_ray.verdicts import BETTER, EQUIVALENT, WORSE, Design, Margin

ALPHA = 0.05
SEED_SD, RUN_SD, LEVEL = 1.0, 0.1, 5.0


def _bound(n: int) -> float:
    """The largest false-verdict rate a calibrated rule shows in ``n`` sweeps: 5 % + 3 SE."""
    return ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / n)


@dataclass
class Outcome:
    verdicts: dict[str, str]
    trials: int


def simulate(rng: np.random.Generator, variants: int, max_seeds: int, effects: dict[str, float] | None = None,
             seeds: int = 1, design: Design | None = None) -> Outcome:
    """One sweep: ``variants`` variants and the baseline, from ``seeds`` seeds, up to
    ``max_seeds``; ``effects`` variant -> true difference from the baseline."""
    names = [BASELINE] + [f"v{i}" for i in range(variants)]
    searcher = AdaptiveSeedSearcher({"profile": "quick"}, names, list(range(seeds)), max_seeds)
    if design is not None:
        searcher.design = design
    offsets: dict[int, float] = {}
    effects = effects or {}
    trials = 0
    while True:
        trial_id = f"t{trials}"
        config = searcher.suggest(trial_id)
        if config == AdaptiveSeedSearcher.FINISHED:
            return Outcome(searcher.verdicts(), trials)
        assert config is not None, "every trial of the round ended: the searcher must not wait"
        variant, seed = config["variant"], config["seed"]
        offset = offsets.setdefault(seed, rng.normal(0.0, SEED_SD))
        value = LEVEL + offset + effects.get(variant, 0.0) + rng.normal(0.0, RUN_SD)
        result = {M.STEP: 8, M.VAL_LOSS: float(value)}
        searcher.on_trial_result(trial_id, result)
        searcher.on_trial_complete(trial_id, result)
        trials += 1


def false_rate(outcomes: list[Outcome]) -> float:
    return sum(any(v.startswith((BETTER, WORSE)) for v in o.verdicts.values()) for o in outcomes) / len(outcomes)


class _NoSpending(Design):
    """The rule as it was: every look at the full 5 %."""

    def level(self, n: int) -> float:
        return self.alpha if n >= 2 else 0.0


def a_a_sweeps(variants: int, max_seeds: int, n: int, rng_seed: int, seeds: int = 1) -> tuple[float, float]:
    """(false-verdict rate, mean trials) of ``n`` A/A sweeps."""
    rng = np.random.default_rng(rng_seed)
    outcomes = [simulate(rng, variants, max_seeds, seeds=seeds) for _ in range(n)]
    return false_rate(outcomes), float(np.mean([o.trials for o in outcomes]))


A_A = {(1, 5): 1005, (1, 10): 1010, (7, 5): 7005, (7, 10): 7010}  # (variants, MAX_SEEDS) -> the simulation's seed
N_A_A = 10_000


@pytest.fixture(scope="module")
def a_a() -> dict[tuple[int, int], tuple[float, float]]:
    """The 10,000 A/A sweeps of each design, two designs at a time: each simulation is one
    Python thread of work, and the machine has a second core (separate processes, started
    fresh: the test process may hold Ray's and torch's threads)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {k: pool.submit(a_a_sweeps, *k, N_A_A, seed) for k, seed in A_A.items()}
        return {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize("variants, max_seeds", list(A_A))
def test_adaptive_seeding_keeps_the_family_wise_error(a_a, variants, max_seeds):
    rate, trials = a_a[(variants, max_seeds)]
    assert rate <= _bound(N_A_A), f"false verdicts in {rate:.2%} of {N_A_A} A/A sweeps"
    # The sweeps really looked again and again: most variants reached the cap.
    assert trials > 0.8 * (variants + 1) * max_seeds


def test_the_rule_without_spending_fails_the_same_check():
    """The same simulation catches optional stopping: 5 % at every look is far above 5 %."""
    n = 2_000
    rng = np.random.default_rng(7)
    naive = _NoSpending(max_seeds=10, first_look=2)
    rate = false_rate([simulate(rng, 1, 10, design=naive) for _ in range(n)])
    assert rate > _bound(n) + 0.03, rate


def test_a_fixed_seed_design_keeps_the_family_wise_error():
    """Three seeds, one look (what a sweep without --until-conclusive does)."""
    rate, trials = a_a_sweeps(7, 3, N_A_A, 3, seeds=3)
    assert trials == 8 * 3  # every variant and the baseline at its 3 seeds, no more
    assert rate <= _bound(N_A_A)


def test_planted_effects_power_and_cost():
    """One variant 0.3 better (about 2 paired standard deviations, 6 % of the metric, far
    beyond the 1 % margin) among 7. Measured (N = 2,000): at MAX_SEEDS 10, power 95 % with
    77 trials on average, against 99.8 % and 80 trials for the fixed 10-seed design (one look
    at the whole 5 %); at MAX_SEEDS 5, 35 % with 40 trials against 51 % and 40. Alpha spent on
    early looks is the price of being allowed to look: this A/A-heavy design rarely stops
    early, so it saves few trials; a sweep whose variants settle (equivalent or clearly
    different) saves many (test below). No false verdict among the six A/A variants above
    5 %; the planted variant never reads "equivalent"."""
    n = 2_000
    rng = np.random.default_rng(11)
    outcomes = [simulate(rng, 7, 10, effects={"v0": -0.3}) for _ in range(n)]
    power = sum(o.verdicts["v0"].startswith(BETTER) for o in outcomes) / n
    trials = float(np.mean([o.trials for o in outcomes]))
    assert power >= 0.9, power
    assert trials < 8 * 10  # fewer trials than running every variant to the cap
    others = [Outcome({k: v for k, v in o.verdicts.items() if k != "v0"}, o.trials) for o in outcomes]
    assert false_rate(others) <= _bound(n)
    assert not any(o.verdicts["v0"].startswith(EQUIVALENT) for o in outcomes)


def test_equivalence_is_declared_when_the_margin_allows_and_stops_the_sweep_early():
    """With a margin the paired noise can resolve (10 % of the metric: 0.5), A/A variants are
    called equivalent within a few seeds, and the sweep stops before the cap (measured: 50
    trials on average against 80)."""
    rng = np.random.default_rng(5)
    design = Design(margin=Margin(0.10), max_seeds=10, first_look=2)
    outcomes = [simulate(rng, 7, 10, design=design) for _ in range(500)]
    verdicts = [v for o in outcomes for v in o.verdicts.values()]
    assert sum(v.startswith(EQUIVALENT) for v in verdicts) / len(verdicts) > 0.95
    assert np.mean([o.trials for o in outcomes]) < 0.7 * 8 * 10
    assert false_rate(outcomes) <= _bound(500)


def test_spending_adds_up_to_alpha_and_is_back_loaded():
    for max_seeds, first in ((5, 2), (10, 2), (6, 3)):
        design = Design(max_seeds=max_seeds, first_look=first)
        levels = [design.level(n) for n in range(first, max_seeds + 1)]
        assert math.isclose(sum(levels), ALPHA, rel_tol=1e-12)
        assert levels == sorted(levels) and levels[0] < levels[-1] / 3  # little at the first look, most at the last
        assert design.level(first - 1) == 0 and design.level(max_seeds + 1) == 0
    assert Design().level(3) == ALPHA and Design().level(1) == 0  # a fixed design: one look, the whole alpha

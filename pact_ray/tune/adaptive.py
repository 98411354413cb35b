"""Adaptive seeds (``--until-conclusive MAX_SEEDS``): add seeds only where a verdict is open.

A Ray Tune :class:`~ray.tune.search.Searcher` that runs the grid of variants x seeds, and
when every trial of a round has ended, compares each variant with the baseline the way the
route status does (held-out validation metric at the variant's last validation step, paired
by seed, read off the simultaneous interval of the look; ``pact_ray.verdicts``).
Every variant whose verdict is still inconclusive and has fewer than ``max_seeds`` seeds
gets its next seed (and the baseline that seed, so the pair exists), and a new round starts;
the search ends when no variant needs one. Variants whose runs diverged or whose OT plans
did not converge get no more seeds (no verdict is coming).

Looking after every round and stopping where a verdict appears is optional stopping: tested
at 5 % at each look, a false verdict comes out of 13-21 % of A/A sweeps. The searcher's
:class:`~pact_ray.verdicts.Design` spends the family-wise alpha over the
planned looks (O'Brien-Fleming-type spending, a union bound over the looks), so the error
stays at 5 % over all of them; tests/test_verdicts.py simulates 10,000 sweeps through this
class to show it. :meth:`AdaptiveSeedSearcher.verdicts` is the rule, for anyone to rerun.

Finished trials are never run again: the searcher's state (which (variant, seed) ran, what
each reported) is saved with Tune's experiment state and restored by ``--resume``, so an
interrupted adaptive sweep continues where it stopped.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

from ray.tune.search import Searcher

from pact_ray.fileio import write_json_atomic
from pact_ray.metrics import names as M
from pact_ray.report.ablation.route import MARGINAL_ERROR_MAX
from pact_ray.report.ablation.stats import difference
from pact_ray.verdicts import ALPHA, DEFAULT_MARGIN, ONE_SEED, OPEN, Decision, Design, Margin, decide_family

BASELINE = "baseline"


class AdaptiveSeedSearcher(Searcher):
    """Grid of ``variants`` x ``seeds``, then more seeds for open verdicts, up to ``max_seeds``."""

    def __init__(self, base: dict[str, Any], variants: list[str], seeds: list[int], max_seeds: int,
                 metric: str = M.VAL_LOSS, mode: str = "min", margin: Margin = DEFAULT_MARGIN, alpha: float = ALPHA):
        super().__init__(metric=metric, mode=mode)
        self.design = Design(alpha, margin, max_seeds, first_look=max(2, len(seeds[:max_seeds])))
        if BASELINE not in variants:
            raise ValueError(f"adaptive seeds compare with the {BASELINE!r} variant; it must be among the variants")
        self.base = dict(base)
        self.variants = list(variants)
        self.max_seeds = max_seeds
        self.queue: list[tuple[str, int]] = [(v, s) for v in variants for s in seeds[:max_seeds]]
        self.trials: dict[str, tuple[str, int]] = {}  # trial id -> (variant, seed)
        self.pending: set[str] = set()
        self.curves: dict[str, dict[int, dict[int, float]]] = {}  # variant -> seed -> {step: validation metric}
        self.invalid: dict[str, str] = {}  # variant -> why it gets no verdict
        self.failed: set[tuple[str, int]] = set()
        self.rounds: list[dict[str, Any]] = []  # one entry per decision: the verdicts and the seeds added
        self.finished = False

    # ------------------------------------------------------------ Tune's hooks
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.finished:
            return Searcher.FINISHED
        if not self.queue:
            if self.pending:
                return None  # the round is still running
            self.queue = self.next_round()
            if not self.queue:
                self.finished = True
                return Searcher.FINISHED
        variant, seed = self.queue.pop(0)
        self.trials[trial_id] = (variant, seed)
        self.pending.add(trial_id)
        return {**self.base, "variant": variant, "seed": seed}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        key = self.trials.get(trial_id)
        if key is None:
            return
        value, step = result.get(self.metric), result.get(M.STEP)
        if isinstance(value, (int, float)) and isinstance(step, (int, float)):
            self.curves.setdefault(key[0], {}).setdefault(key[1], {})[int(step)] = float(value)
        diverged = (result.get(M.NONFINITE_STEPS) or 0) > 0 or (isinstance(value, float) and not math.isfinite(value))
        if diverged:
            self.invalid[key[0]] = "diverged: non-finite loss"
        error = result.get(M.MARGINAL_ERROR)
        if isinstance(error, (int, float)) and error > MARGINAL_ERROR_MAX:
            self.invalid.setdefault(key[0], f"OT plans did not converge: marginal error {error:.2g} > {MARGINAL_ERROR_MAX:g}")

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if result:
            self.on_trial_result(trial_id, result)
        self.pending.discard(trial_id)
        if trial_id in self.trials:
            (self.failed.add if error else self.failed.discard)(self.trials[trial_id])

    def save(self, checkpoint_path: str) -> None:
        """The searcher's state as JSON: read back by --resume from the sweep's storage, which
        must not run code (Ray's own experiment state is pickled; see docs/sweeps.md)."""
        write_json_atomic(checkpoint_path, _to_json(self.get_state()))

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, encoding="utf-8") as f:
            self.set_state(_from_json(json.load(f)))

    def get_state(self) -> dict[str, Any]:
        # Pending trials stay pending: Tune restores and reruns them under the same ids.
        return {k: v for k, v in self.__dict__.items() if k in _STATE}

    def set_state(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------ the decision
    def seeds_of(self, variant: str) -> list[int]:
        """The seeds ``variant`` has run (or been given), failed ones included."""
        return sorted(self._given().get(variant, ()))

    def _given(self) -> dict[str, set[int]]:
        """Each variant's seeds that ran or are queued."""
        given: dict[str, set[int]] = {}
        for v, s in itertools.chain(self.trials.values(), self.queue):
            given.setdefault(v, set()).add(s)
        return given

    def decisions(self) -> dict[str, Decision | None]:
        """Each valid non-baseline variant's decision on the results so far (None: nothing to
        compare yet), at the look of its seed count."""
        names = [v for v in self.variants if v != BASELINE and v not in self.invalid]
        baseline = self.curves.get(BASELINE, {})
        diffs, seeds, means = [], [], []
        for variant in names:
            curves = self.curves.get(variant)
            step = min(max(c) for c in curves.values()) if curves else None
            values = {s: c[step] for s, c in curves.items() if step in c} if curves else {}
            base = {s: c[step] for s, c in baseline.items() if step in c}
            diffs.append(difference(values, base) if values and base else None)
            seeds.append(len(set(values) & set(base)))
            means.append(sum(base.values()) / len(base) if base else None)
        decided = decide_family(diffs, seeds, means, self.design, self.mode)
        return dict(zip(names, decided))

    def verdicts(self) -> dict[str, str]:
        """Each valid non-baseline variant's verdict as the route status prints it
        ("equivalent", "worse, within ±δ", "inconclusive (1 seed)", ...)."""
        margin = self.design.margin.text()  # relative margins print as the route status's "±1 %"
        return {v: (d.describe(margin) if d else ONE_SEED) for v, d in self.decisions().items()}

    def next_round(self) -> list[tuple[str, int]]:
        """The (variant, seed) trials of the next round; empty when every verdict is settled or capped."""
        verdicts = self.verdicts()
        given = self._given()
        baseline = given.setdefault(BASELINE, set())
        added: list[tuple[str, int]] = []
        for variant, verdict in verdicts.items():
            seeds = given.get(variant, set())
            if verdict not in OPEN or len(seeds) >= self.max_seeds:
                continue
            seed = next(s for s in range(max(seeds, default=-1) + 2) if s not in seeds)
            added.append((variant, seed))
            if seed not in baseline:
                baseline.add(seed)
                added.append((BASELINE, seed))
        self.rounds.append({"verdicts": verdicts, "invalid": dict(self.invalid), "added": added})
        return sorted(added, key=lambda t: (t[0] != BASELINE, t))


_STATE = ("base", "variants", "max_seeds", "design", "queue", "trials", "pending", "curves", "invalid", "failed", "rounds", "finished",
          "_metric", "_mode")


def _to_json(state: dict[str, Any]) -> dict[str, Any]:
    d = state["design"]
    return {**state, "design": {"alpha": d.alpha, "margin": {"value": d.margin.value, "relative": d.margin.relative},
                                "max_seeds": d.max_seeds, "first_look": d.first_look},
            "queue": [list(t) for t in state["queue"]], "trials": {k: list(t) for k, t in state["trials"].items()},
            "pending": sorted(state["pending"]), "failed": sorted(list(t) for t in state["failed"]),
            "curves": {v: {str(seed): {str(step): x for step, x in c.items()} for seed, c in by_seed.items()}
                       for v, by_seed in state["curves"].items()},
            "rounds": [{**r, "added": [list(t) for t in r["added"]]} for r in state["rounds"]]}


def _from_json(state: dict[str, Any]) -> dict[str, Any]:
    d = state["design"]
    return {**state, "design": Design(d["alpha"], Margin(**d["margin"]), d["max_seeds"], d["first_look"]),
            "queue": [tuple(t) for t in state["queue"]], "trials": {k: tuple(t) for k, t in state["trials"].items()},
            "pending": set(state["pending"]), "failed": {tuple(t) for t in state["failed"]},
            "curves": {v: {int(seed): {int(step): x for step, x in c.items()} for seed, c in by_seed.items()}
                       for v, by_seed in state["curves"].items()},
            "rounds": [{**r, "added": [tuple(t) for t in r["added"]]} for r in state["rounds"]]}

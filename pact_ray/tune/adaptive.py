"""Adaptive seeds (``--until-conclusive MAX_SEEDS``): add seeds only where a verdict is open.

A Ray Tune :class:`~ray.tune.search.Searcher` that runs the grid of variants x seeds, and
when every trial of a round has ended, compares each variant with the baseline the way the
route status does (held-out validation metric at the variant's last validation step,
paired by seed, Holm-corrected over the variants; ``pact_ray.report.ablation.stats``).
Every variant whose corrected verdict is still inconclusive and has fewer than
``max_seeds`` seeds gets its next seed (and the baseline that seed, so the pair exists),
and a new round starts; the search ends when no variant needs one. Variants whose runs
diverged or whose OT plans did not converge get no more seeds (no verdict is coming).

Finished trials are never run again: the searcher's state (which (variant, seed) ran, what
each reported) is saved with Tune's experiment state and restored by ``--resume``, so an
interrupted adaptive sweep continues where it stopped.
"""

from __future__ import annotations

import math
import pickle
from typing import Any

from ray.tune.search import Searcher

from pact_ray.metrics import names as M
from pact_ray.report.ablation.route import MARGINAL_ERROR_MAX
from pact_ray.report.ablation.stats import INCONCLUSIVE, ONE_SEED, corrected_verdicts, difference

BASELINE = "baseline"
OPEN = (INCONCLUSIVE, ONE_SEED)


class AdaptiveSeedSearcher(Searcher):
    """Grid of ``variants`` x ``seeds``, then more seeds for open verdicts, up to ``max_seeds``."""

    def __init__(self, base: dict[str, Any], variants: list[str], seeds: list[int], max_seeds: int,
                 metric: str = M.VAL_LOSS, mode: str = "min"):
        super().__init__(metric=metric, mode=mode)
        if BASELINE not in variants:
            raise ValueError(f"adaptive seeds compare with the {BASELINE!r} variant; it must be among the variants")
        self.base = dict(base)
        self.variants = list(variants)
        self.max_seeds = max_seeds
        self.queue: list[tuple[str, int]] = [(v, s) for v in variants for s in seeds[:max_seeds]]
        self.trials: dict[str, tuple[str, int]] = {}  # trial id -> (variant, seed)
        self.pending: set[str] = set()
        self.curves: dict[tuple[str, int], dict[int, float]] = {}  # (variant, seed) -> {step: validation metric}
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
            self.curves.setdefault(key, {})[int(step)] = float(value)
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
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    def get_state(self) -> dict[str, Any]:
        # Pending trials stay pending: Tune restores and reruns them under the same ids.
        return {k: v for k, v in self.__dict__.items() if k in _STATE}

    def set_state(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------ the decision
    def seeds_of(self, variant: str) -> list[int]:
        """The seeds ``variant`` has run (or been given), failed ones included."""
        return sorted({s for v, s in self.trials.values() if v == variant} | {s for v, s in self.queue if v == variant})

    def verdicts(self) -> dict[str, str]:
        """Each non-baseline variant's Holm-corrected verdict on the results so far."""
        names = [v for v in self.variants if v != BASELINE and v not in self.invalid]
        diffs = []
        for variant in names:
            last_steps = [max(c) for (v, _), c in self.curves.items() if v == variant and c]
            if not last_steps:
                diffs.append(None)
                continue
            step = min(last_steps)
            values = {s: c[step] for (v, s), c in self.curves.items() if v == variant and step in c}
            base = {s: c[step] for (v, s), c in self.curves.items() if v == BASELINE and step in c}
            diffs.append(difference(values, base) if values and base else None)
        corrected, _ = corrected_verdicts(diffs, self.mode)
        return {v: (c or ONE_SEED) for v, c in zip(names, corrected)}

    def next_round(self) -> list[tuple[str, int]]:
        """The (variant, seed) trials of the next round; empty when every verdict is settled or capped."""
        verdicts = self.verdicts()
        added: list[tuple[str, int]] = []
        for variant, verdict in verdicts.items():
            seeds = self.seeds_of(variant)
            if verdict not in OPEN or len(seeds) >= self.max_seeds:
                continue
            seed = next(s for s in range(max(seeds, default=-1) + 2) if s not in seeds)
            added.append((variant, seed))
            if seed not in self.seeds_of(BASELINE) and (BASELINE, seed) not in added:
                added.append((BASELINE, seed))
        self.rounds.append({"verdicts": verdicts, "invalid": dict(self.invalid), "added": added})
        return sorted(added, key=lambda t: (t[0] != BASELINE, t))


_STATE = ("base", "variants", "max_seeds", "queue", "trials", "pending", "curves", "invalid", "failed", "rounds", "finished",
          "_metric", "_mode")

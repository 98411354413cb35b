"""Tuned variants: where the runs of one variant in one setting vary config knobs (an
Optuna sweep over ``router.*``), how much each knob matters for the final objective.

The finished runs become the trials of an in-memory Optuna study (the knob values on
distributions spanning the tried values, the final metric as the objective), and
Optuna's fANOVA evaluator (random-forest functional ANOVA, Hutter et al. 2014, fixed
seed) splits the objective's variance between the knobs: importances sum to 1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from pact_ray.report.ablation.groups import Setting, knob_values, objective, setting_label, variant_runs
from pact_ray.report.summary import SummaryData, variant_label

IMPORTANCE_SEED = 0
LOG_SPAN = 10.0  # a positive knob whose tried values span this factor gets a log-scale distribution


@dataclass(frozen=True)
class TunedVariant:
    """The finished runs of one variant in one setting that vary ``knobs``."""

    setting: Setting
    variant: str
    knobs: list[str]
    trials: list[tuple[dict[str, str], float]]  # (knob values as logged, final metric)
    metric: str
    mode: str
    importances: dict[str, float] = field(default_factory=dict)  # knob -> share of variance (sums to 1)
    note: str = ""  # why there are no importances

    @property
    def slug(self) -> str:
        """A file-name-safe id: "stage1_quick_small_rgb_edge"."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join((*self.setting, self.variant)))

    @property
    def png(self) -> str:
        """The file of its parallel-coordinates plot."""
        return f"parallel_{self.slug}.png"

    @property
    def title(self) -> str:
        return f"{setting_label(self.setting)} · {variant_label(self.setting[0], self.variant)}"

    def numeric(self, knob: str) -> list[float]:
        """The knob's value in each trial as a number (categories as their sorted index)."""
        values = [p[knob] for p, _ in self.trials]
        if all(_is_number(v) for v in values):
            return [float(v) for v in values]
        categories = sorted(set(values))
        return [float(categories.index(v)) for v in values]

    def to_json(self) -> dict[str, Any]:
        kind, profile, model = self.setting
        return {"kind": kind, "profile": profile, "model": model, "variant": self.variant, "knobs": self.knobs,
                "metric": self.metric, "trials": len(self.trials), "importances": self.importances, "note": self.note,
                "parallel_coordinates": self.png}


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _distribution(values: list[str]) -> BaseDistribution:
    if all(_is_number(v) for v in values):
        nums = [float(v) for v in values]
        lo, hi = min(nums), max(nums)
        if all(n.is_integer() and "." not in v and "e" not in v.lower() for n, v in zip(nums, values)):
            return IntDistribution(int(lo), int(hi))
        return FloatDistribution(lo, hi, log=lo > 0 and hi / lo >= LOG_SPAN)
    return CategoricalDistribution(sorted(set(values)))


def _typed(value: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, IntDistribution):
        return int(float(value))
    if isinstance(dist, FloatDistribution):
        return float(value)
    return value


def param_importances(knobs: list[str], trials: list[tuple[dict[str, str], float]], mode: str) -> dict[str, float]:
    """fANOVA importance of each knob for the final metric (Optuna's evaluator, fixed seed).

    Raises ValueError when the metric does not vary (nothing to attribute)."""
    if len({v for _, v in trials}) < 2:
        raise ValueError("the final metric is the same in every run")
    dists = {k: _distribution([p[k] for p, _ in trials]) for k in knobs}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
        for params, value in trials:
            study.add_trial(optuna.trial.create_trial(params={k: _typed(params[k], d) for k, d in dists.items()},
                                                      distributions=dists, value=value))
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=IMPORTANCE_SEED)
        try:
            result = optuna.importance.get_param_importances(study, evaluator=evaluator, params=knobs)
        except RuntimeError as e:  # fANOVA: "zero total variance in all trees"
            raise ValueError(str(e)) from None
    finally:
        optuna.logging.set_verbosity(verbosity)
    return {k: float(v) for k, v in result.items()}


def tuned_variants(data: SummaryData) -> list[TunedVariant]:
    """Every (setting, variant) whose finished runs vary some config knob, with knob importances."""
    out = []
    for g in variant_runs(data):
        metric, mode = objective(g.setting[0])
        scored = [r for r in g.finished if r.get(metric) is not None]
        # Like with like: only the runs validated at the group's last step (not those ASHA stopped earlier).
        last = max((r.get("val_step") or 0 for r in scored), default=0)
        scored = [r for r in scored if (r.get("val_step") or 0) == last]
        if not g.knobs or len(scored) < 2:
            continue
        trials = [(knob_values(data, r, g.knobs), r[metric]) for r in scored]
        try:
            importances, note = param_importances(g.knobs, trials, mode), ""
        except ValueError as e:
            importances, note = {}, f"no importances: {e}"
        out.append(TunedVariant(g.setting, g.variant, g.knobs, trials, metric, mode, importances, note))
    return out

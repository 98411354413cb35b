"""Route status: every variant configuration against the baseline of its setting.

For each configuration (a variant's seeds; each value set of a tuned variant on its
own), over its finished runs: the final objective (loss) as mean ± 95% interval, its
difference from the baseline of the same kind, profile and model (absolute and in % of
the baseline mean; paired by seed, else Welch, see :mod:`pact_ray.report.ablation.stats`), the
router diagnostics (gate, edge delta, virtual mass) and Stage2's Art L2 as mean ± 95%
interval, and a verdict from the interval of the difference.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from pact_ray.metrics import names as M
from pact_ray.report.ablation.groups import (
    BASELINE,
    Row,
    Setting,
    VariantRuns,
    group_by,
    knob_text,
    knob_values,
    objective,
    setting_label,
    variant_runs,
)
from pact_ray.report.ablation.stats import Difference, Estimate, difference, estimate, mean_interval, verdict
from pact_ray.report.summary import SummaryData, variant_label

DIAGNOSTICS = (M.GATE, M.EDGE_DELTA, M.VIRTUAL_MASS, M.ART_L2)
NO_BASELINE = "no baseline"
UNKNOWN_SEED = -1


@dataclass(frozen=True)
class RouteEntry:
    """One configuration of one variant, compared with its setting's baseline."""

    setting: Setting  # (kind, profile, model)
    variant: str
    knobs: dict[str, str]  # the config values that set this configuration apart (tuned variants)
    metric: str  # the kind's objective ("loss")
    seeds: tuple[int, ...]
    baseline_seeds: tuple[int, ...]
    value: Estimate  # the configuration's final metric
    baseline: Estimate | None
    delta: Difference | None  # value - baseline
    delta_pct: Estimate | None  # delta in % of the baseline mean
    diagnostics: dict[str, Estimate | None]
    verdict: str
    unfinished: int  # errored or running runs of the variant in this setting, left out

    @property
    def label(self) -> str:
        """"OT first", or "RGB edge · eps=0.0312" for one configuration of a tuned variant."""
        name = variant_label(self.setting[0], self.variant)
        return f"{name} · {knob_text(self.knobs)}" if self.knobs else name

    def to_json(self) -> dict[str, Any]:
        kind, profile, model = self.setting
        return {
            "kind": kind, "profile": profile, "model": model, "setting": setting_label(self.setting),
            "variant": self.variant, "label": self.label, "knobs": self.knobs, "metric": self.metric,
            "seeds": list(self.seeds), "baseline_seeds": list(self.baseline_seeds),
            "value": self.value.to_json(), "baseline": self.baseline.to_json() if self.baseline else None,
            "delta": self.delta.estimate.to_json() if self.delta else None,
            "delta_method": self.delta.method if self.delta else None,
            "delta_pct": self.delta_pct.to_json() if self.delta_pct else None,
            "diagnostics": {k: (v.to_json() if v else None) for k, v in self.diagnostics.items()},
            "verdict": self.verdict, "unfinished": self.unfinished,
        }


def per_seed(rows: list[Row], metric: str) -> dict[int, float]:
    """The metric of each seed (the mean where several runs share a seed)."""
    by_seed = group_by(rows, lambda r: UNKNOWN_SEED if r["seed"] is None else r["seed"])
    return {seed: statistics.fmean(r[metric] for r in rs) for seed, rs in by_seed.items()}


def _percent(delta: Difference, baseline: Estimate) -> Estimate | None:
    if baseline.mean == 0:
        return None
    scale = 100.0 / abs(baseline.mean)
    est = delta.estimate
    return Estimate(est.mean * scale, None if est.half_width is None else est.half_width * scale, est.n)


def _entry(runs: VariantRuns, knobs: dict[str, str], rows: list[Row], baseline: dict[int, float] | None) -> RouteEntry:
    metric, mode = objective(runs.setting[0])
    values = per_seed(rows, metric)
    value = estimate(list(values.values()))  # every configuration has finished runs
    base = mean_interval(list(baseline.values())) if baseline else None
    delta = difference(values, baseline) if baseline else None
    return RouteEntry(
        setting=runs.setting, variant=runs.variant, knobs=knobs, metric=metric, seeds=tuple(sorted(values)),
        baseline_seeds=tuple(sorted(baseline or {})), value=value, baseline=base, delta=delta,
        delta_pct=_percent(delta, base) if delta and base else None,
        diagnostics={m: mean_interval([r[m] for r in rows if r[m] is not None]) for m in DIAGNOSTICS},
        verdict=verdict(delta, mode) if delta else NO_BASELINE, unfinished=runs.unfinished,
    )


def route_status(data: SummaryData) -> list[RouteEntry]:
    """One entry per configuration of every non-baseline variant with finished runs, in registry order."""
    groups = variant_runs(data)
    baselines = {g.setting: per_seed(g.finished, objective(g.setting[0])[0]) for g in groups if g.variant == BASELINE and g.finished}
    entries = []
    for g in groups:
        if g.variant == BASELINE:
            continue
        for knobs, rows in configurations(data, g).items():
            entries.append(_entry(g, dict(knobs), rows, baselines.get(g.setting)))
    return entries


def configurations(data: SummaryData, runs: VariantRuns) -> dict[tuple[tuple[str, str], ...], list[Row]]:
    """The finished runs of a variant grouped by their values of its varying knobs."""
    return group_by(runs.finished, lambda row: tuple(knob_values(data, row, runs.knobs).items()))

"""Route status: every variant configuration against the baseline of its setting, like for like.

For each configuration (a variant's seeds; each value set of a tuned variant on its own):

- the metric is the kind's held-out validation metric (``val_loss``: the training objective
  on the validation split, same samples, timesteps and noise for every run), not a training
  minibatch's loss;
- the step is where the configuration's runs last validated; the baseline is read at that
  same step (every baseline validates where shorter variants of its profile end), so a
  3-step variant meets the baseline's step-3 value, not its final one;
- the difference from the baseline is paired by seed (else Welch), with its 95% interval
  and two-sided test (:mod:`pact_ray.report.ablation.stats`); the verdict reads the
  interval, the corrected verdict is Holm's over the configurations of the setting;
- validity gates: a configuration whose runs diverged (a non-finite training or validation
  loss) or whose OT plans did not converge (marginal error above
  :data:`MARGINAL_ERROR_MAX`) gets no verdict, and says why. A baseline that diverged
  invalidates its whole setting.

Router diagnostics (gate, edge delta, virtual mass) and Stage2's Art L2 are the runs' final
training values, as mean ± 95% interval.
"""

from __future__ import annotations

import math
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
    router_on,
    setting_label,
    variant_runs,
)
from pact_ray.report.ablation.stats import (
    BETTER,
    Difference,
    Estimate,
    corrected_verdicts,
    difference,
    estimate,
    mean_interval,
    verdict,
)
from pact_ray.report.summary import SummaryData, kind_title, variant_label

DIAGNOSTICS = (M.GATE, M.EDGE_DELTA, M.VIRTUAL_MASS, M.ART_L2)
NO_BASELINE = "no baseline"
NO_VERDICT = "no verdict"  # a validity gate failed
UNKNOWN_SEED = -1
# The router's convergence target: the L1 error of a plan's marginals (row + column) that a
# converged float32 Sinkhorn solve reaches; a plan off by more is not the transport plan
# the ablation claims to test.
MARGINAL_ERROR_MAX = 1e-3


@dataclass(frozen=True)
class RouteEntry:
    """One configuration of one variant, compared with its setting's baseline at one step."""

    setting: Setting  # (kind, profile, model)
    variant: str
    knobs: dict[str, str]  # the config values that set this configuration apart (tuned variants)
    metric: str  # the kind's validation metric ("val_loss")
    step: int | None  # where both sides are compared (None: the configuration never validated)
    seeds: tuple[int, ...]
    baseline_seeds: tuple[int, ...]
    value: Estimate | None  # the configuration's metric at ``step``
    baseline: Estimate | None  # the baseline's at ``step``
    delta: Difference | None  # value - baseline
    delta_pct: Estimate | None  # delta in % of the baseline mean
    diagnostics: dict[str, Estimate | None]
    verdict: str
    verdict_corrected: str
    p_corrected: float | None  # Holm-adjusted p-value
    valid: bool  # False when a validity gate failed (then ``reason`` says which)
    reason: str  # why there is no verdict ("" when there is one)
    unfinished: int  # errored or running runs of the variant in this setting, left out
    baseline_ran: bool = True  # False when the setting ran no baseline at all (nothing to compare with)

    @property
    def label(self) -> str:
        """"OT first", or "RGB edge · eps=0.0312" for one configuration of a tuned variant."""
        name = variant_label(self.setting[0], self.variant)
        return f"{name} · {knob_text(self.knobs)}" if self.knobs else name

    def to_json(self) -> dict[str, Any]:
        kind, profile, model = self.setting
        lo, hi = (self.delta.estimate.interval if self.delta else None) or (None, None)
        return {
            "variant": self.variant, "baseline": BASELINE, "metric": self.metric, "step": self.step,
            "seeds": list(self.seeds), "baseline_seeds": list(self.baseline_seeds),
            "delta": self.delta.estimate.mean if self.delta else None,
            "delta_pct": self.delta_pct.mean if self.delta_pct else None,
            "ci_low": lo, "ci_high": hi, "verdict": self.verdict, "verdict_corrected": self.verdict_corrected,
            "p_value": self.delta.p_value if self.delta else None, "p_corrected": self.p_corrected,
            "method": self.delta.method if self.delta else None, "valid": self.valid, "reason": self.reason,
            "kind": kind, "profile": profile, "model": model, "setting": setting_label(self.setting),
            "label": self.label, "knobs": self.knobs,
            "value": self.value.to_json() if self.value else None,
            "baseline_value": self.baseline.to_json() if self.baseline else None,
            "delta_estimate": self.delta.estimate.to_json() if self.delta else None,
            "delta_pct_estimate": self.delta_pct.to_json() if self.delta_pct else None,
            "diagnostics": {k: (v.to_json() if v else None) for k, v in self.diagnostics.items()},
            "unfinished": self.unfinished,
        }


def _seed(row: Row) -> int:
    return UNKNOWN_SEED if row["seed"] is None else row["seed"]


def values_at(data: SummaryData, rows: list[Row], step: int) -> dict[int, float]:
    """Each seed's validation value at ``step`` (the mean where several runs share a seed)."""
    by_seed: dict[int, list[float]] = {}
    for r in rows:
        value = dict(data.val_curves.get(r["run_id"], [])).get(step)
        if value is not None:
            by_seed.setdefault(_seed(r), []).append(value)
    return {seed: statistics.fmean(vs) for seed, vs in by_seed.items()}


def compare_step(data: SummaryData, rows: list[Row]) -> int | None:
    """The step where the configuration's runs last validated (the earliest of their last
    validation steps, so that every seed has a value there)."""
    last = [curve[-1][0] for r in rows if (curve := data.val_curves.get(r["run_id"]))]
    return min(last) if last else None


def validity(data: SummaryData, rows: list[Row]) -> str:
    """Why these runs get no verdict ("" when they may have one)."""
    diverged = [r for r in rows if (r.get(M.NONFINITE_STEPS) or 0) > 0
                or any(not math.isfinite(v) for _, v in data.val_curves.get(r["run_id"], []))]
    if diverged:
        return f"diverged: non-finite loss in {len(diverged)} of {len(rows)} run(s)"
    if rows and router_on(rows[0]):
        errors = [r[M.MARGINAL_ERROR] for r in rows if r.get(M.MARGINAL_ERROR) is not None]
        if errors and max(errors) > MARGINAL_ERROR_MAX:
            return f"OT plans did not converge: marginal error {max(errors):.2g} > {MARGINAL_ERROR_MAX:g}"
    return ""


def _percent(delta: Difference, baseline: Estimate) -> Estimate | None:
    if baseline.mean == 0:
        return None
    scale = 100.0 / abs(baseline.mean)
    est = delta.estimate
    return Estimate(est.mean * scale, None if est.half_width is None else est.half_width * scale, est.n)


def _entry(data: SummaryData, runs: VariantRuns, knobs: dict[str, str], rows: list[Row], baseline: VariantRuns | None) -> RouteEntry:
    metric, mode = objective(runs.setting[0])
    step = compare_step(data, rows)
    values = values_at(data, rows, step) if step is not None else {}
    base = values_at(data, baseline.finished, step) if baseline and step is not None else {}
    gate = validity(data, rows)
    if not gate and baseline is not None and (base_gate := validity(data, baseline.finished)):
        gate = f"baseline {base_gate}"
    if step is None:
        gate = gate or "no held-out validation logged"
    delta = difference(values, base) if values and base else None
    base_est = mean_interval(list(base.values()))
    note = ""
    if gate:
        first = NO_VERDICT
    elif delta is None:
        first = NO_BASELINE
        note = "no baseline run in this setting" if baseline is None else f"the baseline did not validate at step {step}"
    else:
        first = verdict(delta, mode)
    return RouteEntry(
        setting=runs.setting, variant=runs.variant, knobs=knobs, metric=metric, step=step,
        seeds=tuple(sorted(values)), baseline_seeds=tuple(sorted(base)),
        value=estimate(list(values.values())) if values else None, baseline=base_est, delta=delta,
        delta_pct=_percent(delta, base_est) if delta and base_est else None,
        diagnostics={m: mean_interval([r[m] for r in rows if r.get(m) is not None]) for m in DIAGNOSTICS},
        verdict=first, verdict_corrected=first, p_corrected=None, valid=not gate, reason=gate or note,
        unfinished=runs.unfinished, baseline_ran=baseline is not None,
    )


def _correct(entries: list[RouteEntry]) -> list[RouteEntry]:
    """Holm's correction over each setting's valid comparisons (one family per setting)."""
    out = list(entries)
    for setting in dict.fromkeys(e.setting for e in entries):
        idx = [i for i, e in enumerate(entries) if e.setting == setting and e.valid and e.delta is not None]
        mode = objective(setting[0])[1]
        verdicts, adjusted = corrected_verdicts([entries[i].delta for i in idx], mode)
        for i, v, p in zip(idx, verdicts, adjusted):
            e = entries[i]
            out[i] = RouteEntry(**{**e.__dict__, "verdict_corrected": v, "p_corrected": p})
    return out


def route_status(data: SummaryData) -> list[RouteEntry]:
    """One entry per configuration of every non-baseline variant with finished runs, in
    registry order, with the family-wise corrected verdicts."""
    groups = variant_runs(data)
    baselines = {g.setting: g for g in groups if g.variant == BASELINE and g.finished}
    entries = []
    for g in groups:
        if g.variant == BASELINE or not g.finished:
            continue
        for knobs, rows in configurations(data, g).items():
            entries.append(_entry(data, g, dict(knobs), rows, baselines.get(g.setting)))
    return _correct(entries)


def configurations(data: SummaryData, runs: VariantRuns) -> dict[tuple[tuple[str, str], ...], list[Row]]:
    """The finished runs of a variant grouped by their values of its varying knobs."""
    return group_by(runs.finished, lambda row: tuple(knob_values(data, row, runs.knobs).items()))


def verdict_lines(entries: list[RouteEntry]) -> list[str]:
    """The route status as terminal lines: one per comparison, then per kind the best
    variant, printed only where its Holm-corrected verdict is "better"; otherwise that no
    variant beats the baseline at the seeds run, and how wide the intervals are."""
    if not entries:
        return ["Route status: no finished variant to compare with a baseline."]
    if not any(e.baseline_ran for e in entries):  # e.g. an Optuna sweep of one variant
        return [f"Route status: no baseline ran in this sweep, so none of its {len(entries)} variant configuration(s) "
                "is compared with one."]
    lines = [f"Route status ({entries[0].metric} at equal steps vs the baseline; paired by seed, Holm-corrected):"]
    width = max(len(e.label) for e in entries)
    for e in entries:
        delta = e.delta.estimate.text(signed=True) if e.delta else "-"
        verdicts = e.verdict if e.verdict_corrected == e.verdict else f"{e.verdict}, corrected {e.verdict_corrected}"
        extra = f" ({e.reason})" if e.reason else ""
        where = f"step {e.step}" if e.step is not None else "no validation"
        lines.append(f"  {setting_label(e.setting)} · {e.label:<{width}}  {where:>8}  Δ {delta:<22} "
                     f"seeds {len(e.seeds)}/{len(e.baseline_seeds)}  {verdicts}{extra}")
    for kind in dict.fromkeys(e.setting[0] for e in entries):
        of_kind = [e for e in entries if e.setting[0] == kind]
        title = kind_title(kind)
        if not any(e.baseline_ran for e in of_kind):  # e.g. the OT matrix's Stage2 cells
            lines.append(f"No {title} baseline ran in this sweep: its {title} variants are not compared with one.")
            continue
        better = [e for e in of_kind if e.verdict_corrected == BETTER and e.delta]
        if better:
            best = min(better, key=lambda e: e.delta.estimate.mean) if objective(kind)[1] == "min" else max(better, key=lambda e: e.delta.estimate.mean)
            pct = f" ({best.delta_pct.mean:+.3g} %)" if best.delta_pct else ""
            family = sum(e.setting == best.setting and e.p_corrected is not None for e in of_kind)
            lines.append(f"Best {title} variant: {best.label}, {best.metric} {best.delta.estimate.text(signed=True)}{pct} vs the "
                         f"baseline at step {best.step}, better after Holm's correction over {family} comparison(s), "
                         f"{len(best.seeds)} seeds")
            continue
        seeds = sorted({len(e.seeds) for e in of_kind if e.seeds})
        widths = [e.delta.estimate.half_width for e in of_kind if e.delta and e.delta.estimate.half_width is not None]
        at = f"{seeds[0]}" if len(seeds) == 1 else (f"{seeds[0]}-{seeds[-1]}" if seeds else "0")
        if widths:
            span = f"±{min(widths):.2g}" if min(widths) == max(widths) else f"±{min(widths):.2g} to ±{max(widths):.2g}"
            how = f"the 95% intervals of Δ are {span} wide"
        else:
            how = "one seed per side gives no interval (run --seeds 0,1,2 or --until-conclusive N)"
        lines.append(f"No {title} variant beats the baseline at {at} seed(s): {how}.")
    return lines


def print_verdicts(entries: list[RouteEntry]) -> None:
    print("\n".join(verdict_lines(entries)))

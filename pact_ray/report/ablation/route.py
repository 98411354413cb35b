"""Route status: every variant configuration against the baseline of its setting, like for like.

For each configuration (a variant's seeds; each value set of a tuned variant on its own):

- the metric is the kind's primary held-out validation metric, declared in the run-kind
  registry (Stage1 ``val_loss``, Stage2 ``val_art_l2``, the world model ``val_mse``; same
  samples, timesteps and noise for every run), or the ``--metric`` the sweep was given;
  the kind's secondary metrics are shown beside it with their 95 % intervals, outside the
  verdicts' family;
- the step is where the configuration's runs last validated; the baseline is read at that
  same step (every baseline validates where shorter variants of its profile end), so a
  3-step variant meets the baseline's step-3 value, not its final one;
- the difference from the baseline is paired by seed (else Welch); the verdict is read off
  its simultaneous interval (:mod:`pact_ray.verdicts`: Bonferroni over the
  comparisons of the setting, alpha spent over the looks of an adaptive sweep) against the
  margin of practical difference δ: better / worse (beyond, within ±δ, or size unclear),
  equivalent, inconclusive, or identical; ``verdict`` keeps the plain per-comparison 95 %
  reading for reference;
- validity gates: a configuration whose runs diverged (a non-finite training or validation
  loss) or whose OT plans did not converge (marginal error above
  :data:`MARGINAL_ERROR_MAX`) gets no verdict, and says why. A baseline that diverged
  invalidates its whole setting. A profile not meant for conclusions (smoke), or a
  comparison at fewer than ``MIN_VERDICT_STEPS`` steps, gets its intervals but no verdict.

Router diagnostics (gate, edge delta, virtual mass) and Stage2's Art L2 are the runs' final
training values, as mean ± 95% interval.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping

from pact_ray.kinds import RUN_KINDS
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
from pact_ray.report.ablation.stats import BETTER, Difference, Estimate, difference, estimate, mean_interval, verdict
from pact_ray.report.summary import SummaryData, kind_title, variant_label
from pact_ray.verdicts import (
    BEYOND,
    MIN_VERDICT_STEPS,
    NOT_FOR_CONCLUSIONS,
    WITHIN,
    Decision,
    Design,
    decide_family,
)

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
    verdict: str  # the plain per-comparison reading of the 95 % interval (for reference)
    verdict_corrected: str  # the verdict: read off the simultaneous interval (better, worse, equivalent, ...)
    p_corrected: float | None  # the p-value adjusted for the family and the look (<= alpha: better or worse)
    valid: bool  # False when a validity gate failed (then ``reason`` says which)
    reason: str  # why there is no verdict ("" when there is one)
    unfinished: int  # errored or running runs of the variant in this setting, left out
    baseline_ran: bool = True  # False when the setting ran no baseline at all (nothing to compare with)
    decision: Decision | None = None  # the simultaneous interval, margin and MDE behind verdict_corrected
    design: Design | None = None
    # Each secondary metric's paired difference at the same step (95 %, outside the family).
    secondary: dict[str, Difference | None] = field(default_factory=dict)

    @property
    def verdict_text(self) -> str:
        """The verdict with its size against the margin: "worse, within ±1 %", "equivalent ±1 %"."""
        if self.reason or self.decision is None:
            return self.verdict_corrected
        return self.decision.describe(self.margin_text())

    def margin_text(self) -> str:
        """"±1 %" of the baseline, or "±0.005" where the baseline's mean is 0."""
        pct = self.percent(self.decision.margin) if self.decision else None
        if pct is not None:
            return f"±{pct:.2g} %"
        return f"±{self.decision.margin:.2g}" if self.decision and self.decision.margin is not None else ""

    @property
    def corrected_delta(self) -> Estimate | None:
        """The difference with the half width of its simultaneous interval (what the verdict reads)."""
        if not self.delta:
            return None
        if self.decision is None or self.decision.interval is None:
            return self.delta.estimate
        lo, hi = self.decision.interval
        return Estimate(self.delta.estimate.mean, (hi - lo) / 2, self.delta.estimate.n)

    def percent(self, value: float | None) -> float | None:
        """``value`` in % of the baseline's mean."""
        if value is None or not self.baseline or self.baseline.mean == 0:
            return None
        return 100.0 * value / abs(self.baseline.mean)

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
            "corrected_ci_low": self.decision.interval[0] if self.decision and self.decision.interval else None,
            "corrected_ci_high": self.decision.interval[1] if self.decision and self.decision.interval else None,
            "corrected_level": self.decision.level if self.decision else None,
            "margin": self.decision.margin if self.decision else None,
            "margin_pct": self.percent(self.decision.margin) if self.decision else None,
            "mde": self.decision.mde if self.decision else None,
            "mde_pct": self.percent(self.decision.mde) if self.decision else None,
            "magnitude": self.decision.magnitude if self.decision else "",
            "design": self.design.to_json() if self.design else None,
            "secondary": {m: (d.estimate.to_json() if d else None) for m, d in self.secondary.items()},
        }


def _seed(row: Row) -> int:
    return UNKNOWN_SEED if row["seed"] is None else row["seed"]


def values_at(data: SummaryData, rows: list[Row], step: int, metric: str = M.VAL_LOSS) -> dict[int, float]:
    """Each seed's validation value of ``metric`` at ``step`` (the mean where several runs share a seed)."""
    curves = data.curves_of(metric)
    by_seed: dict[int, list[float]] = {}
    for r in rows:
        value = dict(curves.get(r["run_id"], [])).get(step)
        if value is not None:
            by_seed.setdefault(_seed(r), []).append(value)
    return {seed: statistics.fmean(vs) for seed, vs in by_seed.items()}


def compare_step(data: SummaryData, rows: list[Row], metric: str = M.VAL_LOSS) -> int | None:
    """The step where the configuration's runs last validated (the earliest of their last
    validation steps, so that every seed has a value there)."""
    curves = data.curves_of(metric)
    last = [curve[-1][0] for r in rows if (curve := curves.get(r["run_id"]))]
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


def for_conclusions(setting: Setting, step: int | None) -> str:
    """Why a comparison in ``setting`` at ``step`` is not meant for a verdict ("" when it is)."""
    kind = RUN_KINDS.get(setting[0])
    profile = kind.profiles.get(setting[1]) if kind else None
    if profile is not None and not profile.verdicts:
        return f"the {profile.name} profile checks that the pipeline runs and is not meant for conclusions"
    if step is not None and step < MIN_VERDICT_STEPS:
        return f"{step} step(s) compares initialisations, not training (verdicts need {MIN_VERDICT_STEPS} or more)"
    return ""


def _percent(delta: Difference, baseline: Estimate) -> Estimate | None:
    if baseline.mean == 0:
        return None
    scale = 100.0 / abs(baseline.mean)
    est = delta.estimate
    return Estimate(est.mean * scale, None if est.half_width is None else est.half_width * scale, est.n)


def primary_metric(kind: str, metrics: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(metric, mode) the verdicts of ``kind`` read: a ``--metric`` given for it, else the
    kind's primary metric."""
    metric = (metrics or {}).get(kind) or objective(kind)[0]
    return metric, M.metric_mode(metric)


def _entry(data: SummaryData, runs: VariantRuns, knobs: dict[str, str], rows: list[Row], baseline: VariantRuns | None,
           metric: str) -> RouteEntry:
    step = compare_step(data, rows, metric)
    values = values_at(data, rows, step, metric) if step is not None else {}
    base = values_at(data, baseline.finished, step, metric) if baseline and step is not None else {}
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
    elif (note := for_conclusions(runs.setting, step)):
        first = NOT_FOR_CONCLUSIONS
    else:
        first = verdict(delta, M.metric_mode(metric))
    kind = RUN_KINDS.get(runs.setting[0])
    secondary = {}
    for other in (kind.secondary_metrics if kind else ()):
        if other != metric and step is not None and baseline is not None:
            a, b = values_at(data, rows, step, other), values_at(data, baseline.finished, step, other)
            secondary[other] = difference(a, b) if a and b else None
    return RouteEntry(
        setting=runs.setting, variant=runs.variant, knobs=knobs, metric=metric, step=step,
        seeds=tuple(sorted(values)), baseline_seeds=tuple(sorted(base)),
        value=estimate(list(values.values())) if values else None, baseline=base_est, delta=delta,
        delta_pct=_percent(delta, base_est) if delta and base_est else None,
        diagnostics={m: mean_interval([r[m] for r in rows if r.get(m) is not None]) for m in DIAGNOSTICS},
        verdict=first, verdict_corrected=first, p_corrected=None, valid=not gate, reason=gate or note,
        unfinished=runs.unfinished, baseline_ran=baseline is not None, secondary=secondary,
    )


def _decide(entries: list[RouteEntry], design: Design) -> list[RouteEntry]:
    """Each setting's comparisons that may have a verdict, decided as one family on their
    simultaneous intervals (:func:`~pact_ray.verdicts.decide_family`). Those
    not meant for conclusions get their intervals as a family of their own, and no verdict."""
    out = list(entries)
    for setting in dict.fromkeys(e.setting for e in entries):
        compared = [i for i, e in enumerate(entries) if e.setting == setting and e.valid and e.delta is not None]
        for held in (False, True):
            idx = [i for i in compared if (entries[i].verdict == NOT_FOR_CONCLUSIONS) == held]
            if not idx:
                continue
            decided = decide_family([entries[i].delta for i in idx], [len(entries[i].seeds) for i in idx],
                                    [entries[i].baseline.mean if entries[i].baseline else None for i in idx], design,
                                    M.metric_mode(entries[idx[0]].metric))
            for i, d in zip(idx, decided):
                e = entries[i]
                if held:
                    out[i] = RouteEntry(**{**e.__dict__, "decision": d, "design": design})
                    continue
                p = e.delta.p_value
                adjusted = None if p is None or d is None or d.level <= 0 else min(1.0, p * design.alpha / d.level)
                out[i] = RouteEntry(**{**e.__dict__, "verdict_corrected": d.verdict if d else e.verdict_corrected,
                                       "p_corrected": adjusted, "decision": d, "design": design})
    return out


def route_status(data: SummaryData, design: Design | None = None, metrics: Mapping[str, str] | None = None) -> list[RouteEntry]:
    """One entry per configuration of every non-baseline variant with finished runs, in
    registry order, with the verdicts of ``design`` (default: fixed seeds, 5 %, ±1 %) on each
    kind's primary metric or the one ``metrics`` names for it."""
    design = design or Design()
    groups = variant_runs(data)
    baselines = {g.setting: g for g in groups if g.variant == BASELINE and g.finished}
    entries = []
    for g in groups:
        if g.variant == BASELINE or not g.finished:
            continue
        metric = primary_metric(g.setting[0], metrics)[0]
        for knobs, rows in configurations(data, g).items():
            entries.append(_entry(data, g, dict(knobs), rows, baselines.get(g.setting), metric))
    return _decide(entries, design)


def configurations(data: SummaryData, runs: VariantRuns) -> dict[tuple[tuple[str, str], ...], list[Row]]:
    """The finished runs of a variant grouped by their values of its varying knobs."""
    return group_by(runs.finished, lambda row: tuple(knob_values(data, row, runs.knobs).items()))


def _pct(e: RouteEntry, value: float | None) -> str:
    pct = e.percent(value)
    return f" ({pct:.2g} %)" if pct is not None else ""


def verdict_lines(entries: list[RouteEntry]) -> list[str]:
    """The route status as terminal lines: one per comparison (Δ with its simultaneous
    interval, in % of the baseline, the verdict), the secondary metrics under it, then per
    kind what the sweep found, the margin, the design, and the smallest difference it could
    have detected."""
    if not entries:
        return ["Route status: no finished variant to compare with a baseline."]
    if not any(e.baseline_ran for e in entries):  # e.g. an Optuna sweep of one variant
        return [f"Route status: no baseline ran in this sweep, so none of its {len(entries)} variant configuration(s) "
                "is compared with one."]
    design = next((e.design for e in entries if e.design), None) or Design()
    lines = [f"Route status (primary metric at equal steps vs the baseline, paired by seed; {design.describe()}; "
             f"margin δ {design.margin.text()}):"]
    width = max(len(e.label) for e in entries)
    for e in entries:
        delta = e.corrected_delta
        text = delta.text(signed=True) if delta else "-"
        pct = f" ({e.delta_pct.mean:+.2g} %)" if e.delta_pct else ""
        extra = f" ({e.reason})" if e.reason and e.verdict != NOT_FOR_CONCLUSIONS else ""  # said once, below
        said = "intervals only" if e.verdict == NOT_FOR_CONCLUSIONS else e.verdict_text
        where = f"step {e.step}" if e.step is not None else "no validation"
        lines.append(f"  {setting_label(e.setting)} · {e.label:<{width}}  {e.metric} {where:>8}  Δ {text}{pct:<12} "
                     f"seeds {len(e.seeds)}/{len(e.baseline_seeds)}  {said}{extra}")
        shown = [f"{m} Δ {d.estimate.text(signed=True)}" for m, d in e.secondary.items() if d is not None]
        if shown:
            lines.append(f"      beside it (95 %, no verdict): {'; '.join(shown)}")
    for kind in dict.fromkeys(e.setting[0] for e in entries):
        lines += _kind_lines([e for e in entries if e.setting[0] == kind], kind)
    return lines


def _kind_lines(of_kind: list[RouteEntry], kind: str) -> list[str]:
    title = kind_title(kind)
    if not any(e.baseline_ran for e in of_kind):  # e.g. a matrix without the kind's baseline cell
        return [f"No {title} baseline ran in this sweep: its {title} variants are not compared with one."]
    held = [e for e in of_kind if e.verdict == NOT_FOR_CONCLUSIONS]
    if held and len(held) == len(of_kind):
        return [f"{title}: intervals only, no verdicts: {held[0].reason}.",
                "For verdicts, run the quick profile or longer with --seeds 0,1,2."]
    decided = [e for e in of_kind if e.decision is not None and e.verdict != NOT_FOR_CONCLUSIONS]
    counts: dict[str, int] = {}
    for e in decided:
        counts[e.decision.verdict] = counts.get(e.decision.verdict, 0) + 1
    out = []
    better = [e for e in decided if e.decision.verdict == BETTER]
    if better:
        mode = M.metric_mode(better[0].metric)
        best = (min if mode == "min" else max)(better, key=lambda e: e.delta.estimate.mean)
        size = {BEYOND: f"beyond the margin {best.margin_text()}", WITHIN: f"but within the margin {best.margin_text()}: too small to matter"}
        out.append(f"Best {title} variant: {best.label}, {best.metric} {best.corrected_delta.text(signed=True)}"
                   f"{_pct(best, best.delta.estimate.mean)} vs the baseline at step {best.step}, better "
                   f"{size.get(best.decision.magnitude, '(its size against the margin is unclear)')}, {len(best.seeds)} seeds")
    elif decided:
        seeds = sorted({len(e.seeds) for e in decided})
        at = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
        out.append(f"No {title} variant beats the baseline at {at} seed(s).")
    if decided:
        parts = [f"{n} {v}" for v, n in counts.items()]
        mdes = [e.percent(e.decision.mde) for e in decided if e.decision.mde is not None]
        mde = f"; the smallest differences these seeds could detect (80 % power): {min(mdes):.2g}-{max(mdes):.2g} %" \
            if mdes and all(m is not None for m in mdes) else ""
        out.append(f"{title} verdicts: {', '.join(parts)} (margin {decided[0].margin_text()} of the baseline's "
                   f"{decided[0].metric}){mde}.")
        if not any(e.decision.interval for e in decided):
            out.append("One seed per side gives no interval: run with --seeds 0,1,2.")
    return out


def print_verdicts(entries: list[RouteEntry]) -> None:
    print("\n".join(verdict_lines(entries)))

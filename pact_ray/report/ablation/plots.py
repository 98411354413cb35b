"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot,
no global backend switch) and returned as PNG bytes.

- Decisions: one horizontal interval per variant configuration, the difference of its
  validation metric from the baseline's at the same step (the route status), with its 95%
  interval and the corrected verdict as its colour; the zero line is "no change". Never a
  bar from 0, which hides a 0.05 % difference.
- Diagnostics (gate, edge delta, Art L2, mask parts): bars of the final values per variant,
  the whisker their 95% t interval and the dots the single runs.
- Curves: one colour per variant; each run's raw values faint, the variant's smoothed mean
  over seeds as a line and the seeds' range as a band; validation values as markers.
Only the figures of what the sweep ran are drawn (no Stage2 panels for a Stage1 sweep).
"""

from __future__ import annotations

import functools
import io
import math
import statistics
import textwrap
from dataclasses import dataclass
from typing import Callable, Sequence

from matplotlib import colormaps, rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from pact_ray.metrics import names as M
from pact_ray.report.ablation.groups import (
    STAGE1,
    STAGE2,
    Row,
    Setting,
    finished_with,
    group_by,
    router_on,
    setting_label,
    setting_of,
)
from pact_ray.report.ablation.route import RouteEntry
from pact_ray.report.ablation.stats import BETTER, WORSE, Estimate, mean_interval
from pact_ray.report.ablation.tuning import TunedVariant
from pact_ray.report.summary import ERRORED, FINISHED, INTERRUPTED, RUNNING, Curve, SummaryData, kind_title, variant_label

DPI = 100
WIDTH_IN = 8.0  # shown about 620 px wide, two to a row on the page
BAR_IN = 0.36  # height per bar
FOREST_LABEL_CHARS = 34  # characters per line of a row label in the Δ forest (wrapped beyond)
STYLE = {"font.size": 11, "axes.titlesize": 13, "axes.labelsize": 11, "xtick.labelsize": 10, "ytick.labelsize": 10,
         "legend.fontsize": 9.5, "figure.titlesize": 13}
MAX_PANELS_PER_ROW = 2
PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD")
UNITS = {
    M.LOSS: "final loss (flow-matching MSE, unitless)",
    M.GATE: "gate = −KL(A ‖ A_gated) in nats (0 = attention unchanged)",
    M.EDGE_DELTA: "edge delta: fragmentation removed by the edge cost (× patches, unitless)",
    M.VIRTUAL_MASS: "plan mass on the virtual patch (fraction of 1)",
    M.ART_L2: "Art L2: MSE over the valid articulation slots",
    M.MASK_PARTS: "parts per batch",
}
CURVE_Y = "training loss (one minibatch; flow-matching MSE)"
VAL_CURVE_Y = "validation loss (held-out, fixed draws)"


def styled(draw: Callable[..., bytes]) -> Callable[..., bytes]:
    """Draw under the report's font sizes (matplotlib reads them when artists are made)."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs) -> bytes:
        with rc_context(STYLE):
            return draw(*args, **kwargs)
    return wrapper


def to_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")  # the figures lay themselves out (constrained)
    return buf.getvalue()


PLACEHOLDER_CHARS = 64  # characters per line of a placeholder's message at its font size, within WIDTH_IN
PLACEHOLDER_LINES = 4


@styled
def placeholder(title: str, message: str) -> bytes:
    """A small figure that states why there is nothing to draw; a long message is wrapped
    (at most PLACEHOLDER_LINES lines, then "…"), never cut by the figure's edge."""
    lines = textwrap.wrap(message, PLACEHOLDER_CHARS, max_lines=PLACEHOLDER_LINES, placeholder=" …") or [""]
    fig = Figure(figsize=(WIDTH_IN, 1.9 + 0.3 * len(lines)), layout="constrained")
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title, loc="left")
    ax.text(0.5, 0.45, "\n".join(lines), ha="center", va="center", fontsize=15, color="#666666", transform=ax.transAxes)
    return to_png(fig)


def variant_colors(rows: Sequence[Row]) -> dict[tuple[str, str], str]:
    """One palette color per (kind, variant), in registry order (rows come sorted)."""
    keys = list(dict.fromkeys((r["kind"], r["variant"]) for r in rows))
    return {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}


def _left_out(rows: Sequence[Row]) -> str:
    parts = [f"{n} {status}" for status in (ERRORED, RUNNING, INTERRUPTED) if (n := sum(r["status"] == status for r in rows))]
    return f"left out: {', '.join(parts)} run(s)" if parts else ""


@dataclass(frozen=True)
class _Bar:
    label: str
    values: list[float]
    color: str


def _bar_groups(rows: Sequence[Row], metric: str, color: Callable[[str, str], str]) -> list[_Bar]:
    """One bar per (setting, variant) with finished runs that reported ``metric``; ``color(kind, variant)``."""
    groups = group_by(finished_with(rows, metric), lambda r: (setting_of(r), r["variant"]))
    return [_Bar(f"{setting_label(s)} · {variant_label(s[0], v)}", [r[metric] for r in rs], color(s[0], v))
            for (s, v), rs in groups.items()]


def _annotate(ax, est: Estimate, y: float) -> None:
    """"mean ± half width (n=…)" in a column right of the axes, level with its bar."""
    ax.annotate(f"{est.text()}  (n={est.n})", xy=(1.0, y), xycoords=("axes fraction", "data"), xytext=(6, 0),
                textcoords="offset points", va="center", ha="left", fontsize=9)


def _draw_bars(ax, series: list[list[_Bar]]) -> None:
    """Horizontal bars; ``series[j][i]`` is series j of group i, side by side within a group."""
    height = 0.8 / len(series)
    for j, bars in enumerate(series):
        drawn = [(i, bar, est) for i, bar in enumerate(bars) if (est := mean_interval(bar.values)) is not None]
        ys = [i - 0.4 + height * (j + 0.5) for i, _, _ in drawn]
        means = [est.mean for _, _, est in drawn]
        ax.barh(ys, means, height=height * 0.9, color=[bar.color for _, bar, _ in drawn], alpha=0.85)
        with_interval = [(y, est) for y, (_, _, est) in zip(ys, drawn) if est.half_width is not None]
        if with_interval:
            ax.errorbar([e.mean for _, e in with_interval], [y for y, _ in with_interval],
                        xerr=[e.half_width for _, e in with_interval], fmt="none", ecolor="black", capsize=3, linewidth=1)
        dots = [(v, y + height * 0.15 * ((k % 5) - 2)) for y, (_, bar, _) in zip(ys, drawn) for k, v in enumerate(bar.values)]
        if dots:
            ax.scatter(*zip(*dots), s=10, color="black", alpha=0.55, zorder=3, linewidths=0)
        for y, (_, _, est) in zip(ys, drawn):
            _annotate(ax, est, y)
    ax.set_yticks(range(len(series[0])), [b.label for b in series[0]])
    ax.set_ylim(len(series[0]) - 0.5, -0.5)
    ax.axvline(0, color="#444444", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # room for small values' long labels
    ax.grid(axis="x", alpha=0.3)


def _bar_figure(title: str, xlabel: str, series: list[list[_Bar]], left_out: str, series_names: Sequence[str] = ()) -> bytes:
    """Bars of one or more series (``series_names`` name them in the legend)."""
    fig = Figure(figsize=(WIDTH_IN, 1.9 + BAR_IN * len(series[0]) * len(series)), layout="constrained")
    ax = fig.add_subplot()
    _draw_bars(ax, series)
    ax.set_title(title, loc="left")
    ax.set_xlabel(xlabel)
    if series_names:
        handles = [Patch(color=s[0].color, label=name) for s, name in zip(series, series_names)]
    else:
        handles = [Patch(color="#999999", label="bar: mean of finished runs")]
    handles += [Line2D([], [], color="black", marker="|", markersize=8, linewidth=1, label="95% interval (t)"),
                Line2D([], [], color="black", marker="o", markersize=4, linewidth=0, alpha=0.55, label="one run")]
    if left_out:
        handles.append(Line2D([], [], linestyle="none", label=left_out))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3), frameon=False)
    return to_png(fig)


@styled
def metric_bars(data: SummaryData, kind: str, metric: str, title: str, empty: str, router_only: bool = False) -> bytes:
    """Bars of one final metric per variant and setting of ``kind`` (``router_only``: OT runs only)."""
    rows = [r for r in data.rows if r["kind"] == kind and (router_on(r) or not router_only)]
    colors = variant_colors(data.rows)  # the same color for a variant in every figure
    bars = _bar_groups(rows, metric, lambda kind, variant: colors[(kind, variant)])
    if not bars:
        return placeholder(title, empty)
    return _bar_figure(title, UNITS[metric], [bars], _left_out(rows))


@styled
def spatial_bars(data: SummaryData, kind: str, title: str, empty: str) -> bytes:
    """Mask parts and empty parts per batch side by side, per Stage2 variant and setting."""
    rows = [r for r in data.rows if r["kind"] == kind]
    metrics = ((M.MASK_PARTS, PALETTE[0], "mask parts (non-empty part masks)"), (M.EMPTY, PALETTE[1], "empty (parts with an empty mask)"))
    series = [_bar_groups(rows, metric, lambda *_, c=color: c) for metric, color, _ in metrics]
    labels = list(dict.fromkeys(b.label for s in series for b in s))
    if not labels:
        return placeholder(title, empty)
    aligned = [[next((b for b in s if b.label == label), _Bar(label, [], color)) for label in labels]
               for s, (_, color, _) in zip(series, metrics)]
    return _bar_figure(title, UNITS[M.MASK_PARTS], aligned, _left_out(rows), [name for _, _, name in metrics])


def _panel_grid(n: int) -> tuple[int, int]:
    cols = min(n, MAX_PANELS_PER_ROW)
    return math.ceil(n / cols), cols


SMOOTHING_STEPS = 20  # one step of half window per this many logged steps


def smooth(values: Sequence[float]) -> list[float]:
    """A centred moving average over ``2k + 1`` values, ``k = len(values) // 20`` (no
    smoothing below 20 steps), shrinking at the ends. Centred, so a falling loss is not
    drawn late (an exponential moving average lags behind its curve)."""
    k = len(values) // SMOOTHING_STEPS
    if k == 0:
        return list(values)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - k), min(len(values), i + k + 1)
        out.append(statistics.fmean(values[lo:hi]))
    return out


def _variant_band(curves: list[Curve]) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, low, high) over the runs' smoothed curves, at the steps every run has."""
    smoothed = [dict(zip([s for s, _ in c], smooth([v for _, v in c]))) for c in curves if c]
    steps = sorted(set.intersection(*(set(c) for c in smoothed))) if smoothed else []
    rows = [[c[s] for c in smoothed] for s in steps]
    return steps, [statistics.fmean(r) for r in rows], [min(r) for r in rows], [max(r) for r in rows]


def _draw_curves(ax, rows: Sequence[Row], curves: dict[str, Curve], colors: dict[tuple[str, str], str], markers: bool = False) -> None:
    """Per variant: each run's raw values faint (dashed when not finished), the smoothed mean
    over its runs as a line and their range as a band (``markers``: points, not lines)."""
    for (kind, variant), rs in group_by(rows, lambda r: (r["kind"], r["variant"])).items():
        color = colors[(kind, variant)]
        for done, style in ((True, "-"), (False, "--")):
            lines = [curves.get(r["run_id"], []) for r in rs if (r["status"] == FINISHED) == done]
            ax.add_collection(LineCollection([c for c in lines if len(c) > 1], colors=color, linestyles=style, linewidths=0.8, alpha=0.22))
            dots = [p for c in lines if len(c) == 1 or markers for p in c]
            if dots:
                ax.scatter(*zip(*dots), color=color, s=12, marker="o" if done else "x", alpha=0.35, zorder=3, linewidths=0)
        steps, mean, low, high = _variant_band([curves.get(r["run_id"], []) for r in rs if r["status"] == FINISHED])
        if steps:
            ax.fill_between(steps, low, high, color=color, alpha=0.15, linewidth=0)
            ax.plot(steps, mean, color=color, linewidth=1.8, marker="o" if markers or len(steps) == 1 else None, markersize=4)
    ax.autoscale_view()
    steps = [s for r in rows for s, _ in curves.get(r["run_id"], [])]
    if steps and min(steps) == max(steps):  # single-step runs: one step's width either side, not a float zoom
        ax.set_xlim(steps[0] - 1, steps[0] + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _curve_legend(rows: Sequence[Row], colors: dict[tuple[str, str], str]) -> list:
    handles = [Line2D([], [], color=colors[k], linewidth=1.8, label=f"{variant_label(*k)} ({len(rs)} run{'s' * (len(rs) != 1)})")
               for k, rs in group_by(rows, lambda r: (r["kind"], r["variant"])).items()]
    handles.append(Patch(color="#999999", alpha=0.3, label="band: range over seeds; faint: single runs"))
    if any(r["status"] != FINISHED for r in rows):
        handles.append(Line2D([], [], color="#666666", linestyle="--", marker="x", label="errored / running"))
    return handles


@styled
def loss_curves(data: SummaryData, kind: str, title: str, empty: str, validation: bool = False) -> bytes:
    """Loss (``validation``: the held-out validation loss) against step, per variant, one
    panel per setting (profile, model)."""
    curves = data.val_curves if validation else data.curves
    rows = [r for r in data.rows if r["kind"] == kind and curves.get(r["run_id"])]
    if not rows:
        return placeholder(title, empty)
    panels: dict[Setting, list[Row]] = group_by(rows, setting_of)
    n_rows, n_cols = _panel_grid(len(panels))
    fig = Figure(figsize=(WIDTH_IN, 1.4 + 3.4 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    colors = variant_colors(data.rows)
    for ax, (setting, rs) in zip(axes, panels.items()):
        _draw_curves(ax, rs, curves, colors, markers=validation)
        ax.set_title(setting_label(setting), fontsize=11)
        ax.set_xlabel("step (optimizer steps)")
        ax.set_ylabel(VAL_CURVE_Y if validation else CURVE_Y)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    handles = _curve_legend(rows, colors)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3), frameon=False)
    fig.suptitle(title, x=0.01, ha="left")
    return to_png(fig)


VERDICT_COLORS = {BETTER: "#2E7D32", WORSE: "#C62828"}
EQUIVALENT_BAND = "#90CAF9"  # the margin of practical difference, behind the intervals
NEUTRAL = "#6B7280"


@styled
def delta_forest(entries: Sequence[RouteEntry], kind: str, title: str, empty: str) -> bytes:
    """Each configuration's difference from the baseline at equal steps, one panel per
    setting: the point is the mean difference, the line its simultaneous interval (what the
    verdict reads), the shaded band the margin ±δ, the colour the verdict; the text right of
    the axes gives Δ ± half width, the seeds and the verdict (or why there is none)."""
    shown = [e for e in entries if e.setting[0] == kind and e.delta is not None]
    if not shown:
        missing = [e for e in entries if e.setting[0] == kind]
        by_reason: dict[str, list[str]] = {}
        for e in missing:
            by_reason.setdefault(e.reason or e.verdict, []).append(e.label)
        # One reason per line-worth of text: "no baseline (...): 3 configurations", or the label when it is the only one.
        reasons = "; ".join(f"{labels[0]}: {why}" if len(labels) == 1 else f"{why}: {len(labels)} configurations"
                            for why, labels in by_reason.items())
        return placeholder(title, empty if not missing else reasons)
    panels = group_by(shown, lambda e: e.setting)
    # A tuned configuration's label names its knobs ("RGB edge · edge_beta=7.48, eps=0.0108, ..."):
    # wrapped onto lines of FOREST_LABEL_CHARS, or it would leave the axes no width at all.
    labels = {id(e): textwrap.fill(f"{e.label} @ {e.step}", FOREST_LABEL_CHARS) for e in shown}
    rows = {id(e): labels[id(e)].count("\n") + 1 for e in shown}
    heights = [sum(rows[id(e)] for e in es) for es in panels.values()]
    fig = Figure(figsize=(WIDTH_IN, 1.7 + 0.75 * len(panels) + BAR_IN * sum(heights)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights}).ravel()
    for ax, (setting, es) in zip(axes, panels.items()):
        margins = [e.decision.margin for e in es if e.decision and e.decision.margin is not None]
        if margins:
            ax.axvspan(-max(margins), max(margins), color=EQUIVALENT_BAND, alpha=0.35, linewidth=0)
        for y, e in enumerate(es):
            est = e.corrected_delta
            color = VERDICT_COLORS.get(e.verdict_corrected, NEUTRAL) if e.valid and not e.reason else "#B0B0B0"
            if est.half_width is not None:
                ax.errorbar([est.mean], [y], xerr=[[est.half_width], [est.half_width]], fmt="o", color=color, capsize=4,
                            linewidth=1.6, markersize=6)
            else:
                ax.scatter([est.mean], [y], color=color, marker="D", s=30, zorder=3)
            said = e.verdict_text if e.valid and not e.reason else "no verdict"
            ax.annotate(f"{est.text(signed=True)} · n={len(e.seeds)} · {said}", xy=(1.0, y), xycoords=("axes fraction", "data"),
                        xytext=(6, 0), textcoords="offset points", va="center", ha="left", fontsize=8.5)
        ax.axvline(0, color="#222222", linewidth=1.0)
        ax.set_yticks(range(len(es)), [labels[id(e)] for e in es])
        ax.set_ylim(len(es) - 0.5, -0.5)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"{setting_label(setting)}  (@ step: where variant and baseline are compared)", fontsize=10.5, loc="left")
    axes[-1].set_xlabel(f"Δ {shown[0].metric} = variant − baseline (negative: lower loss)")
    fig.suptitle(title, x=0.01, ha="left")
    handles = [Line2D([], [], color=VERDICT_COLORS[BETTER], marker="o", label="better"),
               Line2D([], [], color=VERDICT_COLORS[WORSE], marker="o", label="worse"),
               Line2D([], [], color=NEUTRAL, marker="o", label="equivalent / inconclusive"),
               Line2D([], [], color="#B0B0B0", marker="o", label="no verdict (validity gate, smoke)"),
               Line2D([], [], color="black", marker="|", markersize=8, linewidth=1, label="simultaneous 95% interval"),
               Patch(color=EQUIVALENT_BAND, alpha=0.35, label="margin ±δ"),
               Line2D([], [], color=NEUTRAL, marker="D", linewidth=0, label="one seed: no interval")]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, frameon=False)
    return to_png(fig)


@styled
def parallel_coordinates(tuned: TunedVariant) -> bytes:
    """Parallel coordinates of a tuned variant: one line per finished run across its varying
    knobs (each axis spans the tried range; log axes where the range spans 10x or more),
    ending at its final metric, colored by that metric."""
    axes_values = [tuned.numeric(k) for k in tuned.knobs] + [[v for _, v in tuned.trials]]
    names = [k.removeprefix("router.") for k in tuned.knobs] + [tuned.metric]
    scaled = [_unit_scale(v) for v in axes_values]
    fig = Figure(figsize=(WIDTH_IN, 4.2), layout="constrained")
    ax = fig.add_subplot()
    metric_values = axes_values[-1]
    lo, hi = min(metric_values), max(metric_values)
    norm = Normalize(lo, hi if hi > lo else lo + 1)
    cmap = colormaps["viridis_r" if tuned.mode == "min" else "viridis"]  # the best runs in yellow
    xs = list(range(len(names)))
    segments = [list(zip(xs, [s[i] for s in scaled])) for i in range(len(metric_values))]
    lc = LineCollection(segments, cmap=cmap, norm=norm, linewidths=1.4, alpha=0.85)
    lc.set_array(metric_values)
    ax.add_collection(lc)
    for x, vals in zip(xs, axes_values):
        ax.axvline(x, color="#333333", linewidth=0.8)
        lo, hi = min(vals), max(vals)
        ax.text(x, -0.04, f"{lo:.3g}", ha="center", va="top", fontsize=9)
        ax.text(x, 1.04, f"{hi:.3g}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(xs, names)
    ax.set_xlim(-0.3, len(names) - 0.7)
    ax.set_ylim(-0.15, 1.15)
    ax.set_yticks([])
    ax.set_title(f"{tuned.title}: knobs vs final {tuned.metric} ({len(tuned.trials)} runs)", fontsize=11.5, loc="left")
    fig.colorbar(lc, ax=ax, label=UNITS.get(tuned.metric, tuned.metric))
    return to_png(fig)


def _unit_scale(values: Sequence[float]) -> list[float]:
    """Values mapped to [0, 1] over their range (log scale when positive and spanning 10x)."""
    lo, hi = min(values), max(values)
    if hi == lo:
        return [0.5] * len(values)
    if lo > 0 and hi / lo >= 10:
        return [(math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo)) for v in values]
    return [(v - lo) / (hi - lo) for v in values]


@dataclass(frozen=True)
class PlotSpec:
    """One of the report's figures: file stem, caption, when it applies and how to draw it."""

    name: str
    caption: str
    applies: Callable[[SummaryData], bool]
    draw: Callable[[SummaryData, Sequence[RouteEntry]], bytes]


def _has(kind: str, router_only: bool = False) -> Callable[[SummaryData], bool]:
    return lambda d: any(r["kind"] == kind and (router_on(r) or not router_only) for r in d.rows)


S1, S2 = kind_title(STAGE1), kind_title(STAGE2)
NO_S1, NO_S2, NO_OT = f"no {S1} runs", f"no {S2} runs", f"no {S1} runs with the OT router"
NO_VAL = "no validation yet"
PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("stage1_val_delta", f"{S1}: Δ validation loss from the baseline at the same step (95% interval; colour = Holm-corrected verdict)",
             _has(STAGE1), lambda d, e: delta_forest(e, STAGE1, f"{S1}: Δ validation loss vs baseline", NO_S1)),
    PlotSpec("stage1_gate_bars", f"{S1} OT gate −KL(A ‖ A_gated) per router variant (0 = attention unchanged)",
             _has(STAGE1, router_only=True),
             lambda d, e: metric_bars(d, STAGE1, M.GATE, f"{S1}: OT gate (−KL) per router variant", NO_OT, router_only=True)),
    PlotSpec("stage1_edge_delta_bars", f"{S1} edge delta per router variant (fragmentation the edge cost removes)",
             _has(STAGE1, router_only=True),
             lambda d, e: metric_bars(d, STAGE1, M.EDGE_DELTA, f"{S1}: edge delta per router variant", NO_OT, router_only=True)),
    PlotSpec("stage1_loss_curves", f"{S1} training loss against step: smoothed mean per variant, seeds as a band, runs faint",
             _has(STAGE1), lambda d, e: loss_curves(d, STAGE1, f"{S1}: training loss against step", NO_S1)),
    PlotSpec("stage1_val_curves", f"{S1} validation loss at the evaluation steps, per variant (seeds as a band)",
             _has(STAGE1), lambda d, e: loss_curves(d, STAGE1, f"{S1}: validation loss against step", NO_VAL, validation=True)),
    PlotSpec("stage2_val_delta", f"{S2}: Δ validation loss from the baseline at the same step (95% interval; colour = Holm-corrected verdict)",
             _has(STAGE2), lambda d, e: delta_forest(e, STAGE2, f"{S2}: Δ validation loss vs baseline", NO_S2)),
    PlotSpec("stage2_art_l2_bars", f"{S2} Art L2 per variant (MSE over the valid articulation slots)",
             _has(STAGE2), lambda d, e: metric_bars(d, STAGE2, M.ART_L2, f"{S2}: articulation L2 per variant", NO_S2)),
    PlotSpec("stage2_spatial_bars", f"{S2} mask parts and empty parts per batch, per variant",
             _has(STAGE2), lambda d, e: spatial_bars(d, STAGE2, f"{S2}: mask parts and empty parts per batch", NO_S2)),
    PlotSpec("stage2_loss_curves", f"{S2} training loss against step: smoothed mean per variant, seeds as a band, runs faint",
             _has(STAGE2), lambda d, e: loss_curves(d, STAGE2, f"{S2}: training loss against step", NO_S2)),
    PlotSpec("stage2_val_curves", f"{S2} validation loss at the evaluation steps, per variant (seeds as a band)",
             _has(STAGE2), lambda d, e: loss_curves(d, STAGE2, f"{S2}: validation loss against step", NO_VAL, validation=True)),
)


def plots_for(data: SummaryData) -> list[PlotSpec]:
    """The figures that apply to what ``data`` holds."""
    return [spec for spec in PLOTS if spec.applies(data)]

"""The static report page: one self-contained HTML file (inline CSS, no scripts, no
external assets) that links the PNGs, CSV and JSON beside it by relative paths, so it
opens from disk or from any static file server.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from html import escape
from typing import Any, Iterable, Mapping, Sequence

from pact_ray.report.ablation.groups import setting_label
from pact_ray.report.ablation.route import DIAGNOSTICS, RouteEntry
from pact_ray.report.ablation.stats import BETTER, WORSE, Estimate
from pact_ray.report.ablation.tuning import TunedVariant

TITLE = "PAct × SceneTransporter: OT routing ablation summary"
PURPOSE = ("One place for the minimal closed-loop checks of Stage1 OT-gated cross-attention, the mask soft prior, "
           "the edge-regularised cost and the virtual patch, and of the Stage2 spatial articulation adapter.")
MISSING = "-"
TABLE_COLUMNS = (("phase", "Phase"), ("steps", "Steps"), ("loss", "Loss"), ("val_loss", "Val loss"), ("val_step", "Val step"),
                 ("art_l2", "Art L2"), ("gate", "Gate"),
                 ("edge_delta", "Edge delta"), ("virtual_mass", "Virtual mass"), ("mask_parts", "Mask parts"), ("empty", "Empty"))
DIAGNOSTIC_HEADERS = {"gate": "Gate", "edge_delta": "Edge delta", "virtual_mass": "Virtual mass", "art_l2": "Art L2"}

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232b; margin: 0; background: #f6f7f9; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 19px; margin: 32px 0 8px; border-bottom: 1px solid #d9dde3; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
p.purpose { font-size: 15px; color: #3b4552; margin: 0 0 4px; max-width: 980px; }
p.meta, p.hint, .small { color: #67717e; font-size: 12.5px; }
.cards { display: flex; gap: 14px; flex-wrap: wrap; margin: 14px 0 6px; }
.card { background: #fff; border: 1px solid #d9dde3; border-radius: 8px; padding: 12px 18px; min-width: 150px; }
.card .num { display: block; font-size: 30px; font-weight: 650; color: #24476b; }
.card .what { color: #4b5563; }
table { border-collapse: collapse; background: #fff; width: 100%; font-size: 12.5px; margin: 6px 0; }
th, td { border: 1px solid #e1e4e8; padding: 4px 7px; text-align: left; vertical-align: top; }
th { background: #eef1f5; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td .id { display: block; color: #7a8490; font-size: 11px; word-break: break-all; }
td.run { min-width: 230px; }
tr.st-errored td { background: #fff4f4; }
tr.st-running td { background: #fffbea; }
.badge { display: inline-block; border-radius: 10px; padding: 0 8px; font-size: 11.5px; font-weight: 600; white-space: nowrap; }
.better { background: #dcf3e2; color: #17602e; } .worse { background: #fbe0e0; color: #8a1f1f; }
.neutral { background: #eceff3; color: #4b5563; }
.badge.st-finished { background: #dcf3e2; color: #17602e; } .badge.st-errored { background: #fbe0e0; color: #8a1f1f; }
.badge.st-running { background: #fdf0c4; color: #7a5a00; }
.badge.st-interrupted { background: #e4ecfb; color: #244a8a; }
tr.st-interrupted td { background: #f4f7fd; }
.error { color: #8a1f1f; font-size: 11.5px; display: block; margin-top: 2px; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr)); gap: 16px; align-items: start; }
figure { margin: 0; background: #fff; border: 1px solid #d9dde3; border-radius: 8px; padding: 10px; }
figure img { width: 100%; height: auto; display: block; }
#param-importance figure { max-width: 820px; }
#param-importance table { max-width: 820px; }
figcaption { font-size: 12.5px; color: #4b5563; margin-top: 6px; }
.bar { display: inline-block; height: 9px; background: #4C72B0; border-radius: 2px; vertical-align: middle; margin-right: 6px; }
a { color: #1f5f9e; }
"""


@dataclass(frozen=True)
class PlotLink:
    """A PNG beside the page and its caption."""

    file: str
    caption: str


def image_src(file: str, images: Mapping[str, bytes]) -> str:
    """What an ``<img>`` loads: the PNG inlined as a data: URI where its bytes are given, so
    that the page shows its plots wherever it is opened, MLflow's artifact viewer included
    (it shows a page from a blob: URL in a sandboxed frame, where a relative ``src`` resolves
    to nothing); the file beside the page otherwise."""
    data = images.get(file)
    return f"data:image/png;base64,{base64.b64encode(data).decode('ascii')}" if data else file


def fmt(value: Any) -> str:
    """A table cell: "-" where the value does not apply, 4 significant digits for floats."""
    if value is None or value == "":
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def fmt_estimate(est: Estimate | None, signed: bool = False, suffix: str = "") -> str:
    return MISSING if est is None else est.text(signed, suffix)


def _cells(values: Iterable[str], tag: str = "td", cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return "".join(f"<{tag}{attr}>{v}</{tag}>" for v in values)


def _table(headers: Sequence[str], body: Iterable[str]) -> str:
    return f"<table><thead><tr>{_cells((escape(h) for h in headers), 'th')}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _badge(text: str, cls: str) -> str:
    return f'<span class="badge {cls}">{escape(text)}</span>'


def counts_section(counts: dict[str, int], status: dict[str, int]) -> str:
    cards = "".join(f'<div class="card"><span class="num">{n}</span><span class="what">{escape(what)}</span></div>'
                    for what, n in counts.items())
    line = " · ".join(f"{n} {escape(s)}" for s, n in status.items())
    return f'<section id="counts"><div class="cards">{cards}</div><p class="meta">Run status: {line}</p></section>'


def _p(value: float | None) -> str:
    return MISSING if value is None else (f"{value:.2g}" if value >= 1e-3 else "<0.001")


def _verdict_badge(verdict: str) -> str:
    return _badge(verdict, {BETTER: "better", WORSE: "worse"}.get(verdict.split(",")[0], "neutral"))


def _interval(interval: tuple[float, float] | None) -> str:
    return MISSING if interval is None else f"[{interval[0]:+.3g}, {interval[1]:+.3g}]"


def _of_baseline(e: RouteEntry, value: float | None) -> str:
    if value is None:
        return MISSING
    pct = e.percent(value)
    return f"{value:.3g}" + (f" ({pct:.2g} %)" if pct is not None else "")


def _route_row(e: RouteEntry) -> str:
    seeds = f"{len(e.seeds)} / {len(e.baseline_seeds)}"
    unfinished = f'<span class="error">{e.unfinished} run(s) errored or running, left out</span>' if e.unfinished else ""
    reason = f'<span class="error">{escape(e.reason)}</span>' if e.reason else ""
    d = e.decision
    secondary = "".join(f'<br><span class="meta">{escape(m)} Δ {escape(x.estimate.text(signed=True))}</span>'
                        for m, x in e.secondary.items() if x is not None)
    cells = [escape(setting_label(e.setting)), escape(e.label) + unfinished + reason + secondary]
    first = [e.metric, MISSING if e.step is None else str(e.step), seeds, fmt_estimate(e.value), fmt_estimate(e.baseline),
             fmt_estimate(e.delta.estimate if e.delta else None, signed=True), fmt_estimate(e.delta_pct, signed=True, suffix="%"),
             _interval(d.interval if d else None), _of_baseline(e, d.margin if d else None), _of_baseline(e, d.mde if d else None)]
    last = [_p(e.delta.p_value if e.delta else None), _p(e.p_corrected), *[fmt_estimate(e.diagnostics[m]) for m in DIAGNOSTICS]]
    return (f"<tr>{_cells(cells)}{_cells((escape(n) for n in first), cls='num')}"
            f"<td>{_verdict_badge(e.verdict_text)}</td>{_cells((escape(n) for n in last), cls='num')}</tr>")


def route_section(entries: Sequence[RouteEntry]) -> str:
    design = next((e.design for e in entries if e.design), None)
    how = f" This sweep: {escape(design.describe())}, margin δ {escape(design.margin.text())} of the baseline." if design else ""
    hint = ("Each variant against the baseline of the same kind, profile and model preset, on the kind's primary held-out "
            "validation metric (the same samples, timesteps and noise for every run) at the <b>same step</b>: where the "
            "variant last validated, which is where the baseline also validated. Values are mean ± half width of the 95% t "
            "interval over seeds; Δ is paired by seed where both sides have the seed, else Welch. The verdict is read off the "
            "<b>simultaneous interval</b> of Δ (95% for all the comparisons of the setting together, and over every look of "
            "an adaptive sweep), against the margin of practical difference δ: <b>better</b> / <b>worse</b> when it excludes "
            "0 (beyond ±δ, within ±δ: too small to matter, or size unclear), <b>equivalent</b> when it lies inside ±δ, "
            "<b>identical</b> when the runs equal the baseline's exactly, inconclusive otherwise. MDE: the difference these "
            "seeds could detect with 80% power. Secondary metrics are shown under the variant with their 95% intervals, "
            "without a verdict. A variant whose runs diverged or whose OT plans did not converge gets no verdict, nor does "
            "a run not meant for conclusions (the smoke profile)." + how)
    if not entries:
        return f'<section id="route-status"><h2>Route status</h2><p class="hint">{hint}</p><p>No finished variant runs to compare.</p></section>'
    headers = ["Setting", "Variant", "Metric", "Step", "Seeds (variant / baseline)", "Value", "Baseline", "Δ (95%)", "Δ %",
               "Simultaneous CI of Δ", "Margin δ", "MDE", "Verdict", "p", "p adjusted", *[DIAGNOSTIC_HEADERS[m] for m in DIAGNOSTICS]]
    return (f'<section id="route-status"><h2>Route status</h2><p class="hint">{hint}</p>'
            f"{_table(headers, (_route_row(e) for e in entries))}</section>")


def tuning_section(tuned: Sequence[TunedVariant], optuna: str | None = None, images: Mapping[str, bytes] | None = None) -> str:
    if not tuned and not optuna:
        return ""
    parts = ['<section id="param-importance"><h2>Parameter importance</h2><p class="hint">Variants whose runs vary config '
             "knobs (Optuna sweeps): fANOVA importance of each knob for the final objective (Optuna's evaluator on a study "
             "built from the finished runs; sums to 1), and the runs in parallel coordinates.</p>"]
    if optuna:
        parts.append(f'<p>The Optuna study of this sweep opens in optuna-dashboard: <code id="optuna-dashboard">{escape(optuna)}</code> '
                     "(each trial carries its MLflow run id as a user attribute).</p>")
    for t in tuned:
        rows = (f"<tr><td>{escape(k)}</td><td class=\"num\">{v:.3f}</td><td><span class=\"bar\" style=\"width:{200 * v:.0f}px\"></span></td></tr>"
                for k, v in t.importances.items())
        body = _table(["Knob", "Importance", ""], rows) if t.importances else f"<p>{escape(t.note)}</p>"
        png = escape(t.png)
        parts.append(f"<h3>{escape(t.title)} ({len(t.trials)} finished runs)</h3>{body}"
                     f'<figure><a href="{png}"><img src="{escape(image_src(t.png, images or {}))}" alt="parallel coordinates of {escape(t.title)}"></a>'
                     f'<figcaption><a href="{png}">{png}</a>: knobs against the final {escape(t.metric)}</figcaption></figure>')
    return "".join(parts) + "</section>"


def plots_section(figures: Sequence[PlotLink], images: Mapping[str, bytes] | None = None) -> str:
    items = "".join(f'<figure><a href="{escape(f.file)}"><img src="{escape(image_src(f.file, images or {}))}" alt="{escape(f.caption)}"></a>'
                    f'<figcaption><a href="{escape(f.file)}">{escape(f.file)}</a>: {escape(f.caption)}</figcaption></figure>' for f in figures)
    return f'<section id="plots"><h2>Plots</h2><div class="plots">{items}</div></section>'


def _table_row(r: dict[str, Any]) -> str:
    run = f'{escape(r["run"])}<span class="id">{escape(r["run_id"])}</span>'
    status = _badge(r["status"], f"st-{r['status']}") + (f'<span class="error">{escape(r["error"])}</span>' if r["error"] else "")
    nums = _cells((escape(fmt(r[c])) for c, _ in TABLE_COLUMNS[1:]), cls="num")
    return (f'<tr class="st-{escape(r["status"])}"><td class="run">{run}</td><td>{escape(fmt(r["phase"]))}</td>{nums}'
            f"<td>{escape(fmt(r['note']))}</td><td>{status}</td></tr>")


def table_section(rows: Sequence[dict[str, Any]]) -> str:
    headers = ["Run", *(h for _, h in TABLE_COLUMNS), "Note", "Status"]
    return (f'<section id="ablation-table"><h2>Ablation table</h2><p class="hint">One row per run; "-" where a value does '
            f"not apply. Errored and running runs keep their last reported values.</p>{_table(headers, (_table_row(r) for r in rows))}</section>")


def files_section(files: Sequence[str]) -> str:
    links = " · ".join(f'<a href="{f}">{f}</a>' for f in files)
    return f'<section id="files"><h2>Files</h2><p>{links}</p></section>'


def render_page(*, counts: dict[str, int], status: dict[str, int], entries: Sequence[RouteEntry], tuned: Sequence[TunedVariant],
                figures: Sequence[PlotLink], rows: Sequence[dict[str, Any]], files: Sequence[str], source: str, generated: str,
                optuna: str | None = None, images: Mapping[str, bytes] | None = None) -> str:
    """The whole page; ``images``: the plots' PNG bytes by file name, inlined (:func:`image_src`)."""
    meta = f"Source: {escape(source)} · generated {escape(generated)}" if source else f"Generated {escape(generated)}"
    body = "".join([
        f'<header><h1>{escape(TITLE)}</h1><p class="purpose">{escape(PURPOSE)}</p><p class="meta">{meta}</p></header>',
        counts_section(counts, status), route_section(entries), tuning_section(tuned, optuna, images), plots_section(figures, images),
        table_section(rows), files_section(files),
    ])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, '
            f'initial-scale=1"><title>{escape(TITLE)}</title><style>{CSS}</style></head><body><main>{body}</main></body></html>\n')

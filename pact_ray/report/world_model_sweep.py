"""The summary of a world-model sweep: every variant x seed with its validation metrics,
each variant's means with 95% intervals, the MAE variants against the GPT baseline on
val_mse, and the evaluation-report command of every run.

World-model runs are compared on held-out validation metrics only (MAE and GPT training
losses are different objectives and never compared). An MAE variant meets the GPT variant
of the same model preset, paired by seed (the same data split, seeds and validation
samples), with Holm's correction over the MAE variants compared with that GPT.

Files: ``wm_summary.csv`` / ``.json`` (one row per run), ``wm_comparison.json`` (the
variant means and the MAE-vs-GPT comparisons) and ``index.html``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import time
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from pact_ray.fileio import atomic_write
from pact_ray.metrics import names as M
from pact_ray.report.ablation.page import CSS, MISSING, _badge, _table, fmt
from pact_ray.report.ablation.stats import BETTER, WORSE, Estimate, difference, mean_interval, verdict
from pact_ray.report.summary import FINISHED, row_from_run, search_all
from pact_ray.tracking.tags import SWEEP_TAG
from pact_ray.verdicts import Design, decide_family

METRICS = (M.VAL_MSE, M.VAL_MSE_VISUAL, M.VAL_MSE_MOTOR_STRIP, M.SSIM, M.PSNR, M.MOTOR_POSITION_MAE_MEAN,
           M.MOTOR_VELOCITY_MAE_MEAN, M.MOTOR_DIRECTION_ACCURACY, M.ACTION_DISCRIMINATION_SCORE, M.TF_FR_GAP)
COMPARED = M.VAL_MSE  # lower is better
CSV_NAME, JSON_NAME, COMPARISON_JSON, INDEX_HTML = "wm_summary.csv", "wm_summary.json", "wm_comparison.json", "index.html"
COLUMNS = ["run", "mlflow_run_id", "variant", "model_type", "model", "seed", "status", "error", "steps", *METRICS, "eval_report"]


@dataclass
class WorldModelSweep:
    rows: list[dict[str, Any]]
    means: list[dict[str, Any]]  # per variant: {"variant", "model", "runs", metric: Estimate | None}
    comparisons: list[dict[str, Any]]  # MAE variant vs GPT baseline on val_mse
    tracking_uri: str


def eval_report_command(run_id: str, tracking_uri: str, storage: str, name: str) -> str:
    """The exact command that writes the evaluation report of run ``run_id``."""
    from pact_ray.cli import project_command

    return project_command("analysis/eval_report.py", "--run", run_id, "--tracking-uri", tracking_uri,
                           "--storage-path", storage, "--out", f"reports/{name}")


def collect_world_model_sweep(tracking_uri: str, experiment_id: str, parent_run_id: str, storage: str,
                              design: Design | None = None) -> WorldModelSweep:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment(experiment_id).name
    rows = []
    for run in search_all(client, [experiment_id], f"tags.`{SWEEP_TAG}` = '{parent_run_id}'"):
        base = row_from_run(run, experiment)
        metrics, params = run.data.metrics, run.data.params
        row = {"run": base["run"], "mlflow_run_id": run.info.run_id, "variant": base["variant"],
               "model_type": params.get("model_type"), "model": base["model"], "seed": base["seed"], "status": base["status"],
               "error": base["error"], "steps": base["steps"]}
        row.update({m: metrics.get(m) for m in METRICS})
        slug = f"{base['variant']}_s{base['seed']}_{run.info.run_id[:6]}"  # Optuna's trials share variant and seed
        row["eval_report"] = eval_report_command(run.info.run_id, tracking_uri, storage, slug)
        rows.append(row)
    rows.sort(key=lambda r: (r["variant"], r["seed"] if r["seed"] is not None else -1))
    return WorldModelSweep(rows, variant_means(rows), compare_to_gpt(rows, design), tracking_uri)


def _finished(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == FINISHED and r.get(metric) is not None]


def variant_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        of = [r for r in rows if r["variant"] == variant]
        entry: dict[str, Any] = {"variant": variant, "model": of[0]["model"], "model_type": of[0]["model_type"],
                                 "runs": len(of), "finished": sum(r["status"] == FINISHED for r in of)}
        entry.update({m: mean_interval([r[m] for r in _finished(of, m)]) for m in METRICS})
        out.append(entry)
    return out


def compare_to_gpt(rows: list[dict[str, Any]], design: Design | None = None) -> list[dict[str, Any]]:
    """Each MAE variant against the GPT variant of its model preset on val_mse (the world
    model's primary metric), paired by seed; the verdict is read off the simultaneous interval
    of the MAE variants that meet that GPT, against the margin (``pact_ray.verdicts``)."""
    design = design or Design()
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        of_model = [r for r in rows if r["model"] == model]
        gpts = list(dict.fromkeys(r["variant"] for r in of_model if r["model_type"] == "gpt"))
        maes = list(dict.fromkeys(r["variant"] for r in of_model if r["model_type"] == "mae"))
        if not gpts or not maes:
            continue
        gpt = gpts[0]
        base = {r["seed"]: r[COMPARED] for r in _finished([r for r in of_model if r["variant"] == gpt], COMPARED)}
        family = []
        for mae in maes:
            values = {r["seed"]: r[COMPARED] for r in _finished([r for r in of_model if r["variant"] == mae], COMPARED)}
            diff = difference(values, base) if values and base else None
            family.append((mae, values, diff))
        base_mean = statistics.fmean(base.values()) if base else None
        decided = decide_family([d for _, _, d in family], [len(set(v) & set(base)) for _, v, _ in family],
                                [base_mean] * len(family), design)
        margin = design.margin.text() if design.margin.relative else f"±{design.margin.value:g}"
        for (mae, values, diff), d in zip(family, decided):
            lo, hi = (diff.estimate.interval if diff else None) or (None, None)
            p = diff.p_value if diff else None
            p_adj = None if p is None or d is None or d.level <= 0 else min(1.0, p * design.alpha / d.level)
            v_corr = d.describe(margin) if d else None
            out.append({"variant": mae, "baseline": gpt, "model": model, "metric": COMPARED, "seeds": sorted(values),
                        "baseline_seeds": sorted(base), "delta": diff.estimate.mean if diff else None,
                        "ci_low": lo, "ci_high": hi, "method": diff.method if diff else None,
                        "p_value": diff.p_value if diff else None, "p_corrected": p_adj,
                        "verdict": verdict(diff) if diff else "no baseline", "verdict_corrected": v_corr or "no baseline",
                        "corrected_ci_low": d.interval[0] if d and d.interval else None,
                        "corrected_ci_high": d.interval[1] if d and d.interval else None,
                        "margin": d.margin if d else None, "mde": d.mde if d else None})
    return out


def _jsonable(value: Any) -> Any:
    return value.to_json() if isinstance(value, Estimate) else value


def write_world_model_summary(wm: WorldModelSweep, out_dir: str | os.PathLike) -> list[Path]:
    """Write the summary files into ``out_dir`` (each atomically, the page last)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in wm.rows:
        writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS})
    files = {
        CSV_NAME: buf.getvalue(),
        JSON_NAME: json.dumps(wm.rows, indent=1),
        COMPARISON_JSON: json.dumps({"means": [{k: _jsonable(v) for k, v in m.items()} for m in wm.means],
                                     "mae_vs_gpt": wm.comparisons}, indent=1),
        INDEX_HTML: render_page(wm),
    }
    for name, content in files.items():
        atomic_write(out / name, content)
    return [out / name for name in files]


def _ci(comparison: dict[str, Any]) -> str:
    lo, hi = comparison["ci_low"], comparison["ci_high"]
    return MISSING if lo is None else f"[{lo:+.3g}, {hi:+.3g}]"


def _est(value: Estimate | None) -> str:
    return MISSING if value is None else value.text()


def render_page(wm: WorldModelSweep) -> str:
    means = _table(["Variant", "Model", "Runs (finished)", *METRICS],
                   (f"<tr><td>{escape(m['variant'])}</td><td>{escape(str(m['model']))}</td><td class=\"num\">{m['runs']} ({m['finished']})</td>"
                    + "".join(f'<td class="num">{escape(_est(m[k]))}</td>' for k in METRICS) + "</tr>" for m in wm.means))
    if wm.comparisons:
        comps = _table(["MAE variant", "GPT baseline", "Model", "Seeds", "Δ val_mse", "95% CI", "p", "p Holm", "Verdict", "Corrected"],
                       (f"<tr><td>{escape(c['variant'])}</td><td>{escape(c['baseline'])}</td><td>{escape(str(c['model']))}</td>"
                        f"<td class=\"num\">{len(c['seeds'])}/{len(c['baseline_seeds'])}</td>"
                        f"<td class=\"num\">{fmt(c['delta'])}</td>"
                        f"<td class=\"num\">{_ci(c)}</td>"
                        f"<td class=\"num\">{fmt(c['p_value'])}</td><td class=\"num\">{fmt(c['p_corrected'])}</td>"
                        f"<td>{_verdict(c['verdict'])}</td><td>{_verdict(c['verdict_corrected'])}</td></tr>" for c in wm.comparisons))
    else:
        comps = "<p>No MAE and GPT variants of the same model preset in this sweep.</p>"
    runs = _table(["Run", "Status", "Steps", M.VAL_MSE, M.SSIM, M.PSNR, "Evaluation report"],
                  (f"<tr><td>{escape(r['run'])}<span class=\"id\">{escape(r['mlflow_run_id'])}</span></td>"
                   f"<td>{_badge(r['status'], 'st-' + r['status'])}</td><td class=\"num\">{fmt(r['steps'])}</td>"
                   + "".join(f'<td class="num">{escape(fmt(r[m]))}</td>' for m in (M.VAL_MSE, M.SSIM, M.PSNR))
                   + f"<td><code>{escape(r['eval_report'])}</code></td></tr>" for r in wm.rows))
    title = "World model sweep: validation metrics"
    hint = ("Every number is a held-out validation metric at the run's last evaluation (training losses of MAE and GPT are "
            "different objectives and are not compared). Means are ± the half width of the 95% t interval over seeds; "
            "MAE vs GPT is paired by seed, with Holm's correction over the MAE variants.")
    body = (f"<header><h1>{escape(title)}</h1><p class=\"meta\">Source: {escape(wm.tracking_uri)} · generated "
            f"{escape(time.strftime('%Y-%m-%d %H:%M:%S'))}</p><p class=\"hint\">{hint}</p></header>"
            f"<section id=\"means\"><h2>Variants</h2>{means}</section>"
            f"<section id=\"mae-vs-gpt\"><h2>MAE vs GPT on val_mse</h2>{comps}</section>"
            f"<section id=\"runs\"><h2>Runs</h2>{runs}</section>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body><main>{body}</main></body></html>\n")


def _verdict(v: str) -> str:
    return _badge(v, {BETTER: "better", WORSE: "worse"}.get(v.split(",")[0], "neutral"))


def summary_lines(wm: WorldModelSweep) -> list[str]:
    lines = ["Validation (held-out) per variant, mean ± 95% interval over seeds:"]
    width = max((len(m["variant"]) for m in wm.means), default=0)
    for m in wm.means:
        lines.append(f"  {m['variant']:<{width}}  val_mse {_est(m[M.VAL_MSE]):<22} ssim {_est(m[M.SSIM]):<20} "
                     f"psnr {_est(m[M.PSNR])}  ({m['finished']}/{m['runs']} runs)")
    for c in wm.comparisons:
        delta = MISSING if c["delta"] is None else f"{c['delta']:+.4g}"
        ci = "" if c["ci_low"] is None else f" {_ci(c)}"
        lines.append(f"MAE vs GPT ({c['model']}): {c['variant']} - {c['baseline']} val_mse {delta}{ci}, "
                     f"{len(c['seeds'])} seed(s): {c['verdict']}, corrected {c['verdict_corrected']}")
    if wm.rows:
        shown = next((r for r in wm.rows if r["status"] == FINISHED), wm.rows[0])  # a run with its final checkpoint
        lines.append(f"Evaluation report of a run (every run's command is in {CSV_NAME}):")
        lines.append(f"  {shown['eval_report']}")
    return lines


def print_world_model_summary(wm: WorldModelSweep) -> None:
    print("\n".join(summary_lines(wm)))

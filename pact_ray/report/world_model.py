"""The world model's evaluation report (``docs/design/world_model_eval_report.txt``): one
HTML page and one Markdown file per evaluated run, with their PNG figures.

Sections: a header (run name, model type, checkpoint, data set, date, validation
samples), the run's notes, the metrics table (every metric of
:mod:`pact_ray.metrics.world_model`, on the whole validation split unless limited),
recommendations from the explicit :data:`RULES`, the comparison with a previous run
(evaluated on the same samples), and for a few samples a counterfactual grid (rows:
ground truth, STAY in red, MOVE+ in green, MOVE- in blue), an error heatmap (jet
colormap) and a per-joint table of the true and decoded positions under each action.

:func:`resolve_checkpoint` turns what a user names (an MLflow run id or a checkpoint
path) into a checkpoint; :func:`build_report` evaluates and writes. Figures are drawn
with matplotlib's object API on the Agg canvas (no pyplot state).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pact_ray.data.arm.dataset import WorldModelData
from pact_ray.data.arm.strip import ACTIONS, JOINT_LABELS, MOVE_NEG, MOVE_POS, STAY
from pact_ray.metrics import names as M
from pact_ray.metrics.world_model import Evaluation, Metrics, compute_metrics, evaluate_model
from pact_ray.models.checkpoint import CheckpointError
from pact_ray.runs.world_model import WorldModelRunConfig
from pact_ray.training.validation import eval_sample_ids
from pact_ray.training.world_model import KIND, LoadedWorldModel, dataset_for, load_checkpoint

ACTION_COLOURS = ("#d62728", "#2ca02c", "#1f77b4")  # STAY red, MOVE+ green, MOVE- blue
GT_COLOUR = "#222222"
REPORT_HTML, REPORT_MD, METRICS_JSON = "report.html", "report.md", "metrics.json"
ARTIFACT_PATH = "eval_report"  # where the report goes among the run's MLflow artifacts
DPI = 100


class ReportError(ValueError):
    """A report that cannot be made (one-sentence message)."""


# ------------------------------------------------------------------ metrics order

def metric_order(metrics: Metrics) -> list[str]:
    """The evaluation report design's order, then any per-action entries and the GPT's TF/FR metrics."""
    actions = range(len(ACTIONS))
    head = [M.VAL_MSE, M.VAL_MSE_VISUAL, M.SSIM, M.PSNR, M.VAL_MSE_MOTOR_STRIP]
    head += [M.VAL_MSE_ACTION.format(k=k) for k in actions]
    head += [M.VAL_MSE_STATIC, M.VAL_MSE_DYNAMIC, M.MOTOR_POSITION_MAE_MEAN, M.MOTOR_VELOCITY_MAE_MEAN,
             M.MOTOR_DIRECTION_ACCURACY, M.MOTOR_CONSISTENCY_ERROR, M.ACTION_DISCRIMINATION_SCORE,
             M.MOTOR_DISCRIMINATION_SCORE, M.MOTOR_POSITION_MAE_PER_JOINT]
    head += [M.MOTOR_POSITION_MAE_ACTION.format(k=k) for k in actions]
    head += [M.VAL_MSE_TEACHER_FORCED, M.TF_FR_GAP]
    return [m for m in head if m in metrics]


HIGHER_IS_BETTER = frozenset({M.SSIM, M.PSNR, M.MOTOR_DIRECTION_ACCURACY, M.ACTION_DISCRIMINATION_SCORE,
                              M.MOTOR_DISCRIMINATION_SCORE})


def fmt_value(value: float | list[float]) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.4f}" for v in value) + "]"
    return "n/a" if math.isnan(value) else f"{value:.6f}"


# ------------------------------------------------------------------ recommendations

def _ratio(num: str, den: str) -> Callable[[Metrics], float | None]:
    def value(m: Metrics) -> float | None:
        a, b = m.get(num), m.get(den)
        if not isinstance(a, float) or not isinstance(b, float) or math.isnan(a) or math.isnan(b) or b <= 0:
            return None
        return a / b
    return value


def _metric(name: str) -> Callable[[Metrics], float | None]:
    def value(m: Metrics) -> float | None:
        v = m.get(name)
        return v if isinstance(v, float) and not math.isnan(v) else None
    return value


def _pan_share(m: Metrics) -> float | None:
    per_joint = m.get(M.MOTOR_POSITION_MAE_PER_JOINT)
    if not isinstance(per_joint, list) or not per_joint[1:] or np.mean(per_joint[1:]) <= 0:
        return None
    return per_joint[0] / float(np.mean(per_joint[1:]))


@dataclass(frozen=True)
class Rule:
    """Fires when ``value(metrics) <op> threshold``; ``advice`` is formatted with ``value``."""

    quantity: str  # what is compared, for the rules table
    op: str  # ">" or "<"
    threshold: float
    value: Callable[[Metrics], float | None]
    advice: str

    def check(self, metrics: Metrics) -> str | None:
        v = self.value(metrics)
        if v is None or not (v > self.threshold if self.op == ">" else v < self.threshold):
            return None
        return self.advice.format(value=v, threshold=self.threshold)


RULES: tuple[Rule, ...] = (
    Rule(M.MOTOR_CONSISTENCY_ERROR, ">", 1.0, _metric(M.MOTOR_CONSISTENCY_ERROR),
         "Motor position and velocity predictions are inconsistent (consistency error {value:.2f} degrees > {threshold:g}). "
         "Consider adding a consistency loss or simplifying the velocity encoding."),
    Rule(M.MOTOR_DIRECTION_ACCURACY, "<", 0.9, _metric(M.MOTOR_DIRECTION_ACCURACY),
         "The predicted pan direction is right in only {value:.1%} of the samples (< {threshold:.0%}): the action "
         "conditioning is weak. Give the decoder the action token too, or train longer."),
    Rule(M.ACTION_DISCRIMINATION_SCORE, "<", 0.005, _metric(M.ACTION_DISCRIMINATION_SCORE),
         "Predictions barely change with the action (discrimination {value:.4f} < {threshold:g}): the model ignores "
         "the action token."),
    Rule(M.MOTOR_POSITION_MAE_MEAN, ">", 2.0, _metric(M.MOTOR_POSITION_MAE_MEAN),
         "Decoded joint positions are off by {value:.2f} degrees on average (> {threshold:g}): weight the motor strip "
         "rows in the loss or give the strip its own patches."),
    Rule("J0 position MAE / mean of J1..J5", ">", 3.0, _pan_share,
         "The shoulder pan (the joint the actions move) is decoded {value:.1f}x worse than the other joints: the model "
         "has not learnt the action's effect on the pan."),
    Rule(f"{M.VAL_MSE_DYNAMIC} / {M.VAL_MSE_STATIC}", ">", 4.0, _ratio(M.VAL_MSE_DYNAMIC, M.VAL_MSE_STATIC),
         "Errors concentrate on the pixels that move ({value:.1f}x the error of static pixels): the model copies the "
         "context but does not move the arm. Weight changed pixels in the loss."),
    Rule(f"{M.VAL_MSE_MOTOR_STRIP} / {M.VAL_MSE_VISUAL}", ">", 2.0, _ratio(M.VAL_MSE_MOTOR_STRIP, M.VAL_MSE_VISUAL),
         "The motor strip is predicted {value:.1f}x worse than the camera rows: weight the strip rows in the loss."),
    Rule(M.SSIM, "<", 0.6, _metric(M.SSIM),
         "Predictions are blurry or structurally off (SSIM {value:.3f} < {threshold:g}): train longer, or add an SSIM "
         "or perceptual term to the loss."),
    Rule(M.TF_FR_GAP, ">", 0.002, _metric(M.TF_FR_GAP),
         "Free-running MSE exceeds teacher-forced MSE by {value:.4f} (> {threshold:g}): autoregressive errors compound "
         "along the raster; the MAE model predicts every patch at once."),
)
REGRESSION_TOLERANCE = 0.10  # a compared run with val_mse lower by more than this fraction is a regression


def recommendations(metrics: Metrics, previous: Metrics | None = None) -> list[str]:
    """The advice of every rule that fires (and a regression note against ``previous``)."""
    out = [a for a in (r.check(metrics) for r in RULES) if a]
    if previous is not None and previous.get(M.VAL_MSE, 0) > 0:
        worse = metrics[M.VAL_MSE] / previous[M.VAL_MSE] - 1  # type: ignore[operator]
        if worse > REGRESSION_TOLERANCE:
            out.append(f"val_mse is {worse:.0%} worse than the compared run's (> {REGRESSION_TOLERANCE:.0%}): "
                       "revert the change or train longer before comparing again.")
    return out or ["No rule fired: every metric is within its threshold."]


# ------------------------------------------------------------------ finding checkpoints

@dataclass
class RunSource:
    """What the report evaluates: a loaded checkpoint and what MLflow knows of its run."""

    model: LoadedWorldModel
    shown_as: str  # how the header names the checkpoint (an artifact URI or the path)
    name: str
    run_id: str | None = None
    notes: str = ""


def resolve_checkpoint(spec: str, tracking_uri: str, storage_path: str | os.PathLike) -> RunSource:
    """Load what ``spec`` names: a checkpoint (file, or trial checkpoint folder) or an MLflow run id.

    For a run id the checkpoint is the run's ``checkpoint`` artifact (profiles that export
    one) or else the newest readable ``checkpoint_*`` of its Ray trial folder,
    ``<storage_path>/<sweep>/*_<trial id>`` (both hold the run's best weights).
    """
    path = Path(spec)
    if path.exists():
        return RunSource(model=load_checkpoint(path.resolve()), shown_as=str(path.resolve()), name=_checkpoint_name(path))
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pact_ray.tracking.store import check_tracking_uri, sqlite_path
    from pact_ray.tracking.tags import CHECKPOINT_TAG, TRIAL_TAG

    if "/" in spec or "\\" in spec or spec.endswith((".pt", ".pth")):
        raise ReportError(f"checkpoint {spec} does not exist")
    check_tracking_uri(tracking_uri)
    if tracking_uri.startswith("sqlite:///") and not sqlite_path(tracking_uri).is_file():
        raise ReportError(f"{spec!r} is no checkpoint path, and the tracking store {sqlite_path(tracking_uri)} does not exist "
                          "to look it up as a run id (pass the sweep's --tracking-uri)")
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(spec)
    except MlflowException:
        raise ReportError(f"{spec!r} is neither a checkpoint path nor a run id in {tracking_uri}") from None
    tags = run.data.tags
    if tags.get("kind", KIND) != KIND:
        raise ReportError(f"run {spec} is a {tags.get('kind')!r} run, not a world-model run")
    about = dict(name=run.info.run_name or spec, run_id=spec, notes=tags.get("mlflow.note.content", ""))
    if any(a.path == "checkpoint/state.pt" for a in client.list_artifacts(spec, "checkpoint")):
        with tempfile.TemporaryDirectory(prefix="pact_ray_wm_") as tmp:
            model = load_checkpoint(client.download_artifacts(spec, "checkpoint", tmp))
        return RunSource(model=model, shown_as=f"{run.info.artifact_uri}/checkpoint", **about)
    trial_id, sweep = tags.get(TRIAL_TAG), tags.get("sweep")
    recorded = tags.get(CHECKPOINT_TAG, "")
    if recorded and "://" not in recorded and Path(recorded).parent.is_dir():
        trial_dirs = [Path(recorded).parent]  # where the run recorded its checkpoints: found from any folder
    else:
        trial_dirs = sorted(Path(storage_path, sweep).glob(f"*_{trial_id}")) if trial_id and sweep else []
    errors = []
    for folder in sorted((c for d in trial_dirs for c in d.glob("checkpoint_*") if c.is_dir()), reverse=True):
        try:  # newest first; a corrupted one falls back to the one before
            return RunSource(model=load_checkpoint(folder), shown_as=str(folder), **about)
        except CheckpointError as e:
            errors.append(str(e))
    where = f"{Path(storage_path, sweep or '?')}/*_{trial_id}"
    detail = f" ({errors[0]})" if errors else ""
    raise ReportError(f"run {spec} has no checkpoint: no 'checkpoint' artifact and no readable checkpoint in {where}{detail}; "
                      "pass the sweep's --storage-path or a checkpoint path")


def _checkpoint_name(path: Path) -> str:
    """A trial checkpoint folder is named after its trial folder; a file after itself."""
    path = path.resolve()
    if path.is_dir() and path.name.startswith("checkpoint_"):
        return path.parent.name
    return path.stem if path.is_file() else path.name


def read_notes(source: RunSource, notes_file: str | None) -> str:
    if notes_file is None:
        return source.notes
    try:
        return Path(notes_file).read_text(encoding="utf-8")
    except OSError as e:
        raise ReportError(f"--notes {notes_file} cannot be read ({e.strerror})") from None


# ------------------------------------------------------------------ evaluation

def evaluate(loaded: LoadedWorldModel, data: WorldModelData, ids: np.ndarray) -> tuple[Evaluation, Metrics]:
    """The predictions of samples ``ids`` of the validation split, and their metrics, batched
    as the trainer batches them (so the same samples and weights give the same numbers)."""
    ev = evaluate_model(loaded.model, data.val, ids, torch.device("cpu"))
    return ev, compute_metrics(ev, data.strip)


def check_compatible(loaded: LoadedWorldModel, reference: LoadedWorldModel, name: str) -> None:
    """A compared model must read the same frames: image size and context length."""
    a, b = loaded.cfg, reference.cfg
    if (a.image_size, a.context_frames) != (b.image_size, b.context_frames):
        raise ReportError(f"{name} was trained on {a.image_size}-pixel frames with {a.context_frames} context frames; "
                          f"the report's run uses {b.image_size} pixels and {b.context_frames} frames")


# ------------------------------------------------------------------ figures

def to_png(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=DPI, facecolor="white")


def _frame_axes(ax, image: np.ndarray, title: str = "", colour: str | None = None, **imshow: Any) -> None:
    ax.imshow(image, interpolation="nearest", **imshow)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    for spine in ax.spines.values():
        spine.set_visible(colour is not None)
        if colour is not None:
            spine.set_edgecolor(colour)
            spine.set_linewidth(3)


def counterfactual_grid(context: np.ndarray, target: np.ndarray, predictions: np.ndarray, strip_rows: int, path: Path) -> None:
    """context: [C, H, W, 3], target: [H, W, 3], predictions: [A, H, W, 3] -> PNG.

    Top: the context frames. Then one row per frame (ground truth, then each action's
    prediction): the frame, its change from the last context frame (x4) and its motor strip.
    """
    rows = [("GT", GT_COLOUR, target)] + [(a, c, p) for a, c, p in zip(ACTIONS, ACTION_COLOURS, predictions)]
    fig = Figure(figsize=(6.4, 1.75 * (len(rows) + 1)), layout="constrained")
    grid = fig.add_gridspec(len(rows) + 1, max(3, len(context)))
    for i, frame in enumerate(context):
        back = len(context) - 1 - i
        _frame_axes(fig.add_subplot(grid[0, i]), frame, f"context t-{back}" if back else "context t")
    for j in range(len(context), max(3, len(context))):
        fig.add_subplot(grid[0, j]).set_axis_off()
    last = context[-1]
    for r, (label, colour, frame) in enumerate(rows, start=1):
        first = r == 1
        ax = fig.add_subplot(grid[r, 0])
        _frame_axes(ax, frame, "next frame" if first else "", colour)
        ax.set_ylabel(label, color=colour, fontsize=11, fontweight="bold")
        _frame_axes(fig.add_subplot(grid[r, 1]), np.clip(np.abs(frame - last) * 4, 0, 1),
                    "change vs last context (x4)" if first else "", colour)
        _frame_axes(fig.add_subplot(grid[r, 2]), frame[-strip_rows:], "motor strip" if first else "", colour, aspect="auto")
    to_png(fig, path)


def error_heatmap(target: np.ndarray, prediction: np.ndarray, action: int, path: Path) -> None:
    """The true next frame, the prediction under the recorded action and their per-pixel
    absolute error (mean over channels) in the jet colormap -> PNG."""
    err = np.abs(prediction - target).mean(axis=-1)
    fig = Figure(figsize=(5.0, 1.9), layout="constrained")
    axes = fig.subplots(1, 3)
    _frame_axes(axes[0], target, "ground truth")
    _frame_axes(axes[1], prediction, f"prediction ({ACTIONS[action]})")
    _frame_axes(axes[2], err, "absolute error", cmap="jet", vmin=0, vmax=max(float(err.max()), 1e-6))
    fig.colorbar(axes[2].images[0], ax=axes[2], fraction=0.046)
    to_png(fig, path)


# ------------------------------------------------------------------ the report

@dataclass
class SampleView:
    """One sample's figures and its per-joint table (decoded positions, degrees)."""

    index: int  # position among the evaluated samples
    episode: int
    frame: int
    action: int
    grid: str  # file names relative to the report
    heatmap: str
    joints: list[tuple[str, float, list[float]]]  # (joint, true position, position under each action)


@dataclass
class ReportContent:
    run_name: str
    model_type: str
    checkpoint: str
    dataset: str
    date: str
    val_samples: int
    scoring: str  # which samples were scored, and how the numbers relate to the run's training-time ones
    notes: str
    metrics: Metrics
    recommendations: list[str]
    samples: list[SampleView]
    previous_name: str | None = None
    previous: Metrics | None = None


def pick_samples(actions: np.ndarray, count: int) -> list[int]:
    """``count`` evaluated samples cycling through the recorded actions (MOVE+, MOVE-, STAY, ...)
    where the split has them, each the middle one of its action's remaining samples."""
    picked: list[int] = []
    for i in range(min(count, len(actions))):
        want = (MOVE_POS, MOVE_NEG, STAY)[i % 3]
        pool = [j for j in np.flatnonzero(actions == want) if j not in picked]
        pool = pool or [j for j in range(len(actions)) if j not in picked]
        picked.append(int(pool[len(pool) // 2]))
    return picked


def sample_views(data: WorldModelData, ev: Evaluation, count: int, image_dir: Path) -> list[SampleView]:
    views = []
    pos_true, _ = data.strip.decode(ev.target)
    pos_cf, _ = data.strip.decode(ev.counterfactual)  # [N, A, 6]
    for n, i in enumerate(pick_samples(ev.action, count)):
        batch = data.val.batch([int(ev.ids[i])])
        context = batch.context[0].movedim(1, -1).numpy()  # [C, H, W, 3]
        grid, heat = f"images/counterfactual_{n}.png", f"images/error_heatmap_{n}.png"
        counterfactual_grid(context, ev.target[i], ev.counterfactual[i], data.strip.rows, image_dir / Path(grid).name)
        error_heatmap(ev.target[i], ev.prediction[i], int(ev.action[i]), image_dir / Path(heat).name)
        joints = [(JOINT_LABELS[j], float(pos_true[i, j]), [float(v) for v in pos_cf[i, :, j]]) for j in range(len(JOINT_LABELS))]
        views.append(SampleView(n, int(batch.episode[0]), int(batch.frame[0]), int(ev.action[i]), grid, heat, joints))
    return views


CSS = """
body{font:15px/1.5 system-ui,-apple-system,'Segoe UI',sans-serif;color:#1d2330;max-width:1100px;margin:24px auto;padding:0 20px}
h1{font-size:26px;margin:0 0 12px}h2{font-size:20px;margin:28px 0 10px;border-bottom:2px solid #e3e6ec;padding-bottom:4px}
h3{font-size:16px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 14px}th,td{border:1px solid #d5d9e0;padding:4px 10px;text-align:left}
th{background:#f1f3f7}td.num{text-align:right;font-variant-numeric:tabular-nums;font-family:ui-monospace,Menlo,monospace}
table.header th{width:150px}.notes{white-space:pre-wrap;background:#f7f8fa;border:1px solid #e3e6ec;padding:10px 14px;font-size:13.5px}
ul.recs li{margin:4px 0}.better{color:#1a7f37}.worse{color:#c62828}
.sample{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}.sample img{border:1px solid #e3e6ec;max-width:100%}
figure{margin:0}figcaption{font-size:13px;color:#5a6270}.a0{color:#d62728}.a1{color:#2ca02c}.a2{color:#1f77b4}
details{margin:8px 0}
"""


def _rules_table_md() -> list[str]:
    lines = ["| Quantity | Fires when |", "|---|---|"]
    lines += [f"| {r.quantity} | {r.op} {r.threshold:g} |" for r in RULES]
    return lines + [f"| val_mse vs the compared run | > {REGRESSION_TOLERANCE:.0%} worse |"]


def _comparison_rows(c: ReportContent) -> list[tuple[str, str, str, str, str]]:
    """(metric, this run, previous, change, verdict) for every metric both runs have."""
    assert c.previous is not None
    rows = []
    for name in metric_order(c.metrics):
        if name not in c.previous:
            continue
        now, before = c.metrics[name], c.previous[name]
        if isinstance(now, list) or isinstance(before, list) or math.isnan(now) or math.isnan(before):
            rows.append((name, fmt_value(now), fmt_value(before), "", ""))
            continue
        delta = now - before
        verdict = "" if delta == 0 else ("better" if (delta > 0) == (name in HIGHER_IS_BETTER) else "worse")
        rows.append((name, fmt_value(now), fmt_value(before), f"{delta:+.6f}", verdict))
    return rows


def render_html(c: ReportContent) -> str:
    header = [("Run Name", c.run_name), ("Model Type", c.model_type), ("Checkpoint", c.checkpoint), ("Dataset", c.dataset),
              ("Date", c.date), ("Val Samples", str(c.val_samples)), ("Scoring", c.scoring)]
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Evaluation Report: {escape(c.run_name)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Evaluation Report: {escape(c.run_name)}</h1>",
             '<table class="header">' + "".join(f"<tr><th>{k}</th><td>{escape(v)}</td></tr>" for k, v in header) + "</table>",
             "<h2>Analysis Notes</h2>",
             f'<div class="notes">{escape(c.notes.strip()) or "(no notes)"}</div>',
             "<h2>Metrics</h2><table><thead><tr><th>Metric</th><th>Value</th></tr></thead><tbody>"]
    parts += [f'<tr><td>{escape(m)}</td><td class="num">{fmt_value(c.metrics[m])}</td></tr>' for m in metric_order(c.metrics)]
    parts.append("</tbody></table><h2>Recommendations</h2><ul class=\"recs\">")
    parts += [f"<li>{escape(r)}</li>" for r in c.recommendations]
    parts.append("</ul><details><summary>How recommendations are made</summary><table><thead><tr><th>Quantity</th>"
                 "<th>Fires when</th></tr></thead><tbody>")
    parts += [f"<tr><td>{escape(r.quantity)}</td><td>{escape(r.op)} {r.threshold:g}</td></tr>" for r in RULES]
    parts.append(f"<tr><td>val_mse vs the compared run</td><td>&gt; {REGRESSION_TOLERANCE:.0%} worse</td></tr></tbody></table></details>")
    if c.previous is not None:
        parts.append(f"<h2>Comparison with {escape(c.previous_name or 'the previous run')}</h2><table><thead><tr><th>Metric</th>"
                     "<th>This run</th><th>Previous</th><th>Change</th><th></th></tr></thead><tbody>")
        parts += [f'<tr><td>{escape(n)}</td><td class="num">{a}</td><td class="num">{b}</td><td class="num">{d}</td>'
                  f'<td class="{v}">{v}</td></tr>' for n, a, b, d, v in _comparison_rows(c)]
        parts.append("</tbody></table>")
    parts.append("<h2>Counterfactual Action Grids</h2><p>Each grid: Row 1 = GT, Row 2 = STAY (red), Row 3 = MOVE+ (green), "
                 "Row 4 = MOVE- (blue). Positions in the tables are decoded from each frame's motor strip (degrees).</p>")
    heads = "".join(f'<th class="a{k}">{escape(a)}</th>' for k, a in enumerate(ACTIONS))
    for s in c.samples:
        rows = "".join(f'<tr><td>{j}</td><td class="num">{gt:.4f}</td>' + "".join(f'<td class="num">{v:.4f}</td>' for v in vals) + "</tr>"
                       for j, gt, vals in s.joints)
        parts.append(
            f"<h3>Sample {s.index}</h3><p>episode {s.episode}, frame {s.frame}; recorded action "
            f'<b class="a{s.action}">{escape(ACTIONS[s.action])}</b></p><div class="sample">'
            f'<figure><img src="{s.grid}" alt="Counterfactual grid {s.index}" width="640"></figure>'
            f'<div><figure><img src="{s.heatmap}" alt="Error heatmap {s.index}" width="430">'
            f"<figcaption>Error heatmap (jet colormap)</figcaption></figure>"
            f"<table><thead><tr><th>Joint</th><th>GT Pos</th>{heads}</tr></thead><tbody>{rows}</tbody></table></div></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(c: ReportContent) -> str:
    lines = [f"# Evaluation Report: {c.run_name}", "",
             f"- **Run Name:** {c.run_name}", f"- **Model Type:** {c.model_type}", f"- **Checkpoint:** {c.checkpoint}",
             f"- **Dataset:** {c.dataset}", f"- **Date:** {c.date}", f"- **Val Samples:** {c.val_samples}",
             f"- **Scoring:** {c.scoring}", "",
             "## Analysis Notes", "", "```", c.notes.strip() or "(no notes)", "```", "",
             "## Metrics", "", "| Metric | Value |", "|---|---:|"]
    lines += [f"| {m} | {fmt_value(c.metrics[m])} |" for m in metric_order(c.metrics)]
    lines += ["", "## Recommendations", ""] + [f"- {r}" for r in c.recommendations]
    lines += ["", "How recommendations are made:", ""] + _rules_table_md()
    if c.previous is not None:
        lines += ["", f"## Comparison with {c.previous_name or 'the previous run'}", "",
                  "| Metric | This run | Previous | Change | |", "|---|---:|---:|---:|---|"]
        lines += [f"| {n} | {a} | {b} | {d} | {v} |" for n, a, b, d, v in _comparison_rows(c)]
    lines += ["", "## Counterfactual Action Grids", "",
              "Each grid: Row 1 = GT, Row 2 = STAY (red), Row 3 = MOVE+ (green), Row 4 = MOVE- (blue).", ""]
    for s in c.samples:
        lines += [f"### Sample {s.index}", "", f"episode {s.episode}, frame {s.frame}; recorded action **{ACTIONS[s.action]}**", "",
                  f"![Counterfactual grid {s.index}]({s.grid})", "", f"![Error heatmap {s.index}]({s.heatmap})", "",
                  "Error heatmap (jet colormap)", "", "| Joint | GT Pos | " + " | ".join(ACTIONS) + " |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {j} | {gt:.4f} | " + " | ".join(f"{v:.4f}" for v in vals) + " |" for j, gt, vals in s.joints]
        lines.append("")
    return "\n".join(lines) + "\n"


def describe_dataset(cfg: WorldModelRunConfig, folder: Path, synthetic: bool) -> str:
    if synthetic:
        return f"{folder} (synthetic arm data: {cfg.synthetic_episodes} episodes x {cfg.episode_length} frames, seed {cfg.data_seed})"
    return str(folder)


def scoring_note(loaded: LoadedWorldModel, n_val: int, scored: int, same_samples: bool, other_data: bool) -> str:
    """How the report's numbers relate to the run's own validation metrics in MLflow."""
    weights = f"the best weights (step {loaded.weights_step}" + (f", training-time val_mse {loaded.val_mse:.6g})" if loaded.val_mse is not None else ")")
    if other_data:
        return (f"{scored} samples of another data set's validation split, with {weights}; the run's MLflow metrics "
                "come from its own data, so the numbers differ.")
    if same_samples:
        return (f"the same {scored} of the {n_val} validation samples the run scored while training (an even spread over "
                f"the split of data seed {loaded.cfg.data_seed}), with {weights}: val_mse matches the run's at that step.")
    trained = eval_sample_ids(n_val, loaded.cfg.eval_samples).size
    return (f"{scored} of the {n_val} validation samples, with {weights}; training scored {trained}, so the numbers can "
            "differ from the run's MLflow metrics by the choice of samples.")


def build_report(source: RunSource, out_dir: str | os.PathLike, *, notes: str, data_folder: str | None = None,
                 compare: RunSource | None = None, samples: int = 4, max_samples: int | None = None) -> ReportContent:
    """Evaluate ``source`` (and ``compare`` on the same samples) and write report.html,
    report.md, metrics.json and images/ into ``out_dir``. ``max_samples``: validation samples
    scored (0: all; None: the ones the run scored while training). Everything is made in a
    temporary folder first, so a failure leaves ``out_dir`` as it was."""
    loaded = source.model
    data = dataset_for(loaded.cfg, data_folder)
    same = max_samples is None
    ids = eval_sample_ids(len(data.val), loaded.cfg.eval_samples if same else max_samples)
    scoring = scoring_note(loaded, len(data.val), len(ids), same and not data_folder, bool(data_folder))
    evaluation, metrics = evaluate(loaded, data, ids)
    previous = None
    if compare is not None:
        check_compatible(compare.model, loaded, f"compared run {compare.name}")
        previous = evaluate(compare.model, data, ids)[1]
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        content = ReportContent(
            run_name=source.name, model_type=loaded.cfg.model_type, checkpoint=source.shown_as,
            dataset=describe_dataset(loaded.cfg, data.folder, synthetic=not (data_folder or loaded.cfg.data)),
            date=time.strftime("%Y-%m-%d %H:%M:%S"), val_samples=len(ids), scoring=scoring, notes=notes, metrics=metrics,
            recommendations=recommendations(metrics, previous), samples=sample_views(data, evaluation, samples, work / "images"),
            previous_name=compare.name if compare else None, previous=previous,
        )
        (work / REPORT_HTML).write_text(render_html(content), encoding="utf-8")
        (work / REPORT_MD).write_text(render_markdown(content), encoding="utf-8")
        record = {"run": source.name, "run_id": source.run_id, "checkpoint": source.shown_as, "weights_step": loaded.weights_step,
                  "training_val_mse": loaded.val_mse, "metrics": metrics, "previous": previous}
        (work / METRICS_JSON).write_text(json.dumps(record, indent=1, allow_nan=True), encoding="utf-8")
        out.mkdir(exist_ok=True)
        (out / "images").mkdir(exist_ok=True)
        for f in sorted(work.rglob("*")):
            if f.is_file():
                os.replace(f, out / f.relative_to(work))
    return content


def log_report(tracking_uri: str, run_id: str, out_dir: str | os.PathLike) -> None:
    """The report's files become artifacts of the run, under ``eval_report/``."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).log_artifacts(run_id, str(out_dir), ARTIFACT_PATH)

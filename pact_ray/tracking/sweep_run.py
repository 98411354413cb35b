"""The sweep's parent run in MLflow: what the UI shows for the sweep as a whole.

Created when the sweep starts (named after the sweep, its command line as the description,
the sweep's settings as params), and brought up to date at the end of every invocation,
``--resume`` included: the summary folder (index.html, the CSV and JSON tables, the plots)
as artifacts under ``summary/``, the verdicts as its description (a Markdown table the UI
renders), and the headline numbers as metrics (trials finished and errored; variants better,
worse, inconclusive and without a verdict; each variant's Δ % from the baseline).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Iterable

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pact_ray.tracking.tags import ROLE_TAG, SWEEP_NAME_TAG, SWEEP_UID_TAG

NOTE_TAG = "mlflow.note.content"
SUMMARY_ARTIFACTS = "summary"


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran, as one that runs again as written from the project folder
    (``/abs/.venv/bin/python sweeps/stage1_router.py --profile smoke``)."""
    from pact_ray.cli import python_executable, shell_join

    argv = sys.argv if argv is None else argv
    script = argv[0] if argv else ""
    prefix = [python_executable(), script] if script.endswith(".py") else [Path(script).name or "pact-ray"]
    return shell_join([*prefix, *argv[1:]])


SHORT_UID = 6  # hex digits of the sweep's uid that start its parent run's name


def parent_run_name(name: str, uid: str | None = None) -> str:
    """The parent run's name: a short sweep id first, so that the runs list (which shows about
    18 characters of a name) tells two sweeps of one profile apart; then the sweep's name
    (whole in the ``sweep`` tag)."""
    return f"{uid[:SHORT_UID]} {name}" if uid else name


def create_parent(client: MlflowClient, experiment_id: str, name: str, tags: dict[str, str], params: dict[str, Any],
                  uid: str | None = None) -> str:
    """The parent run of a new sweep; returns its id. ``uid`` (the manifest's) is tagged so a
    resume finds the run even when the start was killed before the manifest recorded its id,
    and starts the run's name (:func:`parent_run_name`). Empty tags are left out."""
    tags = {ROLE_TAG: "sweep", SWEEP_NAME_TAG: name, **tags, **({SWEEP_UID_TAG: uid} if uid else {}),
            NOTE_TAG: f"Sweep `{name}`, started {time.strftime('%Y-%m-%d %H:%M')}:\n\n    {command_line()}\n"}
    run = client.create_run(experiment_id, run_name=parent_run_name(name, uid),
                            tags={k: str(v) for k, v in tags.items() if v is not None and str(v) != ""})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value))
    return run.info.run_id


def verdict_table(entries: Iterable[Any]) -> str:
    """The route status as a Markdown table (what the parent's description shows)."""
    lines = ["| setting | variant | metric | step | seeds | Δ (simultaneous CI) | margin δ | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        delta = e.corrected_delta.text(signed=True) if e.delta else "-"
        margin = f"±{e.decision.margin:.3g}" if e.decision and e.decision.margin is not None else "-"
        verdict = e.verdict_text if e.valid and not e.reason else f"{e.verdict_corrected}: {e.reason}"
        lines.append(f"| {e.setting[1]} · {e.setting[2]} | {e.label} | {e.metric} | {e.step if e.step is not None else '-'} | "
                     f"{len(e.seeds)}/{len(e.baseline_seeds)} | {delta} | {margin} | {verdict} |")
    return "\n".join(lines)


def finish_parent(client: MlflowClient, parent_id: str, *, description: str, metrics: dict[str, float], status: str) -> None:
    """Bring the parent run up to date: description, headline metrics, status (the summary
    files reach its ``summary/`` artifacts as they are written: ``pact_ray.tune.sweep.write_summary``)."""
    started = client.get_run(parent_id).data.tags.get(NOTE_TAG, "").split("\n\n")[0]
    client.set_tag(parent_id, NOTE_TAG, f"{started}\n\n    {command_line()}\n\n{description}\n")
    now = int(time.time() * 1000)
    if metrics:
        client.log_batch(parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    client.set_terminated(parent_id, status=status)


def ablation_headline(rows: list[dict[str, Any]], entries: list[Any]) -> dict[str, float]:
    """Counts of trials and verdicts, and each valid variant's Δ % from its baseline."""
    out: dict[str, float] = {
        "trials_finished": sum(r["status"] == "finished" for r in rows),
        "trials_errored": sum(r["status"] == "errored" for r in rows),
    }
    for verdict in ("better", "worse", "equivalent", "identical", "inconclusive"):
        out[f"variants_{verdict}"] = sum(e.decision is not None and e.decision.verdict == verdict and not e.reason for e in entries)
    out["variants_without_verdict"] = sum(not e.valid or e.delta is None for e in entries)
    for e in entries:
        if e.valid and e.delta_pct is not None and not e.knobs:
            out[f"delta_pct.{e.setting[0]}.{e.variant}"] = e.delta_pct.mean
    return out

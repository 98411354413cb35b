"""The ablation summary table (``shared/specs/summary.md``): one row per trial run.

Rows come from MLflow (the runs' params, tags and latest metrics); errored and unfinished
runs are kept with their status and error line, never dropped. Files are written
atomically: a reader never sees half a table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient

from pact_ray.metrics import names as M
from pact_ray.runkinds import RUN_KINDS, RunKind
from pact_ray.tracking.callback import SWEEP_TAG
from pact_ray.tracking.writer import ROLE_TAG, TRIAL_TAG

# summary.md's column order, then the extra columns.
COLUMNS = ["run", "run_id", "phase", "steps", "loss", "art_l2", "gate", "edge_delta", "virtual_mass", "mask_parts", "empty", "note"]
EXTRA_COLUMNS = ["variant", "profile", "model", "seed", "status", "error", "wall_s", "kind", "experiment", "mlflow_run_id"]
ALL_COLUMNS = COLUMNS + EXTRA_COLUMNS
METRIC_COLUMNS = (M.LOSS, M.ART_L2, M.GATE, M.EDGE_DELTA, M.VIRTUAL_MASS, M.MASK_PARTS, M.EMPTY)
CSV_NAME, JSON_NAME = "ablation_summary.csv", "ablation_summary.json"


def run_label(kind: RunKind, profile: str, variant: str, seed: Any) -> str:
    """Display name: "Matrix Stage1 OT first · seed 0"."""
    p = kind.profiles.get(profile)
    v = kind.variants.get(variant)
    return f"{p.label if p else profile} {kind.title} {v.label if v else variant} · seed {seed}"


def _status(run: Run) -> str:
    tag = run.data.tags.get("status")
    if tag in ("finished", "errored"):
        return tag
    if run.info.status == "FAILED":
        return "errored"
    if run.info.status == "FINISHED":
        return "finished"
    return "running"


def _int(v: Any) -> int | None:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return None


def row_from_run(run: Run, experiment_name: str) -> dict[str, Any]:
    """One summary row from one trial run (metrics that the run never reported are None)."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    kind = RUN_KINDS.get(tags.get("kind", ""), RUN_KINDS["stage1"])
    variant, profile = tags.get("variant", params.get("variant", "")), tags.get("profile", params.get("profile", ""))
    seed = _int(tags.get("seed", params.get("seed")))
    row: dict[str, Any] = {
        "run": run_label(kind, profile, variant, seed),
        "run_id": f"{experiment_name}/{tags.get(TRIAL_TAG, run.info.run_id)}",
        "phase": tags.get("phase"),
        "steps": _int(metrics.get(M.STEP)),
        "note": tags.get("note"),
        "variant": variant, "profile": profile, "model": tags.get("model", params.get("model")), "seed": seed,
        "status": _status(run), "error": tags.get("error") or None, "wall_s": metrics.get("wall_s"),
        "kind": kind.name, "experiment": experiment_name, "mlflow_run_id": run.info.run_id,
    }
    for m in METRIC_COLUMNS:
        v = metrics.get(m)
        row[m] = None if v is None or (isinstance(v, float) and math.isnan(v)) else v
    return {c: row.get(c) for c in ALL_COLUMNS}


def search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> Iterable[Run]:
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _order(kind_names: list[str]):
    def key(row: dict[str, Any]):
        kind = RUN_KINDS.get(row["kind"])
        prof = list(kind.profiles).index(row["profile"]) if kind and row["profile"] in kind.profiles else 99
        var = list(kind.variants).index(row["variant"]) if kind and row["variant"] in kind.variants else 99
        return (kind_names.index(row["kind"]) if row["kind"] in kind_names else 99, row["experiment"], prof, var, row["seed"] or 0, row["run_id"])
    return key


def collect_sweep_rows(tracking_uri: str, experiment_id: str, parent_run_id: str, kind: RunKind) -> list[dict[str, Any]]:
    """Rows of the trials of one sweep (children of its parent run)."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment(experiment_id)
    rows = [row_from_run(r, exp.name) for r in search_all(client, [experiment_id], f"tags.`{SWEEP_TAG}` = '{parent_run_id}'")]
    return sorted(rows, key=_order(list(RUN_KINDS)))


def collect_rows(tracking_uri: str, experiments: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of every trial run in the named experiments (default: every ``pact-ray/*`` experiment)."""
    client = MlflowClient(tracking_uri)
    if experiments:
        exps = []
        for name in experiments:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise ValueError(f"experiment {name!r} does not exist in {tracking_uri}")
            exps.append(exp)
    else:
        exps = [e for e in client.search_experiments() if e.name.startswith("pact-ray/")]
    rows = []
    for exp in exps:
        rows += [row_from_run(r, exp.name) for r in search_all(client, [exp.experiment_id], f"tags.`{ROLE_TAG}` = 'trial'")]
    return sorted(rows, key=_order(list(RUN_KINDS)))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ALL_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in ALL_COLUMNS})
    return buf.getvalue()


def write_summary(rows: list[dict[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """Write ablation_summary.csv and .json into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / CSV_NAME, out / JSON_NAME
    _atomic_write(csv_path, to_csv(rows))
    _atomic_write(json_path, json.dumps(rows, indent=1))
    return [csv_path, json_path]

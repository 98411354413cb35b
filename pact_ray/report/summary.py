"""The ablation summary table (``docs/specs/summary.md``): one row per trial run.

Rows come from MLflow (the runs' params, tags and latest metrics); errored and unfinished
runs are kept with their status and error line, never dropped. :func:`collect` also reads
each run's loss curve and flat config params, which the report (``pact_ray.report``)
draws and compares. Files are written atomically: a reader never sees half a table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from mlflow.entities import Experiment, Run, ViewType
from mlflow.tracking import MlflowClient

from pact_ray.fileio import atomic_write
from pact_ray.kinds import RUN_KINDS, RunKind
from pact_ray.metrics import names as M
from pact_ray.tracking.tags import ROLE_TAG, STEP_TAG, SWEEP_TAG, TRIAL_TAG

# summary.md's column order, then the extra columns.
COLUMNS = ["run", "run_id", "phase", "steps", "loss", "art_l2", "gate", "edge_delta", "virtual_mass", "mask_parts", "empty", "note"]
# val_loss is the held-out objective at the run's last validation (val_step); the route status
# compares on it. nonfinite_steps counts steps whose training loss was not finite.
EXTRA_COLUMNS = ["val_loss", "val_step", "variant", "profile", "model", "seed", "status", "error", "wall_s", "kind",
                 "experiment", "mlflow_run_id", "nonfinite_steps", "marginal_error"]
ALL_COLUMNS = COLUMNS + EXTRA_COLUMNS
METRIC_COLUMNS = (M.LOSS, M.ART_L2, M.GATE, M.EDGE_DELTA, M.VIRTUAL_MASS, M.MASK_PARTS, M.EMPTY, M.VAL_LOSS, M.NONFINITE_STEPS,
                  M.MARGINAL_ERROR)
CSV_NAME, JSON_NAME = "ablation_summary.csv", "ablation_summary.json"
DEFAULT_KIND = "stage1"  # runs logged before the kind tag existed
FINISHED, ERRORED, RUNNING, INTERRUPTED = "finished", "errored", "running", "interrupted"
STATUSES = (FINISHED, ERRORED, RUNNING, INTERRUPTED)  # interrupted: stopped by Ctrl-C with a checkpoint
HISTORY_CHUNK = 500  # run ids per bulk history query (well under SQLite's bound-variable limit)
HISTORY_THREADS = 8  # concurrent get_metric_history calls against a tracking server

Curve = list[tuple[int, float]]  # (step, value), ascending steps


@dataclass
class SummaryData:
    """Everything the summary and its report are built from.

    ``curves``, ``val_curves`` and ``params`` are keyed by a row's ``run_id``
    (``experiment/trial_id``): the run's training loss at every logged step, its validation
    loss at every validation step, and its flattened config as MLflow params (strings,
    ``router.eps`` for nested fields).
    """

    rows: list[dict[str, Any]]
    curves: dict[str, Curve] = field(default_factory=dict)
    params: dict[str, dict[str, str]] = field(default_factory=dict)
    val_curves: dict[str, Curve] = field(default_factory=dict)
    # The other validation metrics the verdicts read (each kind's primary and secondary
    # metrics, and a --metric), metric -> run_id -> curve; val_loss is ``val_curves``.
    metric_curves: dict[str, dict[str, Curve]] = field(default_factory=dict)

    def curves_of(self, metric: str) -> dict[str, Curve]:
        """run_id -> the curve of validation metric ``metric``."""
        return self.val_curves if metric == M.VAL_LOSS else self.metric_curves.get(metric, {})


def verdict_metrics(kinds: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    """The validation metrics the verdicts of runs of ``kinds`` read, besides val_loss."""
    out: dict[str, None] = {}
    for name in kinds:
        kind = RUN_KINDS.get(name)
        if kind is not None:
            out.update(dict.fromkeys((kind.val_metric, *kind.secondary_metrics)))
    out.update(dict.fromkeys(extra))
    out.pop(M.VAL_LOSS, None)
    return list(out)


def kind_title(kind: str) -> str:
    """"Stage1" for a registered kind, else the capitalised name."""
    k = RUN_KINDS.get(kind)
    return k.title if k else kind.capitalize()


def profile_label(kind: str, profile: str) -> str:
    """"Matrix" for the quick profile (the registry's label), else the name."""
    k = RUN_KINDS.get(kind)
    p = k.profiles.get(profile) if k else None
    return p.label if p else profile


def variant_label(kind: str, variant: str) -> str:
    """"OT first" for ot_first (the registry's label), else the name."""
    k = RUN_KINDS.get(kind)
    v = k.variants.get(variant) if k else None
    return v.label if v else variant


def run_label(kind: str, profile: str, variant: str, seed: Any) -> str:
    """Display name: "Matrix Stage1 OT first · seed 0" (registry labels where the kind is known)."""
    return f"{profile_label(kind, profile)} {kind_title(kind)} {variant_label(kind, variant)} · seed {seed}"


def _int(v: Any) -> int | None:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return None


def _number(v: Any) -> float | None:
    """A finite float, or None for a missing, non-numeric or NaN value."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if math.isnan(v) else float(v)


def make_row(*, kind: str, experiment: str, trial_id: str, variant: str, profile: str, model: str | None, seed: Any,
             phase: str | None, note: str | None, status: str, error: str | None, metrics: Mapping[str, Any],
             mlflow_run_id: str | None = None) -> dict[str, Any]:
    """One summary row in ``ALL_COLUMNS`` order; metrics the run never reported are None."""
    seed = _int(seed)
    row: dict[str, Any] = {
        "run": run_label(kind, profile, variant, seed), "run_id": f"{experiment}/{trial_id}", "phase": phase,
        "steps": _int(metrics.get(M.STEP)), "note": note, "variant": variant, "profile": profile, "model": model,
        "seed": seed, "status": status, "error": error or None, "wall_s": _number(metrics.get("wall_s")),
        "kind": kind, "experiment": experiment, "mlflow_run_id": mlflow_run_id, "val_step": None,
    }
    row.update({m: _number(metrics.get(m)) for m in METRIC_COLUMNS})
    return {c: row[c] for c in ALL_COLUMNS}


def _status(run: Run) -> str:
    tag = run.data.tags.get("status")
    if tag in (FINISHED, ERRORED, INTERRUPTED):
        return tag
    if run.info.status == "FAILED":
        return ERRORED
    if run.info.status == "FINISHED":
        return FINISHED
    return RUNNING


def row_from_run(run: Run, experiment_name: str) -> dict[str, Any]:
    """One summary row from one trial run (metrics that the run never reported are None)."""
    tags, params = run.data.tags, run.data.params
    metrics = dict(run.data.metrics)
    if STEP_TAG in tags:  # the last logged step (older runs logged it as a "step" metric)
        metrics[M.STEP] = float(tags[STEP_TAG])
    return make_row(
        kind=tags.get("kind") or DEFAULT_KIND, experiment=experiment_name, trial_id=tags.get(TRIAL_TAG, run.info.run_id),
        variant=tags.get("variant", params.get("variant", "")), profile=tags.get("profile", params.get("profile", "")),
        model=tags.get("model", params.get("model")), seed=tags.get("seed", params.get("seed")),
        phase=tags.get("phase"), note=tags.get("note"), status=_status(run), error=tags.get("error"),
        metrics=metrics, mlflow_run_id=run.info.run_id,
    )


def search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> Iterable[Run]:
    """Every active run matching ``filter_string``, in pages of 1,000 (MLflow's maximum)."""
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _order_key(row: dict[str, Any]) -> tuple:
    kind_names = list(RUN_KINDS)
    kind = RUN_KINDS.get(row["kind"])
    prof = list(kind.profiles).index(row["profile"]) if kind and row["profile"] in kind.profiles else 99
    var = list(kind.variants).index(row["variant"]) if kind and row["variant"] in kind.variants else 99
    kind_pos = kind_names.index(row["kind"]) if row["kind"] in kind_names else len(kind_names)
    return (kind_pos, row["kind"], row["experiment"], prof, var, row["seed"] or 0, row["run_id"])


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Registry order: kind, experiment, profile, variant, seed."""
    return sorted(rows, key=_order_key)


# ------------------------------------------------------------------ histories

def _bulk_curves(tracking_uri: str, run_ids: list[str], key: str) -> dict[str, Curve]:
    """One query per chunk of run ids through the SQLAlchemy store (database URIs)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(tracking_uri, default_artifact_root=str(Path.cwd()))  # the root is never used to read
    out: dict[str, Curve] = {r: [] for r in run_ids}
    try:
        for i in range(0, len(run_ids), HISTORY_CHUNK):
            for m in store.get_metric_history_bulk(run_ids[i : i + HISTORY_CHUNK], key, max_results=None):
                out[m.run_id].append((m.step, m.value))
    finally:
        store.engine.dispose()
    return out


def _threaded_curves(tracking_uri: str, run_ids: list[str], key: str) -> dict[str, Curve]:
    """``get_metric_history`` per run, several at once (tracking servers)."""
    client = MlflowClient(tracking_uri)
    with ThreadPoolExecutor(HISTORY_THREADS) as pool:
        histories = pool.map(lambda r: client.get_metric_history(r, key), run_ids)
        return {r: [(m.step, m.value) for m in h] for r, h in zip(run_ids, histories)}


def fetch_curves(tracking_uri: str, run_ids: Mapping[str, str], key: str = M.LOSS, method: str = "auto") -> dict[str, Curve]:
    """The history of metric ``key`` of each MLflow run, keyed like ``run_ids`` (row run_id -> MLflow run id).

    ``method``: "bulk" (one SQL query per 500 runs; database stores), "threads" (one
    request per run, 8 at a time; any store) or "auto" (bulk unless the store is a server).
    Each curve is sorted by step, one value per step, NaN values left out.
    """
    if method == "auto":
        method = "threads" if tracking_uri.startswith(("http://", "https://")) else "bulk"
    fetch = {"bulk": _bulk_curves, "threads": _threaded_curves}.get(method)
    if fetch is None:
        raise ValueError(f"history method must be auto, bulk or threads, got {method!r}")
    by_mlflow_id = fetch(tracking_uri, list(run_ids.values()), key)
    return {row_id: _clean_curve(by_mlflow_id.get(mlflow_id, [])) for row_id, mlflow_id in run_ids.items()}


def _clean_curve(points: Iterable[tuple[int, float]]) -> Curve:
    return sorted({int(s): float(v) for s, v in points if not math.isnan(v)}.items())


# ------------------------------------------------------------------ collecting

# The ablation dashboard's default sources: the experiments of the ablation sweeps (the world
# model has its own report, analysis/eval_report.py; name its experiment to include it).
ABLATION_KINDS = tuple(name for name, kind in RUN_KINDS.items() if kind.ablation)


def _experiments(client: MlflowClient, tracking_uri: str, names: list[str] | None) -> list[Experiment]:
    if not names:
        wanted = {RUN_KINDS[k].experiment for k in ABLATION_KINDS}
        found = [e for e in client.search_experiments() if e.name in wanted]
        if not found:
            raise ValueError(f"{tracking_uri} holds no ablation experiment ({', '.join(sorted(wanted))})")
        return found
    exps = []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise ValueError(f"experiment {name!r} does not exist in {tracking_uri}")
        exps.append(exp)
    return exps


def _summary_data(tracking_uri: str, runs: Iterable[tuple[Run, str]], curves: bool, metrics: Iterable[str] = ()) -> SummaryData:
    rows, params = [], {}
    for run, experiment_name in runs:
        row = row_from_run(run, experiment_name)
        rows.append(row)
        params[row["run_id"]] = dict(run.data.params)
    rows = sort_rows(rows)
    if not (curves and rows):
        return SummaryData(rows, {}, params, {})
    ids = {r["run_id"]: r["mlflow_run_id"] for r in rows}
    data = SummaryData(rows, fetch_curves(tracking_uri, ids), params, fetch_curves(tracking_uri, ids, M.VAL_LOSS))
    for metric in verdict_metrics({r["kind"] for r in rows}, metrics):
        data.metric_curves[metric] = fetch_curves(tracking_uri, ids, metric)
    set_val_steps(data)
    return data


def set_val_steps(data: SummaryData) -> None:
    """Fill each row's ``val_step``: the step of its last validation."""
    for row in data.rows:
        curve = data.val_curves.get(row["run_id"])
        row["val_step"] = curve[-1][0] if curve else None


def collect(tracking_uri: str, experiments: list[str] | None = None, curves: bool = True, metrics: Iterable[str] = ()) -> SummaryData:
    """Rows, loss curves and params of every trial run in the named experiments
    (default: the ablation sweeps' experiments, :data:`ABLATION_KINDS`)."""
    client = MlflowClient(tracking_uri)
    runs = [(run, exp.name) for exp in _experiments(client, tracking_uri, experiments)
            for run in search_all(client, [exp.experiment_id], f"tags.`{ROLE_TAG}` = 'trial'")]
    return _summary_data(tracking_uri, runs, curves, metrics)


def collect_sweep(tracking_uri: str, experiment_id: str, parent_run_id: str, curves: bool = True,
                  metrics: Iterable[str] = ()) -> SummaryData:
    """Rows, loss curves and params of the trials of one sweep (children of its parent run)."""
    client = MlflowClient(tracking_uri)
    name = client.get_experiment(experiment_id).name
    runs = [(run, name) for run in search_all(client, [experiment_id], f"tags.`{SWEEP_TAG}` = '{parent_run_id}'")]
    return _summary_data(tracking_uri, runs, curves, metrics)


def collect_sweep_rows(tracking_uri: str, experiment_id: str, parent_run_id: str, kind: RunKind | None = None) -> list[dict[str, Any]]:
    """Rows of the trials of one sweep (each row names its own kind; ``kind`` is not needed)."""
    return collect_sweep(tracking_uri, experiment_id, parent_run_id, curves=False).rows


def collect_rows(tracking_uri: str, experiments: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of every trial run in the named experiments (default: the ablation sweeps' experiments)."""
    return collect(tracking_uri, experiments, curves=False).rows


# --------------------------------------------------------------------- files

def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ALL_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in ALL_COLUMNS})
    return buf.getvalue()


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=1)


def write_summary(rows: list[dict[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """Write ablation_summary.csv and .json into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / CSV_NAME, out / JSON_NAME
    atomic_write(csv_path, to_csv(rows))
    atomic_write(json_path, to_json(rows))
    return [csv_path, json_path]

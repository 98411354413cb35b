"""Trial runs written straight into an MLflow store, with the layout of
:class:`pact_ray.tracking.callback.MlflowSweepCallback` (tags, flattened config params, one
metric row per step, the run status), for tests and benchmarks: no Ray, no training.

Two writers hold the same records: :func:`log_sweep` goes through ``MlflowClient`` (what the
callback does, about 0.1 s per run on SQLite) and, with ``bulk=True``, inserts every run
of the sweep in one transaction through the SQLAlchemy store's own table models (the
1,000-run benchmark store in seconds). A spec that names its phase and note is logged
with those and the identifying params only, without consulting the run-kind registry
(a kind this version does not know, such as Stage2 runs written by a newer one).

:func:`example_specs` is one small sweep with every case the report handles.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from mlflow.entities import LifecycleStage, Metric, Param, RunStatus, SourceType
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pact_ray.kinds import RUN_KINDS
from pact_ray.metrics import names as M
from pact_ray.report.summary import FINISHED, RUNNING, STATUSES
from pact_ray.tracking.callback import run_name
from pact_ray.tracking.store import ensure_experiment
from pact_ray.tracking.tags import ROLE_TAG, STEP_TAG, SWEEP_TAG, TRIAL_TAG
from pact_ray.tracking.writer import MAX_BATCH, status_name

STEP_MS = 1000  # metric timestamps: one step per second from the run's start
MLFLOW_RUNNING = RunStatus.to_string(RunStatus.RUNNING)


@dataclass(frozen=True)
class TrialSpec:
    """One trial run to log: its config, per-step metric values and final status."""

    variant: str
    history: Mapping[str, Sequence[float]]  # metric -> values at steps 1, 2, ... (loss at least)
    seed: int = 0
    profile: str = "smoke"
    model: str = "tiny"
    kind: str = "stage1"
    overrides: Mapping[str, Any] = field(default_factory=dict)  # config fields, e.g. {"router.eps": 0.1}
    status: str = "finished"  # finished, errored or running (never terminated)
    error: str = ""  # the error line of an errored trial
    phase: str = ""  # with note: log these and the identifying params, not the registry's config
    note: str = ""
    wall_s_per_step: float = 0.5
    # Validation loss by step; None: at the profile's evaluation steps (the last step for a
    # kind the registry does not know), equal to the training loss there.
    val: Mapping[int, float] | None = None


@dataclass(frozen=True)
class TrialRecord:
    """What the callback would have written for one trial."""

    name: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: list[Metric]
    status: str  # an MLflow run status: FINISHED, FAILED or RUNNING


def _config(spec: TrialSpec) -> tuple[dict[str, Any], str, str]:
    """(flat params, phase, note) of ``spec``: as given, or from the run-kind registry."""
    trial_config = {"variant": spec.variant, "profile": spec.profile, "model": spec.model, "seed": spec.seed, **spec.overrides}
    if spec.phase:
        return trial_config, spec.phase, spec.note
    kind = RUN_KINDS.get(spec.kind)
    if kind is None:
        raise ValueError(f"run kind {spec.kind!r} is not registered: give the spec a phase and note")
    cfg = kind.config(trial_config)
    return cfg.flat(), cfg.phase, kind.variants[spec.variant].note


def validation(spec: TrialSpec) -> dict[int, float]:
    """The validation loss ``spec`` logs, by step."""
    if spec.val is not None:
        return dict(spec.val)
    losses = spec.history[M.LOSS]
    kind = RUN_KINDS.get(spec.kind)
    if kind is None or spec.phase:
        return {len(losses): losses[-1]} if spec.status == FINISHED else {}
    cfg = kind.config({"variant": spec.variant, "profile": spec.profile, "model": spec.model, "seed": spec.seed, **spec.overrides})
    return {step: losses[step - 1] for step in range(1, len(losses) + 1) if cfg.eval_due(step)}


def _metrics(spec: TrialSpec, start_ms: int) -> list[Metric]:
    out = []
    val = validation(spec)
    for i in range(len(spec.history[M.LOSS])):
        step = i + 1
        row = {key: values[i] for key, values in spec.history.items() if i < len(values)}
        row["wall_s"] = spec.wall_s_per_step * step
        if step in val:
            row[M.VAL_LOSS] = val[step]
        out.extend(Metric(key, float(value), start_ms + i * STEP_MS, step) for key, value in row.items())
    return out


def trial_record(spec: TrialSpec, sweep: str, parent_run_id: str, trial_id: str, start_ms: int) -> TrialRecord:
    """The tags, params, metrics and status the sweep callback logs for ``spec``."""
    if spec.status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {spec.status!r}")
    params, phase, note = _config(spec)
    trial_name = f"{spec.variant}_s{spec.seed}_{trial_id}"
    name = run_name({"variant": spec.variant, "seed": spec.seed}, trial_id, numbered=bool(spec.overrides))
    tags = {
        "variant": spec.variant, "phase": phase, "profile": spec.profile, "model": spec.model, "seed": spec.seed,
        "note": note, "kind": spec.kind, "stage": spec.kind, "trial_name": trial_name, "git_commit": "", "sweep": sweep,
        "status": spec.status, "error": spec.error, ROLE_TAG: "trial", "mlflow.note.content": note,
        TRIAL_TAG: trial_id, SWEEP_TAG: parent_run_id, MLFLOW_PARENT_RUN_ID: parent_run_id, MLFLOW_RUN_NAME: name,
        STEP_TAG: len(spec.history[M.LOSS]),
    }
    status = MLFLOW_RUNNING if spec.status == RUNNING else status_name(spec.status == FINISHED)
    return TrialRecord(name, {k: str(v) for k, v in tags.items()}, {k: "" if v is None else str(v) for k, v in params.items()},
                       _metrics(spec, start_ms), status)


def _log_with_client(client: MlflowClient, experiment_id: str, record: TrialRecord) -> str:
    run_id = client.create_run(experiment_id, run_name=record.name, tags=record.tags).info.run_id
    params = [Param(k, v) for k, v in record.params.items()]
    client.log_batch(run_id, params=params, metrics=record.metrics[:MAX_BATCH])
    for i in range(MAX_BATCH, len(record.metrics), MAX_BATCH):
        client.log_batch(run_id, metrics=record.metrics[i : i + MAX_BATCH])
    if record.status != MLFLOW_RUNNING:
        client.update_run(run_id, status=record.status)
    return run_id


def _insert_bulk(tracking_uri: str, experiment_id: str, artifact_location: str, records: list[TrialRecord], start_ms: int) -> list[str]:
    """Insert ``records`` in one transaction through the SQLAlchemy store's table models."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(tracking_uri, artifact_location)
    run_ids = [uuid.uuid4().hex for _ in records]
    runs, tags, params, metrics, latest = [], [], [], [], {}
    for run_id, rec in zip(run_ids, records):
        done = rec.status != MLFLOW_RUNNING
        end_ms = max((m.timestamp for m in rec.metrics), default=start_ms)
        runs.append(dict(run_uuid=run_id, name=rec.name, source_type=SourceType.to_string(SourceType.UNKNOWN), source_name="",
                         entry_point_name="", user_id="", status=rec.status, start_time=start_ms, end_time=end_ms if done else None,
                         source_version="", lifecycle_stage=LifecycleStage.ACTIVE, artifact_uri=f"{artifact_location}/{run_id}/artifacts",
                         experiment_id=int(experiment_id)))
        tags += [dict(key=k, value=v, run_uuid=run_id) for k, v in rec.tags.items()]
        params += [dict(key=k, value=v, run_uuid=run_id) for k, v in rec.params.items()]
        for m in rec.metrics:
            row = dict(key=m.key, value=m.value, timestamp=m.timestamp, step=m.step, is_nan=False, run_uuid=run_id)
            metrics.append(row)
            latest[(run_id, m.key)] = row  # metrics are in step order: the last one is the latest
    try:
        with store.ManagedSessionMaker() as session:
            tables = ((SqlRun, runs), (SqlTag, tags), (SqlParam, params), (SqlMetric, metrics), (SqlLatestMetric, list(latest.values())))
            for model, rows in tables:
                if rows:
                    session.execute(model.__table__.insert(), rows)
    finally:
        store.engine.dispose()
    return run_ids


def log_sweep(tracking_uri: str, specs: Iterable[TrialSpec], sweep: str = "synthetic", experiment: str = "",
              bulk: bool = False) -> tuple[str, str, list[str]]:
    """Log ``specs`` as the trials of one sweep: a parent run and one child run per spec.

    The experiment defaults to the first spec's (registered) kind's (``pact-ray/<script>``). ``bulk``
    (SQLite stores only) inserts every child run in one transaction. Returns (experiment id,
    parent run id, child run ids in the order of ``specs``).
    """
    specs = list(specs)
    if not specs:
        raise ValueError("log_sweep needs at least one trial spec")
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, experiment or RUN_KINDS[specs[0].kind].experiment)
    parent_id = client.create_run(experiment_id, run_name=sweep, tags={ROLE_TAG: "sweep"}).info.run_id
    start_ms = int(time.time() * 1000)
    prefix = uuid.uuid4().hex[:5]
    records = [trial_record(s, sweep, parent_id, f"{prefix}_{i:05d}", start_ms) for i, s in enumerate(specs)]
    if bulk:
        if not tracking_uri.startswith("sqlite:///"):
            raise ValueError(f"bulk logging needs a sqlite:/// store, not {tracking_uri}")
        run_ids = _insert_bulk(tracking_uri, experiment_id, client.get_experiment(experiment_id).artifact_location, records, start_ms)
    else:
        run_ids = [_log_with_client(client, experiment_id, r) for r in records]
    client.set_terminated(parent_id)
    return experiment_id, parent_id, run_ids


# ----------------------------------------------------------- example sweeps

def loss_curve(final: float, steps: int, start: float = 2.0) -> list[float]:
    """A loss decaying from ``start`` to exactly ``final`` over ``steps`` steps."""
    if steps == 1:
        return [final]
    return [final + (start - final) * (1 - i / (steps - 1)) ** 2 for i in range(steps)]


def router_history(variant: str, losses: Sequence[float], seed: int = 0, kind: str = "stage1") -> dict[str, list[float]]:
    """``losses`` plus the diagnostics a Stage1 variant reports (none for one without the
    router), with a small seed-dependent spread."""
    history: dict[str, list[float]] = {M.LOSS: list(losses)}
    v = RUN_KINDS[kind].variants[variant]
    if v.router is None:
        return history
    n, wobble = len(losses), 1.0 + 0.03 * ((seed % 3) - 1)
    history[M.GATE] = [(-0.9 + 0.01 * i) * wobble for i in range(n)]
    history[M.EDGE_DELTA] = [0.0015 * wobble if v.router.get("edge") else 0.0] * n
    history[M.VIRTUAL_MASS] = [v.router.get("m_v", 0.0) if v.router.get("virtual_patch") else 0.0] * n
    return history


STAGE2_EXAMPLE = {  # variant -> (phase, note): spec.md's Stage2 rows, logged as a newer version would
    "baseline": ("baseline", "Official-equivalent Stage2 smoke."),
    "spatial_diag": ("phase4", "Mask-derived spatial moment diagnostics for articulation rows."),
    "spatial_adapter": ("phase4", "Zero-initialized articulation residual adapter smoke."),
}


def example_specs() -> list[TrialSpec]:
    """One small sweep with every case the report handles (tiny preset, 27 runs).

    Stage1, quick profile, seeds 0-2 with final losses that make the route verdicts
    clear: mask_prior better than the baseline, rgb_edge worse, ot_first inconclusive;
    virtual_patch with one seed; mask_edge errored; first_third still running. Stage1,
    smoke profile: a baseline and five Optuna-style rgb_edge runs whose loss follows
    router.eps and not router.strength. Stage2: three variants with two seeds each.
    """
    base = {0: 1.00, 1: 1.03, 2: 0.98}
    noise = {0: 0.002, 1: -0.003, 2: 0.001}
    offsets = {"baseline": 0.0, "ot_first": 0.0, "mask_prior": -0.05, "rgb_edge": 0.04}
    specs = []
    for variant, offset in offsets.items():
        for seed, b in base.items():
            wobble = (0.01, -0.012, 0.003)[seed] if variant == "ot_first" else noise[seed] * (variant != "baseline")
            specs.append(TrialSpec(variant, router_history(variant, loss_curve(b + offset + wobble, 8), seed), seed, "quick"))
    specs.append(TrialSpec("virtual_patch", router_history("virtual_patch", loss_curve(0.97, 8)), 0, "quick"))
    specs.append(TrialSpec("mask_edge", router_history("mask_edge", loss_curve(1.2, 8)[:3]), 0, "quick", status="errored",
                           error="RuntimeError: Sinkhorn plan has NaN entries at step 3"))
    specs.append(TrialSpec("first_third", router_history("first_third", loss_curve(1.1, 3)[:2]), 0, "quick", status="running"))
    specs.append(TrialSpec("baseline", router_history("baseline", [1.5]), 0, "smoke"))
    for eps, strength in ((0.02, 1.5), (0.05, 0.5), (0.1, 1.0), (0.2, 2.0), (0.4, 0.8)):
        loss = 1.4 + 0.5 * eps + 0.001 * strength
        specs.append(TrialSpec("rgb_edge", router_history("rgb_edge", [loss]), 0, "smoke",
                               overrides={"router.eps": eps, "router.strength": strength}))
    for variant, (phase, note) in STAGE2_EXAMPLE.items():
        for seed in (0, 1):
            final = 3.2 - 0.3 * (variant != "baseline") + {"baseline": (0.05, 0.11), "spatial_diag": (0.03, 0.12),
                                                          "spatial_adapter": (0.1, 0.3)}[variant][seed]
            art_l2 = 0.1 - 0.02 * (variant == "spatial_adapter") + 0.004 * seed
            history = {M.LOSS: loss_curve(final, 5, start=6.0), M.ART_L2: [art_l2 + 0.01 * (4 - i) for i in range(5)],
                       M.VAL_ART_L2: [art_l2 + 0.002 + 0.01 * (4 - i) for i in range(5)]}  # Stage2's primary metric
            if variant != "baseline":
                history.update({M.MASK_PARTS: [5.0 + seed] * 5, M.EMPTY: [1.0 + seed] * 5})
            specs.append(TrialSpec(variant, history, seed, "quick", kind="stage2", phase=phase, note=note))
    return specs


def log_example(tracking_uri: str, bulk: bool = True) -> list[TrialSpec]:
    """Log :func:`example_specs` (Stage1 and Stage2 as two sweeps, each in its kind's
    experiment); returns the specs."""
    specs = example_specs()
    for kind in dict.fromkeys(s.kind for s in specs):
        registered = RUN_KINDS.get(kind)
        experiment = registered.experiment if registered else f"pact-ray/{kind}"
        log_sweep(tracking_uri, [s for s in specs if s.kind == kind], sweep=f"example-{kind}", experiment=experiment, bulk=bulk)
    return specs

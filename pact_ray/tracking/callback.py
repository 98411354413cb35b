"""Ray Tune callback: one nested MLflow child run per trial under the sweep's parent run.

It runs in the driver and only enqueues work for the process's shared :class:`MlflowWriter`
thread. It pickles its settings alone (Ray stores callbacks in ``tuner.pkl``), so a restored
sweep reconnects and finds each trial's run again by its trial-id tag.

What a child run holds, for the MLflow UI: a name that tells runs apart at a glance
(``ot_first s0``; ``rgb_edge s0 #3`` for the third Optuna trial), the sweep's name as a tag,
variant, seed, profile and model as params and tags (so "Group by" variant aggregates the
seeds), every reported metric at its step (the step itself is a tag, not a metric), the data
set as a dataset input, the config as ``config.json``, the newest checkpoint's location as a
tag (what ``analysis/eval_report.py --run RUN_ID`` reads) and, in an Optuna sweep, the Optuna
trial number (and the run id in the Optuna trial's user attributes).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
from ray import tune

from pact_ray.errors import error_line, is_interruption
from pact_ray.kinds import resolve_kind
from pact_ray.metrics import names as M
from pact_ray.tracking.datasets import DatasetInfo, log_dataset
from pact_ray.tracking.tags import CHECKPOINT_TAG, OPTUNA_TRIAL_TAG, RESUME_NOTE_TAG, ROLE_TAG, SWEEP_TAG, TRIAL_TAG
from pact_ray.tracking.writer import MlflowWriter, RunRef, shared_writer, status_name

log = logging.getLogger(__name__)
# Optuna trial user attributes: the Ray trial, the MLflow run's id and its page in the MLflow UI.
RAY_TRIAL_ATTR, MLFLOW_RUN_ATTR, MLFLOW_URL_ATTR = "ray_trial_id", "mlflow_run_id", "mlflow_run_url"
# The runs of this driver's Optuna sweeps by (sweep, Ray trial id): the searcher reads a run's id
# from here to mark its Optuna trial before telling the study the result. Optuna refuses to
# change a finished trial, and the writer thread may reach a short trial only after it ended.
_OPTUNA_RUNS: dict[tuple[str, str], RunRef] = {}
_OPTUNA_STORES: dict[str, str] = {}  # an Optuna sweep's tracking URI (where its runs' pages are), by sweep
INTERRUPTED = "interrupted"  # a trial's status after Ctrl-C (pact_ray.tune.interrupt)

# Ray's own bookkeeping in every result: not metrics of the model.
RAY_RESULT_KEYS = frozenset({
    "training_iteration", "time_this_iter_s", "timestamp", "pid", "date", "hostname", "node_ip",
    "time_since_restore", "iterations_since_restore", "timesteps_total", "episodes_total", "done",
    "experiment_tag", "trial_id", "checkpoint_dir_name", "should_checkpoint", "config", "time_total_s",
    "timesteps_since_restore", "episodes_this_iter", "timesteps_this_iter",
})


def run_name(trial_config: dict[str, Any], trial_id: str = "", numbered: bool = False) -> str:
    """"ot_first s0"; with ``numbered`` (an Optuna sweep, where every trial has the same
    variant and seed) a short trial id too, "rgb_edge s0 #a1b2", which the run's link to its
    Optuna trial replaces with the Optuna trial number, "rgb_edge s0 #3"."""
    name = f"{trial_config.get('variant', 'trial')} s{trial_config.get('seed', 0)}"
    return f"{name} #{trial_id.replace('_', '')[-4:]}" if numbered and trial_id else name


class MlflowSweepCallback(tune.Callback):
    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, kind: str, sweep: str, commit: str = "",
                 datasets: dict[str, DatasetInfo] | None = None, optuna_storage: str | None = None):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.kind = kind
        self.sweep = sweep
        self.commit = commit
        self.datasets = dict(datasets or {})  # run kind -> its data set
        self.optuna_storage = optuna_storage  # the study's storage URL in an Optuna sweep (its study is the sweep's name)
        self._refs: dict[str, RunRef] = {}
        self._configs: dict[str, Any] = {}
        self._ended: set[str] = set()  # trials whose run has its final status

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_refs={}, _configs={}, _ended=set())
        return state

    def abandon(self, reason: str) -> None:
        """Mark the runs of the trials that have not ended FAILED, with ``reason`` as their error:
        the sweep itself is failing, and nothing else would end them (they would stay RUNNING).
        A resume reopens them."""
        for trial_id, ref in self._refs.items():
            if trial_id not in self._ended:
                self.writer.set_tags(ref, {"status": "errored", "error": reason})
                self.writer.terminate(ref, status_name(False))
                self._ended.add(trial_id)

    @property
    def writer(self) -> MlflowWriter:
        # The driver's one writer for this store (the sweep harness closes it at the end).
        return shared_writer(self.tracking_uri)

    def _ref(self, trial) -> RunRef:
        ref = self._refs.get(trial.trial_id)
        if ref is not None:
            return ref
        kind, own = resolve_kind(self.kind, trial.config)  # a matrix trial is tagged with its cell's own kind
        cfg = kind.config(own)
        self._configs[trial.trial_id] = cfg
        flat = cfg.params()  # what describes the run (no test-only fault injection)
        variant = cfg.variant_info
        tags = {
            "variant": cfg.variant, "phase": cfg.phase, "profile": cfg.profile, "model": cfg.model,
            "seed": cfg.seed, "note": variant.note, "kind": kind.name, "stage": kind.name,
            "trial_name": str(trial), "git_commit": self.commit, "sweep": self.sweep, "status": "running",
            ROLE_TAG: "trial", "mlflow.note.content": variant.note,
        }
        ref = RunRef(
            experiment_id=self.experiment_id, name=run_name(trial.config, trial.trial_id, numbered=self.optuna_storage is not None),
            key_tags={TRIAL_TAG: trial.trial_id, SWEEP_TAG: self.parent_run_id},
            tags=tags,
            params=flat, parent_run_id=self.parent_run_id,
        )
        self._refs[trial.trial_id] = ref
        self.writer.run(ref)
        self.writer.call(ref, _log_json_artifact(flat, "config.json"))
        if kind.name in self.datasets:
            info = self.datasets[kind.name]
            self.writer.call(ref, lambda client, run_id: log_dataset(client, run_id, info))
        if self.optuna_storage:
            _OPTUNA_RUNS[(self.sweep, trial.trial_id)] = ref
            _OPTUNA_STORES[self.sweep] = self.tracking_uri
            self.writer.call(ref, _tag_optuna_trial(self.optuna_storage, self.sweep, trial.trial_id))
        return ref

    # ------------------------------------------------------------- Tune hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        ref = self._ref(trial)
        self.writer.set_tags(ref, {"status": "running"})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        ref = self._ref(trial)
        metrics = {k: v for k, v in result.items()
                   if k not in RAY_RESULT_KEYS and k != M.STEP and isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics["wall_s"] = float(result.get("time_total_s", 0.0))
        self.writer.log_metrics(ref, int(result.get("step", result.get("training_iteration", 0))), metrics)
        if result.get(M.RESUME_NOTE):  # an unreadable checkpoint was skipped on resume
            self.writer.set_tags(ref, {RESUME_NOTE_TAG: str(result[M.RESUME_NOTE])[:5000]})

    def on_trial_complete(self, iteration, trials, trial, **info):
        ref = self._ref(trial)
        cfg = self._configs.get(trial.trial_id)
        if cfg is not None and getattr(cfg, "export_final", False) and trial.checkpoint is not None:
            self.writer.call(ref, _log_checkpoint(trial.checkpoint))
        self.writer.set_tags(ref, {"status": "finished", "error": ""})
        self.writer.terminate(ref, status_name(True))
        self._ended.add(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        ref = self._ref(trial)
        self._ended.add(trial.trial_id)
        error = error_line(trial)
        if is_interruption(error):  # stopped by Ctrl-C with a checkpoint: --resume continues it
            self.writer.set_tags(ref, {"status": INTERRUPTED, "error": ""})
            self.writer.terminate(ref, "KILLED")
            return
        self.writer.set_tags(ref, {"status": "errored", "error": error})
        self.writer.terminate(ref, status_name(False))

    def replay(self, trial_id: str, config: dict[str, Any], results: list[dict[str, Any]], finished: bool) -> None:
        """Log a trial's results from Ray's result file (what a tracking store that was away
        missed; the writer skips the steps the run already holds), and its end when it finished."""
        trial = _Replayed(trial_id, config)
        for result in results:
            self.on_trial_result(0, [], trial, result)
        if finished:
            ref = self._ref(trial)
            self.writer.set_tags(ref, {"status": "finished", "error": ""})
            self.writer.terminate(ref, status_name(True))

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self.writer.set_tags(self._ref(trial), {CHECKPOINT_TAG: checkpoint_uri(checkpoint)})

    def on_trial_recover(self, iteration, trials, trial, **info):
        ref = self._ref(trial)
        self.writer.set_tags(ref, {"retried_after": error_line(trial)})

    def on_experiment_end(self, trials, **info):
        # A short, bounded wait: the sweep then flushes with its own bound (FLUSH_TIMEOUT_S) and
        # tells the user what is left; an unbounded wait here hangs on a tracking store that is down.
        self.writer.flush(timeout=2.0)


class _Replayed:
    """What the callback reads of a Tune trial, for a trial known only from its folder."""

    def __init__(self, trial_id: str, config: dict[str, Any]):
        self.trial_id, self.config = trial_id, config

    def __str__(self) -> str:
        return f"{self.config.get('variant', 'trial')}_s{self.config.get('seed', 0)}_{self.trial_id}"


def checkpoint_uri(checkpoint) -> str:
    """A checkpoint's location as a path (local) or a URI (an object store)."""
    kind = getattr(getattr(checkpoint, "filesystem", None), "type_name", "local")
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def optuna_trial_run(sweep: str, ray_trial_id: str, timeout: float) -> RunRef | None:
    """The MLflow run of an Optuna sweep's trial once the writer has created it (waiting at
    most ``timeout`` seconds); None when this driver logs no run for it or the store is late
    (said in a warning). The entry is dropped: the searcher asks once, when the trial ends."""
    ref = _OPTUNA_RUNS.pop((sweep, ray_trial_id), None)
    if ref is None:
        return None
    if not ref.resolved.wait(timeout):
        log.warning("Trial %s's Optuna trial is not linked to its MLflow run: the tracking store did not create the run "
                    "within %.0f s (the run still gets the Optuna trial's number as a tag)", ray_trial_id, timeout)
        return None
    return ref


def optuna_trial_run_id(sweep: str, ray_trial_id: str, timeout: float) -> str | None:
    """The id of :func:`optuna_trial_run`'s run."""
    ref = optuna_trial_run(sweep, ray_trial_id, timeout)
    return None if ref is None else ref.run_id


def optuna_run_url(sweep: str, ref: RunRef) -> str | None:
    """The page of an Optuna sweep's run in the MLflow UI (for a SQLite store, the `mlflow ui`
    the sweep prints, on its usual port); None where the sweep's store is not known here."""
    from pact_ray.tracking.store import run_page, ui_base

    uri = _OPTUNA_STORES.get(sweep)
    return f"{ui_base(uri)}{run_page(ref.experiment_id, ref.run_id)}" if uri and ref.run_id else None


def optuna_sweep_url(sweep: str, experiment_id: str) -> str | None:
    """The MLflow UI's runs table of an Optuna sweep, filtered to its runs."""
    from pact_ray.tracking.store import runs_page, ui_base

    uri = _OPTUNA_STORES.get(sweep)
    return f"{ui_base(uri)}{runs_page(experiment_id, sweep)}" if uri else None


def mark_optuna_state(sweep: str, ref: RunRef, state: str) -> None:
    """Tag the run with its Optuna trial's end state (``pruned``: stopped early by the scheduler)."""
    from pact_ray.tracking.tags import OPTUNA_STATE_TAG

    uri = _OPTUNA_STORES.get(sweep)
    if uri:
        shared_writer(uri).set_tags(ref, {OPTUNA_STATE_TAG: state})


def _tag_optuna_trial(storage_url: str, study_name: str, ray_trial_id: str):
    """Tag the run with its Optuna trial number and name it after it ("rgb_edge s0 #3"); the
    searcher marks each Optuna trial with its Ray trial id. (The other direction, the run id in
    the Optuna trial's user attributes, is the searcher's: see LinkedOptunaSearch.)"""
    def fn(client, run_id):
        import optuna

        storage = optuna.storages.RDBStorage(storage_url)
        study_id = storage.get_study_id_from_name(study_name)
        for t in storage.get_all_trials(study_id, deepcopy=False):
            if t.user_attrs.get(RAY_TRIAL_ATTR) == ray_trial_id:
                client.set_tag(run_id, OPTUNA_TRIAL_TAG, str(t.number))
                name = client.get_run(run_id).info.run_name or ""
                client.set_tag(run_id, MLFLOW_RUN_NAME, f"{name.rpartition(' #')[0] or name} #{t.number}")
                return
    return fn


def _log_json_artifact(obj: Any, name: str):
    def fn(client, run_id):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, name)
            with open(path, "w") as f:
                json.dump(obj, f, indent=1, sort_keys=True)
            client.log_artifact(run_id, path)
    return fn


def _log_checkpoint(checkpoint):
    def fn(client, run_id):
        with checkpoint.as_directory() as d:
            client.log_artifacts(run_id, d, artifact_path="checkpoint")
    return fn

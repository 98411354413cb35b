"""Ray Tune callback: one nested MLflow child run per trial under the sweep's parent run.

It runs in the driver and only enqueues work for the process's shared :class:`MlflowWriter`
thread. It pickles its settings alone (Ray stores callbacks in ``tuner.pkl``), so a restored
sweep reconnects and finds each trial's run again by its trial-id tag.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from ray import tune

from pact_ray.errors import error_line
from pact_ray.runs.kinds import resolve_kind
from pact_ray.tracking.tags import ROLE_TAG, SWEEP_TAG, TRIAL_TAG
from pact_ray.tracking.writer import MlflowWriter, RunRef, shared_writer, status_name

# Ray's own bookkeeping in every result: not metrics of the model.
RAY_RESULT_KEYS = frozenset({
    "training_iteration", "time_this_iter_s", "timestamp", "pid", "date", "hostname", "node_ip",
    "time_since_restore", "iterations_since_restore", "timesteps_total", "episodes_total", "done",
    "experiment_tag", "trial_id", "checkpoint_dir_name", "should_checkpoint", "config", "time_total_s",
    "timesteps_since_restore", "episodes_this_iter", "timesteps_this_iter",
})


class MlflowSweepCallback(tune.Callback):
    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, kind: str, sweep: str, commit: str = ""):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.kind = kind
        self.sweep = sweep
        self.commit = commit
        self._refs: dict[str, RunRef] = {}
        self._configs: dict[str, Any] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_refs={}, _configs={})
        return state

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
        flat = cfg.flat()
        variant = cfg.variant_info
        tags = {
            "variant": cfg.variant, "phase": cfg.phase, "profile": cfg.profile, "model": cfg.model,
            "seed": cfg.seed, "note": variant.note, "kind": kind.name, "stage": kind.name,
            "trial_name": str(trial), "git_commit": self.commit, "sweep": self.sweep, "status": "running",
            ROLE_TAG: "trial", "mlflow.note.content": variant.note,
        }
        ref = RunRef(
            experiment_id=self.experiment_id, name=f"{self.sweep}/{trial}",
            key_tags={TRIAL_TAG: trial.trial_id, SWEEP_TAG: self.parent_run_id},
            tags=tags,
            params=flat, parent_run_id=self.parent_run_id,
        )
        self._refs[trial.trial_id] = ref
        self.writer.run(ref)
        self.writer.call(ref, _log_json_artifact(flat, "config.json"))
        return ref

    # ------------------------------------------------------------- Tune hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        ref = self._ref(trial)
        self.writer.set_tags(ref, {"status": "running"})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        ref = self._ref(trial)
        metrics = {k: v for k, v in result.items() if k not in RAY_RESULT_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics["wall_s"] = float(result.get("time_total_s", 0.0))
        self.writer.log_metrics(ref, int(result.get("step", result.get("training_iteration", 0))), metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        ref = self._ref(trial)
        cfg = self._configs.get(trial.trial_id)
        if cfg is not None and getattr(cfg, "export_final", False) and trial.checkpoint is not None:
            self.writer.call(ref, _log_checkpoint(trial.checkpoint))
        self.writer.set_tags(ref, {"status": "finished", "error": ""})
        self.writer.terminate(ref, status_name(True))

    def on_trial_error(self, iteration, trials, trial, **info):
        ref = self._ref(trial)
        self.writer.set_tags(ref, {"status": "errored", "error": error_line(trial)})
        self.writer.terminate(ref, status_name(False))

    def on_trial_recover(self, iteration, trials, trial, **info):
        ref = self._ref(trial)
        self.writer.set_tags(ref, {"retried_after": error_line(trial)})

    def on_experiment_end(self, trials, **info):
        self.writer.flush()


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
